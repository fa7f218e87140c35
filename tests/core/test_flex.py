"""The FlexAttention engine, run eagerly (compiling per shape would take minutes in CI)."""

from __future__ import annotations

import pytest
import torch

import nearfar as nf


@pytest.fixture(autouse=True)
def _eager(eager_flex):
    yield


CASES = [
    (nf.Neighborhood(7), 300, 300, 2, 2),
    (nf.Neighborhood((3, 5), grid=(12, 20), dilation=(2, 3)), 240, 240, 4, 2),
    ((nf.SlidingWindow(20) | nf.Sinks(3)) & nf.Causal(), 500, 500, 4, 1),
    (nf.Causal(), 100, 400, 2, 2),
    (nf.PerHead([nf.Neighborhood(5), nf.Causal(), nf.Strided(7), nf.Blocks(16)]), 300, 300, 4, 2),
    (None, 130, 130, 2, 1),
]


@pytest.mark.parametrize("pattern,nq,nk,hq,hkv", CASES, ids=[repr(c[0])[:30] for c in CASES])
def test_flex_matches_dense(pattern, nq, nk, hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, nq, 16, generator=g)
    k, v = (torch.randn(2, hkv, nk, 16, generator=g) for _ in range(2))
    kpm = torch.rand(2, nk, generator=g) > 0.2
    bias = torch.randn(1, hq, nq, nk, generator=g)
    with torch.no_grad():
        out, lse = nf.attend(q, k, v, pattern, engine="flex", key_padding_mask=kpm, bias=bias, return_lse=True)
        ref, ref_lse = nf.attend(q, k, v, pattern, engine="dense", key_padding_mask=kpm, bias=bias, return_lse=True)
    assert (out - ref).abs().max() < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse[fin] - ref_lse[fin]).abs().max() < 1e-5


def test_flex_rpb_table():
    g = torch.Generator().manual_seed(1)
    pattern = nf.Neighborhood(5, grid=(12, 12))
    q, k, v = (torch.randn(1, 2, 144, 8, generator=g) for _ in range(3))
    table = torch.randn(2, 9, 9, generator=g)
    with torch.no_grad():
        out = nf.attend(q, k, v, pattern, engine="flex", rpb=table)
        ref = nf.attend(q, k, v, pattern, engine="dense", rpb=table)
    assert (out - ref).abs().max() < 1e-5


def test_flex_on_cpu_refuses_gradients():
    q, k, v = (torch.randn(1, 1, 64, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="forward-only"):
        nf.attend(q, k, v, nf.Causal(), engine="flex")
