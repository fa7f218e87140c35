"""UniFormer token mixers (local MHRA and global MHRA): channel-last ``(B, H, W, C)`` in and out.

Paper: Li et al., "UniFormer: Unifying Convolution and Self-attention for Visual Recognition" (ICLR 2022, TPAMI).
Official code: Sense-X/UniFormer, ``image_classification/models/uniformer.py`` (``CBlock``, ``SABlock``,
``Attention``). timm does not ship UniFormer.

Only the relation aggregators (the token mixers) are implemented; the blocks' dynamic position embedding
(``pos_embed``, a 3x3 depth-wise conv added residually), the residual connections and the MLPs are not. Parameter
names equal the official block's names for these parts, so a checkpoint's mixer weights load unchanged: the
``norm1.* conv1.* attn.* conv2.*`` entries of ``blocksN.i`` (``CBlock``, stages 1-2) and the ``norm1.* attn.qkv.*
attn.proj.*`` entries of ``blocksN.i`` (``SABlock``, stages 3-4).

- ``UniFormerLocalMHRA``: ``conv2(attn(conv1(norm1(x))))`` with ``norm1`` a BatchNorm, ``conv1``/``conv2`` 1x1 convs
  and ``attn`` the depth-wise 5x5 conv (zero padding 2): a content-independent affinity, each channel its own
  "head". It has no softmax, so it is plain convolution (run on the channels-last memory, no copies), not
  ``nearfar.attend``.
- ``UniFormerGlobalMHRA``: ``attn(norm1(x))`` with ``norm1`` a LayerNorm (eps 1e-6, the model's) and ``attn`` dense
  multi-head self-attention (fused ``qkv`` Linear with bias, as the models set ``qkv_bias=True``; ``proj``),
  through ``nearfar.attend``. The heads follow the official rule ``num_heads = dim // head_dim`` with
  ``head_dim=64`` unless ``num_heads`` is given.

Differences from the official code: no DPE/MLP/residual (see above); attention, projection and path dropout and
layer scale are not implemented (UniFormer's image models use none of the dropouts in their default configs).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_positive_int, check_scale
from ..functional import attend, merge_heads, split_qkv
from .registry import Mechanism, image_layer, register
from .sharding import shards_natively, whole_sequence


@whole_sequence()
class UniFormerLocalMHRA(nn.Module):
    """``UniFormerLocalMHRA(dim, kernel_size=5)``: x ``(B, H, W, dim)`` -> same shape, ``PW_b(DW_k(PW_a(BN(x))))``.

    ``kernel_size`` must be odd (zero padding ``kernel_size // 2`` keeps the size, as in the official code).

    Args:
        dim: Channels, >= 1 (each channel is its own "head").
        kernel_size: Depth-wise kernel size, odd and >= 1 (default 5).

    Raises:
        TypeError: ``dim`` or ``kernel_size`` is not an int.
        ValueError: ``dim`` or ``kernel_size`` < 1; an even ``kernel_size``.

    Examples:
        >>> import torch
        >>> from nearfar import UniFormerLocalMHRA
        >>> UniFormerLocalMHRA(64, kernel_size=5)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (size-preserving zero padding), got {kernel_size}")
        self.kernel_size = kernel_size
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The local affinity ``PW_b(DW_k(PW_a(BN(x))))`` of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        check_channels_last(x, 2, self.dim)
        # the channels-first view of a channel-last tensor is channels_last memory: the convs run on it directly
        y = x.permute(0, 3, 1, 2)
        return self.conv2(self.attn(self.conv1(self.norm1(y)))).permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"


@shards_natively
class UniFormerGlobalMHRA(nn.Module):
    """``UniFormerGlobalMHRA(dim, num_heads=None, head_dim=64, qkv_bias=True, qk_scale=None, norm_eps=1e-6)``:
    x ``(B, H, W, dim)`` -> same shape, ``MHSA(LN(x))`` over all H*W tokens.

    ``num_heads=None`` takes the official ``dim // head_dim`` heads (the head dim is then ``dim // num_heads``).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads; None (default): ``dim // head_dim``.
        head_dim: Channels per head used to derive ``num_heads`` when it is None, in ``[1, dim]`` (default 64).
        qkv_bias: Bias on the fused ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``(dim // num_heads) ** -0.5``.
        norm_eps: The LayerNorm's epsilon (default 1e-6).

    Raises:
        TypeError: ``dim`` or ``head_dim`` is not an int; ``qk_scale`` is not a number.
        ValueError: ``dim`` < 1; ``head_dim`` < 1 or > ``dim`` (with ``num_heads=None``); ``dim`` is not a positive
            multiple of ``num_heads``; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import UniFormerGlobalMHRA
        >>> UniFormerGlobalMHRA(64, num_heads=4)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int | None = None, head_dim: int = 64, qkv_bias: bool = True,
                 qk_scale: float | None = None, norm_eps: float = 1e-6):
        super().__init__()
        check_positive_int(dim, "dim")
        if num_heads is None:
            check_positive_int(head_dim, "head_dim")
            if dim < head_dim:
                raise ValueError(f"dim ({dim}) must be >= head_dim ({head_dim}) to derive num_heads = dim // "
                                 "head_dim; pass num_heads or a smaller head_dim")
            num_heads = dim // head_dim
        d = check_dim_heads(dim, num_heads)
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale if qk_scale is not None else d ** -0.5  # official: ``qk_scale or head_dim ** -0.5``
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim, bias=qkv_bias), "proj": nn.Linear(dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``MHSA(LN(x))`` over all ``H*W`` tokens of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        _, spatial, _ = check_channels_last(x, 2, self.dim)
        q, k, v = split_qkv(self.attn["qkv"](self.norm1(x)), self.num_heads)
        return self.attn["proj"](merge_heads(attend(q, k, v, scale=self.scale), spatial))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


_PAPER = "UniFormer: Unifying Convolution and Self-attention for Visual Recognition (ICLR 2022)"
register(Mechanism(
    name="uniformer_local", paper=_PAPER, repo="Sense-X/UniFormer", family="local", dims=("2d",),
    **image_layer(), make=lambda dim, num_heads, **kw: UniFormerLocalMHRA(dim, **kw),
    cls=UniFormerLocalMHRA,
    notes="Local MHRA of CBlock (BN -> 1x1 -> depth-wise 5x5 -> 1x1): a static, content-independent affinity "
          "(plain convolution, no softmax); each channel is its own head, so num_heads is ignored. DPE and MLP "
          "omitted."))
register(Mechanism(
    name="uniformer_global", paper=_PAPER, repo="Sense-X/UniFormer", family="dense", dims=("2d",),
    **image_layer(), cls=UniFormerGlobalMHRA,
    make=lambda dim, num_heads, **kw: UniFormerGlobalMHRA(dim, None if dim >= 64 else num_heads, **kw),
    notes="Global MHRA of SABlock (LayerNorm eps 1e-6 -> dense MHSA, qkv_bias=True). make() follows the official "
          "head rule num_heads = dim // 64 and ignores its num_heads (dim 96 -> 1 head of 96, 384 -> 6 heads of "
          "64) unless dim < 64; pass num_heads to the class to choose. DPE and MLP omitted."))
