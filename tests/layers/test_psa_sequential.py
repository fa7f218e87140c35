"""Polarized Self-Attention, sequential form: float64 reference written from the paper's equations as the official
code (DeLightCMU/PSA ``semantic-segmentation/network/PSA.py`` ``PSA_s``) evaluates them, the oracles, official
names, baseline, hygiene."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.psa_parallel import BASELINES as PARALLEL_BASELINES
from oracles.psa_sequential import BASELINES
from test_psa_parallel import _randomize as randomize_parallel

import nearfar
from nearfar.layers.psa_parallel import PSAParallel
from nearfar.layers.psa_sequential import PSASequential

EPS = 1e-5  # LayerNorm default


def softmax_pixels(t: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1 (the pixels), written out."""
    e = torch.exp(t - t.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _w(conv: torch.nn.Conv2d) -> torch.Tensor:
    return conv.weight[:, :, 0, 0]


def psa_sequential_reference(m: PSASequential, x: torch.Tensor) -> torch.Tensor:
    """``y = x * sigmoid(bottleneck(sum_n softmax_n(W_q x_n) W_v x_n))``, then
    ``y * sigmoid(sum_i mean(W_g y)_i softmax_n(W_t y_n)_i)``."""
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    z = (softmax_pixels(flat @ _w(m.conv_q_right).T) * (flat @ _w(m.conv_v_right).T)).sum(dim=1)  # (B, C_i)
    up0, norm, up3 = m.conv_up[0], m.conv_up[1], m.conv_up[3]
    z = z @ _w(up0).T + up0.bias
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    z = (z - mu) / torch.sqrt(var + EPS) * norm.weight[:, 0, 0] + norm.bias[:, 0, 0]
    z = torch.clamp(z, min=0) @ _w(up3).T + up3.bias
    y = flat * torch.sigmoid(z)[:, None, :]
    g = (y @ _w(m.conv_q_left).T).mean(dim=1)  # (B, C_i)
    p = softmax_pixels(y @ _w(m.conv_v_left).T)  # (B, N, C_i), per channel over pixels
    a_sp = torch.sigmoid((p * g[:, None, :]).sum(-1, keepdim=True))
    return (y * a_sp).reshape(b, h, w, c)


def _randomize(m: PSASequential) -> PSASequential:
    with torch.no_grad():
        for t in (m.conv_up[0].weight, m.conv_up[3].weight, m.conv_up[0].bias, m.conv_up[3].bias,
                  m.conv_up[1].weight, m.conv_up[1].bias):
            t.normal_()
    return m


@settings(max_examples=20, deadline=None)
@given(b=st.integers(2, 3), h=st.integers(1, 7), w=st.integers(1, 7), dim=st.integers(24, 48),
       transposed=st.booleans())
def test_matches_reference(b, h, w, dim, transposed):
    torch.manual_seed(h * 100 + w * 10 + dim)
    m = _randomize(PSASequential(dim))
    x = torch.randn(b, w, h, dim).transpose(1, 2) if transposed else torch.randn(b, h, w, dim)
    # conv_up's LayerNorm normalises only dim // 8 values: when they are close, 1 / std amplifies float32 rounding
    # in the backward pass, hence dim >= 24 here and a looser gradient tolerance than the forward one (the
    # smallest widths are checked in float64 below)
    check_against_reference(m, x, psa_sequential_reference, grad_rtol=3e-4)


@pytest.mark.parametrize("dim", [8, 12, 16, 20])
def test_small_widths_match_reference_in_float64(dim):
    torch.manual_seed(dim)
    m = _randomize(PSASequential(dim)).double()
    x = torch.randn(2, 5, 3, dim, dtype=torch.float64, requires_grad=True)
    x64 = x.detach().clone().requires_grad_()
    out, expected = m(x), psa_sequential_reference(m, x64)
    assert_close(out, expected, 1e-10)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * g).sum(), x)
    (gx64,) = torch.autograd.grad((expected * g).sum(), x64)
    assert_close(gx, gx64, 1e-8, "x.grad")


def test_oracle_one_value_bottleneck_makes_the_channel_gate_constant():
    # dim < 16: conv_up normalises a single value, so LayerNorm returns its bias whatever the input
    torch.manual_seed(7)
    m = _randomize(PSASequential(12))
    with torch.no_grad():
        a, b = m.channel_gate(torch.randn(2, 4, 5, 12)), m.channel_gate(5 * torch.randn(2, 3, 3, 12))
    assert torch.equal(a, b)


def test_oracle_zero_last_conv_halves_then_spatial_gate():
    torch.manual_seed(1)
    m = _randomize(PSASequential(16))
    with torch.no_grad():
        m.conv_up[3].weight.zero_()
        m.conv_up[3].bias.zero_()
    x = torch.randn(2, 5, 6, 16)
    with torch.no_grad():
        assert torch.equal(m.channel_gate(x), torch.full((2, 1, 1, 16), 0.5))
        assert_close(m(x), x / 2 * m.spatial_gate(x / 2))


def test_oracle_spatial_gate_range():
    # sum_i g_i p_{n,i} with p in (0, 1): the logit lies between sum of negative g_i and sum of positive g_i
    torch.manual_seed(2)
    m = PSASequential(16).double()
    x = torch.randn(3, 5, 7, 16, dtype=torch.float64)
    g = m.conv_q_left.weight[:, :, 0, 0] @ x.mean((1, 2)).T  # (C_i, B)
    logit = torch.logit(m.spatial_gate(x)).reshape(3, -1)
    assert (logit <= g.clamp(min=0).sum(0)[:, None]).all() and (logit >= g.clamp(max=0).sum(0)[:, None]).all()
    p_mean = logit.mean(-1)  # mean over pixels of sum_i g_i p_{n,i} = sum_i g_i / N
    assert_close(p_mean, g.sum(0) / 35, 1e-9)


#: both PSA forms, randomised so that their channel gates vary (the default init keeps them near constant)
FORMS = {"psa_parallel": (lambda dim: randomize_parallel(PSAParallel(dim)), PARALLEL_BASELINES["psa_parallel"]),
         "psa_sequential": (lambda dim: _randomize(PSASequential(dim)), BASELINES["psa_sequential"])}


@pytest.mark.parametrize("form", FORMS)
def test_oracle_channel_gate_permutation_invariant_and_output_equivariant(form):
    torch.manual_seed(3)
    m = FORMS[form][0](12)
    x = torch.randn(2, 5, 7, 12)
    perm = torch.randperm(35)
    xp = x.reshape(2, 35, 12)[:, perm].reshape(2, 5, 7, 12)
    with torch.no_grad():
        assert_close(m.channel_gate(xp), m.channel_gate(x), name="channel gate")
        assert_close(m(xp), m(x).reshape(2, 35, 12)[:, perm].reshape(2, 5, 7, 12), name="equivariance")


@pytest.mark.parametrize("form", FORMS)
def test_baseline_matches_module(form):
    torch.manual_seed(4)
    make, baseline = FORMS[form]
    m = make(24)
    x = torch.randn(2, 9, 7, 24)
    with torch.no_grad():
        assert_close(baseline(m, x), m(x), name="baseline")


@pytest.mark.parametrize("form", FORMS)
def test_forward_backward_finite_and_compile(form):
    torch.manual_seed(5)
    m = FORMS[form][0](20)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 20))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 20))


def test_state_dict_names_match_official():
    m = PSASequential(64)  # official PSA_s(64, 64)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "conv_q_right.weight": (1, 64, 1, 1), "conv_v_right.weight": (32, 64, 1, 1),
        "conv_up.0.weight": (8, 32, 1, 1), "conv_up.0.bias": (8,), "conv_up.1.weight": (8, 1, 1),
        "conv_up.1.bias": (8, 1, 1), "conv_up.3.weight": (64, 8, 1, 1), "conv_up.3.bias": (64,),
        "conv_q_left.weight": (32, 64, 1, 1), "conv_v_left.weight": (32, 64, 1, 1)}
    check_state_dict_round_trip(lambda: _randomize(PSASequential(24)), torch.randn(1, 5, 6, 24))


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        PSASequential(7)
    with pytest.raises(TypeError, match="dim"):
        PSASequential("8")
    m = PSASequential(8)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["psa_sequential"]
    assert entry.repo == "DeLightCMU/PSA" and entry.cls is PSASequential and entry.family == "dense"
    m = entry.make(96, 3)
    assert m(torch.randn(1, 4, 4, 96)).shape == (1, 4, 4, 96)
