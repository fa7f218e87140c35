"""MoA (thu-nics/MoA ``MoA/attention/cache_utils.py``): the span rule, the per-head pattern and its oracles, engines,
decoding, the influence formula and the profiling search."""

from __future__ import annotations

import itertools
import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from module_checks import check_outputs_and_grads

import nearfar as nf
import nearfar.layers.moa_profile as profiler
from nearfar.layers.moa import MoAAttention, moa_pattern
from nearfar.layers.moa import moa_span as span
from nearfar.layers.moa_profile import moa_apply, moa_influence, moa_layer_kwargs, moa_profile
from nearfar.layers.registry import mechanisms
from nearfar.layers.streaming_llm import StreamingLLMAttention
from nearfar.models.tiny_lm import TinyLM


def reference_span(alpha, beta, n, sink=64, minimum=128, split=64):
    s = min(int(alpha + beta * n), n)
    s = max(s, minimum)
    return -(-s // split) * split


def span_mask(spans, n, sink=64):
    """(H, N, N) from the rule on index grids: sinks of min(S, sink) tokens + the last S - min(S, sink) tokens."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return torch.stack([(j <= i) & ((j < min(s, sink)) | (i - j < s - min(s, sink))) for s in spans])


@pytest.mark.parametrize("alpha,beta,n,expected", [
    (0, 0.5, 1000, 512), (0, 0.3, 1000, 320), (0, 0, 1000, 128), (100, 0, 1000, 128), (130, 0, 1000, 192),
    (128.9, 0, 1000, 128), (-1024, 0.125, 4096, 128), (1024, 0.875, 4096, 4096), (0, 1, 700, 704),
    (2048, 0.25, 8192, 4096)])
def test_span_rounding_examples(alpha, beta, n, expected):
    assert span(alpha, beta, n) == expected == reference_span(alpha, beta, n)


@given(n=st.integers(1, 40), total=st.integers(1, 60), sink=st.integers(1, 4), extra=st.integers(1, 6),
       split=st.integers(1, 8), ab=st.lists(st.tuples(st.integers(-10, 50), st.sampled_from([0, 0.25, 0.5, 1.0])),
                                            min_size=2, max_size=2))
def test_pattern_is_the_official_span_rule(n, total, sink, extra, split, ab):
    kw = dict(sink_size=sink, minimum_cache_size=sink + extra, split_size=split)
    p = moa_pattern([a for a, _ in ab], [b for _, b in ab], total, 2, 1, **kw)
    spans = [reference_span(a, b, total, sink, sink + extra, split) for a, b in ab]
    assert torch.equal(p.mask(n, n), span_mask(spans, n, sink))


def test_oracle_alpha_n_beta_0_is_dense_causal():
    n = 300
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    m = MoAAttention(32, 4, alphas=[n] * 4, betas=[0] * 4, total_len=n)
    assert all(torch.equal(h, causal) for h in m.pattern.mask(n, n))
    assert all(torch.equal(h, causal) for h in moa_pattern([0] * 2, [1.0] * 2, n, 2).mask(n, n))


@pytest.mark.parametrize("w", [64, 128, 192])
def test_oracle_beta_0_is_streaming_llm_with_64_sinks(w):
    n = 400
    expected = StreamingLLMAttention(32, 2, window=w, sinks=64).pattern.mask(n, n)
    got = moa_pattern([64 + w] * 2, [0, 0], 4096, 2).mask(n, n)
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected)
    assert not torch.equal(expected, torch.tril(torch.ones(n, n, dtype=torch.bool)))


def test_cache_sizes_follow_the_rounding_rule():
    m = MoAAttention(32, 4, alphas=[0, 130, -1024, 0], betas=[0.5, 0, 0.125, 1], total_len=4096)
    assert m.spans == [2048, 192, 128, 4096]
    assert m.spans == [reference_span(a, b, 4096) for a, b in zip(m.alphas, m.betas)]


@pytest.mark.parametrize("n", [700])
def test_engine_matches_the_float64_reference(n):
    torch.manual_seed(0)
    alphas, betas = [128, 200, 0, 0], [0, 0, 0.4, 1]
    p = moa_pattern(alphas, betas, n, 4, 2)
    spans = [reference_span(a, b, n) for a, b in zip(alphas, betas)]
    assert spans == [128, 256, 320, 704]
    q = torch.randn(1, 4, n, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(2))
    out = nf.attend(q, k, v, p)
    exp = ref.dense_reference(q, k, v, span_mask(spans, n)[None], 0.25)
    check_outputs_and_grads(out, exp, (q, k, v))


@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_equals_teacher_forcing_with_a_bounded_cache(chunk):
    torch.manual_seed(1)
    n = 260
    lm = TinyLM(40, dim=32, depth=2, num_heads=4, num_kv_heads=2, mechanism="moa", total_len=n,
                alphas=[128, 192, 0, 100], betas=[0, 0, 0.5, 0]).eval()
    assert lm.blocks[0].attn.spans == [128, 192, 192, 128]
    tokens = torch.randint(0, 40, (1, n))
    with torch.no_grad():
        full = lm(tokens)
        caches = lm.new_caches(1)
        steps = [lm(tokens[:, :5], caches)]
        for i in range(5, n, chunk):
            steps.append(lm(tokens[:, i:i + chunk], caches))
            assert all(c.size < 192 for c in caches)  # 64 sinks + the last 127 keys
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    assert all(c.size == 191 for c in caches)


def test_influence_is_the_first_order_effect_of_masking_an_entry():
    torch.manual_seed(2)
    n = 7
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    a = torch.randn(n, n, dtype=torch.float64).masked_fill(~causal, float("-inf")).softmax(-1)
    v, w = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)

    def loss(mat):
        return (torch.tanh(mat @ v) * w).sum()

    a_ = a.clone().requires_grad_()
    g = torch.autograd.grad(loss(a_), a_)[0]
    e = moa_influence(a, g)
    t = 1e-6
    for i in range(1, n):
        for j in range(i + 1):
            masked = a.clone()
            masked[i, j] = 0
            masked[i] /= masked[i].sum()  # the row renormalised without entry j
            d = masked - a
            fd = (loss(a + t * d) - loss(a - t * d)) / (2 * t)
            assert abs(float(fd - e[i, j])) < 1e-7, (i, j)
    assert torch.equal(e[0], -(a * g)[0]) and not e[~causal].any()
    assert abs(float(e[3, 0]) - float(loss(torch.where(torch.arange(n)[:, None] == 3, _renorm(a, 3, 0), a))
                                      - loss(a))) < 0.05  # the whole removal is close to first order


def _renorm(a, i, j):
    m = a.clone()
    m[i, j] = 0
    return m / m.sum(-1, keepdim=True)


def test_profile_reimplementation_is_the_dense_model():
    torch.manual_seed(3)
    lm = TinyLM(50, dim=32, depth=2, num_heads=4, num_kv_heads=2, mechanism="moa", total_len=200,
                alphas=[200] * 4, betas=[0] * 4)
    tokens = torch.randint(0, 50, (2, 41))
    effects, loss = profiler.moa_profile_influence(lm, tokens)
    assert abs(float(loss - lm.loss(tokens).detach())) < 1e-5
    assert len(effects) == 2 and effects[0].shape == (4, 40, 40)
    assert all(torch.isfinite(e).all() and not torch.triu(e, 1).any() for e in effects)
    assert "forward" not in vars(lm.blocks[0].attn)  # the layers are restored


def test_profile_respects_the_budget_and_is_the_best_feasible_choice():
    torch.manual_seed(4)
    n = 320
    lm = TinyLM(50, dim=48, depth=2, num_heads=3, mechanism="moa", total_len=n, alphas=[0] * 3, betas=[1.0] * 3)
    tokens = torch.randint(0, 50, (2, n + 1))
    cands = [(0, 0), (192, 0), (0, 1.0)]
    plans = moa_profile(lm, tokens, cands, density_budget=0.8)
    effects, _ = profiler.moa_profile_influence(lm, tokens)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    masks = span_mask([reference_span(a, b, n) for a, b in cands], n)
    dens = [float(m.sum() / causal.sum()) for m in masks]
    for (alphas, betas), eff in zip(plans, effects):
        picked = [cands.index((a, b)) for a, b in zip(alphas, betas)]
        assert sum(dens[c] for c in picked) / 3 <= 0.8
        cost = [[float(eff[h][causal & ~masks[c]].sum()) for c in range(3)] for h in range(3)]
        best = min(sum(cost[h][c] for h, c in enumerate(combo)) for combo in itertools.product(range(3), repeat=3)
                   if sum(dens[c] for c in combo) / 3 <= 0.8)
        assert math.isclose(sum(cost[h][c] for h, c in enumerate(picked)), best, rel_tol=1e-6, abs_tol=1e-9)


def test_profile_keeps_the_high_influence_head_dense(monkeypatch):
    n = 256
    eff = torch.zeros(2, n, n)
    eff[0, 200:, 64:100] = 1.0  # head 0: masking the middle of the past costs; head 1: free
    monkeypatch.setattr(profiler, "moa_profile_influence", lambda model, tokens: ([eff, eff.flip(0)], None))
    sparse = float(span_mask([128], n).sum()) / (n * (n + 1) / 2)
    plans = moa_profile(None, None, [(0, 0), (0, 1.0)], density_budget=(sparse + 1) / 2)
    assert plans == [([0.0, 0.0], [1.0, 0.0]), ([0.0, 0.0], [0.0, 1.0])]


def test_greedy_choice_on_a_large_grid():
    loss = torch.zeros(9, 4, dtype=torch.float64)
    loss[:3, :3] = torch.tensor([3.0, 2.0, 1.0])  # heads 0-2 only lose nothing when dense
    density = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    pick = profiler._choose(loss, density, 0.5)  # 4 ** 9 combinations: the greedy path
    assert pick == [3, 3, 3] + [0] * 6


def test_apply_and_layer_kwargs_build_the_same_model():
    torch.manual_seed(5)
    dense = TinyLM(50, dim=32, depth=2, num_heads=2, mechanism="streaming_llm", window=1000)
    tokens = torch.randint(0, 50, (1, 300))
    plans = [([128, 0], [0, 1.0]), ([0, 0], [0.5, 0.25])]
    built = TinyLM(50, dim=32, depth=2, num_heads=2, mechanism="moa", layer_kwargs=moa_layer_kwargs(plans, 300))
    built.load_state_dict(dense.state_dict())
    with torch.no_grad():
        before = dense(tokens)
        applied = moa_apply(dense, plans, 300)(tokens)
        assert torch.equal(applied, built(tokens)) and not torch.allclose(applied, before)
    assert dense.blocks[1].attn.spans == [192, 128]


def test_registry_and_errors():
    entry = {m.name: m for m in mechanisms()}["moa"]
    assert entry.causal and not entry.cross and entry.dims == ("1d",) and entry.family == "local"
    m = entry.make(64, 4)
    assert m.spans == [2048] * 4 and m(torch.randn(1, 50, 64)).shape == (1, 50, 64)
    with pytest.raises(ValueError, match="beta"):
        span(0, -0.1, 100)
    with pytest.raises(ValueError, match="alphas and betas"):
        MoAAttention(32, 4, alphas=[0, 0])
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoAAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="minimum_cache_size"):
        MoAAttention(32, 4, sink_size=64, minimum_cache_size=64)
    with pytest.raises(ValueError, match="density_budget"):
        moa_profile(None, None, [(0, 0)], density_budget=1.5)
    lm = TinyLM(50, dim=32, depth=1, num_heads=2, mechanism="moa")
    with pytest.raises(ValueError, match="density_budget"):
        moa_profile(lm, torch.randint(0, 50, (1, 200)), [(0, 0)], density_budget=0.1)
    with pytest.raises(ValueError, match="tokens"):
        moa_profile(lm, torch.randn(1, 20), [(0, 0)])
    bad = TinyLM(50, dim=32, depth=1, num_heads=2, mechanism="moa")
    bad.blocks[0].attn = torch.nn.Linear(32, 32)
    with pytest.raises(TypeError, match="PatternAttention"):
        moa_profile(bad, torch.randint(0, 50, (1, 20)), [(0, 0)])
