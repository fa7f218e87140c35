"""Polarized Self-Attention, parallel form: float64 reference written from the paper's equations as the official
code (DeLightCMU/PSA ``semantic-segmentation/network/PSA.py`` ``PSA_p``) evaluates them, the oracles, official
names, baseline, hygiene."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_state_dict_round_trip,
)

import nearfar
from nearfar.layers.psa_parallel import PSAParallel


def softmax_pixels(t: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1 (the pixels), written out."""
    e = torch.exp(t - t.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def psa_parallel_reference(m: PSAParallel, x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(W_up (sum_n softmax_n(W_q x_n) W_v x_n)) + x * sigmoid(softmax_n(mean(W_g x) . W_t x_n))``."""
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    wq, wv, wup = (t.weight[:, :, 0, 0] for t in (m.conv_q_right, m.conv_v_right, m.conv_up))
    wg, wt = m.conv_q_left.weight[:, :, 0, 0], m.conv_v_left.weight[:, :, 0, 0]
    v = flat @ wv.T  # (B, N, C_i): project every pixel, then pool
    attn = softmax_pixels(flat @ wq.T)  # (B, N, 1)
    z = (attn * v).sum(dim=1)  # (B, C_i)
    a_ch = torch.sigmoid(z @ wup.T)[:, None, None, :]
    g = (flat @ wg.T).mean(dim=1)  # (B, C_i)
    logits = ((flat @ wt.T) * g[:, None, :]).sum(-1, keepdim=True)  # (B, N, 1)
    a_sp = torch.sigmoid(softmax_pixels(logits)).reshape(b, h, w, 1)
    return x * a_ch + x * a_sp


def _randomize(m: PSAParallel) -> PSAParallel:
    with torch.no_grad():
        m.conv_up.weight.normal_()  # default init is small; make the channel gate vary
    return m


@settings(max_examples=20, deadline=None)
@given(b=st.integers(2, 3), h=st.integers(1, 7), w=st.integers(1, 7), dim=st.integers(2, 12),
       transposed=st.booleans())
def test_matches_reference(b, h, w, dim, transposed):
    torch.manual_seed(h * 100 + w * 10 + dim)
    m = _randomize(PSAParallel(dim))
    x = torch.randn(b, w, h, dim).transpose(1, 2) if transposed else torch.randn(b, h, w, dim)
    check_against_reference(m, x, psa_parallel_reference)


def test_oracle1_spatial_gate_range():
    torch.manual_seed(1)
    m = PSAParallel(16).double()
    gate = m.spatial_gate(torch.randn(3, 5, 7, 16, dtype=torch.float64))
    assert gate.shape == (3, 5, 7, 1)
    assert (gate > 0.5).all() and (gate < torch.sigmoid(torch.tensor(1.0))).all()
    # the softmax inside sums to 1 over the pixels of each image
    assert_close(torch.logit(gate).sum((1, 2, 3)), torch.ones(3, dtype=torch.float64), 1e-9)


def test_oracle2_zero_up_projection_halves_channel_branch():
    torch.manual_seed(2)
    m = PSAParallel(10)
    with torch.no_grad():
        m.conv_up.weight.zero_()
    x = torch.randn(2, 5, 6, 10)
    with torch.no_grad():
        assert torch.equal(m.channel_gate(x), torch.full((2, 1, 1, 10), 0.5))
        assert_close(m(x), x / 2 + x * m.spatial_gate(x))


def test_state_dict_names_match_official():
    m = PSAParallel(64)  # official PSA_p(64, 64)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "conv_q_right.weight": (1, 64, 1, 1), "conv_v_right.weight": (32, 64, 1, 1),
        "conv_up.weight": (64, 32, 1, 1), "conv_q_left.weight": (32, 64, 1, 1),
        "conv_v_left.weight": (32, 64, 1, 1)}
    check_state_dict_round_trip(lambda: _randomize(PSAParallel(24)), torch.randn(1, 5, 6, 24))


def test_init_is_kaiming_fan_in():
    torch.manual_seed(6)
    m = PSAParallel(512)
    std = m.conv_v_left.weight.std().item()
    assert abs(std - (2 / 512) ** 0.5) < 0.05 * (2 / 512) ** 0.5


def test_errors():
    with pytest.raises(ValueError, match="dim"):
        PSAParallel(1)
    with pytest.raises(TypeError, match="dim"):
        PSAParallel(8.0)
    m = PSAParallel(8)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError, match="x"):
        m([1.0])


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["psa_parallel"]
    assert entry.repo == "DeLightCMU/PSA" and entry.cls is PSAParallel and entry.family == "dense"
    m = entry.make(96, 3)
    assert m(torch.randn(1, 4, 4, 96)).shape == (1, 4, 4, 96)
