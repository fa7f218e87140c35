"""DualToken-ViT's dual-token mixer with position-aware global tokens: channel-last ``(B, H, W, C)`` in and out.

**PROVISIONAL / UNVERIFIED DESIGN.** Paper: Chu et al., "DualToken-ViT: Position-aware Efficient Vision
Transformer with Dual Token Fusion" (arXiv 2309.12424, SDM 2024). No official code was found (searched the
code/issue indexes again for this module), so this is our own provisional design, built from the abstract and
secondary summaries; it reproduces no checkpoint and its parameter names are our own (ConvNeXt's for the conv
encoder):

- local tokens ``x_loc = MLP(LN(DW_7(x)))`` (``dwconv``, ``norm``, ``pwconv1`` -> GELU -> ``pwconv2``);
- step-wise downsampling ``x_ds``: stride-2 ``DW_3`` + ``PW`` (``downsample[i]``), repeated on ``x_loc`` while
  the map is larger than ``global_size`` on an axis (56x56 -> 28 -> 14 -> 7), at most ``max_downsample_steps``
  times;
- position-aware global tokens ``g (B, global_size^2, C)`` (2-D layout, row-major), from the learned
  ``global_tokens`` when none are passed, refreshed by MHSA over ``concat_tokens[g, x_ds]`` keeping the first
  ``global_size^2`` outputs (``global_attn``);
- broadcast ``x_glob = CrossAttn(q = x_loc, kv = g_new)`` (``broadcast``); output ``x_loc + x_glob``.

Open choices made here (the paper's operators may differ): the downsampling reads the local tokens (not ``x``)
and has no norm/activation between steps; the refreshed tokens have no residual (``g_new`` is the attention
output); the conv encoder has no inner residual (the module is a token mixer: the caller adds the block's
residual, norms and MLP); resizing ``g`` across stages (other width) is left to the stage transition.

API: ``forward(x, global_tokens=None, return_global_tokens=False)`` returns ``y``, or ``(y, g_new)`` when
``return_global_tokens=True`` (chain blocks with ``y, g = blk(x, g, return_global_tokens=True)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    check_scale,
)
from .maformer import TokenAttention
from .position_bias import trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence(replicated=("global_tokens", "return_global_tokens"))
class DualTokenAttention(nn.Module):
    """``DualTokenAttention(dim, num_heads, global_size=7, kernel_size=7, mlp_ratio=4.0, max_downsample_steps=3,
    qkv_bias=True, qk_scale=None)``: x ``(B, H, W, dim)`` (and optional global tokens ``(B, global_size^2, dim)``)
    -> same shape. PROVISIONAL design (see the module docstring).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads of the global attention and the broadcast, >= 1.
        global_size: Side of the ``global_size x global_size`` global tokens, >= 1 (default 7).
        kernel_size: Depth-wise kernel of the conv encoder, odd and >= 1 (default 7).
        mlp_ratio: Hidden width of the encoder's MLP in ``dim`` s, a positive finite number (default 4.0).
        max_downsample_steps: Most stride-2 downsampling steps towards ``global_size``, >= 0 (default 3).
        qkv_bias: Biases on the attention projections (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: An int argument is not an int; ``mlp_ratio`` or ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``global_size`` or ``kernel_size`` < 1, an
            even ``kernel_size``; ``mlp_ratio`` <= 0 or not finite; ``max_downsample_steps`` < 0; ``qk_scale`` <= 0 or
            not finite.

    Examples:
        >>> import torch
        >>> from nearfar import DualTokenAttention
        >>> layer = DualTokenAttention(64, 4)
        >>> y, g = layer(torch.randn(2, 14, 14, 64), return_global_tokens=True)
        >>> y.shape, g.shape
        (torch.Size([2, 14, 14, 64]), torch.Size([2, 49, 64]))
        >>> layer(torch.randn(2, 14, 14, 64), g).shape   # the next block reads the refreshed tokens
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, global_size: int = 7, kernel_size: int = 7, mlp_ratio: float = 4.0,
                 max_downsample_steps: int = 3, qkv_bias: bool = True, qk_scale: float | None = None):
        super().__init__()
        check_dim_heads(dim, num_heads)
        check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.global_size = check_positive_int(global_size, "global_size")
        if check_positive_int(kernel_size, "kernel_size") % 2 == 0:
            raise ValueError(f"kernel_size must be odd (a centred depth-wise conv), got {kernel_size}")
        check_positive_float(mlp_ratio, "mlp_ratio")
        check_nonneg_int(max_downsample_steps, "max_downsample_steps")
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim), nn.Conv2d(dim, dim, 1))
            for _ in range(max_downsample_steps))
        self.global_tokens = nn.Parameter(torch.zeros(1, global_size * global_size, dim))
        trunc_normal_(self.global_tokens)
        self.global_attn = TokenAttention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.broadcast = TokenAttention(dim, num_heads, cross=True, qkv_bias=qkv_bias, qk_scale=qk_scale)

    def local_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Conv encoder: ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        t = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channels_last views: no copies
        return self.pwconv2(self.act(self.pwconv1(self.norm(t))))

    def downsampled_tokens(self, x_loc: torch.Tensor) -> torch.Tensor:
        """Step-wise stride-2 downsampling until ``<= global_size`` per axis: ``(B, h', w', C)`` -> ``(B, n', C)``."""
        t = x_loc.permute(0, 3, 1, 2)
        for step in self.downsample:
            if max(t.shape[2:]) <= self.global_size:
                break
            t = step(t)
        return t.flatten(2).transpose(1, 2)

    def aggregate(self, x_ds: torch.Tensor, global_tokens: torch.Tensor | None) -> torch.Tensor:
        """MHSA over ``concat_tokens[g, x_ds]``, first ``len(g)`` outputs; with ``g=None`` MHSA over ``x_ds``."""
        if global_tokens is None:
            return self.global_attn(x_ds)
        return self.global_attn(torch.cat([global_tokens, x_ds], 1), num_queries=global_tokens.shape[1])

    def forward(self, x: torch.Tensor, global_tokens: torch.Tensor | None = None,
                return_global_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Local tokens plus the broadcast of the refreshed global tokens.

        Args:
            x: Input ``(B, H, W, dim)``, any size.
            global_tokens: The global tokens ``(B, global_size**2, dim)`` of the previous block (x's dtype and device);
                None (default): the learned ``global_tokens``.
            return_global_tokens: Also return the refreshed global tokens (default False).

        Returns:
            ``y (B, H, W, dim)``, or ``(y, g_new)`` with ``g_new (B, global_size**2, dim)`` when
            ``return_global_tokens``.

        Raises:
            TypeError: ``x`` or ``global_tokens`` is not a tensor; ``return_global_tokens`` is not a bool.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; ``global_tokens`` of another shape, dtype or
                device.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        g = self._check_global_tokens(global_tokens, x)
        check_bool(return_global_tokens, "return_global_tokens")
        x_loc = self.local_tokens(x)
        g_new = self.aggregate(self.downsampled_tokens(x_loc), g)
        tokens = x_loc.reshape(b, n, self.dim)
        y = (tokens + self.broadcast(tokens, g_new)).reshape(b, *spatial, self.dim)
        return (y, g_new) if return_global_tokens else y

    def _check_global_tokens(self, g: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        want = (x.shape[0], self.global_size ** 2, self.dim)
        if g is None:
            return self.global_tokens.expand(x.shape[0], -1, -1)
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"global_tokens must be a torch.Tensor or None, got {type(g).__name__}")
        if tuple(g.shape) != want:
            raise ValueError(f"global_tokens must have shape (B, global_size**2, dim) = {want}, got {tuple(g.shape)}")
        if g.dtype != x.dtype or g.device != x.device:
            raise ValueError(f"global_tokens ({g.dtype}, {g.device}) must match x ({x.dtype}, {x.device})")
        return g

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, global_size={self.global_size}, "
                f"max_downsample_steps={len(self.downsample)}")


register(Mechanism(
    name="dualtoken",
    paper="DualToken-ViT: Position-aware Efficient Vision Transformer with Dual Token Fusion (arXiv 2309.12424)",
    repo="(no official code found)", family="local+global", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: DualTokenAttention(dim, num_heads, **kw), cls=DualTokenAttention,
    notes="PROVISIONAL, UNVERIFIED design from the abstract and summaries (no official code found): conv encoder "
          "(DW7+LN+MLP) local tokens, step-wise stride-2 DW3+PW downsampling to 7x7, 49 position-aware global "
          "tokens refreshed by MHSA over [g, x_ds], broadcast cross-attention, y = x_loc + x_glob. forward(x) "
          "returns y; forward(x, g, return_global_tokens=True) returns (y, g_new) to carry g between blocks. "
          "Up to 3 downsampling steps by default (56x56 -> 7x7); larger maps keep a bigger x_ds."))
