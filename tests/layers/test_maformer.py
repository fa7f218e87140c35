"""MAFormer MAF token mixer (PROVISIONAL design from the paper's abstract, no official code found) against a float64
re-derivation of that design."""

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
from oracles.maformer import BASELINES

from nearfar.layers.maformer import MAFAttention, default_down_ratio
from nearfar.layers.registry import mechanisms

# ---------------------------------------------------------------------------------------------------------
# float64 reference of the design in maformer.py: plain formulas on the module's parameters, masks built with loops
# ---------------------------------------------------------------------------------------------------------


def _mha(x_q, x_kv, wq, bq, wk, bk, wv, bv, wo, bo, heads, scale, allowed=None, bias=None):
    """Multi-head attention on token lists ``(B, N, C)``: projections, head-major split, masked softmax, merge, output
    Linear."""
    b, nq, c = x_q.shape
    nk = x_kv.shape[1]

    def heads_of(t, n):
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    q = heads_of(x_q @ wq.T + bq, nq)
    k = heads_of(x_kv @ wk.T + bk, nk)
    v = heads_of(x_kv @ wv.T + bv, nk)
    if allowed is None:
        allowed = torch.ones(nq, nk, dtype=torch.bool)
    out = ref.dense_reference(q, k, v, allowed, scale, bias)
    return out.transpose(1, 2).reshape(b, nq, c) @ wo.T + bo


def _split3(linear):
    w, b = linear.weight, linear.bias
    c = w.shape[1]
    return (w[:c], b[:c], w[c:2 * c], b[c:2 * c], w[2 * c:], b[2 * c:])


def swin_window_bias(table, grid, window, full):
    """Swin relative-position bias, dense ``(heads, N, N)``: T[(qy-ky+M-1)(2M-1) + (qx-kx+M-1)] for pairs of one window,
    else 0."""
    h, w = grid
    heads = table.shape[1]
    rows = []
    for qi in range(h * w):
        qy, qx = divmod(qi, w)
        row = []
        for ki in range(h * w):
            ky, kx = divmod(ki, w)
            same = qy // window[0] == ky // window[0] and qx // window[1] == kx // window[1]
            row.append((qy - ky + full - 1) * (2 * full - 1) + (qx - kx + full - 1) if same else -1)
        rows.append(row)
    idx = torch.tensor(rows)
    return torch.where(idx >= 0, table[idx.clamp(min=0)].permute(2, 0, 1), torch.zeros((), dtype=table.dtype)), heads


def ref_local(m, x):
    b, h, w, c = x.shape
    loc = m.local
    m0 = loc.window_size[0]  # square windows (Swin's WindowAttention keeps a per-axis tuple)
    window = (min(m0, h), min(m0, w))
    bias, heads = swin_window_bias(loc.relative_position_bias_table, (h, w), window, m0)
    allowed = ref.swin_mask((h, w), window)
    t = x.reshape(b, h * w, c)
    return _mha(t, t, *_split3(loc.qkv), loc.proj.weight, loc.proj.bias, heads, loc.scale, allowed, bias)


def ref_gld_tokens(m, x):
    """Zero-pad bottom/right to a multiple of r, then a kernel = stride = r conv written as a patch einsum."""
    r = m.down_ratio
    b, h, w, c = x.shape
    hp, wp = -(-h // r) * r, -(-w // r) * r
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    patches = xp.reshape(b, hp // r, r, wp // r, r, c)
    out = torch.einsum("byixjc,ocij->byxo", patches, m.gld.weight) + m.gld.bias
    return out.reshape(b, -1, m.gld.weight.shape[0])


def ref_global(m, tokens):
    g = m.global_attn
    return _mha(tokens, tokens, *_split3(g.qkv), g.proj.weight, g.proj.bias, m.num_heads, g.scale)


def ref_fusion(m, y_l, y_g):
    f = m.fusion
    c = y_l.shape[-1]
    wk, wv = f.kv.weight[:c], f.kv.weight[c:]
    bk, bv = f.kv.bias[:c], f.kv.bias[c:]
    return _mha(y_l, y_g, f.q.weight, f.q.bias, wk, bk, wv, bv, f.proj.weight, f.proj.bias, m.num_heads, f.scale)


def ref_maf(m, x):
    b, h, w, c = x.shape
    y_l = ref_local(m, x)
    y_g = ref_global(m, ref_gld_tokens(m, x))
    return (y_l + ref_fusion(m, y_l, y_g)).reshape(b, h, w, c)


def _randomize_bias(m):
    torch.nn.init.normal_(m.local.relative_position_bias_table)  # make the bias matter
    return m


# ---------------------------------------------------------------------------------------------------------
# reference match (outputs, input and parameter gradients)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,window,ratio,heads", [
    ((7, 7), 7, 1, 2),
    ((9, 11), 4, 3, 2),   # edge windows smaller, GLD zero-padded (ceil)
    ((5, 13), 7, 4, 1),   # window clamped to 5 on the first axis
    ((8, 6), 3, 2, 4),
])
def test_matches_reference(grid, window, ratio, heads):
    torch.manual_seed(0)
    m = _randomize_bias(MAFAttention(16, heads, window_size=window, down_ratio=ratio))
    check_against_reference(m, torch.randn(2, *grid, 16), ref_maf)


@settings(max_examples=8)
@given(h=st.integers(1, 10), w=st.integers(1, 10), window=st.integers(1, 5), ratio=st.integers(1, 4),
       heads=st.sampled_from([1, 2]))
def test_matches_reference_hypothesis(h, w, window, ratio, heads):
    torch.manual_seed(h * 100 + w)
    m = _randomize_bias(MAFAttention(8, heads, window_size=window, down_ratio=ratio))
    check_against_reference(m, torch.randn(1, h, w, 8), ref_maf)


# ---------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------


def _plain_mhsa(t, qkv, proj, heads):
    q, k, v = (t @ qkv.weight.T + qkv.bias).reshape(t.shape[0], t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(t.shape) @ proj.weight.T + proj.bias


@pytest.mark.parametrize("window", [6, 9])  # window == H == W, and a window larger than the map (clamped)
def test_oracle_local_branch_full_window_is_mhsa(window):
    torch.manual_seed(1)
    m = MAFAttention(16, 2, window_size=window, down_ratio=2)
    torch.nn.init.zeros_(m.local.relative_position_bias_table)
    x = torch.randn(2, 6, 6, 16)
    with torch.no_grad():
        expected = _plain_mhsa(x.reshape(2, 36, 16), m.local.qkv, m.local.proj, 2).reshape(x.shape)
        assert_close(m.local(x), expected)


def test_oracle_local_branch_full_window_rpb_is_mhsa_plus_bias():
    torch.manual_seed(2)
    m = _randomize_bias(MAFAttention(8, 2, window_size=5, down_ratio=1))
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    m = m.double()
    with torch.no_grad():
        qkv = (x.reshape(1, 25, 8) @ m.local.qkv.weight.T + m.local.qkv.bias).reshape(1, 25, 3, 2, 4)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        table = m.local.relative_position_bias_table
        idx = torch.tensor([[(qy - ky + 4) * 9 + (qx - kx + 4) for ky in range(5) for kx in range(5)]
                            for qy in range(5) for qx in range(5)])
        bias = table[idx].permute(2, 0, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        expected = out.transpose(1, 2).reshape(1, 25, 8) @ m.local.proj.weight.T + m.local.proj.bias
        assert_close(m.local(x), expected.reshape(x.shape), 1e-10)


def test_oracle_gld_identity_r1_is_mhsa():
    torch.manual_seed(3)
    m = MAFAttention(16, 4, down_ratio=1)
    with torch.no_grad():
        m.gld.weight.copy_(torch.eye(16)[:, :, None, None])
        m.gld.bias.zero_()
        x = torch.randn(2, 5, 7, 16)
        t = x.reshape(2, 35, 16)
        assert_close(m.global_tokens(x), t)
        assert_close(m.global_attn(m.global_tokens(x)), _plain_mhsa(t, m.global_attn.qkv, m.global_attn.proj, 4))


def test_oracle_zero_fusion_gives_local_output():
    torch.manual_seed(4)
    m = _randomize_bias(MAFAttention(16, 2, down_ratio=2))
    with torch.no_grad():
        m.fusion.proj.weight.zero_()
        m.fusion.proj.bias.zero_()
        x = torch.randn(2, 9, 10, 16)
        assert torch.equal(m(x), m.local(x))


def test_gld_map_is_7x7_at_benchmark_sizes():
    for dim, size in ((96, 56), (192, 28), (384, 14), (768, 7)):
        r = default_down_ratio(dim)
        assert -(-size // r) == 7, (dim, r)


# ---------------------------------------------------------------------------------------------------------
# hygiene: finite, compile, state dict, errors, registry, baseline
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_odd_sizes():
    torch.manual_seed(5)
    check_forward_backward_finite(MAFAttention(16, 2, down_ratio=3), torch.randn(2, 11, 9, 16))


def test_compile_matches_eager():
    torch.manual_seed(6)
    check_compile_matches_eager(MAFAttention(16, 2, down_ratio=2), torch.randn(1, 9, 8, 16))


def test_state_dict_round_trip_and_names():
    check_state_dict_round_trip(lambda: MAFAttention(16, 2, down_ratio=2), torch.randn(1, 7, 9, 16))
    shapes = {k: tuple(v.shape) for k, v in MAFAttention(16, 2, down_ratio=2).state_dict().items()}
    assert shapes == {
        "local.relative_position_bias_table": (169, 2),  # Swin's name, shape and layout
        "local.qkv.weight": (48, 16), "local.qkv.bias": (48,),
        "local.proj.weight": (16, 16), "local.proj.bias": (16,),
        "gld.weight": (16, 16, 2, 2), "gld.bias": (16,),
        "global_attn.qkv.weight": (48, 16), "global_attn.qkv.bias": (48,),
        "global_attn.proj.weight": (16, 16), "global_attn.proj.bias": (16,),
        "fusion.q.weight": (16, 16), "fusion.q.bias": (16,),
        "fusion.kv.weight": (32, 16), "fusion.kv.bias": (32,),
        "fusion.proj.weight": (16, 16), "fusion.proj.bias": (16,),
    }


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 10, "num_heads": 3}, "dim"),
    ({"dim": 16, "num_heads": 2, "window_size": 0}, "window_size"),
    ({"dim": 16, "num_heads": 2, "down_ratio": 0}, "down_ratio"),
    ({"dim": 16, "num_heads": 2, "qk_scale": -1.0}, "qk_scale"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAFAttention(**kwargs)


def test_non_int_down_ratio_is_a_type_error():
    # nearfar.checks' rule: a wrong type is a TypeError (it was a ValueError before the checks were unified)
    with pytest.raises(TypeError, match="down_ratio must be a positive int"):
        MAFAttention(16, 2, down_ratio=2.0)


def test_bad_input():
    m = MAFAttention(16, 2, down_ratio=2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 7, 7, 8))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 49, 16))
    with pytest.raises(TypeError, match="x must be"):
        m([1.0])


def test_registry_make_benchmark_shapes():
    (mech,) = [mm for mm in mechanisms() if mm.name == "maformer"]
    assert "PROVISIONAL" in mech.notes and mech.cls is MAFAttention
    with torch.no_grad():
        for dim, heads, size in ((96, 3, 56), (384, 12, 14)):
            m = mech.make(dim, heads)
            assert m.down_ratio == 56 // 7 * 96 // dim
            x = torch.randn(1, size, size, dim)
            assert m(x).shape == x.shape


@pytest.mark.parametrize("grid,ratio", [((14, 14), 2), ((9, 11), 3)])
def test_baseline_matches_module(grid, ratio):
    torch.manual_seed(7)
    m = _randomize_bias(MAFAttention(16, 2, down_ratio=ratio)).eval()
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        assert_close(BASELINES["maformer"](m, x), m(x))
