"""MaxViT (MaxViT-T) as a timm-style backbone whose block and grid attention are nearfar's ``maxvit_*`` layers.

Paper: Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022, arXiv:2204.01697). Official code:
google-research/maxvit ``maxvit/models/maxvit.py`` (``MaxViT``, ``MaxViTBlock``, ``MBConvBlock``, ``SE``,
``TransformerBlock``, ``Attention``). timm's port, whose module tree, names and conventions this file follows:
``timm/models/maxxvit.py`` (``MaxxVit`` with the ``maxvit_tiny_tf`` config: TF-ported weights, "same" padding,
``bias_tf`` relative position tables, GELU-tanh, a norm + MLP classifier head).

Each MaxViT block is an MBConv (pre-norm, 1x1 expansion, depthwise 3x3, squeeze-excitation, 1x1 projection, with a
residual; the first block of a stage strides 2 and pools its shortcut) followed by block (window) attention and
grid attention, each ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on channel-last maps; ``attn`` is
``nearfar.MaxViTAttention`` (partition, attention with the relative position bias, reverse) with timm's
``AttentionCl`` names. The convolutions, norms and heads are plain PyTorch modules under timm's names, so a timm
``maxvit_*_tf`` state dict loads strictly and with the same weights the logits equal timm's (float32, eval).

What differs from timm's code: no attention-probability or projection dropout; the ``_rw`` variants (head-first
``qkv``, timm's own ``RelPosBias``, pooling stride mode), the "mlp" relative position, ConvNeXt blocks, NCHW
attention and the parallel block of ``maxxvit.py`` are not built here, nor ``set_input_size``. The official code
differs from both in the logits it keeps in float32 under mixed precision (nearfar: the input dtype's kernels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import check_choice, check_nonneg_int, check_pair, check_positive_int, check_real_range
from ...layers import MaxViTAttention
from .backbone import HeadModuleBackbone, run_stages
from .parts import (
    GELU_TANH,
    BatchNormAct2d,
    ClassifierHead,
    LayerNorm2d,
    Mlp,
    NormMlpClassifierHead,
    SEModule,
    conv_same,
    drop_path_or_identity,
    drop_path_rates,
    run_blocks,
    same_pad,
)
from .spec import BackboneSpec, register_backbone

__all__ = ["MaxViT", "MaxViTBlock", "MaxViTStage", "MbConvBlock", "PartitionAttention", "Stem"]

class Downsample2d(nn.Module):
    """The shortcut of a strided MBConv: 2x2 average pooling ("SAME"-padded), then a 1x1 expansion if widths differ."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.expand: nn.Module = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.avg_pool2d(same_pad(x, (2, 2), (2, 2)), 2))


class MbConvBlock(nn.Module):
    """MBConv on NCHW maps: pre-norm, 1x1 expansion (x4 the output width), depthwise 3x3 (stride on the first block
    of a stage), squeeze-excitation, 1x1 projection, plus the (pooled) shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        mid = 4 * out_chs
        self.shortcut: nn.Module = Downsample2d(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(in_chs, act=None)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = BatchNormAct2d(mid)
        self.conv2_kxk = conv_same(mid, mid, 3, stride, groups=mid)
        self.norm2 = BatchNormAct2d(mid)
        self.se = SEModule(mid, int(0.25 * out_chs))
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv1_1x1(self.pre_norm(x)))
        y = self.conv3_1x1(self.se(self.norm2(self.conv2_kxk(y))))
        return self.drop_path(y) + self.shortcut(x)


class PartitionAttention(nn.Module):
    """Block or grid attention and an MLP on channel-last maps, each pre-norm with a residual (timm's
    ``PartitionAttentionCl``)."""

    def __init__(self, dim: int, partition_type: str, partition_size: tuple[int, int], dim_head: int = 32,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = MaxViTAttention(dim, partition_type, partition_size, dim_head=dim_head)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, 4 * dim, act=GELU_TANH)
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxViTBlock(nn.Module):
    """MBConv, then block attention and grid attention (channel-last inside, NCHW in and out)."""

    def __init__(self, dim: int, dim_out: int, stride: int, partition_size: tuple[int, int],
                 grid_size: tuple[int, int], dim_head: int = 32, drop_path: float = 0.0):
        super().__init__()
        self.conv = MbConvBlock(dim, dim_out, stride, drop_path)
        self.attn_block = PartitionAttention(dim_out, "block", partition_size, dim_head, drop_path)
        self.attn_grid = PartitionAttention(dim_out, "grid", grid_size, dim_head, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return self.attn_grid(self.attn_block(x)).permute(0, 3, 1, 2)


class MaxViTStage(nn.Module):
    """``depth`` MaxViT blocks, the first strided."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, partition_size: tuple[int, int],
                 grid_size: tuple[int, int], dim_head: int, drop_path: Sequence[float]):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            MaxViTBlock(in_chs if i == 0 else out_chs, out_chs, 2 if i == 0 else 1, partition_size, grid_size,
                        dim_head, drop_path[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, x, self.grad_checkpointing)


class Stem(nn.Module):
    """3x3 stride-2 convolution ("SAME"), BatchNorm + GELU, 3x3 convolution."""

    def __init__(self, in_chs: int, out_chs: int, bias: bool = True):
        super().__init__()
        self.out_chs, self.stride = out_chs, 2
        self.conv1 = conv_same(in_chs, out_chs, 3, 2, bias=bias)
        self.norm1 = BatchNormAct2d(out_chs)
        self.conv2 = conv_same(out_chs, out_chs, 3, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x)))


def _init_weights(model: nn.Module) -> None:
    """timm's ``vit_eff`` scheme: convolutions of the stem and MBConvs normal(0, sqrt(2 / fan_out)), attention and
    MLP Linears Xavier-uniform (MLP biases normal(0, 1e-6)), zero biases."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not name.startswith("head"):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.Linear) and not name.startswith("head"):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None and ".mlp." in name:
                nn.init.normal_(m.bias, std=1e-6)
                continue
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MaxViT(HeadModuleBackbone):
    """MaxViT with timm's conventions; ``nearfar_maxvit_tiny_tf_224`` is MaxViT-T (timm's ``maxvit_tiny_tf_224``).

    Args:
        img_size: Input size (an int or ``(H, W)``); the window and grid are ``img_size // 32`` (default 224: 7).
        in_chans: Input channels (default 3).
        num_classes: Classes; 0: none (``forward`` returns the pre-logits features).
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"`` or ``""`` (no pooling).
        drop_rate: Dropout before the classifier (default 0).
        drop_path_rate: Largest stochastic-depth rate, reached at the last stage (default 0, timm's).
        embed_dim: Width of each stage (default ``(64, 128, 256, 512)``), multiples of the head dim.
        depths: MaxViT blocks per stage (default ``(2, 2, 5, 2)``).
        stem_width: Stem width (default 64).
        stem_bias: Biases on the stem convolutions (default True).
        head_hidden_size: Width of the head's ``pre_logits`` (default 512); None: LayerNorm + a linear head.
        **kwargs: timm's overlays ``transformer_dim_head`` (default 32), ``transformer_window_size``,
            ``transformer_grid_size``, ``transformer_partition_ratio`` (default 32); dropout options at 0 only.

    Raises:
        TypeError: A size or count is not an int.
        ValueError: Sizes out of range; ``embed_dim`` and ``depths`` of different lengths; an unknown
            ``global_pool``; non-zero attention/projection dropout; an unknown keyword.

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> m = create_backbone("nearfar_maxvit_tiny_tf_224", img_size=64, embed_dim=(32, 32, 64, 64),
        ...                     depths=(1, 1, 1, 1), stem_width=16, head_hidden_size=64, num_classes=5).eval()
        >>> m(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
        >>> m.forward_features(torch.randn(2, 3, 64, 64)).shape     # NCHW, as timm's
        torch.Size([2, 64, 2, 2])
    """

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 embed_dim: Sequence[int] = (64, 128, 256, 512), depths: Sequence[int] = (2, 2, 5, 2),
                 stem_width: int = 64, stem_bias: bool = True, head_hidden_size: int | None = 512, **kwargs: Any):
        super().__init__()
        for name in ("transformer_attn_drop", "transformer_proj_drop"):
            if kwargs.pop(name, 0.0):
                raise ValueError(f"{name} > 0 is not supported (nearfar's attention forms no probabilities to drop)")
        img = check_pair(img_size, "img_size")
        ratio = check_positive_int(kwargs.pop("transformer_partition_ratio", 32), "transformer_partition_ratio")
        default = (max(1, img[0] // ratio), max(1, img[1] // ratio))
        window = kwargs.pop("transformer_window_size", None)
        window = check_pair(default if window is None else window, "transformer_window_size")
        grid = kwargs.pop("transformer_grid_size", None)
        grid = check_pair(window if grid is None else grid, "transformer_grid_size")
        dim_head = check_positive_int(kwargs.pop("transformer_dim_head", 32), "transformer_dim_head")
        if kwargs:
            raise ValueError(f"unknown arguments: {sorted(kwargs)}")
        embed_dim, depths = tuple(embed_dim), tuple(depths)
        if not depths or len(embed_dim) != len(depths):
            raise ValueError(f"embed_dim {embed_dim} and depths {depths} must be non-empty and of equal length")
        for d, w in zip(depths, embed_dim):
            check_positive_int(d, "depths[i]")
            if check_positive_int(w, "embed_dim[i]") % dim_head:
                raise ValueError(f"embed_dim entries must be multiples of the head dim {dim_head}, got {w}")
        check_real_range(drop_path_rate, "drop_path_rate", 0.0, 1.0)
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.img_size, self.window_size, self.grid_size = img, window, grid
        self.num_features = self.embed_dim = embed_dim[-1]
        self.stem = Stem(check_positive_int(in_chans, "in_chans"), check_positive_int(stem_width, "stem_width"),
                         stem_bias)
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=stem_width, reduction=2, module="stem")]
        rates = drop_path_rates(drop_path_rate, depths)
        stages, in_chs, stride = [], stem_width, 2
        for i, (d, w) in enumerate(zip(depths, embed_dim)):
            stages.append(MaxViTStage(in_chs, w, d, window, grid, dim_head, rates[i]))
            in_chs, stride = w, stride * 2
            self.feature_info.append(dict(num_chs=w, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        check_nonneg_int(num_classes, "num_classes")
        self.head: NormMlpClassifierHead | ClassifierHead
        if head_hidden_size:
            self.norm: nn.Module = nn.Identity()
            self.head = NormMlpClassifierHead(self.num_features, num_classes, head_hidden_size, global_pool,
                                              drop_rate)
        else:
            self.norm = LayerNorm2d(self.num_features, eps=1e-5)
            self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NCHW")
        self.head_hidden_size = self.head.num_features
        _init_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem (index 0) and stage outputs (1, 2, ...) ``indices`` (None: all; an int n: the last n) as NCHW
        maps, and the final features (timm's ``forward_intermediates``)."""
        check_choice(output_fmt, "output_fmt", ("NCHW",))
        n = len(self.stages) + 1

        def emit(i: int, y: torch.Tensor) -> torch.Tensor:
            return self.norm(y) if norm and i == n - 1 else y

        x, out, complete = run_stages(x, [self.stem, *self.stages], indices, stop_early, emit)
        return out if intermediates_only else ((self.norm(x) if complete else x), out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the last stage's map ``(B, num_features, H/32, W/32)`` (NCHW)."""
        return self.norm(self.stages(self.stem(x)))


register_backbone(BackboneSpec(
    name="nearfar_maxvit_tiny_tf_224", cls=MaxViT,
    kwargs=dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64, stem_bias=True,
                head_hidden_size=512),
    timm_name="maxvit_tiny_tf_224", feature_cfg=dict(flatten_sequential=True),
    cfg={"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.95,
         "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
         "first_conv": "stem.conv1", "classifier": "head.fc", "fixed_input_size": True, "license": "apache-2.0",
         "paper_ids": "arXiv:2204.01697"}))
