"""``attend_rows``: attention of chosen query rows only, against the float64 reference of causal (or full)
attention with the other rows zeroed; the compiled kernel's row lists (each row bounded by its position) and the
fallback through ``attend``."""

from __future__ import annotations

import contextlib

import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import LAYOUTS, as_layout

import nearfar as nf
from nearfar import native
from nearfar.functional import observe_calls

PATHS = ("kernel", "fallback")


def path_context(name):
    if name == "fallback":
        return native.disabled()
    if not native.available():
        pytest.skip(native.status())
    return contextlib.nullcontext()


@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 2))
    nk = draw(st.integers(1, 150))
    return dict(b=draw(st.integers(1, 2)), hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2, 3])), nk=nk,
                nq=draw(st.integers(1, nk)), d=draw(st.sampled_from([4, 8, 17])), dv=draw(st.sampled_from([4, 9])),
                frac=draw(st.sampled_from([0.0, 0.1, 0.35, 0.55])), causal=draw(st.booleans()),
                kpm=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)),
                layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_rows_match_the_float64_reference(path, p):
    gen = torch.Generator().manual_seed(p["seed"])
    b, hq, hkv, nq, nk = p["b"], p["hq"], p["hkv"], p["nq"], p["nk"]
    q = torch.randn(b, hq, nq, p["d"], generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, p["d"], generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, p["dv"], generator=gen, dtype=torch.float64)
    rows = torch.rand(b, hq, nq, generator=gen) < p["frac"]
    kpm = torch.rand(b, nk, generator=gen) > 0.3 if p["kpm"] else None
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if p["causal"]:  # query i at position nk - nq + i
        allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq
    allowed = allowed[None, None] & (kpm[:, None, None, :] if kpm is not None else True)
    xs = [as_layout(x.float(), kind, gen).requires_grad_() for x, kind in zip((q, k, v), p["layouts"])]
    q, k, v = (x.detach().double().requires_grad_() for x in xs)
    scale = p["d"] ** -0.5
    expected = ref.dense_reference(q, k, v, allowed, scale) * rows[..., None]
    go = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (expected * go).sum().backward()
    with path_context(path):
        out = nf.attend_rows(*xs, rows, causal=p["causal"], key_padding_mask=kpm)
        (out * go.float()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=1e-4)
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))
    for x, x64, name in zip(xs, (q, k, v), "qkv"):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 90, 16), torch.randn(2, 2, 90, 16), torch.randn(2, 2, 90, 16)
    rows = torch.rand(2, 4, 90) < 0.4
    expected = nf.attend(q, k, v, nf.Causal()) * rows[..., None]
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = nf.attend_rows(*xs, rows)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in xs)


def test_one_observed_call_and_the_override():
    q = torch.randn(1, 2, 64, 8)
    sparse = torch.zeros(1, 2, 64, dtype=torch.bool)
    sparse[:, :, ::4] = True
    for path in PATHS:
        with path_context(path), observe_calls() as calls:
            nf.attend_rows(q, q, q, sparse)
        assert calls == [(nf.Causal(), (1, 2, 64, 8), (1, 2, 64, 8), (1, 2, 64, 8))]  # the kernel's or attend's
    dense = torch.ones(1, 2, 64, dtype=torch.bool)
    torch.testing.assert_close(nf.attend_rows(q, q, q, dense), nf.attend(q, q, q, nf.Causal()))
    with nf.engine_override("dense"):  # the reference engine when asked for
        torch.testing.assert_close(nf.attend_rows(q, q, q, sparse), nf.attend(q, q, q, nf.Causal()) * sparse[..., None])


def test_a_future_key_cannot_leak_into_a_row():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    k[0, 0, 30], v[0, 0, 30] = float("nan"), float("inf")
    rows = torch.zeros(1, 1, 40, dtype=torch.bool)
    rows[0, 0, [3, 17, 29, 35]] = True
    out = nf.attend_rows(q, k, v, rows)
    assert torch.isfinite(out[0, 0, :30]).all()  # rows before key 30 never see it
    expected = nf.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30], nf.Causal()) * rows[:, :, :30, None]
    torch.testing.assert_close(out[:, :, :30], expected)


def test_fully_padded_rows_are_zero():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    kpm = torch.ones(1, 16, dtype=torch.bool)
    kpm[0, :8] = False  # rows 0..7 see only padded keys (causal)
    rows = torch.zeros(1, 2, 16, dtype=torch.bool)
    rows[:, :, [2, 5, 12]] = True
    out = nf.attend_rows(q, q, q, rows, key_padding_mask=kpm)
    assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bad_rows_are_named():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="rows must be a bool tensor"):
        nf.attend_rows(q, q, q, torch.ones(1, 2, 8))
    with pytest.raises(ValueError, match=r"rows must be \(B, Hq, Nq\)"):
        nf.attend_rows(q, q, q, torch.ones(1, 2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="causal"):
        nf.attend_rows(q, q, q, torch.ones(1, 2, 8, dtype=torch.bool), causal=1)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        nf.attend_rows(q, q[:, :1].expand(1, 3, 8, 4), q[:, :1].expand(1, 3, 8, 4),
                       torch.ones(1, 2, 8, dtype=torch.bool))
