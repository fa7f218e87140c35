"""Landmark attention (Mohtashami & Jaggi, NeurIPS 2023, arXiv 2305.16300; epfml/landmark-attention): float64
references written with plain loops from the paper's grouped softmax and the official LLaMA retrieval rule
(``llama/llama_mem.py``), the oracles (one block = causal softmax, rows summing to 1, landmarks weighted 0, inner x
outer for one earlier block), decoding (chunked and token by token, retrieval with k = #blocks = in-context), the
landmark-token helpers, compile, state_dict and argument errors."""

from __future__ import annotations

import math

import pytest
import reference as ref
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

import nearfar as nf
from nearfar import LandmarkAttention, LandmarkTokens
from nearfar.layers.landmark import grouped_softmax_attention
from nearfar.layers.landmark_tokens import insert_landmarks, landmark_mask, remove_landmarks
from nearfar.models.tiny_lm import TinyLM

# ------------------------------------------------------------------------------------- float64 references, loops


def _softmax(scores: list[torch.Tensor]) -> torch.Tensor:
    s = torch.stack(scores)
    return torch.exp(s - torch.logsumexp(s, 0))


def grouped_reference(q, k, v, is_mem, keep=None):
    """The paper's grouped softmax, one query row at a time. q, k, v ``(B, H, N, d)`` (heads already matched),
    is_mem / keep ``(B, N)`` bool. Block of token j = landmarks strictly before j. Outer softmax over the own block's
    regular tokens j <= i and the landmarks of earlier blocks; inner softmax over each earlier block's regular
    tokens; weight = p_out (own block) or p_in * p_out(landmark); landmarks weigh nothing; an empty row gives 0."""
    b_, h_, n, d = q.shape
    rows = []
    for b in range(b_):
        mem = [bool(is_mem[b, j]) for j in range(n)]
        real = [keep is None or bool(keep[b, j]) for j in range(n)]
        block, seen = [], 0
        for j in range(n):
            block.append(seen)
            seen += mem[j]
        for h in range(h_):
            for i in range(n):
                s = [q[b, h, i] @ k[b, h, j] / math.sqrt(d) for j in range(n)]
                cur = [j for j in range(i + 1) if block[j] == block[i] and not mem[j] and real[j]]
                lms = [j for j in range(i + 1) if mem[j] and block[j] < block[i] and real[j]]
                if not cur + lms:
                    rows.append(torch.zeros(v.shape[-1], dtype=v.dtype))
                    continue
                p_out = _softmax([s[j] for j in cur + lms])
                o = sum(p_out[a] * v[b, h, j] for a, j in enumerate(cur)) + 0 * v[b, h, 0]
                for a, lm in enumerate(lms, start=len(cur)):
                    members = [j for j in range(n) if block[j] == block[lm] and not mem[j] and real[j]]
                    if members:
                        p_in = _softmax([s[j] for j in members])
                        o = o + p_out[a] * sum(p_in[c] * v[b, h, j] for c, j in enumerate(members))
                rows.append(o)
    return torch.stack(rows).view(b_, h_, n, -1)


def retrieval_reference(q, k_raw, v, size, top_k, reposition, rope):
    """Retrieval for every query i of a whole sequence (landmark at p % size == size - 1), keys rotated here.
    q (B, H, N, d) rotated at the true positions (if ``rope``), k_raw / v (B, H, N, d) before RoPE. Blocks completed
    before i: c = i // size. If c > top_k: landmark of block b scored at (c-kk-1)*size + idx*size + size-1 with
    idx = 0 for b < c-kk, else b-(c-kk)+1 (kk = min(top_k, c)), top kk sorted by block; else all c blocks. The
    j-th chosen block b sits at (c-kk-1 + j + [b >= c-kk]) * size (reposition) or b * size. Then the grouped
    softmax over the chosen blocks' landmarks and the own block's regular tokens <= i."""
    b_, h_, n, d = q.shape
    ell = size - 1

    def rot(x, pos):
        return ref.rope(x, torch.as_tensor(pos)) if rope else x

    rows = []
    for b in range(b_):
        for h in range(h_):
            for i in range(n):
                c = i // size
                kq = min(top_k, c)
                qi = q[b, h, i]
                if c > top_k:
                    sc = []
                    for bb in range(c):
                        idx = 0 if bb < c - kq else bb - (c - kq) + 1
                        pos = (c - kq - 1 + idx) * size + ell if reposition else bb * size + ell
                        sc.append(float(qi @ rot(k_raw[b, h, bb * size + ell][None], [pos])[0]))
                    chosen = sorted(sorted(range(c), key=lambda x: -sc[x])[:kq])
                else:
                    chosen = list(range(c))
                own = [j for j in range(c * size, i + 1) if j % size != ell]
                s_own = [qi @ rot(k_raw[b, h, j][None], [j])[0] / math.sqrt(d) for j in own]
                s_blk = []
                for jth, bb in enumerate(chosen):
                    base = (c - kq - 1 + jth + (bb >= c - kq)) * size if reposition else bb * size
                    kb = rot(k_raw[b, h, bb * size:(bb + 1) * size], list(range(base, base + size)))
                    s_blk.append(kb @ qi / math.sqrt(d))
                p_out = _softmax(s_own + [s[ell] for s in s_blk])
                o = sum(p_out[a] * v[b, h, j] for a, j in enumerate(own)) + 0 * v[b, h, 0]
                for jth, bb in enumerate(chosen):
                    p_in = _softmax(list(s_blk[jth][:ell]))
                    o = o + p_out[len(own) + jth] * (p_in[:, None] * v[b, h, bb * size:bb * size + ell]).sum(0)
                rows.append(o)
    return torch.stack(rows).view(b_, h_, n, -1)


def _heads(m, x):
    """float64 q (rotated), k before RoPE, v of module ``m`` (float64), KV heads repeated to the query heads."""
    b, n, _ = x.shape
    hq, hk, d = m.num_heads, m.num_kv_heads, m.head_dim

    def proj(lin, heads):
        y = x @ lin.weight.T + (0 if lin.bias is None else lin.bias)
        return y.view(b, n, heads, d).transpose(1, 2)

    pos = torch.arange(n)
    q, k, v = proj(m.q_proj, hq), proj(m.k_proj, hk), proj(m.v_proj, hk)
    if m.rope is not None:
        q = ref.rope(q, pos)
    return q, k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)


def layer_reference(m, x, is_mem=None, keep=None):
    """The whole layer in float64: projections, the reference attention of its mode, o_proj."""
    q, k, v = _heads(m, x)
    n, size = x.shape[1], m.block_size + 1
    if m.top_k is None:
        mem = landmark_mask(n, m.block_size).expand(x.shape[0], n) if is_mem is None else is_mem
        k_rot = ref.rope(k, torch.arange(n)) if m.rope is not None else k
        o = grouped_reference(q, k_rot, v, mem, keep)
    else:
        o = retrieval_reference(q, k, v, size, m.top_k, m.reposition, m.rope is not None)
    return o.transpose(1, 2).reshape(x.shape[0], n, -1) @ m.o_proj.weight.T


class WithMasks(torch.nn.Module):
    """A layer called with fixed ``is_mem`` / ``key_padding_mask`` (for ``check_against_reference``)."""

    def __init__(self, layer, is_mem, keep):
        super().__init__()
        self.layer, self.is_mem, self.keep = layer, is_mem, keep

    def forward(self, x):
        return self.layer(x, is_mem=self.is_mem, key_padding_mask=self.keep)


HEADS = [(2, 2), (4, 2), (2, 1)]


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 17), block=st.integers(1, 4), heads=st.sampled_from(HEADS), rope=st.booleans(),
       top_k=st.sampled_from([None, None, 1, 2, 3]), reposition=st.booleans(), view=st.booleans())
def test_matches_float64_reference(n, block, heads, rope, top_k, reposition, view):
    torch.manual_seed(n * 31 + block)
    m = LandmarkAttention(8, heads[0], block_size=block, top_k=top_k, reposition=reposition, num_kv_heads=heads[1],
                          rope=rope, qkv_bias=True)
    x = torch.randn(8, n, 2).transpose(0, 2) if view else torch.randn(2, n, 8)  # a transposed, strided view
    check_against_reference(m, x, layer_reference)


@pytest.mark.parametrize("top_k,reposition", [(1, True), (3, True), (2, False)])
def test_retrieval_over_many_blocks_matches_reference(top_k, reposition):
    """Ten blocks, so older blocks (one shared landmark slot) and recent ones compete for the top k."""
    torch.manual_seed(10 + top_k)
    m = LandmarkAttention(32, 4, block_size=2, top_k=top_k, reposition=reposition, num_kv_heads=2)
    check_against_reference(m, torch.randn(2, 31, 32), layer_reference)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 14), p_mem=st.sampled_from([0.0, 0.2, 0.5]), pad=st.booleans(), data=st.data())
def test_custom_landmarks_and_padding_match_reference(n, p_mem, pad, data):
    torch.manual_seed(n)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    is_mem = torch.rand(2, n, generator=g) < p_mem
    keep = (torch.rand(2, n, generator=g) > 0.25) if pad else None
    m = WithMasks(LandmarkAttention(8, 2, block_size=3, num_kv_heads=1), is_mem, keep)
    check_against_reference(m, torch.randn(2, n, 8), lambda m64, x: layer_reference(m64.layer, x, is_mem, keep))


# ------------------------------------------------------------------------------------------------------ oracles


def _weights(q, k, is_mem):
    """The grouped-softmax weights (B, H, N, N): values = one-hot keys."""
    n = k.shape[2]
    return grouped_softmax_attention(q, k, torch.eye(n, dtype=q.dtype).expand(*k.shape[:2], n, n), is_mem)


def test_single_block_is_causal_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    causal = torch.tril(torch.ones(9, 9, dtype=torch.bool))
    expected = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~causal, float("-inf")), -1)
    assert_close(_weights(q, k, torch.zeros(9, dtype=torch.bool)), expected)
    # the layer on fewer tokens than a block: dense causal attention of its own q, k, v
    m = LandmarkAttention(16, 2, block_size=12).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    qq, kk, vv = _heads(m, x)
    o = ref.dense_reference(qq, ref.rope(kk, torch.arange(12)), vv, torch.ones(12, 12, dtype=torch.bool).tril(),
                            8 ** -0.5)
    with torch.no_grad():
        assert_close(m(x), o.transpose(1, 2).reshape(2, 12, 16) @ m.o_proj.weight.T)


@pytest.mark.parametrize("block", [1, 2, 5])
def test_rows_sum_to_one_and_landmark_columns_are_zero(block):
    torch.manual_seed(1)
    n = 23
    mem = landmark_mask(n, block)
    w = _weights(torch.randn(2, 2, n, 4) * 3, torch.randn(2, 2, n, 4) * 3, mem)
    assert_close(w.sum(-1), torch.ones(2, 2, n))
    assert w[..., mem].abs().max() == 0
    assert bool((w.triu(1) == 0).all())  # causal


def test_one_earlier_block_is_inner_times_outer():
    torch.manual_seed(2)
    block, n = 4, 9  # block 0 = tokens 0..3, its landmark 4, then tokens 5..8 of block 1
    q, k = torch.randn(1, 2, n, 4, dtype=torch.float64), torch.randn(1, 2, n, 4, dtype=torch.float64)
    w = _weights(q, k, landmark_mask(n, block))
    s = q @ k.transpose(-1, -2) / 2
    for i in range(5, n):
        outer = torch.softmax(torch.cat([s[..., i, 4:5], s[..., i, 5:i + 1]], -1), -1)
        inner = torch.softmax(s[..., i, :4], -1)
        assert_close(w[..., i, :4], inner * outer[..., :1])
        assert_close(w[..., i, 5:i + 1], outer[..., 1:])
        assert w[..., i, 4].abs().max() == 0
    assert_close(w[..., 4, :4], torch.softmax(s[..., 4, :4], -1))  # a landmark's query: its own block, not itself


# --------------------------------------------------------------------------------------------------- decoding


def _decode(m, x, chunks):
    cache, outs, i = m.new_cache(x.shape[0]), [], 0
    with torch.no_grad():
        for c in chunks:
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
    assert cache.length == x.shape[1] and cache.size == x.shape[1]
    return torch.cat(outs, 1)


CHUNKS = [(27,), (5, 1, 1, 9, 11), (1,) * 27]


@pytest.mark.parametrize("top_k", [None, 1, 2])
@pytest.mark.parametrize("chunks", CHUNKS, ids=["whole", "mixed", "tokens"])
def test_decode_equals_forward_for_any_top_k(top_k, chunks):
    torch.manual_seed(3)
    m = LandmarkAttention(32, 4, block_size=3, top_k=top_k, num_kv_heads=2).eval()
    x = torch.randn(2, 27, 32)
    with torch.no_grad():
        assert_close(_decode(m, x, chunks), m(x))


@pytest.mark.parametrize("reposition", [True, False])
def test_retrieving_every_block_is_the_in_context_forward(reposition):
    """k = #blocks: the official positions are the true ones (and reposition=False keeps them)."""
    torch.manual_seed(4)
    m = LandmarkAttention(32, 4, block_size=3, num_kv_heads=2).eval()
    x = torch.randn(2, 27, 32)
    with torch.no_grad():
        in_context = m(x)
        m.top_k, m.reposition = 27 // 4, reposition
        assert_close(_decode(m, x, CHUNKS[2]), in_context)
        assert_close(m(x), in_context)
        m.top_k = 1  # fewer blocks: another function, and the positions matter
        fewer = m(x)
        assert (fewer - in_context).abs().max() > 1e-3
        m.reposition = not reposition
        assert (m(x) - fewer).abs().max() > 1e-4


def test_tiny_lm_decodes_with_retrieval():
    torch.manual_seed(5)
    lm = TinyLM(50, dim=32, depth=2, num_heads=4, mechanism="landmark", block_size=3, top_k=1).eval()
    tokens = torch.randint(0, 50, (2, 21))
    with torch.no_grad():
        caches = lm.new_caches(2)
        steps = torch.cat([lm(tokens[:, :6], caches)] + [lm(tokens[:, t:t + 1], caches) for t in range(6, 21)], 1)
        assert_close(steps, lm(tokens))


# ----------------------------------------------------------------------------------------- landmark tokens


def test_landmark_tokens_insert_remove_and_decode():
    torch.manual_seed(6)
    tokens, layer = LandmarkTokens(16, block_size=3), LandmarkAttention(16, 2, block_size=3, top_k=1)
    x = torch.randn(2, 10, 16)
    y = tokens.insert(x)
    mem = landmark_mask(13, 3)
    assert y.shape == (2, 13, 16) and torch.equal(y[:, ~mem], x) and bool((y[:, mem] == tokens.landmark).all())
    assert torch.equal(tokens.remove(y), x) and insert_landmarks(x[:, :9], tokens.landmark, 3).shape == (2, 12, 16)
    assert torch.equal(remove_landmarks(y[:, 5:], 3, start=5), x[:, 4:])
    tokens.remove(layer(y)).sum().backward()
    assert tokens.landmark.grad is not None and tokens.landmark.grad.abs().sum() > 0
    # streaming: feed the landmark whenever the next position is one, drop its output
    with torch.no_grad():
        cache, outs, pos = layer.new_cache(2), [], 0
        for t in range(10):
            outs.append(layer(x[:, t:t + 1], cache=cache))
            pos += 1
            if landmark_mask(1, 3, start=pos)[0]:
                layer(tokens.landmark.expand(2, 1, 16), cache=cache)
                pos += 1
        assert_close(torch.cat(outs, 1), tokens.remove(layer(y)))


# ---------------------------------------------------------------------------------------------- module hygiene


def test_finite_compile_and_state_dict():
    torch.manual_seed(7)
    x = torch.randn(2, 19, 16)
    for top_k in (None, 2):
        m = LandmarkAttention(16, 4, block_size=3, top_k=top_k, num_kv_heads=2)
        check_forward_backward_finite(m, x * 50)
        check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: LandmarkAttention(16, 4, block_size=3), x)


def test_registry_entry_and_errors():
    entry = {e.name: e for e in nf.mechanisms()}["landmark"]
    assert (entry.family, entry.dims, entry.causal, entry.cross) == ("routed", ("1d",), True, False)
    m = entry.make(32, 4)
    assert (m.block_size, m.top_k, m.reposition) == (50, None, True)
    for kw, err, match in [(dict(block_size=0), ValueError, "block_size"), (dict(top_k=0), ValueError, "top_k"),
                           (dict(top_k=1.5), TypeError, "top_k"), (dict(reposition=1), TypeError, "reposition"),
                           (dict(causal=False), ValueError, "causal"), (dict(num_kv_heads=3), ValueError,
                                                                        "num_kv_heads")]:
        with pytest.raises(err, match=match):
            LandmarkAttention(16, 4, **kw)
    x = torch.randn(2, 9, 32)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 9, 16))
    with pytest.raises(ValueError, match="is_mem must be a bool tensor of shape \\(2, 9\\)"):
        m(x, is_mem=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        m(x, key_padding_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="is_mem is for whole sequences"):
        m(x, cache=m.new_cache(2), is_mem=torch.zeros(2, 9, dtype=torch.bool))
    m.top_k = 2
    with pytest.raises(ValueError, match="key_padding_mask is for whole sequences"):
        m(x, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    for bad, match in [((3, 0), "block_size"), ((-1, 2), "n")]:
        with pytest.raises(ValueError, match=match):
            landmark_mask(*bad)
    with pytest.raises(ValueError, match="landmark must be"):
        insert_landmarks(x, torch.zeros(3), 2)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        grouped_softmax_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_mem must be a bool tensor"):
        grouped_softmax_attention(q, k, k, torch.zeros(4, dtype=torch.bool))
