"""Whole models built from nearfar layers: a small decoder-only LM whose attention is any registered sequence
mechanism (``TinyLM``), and the models that are mechanisms themselves (Block Transformer, FIT-AR)."""

from __future__ import annotations

from .block_transformer import BlockTransformer
from .fit_ar import FITAR
from .tiny_lm import TinyLM, filter_logits

__all__ = ["BlockTransformer", "FITAR", "TinyLM", "filter_logits"]
