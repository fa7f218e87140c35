"""``nearfar.bench.timing.attention_call``, the timed step the benchmark scripts share: forward under ``no_grad``, or
forward and backward of a fixed cotangent with the gradients cleared first (a repeated call does not accumulate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nearfar.bench.timing import attention_call


def _leaves(requires_grad: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64).requires_grad_(requires_grad) for _ in range(3)]


def test_forward_runs_without_autograd():
    seen = []

    def fn(q, k, v):
        seen.append(torch.is_grad_enabled())
        return F.scaled_dot_product_attention(q, k, v)

    leaves = _leaves(True)
    attention_call(fn, leaves, "fwd", torch.zeros(1))()
    assert seen == [False] and all(t.grad is None for t in leaves)


def test_forward_backward_gives_the_cotangent_gradients_without_accumulating():
    leaves = _leaves(True)
    go = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, go)
    run = attention_call(F.scaled_dot_product_attention, leaves, "fwd+bwd", go)
    run()
    run()  # the second call replaces the gradients of the first
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad, w, rtol=1e-12, atol=1e-12)


def test_unknown_mode_raises_before_any_call():
    with pytest.raises(ValueError, match="mode"):
        attention_call(lambda *a: pytest.fail("called"), _leaves(False), "bwd", torch.zeros(1))
