"""Bad input raises ValueError/TypeError naming the offending parameter, before any work is done."""

from __future__ import annotations

import time

import pytest
import torch

import nearfar
import nearfar.plan
from nearfar import (
    Blocks,
    Causal,
    Dense,
    GlobalTokens,
    Grid,
    Neighborhood,
    Pattern,
    PerHead,
    Sinks,
    SlidingWindow,
    Strided,
)


def qkv(b=1, hq=2, hkv=2, nq=16, nk=16, d=8, dv=8, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, dv, dtype=dtype))


# ---------------------------------------------------------------------------------------------------------
# pattern constructors
# ---------------------------------------------------------------------------------------------------------

BAD_INTS = [(0, ValueError), (-3, ValueError), (2.0, TypeError), (2.5, TypeError), ("3", TypeError),
            (True, TypeError), (None, TypeError)]


@pytest.mark.parametrize("value,exc", BAD_INTS)
@pytest.mark.parametrize("make,name", [
    (lambda x: Neighborhood(x), "kernel_size"),
    (lambda x: Neighborhood(3, dilation=x), "dilation"),
    (lambda x: Neighborhood(3, stride=x), "stride"),
    (lambda x: Neighborhood((3, x), grid=(8, 8)), "kernel_size"),
    (lambda x: Neighborhood((3, 3), dilation=(1, x), grid=(8, 8)), "dilation"),
    (lambda x: Blocks(x), "size"),
    (lambda x: Blocks((2, x), grid=(4, 4)), "size"),
    (lambda x: Grid(x), "size"),
    (lambda x: Strided(x), "stride"),
    (lambda x: Sinks(x), "n"),
    (lambda x: GlobalTokens(x), "n"),
])
def test_non_positive_or_non_integer_sizes(make, name, value, exc):
    with pytest.raises(exc, match=name):
        make(value)


@pytest.mark.parametrize("make,name", [
    (lambda: SlidingWindow(-1), "left"),
    (lambda: SlidingWindow(3, -1), "right"),
    (lambda: SlidingWindow(2.0), "left"),
    (lambda: Strided(2, offset=-1), "offset"),
    (lambda: Blocks(4, shift=-1), "shift"),
    (lambda: Blocks(4, shift=4), "shift"),
    (lambda: Blocks(4, shift=1.5), "shift"),
    (lambda: Blocks(4, wrap=1), "wrap"),
    (lambda: Neighborhood(3, is_causal=1), "is_causal"),
    (lambda: Neighborhood(3, stride=4), "stride"),
])
def test_other_bad_pattern_arguments(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


@pytest.mark.parametrize("make", [
    lambda: Neighborhood(5, grid=(4,)),
    lambda: Neighborhood(3, dilation=3, grid=(8,)),
    lambda: Neighborhood((3, 5), dilation=(1, 2), grid=(8, 9)),
    lambda: Neighborhood((2, 2, 4), grid=(2, 2, 3)),
])
def test_kernel_times_dilation_beyond_extent(make):
    with pytest.raises(ValueError, match="kernel_size"):
        make()


@pytest.mark.parametrize("pattern,n", [(Neighborhood(9), 8), (Neighborhood(3, dilation=4), 11)])
def test_kernel_beyond_extent_at_call_time(pattern, n):
    q, k, v = qkv(nq=n, nk=n)
    with pytest.raises(ValueError, match="kernel_size"):
        nearfar.attend(q, k, v, pattern)


@pytest.mark.parametrize("make,name", [
    (lambda: Blocks(5, grid=(4,)), "size"),
    (lambda: Blocks((4, 4), grid=(4, 6), wrap=True), "size"),
    (lambda: Grid(3, grid=(8,)), "size"),
    (lambda: Grid((2, 5), grid=(4, 8)), "size"),
])
def test_window_sizes_not_fitting_the_extent(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make", [
    lambda: Neighborhood((3, 3)),
    lambda: Neighborhood(3, dilation=(1, 2)),
    lambda: Blocks((2, 2)),
    lambda: Blocks(2, shift=(0, 1)),
    lambda: Grid((2, 2)),
    lambda: Neighborhood((3, 3, 3), is_causal=(True, False, False)),
])
def test_missing_grid_for_2d_3d(make):
    with pytest.raises(ValueError, match="grid"):
        make()


@pytest.mark.parametrize("make,name", [
    (lambda: Neighborhood((3, 3, 3), grid=(8, 8)), "kernel_size"),
    (lambda: Neighborhood(3, dilation=(1, 1, 1), grid=(8, 8)), "dilation"),
    (lambda: Neighborhood(3, stride=(1,), grid=(8, 8)), "stride"),
    (lambda: Neighborhood(3, is_causal=(True,), grid=(8, 8)), "is_causal"),
    (lambda: Blocks((2, 2), grid=(4, 4, 4)), "size"),
    (lambda: Blocks(2, shift=(1, 1, 1), grid=(4, 4)), "shift"),
    (lambda: Grid((2,), grid=(4, 4)), "size"),
])
def test_per_axis_tuple_of_wrong_length(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("grid", [(0, 4), (4, -1), (2.0, 4), (1, 1, 1, 1), "8x8", ()])
def test_bad_grid(grid):
    with pytest.raises((ValueError, TypeError), match="grid"):
        Neighborhood(1, grid=grid)


def test_disagreeing_per_axis_tuples_name_the_parameters():
    with pytest.raises(ValueError, match="kernel_size|dilation|grid"):
        Neighborhood((3, 3), dilation=(1, 1, 1))


@pytest.mark.parametrize("pattern,n", [
    (Neighborhood((3, 3), grid=(4, 4)), 15),
    (Blocks((2, 2), grid=(4, 4)), 20),
    (Grid((2, 2), grid=(4, 4)), 8),
    (Neighborhood(3, grid=(16,)), 17),
])
def test_grid_not_matching_sequence_length(pattern, n):
    q, k, v = qkv(nq=n, nk=n)
    with pytest.raises(ValueError, match="grid"):
        nearfar.attend(q, k, v, pattern)
    with pytest.raises(ValueError, match="grid"):
        pattern.mask(n, n)


@pytest.mark.parametrize("pattern", [Neighborhood(3), Blocks(2), Grid(2), Neighborhood(3) | Causal()])
def test_spatial_patterns_need_nq_equal_nk(pattern):
    q, k, v = qkv(nq=8, nk=10)
    with pytest.raises(ValueError, match="Nq|Nk|queries"):
        nearfar.attend(q, k, v, pattern)


# ---------------------------------------------------------------------------------------------------------
# attend(): tensors
# ---------------------------------------------------------------------------------------------------------


def test_wrong_ranks():
    q, k, v = qkv()
    for bad, name in [((q[0], k, v), "q"), ((q, k[0], v), "k"), ((q, k, v[0]), "v"), ((q[None], k, v), "q")]:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            nearfar.attend(*bad)


def test_not_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"\bq\b"):
        nearfar.attend(q.tolist(), k, v)
    with pytest.raises(TypeError, match=r"\bv\b"):
        nearfar.attend(q, k, None)


def test_empty_tensors():
    q, k, v = qkv(nq=0)
    with pytest.raises(ValueError, match=r"\bq\b"):
        nearfar.attend(q, k, v)


@pytest.mark.parametrize("hq,hkv", [(3, 2), (2, 4), (5, 3)])
def test_head_counts_not_dividing(hq, hkv):
    q, k, v = qkv(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match="head"):
        nearfar.attend(q, k, v)


def test_mismatches():
    q, k, v = qkv()
    cases = [
        ((q, k, torch.randn(1, 1, 16, 8)), "head"),  # k and v heads differ
        ((q, torch.randn(1, 2, 16, 4), v), "head dim"),  # d of q and k
        ((torch.randn(2, 2, 16, 8), k, v), "batch"),
        ((q, k, torch.randn(2, 2, 16, 8)), "batch"),
        ((q, k, torch.randn(1, 2, 15, 8)), "length|Nk"),
    ]
    for args, pat in cases:
        with pytest.raises(ValueError, match=pat):
            nearfar.attend(*args)


def test_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype"):
        nearfar.attend(q, k.double(), v)
    with pytest.raises(TypeError, match="dtype"):
        nearfar.attend(q.half(), k.half(), v.bfloat16())
    for dt in (torch.int32, torch.int64, torch.bool, torch.uint8):
        with pytest.raises(TypeError, match="dtype"):
            nearfar.attend(q.to(dt), k.to(dt), v.to(dt))
    with pytest.raises(TypeError, match="dtype"):
        nearfar.attend(q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64))


@pytest.mark.parametrize("engine", ["Dense", "sparse", "", None, 1, "flash"])
def test_unknown_engine(engine):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match="engine"):
        nearfar.attend(q, k, v, engine=engine)


@pytest.mark.parametrize("mask,exc", [
    (torch.ones(1, 15, dtype=torch.bool), ValueError),
    (torch.ones(2, 16, dtype=torch.bool), ValueError),
    (torch.ones(16, dtype=torch.bool), ValueError),
    (torch.ones(1, 1, 16, dtype=torch.bool), ValueError),
    (torch.ones(1, 16), TypeError),
    (torch.ones(1, 16, dtype=torch.int64), TypeError),
    ([[True] * 16], TypeError),
])
def test_bad_key_padding_mask(mask, exc):
    q, k, v = qkv()
    with pytest.raises(exc, match="key_padding_mask"):
        nearfar.attend(q, k, v, Causal(), key_padding_mask=mask)


@pytest.mark.parametrize("heads", [1, 3])
def test_perhead_length_not_matching_query_heads(heads):
    q, k, v = qkv(hq=2, hkv=1)
    with pytest.raises(ValueError, match="PerHead|head"):
        nearfar.attend(q, k, v, PerHead([Causal()] * heads))
    with pytest.raises(ValueError, match="PerHead|head"):
        nearfar.attend(q, k, v, PerHead([Causal()] * heads) | Sinks(1))


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, float("nan"), float("inf"), "0.5", True, torch.tensor(0.5), [1.0]])
def test_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match="scale"):
        nearfar.attend(q, k, v, scale=scale)


@pytest.mark.parametrize("shape", [(16, 15), (3, 16, 16), (1, 2, 16, 16, 1), (2, 1, 16, 16, 1), (17,)])
def test_bias_of_non_broadcastable_shape(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bias"):
        nearfar.attend(q, k, v, Causal(), bias=torch.randn(*shape))


@pytest.mark.parametrize("engine", ["dense", "blocksparse"])
@pytest.mark.parametrize("shape", [(3, 2, 16, 16), (1, 2, 4, 16)])
def test_bias_bigger_than_a_size_one_dim(engine, shape):
    q, k, v = qkv(b=1, nq=1 if shape[2] == 4 else 16)
    with pytest.raises(ValueError, match="bias"):
        nearfar.attend(q, k, v, Causal(), bias=torch.randn(*shape), engine=engine)


def test_bad_bias_type_and_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="bias"):
        nearfar.attend(q, k, v, bias=[[0.0] * 16] * 16)
    with pytest.raises(TypeError, match="bias"):
        nearfar.attend(q, k, v, bias=torch.zeros(16, 16, dtype=torch.int64))


@pytest.mark.parametrize("pattern", [Neighborhood(3, is_causal=True), Neighborhood(3, stride=2)])
def test_rpb_table_needs_noncausal_stride1(pattern):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="relative-position-bias|rpb|causal|stride"):
        nearfar.attend(q, k, v, pattern, rpb=torch.zeros(2, 5))


def test_bad_pattern_and_return_lse_types():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="pattern"):
        nearfar.attend(q, k, v, "causal")
    with pytest.raises(TypeError, match="pattern"):
        nearfar.attend(q, k, v, torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="return_lse"):
        nearfar.attend(q, k, v, return_lse=1)


# ---------------------------------------------------------------------------------------------------------
# "validate before any work"
# ---------------------------------------------------------------------------------------------------------


class SpyPattern(Pattern):
    """Allows everything, but fails the test if any engine or planner evaluates it."""

    def allowed(self, q, k, nq, nk):
        raise AssertionError("work started: pattern evaluated before validation finished")

    def block_allowed(self, qt, kt, nq, nk):
        raise AssertionError("work started: pattern evaluated before validation finished")

    def mask(self, nq, nk, device=None):
        raise AssertionError("work started: pattern evaluated before validation finished")

    def _key(self):
        return ("SpyPattern",)


def _bad_calls():
    q, k, v = qkv()
    return [
        (dict(q=q, k=k, v=v[:, :1]), ValueError),
        (dict(q=q, k=k, v=v, key_padding_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError),
        (dict(q=q, k=k, v=v, key_padding_mask=torch.ones(1, 16)), TypeError),
        (dict(q=q, k=k, v=v, bias=torch.randn(5, 5)), ValueError),
        (dict(q=q, k=k, v=v, scale=-1.0), ValueError),
        (dict(q=q, k=k, v=v, engine="nope"), ValueError),
        (dict(q=q, k=k.double(), v=v), TypeError),
        (dict(q=q, k=k, v=v, return_lse="yes"), TypeError),
    ]


@pytest.mark.parametrize("engine", ["dense", "blocksparse", "auto"])
def test_errors_come_before_any_work(engine, monkeypatch):
    def no_plan(*args, **kwargs):
        raise AssertionError("work started: a plan was built before validation finished")

    monkeypatch.setattr(nearfar.plan, "build_plan", no_plan, raising=False)
    for kwargs, exc in _bad_calls():
        kwargs.setdefault("engine", engine)
        with pytest.raises(exc):
            nearfar.attend(pattern=SpyPattern(), **kwargs)
        with pytest.raises(exc):
            nearfar.attend(pattern=SpyPattern() | Causal(), **kwargs)


def test_expensive_plan_is_never_built_for_invalid_input():
    grid = (512, 512)
    n = grid[0] * grid[1]
    pattern = Neighborhood((13, 13), dilation=(3, 2), grid=grid)
    q, k, v = qkv(b=1, hq=1, hkv=1, nq=n, nk=n, d=4, dv=4)
    before = list(nearfar.cache.CACHE.keys())
    bad = [
        dict(key_padding_mask=torch.ones(1, n - 1, dtype=torch.bool)),
        dict(bias=torch.randn(1, 7, 7)),  # neither broadcastable nor the rpb table shape (1, 25, 25)
        dict(scale=0.0),
        dict(engine="blocksparse", return_lse=None),
    ]
    for kwargs in bad:
        kwargs.setdefault("engine", "blocksparse")
        t0 = time.perf_counter()
        with pytest.raises((ValueError, TypeError)):
            nearfar.attend(q, k, v, pattern, **kwargs)
        assert time.perf_counter() - t0 < 1.0
    # a wrong number of tokens for the grid, too
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="grid"):
        nearfar.attend(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], pattern, engine="blocksparse")
    assert time.perf_counter() - t0 < 1.0
    assert list(nearfar.cache.CACHE.keys()) == before


def test_valid_calls_still_work_after_validation_tests():
    # sanity: the same shapes with valid arguments run on every engine
    q, k, v = qkv()
    for engine in ["dense", "blocksparse", "auto"]:
        out = nearfar.attend(q, k, v, Neighborhood(3) | Sinks(1), engine=engine,
                             key_padding_mask=torch.ones(1, 16, dtype=torch.bool), scale=0.5)
        assert out.shape == (1, 2, 16, 8)
    assert nearfar.attend(q, k, v, Dense()).shape == (1, 2, 16, 8)


def test_device_mismatch():
    # "meta" tensors stand in for a second device on a CPU-only machine
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        nearfar.attend(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_padding_mask"):
        nearfar.attend(q, k, v, key_padding_mask=torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="bias"):
        nearfar.attend(q, k, v, bias=torch.zeros(q.shape[2], k.shape[2], device="meta"))


@pytest.mark.parametrize("call", ["forward", "loss", "generate"])
@pytest.mark.parametrize("bad", [10, -1])
def test_tinylm_token_ids_out_of_range(call, bad):
    from nearfar.models.tiny_lm import TinyLM

    lm = TinyLM(10, dim=16, depth=1, num_heads=2)
    tokens = torch.tensor([[1, 2, 3, bad]])
    name = "prompt" if call == "generate" else "tokens"
    run = {"forward": lambda: lm(tokens), "loss": lambda: lm.loss(tokens), "generate": lambda: lm.generate(tokens, 2)}
    with pytest.raises(ValueError, match=rf"{name} must hold token ids in \[0, 10\).*got {bad}"):
        run[call]()
