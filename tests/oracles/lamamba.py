"""The LaMamba block the way yunxiangfu2001/LaMamba-Diff computes it without its CUDA kernels, with the module's
own parameters: ``LaMambaBlock_conditioned._forward`` (``model/lamamba.py``), ``SS2D.forwardv2`` /
``forward_corev2`` (``model/vmamba.py``) with the snake paths built by ``get_continuous_paths`` (Python loops,
``model/continuous_scan.py``), ``cross_scan_continuous`` (``index_select`` per path), the two einsums of
``x_proj`` / ``dt_projs``, the selective scan as ``selective_scan_ref`` (``kernels/selective_scan/
test_selective_scan.py``: ``exp(einsum)`` of all steps, then a loop over tokens) -- the official code has no
CPU path (``SelectiveScanCore`` calls the compiled ``selective_scan_cuda_core``), so its kernels' float
reference stands in for it -- and ``cross_merge_continuous``
(``gather`` + sum); the window attention is the official Swin path (``oracles.swin.swin_baseline``: roll,
``window_partition``, bias gather, region mask). Square maps only (the official paths take one side), extents
divisible by the window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.lamamba import SS2D, LaMambaBlock
from oracles.swin import swin_baseline


def get_continuous_paths(n: int):
    """``get_continuous_paths`` / ``lr_tranverse`` / ``tb_tranverse`` / ``reverse_permut``, as lists."""
    def lr(start_row, start_col, dir_row, dir_col):
        return [(start_row + dir_row * i) * n + start_col + dir_col * (j if i % 2 == 0 else n - 1 - j)
                for i in range(n) for j in range(n)]

    def tb(start_row, start_col, dir_row, dir_col):
        return [(start_row + dir_row * (i if j % 2 == 0 else n - 1 - i)) * n + start_col + dir_col * j
                for j in range(n) for i in range(n)]

    def reverse(path):
        out = [0] * len(path)
        for i, p in enumerate(path):
            out[p] = i
        return out

    paths_lr = [lr(0, 0, 1, 1), lr(n - 1, 0, -1, 1)]
    paths_tb = [tb(n - 1, 0, -1, 1), tb(n - 1, n - 1, -1, -1)]
    return paths_lr, paths_tb, [reverse(p) for p in paths_lr], [reverse(p) for p in paths_tb]


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus=True):
    """``selective_scan_ref`` for variable ``B, C (batch, G, N, L)``, real ``A``, no ``z``."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim = u.shape[0], A.shape[0]
    B = B.float().repeat_interleave(dim // B.shape[1], 1)  # repeat "B G N L -> B (G H) N L"
    C = C.float().repeat_interleave(dim // C.shape[1], 1)
    x = A.new_zeros((batch, dim, A.shape[1]))
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    return (y + u * D[:, None]).to(dtype_in)


def ss2d_baseline(op: SS2D, x: torch.Tensor) -> torch.Tensor:
    xz = op.in_proj(x)
    x, z = xz.chunk(2, dim=-1)
    z = F.silu(z)
    x = x.permute(0, 3, 1, 2).contiguous()
    if op.conv2d is not None:
        x = op.conv2d(x)
    x = F.silu(x)
    b, d, h, w = x.shape
    if h != w:
        raise ValueError("the official continuous scan needs a square map")
    length, n, rank = h * w, op.d_state, op.dt_rank
    if op.continuous_scan:
        paths_lr, paths_tb, reverse_lr, reverse_tb = (torch.tensor(p, device=x.device)
                                                      for p in get_continuous_paths(h))
        xs = x.new_empty((b, 4, d, length))
        for i in range(2):
            xs[:, i] = torch.index_select(x.flatten(2, 3), -1, paths_lr[i])
            xs[:, i + 2] = torch.index_select(x.flatten(2, 3), -1, paths_tb[i])
    else:  # VMamba's CrossScan
        xs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], 1)
        xs = torch.cat([xs, xs.flip(-1)], 1)
    x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs, op.x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [rank, n, n], dim=2)
    dts = torch.einsum("b k r l, k d r -> b k d l", dts, op.dt_projs_weight)
    ys = selective_scan_ref(xs.reshape(b, -1, length).float(), dts.reshape(b, -1, length).float(),
                            -torch.exp(op.A_logs.float()), bs.float(), cs.float(), op.Ds.float(),
                            op.dt_projs_bias.reshape(-1).float())
    ys = ys.view(b, 4, d, length)
    if op.continuous_scan:  # cross_merge_continuous
        index = torch.cat([reverse_lr, reverse_tb], 0).view(1, 1, 4, length).repeat(b, d, 1, 1)
        y = torch.gather(ys.permute(0, 2, 1, 3), -1, index).sum(2)
    else:  # CrossMerge
        y2 = ys[:, 0:2] + ys[:, 2:4].flip(-1)
        y = y2[:, 0] + y2[:, 1].view(b, d, w, h).transpose(2, 3).reshape(b, d, length)
    y = op.out_norm(y.transpose(1, 2).contiguous()).view(b, h, w, -1).to(x.dtype)
    return op.out_proj(y * z)


def lamamba_baseline(m: LaMambaBlock, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``LaMambaBlock_conditioned._forward`` minus ``x`` (the module returns the update); the unconditioned module:
    shift 0, scale 0, gate 1."""
    x0 = x
    if m.condition_dim is not None:
        mods = m.adaLN_modulation(m.condition_projection(c)[:, None, None, :]).chunk(9, dim=-1)
    else:
        mods = (0.0, 0.0, 1.0) * 3

    def modulate(t, shift, scale):
        return t * (1 + scale) + shift

    x = x + mods[2] * ss2d_baseline(m.op, modulate(m.norm(x), mods[0], mods[1]))
    x = x + mods[5] * swin_baseline(m.attn, modulate(m.norm_swin(x), mods[3], mods[4]))
    if m.mlp is not None:
        x = x + mods[8] * m.mlp(modulate(m.norm2(x), mods[6], mods[7]))
    return x - x0


BASELINES = {"lamamba": lamamba_baseline}
