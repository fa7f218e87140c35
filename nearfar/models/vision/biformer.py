"""BiFormer image classifier on nearfar's bi-level routing attention, with the official checkpoints' names.

Paper: Zhu, Wang, Ke, Zhang & Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023,
arXiv:2303.08125). Official code: rayleizhu/BiFormer, ``models/biformer.py`` (``Block``, ``BiFormer``,
``biformer_tiny``), ``ops/bra_legacy.py`` (the attention) and ``models/_common.py`` (``AttentionLePE``, ``DWConv``).
timm has no BiFormer.

The model is the official one: a BatchNorm convolutional stem (stride 4) and a 3x3 stride-2 convolution with
BatchNorm before each later stage; every block adds a depth-wise 3x3 convolution of its input, then runs pre-norm
attention and an MLP (LayerNorm eps 1e-6) in NHWC; a final BatchNorm, average pooling and a linear head. Stages 1-3
use bi-level routing attention on a 7x7 grid of regions (top-1, 4, 16 regions for the tiny model), stage 4 plain
attention with a LePE convolution of its input (the official ``topk = -2`` mode, 8 heads). Both are
``nearfar.layers.BiLevelRoutingAttention`` (whose parameter names are the official ones), and every module name here
is the official one (``downsample_layers.0.0``, ``stages.0.0.pos_embed``, ``stages.0.0.attn.qkv.qkv``, ``.wo``,
``.lepe``, ``stages.0.0.mlp.0`` / ``.mlp.3``, ``norm``, ``head``), so a checkpoint of ``models/biformer.py`` (the
state dict under its ``"model"`` key) loads with ``strict=True``.

What differs from the official code: timm's conventions on top (``global_pool``, ``forward_head``,
``reset_classifier`` sized from the last stage, ``forward_intermediates`` giving each stage's output, NCHW);
positional-encoding layers (``pe``, unimplemented there beyond ``"none"``), ``representation_size``, activation
checkpointing (``use_checkpoint_stages``), post-norm blocks (``pre_norm=False``), the ``topk = 0`` convolution
stand-in and ``kv_downsample_kernel`` (unused there) are not available; without ``auto_pad`` every stage map of
stages 1-3 must be a multiple of ``n_win`` (224 and 112 inputs are), as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...checks import check_bool, check_choice, check_nonneg_int, check_positive_int, check_real_range
from ...layers import BiLevelRoutingAttention
from .backbone import LinearHeadBackbone, run_stages
from .parts import drop_path_or_identity, feature_take_indices, init_vit_weights_and_norms
from .spec import BackboneSpec, register_backbone

__all__ = ["BiFormer"]


class DWConv(nn.Module):
    """The official MLP's optional depth-wise 3x3 convolution (``mlp.1.dwconv``) on an NHWC map."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(nn.Module):
    """``x + pos_embed(x)``, then ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))`` in NHWC; NCHW in and out."""

    def __init__(self, dim: int, drop_path: float, layer_scale_init_value: float, mlp_ratio: float, mlp_dwconv: bool,
                 before_attn_dwconv: int, **attn: Any):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = BiLevelRoutingAttention(dim, **attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), DWConv(hidden) if mlp_dwconv else nn.Identity(), nn.GELU(),
                                 nn.Linear(hidden, dim))
        self.drop_path = drop_path_or_identity(drop_path)
        self.use_layer_scale = layer_scale_init_value > 0
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma1 * a if self.use_layer_scale else a)
        m = self.mlp(self.norm2(x))
        x = x + self.drop_path(self.gamma2 * m if self.use_layer_scale else m)
        return x.permute(0, 3, 1, 2)


def _four(value: Sequence[Any], name: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"{name} must give one value per stage (4), got {value!r}")
    return list(value)


class BiFormer(LinearHeadBackbone):
    """The BiFormer classifier of ``models/biformer.py`` with timm's conventions; input ``(B, C, H, W)``.

    Args:
        depth: Blocks per stage (4 ints >= 1).
        in_chans: Input channels.
        num_classes: Classes of the linear head; 0 makes the head an identity.
        embed_dim: Channels per stage (4 ints; the first even).
        head_dim: Channels per head of the routed stages: ``num_heads = qk_dims[i] // head_dim``.
        qk_scale: Score scale of the routed stages; None: ``qk_dim ** -0.5`` (the official choice).
        drop_path_rate: Largest stochastic-depth rate, reached linearly at the last block, in [0, 1).
        drop_rate: Dropout before the head, in [0, 1).
        n_win: Regions per side of the routed stages.
        kv_downsample_mode, kv_per_wins, kv_downsample_ratios: The official key/value pooling of the routed stages
            (``"identity"`` in the released models).
        topks: Routed regions per stage, or -1 (plain attention) / -2 (attention + LePE of the input, 8 heads).
        side_dwconv: Kernel of the LePE depth-wise convolutions (odd, or 0 for none).
        layer_scale_init_value: > 0: per-channel residual scales ``gamma1``/``gamma2`` starting there.
        qk_dims: Query/key channels per stage (None: ``embed_dim``).
        param_routing, diff_routing, soft_routing: The official routing options.
        before_attn_dwconv: Kernel of each block's depth-wise ``pos_embed`` convolution (padding 1, as official).
        auto_pad: Zero-pad maps that are not multiples of ``n_win`` in the routed stages (and crop after).
        mlp_ratios: MLP hidden size over the channels, per stage.
        mlp_dwconv: A depth-wise 3x3 convolution inside the MLP.
        global_pool: ``"avg"`` (default) or ``""``.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range (the message names it).

    Examples:
        >>> import torch
        >>> from nearfar.models.vision import create_backbone
        >>> m = create_backbone("nearfar_biformer_tiny", num_classes=10).eval()
        >>> m(torch.randn(1, 3, 112, 112)).shape
        torch.Size([1, 10])
        >>> [f.shape[1] for f in m.forward_intermediates(torch.randn(1, 3, 112, 112), intermediates_only=True)]
        [64, 128, 256, 512]
    """

    pool_dims = (2, 3)  # forward_features gives (B, C, H, W)

    def __init__(self, depth: Sequence[int] = (3, 4, 8, 3), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (64, 128, 320, 512), head_dim: int = 64, qk_scale: float | None = None,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, n_win: int = 7,
                 kv_downsample_mode: str = "ada_avgpool", kv_per_wins: Sequence[int] = (2, 2, -1, -1),
                 topks: Sequence[int] = (8, 8, -1, -1), side_dwconv: int = 5, layer_scale_init_value: float = -1,
                 qk_dims: Sequence[int | None] = (None, None, None, None), param_routing: bool = False,
                 diff_routing: bool = False, soft_routing: bool = False, before_attn_dwconv: int = 3,
                 auto_pad: bool = False, kv_downsample_ratios: Sequence[int] = (4, 2, 1, 1),
                 mlp_ratios: Sequence[float] = (4, 4, 4, 4), mlp_dwconv: bool = False, global_pool: str = "avg"):
        super().__init__()
        depth = [check_positive_int(d, "depth") for d in _four(depth, "depth")]
        embed_dim = [check_positive_int(d, "embed_dim") for d in _four(embed_dim, "embed_dim")]
        if embed_dim[0] % 2:
            raise ValueError(f"embed_dim[0] must be even (the stem's first convolution has embed_dim[0] // 2 "
                             f"channels), got {embed_dim[0]}")
        check_positive_int(head_dim, "head_dim")
        check_positive_int(in_chans, "in_chans")
        check_nonneg_int(num_classes, "num_classes")
        check_real_range(drop_path_rate, "drop_path_rate", 0.0, 1.0, open_high=True)
        check_real_range(drop_rate, "drop_rate", 0.0, 1.0, open_high=True)
        check_real_range(layer_scale_init_value, "layer_scale_init_value", -float("inf"), float("inf"))
        check_bool(mlp_dwconv, "mlp_dwconv")
        check_positive_int(before_attn_dwconv, "before_attn_dwconv")
        qk = [d if q is None else q for d, q in zip(embed_dim, _four(qk_dims, "qk_dims"))]
        topks, kv_per_wins, ratios = _four(topks, "topks"), _four(kv_per_wins, "kv_per_wins"), _four(
            kv_downsample_ratios, "kv_downsample_ratios")
        mlp_ratios = [check_real_range(r, "mlp_ratios", 0.0, float("inf"), open_low=True)
                      for r in _four(mlp_ratios, "mlp_ratios")]
        self.global_pool = check_choice(global_pool, "global_pool", ("avg", ""))
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.drop_rate = drop_rate

        half = embed_dim[0] // 2
        stem = nn.Sequential(nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
                             nn.Conv2d(half, embed_dim[0], 3, 2, 1), nn.BatchNorm2d(embed_dim[0]))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, 2, 1), nn.BatchNorm2d(embed_dim[i + 1]))
            for i in range(3)])
        total = sum(depth)  # stochastic depth grows linearly from 0 to drop_path_rate over the blocks
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        for i in range(4):
            routed = topks[i] > 0
            attn = dict(num_heads=qk[i] // head_dim if routed else 8, n_win=n_win, qk_dim=qk[i], qk_scale=qk_scale,
                        topk=topks[i], side_dwconv=side_dwconv, auto_pad=auto_pad)
            if routed:  # the official Block leaves AttentionLePE / Attention at their defaults (8 heads)
                attn.update(kv_per_win=kv_per_wins[i] if kv_per_wins[i] > 0 else 4,
                            kv_downsample_ratio=ratios[i], kv_downsample_mode=kv_downsample_mode,
                            param_routing=param_routing, diff_routing=diff_routing, soft_routing=soft_routing)
            else:
                attn.update(qk_dim=None, qk_scale=None)
            first = sum(depth[:i])
            self.stages.append(nn.Sequential(*[
                Block(embed_dim[i], dpr[first + j], layer_scale_init_value, mlp_ratios[i], mlp_dwconv,
                      before_attn_dwconv, **attn) for j in range(depth[i])]))
            self.feature_info.append({"num_chs": embed_dim[i], "reduction": 4 * 2 ** i, "module": f"stages.{i}"})
        self.norm: nn.Module = nn.BatchNorm2d(embed_dim[-1])
        self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_vit_weights_and_norms)  # the official init

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, in_chans, H, W)`` -> the normalised last map ``(B, embed_dim[-1], H/32, W/32)``."""
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.pre_logits(self.norm(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: each chosen stage's output (``norm=True``: the final BatchNorm on the
        last stage's). Arguments as in ``nearfar.models.vision.nat.NAT.forward_intermediates``."""
        check_choice(output_fmt, "output_fmt", ("NCHW", "NHWC"))

        def emit(i: int, y: torch.Tensor) -> torch.Tensor:
            y = self.norm(y) if norm and i == 3 else y
            return y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1)

        stages = [nn.Sequential(down, stage) for down, stage in zip(self.downsample_layers, self.stages)]
        x, out, complete = run_stages(x, stages, indices, stop_early, emit)
        if intermediates_only:
            return out
        return (self.norm(x) if complete and len(stages) == 4 else x), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) that ``forward_intermediates(indices)`` does not need; returns the
        absolute indices kept."""
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        self.downsample_layers = self.downsample_layers[:last + 1]
        if prune_norm or last < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


register_backbone(BackboneSpec(
    name="nearfar_biformer_tiny", cls=BiFormer,
    kwargs={"depth": (2, 2, 8, 2), "embed_dim": (64, 128, 256, 512), "mlp_ratios": (3, 3, 3, 3), "n_win": 7,
            "kv_downsample_mode": "identity", "kv_per_wins": (-1, -1, -1, -1), "topks": (1, 4, 16, -2),
            "side_dwconv": 5, "before_attn_dwconv": 3, "layer_scale_init_value": -1, "qk_dims": (64, 128, 256, 512),
            "head_dim": 32},
    feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)},
    cfg={"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
         "first_conv": "downsample_layers.0.0", "classifier": "head", "paper_ids": "arXiv:2303.08125",
         "license": "mit"}))
