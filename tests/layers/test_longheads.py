"""LongHeads (Lu et al., arXiv 2402.10685; LuLuLuyi/LongHeads ``modeling_longheads/modeling_llama.py``): the layer
against a float64 per-(sequence, head, query) loop written from the official decoding branch (forward and
backward), the chunk summaries against their definition, the choice of chunks (chunk 0, the last complete chunk,
``n_c - 1`` whole chunks, the query's own chunk), the oracles (short inputs and a budget that covers the sequence
are plain causal attention with RoPE), decoding against the teacher-forced forward, compile, state_dict, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)
from oracles.longheads import longheads_reference, project, summary

import nearfar as nf
from nearfar import DenseAttention, LongHeadsAttention

HG = [(2, 1), (2, 2), (4, 2), (3, 3), (4, 1)]


def _layout(x, kind):
    """The same values as ``x`` in another memory layout (a leaf, for gradients)."""
    if kind == "transposed":
        return x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    if kind == "sliced":
        wide = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2])
        wide[..., ::2] = x.detach()
        return wide[..., ::2].requires_grad_()
    return x.detach().clone().requires_grad_()


def _dense_twin(m):
    """The base model's layer: causal attention with RoPE and the same weights."""
    dense = DenseAttention(m.dim, m.num_heads, num_kv_heads=m.num_kv_heads, qkv_bias=m.q_proj.bias is not None)
    dense.load_state_dict(m.state_dict())
    return dense.to(m.q_proj.weight.dtype)


# ------------------------------------------------------------------------------------------------ the reference


@settings(max_examples=14, deadline=None)
@given(hg=st.sampled_from(HG), b=st.integers(1, 3), n=st.integers(1, 29), w=st.integers(1, 5),
       nc=st.integers(3, 5), bsl=st.integers(0, 20), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_the_float64_reference(hg, b, n, w, nc, bsl, layout, bias, seed):
    h, g = hg
    torch.manual_seed(seed)
    m = LongHeadsAttention(4 * h, h, chunk_size=w, num_chunks=nc, begin_selective_length=bsl, num_kv_heads=g,
                           qkv_bias=bias)
    x = _layout(torch.randn(b, n, 4 * h), layout)
    m64 = LongHeadsAttention(4 * h, h, chunk_size=w, num_chunks=nc, begin_selective_length=bsl, num_kv_heads=g,
                             qkv_bias=bias).double()
    m64.load_state_dict(m.state_dict())
    _, choices, gap = longheads_reference(m64, x.detach().double(), return_choices=True)
    assume(gap > 1e-4)  # a choice this close may flip between float32 and float64
    out = m(x)
    expected = longheads_reference(m, x)
    check_outputs_and_grads(out, expected, [x] + list(m.parameters()), rtol=2e-5, grad_rtol=1e-4)
    chosen = m.selected_chunks(x)
    for (bi, hi, i), chunks in choices.items():
        row = [c for c in chosen[bi, hi, i].tolist() if c >= 0]
        assert row == (chunks or []), (bi, hi, i)


def test_a_long_case_with_gqa_reads_other_chunks_per_head():
    """w=4, n_c=4, begin_selective_length=16 over 52 tokens: queries from chunk 4 on choose 1 of 2..10 chunks."""
    torch.manual_seed(3)
    m = LongHeadsAttention(16, 4, chunk_size=4, num_chunks=4, begin_selective_length=16, num_kv_heads=2)
    x = torch.randn(2, 52, 16, requires_grad=True)
    expected, choices, gap = longheads_reference(m, x, return_choices=True)
    assert gap > 1e-4
    check_outputs_and_grads(m(x), expected, [x] + list(m.parameters()), rtol=2e-5, grad_rtol=1e-4)
    late = [tuple(choices[0, hi, 51]) for hi in range(4)]
    assert len(set(late)) > 1, late  # heads choose on their own
    assert not torch.allclose(m(x), _dense_twin(m)(x), atol=1e-3)  # the choice changes the function


def test_chunk_summaries_follow_their_definition():
    torch.manual_seed(4)
    m = LongHeadsAttention(16, 4, chunk_size=5, num_chunks=3, num_kv_heads=2).double()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    q, k, v = project(m, x)
    r = m.chunk_summaries(q, k, v)
    assert r.shape == (2, 4, 3, 4) and not r.requires_grad
    for bi in range(2):
        for hi in range(4):
            for c in range(3):
                sl = slice(5 * c, 5 * c + 5)
                expected = summary(q[bi, hi, sl], k[bi, hi // 2, sl], v[bi, hi // 2, sl])
                assert_close(r[bi, hi, c], expected, 1e-6)  # the layer's RoPE angles are float32


# ------------------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize("w,nc,bsl,g", [(4, 4, 16, 2), (3, 5, 0, 1), (2, 3, 7, 4), (5, 6, 20, 2)])
def test_the_choice_holds_the_first_and_last_complete_chunk_and_n_c_minus_1_chunks(w, nc, bsl, g):
    torch.manual_seed(5)
    m = LongHeadsAttention(16, 4, chunk_size=w, num_chunks=nc, begin_selective_length=bsl, num_kv_heads=g)
    n = 61
    chosen = m.selected_chunks(torch.randn(2, n, 16))
    assert chosen.shape == (2, 4, n, nc - 1)
    for i in range(n):
        own = i // w
        rows = chosen[:, :, i]
        if i < bsl:
            assert (rows == -1).all()
            continue
        if own <= nc - 1:  # fewer whole chunks than the budget: all of them
            assert (rows == torch.tensor(list(range(own)) + [-1] * (nc - 1 - own))).all()
            continue
        assert (rows[..., 0] == 0).all() and (rows[..., -1] == own - 1).all()
        assert (rows[..., 1:] > rows[..., :-1]).all() and (rows < own).all()  # n_c - 1 distinct, before its chunk


# ------------------------------------------------------------------------------------------------ oracles


@pytest.mark.parametrize("n,bsl", [(16, 16), (9, 16), (16, 100)])
def test_short_inputs_are_the_base_causal_attention(n, bsl):
    torch.manual_seed(6)
    m = LongHeadsAttention(16, 4, chunk_size=4, num_chunks=4, begin_selective_length=bsl, num_kv_heads=2,
                           qkv_bias=True)
    x = torch.randn(2, n, 16, requires_grad=True)
    out, base = m(x), _dense_twin(m)(x)
    assert_close(out, base, 1e-6)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * g).sum(), x)
    (gb,) = torch.autograd.grad((base * g).sum(), x)
    assert_close(gx, gb, 1e-5, "x.grad")


@pytest.mark.parametrize("n,w,nc", [(16, 4, 4), (13, 4, 4), (11, 2, 6), (20, 5, 4)])
def test_a_budget_that_covers_the_sequence_is_the_base_attention(n, w, nc):
    """``w * n_c >= N``: every query reads every earlier chunk, at its own positions shifted: base attention."""
    torch.manual_seed(7)
    m = LongHeadsAttention(16, 4, chunk_size=w, num_chunks=nc, begin_selective_length=0, num_kv_heads=2)
    x = torch.randn(2, n, 16)
    assert_close(m(x), _dense_twin(m)(x), 1e-5)
    n_read = (m.selected_chunks(x) >= 0).sum(-1)
    assert (n_read == (torch.arange(n) // w)).all()


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("chunks", [[6, 1, 1, 9, 4, 2, 14], [1] * 37, [37], [17, 20], [16, 1, 20]])
def test_decode_equals_the_teacher_forced_forward(chunks, batch):
    torch.manual_seed(8)
    m = LongHeadsAttention(16, 4, chunk_size=3, num_chunks=4, begin_selective_length=10, num_kv_heads=2,
                           qkv_bias=True).double()
    x = torch.randn(batch, 37, 16, dtype=torch.float64)
    with torch.no_grad():
        full, cache, outs, i = m(x), m.new_cache(batch), [], 0
        for c in chunks:
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
            assert cache.summaries.shape[2] == i // 3 if i >= 3 else cache.summaries is None
            assert cache.pending_q.shape[2] == i % 3 and cache.k.shape[2] == i
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10)
    assert cache.nbytes() > 0


def test_decode_in_float32_and_with_a_tiny_lm():
    torch.manual_seed(9)
    m = LongHeadsAttention(16, 2, chunk_size=4, num_chunks=4, begin_selective_length=16).eval()
    x = torch.randn(2, 45, 16)
    with torch.no_grad():
        cache = m.new_cache(2)
        steps = torch.cat([m(x[:, :20], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(20, 45)], 1)
        assert_close(steps, m(x), 1e-5)
    lm = nf.TinyLM(40, dim=32, depth=2, num_heads=4, mechanism="longheads", chunk_size=3, num_chunks=3,
                   begin_selective_length=5).eval()
    tokens = torch.randint(0, 40, (2, 17))
    with torch.no_grad():
        caches = lm.new_caches(2)
        steps = torch.cat([lm(tokens[:, :6], caches)] + [lm(tokens[:, t:t + 1], caches) for t in range(6, 17)], 1)
        assert (steps - lm(tokens)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ module checks


def test_finite_compile_and_state_dict():
    torch.manual_seed(10)
    x = torch.randn(2, 27, 16)
    m = LongHeadsAttention(16, 4, chunk_size=4, num_chunks=4, begin_selective_length=8, num_kv_heads=2)
    check_forward_backward_finite(m, x * 50)
    check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: LongHeadsAttention(16, 4, chunk_size=4, num_chunks=4,
                                                           begin_selective_length=8, qkv_bias=True), x)
    assert set(m.state_dict()) == {f"{p}_proj.weight" for p in "qkvo"}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"num_chunks must be >= 3"):
        LongHeadsAttention(16, 4, num_chunks=2)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        LongHeadsAttention(16, 4, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive int"):
        LongHeadsAttention(16, 4, chunk_size=2.0)
    with pytest.raises(ValueError, match="begin_selective_length must be a non-negative int"):
        LongHeadsAttention(16, 4, begin_selective_length=-1)
    with pytest.raises(TypeError, match="qkv_bias"):
        LongHeadsAttention(16, 4, qkv_bias=1)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        LongHeadsAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="even head dim"):
        LongHeadsAttention(12, 4)
    m, x = LongHeadsAttention(16, 4, chunk_size=2, num_chunks=3, begin_selective_length=2), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\)"):
        m(x[..., :8])
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\) with N >= 1"):
        m(x[:, :0])
    with pytest.raises(ValueError, match="key_padding_mask is not supported"):
        m(x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="cache must come from new_cache"):
        m(x, cache=nf.DenseAttention(16, 4).new_cache(2))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\)"):
        m.selected_chunks(x[0])


def test_registry_entry():
    entry = {e.name: e for e in nf.mechanisms()}["longheads"]
    assert entry.family == "routed" and entry.cls is LongHeadsAttention and set(entry.patterns) == {"CS"}
    m = entry.make(32, 2)
    assert (m.chunk_size, m.num_chunks, m.begin_selective_length) == (256, 16, 4096)
    assert math.isclose(m.scale, 1 / 4)
