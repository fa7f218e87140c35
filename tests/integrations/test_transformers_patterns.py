"""``use_pattern`` and ``SinkWindowCache`` on tiny random-init transformers models (float32; nothing downloaded).

References: transformers' own ``"sdpa"`` where the pattern is the model's (causal, sliding window), and otherwise
the model's ``"eager"`` attention in float64 given a 4D mask built here by plain index arithmetic from the
papers' rules (StreamingLLM's sinks + window, Longformer's global tokens + window, MoA's per-head spans), over the
whole sequence. Generation through the bounded cache must equal that teacher-forced forward token for token (the
convention: keys keep the rotary positions of their tokens)."""

from __future__ import annotations

import contextlib
import copy
import doctest
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nearfar as nf  # noqa: E402
from nearfar.functional import intercept_calls  # noqa: E402
from nearfar.integrations import transformers_cache as tc  # noqa: E402
from nearfar.integrations import transformers_patterns as tp  # noqa: E402
from nearfar.integrations.transformers_patterns import SinkWindowCache, use_pattern  # noqa: E402
from nearfar.layers.moa import moa_span  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=512)
S, W = 3, 8  # sinks, window (keys per query, its own included)
N = 30  # prompt tokens: several windows past the sinks


def _config(family: str, **over):
    c = transformers
    if family == "llama":
        cfg = c.LlamaConfig(**COMMON)
    elif family == "mistral":
        cfg = c.MistralConfig(**COMMON, sliding_window=W)
    elif family == "qwen2":  # layer 0 full, layer 1 sliding
        cfg = c.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=W, max_window_layers=1)
    elif family == "gemma2":  # tanh soft-capping of scores large enough that it changes them
        cfg = c.Gemma2Config(**COMMON, head_dim=16, sliding_window=W, attn_logit_softcapping=1.0,
                             query_pre_attn_scalar=1, initializer_range=0.3)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _model(family: str = "llama", impl: str = "sdpa", **over):
    torch.manual_seed(0)
    impl = "eager" if family == "gemma2" else impl  # transformers runs Gemma 2 on eager (no sdpa with soft-capping)
    return transformers.AutoModelForCausalLM.from_config(_config(family, **over), attn_implementation=impl).eval()


def _ids(b: int = 2, n: int = N, pad: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, p in enumerate(pad):
        mask[i, :p], ids[i, :p] = 0, 0
    return ids, mask


def _sink_window(sinks: int, window: int) -> nf.Pattern:
    return (nf.Sinks(sinks) | nf.SlidingWindow(left=window - 1)) & nf.Causal()


def _allowed_sink_window(n: int, sinks: int, window: int) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < window))


def _positions(mask: torch.Tensor) -> torch.Tensor:  # what generate gives a left-padded batch
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _eager64(family: str, ids, mask, allowed: torch.Tensor, **over) -> torch.Tensor:
    """The model's eager attention in float64 with ``allowed`` ((N, N) or (H, N, N)) and the padding as its mask."""
    ref = _model(family, "eager", **over).double()
    allowed = allowed if allowed.dim() == 3 else allowed[None]
    full = allowed[None] & mask.bool()[:, None, None, :]
    bias = torch.zeros(full.shape, dtype=torch.float64).masked_fill(~full, -1e30)
    with torch.no_grad():
        return ref(ids, attention_mask=bias, position_ids=_positions(mask), use_cache=False).logits


@contextlib.contextmanager
def _calls():
    """(pattern, q shape, k shape, bias shape or None) of every ``nearfar.attend`` call inside."""
    seen: list[tuple] = []

    def spy(call):
        bias = None if call.bias is None else tuple(call.bias.shape)
        seen.append((call.pattern, tuple(call.q.shape), tuple(call.k.shape), bias))
        return call.run()

    with intercept_calls(spy):
        yield seen


def _generate(model, ids, mask, steps: int = 6, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


def _teacher_forced(model, seq, mask_new):
    with torch.no_grad():
        return model(seq, attention_mask=mask_new, position_ids=_positions(mask_new), use_cache=False).logits


def _extend(mask, steps):
    return torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1)


def _check_decode(out, tf_logits, n):
    """Each generated step's logits equal the teacher-forced logits of the position before its token."""
    for t, step in enumerate(out.logits):
        torch.testing.assert_close(step, tf_logits[:, n - 1 + t], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- (a) the model's own pattern


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_the_models_own_pattern_equals_sdpa(family):
    """Causal for Llama, the sliding window for Mistral, Qwen2's sliding layer 1 only (layer 0 left alone)."""
    ids, mask = _ids(pad=(0, 5))
    model = _model(family)
    window = nf.SlidingWindow(left=W - 1) & nf.Causal()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    ref_gen = _generate(model, ids, mask)
    if family == "qwen2":
        use_pattern(model, window, layers=[1])
    else:
        use_pattern(model, nf.Causal() if family == "llama" else window)
    assert model.config._attn_implementation == tp.NAME
    with torch.no_grad(), _calls() as seen:
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert all(c[3] is None and c[1][2] == c[2][2] == N for c in seen)  # prefill: the pattern, no (N, N) bias
    gen = _generate(model, ids, mask)  # transformers' default caches (Mistral's sliding layers included)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    use_pattern(model, None)  # every layer back to the model's attention
    assert tp.patterns(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- (b, c) StreamingLLM, bounded


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_sinks_window_prefill_equals_masked_eager_float64(family):
    ids, mask = _ids(pad=(0, 4))
    model = use_pattern(_model(family), _sink_window(S, W))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=_positions(mask)).logits
    ref = _eager64(family, ids, mask, _allowed_sink_window(N, S, W)).float()
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 7])
def test_bounded_generation_equals_teacher_forcing_and_stays_bounded(chunk):
    ids, mask = _ids(pad=(0, 4))
    model = use_pattern(_model("llama"), _sink_window(S, W))
    cache = SinkWindowCache.for_model(model)
    assert (cache.sinks, cache.window, cache.full_layers) == (S, W, frozenset())
    held = []  # keys held per layer after every forward call
    handle = model.register_forward_hook(lambda *_: held.append([lay.keys.shape[2] for lay in cache.layers]))
    steps = 8
    with _calls() as seen:
        out = _generate(model, ids, mask, steps, cache=cache, prefill_chunk_size=chunk)
    handle.remove()
    n_final = N + steps - 1
    assert cache.get_seq_length() == n_final
    # (c) never more than sinks + window - 1 keys held, sinks + window attended in a decoding step
    assert held and max(max(h) for h in held) == S + W - 1
    decode = [c for c in seen if c[1][2] == 1]
    assert len(decode) == 2 * (steps - 1) and {c[2][2] for c in decode} == {S + W}
    if chunk is None:  # one prefill call per layer on the whole prompt: the pattern itself, no bias
        assert [c[3] for c in seen[:2]] == [None, None] and seen[0][0] == _sink_window(S, W)
    else:  # chunks after the first see held keys + the chunk: a (chunk, held + chunk) bias, never (N, N)
        assert max(c[2][2] for c in seen) <= S + W - 1 + chunk
    # (b) the logits of every step are the teacher-forced forward's over the whole sequence ...
    mask_new = _extend(mask, steps)
    tf = _teacher_forced(model, out.sequences, mask_new)
    _check_decode(out, tf, N)
    # ... which is the float64 eager model under the same mask
    ref = _eager64("llama", out.sequences, mask_new, _allowed_sink_window(N + steps, S, W)).float()
    keep = mask_new.bool()
    torch.testing.assert_close(tf[keep], ref[keep], atol=1e-5, rtol=0)


def test_bounded_cache_across_generate_calls():
    """A second generate continues from the same cache (a chat turn): still the teacher-forced model."""
    ids, mask = _ids(b=1)
    model = use_pattern(_model("mistral"), "streaming_llm", window=W, sinks=S)
    streaming = (nf.SlidingWindow(left=W - 1) | nf.Sinks(S)) & nf.Causal()  # StreamingLLMAttention's pattern
    assert tp.patterns(model) == {0: streaming, 1: streaming}
    cache = SinkWindowCache(S, W)
    first = _generate(model, ids, mask, 4, cache=cache)
    more = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    seq = torch.cat([first.sequences, more], 1)
    second = _generate(model, seq, torch.ones_like(seq), 4, cache=cache)
    tf = _teacher_forced(model, second.sequences, torch.ones_like(second.sequences))
    _check_decode(second, tf, seq.shape[1])
    assert all(layer.keys.shape[2] == S + W - 1 for layer in cache.layers)


# ------------------------------------------------------------------- (d) Longformer and MoA patterns


def test_longformer_global_tokens_match_dense_reference_and_decode():
    g, w = 2, 6
    ids, mask = _ids()
    model = use_pattern(_model("llama"), "longformer", window=w, global_tokens=g)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = (j <= i) & ((i - j < w) | (j < g) | (i < g))
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, _eager64("llama", ids, mask, allowed).float(), atol=1e-5, rtol=0)
    clone = copy.deepcopy(model)  # a copy of the model keeps its patterns
    assert tp.patterns(clone) == tp.patterns(model) and len(tp.patterns(model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(clone(ids, attention_mask=mask).logits, out, atol=0, rtol=0)
    cache = SinkWindowCache.for_model(model)
    assert (cache.sinks, cache.window) == (g, w)
    gen = _generate(model, ids, mask, 5, cache=cache)
    _check_decode(gen, _teacher_forced(model, gen.sequences, _extend(mask, 5)), N)


def test_moa_per_head_spans_match_dense_reference_and_decode():
    kw = dict(betas=[0.1, 0.2, 0.3, 0.5], total_len=N, sink_size=2, minimum_cache_size=4, split_size=4)
    ids, mask = _ids()
    model = _model("llama")
    use_pattern(model, "moa", layers=[0], **kw)  # layer 1 keeps the model's attention
    spans = [moa_span(0.0, b, N, sink_size=2, minimum_cache_size=4, split_size=4) for b in kw["betas"]]
    assert spans == [4, 8, 12, 16]  # heads differ
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    per_head = torch.stack([(j <= i) & ((j < min(s, 2)) | (i - j < s - min(s, 2))) for s in spans])
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    ref_model = _model("llama", "eager").double()
    dense = torch.ones(N, N, dtype=torch.bool).tril()
    # the reference runs layer 0 under the per-head masks and layer 1 causal: one 4D mask per layer
    masks = [per_head[None], dense[None, None].expand(1, 4, N, N)]
    bias = [torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, -1e30) for m in masks]
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, a, k, b=b: (a, {**k, "attention_mask": b}), with_kwargs=True)
        for layer, b in zip(ref_model.model.layers, bias)]
    with torch.no_grad():
        ref = ref_model(ids, use_cache=False).logits.float()
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    cache = SinkWindowCache.for_model(model)
    assert cache.full_layers == frozenset({1})
    assert (cache.sinks, cache.window) == (2, max(s - 2 for s in spans))
    gen = _generate(model, ids, mask, 5, cache=cache)
    assert isinstance(cache.layers[1], transformers.cache_utils.DynamicLayer)
    assert cache.layers[1].keys.shape[2] == N + 4 and cache.layers[0].keys.shape[2] == 2 + 14 - 1
    _check_decode(gen, _teacher_forced(model, gen.sequences, _extend(mask, 5)), N)


# ------------------------------------------------------------------------------- (e) clear errors


def test_bad_arguments_raise():
    model = _model("llama")
    with pytest.raises(TypeError, match="pattern must be"):
        use_pattern(model, 3)
    with pytest.raises(ValueError, match="layers must be"):
        use_pattern(model, nf.Causal(), layers=[2])
    with pytest.raises(ValueError, match="not one with a causal pattern"):
        use_pattern(model, "nope")
    with pytest.raises(TypeError, match="only with a mechanism name"):
        use_pattern(model, nf.Causal(), window=4)
    with pytest.raises(ValueError, match="one pattern per query head"):
        use_pattern(model, nf.PerHead([nf.Causal()] * 3))
    with pytest.raises(ValueError, match="not causal"):
        use_pattern(model, nf.Sinks(4) | nf.SlidingWindow(left=7))
    with pytest.raises(ValueError, match="found no transformers self-attention"):
        use_pattern(torch.nn.Linear(2, 2), nf.Causal())
    with pytest.raises(ValueError, match="call use_pattern"):
        SinkWindowCache.for_model(model)
    assert tp.patterns(model) == {}  # nothing half-applied
    with pytest.raises(ValueError, match="sinks"):
        SinkWindowCache(-1, 4)
    with pytest.raises(ValueError, match="window"):
        SinkWindowCache(2, 0)
    with pytest.raises(TypeError, match="sinks"):
        SinkWindowCache(2.5, 4)
    with pytest.raises(ValueError, match="no bounded cache"):
        SinkWindowCache.for_model(use_pattern(_model("llama"), nf.Causal()))
    with pytest.raises(ValueError, match="not leading keys plus a recent window"):
        SinkWindowCache.for_model(use_pattern(_model("llama"), nf.Strided(16) & nf.Causal()))


def test_caches_that_drop_reachable_keys_raise():
    ids, mask = _ids(b=1)
    model = use_pattern(_model("llama"), _sink_window(S, W))
    with pytest.raises(ValueError, match=r"key 0, which a cache of the first 0 and last 8"):
        _generate(model, ids, mask, cache=SinkWindowCache(0, W))  # the sinks were evicted after the prefill
    with pytest.raises(ValueError, match="transformers' sliding-window cache"):  # Mistral's default cache
        _generate(use_pattern(_model("mistral"), _sink_window(S, W)), ids, mask)
    partial = use_pattern(_model("llama"), _sink_window(S, W), layers=[0])
    with pytest.raises(ValueError, match="layer 1 runs the model's attention"):
        _generate(partial, ids, mask, cache=SinkWindowCache(S, W))
    with pytest.raises(NotImplementedError, match="StaticLayer"):
        _generate(model, ids, mask, cache_implementation="static")
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        tc.SinkWindowLayer(S, W).crop(-1)
    model = use_pattern(_model("llama", attention_dropout=0.1), _sink_window(S, W)).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(ids)


def test_docs_example_and_docstrings_run(capsys):
    for module in (tp, tc):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 5 and result.failed == 0, module.__name__
    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    code = page.split("### Patterns and a bounded cache", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/integrations.md", "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["(4, 64) 67", "torch.Size([1, 216])"]


def test_cache_layer_bookkeeping():
    layer = tc.SinkWindowLayer(2, 3)
    k = torch.arange(9.0).view(1, 1, 9, 1)
    keys, _ = layer.update(k, k)
    assert keys is k and layer.keys[0, 0, :, 0].tolist() == [0, 1, 7, 8]
    keys, _ = layer.update(k[:, :, :2] + 100, k[:, :, :2])
    assert keys[0, 0, :, 0].tolist() == [0, 1, 7, 8, 100, 101]
    assert layer.returned_positions().tolist() == [0, 1, 7, 8, 9, 10]
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 100, 101] and layer.get_seq_length() == 11
    assert layer.get_mask_sizes(1) == (12, 0) and not math.isnan(layer.get_max_length())
    layer.reset()
    assert layer.keys is None and layer.get_seq_length() == 0


def test_soft_capped_bounded_generation_equals_teacher_forcing():
    """Gemma 2's soft-capping runs as attend's score_mod in a patterned layer, prefill and decode (the cache slots'
    positions): generation equals the teacher-forced float64 eager model with the same mask."""
    ids, mask = _ids(pad=(0, 4))
    model = use_pattern(_model("gemma2"), _sink_window(S, W))
    steps = 5
    out = _generate(model, ids, mask, steps=steps, past_key_values=SinkWindowCache(S, W))
    mask_new = _extend(mask, steps)
    ref = _eager64("gemma2", out.sequences, mask_new, _allowed_sink_window(N + steps, S, W)).float()
    _check_decode(out, ref, N)
