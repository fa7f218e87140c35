"""timm's model-level conventions, written once for every vision backbone here: ``forward`` as
``forward_head(forward_features(x))``, the stage loop of ``forward_intermediates``, and the classifier API
(``get_classifier``, ``reset_classifier``, ``forward_head``) of the two head layouts the backbones use:

- ``HeadModuleBackbone``: ``head`` is timm's ``ClassifierHead`` or ``NormMlpClassifierHead`` (``parts``) with the
  classifier at ``head.fc`` (Swin, MaxViT, GC ViT: timm's ``swin_transformer.py``, ``maxxvit.py``, ``gcvit.py``);
- ``LinearHeadBackbone``: ``head`` is the Linear itself, after ``head_drop`` and an optional average pool (the
  official BiFormer and NAT checkpoints' layout).

They mirror the methods of timm's models (https://github.com/huggingface/pytorch-image-models). The classes hold
methods only, no modules or parameters, so each model's module tree and state-dict keys stay its own. Our choice
beyond timm's: ``reset_classifier`` puts the new classifier on the device of the model's parameters (timm's stays
on the default device)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...checks import check_choice, check_nonneg_int
from .parts import ClassifierHead, NormMlpClassifierHead, feature_take_indices

__all__ = ["Backbone", "HeadModuleBackbone", "LinearHeadBackbone", "PlainStagesBackbone", "run_stages"]

Emit = Callable[[int, torch.Tensor], torch.Tensor]


def run_stages(x: torch.Tensor, stages: Sequence[Callable[[torch.Tensor], torch.Tensor]],
               indices: int | Sequence[int] | None, stop_early: bool, emit: Emit | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
    """The loop of timm's ``forward_intermediates``: run ``stages`` in order and keep ``emit(i, output)`` of those
    ``indices`` selects (``feature_take_indices``); with ``stop_early``, stop after the last selected one.

    Returns:
        The last output, the kept maps, and whether every stage ran (then the final norm applies).
    """
    take, last = feature_take_indices(len(stages), indices)
    run = stages[:last + 1] if stop_early else stages
    out = []
    for i, stage in enumerate(run):
        x = stage(x)
        if i in take:
            out.append(x if emit is None else emit(i, x))
    return x, out, len(run) == len(stages)


class Backbone(nn.Module):
    """``forward(x) = forward_head(forward_features(x))``, timm's split of every classifier."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, in_chans, H, W)`` (the pooled features without classes)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in every stage that has it (a ``grad_checkpointing`` flag).

        Raises:
            ValueError: ``enable`` on a model none of whose stages checkpoints (timm asserts the same).
        """
        # Any: the flag is a plain attribute of the stage modules, not declared on nn.Module
        stages: list[Any] = [m for m in self.modules() if hasattr(m, "grad_checkpointing") and m is not self]
        if enable and not stages:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        for m in stages:
            m.grad_checkpointing = enable

    def _follow_device(self, module: nn.Module) -> None:
        """Move a newly built head ``module`` to the device of the model's parameters."""
        param = next(self.parameters(), None)
        if param is not None:
            module.to(param.device)


class HeadModuleBackbone(Backbone):
    """The classifier API of a model whose ``head`` is a ``ClassifierHead`` or ``NormMlpClassifierHead``."""

    head: ClassifierHead | NormMlpClassifierHead
    num_classes: int
    global_pool: str
    head_hidden_size: int

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative-position bias tables (timm's list for these models)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final classifier (``head.fc``; Identity when ``num_classes=0``)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """A new classifier for ``num_classes`` (0: none) and, if given, a new ``global_pool``; ``reset_other`` also
        drops a ``NormMlpClassifierHead``'s norm and pre-logits MLP (a ``ClassifierHead`` has neither)."""
        if isinstance(self.head, NormMlpClassifierHead):
            self.head.reset(num_classes, global_pool, reset_other)
        else:
            self.head.reset(num_classes, global_pool)
        self._follow_device(self.head)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head_hidden_size = self.head.num_features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (and classify unless ``pre_logits``) the output of ``forward_features``."""
        return self.head(x, pre_logits=pre_logits)


class PlainStagesBackbone(Backbone):
    """``forward_features`` and ``forward_intermediates`` of a model whose features are its ``stages`` run on the
    output of its stem (``embed``), without a final norm (timm's GC ViT and SHViT)."""

    stages: nn.Sequential

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map ``(B, num_features, h, w)``."""
        return self.stages(self.embed(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", norm: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the stage outputs at ``indices`` (the last ``n`` if an int, all if
        None), NCHW; with the final map unless ``intermediates_only`` (``norm`` has nothing to apply)."""
        check_choice(output_fmt, "output_fmt", ("NCHW",))
        x, out, _ = run_stages(self.embed(x), list(self.stages), indices, stop_early)
        return out if intermediates_only else (x, out)


class LinearHeadBackbone(Backbone):
    """The classifier API of a model whose ``head`` is a bare Linear after ``head_drop`` and an average pool over
    ``pool_dims`` (``global_pool="avg"``) or none (``""``)."""

    POOLS = ("avg", "")
    pool_dims: tuple[int, int]
    head: nn.Module
    head_drop: nn.Module
    num_features: int
    num_classes: int
    global_pool: str

    def get_classifier(self) -> nn.Module:
        """The final Linear (``head``; Identity when ``num_classes=0``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new Linear for ``num_classes`` (0: none) and, if given, a new ``global_pool``."""
        check_nonneg_int(num_classes, "num_classes")
        if global_pool is not None:
            self.global_pool = check_choice(global_pool, "global_pool", self.POOLS)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._follow_device(self.head)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``forward_features``' map -> logits (or the pooled features with ``pre_logits=True``)."""
        if self.global_pool == "avg":
            x = x.mean(self.pool_dims)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)
