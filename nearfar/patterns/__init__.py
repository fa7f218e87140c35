"""Attention patterns: which (query, key) pairs may attend. Combine with ``|`` and ``&``."""

from .base import Dense, Intersection, Pattern, PerHead, Tiles, Union
from .core_and_window import CoreAndWindow
from .maskmod import MaskMod
from .neighborhood import Neighborhood
from .positional import BlockStrided, BlockWindow, Causal, GlobalTokens, RandomBlocks, Sinks, SlidingWindow, Strided
from .windows import Blocks, Grid

__all__ = ["Pattern", "Union", "Intersection", "PerHead", "Dense", "Tiles", "Neighborhood", "Causal",
           "SlidingWindow", "Strided", "Sinks", "GlobalTokens", "Blocks", "Grid", "BlockWindow", "RandomBlocks",
           "BlockStrided", "CoreAndWindow", "MaskMod"]
