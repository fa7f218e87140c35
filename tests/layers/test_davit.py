"""DaViT channel group attention: a float64 reference written from the paper's description and the official code
(dingmyu/davit ``ChannelAttention``) with plain loops and an explicit softmax, its properties (oracles), the
benchmark baseline, timm state-dict compatibility, module hygiene."""

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
from oracles.davit import BASELINES

import nearfar
from nearfar.layers.davit_channel import DaViTChannelAttention


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
