"""The routing ops (``nearfar.ops.routing``: block scoring, block selection, k-means routing) against plain-loop
float64 references.

References follow the official codes: MoBA (MoonshotAI/MoBA ``moba/moba_naive.py``: mean-pooled key blocks,
complete past blocks compete, current block forced), NSA (fla-org/flash-linear-attention ``fla/ops/nsa/naive.py``
``naive_nsa_topk``: forced initial + local blocks, group-shared selection), SeerAttention (microsoft/SeerAttention:
``Kmaxminavg`` pooling, threshold selection, the block max-pooled attention map) and the Routing Transformer
(lucidrains/routing-transformer ``Kmeans``: balanced top-w clusters, EMA centroids).
"""

from __future__ import annotations

import doctest
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nearfar as nf
import nearfar.ops.block_scoring as block_scoring
import nearfar.ops.block_selection as block_selection
import nearfar.ops.kmeans_routing as kmeans_routing
import nearfar.ops.routing as routing
from nearfar.functional import (
    block_attention_stat,
    block_scores,
    ema_update_centroids,
    kmeans_route,
    kv_blocks_from_mask,
    nz_ratio_blocks,
    pool_blocks,
    threshold_blocks,
    topk_blocks,
)

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def _layout(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in another layout: 0 contiguous, 1 a transposed copy viewed back, 2 a sliced view."""
    if how == 1:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == 2:
        return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]
    return t


def _cur(m: int, qbs: int, kbs: int, start: int = 0) -> int:
    return (start + (m + 1) * qbs - 1) // kbs


def _rows_to_lists(num: torch.Tensor, idx: torch.Tensor) -> list:
    """Check the block-list format and return the kept blocks of every row as sets."""
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    out = []
    for row_n, row in zip(num.reshape(-1).tolist(), idx.reshape(-1, idx.shape[-1]).tolist(), strict=True):
        kept = row[:row_n]
        assert kept == sorted(set(kept)) and all(0 <= j < idx.shape[-1] for j in kept)
        assert all(j == -1 for j in row[row_n:])
        out.append(set(kept))
    return out


# ---------------------------------------------------------------- pool_blocks


def _pool_ref(x: torch.Tensor, bs: int, how: str) -> torch.Tensor:
    b, h, n, d = x.shape
    nb = -(-n // bs)
    out = torch.zeros(b, h, nb, 3 * d if how == "maxminavg" else d, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            for j in range(nb):
                blk = x[bi, hi, j * bs: min(n, (j + 1) * bs)].double()
                parts = {"mean": blk.mean(0), "max": blk.max(0).values, "min": blk.min(0).values}
                out[bi, hi, j] = (torch.cat([parts["max"], parts["min"], parts["mean"]]) if how == "maxminavg"
                                  else parts[how])
    return out


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(0, 11), d=st.integers(1, 4), bs=st.integers(1, 5),
       how=st.sampled_from(["mean", "max", "min", "maxminavg"]), layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_pool_blocks_matches_loop(b, h, n, d, bs, how, layout, seed):
    x = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    got = pool_blocks(_layout(x, layout), bs, how)
    torch.testing.assert_close(got, _pool_ref(x, bs, how))


def test_pool_blocks_is_differentiable():
    x = torch.randn(1, 2, 7, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pool_blocks(t, 3, "maxminavg"), (x,))


# ---------------------------------------------------------------- block_scores


@SETTINGS
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 3), n=st.integers(1, 13), d=st.integers(1, 4),
       qbs=st.integers(1, 4), kbs=st.integers(1, 4), start=st.integers(0, 5), causal=st.booleans(),
       include_current=st.booleans(), softmax=st.booleans(), reduce=st.sampled_from([None, "max", "mean"]),
       layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_block_scores_matches_loop(b, hkv, g, n, d, qbs, kbs, start, causal, include_current, softmax, reduce,
                                   layout, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, n, d, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, n + start, d, generator=gen, dtype=F64)
    qp, kp = pool_blocks(q, qbs), pool_blocks(k, kbs)
    got = block_scores(_layout(qp, layout), _layout(kp, layout), k_block_size=kbs, q_block_size=qbs, q_start=start,
                       causal=causal, include_current=include_current, scale=0.5, softmax=softmax,
                       group_reduce=reduce)
    qb, kb = qp.shape[2], kp.shape[2]
    ref = torch.empty(b, hkv * g, qb, kb, dtype=F64)
    for bi in range(b):
        for hi in range(hkv * g):
            for m in range(qb):
                for j in range(kb):
                    cur = _cur(m, qbs, kbs, start)
                    masked = causal and (j > cur or (not include_current and j == cur))
                    ref[bi, hi, m, j] = -math.inf if masked else 0.5 * float(qp[bi, hi, m] @ kp[bi, hi // g, j])
                vis = [j for j in range(kb) if ref[bi, hi, m, j] != -math.inf]
                if softmax and vis:  # per-head probabilities over the visible blocks, masked entries kept at -inf
                    top = max(float(ref[bi, hi, m, j]) for j in vis)
                    e = {j: math.exp(float(ref[bi, hi, m, j]) - top) for j in vis}
                    for j in vis:
                        ref[bi, hi, m, j] = e[j] / sum(e.values())
    if reduce is not None:
        grouped = ref.reshape(b, hkv, g, qb, kb)
        ref = grouped.amax(2) if reduce == "max" else grouped.mean(2)
    torch.testing.assert_close(got, ref)


def test_block_scores_default_scale_and_gradient():
    q = torch.randn(1, 4, 3, 8, dtype=F64, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, dtype=F64, requires_grad=True)
    s = block_scores(q, k, k_block_size=1, causal=False)
    torch.testing.assert_close(s, torch.einsum("bhmd,bhjd->bhmj", q, k.repeat_interleave(2, 1)) / math.sqrt(8))
    assert torch.autograd.gradcheck(
        lambda a, c: block_scores(a, c, k_block_size=1, causal=False, group_reduce="mean"), (q, k))


# ---------------------------------------------------------------- topk_blocks


def _topk_ref(scores, k, first, current, last, causal, qbs, kbs, start):
    b, h, qb, kb = scores.shape
    rows = []
    for bi in range(b):
        for hi in range(h):
            for m in range(qb):
                cur = _cur(m, qbs, kbs, start)
                curc = min(cur, kb - 1)
                forced = set()
                if first:
                    forced.add(0)
                for j in range(kb):
                    if curc - max(last, int(current)) < j <= curc:
                        forced.add(j)
                if causal:
                    forced = {j for j in forced if j <= cur}
                free = [j for j in range(kb) if j not in forced and not math.isnan(scores[bi, hi, m, j])
                        and scores[bi, hi, m, j] != -math.inf and (not causal or j <= cur)]
                free.sort(key=lambda j: (-float(scores[bi, hi, m, j]), j))
                rows.append(forced | set(free[: max(0, k - len(forced))]))
    return rows


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), qb=st.integers(1, 6), kb=st.integers(1, 7), k=st.integers(0, 8),
       first=st.booleans(), current=st.booleans(), last=st.integers(0, 3), causal=st.booleans(),
       qbs=st.integers(1, 3), kbs=st.integers(1, 3), start=st.integers(0, 3), ties=st.booleans(),
       holes=st.booleans(), layout=st.integers(0, 2), chunk=st.sampled_from([0, 1, 9]), seed=st.integers(0, 99))
def test_topk_blocks_matches_loop(b, h, qb, kb, k, first, current, last, causal, qbs, kbs, start, ties, holes,
                                  layout, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, qb, kb, generator=gen, dtype=F64)
    if ties:  # many exact ties: the lower block index must win
        scores = scores.round()
    if holes:  # masked (-inf) and NaN scores are never selected unless forced
        r = torch.rand(b, h, qb, kb, generator=gen)
        scores = scores.masked_fill(r < 0.25, -math.inf).masked_fill(r > 0.9, math.nan)
    # chunk: score elements per chunk of rows (0: the default; 1 and 9: a row or a few per chunk)
    with mock.patch.object(block_selection, "_TOPK_CHUNK", chunk or block_selection._TOPK_CHUNK):
        num, idx = topk_blocks(_layout(scores, layout), k, force_first=first, force_current=current,
                               force_last=last, causal=causal, q_block_size=qbs, k_block_size=kbs, q_start=start)
    assert num.shape == (b, h, qb) and idx.shape == (b, h, qb, kb)
    assert _rows_to_lists(num, idx) == _topk_ref(scores, k, first, current, last, causal, qbs, kbs, start)


def test_topk_blocks_nsa_example():
    # fla naive_nsa_topk at t=36, block size 8, 4 slots: forced {0, current 4, previous 3} + the best other (2)
    scores = torch.tensor([0.1, 0.05, 0.5, 0.2, 0.15, 0.0])[None, None, None].double()
    num, idx = topk_blocks(scores, 4, force_first=True, force_last=2, q_block_size=1, k_block_size=8, q_start=36)
    assert num.tolist() == [[[4]]] and idx.tolist() == [[[[0, 2, 3, 4, -1, -1]]]]
    # t=16: only blocks 0..2 exist up to t: all three, one slot left empty
    num, idx = topk_blocks(scores, 4, force_first=True, force_last=2, k_block_size=8, q_start=16)
    assert idx.tolist() == [[[[0, 1, 2, -1, -1, -1]]]]


def test_moba_selection_pipeline():
    """MoBA: complete past blocks compete on <q, mean(k_block)>, the current block is forced, k counts it."""
    torch.manual_seed(0)
    t, bs, k = 13, 3, 3
    q, keys = torch.randn(1, 2, t, 4, dtype=F64), torch.randn(1, 2, t, 4, dtype=F64)
    s = block_scores(q, pool_blocks(keys, bs), k_block_size=bs, include_current=False, scale=1.0)
    _, idx = topk_blocks(s, k, force_current=True, k_block_size=bs)
    for hi in range(2):
        for i in range(t):
            gate = [float(q[0, hi, i] @ keys[0, hi, j * bs:(j + 1) * bs].mean(0)) for j in range(i // bs)]
            past = sorted(range(len(gate)), key=lambda j: -gate[j])[: k - 1]
            want = sorted(past + [i // bs])
            assert idx[0, hi, i].tolist()[: len(want)] == want


def test_nsa_selection_pipeline():
    """fla ``naive_nsa_topk``: per-head softmax over the complete blocks, mean over the GQA group, forced
    {0, current, previous}, S slots. A block is complete at t once its last token is <= t: with token queries that
    is ``include_current=False`` shifted by one position (``q_start=1``)."""
    gen = torch.Generator().manual_seed(3)
    t_len, bs, hkv, g, slots = 37, 8, 2, 3, 4
    q = torch.randn(2, hkv * g, t_len, 5, generator=gen, dtype=F64)
    k_cmp = pool_blocks(torch.randn(2, hkv, t_len, 5, generator=gen, dtype=F64), bs)
    imp = block_scores(q, k_cmp, k_block_size=bs, q_start=1, include_current=False, softmax=True,
                       group_reduce="mean")
    num, idx = topk_blocks(imp, slots, force_first=True, force_last=2, k_block_size=bs)
    got = _rows_to_lists(num, idx)
    ref = []
    for bi in range(2):
        for h in range(hkv):
            for t in range(t_len):
                vis = [c for c in range(k_cmp.shape[2]) if (c + 1) * bs - 1 <= t]
                mean = dict.fromkeys(vis, 0.0)
                for hq in range(h * g, (h + 1) * g):
                    logits = {c: float(q[bi, hq, t] @ k_cmp[bi, h, c]) / math.sqrt(5) for c in vis}
                    z = sum(math.exp(v) for v in logits.values())
                    for c in vis:
                        mean[c] += math.exp(logits[c]) / z / g
                forced = {c for c in (0, t // bs, t // bs - 1) if c >= 0}
                rest = sorted((c for c in vis if c not in forced), key=lambda c: -mean[c])
                ref.append(forced | set(rest[: slots - len(forced)]))
    assert got == ref
    assert all(len(r) == min(slots, t // bs + 1) for r, t in zip(got, list(range(t_len)) * 4, strict=True))


def test_flex_attention_accepts_the_block_lists():
    from torch.nn.attention.flex_attention import BlockMask

    scores = torch.randn(2, 3, 4, 4)
    num, idx = topk_blocks(scores, 2, force_current=True)
    dense = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=16).to_dense()
    want = torch.zeros(2, 3, 4, 4, dtype=torch.int32)
    for row, kept in zip(want.reshape(-1, 4), _rows_to_lists(num, idx), strict=True):
        row[list(kept)] = 1
    assert torch.equal(dense.to(torch.int32), want)


def test_topk_blocks_empty_and_short():
    num, idx = topk_blocks(torch.zeros(1, 1, 0, 3), 2)
    assert num.shape == (1, 1, 0) and idx.shape == (1, 1, 0, 3)
    num, idx = topk_blocks(torch.zeros(1, 2, 3, 0), 2, force_first=True)
    assert num.tolist() == [[[0, 0, 0]] * 2] and idx.shape == (1, 2, 3, 0)
    num, idx = topk_blocks(torch.full((1, 1, 2, 2), -math.inf), 2)
    assert num.tolist() == [[[0, 0]]] and idx.tolist() == [[[[-1, -1], [-1, -1]]]]
    num, _ = topk_blocks(torch.zeros(1, 1, 3, 3), 0, force_first=True)  # forced beyond k
    assert num.tolist() == [[[1, 1, 1]]]


# ---------------------------------------------------------------- threshold / nz_ratio / mask conversion


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), qb=st.integers(1, 6), kb=st.integers(1, 6),
       tau=st.sampled_from([0.0, 0.1, 0.25, 0.5]), first=st.booleans(), last=st.integers(0, 2),
       dense_rows=st.integers(0, 3), causal=st.booleans(), layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_threshold_blocks_matches_loop(b, h, qb, kb, tau, first, last, dense_rows, causal, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, qb, kb, generator=gen, dtype=F64)
    if causal:
        logits = logits.masked_fill(torch.ones(qb, kb, dtype=torch.bool).triu(1), -math.inf)
    probs = torch.softmax(logits, -1).nan_to_num(0.0).masked_fill(logits == -math.inf, -math.inf)
    num, idx = threshold_blocks(_layout(probs, layout), tau, force_first=first, force_last=last,
                                dense_last_rows=dense_rows, causal=causal)
    ref = []
    for bi in range(b):
        for hi in range(h):
            for m in range(qb):
                vis = [j for j in range(kb) if probs[bi, hi, m, j] != -math.inf and (not causal or j <= m)]
                kept = {j for j in vis if probs[bi, hi, m, j] >= tau or m >= qb - dense_rows}
                kept |= {0} if first else set()
                cur = min(m, kb - 1)
                kept |= {j for j in range(kb) if cur - last < j <= cur}
                ref.append({j for j in kept if not causal or j <= m})
    assert _rows_to_lists(num, idx) == ref


def test_threshold_zero_is_every_causal_block():
    probs = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    num, _ = threshold_blocks(probs, 0.0)
    assert num.tolist() == [[[1, 2, 3, 4, 5]] * 2] * 2


def test_nz_ratio_blocks_keeps_seerattention_count():
    scores = torch.randn(1, 2, 8, 8)
    for rho, causal in ((0.0, True), (0.5, True), (1.0, True), (0.3, False), (1.0, False)):
        frac = 1 - math.sqrt(1 - rho) if causal else rho
        k = max(1, int(frac * 8))
        got = nz_ratio_blocks(scores, rho, causal=causal)
        want = topk_blocks(scores, k, causal=causal)
        assert all(torch.equal(a, c) for a, c in zip(got, want, strict=True))
    # every other option goes to topk_blocks unchanged (token rows against blocks of 4 keys, forced blocks)
    opts = dict(force_first=True, force_current=True, force_last=2, q_block_size=1, k_block_size=4, q_start=3)
    scores = torch.randn(1, 2, 8, 4)
    got = nz_ratio_blocks(scores, 0.4, **opts)
    want = topk_blocks(scores, max(1, int((1 - math.sqrt(0.6)) * 4)), **opts)
    assert all(torch.equal(a, c) for a, c in zip(got, want, strict=True))
    assert not torch.equal(got[0], nz_ratio_blocks(scores, 0.4)[0])  # the options change the selection


def test_kv_blocks_from_mask_roundtrip():
    mask = torch.rand(2, 3, 4, 5) < 0.5
    num, idx = kv_blocks_from_mask(mask.transpose(2, 3).contiguous().transpose(2, 3))
    back = torch.zeros_like(mask)
    for row, kept in zip(back.reshape(-1, 5), _rows_to_lists(num, idx), strict=True):
        row[list(kept)] = True
    assert torch.equal(back, mask)


# ---------------------------------------------------------------- block_attention_stat


@SETTINGS
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.integers(1, 2), nq=st.integers(1, 11), extra=st.integers(0, 4),
       bq=st.integers(1, 4), bk=st.integers(1, 4), how=st.sampled_from(["max", "sum"]), causal=st.booleans(),
       chunk=st.integers(1, 6), normalize=st.booleans(), layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_block_attention_stat_matches_loop(b, hkv, g, nq, extra, bq, bk, how, causal, chunk, normalize, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    nk = nq + extra
    q = torch.randn(b, hkv * g, nq, 4, generator=gen, dtype=F64)
    k = torch.randn(b, hkv, nk, 4, generator=gen, dtype=F64)
    v = torch.randn(b, hkv, nk, 4, generator=gen, dtype=F64)
    _, lse = nf.attend(q, k, v, nf.Causal() if causal else None, scale=0.7, return_lse=True)
    got = block_attention_stat(_layout(q, layout), _layout(k, layout), lse, bq, bk, scale=0.7, how=how,
                               causal=causal, normalize=normalize, chunk_size=chunk)
    # reference: the full map in float64, then pooled tile by tile
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(g, 1)) * 0.7
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(nk - nq + 1), -math.inf)
    p = torch.softmax(s, -1)
    qb, kb = -(-nq // bq), -(-nk // bk)
    ref = torch.zeros(b, hkv * g, qb, kb, dtype=F64)
    for i in range(qb):
        for j in range(kb):
            tile = p[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            ref[:, :, i, j] = tile.amax((-1, -2)) if how == "max" else tile.sum((-1, -2))
    if normalize:
        ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(got, ref)


def test_block_attention_stat_oracles():
    q, k, v = torch.randn(1, 2, 9, 4, dtype=F64), torch.randn(1, 2, 9, 4, dtype=F64), torch.randn(1, 2, 9, 4)
    _, lse = nf.attend(q, k, v.double(), nf.Causal(), return_lse=True)
    p = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(torch.ones(9, 9).triu(1).bool(), -math.inf), -1)
    torch.testing.assert_close(block_attention_stat(q, k, lse, 1, 1), p)  # block size 1: the map itself
    gt = block_attention_stat(q, k, lse, 3, 3, normalize=True)
    torch.testing.assert_close(gt.sum(-1), torch.ones(1, 2, 3, dtype=F64))
    assert (gt.triu(1) == 0).all()
    dead = torch.full_like(lse, -math.inf)  # rows with nothing to attend contribute 0
    assert (block_attention_stat(q, k, dead, 3, 3, normalize=True) == 0).all()


def test_block_attention_stat_empty():
    z = torch.zeros
    assert block_attention_stat(z(1, 2, 0, 4), z(1, 1, 5, 4), z(1, 2, 0), 2, 2).shape == (1, 2, 0, 3)
    no_keys = block_attention_stat(z(1, 2, 3, 4), z(1, 1, 0, 4), torch.full((1, 2, 3), -math.inf), 2, 2)
    assert no_keys.shape == (1, 2, 2, 0)


def test_empty_shapes_elsewhere():
    z = torch.zeros
    assert pool_blocks(z(2, 1, 0, 3), 2, "maxminavg").shape == (2, 1, 0, 9)
    assert block_scores(z(1, 2, 0, 4), z(1, 1, 3, 4), k_block_size=2).shape == (1, 2, 0, 3)
    assert block_scores(z(1, 2, 3, 4), z(1, 1, 0, 4), k_block_size=2, softmax=True).shape == (1, 2, 3, 0)
    num, idx = threshold_blocks(z(1, 1, 2, 0), 0.1, force_first=True)
    assert num.tolist() == [[[0, 0]]] and idx.shape == (1, 1, 2, 0)
    assert nz_ratio_blocks(z(1, 1, 2, 0), 0.5)[0].tolist() == [[[0, 0]]]


# ---------------------------------------------------------------- k-means routing


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 10), c=st.integers(1, 4), d=st.integers(1, 4),
       data=st.data(), normalize=st.booleans(), layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_kmeans_route_matches_loop(b, h, n, c, d, data, normalize, layout, seed):
    w = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, d, generator=gen, dtype=F64)
    mu = torch.nn.functional.normalize(torch.randn(h, c, d, generator=gen, dtype=F64), dim=-1)
    got = kmeans_route(_layout(x, layout), mu, w, normalize=normalize)
    assert got.shape == (b, h, c, w) and got.dtype == torch.int64
    for bi in range(b):
        for hi in range(h):
            for ci in range(c):
                sims = []
                for t in range(n):
                    xt = x[bi, hi, t] / x[bi, hi, t].norm().clamp_min(1e-12) if normalize else x[bi, hi, t]
                    sims.append(float(xt @ mu[hi, ci]))
                want = sorted(sorted(range(n), key=lambda t: (-sims[t], t))[:w])
                assert got[bi, hi, ci].tolist() == want


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(0, 10), c=st.integers(1, 4), d=st.integers(1, 4),
       decay=st.sampled_from([0.0, 0.5, 0.999, 1.0]), layout=st.integers(0, 2), seed=st.integers(0, 99))
def test_ema_update_centroids_matches_loop(b, h, n, c, d, decay, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, d, generator=gen, dtype=F64)
    mu = torch.nn.functional.normalize(torch.randn(h, c, d, generator=gen, dtype=F64), dim=-1)
    got = ema_update_centroids(_layout(mu, layout), _layout(x, layout), decay)
    ref = mu.clone()
    for hi in range(h):
        sums, counts = torch.zeros(c, d, dtype=F64), [0] * c
        for bi in range(b):
            for t in range(n):
                xt = x[bi, hi, t] / x[bi, hi, t].norm().clamp_min(1e-12)
                sims = [float(xt @ mu[hi, ci]) for ci in range(c)]
                best = max(range(c), key=lambda ci: (sims[ci], -ci))
                sums[best] += xt
                counts[best] += 1
        for ci in range(c):
            new = sums[ci] / sums[ci].norm().clamp_min(1e-12) if counts[ci] else mu[hi, ci]
            ref[hi, ci] = decay * mu[hi, ci] + (1 - decay) * new
    torch.testing.assert_close(got, ref)
    assert not got.requires_grad


# ---------------------------------------------------------------- errors and docs


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: pool_blocks(torch.zeros(2, 3, 4), 2), ValueError, "x must have 4 dimensions"),
    (lambda: pool_blocks([1.0], 2), TypeError, "x must be a torch.Tensor"),
    (lambda: pool_blocks(torch.zeros(1, 1, 4, 2, dtype=torch.long), 2), TypeError, "floating dtype"),
    (lambda: pool_blocks(torch.zeros(1, 1, 4, 2), 0), ValueError, "block_size must be a positive int"),
    (lambda: pool_blocks(torch.zeros(1, 1, 4, 2), 2.0), TypeError, "block_size"),
    (lambda: pool_blocks(torch.zeros(1, 1, 4, 2), 2, "median"), ValueError, "how must be one of"),
    (lambda: block_scores(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4), k_block_size=1), ValueError, "Hq % Hkv"),
    (lambda: block_scores(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), k_block_size=1, group_reduce="sum"),
     ValueError, "group_reduce"),
    (lambda: block_scores(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4, dtype=F64), k_block_size=1),
     TypeError, "dtype"),
    (lambda: block_scores(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), k_block_size=1, causal=1),
     TypeError, "causal must be a bool"),
    (lambda: topk_blocks(torch.zeros(1, 1, 2, 2), -1), ValueError, "k must be a non-negative int"),
    (lambda: topk_blocks(torch.zeros(1, 1, 2, 2), 1, force_last=-1), ValueError, "force_last"),
    (lambda: threshold_blocks(torch.zeros(1, 1, 2, 2), -0.1), ValueError, "threshold"),
    (lambda: threshold_blocks(torch.zeros(1, 1, 2, 2), "0.1"), TypeError, "threshold"),
    (lambda: threshold_blocks(torch.zeros(1, 1, 2, 2), 0.1, q_stat=1), TypeError, "q_stat"),
    (lambda: threshold_blocks(torch.zeros(1, 1, 2, 2), 0.1, k_block_size=0), ValueError, "k_block_size"),
    (lambda: nz_ratio_blocks(torch.zeros(1, 1, 2, 2), 1.5), ValueError, "nz_ratio"),
    (lambda: nz_ratio_blocks(torch.zeros(1, 1, 2, 2), 0.5, force_frist=True), TypeError, "force_frist"),
    (lambda: nz_ratio_blocks(torch.zeros(1, 1, 2, 2), 0.5, causal=1), TypeError, "causal must be a bool"),
    (lambda: nz_ratio_blocks(torch.zeros(1, 1, 2, 2), 0.5, force_last=-1), ValueError, "force_last"),
    (lambda: kv_blocks_from_mask(torch.zeros(1, 1, 2, 2)), TypeError, "bool"),
    (lambda: block_attention_stat(torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 3), 2, 2),
     ValueError, "lse must be"),
    (lambda: block_attention_stat(torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4), 2, 2,
                                  how="min"), ValueError, "how"),
    (lambda: block_attention_stat(torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4, 2), torch.zeros(1, 2, 4), 2, 2,
                                  chunk_size=0), ValueError, "chunk_size"),
    (lambda: kmeans_route(torch.zeros(1, 2, 4, 3), torch.zeros(2, 2, 3), 5), ValueError, r"top_w must be in \[1, 4\]"),
    (lambda: kmeans_route(torch.zeros(1, 2, 4, 3), torch.zeros(2, 2, 3), True), TypeError, "top_w"),
    (lambda: kmeans_route(torch.zeros(1, 2, 4, 3), torch.zeros(3, 2, 3), 1), ValueError, "centroids must be"),
    (lambda: ema_update_centroids(torch.zeros(2, 2, 3), torch.zeros(1, 2, 4, 3), 1.5), ValueError, "decay"),
])
def test_errors_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("module", [block_scoring, block_selection, kmeans_routing], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_routing_still_exports_every_op():
    # ``nearfar.ops.routing`` gathers the three modules' public names: code that imports from it keeps working
    for module in (block_scoring, block_selection, kmeans_routing):
        for name in module.__all__:
            assert getattr(routing, name) is getattr(module, name), name
    assert set(routing.__all__) == {n for m in (block_scoring, block_selection, kmeans_routing) for n in m.__all__}
