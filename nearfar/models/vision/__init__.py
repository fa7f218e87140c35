"""Vision backbones built from nearfar layers, with timm's conventions (see ``spec``): importing this package
registers every variant; ``nearfar.integrations.timm.register_models()`` makes them ``timm.create_model`` names."""

from __future__ import annotations

from . import (
    maxvit,  # noqa: F401  (registers its variants)
    swin,  # noqa: F401  (registers its variants)
)
from .spec import BackboneSpec, backbones, create_backbone, register_backbone

__all__ = ["BackboneSpec", "backbones", "create_backbone", "register_backbone"]
