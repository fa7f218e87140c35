"""DualToken-ViT mixer (PROVISIONAL design from the paper's abstract, no official code found) against a float64
re-derivation of that design."""

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
from oracles.dualtoken import BASELINES
from test_maformer import _mha, _plain_mhsa, _split3

from nearfar.layers.dualtoken import DualTokenAttention
from nearfar.layers.registry import mechanisms

# ---------------------------------------------------------------------------------------------------------
# float64 reference of the design in nearfar/layers/dualtoken.py, on the module's parameters
# ---------------------------------------------------------------------------------------------------------


def ref_conv_encoder(m, x):
    """DW_k (zero padding k//2, groups=C) -> LN over channels -> Linear, GELU, Linear."""
    k = m.dwconv.weight.shape[-1]
    t = F.conv2d(x.permute(0, 3, 1, 2), m.dwconv.weight, m.dwconv.bias, padding=k // 2, groups=x.shape[-1])
    t = F.layer_norm(t.permute(0, 2, 3, 1), (x.shape[-1],), m.norm.weight, m.norm.bias, m.norm.eps)
    return F.gelu(t @ m.pwconv1.weight.T + m.pwconv1.bias) @ m.pwconv2.weight.T + m.pwconv2.bias


def ref_downsample(m, x_loc):
    """Repeat stride-2 DW_3 (padding 1) + PW while an axis is larger than global_size (at most len(steps))."""
    t = x_loc.permute(0, 3, 1, 2)
    c = t.shape[1]
    for step in m.downsample:
        h, w = t.shape[2:]
        if h <= m.global_size and w <= m.global_size:
            break
        dw, pw = step[0], step[1]
        t = F.conv2d(t, dw.weight, dw.bias, stride=2, padding=1, groups=c)
        assert t.shape[2:] == (math.ceil(h / 2), math.ceil(w / 2))
        t = torch.einsum("bchw,oc->bohw", t, pw.weight[:, :, 0, 0]) + pw.bias[:, None, None]
    return t.flatten(2).transpose(1, 2)


def ref_dualtoken(m, x, g=None, return_g=False):
    b, h, w, c = x.shape
    heads = m.num_heads
    x_loc = ref_conv_encoder(m, x)
    x_ds = ref_downsample(m, x_loc)
    g = m.global_tokens.expand(b, -1, -1) if g is None else g
    tokens = torch.cat([g, x_ds], 1)
    ga = m.global_attn
    g_new = _mha(tokens, tokens, *_split3(ga.qkv), ga.proj.weight, ga.proj.bias, heads, ga.scale)[:, :g.shape[1]]
    br = m.broadcast
    wk, wv, bk, bv = br.kv.weight[:c], br.kv.weight[c:], br.kv.bias[:c], br.kv.bias[c:]
    t = x_loc.reshape(b, h * w, c)
    y = t + _mha(t, g_new, br.q.weight, br.q.bias, wk, bk, wv, bv, br.proj.weight, br.proj.bias, heads, br.scale)
    y = y.reshape(b, h, w, c)
    return (y, g_new) if return_g else y


# ---------------------------------------------------------------------------------------------------------
# reference match (outputs, input and parameter gradients)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,global_size,steps,heads", [
    ((14, 14), 7, 3, 2),   # one step to 7x7
    ((9, 11), 3, 3, 2),    # 9x11 -> 5x6 -> 3x3
    ((28, 12), 7, 1, 4),   # capped at one step: x_ds is 14x6
    ((5, 4), 2, 0, 1),     # no downsampling: x_ds = x_loc
])
def test_matches_reference(grid, global_size, steps, heads):
    torch.manual_seed(0)
    m = DualTokenAttention(16, heads, global_size=global_size, max_downsample_steps=steps)
    check_against_reference(m, torch.randn(2, *grid, 16), ref_dualtoken)


@settings(max_examples=8)
@given(h=st.integers(1, 12), w=st.integers(1, 12), gs=st.integers(1, 4), steps=st.integers(0, 3),
       kernel=st.sampled_from([3, 5, 7]), heads=st.sampled_from([1, 2]))
def test_matches_reference_hypothesis(h, w, gs, steps, kernel, heads):
    torch.manual_seed(h * 100 + w)
    m = DualTokenAttention(8, heads, global_size=gs, kernel_size=kernel, mlp_ratio=2, max_downsample_steps=steps)
    check_against_reference(m, torch.randn(1, h, w, 8), ref_dualtoken)


def test_carried_global_tokens_match_reference():
    torch.manual_seed(1)
    m = DualTokenAttention(16, 2, global_size=3)
    x, g = torch.randn(2, 9, 8, 16), torch.randn(2, 9, 16)
    y, g_new = m(x, g, return_global_tokens=True)
    m64 = DualTokenAttention(16, 2, global_size=3).double()
    m64.load_state_dict(m.state_dict())
    with torch.no_grad():
        ey, eg = ref_dualtoken(m64, x.double(), g.double(), return_g=True)
    assert_close(y, ey)
    assert_close(g_new, eg, name="g_new")
    assert g_new.shape == g.shape
    assert not torch.allclose(y, m(x))  # the carried tokens matter
    assert torch.equal(m(x), m(x, m.global_tokens.expand(2, -1, -1)))  # default = the learned tokens


# ---------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------


def test_oracle_zero_global_path_is_conv_encoder():
    torch.manual_seed(2)
    m = DualTokenAttention(16, 2)
    with torch.no_grad():
        m.broadcast.proj.weight.zero_()
        m.broadcast.proj.bias.zero_()
        x = torch.randn(2, 14, 13, 16)
        assert_close(m(x), ref_conv_encoder(m, x))
        assert torch.equal(m(x), m.local_tokens(x))


def test_oracle_full_resolution_no_global_tokens_is_mhsa():
    torch.manual_seed(3)
    m = DualTokenAttention(16, 4, max_downsample_steps=0)
    with torch.no_grad():
        x_loc = m.local_tokens(torch.randn(2, 6, 9, 16))
        x_ds = m.downsampled_tokens(x_loc)
        assert torch.equal(x_ds, x_loc.reshape(2, 54, 16))  # full resolution
        expected = _plain_mhsa(x_ds, m.global_attn.qkv, m.global_attn.proj, 4)
        assert_close(m.aggregate(x_ds, None), expected)


@pytest.mark.parametrize("size,tokens", [(56, 49), (14, 49), (7, 49), (9, 25), (3, 9)])
def test_step_wise_downsampling_reaches_global_size(size, tokens):
    m = DualTokenAttention(8, 1)
    with torch.no_grad():
        assert m.downsampled_tokens(torch.randn(1, size, size, 8)).shape == (1, tokens, 8)


# ---------------------------------------------------------------------------------------------------------
# hygiene: finite, compile, state dict, errors, registry, baseline
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_odd_sizes():
    torch.manual_seed(4)
    check_forward_backward_finite(DualTokenAttention(16, 2), torch.randn(2, 15, 9, 16))


def test_compile_matches_eager():
    torch.manual_seed(5)
    check_compile_matches_eager(DualTokenAttention(16, 2), torch.randn(1, 15, 14, 16))


def test_state_dict_round_trip_and_names():
    check_state_dict_round_trip(lambda: DualTokenAttention(16, 2, max_downsample_steps=1), torch.randn(1, 9, 9, 16))
    shapes = {k: tuple(v.shape) for k, v in DualTokenAttention(16, 2, max_downsample_steps=1).state_dict().items()}
    assert shapes == {
        "dwconv.weight": (16, 1, 7, 7), "dwconv.bias": (16,),
        "norm.weight": (16,), "norm.bias": (16,),
        "pwconv1.weight": (64, 16), "pwconv1.bias": (64,), "pwconv2.weight": (16, 64), "pwconv2.bias": (16,),
        "downsample.0.0.weight": (16, 1, 3, 3), "downsample.0.0.bias": (16,),
        "downsample.0.1.weight": (16, 16, 1, 1), "downsample.0.1.bias": (16,),
        "global_tokens": (1, 49, 16),
        "global_attn.qkv.weight": (48, 16), "global_attn.qkv.bias": (48,),
        "global_attn.proj.weight": (16, 16), "global_attn.proj.bias": (16,),
        "broadcast.q.weight": (16, 16), "broadcast.q.bias": (16,),
        "broadcast.kv.weight": (32, 16), "broadcast.kv.bias": (32,),
        "broadcast.proj.weight": (16, 16), "broadcast.proj.bias": (16,),
    }


@pytest.mark.parametrize("kwargs,match", [
    ({"dim": 10, "num_heads": 3}, "dim"),
    ({"dim": 16, "num_heads": 2, "global_size": 0}, "global_size"),
    ({"dim": 16, "num_heads": 2, "kernel_size": 4}, "kernel_size"),
    ({"dim": 16, "num_heads": 2, "mlp_ratio": 0}, "mlp_ratio"),
    ({"dim": 16, "num_heads": 2, "max_downsample_steps": -1}, "max_downsample_steps"),
    ({"dim": 16, "num_heads": 2, "qk_scale": 0.0}, "qk_scale"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DualTokenAttention(**kwargs)


def test_bad_input():
    m = DualTokenAttention(16, 2)
    x = torch.randn(2, 7, 7, 16)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 7, 7, 8))
    with pytest.raises(TypeError, match="x must be"):
        m(None)
    with pytest.raises(ValueError, match="global_tokens must have shape"):
        m(x, torch.randn(2, 48, 16))
    with pytest.raises(ValueError, match="global_tokens must have shape"):
        m(x, torch.randn(1, 49, 16))
    with pytest.raises(TypeError, match="global_tokens"):
        m(x, [0.0])
    with pytest.raises(ValueError, match="global_tokens .* must match x"):
        m(x, torch.randn(2, 49, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="return_global_tokens"):
        m(x, return_global_tokens=1)


def test_registry_make_benchmark_shapes():
    (mech,) = [mm for mm in mechanisms() if mm.name == "dualtoken"]
    assert "PROVISIONAL" in mech.notes and mech.cls is DualTokenAttention
    with torch.no_grad():
        for dim, heads, size in ((96, 3, 56), (384, 12, 14)):
            m = mech.make(dim, heads)
            x = torch.randn(1, size, size, dim)
            out = m(x)
            assert isinstance(out, torch.Tensor) and out.shape == x.shape


@pytest.mark.parametrize("grid", [(14, 14), (9, 11)])
def test_baseline_matches_module(grid):
    torch.manual_seed(6)
    m = DualTokenAttention(16, 2).eval()
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        assert_close(BASELINES["dualtoken"](m, x), m(x))
