"""PT-DiT proxy-token attention against a float64 re-derivation from the paper's equations and the official code
(Ascend/MindSpeed-MM ``pt_dit_diffusers.py`` ``ProxyTokensTransformerBlock``), its properties (oracles) and module
hygiene."""

from __future__ import annotations

import itertools
import math

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
from oracles.proxy_tokens import BASELINES

from nearfar.layers.proxy_tokens import ProxyTokenAttention
from nearfar.layers.registry import mechanisms

# ------------------------------------------------------------------------------------------------------------
# float64 reference, from the paper and the official block: loops for proxies and windows, dense masked softmax
# ------------------------------------------------------------------------------------------------------------


def proxy_matrix(spatial, window, proxy, mode):
    """(M, N) matrix taking the N tokens (row-major) to the M proxies, built token by token."""
    nd = len(spatial)
    rows: dict = {}
    for flat, coord in enumerate(itertools.product(*(range(n) for n in spatial))):
        if mode == "paper_window_mean":
            key, weight = tuple(c // p for c, p in zip(coord, proxy)), 1 / math.prod(proxy)
        else:
            # official get_proxy_token: rho = (1, c_h/p_h, c_w/p_w); y = y1 * rho + y2; proxy = (window, y2)
            rho = [1 if (nd == 3 and a == 0) else w // p for a, (w, p) in enumerate(zip(window, proxy))]
            local = [c % w for c, w in zip(coord, window)]
            key = (tuple(c // w for c, w in zip(coord, window)), tuple(lo % r for lo, r in zip(local, rho)))
            outer = [lo // r for lo, r in zip(local, rho)]
            if mode == "first":
                weight = 1.0 if all(o == 0 for o in outer) else 0.0
            else:
                weight = 1 / math.prod(w // r for w, r in zip(window, rho))
        rows.setdefault(key, {})[flat] = weight
    mat = torch.zeros(len(rows), math.prod(spatial), dtype=torch.float64)
    for i, cols in enumerate(rows.values()):
        for j, w in cols.items():
            mat[i, j] = w
    return mat


def window_mask(spatial, window):
    coords = list(itertools.product(*(range(n) for n in spatial)))
    return torch.tensor([[all(a // w == b // w for a, b, w in zip(ci, cj, window)) for cj in coords] for ci in coords])


def mha(attn, xq, xkv, allowed):
    """diffusers Attention in float64: q/k/v Linears, masked softmax (scale head_dim^-0.5), to_out."""
    b, h, c = xq.shape[0], attn.num_heads, xq.shape[-1]

    def heads(t):
        return t.reshape(b, -1, h, c // h).transpose(1, 2)

    o = ref.dense_reference(heads(attn.to_q(xq)), heads(attn.to_k(xkv)), heads(attn.to_v(xkv)), allowed,
                            (c // h) ** -0.5)
    return attn.to_out[0](o.transpose(1, 2).reshape(b, -1, c))


def reference(m, x):
    spatial, b, c = tuple(x.shape[1:-1]), x.shape[0], x.shape[-1]
    n = math.prod(spatial)
    t = x.reshape(b, n, c)
    p = proxy_matrix(spatial, m.compress_ratios, m.proxy_compress_ratios, m.proxy_mode) @ t
    everything = torch.ones((), dtype=torch.bool)
    p = p + mha(m.proxy_attn1, m.proxy_norm1(p), m.proxy_norm1(p), everything)
    z = t + m.linear_1_visual(mha(m.pvisual_attn2, m.norm_before(t), m.proxy_cross_norm(p), everything))
    zn = m.norm1(z)
    z = z + mha(m.attn1, zn, zn, window_mask(spatial, m.compress_ratios))
    if m.shift_window:
        zn = m.shift_window_norm(z)
        shift = tuple(w // 2 for w in m.compress_ratios)
        z = z + m.linear_2(mha(m.attn3, zn, zn, ref.swin_mask(spatial, m.compress_ratios, shift)))
    return (z - t).reshape(x.shape)  # the layer returns the block's update (the caller adds the residual)


def randomized(m):
    """Random weights everywhere, including the zero-initialised L1/L2 and the LayerNorm affines."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


CASES = [  # (spatial, kwargs)
    ((16, 8), {}),  # code defaults: 8x8 windows, 4 proxies each
    ((9, 15), {"compress_ratios": (3, 5), "proxy_compress_ratios": (1, 5)}),  # odd sizes and windows
    ((6, 10), {"compress_ratios": (3, 5), "proxy_compress_ratios": (3, 5), "proxy_mode": "paper_window_mean"}),
    ((8, 12), {"compress_ratios": 4, "proxy_compress_ratios": 2, "proxy_mode": "first"}),
    ((8, 12), {"compress_ratios": 4, "proxy_compress_ratios": 2, "proxy_mode": "paper_window_mean"}),
    ((6, 9), {"compress_ratios": 3, "proxy_compress_ratios": 1, "shift_window": False, "attention_bias": True}),
    ((4, 4, 8), {"ndim": 3, "compress_ratios": (2, 4, 4), "proxy_compress_ratios": (1, 2, 2)}),
    ((3, 6, 4), {"ndim": 3, "compress_ratios": (3, 3, 2), "proxy_compress_ratios": (3, 1, 2), "proxy_mode": "first"}),
    ((2, 4, 6), {"ndim": 3, "compress_ratios": (2, 2, 3), "proxy_compress_ratios": (1, 2, 3),
                 "proxy_mode": "paper_window_mean"}),
]


@pytest.mark.parametrize("spatial,kw", CASES)
def test_matches_float64_reference(spatial, kw):
    m = randomized(ProxyTokenAttention(16, 2, **kw))
    check_against_reference(m, torch.randn(2, *spatial, 16), reference)


@settings(max_examples=10)
@given(wh=st.integers(1, 4), ww=st.integers(1, 5), ph=st.integers(1, 4), pw=st.integers(1, 5),
       nh=st.integers(1, 3), nw=st.integers(1, 3), mode=st.sampled_from(["code_strided_mean", "first",
                                                                        "paper_window_mean"]))
def test_matches_float64_reference_hypothesis(wh, ww, ph, pw, nh, nw, mode):
    ph, pw = math.gcd(ph, wh), math.gcd(pw, ww)  # proxy ratios must divide the windows
    m = randomized(ProxyTokenAttention(8, 2, (wh, ww), (ph, pw), proxy_mode=mode))
    check_against_reference(m, torch.randn(1, wh * nh, ww * nw, 8), reference)


# ------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["code_strided_mean", "paper_window_mean"])
def test_oracle1_one_proxy_per_window_is_the_window_mean(mode):
    x = torch.randn(2, 12, 10, 8)
    m = ProxyTokenAttention(8, 2, (4, 5), (4, 5), proxy_mode=mode)
    expected = F.avg_pool2d(x.permute(0, 3, 1, 2), (4, 5)).flatten(2).transpose(1, 2)
    assert_close(m.proxy_tokens(x), expected, 1e-6)
    x3 = torch.randn(1, 4, 6, 4, 8)
    m3 = ProxyTokenAttention(8, 2, (2, 3, 2), (2, 3, 2), proxy_mode=mode, ndim=3)
    expected3 = F.avg_pool3d(x3.permute(0, 4, 1, 2, 3), (2, 3, 2)).flatten(2).transpose(1, 2)
    assert_close(m3.proxy_tokens(x3), expected3, 1e-6)


def test_oracle2_one_window_is_full_attention():
    torch.manual_seed(0)
    m = ProxyTokenAttention(16, 4, (6, 10), (3, 5), shift_window=False)  # linear_1_visual is zero at init
    x = torch.randn(2, 6, 10, 16)
    a = m.attn1
    xn = m.norm1(x).reshape(2, 60, 16)
    q, k, v = (f(xn).reshape(2, 60, 4, 4).transpose(1, 2) for f in (a.to_q, a.to_k, a.to_v))
    full = a.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 60, 16))
    assert_close(m(x), full.reshape(x.shape), 1e-5)


def official_shift_mask(spatial, window):
    """The official get_shift_window_attention_mask, re-written: label slices (0:-c), (-c:-s), (-s:) per axis,
    numbered in loop order; allowed iff same window and same label. Note the official slice(-0, None) covers a
    whole axis whose shift is 0 (window 1), which is what lets a later label overwrite it."""
    nd = len(spatial)
    shift = [w // 2 for w in window]
    label = torch.zeros(spatial)
    slices = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for cnt, sl in enumerate(itertools.product(*slices)):
        label[sl] = cnt
    coords = list(itertools.product(*(range(n) for n in spatial)))
    rolled = [tuple((c + s) % n for c, s, n in zip(ci, shift, spatial)) for ci in coords]  # token at rolled pos
    win = {r: tuple(pc // w for pc, w in zip(pos, window)) for pos, r in zip(coords, rolled)}
    lab = {r: float(label[pos]) for pos, r in zip(coords, rolled)}
    assert nd in (2, 3)
    return torch.tensor([[win[ci] == win[cj] and lab[ci] == lab[cj] for cj in coords] for ci in coords])


@pytest.mark.parametrize("spatial,window", [((16, 16), (8, 8)), ((8, 8), (8, 8)), ((9, 12), (3, 4)),
                                            ((2, 8, 8), (1, 4, 4)), ((4, 4, 6), (2, 2, 3))])
def test_oracle2_shifted_mask_equals_the_region_mask_builder(spatial, window):
    m = ProxyTokenAttention(8, 2, window, 1, ndim=len(spatial))
    n = math.prod(spatial)
    got = m.patterns(spatial)[1].mask(n, n)
    shift = tuple(w // 2 for w in window)
    assert torch.equal(got, ref.swin_mask(spatial, window, shift))
    assert torch.equal(got, official_shift_mask(spatial, window))
    assert not got.all() or n == 1


def test_shifted_window_attention_matches_dense_reference_with_region_mask():
    torch.manual_seed(1)
    m = ProxyTokenAttention(16, 2, (4, 6), 2)
    spatial = (8, 12)
    xn = torch.randn(2, *spatial, 16)
    out = m.attn3(xn, pattern=m.patterns(spatial)[1])
    m64 = m.double()
    expected = mha(m64.attn3, xn.double().reshape(2, 96, 16), xn.double().reshape(2, 96, 16),
                   ref.swin_mask(spatial, (4, 6), (2, 3)))
    assert_close(out.reshape(2, 96, 16), expected, 1e-5)


def test_oracle3_equal_proxies_give_the_same_cross_attention_output_everywhere():
    torch.manual_seed(2)
    m = randomized(ProxyTokenAttention(16, 2, (4, 4), (2, 2)))
    # tokens whose proxies all coincide: a constant plus noise with zero mean over every proxy's sub-lattice
    noise = torch.randn(1, 8, 8, 16)
    noise = noise - noise.reshape(1, 2, 2, 2, 2, 2, 2, 16).mean((2, 5), keepdim=True).expand(
        1, 2, 2, 2, 2, 2, 2, 16).reshape(1, 8, 8, 16)
    x = torch.randn(16) + noise
    p = m.proxy_tokens(x)
    assert_close(p, p[:, :1].expand_as(p), 1e-6, "proxies")
    seen = {}
    m.pvisual_attn2.register_forward_hook(lambda mod, args, out: seen.update(out=out, q=args[0], kv=args[1]))
    m(x)
    out = seen["out"].reshape(-1, 16)
    assert seen["q"].reshape(-1, 16).std(0).max() > 0.1  # the queries do differ
    kv = seen["kv"][0, 0]
    # W_1 W_o W_v p, independent of q (the module runs linear_1_visual merged into pvisual_attn2's output GEMM)
    expected = m.linear_1_visual(m.pvisual_attn2.to_out[0](m.pvisual_attn2.to_v(kv)))
    assert_close(out, expected.expand_as(out), 1e-5, "cross-attention output")


# ------------------------------------------------------------------------------------------------------------
# baseline, hygiene, errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial,kw", [CASES[0], CASES[1], CASES[3], CASES[4], CASES[6]])
def test_baseline_matches_module(spatial, kw):
    m = randomized(ProxyTokenAttention(16, 2, **kw)).eval()
    x = torch.randn(2, *spatial, 16)
    with torch.no_grad():
        assert_close(BASELINES["proxy_tokens"](m, x), m(x), 1e-5)


def test_registry_make_builds_benchmark_shapes():
    mech = {m.name: m for m in mechanisms()}["proxy_tokens"]
    assert mech.dims == ("2d", "3d")
    for dim, heads, s in ((96, 3, 56), (384, 12, 14)):
        m = mech.make(dim, heads)
        with torch.no_grad():
            assert m(torch.randn(1, s, s, dim)).shape == (1, s, s, dim)


def test_finite_forward_backward():
    m = randomized(ProxyTokenAttention(16, 2))
    check_forward_backward_finite(m, torch.randn(2, 16, 16, 16) * 10)


def test_compile_matches_eager():
    check_compile_matches_eager(randomized(ProxyTokenAttention(16, 2, 4, 2)), torch.randn(1, 8, 8, 16))


def test_state_dict_round_trip_and_official_names():
    check_state_dict_round_trip(lambda: randomized(ProxyTokenAttention(16, 2, 4, 2)), torch.randn(1, 8, 8, 16))
    m = ProxyTokenAttention(32, 4, attention_bias=True)
    expected = {"linear_1_visual.weight": (32, 32), "linear_1_visual.bias": (32,),
                "linear_2.weight": (32, 32), "linear_2.bias": (32,)}
    for norm in ("proxy_norm1", "norm_before", "proxy_cross_norm", "norm1", "shift_window_norm"):
        expected |= {f"{norm}.weight": (32,), f"{norm}.bias": (32,)}
    for attn in ("proxy_attn1", "pvisual_attn2", "attn1", "attn3"):
        for lin in ("to_q", "to_k", "to_v", "to_out.0"):
            expected |= {f"{attn}.{lin}.weight": (32, 32), f"{attn}.{lin}.bias": (32,)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert not m.linear_1_visual.weight.any() and not m.linear_2.weight.any()  # official zero init
    plain = ProxyTokenAttention(32, 4, shift_window=False, norm_elementwise_affine=False)
    assert not any(k.startswith(("attn3", "linear_2", "shift_window_norm")) for k in plain.state_dict())
    assert not any("norm" in k for k in plain.state_dict())


@pytest.mark.parametrize("kwargs,x_shape,match", [
    ({}, (1, 12, 16, 8), "divisible by compress_ratios"),
    ({"compress_ratios": 4, "proxy_compress_ratios": 3}, None, "multiple of proxy_compress_ratios"),
    ({"proxy_mode": "random"}, None, "proxy_mode"),
    ({"ndim": 1}, None, "ndim"),
    ({"compress_ratios": (4, 4, 4)}, None, "compress_ratios"),
    ({"compress_ratios": 0}, None, "compress_ratios"),
    ({}, (1, 16, 16, 9), "channel-last"),
    ({}, (1, 4, 16, 16, 8), "channel-last"),
])
def test_bad_input_raises(kwargs, x_shape, match):
    with pytest.raises(ValueError, match=match):
        m = ProxyTokenAttention(8, 2, **kwargs)
        m(torch.randn(*x_shape))
    with pytest.raises(ValueError, match="num_heads"):
        ProxyTokenAttention(8, 3)
    with pytest.raises(TypeError, match="shift_window"):
        ProxyTokenAttention(8, 2, shift_window=1)
