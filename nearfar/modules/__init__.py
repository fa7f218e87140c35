"""``nn.Module`` mechanisms built on ``nearfar.attend``, one file per family, and their registry
(``nearfar.mechanisms()``). Each file registers its own mechanisms when imported here."""

from __future__ import annotations

from .dualtoken import DualTokenAttention
from .hilo import HiLo
from .maformer import MAFAttention
from .maxvit import MaxViTAttention
from .msa_conv import MSAConv2d
from .neighborhood import NeighborhoodAttention
from .proxy_tokens import ProxyTokenAttention
from .registry import Mechanism, mechanisms, register
from .shvit import SHSA
from .swin import WindowAttention
from .uniformer import UniFormerGlobalMHRA, UniFormerLocalMHRA

__all__ = [
    "DualTokenAttention",
    "HiLo",
    "MAFAttention",
    "MaxViTAttention",
    "Mechanism",
    "mechanisms",
    "MSAConv2d",
    "NeighborhoodAttention",
    "ProxyTokenAttention",
    "register",
    "SHSA",
    "UniFormerGlobalMHRA",
    "UniFormerLocalMHRA",
    "WindowAttention",
]
