"""The compiled row softmax the window kernel uses for float32 (``nearfar/csrc/softmax_rows.cpp``).

Against a float64 softmax on rows of every length around the vector width (the partial-vector tail), with -inf
entries, rows of large spread (exp underflows to exactly 0) and rows that are all -inf (NaN, as ``torch.softmax``);
and the window kernel's forward with and without it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_native import needs_kernel

from nearfar.backends import windows


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), n=st.integers(1, 70), spread=st.sampled_from([1.0, 8.0, 60.0]),
       holes=st.floats(0.0, 0.6), empty=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_softmax_rows_matches_float64(rows, n, spread, holes, empty, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * spread
    x[torch.rand(rows, n, generator=g) < holes] = float("-inf")
    if empty:
        x[rows // 2] = float("-inf")
    out = torch.full_like(x, 7.0)
    torch.ops.nearfar_native.softmax_rows(x, out)
    ref = torch.softmax(x.double(), -1)
    assert torch.equal(out.isnan(), torch.softmax(x, -1).isnan())  # exactly the all -inf rows
    torch.testing.assert_close(out.double().nan_to_num(0.0), ref.nan_to_num(0.0), rtol=2e-6, atol=1e-7)
    # exp's argument x - max under ln(FLT_MIN) gives exactly 0 (denormals flushed); nothing above it does
    tiny = torch.finfo(torch.float32).tiny
    assert (out[ref > tiny] > 0).all()
    assert (out[ref < tiny / n] == 0).all()


@needs_kernel
def test_softmax_rows_rejects_other_layouts():
    x = torch.randn(4, 9)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.nearfar_native.softmax_rows(x.t(), torch.empty(9, 4))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.nearfar_native.softmax_rows(x.double(), torch.empty(4, 9, dtype=torch.float64))


@needs_kernel
def test_window_forward_same_with_aten_softmax(monkeypatch):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(6, 49, 3 * 2 * 16, generator=g)
    add = torch.randn(2, 3, 49, 49, generator=g)
    roles = windows.roles_of("3hd", 2, 16)
    ours = windows._forward((qkv,), roles, 2, 16, add, 0.25, keep=False)[0]
    monkeypatch.setattr(windows, "_softmax", lambda s, out: torch.softmax(s, -1, out=out))
    aten = windows._forward((qkv,), roles, 2, 16, add, 0.25, keep=False)[0]
    torch.testing.assert_close(ours, aten, rtol=1e-5, atol=1e-6)
