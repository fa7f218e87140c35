"""NAT and DiNAT image classifiers on nearfar's neighbourhood attention, with the official checkpoints' names.

Papers: Hassani, Walton, Li, Li & Shi, "Neighborhood Attention Transformer" (CVPR 2023, arXiv:2204.07143);
Hassani & Shi, "Dilated Neighborhood Attention Transformer" (arXiv:2209.15001, 2022). Official code:
SHI-Labs/Neighborhood-Attention-Transformer, ``classification/nat.py`` (``NAT``, ``nat_mini``, ``nat_tiny``) and
``classification/dinat.py`` (``DiNAT``: the same model with per-block dilations; ``dinat_mini``, ``dinat_tiny``), whose
attention is NATTEN's ``NeighborhoodAttention2D`` (legacy module, NATTEN <= 0.17). timm has no NAT/DiNAT.

The model is the official one: a two-convolution tokenizer (stride 4), four levels of pre-norm blocks
(neighbourhood attention with a relative-position bias, then an MLP), a 3x3 stride-2 convolution with a LayerNorm
closing every level but the last, a final LayerNorm, average pooling and a linear head. Module and parameter names
are the official ones (``patch_embed.proj.0``, ``levels.0.blocks.0.attn.qkv`` / ``.rpb`` / ``.proj``,
``levels.0.downsample.reduction``, ``norm``, ``head``, ``gamma1``/``gamma2`` with layer scale), so a checkpoint of
``classification/nat.py`` or ``dinat.py`` loads with ``strict=True``. The attention is
``nearfar.layers.NeighborhoodAttention`` (NATTEN's window, dilation and bias semantics). Like NATTEN's module, an
input smaller than ``kernel_size * dilation`` on an axis is zero-padded on the bottom/right up to that size before
the ``qkv`` projection (the padded tokens take part in the attention) and cropped after it, so any input size runs.

What differs from the official code: timm's conventions on top (``forward_features`` returns the normalised
``(B, H, W, C)`` map, pooling happens in ``forward_head``; ``global_pool``, ``reset_classifier``,
``forward_intermediates`` with the per-level feature maps taken before each level's downsampler, as the official
detection backbone ``detection/nat.py`` does, without its extra per-level norms); attention-probability dropout is
not available (``attn_drop_rate`` must be 0); the output-projection dropout is applied after the attention module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import check_choice, check_nonneg_int, check_positive_int, check_real_range
from ...layers import NeighborhoodAttention
from .backbone import LinearHeadBackbone, run_stages
from .parts import Mlp, drop_path_or_identity, feature_take_indices, init_vit_weights_and_norms
from .spec import BackboneSpec, register_backbone

__all__ = ["DiNAT", "NAT", "feature_take_indices"]


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convolutions (``proj.0``, ``proj.1``), then a LayerNorm on ``(B, H/4, W/4, C)``."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_chans, embed_dim // 2, 3, 2, 1),
                                  nn.Conv2d(embed_dim // 2, embed_dim, 3, 2, 1))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsampler(nn.Module):
    """A 3x3 stride-2 convolution ``dim -> 2 dim`` without bias (``reduction``), then a LayerNorm; channel-last."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATLayer(nn.Module):
    """One block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (times ``gamma1``/``gamma2`` with layer scale)."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, drop_path: float, layer_scale: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention(dim, num_heads, kernel_size, dilation=dilation, qkv_bias=qkv_bias,
                                          qk_scale=qk_scale)
        self.window = tuple(k * d for k, d in zip(self.attn.kernel_size, self.attn.dilation))
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale = layer_scale is not None
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        pad_h, pad_w = max(0, self.window[0] - h), max(0, self.window[1] - w)
        if pad_h or pad_w:  # NATTEN's module: zero-pad bottom/right to kernel_size * dilation, crop after
            return self.attn(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)))[:, :h, :w]
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.proj_drop(self._attend(self.norm1(x)))
        x = x + self.drop_path(self.gamma1 * a if self.layer_scale else a)
        m = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma2 * m if self.layer_scale else m)


class NATBlock(nn.Module):
    """One level: ``blocks`` (a ModuleList of ``NATLayer``), then ``downsample`` (None on the last level)."""

    def __init__(self, dim: int, depth: int, dilations: Sequence[int], downsample: bool, drop_path: Sequence[float],
                 **layer: Any):
        super().__init__()
        self.blocks = nn.ModuleList([NATLayer(dim, dilation=dilations[i], drop_path=drop_path[i], **layer)
                                     for i in range(depth)])
        self.downsample: ConvDownsampler | None = ConvDownsampler(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


def _per_block(value: Any, depths: Sequence[int], name: str) -> list[list[int]]:
    if value is None:
        return [[1] * d for d in depths]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != len(depths):
        raise ValueError(f"{name} must be None or one list per level ({len(depths)} levels), got {value!r}")
    out = []
    for i, (level, d) in enumerate(zip(value, depths)):
        if isinstance(level, (str, bytes)) or not isinstance(level, Sequence) or len(level) != d:
            raise ValueError(f"{name}[{i}] must list one dilation per block ({d} blocks), got {level!r}")
        out.append([check_positive_int(v, f"{name}[{i}]") for v in level])
    return out


class NAT(LinearHeadBackbone):
    """The NAT / DiNAT classifier of ``classification/nat.py`` with timm's conventions; input ``(B, C, H, W)``.

    Args:
        embed_dim: Channels of the first level (doubled at each later level), an even positive int.
        mlp_ratio: MLP hidden size over the channels (> 0).
        depths: Blocks per level (each >= 1).
        num_heads: Heads per level (the level's channels must be a multiple).
        drop_path_rate: Largest stochastic-depth rate, reached linearly at the last block, in [0, 1).
        in_chans: Input channels.
        kernel_size: Neighbourhood size (NATTEN: odd, default 7).
        dilations: None (NAT: dilation 1 everywhere) or one list per level with one dilation per block (DiNAT).
        num_classes: Classes of the linear head; 0 makes the head an identity.
        global_pool: ``"avg"`` (default) or ``""`` (no pooling in ``forward_head``).
        qkv_bias: Bias on the attention's ``qkv`` projection.
        qk_scale: Score scale; None: ``head_dim ** -0.5``.
        drop_rate: Dropout after the tokenizer, in the MLP, after the attention and before the head, in [0, 1).
        attn_drop_rate: Attention-probability dropout: only 0 is supported.
        layer_scale: None, or the initial value of the per-channel residual scales ``gamma1``/``gamma2``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range (message names it), ``depths``/``num_heads``/``dilations`` disagree
            on the number of levels or blocks, or ``attn_drop_rate > 0``.

    Examples:
        >>> import torch
        >>> from nearfar.models.vision.nat import NAT
        >>> m = NAT(embed_dim=16, mlp_ratio=2, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], num_classes=5).eval()
        >>> m(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
        >>> [f.shape[1:] for f in m.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)]
        [torch.Size([16, 16, 16]), torch.Size([32, 8, 8]), torch.Size([64, 4, 4]), torch.Size([128, 2, 2])]
    """

    pool_dims = (1, 2)  # forward_features gives (B, H, W, C)

    def __init__(self, embed_dim: int = 64, mlp_ratio: float = 3.0, depths: Sequence[int] = (3, 4, 6, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), drop_path_rate: float = 0.2, in_chans: int = 3,
                 kernel_size: int = 7, dilations: Sequence[Sequence[int]] | None = None, num_classes: int = 1000,
                 global_pool: str = "avg", qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        check_positive_int(embed_dim, "embed_dim")
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (the tokenizer's first convolution has embed_dim // 2 "
                             f"channels), got {embed_dim}")
        check_real_range(mlp_ratio, "mlp_ratio", 0.0, float("inf"), open_low=True)
        depths = [check_positive_int(d, "depths") for d in depths]
        num_heads = [check_positive_int(h, "num_heads") for h in num_heads]
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths and num_heads must give the same (>= 1) number of levels, got {depths} and "
                             f"{num_heads}")
        dilation_lists = _per_block(dilations, depths, "dilations")
        check_real_range(drop_path_rate, "drop_path_rate", 0.0, 1.0, open_high=True)
        check_real_range(drop_rate, "drop_rate", 0.0, 1.0, open_high=True)
        if check_real_range(attn_drop_rate, "attn_drop_rate", 0.0, 1.0, open_high=True) != 0.0:
            raise ValueError("attn_drop_rate must be 0: nearfar's engines never form the attention probabilities")
        check_positive_int(in_chans, "in_chans")
        check_nonneg_int(num_classes, "num_classes")
        self.global_pool = check_choice(global_pool, "global_pool", ("avg", ""))
        self.num_classes = num_classes
        self.num_levels = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (self.num_levels - 1)
        self.drop_rate = drop_rate

        self.patch_embed = ConvTokenizer(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)  # stochastic depth grows linearly from 0 to drop_path_rate over the blocks
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.levels = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            self.levels.append(NATBlock(
                dim, depth, dilation_lists[i], downsample=i < self.num_levels - 1,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], num_heads=num_heads[i], kernel_size=kernel_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, layer_scale=layer_scale))
            self.feature_info.append({"num_chs": dim, "reduction": 4 * 2 ** i, "module": f"levels.{i}"})
        self.norm: nn.Module = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights_and_norms)  # the official init (the bias tables keep NATTEN's own)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"rpb"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, in_chans, H, W)`` -> the normalised last feature map ``(B, H/32, W/32, num_features)``."""
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: each chosen level's output before its downsampler.

        Args:
            x: Image ``(B, in_chans, H, W)``.
            indices: Levels to return: None = all, an int ``n`` = the last ``n``, or a list (negative from the end).
            norm: Apply the final norm to the last level's map.
            stop_early: Stop after the last chosen level.
            output_fmt: ``"NCHW"`` (default) or ``"NHWC"``.
            intermediates_only: Return only the list of maps.

        Returns:
            The list of maps, or ``(forward_features output, maps)``.
        """
        check_choice(output_fmt, "output_fmt", ("NCHW", "NHWC"))
        levels = cast(Sequence[NATBlock], self.levels)

        def level(i: int) -> Callable[[torch.Tensor], torch.Tensor]:  # the previous downsampler, then the blocks
            def run(x: torch.Tensor) -> torch.Tensor:
                down = levels[i - 1].downsample if i > 0 else None
                x = x if down is None else down(x)
                for blk in levels[i].blocks:
                    x = blk(x)
                return x
            return run

        def emit(i: int, y: torch.Tensor) -> torch.Tensor:
            y = self.norm(y) if norm and i == self.num_levels - 1 else y
            return y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y

        x, out, complete = run_stages(self.pos_drop(self.patch_embed(x)), [level(i) for i in range(len(levels))],
                                      indices, stop_early, emit)
        if intermediates_only:
            return out
        if not complete:  # stopped early: the last level run hands on its downsampled map, as in a full forward
            down = levels[feature_take_indices(len(levels), indices)[1]].downsample
            x = x if down is None else down(x)
        return (self.norm(x) if complete else x), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the levels (and norm/head) that ``forward_intermediates(indices)`` does not need; returns the
        absolute indices kept."""
        take, last = feature_take_indices(len(self.levels), indices)
        self.levels = self.levels[:last + 1]
        cast(NATBlock, self.levels[-1]).downsample = None  # its maps are taken before the downsampler
        if prune_norm or last < self.num_levels - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


class DiNAT(NAT):
    """DiNAT (``classification/dinat.py``): NAT with per-block dilations (``dilations``); same arguments as ``NAT``.

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> m = create_backbone("nearfar_dinat_mini", num_classes=10).eval()
        >>> m.levels[0].blocks[1].attn.dilation
        (8, 8)
        >>> m(torch.randn(1, 3, 64, 64)).shape   # maps smaller than kernel_size * dilation are padded, as NATTEN does
        torch.Size([1, 10])
    """


_CFG = {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic", "first_conv": "patch_embed.proj.0",
        "classifier": "head", "license": "mit"}
_MINI = {"depths": (3, 4, 6, 5), "num_heads": (2, 4, 8, 16), "embed_dim": 64, "mlp_ratio": 3.0, "kernel_size": 7,
         "drop_path_rate": 0.2}
_TINY = {**_MINI, "depths": (3, 4, 18, 5)}
_DILATIONS = {"mini": ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 3, (1,) * 5),
              "tiny": ((1, 8, 1), (1, 4, 1, 4), (1, 2) * 9, (1,) * 5)}
_FEATURES = {"feature_cls": "getter", "out_indices": (0, 1, 2, 3)}
for _size, _kw in (("mini", _MINI), ("tiny", _TINY)):
    register_backbone(BackboneSpec(name=f"nearfar_nat_{_size}", cls=NAT, kwargs=_kw, feature_cfg=_FEATURES,
                                   cfg={**_CFG, "paper_ids": "arXiv:2204.07143"}))
    register_backbone(BackboneSpec(name=f"nearfar_dinat_{_size}", cls=DiNAT,
                                   kwargs={**_kw, "dilations": _DILATIONS[_size]}, feature_cfg=_FEATURES,
                                   cfg={**_CFG, "paper_ids": "arXiv:2209.15001"}))
