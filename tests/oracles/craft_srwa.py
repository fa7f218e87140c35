"""CRAFT SRWAB attention the way AVC2-UESTC/CRAFT-SR ``craft_arch.py`` computes it: LayerNorm, ``qkv``, roll each
channel half by its shift, ``img2windows`` (NCHW view + permute) into ``H_sp x W_sp`` rectangles, ``q * scale @ k^T``
plus the dynamic position bias gathered with the query-minus-key ``relative_position_index``, softmax, ``@ v``,
``windows2img``, roll back, concatenate, add the depth-wise conv of v, project."""

from __future__ import annotations

import torch

from nearfar.layers.craft_srwa import SRWAttention


def _relative_position_index(r: int, c: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + r - 1) * (2 * c - 1) + rel[..., 1] + c - 1


def _rwin(branch, q, k, v, scale: float, heads: int) -> torch.Tensor:
    """q, k, v: (B, H, W, C/2) already rolled; returns (B, H, W, C/2)."""
    b, h, w, c = q.shape
    r, s = branch.window

    def im2win(t):
        t = t.permute(0, 3, 1, 2).reshape(b, c, h // r, r, w // s, s).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(-1, r * s, heads, c // heads).permute(0, 2, 1, 3)

    q, k, v = im2win(q), im2win(k), im2win(v)
    attn = (q * scale) @ k.transpose(-2, -1)
    pos = branch.pos(branch.offsets)
    bias = pos[_relative_position_index(r, s).view(-1)].view(r * s, r * s, -1).permute(2, 0, 1)
    attn = (attn + bias.unsqueeze(0)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(-1, r * s, c)
    return out.view(b, h // r, w // s, r, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def craft_srwa_baseline(m: SRWAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    qkv = m.qkv(m.norm1(x)).reshape(b, h, w, 3, c).permute(3, 0, 1, 2, 4)  # 3, B, H, W, C
    a, s = m.shift_size
    halves = []
    for i, shift in enumerate(((a, s), (s, a))):
        part = qkv[..., i * c // 2:(i + 1) * c // 2]
        if a > 0 or s > 0:
            part = torch.roll(part, shifts=(-shift[0], -shift[1]), dims=(2, 3))
        out = _rwin(m.attns[i], part[0], part[1], part[2], m.scale, m.num_heads // 2)
        if a > 0 or s > 0:
            out = torch.roll(out, shifts=shift, dims=(1, 2))
        halves.append(out)
    lcm = m.get_v(qkv[2].permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
    return m.proj(torch.cat(halves, dim=-1) + lcm)


BASELINES = {"craft_srwa": craft_srwa_baseline}
