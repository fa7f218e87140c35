"""The backbone table: what ``timm.create_model`` needs to build a nearfar backbone by name.

A vision backbone here is a plain ``nn.Module`` built from nearfar layers, following timm's conventions
(``num_classes``, ``forward_features``, ``forward_head(x, pre_logits=False)``, ``reset_classifier``,
``get_classifier``, ``feature_info``), so it is usable without timm. Each model file registers its variants with
``register_backbone``; ``nearfar.integrations.timm.register_models`` turns every entry into a timm entrypoint
(``timm.create_model("nearfar_swin_tiny_patch4_window7_224")``, ``features_only=True``, ``pretrained_cfg``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["BackboneSpec", "backbones", "create_backbone", "register_backbone"]


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone variant.

    Attributes:
        name: The registered name, ``"nearfar_"`` + the timm (or official) model name.
        cls: The model class.
        kwargs: Its constructor arguments for this variant.
        timm_name: The timm model whose state dict this variant loads strictly (None: timm has no such model).
        feature_cfg: timm's ``feature_cfg`` for ``features_only=True`` (e.g. ``{"flatten_sequential": True,
            "out_indices": (0, 1, 2, 3)}`` or ``{"feature_cls": "getter"}``).
        cfg: The pretrained-config fields timm records (``input_size``, ``mean``, ``std``, ``crop_pct``,
            ``interpolation``, ``first_conv``, ``classifier``, ``num_classes``, ``paper_ids``, ...). No weights:
            nearfar ships none.
    """

    name: str
    cls: type[nn.Module]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    timm_name: str | None = None
    feature_cfg: Mapping[str, Any] = field(default_factory=dict)
    cfg: Mapping[str, Any] = field(default_factory=dict)


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the table (its name must start with ``"nearfar_"`` and be new); returns it."""
    if not spec.name.startswith("nearfar_"):
        raise ValueError(f"a backbone's name must start with 'nearfar_', got {spec.name!r}")
    if spec.name in _BACKBONES and _BACKBONES[spec.name] != spec:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _BACKBONES[spec.name] = spec
    return spec


def backbones() -> dict[str, BackboneSpec]:
    """Every registered backbone variant, by name."""
    return dict(_BACKBONES)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone without timm: ``spec.cls(**spec.kwargs, **kwargs)``.

    Raises:
        KeyError: ``name`` is not registered (the message lists the names).
    """
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; registered: {sorted(_BACKBONES)}")
    spec = _BACKBONES[name]
    return spec.cls(**{**spec.kwargs, **kwargs})
