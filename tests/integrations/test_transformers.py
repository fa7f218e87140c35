"""``attn_implementation="nearfar"`` in Hugging Face transformers: tiny random-init models of four families equal
their "sdpa" runs (padded prefill, greedy decoding with a dynamic and a static cache), the masks each layer gets,
the unsupported features' errors, and ``nearfar.steer`` on a transformers model. Nothing is downloaded."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import nearfar as nf  # noqa: E402
from nearfar.functional import intercept_calls  # noqa: E402
from nearfar.integrations import transformers as hf  # noqa: E402
from nearfar.steer import AblateHeads, Capture, control, find_sites  # noqa: E402
from nearfar.steer.sites import register_site_rule  # noqa: E402

masking_utils = pytest.importorskip("transformers.masking_utils")

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256)
W = 8  # sliding window: keys per query including its own; smaller than the 24 tokens, so it matters
N = 24
PAD = (0, 5, 20)  # left padding per batch item: item 2 has 4 real tokens, so decode windows still see padding


def _config(family: str):
    c = transformers
    if family == "llama":
        return c.LlamaConfig(**COMMON)
    if family == "mistral":  # every layer slides
        return c.MistralConfig(**COMMON, sliding_window=W)
    if family == "qwen2":  # layer 0 full, layer 1 sliding
        return c.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=W, max_window_layers=1)
    if family == "gemma3":  # layer 0 sliding, layer 1 full; scale from query_pre_attn_scalar
        return c.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=W, query_pre_attn_scalar=20,
                                  layer_types=["sliding_attention", "full_attention"])
    if family == "gemma2":  # soft-capped scores by default
        return c.Gemma2Config(**COMMON, head_dim=16, sliding_window=W)
    raise ValueError(family)


def _model(family: str, impl: str = "sdpa", **overrides):
    cfg = _config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (len(PAD), N), generator=g)
    mask = torch.ones(len(PAD), N, dtype=torch.long)
    for i, p in enumerate(PAD):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


@contextlib.contextmanager
def _calls():
    """Every ``nearfar.attend`` call inside: (pattern, q shape, k shape, key padding mask, bias)."""
    seen: list[tuple] = []

    def spy(call):
        seen.append((call.pattern, tuple(call.q.shape), tuple(call.k.shape), call.key_padding_mask, call.bias))
        return call.run()

    with intercept_calls(spy):
        yield seen


def _window(w: int) -> nf.Pattern:
    return nf.SlidingWindow(left=w - 1) & nf.Causal()


LAYER_PATTERNS = {"llama": [nf.Causal(), nf.Causal()], "mistral": [_window(W), _window(W)],
                  "qwen2": [nf.Causal(), _window(W)], "gemma3": [_window(W), nf.Causal()]}


def test_registered_by_import_and_idempotent():
    assert "nearfar" in transformers.AttentionInterface().valid_keys()
    assert masking_utils.AttentionMaskInterface._global_mapping["nearfar"] is hf.mask_builder
    from nearfar.steer import sites

    rules = len(sites._SITE_RULES)  # its length shows a re-registration
    hf.register()
    hf.register()
    register_site_rule(hf.site_rule)
    assert len(sites._SITE_RULES) == rules


@pytest.mark.parametrize("family", sorted(LAYER_PATTERNS))
def test_padded_prefill_equals_sdpa(family):
    ids, mask = _batch()
    model = _model(family)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("nearfar")
        with _calls() as seen:
            out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # one call per layer, its pattern from the layer, padding as a key padding mask, no materialised 4D mask
    assert [c[0] for c in seen] == LAYER_PATTERNS[family]
    for _, q_shape, k_shape, kpm, bias in seen:  # K/V not repeated: 2 heads for 4 query heads
        assert q_shape[:3] == (len(PAD), 4, N) and k_shape[:3] == (len(PAD), 2, N) and bias is None
        assert torch.equal(kpm, mask.bool())


@pytest.mark.parametrize("family", sorted(LAYER_PATTERNS))
def test_greedy_generate_equals_sdpa(family):
    ids, mask = _batch()
    model = _model(family)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("nearfar")
        with _calls() as seen:
            out = model.generate(ids, **kw)
    assert isinstance(out.past_key_values, transformers.DynamicCache)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    decode = [c for c in seen if c[1][2] == 1]
    assert len(decode) == 2 * 7 and all(c[4] is None for c in seen)
    # a sliding layer's cache holds its last W - 1 keys, so it attends W keys per step; a full layer all of them
    sliding = [c for c in decode if c[0] == _window(W)]
    assert sliding == [] or {c[2][2] for c in sliding} == {W}


def test_static_cache_decodes_through_the_exact_mask():
    """A static cache's keys run past the queries (unfilled slots): the layers get transformers' own mask."""
    ids, mask = _batch()
    model = _model("llama")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("nearfar")
        with _calls() as seen:
            out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert any(c[4] is not None and c[0] is None for c in seen)


def _sdpa(q, k, v, allowed):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=allowed).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 1, 3, 8])
@pytest.mark.parametrize("nq", [1, 3, 10])
def test_queries_are_the_last_positions(window, nq):
    """Nq < Nk: the queries sit at positions Nk - Nq ..., as transformers' masks (built here by masking_utils
    with the offsets a dynamic cache reports) put them."""
    nk, b = 10, 2
    g = torch.Generator().manual_seed(nq)
    q, k, v = torch.randn(b, 4, nq, 8, generator=g), torch.randn(b, 2, nk, 8, generator=g), torch.randn(b, 2, nk, 8)
    fn = masking_utils.causal_mask_function if window is None else \
        masking_utils.sliding_window_causal_mask_function(window)
    allowed = masking_utils.sdpa_mask(batch_size=b, q_length=nq, kv_length=nk, q_offset=nk - nq, mask_function=fn,
                                      allow_is_causal_skip=False)
    module = torch.nn.Module()
    out, weights = hf.attention_forward(module, q, k, v, None, scaling=None, sliding_window=window)
    assert weights is None and out.shape == (b, nq, 4, 8)
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-6, rtol=0)


def test_four_d_masks_are_used_as_given():
    b, n = 2, 6
    q, k, v = torch.randn(b, 4, n, 8), torch.randn(b, 2, n, 8), torch.randn(b, 2, n, 8)
    allowed = torch.rand(b, 1, n, n) > 0.4
    allowed[..., 0] = True
    module = torch.nn.Module()
    out, _ = hf.attention_forward(module, q, k, v, allowed, is_causal=True, sliding_window=2)
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-6, rtol=0)
    additive = torch.randn(b, 1, n, n)
    out, _ = hf.attention_forward(module, q, k, v, additive)
    torch.testing.assert_close(out, _sdpa(q, k, v, additive), atol=1e-6, rtol=0)


def test_mask_builder_passes_padding_only_for_plain_masks():
    b, nq, nk = 2, 3, 9
    pad = torch.ones(b, nk, dtype=torch.bool)
    pad[1, :4] = False
    sizes = dict(batch_size=b, q_length=nq, kv_length=nk, q_offset=nk - nq, kv_offset=0)
    causal = masking_utils.causal_mask_function
    assert hf.mask_builder(**sizes, mask_function=causal, attention_mask=None) is None
    assert hf.mask_builder(**sizes, mask_function=causal, attention_mask=torch.ones(b, nk, dtype=torch.bool)) is None
    assert torch.equal(hf.mask_builder(**sizes, mask_function=causal, attention_mask=pad), pad)
    sliding = masking_utils.sliding_window_causal_mask_function(4)
    # a sliding cache's keys: absolute positions 5..8 of the 2D mask
    got = hf.mask_builder(batch_size=b, q_length=1, kv_length=4, q_offset=8, kv_offset=5, mask_function=sliding,
                          attention_mask=torch.ones(b, nk, dtype=torch.bool).index_fill_(1, torch.tensor([6]), False),
                          local_size=4)
    assert got.shape == (b, 4) and got[:, 1].eq(False).all() and got.sum() == 6
    # an overlay, or queries that do not end where the keys end: transformers' exact boolean mask
    overlay = masking_utils.or_masks(causal, lambda bi, h, qi, ki: ki == 0)
    for kw in (dict(sizes, mask_function=overlay), dict(sizes, mask_function=causal, q_offset=0)):
        got = hf.mask_builder(**kw, attention_mask=pad, local_size=None)
        ref = masking_utils.sdpa_mask(**kw, attention_mask=pad, allow_is_causal_skip=False)
        assert got.shape == (b, 1, nq, nk) and torch.equal(got, ref)


def test_gemma2_without_softcapping_equals_eager():
    ids, mask = _batch()
    model = _model("gemma2", impl="eager", attn_logit_softcapping=None)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("nearfar")
        with _calls() as seen:
            out = model(ids, attention_mask=mask).logits
    keep = mask.bool()  # eager's finite fill averages a padding query's values; nearfar (and SDPA) give 0
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)
    assert [c[0] for c in seen] == [_window(W), nf.Causal()]


def test_gemma2_softcapping_equals_eager():
    """Gemma 2's tanh soft-capping as a score_mod: prefill and greedy decoding equal eager's. Larger initial weights
    and a cap of 2 (the released models use 50) so that the cap changes this random-init model's outputs."""
    ids, mask = _batch()
    model = _model("gemma2", impl="eager", attn_logit_softcapping=2.0, initializer_range=0.2)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    keep = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, **kw)
        uncapped = _model("gemma2", impl="eager", attn_logit_softcapping=None,
                          initializer_range=0.2)(ids, attention_mask=mask).logits
        assert (uncapped[keep] - ref[keep]).abs().max() > 1e-2  # the cap matters here: without it the logits move
        model.set_attn_implementation("nearfar")
        with _calls() as seen:
            out = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, **kw)
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=0)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for a, b in zip(gen.logits, ref_gen.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [c[0] for c in seen] == [_window(W), nf.Causal()]
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(torch.nn.Module(), *(torch.randn(1, 2, 3, 8) for _ in range(3)), None, softcap=0.0)


def test_unsupported_arguments_raise():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    m = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="dropout"):
        hf.attention_forward(m, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sinks"):
        hf.attention_forward(m, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="sliding_window"):
        hf.attention_forward(m, q, k, v, None, is_causal=False, sliding_window=2)
    with pytest.raises(ValueError, match="sliding_window"):
        hf.attention_forward(m, q, k, v, None, sliding_window=0)
    with pytest.raises(ValueError, match=r"\(B, Nk\)"):
        hf.attention_forward(m, q, k, v, torch.ones(1, 5, dtype=torch.bool))
    model = _model("llama", impl="nearfar", attention_dropout=0.1).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(torch.randint(0, 128, (1, 5)))


def test_sites_of_a_transformers_model():
    model = _model("llama", impl="nearfar")
    sites = find_sites(model)
    assert [(s.name, s.layer, s.kind, s.num_heads, s.num_kv_heads) for s in sites] == [
        ("model.layers.0.self_attn", 0, "self", 4, 2), ("model.layers.1.self_attn", 1, "self", 4, 2)]
    assert hf.site_rule(model.model.layers[0].mlp) is None and hf.site_rule(nf.TinyLM(8, 8, 1, 1)) is None


def test_control_ablates_a_head_as_zeroing_its_slice_before_o_proj():
    ids, mask = _batch()
    model = _model("llama", impl="nearfar")
    d = model.config.head_dim

    def zero_head_1(module, args):
        x = args[0].clone()
        x[..., d:2 * d] = 0
        return (x,)

    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with control(model, [("model.layers.1.*", AblateHeads([1]))]):
            out = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_head_1)
        try:
            ref = model(ids, attention_mask=mask).logits
        finally:
            handle.remove()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - plain).abs().max() > 1e-3  # the edit changed something


def test_control_captures_lse_per_layer():
    ids, mask = _batch()
    model = _model("qwen2", impl="nearfar")
    with torch.no_grad(), control(model, [(None, Capture(("lse",)))]) as run:
        model(ids, attention_mask=mask)
    assert sorted(run.records) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for recs in run.records.values():
        assert len(recs) == 1 and recs[0]["lse"].shape == (len(PAD), 4, N)
        assert torch.isfinite(recs[0]["lse"][0]).all()
    # the LSE of an unpadded query's row, from the layer's own q/k: logsumexp of its allowed scaled scores
    with torch.no_grad(), control(model, [("model.layers.1.*", Capture(("q", "k", "lse")))]) as run:
        model(ids, attention_mask=mask)
    rec = run.records["model.layers.1.self_attn"][0]
    q, k = rec["q"][0, :, -1], rec["k"][0].repeat_interleave(2, 0)[:, -W:]
    want = torch.logsumexp((q[:, None] * k).sum(-1) / math.sqrt(q.shape[-1]), -1)
    torch.testing.assert_close(rec["lse"][0, :, -1], want, atol=1e-5, rtol=0)


def test_docs_example_runs(capsys):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    section = page.split("## Hugging Face transformers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/integrations.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["['model.layers.0.self_attn', 'model.layers.1.self_attn']", "torch.Size([2, 4, 24])"]
