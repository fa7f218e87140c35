"""``DenseAttention`` (the full-attention control) in all four CAB patterns: float64 references for outputs and
gradients (self with RoPE, cross without positions), GQA, padding masks, cross decoding through the source cache,
and errors."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import Split, check_against_reference

from nearfar.layers.dense import DenseAttention, SourceCache
from nearfar.layers.kv_cache import KVCache


def mha_reference(m: DenseAttention, x: torch.Tensor, context: torch.Tensor | None = None,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention in float64 from plain matmuls: RoPE on self-attention, none on cross-attention."""
    src = x if context is None else context
    n, m_len, d = x.shape[1], src.shape[1], m.head_dim

    def heads(t, h):
        return t.reshape(t.shape[0], t.shape[1], h, d).transpose(1, 2)

    q, k, v = heads(m.q_proj(x), m.num_heads), heads(m.k_proj(src), m.num_kv_heads), heads(m.v_proj(src),
                                                                                           m.num_kv_heads)
    if context is None:
        q, k = ref.rope(q, torch.arange(n)), ref.rope(k, torch.arange(m_len))
    group = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = ref.causal_mask(n, m_len) if m.causal and context is None else ref.dense_mask(n, m_len)
    allowed = allowed[None, None].expand(x.shape[0], 1, n, m_len)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    out = ref.dense_reference(q, k, v, allowed, d ** -0.5)
    return m.o_proj(out.transpose(1, 2).reshape(x.shape[0], n, -1))


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_matches_float64_reference(causal, cross, kv):
    torch.manual_seed(0)
    m = DenseAttention(32, 4, causal=causal, cross=cross, num_kv_heads=kv)
    if cross:
        check_against_reference(Split(m, 13), torch.randn(2, 13 + 7, 32),
                                lambda w, xc: mha_reference(w.layer, xc[:, :13], xc[:, 13:]))
    else:
        check_against_reference(m, torch.randn(2, 19, 32), mha_reference)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 20), m_len=st.integers(1, 20), causal=st.booleans(), cross=st.booleans(),
       seed=st.integers(0, 99))
def test_padding_mask_matches_reference(n, m_len, causal, cross, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = DenseAttention(16, 2, causal=causal, cross=cross).double()
    x = torch.randn(2, n, 16, generator=g, dtype=torch.float64)
    c = torch.randn(2, m_len, 16, generator=g, dtype=torch.float64) if cross else None
    keep = torch.rand(2, m_len if cross else n, generator=g) > 0.3
    keep[1] = False  # a fully masked row gives zeros, never NaN
    out = m(x, context=c, key_padding_mask=keep) if cross else m(x, key_padding_mask=keep)
    # RoPE angles are float32 in the layer (as every LLaMA port), hence not 1e-12
    torch.testing.assert_close(out, mha_reference(m, x, c, keep), rtol=1e-7, atol=1e-7)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_causal_cross_decoding_reads_the_source_once():
    torch.manual_seed(0)
    m = DenseAttention(32, 4, causal=True, cross=True, num_kv_heads=2).double()
    x, c = torch.randn(2, 12, 32, dtype=torch.float64), torch.randn(2, 9, 32, dtype=torch.float64)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 5:] = False
    full = m(x, context=c, key_padding_mask=keep)
    cache = m.new_cache(2)
    assert isinstance(cache, SourceCache) and cache.nbytes() == 0
    with torch.no_grad():
        first = m(x[:, :4], context=c, cache=cache, key_padding_mask=keep)
        rest = [m(x[:, i:i + 1], cache=cache) for i in range(4, 12)]  # the context is cached
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 12 and cache.k.shape == (2, 2, 9, 8)


def test_self_layers_decode_through_a_kv_cache_and_noncausal_has_none():
    torch.manual_seed(0)
    m = DenseAttention(16, 2, causal=True).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    cache = m.new_cache()
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        out = torch.cat([m(x[:, i:i + 1], cache=cache) for i in range(10)], 1)
    torch.testing.assert_close(out, m(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no decoding cache"):
        DenseAttention(16, 2, causal=False).new_cache()


def test_errors():
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="cross=True"):
        DenseAttention(16, 2)(x, context=x)
    with pytest.raises(ValueError, match="context must be"):
        DenseAttention(16, 2, cross=True)(x)
    with pytest.raises(ValueError, match="context must be"):
        DenseAttention(16, 2, cross=True)(x, context=torch.randn(2, 5, 16))
    with pytest.raises(TypeError, match="causal must be a bool"):
        DenseAttention(16, 2, causal=1)
    with pytest.raises(TypeError, match="SourceCache"):
        DenseAttention(16, 2, cross=True)(x, context=x, cache=KVCache(1))
