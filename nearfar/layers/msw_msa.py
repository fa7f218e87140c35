"""HiDiffusion MSW-MSA: self-attention inside a randomly, cyclically shifted 2x2 window partition, channel-last.

Paper: Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion
Models" (ECCV 2024). Official code: megvii-research/HiDiffusion ``hidiffusion/hidiffusion.py``
(``make_diffusers_transformer_block``: ``window_partition`` / ``window_reverse`` around ``attn1``, and the shift
draw). HiDiffusion is training-free: it wraps the pretrained ``attn1`` of the highest-resolution transformer blocks.

``MSWAttention(dim, num_heads, bias=False, out_bias=True)`` is that wrapped ``attn1``: diffusers ``Attention``
projections (``to_q``, ``to_k``, ``to_v`` Linear C -> C without bias, ``to_out.0`` Linear C -> C with bias;
``dim_head = dim // num_heads``, scale ``dim_head^-0.5``), so a UNet's ``...transformer_blocks.N.attn1.*`` weights
load unchanged. The input is the normalized hidden states ``(B, H, W, C)``.

Forward: window ``(ceil(H/2), ceil(W/2))`` (always 2x2 windows); roll by ``-shift``, attend inside the windows,
roll back. No region mask: wrapped tokens attend across the image border. This is ``window_attention`` with
``Blocks(window, grid, shift, wrap=True)`` (the input cut into the rolled windows by one gather, ``to_q``/``to_k``/
``to_v`` as one GEMM, the windows attended as a batch). If ``H`` or ``W`` is odd the map is
bicubic-resized to ``(2 ceil(H/2), 2 ceil(W/2))`` before the projections and back to ``(H, W)`` after ``to_out``
(``F.interpolate(mode="bicubic")``, as the official code does; it warns that quality drops).

Shift: ``forward(x, shift=None, generator=None)``. ``shift=(a, b)`` (or an int for both) is used as given, taken
modulo the window (rolling by a multiple of the window only relabels windows). ``shift=None`` draws the official
schedule with ``draw_shift``: one ``u ~ U[0, 1)`` per call from ``generator`` (the global torch RNG when None, as
the official ``torch.rand(1)``), shared by the batch: ``u <= .25`` -> 0, ``<= .5`` -> ``(w_h//4, w_w//4)``,
``<= .75`` -> twice that, else three times.

Differences from the official code: none in the computation. The official code only rolls when the row shift is
positive, so a drawn shift ``(0, b)`` (windows under 4 rows) means no shift; ``draw_shift`` returns ``(0, 0)``
there, and an explicit ``shift`` is always applied. ``H, W`` come from the input, not from the pipeline's latent
size and downsample ratio. No dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads
from ..functional import fused_linear, window_attention
from ..patterns import Blocks
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def msw_window(height: int, width: int) -> tuple[int, int]:
    """The MSW-MSA window of an ``height x width`` map: ``(ceil(H/2), ceil(W/2))``."""
    return (height + 1) // 2, (width + 1) // 2


def draw_shift(window: tuple[int, int], generator: torch.Generator | None = None) -> tuple[int, int]:
    """HiDiffusion's random shift for ``window``: one uniform draw, four equally likely multiples of ``window//4``."""
    u = float(torch.rand(1, generator=generator))
    k = 0 if u <= 0.25 else 1 if u <= 0.5 else 2 if u <= 0.75 else 3
    shift = (k * (window[0] // 4), k * (window[1] // 4))
    return shift if shift[0] > 0 else (0, 0)  # the official code only rolls when the row shift is positive


def _as_shift(shift: object) -> tuple[int, int]:
    if isinstance(shift, int) and not isinstance(shift, bool):
        return shift, shift
    if (isinstance(shift, (tuple, list)) and len(shift) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in shift)):
        return int(shift[0]), int(shift[1])
    raise TypeError(f"shift must be None, an int or a pair of ints (rows, cols), got {shift!r}")


@whole_sequence(replicated=("shift", "generator"))
class MSWAttention(nn.Module):
    """MSW-MSA with diffusers ``Attention`` weights; ``forward(x (B, H, W, dim), shift=None, generator=None)``.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        bias: Biases on ``to_q``, ``to_k``, ``to_v`` (default False, as diffusers).
        out_bias: Bias on ``to_out.0`` (default True).

    Raises:
        TypeError: ``bias`` or ``out_bias`` is not a bool.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import MSWAttention
        >>> layer = MSWAttention(64, 4)
        >>> layer(torch.randn(2, 14, 14, 64), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False, out_bias: bool = True):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        check_bool(bias, "bias")
        check_bool(out_bias, "out_bias")
        self.dim, self.num_heads = dim, num_heads
        self.scale = self.head_dim ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(0.0)])

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        # one GEMM for the three projections: channels [3, heads, d], as window_attention reads them
        return fused_linear(x, (self.to_q, self.to_k, self.to_v))

    def forward(self, x: torch.Tensor, shift: tuple[int, int] | int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Attention inside the 2x2 windows of ``ceil(H/2) x ceil(W/2)``, cyclically shifted.

        Args:
            x: Input ``(B, H, W, dim)``, any size (odd sizes are bicubic-resized to even ones and back, as HiDiffusion).
            shift: The cyclic shift, an int or ``(rows, cols)``; None (default): HiDiffusion's random draw.
            generator: A ``torch.Generator`` for the random shift (None: the global one).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor; ``shift`` is not None, an int or a pair of ints; ``generator`` is not a
                ``torch.Generator``.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        _, (h, w), _ = check_channels_last(x, 2, self.dim)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        window = msw_window(h, w)
        shift = draw_shift(window, generator) if shift is None else _as_shift(shift)
        grid = (2 * window[0], 2 * window[1])
        resize = grid != (h, w)
        if resize:  # odd sizes: the official bicubic resize to an even map
            x = F.interpolate(x.permute(0, 3, 1, 2), size=grid, mode="bicubic").permute(0, 2, 3, 1)
        # window_attention rolls and cuts the C-channel input once (the cyclic windows are whole), as the official
        # code does, instead of reordering q, k and v
        pattern = Blocks(window, grid=grid, shift=(shift[0] % window[0], shift[1] % window[1]), wrap=True)
        out = self.to_out[0](window_attention(x, pattern, self._qkv, self.num_heads, self.scale))
        if resize:
            out = F.interpolate(out.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


register(Mechanism(
    name="msw_msa",
    paper="HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion Models "
          "(ECCV 2024)",
    repo="megvii-research/HiDiffusion", family="window", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: MSWAttention(dim, num_heads, **kw), cls=MSWAttention,
    notes="2x2 windows of ceil(H/2) x ceil(W/2), cyclically shifted by a random multiple of window//4 drawn per "
          "call (pass shift=... or generator=... to forward for determinism); odd sizes are bicubic-resized as "
          "in the official code. diffusers Attention parameter names (to_q, to_k, to_v, to_out.0)."))
