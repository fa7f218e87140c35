"""UniFormer local/global MHRA: float64 references written from the paper's equations and the official code
(Sense-X/UniFormer ``image_classification/models/uniformer.py`` ``CBlock``, ``SABlock``), its properties (oracles),
baselines, module hygiene."""

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
from oracles.uniformer import BASELINES

import nearfar
from nearfar.layers.uniformer import UniFormerGlobalMHRA, UniFormerLocalMHRA


def _pointwise(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return torch.einsum("bhwi,oi->bhwo", x, conv.weight[:, :, 0, 0]) + conv.bias


def _bn(m: UniFormerLocalMHRA, x: torch.Tensor) -> torch.Tensor:
    bn = m.norm1
    if m.training:
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def local_reference(m: UniFormerLocalMHRA, x: torch.Tensor) -> torch.Tensor:
    """Local MHRA in float64, channel-last: out_c(p) = sum over |delta| <= k//2 of a_c[delta] V_c(p + delta)."""
    b, h, w, c = x.shape
    r = m.kernel_size // 2
    v = _pointwise(_bn(m, x), m.conv1)
    vp = torch.zeros(b, h + 2 * r, w + 2 * r, c, dtype=x.dtype)
    vp[:, r:r + h, r:r + w] = v
    kernel = m.attn.weight[:, 0]  # (C, k, k)
    out = m.attn.bias.expand(b, h, w, c)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out = out + kernel[:, dy, dx] * vp[:, dy:dy + h, dx:dx + w]
    return _pointwise(out, m.conv2)


def global_reference(m: UniFormerGlobalMHRA, x: torch.Tensor) -> torch.Tensor:
    """Global MHRA in float64: LayerNorm written out, qkv split [3, heads, d], dense softmax, proj."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c)
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    t = (t - mu) / torch.sqrt(var + m.norm1.eps) * m.norm1.weight + m.norm1.bias
    qkv = F.linear(t, m.attn["qkv"].weight, m.attn["qkv"].bias).reshape(b, h * w, 3, m.num_heads, -1)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    o = ref.dense_reference(q, k, v, torch.ones(1, dtype=torch.bool), m.scale)
    return F.linear(o.transpose(1, 2).reshape(b, h, w, c), m.attn["proj"].weight, m.attn["proj"].bias)


def _randomize_bn(m: UniFormerLocalMHRA) -> UniFormerLocalMHRA:
    with torch.no_grad():
        m.norm1.weight.normal_()
        m.norm1.bias.normal_()
        m.norm1.running_mean.normal_()
        m.norm1.running_var.uniform_(0.5, 2.0)
    return m


@settings(max_examples=15)
@given(h=st.integers(1, 8), w=st.integers(1, 8), dim=st.integers(1, 8), kernel_size=st.sampled_from([1, 3, 5]),
       train=st.booleans())
def test_local_matches_reference(h, w, dim, kernel_size, train):
    torch.manual_seed(h * 100 + w * 10 + dim)
    m = _randomize_bn(UniFormerLocalMHRA(dim, kernel_size)).train(train)
    check_against_reference(m, torch.randn(3, h, w, dim), local_reference)


@settings(max_examples=15)
@given(h=st.integers(1, 6), w=st.integers(1, 6), heads=st.integers(1, 3), d=st.integers(1, 5),
       qkv_bias=st.booleans())
def test_global_matches_reference(h, w, heads, d, qkv_bias):
    torch.manual_seed(h * 100 + w * 10 + heads)
    m = UniFormerGlobalMHRA(heads * d, heads, qkv_bias=qkv_bias)
    with torch.no_grad():
        m.norm1.weight.normal_()
        m.norm1.bias.normal_()
    check_against_reference(m, torch.randn(2, h, w, heads * d), global_reference)


def test_oracle1_centre_delta_kernel_is_pointwise_chain():
    torch.manual_seed(1)
    m = _randomize_bn(UniFormerLocalMHRA(6)).eval()
    with torch.no_grad():
        m.attn.weight.zero_()
        m.attn.weight[:, :, 2, 2] = 1.0
        m.attn.bias.zero_()
    x = torch.randn(2, 7, 5, 6)
    y = F.batch_norm(x.reshape(-1, 6), m.norm1.running_mean, m.norm1.running_var, m.norm1.weight, m.norm1.bias,
                     eps=m.norm1.eps).reshape(x.shape)
    expected = F.linear(F.linear(y, m.conv1.weight[:, :, 0, 0], m.conv1.bias), m.conv2.weight[:, :, 0, 0],
                        m.conv2.bias)
    assert_close(m(x), expected)


def test_oracle2_local_is_unfold_weighted_sum():
    torch.manual_seed(2)
    m = _randomize_bn(UniFormerLocalMHRA(4)).eval()
    x = torch.randn(2, 5, 9, 4)
    v = m.conv1(m.norm1(x.permute(0, 3, 1, 2).contiguous()))  # (B, C, H, W)
    cols = F.unfold(v, 5, padding=2).reshape(2, 4, 25, 45)  # zero-padded 5x5 neighbourhoods
    agg = (cols * m.attn.weight.reshape(4, 25, 1)).sum(2).reshape(2, 4, 5, 9) + m.attn.bias[:, None, None]
    assert_close(m(x), m.conv2(agg).permute(0, 2, 3, 1))


def test_oracle3_global_is_standard_mhsa():
    torch.manual_seed(3)
    m = UniFormerGlobalMHRA(32, 4)
    x = torch.randn(2, 5, 7, 32)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.attn["qkv"].weight)
        mha.in_proj_bias.copy_(m.attn["qkv"].bias)
        mha.out_proj.weight.copy_(m.attn["proj"].weight)
        mha.out_proj.bias.copy_(m.attn["proj"].bias)
    t = F.layer_norm(x.reshape(2, 35, 32), (32,), m.norm1.weight, m.norm1.bias, 1e-6)
    assert_close(m(x), mha(t, t, t, need_weights=False)[0].reshape(2, 5, 7, 32))


def test_official_head_rule():
    assert UniFormerGlobalMHRA(320).num_heads == 5 and UniFormerGlobalMHRA(512).num_heads == 8
    assert UniFormerGlobalMHRA(96).num_heads == 1 and UniFormerGlobalMHRA(96, head_dim=32).num_heads == 3
    assert UniFormerGlobalMHRA(512).norm1.eps == 1e-6 and UniFormerGlobalMHRA(512).attn["qkv"].bias is not None


@pytest.mark.parametrize("name", ["uniformer_local", "uniformer_global"])
def test_baselines_match_modules(name):
    torch.manual_seed(4)
    entry = {e.name: e for e in nearfar.mechanisms()}[name]
    module = entry.make(64, 2).eval()
    if name == "uniformer_local":
        _randomize_bn(module)
    x = torch.randn(2, 9, 7, 64)
    with torch.no_grad():
        assert_close(BASELINES[name](module, x), module(x), name=name)


def test_forward_backward_finite_and_compile():
    torch.manual_seed(5)
    for m in (_randomize_bn(UniFormerLocalMHRA(8)), UniFormerGlobalMHRA(8, 2)):
        check_forward_backward_finite(m, torch.randn(2, 7, 5, 8))
        check_compile_matches_eager(m, torch.randn(1, 6, 5, 8))
        x = torch.randn(1, 5, 6, 8).transpose(1, 2)  # non-contiguous input
        with torch.no_grad():
            assert_close(m(x), m(x.contiguous()), 1e-6)


def test_state_dict_names_match_official_blocks():
    local = UniFormerLocalMHRA(64)
    assert {k: tuple(v.shape) for k, v in local.state_dict().items()} == {  # CBlock(64) minus pos_embed/norm2/mlp
        "norm1.weight": (64,), "norm1.bias": (64,), "norm1.running_mean": (64,), "norm1.running_var": (64,),
        "norm1.num_batches_tracked": (), "conv1.weight": (64, 64, 1, 1), "conv1.bias": (64,),
        "attn.weight": (64, 1, 5, 5), "attn.bias": (64,), "conv2.weight": (64, 64, 1, 1), "conv2.bias": (64,)}
    glob = UniFormerGlobalMHRA(128)
    assert {k: tuple(v.shape) for k, v in glob.state_dict().items()} == {  # SABlock(128) minus pos_embed/norm2/mlp
        "norm1.weight": (128,), "norm1.bias": (128,), "attn.qkv.weight": (384, 128), "attn.qkv.bias": (384,),
        "attn.proj.weight": (128, 128), "attn.proj.bias": (128,)}
    check_state_dict_round_trip(lambda: _randomize_bn(UniFormerLocalMHRA(8)), torch.randn(1, 5, 6, 8))
    check_state_dict_round_trip(lambda: UniFormerGlobalMHRA(8, 2), torch.randn(1, 5, 6, 8))


def test_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        UniFormerLocalMHRA(8, 4)
    with pytest.raises(TypeError, match="dim"):
        UniFormerLocalMHRA(8.0)
    with pytest.raises(ValueError, match="head_dim"):
        UniFormerGlobalMHRA(32)
    with pytest.raises(ValueError, match="num_heads"):
        UniFormerGlobalMHRA(10, 3)
    with pytest.raises(ValueError, match="qk_scale"):
        UniFormerGlobalMHRA(8, 2, qk_scale=-1.0)
    for m in (UniFormerLocalMHRA(8), UniFormerGlobalMHRA(8, 2)):
        with pytest.raises(ValueError, match="channel-last"):
            m(torch.randn(1, 8, 4, 4))


def test_registry():
    entries = {e.name: e for e in nearfar.mechanisms()}
    local, glob = entries["uniformer_local"], entries["uniformer_global"]
    assert local.cls is UniFormerLocalMHRA and glob.cls is UniFormerGlobalMHRA
    assert glob.make(96, 3).num_heads == 1 and glob.make(384, 12).num_heads == 6
    assert local.make(96, 3).kernel_size == 5
    for e in (local, glob):
        assert e.make(96, 3)(torch.randn(1, 3, 5, 96)).shape == (1, 3, 5, 96)
