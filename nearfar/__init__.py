"""nearfar: near (local) and far (global) attention patterns through one ``attend``."""

from .attend import attend
from .backends import engines
from .modules import NeighborhoodAttention, mechanisms
from .patterns import (
    Blocks,
    Causal,
    Dense,
    GlobalTokens,
    Grid,
    Intersection,
    Neighborhood,
    Pattern,
    PerHead,
    Sinks,
    SlidingWindow,
    Strided,
    Union,
)

__all__ = ["attend", "engines", "mechanisms", "NeighborhoodAttention", "Pattern", "Union", "Intersection",
           "PerHead", "Dense", "Neighborhood", "SlidingWindow", "Causal", "Blocks", "Grid", "Strided", "GlobalTokens",
           "Sinks"]
__version__ = "0.1.0"
