"""Vision backbones built from nearfar layers, with timm's conventions (see ``spec``): importing this package
registers every variant; ``nearfar.integrations.timm.register_models()`` makes them ``timm.create_model`` names."""

from __future__ import annotations

from .biformer import BiFormer  # noqa: F401  (registers nearfar_biformer_tiny)
from .gcvit import GlobalContextViT  # noqa: F401  (registers nearfar_gcvit_*)
from .nat import NAT, DiNAT  # noqa: F401  (registers nearfar_nat_* / nearfar_dinat_*)
from .shvit import SHViT  # noqa: F401  (registers nearfar_shvit_*)
from .spec import BackboneSpec, backbones, create_backbone, register_backbone

__all__ = ["BackboneSpec", "backbones", "create_backbone", "register_backbone"]
