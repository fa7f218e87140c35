"""timm on nearfar: ViT attention on nearfar's engines (steerable with ``nearfar.steer``) and nearfar's backbones
as ``timm.create_model`` names.

**Attention.** timm's ViTs (``VisionTransformer``, DeiT, BEiT-free ViT variants, and every model whose blocks use
``timm.layers.Attention``; https://github.com/huggingface/pytorch-image-models, ``timm/layers/attention.py``,
``Attention.forward``) compute ``softmax(q k^T * scale + mask) v`` with SDPA or by hand. ``use_nearfar(model)``
switches each such module to a subclass whose ``forward`` is the same computation step by step (qkv projection,
q/k norms, output norm, sigmoid gate, projection) with the attention done by ``nearfar.attend``: the parameters,
state dict and outputs stay timm's. So ``nearfar.steer`` sees every call: importing this module registers a site
rule, and ``find_sites(vit)`` lists one ``"self"`` site per block::

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    use_nearfar(model)                                        # same logits, now through nearfar.attend
    with nf.steer.control(model, [Capture("probs", rows=[0])]) as run:   # the CLS token's attention rows
        model(images)

``use_nearfar(model, pattern=...)`` restricts the attention to a nearfar ``Pattern`` over the whole token sequence
(prefix tokens first, then the patches in raster order), or to ``pattern(n) -> Pattern`` built from the token
count (cached per count).

What differs from timm's code: attention-probability dropout is never applied (``attend`` returns ``P @ V``; a
module in training mode with ``attn_drop.p > 0`` raises instead of silently skipping it); a bool ``attn_mask``
becomes an additive 0/-inf bias (True = attend, SDPA's meaning); ``is_causal=True`` adds ``nf.Causal()`` to the
pattern. timm's other attention classes (``AttentionRope``, Swin's ``WindowAttention``, EVA, ...) are left as they
are.

**Backbones.** ``register_models()`` registers every backbone of ``nearfar.models.vision`` with timm's model
registry under its ``nearfar_...`` name (built by timm's ``build_model_with_cfg``, so ``features_only``,
``out_indices``, ``num_classes`` and ``pretrained_cfg`` behave as for timm's own models). Importing this module
calls it. nearfar ships no weights: ``pretrained=True`` needs a local file
(``pretrained_cfg_overlay={"file": path}``), e.g. a timm model's state dict saved with ``torch.save``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ..dispatch import attend
from ..models.vision import BackboneSpec, backbones
from ..patterns import Causal, Pattern
from ..steer.sites import register_site_rule

__all__ = ["default_cfgs", "register_models", "site_rule", "use_nearfar"]

PatternArg = Pattern | Callable[[int], Pattern] | None

#: the pretrained configs timm's ``register_model`` reads from the entrypoint's module, by model name
default_cfgs: dict[str, dict[str, Any]] = {}

# the nearfar subclass made for each timm attention class, and the reverse
_SUBCLASSES: dict[type, type] = {}


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError as e:  # the extra is optional
        raise ImportError("this needs timm: pip install 'nearfar[timm]'") from e


def _timm_attention() -> type | None:
    try:
        return importlib.import_module("timm.layers").Attention
    except ImportError:
        return None


def _as_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be an additive float mask or a bool mask, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _pattern_for(module: Any, n: int) -> Pattern | None:
    pattern = module.nearfar_pattern
    if pattern is None or isinstance(pattern, Pattern):
        return pattern
    built: dict[int, Pattern] = module.nearfar_built
    if n not in built:
        got = pattern(n)
        if not isinstance(got, Pattern):
            raise TypeError(f"pattern(n) must return a nearfar Pattern, got {type(got).__name__}")
        built[n] = got
    return built[n]


def _attention_forward(self: Any, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """timm's ``Attention.forward`` with the attention on ``nearfar.attend``."""
    if self.training and self.attn_drop.p > 0:
        raise NotImplementedError("attention-probability dropout (attn_drop > 0 in training) is not supported: "
                                  "nearfar's engines never form the probabilities; use model.eval() or attn_drop=0")
    b, n, _ = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = self.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    pattern = _pattern_for(self, n)
    if is_causal:
        pattern = Causal() if pattern is None else pattern & Causal()
    out = attend(q, k, v, pattern, scale=self.scale, bias=_as_bias(attn_mask, q.dtype), engine=self.nearfar_engine)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = getattr(self, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Nearfar{cls.__name__}", (cls,), {
            "forward": _attention_forward, "__module__": __name__,
            "__doc__": f"timm's {cls.__name__} with its attention on nearfar.attend (nearfar.integrations.timm)."})
    return _SUBCLASSES[cls]


def use_nearfar(model: nn.Module, pattern: PatternArg = None, engine: str = "auto") -> nn.Module:
    """Run every ``timm.layers.Attention`` of ``model`` on ``nearfar.attend``; returns ``model``.

    Calling it again changes the pattern and engine. The modules keep their parameters, buffers and state dict.

    Args:
        model: A timm model (or a single ``Attention`` module).
        pattern: None (dense: timm's outputs), a ``Pattern`` over the token sequence, or ``pattern(n) -> Pattern``
            for a sequence of ``n`` tokens.
        engine: ``attend``'s engine (``"auto"`` or one of ``nearfar.engines()``).

    Raises:
        ImportError: timm is not installed.
        TypeError: ``model`` is not an ``nn.Module``; ``pattern`` is not None, a ``Pattern`` or callable;
            ``engine`` not a string.
        ValueError: ``model`` has no ``timm.layers.Attention`` module.

    Examples:
        >>> import timm, torch
        >>> from nearfar.integrations.timm import use_nearfar
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
        ...                         num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> ref = vit(x)
        >>> torch.allclose(use_nearfar(vit)(x), ref, atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if pattern is not None and not isinstance(pattern, Pattern) and not callable(pattern):
        raise TypeError(f"pattern must be None, a nearfar Pattern or pattern(n) -> Pattern, got "
                        f"{type(pattern).__name__}")
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a string, got {type(engine).__name__}")
    attention = _timm_attention()
    if attention is None:
        raise ImportError("use_nearfar needs timm: pip install 'nearfar[timm]'")
    ours = tuple(_SUBCLASSES.values())
    modules = [m for m in model.modules() if type(m) is attention or isinstance(m, ours)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no timm.layers.Attention module")
    m: Any
    for m in modules:
        if not isinstance(m, ours):
            m.__class__ = _subclass(type(m))
        m.nearfar_pattern, m.nearfar_engine, m.nearfar_built = pattern, engine, {}
    return model


def site_rule(module: nn.Module) -> tuple[str, int | None, int | None] | None:
    """``find_sites``' rule for timm: an attention module switched by ``use_nearfar`` is a ``"self"`` site."""
    if _SUBCLASSES and isinstance(module, tuple(_SUBCLASSES.values())):
        heads = int(cast(Any, module).num_heads)
        return "self", heads, heads
    return None


def _entrypoint(spec: BackboneSpec) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if pretrained and not overlay.get("file"):
            raise ValueError(f"nearfar ships no weights for {spec.name}: pass pretrained_cfg_overlay="
                             "{'file': path} (a state dict saved with torch.save) or pretrained=False")
        build = importlib.import_module("timm.models").build_model_with_cfg
        return build(spec.cls, spec.name, pretrained, feature_cfg=dict(spec.feature_cfg), **{**spec.kwargs, **kwargs})

    entry.__name__ = entry.__qualname__ = spec.name
    entry.__module__ = __name__
    entry.__doc__ = f"{spec.name}: {spec.cls.__name__} from nearfar layers" + (
        f" (state dict of timm's {spec.timm_name})" if spec.timm_name else "")
    return entry


def register_models() -> list[str]:
    """Register every backbone of ``nearfar.models.vision`` with timm (idempotent); returns the names.

    Raises:
        ImportError: timm is not installed.
    """
    timm = _timm()
    registry = importlib.import_module("timm.models")
    me = sys.modules[__name__]
    for name, spec in backbones().items():
        if name in registry.list_models(name):  # already registered (this call is idempotent)
            continue
        default_cfgs[name] = {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
                              "crop_pct": 0.9, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                              "std": (0.229, 0.224, 0.225), **spec.cfg}
        fn = _entrypoint(spec)
        setattr(me, name, fn)
        timm.models.register_model(fn)
    return sorted(backbones())


register_site_rule(site_rule)
try:
    register_models()
except ImportError:  # timm absent: importing this module still gives use_nearfar's clear error
    pass
