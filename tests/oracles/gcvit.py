"""GC ViT the way NVlabs/GCVit ``models/gc_vit.py`` computes it: partition into ``ws x ws`` windows (``H, W``
divisible by the window, as the classification code requires), project per window, ``q @ k^T`` with the scale on
``q``, add the relative position bias gathered with Swin's ``relative_position_index``, softmax, ``@ v``, project,
reverse the partition. The global block repeats the generated queries over the windows of each image (NVlabs'
``q_global.repeat(1, B_ // B, 1, 1, 1)``); the query generator is the module's own (convolutions, not attention)."""

from __future__ import annotations

import torch

from nearfar.layers.gcvit import GCViTWindowAttention, GlobalQueryAttention


def _partition(x: torch.Tensor, ws: tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], c)


def _reverse(windows: torch.Tensor, ws: tuple[int, int], b: int, h: int, w: int) -> torch.Tensor:
    x = windows.view(b, h // ws[0], w // ws[1], ws[0], ws[1], -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


def _relative_position_index(ws: tuple[int, int]) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + ws[0] - 1) * (2 * ws[1] - 1) + rel[..., 1] + ws[1] - 1


def _attention(m, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = q.shape[2]
    bias = m.rel_pos.relative_position_bias_table[_relative_position_index(m.window_size).view(-1)]
    bias = bias.view(n, n, -1).permute(2, 0, 1)
    attn = ((q * m.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(q.shape[0], n, -1)


def gcvit_local_baseline(m: GCViTWindowAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    win = _partition(x, m.window_size)
    qkv = m.qkv(win).reshape(win.shape[0], win.shape[1], 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    out = m.proj(_attention(m, qkv[0], qkv[1], qkv[2]))
    return _reverse(out, m.window_size, b, h, w)


def gcvit_global_baseline(m: GlobalQueryAttention, x: torch.Tensor, q_global: torch.Tensor | None = None):
    b, h, w, c = x.shape
    if q_global is None:
        q_global = m.global_query(x)
    n = m.window_size[0] * m.window_size[1]
    qg = q_global.reshape(q_global.shape[0], 1, n, m.num_heads, m.head_dim).permute(0, 1, 3, 2, 4)
    win = _partition(x, m.window_size)
    kv = m.qkv(win).reshape(win.shape[0], n, 2, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q = qg.expand(b, win.shape[0] // b, -1, -1, -1).reshape(win.shape[0], m.num_heads, n, m.head_dim)
    out = m.proj(_attention(m, q, kv[0], kv[1]))
    return _reverse(out, m.window_size, b, h, w)


BASELINES = {"gcvit_local": gcvit_local_baseline, "gcvit_global": gcvit_global_baseline}
