"""Swin Transformer (Swin-T) as a timm-style backbone whose (shifted-)window attention is nearfar's ``swin`` layer.

Paper: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (ICCV 2021,
arXiv:2103.14030). Official code: microsoft/Swin-Transformer ``models/swin_transformer.py`` (``SwinTransformer``,
``BasicLayer``, ``SwinTransformerBlock``, ``PatchMerging``, ``PatchEmbed``). timm's port, whose module tree, names
and conventions this file follows: ``timm/models/swin_transformer.py`` (``SwinTransformer``, channel-last
``(B, H, W, C)`` stages, the patch merging at the start of stages 1-3, ``feature_info`` on ``layers.i``).

Each block is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; ``attn`` is ``nearfar.WindowAttention`` (cyclic
shift, window partition, attention with the relative position bias and the shifted-window region mask, reverse),
whose parameter names equal timm's ``WindowAttention``. So a timm ``swin_*`` state dict loads strictly, and with
the same weights the logits equal timm's (float32, eval).

What differs from timm's and the official code: the region mask of shifted windows excludes the masked pairs
exactly (timm and the official code add -100 to their logits, which leaves each a weight of about ``e^-100``
relative to the others); on maps not divisible by the window (timm with ``strict_img_size=False``) the padded
positions are left out of the windows instead of taking part as zero-input keys; the window and shift are clipped
per axis to the map (timm's rule) at construction from ``img_size`` and again per call from the actual map; no
attention-probability or projection dropout; ``head_dim`` other than ``dim // num_heads`` and timm's
``set_input_size`` are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...checks import check_choice, check_nonneg_int, check_pair, check_positive_int, check_real_range
from ...layers import WindowAttention
from .backbone import HeadModuleBackbone, run_stages
from .parts import ClassifierHead, Mlp, drop_path_or_identity, drop_path_rates, init_vit_weights, run_blocks
from .spec import BackboneSpec, register_backbone

__all__ = ["PatchEmbed", "PatchMerging", "SwinTransformer", "SwinTransformerBlock", "SwinTransformerStage"]

class PatchEmbed(nn.Module):
    """Patchify ``(B, C, H, W)`` -> ``(B, H/p, W/p, D)``: a stride-``p`` convolution, then LayerNorm (timm's
    ``PatchEmbed`` with ``output_fmt="NHWC"``)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 patch merging ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)``: the 2x2 neighbours
    concatenated in timm's order, LayerNorm, a Linear without bias (odd sizes are zero-padded, as in timm)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim, self.out_dim = dim, out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerBlock(nn.Module):
    """One Swin block on ``(B, H, W, dim)``: (S)W-MSA and an MLP, each pre-norm with a residual.

    The window and shift are timm's: clipped per axis to ``input_resolution`` (an axis no longer than the window
    gets the whole axis and no shift), so the bias table has timm's shape."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        target = check_pair(window_size, "window_size")
        window = tuple(min(r, w) for r, w in zip(input_resolution, target))
        shift = tuple(0 if r <= w else s for r, w, s in zip(input_resolution, window, (shift_size, shift_size)))
        self.dim, self.input_resolution, self.window_size, self.shift_size = dim, input_resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size=window, shift_size=shift, qkv_bias=qkv_bias)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinTransformerStage(nn.Module):
    """A stage: patch merging (stages after the first), then ``depth`` blocks alternating W-MSA and SW-MSA."""

    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int, downsample: bool,
                 num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: Sequence[float] = ()):
        super().__init__()
        self.dim, self.input_resolution = dim, input_resolution
        self.output_resolution: tuple[int, int] = (
            ((input_resolution[0] + 1) // 2, (input_resolution[1] + 1) // 2) if downsample else input_resolution)
        self.grad_checkpointing = False
        if not downsample and dim != out_dim:
            raise ValueError(f"a stage without downsampling keeps its width: dim {dim} != out_dim {out_dim}")
        self.downsample: nn.Module = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, self.output_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias, rates[i])
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        return run_blocks(self.blocks, x, self.grad_checkpointing)


class SwinTransformer(HeadModuleBackbone):
    """Swin Transformer with timm's conventions; ``nearfar_swin_tiny_patch4_window7_224`` is Swin-T.

    Args:
        img_size: Input size (an int or ``(H, W)``) the windows are clipped for (default 224); other sizes run too.
        patch_size: Patch size of the stem (default 4).
        in_chans: Input channels (default 3).
        num_classes: Classes of the linear classifier; 0: none (``forward`` returns the pooled features).
        global_pool: ``"avg"`` (default), ``"max"``, ``"avgmax"``, ``"catavgmax"`` or ``""`` (no pooling).
        embed_dim: Width of the first stage (doubled at each later stage; default 96).
        depths: Blocks per stage (default ``(2, 2, 6, 2)``).
        num_heads: Heads per stage (default ``(3, 6, 12, 24)``).
        window_size: Attention window (default 7); odd blocks shift by ``window_size // 2``.
        mlp_ratio: MLP hidden width over the block width (default 4).
        qkv_bias: Bias on the ``qkv`` projections (default True).
        drop_rate: Dropout before the classifier (default 0).
        drop_path_rate: Largest stochastic-depth rate, reached at the last block (default 0.1, timm's).
        **kwargs: timm's dropout options ``proj_drop_rate``/``attn_drop_rate`` (0 only), and the accepted no-ops
            ``strict_img_size``, ``dynamic_img_size``, ``weight_init`` (``""``).

    Raises:
        TypeError: A size or count is not an int.
        ValueError: Sizes out of range; ``depths`` and ``num_heads`` of different lengths; an unknown
            ``global_pool``; non-zero attention/projection dropout; an unknown keyword.

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> m = create_backbone("nearfar_swin_tiny_patch4_window7_224", img_size=64, embed_dim=24,
        ...                     depths=(1, 1), num_heads=(2, 4), num_classes=5).eval()
        >>> m(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
        >>> m.forward_features(torch.randn(2, 3, 64, 64)).shape     # NHWC, as timm's
        torch.Size([2, 8, 8, 48])
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, **kwargs: Any):
        super().__init__()
        for name in ("proj_drop_rate", "attn_drop_rate"):
            if kwargs.pop(name, 0.0):
                raise ValueError(f"{name} > 0 is not supported (nearfar's attention forms no probabilities to drop)")
        if kwargs.pop("weight_init", "") not in ("", "skip"):
            raise ValueError("weight_init must be '' (timm's default init) or 'skip'")
        for name in ("strict_img_size", "dynamic_img_size"):
            kwargs.pop(name, None)
        if kwargs:
            raise ValueError(f"unknown arguments: {sorted(kwargs)}")
        img = check_pair(img_size, "img_size")
        patch_size = check_positive_int(patch_size, "patch_size")
        depths, num_heads = tuple(depths), tuple(num_heads)
        if not depths or len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length")
        for d in depths:
            check_positive_int(d, "depths[i]")
        check_real_range(drop_path_rate, "drop_path_rate", 0.0, 1.0)
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        dims = [embed_dim * 2 ** i for i in range(self.num_layers)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, check_positive_int(in_chans, "in_chans"), embed_dim)
        grid = (img[0] // patch_size, img[1] // patch_size)
        rates = drop_path_rates(drop_path_rate, depths)
        self.feature_info: list[dict[str, Any]] = []
        layers, in_dim, scale = [], dims[0], 1
        for i in range(self.num_layers):
            layers.append(SwinTransformerStage(
                in_dim, dims[i], ((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale), depths[i],
                i > 0, num_heads[i], window_size, mlp_ratio, qkv_bias, rates[i]))
            in_dim = dims[i]
            if i > 0:
                scale *= 2
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * scale, module=f"layers.{i}"))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, check_nonneg_int(num_classes, "num_classes"),
                                   global_pool, drop_rate, input_fmt="NHWC")
        self.apply(init_vit_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage outputs ``indices`` (None: all; an int n: the last n) as NCHW maps, and the final features
        (timm's ``forward_intermediates``; ``norm`` applies the final norm to the last stage's map)."""
        check_choice(output_fmt, "output_fmt", ("NCHW",))
        n = len(self.layers)

        def emit(i: int, y: torch.Tensor) -> torch.Tensor:
            return (self.norm(y) if norm and i == n - 1 else y).permute(0, 3, 1, 2).contiguous()

        x, out, complete = run_stages(self.patch_embed(x), list(self.layers), indices, stop_early, emit)
        return out if intermediates_only else ((self.norm(x) if complete else x), out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> the normed last-stage map ``(B, H/32, W/32, num_features)`` (NHWC)."""
        return self.norm(self.layers(self.patch_embed(x)))


def _cfg(**kw: Any) -> dict[str, Any]:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "license": "mit", "paper_ids": "arXiv:2103.14030", **kw}


register_backbone(BackboneSpec(
    name="nearfar_swin_tiny_patch4_window7_224", cls=SwinTransformer,
    kwargs=dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    timm_name="swin_tiny_patch4_window7_224",
    feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), cfg=_cfg()))
