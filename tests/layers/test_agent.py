"""Agent attention: float64 re-derivation from the paper's equations and the official code (LeapLabTHU/Agent-Attention
``agent_transformer/models/agent_pvt.py`` ``AgentAttention``), its properties (oracles), module hygiene, baseline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.agent import BASELINES, largest_intermediate

import nearfar
from nearfar.layers import agent as agent_module
from nearfar.layers.agent import AgentAttention

# ---------------------------------------------------------------------------------------------------------
# float64 reference, from the paper's formulas (index math for interpolation and pooling, explicit softmax)
# ---------------------------------------------------------------------------------------------------------


def _linear_resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """1D linear interpolation, align_corners=False: source ``max((i + .5) L / size - .5, 0)``, edge clamped."""
    length = t.shape[axis]
    if length == size:
        return t
    rows = []
    for i in range(size):
        src = max((i + 0.5) * length / size - 0.5, 0.0)
        i0 = min(math.floor(src), length - 1)
        i1 = min(i0 + 1, length - 1)
        lam = src - i0
        rows.append(t.select(axis, i0) * (1 - lam) + t.select(axis, i1) * lam)
    return torch.stack(rows, dim=axis)


def _bilinear(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return _linear_resize(_linear_resize(t, -2, size[0]), -1, size[1])


def _adaptive_pool(q: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, p, p, C) with PyTorch's bins [floor(i H / p), ceil((i + 1) H / p))."""
    _, hgt, wid, _ = q.shape
    rows = []
    for i in range(p):
        r0, r1 = (i * hgt) // p, -(-((i + 1) * hgt) // p)
        cols = []
        for j in range(p):
            c0, c1 = (j * wid) // p, -(-((j + 1) * wid) // p)
            cols.append(q[:, r0:r1, c0:c1].mean(dim=(1, 2)))
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows, 1)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    b, c = t.shape[0], t.shape[-1]
    return t.reshape(b, -1, h, c // h).transpose(1, 2)


def _parts(m: AgentAttention, x: torch.Tensor) -> dict:
    """Per-head q, k, v, agents and the two softmax matrices A1 (agents -> keys), A2 (queries -> agents)."""
    b, hgt, wid, c = x.shape
    h, n, r = m.num_heads, m.agent_num, m.sr_ratio
    s = (c // h) ** -0.5
    q = F.linear(x, m.q.weight, m.q.bias)
    y = x
    if r > 1:
        y = F.conv2d(x.permute(0, 3, 1, 2), m.sr.weight, m.sr.bias, stride=r).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (c,), m.norm.weight, m.norm.bias, m.norm.eps)
    hk, wk = y.shape[1:3]
    kv = F.linear(y, m.kv.weight, m.kv.bias)
    k, v = kv[..., :c], kv[..., c:]
    a = _adaptive_pool(q, math.isqrt(n))
    qh, kh, vh, ah = (_heads(t, h) for t in (q, k, v, a))
    p1 = (_bilinear(m.an_bias, (hk, wk)) + _linear_resize(m.ah_bias[0], 2, hk)
          + _linear_resize(m.aw_bias[0], 3, wk)).reshape(h, n, hk * wk)
    p2 = (_bilinear(m.na_bias, (hgt, wid)).reshape(h, n, hgt * wid).transpose(1, 2)
          + (_linear_resize(m.ha_bias[0], 1, hgt) + _linear_resize(m.wa_bias[0], 2, wid)).reshape(h, hgt * wid, n))
    a1 = torch.softmax(s * ah @ kh.transpose(-1, -2) + p1, dim=-1)
    a2 = torch.softmax(s * qh @ ah.transpose(-1, -2) + p2, dim=-1)
    return dict(q=qh, k=kh, v=vh, a=ah, a1=a1, a2=a2, v_map=v.permute(0, 3, 1, 2))


def agent_reference(m: AgentAttention, x: torch.Tensor) -> torch.Tensor:
    b, hgt, wid, c = x.shape
    pt = _parts(m, x)
    o = (pt["a2"] @ (pt["a1"] @ pt["v"])).transpose(1, 2).reshape(b, hgt, wid, c)
    v_map = pt["v_map"]
    if m.sr_ratio > 1:
        v_map = _bilinear(v_map, (hgt, wid))
    o = o + F.conv2d(v_map, m.dwc.weight, m.dwc.bias, padding=1, groups=c).permute(0, 2, 3, 1)
    return F.linear(o, m.proj.weight, m.proj.bias)


def _module(dim, heads, randomize=True, **kw) -> AgentAttention:
    m = AgentAttention(dim, heads, **kw)
    if randomize:  # make the position biases matter (their init is std 0.02)
        with torch.no_grad():
            for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
                getattr(m, name).normal_()
    return m


CASES = [  # (input H, W), num_patches, sr_ratio, agent_num, qkv_bias
    ((7, 9), (7, 9), 1, 9, False),  # construction size: no resize
    ((9, 11), (9, 11), 2, 4, True),  # sr_ratio not dividing the map
    ((5, 6), 49, 1, 16, False),  # other size: resized biases; more agents than rows
    ((10, 7), 64, 3, 9, True),  # resized biases with spatial reduction
]


@pytest.mark.parametrize("size,num_patches,sr_ratio,agent_num,qkv_bias", CASES)
def test_matches_reference(size, num_patches, sr_ratio, agent_num, qkv_bias):
    torch.manual_seed(0)
    m = _module(12, 2, num_patches=num_patches, sr_ratio=sr_ratio, agent_num=agent_num, qkv_bias=qkv_bias)
    check_against_reference(m, torch.randn(2, *size, 12), agent_reference)


@settings(max_examples=6)
@given(h=st.integers(3, 9), w=st.integers(3, 9), side=st.integers(3, 8), sr=st.integers(1, 3),
       pool=st.integers(1, 3), heads=st.sampled_from([1, 2]))
def test_matches_reference_hypothesis(h, w, side, sr, pool, heads):
    sr = min(sr, h, w, side)
    torch.manual_seed(h * 100 + w)
    m = _module(4 * heads, heads, num_patches=side * side, sr_ratio=sr, agent_num=pool * pool)
    check_against_reference(m, torch.randn(1, h, w, 4 * heads), agent_reference)


# ---------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------


def _strip(m: AgentAttention) -> AgentAttention:
    """Proj = identity, DWC = 0: the module's output is the attention output O itself."""
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(m.dim))
        m.proj.bias.zero_()
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
    return m


def test_oracle1_effective_attention_is_a2_a1_with_unit_rows():
    torch.manual_seed(1)
    m = _strip(_module(8, 2, num_patches=(6, 7), agent_num=4)).double()
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    pt = _parts(m, x)
    eff = pt["a2"] @ pt["a1"]  # (B, h, N, N): built here only, in the test
    assert_close(eff.sum(-1), torch.ones_like(eff[..., 0]), 1e-12, "rows of A2 @ A1")
    expected = (eff @ pt["v"]).transpose(1, 2).reshape(x.shape)
    assert_close(m(x), expected, 1e-10)


def test_oracle2_one_agent_per_token_no_bias_no_dwc():
    torch.manual_seed(2)
    m = _strip(_module(8, 2, randomize=False, num_patches=16, agent_num=16)).double()
    with torch.no_grad():
        for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            getattr(m, name).zero_()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    q = _heads(F.linear(x, m.q.weight), 2)
    k, v = (_heads(t, 2) for t in F.linear(x, m.kv.weight).chunk(2, -1))
    s = 4 ** -0.5
    expected = torch.softmax(s * q @ q.transpose(-1, -2), -1) @ torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v
    assert_close(m(x), expected.transpose(1, 2).reshape(x.shape), 1e-10)


def test_oracle3_no_n_by_n_tensor(monkeypatch):
    """Linear in N by construction: both attends are (n, N') and (N, n), and no op makes an N x N tensor.
    (The timing/memory scaling check is ``python tests/oracles/agent.py``.)"""
    calls = []
    real = agent_module.attend

    def spy(q, k, v, *args, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(agent_module, "attend", spy)
    m = AgentAttention(8, 1, num_patches=32 * 32, agent_num=4)
    x = torch.randn(1, 32, 32, 8)
    with torch.no_grad():
        biggest = largest_intermediate(m, x)
    n = 32 * 32
    assert calls[:2] == [(4, n), (n, 4)]
    assert biggest <= 16 * n < n * n // 32, biggest


# ---------------------------------------------------------------------------------------------------------
# hygiene
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_and_compile():
    torch.manual_seed(3)
    m = _module(12, 3, num_patches=(5, 7), sr_ratio=2, agent_num=4)
    x = torch.randn(2, 5, 7, 12)
    check_forward_backward_finite(m, x)
    check_compile_matches_eager(m, x)


def test_state_dict_matches_official_names_and_round_trips():
    m = AgentAttention(16, 2, num_patches=64, qkv_bias=True, sr_ratio=2, agent_num=4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "q.weight": (16, 16), "q.bias": (16,), "kv.weight": (32, 16), "kv.bias": (32,),
        "proj.weight": (16, 16), "proj.bias": (16,), "sr.weight": (16, 16, 2, 2), "sr.bias": (16,),
        "norm.weight": (16,), "norm.bias": (16,), "dwc.weight": (16, 1, 3, 3), "dwc.bias": (16,),
        "an_bias": (2, 4, 7, 7), "na_bias": (2, 4, 7, 7), "ah_bias": (1, 2, 4, 4, 1), "aw_bias": (1, 2, 4, 1, 4),
        "ha_bias": (1, 2, 8, 1, 4), "wa_bias": (1, 2, 1, 8, 4)}
    check_state_dict_round_trip(lambda: _module(8, 2, num_patches=25, agent_num=4), torch.randn(1, 5, 6, 8))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        AgentAttention(10, 3)
    with pytest.raises(ValueError, match="num_patches"):
        AgentAttention(8, 2, num_patches=50)
    with pytest.raises(ValueError, match="num_patches"):
        AgentAttention(8, 2, num_patches=(4, 0))
    with pytest.raises(ValueError, match="agent_num"):
        AgentAttention(8, 2, agent_num=10)
    with pytest.raises(ValueError, match="sr_ratio"):
        AgentAttention(8, 2, sr_ratio=0)
    with pytest.raises(ValueError, match="sr_ratio"):
        AgentAttention(8, 2, num_patches=16, sr_ratio=5)
    m = AgentAttention(8, 2, num_patches=16, sr_ratio=2, agent_num=4)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="sr_ratio"):
        m(torch.randn(1, 1, 5, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[1.0]])


def test_baseline_matches_module():
    torch.manual_seed(4)
    for size, num_patches, sr, agents, bias in CASES:
        m = _module(12, 2, num_patches=num_patches, sr_ratio=sr, agent_num=agents, qkv_bias=bias)
        x = torch.randn(2, *size, 12)
        with torch.no_grad():
            assert_close(m(x), BASELINES["agent"](m, x), 1e-5)


def test_registry_make_on_benchmark_shapes():
    entry = {e.name: e for e in nearfar.mechanisms()}["agent"]
    assert entry.repo == "LeapLabTHU/Agent-Attention" and entry.cls is AgentAttention
    with torch.no_grad():
        for dim, heads, side in ((96, 3, 56), (384, 12, 14)):
            m = entry.make(dim, heads)
            assert m.agent_num == 49 and m.sr_ratio == 1 and m.num_heads == heads
            assert m(torch.randn(1, side, side, dim)).shape == (1, side, side, dim)
