"""NSA: a float64 reference written from the paper and fla's naive code (fla-org/flash-linear-attention
``fla/ops/nsa/naive.py``: mean-pooled complete blocks visible once their last token is past, group-mean compressed
probabilities, forced initial/current/previous blocks, token-causal selected blocks, a window of w keys, sigmoid
gates), the selections by plain loops and each branch as a dense mask; oracles, decoding, varlen."""

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
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)

import nearfar as nf
from nearfar.layers import nsa as nsa_module
from nearfar.layers import nsa_branches, nsa_fla
from nearfar.layers.nsa import NSAAttention
from nearfar.layers.nsa_fla import nsa, nsa_compression, nsa_selection, nsa_topk

# ----------------------------------------------------------------------------------------- float64 reference


def mean_blocks(x, bs, count):
    """(B, H, T, d) -> (B, H, count, d): the mean of each of the first ``count`` blocks."""
    return torch.stack([x[:, :, c * bs:(c + 1) * bs].mean(2) for c in range(count)], 2) if count else \
        x[:, :, :0]


def cmp_mask(t_len, nc, bs):
    return torch.tensor([[(c + 1) * bs - 1 <= t for c in range(nc)] for t in range(t_len)], dtype=torch.bool)


def topk_sets(q, k_cmp, s, bs, scale):
    """I_t per (batch, KV head, token): fla's naive_nsa_topk rule, by loops."""
    b, hq, t_len, _ = q.shape
    hkv, nc = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    q, k_cmp = q.detach().double(), k_cmp.detach().double()
    sets = {}
    for bi in range(b):
        for h in range(hkv):
            for t in range(t_len):
                vis = [c for c in range(nc) if (c + 1) * bs - 1 <= t]
                score = {c: 0.0 for c in vis}
                for hh in range(h * g, (h + 1) * g):
                    if vis:
                        logits = torch.stack([q[bi, hh, t] @ k_cmp[bi, h, c] for c in vis]) * scale
                        for c, p in zip(vis, torch.softmax(logits, 0).tolist()):
                            score[c] += p / g
                cur = t // bs
                forced = {c for c in (0, cur, cur - 1) if 0 <= c <= cur}
                free = sorted((-score[c], c) for c in vis if c not in forced)
                sets[bi, h, t] = forced | {c for _, c in free[:max(0, s - len(forced))]}
    return sets


def sel_mask(sets, b, hkv, g, t_len, bs):
    mask = torch.zeros(b, hkv * g, t_len, t_len, dtype=torch.bool)
    for (bi, h, t), blocks in sets.items():
        for u in range(t + 1):
            if u // bs in blocks:
                mask[bi, h * g:(h + 1) * g, t, u] = True
    return mask


def nsa_reference(q, k, v, gates, bs, s, w, scale=None, k_cmp=None, v_cmp=None, sets=None):
    """q (B, Hq, T, d), k/v (B, Hkv, T, d), gates (cmp, slc, win) (B, Hq, T) in float64."""
    b, hq, t_len, d = q.shape
    hkv = k.shape[1]
    scale = scale or d ** -0.5
    nc = t_len // bs
    if k_cmp is None:
        k_cmp, v_cmp = mean_blocks(k, bs, nc), mean_blocks(v, bs, nc)
    o_cmp = ref.dense_reference(q, k_cmp, v_cmp, cmp_mask(t_len, nc, bs), scale) if nc else torch.zeros_like(q)
    sets = sets if sets is not None else topk_sets(q, k_cmp, s, bs, scale)
    o_slc = ref.dense_reference(q, k, v, sel_mask(sets, b, hkv, hq // hkv, t_len, bs), scale)
    out = gates[0][..., None] * o_cmp + gates[1][..., None] * o_slc
    if w:
        pos = torch.arange(t_len)
        win = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - w)
        out = out + gates[2][..., None] * ref.dense_reference(q, k, v, win, scale)
    return out




def layer_reference(m, x):
    q, k, v = ref.rotary_qkv(m, x)
    b, n, _ = x.shape
    gates = torch.sigmoid(x @ m.g_proj.weight.double().T).view(b, n, m.num_heads, 3).permute(3, 0, 2, 1)
    bs, nc = m.block_size, n // m.block_size
    k_cmp = v_cmp = None
    if m.compress == "mlp":  # per block: add the position embedding, flatten, the two-layer MLP
        k_cmp = torch.stack([m.k_mlp((k[:, :, c * bs:(c + 1) * bs] + m.k_pe).flatten(-2)) for c in range(nc)], 2)
        v_cmp = torch.stack([m.v_mlp((v[:, :, c * bs:(c + 1) * bs] + m.v_pe).flatten(-2)) for c in range(nc)], 2)
    o = nsa_reference(q, k, v, gates, bs, m.block_counts, m.window_size, k_cmp=k_cmp, v_cmp=v_cmp)
    return o.transpose(1, 2).reshape(b, n, -1) @ m.o_proj.weight.double().T


# ----------------------------------------------------------------------------------------- helpers


def _fla(b, n, hq, hkv, d, layout="contiguous", seed=0, gates=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h in (hq, hkv, hkv):
        if layout == "transposed":
            t = torch.randn(b, h, n, d, generator=g).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(b, n, h, 2 * d, generator=g)[..., ::2]
        else:
            t = torch.randn(b, n, h, d, generator=g)
        out.append(t.requires_grad_())
    if gates:
        out += [torch.rand(b, n, hq, generator=g).requires_grad_() for _ in range(3)]
    return out


def _h(x):
    return x.transpose(1, 2)


def _dense_causal(q, k, v):
    n = q.shape[2]
    return ref.dense_reference(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), q.shape[-1] ** -0.5)


ENGINES = ["dense", "blocksparse"]

# ----------------------------------------------------------------------------------------- against the reference


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 37), bs=st.integers(1, 8), s=st.integers(3, 6), w=st.integers(0, 9),
       heads=st.sampled_from([(2, 2), (4, 2), (16, 1), (3, 1)]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), engine=st.sampled_from(ENGINES))
def test_functional_matches_the_float64_reference(n, bs, s, w, heads, layout, engine):
    hq, hkv = heads
    q, k, v, gc, gs, gw = _fla(2, n, hq, hkv, 4, layout, seed=n * 7 + bs, gates=True)
    with nf.engine_override(engine):
        out = nsa(q, k, v, gc, gs, gw, block_counts=s, block_size=bs, window_size=w)
    expected = nsa_reference(*(_h(x) for x in (q, k, v)), [_h(g[..., None])[..., 0] for g in (gc, gs, gw)], bs, s, w)
    check_outputs_and_grads(out, _h(expected), (q, k, v, gc, gs) + ((gw,) if w else ()))


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2), dict(num_kv_heads=1, window_size=0),
                                dict(compress="mlp", num_kv_heads=2)], ids=["mha", "gqa", "mqa-nowin", "mlp"])
@pytest.mark.parametrize("engine", ENGINES)
def test_layer_matches_the_float64_reference(kw, engine):
    torch.manual_seed(0)
    m = NSAAttention(32, 4, **{"block_size": 4, "block_counts": 3, "window_size": 5, **kw})
    if m.compress == "mlp":  # non-zero position embeddings, so that they matter
        torch.nn.init.normal_(m.k_pe), torch.nn.init.normal_(m.v_pe)
    with nf.engine_override(engine):
        check_against_reference(m, torch.randn(2, 27, 32), layer_reference)


# ----------------------------------------------------------------------------------------- oracles


def test_selecting_every_block_is_dense_causal():
    q, k, v = _fla(2, 37, 6, 2, 8, "transposed", seed=1)
    ids = torch.arange(5).expand(2, 37, 2, 5)
    check_outputs_and_grads(nsa_selection(q, k, v, ids, block_size=8), _h(_dense_causal(_h(q), _h(k), _h(v))),
                            (q, k, v))


def test_hand_picked_ids_with_padding_future_out_of_range_and_repeats():
    q, k, v = _fla(1, 37, 3, 1, 8, seed=2)
    ids = torch.full((1, 37, 1, 4), -1)
    ids[0, :, 0, 0] = 4  # the last (partial) block: future for t < 32
    ids[0, 20:, 0, 1] = 1
    ids[0, 30:, 0, 2] = 1  # a repeat counts once
    ids[0, 10:, 0, 3] = 9  # out of range: dropped
    ids[0, :5, 0, 1] = 0
    out = nsa_selection(q, k, v, ids, block_size=8)
    mask = torch.zeros(37, 37, dtype=torch.bool)
    for t in range(37):
        blocks = {int(j) for j in ids[0, t, 0] if 0 <= j < 5}
        for u in range(t + 1):
            mask[t, u] = u // 8 in blocks
    check_outputs_and_grads(out, _h(ref.dense_reference(_h(q), _h(k), _h(v), mask, 8 ** -0.5)), (q, k, v))
    assert not out[0, 5:20].any()  # rows with no valid key give 0 (fla's naive code: NaN)


def test_unselected_blocks_get_no_gradient():
    q, k, v = _fla(1, 24, 2, 1, 4, seed=3)
    ids = torch.tensor([0, 2]).expand(1, 24, 1, 2)
    out = nsa_selection(q, k, v, ids, block_size=8)
    dk, dv = torch.autograd.grad(out.square().sum(), (k, v))
    assert not dk[0, 8:16].any() and not dv[0, 8:16].any() and dk[0, :8].abs().sum() > 0


def test_compression_branch():
    q, k, v = _fla(2, 29, 4, 2, 8, seed=4)
    kc, vc = (_h(x) for x in (pool(_h(k), 6), pool(_h(v), 6)))
    o, lse = nsa_compression(q, kc, vc, 6, 0.3)
    mask = cmp_mask(29, kc.shape[1], 6)
    eo, lse_ref = ref.dense_reference(_h(q), _h(kc), _h(vc), mask, 0.3, return_lse=True)
    check_outputs_and_grads(o, _h(eo), (q, k, v))
    assert lse.dtype == torch.float32 and torch.isinf(lse[:, :5]).all() and not o[:, :5].any()
    assert_close(lse[:, 5:], _h(lse_ref[..., None])[..., 0][:, 5:])


def pool(x, bs):
    return torch.stack([x[:, :, i:i + bs].mean(2) for i in range(0, x.shape[2], bs)], 2)


def test_gates_isolate_the_branches():
    q, k, v, gc, gs, gw = _fla(1, 33, 16, 1, 8, seed=5, gates=True)
    one, zero = torch.ones_like(gc), torch.zeros_like(gc)
    dense = _h(_dense_causal(_h(q), _h(k), _h(v)))
    with torch.no_grad():
        assert_close(nsa(q, k, v, zero, one, None, block_counts=5, block_size=8), dense)
        assert_close(nsa(q, k, v, zero, zero, one, block_size=8, window_size=40), dense)
        o_cmp = nsa_compression(q, pool(_h(k), 8).transpose(1, 2), pool(_h(v), 8).transpose(1, 2), 8, None)[0]
        assert_close(nsa(q, k, v, one, zero, block_size=8, block_counts=3), o_cmp)
        parts = [nsa(q, k, v, g1, g2, g3, block_counts=3, block_size=8, window_size=6)
                 for g1, g2, g3 in ((one, zero, zero), (zero, one, zero), (zero, zero, one))]
        assert_close(nsa(q, k, v, one, one, one, block_counts=3, block_size=8, window_size=6), sum(parts))
        mixed = nsa(q, k, v, gc, gs, gw, block_counts=3, block_size=8, window_size=6)
        assert_close(mixed, gc[..., None] * parts[0] + gs[..., None] * parts[1] + gw[..., None] * parts[2])
        assert_close(nsa(q, k, v, zero, zero, one, block_size=8, window_size=1), v.expand_as(q))


def test_topk_invariants_and_hand_examples():
    q, k, _ = _fla(2, 45, 6, 2, 8, seed=6)
    kc = pool(_h(k), 8).transpose(1, 2)
    idx = nsa_topk(q, kc, 4, 8, None)
    assert idx.shape == (2, 45, 2, 4) and idx.dtype == torch.int64
    expected = topk_sets(_h(q), _h(kc)[:, :, :45 // 8], 4, 8, 8 ** -0.5)
    for t in range(45):
        cur = t // 8
        row = idx[:, t]
        valid = row[row >= 0]
        assert (row >= 0).sum(-1).eq(min(4, cur + 1)).all() and valid.le(cur).all()
        for bi in range(2):
            for h in range(2):
                ids = [int(j) for j in row[bi, h] if j >= 0]
                assert len(set(ids)) == len(ids) and set(ids) == expected[bi, h, t]
                assert {0, cur, max(cur - 1, 0)} <= set(ids)
    assert set(idx[0, 36, 0].tolist()) >= {0, 3, 4} and idx[0, 16, 0].tolist() == [0, 1, 2, -1]


def test_given_indices_replace_the_selection_and_round_trip():
    q, k, v, gc, gs, gw = _fla(1, 40, 16, 1, 8, seed=7, gates=True)
    with torch.no_grad():
        out, idx = nsa(q, k, v, gc, gs, gw, block_counts=3, block_size=8, window_size=4, return_block_indices=True)
        again = nsa(q, k, v, gc, gs, gw, block_indices=idx, block_counts=3, block_size=8, window_size=4)
        no_cmp = nsa(q, k, v, None, gs, gw, block_indices=idx, block_size=8, window_size=4)
        o_cmp = nsa_compression(q, pool(_h(k), 8).transpose(1, 2), pool(_h(v), 8).transpose(1, 2), 8, None)[0]
    assert torch.equal(out, again)
    assert_close(no_cmp + gc[..., None] * o_cmp, out)
    assert torch.equal(idx, nsa_topk(q, pool(_h(k), 8).transpose(1, 2), 3, 8, None))


def test_sparsity_sanity():
    q, k, v, gc, gs, gw = _fla(1, 256, 16, 1, 16, seed=8, gates=True)
    zero = torch.zeros_like(gc)
    with torch.no_grad():
        out = nsa(q, k, v, zero, torch.ones_like(gc), zero, block_counts=3, block_size=16)
    assert (out.double() - _h(_dense_causal(_h(q), _h(k), _h(v)))).abs().max() > 1e-2


def test_varlen_equals_separate_sequences():
    lens = [13, 1, 26, 9]
    q, k, v, gc, gs, gw = _fla(1, sum(lens), 4, 2, 8, seed=9, gates=True)
    cu = torch.tensor([0, 13, 14, 40, 49])
    spans = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    kw = dict(block_counts=3, block_size=4, window_size=5)
    out, idx = nsa(q, k, v, gc, gs, gw, cu_seqlens=cu, return_block_indices=True, **kw)
    parts = [nsa(q[:, a:b], k[:, a:b], v[:, a:b], gc[:, a:b], gs[:, a:b], gw[:, a:b], return_block_indices=True, **kw)
             for a, b in spans]
    assert_close(out, torch.cat([p[0] for p in parts], 1))
    assert torch.equal(idx, torch.cat([p[1] for p in parts], 1))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)),
                    torch.autograd.grad((torch.cat([p[0] for p in parts], 1) * g).sum(), (q, k, v))):
        assert_close(a, b, 3e-5)
    with torch.no_grad():  # the pieces, with compressed blocks packed per sequence
        kc = torch.cat([pool(_h(k[:, a:b]), 4) for a, b in spans], 2).transpose(1, 2)
        vc = torch.cat([pool(_h(v[:, a:b]), 4) for a, b in spans], 2).transpose(1, 2)
        assert torch.equal(nsa_topk(q, kc, 3, 4, None, cu_seqlens=cu), idx)
        o, lse = nsa_compression(q, kc, vc, 4, None, cu_seqlens=cu)
        sep = [nsa_compression(q[:, a:b], pool(_h(k[:, a:b]), 4).transpose(1, 2),
                               pool(_h(v[:, a:b]), 4).transpose(1, 2), 4, None) for a, b in spans]
        assert_close(o, torch.cat([p[0] for p in sep], 1))
        assert torch.equal(torch.isinf(lse), torch.isinf(torch.cat([p[1] for p in sep], 1)))
        sel = nsa_selection(q, k, v, idx, 4, cu_seqlens=cu)
        assert_close(sel, torch.cat([nsa_selection(q[:, a:b], k[:, a:b], v[:, a:b], idx[:, a:b], 4)
                                     for a, b in spans], 1))


# ----------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=1, window_size=0), dict(compress="mlp", num_kv_heads=2)],
                         ids=["mha", "mqa-nowin", "mlp"])
def test_decode_equals_the_forward(kw):
    torch.manual_seed(10)
    m = NSAAttention(32, 4, **{"block_size": 4, "block_counts": 3, "window_size": 5, **kw}).double().eval()
    x = torch.randn(2, 31, 32, dtype=torch.float64)
    cache, outs, i = m.new_cache(2), [], 0
    with torch.no_grad():
        full = m(x)
        for c in (6, 1, 1, 3, 9, 1, 10):
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
    assert_close(torch.cat(outs, 1), full, 1e-12)
    assert cache.num_compressed == 31 // 4 and cache.length == 31


def test_finite_compile_and_state_dict():
    torch.manual_seed(11)
    x = torch.randn(2, 19, 32)
    m = NSAAttention(32, 4, num_kv_heads=2, block_size=4, block_counts=3, window_size=4)
    check_forward_backward_finite(m, x * 30)
    check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: NSAAttention(32, 4, block_size=4, block_counts=3, compress="mlp"), x)


def test_registry_entry_and_errors():
    entry = {e.name: e for e in nf.mechanisms()}["nsa"]
    assert (entry.family, entry.dims, entry.causal, entry.cross) == ("routed", ("1d",), True, False)
    m = entry.make(32, 2)
    assert (m.block_size, m.block_counts, m.window_size, m.compress) == (64, 16, 512, "mean")
    for kw, err, match in [(dict(block_size=0), ValueError, "block_size"), (dict(block_counts=2), ValueError,
                                                                           "block_counts"),
                           (dict(window_size=-1), ValueError, "window_size"), (dict(compress="max"), ValueError,
                                                                               "compress"),
                           (dict(block_counts=4.0), TypeError, "block_counts"),
                           (dict(num_kv_heads=3), ValueError, "num_kv_heads")]:
        with pytest.raises(err, match=match):
            NSAAttention(32, 4, **kw)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 5, 16))
    q, k, v = torch.randn(1, 10, 4, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="g_cmp.*block_indices"):
        nsa(q, k, v, block_size=4)
    with pytest.raises(TypeError, match="block_counts"):
        nsa(q, k, v, torch.rand(1, 10, 4), block_counts=torch.full((1, 10, 2), 3), block_size=4)
    with pytest.raises(ValueError, match="g_slc"):
        nsa(q, k, v, torch.rand(1, 10, 4), torch.rand(1, 10, 2), block_size=4)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        nsa(q, torch.randn(1, 10, 3, 8), torch.randn(1, 10, 3, 8), torch.rand(1, 10, 4))
    with pytest.raises(ValueError, match="block_indices"):
        nsa_selection(q, k, v, torch.zeros(1, 10, 4, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="k_cmp"):
        nsa_compression(q, k[:, :2], v[:, :2], 4, None, cu_seqlens=torch.tensor([0, 5, 10]))
    assert math.isfinite(float(nsa(q, k, v, torch.rand(1, 10, 4), block_size=4).sum()))


def test_nsa_functions_still_import_from_nsa():
    # the functions moved to nsa_branches.py and nsa_fla.py: ``from nearfar.layers.nsa import nsa`` still works
    for module in (nsa_branches, nsa_fla):
        for name in module.__all__:
            assert getattr(nsa_module, name) is getattr(module, name), name
