"""S2-Attention: the per-head pattern from dkernel's rule (linxihui/dkernel ``dkernel/utils.py``
``get_sparse_attn_mask``), its properties (oracles), engines and decoding."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from module_checks import check_outputs_and_grads

import nearfar as nf
from nearfar.layers.s2_attention import S2Attention, s2_layer_kwargs, s2_pattern
from nearfar.models.tiny_lm import TinyLM


def reference_mask(n, kv_heads, block, local, stride, step, offset=0, dense_heads=0):
    """(Hkv, N, N) from the block rule, kron-expanded, token causality on top (plain loops, into Python lists:
    assigning a tensor element at a time took 12 s at N = 1300)."""
    out = []
    for h in range(kv_heads):
        dense = h >= kv_heads - dense_heads
        out.append([[j <= i and (dense or i // block - j // block < local
                                 or (j // block + h * step + offset) % stride == 0) for j in range(n)]
                    for i in range(n)])
    return torch.tensor(out, dtype=torch.bool).reshape(kv_heads, n, n)


@given(n=st.integers(1, 48), kv=st.sampled_from([1, 2, 4]), block=st.integers(1, 6), local=st.integers(1, 4),
       stride=st.integers(1, 5), offset=st.integers(0, 3), dense=st.integers(0, 1), homo=st.booleans())
def test_pattern_is_the_dkernel_rule(n, kv, block, local, stride, offset, dense, homo):
    p = s2_pattern(kv * 2, kv, block, local, stride, homo, offset, dense)
    step = 0 if homo else max(1, stride // kv)
    expected = reference_mask(n, kv, block, local, stride, step, offset, dense).repeat_interleave(2, 0)
    assert torch.equal(p.mask(n, n), expected)


def test_oracles_dense_cases_and_head_coverage():
    causal = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    assert (s2_pattern(4, 4, block=4, local_blocks=2, vert_stride=1).mask(64, 64) == causal).all()
    assert (s2_pattern(4, 4, block=4, local_blocks=16, vert_stride=8).mask(64, 64) == causal).all()
    heads = s2_pattern(8, 8, block=4, local_blocks=2, vert_stride=4).mask(64, 64)
    for first in range(5):  # any vert_stride consecutive heads shard the whole past between them
        assert torch.equal(heads[first:first + 4].any(0), causal)
    assert not torch.equal(heads[0], causal)


@pytest.mark.parametrize("n", [700, 1300])
def test_engines_match_the_reference(n):
    torch.manual_seed(0)
    p = s2_pattern(4, 2, block=16, local_blocks=3, vert_stride=4)
    q = torch.randn(1, 4, n, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(2))
    out = nf.attend(q, k, v, p)
    exp = ref.dense_reference(q, k, v, reference_mask(n, 2, 16, 3, 4, 2).repeat_interleave(2, 0)[None], 0.25)
    check_outputs_and_grads(out, exp, (q, k, v))


def test_decode_equals_teacher_forcing_with_the_dense_hybrid():
    torch.manual_seed(1)
    lm = TinyLM(40, dim=32, depth=2, num_heads=4, mechanism="s2_attention", block=2, local_blocks=2, vert_stride=4,
                num_kv_heads=2, layer_kwargs=s2_layer_kwargs).eval()
    assert not lm.blocks[0].attn.dense and lm.blocks[1].attn.dense
    tokens = torch.randint(0, 40, (2, 31))
    with torch.no_grad():
        full = lm(tokens)
        caches = lm.new_caches(2)
        steps = [lm(tokens[:, :3], caches)] + [lm(tokens[:, i:i + 1], caches) for i in range(3, 31)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        S2Attention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_dense_heads"):
        S2Attention(16, 4, num_dense_heads=5)
    with pytest.raises(ValueError, match="vert_stride"):
        S2Attention(16, 4, vert_stride=0)
