"""Building blocks of timm's vision models, written with timm's module and parameter names so that timm state dicts
load into the nearfar backbones unchanged: stochastic depth and its per-stage rates, LayerScale, the MLP, the
initialisations, timm's ``forward_intermediates`` index rule, the classifier heads (``ClassifierHead``,
``NormMlpClassifierHead``), TensorFlow "SAME" convolutions, BatchNorm + activation, the channel LayerNorm of NCHW
maps and squeeze-excitation. Each mirrors the timm layer of the same name (``timm/layers/``: ``drop.py``,
``layer_scale.py``, ``mlp.py``, ``weight_init.py``, ``classifier.py``, ``conv2d_same.py``, ``padding.py``,
``norm_act.py``, ``norm.py``, ``squeeze_excite.py``; ``timm/models/_features.py``;
https://github.com/huggingface/pytorch-image-models) in the configurations the backbones use; they differ from
timm's in the options they leave out (e.g. no fast-norm or scripted paths, no convolution heads beside
``NormMlpClassifierHead``'s)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...checks import check_choice, check_nonneg_int, check_real_range

__all__ = ["GELU_TANH", "POOLS", "BatchNormAct2d", "ClassifierHead", "Conv2dSame", "DropPath", "LayerNorm2d",
           "LayerScale", "Mlp", "NormMlpClassifierHead", "SEModule", "conv_same", "drop_path_or_identity",
           "drop_path_rates", "feature_take_indices", "global_pool", "init_vit_weights", "init_vit_weights_and_norms",
           "run_blocks", "same_pad"]

POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates growing linearly from 0 to ``rate`` over all blocks, split per stage (timm's
    ``calculate_drop_path_rates(rate, depths, stagewise=True)``)."""
    return [x.tolist() for x in torch.linspace(0, rate, sum(depths)).split(list(depths))]


def init_vit_weights(module: nn.Module) -> None:
    """timm's ViT init for Linears (truncated normal, std 0.02, zero bias); other modules keep their own."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_vit_weights_and_norms(module: nn.Module) -> None:
    """``init_vit_weights``, and LayerNorms reset to weight 1, bias 0 (the official BiFormer and NAT inits)."""
    init_vit_weights(module)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def feature_take_indices(num: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's rule for ``forward_intermediates(indices=...)``: None = all ``num``, an int ``n`` = the last ``n``,
    a sequence = those (negative from the end). Returns the absolute indices and the largest one.

    Raises:
        ValueError: An int outside ``1..num`` or an index outside ``-num..num-1``.
    """
    if indices is None:
        indices = num
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f"indices={indices} (take the last n) must be in 1..{num}")
        take = list(range(num - indices, num))
    else:
        take = []
        for i in indices:
            if not -num <= i < num:
                raise ValueError(f"feature index {i} is out of range for {num} features")
            take.append(i % num)
    if not take:
        raise ValueError("indices must select at least one feature")
    return take, max(take)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``drop_prob`` and scale the
    kept ones by ``1 / (1 - drop_prob)`` (timm's ``DropPath``); the identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = check_real_range(drop_prob, "drop_prob", 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if keep > 0 else mask)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``blocks(x)``; with ``checkpointing`` (timm's ``set_grad_checkpointing``) and autograd on, each block
    recomputes its activations in the backward pass instead of keeping them."""
    if checkpointing and torch.is_grad_enabled():
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x
    return blocks(x)


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class LayerScale(nn.Module):
    """timm's ``LayerScale``: ``x * gamma`` over the last axis, ``gamma`` initialised to ``init``."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's ``Mlp``: ``drop2(fc2(drop1(act(fc1(x)))))`` over the last axis (GELU by default). The dropouts are
    identities at ``drop=0``; neither holds state, so the state dict is timm's."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: Callable[[], nn.Module] = nn.GELU,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = act()
        self.drop1: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, out or dim, bias=bias)
        self.drop2: nn.Module = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def global_pool(x: torch.Tensor, pool: str, dims: tuple[int, int]) -> torch.Tensor:
    """timm's ``SelectAdaptivePool2d`` to one vector per image, over the spatial ``dims``."""
    if pool == "avg":
        return x.mean(dims)
    if pool == "max":
        return x.amax(dims)
    if pool == "avgmax":
        return 0.5 * (x.mean(dims) + x.amax(dims))
    if pool == "catavgmax":
        return torch.cat([x.mean(dims), x.amax(dims)], dim=-1)
    return x


class ClassifierHead(nn.Module):
    """timm's ``ClassifierHead``: global pooling (``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""``:
    none), dropout, ``fc`` (a Linear, or the identity with ``num_classes=0``). ``input_fmt`` is ``"NHWC"`` or
    ``"NCHW"``."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 input_fmt: str = "NHWC"):
        super().__init__()
        self.in_features, self.input_fmt = in_features, check_choice(input_fmt, "input_fmt", ("NHWC", "NCHW"))
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none), and a new pooling when ``pool_type`` is given."""
        check_nonneg_int(num_classes, "num_classes")
        if pool_type is not None:
            self.pool_type = check_choice(pool_type, "global_pool", POOLS)
        self.num_features = self.in_features * (2 if self.pool_type == "catavgmax" else 1)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(global_pool(x, self.pool_type, (1, 2) if self.input_fmt == "NHWC" else (2, 3)))
        return x if pre_logits else self.fc(x)


GELU_TANH = partial(nn.GELU, approximate="tanh")


def same_pad(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """TensorFlow's "SAME" padding: the total ``max((ceil(n/s) - 1) s + k - n, 0)`` per axis, the larger half after."""
    pads = []
    for n, k, s in zip(reversed(x.shape[-2:]), reversed(kernel), reversed(stride)):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class Conv2dSame(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's "SAME" padding computed per input (timm's ``Conv2dSame``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = same_pad(x, self.kernel_size, self.stride)  # type: ignore[arg-type]
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_same(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """timm's ``create_conv2d(..., padding="same")``: static padding where it is symmetric (stride 1, odd kernel),
    else ``Conv2dSame``."""
    if stride == 1 and kernel % 2:
        return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
    return Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation (timm's ``BatchNormAct2d``; the state dict is BatchNorm2d's)."""

    def __init__(self, channels: int, eps: float = 1e-3, act: Callable[[], nn.Module] | None = GELU_TANH):
        super().__init__(channels, eps=eps)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class SEModule(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc2(silu(fc1(mean(x)))))`` (timm's ``SEModule``)."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class NormMlpClassifierHead(nn.Module):
    """timm's ``NormMlpClassifierHead``: global pooling (``"avg"``, ``"max"``, ``"avgmax"``; ``""``: none, then the
    Linears are 1x1 convolutions), LayerNorm, ``pre_logits`` (``fc`` + tanh), dropout, ``fc``."""

    def __init__(self, in_features: int, num_classes: int, hidden_size: int, pool_type: str = "avg",
                 drop_rate: float = 0.0):
        super().__init__()
        self.in_features, self.hidden_size = in_features, hidden_size
        self.pool_type = check_choice(pool_type, "global_pool", ("avg", "max", "avgmax", ""))
        self.norm: nn.Module = LayerNorm2d(in_features, eps=1e-5)
        linear = self._linear()
        self.pre_logits: nn.Module = nn.Sequential()
        self.pre_logits.add_module("fc", linear(in_features, hidden_size))
        self.pre_logits.add_module("act", nn.Tanh())
        self.num_features = hidden_size
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def _linear(self) -> Callable[[int, int], nn.Conv2d | nn.Linear]:
        return partial(nn.Conv2d, kernel_size=1) if not self.pool_type else nn.Linear

    def reset(self, num_classes: int, pool_type: str | None = None, reset_other: bool = False) -> None:
        """A new ``fc`` for ``num_classes`` (0: none); a new pooling if given; ``reset_other`` drops the norm and
        ``pre_logits``."""
        check_nonneg_int(num_classes, "num_classes")
        if pool_type is not None:
            self.pool_type = check_choice(pool_type, "global_pool", ("avg", "max", "avgmax", ""))
        if reset_other:
            self.norm, self.pre_logits, self.num_features = nn.Identity(), nn.Identity(), self.in_features
        linear = self._linear()
        fc = getattr(self.pre_logits, "fc", None)
        if fc is not None and isinstance(fc, nn.Conv2d) != (not self.pool_type):  # Linear <-> 1x1 convolution
            new = linear(self.in_features, self.hidden_size)
            with torch.no_grad():
                new.weight.copy_(fc.weight.reshape(new.weight.shape))
                if new.bias is not None:
                    new.bias.copy_(fc.bias)
            self.pre_logits.fc = new
        self.fc = linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type:
            x = global_pool(x, self.pool_type, (2, 3))[..., None, None]
        x = self.norm(x)
        x = self.drop(self.pre_logits(x.flatten(1) if self.pool_type else x))
        return x if pre_logits else self.fc(x)
