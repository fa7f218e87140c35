"""DCAL global-local cross-attention (PROVISIONAL, from the paper: Zhu et al., "Dual Cross-Attention Learning for
Fine-Grained Visual Categorization and Object Re-Identification", CVPR 2022; no official code) against a float64
re-derivation with loops: the top-R tokens of the scores query every token, outputs scattered into a zero map."""

from __future__ import annotations

import math

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
from oracles.glca import BASELINES

from nearfar.functional import attention_rollout
from nearfar.layers.glca import GLCAttention
from nearfar.layers.registry import mechanisms

F64 = torch.float64

# ---------------------------------------------------------------------------------------------------------
# float64 reference: loops over images, selected tokens and heads (parameters converted, so gradients reach them)
# ---------------------------------------------------------------------------------------------------------


def _params(m):
    c = m.dim
    w, b = m.qkv.weight.double(), m.qkv.bias.double()
    return (w[:c], b[:c]), (w[c:2 * c], b[c:2 * c]), (w[2 * c:], b[2 * c:]), (m.proj.weight.double(),
                                                                             m.proj.bias.double())


def ref_rows(m, tokens, rows):
    """``tokens (B, N, C)``, ``rows``: per image a list of query indices -> ``(B, R, C)``."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = _params(m)
    t = tokens.double()
    heads, d = m.num_heads, m.dim // m.num_heads
    out = []
    for bi, picked in enumerate(rows):
        k, v = t[bi] @ wk.T + bk, t[bi] @ wv.T + bv  # (N, C)
        outs = []
        for i in picked:
            q = t[bi, i] @ wq.T + bq
            per_head = []
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                p = torch.softmax((k[:, sl] @ q[sl]) * m.scale, 0)
                per_head.append(p @ v[:, sl])
            outs.append(torch.cat(per_head) @ wo.T + bo)
        out.append(torch.stack(outs))
    return torch.stack(out)


def top_rows(scores, r):
    """The ``r`` highest scores of every image, as sorted index lists (plain Python)."""
    return [sorted(sorted(range(len(s)), key=lambda j: -s[j])[:r]) for s in scores.tolist()]


def ref_glca(m, x, scores):
    b, h, w, c = x.shape
    n = h * w
    r = max(1, min(n, math.floor(m.local_ratio * n + 0.5)))
    rows = top_rows(scores.reshape(b, n), r)
    sel = ref_rows(m, x.reshape(b, n, c), rows)
    full = [[None] * n for _ in range(b)]
    for bi in range(b):
        for j, i in enumerate(rows[bi]):
            full[bi][i] = sel[bi, j]
    zero = torch.zeros(c, dtype=F64)
    return torch.stack([torch.stack([t if t is not None else zero for t in img]) for img in full]).reshape(b, h, w, c)


def ref_pooled_scores(m, tokens):
    (wq, bq), (wk, bk), _, _ = _params(m)
    t = tokens.double()
    heads, d = m.num_heads, m.dim // m.num_heads
    out = []
    for bi in range(t.shape[0]):
        q, k = t[bi].mean(0) @ wq.T + bq, t[bi] @ wk.T + bk
        out.append(sum(torch.softmax((k[:, h * d:(h + 1) * d] @ q[h * d:(h + 1) * d]) * m.scale, 0)
                       for h in range(heads)) / heads)
    return torch.stack(out)


def _layout(x, how):
    """0 contiguous, 1 H/W transposed back (non-contiguous), 2 a channel slice of a wider tensor."""
    if how == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == 2:
        return torch.cat([x, torch.randn_like(x)], -1)[..., :x.shape[-1]]
    return x


def _distinct_scores(b, n, seed):
    """Scores that are a permutation per image (no ties, exact in any float dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).float()


def _check(m, x, scores, how=0):
    x = _layout(x, how).requires_grad_()
    params = list(m.parameters())
    check_outputs_and_grads(m(x, scores=scores), ref_glca(m, x, scores), [x, *params])


# ---------------------------------------------------------------------------------------------------------
# reference match: outputs, input and parameter gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,heads,ratio", [((7, 7), 2, 0.1), ((5, 9), 1, 0.3), ((4, 4), 4, 1.0),
                                              ((1, 3), 2, 0.5)])
def test_matches_reference(grid, heads, ratio):
    torch.manual_seed(0)
    m = GLCAttention(16, heads, local_ratio=ratio)
    n = grid[0] * grid[1]
    _check(m, torch.randn(2, *grid, 16), _distinct_scores(2, n, 1))


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), heads=st.sampled_from([1, 2, 3]),
       d=st.sampled_from([2, 4]), ratio=st.sampled_from([0.1, 0.3, 0.5, 1.0]), how=st.integers(0, 2),
       spatial_scores=st.booleans(), seed=st.integers(0, 50))
def test_matches_reference_hypothesis(b, h, w, heads, d, ratio, how, spatial_scores, seed):
    torch.manual_seed(seed)
    m = GLCAttention(heads * d, heads, local_ratio=ratio)
    scores = _distinct_scores(b, h * w, seed)
    _check(m, torch.randn(b, h, w, heads * d), scores.reshape(b, h, w) if spatial_scores else scores, how)


def test_default_scores_are_the_pooled_query_attention():
    torch.manual_seed(1)
    m = GLCAttention(12, 3, local_ratio=0.2)
    x = torch.randn(3, 5, 6, 12)
    tokens = x.reshape(3, 30, 12)
    scores = m.pooled_scores(tokens)
    assert_close(scores, ref_pooled_scores(m, tokens))
    assert not scores.requires_grad
    assert torch.equal(m(x), m(x, scores=scores))
    m64, x64 = m.double(), x.double()  # the whole default path in float64, against the reference's own scores
    assert_close(m64(x64), ref_glca(m64, x64, ref_pooled_scores(m64, x64.reshape(3, 30, 12))), 1e-10)


def test_scores_from_attention_maps_are_the_class_row_of_the_rollout():
    torch.manual_seed(2)
    m = GLCAttention(8, 2, local_ratio=0.3).double()
    x = torch.randn(2, 4, 5, 8, dtype=F64)
    maps = torch.randn(3, 2, 2, 21, 21, dtype=F64).softmax(-1)
    cls_row = attention_rollout(maps, row=0)[:, 1:]
    assert torch.equal(m(x, attn=maps), m(x, scores=cls_row))
    assert torch.equal(m(x, attn=list(maps)), m(x, scores=cls_row.reshape(2, 4, 5)))
    assert_close(m(x, attn=maps), ref_glca(m, x, cls_row), 1e-10)


def test_attend_rows_is_the_papers_form_with_a_class_token():
    torch.manual_seed(3)
    m = GLCAttention(16, 2)
    tokens = torch.randn(2, 1 + 35, 16).requires_grad_()
    scores = _distinct_scores(2, 35, 3)
    idx = m.select(scores)
    assert idx.shape == (2, 4) and idx.dtype == torch.int64 and (idx.diff(dim=-1) > 0).all()
    assert [sorted(r) for r in idx.tolist()] == top_rows(scores, 4)
    rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), idx + 1], 1)  # class query + 4 local queries
    check_outputs_and_grads(m.attend_rows(tokens, rows), ref_rows(m, tokens, rows.tolist()),
                            [tokens, *m.parameters()])


# ---------------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------------


def test_oracle_full_ratio_is_mhsa_with_the_glca_weights():
    torch.manual_seed(4)
    m = GLCAttention(16, 4, local_ratio=1.0)
    x = torch.randn(2, 6, 7, 16)
    t = x.reshape(2, 42, 16)
    q, k, v = m.qkv(t).reshape(2, 42, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = m.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 42, 16))
    assert_close(m(x), expected.reshape(x.shape))


def test_unselected_positions_are_exactly_zero_and_selection_takes_no_gradient():
    torch.manual_seed(5)
    m = GLCAttention(16, 2, local_ratio=0.1)
    x = torch.randn(2, 14, 14, 16)
    scores = torch.randn(2, 196, requires_grad=True)
    y = m(x, scores=scores)
    out, idx = m.forward_selected(x, scores=scores)
    assert out.shape == (2, 20, 16) and idx.shape == (2, 20)
    keep = torch.zeros(2, 196, dtype=torch.bool).scatter(1, idx, True)
    assert (y.reshape(2, 196, 16)[~keep] == 0).all() and (y.reshape(2, 196, 16)[keep] != 0).all()
    assert torch.equal(y.reshape(2, 196, 16).gather(1, idx[..., None].expand(-1, -1, 16)), out)
    y.sum().backward()
    assert scores.grad is None


@pytest.mark.parametrize("n,ratio,r", [(196, 0.1, 20), (196, 0.3, 59), (3136, 0.1, 314), (10, 0.3, 3), (1, 0.1, 1),
                                       (15, 0.1, 2), (7, 1.0, 7)])
def test_number_of_local_queries(n, ratio, r):
    assert GLCAttention(8, 2, local_ratio=ratio).num_local(n) == r


# ---------------------------------------------------------------------------------------------------------
# hygiene: finite, compile, state dict, errors, registry, baseline
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_odd_sizes():
    torch.manual_seed(6)
    check_forward_backward_finite(GLCAttention(16, 2, local_ratio=0.3), torch.randn(2, 11, 9, 16))


def test_compile_matches_eager():
    torch.manual_seed(7)
    check_compile_matches_eager(GLCAttention(16, 2, local_ratio=0.3), torch.randn(2, 9, 8, 16))


def test_state_dict_round_trip_and_timm_names():
    check_state_dict_round_trip(lambda: GLCAttention(16, 2), torch.randn(1, 7, 9, 16))
    # timm's ViT Attention keys (qkv, proj): a ViT block's attn.* loads strictly
    timm_attention = {"qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16), "proj.bias": (16,)}
    m = GLCAttention(16, 2)
    m.load_state_dict({k: torch.randn(s) for k, s in timm_attention.items()}, strict=True)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == timm_attention
    assert set(GLCAttention(16, 2, qkv_bias=False).state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}


@pytest.mark.parametrize("kwargs,err,match", [
    ({"dim": 10, "num_heads": 3}, ValueError, "dim"),
    ({"dim": 16, "num_heads": 2, "local_ratio": 0.0}, ValueError, r"local_ratio must be a number in \(0.0, 1.0\]"),
    ({"dim": 16, "num_heads": 2, "local_ratio": 1.5}, ValueError, "local_ratio"),
    ({"dim": 16, "num_heads": 2, "local_ratio": "10%"}, TypeError, "local_ratio"),
    ({"dim": 16, "num_heads": 2, "qk_scale": -1.0}, ValueError, "qk_scale"),
])
def test_bad_constructor_args(kwargs, err, match):
    with pytest.raises(err, match=match):
        GLCAttention(**kwargs)


def test_bad_inputs():
    m = GLCAttention(16, 2)
    x = torch.randn(2, 4, 5, 16)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 20, 16))
    with pytest.raises(ValueError, match="not both"):
        m(x, scores=torch.randn(2, 20), attn=torch.rand(1, 2, 2, 21, 21))
    with pytest.raises(ValueError, match=r"scores must be \(B, H\*W\)"):
        m(x, scores=torch.randn(2, 21))
    with pytest.raises(TypeError, match="scores must be a floating"):
        m(x, scores=torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="class token first"):
        m(x, attn=torch.rand(1, 2, 2, 20, 20))
    tokens = torch.randn(2, 21, 16)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 21\)"):
        m.attend_rows(tokens, torch.tensor([[0, 21], [1, 2]]))
    with pytest.raises(TypeError, match="rows must be an integer"):
        m.attend_rows(tokens, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"rows must be \(B, R\)"):
        m.attend_rows(tokens, torch.zeros(3, 2, dtype=torch.long))


def test_registry_entry_and_benchmark_shapes():
    (mech,) = [mm for mm in mechanisms() if mm.name == "glca"]
    assert "PROVISIONAL" in mech.notes and mech.cls is GLCAttention and mech.family == "routed"
    with torch.no_grad():
        for dim, heads, size in ((96, 3, 56), (384, 12, 14)):
            m = mech.make(dim, heads)
            x = torch.randn(1, size, size, dim)
            y = m(x)
            assert y.shape == x.shape
            assert int((y.abs().sum(-1) > 0).sum()) == m.num_local(size * size)


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.1), ((9, 11), 0.3)])
def test_baseline_matches_module(grid, ratio):
    torch.manual_seed(8)
    m = GLCAttention(16, 2, local_ratio=ratio).eval()
    x = torch.randn(2, *grid, 16)
    with torch.no_grad():
        assert_close(BASELINES["glca"](m, x), m(x))
