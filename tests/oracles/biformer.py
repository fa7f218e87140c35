"""Bi-level routing attention the way rayleizhu/BiFormer computes it (``ops/bra_legacy.py``): patchify into
regions, region descriptors by mean, top-k routing, ``KVGather`` (``torch.gather`` of the routed regions' K/V into
a ``(B, S*S, topk, kv_pixels, C)`` tensor: ``topk`` copies), an explicit ``q @ k^T`` softmax per region, LePE on v.
Uses the module's own parameters; differentiable (the speed table's baseline)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.biformer import BiLevelRoutingAttention


def _kv_gather(idx: torch.Tensor, weight: torch.Tensor | None, kv: torch.Tensor) -> torch.Tensor:
    """The official ``KVGather``: ``kv (n, p2, w2, c)``, ``idx (n, p2, topk)`` -> ``(n, p2, topk, w2, c)``, times
    the routing weights ``(n, p2, topk)`` if given (``mul_weight='soft'``)."""
    n, p2, w2, c = kv.shape
    topk = idx.shape[-1]
    out = torch.gather(kv.view(n, 1, p2, w2, c).expand(-1, p2, -1, -1, -1), dim=2,
                       index=idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c))
    return out if weight is None else weight.view(n, p2, topk, 1, 1) * out


def biformer_baseline(m: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    if m.topk < 0:
        raise NotImplementedError("the baseline covers the routed mode (topk >= 1)")
    n, h_in, w_in, c = x.shape
    s, qk, heads = m.n_win, m.qk_dim, m.num_heads
    x = F.pad(x, (0, 0, 0, -w_in % s, 0, -h_in % s))
    hp, wp = x.shape[1:3]
    rh, rw = hp // s, wp // s
    x = x.reshape(n, s, rh, s, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, rh, rw, c)
    q, kv = m.qkv.qkv(x).split([qk, qk + c], dim=-1)  # (n, p2, rh, rw, .)
    q_pix = q.reshape(n, s * s, rh * rw, qk)
    kv_pix = m._pool(kv.reshape(n * s * s, rh, rw, qk + c).permute(0, 3, 1, 2))
    kv_pix = kv_pix.reshape(n, s * s, qk + c, -1).transpose(-1, -2)  # (n, p2, kv pixels, qk + c)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
    v_map = kv[..., qk:].reshape(n, s, s, rh, rw, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, hp, wp)
    lepe = m.lepe(v_map).permute(0, 2, 3, 1) if m.side_dwconv else torch.zeros_like(x[:, 0, 0, 0, 0])
    qr, kr = (q_win.detach(), k_win.detach()) if not m.diff_routing else (q_win, k_win)
    qr, kr = m.router.emb(qr), m.router.emb(kr)
    top = torch.topk((qr * m.scale) @ kr.transpose(-2, -1), k=m.topk, dim=-1)
    # (n, p2, topk, w2, qk + c)
    sel = _kv_gather(top.indices, top.values.softmax(-1) if m.soft_routing else None, kv_pix)
    k_sel, v_sel = sel.split([qk, c], dim=-1)
    w2 = k_sel.shape[3]
    k_sel = k_sel.reshape(n * s * s, m.topk * w2, heads, qk // heads).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * s * s, m.topk * w2, heads, c // heads).transpose(1, 2)
    q_pix = q_pix.reshape(n * s * s, rh * rw, heads, qk // heads).transpose(1, 2)
    attn = ((q_pix * m.scale) @ k_sel).softmax(dim=-1)
    out = attn @ v_sel  # (n p2, heads, rh*rw, c / heads)
    out = out.reshape(n, s, s, heads, rh, rw, c // heads).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, hp, wp, c)
    out = m.wo(out + lepe)
    return out[:, :h_in, :w_in]


BASELINES = {"biformer": biformer_baseline}
