"""The attention projections of the sequence layers: LLaMA-style q/k/v/o with grouped-query heads."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_dim_heads, check_positive_int
from ..functional import pointwise_linear
from .rotary import RotaryEmbedding


class PointwiseLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is ``nearfar.functional.pointwise_linear``: a
    1x1 convolution on channel-last maps and token batches where oneDNN runs it faster than ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_linear(x, self.weight, self.bias)


class ProjectedAttention(nn.Module):
    """Base of the layers that ``add_projections`` equips: declares the attributes it sets (for type checkers)."""

    # set by add_projections
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    rope: RotaryEmbedding | None


def kv_heads(num_heads: int, num_kv_heads: int | None) -> int:
    """``num_kv_heads`` (None: ``num_heads``, no GQA), checked to divide ``num_heads``."""
    kv = num_heads if num_kv_heads is None else check_positive_int(num_kv_heads, "num_kv_heads")
    if num_heads % kv:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv})")
    return kv



def add_projections(layer: ProjectedAttention, dim: int, num_heads: int, num_kv_heads: int | None, qkv_bias: bool,
                    rope: bool) -> None:
    """Give a sequence layer the LLaMA-style attention projections (``q_proj``, ``k_proj``, ``v_proj`` with GQA,
    ``o_proj``) and RoPE, plus ``dim``, ``num_heads``, ``num_kv_heads``, ``head_dim``: what ``rotary_qkv`` reads."""
    layer.head_dim = check_dim_heads(dim, num_heads)
    layer.dim, layer.num_heads, layer.num_kv_heads = dim, num_heads, kv_heads(num_heads, num_kv_heads)
    kv_width = layer.num_kv_heads * layer.head_dim
    layer.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
    layer.k_proj = nn.Linear(dim, kv_width, bias=qkv_bias)
    layer.v_proj = nn.Linear(dim, kv_width, bias=qkv_bias)
    layer.o_proj = nn.Linear(dim, dim, bias=False)
    layer.rope = RotaryEmbedding(layer.head_dim) if rope else None


def meta_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Shape inference on the meta device for a layer whose routing reads values (top-k, norms, head allocations),
    which meta tensors do not have: the output ``(*x.shape[:-1], dim)`` through the layer's ``o_proj``.

    Args:
        module: A layer with an ``o_proj`` linear map.
        x: The input on the meta device.

    Returns:
        A meta tensor of the layer's output shape.
    """
    o_proj = module.o_proj
    assert isinstance(o_proj, nn.Linear)
    return o_proj(x.new_empty(*x.shape[:-1], o_proj.in_features))

