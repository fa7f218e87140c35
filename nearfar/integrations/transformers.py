"""Hugging Face transformers on nearfar's engines: ``attn_implementation="nearfar"``, steerable with ``nearfar.steer``.

transformers (5.x, and 4.56+) looks a model's attention up by name in ``AttentionInterface`` and the matching mask
builder in ``AttentionMaskInterface`` (the "attention interface" of transformers' documentation,
https://huggingface.co/docs/transformers/main/en/attention_interface). Importing this module registers both under
``"nearfar"`` (``register``, idempotent), so::

    import nearfar.integrations.transformers  # noqa: F401  (registers "nearfar")
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="nearfar")   # or
    model.set_attn_implementation("nearfar")

runs every attention layer of the model through ``nearfar.attend`` (query heads ``Hq``, key/value heads ``Hkv``:
grouped-query attention natively, K/V are never repeated). What maps to what:

- a causal layer is ``nf.Causal()``; a layer with ``sliding_window=W`` (Mistral, Qwen2, Gemma 2/3: ``W`` keys
  including the query's own, ``kv_idx > q_idx - W`` in ``transformers.masking_utils``) is
  ``nf.SlidingWindow(left=W - 1) & nf.Causal()``; a non-causal layer (encoders, cross-attention) is dense;
- with a KV cache the ``Nq`` queries are the last ``Nq`` positions of the ``Nk`` keys: nearfar's positional patterns
  align the last query with the last key (bottom-right), which is where transformers' dynamic caches put them
  (its sliding-window cache keeps the last ``W - 1`` keys, and the pattern is unchanged by that shift);
- padding (the 2D ``attention_mask`` of zeros and ones) becomes ``key_padding_mask``: the mask builder
  (``mask_builder``) hands the layer the padding of its keys only, never a materialised ``(B, 1, Nq, Nk)`` mask,
  when the model asked for a plain causal, sliding-window causal or bidirectional mask and its queries end where its
  keys end. Anything else (image-token overlays, packed sequences, chunked attention, a static cache whose keys run
  past the queries) gets transformers' own exact boolean mask, passed as an additive ``bias`` (slower, exact);
- a 4D mask the model or user built itself is used as given (bool: True = attend; float: added to the scores).

Tanh soft-capping of the scores (``softcap``, Gemma 2's ``attn_logit_softcapping``) is a ``score_mod`` of
``attend``: ``softcap * tanh(score / softcap)`` on the scaled scores, before the mask and any 4D mask or position
bias are added, as transformers' eager attention does it. Such a layer cannot use the fused kernels (the function
of each score runs through PyTorch ops: the dense engine, or the block-sparse engine's tile path for long inputs).

Not supported, with a clear ``NotImplementedError``: attention-probability dropout (``dropout > 0``: the
engines return ``P @ V``, never ``P``; evaluate with ``model.eval()`` or set ``attention_dropout=0``) and learned
attention sinks (``s_aux`` / ``sinks``, gpt-oss). ``output_attentions`` returns no weights (as for ``"sdpa"``): read
maps with ``nearfar.steer.Capture`` instead. A query with no key to attend (a left-padding position) returns zeros,
as PyTorch's SDPA does.

Steering: the module also registers a ``nearfar.steer`` site rule (``site_rule``): each transformers attention
module (a class of ``transformers`` whose name ends in ``Attention`` and whose ``config`` has
``num_attention_heads``) is one site, so ``find_sites(model)`` lists one per layer and ``control(model, ...)``
edits and captures its ``nearfar.attend`` call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ..dispatch import attend
from ..patterns import Causal, Pattern, SlidingWindow
from ..steer.sites import register_site_rule

__all__ = ["NAME", "attention_forward", "mask_builder", "register", "site_rule"]

#: the ``attn_implementation`` name this module registers
NAME = "nearfar"


def _pattern(module: nn.Module, is_causal: bool | None, sliding_window: int | None) -> Pattern | None:
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if sliding_window is None:
        return Causal() if causal else None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int (keys per query, its own included) or None, got "
                         f"{sliding_window!r}")
    if not causal:
        raise NotImplementedError("a non-causal layer with sliding_window set and no 4D mask: transformers' "
                                  "bidirectional windows differ by one between models; build the model's 4D mask "
                                  "(any other attn_implementation's mask) and pass it, or use 'sdpa'")
    return SlidingWindow(left=sliding_window - 1) & Causal()


def _mask_terms(attention_mask: torch.Tensor | None, query: torch.Tensor,
                key: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """``("pad", key_padding_mask (B, Nk) or None)`` for a 2D mask or none, ``("bias", bias)`` for a 4D mask."""
    if attention_mask is None:
        return "pad", None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None for attn_implementation={NAME!r}, got "
                        f"{type(attention_mask).__name__} (a mask built for another implementation?)")
    b, nk = query.shape[0], key.shape[2]
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (b, nk):
            raise ValueError(f"a 2D attention_mask must be the keys' padding (B, Nk) = {(b, nk)}, got "
                             f"{tuple(attention_mask.shape)}")
        return "pad", attention_mask.to(device=query.device, dtype=torch.bool)
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2D (B, Nk) padding or 4D (B, 1|H, Nq, Nk), got shape "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(query.device)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return "bias", torch.where(mask, zero, torch.full((), -math.inf, dtype=query.dtype, device=query.device))
    return "bias", mask


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (as ``sdpa_attention_forward``) on ``nearfar.attend``.

    Args:
        module: The calling attention module (its ``is_causal`` is the default of ``is_causal``).
        query: ``(B, Hq, Nq, d)``.
        key: ``(B, Hkv, Nk, d)`` with ``Hq % Hkv == 0`` (not repeated: grouped-query attention is native).
        value: ``(B, Hkv, Nk, dv)``.
        attention_mask: None, the keys' padding ``(B, Nk)`` (True/1 = keep) from ``mask_builder``, or a 4D
            mask ``(B, 1|Hq, Nq, Nk)`` (bool: True = attend; float: added to the scaled scores).
        dropout: Must be 0 (probability dropout is not supported).
        scaling: Score scale (default ``1 / sqrt(d)``).
        is_causal: Whether the layer is causal (default ``module.is_causal``, else True).
        sliding_window: ``W`` keys per query including its own (``SlidingWindow(left=W-1) & Causal()``), or None.
        softcap: Tanh soft-capping of the scaled scores, ``softcap * tanh(score / softcap)`` (> 0), or None.
        **kwargs: ``position_bias`` (added to the scores); ``s_aux``/``sinks`` must be None; the rest is ignored.

    Returns:
        ``(output (B, Nq, Hq, dv), None)``: no attention weights.

    Raises:
        NotImplementedError: ``dropout > 0``, attention sinks, or a non-causal sliding window without a 4D mask.
        ValueError: A ``softcap`` that is not a positive number, a mask of the wrong shape, or what
            ``nearfar.attend`` rejects.
    """
    score_mod = softcap_mod(softcap)
    if dropout:
        raise NotImplementedError(f"attn_implementation={NAME!r} has no attention-probability dropout (dropout="
                                  f"{dropout}): the engines never form the probabilities; call model.eval() or set "
                                  "config.attention_dropout=0")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation={NAME!r} does not support learned attention sinks "
                                      f"({name}=...); use 'eager' or 'sdpa' for this model")
    how, mask = _mask_terms(attention_mask, query, key)
    pattern = _pattern(module, is_causal, sliding_window) if how == "pad" else None
    kpm = mask if how == "pad" else None
    bias = mask if how == "bias" else None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    out = attend(query, key, value, pattern, scale=scaling, bias=bias, key_padding_mask=kpm, score_mod=score_mod)
    return out.transpose(1, 2).contiguous(), None


def softcap_mod(softcap: object) -> Callable[..., torch.Tensor] | None:
    """The ``score_mod`` of tanh soft-capping at ``softcap`` (None: none), after checking it is a positive number."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    return _softcap(float(softcap))


def _softcap(cap: float) -> Callable[..., torch.Tensor]:
    """The ``score_mod`` of tanh soft-capping at ``cap``."""

    def softcap_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    return softcap_mod


def _nonlocals(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        return {}


def _plain(mask_function: object, local_size: object) -> str | None:
    """Which plain mask transformers asked for: ``"causal"``, ``"sliding"`` (causal, ``local_size`` keys),
    ``"bidirectional"`` or None (anything else: overlays, packing, chunks, an unknown function)."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal"
    if mask_function is mu.bidirectional_mask_function:
        return "bidirectional"
    if not callable(mask_function) or getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _nonlocals(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or parts[1] is not mu.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = _nonlocals(overlay).get("sliding_window")
    return "sliding" if isinstance(window, int) and window == local_size else None


def mask_builder(batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = 0,
                   kv_offset: int = 0, mask_function: Callable[..., Any] | None = None,
                   attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask-builder signature (as ``sdpa_mask``) for ``attention_forward``.

    A plain causal, sliding-window causal or bidirectional mask whose queries end where the keys end (so
    nearfar's bottom-right alignment holds) is returned as the keys' padding ``(B, kv_length)`` bool, or None when
    no key is padding: the layer's pattern comes from its ``is_causal`` and ``sliding_window`` arguments, as for
    flash attention. Any other mask is transformers' exact boolean ``(B, 1, q_length, kv_length)``.

    Args:
        batch_size: B.
        q_length: Queries of this call.
        kv_length: Keys of this call.
        q_offset: Absolute position of the first query (an int, or a tensor for static caches).
        kv_offset: Absolute position of the first key.
        mask_function: transformers' ``mask_mod``-style function of ``(b, h, q_idx, kv_idx)``.
        attention_mask: The 2D padding mask over absolute positions ``(B, seen + q_length)``, or None.
        **kwargs: ``local_size`` and the other arguments transformers passes to mask builders.

    Returns:
        None, a bool ``(B, kv_length)`` key padding mask (True = keep), or a bool ``(B, 1, q_length, kv_length)``.
    """
    from transformers import masking_utils as mu

    kind = _plain(mask_function, kwargs.get("local_size"))
    aligned = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset + q_length == kv_offset + kv_length
    if kind == "bidirectional" or (kind is not None and aligned):
        if attention_mask is None:
            return None
        pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        assert pad is not None
        pad = pad[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        return None if bool(pad.all()) else pad
    for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        kwargs.pop(name, None)
    # static caches hand over a tensor offset, which sdpa_mask takes although its annotation says int
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=cast(int, q_offset),
                        kv_offset=kv_offset, mask_function=mask_function or mu.causal_mask_function,
                        attention_mask=attention_mask, allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=False, **kwargs)


def site_rule(module: nn.Module) -> tuple[str, int | None, int | None] | None:
    """``nearfar.steer`` site rule: a transformers attention module (its class from ``transformers``, its name
    ending in ``Attention``, its ``config`` with ``num_attention_heads``) is a site of kind ``"cross"`` when it says
    ``is_cross_attention``, else ``"self"``, with the config's query and key/value heads."""
    cls = type(module)
    if not cls.__name__.endswith("Attention") or not cls.__module__.startswith("transformers."):
        return None
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        return None
    kv = getattr(config, "num_key_value_heads", None)
    kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
    return kind, heads, kv if isinstance(kv, int) else heads


def register() -> None:
    """Register ``attention_forward`` and ``mask_builder`` with transformers under ``"nearfar"``, and
    ``site_rule`` with ``nearfar.steer`` (idempotent; done when this module is imported).

    Raises:
        ImportError: transformers is not installed (``pip install nearfar[hf]``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - the test extra installs transformers
        raise ImportError("nearfar.integrations.transformers needs transformers>=4.56: pip install nearfar[hf]") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_builder)
    register_site_rule(site_rule)


register()
