"""VSA, varied-size window attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Zhang, Xu, Zhang & Tao, "VSA: Learning Varied-Size Window Attention in Vision Transformers" (ECCV 2022,
arXiv 2204.08446). Official code: ViTAE-Transformer/ViTAE-VSA, ``Image-Classification/vitaev2_vsa/vsa.py``
(``VSAWindowAttention``, used by ``NormalCell.py`` with ``out_dim=dim``); the detection fork
``Object-Detection/mmdet/models/backbones/vitaev2_vsa_modules/window.py`` builds the coordinates per call.

The map is cut into ``window_size x window_size`` windows (zero-padded bottom/right to a multiple). Each window's
queries are its own pixels; its keys and values are ``window_size**2`` points sampled bilinearly from the key and
value maps on a rectangle that every head moves and stretches on its own: for window ``(a, b)``, head ``h`` and
key slot ``(m_y, m_x)`` the location (in the ``[-1, 1]`` coordinates of ``grid_sample`` with
``align_corners=True`` over the padded map) is ``centre_ab + delta_m * (1 + scale_hab) + offset_hab``, where
``delta_m`` is the slot's offset from the window centre. Scales and offsets come from the window's average-pooled
input through LeakyReLU and a 1x1 conv (``sampling_scales`` / ``sampling_offsets``, ``2 * num_heads`` channels,
per head ``(x, y)``); the offsets are divided by ``W // window_size`` (x) and ``H // window_size`` (y). Points
outside the map sample zeros (zero keys: logit 0 plus the bias, still in the softmax). Attention is the window
attention of the queries over the sampled keys with Swin's relative position bias on the slot pairs.

Computation: one pooled pass and one matmul give both predictors' outputs; one ``grid_sample`` call samples the
keys and values of every head together (``B * heads`` maps of ``2 * head_dim`` channels, the grid laid out window
by window so its output is already grouped per window); the attention is one batched ``nearfar.attend`` call
(queries of a window against its sampled keys, the bias shared by all windows).

Parameter names and shapes equal the official module's (``sampling_offsets.2``, ``sampling_scales.2``, ``qkv``,
``proj``: 1x1 ``nn.Conv2d``; ``relative_position_bias_table``; the ``relative_position_index`` buffer), so an
official state dict loads with ``strict=True``. Differences from the official code:

- input and output are channel-last; the 1x1 convs run as matrix products on the last axis;
- the official module fixes ``img_size`` at construction (coordinate buffers, created with ``.cuda()``); here
  the coordinates are built per call for the input's size, with the same formulas as the classification code
  (bottom/right padding, offsets x / ``(W // window_size)``, y / ``(H // window_size)``; the detection fork pads
  symmetrically and divides x by ``H // window_size``, y by ``W // window_size``);
- ``H`` and ``W`` must be at least ``window_size`` (the official offset normalisation divides by
  ``H // window_size``: a smaller map gives a division by zero there), a clear error otherwise;
- the last conv of both predictors is zero-initialised by default (``zero_init=True``), so the layer starts as
  plain window attention as the paper intends; the official ``_reset_parameters`` that does this is never called
  in the classification code (``zero_init=False`` keeps PyTorch's default conv init, as that code runs);
- keys and values are sampled from the unpadded maps (zeros outside them: identical to sampling the zero-padded
  maps); both predictors share one average pool (the official code pools twice; same values);
- a one-pixel axis (``window_size=1`` and ``H`` or ``W`` = 1) samples its only pixel whatever the offset; the
  official coordinates are NaN there (``2 / (size - 1)``);
- no attention/projection dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_positive_int, check_scale
from ..functional import attend, pointwise_linear
from .position_bias import trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def swin_relative_position_index(ws: int) -> torch.Tensor:
    """Swin's ``(ws*ws, ws*ws)`` index into the ``(2ws-1)**2`` table: query-minus-key slot offsets, row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + ws - 1
    return rel[0] * (2 * ws - 1) + rel[1]


def _last_conv(seq: nn.Module) -> nn.Conv2d:
    """The 1x1 conv that ends a window predictor (pool, LeakyReLU, conv)."""
    conv = seq[-1] if isinstance(seq, nn.Sequential) else None
    assert isinstance(conv, nn.Conv2d)
    return conv


def _axis_coords(n: int, ws: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates on one axis of ``n`` pixels padded to ``nw * ws``: window centres ``(nw,)`` and slot
    offsets from the centre ``(ws,)``."""
    half = (ws - 1) / 2
    centres = torch.arange(-(-n // ws), device=device, dtype=dtype) * ws + half
    return centres, torch.arange(ws, device=device, dtype=dtype) - half


@whole_sequence()
class VSAWindowAttention(nn.Module):
    """``VSAWindowAttention(dim, num_heads, out_dim=None, window_size=7, qkv_bias=True, qk_scale=None,
    zero_init=True)``: x ``(B, H, W, dim)`` -> ``(B, H, W, out_dim)``, any ``H, W >= window_size``.

    Args:
        dim: Input channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        out_dim: Channels of q, k, v and the output, a positive multiple of ``num_heads``; None (default): ``dim``.
        window_size: Window side, >= 1 (default 7, as ViTAE-v2-VSA).
        qkv_bias: Bias on the ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``(dim // num_heads) ** -0.5`` (the
            official code takes the input width here, also when ``out_dim`` differs).
        zero_init: Zero the last conv of both window predictors, so that the layer starts as plain window
            attention (default True); False keeps PyTorch's default conv init.

    Raises:
        TypeError: ``window_size`` is not an int; ``qk_scale`` is not a number; ``qkv_bias`` or ``zero_init`` is
            not a bool.
        ValueError: ``dim`` or ``out_dim`` is not a positive multiple of ``num_heads``; ``window_size`` < 1;
            ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import VSAWindowAttention
        >>> attn = VSAWindowAttention(64, 2, window_size=7)
        >>> attn(torch.randn(2, 14, 17, 64)).shape   # 17 is padded to 21 inside
        torch.Size([2, 14, 17, 64])
    """

    relative_position_index: torch.Tensor

    def __init__(self, dim: int, num_heads: int, out_dim: int | None = None, window_size: int = 7,
                 qkv_bias: bool = True, qk_scale: float | None = None, zero_init: bool = True):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        out_dim = dim if out_dim is None else out_dim
        if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim <= 0 or out_dim % num_heads:
            raise ValueError(f"out_dim ({out_dim!r}) must be None or a positive multiple of num_heads ({num_heads})")
        ws = check_positive_int(window_size, "window_size")
        check_bool(qkv_bias, "qkv_bias")
        qk_scale = check_scale(qk_scale)
        check_bool(zero_init, "zero_init")
        self.dim, self.num_heads, self.out_dim, self.window_size = dim, num_heads, out_dim, ws
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.sampling_offsets = nn.Sequential(nn.AvgPool2d(ws, ws), nn.LeakyReLU(), nn.Conv2d(dim, num_heads * 2, 1))
        self.sampling_scales = nn.Sequential(nn.AvgPool2d(ws, ws), nn.LeakyReLU(), nn.Conv2d(dim, num_heads * 2, 1))
        self.qkv = nn.Conv2d(dim, out_dim * 3, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(out_dim, out_dim, 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", swin_relative_position_index(ws))
        trunc_normal_(self.relative_position_bias_table)
        if zero_init:
            self.reset_sampling()

    def reset_sampling(self) -> None:
        """Zero the last conv of both window predictors (the official ``_reset_parameters``): plain windows."""
        for conv in (_last_conv(self.sampling_offsets), _last_conv(self.sampling_scales)):
            for p in (conv.weight, conv.bias):
                if p is not None:
                    nn.init.zeros_(p)

    def window_transforms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-window, per-head ``(offsets, scales)``, each ``(B, nH, nW, heads, 2)`` with ``(x, y)`` last, as the
        official predictors output them (offsets in ``[-1, 1]`` units before the division by the window count).

        Args:
            x: Input ``(B, H, W, dim)``, ``H, W >= window_size``.

        Returns:
            ``(offsets, scales)``.
        """
        b, h, w, c = x.shape
        ws = self.window_size
        pb, pr = -h % ws, -w % ws
        if pb or pr:
            x = F.pad(x, (0, 0, 0, pr, 0, pb))
        pooled = F.leaky_relu(x.reshape(b, (h + pb) // ws, ws, (w + pr) // ws, ws, c).mean((2, 4)))
        convs = (_last_conv(self.sampling_offsets), _last_conv(self.sampling_scales))
        weight = torch.cat([conv.weight.flatten(1) for conv in convs])
        bias = torch.cat([conv.bias for conv in convs if conv.bias is not None])
        offsets, scales = F.linear(pooled, weight, bias).unflatten(-1, (2, self.num_heads, 2)).unbind(-3)
        return offsets, scales

    def sampling_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Where each window's keys are sampled: ``(B * heads, nH * nW, ws * ws, 2)`` in ``grid_sample``'s
        ``[-1, 1]`` coordinates of the *unpadded* map (``align_corners=True``; ``(x, y)`` last), windows row-major,
        slots row-major.

        Args:
            x: Input ``(B, H, W, dim)``, ``H, W >= window_size``.

        Returns:
            The grid, in ``x``'s dtype.
        """
        b, h, w, _ = x.shape
        ws, heads = self.window_size, self.num_heads
        offsets, scales = self.window_transforms(x)  # (B, nH, nW, heads, 2)
        cy, dy = _axis_coords(h, ws, x.device, x.dtype)
        cx, dx = _axis_coords(w, ws, x.device, x.dtype)
        nh, nw = cy.shape[0], cx.shape[0]
        o = offsets.permute(4, 0, 3, 1, 2)[..., None, None]  # (2, B, heads, nH, nW, 1, 1)
        s = scales.permute(4, 0, 3, 1, 2)[..., None, None]
        # pixels of the padded map: centre + delta * (1 + scale) + offset * (padded size - 1) / 2 / windows(unpadded);
        # x varies along the slot column, y along the slot row: (B, heads, nH, nW, 1, ws) and (..., ws, 1)
        px = cx[:, None, None] + dx * (1 + s[0]) + o[0] * ((nw * ws - 1) / 2 / (w // ws))
        py = cy[:, None, None, None] + dy[:, None] * (1 + s[1]) + o[1] * ((nh * ws - 1) / 2 / (h // ws))
        # to the [-1, 1] coordinates of the unpadded map (the padding is zeros, as outside it)
        ux, uy = torch.broadcast_tensors(px * (2 / max(w - 1, 1)) - 1, py * (2 / max(h - 1, 1)) - 1)
        return torch.stack((ux, uy), -1).reshape(b * heads, nh * nw, ws * ws, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Varied-size window attention of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)`` with ``H, W >= window_size``.

        Returns:
            The output ``(B, H, W, out_dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` has another rank or channel count, is empty, or ``H`` or ``W`` < ``window_size``.
        """
        b, (h, w), _ = check_channels_last(x, 2, self.dim)
        ws, heads, co = self.window_size, self.num_heads, self.out_dim
        if h < ws or w < ws:
            raise ValueError(f"x must have H, W >= window_size={ws} (the offsets are normalised by H // window_size "
                             f"and W // window_size), got H={h}, W={w}")
        d, pb, pr = co // heads, -h % ws, -w % ws
        nh, nw, t = (h + pb) // ws, (w + pr) // ws, ws * ws
        grid = self.sampling_grid(x)
        weight, bias = self.qkv.weight.flatten(1), self.qkv.bias  # output channels [3, heads, d]
        q = pointwise_linear(x, weight[:co], None if bias is None else bias[:co])
        # k and v straight into B * heads channel-first maps of 2d channels (the layout grid_sample reads): rows
        # reordered [2, heads, d] -> [heads, 2, d], and the map's transpose as the right operand, so no copy
        w_kv = weight[co:].view(2, heads, d, -1).transpose(0, 1).reshape(2 * co, -1)
        xt = x.reshape(b, h * w, -1).transpose(1, 2)  # (B, dim, H*W)
        if bias is None:
            kv = torch.matmul(w_kv, xt)
        else:
            b_kv = bias[co:].view(2, heads, d).transpose(0, 1).reshape(2 * co, 1)
            kv = torch.baddbmm(b_kv, w_kv.expand(b, -1, -1), xt)
        sampled = F.grid_sample(kv.view(b * heads, 2 * d, h, w), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (B * heads, 2d, nH * nW, t)
        k, v = sampled.view(b, heads, 2, d, nh * nw, t).permute(2, 0, 4, 1, 5, 3).reshape(2, b * nh * nw, heads, t, d)
        if pb or pr:
            q = F.pad(q, (0, 0, 0, pr, 0, pb))
        q = q.reshape(b, nh, ws, nw, ws, heads, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(b * nh * nw, heads, t, d)
        table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(t, t, heads).permute(2, 0, 1)[None]
        out = attend(q, k, v, scale=self.scale, bias=bias)  # (B * nH * nW, heads, t, d)
        out = out.view(b, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nh * ws, nw * ws, co)
        if pb or pr:
            out = out[:, :h, :w]
        return pointwise_linear(out, self.proj.weight.flatten(1), self.proj.bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, out_dim={self.out_dim}, "
                f"window_size={self.window_size}")


register(Mechanism(
    name="vsa", paper="VSA: Learning Varied-Size Window Attention in Vision Transformers (ECCV 2022)",
    repo="ViTAE-Transformer/ViTAE-VSA", family="window", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: VSAWindowAttention(dim, num_heads, **kw), cls=VSAWindowAttention,
    notes="Window 7 with a learned per-window, per-head scale and offset of the key/value rectangle (bilinear "
          "sampling); zero-initialised predictors, so it starts as W-MSA with relative position bias. H, W >= "
          "window_size; other sizes are zero-padded bottom/right as the official code."))
