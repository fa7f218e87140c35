"""Keys a query may not attend never reach it: NaN, Inf or huge garbage in padded or out-of-pattern keys changes
neither the query's output nor any gradient it sends, on every engine (``nearfar.guard``). Each test fails without
the guard: the fused kernels add the mask after ``q.k``, and ``NaN + (-inf)`` is NaN."""

from __future__ import annotations

import pytest
import torch

import nearfar
from nearfar import Blocks, Causal, Neighborhood, SlidingWindow

ENGINES = ["dense", "blocksparse", "auto"]
GARBAGE = [float("nan"), float("inf"), float("-inf"), 3e38]


def _grads(q, k, v, pattern, engine, go, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = nearfar.attend(*leaves, pattern, engine=engine, **kw)
    return (out, *torch.autograd.grad((out * go).sum(), leaves))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(16), Blocks(8, grid=(64,)), None])
def test_padded_keys_holding_garbage_change_nothing(engine, garbage, pattern):
    torch.manual_seed(0)
    b, n = 3, 64
    q, k, v = (torch.randn(b, 2, n, 16) for _ in range(3))
    kpm = torch.rand(b, n) > 0.3
    go = torch.randn(b, 2, n, 16)
    clean = _grads(q, k, v, pattern, engine, go, key_padding_mask=kpm)
    hole = ~kpm[:, None, :, None].expand_as(k)
    dirty = _grads(q, k.masked_fill(hole, garbage), v.masked_fill(hole, garbage), pattern, engine, go,
                   key_padding_mask=kpm)
    for name, a, c in zip(["out", "dq", "dk", "dv"], dirty, clean):
        assert torch.isfinite(a).all(), f"{name}: garbage in padded keys leaked"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_a_nan_key_reaches_exactly_the_queries_that_may_attend_it(engine, garbage):
    torch.manual_seed(1)
    n, j = 256, 100
    q, k, v = (torch.randn(2, 2, n, 16) for _ in range(3))
    pattern = SlidingWindow(8)  # keys i-8..i: key j is seen by queries j..j+8
    poisoned = k.clone()
    poisoned[0, 0, j, 3] = garbage
    out = nearfar.attend(q, poisoned, v, pattern, engine=engine)
    reach = torch.zeros(n, dtype=torch.bool)
    reach[j:j + 9] = True
    bad = ~torch.isfinite(out).all(-1)
    if garbage != garbage:  # NaN: the rows that attend it are NaN, as in the float64 reference
        assert torch.equal(bad[0, 0], reach)
    assert not bad[0, 0, ~reach].any() and not bad[1].any() and not bad[0, 1].any()
    zeroed = k.clone()
    zeroed[0, 0, j] = 0.0
    ref = nearfar.attend(q, zeroed, v, pattern, engine=engine)
    keep = torch.ones_like(bad)
    keep[0, 0, reach] = False
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_nan_query_sends_no_gradient_to_keys_it_may_not_attend(engine):
    torch.manual_seed(2)
    n = 96
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    q[0, 0, 40] = float("nan")
    go = torch.randn(1, 2, n, 8)
    go[0, 0, 40] = 0.0
    out, dq, dk, dv = _grads(q, k, v, Neighborhood(5), engine, go)
    assert torch.isnan(out[0, 0, 40]).all() and torch.isfinite(out[0, 0, :40]).all()
    seen = torch.zeros(n, dtype=torch.bool)
    seen[38:43] = True  # Neighborhood(5) of query 40
    assert torch.isfinite(dk[0, 0, ~seen]).all() and torch.isfinite(dv[0, 0, ~seen]).all()
    assert torch.isfinite(dq[0, 0, ~seen]).all() and torch.isfinite(dk[0, 1]).all()


def test_flex_ignores_garbage_in_padded_keys(eager_flex):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 128, 16) for _ in range(3))
    kpm = torch.rand(2, 128) > 0.3
    hole = ~kpm[:, None, :, None].expand_as(k)
    with torch.no_grad():
        clean = nearfar.attend(q, k, v, Causal(), key_padding_mask=kpm, engine="flex")
        dirty = nearfar.attend(q, k.masked_fill(hole, float("nan")), v.masked_fill(hole, float("inf")), Causal(),
                               key_padding_mask=kpm, engine="flex")
    torch.testing.assert_close(dirty, clean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_overflow_in_padded_keys(dtype):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 1100, 16).to(dtype) for _ in range(3))  # above the dense size: block-sparse
    kpm = torch.rand(2, 1100) > 0.2
    hole = ~kpm[:, None, :, None].expand_as(k)
    clean = nearfar.attend(q, k, v, SlidingWindow(64), key_padding_mask=kpm)
    dirty = nearfar.attend(q, k.masked_fill(hole, float("inf")), v.masked_fill(hole, float("-inf")),
                           SlidingWindow(64), key_padding_mask=kpm)
    assert torch.equal(dirty, clean)
