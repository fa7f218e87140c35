"""Attention rollout (``nearfar.functional.attention_rollout``) against a plain-loop float64 reference of Abnar &
Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020) with DCAL's ``0.5 S + 0.5 I`` (Zhu et al., CVPR
2022): head mean, identity mixed in, rows normalised, product with the last layer on the left."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import assert_close, check_outputs_and_grads

import nearfar.ops.rollout as rollout_module
from nearfar.functional import attention_rollout

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def _maps(layers: int, b: int, heads: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(layers, b, heads, n, n, generator=g)).to(dtype).softmax(-1)


def _layout(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in another layout: 0 contiguous, 1 the last two axes transposed back, 2 a sliced view."""
    if how == 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == 2:
        return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., : t.shape[-1]]
    return t


def rollout_reference(maps, residual: float = 0.5) -> torch.Tensor:
    """Per batch item and layer, with loops: head mean, ``(1 - r) S + r I`` row by row, each row over its sum;
    then the chain multiplied from the last layer down, ``((S'_L S'_{L-1}) ...) S'_1``."""
    layers = [m.double() for m in maps]
    b, heads, n, _ = layers[0].shape
    out = []
    for bi in range(b):
        mixed = []
        for a in layers:
            rows = []
            for i in range(n):
                row = sum(a[bi, h, i] for h in range(heads)) / heads * (1 - residual)
                row = row + residual * torch.nn.functional.one_hot(torch.tensor(i), n).to(F64)
                rows.append(row / row.sum())
            mixed.append(torch.stack(rows))
        prod = mixed[-1]
        for m in reversed(mixed[:-1]):
            prod = prod @ m
        out.append(prod)
    return torch.stack(out)


@SETTINGS
@given(layers=st.integers(1, 4), b=st.integers(1, 3), heads=st.integers(1, 3), n=st.integers(1, 9),
       residual=st.sampled_from([0.0, 0.25, 0.5, 1.0]), stacked=st.booleans(), how=st.integers(0, 2),
       seed=st.integers(0, 100))
def test_matches_reference_forward_backward(layers, b, heads, n, residual, stacked, how, seed):
    maps = _layout(_maps(layers, b, heads, n, seed), how).requires_grad_()
    given_maps = maps if stacked else list(maps.unbind(0))
    out = attention_rollout(given_maps, residual=residual)
    assert out.shape == (b, n, n) and out.dtype == torch.float32
    check_outputs_and_grads(out, rollout_reference(maps.unbind(0), residual), [maps])


@SETTINGS
@given(layers=st.integers(1, 4), b=st.integers(1, 3), n=st.integers(1, 9), row=st.integers(0, 8),
       how=st.integers(0, 2), seed=st.integers(0, 100))
def test_row_vector_path_is_the_row_of_the_full_product(layers, b, n, row, how, seed):
    """DCAL's class-token row by vector propagation, ``e_row^T S'_L ... S'_1``: row ``row`` of the full product
    (forward and backward) and sums to 1."""
    row = row % n
    maps = _layout(_maps(layers, b, 2, n, seed), how).requires_grad_()
    out = attention_rollout(maps, row=row)
    assert out.shape == (b, n)
    check_outputs_and_grads(out, rollout_reference(maps.unbind(0))[:, row], [maps])
    assert_close(out.sum(-1), torch.ones(b))


def test_rows_are_stochastic_and_single_layer_is_the_mixed_map():
    maps = _maps(1, 2, 3, 6, dtype=F64)
    s = maps[0].mean(1)
    assert_close(attention_rollout(maps), 0.5 * s + 0.5 * torch.eye(6, dtype=F64), 1e-12)
    full = attention_rollout(_maps(5, 2, 3, 6, seed=1, dtype=F64))
    assert_close(full.sum(-1), torch.ones(2, 6, dtype=F64), 1e-12)
    assert (full >= 0).all()


def test_residual_one_is_the_identity_and_zero_the_plain_product():
    maps = _maps(3, 2, 1, 5, seed=2, dtype=F64)
    assert_close(attention_rollout(maps, residual=1.0), torch.eye(5, dtype=F64).expand(2, 5, 5), 1e-12)
    assert_close(attention_rollout(maps, residual=0.0), maps[2, :, 0] @ maps[1, :, 0] @ maps[0, :, 0], 1e-12)


def test_rows_are_normalised_for_maps_that_do_not_sum_to_one():
    """Attention dropout (or pruned heads) leaves rows that do not sum to 1: the rollout re-normalises them."""
    maps = _maps(2, 1, 2, 4, seed=3, dtype=F64) * 3.0
    expected = rollout_reference(maps.unbind(0))
    assert_close(attention_rollout(maps), expected, 1e-12)
    assert_close(attention_rollout(maps).sum(-1), torch.ones(1, 4, dtype=F64), 1e-12)


def test_half_maps_are_multiplied_in_float32():
    maps = _maps(12, 2, 2, 17, seed=4)
    out = attention_rollout(maps.half(), row=0)
    assert out.dtype == torch.float16
    assert_close(out.float(), attention_rollout(maps.half().float(), row=0), 1e-3)


def test_compile_matches_eager():
    maps = _maps(3, 2, 2, 10, seed=5)
    fn = torch.compile(lambda m: (attention_rollout(m), attention_rollout(m, row=0)))
    full, row = fn(maps)
    assert_close(full, attention_rollout(maps))
    assert_close(row, attention_rollout(maps, row=0))


@pytest.mark.parametrize("maps,kwargs,err,match", [
    ([], {}, ValueError, "at least one"),
    (torch.rand(2, 3, 4, 4), {}, ValueError, r"\(L, B, heads, N, N\)"),
    ([torch.rand(1, 2, 4, 4), torch.rand(1, 2, 5, 5)], {}, ValueError, r"maps\[1\] must be"),
    ([torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4).double()], {}, TypeError, "one dtype"),
    (torch.rand(2, 1, 2, 4, 5), {}, ValueError, "square"),
    (torch.ones(2, 1, 2, 4, 4, dtype=torch.long), {}, TypeError, "floating"),
    ("maps", {}, TypeError, "maps must be"),
    ([torch.rand(1, 2, 4, 4), "x"], {}, TypeError, r"maps\[1\]"),
    (torch.rand(2, 1, 2, 4, 4), {"residual": 1.5}, ValueError, r"residual must be a number in \[0.0, 1.0\]"),
    (torch.rand(2, 1, 2, 4, 4), {"row": 4}, ValueError, r"row must be in \[0, 3\]"),
    (torch.rand(2, 1, 2, 4, 4), {"row": 0.0}, TypeError, "row must be an int"),
])
def test_bad_arguments(maps, kwargs, err, match):
    with pytest.raises(err, match=match):
        attention_rollout(maps, **kwargs)


def test_docstring_examples():
    assert doctest.testmod(rollout_module).failed == 0
