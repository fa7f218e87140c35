"""Attention layers (``nn.Module``), one file per mechanism named after its registry name, built only on
``nearfar.functional``, ``nearfar.patterns`` and ``nearfar.checks``; shared pieces live in files named for what
they hold (``kv_cache``, ``rotary``, ``projections``, ``position_bias``, ``pattern_attention``, ``registry``).
Each file registers its mechanisms where their classes are defined."""

from __future__ import annotations

from .agent import AgentAttention
from .biformer import BiLevelRoutingAttention
from .bigbird import BigBirdAttention
from .cca import CCAAttention
from .craft_srwa import SRWAttention
from .davit_channel import DaViTChannelAttention
from .davit_spatial import DaViTWindowAttention
from .dense import DenseAttention
from .dgqa import DGQA
from .dlgsa_global import SparseGSA
from .dlgsa_local import MHDLSA
from .dualtoken import DualTokenAttention
from .ela import ELA
from .gaam import GAAMAttention
from .gcvit import GCViTWindowAttention, GlobalQueryAttention
from .glca import GLCAttention
from .hilo import HiLo
from .hip import HiPAttention
from .kdgqa import KDGQA
from .lamamba import LaMambaBlock
from .landmark import LandmarkAttention
from .landmark_tokens import LandmarkTokens
from .lightning import LightningAttention
from .linear_attention import LinearAttention
from .longformer import LongformerAttention
from .longheads import LongHeadsAttention
from .maformer import MAFAttention
from .maxim_cgb import MaximCrossGating
from .maxim_mab import MaximMultiAxisGmlp
from .maxvit import MaxViTAttention
from .moa import MoAAttention
from .moba import MoBAAttention
from .moh import MoHAttention
from .msa_conv import MSAConv2d
from .msw_msa import MSWAttention
from .neighborhood import NeighborhoodAttention
from .nsa import NSAAttention
from .pattern_attention import PatternAttention
from .pgqa import PGQA
from .proxy_tokens import ProxyTokenAttention
from .psa_parallel import PSAParallel
from .psa_sequential import PSASequential
from .pwca import PWCAttention
from .registry import Mechanism, mechanisms, register
from .routing_transformer import RoutingTransformerAttention
from .s2_attention import S2Attention
from .seer_attention import SeerAttention
from .shvit import SHSA
from .sparsifiner import SparsifinerAttention
from .streaming_llm import StreamingLLMAttention
from .super_token import SuperTokenAttention
from .swin import WindowAttention
from .titans_mac import TitansMAC
from .uniformer import UniFormerGlobalMHRA, UniFormerLocalMHRA
from .vsa import VSAWindowAttention
from .wau import WindowAttentionUpsample

__all__ = [
    "AgentAttention",
    "BigBirdAttention",
    "BiLevelRoutingAttention",
    "CCAAttention",
    "DaViTChannelAttention",
    "DaViTWindowAttention",
    "DenseAttention",
    "DGQA",
    "DualTokenAttention",
    "ELA",
    "GAAMAttention",
    "GCViTWindowAttention",
    "GLCAttention",
    "GlobalQueryAttention",
    "HiLo",
    "HiPAttention",
    "KDGQA",
    "LaMambaBlock",
    "LandmarkAttention",
    "LandmarkTokens",
    "LightningAttention",
    "LinearAttention",
    "LongformerAttention",
    "LongHeadsAttention",
    "MAFAttention",
    "MaximCrossGating",
    "MaximMultiAxisGmlp",
    "MaxViTAttention",
    "Mechanism",
    "mechanisms",
    "MHDLSA",
    "MoAAttention",
    "MoBAAttention",
    "MoHAttention",
    "MSAConv2d",
    "MSWAttention",
    "NeighborhoodAttention",
    "NSAAttention",
    "PatternAttention",
    "PGQA",
    "ProxyTokenAttention",
    "PSAParallel",
    "PSASequential",
    "PWCAttention",
    "register",
    "RoutingTransformerAttention",
    "S2Attention",
    "SeerAttention",
    "SHSA",
    "SparseGSA",
    "SparsifinerAttention",
    "SRWAttention",
    "StreamingLLMAttention",
    "SuperTokenAttention",
    "TitansMAC",
    "UniFormerGlobalMHRA",
    "UniFormerLocalMHRA",
    "VSAWindowAttention",
    "WindowAttention",
    "WindowAttentionUpsample",
]
