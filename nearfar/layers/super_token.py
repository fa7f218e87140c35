"""Super Token Attention (STA, SViT/STViT): channel-last ``(B, H, W, C)`` in and out.

Paper: Huang et al., "Vision Transformer with Super Token Sampling" (CVPR 2023).
Official code: hhb072/STViT, ``models/stvit.py`` (``StokenAttention``, ``Unfold``, ``Fold``, ``Attention``).

The map (zero-padded bottom/right to a multiple of the ``stoken_size`` cell) is cut into cells; each cell's mean
is its initial super token. Without gradient, every pixel gets a softmax association ``Q`` over the 3x3 super
tokens around its cell (scale ``C ** -0.5``; out-of-grid neighbours are zero vectors, so they keep logit 0 and
take softmax mass); ``n_iter - 1`` times the super tokens are re-estimated as ``Q``-weighted pixel means. The last
update lets the gradient reach the pixels (``Q`` and the denominator carry none). The super tokens are refined by
multi-head self-attention (through ``nearfar.attend``), mapped back to pixels with the same ``Q`` and the padding
is cropped. A ``(1, 1)`` cell is plain multi-head self-attention over all pixels (the official stage 3 and 4).

``stoken_size="auto"`` (the default here; the official class has none) picks the cell the released STViT models
(small/base/large, ``stoken_size=[8, 4, 1, 1]`` at 224 and 384 inputs) use at the stage with that map size:
``min(H, W) >= 56`` -> ``(8, 8)``, ``>= 28`` -> ``(4, 4)``, smaller -> ``(1, 1)``; so a 56x56 map uses 8x8 cells
and a 14x14 map is plain MHSA. Pass an int or ``(h, w)`` to fix it.

Parameter names follow the official module: ``stoken_refine.qkv`` (C -> 3C, channels split ``[heads, 3, d]``:
per head its q, then k, then v block, as the official ``reshape(B, heads, 3 * d, N).chunk(3)``) and
``stoken_refine.proj`` (timm does not ship STViT). Differences from the official code:

- Channel-last input; ``qkv``/``proj`` are ``nn.Linear`` instead of 1x1 ``nn.Conv2d``. Official state dicts load
  unchanged: their ``(out, in, 1, 1)`` weights are reshaped on load and the frozen identity kernels
  (``unfold.weights``, ``fold.weights``) are dropped (the 3x3 neighbour gather/scatter uses shifted slices).
- The initial super tokens are cell means (the official ``adaptive_avg_pool2d`` to ``(hh, ww)`` on the padded
  map, whose bins are exactly the cells).
- ``refine_attention=False`` (a conv refine, not used by the released models) and attention/projection dropout
  (0 in the released models) are not implemented. ``qkv_bias`` defaults to False as in the official class; the
  released models pass ``qkv_bias=True``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_pair,
    check_positive_int,
    check_scale,
)
from ..functional import attend, merge_heads
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

_OFFSETS = [(dy, dx) for dy in range(3) for dx in range(3)]  # neighbour k = 3 * dy + dx, offset (dy - 1, dx - 1)


def gather_neighbours(s: torch.Tensor) -> torch.Tensor:
    """Super tokens ``(B, hh, ww, C)`` -> the 3x3 neighbourhood of each cell ``(B, hh*ww, 9, C)``, zeros off-grid."""
    b, hh, ww, c = s.shape
    p = F.pad(s, (0, 0, 1, 1, 1, 1))
    return torch.stack([p[:, dy:dy + hh, dx:dx + ww] for dy, dx in _OFFSETS], dim=3).reshape(b, hh * ww, 9, c)


def scatter_neighbours(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse direction of ``gather_neighbours``: ``(B, hh*ww, 9, *rest)`` -> ``(B, hh*ww, *rest)``, each cell's
    9 entries added into the neighbour cell they refer to; entries for off-grid neighbours are dropped."""
    hh, ww = grid
    b, rest = t.shape[0], t.shape[3:]
    # cell (r, c) receives entry k of cell (r - dy + 1, c - dx + 1): a sum of 9 shifted slices (no in-place
    # scatter: slice-assignments make torch.compile take minutes)
    p = F.pad(t.reshape(b, hh, ww, -1), (0, 0, 1, 1, 1, 1)).reshape(b, hh + 2, ww + 2, 9, -1)
    out = cast(torch.Tensor, sum(p[:, 2 - dy:2 - dy + hh, 2 - dx:2 - dx + ww, k]
                                 for k, (dy, dx) in enumerate(_OFFSETS)))
    return out.reshape(b, hh * ww, *rest)


class _RefineAttention(nn.Module):
    """The official ``Attention`` (MHSA over a map) on channel-last ``(B, h, w, C)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[-1]
        qkv = self.qkv(x).reshape(b, -1, self.num_heads, 3, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        return self.proj(merge_heads(attend(q, k, v, scale=self.scale), tuple(x.shape[1:-1])))


def _cell(value: object) -> tuple[int, int]:
    if isinstance(value, str):  # "auto" is handled by the caller
        raise ValueError(f"stoken_size must be 'auto', a positive int or an (h, w) tuple of them, got {value!r}")
    return check_pair(value, "stoken_size")


@whole_sequence()
class SuperTokenAttention(nn.Module):
    """``SuperTokenAttention(dim, num_heads=8, stoken_size="auto", n_iter=1, refine=True, qkv_bias=False,
    qk_scale=None)``: x ``(B, H, W, dim)`` -> same shape. ``refine=False`` skips the super-token MHSA.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads of the super-token MHSA, >= 1 (default 8).
        stoken_size: Super-token cell, ``"auto"`` (default: 8x8 for maps >= 56, 4x4 for >= 28, else 1x1), an int or
            an ``(h, w)`` pair of positive ints.
        n_iter: Association iterations, >= 1 (default 1).
        refine: Run the MHSA over the super tokens (default True).
        qkv_bias: Bias on the MHSA's ``qkv`` (default False).
        qk_scale: The MHSA's score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``n_iter`` or a ``stoken_size`` entry is not an int; ``refine`` is not a bool; ``qk_scale`` is
            not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; a string ``stoken_size`` other than
            ``"auto"``, an entry < 1; ``n_iter`` < 1; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import SuperTokenAttention
        >>> layer = SuperTokenAttention(64, 4, stoken_size=4)
        >>> layer(torch.randn(2, 14, 14, 64)).shape   # zero-padded to 16x16 cells, cropped back
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int = 8, stoken_size: int | tuple[int, int] | str = "auto",
                 n_iter: int = 1, refine: bool = True, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        check_dim_heads(dim, num_heads)
        self.stoken_size = stoken_size if stoken_size == "auto" else _cell(stoken_size)
        check_positive_int(n_iter, "n_iter")
        check_bool(refine, "refine")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads, self.n_iter, self.refine = dim, num_heads, n_iter, refine
        self.scale = dim ** -0.5  # association logits: full channel width, one "head"
        self.stoken_refine = _RefineAttention(dim, num_heads, qkv_bias, qk_scale) if refine else None

    def cell_size(self, height: int, width: int) -> tuple[int, int]:
        """The super-token cell used for an ``height x width`` map."""
        if self.stoken_size != "auto":
            return cast("tuple[int, int]", self.stoken_size)  # "auto" or a checked pair
        side = min(height, width)
        s = 8 if side >= 56 else 4 if side >= 28 else 1
        return (s, s)

    def associate(self, pixels: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad association of ``pixels (B, hh*ww, h*w, C)`` (grouped per cell): the last ``Q (B, hh*ww, h*w, 9)``
        and its per-super-token mass ``(B, hh*ww, 1)`` (the update's denominator)."""
        with torch.no_grad():
            s = pixels.mean(2)
            for it in range(self.n_iter):
                nb = gather_neighbours(s.reshape(s.shape[0], *grid, -1))
                q = torch.softmax(pixels @ nb.transpose(-1, -2) * self.scale, dim=-1)
                mass = scatter_neighbours(q.sum(2), grid).unsqueeze(-1)
                if it < self.n_iter - 1:
                    s = self.update(pixels, q, mass, grid)
        return q, mass

    @staticmethod
    def update(pixels: torch.Tensor, q: torch.Tensor, mass: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Super tokens ``(B, hh*ww, C)``: Q-weighted means of the pixels whose 3x3 neighbourhood holds them."""
        return scatter_neighbours(q.transpose(-1, -2) @ pixels, grid) / (mass + 1e-12)

    @staticmethod
    def upsample(s: torch.Tensor, q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Pixels ``(B, hh*ww, h*w, C)`` from super tokens ``(B, hh*ww, C)``: ``sum_j Q_ij S_j`` over the 3x3 cells."""
        return q @ gather_neighbours(s.reshape(s.shape[0], *grid, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Super-token attention: associate pixels with super tokens, refine them, map them back to the pixels.

        Args:
            x: Input ``(B, H, W, dim)``, any size (zero-padded to whole cells, then cropped).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, (h0, w0), _ = check_channels_last(x, 2, self.dim)
        sh, sw = self.cell_size(h0, w0)
        if (sh, sw) == (1, 1):
            return self._refined(x) if self.refine else x
        pad_b, pad_r = -h0 % sh, -w0 % sw
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        c, hh, ww = self.dim, x.shape[1] // sh, x.shape[2] // sw
        grid = (hh, ww)
        pixels = x.reshape(b, hh, sh, ww, sw, c).transpose(2, 3).reshape(b, hh * ww, sh * sw, c)
        q, mass = self.associate(pixels, grid)
        s = self.update(pixels, q, mass, grid)
        if self.refine:
            s = self._refined(s.reshape(b, hh, ww, c)).reshape(b, hh * ww, c)
        out = self.upsample(s, q, grid).reshape(b, hh, ww, sh, sw, c).transpose(2, 3).reshape(b, hh * sh, ww * sw, c)
        return out[:, :h0, :w0] if pad_b or pad_r else out

    def _refined(self, x: torch.Tensor) -> torch.Tensor:
        assert self.stoken_refine is not None  # built when refine=True
        return self.stoken_refine(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # official checkpoints: 1x1-conv weights (out, in, 1, 1) and frozen identity kernels we do not need
        for name in ("unfold.weights", "fold.weights"):
            state_dict.pop(prefix + name, None)
        for name in ("stoken_refine.qkv.weight", "stoken_refine.proj.weight"):
            w = state_dict.get(prefix + name)
            if w is not None and w.dim() == 4 and w.shape[2:] == (1, 1):
                state_dict[prefix + name] = w.flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, stoken_size={self.stoken_size}, n_iter={self.n_iter}, "
                f"refine={self.refine}")


register(Mechanism(
    name="super_token", paper="Vision Transformer with Super Token Sampling (CVPR 2023)",
    repo="hhb072/STViT", family="summary tokens", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: SuperTokenAttention(dim, num_heads, **kw), cls=SuperTokenAttention,
    notes="stoken_size='auto' follows the released STViT schedule by map size: 8x8 cells for min(H, W) >= 56, 4x4 "
          "for >= 28, else 1x1 = plain MHSA (the official stage 3 at 14x14). Maps are zero-padded to the cell and "
          "cropped."))
