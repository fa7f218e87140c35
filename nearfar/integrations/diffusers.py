"""diffusers attention processors on nearfar's engines, steerable with ``nearfar.steer``.

diffusers runs the attention of its ``Attention`` modules in exchangeable *attention processors*
(https://huggingface.co/docs/diffusers/api/attnprocessor; ``diffusers/models/attention_processor.py``).
``NearfarAttnProcessor`` follows ``AttnProcessor2_0`` step by step (spatial norm, group norm, 4D maps as token
sequences, q/k/v projections, cross-attention norm, ``attn.prepare_attention_mask``, q/k norms, output projection,
residual connection, output rescale) and ``NearfarJointAttnProcessor`` follows ``JointAttnProcessor2_0`` (the
MM-DiT joint attention of SD3: image and context tokens in one sequence), but both compute attention with
``nearfar.attend``. So ``UNet2DConditionModel``, ``Transformer2DModel`` (DiT, PixArt) and ``SD3Transformer2DModel``
run on nearfar's engines, and ``nearfar.steer.control`` sees every call: importing this module registers a site
rule, so ``find_sites(unet)`` lists each ``Attention`` module that runs a nearfar processor (kind ``"self"``,
``"cross"`` when ``attn.is_cross_attention``, ``"joint"`` for the joint processor; ``num_heads = attn.heads``).

    from nearfar.integrations.diffusers import use_nearfar
    use_nearfar(pipe.unet)                      # every Attention module on nearfar.attend, dense: same outputs
    with nf.steer.control(pipe.unet, [("*attn2", KeyMask([2]))]) as run:
        image = pipe(prompt).images[0]          # each UNet call is one step (run.set_step(t) sets it instead)

Windowed self-attention: ``NearfarAttnProcessor(pattern=lambda h, w: nf.Blocks((h // 2, w // 2), grid=(h, w),
shift=(h // 8, w // 8), wrap=True))`` restricts the self-attention calls (no ``encoder_hidden_states``) to a
pattern built from the feature map's size; cross-attention stays dense. HiDiffusion's MSW-MSA (Zhang et al.,
"HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion Models", ECCV 2024,
arXiv 2311.17528; official code megvii-research/HiDiffusion, ``hidiffusion/hidiffusion.py``,
``make_diffusers_transformer_block``) is such a call: it records the latent size of the UNet call, infers each
level's ``(h, w)`` from the token count (downsample ratio ``sqrt(H W / N)``), rolls the tokens by a random shift
of 0, 1/4, 1/2 or 3/4 window and attends within ``(h/2, w/2)`` windows; ``nearfar.integrations.hidiffusion``
applies it as HiDiffusion does (its blocks, its random shift).

What differs from diffusers' and HiDiffusion's code: the scale is ``attn.scale`` (``AttnProcessor2_0`` leaves
SDPA's default ``1/sqrt(head_dim)``, the same value whenever diffusers picks that processor, i.e. ``scale_qk=True``;
with ``scale_qk=False`` diffusers falls back to ``AttnProcessor``, whose unit scale this follows); a bool attention
mask becomes an additive 0/-inf bias (SDPA's meaning of True = keep); attention dropout is never applied (diffusers
passes ``dropout_p=0.0`` too); there is no ``scale``/``*args`` deprecation path (diffusers warns about and drops
the keyword arguments a processor does not take). HiDiffusion partitions the tokens into windows; here the window
is a pattern on the unpartitioned sequence (``Blocks(..., wrap=True)`` is the rolled window), and ``use_nearfar``
records the latent size of each model call
(a forward pre-hook) so 3D token sequences get their grid the same way. Not covered: diffusers' other attention
classes (``FluxAttention``, ``WanAttention`` and the other ``AttentionModuleMixin`` modules with their own
processors and ``dispatch_attention_fn``), the added-KV, IP-Adapter, fused-QKV and PAG processors, and the joint
processor's ``attention_mask`` (SD3's ignores it too).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..dispatch import attend
from ..patterns import Pattern
from ..steer.sites import register_site_rule

PatternArg = Pattern | Callable[[int, int], Pattern] | None


def _attention_class() -> type | None:
    try:
        return _processors().Attention
    except ImportError:  # diffusers absent: no module of a model can be one of its Attention modules
        return None


def _processors() -> Any:
    """``diffusers.models.attention_processor``, imported when first needed (diffusers is an optional extra)."""
    return importlib.import_module("diffusers.models.attention_processor")


def _as_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as ``attend``'s additive bias (a bool mask: True = keep, as SDPA reads it)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention_mask must be an additive float mask or a bool mask, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


class NearfarAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with attention computed by ``nearfar.attend`` (see the module docstring).

    Args:
        pattern: None (dense: the outputs of ``AttnProcessor2_0``), a ``Pattern``, or ``pattern(h, w) ->
            Pattern`` built from the feature map's size (cached per size). It restricts the self-attention calls
            only (those without ``encoder_hidden_states``); cross-attention stays dense.
        engine: ``attend``'s engine (``"auto"`` or one of ``nearfar.engines()``).

    Attributes:
        latent_hw: The ``(H, W)`` of the model's input latent, set by ``use_nearfar`` at each model call (or by
            hand): the grid of a 3D token sequence of ``N`` tokens is ``(ceil(H / r), ceil(W / r))`` with ``r =
            round(sqrt(H W / N))``. A 4D input gives its own grid.

    Raises:
        TypeError: ``pattern`` is neither None, a ``Pattern`` nor callable; ``engine`` not a string.
        ValueError: At a call, a callable pattern whose grid cannot be found (a 3D input without ``latent_hw``, or
            a token count that no downsample ratio of ``latent_hw`` gives).

    Examples:
        >>> import torch, nearfar as nf
        >>> from diffusers.models.attention_processor import Attention, AttnProcessor2_0
        >>> from nearfar.integrations.diffusers import NearfarAttnProcessor
        >>> attn = Attention(32, heads=4, dim_head=8).eval()
        >>> x = torch.randn(2, 16, 32)
        >>> ref = attn(x)
        >>> attn.set_processor(NearfarAttnProcessor())
        >>> torch.allclose(attn(x), ref, atol=1e-5)
        True
        >>> attn.set_processor(NearfarAttnProcessor(pattern=lambda h, w: nf.Neighborhood(3, grid=(h, w))))
        >>> attn(torch.randn(2, 32, 4, 4)).shape   # a 4D map: its grid is (4, 4)
        torch.Size([2, 32, 4, 4])
    """

    def __init__(self, pattern: PatternArg = None, engine: str = "auto") -> None:
        if pattern is not None and not isinstance(pattern, Pattern) and not callable(pattern):
            raise TypeError(f"pattern must be None, a nearfar Pattern or pattern(h, w) -> Pattern, got "
                            f"{type(pattern).__name__}")
        if not isinstance(engine, str):
            raise TypeError(f"engine must be a string, got {type(engine).__name__}")
        self.pattern, self.engine = pattern, engine
        self.latent_hw: tuple[int, int] | None = None
        self._built: dict[tuple[int, int], Pattern] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pattern={self.pattern!r}, engine={self.engine!r})"

    def grid(self, n: int) -> tuple[int, int]:
        """The ``(h, w)`` of a sequence of ``n`` tokens of the latent ``latent_hw`` (see the class docstring)."""
        if self.latent_hw is None:
            raise ValueError(f"pattern(h, w) needs the feature map's size for a sequence of {n} tokens: pass a 4D "
                             "map, call the model converted by use_nearfar, or set processor.latent_hw = (H, W)")
        big_h, big_w = self.latent_hw
        r = max(1, round(math.sqrt(big_h * big_w / n)))
        h, w = -(-big_h // r), -(-big_w // r)
        if h * w != n:
            raise ValueError(f"no downsample ratio of the latent {self.latent_hw} gives {n} tokens (ratio {r} "
                             f"gives {h}x{w}); set processor.latent_hw to the size this module's map comes from")
        return h, w

    def pattern_for(self, n: int, hw: tuple[int, int] | None) -> Pattern | None:
        """The pattern of a self-attention call over ``n`` tokens (``hw``: the size of a 4D input)."""
        if self.pattern is None or isinstance(self.pattern, Pattern):
            return self.pattern
        hw = hw if hw is not None else self.grid(n)
        if hw not in self._built:
            built = self.pattern(*hw)
            if not isinstance(built, Pattern):
                raise TypeError(f"pattern(h, w) must return a nearfar Pattern, got {type(built).__name__}")
            self._built[hw] = built
        return self._built[hw]

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_self = encoder_hidden_states is None
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        pattern = self.pattern_for(query.shape[2], hw) if is_self else None
        hidden_states = attend(query, key, value, pattern, scale=attn.scale, engine=self.engine,
                               bias=_as_bias(attention_mask, query.dtype))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class NearfarJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention over image and context tokens) with attention
    computed by ``nearfar.attend``, dense. Returns ``(hidden_states, encoder_hidden_states)`` when given context
    tokens, else ``hidden_states``; ``attention_mask`` is not used (as in ``JointAttnProcessor2_0``).

    Args:
        engine: ``attend``'s engine (``"auto"`` or one of ``nearfar.engines()``).

    Raises:
        TypeError: ``engine`` is not a string.
    """

    def __init__(self, engine: str = "auto") -> None:
        if not isinstance(engine, str):
            raise TypeError(f"engine must be a string, got {type(engine).__name__}")
        self.engine = engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r})"

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # the context tokens, after the image tokens
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = torch.cat([query, cq], dim=2), torch.cat([key, ck], dim=2), torch.cat([value, cv], 2)

        hidden_states = attend(query, key, value, scale=attn.scale, engine=self.engine)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            n = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


NEARFAR_PROCESSORS = (NearfarAttnProcessor, NearfarJointAttnProcessor)


def default_processor(name: str, attn: Any) -> NearfarAttnProcessor | NearfarJointAttnProcessor:
    """``use_nearfar``'s default choice for the ``Attention`` module ``name``: a nearfar processor stays,
    ``AttnProcessor``/``AttnProcessor2_0`` become ``NearfarAttnProcessor()``, ``JointAttnProcessor2_0`` becomes
    ``NearfarJointAttnProcessor()``.

    Raises:
        ValueError: Any other processor (added-KV, IP-Adapter, fused, PAG, custom), naming the module.
    """
    ap = _processors()
    proc = attn.processor
    if isinstance(proc, NEARFAR_PROCESSORS):
        return proc
    if type(proc) in (ap.AttnProcessor, ap.AttnProcessor2_0):
        return NearfarAttnProcessor()
    if type(proc) is ap.JointAttnProcessor2_0:
        return NearfarJointAttnProcessor()
    raise ValueError(f"{name or 'the model'} runs {type(proc).__name__}, which has no nearfar counterpart: pass "
                     "processor_factory(name, attn) returning a processor, or None to keep this one (its calls do "
                     "not go through nearfar.attend, so nearfar.steer does not see them)")


def use_nearfar(model: nn.Module, processor_factory: Callable[[str, Any], object] | None = None) -> nn.Module:
    """Run every diffusers ``Attention`` module of ``model`` on a nearfar processor; returns ``model``.

    Args:
        model: A diffusers model (``UNet2DConditionModel``, ``Transformer2DModel``, ``SD3Transformer2DModel``, ...)
            or a single ``Attention`` module.
        processor_factory: ``factory(name, attn) -> processor`` (None keeps the module's processor); default
            ``default_processor``. A callable pattern's grid comes from the model input's size, recorded at each
            call by a forward pre-hook (the first 4D tensor among the call's positional arguments, ``sample``,
            ``hidden_states`` and the other keyword arguments).

    Raises:
        ImportError: diffusers is not installed.
        TypeError: ``model`` is not an ``nn.Module`` or ``processor_factory`` not callable.
        ValueError: ``model`` has no diffusers ``Attention`` module, or ``default_processor`` refuses one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if processor_factory is not None and not callable(processor_factory):
        raise TypeError(f"processor_factory must be callable, got {type(processor_factory).__name__}")
    attention = _attention_class()
    if attention is None:
        raise ImportError("use_nearfar needs diffusers: pip install 'nearfar[diffusers]'")
    modules: list[tuple[str, Any]] = [(n, m) for n, m in model.named_modules() if isinstance(m, attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention module")
    factory = processor_factory or default_processor
    chosen = {}
    for name, m in modules:
        proc = factory(name, m)
        chosen[name] = m.processor if proc is None else proc
    target: Any = model
    if modules[0][0] != "" and hasattr(target, "set_attn_processor") and hasattr(target, "attn_processors"):
        owners = {k: k.rpartition(".")[0] for k in target.attn_processors}  # "<module>.processor" -> "<module>"
        target.set_attn_processor({k: chosen[o] if o in chosen else target.get_submodule(o).processor
                                   for k, o in owners.items()})
    else:
        for name, m in modules:
            m.set_processor(chosen[name])
    ours = [p for p in chosen.values() if isinstance(p, NearfarAttnProcessor)]
    old = getattr(target, "_nearfar_latent_hook", None)
    if old is not None:  # converted before: one hook
        old.remove()

    def record_latent(module: nn.Module, args: tuple, kwargs: dict) -> None:
        named = [kwargs[k] for k in ("sample", "hidden_states") if k in kwargs]
        x = next((a for a in (*args, *named, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 4), None)
        if x is not None:
            for p in ours:
                p.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))

    target._nearfar_latent_hook = model.register_forward_pre_hook(record_latent, with_kwargs=True)
    return model


def diffusers_site(module: nn.Module) -> tuple[str, int | None, int | None] | None:
    """The site rule: a diffusers ``Attention`` module running a nearfar processor is a site (kind, heads, heads);
    modules on other processors are not (their attention does not run through ``nearfar.attend``)."""
    proc = getattr(module, "processor", None)
    attention = _attention_class() if isinstance(proc, NEARFAR_PROCESSORS) else None
    if attention is None or not isinstance(module, attention):
        return None
    a: Any = module
    kind = "joint" if isinstance(proc, NearfarJointAttnProcessor) else "cross" if a.is_cross_attention else "self"
    return kind, int(a.heads), int(a.heads)


register_site_rule(diffusers_site)
