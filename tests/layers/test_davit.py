"""DaViT channel group attention and spatial window attention: float64 references written from the paper's
description and the official code (dingmyu/davit ``ChannelAttention``, ``SpatialBlock``) with plain loops, explicit
softmax and materialised window masks, its properties (oracles), the
benchmark baseline, timm state-dict compatibility, module hygiene."""

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
from oracles.davit import BASELINES

import nearfar
from nearfar.layers.davit_channel import DaViTChannelAttention
from nearfar.layers.davit_spatial import DaViTWindowAttention


def channel_reference(m: DaViTChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """Per group g: Q, K, V (N, C_g); A[i, j] = exp(s K[:, i] . V[:, j]) / sum_j' (...); out[n, i] = sum_j A[i, j]
    Q[n, j]; groups concatenated in order, then the output Linear."""
    b, h, w, c = x.shape
    g, cg = m.num_heads, c // m.num_heads
    t = x.reshape(b, h * w, c)
    qkv = t @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    outs = []
    for j in range(g):
        sl = slice(j * cg, (j + 1) * cg)
        logits = (cg ** -0.5) * torch.einsum("bni,bnj->bij", k[..., sl], v[..., sl])
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        a = e / e.sum(-1, keepdim=True)
        outs.append(torch.einsum("bij,bnj->bni", a, q[..., sl]))
    out = torch.cat(outs, dim=-1) @ m.proj.weight.T + m.proj.bias
    return out.reshape(b, h, w, c)


def _randomize_biases(m: torch.nn.Module) -> None:
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), heads=st.integers(1, 4),
       cg=st.integers(1, 5), qkv_bias=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_channel_matches_reference(b, h, w, heads, cg, qkv_bias, layout):
    torch.manual_seed(h * 100 + w * 10 + heads)
    dim = heads * cg
    m = DaViTChannelAttention(dim, heads, qkv_bias=qkv_bias)
    _randomize_biases(m)
    if layout == "transposed":
        x = torch.randn(b, w, h, dim).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(b, h, w, 2 * dim)[..., ::2]
    else:
        x = torch.randn(b, h, w, dim)
    check_against_reference(m, x, channel_reference)


def test_oracle1_permutation_equivariant_over_tokens():
    torch.manual_seed(1)
    m = DaViTChannelAttention(24, 3, qkv_bias=True)
    x = torch.randn(2, 5, 7, 24)
    perm = torch.randperm(35)
    xp = x.reshape(2, 35, 24)[:, perm].reshape(2, 5, 7, 24)
    with torch.no_grad():
        assert_close(m(xp).reshape(2, 35, 24), m(x).reshape(2, 35, 24)[:, perm])


def test_oracle2_affinity_rows_sum_to_one_and_output_is_q_at():
    torch.manual_seed(2)
    m = DaViTChannelAttention(12, 2)
    x = torch.randn(2, 4, 3, 12)
    with torch.no_grad():
        q, k, v = m.qkv(x.reshape(2, 12, 12)).reshape(2, 12, 3, 2, 6).permute(2, 0, 3, 1, 4)  # (B, G, N, C_g)
        a = torch.softmax((m.scale * k).transpose(-1, -2) @ v, dim=-1)
        assert_close(a.sum(-1), torch.ones(2, 2, 6))
        out = (q @ a.transpose(-1, -2)).transpose(1, 2).reshape(2, 4, 3, 12)
        assert_close(m(x), m.proj(out))
    assert m.scale == 6 ** -0.5  # channels per group, not tokens


def test_channel_output_depends_on_every_token():
    """Family "dense": a change at any one token changes every token's output."""
    torch.manual_seed(3)
    m = DaViTChannelAttention(8, 2, qkv_bias=True)
    x = torch.randn(1, 3, 4, 8, requires_grad=True)
    m(x)[0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_channel_baseline_matches_module():
    torch.manual_seed(4)
    for shape, heads in (((2, 8, 10, 24), 3), ((1, 7, 5, 24), 6)):
        m = DaViTChannelAttention(shape[-1], heads, qkv_bias=True)
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(BASELINES["davit_channel"](m, x), m(x), name=f"baseline {shape}")


def _timm_channel_state_dict(dim: int) -> dict[str, torch.Tensor]:
    """The ``attn.*`` entries of a timm/official DaViT ``ChannelBlock`` (qkv_bias=True), prefix stripped."""
    g = torch.Generator().manual_seed(0)
    return {"qkv.weight": torch.randn(3 * dim, dim, generator=g), "qkv.bias": torch.randn(3 * dim, generator=g),
            "proj.weight": torch.randn(dim, dim, generator=g), "proj.bias": torch.randn(dim, generator=g)}


def test_channel_state_dict_timm_names_load_strict():
    m = DaViTChannelAttention(24, 3, qkv_bias=True)
    sd = _timm_channel_state_dict(24)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 5, 24)
    with torch.no_grad():
        assert_close(m(x), BASELINES["davit_channel"](m, x))
    assert set(DaViTChannelAttention(24, 3).state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    check_state_dict_round_trip(lambda: DaViTChannelAttention(24, 3, qkv_bias=True), torch.randn(1, 5, 6, 24))


def test_channel_finite_and_compile():
    torch.manual_seed(5)
    m = DaViTChannelAttention(24, 3, qkv_bias=True)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 24))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 24))


def test_channel_registry_entry():
    entry = {e.name: e for e in nearfar.mechanisms()}["davit_channel"]
    assert entry.family == "dense" and entry.dims == ("2d",) and entry.cls is DaViTChannelAttention
    assert entry.make(16, 4).num_heads == 4


def test_channel_errors():
    with pytest.raises(ValueError, match="num_heads"):
        DaViTChannelAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        DaViTChannelAttention(8, 0)
    with pytest.raises(TypeError, match="qkv_bias"):
        DaViTChannelAttention(8, 2, qkv_bias=1)
    m = DaViTChannelAttention(8, 2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError):
        m(torch.randn(1, 4, 8))
    with pytest.raises(TypeError):
        m([1.0])


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def spatial_reference(m: DaViTWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Zero-pad to whole windows, dense attention over the padded map with "same window" (and, with mask_padding,
    "real key") as an explicit mask, crop, output Linear."""
    b, h, w, c = x.shape
    s = m.window_size
    hp, wp = -(-h // s) * s, -(-w // s) * s
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    cell = (rows // s * (wp // s) + cols // s).reshape(-1)
    allowed = cell[:, None] == cell[None, :]
    if m.mask_padding:
        allowed = allowed & ((rows < h) & (cols < w)).reshape(1, -1)
    qkv = F.linear(xp.reshape(b, hp * wp, c), m.qkv.weight, m.qkv.bias)
    q, k, v = (_heads(t, m.num_heads) for t in qkv.chunk(3, dim=-1))
    o = ref.dense_reference(q, k, v, allowed, (c // m.num_heads) ** -0.5).transpose(1, 2).reshape(b, hp, wp, c)
    return F.linear(o[:, :h, :w], m.proj.weight, m.proj.bias)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), heads=st.integers(1, 3),
       ws=st.integers(1, 4), qkv_bias=st.booleans(), mask_padding=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_spatial_matches_reference(b, h, w, heads, ws, qkv_bias, mask_padding, layout):
    torch.manual_seed(h * 100 + w * 10 + ws)
    dim = 4 * heads
    m = DaViTWindowAttention(dim, heads, window_size=ws, qkv_bias=qkv_bias, mask_padding=mask_padding)
    _randomize_biases(m)
    if layout == "transposed":
        x = torch.randn(b, w, h, dim).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(b, h, w, 2 * dim)[..., ::2]
    else:
        x = torch.randn(b, h, w, dim)
    check_against_reference(m, x, spatial_reference)


def test_spatial_default_window_odd_sizes():
    torch.manual_seed(6)
    for mask_padding in (False, True):
        m = DaViTWindowAttention(24, 3, mask_padding=mask_padding)
        _randomize_biases(m)
        check_against_reference(m, torch.randn(2, 9, 11, 24), spatial_reference)


def test_spatial_oracle3_one_window_is_mhsa():
    torch.manual_seed(7)
    m = DaViTWindowAttention(16, 4, window_size=5, qkv_bias=True)
    x = torch.randn(2, 5, 5, 16)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(m.qkv.weight)
        mha.in_proj_bias.copy_(m.qkv.bias)
        mha.out_proj.weight.copy_(m.proj.weight)
        mha.out_proj.bias.copy_(m.proj.bias)
        t = x.reshape(2, 25, 16)
        assert_close(m(x), mha(t, t, t, need_weights=False)[0].reshape(2, 5, 5, 16))


def test_spatial_padding_is_attended_unless_masked():
    torch.manual_seed(8)
    a = DaViTWindowAttention(8, 2, window_size=3)
    _randomize_biases(a)
    b = DaViTWindowAttention(8, 2, window_size=3, mask_padding=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert_close(ya[:, :3], yb[:, :3], name="whole windows")
    assert (ya[:, 3] - yb[:, 3]).abs().max() > 1e-3  # the last row's windows hold padded keys


def test_spatial_baseline_matches_module():
    torch.manual_seed(9)
    for shape, heads, ws in (((2, 14, 14, 24), 3, 7), ((1, 9, 11, 24), 6, 7), ((2, 5, 3, 8), 2, 2)):
        m = DaViTWindowAttention(shape[-1], heads, window_size=ws)
        _randomize_biases(m)
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(BASELINES["davit_spatial"](m, x), m(x), name=f"baseline {shape}")


def test_spatial_state_dict_timm_names_load_strict():
    m = DaViTWindowAttention(24, 3)
    sd = _timm_channel_state_dict(24)  # timm's WindowAttention has the same four tensors
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 9, 8, 24)
    with torch.no_grad():
        assert_close(m(x), BASELINES["davit_spatial"](m, x))
    check_state_dict_round_trip(lambda: DaViTWindowAttention(24, 3, window_size=3), torch.randn(1, 5, 6, 24))


def test_spatial_finite_and_compile():
    torch.manual_seed(10)
    m = DaViTWindowAttention(24, 3, window_size=3)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 24))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 24))


def test_spatial_registry_entry():
    entry = {e.name: e for e in nearfar.mechanisms()}["davit_spatial"]
    assert entry.family == "window" and entry.dims == ("2d",) and entry.cls is DaViTWindowAttention
    assert entry.make(16, 4).window_size == 7


def test_spatial_errors():
    with pytest.raises(ValueError, match="num_heads"):
        DaViTWindowAttention(10, 3)
    with pytest.raises(ValueError, match="window_size"):
        DaViTWindowAttention(8, 2, window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        DaViTWindowAttention(8, 2, window_size=7.0)
    with pytest.raises(TypeError, match="qkv_bias"):
        DaViTWindowAttention(8, 2, qkv_bias=None)
    with pytest.raises(TypeError, match="mask_padding"):
        DaViTWindowAttention(8, 2, mask_padding=1)
    m = DaViTWindowAttention(8, 2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError):
        m(torch.randn(1, 0, 4, 8))
