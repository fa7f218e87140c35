"""Plain linear attention: the TNL layer without decay (the Lightning kernel's ``s=None``), causal or not, self or
cross. Paper and official code as ``lightning``'s: OpenNLPLab/lightning-attention, the kernel's ``s=None`` path of
``lightning_attn/ops/triton/lightning_attn2.py``.

Differences from the official code: the non-causal form (``o = q (K^T V)``) and the cross form (keys and values
from a ``context``) are ours, the official kernel being causal self-attention only; everything else is
``LightningAttention``'s (see ``lightning.py``).
"""

from __future__ import annotations

from typing import Any

from .lightning import LightningAttention
from .registry import Mechanism, register


class LinearAttention(LightningAttention):
    """``LightningAttention`` without decay (``decay=False``): plain linear attention in the TNL layer; causal
    (default) or not (``causal=False``: ``o_i = q_i K^T V`` over every key), self or cross (``cross=True``: keys and
    values from ``context (B, M, dim)``, every query sees the whole source; with ``causal=True`` it decodes with the
    source's ``K^T V`` as its cache).

    Args:
        dim: Model width, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        **kwargs: ``LightningAttention``'s other arguments (``causal``, ``cross``, ``bias``, ``norm_type``,
            ``gate_rank``, ``block_size``, ...), except ``decay``.

    Raises:
        TypeError: ``decay`` is given; or what ``LightningAttention`` raises.
        ValueError: What ``LightningAttention`` raises.

    Examples:
        >>> import torch
        >>> from nearfar import LinearAttention
        >>> LinearAttention(64, 4)(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
        >>> cross = LinearAttention(64, 4, causal=False, cross=True)
        >>> cross(torch.randn(2, 32, 64), context=torch.randn(2, 48, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, **kwargs: Any):
        if "decay" in kwargs:
            raise TypeError("LinearAttention has no decay; use LightningAttention(decay=...)")
        super().__init__(dim, num_heads, decay=False, **kwargs)


register(Mechanism(
    name="linear_attention", paper="Lightning Attention-2 / TransNormerLLM (no-decay kernel, s=None)",
    repo="OpenNLPLab/lightning-attention",
    family="dense", dims=("1d",), why_not={}, patterns={
        "NS": {"causal": False}, "CS": {"causal": True}, "NC": {"causal": False, "cross": True},
        "CC": {"causal": True, "cross": True}},
    make=lambda dim, num_heads, **kw: LinearAttention(dim, num_heads, **kw), cls=LinearAttention,
    notes="The TNL layer with plain causal linear attention (lambda = 1): outputs grow with the sequence length "
          "before the norm."))
