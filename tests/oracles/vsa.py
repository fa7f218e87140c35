"""VSA the way ViTAE-Transformer/ViTAE-VSA computes it (``Image-Classification/vitaev2_vsa/vsa.py``,
``VSAWindowAttention.forward``), on the module's own parameters: NCHW feature map (the channel-last input is
permuted, as ``NormalCell`` does), zero-padding bottom/right, the coordinate grids built as the official constructor
builds them (``linspace`` image reference, ``avg_pool2d`` window centres, centred ``arange`` slot offsets; made once
per size here, as the official module makes them once for its ``img_size``), the two predictor branches run
separately through the module's ``nn.Sequential`` (pool, LeakyReLU, 1x1 conv), the offsets divided in place,
``qkv`` as a 1x1 conv, two ``F.grid_sample`` calls (keys, then values) over ``B * heads`` padded maps, the window
partition by reshape/permute, ``q @ k^T * scale`` plus the bias gathered through ``relative_position_index``,
softmax, ``@ v``, the reverse partition, crop, ``proj`` as a 1x1 conv."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from nearfar.layers.vsa import VSAWindowAttention


@lru_cache(maxsize=32)
def _official_coords(hp: int, wp: int, ws: int, device: str, dtype: torch.dtype):
    """``(base_coords, coords)`` of the official constructor for a padded ``hp x wp`` map, each
    ``(1, 2, nH, ws, nW, ws)`` with channel 0 = x, 1 = y."""
    ref_w = torch.linspace(-1, 1, wp, dtype=dtype)
    ref_h = torch.linspace(-1, 1, hp, dtype=dtype)
    image_reference = torch.stack(torch.meshgrid(ref_w, ref_h, indexing="ij"), 0).permute(0, 2, 1).unsqueeze(0)
    window_reference = F.avg_pool2d(image_reference, kernel_size=ws)
    nh, nw = window_reference.shape[-2:]
    window_reference = window_reference.reshape(1, 2, nh, 1, nw, 1)
    base_h = torch.arange(ws, dtype=dtype) * 2 * ws / ws / (hp - 1)
    base_h = base_h - base_h.mean()
    base_w = torch.arange(ws, dtype=dtype) * 2 * ws / ws / (wp - 1)
    base_w = base_w - base_w.mean()
    exp_h = base_h.unsqueeze(0).repeat(nh, 1).reshape(-1)
    exp_w = base_w.unsqueeze(0).repeat(nw, 1).reshape(-1)
    coords = torch.stack(torch.meshgrid(exp_w, exp_h, indexing="ij"), 0).permute(0, 2, 1)
    coords = coords.reshape(1, 2, nh, ws, nw, ws)
    return (window_reference + coords).to(device), coords.to(device)


def vsa_baseline(m: VSAWindowAttention, x: torch.Tensor) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2)  # NormalCell: x.view(b, H, W, c).permute(0, 3, 1, 2)
    b, _, h, w = x.shape
    ws, heads, out_dim = m.window_size, m.num_heads, m.out_dim
    d = out_dim // heads
    shortcut = x
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    hp, wp = h + pad_b, w + pad_r
    x = F.pad(x, (0, pad_r, 0, pad_b))
    base_coords, rel_coords = _official_coords(hp, wp, ws, str(x.device), x.dtype)
    nh, nw = base_coords.shape[-4], base_coords.shape[-2]
    coords = base_coords.repeat(b * heads, 1, 1, 1, 1, 1)
    total = b * heads
    sampling_offsets = m.sampling_offsets(x).reshape(total, 2, nh, nw)
    sampling_offsets[:, 0, ...] = sampling_offsets[:, 0, ...] / (w // ws)
    sampling_offsets[:, 1, ...] = sampling_offsets[:, 1, ...] / (h // ws)
    sampling_scales = m.sampling_scales(x).reshape(total, 2, nh, nw)
    coords = (coords + rel_coords * sampling_scales[:, :, :, None, :, None]
              + sampling_offsets[:, :, :, None, :, None])
    sample_coords = coords.permute(0, 2, 3, 4, 5, 1).reshape(total, ws * nh, ws * nw, 2)
    qkv = m.qkv(shortcut).reshape(b, 3, heads, d, h, w).transpose(1, 0).reshape(3 * b * heads, d, h, w)
    qkv = F.pad(qkv, (0, pad_r, 0, pad_b)).reshape(3, b * heads, d, hp, wp)
    q, k, v = qkv[0], qkv[1], qkv[2]
    k_sel = F.grid_sample(k, grid=sample_coords, padding_mode="zeros", align_corners=True).reshape(b * heads, d, hp, wp)
    v_sel = F.grid_sample(v, grid=sample_coords, padding_mode="zeros", align_corners=True).reshape(b * heads, d, hp, wp)

    def windows(t):
        t = t.reshape(b, heads, d, nh, ws, nw, ws).permute(0, 3, 5, 1, 4, 6, 2)
        return t.reshape(b * nh * nw, heads, ws * ws, d)

    q, k, v = windows(q), windows(k_sel), windows(v_sel)
    dots = (q @ k.transpose(-2, -1)) * m.scale
    bias = m.relative_position_bias_table[m.relative_position_index.view(-1)].view(ws * ws, ws * ws, -1)
    dots = dots + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    out = dots.softmax(dim=-1) @ v
    # rearrange '(b hh ww) h (ws1 ws2) d -> b (h d) (hh ws1) (ww ws2)'
    out = out.reshape(b, nh, nw, heads, ws, ws, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, out_dim, hp, wp)
    out = m.proj(out[:, :, :h, :w])
    return out.permute(0, 2, 3, 1)


BASELINES = {"vsa": vsa_baseline}
