"""MAXIM cross-gating block (CGB): two feature maps gate each other with multi-axis (window + dilated grid) spatial
gating weights, channel-last ``(B, H, W, C)``.

Paper: Tu, Talebi, Zhang, Yang, Milanfar, Bovik, Li, "MAXIM: Multi-Axis MLP for Image Processing" (CVPR 2022,
arXiv 2201.02973). Official code (Flax): google-research/maxim ``maxim/models/maxim.py``: ``CrossGatingBlock`` and
``GetSpatialGatingWeights``.

``CGB(x, y)``: optionally ``y = ConvTranspose_{2x2, stride 2}(y)`` (``upsample_y``); ``x = Conv1x1(x)``, ``y =
Conv1x1(y)`` (``features`` channels, shortcuts ``s_x``, ``s_y``); ``x~ = GELU(Dense(LN(x)))``, ``y~`` likewise;
``G(t)`` = LN -> Dense ``F -> 2F`` -> GELU -> first half mixed along the grid axis (``Dense_0``, ``g_h g_w`` tokens
``H / g_h`` apart), second half along the block axis (``Dense_1``, the ``f_h f_w`` slots of a window) -> Dense
``2F -> F``. Then ``y_out = Dense(y~ * G(x~)) + s_y`` and ``x_out = Dense(x~ * G(y~)) + y_out + s_x``. The spatial
Dense layers are learned token-mixing matrices (bias initialised to 1), not softmax attention; unlike MAXIM's gMLP
gating unit there is no LayerNorm before them and no ``+ 1``.

How it is exposed: ``forward(x, y=None, return_y=False)``. With ``y`` it is the official cross-gating block (``y``
at half the resolution of ``x`` if ``upsample_y``, else at the same); ``return_y=True`` returns the official pair
``(x_out, y_out)``. Without ``y`` it is the self form ``y = x`` (needs ``upsample_y=False``): the single-input
layer the registry builds. That self form is our construction (MAXIM always fuses two different maps: encoder
skips with the up-sampled bottleneck, or the current stage's features with the previous stage's).

Parameter names are the official ones (see ``nearfar.layers.maxim_mab``: ``/`` -> ``.``, ``kernel``/``scale`` ->
``weight``): ``ConvTranspose_0`` (only with ``upsample_y``), ``Conv_0``, ``Conv_1``, ``LayerNorm_x``,
``in_project_x``, ``SplitHeadMultiAxisGating_x.{LayerNorm_in, in_project, Dense_0, Dense_1, out_project}``, the same
with ``_y``, ``out_project_y``, ``out_project_x``; ``nearfar.layers.maxim_mab.state_dict_from_flax`` converts a
Flax tree (it flips the transposed-conv kernel: Flax's ``ConvTranspose`` correlates, PyTorch's convolves).

What differs from the official code: the self form and ``return_y`` (above); the 1x1 convolutions run on the NCHW
view of the channel-last map (channels-last memory, no copy) and the 2x2 stride-2 transposed convolution as one
Dense to ``4F`` channels and a pixel shuffle (the same function); sizes not divisible by the block and grid sizes
raise (as there), or with ``padding="reflect"`` the projected maps are reflect-padded (centred) after the input
convolutions and both outputs cropped back; dropout is ``torch.nn.functional.dropout``. Init follows Flax
(LeCun-normal kernels for the convs and the ``in_/out_project`` Dense layers, ``N(0, 0.02)`` and bias 1 for the
spatial ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_choice, check_pair, check_positive_int, check_real_range
from ..functional import pointwise_linear
from .maxim_mab import LN_EPS, PADDINGS, crop, dense_init_, fit_to_sizes, gelu, multi_axis_mix
from .projections import PointwiseLinear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax's default kernel init: truncated normal in +-2 std with variance ``1 / fan_in``."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def flax_linear(cin: int, cout: int, bias: bool) -> nn.Linear:
    layer = PointwiseLinear(cin, cout, bias=bias)
    lecun_normal_(layer.weight, cin)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class SpatialGatingWeights(nn.Module):
    """MAXIM's ``GetSpatialGatingWeights`` on ``(B, H, W, channels)`` -> same: names ``LayerNorm_in``,
    ``in_project`` (``C -> 2C``), ``Dense_0`` (grid, ``g_h g_w``), ``Dense_1`` (block, ``f_h f_w``),
    ``out_project`` (``2C -> C``)."""

    def __init__(self, channels: int, block_size: tuple[int, int], grid_size: tuple[int, int], use_bias: bool,
                 dropout_rate: float):
        super().__init__()
        self.block_size, self.grid_size, self.dropout_rate = block_size, grid_size, dropout_rate
        self.LayerNorm_in = nn.LayerNorm(channels, eps=LN_EPS)
        self.in_project = flax_linear(channels, 2 * channels, use_bias)
        n_g, n_b = grid_size[0] * grid_size[1], block_size[0] * block_size[1]
        self.Dense_0 = dense_init_(nn.Linear(n_g, n_g, bias=use_bias), bias=1.0)
        self.Dense_1 = dense_init_(nn.Linear(n_b, n_b, bias=use_bias), bias=1.0)
        self.out_project = flax_linear(2 * channels, channels, use_bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, h, w, c = t.shape
        t = self.LayerNorm_in(t)
        u, v = gelu(self.in_project(t)).chunk(2, dim=-1)
        u6 = multi_axis_mix(u, self.Dense_0.weight, self.Dense_0.bias, self.grid_size, "grid")
        v6 = multi_axis_mix(v, self.Dense_1.weight, self.Dense_1.bias, self.block_size, "block")
        both = torch.cat([u6.reshape(b, h, w, c), v6.reshape(b, h, w, c)], dim=-1)
        return F.dropout(self.out_project(both), self.dropout_rate, self.training)


@whole_sequence(tokens=("y",), replicated=("return_y",))
class MaximCrossGating(nn.Module):
    """``MaximCrossGating(features, block_size=8, grid_size=8, in_features=None, y_features=None, upsample_y=True,
    use_bias=True, dropout_rate=0.0, padding=None)``: MAXIM's cross-gating block (``CrossGatingBlock``);
    ``(x, y)`` -> ``x_out`` ``(B, H, W, features)`` (and ``y_out`` with ``return_y``).

    Args:
        features: Output channels ``F``, >= 1.
        block_size: Window ``(f_h, f_w)`` of the block-axis gating weights, an int or a pair of positive ints.
        grid_size: Grid ``(g_h, g_w)`` of the grid-axis gating weights, an int or a pair.
        in_features: Channels of ``x``, >= 1 (default: ``features``).
        y_features: Channels of ``y``, >= 1 (default: ``in_features``).
        upsample_y: ``y`` comes at half the resolution and is up-sampled by a 2x2 stride-2 transposed conv
            (official default True); False: ``y`` at the resolution of ``x`` (needed for the self form).
        use_bias: Biases on every conv and Dense (default True).
        dropout_rate: Dropout after the gating weights and each ``out_project``, in ``[0, 1)`` (default 0).
        padding: None (default: ``H, W`` divisible by both sizes, as in the official code) or ``"reflect"``.

    Raises:
        TypeError: An argument of the wrong type.
        ValueError: An argument out of range.

    Examples:
        >>> import torch
        >>> from nearfar import MaximCrossGating
        >>> cgb = MaximCrossGating(32, block_size=4, grid_size=4, in_features=48, y_features=64)
        >>> x_out, y_out = cgb(torch.randn(2, 8, 16, 48), torch.randn(2, 4, 8, 64), return_y=True)
        >>> x_out.shape, y_out.shape
        (torch.Size([2, 8, 16, 32]), torch.Size([2, 8, 16, 32]))
        >>> MaximCrossGating(32, 4, 4, upsample_y=False)(torch.randn(1, 8, 8, 32)).shape  # self form, y = x
        torch.Size([1, 8, 8, 32])
    """

    def __init__(self, features: int, block_size: int | Sequence[int] = 8, grid_size: int | Sequence[int] = 8,
                 in_features: int | None = None, y_features: int | None = None, upsample_y: bool = True,
                 use_bias: bool = True, dropout_rate: float = 0.0, padding: str | None = None):
        super().__init__()
        self.features = check_positive_int(features, "features")
        self.block_size = check_pair(block_size, "block_size")
        self.grid_size = check_pair(grid_size, "grid_size")
        self.in_features = features if in_features is None else check_positive_int(in_features, "in_features")
        self.y_features = self.in_features if y_features is None else check_positive_int(y_features, "y_features")
        self.upsample_y = check_bool(upsample_y, "upsample_y")
        use_bias = check_bool(use_bias, "use_bias")
        self.dropout_rate = check_real_range(dropout_rate, "dropout_rate", 0.0, 1.0, open_high=True)
        self.padding = None if padding is None else check_choice(padding, "padding", PADDINGS)
        f = features
        if upsample_y:
            self.ConvTranspose_0 = nn.ConvTranspose2d(self.y_features, f, 2, stride=2, bias=use_bias)
            lecun_normal_(self.ConvTranspose_0.weight, 4 * self.y_features)
        self.Conv_0 = nn.Conv2d(self.in_features, f, 1, bias=use_bias)
        self.Conv_1 = nn.Conv2d(f if upsample_y else self.y_features, f, 1, bias=use_bias)
        for conv in (self.Conv_0, self.Conv_1):
            lecun_normal_(conv.weight, conv.weight.shape[1])
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        gate = (self.block_size, self.grid_size, use_bias, self.dropout_rate)
        self.LayerNorm_x = nn.LayerNorm(f, eps=LN_EPS)
        self.in_project_x = flax_linear(f, f, use_bias)
        self.SplitHeadMultiAxisGating_x = SpatialGatingWeights(f, *gate)
        self.LayerNorm_y = nn.LayerNorm(f, eps=LN_EPS)
        self.in_project_y = flax_linear(f, f, use_bias)
        self.SplitHeadMultiAxisGating_y = SpatialGatingWeights(f, *gate)
        self.out_project_y = flax_linear(f, f, use_bias)
        self.out_project_x = flax_linear(f, f, use_bias)

    def _upsample(self, y: torch.Tensor) -> torch.Tensor:
        """2x2 stride-2 transposed conv of channel-last ``y``: one Dense to ``(2, 2, F)`` per pixel, then shuffle."""
        conv = self.ConvTranspose_0
        b, h, w, _ = y.shape
        weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * self.features, -1)  # rows (kh, kw, out)
        z = F.linear(y, weight).view(b, h, w, 2, 2, self.features).transpose(2, 3).reshape(b, 2 * h, 2 * w, -1)
        return z if conv.bias is None else z + conv.bias

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                return_y: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Cross-gate ``x`` and ``y`` (self form ``y = x`` when ``y`` is None).

        Args:
            x: ``(B, H, W, in_features)``.
            y: ``(B, H/2, W/2, y_features)`` if ``upsample_y`` else ``(B, H, W, y_features)``; None: ``x``.
            return_y: Also return ``y_out`` (the official pair).

        Returns:
            ``x_out`` ``(B, H, W, features)``, or ``(x_out, y_out)``.

        Raises:
            TypeError: ``x`` or ``y`` is not a tensor.
            ValueError: Wrong shapes; ``y`` omitted with ``upsample_y``; extents not divisible (without ``padding``).
        """
        b, (h, w), _ = check_channels_last(x, 2, self.in_features)
        if y is None:
            if self.upsample_y:
                raise ValueError("the self form (y omitted: y = x) needs upsample_y=False")
            if self.y_features != self.in_features:
                raise ValueError(f"the self form (y omitted: y = x) needs y_features == in_features, got "
                                 f"{self.y_features} and {self.in_features}")
            y = x
        check_channels_last(y, 2, self.y_features, "y")
        want = (b, h // 2, w // 2) if self.upsample_y else (b, h, w)
        if tuple(y.shape[:3]) != want or (self.upsample_y and (h % 2 or w % 2)):
            raise ValueError(f"y must be (B, H{'/2' * self.upsample_y}, W{'/2' * self.upsample_y}, "
                             f"{self.y_features}) for x of shape {tuple(x.shape)} (upsample_y={self.upsample_y}), "
                             f"got {tuple(y.shape)}")
        if self.upsample_y:
            y = self._upsample(y)
        # 1x1 convolutions: the same product as a pointwise linear layer on the channel-last map
        x = pointwise_linear(x, self.Conv_0.weight.flatten(1), self.Conv_0.bias)
        y = pointwise_linear(y, self.Conv_1.weight.flatten(1), self.Conv_1.bias)
        sizes = {"block_size": self.block_size, "grid_size": self.grid_size}
        s_x, box = fit_to_sizes(x, sizes, self.padding)
        s_y, _ = fit_to_sizes(y, sizes, self.padding)
        x = gelu(self.in_project_x(self.LayerNorm_x(s_x)))
        y = gelu(self.in_project_y(self.LayerNorm_y(s_y)))
        gx, gy = self.SplitHeadMultiAxisGating_x(x), self.SplitHeadMultiAxisGating_y(y)
        y_out = F.dropout(self.out_project_y(y * gx), self.dropout_rate, self.training) + s_y
        x_out = F.dropout(self.out_project_x(x * gy), self.dropout_rate, self.training) + y_out + s_x
        return (crop(x_out, box), crop(y_out, box)) if return_y else crop(x_out, box)

    def extra_repr(self) -> str:
        return (f"features={self.features}, block_size={self.block_size}, grid_size={self.grid_size}, "
                f"upsample_y={self.upsample_y}, padding={self.padding!r}")


register(Mechanism(
    name="maxim_cgb", paper="MAXIM: Multi-Axis MLP for Image Processing (CVPR 2022)", repo="google-research/maxim",
    family="local+global", dims=("2d",),
    **image_layer(cross="cross-gating multiplies x and y position by position, so y must lie on the pixel grid of x "
                  "(or half of it with upsample_y): a context of another size or length has no aligned gates, so "
                  "CAB's cross patterns (any context) are not claimed; call layer(x, y) for MAXIM's cross form"),
    cls=MaximCrossGating,
    make=lambda dim, num_heads, **kw: MaximCrossGating(dim, **{"block_size": 7, "grid_size": 7,
                                                                "upsample_y": False, **kw}),
    notes="registered in its self form y = x (our construction; MAXIM always gates two different maps, "
          "layer(x, y)); multiplicative gating by learned n x n token-mixing matrices over 7x7 windows (local) and "
          "the 7x7 dilated grid (global), not softmax attention; returns x_out only (return_y=True: the official "
          "pair); its shortcuts are the 1x1-projected x and y, and MAXIM uses its output in place of x (no outer "
          "residual); num_heads is unused; extents must divide by 7 unless padding='reflect'; official Flax names"))
