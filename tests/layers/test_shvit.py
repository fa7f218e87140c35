"""SHViT single-head attention: float64 reference written from the paper and the official code (ysj9909/SHViT
``model/shvit.py`` ``SHSA``), its properties (oracles), timm names, baseline, hygiene."""

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
from oracles.shvit import BASELINES

import nearfar
from nearfar.layers.shvit import SHSA

EPS = 1e-5  # GroupNorm and BatchNorm defaults


def _batch_norm(y: torch.Tensor, bn: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """Channel-last y (B, H, W, C): batch statistics over (B, H, W) in training, running statistics in eval."""
    if training:
        mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (y - mean) / torch.sqrt(var + EPS) * bn.weight + bn.bias


def shsa_reference(m: SHSA, x: torch.Tensor) -> torch.Tensor:
    """SHSA in float64, channel-last, with the norms written out."""
    b, h, w, c = x.shape
    p, d = m.pdim, m.qk_dim
    x1, x2 = x[..., :p], x[..., p:]
    mu = x1.mean((1, 2, 3), keepdim=True)
    var = x1.var((1, 2, 3), unbiased=False, keepdim=True)
    x1 = (x1 - mu) / torch.sqrt(var + EPS) * m.pre_norm.weight + m.pre_norm.bias
    qkv = _batch_norm(torch.einsum("bhwi,oi->bhwo", x1, m.qkv.c.weight[:, :, 0, 0]), m.qkv.bn, m.training)
    qkv = qkv.reshape(b, 1, h * w, -1)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    att = ref.dense_reference(q, k, v, torch.ones(1, dtype=torch.bool), d ** -0.5).reshape(b, h, w, p)
    y = torch.relu(torch.cat([att, x2], dim=-1))
    proj = m.proj[1]
    return _batch_norm(torch.einsum("bhwi,oi->bhwo", y, proj.c.weight[:, :, 0, 0]), proj.bn, m.training)


def _randomize(m: SHSA) -> SHSA:
    """Non-trivial norms (the final BN weight starts at 0, which would make every output 0)."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.normal_()
                mod.bias.normal_()
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    return m


@settings(max_examples=20)
@given(h=st.integers(1, 7), w=st.integers(1, 7), dim=st.integers(2, 12), qk_dim=st.integers(1, 6),
       frac=st.floats(0.05, 1.0), train=st.booleans())
def test_shsa_matches_reference(h, w, dim, qk_dim, frac, train):
    torch.manual_seed(h * 100 + w * 10 + dim)
    pdim = max(1, min(dim, round(frac * dim)))
    m = _randomize(SHSA(dim, qk_dim=qk_dim, pdim=pdim)).train(train)
    batch = 3 if train else 2
    check_against_reference(m, torch.randn(batch, h, w, dim), shsa_reference)


def test_default_pdim_matches_official_variants():
    for dim, pdim in ((224, 48), (320, 68), (308, 66), (448, 96), (352, 75), (336, 72)):
        assert SHSA(dim).pdim == pdim


def test_oracle1_full_channels_is_single_head_attention():
    torch.manual_seed(1)
    m = _randomize(SHSA(12, qk_dim=4, pdim=12)).eval()
    x = torch.randn(2, 5, 7, 12)
    # channels-first, torch's own GroupNorm / Conv2d / BatchNorm2d / SDPA
    xc = x.permute(0, 3, 1, 2).contiguous()
    qkv = m.qkv.bn(m.qkv.c(F.group_norm(xc, 1, m.pre_norm.weight, m.pre_norm.bias, EPS))).flatten(2)
    q, k, v = (t.transpose(1, 2)[:, None] for t in qkv.split([4, 4, 12], dim=1))
    att = F.scaled_dot_product_attention(q, k, v, scale=0.5)[:, 0].transpose(1, 2).reshape(2, 12, 5, 7)
    expected = m.proj[1].bn(m.proj[1].c(torch.relu(att)))
    assert_close(m(x), expected.permute(0, 2, 3, 1))


def test_oracle2_constant_qk_gives_spatial_mean_of_v():
    torch.manual_seed(2)
    m = _randomize(SHSA(10, qk_dim=3, pdim=4)).eval()
    proj = m.proj[1]
    with torch.no_grad():
        m.qkv.c.weight[:6] = 0  # q, k rows: q and k become the same vector at every pixel
        proj.c.weight.copy_(torch.eye(10)[:, :, None, None])
        proj.bn.weight.fill_(1.0)
        proj.bn.bias.zero_()
        proj.bn.running_mean.zero_()
        proj.bn.running_var.fill_(1.0)
    x = torch.randn(2, 5, 6, 10)
    v = m.qkv(m.pre_norm(x[..., :4].permute(0, 3, 1, 2)).permute(0, 2, 3, 1))[..., 6:]
    out = m(x) * (1 + EPS) ** 0.5
    assert_close(out[..., :4], torch.relu(v.mean((1, 2), keepdim=True)).expand(2, 5, 6, 4), name="attended")
    assert_close(out[..., 4:], torch.relu(x[..., 4:]), name="bypass")


@pytest.mark.parametrize("train", [True, False])
def test_oracle3_residual_block_is_identity_at_init(train):
    torch.manual_seed(3)
    m = SHSA(16, pdim=4).train(train)
    x = torch.randn(2, 5, 5, 16)
    out = m(x)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(x + out, x)


def test_baseline_matches_module():
    torch.manual_seed(4)
    for train in (False, True):
        m = _randomize(SHSA(24)).train(train)
        x = torch.randn(2, 9, 7, 24)
        with torch.no_grad():
            assert_close(BASELINES["shvit"](m, x), m(x), name=f"baseline train={train}")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(5)
    m = _randomize(SHSA(20))
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 20))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 20))
    x = torch.randn(1, 5, 6, 20).transpose(1, 2)  # non-contiguous input
    with torch.no_grad():
        assert_close(m(x), m(x.contiguous()), 1e-6)


def test_state_dict_names_match_timm():
    m = SHSA(64, qk_dim=16, pdim=16)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {  # timm SHSA(64, 16, 16)
        "pre_norm.weight": (16,), "pre_norm.bias": (16,),
        "qkv.c.weight": (48, 16, 1, 1), "qkv.bn.weight": (48,), "qkv.bn.bias": (48,), "qkv.bn.running_mean": (48,),
        "qkv.bn.running_var": (48,), "qkv.bn.num_batches_tracked": (),
        "proj.1.c.weight": (64, 64, 1, 1), "proj.1.bn.weight": (64,), "proj.1.bn.bias": (64,),
        "proj.1.bn.running_mean": (64,), "proj.1.bn.running_var": (64,), "proj.1.bn.num_batches_tracked": ()}
    check_state_dict_round_trip(lambda: _randomize(SHSA(24)), torch.randn(1, 5, 6, 24))


def test_errors():
    with pytest.raises(ValueError, match="pdim"):
        SHSA(8, pdim=9)
    with pytest.raises(ValueError, match="pdim"):
        SHSA(8, pdim=0)
    with pytest.raises(ValueError, match="qk_dim"):
        SHSA(8, qk_dim=0)
    with pytest.raises(TypeError, match="dim"):
        SHSA(8.0)
    m = SHSA(8)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["shvit"]
    assert entry.repo == "ysj9909/SHViT" and entry.cls is SHSA
    m = entry.make(96, 3)
    assert (m.qk_dim, m.pdim) == (16, 20)
    assert m(torch.randn(1, 4, 4, 96)).shape == (1, 4, 4, 96)
