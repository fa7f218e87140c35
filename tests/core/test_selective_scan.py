"""The chunked selective scan (S6) against a float64 loop over tokens (the recurrence of Gu & Dao, "Mamba",
arXiv 2312.00752, as ``selective_scan_ref`` in state-spaces/mamba and VMamba), forward and backward, and its
properties: the closed form, causality, the near-zero-decay limit, chunk-size independence, extreme step sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import assert_close, check_outputs_and_grads

from nearfar.functional import selective_scan


def scan_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """float64, one token at a time: ``h = exp(delta A) h + delta B u``, ``y = C . h + D u``; ``B, C`` of group
    ``g`` shared by channels ``g * channels/G ...``."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    y = u.new_zeros(batch, channels, length)
    for d in range(channels):
        g = d // per_group
        h = u.new_zeros(batch, A.shape[1])
        for t in range(length):
            h = torch.exp(delta[:, d, t, None] * A[d]) * h + delta[:, d, t, None] * B[:, g, :, t] * u[:, d, t, None]
            y[:, d, t] = (C[:, g, :, t] * h).sum(-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    return y


def closed_form(u, delta, A, B, C):
    """The materialised ``L x L`` kernel: ``y_t = sum_{s<=t} sum_n C_t exp(A (S_t - S_s)) B_s delta_s u_s``."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    S = delta.cumsum(-1)  # (b, ch, L)
    per_group = u.shape[1] // B.shape[1]
    Bx, Cx = B.repeat_interleave(per_group, 1), C.repeat_interleave(per_group, 1)  # (b, ch, N, L)
    diff = S[..., :, None] - S[..., None, :]  # (b, ch, t, s)
    causal = torch.ones(u.shape[-1], u.shape[-1], dtype=torch.bool).tril()
    decay = torch.exp(diff[..., None] * A[None, :, None, None, :]) * causal[..., None]  # (b, ch, t, s, N)
    kernel = torch.einsum("bcnt,bctsn,bcns->bcts", Cx, decay, Bx)
    return torch.einsum("bcts,bcs->bct", kernel, delta * u)


def _inputs(batch, channels, groups, n, length, seed, dtype=torch.float32, shift=0.0, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)
    return dict(u=r(batch, channels, length), delta=r(batch, channels, length) + shift,
                A=-torch.rand(channels, n, generator=g, dtype=dtype) * a_scale - 0.1,
                B=r(batch, groups, n, length), C=r(batch, groups, n, length), D=r(channels), delta_bias=r(channels))


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 3), n=st.integers(1, 5),
       length=st.integers(1, 40), chunk=st.integers(1, 70), softplus=st.booleans(), seed=st.integers(0, 99))
def test_matches_sequential_reference_forward_and_backward(batch, groups, per_group, n, length, chunk, softplus,
                                                           seed):
    kw = _inputs(batch, groups * per_group, groups, n, length, seed)
    leaves = [t.requires_grad_() for t in kw.values()]
    out = selective_scan(**kw, delta_softplus=softplus, chunk_size=chunk)
    check_outputs_and_grads(out, scan_reference(**kw, delta_softplus=softplus), leaves, rtol=2e-5, grad_rtol=5e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_float64_equals_recurrence_and_closed_form(chunk):
    kw = _inputs(2, 4, 2, 3, 23, 1, dtype=torch.float64)
    kw["delta"] = F.softplus(kw["delta"])
    core = {k: kw[k] for k in ("u", "delta", "A", "B", "C")}
    seq = scan_reference(**core)
    assert_close(selective_scan(**core, chunk_size=chunk), seq, 1e-10)
    assert_close(closed_form(**core), seq, 1e-10)


def test_causal_in_scan_order():
    kw = _inputs(2, 4, 2, 3, 30, 2)
    out = selective_scan(**kw, delta_softplus=True, chunk_size=8)
    for t in (0, 7, 8, 19):
        moved = {**kw, "u": kw["u"].clone(), "delta": kw["delta"].clone(), "B": kw["B"].clone(), "C": kw["C"].clone()}
        for k in ("u", "delta", "B", "C"):
            moved[k][..., t + 1:] += torch.randn_like(moved[k][..., t + 1:])
        again = selective_scan(**moved, delta_softplus=True, chunk_size=8)
        assert_close(again[..., :t + 1], out[..., :t + 1], 1e-6)  # exact in math; a chunk's reference moves
        assert not torch.allclose(again[..., t + 1:], out[..., t + 1:])


def test_no_decay_limit_is_a_cumulative_sum():
    """``A_log -> -30`` (``A = -exp(-30)``): ``exp(delta A) = 1`` to rounding, ``h`` a plain cumulative sum."""
    kw = _inputs(2, 6, 3, 4, 33, 3, dtype=torch.float64)
    A = -torch.exp(torch.full((6, 4), -30.0, dtype=torch.float64))
    delta = F.softplus(kw["delta"])
    y = selective_scan(kw["u"], delta, A, kw["B"], kw["C"], kw["D"], chunk_size=8)
    Bx, Cx = kw["B"].repeat_interleave(2, 1), kw["C"].repeat_interleave(2, 1)
    h = torch.cumsum(Bx * (delta * kw["u"])[:, :, None], -1)  # (b, ch, N, L)
    assert_close(y, (Cx * h).sum(2) + kw["D"][:, None] * kw["u"], 1e-9)


def test_chunk_size_does_not_change_the_result():
    kw = _inputs(2, 8, 4, 4, 50, 4)
    outs = [selective_scan(**kw, delta_softplus=True, chunk_size=c) for c in (1, 5, 16, 50, 1000)]
    for o in outs[1:]:
        assert_close(o, outs[0], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_past_the_float_range_fall_back_to_smaller_chunks(dtype):
    """Step sizes ~ 50 with |A| up to 8: a chunk's decay spans exp(-2e4); the result stays exact and finite."""
    kw = _inputs(1, 4, 2, 3, 37, 5, dtype=dtype, shift=50.0, a_scale=8.0)
    leaves = [t.requires_grad_() for t in kw.values()]
    out = selective_scan(**kw, delta_softplus=True, chunk_size=32)
    assert torch.isfinite(out).all()
    check_outputs_and_grads(out, scan_reference(**kw, delta_softplus=True), leaves, rtol=2e-5, grad_rtol=5e-5)


def test_shared_b_c_non_contiguous_and_half_precision():
    kw = _inputs(2, 6, 1, 3, 21, 6)
    b3, c3 = kw["B"][:, 0], kw["C"][:, 0]
    u = torch.randn(21, 6, 2).permute(2, 1, 0)  # non-contiguous views
    delta = torch.randn(2, 12, 21)[:, ::2]
    ref = scan_reference(u, delta, kw["A"], b3, c3, kw["D"], None, True)
    assert_close(selective_scan(u, delta, kw["A"], b3, c3, kw["D"], delta_softplus=True, chunk_size=4), ref, 2e-5)
    half = selective_scan(u.bfloat16(), delta, kw["A"], b3, c3, delta_softplus=True)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_errors():
    kw = _inputs(2, 4, 2, 3, 5, 7)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**kw, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        selective_scan(**kw, chunk_size=2.0)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(**{**kw, "delta": kw["delta"][..., :4]})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**kw, "A": kw["A"][:3]})
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**kw, "B": torch.randn(2, 3, 3, 5)})  # 3 groups do not divide 4 channels
    with pytest.raises(ValueError, match="B and C"):
        selective_scan(**{**kw, "C": torch.randn(2, 4, 3, 5)})
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(**{**kw, "D": torch.ones(5)})
    with pytest.raises(TypeError, match="u"):
        selective_scan(**{**kw, "u": kw["u"].long()})
