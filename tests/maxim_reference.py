"""Float64 references of MAXIM's blocks written from the official Flax code (google-research/maxim
``maxim/models/maxim.py``), for ``tests/layers/test_maxim_mab.py`` and ``test_maxim_cgb.py``: the blocking is an
explicit gather built with loops (window ``(gi, gj)``, slot ``(pi, pj)``, pixel ``(gi f_h + pi, gj f_w + pj)``), the
token-mixing Dense an einsum over the swapped axis with the Flax kernel ``[in, out]``, LayerNorm (eps 1e-6) and
the tanh GELU written out. Nothing here calls the library's fast path. Also: ``randomize`` (every parameter
~ N(0, 0.5)) and ``flax_case`` (a case of ``tests/data/maxim_flax_parity.npz``, the official Flax modules' outputs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

EPS = 1e-6


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * ln.weight + ln.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def dense(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    kernel = layer.weight.t()  # Flax [in, out]
    out = torch.einsum("...i,io->...o", x, kernel)
    return out if layer.bias is None else out + layer.bias


def block_index(h: int, w: int, patch: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    fh, fw = patch
    gh, gw = h // fh, w // fw
    rows = [[0] * (fh * fw) for _ in range(gh * gw)]
    cols = [[0] * (fh * fw) for _ in range(gh * gw)]
    for gi in range(gh):
        for gj in range(gw):
            for pi in range(fh):
                for pj in range(fw):
                    rows[gi * gw + gj][pi * fw + pj] = gi * fh + pi
                    cols[gi * gw + gj][pi * fw + pj] = gj * fw + pj
    return torch.tensor(rows), torch.tensor(cols)


def block_images(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, c)`` -> ``(B, G, P, c)``."""
    r, c = block_index(x.shape[1], x.shape[2], patch)
    return x[:, r, c]


def unblock_images(t: torch.Tensor, h: int, w: int, patch: tuple[int, int]) -> torch.Tensor:
    r, c = block_index(h, w, patch)
    out = t.new_zeros(t.shape[0], h, w, t.shape[-1])
    out[:, r, c] = t
    return out


def spatial_dense(v: torch.Tensor, layer: torch.nn.Linear, axis: int) -> torch.Tensor:
    """Flax ``swapaxes(v, -1, axis)`` -> ``Dense(n)`` -> swap back, on ``(B, G, P, c)`` (axis -3: G, -2: P)."""
    kernel = layer.weight.t()
    if axis == -3:
        out = torch.einsum("bgpc,gk->bkpc", v, kernel)
        return out if layer.bias is None else out + layer.bias[None, :, None, None]
    out = torch.einsum("bgpc,pk->bgkc", v, kernel)
    return out if layer.bias is None else out + layer.bias[None, None, :, None]


def gmlp_layer(layer, x: torch.Tensor, axis: str, size: tuple[int, int]) -> torch.Tensor:
    """``GridGmlpLayer`` (``size`` = grid) / ``BlockGmlpLayer`` (``size`` = block)."""
    h, w = x.shape[1], x.shape[2]
    patch = (h // size[0], w // size[1]) if axis == "grid" else size
    unit = layer.GridGatingUnit if axis == "grid" else layer.BlockGatingUnit
    xb = block_images(x, patch)
    y = gelu(dense(layer_norm(xb, layer.LayerNorm), layer.in_project))
    m = y.shape[-1] // 2
    u, v = y[..., :m], y[..., m:]
    v = spatial_dense(layer_norm(v, unit.intermediate_layernorm), unit.Dense_0, -3 if axis == "grid" else -2)
    y = dense(u * (v + 1.0), layer.out_project)
    return unblock_images(xb + y, h, w, patch)


def reflect_rows(n: int, before: int, after: int) -> list[int]:
    """numpy ``np.pad(mode="reflect")`` indices, by folding."""
    out = []
    for i in range(-before, n + after):
        j = i
        while n > 1 and not 0 <= j < n:
            j = -j if j < 0 else 2 * (n - 1) - j
        out.append(0 if n == 1 else j)
    return out


def pad_to(x: torch.Tensor, multiple: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[1], x.shape[2]
    ph, pw = -h % multiple[0], -w % multiple[1]
    x = x[:, reflect_rows(h, ph // 2, ph - ph // 2)][:, :, reflect_rows(w, pw // 2, pw - pw // 2)]
    return x, (ph // 2, pw // 2, h, w)


def multiple_of(*sizes: tuple[int, int]) -> tuple[int, int]:
    return math.lcm(*(s[0] for s in sizes)), math.lcm(*(s[1] for s in sizes))


def mab(m, x: torch.Tensor) -> torch.Tensor:
    """``ResidualSplitHeadMultiAxisGmlpLayer`` (``m.residual=False``: without the final ``+ shortcut``)."""
    box = None
    if m.padding is not None:
        x, box = pad_to(x, multiple_of(m.block_size, m.grid_size))
    t = gelu(dense(layer_norm(x, m.LayerNorm_in), m.in_project))
    c = t.shape[-1] // 2
    u = gmlp_layer(m.GridGmlpLayer, t[..., :c], "grid", m.grid_size)
    v = gmlp_layer(m.BlockGmlpLayer, t[..., c:], "block", m.block_size)
    y = dense(torch.cat([u, v], -1), m.out_project)
    y = y + x if m.residual else y
    if box is not None:
        top, left, h, w = box
        y = y[:, top:top + h, left:left + w]
    return y


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    out = torch.einsum("bhwc,oc->bhwo", x, conv.weight[:, :, 0, 0])
    return out if conv.bias is None else out + conv.bias


def conv_transpose_2x2(y: torch.Tensor, conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """``out[2i + a, 2j + b] = sum_c y[i, j, c] W[c, :, a, b] + bias`` (PyTorch's weight layout)."""
    b, h, w, _ = y.shape
    out = y.new_zeros(b, 2 * h, 2 * w, conv.weight.shape[1])
    for a in range(2):
        for bb in range(2):
            out[:, a::2, bb::2] = torch.einsum("bhwc,co->bhwo", y, conv.weight[:, :, a, bb])
    return out if conv.bias is None else out + conv.bias


def spatial_gating_weights(g, x: torch.Tensor) -> torch.Tensor:
    """``GetSpatialGatingWeights``."""
    h, w = x.shape[1], x.shape[2]
    t = gelu(dense(layer_norm(x, g.LayerNorm_in), g.in_project))
    c = t.shape[-1] // 2
    grid_patch = (h // g.grid_size[0], w // g.grid_size[1])
    u = unblock_images(spatial_dense(block_images(t[..., :c], grid_patch), g.Dense_0, -3), h, w, grid_patch)
    v = unblock_images(spatial_dense(block_images(t[..., c:], g.block_size), g.Dense_1, -2), h, w, g.block_size)
    return dense(torch.cat([u, v], -1), g.out_project)


def cgb(m, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``CrossGatingBlock`` -> ``(x_out, y_out)``; ``y`` None: ``y = x``; ``m.padding``: pad after the convs."""
    y = x if y is None else y
    if m.upsample_y:
        y = conv_transpose_2x2(y, m.ConvTranspose_0)
    x, y = conv1x1(x, m.Conv_0), conv1x1(y, m.Conv_1)
    box = None
    if m.padding is not None:
        mult = multiple_of(m.block_size, m.grid_size)
        x, box = pad_to(x, mult)
        y, _ = pad_to(y, mult)
    sx, sy = x, y
    x = gelu(dense(layer_norm(x, m.LayerNorm_x), m.in_project_x))
    gx = spatial_gating_weights(m.SplitHeadMultiAxisGating_x, x)
    y = gelu(dense(layer_norm(y, m.LayerNorm_y), m.in_project_y))
    gy = spatial_gating_weights(m.SplitHeadMultiAxisGating_y, y)
    y = dense(y * gx, m.out_project_y) + sy
    x = dense(x * gy, m.out_project_x) + y + sx
    if box is not None:
        top, left, h, w = box
        x, y = x[:, top:top + h, left:left + w], y[:, top:top + h, left:left + w]
    return x, y


PARITY = Path(__file__).resolve().parent / "data" / "maxim_flax_parity.npz"


def randomize(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.5) (LayerNorm affines and spatial biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


def flax_case(name: str):
    data = np.load(PARITY)
    pre = f"{name}/params/"
    params = {k[len(pre):]: data[k] for k in data.files if k.startswith(pre)}
    ins = [torch.from_numpy(data[f"{name}/input_{j}"]) for j in range(2) if f"{name}/input_{j}" in data.files]
    outs = [torch.from_numpy(data[f"{name}/output_{j}"]) for j in range(2) if f"{name}/output_{j}" in data.files]
    return params, ins, outs
