"""Block-sparse plans: every allowed pair is covered exactly once, and plans stay sparse."""

from __future__ import annotations

import pytest
import torch

import nearfar as nf
from nearfar.cache import CACHE
from nearfar.plan import build_plan, get_plan


def covered(plan, heads: int) -> torch.Tensor:
    """Count of how many times each (head, query, key) pair appears unmasked in the plan."""
    count = torch.zeros(heads, plan.nq, plan.nk, dtype=torch.long)
    for g in plan.groups:
        ok = plan.allowed(g, 0, len(g))  # (Hp, c, T, W)
        q = g.q_idx[None, :, :, None].expand_as(ok)
        k = g.k_idx[:, :, None, :].expand_as(ok)
        h = torch.arange(ok.shape[0])[:, None, None, None].expand_as(ok)
        count.index_put_((h[ok], q[ok], k[ok]), torch.ones(int(ok.sum()), dtype=torch.long), accumulate=True)
    return count


PATTERNS = [
    (nf.Neighborhood(7), 150, 150),
    (nf.Neighborhood((3, 5), grid=(10, 12), dilation=(2, 1)), 120, 120),
    (nf.Neighborhood((3, 3, 3), grid=(5, 6, 7), is_causal=(True, False, False)), 210, 210),
    (nf.Neighborhood((4, 3), grid=(9, 11), stride=(3, 2), dilation=(2, 3)), 99, 99),
    ((nf.SlidingWindow(5, 2) | nf.Sinks(3)) & nf.Causal(), 300, 300),
    (nf.Blocks(4, grid=(10, 9), shift=(1, 2)), 90, 90),
    (nf.Blocks(3, grid=(9, 9), shift=1, wrap=True), 81, 81),
    (nf.Grid(3, grid=(9, 12)), 108, 108),
    (nf.Strided(5, 2) | nf.GlobalTokens(3), 170, 170),
    (nf.PerHead([nf.Neighborhood(3), nf.Causal(), nf.Dense()]), 140, 140),
    (nf.Causal() | nf.Sinks(2), 7, 400),
    (nf.SlidingWindow(3, 1), 200, 90),
]


@pytest.mark.parametrize("pattern,nq,nk", PATTERNS, ids=[repr(p)[:40] for p, *_ in PATTERNS])
@pytest.mark.parametrize("tile", [None, 16])
def test_plan_covers_each_allowed_pair_once(pattern, nq, nk, tile):
    plan = build_plan(pattern, nq, nk, tile=tile)
    mask = pattern.mask(nq, nk)
    mask = mask if mask.dim() == 3 else mask[None]
    assert torch.equal(covered(plan, mask.shape[0]), mask.long())


def test_causal_plan_groups_tiles_by_width():
    # one width for all tiles would make causal attention cost as much as dense
    plan = build_plan(nf.Causal(), 4096, 4096)
    assert len(plan.groups) > 1
    assert plan.density() < 0.65


def test_neighborhood_2d_plan_is_compact():
    # compact 8x8 tiles: each tile reads its 20x20 key box, not 13 raster rows
    plan = build_plan(nf.Neighborhood(13, grid=(64, 64)), 4096, 4096)
    assert plan.width == 20 * 20


def test_plans_never_form_n_squared():
    # 1M keys: the plan is built from tile-level tests, in bounded memory and time
    n = 1 << 20
    plan = build_plan(nf.Neighborhood(257), n, n)
    assert plan.width <= 128 + 256 + 64
    assert plan.density() < 0.001


STAGED = [
    (nf.Neighborhood(5, grid=(48, 48)), (4, 4)),
    (nf.Neighborhood((5, 3), grid=(24, 120), dilation=(1, 2)), (4, 4)),
    (nf.Neighborhood(3, grid=(6, 8, 64)), (2, 2, 4)),
]


@pytest.mark.parametrize("pattern,tile", STAGED, ids=[repr(p)[:40] for p, _ in STAGED])
def test_staged_plans(pattern, tile):
    # 2D/3D tiles of one band read their keys as runs of a column-major "stage" of the band's keys
    n = int(torch.tensor(pattern.grid).prod())
    plan = build_plan(pattern, n, n, tile=tile)
    assert any(g.stage is not None for g in plan.groups)
    assert torch.equal(covered(plan, 1), pattern.mask(n, n)[None].long())


@pytest.mark.parametrize("pattern,tile", STAGED, ids=[repr(p)[:40] for p, _ in STAGED])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_staged_engine_matches_dense(pattern, tile, heads):
    from nearfar.backends.blocksparse import blocksparse_attention

    n = int(torch.tensor(pattern.grid).prod())
    plan = build_plan(pattern, n, n, tile=tile)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads[0], n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, heads[1], n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, _ = blocksparse_attention(q, k, v, plan, 0.3)
    ref = nf.attend(q, k, v, pattern, scale=0.3, engine="dense")
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    assert (out - ref).abs().max() < 1e-12
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-12


def test_exact_masks_are_kept_only_once_asked_for_and_charged_to_the_cache():
    pattern = nf.Neighborhood(9, grid=(24, 24))
    nf.clear_caches()
    plan = get_plan(pattern, 576, 576)
    assert not plan.masks_cached and all(g.mask_f is None and g.mask_b is None for g in plan.groups)
    before = CACHE.nbytes
    fresh = [plan.allowed(g, 0, len(g), keep=False) for g in plan.groups]
    assert not plan.masks_cached and CACHE.nbytes == before  # packed by the compiled kernel: nothing kept
    kept = [plan.allowed(g, 0, len(g)) for g in plan.groups]
    assert plan.masks_cached and all(g.mask_f is not None for g in plan.groups)
    assert CACHE.nbytes == before + sum(g.mask_f.numel() * 4 for g in plan.groups)
    for g, a, b in zip(plan.groups, fresh, kept):
        assert torch.equal(a, b)
        assert torch.equal(plan.additive_mask(g, 0, len(g)), torch.where(b, 0.0, -torch.inf))
