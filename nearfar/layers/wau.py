"""WAU, Window Attention Upsample: high-resolution queries attend, window by window, to a low-resolution map.

**PROVISIONAL / UNVERIFIED DESIGN.** Paper: Li, Cai, Gao, Li, Hu, "More than Encoder: Introducing Transformer
Decoder to Upsample" (arXiv 2106.10637, 2021). No official code was found (the code and issue indexes were searched
by repository name, author names, ``Window Attention Upsample``, ``AttentionUpsample`` and the arXiv id; lists of
papers cite the PDF only), and only the abstracts could be read. What they state: Attention Upsample (AU) is an
Attention Decoder (AD) plus a bilinear upsample used as a residual connection; AD is a Transformer decoder that
upsamples the deep feature conditioned on the lateral (skip) feature of the contracting path; WAD/WAU restrict
its attention to local windows. Everything below is our reconstruction, every choice a constructor flag; it
reproduces no checkpoint and its parameter names are our own.

Design (deep map ``X (B, h, w, dim)``, lateral map ``S (B, s*h, s*w, skip_dim)``, ``s = scale_factor``, window
``M`` on the low-resolution map):

- ``Q = q(norm_q(S))``, ``[K, V] = kv(norm_kv(X))`` (queries from the lateral map, keys/values from the deep map);
- key windows are the ``M x M`` windows of ``X``, query windows the ``sM x sM`` windows of ``S``; query window
  ``(i, j)`` attends to key window ``(i, j)`` only, so query ``(r, c)`` sees the key window holding
  ``(r // s, c // s)``. One ``nearfar.attend`` call, batched over (batch, window): ``s^2 M^2`` queries against
  ``M^2`` keys per window, scale ``head_dim ** -0.5``; optional relative-position bias (``rpb``) indexed by the
  query-minus-key offset in high-resolution pixels, ``a - s*j`` per axis (``2sM - s`` values; Swin's table at s=1);
- ``Z = proj(attention)``, plus ``skip_proj(S)`` if ``query_residual`` (Linear when ``skip_dim != dim``), then the
  decoder FFN ``Z = Z + mlp(norm_ffn(Z))`` if ``ffn``;
- ``out = Z + BilinearUp_s(X)`` (``align_corners=False``) if ``bilinear_residual``.

Sizes: by default ``h`` and ``w`` must be multiples of ``M`` and ``S`` exactly ``s`` times ``X``; with
``pad=True``, ``X`` is zero-padded to whole windows (padded keys are masked out), ``S`` may be any size with
``ceil(H_s / s) = h`` (a U-Net skip of odd size) and is padded to match, and the output is cropped to ``S``'s size.

How this differs from the official code: there is none to compare with; the paper's method section (window size,
heads, norms, FFN, position encoding) was not available, so each of those is a choice above, marked by a flag.

Single-input form (``forward(x)``, what ``nearfar.mechanisms()`` builds, benchmarks and trains): ``x`` is the
lateral map and the deep map is ``x`` average-pooled by ``s`` (``s x s``, stride ``s``, ceil mode), so the module
maps ``(B, H, W, dim)`` to the same shape and runs the same cross-resolution windows as the two-input form. That
pooling is our device to fit the one-input contract; the paper's deep map comes from the encoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_positive_float,
    check_positive_int,
    check_same_dtype_device,
    check_scale,
)
from ..functional import WindowBatch, attend, split_heads
from ..patterns import Blocks
from .position_bias import trunc_normal_
from .projections import PointwiseLinear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


class _Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's ``Mlp`` names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = PointwiseLinear(dim, hidden), nn.GELU(), PointwiseLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rpb_index(window: int, scale_factor: int) -> torch.Tensor:
    """``(s^2 M^2, M^2)`` index into a ``((2sM - s)^2, heads)`` table: per axis the offset ``a - s*j + s(M-1)`` of
    query ``a`` (in ``[0, sM)``) and key ``j`` (in ``[0, M)``), window-local, row-major; Swin's index at s=1."""
    m, s = window, scale_factor
    size = 2 * s * m - s
    a = torch.arange(s * m)
    j = torch.arange(m)
    off = a[:, None] - s * j[None, :] + s * (m - 1)  # (sM, M)
    idx = off[:, None, :, None] * size + off[None, :, None, :]  # (qy, qx, ky, kx)
    return idx.reshape(s * s * m * m, m * m)


def _windows(x: torch.Tensor, m: int) -> torch.Tensor:
    """``(B, H, W, C)`` with ``m | H, W`` -> ``(B * nW, m * m, C)``: windows row-major, batch-major (one copy)."""
    wb = WindowBatch.of(Blocks(m, grid=tuple(x.shape[1:3])), tuple(x.shape[1:3]), x.device)
    assert wb is not None  # whole windows: the caller padded to multiples of m
    return wb.split(x)


@whole_sequence()
class WindowAttentionUpsample(nn.Module):
    """``WindowAttentionUpsample(dim, num_heads, scale_factor=2, window_size=8, ...)``: WAU, window attention
    upsampling. PROVISIONAL design (see the module docstring). ``forward(x, skip)``: the deep map ``x (B, h, w,
    dim)`` upsampled to ``skip``'s size ``(B, H, W, dim)``, queries from ``skip (B, H, W, skip_dim)``;
    ``forward(x)``: ``skip = x`` and the deep map is ``x`` average-pooled by ``scale_factor`` (same shape out).

    Args:
        dim: Channels of the deep map and of the output, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        scale_factor: Upsampling factor ``s``, >= 1 (default 2).
        window_size: Window side ``M`` on the low-resolution map, >= 1 (default 8); query windows are ``sM``.
        skip_dim: Channels of the lateral map, >= 1; None (default): ``dim``.
        mlp_ratio: FFN hidden width over ``dim``, > 0 (default 4.0).
        ffn: Decoder FFN sub-layer ``Z + mlp(norm_ffn(Z))`` (default True).
        query_residual: Add the lateral map (``skip_proj``, a Linear if ``skip_dim != dim``) to the attention
            output, as a Transformer decoder would (default False: the bilinear path is the residual).
        bilinear_residual: Add ``BilinearUp_s(x)`` to the output (default True, the paper's AU).
        rpb: Learned relative-position bias per head (default False).
        pad: Pad to whole windows and mask the padded keys (default False: sizes must fit, see ``forward``).
        qkv_bias: Biases on ``q`` and ``kv`` (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: An int argument is not an int, a flag not a bool, ``mlp_ratio`` or ``qk_scale`` not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``scale_factor``, ``window_size`` or
            ``skip_dim`` < 1; ``mlp_ratio`` <= 0; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import WindowAttentionUpsample
        >>> wau = WindowAttentionUpsample(64, 2, scale_factor=2, window_size=4, skip_dim=32)
        >>> wau(torch.randn(2, 8, 8, 64), skip=torch.randn(2, 16, 16, 32)).shape
        torch.Size([2, 16, 16, 64])
        >>> WindowAttentionUpsample(64, 2, window_size=4)(torch.randn(2, 16, 16, 64)).shape   # one-input form
        torch.Size([2, 16, 16, 64])
    """

    relative_position_index: torch.Tensor  # a non-persistent buffer, with ``rpb`` only

    def __init__(self, dim: int, num_heads: int, scale_factor: int = 2, window_size: int = 8,
                 skip_dim: int | None = None, mlp_ratio: float = 4.0, ffn: bool = True, query_residual: bool = False,
                 bilinear_residual: bool = True, rpb: bool = False, pad: bool = False, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        self.scale_factor = check_positive_int(scale_factor, "scale_factor")
        self.window_size = check_positive_int(window_size, "window_size")
        self.skip_dim = dim if skip_dim is None else check_positive_int(skip_dim, "skip_dim")
        mlp_ratio = check_positive_float(mlp_ratio, "mlp_ratio")
        self.ffn, self.query_residual, self.bilinear_residual, self.pad = (
            check_bool(ffn, "ffn"), check_bool(query_residual, "query_residual"),
            check_bool(bilinear_residual, "bilinear_residual"), check_bool(pad, "pad"))
        check_bool(rpb, "rpb")
        check_bool(qkv_bias, "qkv_bias")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.norm_q, self.norm_kv = nn.LayerNorm(self.skip_dim), nn.LayerNorm(dim)
        self.q = PointwiseLinear(self.skip_dim, dim, bias=qkv_bias)
        self.kv = PointwiseLinear(dim, 2 * dim, bias=qkv_bias)
        self.proj = PointwiseLinear(dim, dim)
        m, s = self.window_size, self.scale_factor
        self.relative_position_bias_table: nn.Parameter | None = None
        if rpb:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * s * m - s) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table)
            self.register_buffer("relative_position_index", rpb_index(m, s), persistent=False)
        self.skip_proj: nn.Module | None = (nn.Linear(self.skip_dim, dim) if self.skip_dim != dim else nn.Identity()) \
            if query_residual else None
        if ffn:
            self.norm_ffn = nn.LayerNorm(dim)
            self.mlp = _Mlp(dim, max(1, int(dim * mlp_ratio)))

    def low_res(self, x: torch.Tensor) -> torch.Tensor:
        """The one-input form's deep map: ``x`` average-pooled ``s x s`` with stride ``s`` (ceil mode: an edge
        cell averages the pixels it has), ``(B, ceil(H/s), ceil(W/s), C)``."""
        s = self.scale_factor
        if s == 1:
            return x
        return F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)

    def upsample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``BilinearUp_s(x)`` (``align_corners=False``, scale ``s``) cropped to ``size``."""
        if self.scale_factor == 1:
            return x
        up = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=self.scale_factor, mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1)
        return up[:, :size[0], :size[1]]

    def _check_sizes(self, x: torch.Tensor, skip: torch.Tensor) -> None:
        (h, w), (hs, ws), s, m = x.shape[1:3], skip.shape[1:3], self.scale_factor, self.window_size
        if skip.shape[0] != x.shape[0]:
            raise ValueError(f"skip must have x's batch size {x.shape[0]}, got {skip.shape[0]}")
        if self.pad:
            if -(-hs // s) != h or -(-ws // s) != w:
                raise ValueError(f"skip's height and width must be in ({s}*(h-1), {s}*h] x ({s}*(w-1), {s}*w] "
                                 f"for x of {h}x{w} (scale_factor={s}), got {hs}x{ws}")
            return
        if (hs, ws) != (s * h, s * w):
            raise ValueError(f"skip must be scale_factor={s} times x: {s * h}x{s * w} for x of {h}x{w}, got {hs}x{ws} "
                             "(pad=True accepts a skip of size in (s*(h-1), s*h])")
        if h % m or w % m:
            raise ValueError(f"the low-resolution map's height and width must be multiples of window_size={m}, got "
                             f"{h}x{w} (pad=True pads to whole windows and masks the padded keys)")

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The upsampled map at the lateral map's resolution.

        Args:
            x: The deep map ``(B, h, w, dim)``; without ``skip``, the lateral map ``(B, H, W, dim)`` itself (needs
                ``skip_dim == dim``; the deep map is then ``x`` average-pooled by ``scale_factor``).
            skip: The lateral map ``(B, H, W, skip_dim)`` with ``(H, W) = s * (h, w)``; with ``pad=True`` any
                ``H`` in ``(s(h-1), sh]`` (likewise ``W``). Without ``pad``, ``h`` and ``w`` must be multiples of
                ``window_size``.

        Returns:
            ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` or ``skip`` is not a tensor, or they differ in dtype.
            ValueError: a shape is not as above (the message names the constraint), or a map is empty.
        """
        check_channels_last(x, 2, self.dim)
        if skip is None:
            if self.skip_dim != self.dim:
                raise ValueError(f"forward(x) without skip needs skip_dim == dim, got {self.skip_dim} and {self.dim}")
            tile = self.scale_factor * self.window_size
            if not self.pad and (x.shape[1] % tile or x.shape[2] % tile):
                raise ValueError(f"forward(x) without pad needs x's height and width to be multiples of "
                                 f"scale_factor*window_size={tile}, got {x.shape[1]}x{x.shape[2]} (pad=True pads)")
            x, skip = self.low_res(x), x
        else:
            check_channels_last(skip, 2, self.skip_dim, name="skip")
            check_same_dtype_device(x=x, skip=skip)
        self._check_sizes(x, skip)
        return self._upsample_attention(x, skip)

    def _upsample_attention(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        hs, ws, cs = skip.shape[1:]
        m, s = self.window_size, self.scale_factor
        hp, wp = -(-h // m) * m, -(-w // m) * m
        nh, nw, sm = hp // m, wp // m, s * m
        padded = (hp, wp) != (h, w) or (hs, ws) != (s * hp, s * wp)
        xd, sk = x, skip
        if padded:
            xd = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
            sk = F.pad(skip, (0, 0, 0, s * wp - ws, 0, s * hp - hs))
        # cut both maps into their windows before any projection (one copy of each input), batch-major windows
        kw = _windows(xd, m)
        qw = _windows(sk, sm)
        q = split_heads(self.q(self.norm_q(qw)), self.num_heads)
        # keys and values head-major and contiguous (a copy of the small low-res side): attend's input checks and
        # kernel read them in one pass, and their gradients come back without zero-filled buffers
        k, v = self.kv(self.norm_kv(kw)).reshape(kw.shape[0], m * m, 2, self.num_heads, -1).permute(
            2, 0, 3, 1, 4).contiguous().unbind(0)
        mask = None
        if (hp, wp) != (h, w):
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            mask = valid.reshape(nh, m, nw, m).permute(0, 2, 1, 3).reshape(nh * nw, m * m).repeat(b, 1)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)[None]
        out = attend(q, k, v, scale=self.scale, bias=bias, key_padding_mask=mask)
        # heads and windows back to the raster map in one copy, then crop: proj and FFN run on the kept pixels only
        heads, d = out.shape[1], out.shape[3]
        z = out.reshape(b, nh, nw, heads, sm, sm, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nh * sm, nw * sm, c)
        if padded:
            z = z[:, :hs, :ws]
        z = self.proj(z)
        if self.skip_proj is not None:
            z = z + self.skip_proj(skip)
        if self.ffn:
            z = z + self.mlp(self.norm_ffn(z))
        if self.bilinear_residual:
            z = z + self.upsample(x, (hs, ws))
        return z

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, scale_factor={self.scale_factor}, "
                f"window_size={self.window_size}, skip_dim={self.skip_dim}, ffn={self.ffn}, "
                f"query_residual={self.query_residual}, bilinear_residual={self.bilinear_residual}, "
                f"rpb={self.relative_position_bias_table is not None}, pad={self.pad}")


#: the one-input form the registry builds: windows of 7 on the pooled map (query windows 14: 56x56 and 14x14
#: maps split into whole windows), any size (padded), and no bilinear residual (see the notes)
REGISTRY_DEFAULTS: dict[str, Any] = dict(window_size=7, pad=True, bilinear_residual=False)

register(Mechanism(
    name="wau",
    paper="More than Encoder: Introducing Transformer Decoder to Upsample (Li, Cai, Gao, Li, Hu; arXiv 2106.10637, "
          "2021)",
    repo="(no official code found)", family="window", dims=("2d",),
    **image_layer(cross="its cross-attention pairs a map with one s times smaller, window by window "
                        "(forward(x, skip=...)); CAB's cross patterns take a context sequence of any length, which "
                        "has no aligned windows"),
    cls=WindowAttentionUpsample,
    make=lambda dim, num_heads, **kw: WindowAttentionUpsample(dim, num_heads, **{**REGISTRY_DEFAULTS, **kw}),
    notes="PROVISIONAL, UNVERIFIED design from the paper abstract only (no official code found). The upsampler is "
          "forward(x_deep, skip); the registry entry is its one-input form: x is the lateral map, the deep map is x "
          "average-pooled 2x2, and full-resolution 14x14 query windows attend to the pooled 7x7 key windows (then "
          "proj and the decoder FFN), so x -> same shape. make() sets window_size=7, pad=True and turns the "
          "bilinear residual off: as a token mixer the caller adds x, and BilinearUp(pool(x)) would add a blurred "
          "copy of x a second time."))
