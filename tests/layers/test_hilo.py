"""HiLo (LITv2): float64 reference written from the paper's equations and the official code (ziplab/LITv2
``hilo.py``), its properties (oracles), the benchmark baseline, module hygiene."""

from __future__ import annotations

import pytest
import reference as ref
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
from oracles.hilo import BASELINES

import nearfar
from nearfar.layers.hilo import HiLo


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d), channel index = head*d + j."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _unheads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def hilo_reference(m: HiLo, x: torch.Tensor) -> torch.Tensor:
    """HiLo in float64 with explicit masks: pad to a multiple of s, Hi-Fi = masked dense attention over the padded
    map with "same s x s cell" as the mask, Lo-Fi = dense attention over cell means computed with loops."""
    b, h, w, c = x.shape
    s = m.ws
    hp, wp = -(-h // s) * s, -(-w // s) * s
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    real = torch.zeros(hp, wp, dtype=torch.bool)
    real[:h, :w] = True
    outs = []
    if m.h_heads:
        rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        cell = (rows // s * (wp // s) + cols // s).reshape(-1)
        allowed = cell[:, None] == cell[None, :]
        if m.mask_padding:
            allowed = allowed & real.reshape(1, -1)
        qkv = F.linear(xp.reshape(b, hp * wp, c), m.h_qkv.weight, m.h_qkv.bias)
        q, k, v = (_heads(t, m.h_heads) for t in qkv.chunk(3, dim=-1))
        o = _unheads(ref.dense_reference(q, k, v, allowed, m.scale)).reshape(b, hp, wp, -1)[:, :h, :w]
        outs.append(F.linear(o, m.h_proj.weight, m.h_proj.bias))
    if m.l_heads:
        src = x if s == 1 else xp
        cells = []
        for i in range(0, hp, s):
            for j in range(0, wp, s):
                count = real[i:i + s, j:j + s].sum() if m.mask_padding else s * s
                cells.append(src[:, i:i + s, j:j + s].sum((1, 2)) / count if s > 1 else src[:, i, j])
        pooled = torch.stack(cells, dim=1)
        q = _heads(F.linear(x.reshape(b, h * w, c), m.l_q.weight, m.l_q.bias), m.l_heads)
        kv = F.linear(pooled, m.l_kv.weight, m.l_kv.bias)
        k, v = (_heads(t, m.l_heads) for t in kv.chunk(2, dim=-1))
        o = _unheads(ref.dense_reference(q, k, v, torch.ones(1, dtype=torch.bool), m.scale)).reshape(b, h, w, -1)
        outs.append(F.linear(o, m.l_proj.weight, m.l_proj.bias))
    return torch.cat(outs, dim=-1)


def _randomize_biases(m: torch.nn.Module) -> None:
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)  # biases matter for the padded tokens: make them non-zero


@settings(max_examples=20)
@given(h=st.integers(1, 7), w=st.integers(1, 7), heads=st.integers(1, 4), ws=st.integers(1, 3),
       alpha=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), qkv_bias=st.booleans(), mask_padding=st.booleans())
def test_hilo_matches_reference(h, w, heads, ws, alpha, qkv_bias, mask_padding):
    torch.manual_seed(h * 100 + w)
    m = HiLo(4 * heads, heads, qkv_bias=qkv_bias, window_size=ws, alpha=alpha, mask_padding=mask_padding)
    _randomize_biases(m)
    check_against_reference(m, torch.randn(2, h, w, 4 * heads), hilo_reference)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_hilo_odd_sizes_benchmark_like(mask_padding):
    torch.manual_seed(0)
    m = HiLo(24, 3, qkv_bias=True, mask_padding=mask_padding)  # l_heads = int(1.5) = 1, h_heads = 2
    assert (m.l_heads, m.h_heads) == (1, 2)
    check_against_reference(m, torch.randn(2, 9, 11, 24), hilo_reference)


def test_mask_padding_changes_only_the_border():
    torch.manual_seed(1)
    a = HiLo(16, 2, qkv_bias=True, alpha=0.0)
    b = HiLo(16, 2, qkv_bias=True, alpha=0.0, mask_padding=True)
    _randomize_biases(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 7, 16)
    ya, yb = a(x), b(x)
    assert_close(ya[:, :4, :6], yb[:, :4, :6], name="interior")
    assert (ya[:, 4] - yb[:, 4]).abs().max() > 1e-3  # the last row's windows hold padded keys


def _mhsa(m: HiLo, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """torch's nn.MultiheadAttention with the Lo-Fi weights: queries from x, keys/values from ``keys``."""
    b, h, w, c = x.shape
    mha = torch.nn.MultiheadAttention(c, m.num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.l_q.weight, m.l_kv.weight]))
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(m.l_proj.weight)
        mha.out_proj.bias.copy_(m.l_proj.bias)
    kv = keys.reshape(b, -1, c)
    return mha(x.reshape(b, h * w, c), kv, kv, need_weights=False)[0].reshape(b, h, w, c)


def test_oracle1_alpha0_is_window_attention():
    torch.manual_seed(2)
    m = HiLo(16, 2, window_size=3, alpha=0.0)
    assert m.l_heads == 0
    x = torch.randn(2, 6, 9, 16)
    # explicit partition into 3x3 windows, SDPA per window, reverse
    qkv = m.h_qkv(x).reshape(2, 2, 3, 3, 3, 3, 2, 8).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, 12, 2, 9, 8)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    o = o.reshape(2, 2, 3, 2, 3, 3, 8).permute(0, 1, 4, 2, 5, 3, 6).reshape(2, 6, 9, 16)
    assert_close(m(x), m.h_proj(o))


def test_oracle2_alpha1_window1_is_mhsa():
    torch.manual_seed(3)
    m = HiLo(16, 4, window_size=1, alpha=1.0)
    x = torch.randn(2, 5, 7, 16)
    assert_close(m(x), _mhsa(m, x, x))


def test_window1_makes_every_head_lofi_whatever_alpha():
    m = HiLo(16, 4, window_size=1, alpha=0.0)
    assert (m.l_heads, m.h_heads) == (4, 0) and not hasattr(m, "h_qkv")


def test_oracle3_cellwise_constant_input_lofi_is_full_attention():
    torch.manual_seed(4)
    m = HiLo(16, 2, window_size=2, alpha=1.0)
    coarse = torch.randn(2, 3, 4, 16)
    x = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # constant in every 2x2 cell
    assert_close(m(x), _mhsa(m, x, x))


def test_baseline_matches_module():
    torch.manual_seed(5)
    for shape, heads in (((2, 8, 10, 24), 3), ((1, 7, 5, 24), 6)):
        m = HiLo(shape[-1], heads, qkv_bias=True)
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(BASELINES["hilo"](m, x), m(x), name=f"baseline {shape}")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(6)
    m = HiLo(24, 3)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 24))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 24))
    x = torch.randn(1, 5, 6, 24).transpose(1, 2)  # non-contiguous input
    with torch.no_grad():
        assert_close(m(x), m(x.contiguous()), 1e-6)


def test_state_dict_names_match_litv2():
    m = HiLo(64, 4, qkv_bias=True, window_size=2, alpha=0.5)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "l_q.weight": (32, 64), "l_q.bias": (32,), "l_kv.weight": (64, 64), "l_kv.bias": (64,),
        "l_proj.weight": (32, 32), "l_proj.bias": (32,), "h_qkv.weight": (96, 64), "h_qkv.bias": (96,),
        "h_proj.weight": (32, 32), "h_proj.bias": (32,)}
    assert set(HiLo(64, 4, window_size=1).state_dict()) == {"l_q.weight", "l_kv.weight", "l_proj.weight",
                                                           "l_proj.bias"}
    check_state_dict_round_trip(lambda: HiLo(32, 4, qkv_bias=True), torch.randn(1, 5, 6, 32))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        HiLo(10, 3)
    with pytest.raises(ValueError, match="window_size"):
        HiLo(8, 2, window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        HiLo(8, 2, window_size=2.0)
    with pytest.raises(ValueError, match="alpha"):
        HiLo(8, 2, alpha=1.5)
    with pytest.raises(ValueError, match="qk_scale"):
        HiLo(8, 2, qk_scale=float("nan"))
    with pytest.raises(TypeError, match="mask_padding"):
        HiLo(8, 2, mask_padding=1)
    m = HiLo(8, 2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(4, 4, 8))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["hilo"]
    assert entry.repo == "ziplab/LITv2" and entry.cls is HiLo and entry.dims == ("2d",)
    m = entry.make(96, 3)
    assert (m.ws, m.alpha, m.l_heads, m.h_heads, m.h_qkv.bias) == (2, 0.5, 1, 2, None)
    assert m(torch.randn(1, 4, 4, 96)).shape == (1, 4, 4, 96)
