"""DCAL pair-wise cross-attention (PROVISIONAL, from the paper: Zhu et al., "Dual Cross-Attention Learning for
Fine-Grained Visual Categorization and Object Re-Identification", CVPR 2022; no official code) against a float64
re-derivation with loops: each query over the keys and values of its own image and of its paired image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)
from oracles.pwca import BASELINES

from nearfar.layers.pwca import PWCAttention
from nearfar.layers.registry import mechanisms

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------
# float64 reference: loops over images, queries and heads; keys = own tokens then the pair's
# ---------------------------------------------------------------------------------------------------------


def ref_pwca(m, tokens, pair_tokens=None):
    """``tokens (B, N, C)``, ``pair_tokens (B, N2, C)`` or None (self-attention) -> ``(B, N, C)``."""
    c = m.dim
    w, bias = m.qkv.weight.double(), m.qkv.bias.double()
    (wq, bq), (wk, bk), (wv, bv) = [(w[i * c:(i + 1) * c], bias[i * c:(i + 1) * c]) for i in range(3)]
    wo, bo = m.proj.weight.double(), m.proj.bias.double()
    heads, d = m.num_heads, c // m.num_heads
    t = tokens.double()
    out = []
    for bi in range(t.shape[0]):
        keyed = t[bi] if pair_tokens is None else torch.cat([t[bi], pair_tokens[bi].double()])
        k, v = keyed @ wk.T + bk, keyed @ wv.T + bv
        rows = []
        for i in range(t.shape[1]):
            q = t[bi, i] @ wq.T + bq
            per_head = []
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                per_head.append(torch.softmax((k[:, sl] @ q[sl]) * m.scale, 0) @ v[:, sl])
            rows.append(torch.cat(per_head) @ wo.T + bo)
        out.append(torch.stack(rows))
    return torch.stack(out)


def ref_map(m, x, pair=None):
    b, h, w, c = x.shape
    pt = None if pair is None else pair.reshape(b, -1, c)
    return ref_pwca(m, x.reshape(b, h * w, c), pt).reshape(b, h, w, c)


def _layout(x, how):
    """0 contiguous, 1 H/W transposed back (non-contiguous), 2 a channel slice of a wider tensor."""
    if how == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == 2:
        return torch.cat([x, torch.randn_like(x)], -1)[..., :x.shape[-1]]
    return x


# ---------------------------------------------------------------------------------------------------------
# reference match: outputs, input (both images) and parameter gradients
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), h2=st.integers(1, 6), w2=st.integers(1, 6),
       heads=st.sampled_from([1, 2, 3]), d=st.sampled_from([2, 4]), how=st.integers(0, 2), how2=st.integers(0, 2),
       seed=st.integers(0, 50))
def test_explicit_pair_matches_reference(b, h, w, h2, w2, heads, d, how, how2, seed):
    torch.manual_seed(seed)
    c = heads * d
    m = PWCAttention(c, heads)
    x = _layout(torch.randn(b, h, w, c), how).requires_grad_()
    pair = _layout(torch.randn(b, h2, w2, c), how2).requires_grad_()
    check_outputs_and_grads(m(x, pair=pair), ref_map(m, x, pair), [x, pair, *m.parameters()])


@pytest.mark.parametrize("b,grid,heads", [(3, (5, 7), 2), (2, (4, 4), 4), (4, (3, 1), 1)])
def test_training_pairs_each_image_with_the_previous_one(b, grid, heads):
    torch.manual_seed(1)
    m = PWCAttention(16, heads).train()
    x = _layout(torch.randn(b, *grid, 16), 1).requires_grad_()
    check_outputs_and_grads(m(x), ref_map(m, x, x.roll(1, 0)), [x, *m.parameters()])


@pytest.mark.parametrize("how", [0, 2])
def test_eval_and_self_attention_are_plain_mhsa(how):
    torch.manual_seed(2)
    m = PWCAttention(16, 2).eval()
    x = _layout(torch.randn(3, 5, 6, 16), how).requires_grad_()
    check_outputs_and_grads(m(x), ref_map(m, x), [x, *m.parameters()])
    m.train()
    check_outputs_and_grads(m.self_attention(x), ref_map(m, x), [x, *m.parameters()])


def test_attend_pair_on_token_lists_with_class_tokens():
    torch.manual_seed(3)
    m = PWCAttention(12, 3)
    t1, t2 = torch.randn(2, 17, 12).requires_grad_(), torch.randn(2, 10, 12).requires_grad_()
    check_outputs_and_grads(m.attend_pair(t1, t2), ref_pwca(m, t1, t2), [t1, t2, *m.parameters()])
    check_outputs_and_grads(m.attend_pair(t1), ref_pwca(m, t1), [t1, *m.parameters()])


# ---------------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------------


def test_oracle_pair_equal_to_the_image_is_self_attention():
    """Duplicated keys and values change no softmax: PWCA(x, x) = SA(x); so is a training batch of one."""
    torch.manual_seed(4)
    m = PWCAttention(16, 4)
    x = torch.randn(2, 6, 7, 16)
    t = x.reshape(2, 42, 16)
    q, k, v = m.qkv(t).reshape(2, 42, 3, 4, 4).permute(2, 0, 3, 1, 4)
    sa = m.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 42, 16)).reshape(x.shape)
    assert_close(m(x, pair=x), sa)
    assert_close(m.train()(x[:1]), sa[:1])
    assert_close(m.eval()(x), sa)


def test_the_distractor_changes_every_output_in_training():
    torch.manual_seed(5)
    m = PWCAttention(16, 2).train()
    x = torch.randn(3, 4, 4, 16)
    y = m(x)
    moved = x.clone()
    moved[2] += torch.randn(4, 4, 16)  # image 2 distracts image 0 (rolled batch): 0 and 2 change, 1 does not
    z = m(moved)
    assert not torch.allclose(y[0], z[0], atol=1e-4) and torch.equal(y[1], z[1])


# ---------------------------------------------------------------------------------------------------------
# hygiene: finite, compile, state dict, errors, registry, baseline
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_odd_sizes():
    torch.manual_seed(6)
    check_forward_backward_finite(PWCAttention(16, 2).train(), torch.randn(2, 11, 9, 16))


def test_compile_matches_eager_eval_and_training():
    torch.manual_seed(7)
    m, x = PWCAttention(16, 2), torch.randn(2, 9, 8, 16)
    check_compile_matches_eager(m, x)  # eval: self-attention
    m.train()
    with torch.no_grad():
        assert_close(torch.compile(m)(x), m(x))


def test_state_dict_round_trip_and_timm_names():
    check_state_dict_round_trip(lambda: PWCAttention(16, 2), torch.randn(1, 7, 9, 16))
    # the shared self-attention weights under timm's ViT Attention keys
    timm_attention = {"qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16), "proj.bias": (16,)}
    m = PWCAttention(16, 2)
    m.load_state_dict({k: torch.randn(s) for k, s in timm_attention.items()}, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == timm_attention


@pytest.mark.parametrize("kwargs,match", [({"dim": 10, "num_heads": 3}, "dim"),
                                          ({"dim": 16, "num_heads": 2, "qk_scale": 0.0}, "qk_scale")])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PWCAttention(**kwargs)


def test_bad_inputs():
    m = PWCAttention(16, 2)
    x = torch.randn(2, 4, 5, 16)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 20, 16))
    with pytest.raises(ValueError, match="pair must be"):
        m(x, pair=torch.randn(2, 4, 5, 8))
    with pytest.raises(ValueError, match=r"pair must have the batch size of x \(2\)"):
        m(x, pair=torch.randn(3, 4, 5, 16))
    with pytest.raises(TypeError, match="pair must be a torch.Tensor"):
        m(x, pair=[1.0])
    with pytest.raises(ValueError, match="pair_tokens must have the batch size"):
        m.attend_pair(torch.randn(2, 5, 16), torch.randn(1, 5, 16))


def test_registry_entry_and_benchmark_shapes():
    (mech,) = [mm for mm in mechanisms() if mm.name == "pwca"]
    assert "PROVISIONAL" in mech.notes and mech.cls is PWCAttention
    with torch.no_grad():
        m = mech.make(384, 12)
        x = torch.randn(2, 14, 14, 384)
        assert m.train()(x).shape == x.shape and m.eval()(x).shape == x.shape


@pytest.mark.parametrize("training", [False, True])
def test_baseline_matches_module(training):
    torch.manual_seed(8)
    m = PWCAttention(16, 2).train(training)
    x = torch.randn(3, 9, 11, 16)
    with torch.no_grad():
        assert_close(BASELINES["pwca"](m, x), m(x))
