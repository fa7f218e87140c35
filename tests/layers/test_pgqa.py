"""PGQA (Khan et al., arXiv 2408.08454; yjzhang0505/key-driven-gqa ``modules/attention/pgqa.py``): training
forward and backward against a float64 per-head reference fed the same uniform draws, the perturbation's
statistics, eval == GQA, and the G = H conversion reproducing an MHA layer exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)
from oracles.kdgqa import pgqa_reference

import nearfar as nf
from nearfar.layers.pgqa import perturb_heads


@settings(max_examples=12, deadline=None)
@given(hg=st.sampled_from([(2, 1), (4, 2), (6, 3), (8, 2), (4, 4)]), b=st.integers(1, 3), n=st.integers(1, 13),
       seed=st.integers(0, 2**16), bias=st.booleans())
def test_training_forward_matches_the_float64_reference(hg, b, n, seed, bias):
    h, g = hg
    torch.manual_seed(seed)
    m = nf.PGQA(4 * h, h, g, qkv_bias=bias, proj_bias=bias)
    x = torch.randn(b, n, 4 * h).requires_grad_()
    torch.manual_seed(seed + 1)
    out = m(x)
    torch.manual_seed(seed + 1)  # the layer draws one torch.rand(H, N * d) per forward
    noise = torch.rand(h, n * 4)
    check_outputs_and_grads(out, pgqa_reference(m, x, noise), [x, *m.parameters()], rtol=2e-5, grad_rtol=2e-4)
    m.eval()
    check_outputs_and_grads(m(x), pgqa_reference(m, x), [x, *m.parameters()], rtol=2e-5, grad_rtol=1e-4)


def test_the_perturbation_has_each_rows_mean_and_std_and_one_shape_per_head():
    torch.manual_seed(1)
    o = torch.randn(3, 6, 5, 4, dtype=torch.float64) * torch.rand(3, 6, 1, 1, dtype=torch.float64)
    noise = (o - perturb_heads(o, 3)).flatten(2)
    rows = o.flatten(2)
    assert_close(noise.mean(-1), rows.mean(-1))
    assert_close(noise.std(-1), rows.std(-1))
    z = (noise - noise.mean(-1, keepdim=True)) / noise.std(-1, keepdim=True)
    assert_close(z[0], z[1])  # the same random matrix for every sequence
    assert_close(z[0], z[2])
    # the zeroed "diagonal" entry h % group_size is the smallest draw, so it is each row's minimum
    assert z[0].argmin(-1).tolist() == [h % 3 for h in range(6)]
    assert torch.equal(perturb_heads(o[:, :, :1, :1], 3), o[:, :, :1, :1])  # one number per row: unchanged
    # the official matrix is drawn with rand: its standardised rows follow the uniform distribution's spread
    big = torch.randn(1, 2, 400, 50, dtype=torch.float64)
    zb = (big - perturb_heads(big, 2)).flatten(2)
    zb = (zb - zb.mean(-1, keepdim=True)) / zb.std(-1, keepdim=True)
    assert zb.abs().max() < math.sqrt(3) + 0.01  # a standardised uniform row stays within sqrt(3); a normal one not


def test_eval_is_gqa_and_training_is_random():
    torch.manual_seed(2)
    m = nf.PGQA(32, 8, 2)
    gqa = nf.DenseAttention(32, 8, causal=False, num_kv_heads=2)
    gqa.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        a, b = m(x), m(x)
        assert (a - b).abs().max() > 1e-3 and (a - gqa(x)).abs().max() > 1e-3
        assert_close(m.eval()(x), gqa(x))


def test_conversion_with_g_equal_h_reproduces_the_mha_layer():
    torch.manual_seed(3)
    mha = nf.DenseAttention(32, 4, causal=False, qkv_bias=True)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        assert_close(nf.PGQA.from_mha(mha, num_kv_heads=4).eval()(x), mha(x), rtol=1e-6)

    class TimmAttention(torch.nn.Module):  # timm's ViT layout: fused qkv, proj with a bias, no positions
        def __init__(self, dim, num_heads):
            super().__init__()
            self.num_heads, self.qkv, self.proj = num_heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v
            return self.proj(o.transpose(1, 2).reshape(b, n, c))

    vit = TimmAttention(32, 4).double()
    layer = nf.PGQA.from_mha(vit, num_kv_heads=4).eval()
    assert layer.rope is None and layer.o_proj.bias is not None and layer.q_proj.weight.dtype == torch.float64
    with torch.no_grad():
        assert_close(layer(x.double()), vit(x.double()), rtol=1e-12)
        pooled = nf.PGQA.from_mha(vit, num_kv_heads=2)
        k_rows = vit.qkv.weight[32:64].view(4, 8, 32)
        assert_close(pooled.k_proj.weight.view(2, 8, 32)[1], (k_rows[2] + k_rows[3]) / 2)
        assert_close(pooled.k_proj.bias.view(2, 8)[0], vit.qkv.bias[32:64].view(4, 8)[:2].mean(0))


def test_module_checks_and_errors():
    torch.manual_seed(4)
    x = torch.randn(2, 9, 32)
    check_forward_backward_finite(nf.PGQA(32, 8), x * 50)
    check_compile_matches_eager(nf.PGQA(32, 8), x)
    check_state_dict_round_trip(lambda: nf.PGQA(32, 8, 4, qkv_bias=True, proj_bias=True), x)
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        nf.PGQA(32, 8, 3)
    with pytest.raises(TypeError, match="proj_bias"):
        nf.PGQA(32, 8, proj_bias=None)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        nf.PGQA(32, 8)(x, key_padding_mask=torch.ones(2, 9))
    entry = {e.name: e for e in nf.mechanisms()}["pgqa"]
    assert entry.family == "dense" and set(entry.patterns) == {"NS"} and entry.cls is nf.PGQA
