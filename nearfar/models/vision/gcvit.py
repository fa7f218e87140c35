"""GC ViT backbones (``nearfar_gcvit_xxtiny``) built from nearfar's GC ViT layers, with timm's names and conventions.

Paper: Hatamizadeh, Yin, Heinrich, Kautz and Molchanov, "Global Context Vision Transformers" (ICML 2023,
arXiv:2206.09959). Official code: NVlabs/GCVit ``models/gc_vit.py`` (``GCViT``, ``GCViTLayer``, ``GCViTBlock``,
``PatchEmbed``, ``ReduceSize``, ``GlobalQueryGen``). timm's port: ``timm/models/gcvit.py`` (``GlobalContextVit``,
``GlobalContextVitStage``, ``GlobalContextVitBlock``, ``Stem``, ``Downsample2d``), whose parameter names these
models use, so a timm ``gcvit_*`` state dict loads strictly and gives the same logits.

Structure (timm's): ``stem`` (3x3 stride-2 conv, then ``Downsample2d``: LayerNorm2d, MBConv with SE, 3x3 stride-2
conv, LayerNorm2d) -> four ``stages`` (``downsample`` from the second on; ``global_block``, the query generator run
once per stage on its input; ``blocks`` alternating the local window attention, ``GCViTWindowAttention``, and the
global-query window attention, ``GlobalQueryAttention`` fed the stage's query map; ``norm`` after the last) ->
``head`` (pool, dropout, ``fc``). Stages hand NCHW maps to each other (``features_only`` gives NCHW, as timm's);
the blocks run channel-last. The attention itself is nearfar's: whole windows attend as a batch
(``nearfar.functional.WindowBatch``) with the relative-position bias added inside the score product.

What differs from timm's and the official code: no attention-probability or projection dropout inside the
attention (``attn_drop_rate`` / ``proj_drop_rate`` other than 0 raise; drop path and head dropout are supported);
an input whose stage maps are not whole multiples of the windows still runs (nearfar's masked edge windows, and the
global queries bicubic-resized to the window, as NVlabs' detection code) where timm fails; no gradient
checkpointing, no ``weight_init`` schemes (timm's default: torch's initialisation, trunc-normal bias tables), no
``global_norm``. NVlabs checkpoints need timm's key renaming (``timm.models.gcvit`` loads them that way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import (
    check_choice,
    check_int_range,
    check_pair,
    check_per_axis,
    check_positive_int,
    check_real_range,
)
from ...layers.gcvit import FeatureBlock, GCViTWindowAttention, GlobalQueryAttention, MbConvBlock
from .backbone import HeadModuleBackbone, PlainStagesBackbone
from .parts import POOLS, ClassifierHead, LayerNorm2d, LayerScale, Mlp, drop_path_or_identity
from .spec import BackboneSpec, register_backbone

__all__ = ["GlobalContextViT"]

def _per_stage(value: object, n: int, name: str) -> tuple[int, ...]:
    """One positive int per stage (an int is used for every stage)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per stage ({n}), got {len(value)}: {value!r}")
        return tuple(check_positive_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    return (check_positive_int(value, name),) * n


class Downsample2d(nn.Module):
    """timm ``Downsample2d`` (NVlabs ``ReduceSize``): LayerNorm2d, MBConv, 3x3 stride-2 conv, LayerNorm2d."""

    def __init__(self, dim: int, dim_out: int, eps: float):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=eps)
        self.conv_block = MbConvBlock(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = LayerNorm2d(dim_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


class Stem(nn.Module):
    """timm ``Stem`` (NVlabs ``PatchEmbed``): 3x3 stride-2 conv to ``out_chs``, then ``Downsample2d`` (stride 4)."""

    def __init__(self, in_chs: int, out_chs: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, 2, 1)
        self.down = Downsample2d(out_chs, out_chs, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv1(x))


class GlobalContextViTBlock(nn.Module):
    """One block, channel-last: ``x + attn(norm1(x)[, q_global])``, then ``x + mlp(norm2(x))`` (timm
    ``GlobalContextVitBlock``); ``attn`` is ``GCViTWindowAttention`` (local) or ``GlobalQueryAttention``."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], use_global: bool, mlp_ratio: float,
                 qkv_bias: bool, layer_scale: float | None, proj_drop: float, drop_path: float, eps: float):
        super().__init__()
        self.use_global = use_global
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn: nn.Module = (
            GlobalQueryAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, query_generator=False)
            if use_global else GCViTWindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn(y, q_global) if self.use_global else self.attn(y)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GlobalContextViTStage(nn.Module):
    """timm ``GlobalContextVitStage``: NCHW in and out; ``downsample``, the query map ``global_block(x)`` (once),
    the blocks channel-last, ``norm`` (last stage)."""

    def __init__(self, dim: int, depth: int, num_heads: int, feat_size: tuple[int, int],
                 window_size: tuple[int, int], downsample: bool, stage_norm: bool, mlp_ratio: float, qkv_bias: bool,
                 layer_scale: float | None, proj_drop: float, drop_path: Sequence[float], eps: float):
        super().__init__()
        if downsample:
            self.downsample: nn.Module = Downsample2d(dim, 2 * dim, eps)
            dim, feat_size = 2 * dim, (feat_size[0] // 2, feat_size[1] // 2)
        else:
            self.downsample = nn.Identity()
        self.dim, self.feat_size, self.window_size = dim, feat_size, window_size
        levels = int(math.log2(min(feat_size) / min(window_size))) if min(feat_size) > 0 else 0
        self.global_block = FeatureBlock(dim, max(0, levels))
        self.blocks = nn.ModuleList(GlobalContextViTBlock(
            dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias, layer_scale, proj_drop, drop_path[i], eps)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps) if stage_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        q = self.global_block(x)
        if tuple(q.shape[2:]) != self.window_size:  # an input size the windows do not divide (detection code)
            q = F.interpolate(q, size=self.window_size, mode="bicubic")
        q = q.permute(0, 2, 3, 1)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x, q)
        return self.norm(x).permute(0, 3, 1, 2).contiguous()


class GlobalContextViT(HeadModuleBackbone, PlainStagesBackbone):
    """GC ViT (timm ``GlobalContextVit``) on nearfar's GC ViT attention layers; timm's parameter names.

    Args:
        in_chans: Input channels (default 3).
        num_classes: Classes; 0: no classifier (``forward`` returns the pooled features).
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""`` (no pooling).
        img_size: Input size (int or pair, default 224): sets each stage's window (``img_size // window_ratio``)
            and the depth of its query generator.
        window_ratio: Per stage, the input size over the window size (default (32, 32, 16, 32)).
        window_size: Per-stage windows (int or per-stage sequence), overriding ``window_ratio``.
        embed_dim: Channels of the first stage (default 64; doubled by each later stage).
        depths: Blocks per stage (default (3, 4, 19, 5)).
        num_heads: Heads per stage (default (2, 4, 8, 16)).
        mlp_ratio: MLP hidden width over the channels (default 3).
        qkv_bias: Bias on the q/k/v projections (default True).
        layer_scale: Initial LayerScale (None, default: no LayerScale).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after the MLP layers.
        attn_drop_rate: Must be 0 (nearfar's engines never form the attention probabilities).
        drop_path_rate: Stochastic depth, rising linearly over the blocks up to this rate.
        norm_eps: LayerNorm epsilon (default 1e-5).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range (the message names it); ``attn_drop_rate`` != 0.

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> model = create_backbone("nearfar_gcvit_xxtiny", img_size=64, depths=(1, 2, 1, 1), num_classes=5)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 img_size: int | Sequence[int] = 224, window_ratio: int | Sequence[int] = (32, 32, 16, 32),
                 window_size: int | Sequence[Any] | None = None, embed_dim: int = 64,
                 depths: Sequence[int] = (3, 4, 19, 5), num_heads: Sequence[int] = (2, 4, 8, 16),
                 mlp_ratio: float = 3.0, qkv_bias: bool = True, layer_scale: float | None = None,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        in_chans, embed_dim = check_positive_int(in_chans, "in_chans"), check_positive_int(embed_dim, "embed_dim")
        num_classes = check_int_range(num_classes, "num_classes", 0, 2**31)
        check_choice(global_pool, "global_pool", POOLS)
        size = check_per_axis(img_size, 2, "img_size")
        if not isinstance(depths, Sequence) or not depths:
            raise TypeError(f"depths must be a non-empty sequence of ints (blocks per stage), got {depths!r}")
        n = len(depths)
        depths = _per_stage(depths, n, "depths")
        heads = _per_stage(num_heads, n, "num_heads")
        check_real_range(mlp_ratio, "mlp_ratio", 0.0, math.inf, open_low=True)
        for v, name in ((drop_rate, "drop_rate"), (proj_drop_rate, "proj_drop_rate"),
                        (drop_path_rate, "drop_path_rate")):
            check_real_range(v, name, 0.0, 1.0, open_high=True)
        if attn_drop_rate != 0:
            raise ValueError(f"attn_drop_rate must be 0 (nearfar's engines never form the attention "
                             f"probabilities), got {attn_drop_rate}")
        if window_size is not None:
            per_stage = window_size if isinstance(window_size, Sequence) else (window_size,) * n
            if len(per_stage) != n:
                raise ValueError(f"window_size must be an int or {n} entries (one per stage), got {window_size!r}")
            windows = [check_pair(w, "window_size") for w in per_stage]
        else:
            ratios = _per_stage(window_ratio, n, "window_ratio")
            windows = [(max(1, size[0] // r), max(1, size[1] // r)) for r in ratios]
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (n - 1)
        self.stem = Stem(in_chans, embed_dim, norm_eps)
        feat = (size[0] // 4, size[1] // 4)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(depths)
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        for i in range(n):
            s = 2 ** max(i - 1, 0)
            stages.append(GlobalContextViTStage(
                embed_dim * s, depths[i], heads[i], (feat[0] // s, feat[1] // s), windows[i], i != 0, i == n - 1,
                mlp_ratio, qkv_bias, layer_scale, proj_drop_rate, rates[i].tolist(), norm_eps))
            self.feature_info.append(dict(num_chs=stages[-1].dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NCHW")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: ``(B, C, H, W)`` -> the first stage's input map."""
        return self.stem(x)


_CFG = dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
            first_conv="stem.conv1", classifier="head.fc", fixed_input_size=True, paper_ids="arXiv:2206.09959",
            paper_name="Global Context Vision Transformers", origin_url="https://github.com/NVlabs/GCVit")
_FEATURES = dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)

register_backbone(BackboneSpec(
    name="nearfar_gcvit_xxtiny", cls=GlobalContextViT, kwargs=dict(depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
    timm_name="gcvit_xxtiny", feature_cfg=_FEATURES, cfg=_CFG))
