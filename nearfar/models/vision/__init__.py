"""Vision backbones built from nearfar layers, with timm's conventions (see ``spec``): importing this package
registers every variant; ``nearfar.integrations.timm.register_models()`` makes them ``timm.create_model`` names."""

from __future__ import annotations

from .biformer import BiFormer
from .gcvit import GlobalContextViT
from .maxvit import MaxViT
from .nat import NAT, DiNAT
from .shvit import SHViT
from .spec import BackboneSpec, backbones, create_backbone, register_backbone
from .swin import SwinTransformer

__all__ = ["NAT", "BackboneSpec", "BiFormer", "DiNAT", "GlobalContextViT", "MaxViT", "SHViT", "SwinTransformer",
           "backbones", "create_backbone", "register_backbone"]
