"""BiFormer's Bi-Level Routing Attention (BRA): channel-last ``(B, H, W, C)`` in and out.

Paper: Zhu, Wang, Ke, Zhang, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023,
arXiv 2303.08810). Official code: rayleizhu/BiFormer, ``ops/bra_legacy.py`` (``BiLevelRoutingAttention``,
``TopkRouting``, ``KVGather``, ``QKVLinear``; NHWC input), ``models/biformer.py`` (``Block``: the stage modes
``topk = -1 / -2``) and ``models/_common.py`` (``Attention``, ``AttentionLePE``).

The map is cut into ``n_win x n_win`` regions. One Linear gives per-pixel ``q, k`` (``qk_dim`` channels) and
``v`` (``dim``). Each region's descriptor is the mean of its pixels' ``q`` (resp. ``k``); the region-to-region
affinity ``(scale * q_r) k_r^T`` picks, per query region, its ``topk`` key regions (routing inputs detached unless
``diff_routing``; the region itself is not forced). Every pixel of a region then attends to all (kv-downsampled)
pixels of its routed regions, ``softmax(scale * q K^T) V`` per head, where ``scale = qk_dim ** -0.5`` with the
full ``qk_dim``, not the head dim (as the official code). A depth-wise ``side_dwconv`` conv of ``v`` (LCE / LePE)
is added, then the output Linear ``wo``.

How it runs here: the pixels are reordered region-major (each region's pixels contiguous, as the official
"patchify"), so a region is one query block of ``region_h * region_w`` tokens and one key block (of
``kv_h * kv_w`` tokens after kv downsampling); the routing indices become a ``SelectedBlocks`` list
``(B, 1, n_win**2, topk)`` shared by the heads, and the token attention is one ``attend(..., blocks=...)`` call.
The descriptors are reduced from the ``q`` and ``k`` already projected or, at large regions, computed as the
projection of the region-mean input (the same means, fewer values read: see ``_route``); the attention's output
goes back to ``(B, H, W, C)`` inside the sum with the LCE conv (one pass, no separate reorder or head merge).
The official ``KVGather`` copies the routed regions' K/V ``topk`` times (and its backward scatters into a
``(B, S*S, S*S, pixels, C)`` zero tensor); the layer makes no such copy (the block-sparse engine reads the routed
blocks chunk by chunk). Measured at B=8 (CPU, one thread, fp32, forward+backward): 56x56x96, 3 heads, topk 4:
3.8x faster than the ``KVGather`` form, peak memory 0.13x; 14x14x384, 12 heads, topk 4 / 16: 2.2x / 4.0x, 0.05x.

``topk`` stage modes (``models/biformer.py``, ``Block``): ``-1`` is plain multi-head attention over the whole map
(``_common.Attention``: ``qkv`` Linear ``C -> 3C`` without bias, ``proj``, scale ``head_dim ** -0.5``); ``-2`` adds
a LePE depth-wise conv of the layer *input* (``_common.AttentionLePE``: ``lepe(x)``, not of ``v``) before ``proj``;
the released tiny/small/base models use ``topks = [1, 4, 16, -2]``, ``side_dwconv = 5``, ``qk_dim = dim``,
``head_dim = 32`` and identity kv downsampling. ``topk = 0`` (a conv stand-in for attention) is not implemented.

Parameter names equal the official modules' (``qkv.qkv``, ``wo``, ``lepe``, ``router.emb``; for ``topk < 0``:
``qkv``, ``proj``, ``lepe``), so official weights load unchanged. Differences from the official code:

- ``side_dwconv`` defaults to 5 (the value every official model passes; the official class default is 3); an even
  kernel is refused (the official ``padding = k // 2`` would change the map size).
- ``soft_routing`` (the official ``KVGather(mul_weight='soft')``: each routed region's K and V times its routing
  weight, a softmax of the top-k affinities) runs without the K/V copy too: one query head per (head, slot) with
  the queries times the slot's weight, GQA over the shared K/V, and the slots merged by a log-sum-exp made
  differentiable here (``_LSE``); it costs ``topk`` copies of q and three ``attend`` passes. With ``diff_routing``
  the weights' gradient reaches the descriptors (and ``router.emb``). Without ``soft_routing`` the routing is a
  hard top-k whose indices carry no gradient, so ``diff_routing`` changes nothing and ``router.emb`` gets no
  gradient; the official code raises ``NotImplementedError`` for ``diff_routing`` without ``soft_routing``.
- For ``topk < 0`` the official ``Block`` leaves ``num_heads`` at 8 whatever the stage; here ``num_heads`` is used
  (pass 8 to match). ``kv_downsample_kernel`` (unused there) and ``ret_attn_mask`` are not implemented; the
  ``fracpool``/``conv`` kv modes raise there as well.
- ``auto_pad`` zero-pads the input bottom/right to multiples of ``n_win`` before the projection and crops after, as
  the official ``bra_legacy``; the padded pixels are unmasked keys (their k/v are the projection biases).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_choice,
    check_dim_heads,
    check_nonneg_int,
    check_positive_int,
    check_scale,
)
from ..functional import SelectedBlocks, attend, merge_heads, split_qkv
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

KV_MODES = ("identity", "ada_avgpool", "ada_maxpool", "maxpool", "avgpool")


class _QKVLinear(nn.Module):
    """Holds the fused ``Linear(dim, 2 * qk_dim + dim)`` under the official name ``qkv.qkv``."""

    qkv: nn.Linear

    def __init__(self, dim: int, qk_dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)


class _TopkRouting(nn.Module):
    """Holds the optional routing Linear under the official name ``router.emb``."""

    def __init__(self, qk_dim: int, param_routing: bool):
        super().__init__()
        self.emb: nn.Module = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()


@whole_sequence()
class BiLevelRoutingAttention(nn.Module):
    """``BiLevelRoutingAttention(dim, num_heads=8, n_win=7, qk_dim=None, qk_scale=None, kv_per_win=4,
    kv_downsample_ratio=4, kv_downsample_mode="identity", topk=4, param_attention="qkvo", param_routing=False,
    diff_routing=False, soft_routing=False, side_dwconv=5, auto_pad=False)``: x ``(B, H, W, dim)`` -> same shape.

    Args:
        dim: Channels (of ``v`` and the output), a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1 (default 8).
        n_win: Regions per side, >= 1 (default 7): ``n_win ** 2`` regions of ``(H / n_win) x (W / n_win)`` pixels.
        qk_dim: Channels of ``q`` and ``k``, a positive multiple of ``num_heads``; None (default): ``dim``.
        qk_scale: Score scale (routing and attention), positive finite; None (default): ``qk_dim ** -0.5``
            (``head_dim ** -0.5`` for ``topk < 0``).
        kv_per_win: Keys per region side after ``ada_*pool`` downsampling, >= 1 (default 4).
        kv_downsample_ratio: Pooling kernel and stride of ``maxpool``/``avgpool``, >= 1 (default 4; 1 = none).
        kv_downsample_mode: One of ``"identity"`` (default), ``"ada_avgpool"``, ``"ada_maxpool"``, ``"maxpool"``,
            ``"avgpool"``: how each region's k/v pixels are pooled before the attention (not the descriptors).
        topk: Routed regions per query region, in ``[1, n_win ** 2]``; or ``-1`` (plain attention over the whole
            map) or ``-2`` (plain attention plus a LePE conv of the input), the official stage modes.
        param_attention: ``"qkvo"`` (default, output Linear ``wo``) or ``"qkv"`` (no output Linear).
        param_routing: A Linear on the region descriptors (``router.emb``); needs ``diff_routing`` (default False).
        diff_routing: Do not detach the routing inputs (default False; matters with ``soft_routing`` only).
        soft_routing: Multiply each routed region's K and V by its routing weight (default False).
        side_dwconv: Kernel of the depth-wise LCE conv on ``v``, 0 (none) or odd (default 5).
        auto_pad: Zero-pad ``H, W`` to multiples of ``n_win`` and crop after (default False: they must divide).

    Raises:
        TypeError: An int, bool or str argument of the wrong type.
        ValueError: ``dim``/``qk_dim`` not a positive multiple of ``num_heads``; ``topk`` outside
            ``{-2, -1} ∪ [1, n_win ** 2]``; an unknown mode; an even ``side_dwconv``; ``param_routing`` without
            ``diff_routing``; a size < 1; a bad ``qk_scale``.

    Examples:
        >>> import torch
        >>> from nearfar import BiLevelRoutingAttention
        >>> layer = BiLevelRoutingAttention(64, 2, n_win=7, topk=4)
        >>> layer(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
        >>> BiLevelRoutingAttention(64, 2, n_win=7, auto_pad=True)(torch.randn(1, 9, 12, 64)).shape
        torch.Size([1, 9, 12, 64])
    """

    qkv: nn.Module  # Linear(dim, 3 dim) for topk < 0, else the official qkv.qkv holder

    dim: int
    num_heads: int
    n_win: int
    qk_dim: int
    topk: int
    scale: float

    def __init__(self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None,
                 qk_scale: float | None = None, kv_per_win: int = 4, kv_downsample_ratio: int = 4,
                 kv_downsample_mode: str = "identity", topk: int = 4, param_attention: str = "qkvo",
                 param_routing: bool = False, diff_routing: bool = False, soft_routing: bool = False,
                 side_dwconv: int = 5, auto_pad: bool = False):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        self.n_win = check_positive_int(n_win, "n_win")
        self.qk_dim = dim if qk_dim is None else qk_dim
        check_dim_heads(self.qk_dim, num_heads)
        qk_scale = check_scale(qk_scale)
        if not isinstance(topk, int) or isinstance(topk, bool) or not (topk in (-2, -1) or 1 <= topk <= n_win ** 2):
            raise ValueError(f"topk must be -2 (attention + LePE), -1 (attention) or in [1, n_win ** 2 = "
                             f"{n_win ** 2}], got {topk!r}")
        self.kv_per_win = check_positive_int(kv_per_win, "kv_per_win")
        self.kv_downsample_ratio = check_positive_int(kv_downsample_ratio, "kv_downsample_ratio")
        self.kv_downsample_mode = check_choice(kv_downsample_mode, "kv_downsample_mode", KV_MODES)
        check_choice(param_attention, "param_attention", ("qkvo", "qkv"))
        for flag, name in ((param_routing, "param_routing"), (diff_routing, "diff_routing"),
                           (soft_routing, "soft_routing"), (auto_pad, "auto_pad")):
            check_bool(flag, name)
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True (as the official code)")
        check_nonneg_int(side_dwconv, "side_dwconv")
        if side_dwconv % 2 == 0 and side_dwconv:
            raise ValueError(f"side_dwconv must be 0 or odd (padding k // 2 keeps the size), got {side_dwconv}")
        self.dim, self.num_heads, self.topk = dim, num_heads, topk
        self.diff_routing, self.soft_routing = diff_routing, soft_routing
        self.auto_pad, self.side_dwconv = auto_pad, side_dwconv
        if topk < 0:  # official models/_common.py Attention / AttentionLePE
            self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.proj = nn.Linear(dim, dim)
        else:
            self.scale = qk_scale if qk_scale is not None else self.qk_dim ** -0.5  # qk_dim, not the head dim
            self.router = _TopkRouting(self.qk_dim, param_routing)
            self.qkv = _QKVLinear(dim, self.qk_dim)
            self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        if side_dwconv and topk != -1:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bi-level routing attention (or the plain attention of ``topk < 0``) of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``; ``H, W`` multiples of ``n_win`` unless ``auto_pad`` (or ``topk < 0``).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)``, is empty, or its size does not fit ``n_win`` / the kv
                pooling.
        """
        _, (h, w), _ = check_channels_last(x, 2, self.dim)
        if self.topk < 0:
            return self._global(x)
        s = self.n_win
        if not self.auto_pad and (h % s or w % s):
            raise ValueError(f"H and W must be multiples of n_win={s} (got {h}x{w}); pass auto_pad=True to pad")
        hp, wp = -(-h // s) * s, -(-w // s) * s
        kv_hw = self._kv_size(hp // s, wp // s)
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        out = self._routed(x, kv_hw)
        return out[:, :h, :w] if (hp, wp) != (h, w) else out

    def _kv_size(self, rh: int, rw: int) -> tuple[int, int]:
        """Key/value pixels per region side after the kv downsampling (raises if a region is too small)."""
        mode, r = self.kv_downsample_mode, self.kv_downsample_ratio
        if mode.startswith("ada_"):
            return self.kv_per_win, self.kv_per_win
        if mode in ("maxpool", "avgpool") and r > 1:
            if rh < r or rw < r:
                raise ValueError(f"kv_downsample_ratio={r} exceeds the region size {rh}x{rw} (H / n_win x W / n_win)")
            return rh // r, rw // r
        return rh, rw

    def _routed(self, x: torch.Tensor, kv_hw: tuple[int, int]) -> torch.Tensor:
        b, hp, wp, c = x.shape
        s, m, qk = self.n_win, self.num_heads, self.qk_dim
        rh, rw = hp // s, wp // s
        regions, t, kb = s * s, rh * rw, kv_hw[0] * kv_hw[1]
        # region-major pixels: (B, S*S, rh*rw, C), region index row-major, pixels row-major inside
        xr = x.reshape(b, s, rh, s, rw, c).transpose(2, 3).reshape(b, regions, t, c)  # one copy of C channels
        lin = cast(_QKVLinear, self.qkv).qkv
        qkv = lin(xr)
        q, k, v = qkv.split([qk, qk, c], dim=-1)  # one backward (a cat), where slices would each zero-fill qkv
        with torch.set_grad_enabled(self.diff_routing and torch.is_grad_enabled()):  # detached unless diff_routing
            top = self._route(xr, qkv, q, k, lin)  # (B, S*S, topk)
        idx = top.indices
        if kb != t or self.kv_downsample_mode != "identity":
            k, v_att = (self._pool(z.reshape(b * regions, rh, rw, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                        .reshape(b, regions * kb, -1) for z in (k, v))  # per channel: k and v apart = together
        else:
            v_att = v
        qh = q.reshape(b, regions * t, m, qk // m).transpose(1, 2)
        kh = k.reshape(b, regions * kb, m, qk // m).transpose(1, 2)
        vh = v_att.reshape(b, regions * kb, m, c // m).transpose(1, 2)
        if self.soft_routing:
            out = _soft_routed(qh, kh, vh, idx, top.values.softmax(-1), t, kb, self.scale)
        else:
            num = torch.full((1, 1, regions), self.topk, dtype=idx.dtype, device=idx.device).expand(b, 1, regions)
            blocks = SelectedBlocks(num, idx.unsqueeze(1), q_block=t, kv_block=kb)
            out = attend(qh, kh, vh, scale=self.scale, blocks=blocks)  # (B, heads, S*S*t, dv), region-major
        # back to (B, H, W, C) as a view: (B, s, rh, s, rw, heads, dv); the reorder is read by the next op
        o = out.unflatten(2, (s, s, rh, rw)).permute(0, 2, 4, 3, 5, 1, 6)
        if not self.side_dwconv:
            return self.wo(o.reshape(b, hp, wp, c))  # one copy
        vmap = v.reshape(b, s, s, rh, rw, c).transpose(2, 3).reshape(b, hp, wp, c)  # one copy, NHWC
        lepe = self.lepe(vmap.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channels-last conv: NHWC out, no copy
        lepe = lepe.reshape(b, s, rh, s, rw, m, c // m)  # a view (a copy only if the conv returned NCHW)
        if torch.is_grad_enabled() and (lepe.requires_grad or o.requires_grad):
            y = lepe + o  # out of place: an in-place add on the conv's output view costs copies in backward
        else:
            y = lepe.add_(o)  # inference: the attention's reorder and the LCE sum in one pass, no new tensor
        return self.wo(y.reshape(b, hp, wp, c))

    def _route(self, xr: torch.Tensor, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               lin: nn.Linear) -> Any:
        """The ``topk`` key regions of each query region: the top of ``(scale * q_r) k_r^T`` over region descriptors
        ``q_r, k_r (B, S*S, qk_dim)``, the means of ``q`` and ``k`` over each region's (full-resolution) pixels (the
        official ``q.mean`` / ``k.mean``), through ``router.emb``.

        The means are computed whichever way reads less (same values up to rounding): the projection is affine, so
        they are also the projection of the region-mean input, which reads ``t * dim`` input values per region of
        ``t`` pixels plus a ``dim x 2 qk_dim`` product, against ``t * 2 qk_dim`` values of ``q`` and ``k``.
        Measured (fp32, CPU, one thread, B=8, 7x7 regions): the means of q and k 11x cheaper at 14x14x384 (t = 4),
        the projection 3.6x cheaper at 56x56x96 (t = 64), even near ``t = dim / 3`` (with ``qk_dim = dim``). The
        scale multiplies the small ``S*S x S*S`` score map rather than ``q_r`` (the same products); without
        ``router.emb`` (which is affine) and in float32/float64 (whose range holds ``t**2`` times larger products)
        the region sums are used and their ``1 / t`` goes into that scale too."""
        t, c, qk = xr.shape[2], xr.shape[3], self.qk_dim
        emb = self.router.emb
        inv = 1.0
        if 3 * t * (2 * qk - c) < c * qk:  # from q and k
            # sums, their 1 / t folded into the score scale, where emb is the identity and the range is float32's
            sums = isinstance(emb, nn.Identity) and q.dtype in (torch.float32, torch.float64)
            inv = 1.0 / t if sums else 1.0
            if torch.is_grad_enabled():  # diff_routing: the gradient reaches qkv through the split's outputs
                q_d, k_d = (q.sum(2), k.sum(2)) if sums else (q.mean(2), k.mean(2))
            else:
                both = qkv[..., :2 * qk]
                qk_d = both.sum(2) if sums else both.mean(2)  # one reduction for both
                q_d, k_d = qk_d[..., :qk], qk_d[..., qk:]
        else:  # the projection of the region-mean input
            qk_d = F.linear(xr.mean(2), lin.weight[:2 * qk], lin.bias[:2 * qk])
            q_d, k_d = qk_d[..., :qk], qk_d[..., qk:]
        scores = (emb(q_d) @ emb(k_d).transpose(-2, -1)) * (self.scale * inv * inv)
        return scores.topk(self.topk, dim=-1)

    def _pool(self, kv: torch.Tensor) -> torch.Tensor:
        """The official kv downsampling of one region's k/v ``(N, C, rh, rw)``."""
        mode, r = self.kv_downsample_mode, self.kv_downsample_ratio
        if mode == "ada_avgpool":
            return F.adaptive_avg_pool2d(kv, self.kv_per_win)
        if mode == "ada_maxpool":
            return F.adaptive_max_pool2d(kv, self.kv_per_win)
        if mode == "maxpool" and r > 1:
            return F.max_pool2d(kv, r)
        if mode == "avgpool" and r > 1:
            return F.avg_pool2d(kv, r)
        return kv

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        """``topk = -1 / -2``: multi-head attention over the whole map (+ LePE of the input for -2)."""
        h, w = x.shape[1:3]
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = merge_heads(attend(q, k, v, scale=self.scale), (h, w))
        if self.topk == -2 and self.side_dwconv:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, qk_dim={self.qk_dim}, "
                f"topk={self.topk}, kv_downsample_mode={self.kv_downsample_mode!r}, side_dwconv={self.side_dwconv}, "
                f"auto_pad={self.auto_pad}")


class _LSE(torch.autograd.Function):
    """The log-sum-exp of ``attend(q, k, ., blocks)``, differentiable in ``q`` and ``k`` (``attend``'s is not):
    d lse / d q = scale * E_p[k] (an attention whose values are the keys), d lse / d k_j = scale * p_j q, which is
    the value gradient of an attention given ``dO = scale * g * q``."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, blocks: SelectedBlocks, scale: float) -> torch.Tensor:
        ek, lse = attend(q, k, k, scale=scale, blocks=blocks, return_lse=True)
        ctx.save_for_backward(q, k, ek)
        ctx.blocks, ctx.scale = blocks, scale
        return lse

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, ek = ctx.saved_tensors
        dq = ctx.scale * g[..., None] * ek
        with torch.enable_grad():
            values = k.detach().requires_grad_()
            o = attend(q.detach(), k.detach(), values, scale=ctx.scale, blocks=ctx.blocks)
            (dk,) = torch.autograd.grad(o, values, ctx.scale * g[..., None] * q.detach())
        return dq, dk, None, None


def _soft_routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, t: int,
                 kb: int, scale: float) -> torch.Tensor:
    """Soft routing (the official ``KVGather(mul_weight='soft')``: the t-th routed region's K and V times its
    routing weight ``w_t``) without copying K/V: one query head per (head, slot t), queries times ``w_t`` (the
    logits ``q . (w_t k)``), GQA over the shared K/V, each slot reading its one region; the slots' outputs, times
    ``w_t``, merge by their (differentiable) log-sum-exp. Costs ``topk`` copies of q."""
    b, m, n, dq = q.shape
    regions, topk = idx.shape[1], idx.shape[2]
    w_tok = weight.transpose(1, 2).repeat_interleave(t, dim=2)  # (B, topk, N): each query's slot weights
    qs = (q[:, :, None] * w_tok[:, None, :, :, None]).reshape(b, m * topk, n, dq)  # head h * topk + slot
    ind = idx.transpose(1, 2)[:, None].expand(b, m, topk, regions).reshape(b, m * topk, regions, 1)
    num = torch.ones((1, 1, 1), dtype=idx.dtype, device=idx.device).expand(b, m * topk, regions)
    blocks = SelectedBlocks(num, ind, q_block=t, kv_block=kb)
    o = attend(qs, k, v, scale=scale, blocks=blocks).view(b, m, topk, n, -1)
    a = _LSE.apply(qs, k, blocks, scale).view(b, m, topk, n).softmax(dim=2)  # slot shares of the joint softmax
    return ((a * w_tok[:, None])[..., None] * o).sum(2)


register(Mechanism(
    name="biformer", paper="BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)",
    repo="rayleizhu/BiFormer", family="routed", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: BiLevelRoutingAttention(dim, num_heads, **kw), cls=BiLevelRoutingAttention,
    notes="Regions of an n_win x n_win grid (default 7: H, W must be multiples, or auto_pad=True); each region's "
          "pixels attend to the pixels of its topk (default 4) regions by mean-q/mean-k affinity, through run-time "
          "key blocks (no topk-fold K/V copy). The released models use topk 1, 4, 16 in stages 1-3 and -2 (full "
          "attention + LePE) in stage 4."))
