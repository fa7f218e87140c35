"""Engines ("dense", "blocksparse", "auto") against the float64 oracle: outputs, LSE and gradients."""

from __future__ import annotations

import importlib
import math

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import problems, rmask

import nearfar
from nearfar import Blocks, Causal, Dense, Neighborhood, PerHead, Sinks, SlidingWindow, Strided

ENGINES = ["dense", "blocksparse", "auto"]
#: error bound relative to the max-abs of the reference, per dtype; inputs are O(1), so the max-abs is floored at
#: 1 (otherwise an exactly-zero reference, e.g. dq with a single key, would demand exact zeros from fp32 math)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}
#: gradients sum up to Nq*G terms with cancellation (e.g. dk of a global token): torch's own SDPA in fp32 reaches
#: ~1.02e-5 there (GlobalTokens(1), Nq=256, G=3), so fp32 gradients get a 3x looser bound
GRAD_TOL = {torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float64: 1e-10}
FLOOR = 1.0


def test_engine_registry():
    names = nearfar.engines()
    assert isinstance(names, list)
    assert "dense" in names and "blocksparse" in names


# ---------------------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------------------


def make_tensors(p, dtype):
    gen = torch.Generator().manual_seed(p["seed"])

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mult).to(dtype)

    def qkv_tensor(b, h, n, e, mult=1.0):
        if p.get("bnhd"):  # the usual projection layout (B, N, H, e) seen as (B, H, N, e): not contiguous
            return rnd(b, n, h, e, mult=mult).transpose(1, 2)
        return rnd(b, h, n, e, mult=mult)

    q = qkv_tensor(p["b"], p["hq"], p["nq"], p["d"], mult=1.5)
    k = qkv_tensor(p["b"], p["hkv"], p["nk"], p["d"], mult=1.5)
    v = qkv_tensor(p["b"], p["hkv"], p["nk"], p["dv"])
    go = rnd(p["b"], p["hq"], p["nq"], p["dv"])
    kpm = None
    if p["kpm_kind"] != "none":
        kpm = torch.rand(p["b"], p["nk"], generator=gen) > 0.25
        if p["kpm_kind"] == "empty_item":
            kpm[0] = False
    bias = bias_dense = None
    if p["bias_kind"] == "dense":
        bias = rnd(*p["bias_shape"])
        bias_dense = lambda t: t  # noqa: E731
    elif p["bias_kind"] == "rpb":
        grid, ks, dil = p["rpb_info"]
        bias = rnd(p["hq"], *(2 * kk - 1 for kk in ks))
        bias_dense = lambda t: ref.rpb_bias(t, grid, ks, dil)[None]  # noqa: E731
    return q, k, v, go, kpm, bias, bias_dense


def reference_run(p, q, k, v, go, kpm, bias, bias_dense):
    """float64 oracle outputs and gradients, on the given (possibly rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    allowed = p["mask"]
    allowed = allowed if allowed.dim() == 3 else allowed[None]
    allowed = allowed[None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    d = q.shape[-1]
    scale = p["scale"] if p["scale"] is not None else 1.0 / math.sqrt(d)
    out, lse = ref.dense_reference(*leaves, allowed, scale, bias_dense(b64) if b64 is not None else None,
                                   return_lse=True)
    wrt = leaves + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad((out * go.double()).sum(), wrt)
    allowed = torch.broadcast_to(allowed, (p["b"], p["hq"], p["nq"], p["nk"]))
    return out.detach(), lse.detach(), grads, ~allowed.any(-1)


def assert_close(name, actual, expected, dtype, tol=TOL):
    rtol = tol[dtype]
    assert actual is not None, f"{name}: no gradient"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    bound = rtol * max(expected.abs().max().item() if expected.numel() else 0.0, FLOOR)
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def check_problem(p, dtype, engines=ENGINES):
    q, k, v, go, kpm, bias, bias_dense = make_tensors(p, dtype)
    out_r, lse_r, grads_r, empty = reference_run(p, q, k, v, go, kpm, bias, bias_dense)
    for engine in engines:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        use_bias_grad = bias is not None and p["bias_grad"]
        return_lse = p["return_lse"]
        b = bias.detach().clone().requires_grad_(use_bias_grad) if bias is not None else None
        bias_arg = dict(rpb=b) if p["bias_kind"] == "rpb" else dict(bias=b)
        res = nearfar.attend(*leaves, p["pattern"], scale=p["scale"], key_padding_mask=kpm, engine=engine,
                             return_lse=return_lse, **bias_arg)
        out, lse = res if return_lse else (res, None)
        tag = f"[{engine} {dtype}]"
        assert out.dtype == dtype, tag
        assert_close(f"{tag} out", out, out_r, dtype)
        # a query without any allowed key returns exactly 0
        assert (out.detach()[empty] == 0).all(), f"{tag} empty rows are not 0"
        if lse is not None:
            assert lse.shape == lse_r.shape, tag
            assert torch.equal(torch.isneginf(lse), empty), f"{tag} LSE -inf exactly on empty rows"
            fin = ~empty
            assert_close(f"{tag} lse", lse[fin], lse_r[fin], dtype)
        wrt = leaves + ([b] if use_bias_grad else [])
        grads = torch.autograd.grad((out * go).sum(), wrt)
        for name, g, gr in zip(["dq", "dk", "dv", "dbias"], grads, grads_r):
            assert g.dtype == wrt[["dq", "dk", "dv", "dbias"].index(name)].dtype, f"{tag} {name} dtype"
            assert_close(f"{tag} {name}", g, gr, dtype, GRAD_TOL)


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(problems(modes=("self",), shapes=("none", "base", "base", "union", "inter"), bias_kinds=("none", "none", "rpb")))
def test_self_attention_fp32(p):
    # 1D/2D/3D spatial and positional patterns, unions and intersections, key padding, NAT rpb tables
    check_problem(p, torch.float32)


@settings(max_examples=30)
@given(problems(modes=("cross", "cross", "decode"), shapes=("none", "base", "union", "inter"), bias_kinds=("none",)))
def test_cross_attention_and_decode_fp32(p):
    # Nq != Nk with positional patterns (aligned bottom-right); rows with no keys are common here
    check_problem(p, torch.float32)


@settings(max_examples=30)
@given(problems(max_n=200, shapes=("perhead",), bias_kinds=("none", "dense")))
def test_perhead_and_gqa_fp32(p):
    check_problem(p, torch.float32)


@settings(max_examples=30)
@given(problems(max_n=200, shapes=("none", "base", "union", "perhead"), bias_kinds=("dense",)))
def test_dense_bias_fp32(p):
    # every broadcastable bias shape; with and without bias.requires_grad (fused and matmul kernels)
    check_problem(p, torch.float32)


@settings(max_examples=25)
@given(problems(max_n=160), st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_vs_float64_on_rounded_inputs(p, dtype):
    check_problem(p, dtype, engines=["dense", "blocksparse"])


@settings(max_examples=15)
@given(problems(max_n=120))
def test_float64_inputs(p):
    check_problem(p, torch.float64, engines=["dense", "blocksparse"])


@settings(max_examples=20)
@given(problems(max_n=200, bias_kinds=("none", "dense", "rpb")))
def test_blocksparse_one_tile_per_chunk(p):
    # force many chunks (one tile each) so chunk boundaries, groups and scatter-adds are exercised
    mod = importlib.import_module("nearfar.backends.blocksparse")
    old = mod._CHUNK_BYTES
    mod._CHUNK_BYTES = 1
    try:
        check_problem(p, torch.float32, engines=["blocksparse"])
    finally:
        mod._CHUNK_BYTES = old


@settings(max_examples=20)
@given(st.data())
def test_rpb_table_gradients(data):
    # a NAT relative-position-bias table with gradients, 1D and 2D, dilation, even kernels
    grid = data.draw(st.sampled_from([(37,), (64,), (9, 11), (12, 12), (4, 5, 6)]))
    ks = tuple(data.draw(st.integers(1, min(e, 7))) for e in grid)
    dil = tuple(data.draw(st.integers(1, e // k)) for e, k in zip(grid, ks))
    n = math.prod(grid)
    pattern = Neighborhood(ks, dilation=dil, grid=grid) if len(grid) > 1 else Neighborhood(ks[0], dilation=dil[0])
    p = dict(b=data.draw(st.integers(1, 2)), hkv=data.draw(st.integers(1, 2)), hq=0, d=16, dv=16, nq=n, nk=n,
             pattern=pattern, mask=rmask("neighborhood_mask", grid, ks, dil, (False,) * len(grid),
                                         (1,) * len(grid)),
             rpb_info=(grid, ks, dil), kpm_kind=data.draw(st.sampled_from(["none", "random"])), bias_kind="rpb",
             bias_shape=None, scale=None, bias_grad=True, return_lse=False, seed=data.draw(st.integers(0, 1000)))
    p["hq"] = p["hkv"] * data.draw(st.integers(1, 2))
    check_problem(p, torch.float32, engines=["dense", "blocksparse"])


def _simple_problem(pattern, mask, n, **kw):
    p = dict(b=1, hkv=1, hq=2, d=16, dv=16, nq=n, nk=n, pattern=pattern, mask=mask, rpb_info=None, kpm_kind="none",
             bias_kind="none", bias_shape=None, scale=None, bias_grad=True, return_lse=True, seed=0)
    p.update(kw)
    return p


@pytest.mark.parametrize("bias_shape", [(1, 2, 30, 30), (30, 30)])
def test_dense_bias_grad_through_blocksparse(bias_shape):
    n = 30
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(*bias_shape, requires_grad=True)
    out = nearfar.attend(q, k, v, Neighborhood(5), bias=bias, engine="blocksparse")
    out.sum().backward()
    allowed = rmask("neighborhood_mask", (n,), (5,), (1,), (False,), (1,))
    b64 = bias.detach().double().requires_grad_()
    ref.dense_reference(q, k, v, allowed, 8 ** -0.5, b64).sum().backward()
    assert_close("dbias", bias.grad, b64.grad, torch.float32)


@pytest.mark.parametrize("pattern", [None, Dense(), Dense() | Causal(), PerHead([Dense(), Causal()])])
def test_blocksparse_dense_pattern(pattern):
    torch.manual_seed(6)
    n = 130
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    out = nearfar.attend(q, k, v, pattern, engine="blocksparse")
    mask = torch.ones(n, n, dtype=torch.bool)
    if isinstance(pattern, PerHead):
        mask = torch.stack([mask, ref.causal_mask(n, n)])[None]
    assert_close("out", out, ref.dense_reference(q, k, v, mask, 8 ** -0.5), torch.float32)


@pytest.mark.parametrize("pattern", [None, Dense()])
@pytest.mark.parametrize("engine", ["dense", "auto"])
def test_return_lse_without_any_mask(pattern, engine):
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    out, lse = nearfar.attend(q, k, v, pattern, engine=engine, return_lse=True)
    out_r, lse_r = ref.dense_reference(q, k, v, torch.ones(6, 6, dtype=torch.bool), 8 ** -0.5, return_lse=True)
    assert_close("out", out, out_r, torch.float32)
    assert_close("lse", lse, lse_r, torch.float32)


def test_dense_bias_grad_through_blocksparse_perhead():
    # the PerHead path of the same feature works
    n = 30
    p = _simple_problem(PerHead([Neighborhood(5), Causal()]),
                        torch.stack([rmask("neighborhood_mask", (n,), (5,), (1,), (False,), (1,)),
                                     rmask("causal_mask", n, n)]), n,
                        bias_kind="dense", bias_shape=(1, 2, n, n))
    check_problem(p, torch.float32, engines=["dense", "blocksparse"])


def test_float64_bias_with_float32_inputs_blocksparse():
    torch.manual_seed(7)
    n = 40
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    bias = torch.randn(2, n, n, dtype=torch.float64)
    out = nearfar.attend(q, k, v, Neighborhood(9), bias=bias, engine="blocksparse")
    expected = ref.dense_reference(q, k, v, ref.neighborhood_mask((n,), 9), 8 ** -0.5, bias)
    assert_close("out", out, expected, torch.float32)


@pytest.mark.parametrize("engine", ENGINES)
def test_bias_dtype_may_differ_from_inputs(engine):
    torch.manual_seed(8)
    n = 40
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    for dt in (torch.float16, torch.bfloat16):
        bias = torch.randn(2, n, n).to(dt).requires_grad_(engine == "dense")
        out = nearfar.attend(q, k, v, Neighborhood(9), bias=bias, engine=engine)
        expected = ref.dense_reference(q, k, v, ref.neighborhood_mask((n,), 9), 8 ** -0.5, bias.detach())
        assert_close("out", out, expected, torch.float32)
        if bias.requires_grad:
            out.sum().backward()
            assert bias.grad.dtype == dt


@pytest.mark.parametrize("engine", ENGINES)
def test_non_contiguous_inputs(engine):
    # q/k/v as (B, N, H, d) tensors viewed as (B, H, N, d), the usual projection layout
    torch.manual_seed(9)
    n = 48
    q = torch.randn(2, n, 4, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, n, 2, 16).transpose(1, 2).requires_grad_()
    v = torch.randn(2, n, 2, 24)[..., ::2].transpose(1, 2).requires_grad_()
    pattern = Neighborhood((3, 5), dilation=(2, 1), grid=(6, 8))
    out = nearfar.attend(q, k, v, pattern, engine=engine)
    allowed = ref.neighborhood_mask((6, 8), (3, 5), (2, 1))
    go = torch.randn_like(out)
    grads = torch.autograd.grad((out * go).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = ref.dense_reference(*leaves, allowed, 16 ** -0.5)
    grads_r = torch.autograd.grad((expected * go.double()).sum(), leaves)
    assert_close("out", out, expected.detach(), torch.float32)
    for g, gr in zip(grads, grads_r):
        assert_close("grad", g, gr, torch.float32, GRAD_TOL)


@pytest.mark.parametrize("engine", ENGINES)
def test_minus_inf_bias_masks_keys(engine):
    torch.manual_seed(10)
    n = 20
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    bias = torch.zeros(1, 1, n, n)
    bias[..., 3, :] = float("-inf")  # row 3: no key left
    bias[..., 5, :4] = float("-inf")
    out, lse = nearfar.attend(q, k, v, Causal(), bias=bias, engine=engine, return_lse=True)
    allowed = ref.causal_mask(n, n) & torch.isfinite(bias[0, 0])
    out_r, lse_r = ref.dense_reference(q, k, v, allowed, 8 ** -0.5, return_lse=True)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    assert_close("out", out, out_r, torch.float32)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_r))


@pytest.mark.parametrize("engine", ENGINES)
def test_large_logits_are_stable(engine):
    # logits in the thousands: a softmax without max-subtraction would overflow
    torch.manual_seed(11)
    n = 64
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    out, lse = nearfar.attend(q * 30, k * 30, v, Neighborhood(7) | Sinks(2), engine=engine, scale=5.0,
                              return_lse=True)
    allowed = ref.neighborhood_mask((n,), 7) | ref.sinks_mask(n, n, 2)
    out_r, lse_r = ref.dense_reference(q * 30, k * 30, v, allowed, 5.0, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close("out", out, out_r, torch.float32, {torch.float32: 1e-4})
    assert_close("lse", lse, lse_r, torch.float32)


@pytest.mark.parametrize("engine", ENGINES)
def test_union_of_spatial_patterns_on_different_grids(engine):
    # one token sequence seen as a 6x8 grid by one part and an 8x6 grid by the other
    torch.manual_seed(12)
    n = 48
    pattern = Neighborhood((3, 3), grid=(6, 8)) | Blocks((2, 3), grid=(8, 6), shift=(1, 0))
    allowed = ref.neighborhood_mask((6, 8), (3, 3)) | ref.swin_mask((8, 6), (2, 3), (1, 0))
    q, k, v = (torch.randn(2, 2, n, 8) for _ in range(3))
    out = nearfar.attend(q, k, v, pattern & Causal(), engine=engine)
    expected = ref.dense_reference(q, k, v, allowed & ref.causal_mask(n, n), 8 ** -0.5)
    assert_close("out", out, expected, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# fully masked rows, LSE
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_fully_masked_batch_item_returns_zero(engine):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 20, 8, requires_grad=True) for _ in range(3))
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False
    out, lse = nearfar.attend(q, k, v, Neighborhood(5), key_padding_mask=kpm, engine=engine, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_sliding_window_cross_attention_rows_without_keys(engine):
    # Nk < Nq: query i sits at p = i - (Nq - Nk); the first queries have no key at all
    torch.manual_seed(1)
    nq, nk = 40, 10
    q = torch.randn(1, 1, nq, 8, requires_grad=True)
    k, v = (torch.randn(1, 1, nk, 8, requires_grad=True) for _ in range(2))
    out, lse = nearfar.attend(q, k, v, SlidingWindow(3), engine=engine, return_lse=True)
    empty = ~ref.sliding_window_mask(nq, nk, 3).any(-1)
    assert empty.sum() == nq - nk  # queries 0..29 sit before the first key
    assert (out[0, 0, empty] == 0).all()
    assert torch.isneginf(lse[0, 0, empty]).all() and torch.isfinite(lse[0, 0, ~empty]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0, 0, empty] == 0).all()
    out_r, lse_r = ref.dense_reference(q, k, v, ref.sliding_window_mask(nq, nk, 3), 8 ** -0.5, return_lse=True)
    assert_close("out", out, out_r, torch.float32)
    assert_close("lse", lse[0, 0, ~empty], lse_r[0, 0, ~empty], torch.float32)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_return_lse_matches_float64_logsumexp(engine, dtype):
    torch.manual_seed(2)
    n = 50
    q, k, v = (torch.randn(2, 2, n, 16).to(dtype) for _ in range(3))
    pattern = Causal() & Strided(3, offset=2)  # queries 0 and 1 have no key
    out, lse = nearfar.attend(q, k, v, pattern, engine=engine, return_lse=True)
    assert lse.shape == (2, 2, n) and lse.dtype in (torch.float32, dtype)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * 16 ** -0.5
    allowed = ref.causal_mask(n, n) & ref.strided_mask(n, n, 3, 2)
    expected = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))
    fin = torch.isfinite(expected)
    assert_close("lse", lse[fin], expected[fin], dtype)
    assert (out[:, :, :2] == 0).all()


def test_causal_neighborhood_query0_output_is_v0():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    for engine in ENGINES:
        out = nearfar.attend(q, k, v, Neighborhood(4, is_causal=True), engine=engine)
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# medium sizes: blocksparse vs float64 reference
# ---------------------------------------------------------------------------------------------------------


def test_medium_2d_neighborhood_13x13_on_40x40_with_rpb():
    grid, ks = (40, 40), (13, 13)
    n = 1600
    p = _simple_problem(Neighborhood(ks, grid=grid), rmask("neighborhood_mask", grid, ks, (1, 1), (False, False),
                                                         (1, 1)), n, rpb_info=(grid, ks, (1, 1)), bias_kind="rpb",
                        kpm_kind="random", d=16, dv=16, seed=11)
    check_problem(p, torch.float32, engines=["blocksparse", "auto"])


def test_medium_2d_dilated_neighborhood_on_40x40():
    grid, ks, dil = (40, 40), (7, 7), (3, 2)
    p = _simple_problem(Neighborhood(ks, dilation=dil, grid=grid),
                        rmask("neighborhood_mask", grid, ks, dil, (False, False), (1, 1)), 1600, seed=12)
    check_problem(p, torch.float32, engines=["blocksparse"])


def test_medium_1d_neighborhood_65_on_1000():
    n = 1000
    p = _simple_problem(Neighborhood(65), rmask("neighborhood_mask", (n,), (65,), (1,), (False,), (1,)), n,
                        b=2, hkv=1, hq=2, d=24, dv=16, kpm_kind="random", seed=13)
    check_problem(p, torch.float32, engines=["blocksparse"])


def test_medium_1d_causal_dilated_neighborhood_on_1000():
    n = 1000
    p = _simple_problem(Neighborhood(33, dilation=4, is_causal=True),
                        rmask("neighborhood_mask", (n,), (33,), (4,), (True,), (1,)), n, hq=4, hkv=2, seed=14)
    check_problem(p, torch.float32, engines=["blocksparse"])


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------


def test_torch_compile_dense_engine():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    pattern = Neighborhood(5)

    def f(q, k, v):
        return nearfar.attend(q, k, v, pattern, engine="dense")

    compiled = torch.compile(f)
    out = compiled(q, k, v)
    expected = ref.dense_reference(q, k, v, ref.neighborhood_mask((16,), 5), 8 ** -0.5)
    assert_close("compiled out", out, expected, torch.float32)


def test_engine_override_routes_auto_calls_and_restores():
    from nearfar.backends import dense as dense_backend

    q, k, v = (torch.randn(1, 2, 1100, 8) for _ in range(3))  # above the size "auto" sends to the dense engine
    pattern = nearfar.SlidingWindow(left=7) & nearfar.Causal()
    calls = []
    original = dense_backend.dense_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    attend_module = importlib.import_module("nearfar.dispatch")
    attend_module.dense_attention = spy
    try:
        with nearfar.engine_override("dense"):
            inside = nearfar.attend(q, k, v, pattern)
        assert calls, "the override did not route the call to the dense engine"
        calls.clear()
        nearfar.attend(q, k, v, pattern)
        assert not calls, "outside the override auto must not pick the dense engine at this size"
    finally:
        attend_module.dense_attention = original
    torch.testing.assert_close(inside, nearfar.attend(q, k, v, pattern, engine="blocksparse"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="engine must be one of"):
        with nearfar.engine_override("fast"):
            pass


@pytest.mark.parametrize("patterns", [
    [Causal(), Causal(), SlidingWindow(9) & Causal(), SlidingWindow(9) & Causal()],  # whole GQA groups
    [Causal(), SlidingWindow(9) & Causal(), Causal(), Strided(5) & Causal()],  # groups split between patterns
])
def test_per_head_patterns_run_one_call_per_pattern_exactly(patterns):
    """``PerHead`` on the block-sparse engine runs one call per distinct pattern (GQA kept where whole groups share a
    pattern, K/V per query head otherwise): outputs, LSE and q/k/v gradients equal the dense reference."""
    torch.manual_seed(7)
    n = 200
    q = torch.randn(1, 4, n, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(2))
    out, lse = nearfar.attend(q, k, v, PerHead(patterns), engine="blocksparse", return_lse=True)
    mask = torch.stack([p.mask(n, n) for p in patterns])[None]
    kr, vr = (t.repeat_interleave(2, 1) for t in (k, v))
    out_r, lse_r = ref.dense_reference(q, kr, vr, mask, 8 ** -0.5, return_lse=True)
    assert_close("out", out, out_r, torch.float32)
    assert_close("lse", lse, lse_r, torch.float32)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    grads_r = torch.autograd.grad((out_r * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads_r):
        assert_close(f"d{name}", a, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backward_on_non_contiguous_tile_groups(dtype):
    # found by the fuzzer: tile groups that are not runs of tiles are written back with index_copy_, which does not
    # cast the float32 chunk results to the inputs' half dtype (RuntimeError in the backward pass)
    torch.manual_seed(13)
    pattern = SlidingWindow(1, 1) | nearfar.Grid((1,), grid=(3,))
    q, k, v = (torch.randn(2, 2, 3, 8).to(dtype).requires_grad_() for _ in range(3))
    out = nearfar.attend(q, k, v, pattern, engine="blocksparse")
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = ref.dense_reference(*leaves, pattern.mask(3, 3), 8 ** -0.5)
    want_grads = torch.autograd.grad(want.sum(), leaves)
    assert_close("out", out, want.detach(), dtype)
    for g, w in zip(grads, want_grads):
        assert_close("grad", g, w, dtype, GRAD_TOL)


@pytest.mark.parametrize("grid", [(24, 24), (12, 20)])
def test_2d_tiles_without_any_key(grid):
    # found by the fuzzer: Neighborhood & GlobalTokens(1) leaves whole bands of 2D tiles without a key; they were
    # staged as runs of width 0, and PyTorch's CPU flash kernel divides by the key count (the process died, SIGFPE)
    torch.manual_seed(14)
    n = grid[0] * grid[1]
    pattern = Neighborhood((3, 3), grid=grid) & nearfar.GlobalTokens(1)
    p = _simple_problem(pattern, pattern.mask(n, n), n, b=2, kpm_kind="random")
    check_problem(p, torch.float32, engines=["blocksparse", "auto"])
