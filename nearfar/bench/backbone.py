"""The one backbone of the quality suite of ``nearfar bench``.

Every mechanism runs in the same small model (after the small recall models of Zoology and Based, HazyResearch/zoology,
HazyResearch/based, sized by our own probes): token embedding, ``depth`` pre-norm blocks of [depthwise conv (kernel 3)
-> attention -> MLP], a final norm and a linear head. The only thing that changes between rows of a table is the
attention layer, given as a factory ``(dim, num_heads) -> nn.Module``; the "no attention" control puts a token-wise MLP
of the same size in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_dim_heads, check_positive_int

if TYPE_CHECKING:
    from .tasks import Task

AttentionFactory = Callable[[int, int], nn.Module]
_KINDS = ("seq", "cls", "2d")


def check_task(task: object) -> Task:
    for field in ("name", "pattern", "kind", "vocab_size", "num_classes", "grid", "bin_names", "metric", "sample"):
        if not hasattr(task, field):
            raise TypeError(f"task must be a nearfar.bench.tasks.Task, got {type(task).__name__}")
    task = cast("Task", task)  # it has every field of one
    if task.kind not in _KINDS:
        raise ValueError(f"task.kind must be one of {_KINDS}, got {task.kind!r}")
    if task.pattern not in ("CS", "NS"):
        raise ValueError(f"task.pattern must be 'CS' or 'NS', got {task.pattern!r}")
    if task.metric not in ("accuracy", "bpc"):
        raise ValueError(f"task.metric must be 'accuracy' or 'bpc', got {task.metric!r}")
    return task


class TokenMix(nn.Module):
    """The "no attention" slot: a position-wise MLP with the 4 * dim^2 weights of a q/k/v/o layer, so that the
    "none" control has the same parameter count as the attention controls and differs only in mixing tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class BackboneBlock(nn.Module):
    """Pre-norm ``x + conv(norm x)``, ``x + attn(norm x)``, ``x + mlp(norm x)`` on channel-last ``(B, *S, dim)``.

    The conv is depthwise, kernel 3 per spatial axis: causal (left-padded) for causal sequence tasks, centred
    otherwise. It lets single-layer attention match a key with the token next to it (the Based recipe)."""

    def __init__(self, dim: int, attn: nn.Module | None, ndim: int, causal: bool, conv: bool):
        super().__init__()
        self.ndim, self.causal = ndim, causal
        self.conv_norm = nn.LayerNorm(dim) if conv else None
        conv_cls = nn.Conv1d if ndim == 1 else nn.Conv2d
        self.conv = conv_cls(dim, dim, 3, groups=dim) if conv else None
        self.attn_norm, self.attn = nn.LayerNorm(dim), TokenMix(dim) if attn is None else attn
        self.mlp_norm, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        assert self.conv is not None  # called only when the block has a conv
        h = x.movedim(-1, 1)
        pad = (2, 0) if self.causal else (1, 1) * self.ndim
        return self.conv(F.pad(h, pad)).movedim(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            assert self.conv_norm is not None  # made with the conv
            x = x + self._conv(self.conv_norm(x))
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def _layer(attention: AttentionFactory | None, dim: int, num_heads: int) -> nn.Module | None:
    if attention is None:
        return None
    layer = attention(dim, num_heads)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"attention factory must return an nn.Module, got {type(layer).__name__}")
    return layer


class SeqModel(nn.Module):
    """``SeqModel(vocab_size, num_classes, dim, depth, num_heads, attention, causal, conv=True)``: tokens
    ``(B, L)`` -> logits ``(B, L, num_classes)``. Positions come from the conv and the attention layer (RoPE in
    the controls); there is no absolute position embedding. "cls" tasks read position 0 (the CLS token)."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int, depth: int, num_heads: int,
                 attention: AttentionFactory | None, causal: bool, conv: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(BackboneBlock(dim, _layer(attention, dim, num_heads), 1, causal, conv)
                                    for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``(B, L, dim)``; the head is applied only where a target is scored."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))


class ImageModel(nn.Module):
    """``ImageModel(levels, num_classes, grid, dim, depth, num_heads, attention, conv=True)``: pixel levels
    ``(B, H, W)`` -> logits ``(B, num_classes)``: a level embedding plus a learned 2D position embedding, pre-norm
    blocks of [3x3 depthwise conv -> 2D attention on ``(B, H, W, dim)`` -> MLP], mean pooling, a linear head."""

    def __init__(self, levels: int, num_classes: int, grid: tuple[int, int], dim: int, depth: int, num_heads: int,
                 attention: AttentionFactory | None, conv: bool = True):
        super().__init__()
        self.embed = nn.Embedding(levels, dim)
        self.pos = nn.Parameter(torch.randn(*grid, dim) * 0.02)
        self.blocks = nn.ModuleList(BackboneBlock(dim, _layer(attention, dim, num_heads), 2, False, conv)
                                    for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``(B, H, W, dim)``, for tasks scored per pixel."""
        x = self.embed(pixels) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean(dim=(1, 2)))


def build_model(task: Task, attention: AttentionFactory | None, dim: int, depth: int, num_heads: int,
                conv: bool = True) -> nn.Module:
    """The shared backbone for ``task`` with ``attention`` (a factory, or None for the no-attention control)."""
    task = check_task(task)
    dim, depth = check_positive_int(dim, "dim"), check_positive_int(depth, "depth")
    num_heads = check_positive_int(num_heads, "num_heads")
    check_dim_heads(dim, num_heads)
    if attention is not None and not callable(attention):
        raise TypeError(f"attention must be a factory (dim, num_heads) -> nn.Module or None, got {attention!r}")
    check_bool(conv, "conv")
    if task.kind == "2d":
        if len(task.grid) != 2:
            raise ValueError(f"a '2d' task needs grid (H, W), got {task.grid!r}")
        h, w = task.grid
        return ImageModel(task.vocab_size, task.num_classes, (h, w), dim, depth, num_heads, attention, conv)
    return SeqModel(task.vocab_size, task.num_classes, dim, depth, num_heads, attention, task.pattern == "CS", conv)
