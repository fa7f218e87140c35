"""The tile shape the compiled kernel runs 2D/3D patterns with (``nearfar.backends.native_tiles``): every candidate
against the float64 reference through ``attend`` (biases, key padding, GQA, layouts, LSE, gradients), the sampled
work count against the full plan's, and which tile ``auto`` ends up with."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import problems
from test_engines import check_problem
from test_native import needs_kernel

import nearfar as nf
import nearfar.dispatch as dispatch
from nearfar.backends import native as native_engine
from nearfar.backends.native_tiles import CANDIDATES, native_tile, sampled_work
from nearfar.cache import CACHE
from nearfar.plan import get_plan, layouts


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(p=problems(modes=("self",), shapes=("base", "base", "union", "inter"), bias_kinds=("none", "dense", "rpb")),
       pick=st.integers(0, 3))
def test_every_candidate_tile_matches_the_reference(p, pick):
    lay = layouts(p["pattern"], p["nq"], p["nk"])[0] if p["pattern"] is not None else None
    assume(lay is not None and lay.tile is None and len(lay.grid) in CANDIDATES)
    tile = CANDIDATES[len(lay.grid)][pick % len(CANDIDATES[len(lay.grid)])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "native_tile", lambda *a: tile)
        check_problem(p, torch.float32, engines=("blocksparse",))
    assert ("plan", p["pattern"], p["nq"], p["nk"], tile, "cpu") in CACHE


def _exact_work(pattern, n, tile):
    """Scores the kernel computes per allowed pair over the whole plan (its row ranges, vector-rounded)."""
    plan = get_plan(pattern, n, n, tile)
    vs = 16 if str(torch.backends.cpu.get_cpu_capability()) == "AVX512" else 8
    work = allowed = 0
    for g, ng in zip(plan.groups, native_engine.groups(plan)):
        r = ng.rows.long()
        keys = torch.nn.functional.pad(ng.k_idx >= 0, (0, r.shape[2] * native_engine.KB - ng.k_idx.shape[2]))
        keys = keys.view(*r.shape[:3], native_engine.KB).sum(-1)
        span = -(-r[..., 1] // vs) * vs - r[..., 0] // vs * vs
        work += int((span * keys * (r[..., 1] > r[..., 0])).sum())
        allowed += int(plan.allowed(g, 0, len(g)).sum())
    return work / allowed


@needs_kernel
@pytest.mark.parametrize("kernel, grid, tile", [
    ((13, 13), (64, 64), (8, 8)),
    ((13, 13), (64, 64), (16, 4)),
    ((7, 7), (40, 24), (16, 4)),
    ((5, 5, 5), (12, 16, 16), (8, 4, 2)),
])
def test_sampled_work_is_close_to_the_whole_plans(kernel, grid, tile):
    n = math.prod(grid)
    p = nf.Neighborhood(kernel, grid=grid)
    assert sampled_work(p, n, n, tile) == pytest.approx(_exact_work(p, n, tile), rel=0.1)


def test_the_tile_follows_the_pattern():
    def pick(pattern, grid):
        n = math.prod(grid)
        return native_tile(pattern, n, n)

    # a neighbourhood box: tall, narrow tiles (fewer masked key columns per query row)
    assert pick(nf.Neighborhood((13, 13), grid=(64, 64)), (64, 64)) == (16, 4)
    assert pick(nf.Neighborhood((7, 7, 7), grid=(16, 32, 32)), (16, 32, 32)) == (16, 2, 2)
    # ... but not one the grid would cut to fewer queries per tile (8 deep: 16x2x2 would run as 8x2x2)
    assert pick(nf.Neighborhood((3, 7, 7), grid=(8, 64, 64)), (8, 64, 64)) == (8, 4, 2)
    # a window along a column wants tall tiles, along a row not
    assert pick(nf.Neighborhood((31, 1), grid=(64, 64)), (64, 64)) == (16, 4)
    assert pick(nf.Neighborhood((1, 31), grid=(64, 64)), (64, 64)) != (16, 4)
    # no 2D/3D layout, or a tile of its own (windows): the plan's default
    assert pick(nf.Neighborhood(65), (1024,)) is None
    assert pick(nf.Blocks((7, 7), grid=(28, 28)), (28, 28)) is None


@needs_kernel
def test_auto_runs_the_kernel_on_its_tile_and_the_pytorch_path_on_the_default():
    grid = (48, 48)
    n = math.prod(grid)
    pattern = nf.Neighborhood((13, 13), grid=grid)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    CACHE.clear()
    nf.attend(q, k, v, pattern)
    plans = [key[4] for key in CACHE.keys() if key[0] == "plan"]
    assert plans == [(16, 4)]
    nf.attend(q.double(), k.double(), v.double(), pattern, engine="blocksparse")  # float64: no kernel
    plans = [key[4] for key in CACHE.keys() if key[0] == "plan"]
    assert plans == [(16, 4), None]
