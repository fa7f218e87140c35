"""ELA: float64 reference written from the paper (Xu & Wan, arXiv 2403.01123; no official code) with the 1D conv
and the GroupNorm written out, the oracles, names, baseline, hygiene."""

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
from oracles.ela import BASELINES

import nearfar
from nearfar.layers.ela import ELA

EPS = 1e-5  # GroupNorm default


def conv1d_reference(z: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1D convolution of ``z`` ``(B, L, C)`` with zero padding ``k // 2``, a loop over the kernel taps."""
    b, length, c = z.shape
    k = weight.shape[-1]
    pad = k // 2
    zp = torch.cat([z.new_zeros(b, pad, c), z, z.new_zeros(b, pad, c)], dim=1).reshape(b, length + 2 * pad, groups, -1)
    wg = weight.reshape(groups, c // groups, c // groups, k)  # (group, out, in, tap)
    out = sum(torch.einsum("blgi,goi->blgo", zp[:, t:t + length], wg[..., t]) for t in range(k))
    return out.reshape(b, length, c)


def group_norm_reference(y: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    b, length, c = y.shape
    yg = y.reshape(b, length, num_groups, c // num_groups)
    mu = yg.mean((1, 3), keepdim=True)
    var = yg.var((1, 3), unbiased=False, keepdim=True)
    return ((yg - mu) / torch.sqrt(var + EPS)).reshape(b, length, c) * weight + bias


def ela_reference(m: ELA, x: torch.Tensor) -> torch.Tensor:
    def gate(z):
        y = conv1d_reference(z, m.conv.weight, m.groups)
        return torch.sigmoid(group_norm_reference(y, m.num_groups, m.gn.weight, m.gn.bias))

    a_h = gate(x.mean(dim=2))  # (B, H, C)
    a_w = gate(x.mean(dim=1))  # (B, W, C)
    return x * a_h[:, :, None, :] * a_w[:, None, :, :]


def _randomize(m: ELA) -> ELA:
    with torch.no_grad():
        m.gn.weight.normal_()
        m.gn.bias.normal_()
    return m


@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 3), h=st.integers(1, 9), w=st.integers(1, 9), cpg=st.integers(1, 3),
       num_groups=st.integers(1, 4), groups_div=st.sampled_from([1, 2, None]), k=st.sampled_from([1, 3, 5, 7]),
       transposed=st.booleans())
def test_matches_reference(b, h, w, cpg, num_groups, groups_div, k, transposed):
    torch.manual_seed(h * 100 + w * 10 + cpg)
    dim = cpg * num_groups * 2
    groups = None if groups_div is None else dim // (2 * groups_div) if dim % (2 * groups_div) == 0 else None
    m = _randomize(ELA(dim, kernel_size=k, groups=groups, num_groups=num_groups))
    x = torch.randn(b, w, h, dim).transpose(1, 2) if transposed else torch.randn(b, h, w, dim)
    check_against_reference(m, x, ela_reference)


def test_oracle_zero_weights_quarter():
    m = ELA(32)
    with torch.no_grad():
        m.conv.weight.zero_()
        m.gn.weight.zero_()
        m.gn.bias.zero_()
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        assert torch.equal(m(x), x * 0.5 * 0.5)


@pytest.mark.parametrize("groups", [None, 4])
def test_oracle_square_transpose(groups):
    torch.manual_seed(1)
    m = _randomize(ELA(16, kernel_size=5, groups=groups, num_groups=8))
    x = torch.randn(2, 6, 6, 16)
    with torch.no_grad():
        assert_close(m(x.transpose(1, 2)), m(x).transpose(1, 2))


def test_oracle_gates_in_unit_interval():
    torch.manual_seed(2)
    m = _randomize(ELA(16, num_groups=4))
    x = torch.randn(2, 5, 7, 16)
    z = m.gate(x.mean(dim=2))
    assert ((z > 0) & (z < 1)).all()


def test_baseline_matches_module():
    torch.manual_seed(4)
    for h, w in ((9, 7), (6, 6)):
        m = _randomize(ELA(32))
        x = torch.randn(2, h, w, 32)
        with torch.no_grad():
            assert_close(BASELINES["ela"](m, x), m(x), name=f"baseline {h}x{w}")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(5)
    m = _randomize(ELA(32))
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 32))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 32))


def test_state_dict_names():
    m = ELA(64)  # ELA-B, the names the ports use
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "conv.weight": (64, 1, 7), "gn.weight": (64,), "gn.bias": (64,)}
    assert ELA(64, groups=8).conv.weight.shape == (64, 8, 7)
    check_state_dict_round_trip(lambda: _randomize(ELA(32)), torch.randn(1, 5, 6, 32))


def test_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        ELA(16, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        ELA(16, kernel_size=0)
    with pytest.raises(ValueError, match="num_groups"):
        ELA(24, num_groups=16)
    with pytest.raises(ValueError, match="groups"):
        ELA(16, groups=3)
    with pytest.raises(ValueError, match="groups"):
        ELA(16, groups=32)
    with pytest.raises(TypeError, match="dim"):
        ELA(16.0)
    m = ELA(16)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 16, 4, 4))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["ela"]
    assert entry.cls is ELA and entry.family == "local"
    m = entry.make(96, 3)
    assert m.num_groups == 16 and m(torch.randn(1, 4, 4, 96)).shape == (1, 4, 4, 96)
    assert entry.make(24, 3).num_groups == 12
