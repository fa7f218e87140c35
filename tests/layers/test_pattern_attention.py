"""StreamingLLM, Longformer, BigBird: layers, patterns, KV-cache decoding and the TinyLM (masks written from the
papers and mit-han-lab/streaming-llm, allenai/longformer, google-research/bigbird)."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

import nearfar as nf
from nearfar.layers.bigbird import BigBirdAttention
from nearfar.layers.longformer import LongformerAttention
from nearfar.layers.streaming_llm import StreamingLLMAttention
from nearfar.models.tiny_lm import TinyLM


def _loops(n, rule):
    return torch.tensor([[rule(i, j) for j in range(n)] for i in range(n)], dtype=torch.bool)


@given(n=st.integers(1, 40), w=st.integers(1, 12), s=st.integers(1, 5))
def test_streaming_llm_pattern_is_the_reference_mask(n, w, s):
    m = StreamingLLMAttention(8, 2, window=w, sinks=s)
    assert torch.equal(m.pattern.mask(n, n), _loops(n, lambda i, j: j <= i and (j < s or i - j < w)))


@given(n=st.integers(1, 40), w=st.integers(1, 12), g=st.integers(1, 4), causal=st.booleans())
def test_longformer_pattern_is_the_reference_mask(n, w, g, causal):
    m = LongformerAttention(8, 2, window=w, global_tokens=g, causal=causal)
    if causal:
        rule = lambda i, j: j <= i and (i - j < w or j < g or i < g)  # noqa: E731
    else:
        rule = lambda i, j: abs(i - j) <= w // 2 or j < g or i < g  # noqa: E731
    assert torch.equal(m.pattern.mask(n, n), _loops(n, rule))


def test_bigbird_window_and_global_part_is_symmetric_and_random_blocks_are_seeded():
    n, b = 256, 8
    m = BigBirdAttention(8, 2, block=b, global_blocks=2, random_blocks=0, causal=False)
    mask = m.pattern.mask(n, n)
    assert torch.equal(mask, mask.T)
    expected = _loops(n, lambda i, j: abs(i // b - j // b) <= 1 or i < 2 * b or j < 2 * b)
    assert torch.equal(mask, expected)
    r1 = nf.RandomBlocks(b, 3, seed=1).mask(n, n)
    assert torch.equal(r1, nf.RandomBlocks(b, 3, seed=1).mask(n, n))
    assert not torch.equal(r1, nf.RandomBlocks(b, 3, seed=2).mask(n, n))
    # each query block gets at most r key blocks, whole blocks, the same for every query of the block
    blocks = r1.view(n // b, b, n // b, b)
    assert torch.equal(blocks.all(-1), blocks.any(-1)) and torch.equal(blocks.all(1), blocks.any(1))
    assert int(blocks.any(-1).any(1).sum(-1).max()) <= 3
    causal = nf.RandomBlocks(b, 3, seed=1, causal=True).mask(n, n).view(n // b, b, n // b, b).any(-1).any(1)
    assert not causal[0].any() and not torch.triu(causal).any()  # only strictly earlier blocks


def test_bigbird_row_density_is_about_the_expected_value():
    n, b, g, r = 2048, 64, 2, 3
    mask = BigBirdAttention(8, 2, block=b, global_blocks=g, random_blocks=r, causal=False).pattern.mask(n, n)
    rows = mask[g * b:].float().mean(-1)  # non-global rows: at most (3 + g + r) * b / N (draws may collide)
    assert float(rows.max()) <= (3 + g + r) * b / n + 1e-9 and float(rows.mean()) >= (3 + g) * b / n


@pytest.mark.parametrize("pattern", [nf.RandomBlocks(16, 3, seed=5), nf.RandomBlocks(16, 2, seed=1, causal=True),
                                     (nf.BlockWindow(32) | nf.RandomBlocks(32, 2, seed=3, causal=True)) & nf.Causal()],
                         ids=["random", "random-causal", "bigbird-causal"])
def test_block_sparse_engine_matches_the_mask(pattern):
    n = 1100  # above the dense threshold: the block-sparse plan (tile-level random-block test) is used
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    out = nf.attend(q, k, v, pattern, engine="blocksparse")
    exp = ref.dense_reference(q, k, v, pattern.mask(n, n), 0.25)
    assert (out.double() - exp).abs().max() < 1e-5




@pytest.mark.parametrize("make", [lambda: StreamingLLMAttention(16, 4, window=5, sinks=2, num_kv_heads=2),
                                  lambda: LongformerAttention(16, 2, window=6, global_tokens=2, causal=False),
                                  lambda: BigBirdAttention(16, 2, block=4, global_blocks=1, random_blocks=2)],
                         ids=["streaming", "longformer-bidirectional", "bigbird"])
def test_layer_matches_float64_reference(make):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 23, 16, requires_grad=True)
    out = m(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    w = {name: p.detach().double().requires_grad_() for name, p in m.named_parameters()}
    hq, hk, d = m.num_heads, m.num_kv_heads, m.head_dim
    pos = torch.arange(23)

    def heads(t, h):
        return t.view(2, 23, h, d).transpose(1, 2)

    q = ref.rope(heads(x64 @ w["q_proj.weight"].T, hq), pos)
    k = ref.rope(heads(x64 @ w["k_proj.weight"].T, hk), pos)
    v = heads(x64 @ w["v_proj.weight"].T, hk)
    o = ref.dense_reference(q, k, v, m.pattern.mask(23, 23), d ** -0.5)
    exp = o.transpose(1, 2).reshape(2, 23, 16) @ w["o_proj.weight"].T
    (exp * g.double()).sum().backward()
    assert (out.double() - exp).abs().max() < 1e-5
    assert (x.grad.double() - x64.grad).abs().max() < 3e-5
    for name, p in m.named_parameters():
        assert (p.grad.double() - w[name].grad).abs().max() < 3e-5, name


@pytest.mark.parametrize("mech,kw,bound", [("streaming_llm", dict(window=6, sinks=2), 7),
                                           ("longformer", dict(window=5, global_tokens=3), 7),
                                           ("bigbird", dict(block=4, global_blocks=1, random_blocks=2), None)])
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_equals_teacher_forcing_with_a_bounded_cache(mech, kw, bound, chunk):
    torch.manual_seed(1)
    lm = TinyLM(40, dim=32, depth=2, num_heads=4, mechanism=mech, **kw).eval()
    tokens = torch.randint(0, 40, (2, 29))
    with torch.no_grad():
        full = lm(tokens)
        caches = lm.new_caches(2)
        steps = [lm(tokens[:, :4], caches)]
        for i in range(4, 29, chunk):
            steps.append(lm(tokens[:, i:i + chunk], caches))
            if bound is not None:
                assert all(c.size <= bound for c in caches)
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
    if bound is None:
        assert all(c.size == 29 for c in caches)


def test_window_covering_the_sequence_is_dense_causal():
    torch.manual_seed(2)
    m = StreamingLLMAttention(16, 2, window=64, sinks=1)
    x = torch.randn(1, 40, 16)
    assert torch.equal(m.pattern.mask(40, 40), torch.tril(torch.ones(40, 40, dtype=torch.bool)))
    assert m(x).shape == x.shape


def test_generate_is_greedy_teacher_forcing_and_training_runs():
    torch.manual_seed(3)
    lm = TinyLM(30, dim=32, depth=2, num_heads=2, mechanism="streaming_llm", window=8, sinks=2).eval()
    prompt = torch.randint(0, 30, (1, 5))
    out = lm.generate(prompt, max_new_tokens=12)
    with torch.no_grad():
        logits = lm(out[:, :-1])
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))
    lm.train()
    loss = lm.loss(torch.randint(0, 30, (2, 33)))
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in lm.parameters())


def test_key_padding_mask_and_errors():
    torch.manual_seed(4)
    m = LongformerAttention(16, 2, window=4, global_tokens=1)
    x = torch.randn(2, 10, 16)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 7:] = False
    out = m(x, key_padding_mask=kpm)
    assert torch.allclose(out[1, :7], m(x[1:, :7])[0], atol=1e-6)  # causal: padding after a token changes nothing
    with pytest.raises(ValueError, match="not causal"):
        LongformerAttention(16, 2, causal=False).new_cache()
    with pytest.raises(ValueError, match="num_kv_heads"):
        StreamingLLMAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="window"):
        StreamingLLMAttention(16, 4, window=0)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="mechanism"):
        TinyLM(10, mechanism="swin")
