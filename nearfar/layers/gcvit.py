"""GC ViT: local window attention (W-MSA + relative position bias) and global-query window attention, channel-last.

Paper: Hatamizadeh et al., "Global Context Vision Transformers" (ICML 2023). Official code: NVlabs/GCVit
``models/gc_vit.py`` (``WindowAttention``, ``WindowAttentionGlobal``, ``GlobalQueryGen``, ``FeatExtract``, ``SE``)
and ``detection/models/gc_vit.py`` (any input size: zero-pads to a multiple of the window, bicubic-resizes the
generated queries to ``ws x ws``); timm port ``timm/models/gcvit.py`` (``WindowAttentionGlobal``, ``FeatureBlock``,
``MbConvBlock``) with ``timm/layers/pos_embed_rel.py`` (``RelPosBias``) and ``squeeze_excite.py`` (``SEModule``).

``GCViTWindowAttention`` is a GC ViT stage's even block (``gcvit_local``); ``GlobalQueryAttention`` its odd block
(``gcvit_global``): keys/values come from the tokens (``qkv``: Linear C -> 2C), the queries are ``q_global``, a
``(B, ws, ws, C)`` map generated once per stage from the stage input and shared by every window of an image
(token ``(r, c)`` uses the query at its window slot ``(r mod ws, c mod ws)``). ``forward(x, q_global=None)``
generates ``q_global`` from ``x`` itself with ``global_block`` when it is not given; in a full stage call
``q = attn.global_query(stage_input)`` once and pass it to every global block, as GC ViT does.
``query_generator=False`` leaves the generator out (then ``q_global`` is required).

When the windows are whole (sizes divisible by the window, as in the classification code) both cut the input into
windows once, as the official code does, and attend the windows as a batch (``WindowBatch``: every head read in
place from the projection output, the bias added inside the score GEMM); the global queries are not repeated per
window but read once per image by every window of it. Other sizes run as one ``nearfar.attend`` call with a
``Blocks`` pattern on the whole map (the global queries gathered to the token layout first).

Parameter names and shapes equal timm's (a timm block's ``attn.*`` and its stage's ``global_block.*`` load
unchanged): ``qkv``, ``rel_pos.relative_position_bias_table`` (``((2ws-1)^2, heads)``, query-minus-key, as Swin's),
``proj``; generator ``global_block.blocks.conv{i}.{conv_dw, se.fc1, se.fc2, conv_pw}.weight`` and
``global_block.blocks.pool{i}`` (no weights). NVlabs names: ``relative_position_bias_table`` ->
``rel_pos.relative_position_bias_table`` (its ``relative_position_index`` buffer is derived: drop it);
``q_global_gen.to_q_global.{i}.conv.{0, 2.fc.0, 2.fc.2, 3}.weight`` -> ``global_block.blocks.conv{i+1}.{conv_dw,
se.fc1, se.fc2, conv_pw}.weight`` (the SE Linears reshaped to 1x1 convs).

``feat_size`` (the stage's feature-map size, timm's argument) fixes the number of generator levels,
``int(log2(min(feat_size) / min(window_size)))`` (NVlabs: 3, 2, 1 keep-dim, 1 keep-dim at 56, 28, 14, 7 for 224^2
input); other input sizes work: the result is bicubic-resized to ``ws x ws`` as in the detection code.

Differences from the official code:
- sizes not divisible by the window: the classification code requires divisibility and the detection code
  zero-pads after the norm, so padded tokens are unmasked keys with k/v equal to the ``qkv`` bias; here they are
  masked out (edge windows are smaller; queries keep their slot), which equals the padded computation with the
  padded keys removed. A window larger than the input is clipped to it (the centre of the bias table);
- the global queries of image ``b`` go to the windows of image ``b`` (NVlabs after its issue #10). timm's
  ``WindowAttentionGlobal`` used ``q_global.repeat(B // B_q, 1, 1, 1)``, which interleaves images when ``B > 1``
  and an image has several windows (still so in timm 1.0.29); timm >= 1.0.31 is reported to use
  ``repeat_interleave``, which pairs them as nearfar does;
- SE reduction width is timm's ``make_divisible(C / 4, 8)`` (NVlabs: ``int(C / 4)``; equal for every GC ViT width);
- ``feat_size`` smaller than the window gives 0 levels (one keep-dim block; timm adds a pooling there);
- no attention/projection dropout, no ``global_norm`` (timm's default is none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_pair, check_per_axis, check_scale
from ..functional import WindowBatch, attend, merge_heads, split_heads, window_attention
from ..patterns import Blocks
from .position_bias import crop_offsets, swin_table_as_offsets, trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import shards_natively, whole_extent, whole_sequence


def _se_width(channels: int) -> int:
    """timm ``make_divisible(channels * 0.25, 8, round_limit=0)``."""
    return max(8, int(channels * 0.25 + 4) // 8 * 8)


class SqueezeExcite(nn.Module):
    """timm ``SEModule(rd_ratio=0.25, bias=False, act_layer=GELU)``: mean-pool, 1x1 conv, GELU, 1x1 conv, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        rd = _se_width(channels)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


#: From this many pixels on, ``MbConvBlock``'s 1x1 conv runs as a convolution, below as a Linear over channel-last
#: memory. Measured 2026-12-07, forward+backward of the block on channel-last maps, batch 8, 2 threads (conv / Linear
#: ms): 64ch 112x112 126 / 140, 64ch 56x56 21.2 / 22.9, 128ch 28x28 16.3 / 18.2, 256ch 28x28 56.3 / 56.5, 256ch
#: 14x14 15.2 / 13.1, 512ch 7x7 13.2 / 11.8.
_PW_CONV_PIXELS = 28 * 28


class MbConvBlock(nn.Module):
    """GC ViT's ``FeatExtract`` convolution (timm ``MbConvBlock``): ``x + PW(SE(GELU(DW_3(x))))``, NCHW, no biases."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.act = nn.GELU()
        self.se = SqueezeExcite(channels)
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.act(self.conv_dw(x)))
        if y.shape[-2] * y.shape[-1] >= _PW_CONV_PIXELS:
            return x + self.conv_pw(y)
        # small maps: the 1x1 conv as a Linear over channel-last memory (what the generator's input is), the same
        # weights, faster than oneDNN's 1x1 conv there
        return x + F.linear(y.permute(0, 2, 3, 1), self.conv_pw.weight.flatten(1)).permute(0, 3, 1, 2)


class FeatureBlock(nn.Module):
    """The global query generator (timm ``FeatureBlock``): ``max(1, levels)`` ``MbConvBlock`` s, each of the first
    ``levels`` followed by ``MaxPool(3, stride 2, pad 1)`` (NVlabs ``FeatExtract``; ``levels=0`` is keep-dim)."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.levels = levels
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f"conv{i + 1}", MbConvBlock(channels))
            if i < levels:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class RelPosBias(nn.Module):
    """Swin relative position bias under timm's name ``rel_pos``: ``relative_position_bias_table``
    ``((2ws0-1)(2ws1-1), heads)``, query-minus-key (as Swin's), trunc-normal(0.02) init."""

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        trunc_normal_(self.relative_position_bias_table)

    def offsets(self, window: tuple[int, ...]) -> torch.Tensor:
        """The table as ``attend`` takes it with ``Blocks(window)``: ``(heads, 2w0-1, 2w1-1)``, key-minus-query."""
        return crop_offsets(swin_table_as_offsets(self.relative_position_bias_table, self.window_size),
                            self.window_size, window)


class _GCViTWindowBase(nn.Module):
    """Shared by the local and the global block: ``rel_pos``, ``proj``, and window attention of (B, h, N, d)."""

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int], qkv_bias: bool,
                 qk_scale: float | None, n_proj: int):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        check_bool(qkv_bias, "qkv_bias")
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.window_size = check_pair(window_size, "window_size")
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.rel_pos = RelPosBias(self.window_size, num_heads)
        self.qkv = nn.Linear(dim, n_proj * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _attend_windows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        spatial: tuple[int, ...]) -> torch.Tensor:
        window = tuple(min(m, n) for m, n in zip(self.window_size, spatial))
        out = attend(q, k, v, Blocks(window, grid=spatial), scale=self.scale, rpb=self.rel_pos.offsets(window))
        return self.proj(merge_heads(out, spatial))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"


@shards_natively
class GCViTWindowAttention(_GCViTWindowBase):
    """GC ViT local block attention: W-MSA (no shift) with relative position bias, ``qkv`` Linear C -> 3C.

    ``GCViTWindowAttention(dim, num_heads, window_size=7, qkv_bias=True, qk_scale=None)``; input ``(B, H, W, dim)``,
    any ``H, W``.

    Hatamizadeh et al., "Global Context Vision Transformers" (ICML 2023); official code: NVlabs/GCVit.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        window_size: Window size, an int or a pair of positive ints (default 7).
        qkv_bias: Bias on the ``qkv`` projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``qkv_bias`` is not a bool; a window entry is not an int; ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; a window entry < 1; ``qk_scale`` <= 0 or
            not finite.

    Examples:
        >>> import torch
        >>> from nearfar import GCViTWindowAttention
        >>> GCViTWindowAttention(64, 4, window_size=7)(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int] = 7, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__(dim, num_heads, window_size, qkv_bias, qk_scale, n_proj=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention (no shift) with relative position bias of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, any size (windows larger than the map are clipped).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        _, spatial, _ = check_channels_last(x, 2, self.dim)
        # a rank's slab inside sharded: clip to the whole map's extents, not the slab's
        window = tuple(min(m, n) for m, n in zip(self.window_size, whole_extent(spatial)))
        return self.proj(window_attention(x, Blocks(window, grid=spatial), self.qkv, self.num_heads, self.scale,
                                          self.rel_pos.offsets(window)))


@whole_sequence(replicated=("q_global",))
class GlobalQueryAttention(_GCViTWindowBase):
    """GC ViT global-query window attention (keys/values from ``x``, queries from the global query map).

    ``GlobalQueryAttention(dim, num_heads, window_size=7, feat_size=56, qkv_bias=True, qk_scale=None,
    query_generator=True)``. ``forward(x, q_global=None)``: ``x (B, H, W, dim)`` (any ``H, W``); ``q_global``
    ``(B or 1, ws0, ws1, dim)`` channel-last, heads head-major in the channels; generated from ``x`` by
    ``global_query`` when omitted.

    Hatamizadeh et al., "Global Context Vision Transformers" (ICML 2023); official code: NVlabs/GCVit.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        window_size: Window size, an int or a pair of positive ints (default 7); the global query map is
            ``window_size``.
        feat_size: The stage's map size, an int or a pair of positive ints (default 56): the query generator
            downsamples ``log2(feat_size / window_size)`` times.
        qkv_bias: Bias on the ``qkv`` (keys and values) projection (default True).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.
        query_generator: Build the generator of the global queries (default True); False: pass ``q_global``.

    Raises:
        TypeError: ``qkv_bias`` or ``query_generator`` is not a bool; a window or feature-size entry is not an int;
            ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; a window or feature-size entry < 1;
            ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import GlobalQueryAttention
        >>> layer = GlobalQueryAttention(64, 4, window_size=7, feat_size=14)
        >>> layer(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | Sequence[int] = 7,
                 feat_size: int | Sequence[int] = 56, qkv_bias: bool = True,
                 qk_scale: float | None = None, query_generator: bool = True):
        super().__init__(dim, num_heads, window_size, qkv_bias, qk_scale, n_proj=2)
        check_bool(query_generator, "query_generator")
        self.feat_size = check_per_axis(feat_size, 2, "feat_size")
        self.levels = max(0, int(math.log2(min(self.feat_size) / min(self.window_size))))
        self.global_block = FeatureBlock(dim, self.levels) if query_generator else None

    def global_query(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's query map ``(B, ws0, ws1, dim)`` from a channel-last stage input ``x (B, H, W, dim)``."""
        check_channels_last(x, 2, self.dim)
        if self.global_block is None:
            raise ValueError("this GlobalQueryAttention has no query generator (query_generator=False); "
                             "pass q_global")
        g = self.global_block(x.permute(0, 3, 1, 2))
        if tuple(g.shape[2:]) != self.window_size:  # detection code: any input size
            g = F.interpolate(g, size=self.window_size, mode="bicubic")
        return g.permute(0, 2, 3, 1)

    def _check_query(self, q_global: object, b: int) -> torch.Tensor:
        if not isinstance(q_global, torch.Tensor):
            raise TypeError(f"q_global must be a torch.Tensor or None, got {type(q_global).__name__}")
        want = (*self.window_size, self.dim)
        if q_global.dim() != 4 or tuple(q_global.shape[1:]) != want or q_global.shape[0] not in (1, b):
            raise ValueError(f"q_global must be (B, {want[0]}, {want[1]}, {self.dim}) with B = {b} or 1, "
                             f"got {tuple(q_global.shape)}")
        return q_global

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        """Window attention whose queries come from the global query map, shared by every window.

        Args:
            x: Input ``(B, H, W, dim)``, any size: keys and values of each window.
            q_global: The global queries ``(B or 1, ws0, ws1, dim)``; None (default): ``global_query(x)``.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` or ``q_global`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; ``q_global`` of another shape; no ``q_global``
                without a query generator.
        """
        b, spatial, _ = check_channels_last(x, 2, self.dim)
        q_global = self.global_query(x) if q_global is None else self._check_query(q_global, b)
        qg = split_heads(q_global, self.num_heads).expand(b, -1, -1, -1)  # (B, h, ws0*ws1, d)
        (hh, ww), (m0, m1) = spatial, self.window_size
        if hh % m0 == 0 and ww % m1 == 0:
            # whole windows (the official case, one window included): the same queries for every window of an image,
            # so cut x into windows once (as the official code does) and attend each window's keys with them
            wb = WindowBatch.of(Blocks(self.window_size, grid=spatial), spatial, x.device)
            assert wb is not None  # whole windows
            return self._attend_partitioned(x, q_global, wb)
        k, v = self.qkv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = qg.index_select(2, self._slots(spatial, x.device))  # each token's query: the one at its window slot
        return self._attend_windows(q, k, v, spatial)

    def _attend_partitioned(self, x: torch.Tensor, q_global: torch.Tensor, wb: WindowBatch) -> torch.Tensor:
        b = x.shape[0]
        # keys and values of every window (unbind: one backward stack, no zero-filled slices); the queries once per
        # image, shared by its windows (the window kernel broadcasts them, no per-window copy)
        k, v = self.qkv(wb.split(x)).unflatten(-1, (2, self.dim)).unbind(-2)
        q = q_global.reshape(q_global.shape[0], -1, self.dim).expand(b, -1, -1)
        return self.proj(wb.attend((q, k, v), self.num_heads, self.scale, self.rel_pos.offsets(self.window_size),
                                   merge=True))

    def _slots(self, spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
        (h, w), (m0, m1) = spatial, self.window_size
        rows = torch.arange(h, device=device) % m0
        cols = torch.arange(w, device=device) % m1
        return (rows[:, None] * m1 + cols[None, :]).reshape(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feat_size={self.feat_size}, levels={self.levels}"


#: GC ViT-S at 224^2 (embed 96, heads 3/6/12/24, windows 7/7/14/7): a stage's (window, feature size) by its width
_GCVIT_S_STAGES = {96: (7, 56), 192: (7, 28), 384: (14, 14), 768: (7, 7)}


def _stage(dim: int, kw: dict) -> dict:
    window, feat = _GCVIT_S_STAGES.get(dim, (7, 56))
    return {"window_size": window, "feat_size": feat, **kw}


def _make_local(dim: int, num_heads: int, **kw: Any) -> GCViTWindowAttention:
    kw = _stage(dim, kw)
    kw.pop("feat_size")
    return GCViTWindowAttention(dim, num_heads, **kw)


_PAPER = "Global Context Vision Transformers (GC ViT, ICML 2023)"
_STAGE_NOTE = ("make(dim, num_heads) reads dim as a GC ViT-S stage at 224^2: 96 -> window 7 (56^2 map), 192 -> 7 "
               "(28^2), 384 -> 14 (14^2, stage 3 is one window), 768 -> 7 (7^2); other widths get window 7 "
               "(override with window_size=...). Sizes not divisible by the window: smaller, masked edge windows "
               "(the detection code zero-pads instead).")
register(Mechanism(
    name="gcvit_local", paper=_PAPER, repo="NVlabs/GCVit", family="window", dims=("2d",), **image_layer(),
     make=_make_local, cls=GCViTWindowAttention,
    notes="GC ViT's local block: W-MSA with relative position bias (timm parameter names). " + _STAGE_NOTE))
register(Mechanism(
    name="gcvit_global", paper=_PAPER, repo="NVlabs/GCVit", family="local+global", dims=("2d",),
    **image_layer(), make=lambda dim, num_heads, **kw: GlobalQueryAttention(dim, num_heads,
                                                                                       **_stage(dim, kw)),
    cls=GlobalQueryAttention,
    notes="GC ViT's global block: keys/values per window, queries from a (ws x ws) map generated from the stage "
          "input (FeatureBlock, included; feat_size sets its depth, 56 -> 3 levels) and shared by every window. "
          "forward(x, q_global=None) generates the queries from x when not given. " + _STAGE_NOTE))
