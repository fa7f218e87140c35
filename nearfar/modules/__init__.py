"""``nn.Module`` mechanisms built on ``nearfar.attend``, one file per family, and their registry
(``nearfar.mechanisms()``). Each file registers its own mechanisms when imported here."""

from __future__ import annotations

from .dualtoken import DualTokenAttention
from .maformer import MAFAttention
from .maxvit import MaxViTAttention
from .msa_conv import MSAConv2d
from .neighborhood import NeighborhoodAttention
from .proxy_tokens import ProxyTokenAttention
from .registry import Mechanism, mechanisms, register
from .swin import WindowAttention

__all__ = ["DualTokenAttention", "MAFAttention", "MSAConv2d", "MaxViTAttention", "Mechanism", "NeighborhoodAttention",
           "ProxyTokenAttention", "WindowAttention", "mechanisms", "register"]
