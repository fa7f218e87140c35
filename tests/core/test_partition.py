"""Window patterns (Blocks, Grid): the partition engine, relative-position tables, and rolled-window tiling."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

import nearfar
import nearfar.functional
from nearfar import Blocks, Grid, Neighborhood, attend, native
from nearfar.bias import DenseBias
from nearfar.dispatch import choose_engine
from nearfar.plan import get_plan


def _qkv(b, hq, hkv, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _compare(pattern, allowed, n, table=None, bias_dense=None, hq=2, hkv=2, kpm=None, engine="auto", b=2):
    q, k, v = _qkv(b, hq, hkv, n, 8)
    args = dict(rpb=table, key_padding_mask=kpm, engine=engine)
    out, lse = attend(q, k, v, pattern, return_lse=True, **args)
    g = torch.randn_like(out)
    tensors = [q, k, v] + ([table] if table is not None else [])
    grads = torch.autograd.grad((out * g).sum(), tensors)
    allowed = allowed if kpm is None else allowed & kpm[:, None, None, :]
    exp, exp_lse = ref.dense_reference(q, k, v, allowed, 8 ** -0.5, bias_dense, return_lse=True)
    exp_grads = torch.autograd.grad((exp * g.double()).sum(), tensors)
    assert (out.double() - exp).abs().max() < 1e-5
    finite = torch.isfinite(exp_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse.double() - exp_lse)[finite].abs().max() < 1e-5
    for got, want in zip(grads, exp_grads):
        assert (got.double() - want).abs().max() < 3e-5 * max(1.0, float(want.abs().max()))


@given(h=st.integers(2, 9), w=st.integers(2, 9), m0=st.integers(1, 4), m1=st.integers(1, 4),
       s0=st.integers(0, 3), s1=st.integers(0, 3), engine=st.sampled_from(["auto", "blocksparse", "dense"]))
def test_swin_windows_match_the_region_mask(h, w, m0, m1, s0, s1, engine):
    m0, m1 = min(m0, h), min(m1, w)
    s0, s1 = s0 % m0, s1 % m1
    p = Blocks((m0, m1), grid=(h, w), shift=(s0, s1))
    _compare(p, ref.swin_mask((h, w), (m0, m1), (s0, s1)), h * w, engine=engine)


@given(size=st.sampled_from([(2, 3), (3, 3), (4, 2)]), mult=st.sampled_from([(1, 2), (2, 2), (3, 1)]),
       shift=st.tuples(st.integers(0, 3), st.integers(0, 3)), wrap=st.booleans(),
       engine=st.sampled_from(["auto", "dense"]))
def test_window_rpb_table_matches_swin_slots(size, mult, shift, wrap, engine):
    grid = (size[0] * mult[0], size[1] * mult[1])
    shift = (shift[0] % size[0], shift[1] % size[1])
    p = Blocks(size, grid=grid, shift=shift, wrap=wrap)
    table = torch.randn(2, 2 * size[0] - 1, 2 * size[1] - 1).requires_grad_()
    allowed = ref.cyclic_blocks_mask(grid, size, shift) if wrap else ref.swin_mask(grid, size, shift)
    bias = ref.window_rpb_bias(table, grid, size, shift)
    _compare(p, allowed, grid[0] * grid[1], table=table, bias_dense=bias, engine=engine)


@pytest.mark.parametrize("grid,size", [((6, 8), (3, 2)), ((4, 6, 6), (2, 3, 2)), ((12,), (4,))])
def test_grid_rpb_table_is_in_grid_units(grid, size):
    p = Grid(size, grid=grid)
    table = torch.randn(2, *(2 * m - 1 for m in size)).requires_grad_()
    bias = ref.window_rpb_bias(table, grid, size, grid_partition=True)
    n = 1
    for g in grid:
        n *= g
    _compare(p, ref.grid_mask(grid, size), n, table=table, bias_dense=bias)


def test_partition_gqa_padding_mask_and_empty_rows():
    grid, size = (7, 9), (3, 4)  # non-divisible: smaller edge windows, padded tiles
    p = Blocks(size, grid=grid, shift=(1, 2))
    n = 63
    kpm = torch.rand(2, n, generator=torch.Generator().manual_seed(3)) > 0.3
    kpm[1, :] = False  # every query of batch 1 has no key: zeros, LSE -inf, no NaN
    _compare(p, ref.swin_mask(grid, size, (1, 2)), n, hq=4, hkv=2, kpm=kpm)
    assert get_plan(p, n, n).partition


def test_large_windows_take_the_partition_engine_and_agree_with_dense():
    p = Blocks(8, grid=(40, 48), shift=4)
    plan = get_plan(p, 1920, 1920)
    assert plan.partition and plan.q_idx.shape == (30, 64)  # rolled windows: full tiles, region mask inside
    q, k, v = _qkv(1, 2, 2, 1920, 16)
    table = torch.randn(2, 15, 15)
    a = attend(q, k, v, p, rpb=table)
    b = attend(q, k, v, p, rpb=table, engine="dense")
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_partition_half_precision(dtype):
    p = Grid(4, grid=(8, 12))
    q, k, v = _qkv(2, 3, 3, 96, 16, dtype=dtype)
    out = attend(q, k, v, p)
    exp = ref.dense_reference(q, k, v, ref.grid_mask((8, 12), 4), 0.25)
    assert out.dtype == dtype and (out.double() - exp).abs().max() < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_partition_under_torch_compile():
    p = Blocks(4, grid=(8, 8), shift=2)
    q, k, v = _qkv(1, 2, 2, 64, 8)
    table = torch.randn(2, 7, 7)

    def f(q, k, v):
        return attend(q, k, v, p, rpb=table)

    assert (torch.compile(f)(q, k, v) - f(q, k, v)).abs().max() < 1e-5


def test_only_windows_are_partitions():
    assert not get_plan(Neighborhood(3, grid=(24, 24)), 576, 576).partition
    assert not get_plan(Blocks(4, grid=(24, 24)) | Neighborhood(3, grid=(24, 24)), 576, 576).partition
    assert get_plan(Blocks(4, grid=(8, 8), shift=1, wrap=True), 64, 64).partition


def test_rpb_table_shape_errors():
    q, k, v = _qkv(1, 2, 2, 36, 8)
    with pytest.raises(ValueError, match=r"rpb must have shape .* = \(2, 5, 5\)"):
        attend(q, k, v, Blocks(3, grid=(6, 6)), rpb=torch.randn(2, 7, 7))


def test_partition_is_a_named_engine_and_auto_picks_it_for_windows():
    assert nearfar.engines() == ["dense", "blocksparse", "partition", "flex"]
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)  # a dtype the compiled kernel does not take
    swin = Blocks(4, grid=(8, 8), shift=2)
    assert choose_engine(q, swin, 64, 64) == "partition"
    assert choose_engine(q, Blocks(3, grid=(8, 8)), 64, 64) == "partition"  # edge windows: smaller, still whole
    # where the kernel runs, it reads the windows in place (faster than the batched SDPA), unless a score_mod or a
    # dense bias needs the partition engine's materialised scores
    q32 = q.float()
    kernel = "blocksparse" if native.available() else "partition"
    assert choose_engine(q32, swin, 64, 64) == kernel
    assert choose_engine(q32, swin, 64, 64, scored=True) == "partition"
    assert choose_engine(q32, swin, 64, 64, DenseBias(torch.zeros(1, 1, 64, 64))) == "partition"
    q = q32
    assert choose_engine(q, nearfar.Causal(), 64, 64) == "dense"  # small
    assert choose_engine(torch.randn(1, 2, 2048, 8), nearfar.Causal(), 2048, 2048) == "blocksparse"
    assert choose_engine(q, None, 64, 64) == "dense"
    with nearfar.functional.observe_calls():
        out = attend(q, q, q, swin, engine="partition")
    torch.testing.assert_close(out, attend(q, q, q, swin, engine="dense"))


@pytest.mark.parametrize("pattern", [nearfar.Causal(), Neighborhood(3, grid=(32, 32)),
                                     Blocks(8, grid=(32, 32)) | nearfar.GlobalTokens(1)])
def test_partition_engine_refuses_what_is_not_windows(pattern, monkeypatch):
    q = torch.randn(1, 2, 1024, 8)
    import nearfar.backends.partition as engine

    monkeypatch.setattr(engine, "windows", None)  # refused before any work: the engine is never reached
    with pytest.raises(ValueError, match="engine='partition' runs patterns whose token tiles attend only"):
        attend(q, q, q, pattern, engine="partition")
