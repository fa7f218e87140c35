"""The compiled CPU kernel of the block-sparse engine (``nearfar/csrc/sparse_attention.cpp``).

The engine tests (``test_engines.py``, ``test_fuzz.py``) already run it wherever ``attend`` picks the block-sparse
engine; here: that CI really has it, multi-sub-block key lists (W > 64, T = 128) against the float64 reference
with every input layout, half precision, key padding with fully padded rows, non-finite inputs reaching the
output, and the PyTorch path that stays for machines without the kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import problems
from test_engines import check_problem
from torch.utils import cpp_extension

import nearfar as nf
from nearfar import native
from nearfar.backends.native import DENSE_WINDOWS, dense_windows, grad_like, native_attention
from nearfar.plan import get_plan

needs_kernel = pytest.mark.skipif(not native.available(), reason=native.status())


def test_kernel_is_built_where_required():
    # .ci/run sets NEARFAR_REQUIRE_NATIVE=1: the README's set-up must have built it, or CI fails here
    if os.environ.get("NEARFAR_REQUIRE_NATIVE") == "1":
        assert native.available(), native.status()
    assert "native kernel" in native.status()


PATTERNS = [
    lambda n: nf.Neighborhood(65),
    lambda n: nf.Neighborhood(33, dilation=3),
    lambda n: nf.Causal(),
    lambda n: (nf.SlidingWindow(left=90) | nf.Sinks(3)) & nf.Causal(),
    lambda n: nf.SlidingWindow(left=20, right=70) | nf.GlobalTokens(2),
    lambda n: nf.PerHead([nf.Neighborhood(21), nf.Causal()]),
]


def _view(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (what a projection or a permute hands to attend)."""
    if kind == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype)
        wide[..., 1:-2] = x
        return wide[..., 1:-2]
    if kind == "last_strided":
        wide = torch.zeros(*x.shape, 2, dtype=x.dtype)
        wide[..., 0] = x
        return wide[..., 0]
    return x


def _reference(q, k, v, pattern, scale, kpm):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    mask = None if kpm is None else kpm
    out, lse = nf.attend(q64, k64, v64, pattern, scale=scale, key_padding_mask=mask, engine="dense", return_lse=True)
    return (q64, k64, v64), out, lse


def _assert_grads_close(out, leaves, expected, refs, go, atol, rtol):
    """The gradients of ``(out * go).sum()`` to ``leaves`` (in their own dtypes) against the float64 ones of
    ``expected`` to ``refs``."""
    grads = torch.autograd.grad((out * go).sum(), leaves)
    grads_r = torch.autograd.grad((expected * go.double()).sum(), refs)
    for i, (leaf, a, r) in enumerate(zip(leaves, grads, grads_r)):
        assert a.dtype == leaf.dtype
        torch.testing.assert_close(a.double(), r, atol=atol, rtol=rtol, msg=lambda m, i=i: f"gradient {i}: {m}")


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(which=st.integers(0, len(PATTERNS) - 1), n=st.integers(100, 400), b=st.integers(1, 2),
       heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), d=st.sampled_from([8, 32, 37]),
       dv=st.sampled_from([None, 16]), layout=st.sampled_from(["contiguous", "bnhd", "sliced", "last_strided"]),
       padding=st.sampled_from(["none", "random", "whole_item"]), tile=st.sampled_from([None, 64, 256]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_float64_reference(which, n, b, heads, d, dv, layout, padding, tile, seed):
    # tile: query tiles of 64, 128 (the 1D default) and 256 rows: score and query buffers with row strides the
    # kernel keeps (64) and pads against cache-set aliasing (128 and 256; 2 query heads per kv head double them)
    hq, hkv = heads
    pattern = PATTERNS[which](n)
    if isinstance(pattern, nf.PerHead) and len(pattern.patterns) != hq:
        pattern = nf.PerHead([pattern.patterns[i % 2] for i in range(hq)])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, dv or d, generator=g)
    kpm = None
    if padding != "none":
        kpm = torch.rand(b, n, generator=g) > 0.3
        if padding == "whole_item":
            kpm[0] = False  # every query of item 0 has no key: zeros, lse = -inf
    leaves = [_view(t, layout).requires_grad_() for t in (q, k, v)]
    scale = d ** -0.5
    additive = None if kpm is None else torch.where(kpm, 0.0, float("-inf"))
    out, lse = native_attention(*leaves, get_plan(pattern, n, n, tile), scale, additive)
    refs, out_r, lse_r = _reference(q, k, v, pattern, scale, kpm)
    go = torch.randn(out.shape, generator=g)
    torch.testing.assert_close(out.double(), out_r, atol=2e-5, rtol=1e-5)
    empty = torch.isneginf(lse_r)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty].double(), lse_r[~empty], atol=2e-5, rtol=1e-5)
    _assert_grads_close(out, leaves, out_r, refs, go, 5e-5, 1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    # inputs rounded to the dtype first, so the only error left is the output's own rounding
    n, pattern = 300, nf.Neighborhood(101)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g).to(dtype) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = native_attention(*leaves, get_plan(pattern, n, n), 32 ** -0.5)
    assert out.dtype == dtype
    refs, out_r, _ = _reference(q, k, v, pattern, 32 ** -0.5, None)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=tol)
    _assert_grads_close(out, leaves, out_r, refs, torch.randn(out.shape, generator=g).to(dtype), 4 * tol, 4 * tol)


@needs_kernel
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_score_reaches_the_output(poison):
    # attend's guard looks at the output for non-finite values; a poisoned key a query attends must show there
    n = 200
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    k[0, 0, 50] = poison
    out, _ = native_attention(q, k, v, get_plan(nf.Neighborhood(9), n, n), 0.25)
    bad = ~torch.isfinite(out[0, 0]).all(-1)
    assert bad[46:55].all() and not bad[:40].any() and not bad[60:].any()


@settings(max_examples=20, deadline=None)
@given(problems(max_n=200, bias_kinds=("none",)))
def test_pytorch_path_without_the_kernel(p):
    # machines where the kernel is not built run the engine's PyTorch path: it stays correct
    with native.disabled():
        assert not native.available()
        check_problem(p, torch.float32, engines=["blocksparse"])


@needs_kernel
def test_auto_takes_the_kernel_at_small_sizes_when_it_skips_enough():
    from nearfar.dispatch import choose_engine

    q = torch.randn(2, 3, 196, 32)
    assert choose_engine(q, nf.Neighborhood((7, 7), grid=(14, 14)), 196, 196) == "blocksparse"
    assert choose_engine(q, nf.Dense(), 196, 196) == "dense"  # nothing to skip
    tiny = torch.randn(2, 3, 49, 32)
    assert choose_engine(tiny, nf.Neighborhood((3, 3), grid=(7, 7)), 49, 49) == "dense"  # under 4,096 pairs
    assert choose_engine(q.double(), nf.Neighborhood((7, 7), grid=(14, 14)), 196, 196) == "dense"  # no kernel
    with native.disabled():
        assert choose_engine(q, nf.Neighborhood((7, 7), grid=(14, 14)), 196, 196) == "dense"


@needs_kernel
def test_a_last_dim_of_one_with_any_stride():
    # a broadcast scalar value per key (stride 0 in its size-1 last dim) is a valid layout: the kernel reads it
    q, k = torch.randn(1, 2, 100, 8, requires_grad=True), torch.randn(1, 2, 100, 8)
    v = torch.randn(()).expand(1, 2, 100, 1)
    pattern = nf.SlidingWindow(left=5) & nf.Causal()
    out = nf.attend(q, k, v, pattern, engine="blocksparse")
    torch.testing.assert_close(out, nf.attend(q, k, v.contiguous(), pattern, engine="dense"))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def _threads(n: int):
    """Run with ``n`` intra-op threads (the suite may give each worker one), restored after."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    return ctx()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_backward_split_over_threads_matches_reference(threads):
    # with fewer (batch, kv head) owners than threads the tiles of one owner are split over ``splits`` float32
    # accumulators that are summed after; the test suite may run one thread per worker, so ask for several here
    from nearfar.backends.native import splits

    with _threads(threads):
        assert splits(1, 1, 300, 64) == threads
        g = torch.Generator().manual_seed(threads)
        q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
        leaves = [t.clone().requires_grad_() for t in (q, k[:, :1], v[:, :1])]
        pattern = nf.Neighborhood(65)
        out, _ = native_attention(*leaves, get_plan(pattern, 300, 300), 0.25)
        refs, out_r, _ = _reference(q, k[:, :1], v[:, :1], pattern, 0.25, None)
        _assert_grads_close(out, leaves, out_r, refs, torch.randn(out.shape, generator=g), 5e-5, 1e-4)


@needs_kernel
@settings(max_examples=8, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), b=st.integers(1, 2),
       heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), layout=st.sampled_from(["contiguous", "bnhd", "sliced"]),
       padding=st.booleans(), seed=st.integers(0, 2**16))
def test_half_precision_backward_without_float32_accumulators(dtype, b, heads, layout, padding, seed):
    # half-precision inputs with at least as many (batch, kv head) owners as threads: every tile group in one
    # ``backward_owned`` call, dK/dV summed in a float32 scratch per thread and written in q's dtype; the
    # relative-position table's gradient comes back too. Inputs rounded to the dtype first, float64 reference.
    from nearfar.backends import native as engine

    hq, hkv = heads
    grid, ks = (20, 20), (5, 5)
    n = grid[0] * grid[1]
    pattern = nf.Neighborhood(ks, grid=grid)
    assert len(get_plan(pattern, n, n).groups) > 1  # keys shared by tiles of several groups: one sum, one rounding
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, n, 16, generator=g).to(dtype) for _ in range(2))
    table = (torch.randn(hq, 9, 9, generator=g) * 0.5).to(dtype)
    kpm = torch.rand(b, n, generator=g) > 0.2 if padding else None
    leaves = [_view(t, layout).requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_()]
    with _threads(min(2, b * hkv)):
        assert engine.owned_grads(leaves[0], leaves[1], leaves[2])
        out = nf.attend(*leaves[:3], pattern, rpb=leaves[3], key_padding_mask=kpm, engine="blocksparse")
        go = torch.randn(out.shape, generator=g).to(dtype)
        grads = torch.autograd.grad((out * go).sum(), leaves)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    out_r = nf.attend(*refs[:3], pattern, rpb=refs[3], key_padding_mask=kpm, engine="dense")
    grads_r = torch.autograd.grad((out_r * go.double()).sum(), refs)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=tol)
    for name, a, r in zip(["q", "k", "v", "table"], grads, grads_r):
        assert a.dtype == dtype
        scale = max(1.0, float(r.abs().max()))  # the table's gradient sums every query: compare at its size
        torch.testing.assert_close(a.double() / scale, r / scale, atol=4 * tol, rtol=4 * tol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@needs_kernel
@pytest.mark.parametrize("dtype, owners, threads, owned", [
    (torch.bfloat16, 4, 2, True), (torch.float16, 2, 2, True),
    (torch.bfloat16, 1, 2, False),  # fewer owners than threads: split float32 accumulators
    (torch.float32, 4, 2, False),  # float32: the accumulator is the gradient
])
def test_which_backward_holds_the_dk_dv_sums(monkeypatch, dtype, owners, threads, owned):
    # the half-precision path allocates no (B, Hkv, Nk, e) float32 accumulator, only min(threads, owners) scratch
    # slots of (Nk, d + dv)
    from nearfar.backends import native as engine

    seen: dict[str, list] = {"kv_grads": [], "kv_scratch": []}
    for name in seen:
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda k, v, real=real, name=name: seen[name].append(
            real(k, v)) or seen[name][-1])
    n = 200
    q, k, v = (torch.randn(1, owners, n, 8).to(dtype).requires_grad_() for _ in range(3))
    with _threads(threads):
        out, _ = native_attention(q, k, v, get_plan(nf.SlidingWindow(left=70) & nf.Causal(), n, n), 0.3)
        out.sum().backward()
    assert k.grad.dtype == dtype and torch.isfinite(k.grad).all()
    if owned:
        assert not seen["kv_grads"] and [tuple(s.shape) for s in seen["kv_scratch"]] == [
            (min(threads, owners), n, 16)]
    else:
        assert seen["kv_grads"] and not seen["kv_scratch"]


@pytest.mark.parametrize("level", ["AVX512", "AVX2", "DEFAULT"])
def test_kernel_sources_compile_for_every_vector_level(level, tmp_path):
    # the set-up builds for the CPU it runs on and CI's CPU has one level, so the others are checked for syntax here
    # (an AVX-512-only template mismatch once passed an AVX2 build); all sources in one unit: the headers parse once
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        if os.environ.get("NEARFAR_REQUIRE_NATIVE") == "1":
            pytest.fail("no C++ compiler, but the kernel is required")
        pytest.skip("no C++ compiler")
    unit = tmp_path / "all.cpp"
    unit.write_text("".join(f'#include "{src}"\n' for src in native.SOURCES))
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), sysconfig.get_paths()["include"])]
    res = subprocess.run([compiler, "-fsyntax-only", "-w", *native._flags(level), *includes, str(unit)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"at {level}:\n{res.stderr[-3000:]}"


@needs_kernel
def test_kernel_calls_leave_the_plan_without_exact_masks():
    # the kernel packs its own bit masks: the plan's float/bool masks (370 MB for a 1M-token plan) are never made
    q, k, v = (torch.randn(1, 2, 400, 16, requires_grad=True) for _ in range(3))
    pattern = nf.Neighborhood(33)
    nf.attend(q, k, v, pattern, engine="blocksparse").sum().backward()
    plan = get_plan(pattern, 400, 400)
    assert not plan.masks_cached and all(g.mask_f is None and g.mask_b is None for g in plan.groups)


@needs_kernel
def test_a_leafs_gradient_keeps_its_layout():
    # a contiguous leaf gets dQ in its own strides (autograd keeps it, no copy); a head-split view gets (B, N, H, d)
    q, k, v = (torch.randn(2, 3, 200, 16, requires_grad=True) for _ in range(3))
    nf.attend(q, k, v, nf.Neighborhood(31), engine="blocksparse").sum().backward()
    assert q.grad.stride() == q.stride()
    x = torch.randn(2, 200, 3, 16).transpose(1, 2)
    assert grad_like(x).stride() == x.stride() and grad_like(x[..., :8]).transpose(1, 2).is_contiguous()


_TOLERANCE = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 4e-3)}


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from(list(DENSE_WINDOWS)), size=st.sampled_from(["fewest", "mid", "most"]),
       bw=st.integers(1, 3), heads=st.integers(1, 3), wide=st.booleans(), fused=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dense_windows_match_float64_reference(dtype, size, bw, heads, wide, fused, seed):
    # windows as WindowBatch hands them over: (windows, heads, T, d), contiguous or strided
    # views of one fused projection; inputs rounded to the dtype first, so only the kernel's own error is left
    fewest, most, widest = DENSE_WINDOWS[dtype]
    t = {"fewest": fewest, "mid": max(fewest, 200), "most": min(most, 300)}[size]
    d = widest if wide else 8
    g = torch.Generator().manual_seed(seed)
    if fused:
        x = torch.randn(bw, t, 3, heads, d, generator=g).to(dtype).requires_grad_()
        leaves = [x]
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (torch.randn(bw, heads, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    out = dense_windows(q, k, v, d ** -0.5)
    assert out is not None and out.dtype == dtype
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    if fused:
        q64, k64, v64 = (ref_leaves[0][:, :, i].transpose(1, 2) for i in range(3))
    else:
        q64, k64, v64 = ref_leaves
    expected = torch.softmax(q64 @ k64.transpose(-1, -2) * d ** -0.5, -1) @ v64
    tol, grad_tol = _TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    go = torch.randn(out.shape, generator=g).to(dtype)
    _assert_grads_close(out, leaves, expected, ref_leaves, go, grad_tol, grad_tol)


@needs_kernel
@pytest.mark.parametrize("pattern, grid", [(nf.Blocks((16, 16), grid=(32, 32)), (32, 32)),
                                           (nf.Blocks((12, 15), grid=(24, 30), shift=(5, 7), wrap=True), (24, 30)),
                                           (nf.Blocks((4, 4), grid=(12, 12), shift=(2, 2)), (12, 12))])
def test_auto_runs_window_patterns_on_the_kernel(pattern, grid):
    # large plain windows, cyclically shifted ones, Swin's shifted ones with the region mask: one query tile per window
    from nearfar.dispatch import choose_engine

    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).requires_grad_() for _ in range(3))
    assert choose_engine(q, pattern, n, n) == "blocksparse"
    out = nf.attend(q, k, v, pattern)
    refs, expected, _ = _reference(q, k, v, pattern, 0.25, None)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    _assert_grads_close(out, (q, k, v), expected, refs, torch.randn(out.shape, generator=g), 5e-5, 1e-4)


def test_dense_windows_leave_other_calls_to_sdpa():
    def call(t, d, dtype=torch.float32, kv_heads=2):
        q = torch.randn(2, 2, t, d).to(dtype)
        k = torch.randn(2, kv_heads, t, d).to(dtype)
        return dense_windows(q, k, k.clone(), 0.1)

    fewest, most, widest = DENSE_WINDOWS[torch.float32]
    assert call(fewest - 1, 32) is None  # the window kernel's sizes
    assert call(most + 1, 32) is None  # one tile's buffers past the L2 cache
    assert call(256, widest + 1) is None  # wider heads tie with SDPA
    assert call(256, 32, torch.float64) is None
    assert call(256, 32, kv_heads=1) is None  # GQA: the callers repeat K/V first
    assert call(256, 128, torch.bfloat16) is None
    assert (call(256, 32) is not None) == native.available()
    assert (call(49, 64, torch.bfloat16) is not None) == native.available()
