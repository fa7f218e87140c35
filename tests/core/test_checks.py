"""nearfar.checks: every check's accepted values and its rejections (exception type, and a message naming the
parameter and the allowed range), and the one qk_scale rule across every layer that takes qk_scale."""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import pytest
import torch

import nearfar
from nearfar.checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_grid,
    check_int_range,
    check_nonneg_int,
    check_per_axis,
    check_positive_float,
    check_positive_int,
    check_real_range,
    check_same_dtype_device,
    check_scale,
)

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------------ ints
@pytest.mark.parametrize("value", [1, 2, 10**12])
def test_positive_int_accepts(value):
    assert check_positive_int(value, "size") == value


@pytest.mark.parametrize("value", [0, -1, -(10**12)])
def test_positive_int_rejects_out_of_range(value):
    with pytest.raises(ValueError, match=r"size must be a positive int \(>= 1\)"):
        check_positive_int(value, "size")


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, (1,), torch.tensor(1)])
def test_positive_int_rejects_other_types(value):
    with pytest.raises(TypeError, match="size must be a positive int"):
        check_positive_int(value, "size")


@pytest.mark.parametrize("value", [0, 1, 7])
def test_nonneg_int_accepts(value):
    assert check_nonneg_int(value, "shift") == value


def test_nonneg_int_rejects():
    with pytest.raises(ValueError, match=r"shift must be a non-negative int \(>= 0\), got -1"):
        check_nonneg_int(-1, "shift")
    for bad in (True, 0.0, "0", None):
        with pytest.raises(TypeError, match="shift must be a non-negative int"):
            check_nonneg_int(bad, "shift")


@pytest.mark.parametrize("value", [1, 3, 5])
def test_int_range_accepts(value):
    assert check_int_range(value, "pdim", 1, 5) == value


def test_int_range_rejects():
    for bad in (0, 6, -3):
        with pytest.raises(ValueError, match=r"pdim must be in \[1, 5\]"):
            check_int_range(bad, "pdim", 1, 5)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match=r"pdim must be an int in \[1, 5\]"):
            check_int_range(bad, "pdim", 1, 5)


# ---------------------------------------------------------------------------------------------------- floats
@pytest.mark.parametrize("value", [1, 0.5, 1e-30, 1e30, Fraction(1, 3)])
def test_positive_float_accepts(value):
    out = check_positive_float(value, "lr")
    assert isinstance(out, float) and out == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, NAN, INF, -INF])
def test_positive_float_rejects_out_of_range(value):
    with pytest.raises(ValueError, match=r"lr must be a positive finite number \(0 < lr < inf\)"):
        check_positive_float(value, "lr")


@pytest.mark.parametrize("value", [True, "1.0", None, 1j, torch.tensor(1.0)])
def test_positive_float_rejects_other_types(value):
    with pytest.raises(TypeError, match="lr must be a positive finite number"):
        check_positive_float(value, "lr")


def test_real_range_closed_and_open():
    assert check_real_range(0, "alpha", 0, 1) == 0.0 and check_real_range(1, "alpha", 0, 1) == 1.0
    assert check_real_range(0.5, "p", 0, 1, open_low=True, open_high=True) == 0.5
    for bad in (-0.1, 1.1, NAN):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            check_real_range(bad, "alpha", 0, 1)
    for bad in (0, 1):
        with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\)"):
            check_real_range(bad, "p", 0, 1, open_low=True, open_high=True)
    with pytest.raises(ValueError, match=r"max_lr must be a number in \[0, inf\)"):
        check_real_range(INF, "max_lr", 0, math.inf, open_high=True)
    for bad in (True, "0.5", None):
        with pytest.raises(TypeError, match=r"alpha must be a number in \[0, 1\]"):
            check_real_range(bad, "alpha", 0, 1)


@pytest.mark.parametrize("value", [None, 1, 0.125, 1e-8, 1e8])
def test_scale_accepts(value):
    out = check_scale(value)
    assert out is None if value is None else (isinstance(out, float) and out == value)


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, NAN, INF, -INF])
def test_scale_rejects_out_of_range(value):
    with pytest.raises(ValueError, match=r"qk_scale must be None or a positive finite number \(0 < qk_scale < inf\)"):
        check_scale(value)


@pytest.mark.parametrize("value", [True, False, "0.5", (0.5,), torch.tensor(0.5)])
def test_scale_rejects_other_types(value):
    with pytest.raises(TypeError, match="qk_scale must be None or a positive finite number"):
        check_scale(value)


def test_scale_names_its_parameter():
    with pytest.raises(ValueError, match=r"^scale must be None or a positive finite number"):
        check_scale(0, "scale")


# ----------------------------------------------------------------------------------------------------- bools
def test_bool():
    assert check_bool(True, "causal") is True and check_bool(False, "causal") is False
    for bad in (0, 1, None, "True", torch.tensor(True)):
        with pytest.raises(TypeError, match="causal must be a bool"):
            check_bool(bad, "causal")


# -------------------------------------------------------------------------------------------- axes and grids
def test_per_axis_broadcasts_and_checks_each_entry():
    assert check_per_axis(3, 2, "window_size") == (3, 3)
    assert check_per_axis((3, 4), 2, "window_size") == (3, 4)
    assert check_per_axis([3, 4, 5], 3, "window_size") == (3, 4, 5)
    assert check_per_axis(0, 2, "shift", check=check_nonneg_int) == (0, 0)
    assert check_per_axis((True, False), 2, "is_causal", check=check_bool) == (True, False)
    with pytest.raises(ValueError, match="window_size has 3 entries but the pattern is 2D"):
        check_per_axis((3, 4, 5), 2, "window_size")
    with pytest.raises(ValueError, match=r"window_size\[1\] must be a positive int \(>= 1\)"):
        check_per_axis((3, 0), 2, "window_size")
    with pytest.raises(TypeError, match=r"window_size\[0\] must be a positive int"):
        check_per_axis((3.0, 4), 2, "window_size")
    with pytest.raises(TypeError, match="window_size must be a positive int"):
        check_per_axis("3", 2, "window_size")
    with pytest.raises(TypeError, match=r"is_causal\[1\] must be a bool"):
        check_per_axis((True, 1), 2, "is_causal", check=check_bool)


def test_grid():
    assert check_grid(None) is None
    assert check_grid(7) == (7,)
    assert check_grid((4, 5)) == (4, 5) and check_grid([2, 3, 4]) == (2, 3, 4)
    for bad in ((), (1, 2, 3, 4), "7", 7.0):
        with pytest.raises(ValueError, match="grid must be a tuple of 1 to 3 positive ints"):
            check_grid(bad)
    with pytest.raises(ValueError, match=r"grid\[1\] must be a positive int \(>= 1\)"):
        check_grid((4, 0))
    with pytest.raises(TypeError, match=r"grid\[0\] must be a positive int"):
        check_grid((True, 4))


# ------------------------------------------------------------------------------------------- heads and shapes
def test_dim_heads():
    assert check_dim_heads(32, 4) == 8 and check_dim_heads(7, 1) == 7
    for dim, heads in ((10, 3), (0, 1), (8, 0), (-8, 2), (8.0, 2), (8, True), (True, 1)):
        with pytest.raises(ValueError, match="must be a positive multiple of num_heads"):
            check_dim_heads(dim, heads)


def test_channels_last():
    assert check_channels_last(torch.zeros(2, 3, 4, 8), 2, 8) == (2, (3, 4), 12)
    assert check_channels_last(torch.zeros(1, 5, 8), 1, 8) == (1, (5,), 5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        check_channels_last([[0.0]], 2, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 8\) channel-last, got \(2, 8, 3, 4\)"):
        check_channels_last(torch.zeros(2, 8, 3, 4), 2, 8)
    with pytest.raises(ValueError, match=r"feat must be \(B, T, H, W, 8\) channel-last"):
        check_channels_last(torch.zeros(2, 3, 4, 8), 3, 8, name="feat")
    with pytest.raises(ValueError, match="x must not be empty"):
        check_channels_last(torch.zeros(2, 0, 4, 8), 2, 8)


def test_same_dtype_device():
    a, b = torch.zeros(2), torch.ones(3)
    assert check_same_dtype_device(q=a, k=b) == (torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="q, k, v must share one dtype, got torch.float32, torch.float64"):
        check_same_dtype_device(q=a, k=b.double(), v=a)
    with pytest.raises(ValueError, match="q, k must be on one device, got cpu, meta"):  # meta: a second device
        check_same_dtype_device(q=a, k=torch.zeros(2, device="meta"))


# --------------------------------------------------------------------------------- one qk_scale rule everywhere
def _takes_qk_scale():
    seen, out = set(), []
    for m in nearfar.mechanisms():
        if m.cls is not None and m.cls not in seen and "qk_scale" in inspect.signature(m.cls).parameters:
            seen.add(m.cls)
            out.append(pytest.param(m.cls, id=m.name))
    return out


LAYERS = _takes_qk_scale()
#: values for constructor arguments without a default, beyond (dim, num_heads)
REQUIRED = {"kernel_size": 3}


def _build(cls, **kwargs):
    params = inspect.signature(cls).parameters
    needed = [n for n, p in list(params.items())[2:] if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in needed if n not in REQUIRED]
    assert not missing, f"{cls.__name__} needs {missing}: add them to REQUIRED"
    return cls(32, 2, **{n: REQUIRED[n] for n in needed}, **kwargs)


def test_the_qk_scale_layers_are_found():
    # a test over no layer would pass whatever they do
    names = {p.values[0].__name__ for p in LAYERS}
    assert {"WindowAttention", "NeighborhoodAttention", "HiLo", "UniFormerGlobalMHRA", "MAFAttention"} <= names
    assert len(LAYERS) >= 10


@pytest.mark.parametrize("cls", LAYERS)
def test_every_layer_applies_the_one_qk_scale_rule(cls):
    _build(cls, qk_scale=0.5)  # a valid scale builds
    for bad in (0, 0.0, -1, -1.0, NAN, INF):
        with pytest.raises(ValueError, match=r"qk_scale must be None or a positive finite number \(0 < qk_scale"):
            _build(cls, qk_scale=bad)
    for bad in (True, "0.5"):
        with pytest.raises(TypeError, match="qk_scale must be None or a positive finite number"):
            _build(cls, qk_scale=bad)


@pytest.mark.parametrize("cls", LAYERS)
def test_every_layer_uses_the_given_qk_scale(cls):
    layer = _build(cls, qk_scale=0.25)
    scales = {v for mod in layer.modules() for k, v in vars(mod).items() if k == "scale" and isinstance(v, float)}
    assert 0.25 in scales, f"{cls.__name__} does not keep qk_scale=0.25: {scales}"


def test_attend_scale_uses_the_same_rule():
    q = torch.randn(1, 1, 4, 8)
    assert nearfar.attend(q, q, q, scale=2).shape == q.shape
    for bad in (0, -1.0, NAN):
        with pytest.raises(ValueError, match=r"scale must be None or a positive finite number \(0 < scale < inf\)"):
            nearfar.attend(q, q, q, scale=bad)
    with pytest.raises(TypeError, match="scale must be None or a positive finite number"):
        nearfar.attend(q, q, q, scale=True)
