"""A nearfar pattern in place of a Hugging Face model's attention, in prefill and generation (``use_pattern``).

``use_pattern(model, pattern)`` runs every (or the chosen) self-attention layer of a transformers causal LM
(Llama, Mistral, Qwen2 and the models built like them) through ``nearfar.attend`` restricted to ``pattern``: a
nearfar pattern (StreamingLLM's sinks + window, Longformer's global tokens, MoA's per-head spans, ...), a
``PatternAttention`` layer's, or a registered mechanism's by name. With ``SinkWindowCache``
(``nearfar.integrations.transformers_cache``, StreamingLLM's bounded cache) generation holds ``O(sinks + window)``
keys per layer whatever the prompt's length::

    import nearfar as nf
    from nearfar.integrations.transformers_patterns import SinkWindowCache, use_pattern

    use_pattern(model, (nf.Sinks(4) | nf.SlidingWindow(left=1023)) & nf.Causal())   # StreamingLLM, 4 + 1024
    out = model.generate(ids, cache=SinkWindowCache(4, 1024), prefill_chunk_size=4096)

The pattern is on token indices (0 at the first token, padding included, as transformers' own masks) and keys keep
the rotary positions of their tokens (see ``transformers_cache`` for how that differs from StreamingLLM's official
position shift): a generation equals the teacher-forced forward pass under the same pattern.

Memory: a prefill with no cached keys runs the pattern on the block-sparse engines (never an ``(N, N)`` map; its
activations are ``O(N)``, as any forward pass's); with cached keys (a later chunk of ``prefill_chunk_size``, every
decoding step) the pattern is evaluated on the positions of the keys at hand, an ``(Nq, cached + Nq)`` bias. With
``prefill_chunk_size=C`` the whole generation holds ``O(C (sinks + window + C))``: flat in the context length.

``use_pattern`` sets the attention implementation ``"nearfar_pattern"`` (registered on import; layers left alone
run as ``attn_implementation="nearfar"``, ``nearfar.integrations.transformers``). A layer's cache must keep every
key its pattern reaches: ``SinkWindowCache`` and transformers' sliding-window cache layers are checked against the
pattern (``unreachable_key``) and a misfit raises before a wrong output; a static cache is not supported.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from ..dispatch import attend
from ..layers import PatternAttention, mechanisms
from ..patterns import Pattern
from . import transformers as hf
from .transformers_cache import SinkWindowCache, SinkWindowLayer, unreachable_key

__all__ = ["NAME", "SinkWindowCache", "attention_forward", "attention_layers", "mask_builder", "patterns", "register",
           "use_pattern"]

#: the ``attn_implementation`` name ``use_pattern`` sets
NAME = "nearfar_pattern"


# ------------------------------------------------------------------------------------- patterns on layers


@dataclass(eq=False)
class _Layer:
    """What ``use_pattern`` keeps for one attention module: its pattern (None: left to the model), the hook that
    records the cache of each call, and that cache."""

    pattern: Pattern | None
    hook: Any
    cache: Any = field(default=None)  # a weakref to the call's Cache, or None


#: the attribute of an attention module that holds its ``_Layer`` (an attribute, so copies of the model keep it)
_ATTR = "_nearfar_pattern"


def _state(module: nn.Module) -> _Layer | None:
    state = module.__dict__.get(_ATTR)
    return state if isinstance(state, _Layer) else None


def _record_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = _state(module)
    if state is not None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.cache = weakref.ref(cache) if isinstance(cache, Cache) else None


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The self-attention modules of a transformers model by their ``layer_idx`` (what ``use_pattern`` changes)."""
    found: dict[int, nn.Module] = {}
    for m in model.modules():
        site = hf.site_rule(m)
        idx = getattr(m, "layer_idx", None)
        if site is not None and site[0] == "self" and isinstance(idx, int):
            found.setdefault(idx, m)
    return dict(sorted(found.items()))


def patterns(model: nn.Module) -> dict[int, Pattern]:
    """The pattern each layer of ``model`` runs by ``use_pattern``, by layer index (layers left alone: absent)."""
    out = {}
    for i, m in attention_layers(model).items():
        state = _state(m)
        if state is not None and state.pattern is not None:
            out[i] = state.pattern
    return out


@functools.lru_cache(maxsize=128)
def _causal_error(pattern: Pattern) -> str | None:
    mask = pattern.mask(256, 256)
    later = (mask.any(0) if mask.dim() == 3 else mask).triu(1)
    if not bool(later.any()):
        return None
    i, j = (int(x) for x in torch.nonzero(later)[0])
    return f"query {i} attends the later key {j} (combine it with & nf.Causal())"


def _heads(module: nn.Module) -> int:
    config: Any = module.config  # a transformers config (the module is typed as a plain nn.Module)
    return int(config.num_attention_heads)


def _resolve(spec: object, module: nn.Module, kwargs: dict[str, Any]) -> Pattern | None:
    if kwargs and not isinstance(spec, str):
        raise TypeError(f"use_pattern takes keyword arguments only with a mechanism name, got {sorted(kwargs)}")
    if spec is None or isinstance(spec, Pattern):
        return spec
    if isinstance(spec, PatternAttention):
        if not spec.causal:
            raise ValueError(f"{type(spec).__name__} was built non-causal: a causal LM needs its causal form")
        return spec.pattern
    if not isinstance(spec, str):
        raise TypeError(f"pattern must be a nearfar Pattern, a PatternAttention layer, a registered mechanism name or "
                        f"None, got {type(spec).__name__}")
    usable = {m.name: m for m in mechanisms() if isinstance(m.cls, type) and issubclass(m.cls, PatternAttention)
              and "CS" in m.patterns}
    if spec not in usable:
        raise ValueError(f"mechanism {spec!r} is not one with a causal pattern; choose one of {sorted(usable)} or "
                         f"pass a Pattern")
    heads = _heads(module)
    config: Any = module.config
    head_dim = int(getattr(module, "head_dim", None) or config.hidden_size // heads)
    with torch.device("meta"):  # only its pattern is used: no weights are allocated
        layer = usable[spec].make(heads * head_dim, heads, **{**usable[spec].patterns["CS"], **kwargs})
    assert isinstance(layer, PatternAttention)
    return layer.pattern


def use_pattern(model: nn.Module, pattern: Pattern | PatternAttention | str | None, *,
                layers: Iterable[int] | None = None, **mechanism_kwargs: Any) -> nn.Module:
    """Run ``pattern`` in place of the attention of ``model``'s self-attention layers, prefill and generation.

    The pattern is on token indices (0 at the first token of the sequence, padding included, as transformers'
    masks); each layer keeps its projections, rotary embedding and grouped-query heads (K/V are not repeated). The
    model is switched to ``attn_implementation="nearfar_pattern"``; layers without a pattern run as
    ``"nearfar"`` does. Call it again to change layers, or with ``None`` to give layers back to the model.

    Args:
        model: A transformers model (``...ForCausalLM`` or its base model) of a Llama/Mistral/Qwen2-style family.
        pattern: A causal ``nearfar`` pattern (e.g. ``(nf.Sinks(4) | nf.SlidingWindow(left=1023)) & nf.Causal()``),
            a ``PerHead`` one with a pattern per query head, a ``PatternAttention`` layer (its pattern:
            ``nf.StreamingLLMAttention``, ``nf.LongformerAttention``, ``nf.MoAAttention``, ...), a registered
            mechanism's name (``"streaming_llm"``, ``"longformer"``, ``"moa"``, ... built with ``mechanism_kwargs``
            and the model's heads), or None (the layers run the model's own attention again).
        layers: Layer indices to change (default: all).
        **mechanism_kwargs: Constructor arguments of the named mechanism (e.g. ``window=1024, sinks=4``).

    Returns:
        ``model`` (changed in place).

    Raises:
        TypeError: ``pattern`` of another type, or keyword arguments without a mechanism name.
        ValueError: No self-attention layer found, a layer index out of range, an unknown mechanism, a ``PerHead``
            pattern whose head count is not the model's, or a pattern that is not causal.

    Examples:
        >>> import torch, transformers, nearfar as nf
        >>> from nearfar.integrations.transformers_patterns import SinkWindowCache, use_pattern
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        >>> model = use_pattern(model, (nf.Sinks(2) | nf.SlidingWindow(left=7)) & nf.Causal())
        >>> cache = SinkWindowCache.for_model(model)
        >>> cache.sinks, cache.window
        (2, 8)
        >>> out = model.generate(torch.randint(0, 64, (1, 40)), cache=cache, max_new_tokens=5,
        ...                      do_sample=False)
        >>> out.shape, cache.layers[0].keys.shape[2], cache.get_seq_length()
        (torch.Size([1, 45]), 9, 44)
    """
    modules = attention_layers(model)
    if not modules:
        raise ValueError("found no transformers self-attention module with a layer_idx in model")
    chosen = list(modules) if layers is None else list(layers)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or i not in modules:
            raise ValueError(f"layers must be indices of the model's attention layers, 0..{len(modules) - 1}, got "
                             f"{i!r}")
    resolved = {}
    for i in chosen:
        m = modules[i]
        p = _resolve(pattern, m, mechanism_kwargs)
        if p is not None:
            heads = _heads(m)
            if p.heads is not None and p.heads != heads:
                raise ValueError(f"a PerHead pattern needs one pattern per query head ({heads}), got {p.heads}")
            if getattr(m, "is_causal", True) and (err := _causal_error(p)) is not None:
                raise ValueError(f"pattern {p!r} is not causal: {err}")
        resolved[i] = p
    for i, m in modules.items():  # every layer records its cache: a bounded one under a full layer is an error
        state = _state(m)
        if state is None:
            state = _Layer(None, m.register_forward_pre_hook(_record_cache, with_kwargs=True))
            m.__dict__[_ATTR] = state
        if i in resolved:
            state.pattern = resolved[i]
    if getattr(model.config, "_attn_implementation", None) != NAME:
        pretrained: Any = model  # a transformers PreTrainedModel
        pretrained.set_attn_implementation(NAME)
    return model


# --------------------------------------------------------------------------------- mask builder, attention


@dataclass(eq=False)
class _Masks:
    """What ``mask_builder`` hands the layers: the 2D padding over absolute positions (None: no padding) for
    patterned layers, and transformers' arguments to build ``"nearfar"``'s mask for the others when one asks."""

    padding: torch.Tensor | None
    args: dict[str, Any]
    built: list = field(default_factory=list)

    def exact(self) -> torch.Tensor | None:
        if not self.built:
            self.built.append(hf.mask_builder(**self.args))
        return self.built[0]


def mask_builder(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0,
                 kv_offset: int = 0, mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
    """transformers' mask-builder signature for ``"nearfar_pattern"``: nothing is materialised here; the layers
    get the 2D padding (patterned layers read it at their keys' positions) and, on demand, ``"nearfar"``'s mask.
    Keys that do not end where the queries end (a static cache) get ``"nearfar"``'s mask directly."""
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if not (isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length):
        return hf.mask_builder(**args)  # keys that run past the queries (a static cache): no positions to read
    pad = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(torch.bool)
    return _Masks(pad, args)


def _positions(module: nn.Module, state: _Layer, nq: int, nk: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(query positions, key positions)`` of this call, or None when the keys are positions ``0..Nk-1`` and the
    queries all of them (a prefill from nothing: the pattern runs as is). Raises where the layer's cache dropped
    keys its pattern reaches (or, for a layer without a pattern, drops any)."""
    cache = state.cache() if state.cache is not None else None
    layer_idx: Any = module.layer_idx  # an int on every module use_pattern registers
    idx = int(layer_idx)
    layer = cache.layers[idx] if cache is not None and idx < len(cache.layers) else None
    if state.pattern is None:
        if isinstance(layer, SinkWindowLayer):
            raise ValueError(f"layer {idx} runs the model's attention but its SinkWindowCache layer drops keys: "
                             f"list it in full_layers (SinkWindowCache.for_model does)")
        return None
    if isinstance(layer, (SinkWindowLayer, DynamicSlidingWindowLayer)):
        sinks, window = (layer.sinks, layer.window) if isinstance(layer, SinkWindowLayer) else (0, layer.sliding_window)
        total = layer.cumulative_length
        err = unreachable_key(state.pattern, sinks, window)
        if err is not None and total - nq > sinks + window - 1:  # keys were evicted before this call
            kind = "SinkWindowCache" if isinstance(layer, SinkWindowLayer) else "transformers' sliding-window cache"
            raise ValueError(f"layer {idx}: {err}, as its {kind} (sinks={sinks}, window={window}) does: generate "
                             f"with past_key_values=SinkWindowCache.for_model(model)")
        kpos = (layer.returned_positions() if isinstance(layer, SinkWindowLayer)
                else torch.arange(total - nk, total))
    elif layer is None or isinstance(layer, DynamicLayer):
        if nq == nk:
            return None
        if layer is None:
            raise ValueError(f"layer {idx} got {nq} queries and {nk} keys without a cache: cannot place them")
        total, kpos = nk, torch.arange(nk)
    else:
        raise NotImplementedError(f"a nearfar pattern decodes through DynamicCache or SinkWindowCache, not a "
                                  f"{type(layer).__name__} (layer {idx})")
    if kpos.numel() != nk:
        raise RuntimeError(f"layer {idx}: the cache returned {kpos.numel()} keys, the layer got {nk}")
    if nq == nk == total:
        return None
    return torch.arange(total - nq, total, device=kpos.device), kpos


def _unsupported(dropout: float, kwargs: dict[str, Any]) -> None:
    if dropout:
        raise NotImplementedError(f"attn_implementation={NAME!r} has no attention-probability dropout (dropout="
                                  f"{dropout}): call model.eval() or set config.attention_dropout=0")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation={NAME!r} does not support learned attention sinks "
                                      f"({name}=...)")


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature for ``"nearfar_pattern"``: the layer's pattern from
    ``use_pattern`` (the query ``(B, Hq, Nq, d)`` and key ``(B, Hkv, Nk, d)`` at the positions of the layer's cache),
    or ``nearfar.integrations.transformers.attention_forward`` for a layer without one.

    Returns:
        ``(output (B, Nq, Hq, dv), None)``.

    Raises:
        NotImplementedError: dropout > 0, learned sinks, or a cache other than DynamicCache / SinkWindowCache
            under a patterned layer.
        ValueError: The layer's cache no longer holds keys its pattern reaches, padding of another length, or a
            ``softcap`` (Gemma 2's ``attn_logit_softcapping``, a ``score_mod`` of ``attend`` here) that is not a
            positive number.
    """
    state = _state(module)
    masks = attention_mask if isinstance(attention_mask, _Masks) else None
    given = None if masks is not None else attention_mask
    where = None if state is None else _positions(module, state, query.shape[2], key.shape[2])
    if state is None or state.pattern is None:
        mask = masks.exact() if masks is not None else given
        return hf.attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                    is_causal=is_causal, sliding_window=sliding_window, softcap=softcap, **kwargs)
    _unsupported(dropout, kwargs)
    score_mod = hf.softcap_mod(softcap)
    bias = None
    if given is not None:  # a 4D mask the caller built (the mask builder is skipped for those)
        if not isinstance(given, torch.Tensor) or given.dim() != 4:
            raise ValueError(f"attention_mask must be a 4D mask (B, 1|H, Nq, Nk) here, got {type(given).__name__}")
        bias = given if given.dtype != torch.bool else torch.zeros(given.shape, dtype=query.dtype,
                                                                   device=query.device).masked_fill_(~given, -math.inf)
    if kwargs.get("position_bias") is not None:
        bias = kwargs["position_bias"] if bias is None else bias + kwargs["position_bias"]
    pad = masks.padding if masks is not None else None
    if where is None:
        kpm = None
        if pad is not None:
            if pad.shape[1] != key.shape[2]:
                raise ValueError(f"the 2D attention_mask must cover every position, {key.shape[2]}, got "
                                 f"{pad.shape[1]}")
            kpm = pad.to(query.device)
        out = attend(query, key, value, state.pattern, scale=scaling, bias=bias, key_padding_mask=kpm,
                     score_mod=score_mod)
    else:
        qpos, kpos = (p.to(query.device) for p in where)
        total = int(qpos[-1]) + 1
        allowed = state.pattern.allowed(qpos[:, None], kpos[None, :], total, total)
        allowed = allowed.expand(*allowed.shape[:-2], qpos.numel(), kpos.numel())
        keep = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -math.inf)
        keep = keep[None] if keep.dim() == 3 else keep  # a PerHead pattern: (1, Hq, Nq, Nk)
        bias = keep if bias is None else bias + keep
        kpm = None
        if pad is not None:
            if pad.shape[1] != total:
                raise ValueError(f"the 2D attention_mask must cover every position seen, {total}, got {pad.shape[1]}")
            kpm = pad.to(query.device)[:, kpos]
        out = attend(query, key, value, None, scale=scaling, bias=bias, key_padding_mask=kpm, score_mod=score_mod)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``attention_forward`` and ``mask_builder`` with transformers under ``"nearfar_pattern"``
    (idempotent; done when this module is imported)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_builder)


register()
