"""HiP attention: a float64 reference of the tree search written as plain loops from the official reference
(DeepAuto-AI/hip-attention ``src/hip_attn/v1_1/attention2_draft_causal_batch.py``,
``masking_iteration_draft_numba_kernel``: one row at a time, nodes as (start, size) pairs, the float
``group_size`` halving loop), compared exactly on the selected blocks; the layer against a dense masked float64
reference (outputs and gradients); the paper's oracles; decoding; compile; state_dict; errors."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)

import nearfar as nf
from nearfar import HiPAttention
from nearfar.functional import hip_topk_blocks
from nearfar.layers.rotary import rotary_qkv

# ------------------------------------------------------------------------------------------ reference search


def ref_search(q, k, mask_k, q_block, kv_block, window, stride, kpm=None):
    """Kept key blocks per (b, h, query block) as sorted lists: ``q (B, H, Nq, d)``, ``k (B, H, Nk, d)`` (GQA keys
    already repeated per query head), float64, plain loops."""
    q, k = q.detach(), k.detach()
    b_, h_, nq, _ = q.shape
    nk = k.shape[2]
    nodes_k = math.ceil(mask_k / kv_block)
    out = {}
    for b in range(b_):
        for h in range(h_):
            for r in range(math.ceil(nq / q_block)):
                first, last = r * q_block, min((r + 1) * q_block, nq) - 1
                ctx_end = nk - nq + last + 1
                t_src = max(0, ctx_end - window)
                bsrc = math.ceil(t_src / kv_block)
                queries = [q[b, h, i] for i in range(last, first - 1, -stride)
                           if kpm is None or bool(kpm[b, nk - nq + i])]

                def rep(start, b=b, h=h, queries=queries, ctx_end=ctx_end):
                    best = -math.inf
                    for qi in queries:
                        for t in range(kv_block):
                            j = start * kv_block + t
                            if j < ctx_end and (kpm is None or bool(kpm[b, j])):
                                best = max(best, float(qi @ k[b, h, j]))
                    return best

                if t_src <= mask_k:
                    out[b, h, r] = list(range(bsrc))
                    continue
                nodes = [(bsrc * j // nodes_k, bsrc * (j + 1) // nodes_k - bsrc * j // nodes_k)
                         for j in range(nodes_k)]
                group = bsrc / nodes_k
                while group > 1:
                    children = []
                    for s, z in nodes:
                        children += [(s, z // 2), (s + z // 2, z - z // 2)]
                    scores = [rep(s) if z >= 1 else -math.inf for s, z in children]
                    order = sorted(range(len(children)), key=lambda i, sc=scores: (-sc[i], i))[:nodes_k]
                    nodes = [children[i] for i in sorted(order)]
                    group /= 2
                out[b, h, r] = sorted(s for s, z in nodes if z >= 1)
    return out


def as_lists(num, idx):
    return {(b, h, r): idx[b, h, r, :num[b, h, r]].tolist() for b in range(idx.shape[0])
            for h in range(idx.shape[1]) for r in range(idx.shape[2])}


@st.composite
def search_cases(draw):
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    nk = draw(st.integers(1, 48))
    nq = draw(st.sampled_from([nk, draw(st.integers(1, nk))]))
    d = draw(st.sampled_from([2, 4]))
    kw = dict(mask_k=draw(st.integers(1, 10)), q_block=draw(st.integers(1, 6)), kv_block=draw(st.integers(1, 4)),
              window=draw(st.integers(0, 6)), query_stride=draw(st.integers(1, 3)))
    return b, hkv, g, nq, nk, d, kw, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@settings(max_examples=60, deadline=None)
@given(search_cases())
def test_search_matches_the_reference_exactly(case):
    b, hkv, g, nq, nk, d, kw, integer, padded, seed = case
    gen = torch.Generator().manual_seed(seed)
    # integer-valued scores make many exact ties: both break them towards the earlier child
    q = torch.randn(b, nq, hkv * g, d, generator=gen, dtype=torch.float64).transpose(1, 2)  # a non-contiguous view
    k = torch.randn(b, hkv, nk + 3, d, generator=gen, dtype=torch.float64)[:, :, 3:]
    if integer:
        q, k = q.round(), k.round()
    kpm = torch.rand(b, nk, generator=gen) > 0.3 if padded else None
    num, idx = hip_topk_blocks(q, k, key_padding_mask=kpm, **kw)
    assert num.dtype == idx.dtype == torch.int32 and idx.shape[:3] == (b, hkv * g, -(-nq // kw["q_block"]))
    expected = ref_search(q, k.repeat_interleave(g, 1), kw["mask_k"], kw["q_block"], kw["kv_block"], kw["window"],
                          kw["query_stride"], kpm)
    assert as_lists(num, idx) == expected
    past = torch.arange(idx.shape[-1]) >= num[..., None]
    assert bool((idx[past] == -1).all())


@settings(max_examples=30, deadline=None)
@given(nk=st.integers(1, 70), mask_k=st.integers(1, 12), q_block=st.integers(1, 8), kv_block=st.integers(1, 4),
       window=st.integers(0, 5), stride=st.integers(1, 3))
def test_increasing_scores_keep_the_last_k_keys(nk, mask_k, q_block, kv_block, window, stride):
    """Scores growing with the key's position: every query block keeps the last ceil(mask_k / kv_block) blocks of
    its searched context (all of it when it holds at most mask_k keys)."""
    u = torch.tensor([0.6, 0.8], dtype=torch.float64)
    k = (torch.arange(nk, dtype=torch.float64)[:, None] * u).view(1, 1, nk, 2)
    q = u.expand(1, 1, nk, 2)
    num, idx = hip_topk_blocks(q, k, mask_k, q_block=q_block, kv_block=kv_block, window=window, query_stride=stride)
    nodes = -(-mask_k // kv_block)
    for r, got in enumerate(as_lists(num, idx).values()):
        t = max(0, min((r + 1) * q_block, nk) - window)
        s = -(-t // kv_block)
        assert got == (list(range(s)) if t <= mask_k else list(range(s - nodes, s)))


def test_a_long_search_in_chunks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 300, 8, dtype=torch.float64), torch.randn(1, 1, 300, 8, dtype=torch.float64)
    whole = hip_topk_blocks(q, k, 16, q_block=4, kv_block=2, window=8)
    monkeypatch.setattr("nearfar.ops.hip._GATHER_BUDGET", 1)
    chunked = hip_topk_blocks(q, k, 16, q_block=4, kv_block=2, window=8)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    assert as_lists(*whole) == ref_search(q, k.expand(1, 2, 300, 8), 16, 4, 2, 8, 2)


# ------------------------------------------------------------------------------------------ the layer




def hip_mask(sel, b_, h_, n, q_block, kv_block, window, sinks):
    """(query, key) pairs: causal and (window, sinks or a selected block of the query's block)."""
    mask = torch.zeros(b_, h_, n, n, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                for j in range(i + 1):
                    mask[b, h, i, j] = i - j < window or j < sinks or j // kv_block in sel[b, h, i // q_block]
    return mask


def hip_reference(m, x, kpm=None):
    q, k, v = ref.rotary_qkv(m, x, repeat=True)
    sel = ref_search(q.detach(), k.detach(), m.mask_k, m.q_block, m.kv_block, m.window, m.query_stride, kpm)
    mask = hip_mask(sel, x.shape[0], m.num_heads, x.shape[1], m.q_block, m.kv_block, m.window, m.sinks)
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    o = ref.dense_reference(q, k, v, mask, m.head_dim ** -0.5)
    return o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1) @ m.o_proj.weight.double().T


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 29), heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]), mask_k=st.integers(1, 8),
       q_block=st.integers(1, 5), kv_block=st.integers(1, 3), window=st.integers(1, 4), sinks=st.integers(0, 2),
       seed=st.integers(0, 1000))
def test_layer_matches_the_float64_reference(n, heads, mask_k, q_block, kv_block, window, sinks, seed):
    torch.manual_seed(seed)
    m = HiPAttention(16, heads[0], mask_k=mask_k, q_block=q_block, kv_block=kv_block, window=window, sinks=sinks,
                     num_kv_heads=heads[1], qkv_bias=seed % 2 == 0)
    x = torch.randn(n, 2, 16).transpose(0, 1)  # B = 2, a non-contiguous input
    check_against_reference(m, x, hip_reference)


def test_padded_keys_are_neither_searched_nor_attended():
    torch.manual_seed(1)
    m = HiPAttention(16, 2, mask_k=4, q_block=3, kv_block=2, window=2, sinks=1)
    x = torch.randn(2, 23, 16)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[0, :6] = False
    kpm[1, 9:14] = False

    class Padded(torch.nn.Module):  # the layer with a fixed key_padding_mask, for check_against_reference
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, key_padding_mask=kpm)

    check_against_reference(Padded(m), x, lambda p64, x64: hip_reference(p64.layer, x64, kpm))
    y = x.clone()
    y[0, :6] = torch.randn(6, 16) * 100
    y[1, 9:14] = torch.randn(5, 16) * 100
    with torch.no_grad():  # the pad tokens' content changes no real output
        assert_close(m(y, key_padding_mask=kpm)[0, 6:], m(x, key_padding_mask=kpm)[0, 6:], 1e-6)
        assert_close(m(y, key_padding_mask=kpm)[1, 14:], m(x, key_padding_mask=kpm)[1, 14:], 1e-6)


def test_a_budget_covering_the_sequence_is_dense_causal():
    torch.manual_seed(2)
    n = 37
    for window, sinks in [(1, 0), (5, 3)]:
        m = HiPAttention(16, 4, mask_k=n, q_block=4, kv_block=3, window=window, sinks=sinks, num_kv_heads=2)
        x = torch.randn(2, n, 16, dtype=torch.float64)
        q, k, v = ref.rotary_qkv(m, x, repeat=True)
        dense = ref.dense_reference(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), m.head_dim ** -0.5)
        expected = dense.transpose(1, 2).reshape(2, n, -1) @ m.o_proj.weight.double().T
        assert_close(m.double()(x), expected, 1e-9)  # (the layer's rotary angles are float32)
    m.mask_k = 4  # and a small budget is not dense (the oracle above can fail)
    assert (m(x) - expected).abs().max() > 1e-3


def test_a_given_selection_equals_the_dense_reference():
    """``attend`` with HiP's pattern and a hand-given selection (repeats, -1, GQA-shared rows) == the masked dense
    reference on the pairs the selection, window and sinks allow; forward and backward."""
    torch.manual_seed(3)
    b, hq, hkv, n, d, q_block, kv_block, window, sinks = 2, 4, 2, 21, 8, 4, 3, 3, 2
    q = torch.randn(b, hq, n, d, requires_grad=True)
    k, v = torch.randn(b, hkv, n, d, requires_grad=True), torch.randn(b, hkv, n, d, requires_grad=True)
    qb, kb = -(-n // q_block), -(-n // kv_block)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(-1, kb, (b, hq, qb, 3), generator=gen, dtype=torch.int32)
    num = torch.randint(0, 4, (b, hq, qb), generator=gen, dtype=torch.int32)
    sel = {(i, h, r): [int(j) for j in idx[i, h, r, :num[i, h, r]] if j >= 0] for i in range(b) for h in range(hq)
           for r in range(qb)}
    pattern = (nf.SlidingWindow(left=window - 1) | nf.Sinks(sinks)) & nf.Causal()
    out = nf.attend(q, k, v, pattern, blocks=nf.SelectedBlocks(num, idx, q_block=q_block, kv_block=kv_block,
                                                               within=nf.Causal()))
    mask = hip_mask(sel, b, hq, n, q_block, kv_block, window, sinks)
    expected = ref.dense_reference(q, k, v, mask, d ** -0.5)
    check_outputs_and_grads(out, expected, (q, k, v))


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("chunks", [(1,) * 30, (7,) + (1,) * 23, (4, 9, 1, 1, 15)])
def test_decoding_equals_the_forward_with_one_query_per_block(chunks):
    torch.manual_seed(4)
    m = HiPAttention(32, 4, mask_k=5, q_block=1, kv_block=2, window=3, sinks=1, refresh_interval=1,
                     num_kv_heads=2).double().eval()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        q, k, _, _ = rotary_qkv(m, x, 0)
        forward_sel = hip_topk_blocks(q, k, 5, q_block=1, kv_block=2, window=3)
        cache, outs, i = m.new_cache(2), [], 0
        for c in chunks:
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
            if c == 1:  # the step's selection is the forward's row of that query, exactly
                num, idx = cache.selection
                assert num.tolist() == forward_sel[0][:, :, i - 1:i].tolist()
                assert idx.tolist() == forward_sel[1][:, :, i - 1:i, :idx.shape[-1]].tolist()
    assert_close(torch.cat(outs, 1), full, 1e-12)
    assert cache.length == 30 and cache.size == 30  # HiP keeps every key


def test_refresh_interval_reuses_the_selection():
    """With ``refresh_interval=3`` the steps after a search reuse its blocks: each output equals the reference
    attention whose selection is searched at the last refresh step (query and keys of that step)."""
    torch.manual_seed(5)
    r, prefill, n = 3, 6, 20
    m = HiPAttention(16, 2, mask_k=3, q_block=8, kv_block=1, window=2, sinks=1, refresh_interval=r).double().eval()
    x = torch.randn(1, n, 16, dtype=torch.float64)
    q, k, v = ref.rotary_qkv(m, x, repeat=True)
    cache = m.new_cache(1)
    with torch.no_grad():
        m(x[:, :prefill], cache=cache)
        got = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(prefill, n)], 1)
    for t in range(prefill, n):
        s = prefill + (t - prefill) // r * r  # the step whose search serves step t
        sel = ref_search(q[:, :, s:s + 1], k[:, :, :s + 1], 3, 1, 1, 2, 2)
        allowed = torch.zeros(1, 2, 1, t + 1, dtype=torch.bool)
        for h in range(2):
            for j in range(t + 1):
                allowed[0, h, 0, j] = t - j < 2 or j < 1 or j in sel[0, h, 0]
        o = ref.dense_reference(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], allowed, m.head_dim ** -0.5)
        expected = o.transpose(1, 2).reshape(1, 1, -1) @ m.o_proj.weight.double().T
        assert_close(got[:, t - prefill:t - prefill + 1], expected, 1e-9)
    # a refresh at every step gives other outputs here (the reuse is real)
    m.refresh_interval, cache = 1, m.new_cache(1)
    with torch.no_grad():
        m(x[:, :prefill], cache=cache)
        fresh = torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(prefill, n)], 1)
    assert (fresh - got).abs().max() > 1e-6


def test_the_default_prefill_block_matches_decoding_while_everything_is_kept():
    """The default forward shares one selection per 32 queries; while a context holds at most mask_k + window keys
    in a query block (whole contexts up to its last query), so that block equals the one-query blocks of decoding;
    a longer one need not."""
    torch.manual_seed(6)
    coarse = HiPAttention(16, 2, mask_k=28, window=4, sinks=1).double()
    fine = HiPAttention(16, 2, mask_k=28, q_block=1, window=4, sinks=1).double()
    fine.load_state_dict(coarse.state_dict())
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        a, b = coarse(x), fine(x)
    assert_close(a[:, :32], b[:, :32], 1e-12)  # the first block: 32 keys <= mask_k + window
    assert (a[:, 32:] - b[:, 32:]).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------ module checks


def test_compile_state_dict_and_registry():
    torch.manual_seed(7)
    x = torch.randn(2, 12, 16)
    m = HiPAttention(16, 4, mask_k=6, q_block=3, kv_block=2, window=2, sinks=1, num_kv_heads=2)
    q, k, _, _ = rotary_qkv(m, x, 0)
    assert hip_topk_blocks(q, k, 6, q_block=3, kv_block=2, window=2)[0][0, 0].tolist() == [1, 2, 3, 3]  # searched
    check_compile_matches_eager(m, x)  # (one split of the tree: a small graph to compile)
    check_state_dict_round_trip(lambda: HiPAttention(16, 4, mask_k=4, q_block=3, kv_block=2, window=2), x)
    entry = {e.name: e for e in nf.mechanisms()}["hip"]
    assert entry.family == "routed" and set(entry.patterns) == {"CS"} and entry.cls is HiPAttention
    layer = entry.make(32, 2)
    assert (layer.mask_k, layer.q_block, layer.kv_block, layer.window, layer.sinks, layer.query_stride,
            layer.refresh_interval) == (512, 32, 2, 128, 32, 2, 8)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(mask_k=0), ValueError, "mask_k"), (dict(q_block=0), ValueError, "q_block"),
    (dict(kv_block=1.5), TypeError, "kv_block"), (dict(window=0), ValueError, "window"),
    (dict(sinks=-1), ValueError, "sinks"), (dict(query_stride=0), ValueError, "query_stride"),
    (dict(refresh_interval=0), ValueError, "refresh_interval"), (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
])
def test_constructor_errors(kw, err, msg):
    with pytest.raises(err, match=msg):
        HiPAttention(16, 2, **kw)


def test_call_and_search_errors():
    m = HiPAttention(16, 2, mask_k=4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="key_padding_mask is for whole sequences"):
        m(x, cache=m.new_cache(2), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, N\)"):
        m(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        m(x, key_padding_mask=torch.ones(2, 5))
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="Nk >= Nq"):
        hip_topk_blocks(q, k[:, :, :5], 4)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        hip_topk_blocks(q, torch.randn(1, 3, 6, 8), 4)
    with pytest.raises(TypeError, match="share one dtype"):
        hip_topk_blocks(q, k.double(), 4)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        hip_topk_blocks(q[0], k, 4)
    for kw, msg in [(dict(mask_k=0), "mask_k"), (dict(window=-1), "window"), (dict(query_stride=0), "query_stride"),
                    (dict(q_block=0), "q_block"), (dict(kv_block=0), "kv_block")]:
        with pytest.raises(ValueError, match=msg):
            hip_topk_blocks(q, k, **{"mask_k": 4, **kw})
