"""SHViT backbones (``nearfar_shvit_s1``) built on nearfar's single-head attention layer, with timm's names.

Paper: Yun and Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design" (CVPR 2024,
arXiv:2401.16456). Official code: ysj9909/SHViT ``model/shvit.py`` (``SHViT``, ``BasicBlock``, ``SHSA``,
``PatchMerging``, ``FFN``, ``Conv2d_BN``, ``BN_Linear``). timm's port: ``timm/models/shvit.py`` (``SHViT``,
``StageBlock``, ``BasicBlock``, ``PatchMerging``, ``FFN``, ``Conv2dNorm``, ``NormLinear``), whose parameter and
buffer names these models use, so a timm ``shvit_*`` state dict (BatchNorm running statistics included) loads
strictly and gives the same logits.

Structure (timm's): ``patch_embed`` (four 3x3 stride-2 conv+BN, ReLU between: stride 16) -> three ``stages``
(``downsample`` from the second on: depthwise conv and FFN residuals, ``PatchMerging`` with SE, then again at the
new width; ``blocks`` of depthwise-conv residual, the mixer, FFN residual) -> ``global_pool``, ``flatten``, ``head``
(BatchNorm1d + Linear). The mixer of the attention stages is nearfar's ``SHSA`` (``shvit``): one head over all
tokens on the first ``pdim`` channels. The maps flow NCHW between modules as timm's do, but in channels-last
memory, so each mixer reads its channel-last view without a copy, and the 1x1 conv+BN pairs run as a Linear over
the channels (BatchNorm on the same memory; folded into the Linear in eval mode, as timm's ``fuse()``).

What differs from timm's and the official code: the eval-mode BatchNorm folding (same outputs up to rounding); no
``fuse()`` method (eval mode already computes the fused form), no gradient checkpointing; ``global_pool`` allows
``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (timm's pools that keep the width); ``forward_features`` and the stage
outputs are channels-last tensors in memory (same shapes and values; call ``.contiguous()`` for NCHW memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import check_choice, check_int_range, check_positive_int, check_real_range
from ...layers.shvit import SHSA
from .backbone import PlainStagesBackbone
from .parts import global_pool as pool_map  # the name global_pool is the constructor argument here
from .spec import BackboneSpec, register_backbone

__all__ = ["SHViT"]

POOLS = ("avg", "max", "avgmax", "")
CL = torch.channels_last


class Conv2dNorm(nn.Sequential):
    """timm ``Conv2dNorm``: ``c`` (conv, no bias) then ``bn`` (BatchNorm2d, weight initialised to
    ``bn_weight_init``). A 1x1 conv runs as a Linear over the channels of the channels-last map."""

    c: nn.Conv2d
    bn: nn.BatchNorm2d

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chs))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)
        self.pointwise = kernel_size == 1 and stride == 1 and groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.pointwise:
            w = self.c.weight.flatten(1)
            if bn.training or not bn.track_running_stats:
                return bn(F.linear(x.permute(0, 2, 3, 1), w).permute(0, 3, 1, 2))
            scale, shift = _folded(bn)
            return F.linear(x.permute(0, 2, 3, 1), w * scale[:, None], shift).permute(0, 3, 1, 2)
        y = self.c(x)
        if bn.training or not bn.track_running_stats:
            return bn(y)
        scale, shift = _folded(bn)
        return torch.addcmul(shift[:, None, None], y, scale[:, None, None])


def _folded(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``y * scale + shift``."""
    assert bn.running_var is not None and bn.running_mean is not None and bn.weight is not None
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class Residual(nn.Module):
    """``x + m(x)`` (timm ``Residual``; the branch is ``m``)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class ChannelLastResidual(Residual):
    """``x + m(x)`` for a channel-last layer ``m`` (``(B, H, W, C)``) on an NCHW map held in channels-last memory:
    both permutes are views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """timm ``SEModule(channels, rd_ratio=0.25)``: mean-pool, 1x1 conv (bias), ReLU, 1x1 conv (bias), sigmoid gate."""

    def __init__(self, channels: int):
        super().__init__()
        rd = max(8, int(channels * 0.25 + 4) // 8 * 8)  # timm make_divisible(channels / 4, 8, round_limit=0)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))
        s = F.linear(self.act(F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)), self.fc2.weight.flatten(1),
                     self.fc2.bias)
        return x * s.sigmoid()[:, :, None, None]


class PatchMerging(nn.Module):
    """timm ``PatchMerging``: 1x1 conv to 4x width, ReLU, 3x3 stride-2 depthwise conv, ReLU, SE, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = 4 * dim
        self.conv1 = Conv2dNorm(dim, hid)
        self.act1 = nn.ReLU()
        self.conv2 = Conv2dNorm(hid, hid, 3, 2, 1, groups=hid)
        self.act2 = nn.ReLU()
        self.se = SqueezeExcite(hid)
        self.conv3 = Conv2dNorm(hid, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


class FFN(nn.Module):
    """timm ``FFN``: 1x1 conv+BN, ReLU, 1x1 conv+BN (the last BN's weight starts at 0)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = Conv2dNorm(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = Conv2dNorm(hidden, dim, bn_weight_init=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.act(self.pw1(x)))


def _dw(dim: int, bn_weight_init: float = 1.0) -> Residual:
    return Residual(Conv2dNorm(dim, dim, 3, 1, 1, groups=dim, bn_weight_init=bn_weight_init))


class BasicBlock(nn.Module):
    """timm ``BasicBlock``: depthwise-conv residual, mixer residual (``SHSA``; Identity for ``"i"`` blocks), FFN
    residual."""

    def __init__(self, dim: int, qk_dim: int, pdim: int, kind: str):
        super().__init__()
        self.conv = _dw(dim, 0.0)
        self.mixer: nn.Module = ChannelLastResidual(SHSA(dim, qk_dim, pdim)) if kind == "s" else nn.Identity()
        self.ffn = Residual(FFN(dim, 2 * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.mixer(self.conv(x)))


class StageBlock(nn.Module):
    """timm ``StageBlock``: ``downsample`` (when the width changes) then ``blocks``."""

    def __init__(self, prev_dim: int, dim: int, qk_dim: int, pdim: int, kind: str, depth: int):
        super().__init__()
        self.downsample: nn.Module = nn.Sequential(
            _dw(prev_dim), Residual(FFN(prev_dim, 2 * prev_dim)), PatchMerging(prev_dim, dim),
            _dw(dim), Residual(FFN(dim, 2 * dim))) if prev_dim != dim else nn.Identity()
        self.blocks = nn.Sequential(*(BasicBlock(dim, qk_dim, pdim, kind) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormLinear(nn.Sequential):
    """timm ``NormLinear``: ``bn`` (BatchNorm1d) then ``l`` (Linear, trunc-normal(0.02) init, zero bias)."""

    bn: nn.BatchNorm1d
    l: nn.Linear  # noqa: E741  (timm's name)

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(in_features))
        self.add_module("l", nn.Linear(in_features, out_features))
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        nn.init.constant_(self.l.bias, 0)


class SHViT(PlainStagesBackbone):
    """SHViT (timm ``SHViT``) with nearfar's ``SHSA`` as the mixer; timm's parameter and buffer names.

    Args:
        in_chans: Input channels (default 3).
        num_classes: Classes; 0: no classifier (``forward`` returns the pooled features).
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"`` or ``""`` (no pooling).
        embed_dim: Channels per stage (default (128, 256, 384)); the first must be a multiple of 8 (the stem).
        partial_dim: Attended channels per stage (``pdim``, default (32, 64, 96)).
        qk_dim: Query/key width per stage (default (16, 16, 16)).
        depth: Blocks per stage (default (1, 2, 3)).
        types: Per stage ``"s"`` (single-head attention mixer) or ``"i"`` (none) (default all ``"s"``).
        drop_rate: Dropout before the classifier.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names it).

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> model = create_backbone("nearfar_shvit_s1", num_classes=5).eval()
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 embed_dim: Sequence[int] = (128, 256, 384), partial_dim: Sequence[int] = (32, 64, 96),
                 qk_dim: Sequence[int] = (16, 16, 16), depth: Sequence[int] = (1, 2, 3),
                 types: Sequence[str] = ("s", "s", "s"), drop_rate: float = 0.0):
        super().__init__()
        in_chans = check_positive_int(in_chans, "in_chans")
        num_classes = check_int_range(num_classes, "num_classes", 0, 2**31)
        check_choice(global_pool, "global_pool", POOLS)
        check_real_range(drop_rate, "drop_rate", 0.0, 1.0, open_high=True)
        if not isinstance(embed_dim, Sequence) or not embed_dim:
            raise TypeError(f"embed_dim must be a non-empty sequence of ints (channels per stage), got {embed_dim!r}")
        n = len(embed_dim)
        dims = _per_stage(embed_dim, n, "embed_dim")
        pdims = _per_stage(partial_dim, n, "partial_dim")
        qk = _per_stage(qk_dim, n, "qk_dim")
        depths = _per_stage(depth, n, "depth")
        if not isinstance(types, Sequence) or len(types) != n:
            raise ValueError(f"types must have one entry per stage ({n}), got {types!r}")
        kinds = tuple(check_choice(t, f"types[{i}]", ("s", "i")) for i, t in enumerate(types))
        if dims[0] % 8:
            raise ValueError(f"embed_dim[0] must be a multiple of 8 (the stem widths are /8, /4, /2), got {dims[0]}")
        for i, (d, p) in enumerate(zip(dims, pdims)):
            check_int_range(p, f"partial_dim[{i}]", 1, d)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        stem = dims[0]
        self.patch_embed = nn.Sequential(
            Conv2dNorm(in_chans, stem // 8, 3, 2, 1), nn.ReLU(), Conv2dNorm(stem // 8, stem // 4, 3, 2, 1), nn.ReLU(),
            Conv2dNorm(stem // 4, stem // 2, 3, 2, 1), nn.ReLU(), Conv2dNorm(stem // 2, stem, 3, 2, 1))
        stages, prev = [], stem
        self.feature_info: list[dict[str, Any]] = []
        for i in range(n):
            stages.append(StageBlock(prev, dims[i], qk[i], pdims[i], kinds[i], depths[i]))
            prev = dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=2 ** (i + 4), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = dims[-1]
        self.pool_type = global_pool
        self.head: nn.Module = NormLinear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        """The final Linear (``head.l``; Identity when ``num_classes=0``)."""
        return self.head.l if isinstance(self.head, NormLinear) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head (BatchNorm1d + Linear) for ``num_classes`` (0: none) and, if given, a new pooling."""
        num_classes = check_int_range(num_classes, "num_classes", 0, 2**31)
        if global_pool is not None:
            self.pool_type = check_choice(global_pool, "global_pool", POOLS)
        self.head = NormLinear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self._follow_device(self.head)
        self.head.train(self.training)
        self.num_classes = num_classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional stem (stride 16), in channels-last memory."""
        return self.patch_embed(x.contiguous(memory_format=CL))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (``global_pool``), dropout and classify a ``forward_features`` map (``pre_logits``: stop before
        ``head``)."""
        x = pool_map(x, self.pool_type, (2, 3))
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x
        return x if pre_logits else self.head(x)


def _per_stage(value: object, n: int, name: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(f"{name} must have one entry per stage ({n}), got {value!r}")
    return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(value))


_CFG = dict(input_size=(3, 224, 224), pool_size=(4, 4), crop_pct=0.875, interpolation="bicubic",
            first_conv="patch_embed.0.c", classifier="head.l", paper_ids="arXiv:2401.16456",
            paper_name="SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design",
            origin_url="https://github.com/ysj9909/SHViT")
_FEATURES = dict(out_indices=(0, 1, 2), flatten_sequential=True)

register_backbone(BackboneSpec(
    name="nearfar_shvit_s1", cls=SHViT,
    kwargs=dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68), types=("i", "s", "s")),
    timm_name="shvit_s1", feature_cfg=_FEATURES, cfg=_CFG))
