"""MAXIM multi-axis gated MLP block (MAB): a block-gMLP (local windows) and a grid-gMLP (dilated global grid) on
the two halves of the channels, channel-last ``(B, H, W, C)``.

Paper: Tu, Talebi, Zhang, Yang, Milanfar, Bovik, Li, "MAXIM: Multi-Axis MLP for Image Processing" (CVPR 2022,
arXiv 2201.02973). Official code (Flax): google-research/maxim ``maxim/models/maxim.py``:
``ResidualSplitHeadMultiAxisGmlpLayer`` (the MAB), ``GridGmlpLayer`` / ``BlockGmlpLayer``, ``GridGatingUnit`` /
``BlockGatingUnit`` (gMLP spatial gating units), ``block_images_einops`` / ``unblock_images_einops``.

The block: ``t = GELU(Dense_{C->pC}(LN(x)))``; the first half of ``t``'s channels goes through the grid-gMLP, the
second through the block-gMLP; ``out_project`` maps their concatenation back to ``C`` and the official module adds
``x``. A gMLP layer on ``z`` (``c`` channels) is ``z + Dense_{fc/2->c}(SGU(GELU(Dense_{c->fc}(LN(z)))))`` with the
spatial gating unit ``SGU(t) = t_1 * (Dense_n(LN(t_2)) + 1)`` (``t_1``, ``t_2`` the channel halves). ``Dense_n``
is a learned ``n x n`` token-mixing matrix (not softmax attention) applied along one axis of the blocked image:

* block axis: the ``n = f_h f_w`` slots of each ``block_size`` window (local window mixing);
* grid axis: the ``n = g_h g_w`` tokens that share one offset inside the ``(H / g_h) x (W / g_w)`` patches, spaced
  ``H / g_h`` rows and ``W / g_w`` columns apart (a dilated sub-lattice spanning the image: global mixing).

The fast path never blocks / unblocks the image: every channel-wise step (LayerNorms, Dense layers, GELU, the
residuals) runs on the ``(B, H, W, c)`` layout and only the token mixing permutes one half-width tensor
(``multi_axis_mix``). Numerics follow Flax: LayerNorm eps 1e-6, tanh-approximated GELU (``nn.gelu``'s default),
Dense kernels ``N(0, 0.02)`` with zero biases.

Parameter names are the official Flax names with ``/`` -> ``.``, ``kernel`` -> ``weight`` (transposed, PyTorch
``[out, in]``), ``scale`` -> ``weight``: ``LayerNorm_in``, ``in_project``, ``GridGmlpLayer.{LayerNorm, in_project,
GridGatingUnit.{intermediate_layernorm, Dense_0}, out_project}``, the same under ``BlockGmlpLayer`` /
``BlockGatingUnit``, and ``out_project``; ``state_dict_from_flax`` converts a Flax parameter tree (also the
cross-gating block's, see ``nearfar.layers.maxim_cgb``).

What differs from the official code: ``residual=False`` returns the update without adding ``x`` (the registry's
layer contract; the official module is ``residual=True``, the default); sizes not divisible by the block and grid
sizes raise as there (einops would fail), or with ``padding="reflect"`` are reflect-padded (centred) to a multiple
of both and cropped back, our per-layer version of the official ``run_eval.py`` padding (which pads the whole image
to a multiple of 64, odd sides first by one reflected row/column at the bottom/right); dropout is
``torch.nn.functional.dropout`` (the official Flax RNG differs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_choice, check_pair, check_positive_int, check_real_range
from .projections import PointwiseLinear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

#: Flax ``nn.LayerNorm``'s default epsilon (PyTorch's 1e-5 would change the outputs)
LN_EPS = 1e-6
AXES = ("block", "grid")
PADDINGS = ("reflect",)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Flax ``nn.gelu`` (tanh approximation, its default)."""
    return F.gelu(x, approximate="tanh")


def multi_axis_mix(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: tuple[int, int],
                   axis: str) -> torch.Tensor:
    """MAXIM's spatial Dense along one axis of the blocked image: one permuted copy (channels innermost), one GEMM.

    ``axis="block"``: ``size`` is the window ``(f_h, f_w)``; each window's ``f_h f_w`` slots (row-major) are mixed.
    ``axis="grid"``: ``size`` is the grid ``(g_h, g_w)``; the ``g_h g_w`` tokens ``(i * H/g_h + r, j * W/g_w + c)``
    (fixed ``r, c``, row-major in ``i, j``) are mixed. ``out[.., q] = sum_p v[.., p] weight[q, p] + bias[q]``.

    Args:
        v: ``(B, H, W, m)`` with ``H, W`` divisible by ``size``.
        weight: ``(n, n)`` (``n = size[0] * size[1]``), PyTorch ``[out, in]`` (the Flax kernel transposed).
        bias: ``(n,)`` or None.
        size: The window (block axis) or grid (grid axis) size.
        axis: ``"block"`` or ``"grid"``.

    Returns:
        A ``(B, a, b, c, d, m)`` view in image order (``.reshape(B, H, W, m)`` gives the image): ``(H / f_h, f_h,
        W / f_w, f_w)`` for the block axis, ``(g_h, H / g_h, g_w, W / g_w)`` for the grid axis.
    """
    b, h, w, m = v.shape
    n = size[0] * size[1]
    if axis == "block":  # image (B, H/f_h, f_h, W/f_w, f_w, m): slots (f_h, f_w) first, channels stay innermost
        t = v.reshape(b, h // size[0], size[0], w // size[1], size[1], m).permute(2, 4, 0, 1, 3, 5)
        back = (2, 3, 0, 4, 1, 5)
    else:  # image (B, g_h, H/g_h, g_w, W/g_w, m): grid positions (g_h, g_w) first
        t = v.reshape(b, size[0], h // size[0], size[1], w // size[1], m).permute(1, 3, 0, 2, 4, 5)
        back = (2, 0, 3, 1, 4, 5)
    shape = t.shape
    t = t.reshape(n, -1)  # one copy with the channels contiguous; then one (n x n) @ (n x rest) GEMM
    t = torch.mm(weight, t) if bias is None else torch.addmm(bias[:, None], weight, t)
    return t.view(shape).permute(*back)


def blocked_view(x: torch.Tensor, size: tuple[int, int], axis: str) -> torch.Tensor:
    """``x`` ``(B, H, W, m)`` as the 6D image-order view ``multi_axis_mix`` returns for the same ``size``/``axis``."""
    b, h, w, m = x.shape
    if axis == "block":
        return x.reshape(b, h // size[0], size[0], w // size[1], size[1], m)
    return x.reshape(b, size[0], h // size[0], size[1], w // size[1], m)


def reflect_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of a reflect padding (numpy's ``"reflect"``, any pad length) of an axis of ``n`` entries."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i < n, i, period - i)


def reflect_pad(x: torch.Tensor, multiple: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Reflect-pad ``x`` ``(B, H, W, C)`` centred (``p // 2`` before, the rest after) to multiples of ``multiple``;
    returns the padded tensor and the crop ``(top, left, H, W)``."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = (-h) % multiple[0], (-w) % multiple[1]
    if ph:
        x = x.index_select(1, reflect_index(h, ph // 2, ph - ph // 2, x.device))
    if pw:
        x = x.index_select(2, reflect_index(w, pw // 2, pw - pw // 2, x.device))
    return x, (ph // 2, pw // 2, h, w)


def fit_to_sizes(x: torch.Tensor, sizes: Mapping[str, tuple[int, int]], padding: str | None
                 ) -> tuple[torch.Tensor, tuple[int, int, int, int] | None]:
    """Check that ``x``'s extents are divisible by every size in ``sizes`` (named by parameter), or pad them."""
    multiple = tuple(math.lcm(*(s[a] for s in sizes.values())) for a in range(2))
    extent = (x.shape[1], x.shape[2])
    if all(n % k == 0 for n, k in zip(extent, multiple)):
        return x, None
    if padding is None:
        names = " and ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"x's spatial extents {extent} must be divisible by {names} (per axis: by {multiple}); "
                         "pass padding='reflect' to pad and crop")
    return reflect_pad(x, (multiple[0], multiple[1]))


def crop(x: torch.Tensor, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    """Undo ``fit_to_sizes``'s padding."""
    if box is None:
        return x
    top, left, h, w = box
    return x[:, top:top + h, left:left + w]


def dense_init_(layer: nn.Linear, std: float = 0.02, bias: float = 0.0) -> nn.Linear:
    """MAXIM's ``weight_initializer``: kernel ``N(0, std)``, constant bias."""
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, bias)
    return layer


class GatingUnit(nn.Module):
    """gMLP spatial gating unit of MAXIM (``BlockGatingUnit`` / ``GridGatingUnit``): names
    ``intermediate_layernorm`` (width ``channels``) and ``Dense_0`` (``n x n``)."""

    def __init__(self, channels: int, n: int, use_bias: bool):
        super().__init__()
        self.intermediate_layernorm = nn.LayerNorm(channels, eps=LN_EPS)
        self.Dense_0 = dense_init_(nn.Linear(n, n, bias=use_bias))


class GmlpLayer(nn.Module):
    """MAXIM's ``BlockGmlpLayer`` (``axis="block"``, ``size`` = window) or ``GridGmlpLayer`` (``axis="grid"``,
    ``size`` = grid) on ``(B, H, W, channels)``, residual included; the gating unit is registered under the official
    name ``BlockGatingUnit`` / ``GridGatingUnit``."""

    def __init__(self, channels: int, axis: str, size: tuple[int, int], factor: int, use_bias: bool,
                 dropout_rate: float):
        super().__init__()
        self.axis, self.size, self.dropout_rate = axis, size, dropout_rate
        hidden = channels * factor
        self.LayerNorm = nn.LayerNorm(channels, eps=LN_EPS)
        self.in_project = dense_init_(PointwiseLinear(channels, hidden, bias=use_bias))
        self.unit_name = "BlockGatingUnit" if axis == "block" else "GridGatingUnit"
        self.add_module(self.unit_name, GatingUnit(hidden // 2, size[0] * size[1], use_bias))
        self.out_project = dense_init_(PointwiseLinear(hidden // 2, channels, bias=use_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = getattr(self, self.unit_name)
        b, h, w, _ = x.shape
        u, v = gelu(self.in_project(self.LayerNorm(x))).chunk(2, dim=-1)
        m = u.shape[-1]
        v = unit.intermediate_layernorm(v)
        v6 = multi_axis_mix(v, unit.Dense_0.weight, unit.Dense_0.bias, self.size, self.axis)
        u6 = blocked_view(u, self.size, self.axis)
        y = torch.addcmul(u6, u6, v6).reshape(b, h, w, m)  # u * (v + 1)
        y = F.dropout(self.out_project(y), self.dropout_rate, self.training)
        return x + y


@whole_sequence()
class MaximMultiAxisGmlp(nn.Module):
    """``MaximMultiAxisGmlp(dim, block_size=8, grid_size=8, block_gmlp_factor=2, grid_gmlp_factor=2,
    input_proj_factor=2, use_bias=True, dropout_rate=0.0, residual=True, padding=None)``: MAXIM's multi-axis gated
    MLP block (``ResidualSplitHeadMultiAxisGmlpLayer``), x ``(B, H, W, dim)`` -> same.

    MAXIM uses ``block_size = grid_size = 16`` at its two high-resolution levels and 8 below (the defaults here).
    The spatial weights depend only on ``block_size`` and ``grid_size``, so one module runs at any size divisible by
    both (the grid's dilation ``H / g_h`` grows with the image).

    Args:
        dim: Channels ``C``, >= 1.
        block_size: Window ``(f_h, f_w)`` of the block-gMLP (local mixing), an int or a pair of positive ints.
        grid_size: Grid ``(g_h, g_w)`` of the grid-gMLP (dilated global mixing), an int or a pair.
        block_gmlp_factor: Expansion ``f`` of the block-gMLP, >= 1 (default 2).
        grid_gmlp_factor: Expansion of the grid-gMLP, >= 1 (default 2).
        input_proj_factor: Expansion ``p`` of the input projection, >= 1 (default 2); each branch gets ``p C / 2``
            channels.
        use_bias: Biases on every Dense (default True).
        dropout_rate: Dropout after each ``out_project``, in ``[0, 1)`` (default 0; off in eval).
        residual: Add ``x`` (the official module, default True); False returns the update only.
        padding: None (default: extents must be divisible, as in the official code) or ``"reflect"`` (pad, centred,
            to a multiple of both sizes, and crop back).

    Raises:
        TypeError: An argument of the wrong type.
        ValueError: An argument out of range; ``dim * input_proj_factor`` odd, or a branch width times its gMLP
            factor odd (both are split in halves).

    Examples:
        >>> import torch
        >>> from nearfar import MaximMultiAxisGmlp
        >>> mab = MaximMultiAxisGmlp(32, block_size=4, grid_size=4)
        >>> mab(torch.randn(2, 16, 8, 32)).shape
        torch.Size([2, 16, 8, 32])
        >>> MaximMultiAxisGmlp(32, 4, 4, padding="reflect")(torch.randn(1, 9, 7, 32)).shape
        torch.Size([1, 9, 7, 32])
    """

    def __init__(self, dim: int, block_size: int | Sequence[int] = 8, grid_size: int | Sequence[int] = 8,
                 block_gmlp_factor: int = 2, grid_gmlp_factor: int = 2, input_proj_factor: int = 2,
                 use_bias: bool = True, dropout_rate: float = 0.0, residual: bool = True, padding: str | None = None):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.block_size = check_pair(block_size, "block_size")
        self.grid_size = check_pair(grid_size, "grid_size")
        factors = {k: check_positive_int(v, k) for k, v in (("block_gmlp_factor", block_gmlp_factor),
                                                             ("grid_gmlp_factor", grid_gmlp_factor),
                                                             ("input_proj_factor", input_proj_factor))}
        use_bias = check_bool(use_bias, "use_bias")
        self.dropout_rate = check_real_range(dropout_rate, "dropout_rate", 0.0, 1.0, open_high=True)
        self.residual = check_bool(residual, "residual")
        self.padding = None if padding is None else check_choice(padding, "padding", PADDINGS)
        width = dim * input_proj_factor
        if width % 2:
            raise ValueError(f"dim * input_proj_factor must be even (split between the two branches), got {width}")
        branch = width // 2
        for name in ("grid_gmlp_factor", "block_gmlp_factor"):
            if branch * factors[name] % 2:
                raise ValueError(f"dim * input_proj_factor / 2 * {name} must be even (the gating unit splits it), "
                                 f"got {branch} * {factors[name]}")
        self.LayerNorm_in = nn.LayerNorm(dim, eps=LN_EPS)
        self.in_project = dense_init_(PointwiseLinear(dim, width, bias=use_bias))
        self.GridGmlpLayer = GmlpLayer(branch, "grid", self.grid_size, grid_gmlp_factor, use_bias, self.dropout_rate)
        self.BlockGmlpLayer = GmlpLayer(branch, "block", self.block_size, block_gmlp_factor, use_bias,
                                        self.dropout_rate)
        self.out_project = dense_init_(PointwiseLinear(width, dim, bias=use_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on a channel-last map.

        Args:
            x: ``(B, H, W, dim)``; ``H``, ``W`` divisible by ``block_size`` and ``grid_size`` unless ``padding``.

        Returns:
            ``(B, H, W, dim)``: ``x`` plus the update (``residual=True``) or the update.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; extents not divisible (without ``padding``).
        """
        check_channels_last(x, 2, self.dim)
        x, box = fit_to_sizes(x, {"block_size": self.block_size, "grid_size": self.grid_size}, self.padding)
        u, v = gelu(self.in_project(self.LayerNorm_in(x))).chunk(2, dim=-1)  # grid branch, block branch
        y = self.out_project(torch.cat([self.GridGmlpLayer(u), self.BlockGmlpLayer(v)], dim=-1))
        y = F.dropout(y, self.dropout_rate, self.training)
        return crop(y + x if self.residual else y, box)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, block_size={self.block_size}, grid_size={self.grid_size}, "
                f"residual={self.residual}, padding={self.padding!r}")


def state_dict_from_flax(params: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """A MAXIM block's Flax parameters as this library's state dict (``MaximMultiAxisGmlp``,
    ``MaximCrossGating``).

    ``params``: a nested dict (Flax ``params`` of the block, e.g. ``tree["stage_0_encoder_block_0"]
    ["SplitHeadMultiAxisGmlpLayer_0"]``) or a flat one with ``/``-separated names; arrays or tensors. Names: ``/`` ->
    ``.``, ``scale`` -> ``weight``, ``kernel`` -> ``weight``; Dense kernels ``[in, out]`` are transposed (also the
    spatial ``Dense_0`` / ``Dense_1``), Conv kernels ``[kh, kw, in, out]`` become ``[out, in, kh, kw]``, and the
    ``ConvTranspose_0`` kernel becomes ``[in, out, kh, kw]`` flipped in both spatial axes (Flax's ``ConvTranspose``
    does not flip its kernel, ``torch.conv_transpose2d`` does: checked against Flax 0.12).

    Args:
        params: The parameters.
        prefix: Prepended to every key (a parent module's name plus ``"."``).

    Returns:
        The state dict (float32 tensors).
    """
    flat: dict[str, Any] = {}

    def walk(tree: Mapping[str, Any], path: str) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, f"{path}{key}/")
            else:
                flat[f"{path}{key}"] = value

    walk(params, "")
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        t = torch.as_tensor(value, dtype=torch.float32)
        if parts[-1] == "kernel":
            if t.dim() == 2:
                t = t.t()
            elif parts[-2].startswith("ConvTranspose"):
                t = t.permute(2, 3, 0, 1).flip(2, 3)
            else:
                t = t.permute(3, 2, 0, 1)
            parts[-1] = "weight"
        elif parts[-1] == "scale":
            parts[-1] = "weight"
        out[prefix + ".".join(parts)] = t.contiguous()
    return out


register(Mechanism(
    name="maxim_mab", paper="MAXIM: Multi-Axis MLP for Image Processing (CVPR 2022)", repo="google-research/maxim",
    family="local+global", dims=("2d",),
    **image_layer(cross="one feature map mixed along its own window and grid axes; the cross-gating form is "
                  "the separate maxim_cgb"),
    cls=MaximMultiAxisGmlp,
    make=lambda dim, num_heads, **kw: MaximMultiAxisGmlp(dim, **{"block_size": 7, "grid_size": 7,
                                                                  "residual": False, **kw}),
    notes="gated MLP, not softmax attention: learned n x n token-mixing matrices over each 7x7 window (local) and "
          "over the 7x7 dilated grid (global), on half the channels each, so 'local+global'; make: block = grid "
          "= 7 for 56x56 / 14x14 maps (MAXIM: 16 and 8) and residual=False (the official block adds x; the "
          "registry's caller does); num_heads is unused (no heads); extents must divide by 7 unless "
          "padding='reflect'; official Flax names"))
