"""KDGQA (Khan et al., arXiv 2408.08454; yjzhang0505/key-driven-gqa ``modules/attention/kdgqa.py``): the allocation
against a plain-Python one, the layer against a float64 per-head reference (forward and backward), the oracles
(uniform allocation == GQA, G = H conversion == MHA), the causal prefix variant's causality and decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)
from oracles.kdgqa import allocate, head_kv, kdgqa_counts, kdgqa_reference

import nearfar as nf
from nearfar.layers import grouped_query, kdgqa
from nearfar.layers.grouped_query import (
    allocate_heads,
    grouped_attention,
    key_norm_allocation,
    kv_index,
    mean_pool_heads,
)

HG = [(2, 1), (2, 2), (4, 2), (6, 3), (8, 4), (8, 2), (6, 6)]


def _layout(x, kind):
    """The same values as ``x`` in another memory layout (a leaf, for gradients)."""
    if kind == "transposed":
        return x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    if kind == "sliced":
        wide = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., ::2] = x.detach()
        return wide[..., ::2].requires_grad_()
    return x.detach().clone().requires_grad_()


def _check(m, x, context=None, kpm=None):
    leaves = [x] + ([] if context is None else [context]) + list(m.parameters())
    out = m(x, context=context, key_padding_mask=kpm)
    expected = kdgqa_reference(m, x, context, kpm)
    check_outputs_and_grads(out, expected, leaves, rtol=2e-5, grad_rtol=1e-4)


# ------------------------------------------------------------------------------------------------ allocation


@settings(max_examples=60, deadline=None)
@given(hg=st.sampled_from(HG + [(12, 4), (16, 8), (9, 3)]), data=st.data())
def test_allocation_sums_to_h_and_matches_the_python_rule(hg, data):
    h, g = hg
    # small integer norms make ties (and all-equal rows) common; a scale tests the min-max invariance
    norms = data.draw(st.lists(st.integers(0, 4), min_size=g, max_size=g))
    scale = data.draw(st.sampled_from([1.0, 0.37, 1e3]))
    t = torch.tensor(norms, dtype=torch.float64) * scale
    counts = key_norm_allocation(t, h)
    assert counts.dtype == torch.long and int(counts.sum()) == h and bool((counts >= 0).all())
    assert counts.tolist() == kdgqa_counts(t.tolist(), h)
    if len(set(norms)) == 1:
        assert counts.tolist() == [h // g] * g
    weights = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=g, max_size=g))
    assert allocate_heads(torch.tensor(weights, dtype=torch.float64), h).tolist() == allocate(weights, h)
    assert kv_index(counts, h).tolist() == head_kv(counts.tolist())


def test_allocation_edge_cases_and_batching():
    assert allocate_heads(torch.zeros(4), 8).tolist() == [2, 2, 2, 2]
    assert allocate_heads(torch.tensor([float("nan"), 1.0]), 4).tolist() == [2, 2]
    assert key_norm_allocation(torch.tensor([5.0]), 3).tolist() == [3]
    assert key_norm_allocation(torch.tensor([1.0, 2.0]), 6).tolist() == [0, 6]  # G = 2: all to the larger norm
    # the fix-ups: 8 (1, 1, 1, 0) / 3 rounds to (3, 3, 3, 0): the first largest loses one
    assert allocate_heads(torch.tensor([1.0, 1.0, 1.0, 0.0]), 8).tolist() == [2, 3, 3, 0]
    # 1.5 rounds to 2 (half to even): (2, 2, 2, 2, 0, 0) loses one twice, each time at the first largest
    assert allocate_heads(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 6).tolist() == [1, 1, 2, 2, 0, 0]
    # 6 (2, 2, 1) / 5 rounds to (2, 2, 1): the first smallest gains one
    assert allocate_heads(torch.tensor([2.0, 2.0, 1.0]), 6).tolist() == [2, 2, 2]
    rows = torch.rand(50, 4) * torch.randint(0, 2, (50, 4))
    batched = key_norm_allocation(rows, 8)
    assert [r.tolist() for r in batched] == [kdgqa_counts(r.tolist(), 8) for r in rows]
    with pytest.raises(ValueError, match="must divide num_heads"):
        allocate_heads(torch.ones(3), 8)


def test_mean_pool_heads_is_the_mean_of_each_group_of_rows():
    w = torch.randn(8 * 3, 5)  # 8 heads of dim 3
    pooled = mean_pool_heads(w, 8, 2)
    for g in range(2):
        for r in range(3):
            assert torch.allclose(pooled[g * 3 + r], sum(w[(g * 4 + j) * 3 + r] for j in range(4)) / 4)
    assert torch.equal(mean_pool_heads(w, 8, 8), w)


# ------------------------------------------------------------------------------------------------ vs the reference


@settings(max_examples=14, deadline=None)
@given(hg=st.sampled_from(HG), b=st.integers(1, 3), n=st.integers(1, 19), causal=st.booleans(),
       block=st.integers(1, 7), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       bias=st.booleans(), rope=st.booleans(), seed=st.integers(0, 2**16))
def test_self_attention_matches_the_float64_reference(hg, b, n, causal, block, layout, bias, rope, seed):
    h, g = hg
    torch.manual_seed(seed)
    m = nf.KDGQA(4 * h, h, g, causal=causal, block_size=block, qkv_bias=bias, proj_bias=bias, rope=rope)
    with torch.no_grad():  # spread the KV heads' key norms so that allocations differ between heads and blocks
        m.k_proj.weight.mul_(torch.linspace(0.3, 2.0, 4 * g)[:, None])
    _check(m, _layout(torch.randn(b, n, 4 * h) * 2, layout))


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_the_reference(causal):
    torch.manual_seed(0)
    m = nf.KDGQA(32, 8, 4, causal=causal, cross=True, qkv_bias=True)
    ctx = torch.randn(2, 9, 32).requires_grad_()
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    _check(m, torch.randn(2, 7, 32).requires_grad_(), ctx)
    _check(m, torch.randn(2, 7, 32).requires_grad_(), ctx, kpm)


def test_key_padding_mask_matches_the_reference_and_ignores_padded_tokens():
    torch.manual_seed(1)
    for causal in (False, True):
        m = nf.KDGQA(32, 8, 4, causal=causal, block_size=3)
        x = torch.randn(2, 13, 32)
        kpm = torch.ones(2, 13, dtype=torch.bool)
        kpm[0, 9:] = False
        kpm[1, :4] = False
        _check(m, x.clone().requires_grad_(), kpm=kpm)
        y = x.clone()
        y[0, 9:], y[1, :4] = 100 * torch.randn(4, 32), 100 * torch.randn(4, 32)  # the padded tokens do not matter
        with torch.no_grad():
            a, c = m(x, key_padding_mask=kpm), m(y, key_padding_mask=kpm)
        assert_close(a[0, :9], c[0, :9])
        assert_close(a[1, 4:], c[1, 4:])


def test_allocation_is_not_uniform_in_general():
    """The layer is not plain GQA (so the next oracle can fail): a large KV head takes every query head."""
    torch.manual_seed(2)
    m = nf.KDGQA(32, 4, 2)
    gqa = nf.DenseAttention(32, 4, causal=False, num_kv_heads=2)
    gqa.load_state_dict(m.state_dict(), strict=False)
    with torch.no_grad():
        m.k_proj.weight[8:].mul_(3)
        gqa.k_proj.weight.copy_(m.k_proj.weight)
        x = torch.randn(2, 11, 32)
        assert (m(x) - gqa(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_allocation_is_gqa_with_contiguous_groups(causal):
    """Equal key norms (every KV head's keys the same) give H / G query heads per KV head: GQA."""
    torch.manual_seed(3)
    m = nf.KDGQA(48, 6, 3, causal=causal, block_size=4)
    gqa = nf.DenseAttention(48, 6, causal=causal, num_kv_heads=3)
    with torch.no_grad():
        w = m.k_proj.weight.view(3, 8, 48)
        w[1:] = w[0]
        gqa.load_state_dict(m.state_dict())
        x = torch.randn(2, 17, 48)
        assert_close(m(x), gqa(x))
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    assert_close(grouped_attention(q, k, v, [2, 2, 2]), nf.attend(q, k, v))


def test_conversion_with_g_equal_h_and_uniform_allocation_is_the_mha_layer():
    torch.manual_seed(4)
    mha = nf.DenseAttention(32, 4, causal=False, qkv_bias=True)
    layer = nf.KDGQA.from_mha(mha, num_kv_heads=4)
    for a, b in zip(layer.parameters(), mha.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        q, k, v = (nf.functional.split_heads(p(x), 4) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        q, k = layer.rope(q, torch.arange(9)), layer.rope(k, torch.arange(9))
        uniform = layer.o_proj(nf.functional.merge_heads(grouped_attention(q, k, v, [1, 1, 1, 1]), (9,)))
        assert_close(uniform, mha(x))
        assert_close(layer(x), kdgqa_reference(layer, x))  # its own allocation, as the reference says


def test_conversion_pools_each_contiguous_group():
    torch.manual_seed(5)
    mha = nf.DenseAttention(32, 8, causal=True, num_kv_heads=4)  # a GQA source: its 4 KV heads pooled to 2
    layer = nf.KDGQA.from_mha(mha, num_kv_heads=2, causal=True)
    assert layer.num_kv_heads == 2 and layer.causal and layer.rope is not None
    w = mha.k_proj.weight.view(4, 4, 32)
    assert torch.equal(layer.k_proj.weight.view(2, 4, 32)[1], (w[2] + w[3]) / 2)
    assert torch.equal(layer.q_proj.weight, mha.q_proj.weight) and torch.equal(layer.o_proj.weight,
                                                                               mha.o_proj.weight)
    with pytest.raises(ValueError, match="must divide the source's KV heads"):
        nf.KDGQA.from_mha(mha, num_kv_heads=8)
    with pytest.raises(ValueError, match="q_proj/k_proj/v_proj/o_proj"):
        nf.KDGQA.from_mha(torch.nn.Linear(4, 4))


# ------------------------------------------------------------------------------------------------ causal variant


@pytest.mark.parametrize("block", [1, 3, 5, 40])
def test_causal_outputs_ignore_later_tokens(block):
    torch.manual_seed(6)
    m = nf.KDGQA(32, 8, 4, causal=True, block_size=block).double()
    with torch.no_grad():
        m.k_proj.weight.mul_(torch.linspace(0.3, 2.0, 16, dtype=torch.float64)[:, None])
        x = torch.randn(2, 23, 32, dtype=torch.float64)
        out = m(x)
        for t in (1, 7, 12):
            y = x.clone()
            y[:, t:] = torch.randn_like(y[:, t:]) * 5
            assert torch.allclose(m(y)[:, :t], out[:, :t], atol=1e-12)
        # each sequence only sees itself
        assert torch.allclose(m(x[1:])[0], out[1], atol=1e-12)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("chunks", [[6, 1, 1, 9, 4, 2], [1] * 23, [23], [4, 19]])
def test_decode_equals_the_teacher_forced_forward(chunks, batch):
    torch.manual_seed(7)
    m = nf.KDGQA(32, 8, 4, causal=True, block_size=4, qkv_bias=True).double().eval()
    with torch.no_grad():
        m.k_proj.weight.mul_(torch.linspace(0.3, 2.0, 16, dtype=torch.float64)[:, None])
        x = torch.randn(batch, 23, 32, dtype=torch.float64)
        full, cache, outs, i = m(x), m.new_cache(batch), [], 0
        for c in chunks:
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
        assert cache.length == 23 and cache.k.shape[1] == 4
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10)
        assert_close(full, kdgqa_reference(m, x), rtol=1e-8)
        ctx = torch.randn(batch, 6, 32, dtype=torch.float64)
        cross = nf.KDGQA(32, 8, 4, causal=True, cross=True).double()
        cache, i = cross.new_cache(batch), 0
        outs = []
        for c in chunks:
            outs.append(cross(x[:, i:i + c], context=ctx if i == 0 else None, cache=cache))
            i += c
        assert torch.allclose(torch.cat(outs, 1), cross(x, context=ctx), atol=1e-10)


def test_tiny_lm_decodes_with_it():
    torch.manual_seed(8)
    lm = nf.TinyLM(40, dim=32, depth=2, num_heads=4, mechanism="kdgqa", block_size=3).eval()
    tokens = torch.randint(0, 40, (2, 15))
    with torch.no_grad():
        caches = lm.new_caches(2)
        steps = torch.cat([lm(tokens[:, :5], caches)] + [lm(tokens[:, t:t + 1], caches) for t in range(5, 15)], 1)
        assert (steps - lm(tokens)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ module checks


def test_finite_compile_and_state_dict():
    torch.manual_seed(9)
    x = torch.randn(2, 13, 32)
    m = nf.KDGQA(32, 8, 4, proj_bias=True)
    check_forward_backward_finite(m, x * 50)
    check_forward_backward_finite(nf.KDGQA(32, 8, 4, causal=True, block_size=4), x * 50)
    check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: nf.KDGQA(32, 8, 4, causal=True, block_size=4, qkv_bias=True), x)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"num_heads \(8\) must be a multiple of num_kv_heads \(3\)"):
        nf.KDGQA(32, 8, 3)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        nf.KDGQA(32, 8, causal=True, block_size=0)
    with pytest.raises(TypeError, match="causal"):
        nf.KDGQA(32, 8, causal=1)
    with pytest.raises(ValueError, match="rope is for self-attention"):
        nf.KDGQA(32, 8, cross=True, rope=True)
    with pytest.raises(ValueError, match="dim"):
        nf.KDGQA(30, 8)
    assert nf.KDGQA(24, 3).num_kv_heads == 3 and nf.KDGQA(32, 8).num_kv_heads == 4
    m, x = nf.KDGQA(32, 8), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="not causal"):
        m.new_cache(2)
    with pytest.raises(ValueError, match="not causal"):
        m(x, cache=nf.KDGQA(32, 8, causal=True).new_cache(2))
    with pytest.raises(ValueError, match="context is for cross-attention"):
        m(x, context=x)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\)"):
        m(x[..., :16])
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        m(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    lm = nf.KDGQA(32, 8, causal=True)
    with pytest.raises(ValueError, match="key_padding_mask is for whole sequences"):
        lm(x, cache=lm.new_cache(2), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    cross = nf.KDGQA(32, 8, cross=True)
    with pytest.raises(ValueError, match=r"context must be \(B, N, 32\)"):
        cross(x)
    with pytest.raises(ValueError, match="context must have x's batch 2"):
        cross(x, context=torch.randn(3, 4, 32))


def test_registry_entry():
    entry = {e.name: e for e in nf.mechanisms()}["kdgqa"]
    assert entry.family == "routed" and entry.cls is nf.KDGQA and set(entry.patterns) == {"NS", "CS", "NC", "CC"}
    assert entry.build(32, 4, "CS").causal and not entry.make(32, 4).causal


def test_shared_names_still_import_from_kdgqa():
    # the shared GQA pieces moved to grouped_query.py: ``from nearfar.layers.kdgqa import allocate_heads`` still works
    moved = [n for n in kdgqa.__all__ if n not in ("KDGQA", "prefix_allocated_attention")]
    assert moved and all(getattr(kdgqa, n) is getattr(grouped_query, n) for n in moved)
