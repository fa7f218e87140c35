"""DGQA (Khan et al., arXiv 2408.08454; yjzhang0505/key-driven-gqa ``modules/attention/dgqa.py``): the cache and
allocation state machine against a plain-Python one over training and eval steps, forward and backward against a
float64 per-head reference, the uniform-allocation oracle, and a pure eval."""

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
from oracles.kdgqa import DGQAState, dgqa_counts

import nearfar as nf
from nearfar.layers.dgqa import dgqa_weights
from nearfar.layers.grouped_query import allocate_heads


def _spread(m):
    with torch.no_grad():  # KV heads of different key norms
        m.k_proj.weight.mul_(torch.linspace(0.3, 2.0, m.k_proj.weight.shape[0])[:, None])
    return m


@settings(max_examples=10, deadline=None)
@given(hg=st.sampled_from([(4, 2), (6, 3), (8, 4), (8, 2), (4, 4)]), kind=st.sampled_from(["diff", "ema"]),
       window=st.integers(1, 3), b=st.integers(1, 3), n=st.integers(1, 13), seed=st.integers(0, 2**16),
       modes=st.lists(st.booleans(), min_size=1, max_size=6))
def test_steps_match_the_official_state_machine_and_the_reference(hg, kind, window, b, n, seed, modes):
    """A run of training (True) and eval (False) forwards: outputs, input and parameter gradients against the
    float64 reference, and the cache, kept allocation and step count after each."""
    h, g = hg
    torch.manual_seed(seed)
    m = _spread(nf.DGQA(4 * h, h, g, kind=kind, window=window, qkv_bias=seed % 2 == 0))
    state = DGQAState(h, g, kind, window)
    for training in modes:
        x = (torch.randn(b, n, 4 * h) * 2).requires_grad_()
        out = m.train(training)(x)
        expected, counts = state(m, x, training)
        check_outputs_and_grads(out, expected, [x, *m.parameters()], rtol=2e-5, grad_rtol=1e-4)
        assert m.allocation.tolist() == state.counts and int(m.steps) == state.steps
        assert torch.allclose(m.cache.double(), torch.tensor(state.cache, dtype=torch.float64), rtol=1e-5)
        assert sum(counts) == h


def test_the_allocation_changes_with_the_cache_and_sums_to_h():
    torch.manual_seed(1)
    m = _spread(nf.DGQA(32, 8, 4, window=1))
    x = torch.randn(2, 9, 32)
    seen = set()
    for _ in range(4):
        m(x)  # window 1: the cache accumulates every step's norms, so |cache - n| moves
        assert int(m.allocation.sum()) == 8 and bool((m.allocation >= 0).all())
        seen.add(tuple(m.allocation.tolist()))
    assert len(seen) > 1
    for w in (torch.rand(4) * 5, torch.zeros(4)):
        assert int(allocate_heads(dgqa_weights(w, torch.rand(4), "ema"), 8).sum()) == 8
    assert dgqa_counts([1.0, 1.0], [1.0, 1.0], "diff", 4) == [2, 2]  # weights 0: uniform (the official 0/0)


def test_eval_changes_no_state_and_depends_only_on_the_input():
    torch.manual_seed(2)
    m = _spread(nf.DGQA(32, 8, 4, kind="ema", window=2))
    for _ in range(3):
        m(torch.randn(2, 7, 32))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        a = m(x)
        m(torch.randn(3, 5, 32))
        assert torch.equal(m(x), a)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["diff", "ema"])
def test_uniform_allocation_is_gqa_with_contiguous_groups(kind):
    """Equal key norms (every KV head's keys the same) and a cache of equal entries give equal weights: GQA."""
    torch.manual_seed(3)
    m = nf.DGQA(48, 6, 3, kind=kind).eval()
    gqa = nf.DenseAttention(48, 6, causal=False, num_kv_heads=3)
    with torch.no_grad():
        w = m.k_proj.weight.view(3, 8, 48)
        w[1:] = w[0]
        m.cache.fill_(0.5)
        gqa.load_state_dict(m.state_dict(), strict=False)
        x = torch.randn(2, 11, 48)
        assert_close(m(x), gqa(x))
        m.k_proj.weight.view(3, 8, 48)[2].mul_(3)  # and it is not GQA otherwise
        gqa.k_proj.weight.copy_(m.k_proj.weight)
        assert (m(x) - gqa(x)).abs().max() > 1e-3


def test_padding_counts_only_real_keys():
    torch.manual_seed(4)
    m = _spread(nf.DGQA(32, 8, 4)).eval()
    m.cache.fill_(1.0)
    x = torch.randn(2, 10, 32)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 6:] = False
    y = x.clone()
    y[1, 6:] = 50 * torch.randn(4, 32)
    with torch.no_grad():  # the padded tokens count nowhere: the real rows are the same
        a, c = m(x, key_padding_mask=kpm), m(y, key_padding_mask=kpm)
        assert_close(a[0], c[0])
        assert_close(a[1, :6], c[1, :6])
    state = DGQAState(8, 4, "diff", 1)
    state.cache = [1.0] * 4
    out = m(x.requires_grad_(), key_padding_mask=kpm)
    check_outputs_and_grads(out, state(m, x, False, kpm)[0], [x, *m.parameters()], rtol=2e-5, grad_rtol=1e-4)


def test_conversion_compile_state_dict_and_errors():
    torch.manual_seed(5)
    x = torch.randn(2, 9, 32)
    mha = nf.DenseAttention(32, 8, causal=False)
    m = nf.DGQA.from_mha(mha, num_kv_heads=2, kind="ema")
    assert m.kind == "ema" and torch.allclose(m.v_proj.weight.view(2, 4, 32)[0],
                                              mha.v_proj.weight.view(2, 4, 4, 32)[0].mean(0))
    check_forward_backward_finite(m, x * 50)
    check_compile_matches_eager(_spread(nf.DGQA(32, 8, 4)), x)
    check_state_dict_round_trip(lambda: nf.DGQA(32, 8, 4), x)
    assert set(nf.DGQA(32, 8).state_dict()) >= {"cache", "allocation", "steps"}
    with pytest.raises(ValueError, match="kind must be one of 'diff', 'ema'"):
        nf.DGQA(32, 8, kind="mean")
    with pytest.raises(ValueError, match="window must be a positive int"):
        nf.DGQA(32, 8, window=0)
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        nf.DGQA(32, 8, 3)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 32\)"):
        nf.DGQA(32, 8)(torch.randn(2, 32))
    entry = {e.name: e for e in nf.mechanisms()}["dgqa"]
    assert entry.family == "routed" and set(entry.patterns) == {"NS"} and entry.cls is nf.DGQA
