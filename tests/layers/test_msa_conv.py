"""TiC MSA-Conv against a float64 re-derivation from the paper and the official code (zs670980918/MSA-Conv
``core/op/Transformer_in_Convolution.py`` ``MSA_Conv_2d``), its properties (oracles) and module hygiene."""

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
from oracles.msa_conv import BASELINES

from nearfar.layers.msa_conv import MSAConv2d
from nearfar.layers.registry import mechanisms


def window_index(h, w, kernel, dilation):
    """(H*W, kh*kw) flat key index of every pixel's window offset, -1 outside the image (plain loops)."""
    (kh, kw), (dh, dw) = kernel, dilation
    ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    rows = []
    for r in range(h):
        for c in range(w):
            row = []
            for a in range(kh):
                for b in range(kw):
                    rr, cc = r + a * dh - ph, c + b * dw - pw
                    row.append(rr * w + cc if 0 <= rr < h and 0 <= cc < w else -1)
            rows.append(row)
    return torch.tensor(rows)


def msa(m, x):
    """The attention part in float64: zero keys/values outside the image, kept in the softmax."""
    b, h, w, c = x.shape
    qkv = F.conv2d(x.permute(0, 3, 1, 2), m.qkv_conv.weight, m.qkv_conv.bias).flatten(2).transpose(1, 2)
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    idx = window_index(h, w, m.kernel_size, m.dilation)
    zero = torch.zeros(b, 1, c, dtype=x.dtype)
    kw_, vw = torch.cat([k, zero], 1)[:, idx], torch.cat([v, zero], 1)[:, idx]  # -1 reads the zero row
    attn = (torch.einsum("bnc,bnoc->bno", q, kw_) * c ** -0.5).softmax(-1)
    return torch.einsum("bno,bnoc->bnc", attn, vw).reshape(b, h, w, c)


def reference(m, x):
    y = (msa(m, x) + x).permute(0, 3, 1, 2)
    return F.relu(F.conv2d(y, m.mlp.weight, m.mlp.bias, m.mlp.stride, m.mlp.padding)).permute(0, 2, 3, 1)


CASES = [  # (input shape, output channels, kwargs)
    ((2, 9, 11, 8), 8, {"kernel_size": 3}),
    ((2, 7, 12, 8), 6, {"kernel_size": 5, "dilation": 2, "padding": 2}),
    ((1, 2, 13, 8), 4, {"kernel_size": (3, 5), "dilation": (3, 1), "stride": 2, "padding": (1, 0)}),  # H < dilation
    ((1, 6, 5, 8), 8, {"kernel_size": 7, "padding": 1, "bias": True}),  # window larger than the map
    ((2, 40, 37, 4), 4, {"kernel_size": 3, "dilation": 2}),  # large enough for the block-sparse engine
]


@pytest.mark.parametrize("shape,out_ch,kw", CASES)
def test_matches_float64_reference(shape, out_ch, kw):
    torch.manual_seed(0)
    m = MSAConv2d(shape[-1], out_ch, **kw)
    check_against_reference(m, torch.randn(*shape), reference)


@settings(max_examples=12)
@given(h=st.integers(1, 9), w=st.integers(1, 9), kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]),
       dh=st.integers(1, 3), dw=st.integers(1, 3))
def test_matches_float64_reference_hypothesis(h, w, kh, kw, dh, dw):
    torch.manual_seed(1)
    m = MSAConv2d(4, 3, (kh, kw), dilation=(dh, dw), padding=(kh // 2, kw // 2))
    check_against_reference(m, torch.randn(1, h, w, 4), reference)


# ------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 2), ((3, 5), (2, 1))])
def test_oracle1_zero_queries_give_the_zero_padded_box_filter(kernel, dilation):
    torch.manual_seed(2)
    m = MSAConv2d(8, 8, kernel, dilation=dilation)
    with torch.no_grad():
        m.qkv_conv.weight[:8].zero_()
        m.qkv_conv.bias[:8].zero_()
    x = torch.randn(2, 9, 10, 8)
    v = F.conv2d(x.permute(0, 3, 1, 2), m.qkv_conv.weight[16:], m.qkv_conv.bias[16:])
    k = m.kernel_size
    box = torch.ones(8, 1, *k) / (k[0] * k[1])
    expected = F.conv2d(v, box, padding=m.pad, dilation=m.dilation, groups=8)  # count-include-pad mean
    assert_close(m.attention(x), expected.permute(0, 2, 3, 1), 1e-5)


def test_oracle2_matches_the_unfold_formulation():
    torch.manual_seed(3)
    m = MSAConv2d(8, 8, (5, 3), dilation=(1, 2)).double()
    x = torch.randn(2, 8, 9, 8, dtype=torch.float64)
    xc = x.permute(0, 3, 1, 2)
    q, k, v = m.qkv_conv(xc).chunk(3, 1)

    def unfold(t):
        return F.unfold(t, (5, 3), dilation=(1, 2), padding=(2, 2)).view(2, 8, 15, 72)

    attn = ((q.reshape(2, 8, 1, 72) * unfold(k)).sum(1) * 8 ** -0.5).softmax(1)
    expected = (attn.unsqueeze(1) * unfold(v)).sum(2).view(2, 8, 8, 9).permute(0, 2, 3, 1)
    assert_close(m.float().attention(x.float()), expected, 1e-5)


def test_oracle3_whole_image_window_is_full_attention_plus_zero_keys():
    torch.manual_seed(4)
    h, w, kernel = 5, 4, 9  # reach 4 >= every distance: each window holds the whole image and 81 - 20 zeros
    m = MSAConv2d(8, 8, kernel)  # attention() takes any size; the final conv would need padding 4
    x = torch.randn(2, h, w, 8)
    q, k, v = (t.double().reshape(2, 1, h * w, 8) for t in m.qkv_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
               .chunk(3, -1))
    full, lse = ref.dense_reference(q, k, v, torch.ones((), dtype=torch.bool), 8 ** -0.5, return_lse=True)
    n_zero = kernel * kernel - h * w
    expected = full * (lse.exp() / (lse.exp() + n_zero)).unsqueeze(-1)  # n_zero more exp(0) terms, value 0
    assert_close(m.attention(x), expected.reshape(2, h, w, 8), 1e-5)
    assert (m.attention(x).double() - full.reshape(2, h, w, 8)).abs().max() > 1e-3  # the zeros do matter


# ------------------------------------------------------------------------------------------------------------
# baseline, hygiene, errors
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,out_ch,kw", CASES[:4])
def test_baseline_matches_module(shape, out_ch, kw):
    torch.manual_seed(5)
    m = MSAConv2d(shape[-1], out_ch, **kw).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        assert_close(BASELINES["msa_conv"](m, x), m(x), 1e-5)


def test_registry_make_builds_benchmark_shapes():
    mech = {m.name: m for m in mechanisms()}["msa_conv"]
    for dim, heads, s in ((96, 3, 56), (384, 12, 14)):
        m = mech.make(dim, heads)
        with torch.no_grad():
            assert m(torch.randn(1, s, s, dim)).shape == (1, s, s, dim)


def test_finite_forward_backward():
    check_forward_backward_finite(MSAConv2d(8, 8, 3), torch.randn(2, 11, 9, 8) * 30)


def test_compile_matches_eager():
    check_compile_matches_eager(MSAConv2d(8, 8, 3, dilation=2), torch.randn(1, 9, 10, 8))


def test_state_dict_round_trip_and_official_names():
    check_state_dict_round_trip(lambda: MSAConv2d(8, 4, 3), torch.randn(1, 7, 6, 8))
    m = MSAConv2d(16, 24, 5)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "qkv_conv.weight": (48, 16, 1, 1), "qkv_conv.bias": (48,), "mlp.weight": (24, 16, 5, 5)}


@pytest.mark.parametrize("args,kwargs,x_shape,error,match", [
    ((8, 8, 4), {}, None, ValueError, "must be odd"),
    ((8, 8, 3), {"dropout": 0.1}, None, ValueError, "dropout"),
    ((8, 8, 3), {"dilation": 0}, None, ValueError, "dilation"),
    ((8, 8, (3, 3, 3)), {}, None, ValueError, "kernel_size"),
    ((0, 8, 3), {}, None, ValueError, "input_channel"),
    ((8, 8, 3), {"padding": -1}, None, ValueError, "padding"),
    ((8, 8, 5), {"padding": 0}, (1, 3, 9, 8), ValueError, "too small"),
    ((8, 8, 3), {}, (1, 5, 5, 4), ValueError, "channel-last"),
    ((8, 8, 3), {}, (5, 5, 8), ValueError, "channel-last"),
    ((8, 8, 3), {"bias": 1}, None, TypeError, "bias"),
])
def test_bad_input_raises(args, kwargs, x_shape, error, match):
    with pytest.raises(error, match=match):
        m = MSAConv2d(*args, **kwargs)
        m(torch.randn(*x_shape))
