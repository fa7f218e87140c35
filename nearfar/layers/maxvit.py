"""MaxViT multi-axis attention: block (window) and grid attention with relative position bias, channel-last.

Paper: Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022). Official code: google-research/maxvit
``maxvit/models/maxvit.py`` (``window_partition``/``grid_partition``, ``Attention``) and
``maxvit/models/attention_utils.py`` (the relative-bias lookup); PyTorch port: timm ``timm/models/maxxvit.py``
(``PartitionAttentionCl``, ``AttentionCl``) with ``timm/layers/pos_embed_rel.py`` (``RelPosBiasTf``, ``RelPosBias``).

Block attention is ``nearfar.Blocks(P)``, grid attention ``nearfar.Grid(G)`` (token ``(r, c)`` is in window
``(r mod H/G, c mod W/G)``); both run through ``window_attention`` (the input cut into windows, the windows attended
as a batch), or ``attend`` on the whole map for partial edge windows. The relative bias is MaxViT's
``R[head, j - i + P - 1, ...]`` (key minus query, in window slots; for the grid one slot is ``H/G`` pixels), which is
exactly the table ``attend`` takes, so the official/timm-TF table is used as is.

Parameter names and shapes equal timm's ``AttentionCl``: ``qkv`` (Linear C -> 3C),
``rel_pos.relative_position_bias_table`` (``(heads, 2P-1, 2P-1)`` for ``rel_pos_type="bias_tf"``, the TF-ported
``maxvit_*_tf_*`` models; ``((2P-1)^2, heads)`` for ``"bias"``, timm's own MaxxViT/CoAtNet variants), ``proj``
(Linear C -> C). ``head_first`` follows timm: False (TF models) splits qkv as ``[3, heads, 32]``, True (timm "rw"
models) as ``[heads, 3, 32]``. timm's lookup buffers are not persistent, so a timm block's ``attn.*`` state dict
loads unchanged.

Differences from the official code: block attention also accepts sizes not divisible by ``P`` (smaller edge
windows, masked; official: error) and windows larger than the input are clipped to it; grid attention needs
``H, W`` divisible by ``G`` as in the official code; the TF code casts logits to float32 (here: the input dtype's
SDPA, which accumulates in float32 for half types); no dropout; ``rel_pos_type="mlp"`` is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_channels_last, check_pair
from ..functional import window_attention
from ..patterns import Blocks, Grid, Pattern
from .position_bias import crop_offsets, swin_table_as_offsets, trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import shards_natively, whole_extent

_PARTITIONS = ("block", "grid")
_REL_POS = ("bias_tf", "bias")


class _RelPos(nn.Module):
    """Holds ``relative_position_bias_table`` under timm's name ``rel_pos``."""

    def __init__(self, num_heads: int, size: tuple[int, int], kind: str):
        super().__init__()
        self.kind, self.size = kind, size
        if kind == "bias_tf":
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_heads, *(2 * m - 1 for m in size)))
            nn.init.normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * size[0] - 1) * (2 * size[1] - 1), num_heads))
            trunc_normal_(self.relative_position_bias_table)

    def offsets(self, window: tuple[int, ...]) -> torch.Tensor:
        table: torch.Tensor = self.relative_position_bias_table
        if self.kind == "bias":
            table = swin_table_as_offsets(table, self.size)
        return crop_offsets(table, self.size, window)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("relative_position_index", "height_lookup", "width_lookup"):  # derived buffers
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@shards_natively
class MaxViTAttention(nn.Module):
    """``MaxViTAttention(dim, partition="block", partition_size=7, dim_head=32, bias=True, rel_pos_type="bias_tf",
    head_first=False)``: x ``(B, H, W, dim)`` -> same.

    ``partition="block"``: attention inside ``P x P`` windows; ``"grid"``: inside the ``G x G`` grid of tokens
    spaced ``H/G`` apart. ``num_heads = dim // dim_head`` (MaxViT: head dim 32). ``rel_pos_type=None``: no bias.

    Args:
        dim: Channels, a positive multiple of ``dim_head``.
        partition: ``"block"`` (default, window attention) or ``"grid"`` (dilated, sparse global attention).
        partition_size: The window / grid size ``P`` or ``G``, an int or a pair of positive ints (default 7).
        dim_head: Channels per head, >= 1 (default 32); ``num_heads = dim // dim_head``.
        bias: Biases on the ``qkv`` and ``proj`` Linears (default True).
        rel_pos_type: ``"bias_tf"`` (default, MaxViT's TF table), ``"bias"`` (a Swin table) or None (no bias).
        head_first: timm "rw" channel order of ``qkv`` ``[heads, 3, dim_head]`` (default False: ``[3, heads, d]``).

    Raises:
        TypeError: A ``partition_size`` entry is not an int.
        ValueError: An unknown ``partition`` or ``rel_pos_type``; ``dim`` is not a positive multiple of ``dim_head``;
            a ``partition_size`` entry < 1.

    Examples:
        >>> import torch
        >>> from nearfar import MaxViTAttention
        >>> x = torch.randn(2, 14, 14, 64)
        >>> MaxViTAttention(64, "block", partition_size=7)(x).shape
        torch.Size([2, 14, 14, 64])
        >>> MaxViTAttention(64, "grid", partition_size=7)(x).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, partition: str = "block", partition_size: int | Sequence[int] = 7,
                 dim_head: int = 32, bias: bool = True,
                 rel_pos_type: str | None = "bias_tf", head_first: bool = False):
        super().__init__()
        if partition not in _PARTITIONS:
            raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
        if not isinstance(dim_head, int) or dim_head <= 0 or not isinstance(dim, int) or dim <= 0 or dim % dim_head:
            raise ValueError(f"dim ({dim!r}) must be a positive multiple of dim_head ({dim_head!r})")
        if rel_pos_type is not None and rel_pos_type not in _REL_POS:
            raise ValueError(f"rel_pos_type must be one of {_REL_POS} or None, got {rel_pos_type!r}")
        self.dim, self.partition, self.dim_head, self.head_first = dim, partition, dim_head, head_first
        self.num_heads = dim // dim_head
        self.partition_size = check_pair(partition_size, "partition_size")
        self.scale = dim_head ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.rel_pos = _RelPos(self.num_heads, self.partition_size, rel_pos_type) if rel_pos_type else None
        self.proj = nn.Linear(dim, dim, bias=bias)

    def _pattern(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], Pattern]:
        whole = whole_extent(spatial)  # a rank's slab inside sharded: checks and clipping on the whole map
        if self.partition == "grid":
            for a, (g, n) in enumerate(zip(self.partition_size, whole)):
                if n % g:
                    raise ValueError(f"grid attention needs the input extent {n} of axis {a} divisible by "
                                     f"partition_size[{a}]={g}")
            if spatial[0] % self.partition_size[0]:  # the window batch is planned on the slab: whole groups only
                raise ValueError(f"grid attention inside nearfar.distributed.sharded needs each rank's slab to hold "
                                 f"a multiple of partition_size[0]={self.partition_size[0]} rows, got {spatial[0]}")
            return self.partition_size, Grid(self.partition_size, grid=spatial)
        window = tuple(min(p, n) for p, n in zip(self.partition_size, whole))
        return window, Blocks(window, grid=spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block or grid attention of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``; grid attention needs ``H``, ``W`` divisible by ``partition_size`` (block
                windows larger than the map are clipped).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; a grid extent not divisible by ``partition_size``.
        """
        _, spatial, _ = check_channels_last(x, 2, self.dim)
        window, pattern = self._pattern(spatial)
        bias = self.rel_pos.offsets(window) if self.rel_pos is not None else None
        # timm "rw" models (head_first) order the qkv channels [heads, 3, dim_head]
        return self.proj(window_attention(x, pattern, self.qkv, self.num_heads, self.scale, bias,
                                          qkv_order="h3d" if self.head_first else "3hd"))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, partition={self.partition!r}, partition_size={self.partition_size}, "
                f"num_heads={self.num_heads}")


_MAXVIT = "MaxViT: Multi-Axis Vision Transformer (ECCV 2022)"
for _partition in _PARTITIONS:
    register(Mechanism(
        name=f"maxvit_{_partition}", paper=_MAXVIT, repo="google-research/maxvit",
        family="window" if _partition == "block" else "dilated", dims=("2d",),
        **image_layer(), cls=MaxViTAttention,
        make=lambda dim, num_heads, _p=_partition, **kw: MaxViTAttention(dim, _p, **kw),
        notes="head dim 32 (num_heads = dim // 32; the num_heads argument is ignored); timm AttentionCl names"))
