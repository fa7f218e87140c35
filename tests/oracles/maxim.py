"""MAXIM's multi-axis gMLP block and cross-gating block the way the official code computes them (google-research/maxim
``maxim/models/maxim.py``, Flax): ``block_images_einops`` / ``unblock_images_einops`` around
every gMLP layer and every spatial gating weight, the token-mixing Dense applied after ``swapaxes`` and swapped
back, ``jnp.split`` halves, concatenations, and the convolutions as convolutions (channels-first, as a PyTorch port
runs them). The two rearranges are written as the reshape / permute / reshape that einops performs for them
(einops is not a test dependency). Uses the module's own parameters; differentiable. Extents must be divisible.
Used for the vision benchmark's baseline and as a test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.maxim_cgb import MaximCrossGating, SpatialGatingWeights
from nearfar.layers.maxim_mab import GmlpLayer, MaximMultiAxisGmlp

from . import nn_linear


def block_images_einops(x: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``"n (gh fh) (gw fw) c -> n (gh gw) (fh fw) c"``."""
    n, h, w, c = x.shape
    fh, fw = patch_size
    gh, gw = h // fh, w // fw
    return x.reshape(n, gh, fh, gw, fw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, fh * fw, c)


def unblock_images_einops(x: torch.Tensor, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """``"n (gh gw) (fh fw) c -> n (gh fh) (gw fw) c"``."""
    n, c = x.shape[0], x.shape[-1]
    (gh, gw), (fh, fw) = grid_size, patch_size
    return x.reshape(n, gh, gw, fh, fw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, gh * fh, gw * fw, c)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gmlp_layer(layer: GmlpLayer, x: torch.Tensor) -> torch.Tensor:
    """``GridGmlpLayer`` / ``BlockGmlpLayer`` with ``GridGatingUnit`` / ``BlockGatingUnit``."""
    n, h, w, c = x.shape
    if layer.axis == "grid":
        gh, gw = layer.size
        fh, fw = h // gh, w // gw
    else:
        fh, fw = layer.size
        gh, gw = h // fh, w // fw
    x = block_images_einops(x, (fh, fw))
    y = gelu(nn_linear(layer.in_project, layer.LayerNorm(x)))
    unit = getattr(layer, layer.unit_name)
    u, v = y.chunk(2, dim=-1)
    v = unit.intermediate_layernorm(v)
    swap = -3 if layer.axis == "grid" else -2
    v = unit.Dense_0(v.swapaxes(-1, swap)).swapaxes(-1, swap)
    y = nn_linear(layer.out_project, u * (v + 1.0))
    y = F.dropout(y, layer.dropout_rate, layer.training)
    return unblock_images_einops(x + y, (gh, gw), (fh, fw))


def mab_baseline(m: MaximMultiAxisGmlp, x: torch.Tensor) -> torch.Tensor:
    """``ResidualSplitHeadMultiAxisGmlpLayer``."""
    shortcut = x
    x = gelu(nn_linear(m.in_project, m.LayerNorm_in(x)))
    u, v = x.chunk(2, dim=-1)
    x = torch.cat([gmlp_layer(m.GridGmlpLayer, u), gmlp_layer(m.BlockGmlpLayer, v)], dim=-1)
    x = F.dropout(nn_linear(m.out_project, x), m.dropout_rate, m.training)
    return x + shortcut if m.residual else x


def spatial_gating_weights(g: SpatialGatingWeights, x: torch.Tensor) -> torch.Tensor:
    """``GetSpatialGatingWeights``."""
    n, h, w, c = x.shape
    x = gelu(nn_linear(g.in_project, g.LayerNorm_in(x)))
    u, v = x.chunk(2, dim=-1)
    gh, gw = g.grid_size
    fh, fw = h // gh, w // gw
    u = block_images_einops(u, (fh, fw))
    u = g.Dense_0(u.swapaxes(-1, -3)).swapaxes(-1, -3)
    u = unblock_images_einops(u, (gh, gw), (fh, fw))
    fh, fw = g.block_size
    gh, gw = h // fh, w // fw
    v = block_images_einops(v, (fh, fw))
    v = g.Dense_1(v.swapaxes(-1, -2)).swapaxes(-1, -2)
    v = unblock_images_einops(v, (gh, gw), (fh, fw))
    x = nn_linear(g.out_project, torch.cat([u, v], dim=-1))
    return F.dropout(x, g.dropout_rate, g.training)


def conv_nhwc(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def cgb_baseline(m: MaximCrossGating, x: torch.Tensor, y: torch.Tensor | None = None,
                 return_y: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``CrossGatingBlock`` (``y = x`` when omitted, the registry's self form)."""
    y = x if y is None else y
    if m.upsample_y:
        y = conv_nhwc(m.ConvTranspose_0, y)
    x = conv_nhwc(m.Conv_0, x)
    y = conv_nhwc(m.Conv_1, y)
    assert y.shape == x.shape
    shortcut_x, shortcut_y = x, y
    x = gelu(nn_linear(m.in_project_x, m.LayerNorm_x(x)))
    gx = spatial_gating_weights(m.SplitHeadMultiAxisGating_x, x)
    y = gelu(nn_linear(m.in_project_y, m.LayerNorm_y(y)))
    gy = spatial_gating_weights(m.SplitHeadMultiAxisGating_y, y)
    y = F.dropout(nn_linear(m.out_project_y, y * gx), m.dropout_rate, m.training) + shortcut_y
    x = F.dropout(nn_linear(m.out_project_x, x * gy), m.dropout_rate, m.training) + y + shortcut_x
    return (x, y) if return_y else x


BASELINES = {"maxim_mab": mab_baseline, "maxim_cgb": cgb_baseline}
