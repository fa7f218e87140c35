"""Float64 references (oracles), written from the papers and the official code without using the library: NATTEN's
neighborhood rules (SHI-Labs/NATTEN ``get_na_flex_mask``), Swin's window partition and shifted-window region mask
(microsoft/Swin-Transformer ``window_partition``, ``SwinTransformerBlock``), MaxViT's grid partition (timm
``maxxvit.py`` ``grid_partition``).

Everything here is deliberately naive: masks are built with plain Python loops over (query, key) pairs
(per axis, then AND-ed over axes), and attention is a plain masked softmax in float64.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import torch

# ---------------------------------------------------------------------------------------------------------
# attention oracle
# ---------------------------------------------------------------------------------------------------------


def dense_reference(q, k, v, allowed, scale, bias=None, return_lse=False):
    """Masked softmax attention in float64.

    ``q (B, Hq, Nq, d)``, ``k (B, Hkv, Nk, d)``, ``v (B, Hkv, Nk, dv)``; ``allowed`` is a bool tensor
    broadcastable to ``(B, Hq, Nq, Nk)`` (True = may attend); ``bias`` a float tensor broadcastable to the
    same shape. GQA by ``repeat_interleave`` of the key/value heads. A query row without any allowed key
    returns 0 (and LSE ``-inf``). Differentiable in q, k, v and bias (all promoted to float64).
    """
    q, k, v = q.double(), k.double(), v.double()
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = torch.broadcast_to(allowed.to(torch.bool).to(q.device), (b, hq, nq, nk))
    row_any = allowed.any(-1, keepdim=True)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    s = torch.where(allowed, s, neg)
    s_safe = torch.where(row_any, s, torch.zeros((), dtype=torch.float64))  # empty rows: harmless row of zeros
    m = s_safe.amax(-1, keepdim=True).detach()
    e = torch.exp(s_safe - m)
    denom = e.sum(-1, keepdim=True)
    p = (e / denom) * row_any
    out = torch.einsum("bhij,bhjd->bhid", p, v)
    if not return_lse:
        return out
    lse = (m + torch.log(denom)).squeeze(-1)
    lse = torch.where(row_any.squeeze(-1), lse, neg)
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _coords(n_flat_grid):
    """Row-major coordinates of every flat index of a grid (last axis fastest)."""
    return list(itertools.product(*(range(g) for g in n_flat_grid)))


def combine_axes(axis_masks):
    """AND per-axis (L_a, L_a) masks into the flat (N, N) mask of the row-major grid."""
    grid = [m.shape[0] for m in axis_masks]
    n = math.prod(grid)
    out = torch.ones(n, n, dtype=torch.bool)
    for a, m in enumerate(axis_masks):
        # view of out as (L_0, .., L_{n-1}, L_0, .., L_{n-1}); AND the axis-a factor
        view = [1] * (2 * len(grid))
        view[a] = grid[a]
        view[len(grid) + a] = grid[a]
        out = (out.view(*grid, *grid) & m.view(view)).reshape(n, n)
    return out


# ---------------------------------------------------------------------------------------------------------
# NATTEN neighborhood (SHI-Labs/NATTEN ``get_na_flex_mask``)
# ---------------------------------------------------------------------------------------------------------


@cache
def _na_axis(length, kernel, dilation, causal, stride):
    """(L, L) bool mask of one axis, NATTEN's per-axis window rules, written with plain loops."""
    mask = [[False] * length for _ in range(length)]
    for i in range(length):
        g = i % dilation  # keys of the query's dilation group only
        ip = i // dilation
        group = list(range(g, length, dilation))
        group_len = len(group)  # == ceil((L - g) / dilation)
        assert group_len == math.ceil((length - g) / dilation)
        # stride: the leader of the query's run of `stride` queries (stride 1: itself)
        if stride > 1:
            if causal:
                leader = min((ip // stride) * stride + stride - 1, group_len - 1)
            else:
                leader = min((ip // stride) * stride + stride // 2, group_len - 1)
        else:
            leader = ip
        left = kernel // 2
        right = kernel - 1 - left
        for j in group:
            jp = j // dilation
            if causal:  # causal windows are truncated, not shifted
                ok = jp <= ip and leader - jp < kernel
            else:  # non-causal: window centre clamped so the window slides inward
                centre = min(max(leader, left), group_len - 1 - right)
                ok = centre - left <= jp <= centre + right
            mask[i][j] = ok
    return torch.tensor(mask, dtype=torch.bool)


def _tup(x, n):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


def neighborhood_mask(grid, kernel_size, dilation=1, is_causal=False, stride=1):
    """Flat (N, N) NATTEN mask of a row-major grid (the per-axis masks AND-ed over axes)."""
    grid = _tup(grid, 1)
    nd = len(grid)
    ks, dil, cau, st = _tup(kernel_size, nd), _tup(dilation, nd), _tup(is_causal, nd), _tup(stride, nd)
    return combine_axes([_na_axis(grid[a], ks[a], dil[a], bool(cau[a]), st[a]) for a in range(nd)])


def rpb_bias(table, grid, kernel_size, dilation=1):
    """Dense (H, N, N) bias from a NAT relative-position-bias table ``(H, 2k-1, ...)``.

    Per axis the index is ``(j - i) / dilation + k - 1``; indices are flattened row-major. Pairs outside
    the neighbourhood (index out of range or not an integer) get 0: they are masked anyway.
    """
    grid = _tup(grid, 1)
    nd = len(grid)
    ks, dil = _tup(kernel_size, nd), _tup(dilation, nd)
    coords = _coords(grid)
    n = len(coords)
    heads = table.shape[0]
    flat_table = table.reshape(heads, -1)
    rows = []
    for ci in coords:
        idx_row, ok_row = [], []
        for cj in coords:
            flat, ok = 0, True
            for a in range(nd):
                diff = cj[a] - ci[a]
                if diff % dil[a]:
                    ok = False
                    break
                idx = diff // dil[a] + ks[a] - 1
                if not 0 <= idx <= 2 * ks[a] - 2:
                    ok = False
                    break
                flat = flat * (2 * ks[a] - 1) + idx
            idx_row.append(flat if ok else 0)
            ok_row.append(ok)
        rows.append((idx_row, ok_row))
    idx = torch.tensor([r[0] for r in rows], dtype=torch.long)
    ok = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    assert idx.shape == (n, n)
    return torch.where(ok, flat_table[:, idx], torch.zeros((), dtype=table.dtype))


# ---------------------------------------------------------------------------------------------------------
# Swin windows (shifted, region labels), cyclic shift, MaxViT grid
# ---------------------------------------------------------------------------------------------------------


def _band(t, extent, size, shift):
    """Swin's shifted-window region label of a (padded) coordinate: 0, 1 or 2."""
    if t < extent - size:
        return 0
    if t < extent - shift:
        return 1
    return 2


def swin_mask(grid, size, shift=0):
    """Blocks(wrap=False) as Swin's SW-MSA: pad each axis to a multiple of the window, roll the token map by -shift
    (torch.roll semantics), partition the rolled map into windows, and allow a pair iff it shares a
    window and its region label (labels computed on the *unrolled* padded map); padded tokens are dropped."""
    grid = _tup(grid, 1)
    nd = len(grid)
    size, shift = _tup(size, nd), _tup(shift, nd)
    padded = tuple(-(-g // m) * m for g, m in zip(grid, size))
    token = torch.arange(math.prod(padded)).view(padded)
    rolled = torch.roll(token, shifts=tuple(-s for s in shift), dims=tuple(range(nd)))
    n = math.prod(grid)
    mask = [[False] * n for _ in range(n)]
    # window -> list of (original flat real index, label tuple)
    windows = {}
    for pos in itertools.product(*(range(p) for p in padded)):
        orig = int(rolled[pos])
        ocoord = []
        rest = orig
        for p in reversed(padded):
            ocoord.append(rest % p)
            rest //= p
        ocoord = ocoord[::-1]
        if any(c >= g for c, g in zip(ocoord, grid)):
            continue  # a padded token
        flat = 0
        for c, g in zip(ocoord, grid):
            flat = flat * g + c
        win = tuple(p // m for p, m in zip(pos, size))
        label = tuple(_band(p, e, m, s) for p, e, m, s in zip(pos, padded, size, shift))
        windows.setdefault(win, []).append((flat, label))
    for members in windows.values():
        for fi, li in members:
            for fj, lj in members:
                if li == lj:
                    mask[fi][fj] = True
    return torch.tensor(mask, dtype=torch.bool)


def cyclic_blocks_mask(grid, size, shift=0):
    """Blocks(wrap=True): roll by -shift, partition into windows, no region mask."""
    grid = _tup(grid, 1)
    nd = len(grid)
    size, shift = _tup(size, nd), _tup(shift, nd)
    token = torch.arange(math.prod(grid)).view(grid)
    rolled = torch.roll(token, shifts=tuple(-s for s in shift), dims=tuple(range(nd)))
    n = math.prod(grid)
    window_of = [None] * n
    for pos in itertools.product(*(range(g) for g in grid)):
        window_of[int(rolled[pos])] = tuple(p // m for p, m in zip(pos, size))
    return torch.tensor([[window_of[i] == window_of[j] for j in range(n)] for i in range(n)], dtype=torch.bool)


def grid_mask(grid, size):
    """MaxViT grid attention: token coordinate r goes to window r % (extent / size) on every axis."""
    grid = _tup(grid, 1)
    nd = len(grid)
    size = _tup(size, nd)
    coords = _coords(grid)
    n = len(coords)
    stride = [g // s for g, s in zip(grid, size)]
    win = [tuple(c % t for c, t in zip(ci, stride)) for ci in coords]
    return torch.tensor([[win[i] == win[j] for j in range(n)] for i in range(n)], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# 1D positional patterns (query i sits at key position p = i + Nk - Nq)
# ---------------------------------------------------------------------------------------------------------


def _pairs(nq, nk, rule):
    """(nq, nk) mask from a rule on (query index i, query position p, key index j), with plain loops."""
    mask = [[False] * nk for _ in range(nq)]
    for i in range(nq):
        p = i + nk - nq
        for j in range(nk):
            mask[i][j] = bool(rule(i, p, j))
    return torch.tensor(mask, dtype=torch.bool).reshape(nq, nk)


def causal_mask(nq, nk):
    return _pairs(nq, nk, lambda i, p, j: j <= p)


def sliding_window_mask(nq, nk, left, right=0):
    return _pairs(nq, nk, lambda i, p, j: p - left <= j <= p + right)


def strided_mask(nq, nk, stride, offset=0):
    return _pairs(nq, nk, lambda i, p, j: (j - offset) % stride == 0)


def global_tokens_mask(nq, nk, n):
    return _pairs(nq, nk, lambda i, p, j: i < n or j < n)


def sinks_mask(nq, nk, n):
    return _pairs(nq, nk, lambda i, p, j: j < n)


def dense_mask(nq, nk):
    return torch.ones(nq, nk, dtype=torch.bool)


def _window_slots(grid, size, shift, rolled_partition):
    """Per token (row-major): (window, slot) after rolling by -shift and partitioning into ``size`` windows (the
    window partition), or the grid partition when ``rolled_partition`` is False (then ``shift`` is ignored)."""
    nd = len(grid)
    token = torch.arange(math.prod(grid)).view(grid)
    out = [None] * math.prod(grid)
    if rolled_partition:
        rolled = torch.roll(token, shifts=tuple(-s for s in shift), dims=tuple(range(nd)))
        for pos in itertools.product(*(range(g) for g in grid)):
            out[int(rolled[pos])] = (tuple(p // m for p, m in zip(pos, size)), tuple(p % m for p, m in zip(pos, size)))
    else:
        stride = [g // s for g, s in zip(grid, size)]
        for pos in itertools.product(*(range(g) for g in grid)):
            window, slot = tuple(p % t for p, t in zip(pos, stride)), tuple(p // t for p, t in zip(pos, stride))
            out[int(token[pos])] = (window, slot)
    return out


def window_rpb_bias(table, grid, size, shift=0, grid_partition=False):
    """Dense (H, N, N) bias of a window relative-position table ``(H, 2m-1, ...)`` (key-minus-query convention: entry
    ``[h, s_k - s_q + m - 1, ...]`` for the window slots ``s`` of the window partition after rolling by -shift, or of
    the grid partition for ``grid_partition``). Pairs in different windows get 0 (they are masked). Extents must be
    divisible."""
    grid = _tup(grid, 1)
    nd = len(grid)
    size, shift = _tup(size, nd), _tup(shift, nd)
    slots = _window_slots(grid, size, shift, not grid_partition)
    n = len(slots)
    idx = torch.zeros(n, n, dtype=torch.long)
    same = torch.zeros(n, n, dtype=torch.bool)
    for i, (wi, si) in enumerate(slots):
        for j, (wj, sj) in enumerate(slots):
            if wi != wj:
                continue
            flat = 0
            for a in range(nd):
                flat = flat * (2 * size[a] - 1) + (sj[a] - si[a] + size[a] - 1)
            idx[i, j] = flat
            same[i, j] = True
    flat_table = table.reshape(table.shape[0], -1)
    return torch.where(same, flat_table[:, idx], torch.zeros((), dtype=table.dtype))


# ---------------------------------------------------------------------------------------------------------
# sequence layers
# ---------------------------------------------------------------------------------------------------------


def rope(x, pos):
    """Rotary embedding (rotate-half layout, base 10000) of ``x (..., N, d)`` at positions ``pos (N,)``, float64."""
    d = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def rotary_qkv(m, x, repeat=False):
    """A sequence layer's q, k, v in float64 from its ``q_proj``/``k_proj``/``v_proj`` (biases included) with RoPE
    at positions ``0..N-1`` on q and k: ``(B, Hq, N, d)`` and ``(B, Hkv, N, d)``, or k/v repeated to the query
    heads (GQA) with ``repeat``."""
    b, n, _ = x.shape
    hq, hk, d = m.num_heads, m.num_kv_heads, m.head_dim

    def proj(lin, h):
        y = x @ lin.weight.double().T
        if lin.bias is not None:
            y = y + lin.bias.double()
        return y.view(b, n, h, d).transpose(1, 2)

    pos = torch.arange(n)
    q, k, v = rope(proj(m.q_proj, hq), pos), rope(proj(m.k_proj, hk), pos), proj(m.v_proj, hk)
    if repeat:
        k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    return q, k, v


def pairwise_reference(q, k, v, allowed, scale, bias=None, return_lse=False):
    """Masked softmax attention in float64 in which a key and its value enter a query's row only where ``allowed``:
    every product with a key, a value or a bias value sits behind ``where``, so whatever a key a query may not attend
    holds (NaN, Inf, 1e30) reaches neither the query's output nor, through autograd, any gradient. Same arguments
    and conventions as ``dense_reference`` (which multiplies whole rows and so spreads NaN); memory is
    O(B·H·Nq·Nk·d), for small problems. A row whose allowed scores are all ``-inf`` returns 0 (LSE ``-inf``)."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    allowed = torch.broadcast_to(allowed.to(torch.bool), (b, hq, nq, nk))
    zero = torch.zeros((), dtype=torch.float64)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    s = (q[:, :, :, None] * torch.where(allowed[..., None], k[:, :, None], zero)).sum(-1) * scale
    if bias is not None:
        s = s + torch.where(allowed, torch.broadcast_to(bias.double(), s.shape), zero)
    s = torch.where(allowed, s, neg)
    live = ~torch.isneginf(s).all(-1, keepdim=True)
    s = torch.where(live, s, zero)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, zero)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / denom * live
    out = (p[..., None] * torch.where(allowed[..., None], v[:, :, None], zero)).sum(-2)
    if not return_lse:
        return out
    return out, torch.where(live[..., 0], (m + torch.log(denom))[..., 0], neg)
