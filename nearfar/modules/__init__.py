"""``nn.Module`` mechanisms built on ``nearfar.attend``, one file per family, and their registry
(``nearfar.mechanisms()``). Each file registers its own mechanisms when imported here."""

from __future__ import annotations

from .agent import AgentAttention
from .cca import CCAAttention
from .craft import SRWAttention
from .dense import DenseAttention
from .dualtoken import DualTokenAttention
from .gcvit import GCViTWindowAttention, GlobalQueryAttention
from .hidiffusion import MSWAttention
from .hilo import HiLo
from .lightning import LightningAttention, LinearAttention
from .maformer import MAFAttention
from .maxvit import MaxViTAttention
from .moa import MoAAttention
from .msa_conv import MSAConv2d
from .neighborhood import NeighborhoodAttention
from .proxy_tokens import ProxyTokenAttention
from .registry import Mechanism, mechanisms, register
from .s2_attention import S2Attention
from .shvit import SHSA
from .sparse_attention import BigBirdAttention, LongformerAttention, PatternAttention, StreamingLLMAttention
from .super_token import SuperTokenAttention
from .swin import WindowAttention
from .titans import TitansMAC
from .uniformer import UniFormerGlobalMHRA, UniFormerLocalMHRA

__all__ = [
    "AgentAttention",
    "BigBirdAttention",
    "CCAAttention",
    "DenseAttention",
    "DualTokenAttention",
    "GCViTWindowAttention",
    "GlobalQueryAttention",
    "HiLo",
    "LightningAttention",
    "LinearAttention",
    "LongformerAttention",
    "MAFAttention",
    "MaxViTAttention",
    "Mechanism",
    "mechanisms",
    "MoAAttention",
    "MSAConv2d",
    "MSWAttention",
    "NeighborhoodAttention",
    "PatternAttention",
    "ProxyTokenAttention",
    "register",
    "S2Attention",
    "SHSA",
    "SRWAttention",
    "StreamingLLMAttention",
    "SuperTokenAttention",
    "TitansMAC",
    "UniFormerGlobalMHRA",
    "UniFormerLocalMHRA",
    "WindowAttention",
]
