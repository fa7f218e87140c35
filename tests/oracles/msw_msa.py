"""MSW-MSA the way megvii-research/HiDiffusion computes it around diffusers' ``attn1``: bicubic-resize odd maps to an
even size, ``torch.roll`` by ``-shift``, partition into the 2x2 windows with ``view``/``permute``, run the diffusers
attention per window (``to_q``/``to_k``/``to_v``, ``F.scaled_dot_product_attention`` as ``AttnProcessor2_0``,
``to_out``), reverse the partition, roll back, resize back. The shift is drawn like the module's (``draw_shift``),
so with the same RNG state both use the same shift."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.msw_msa import MSWAttention, draw_shift, msw_window


def _diffusers_attn1(m: MSWAttention, windows: torch.Tensor) -> torch.Tensor:
    bw, n, c = windows.shape
    q, k, v = (t.view(bw, n, m.num_heads, m.head_dim).transpose(1, 2)
               for t in (m.to_q(windows), m.to_k(windows), m.to_v(windows)))
    out = F.scaled_dot_product_attention(q, k, v, scale=m.scale)
    return m.to_out[0](out.transpose(1, 2).reshape(bw, n, c))


def msw_msa_baseline(m: MSWAttention, x: torch.Tensor, shift: tuple[int, int] | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    b, h, w, c = x.shape
    wh, ww = msw_window(h, w)
    shift = draw_shift((wh, ww), generator) if shift is None else shift
    if h % 2 or w % 2:
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(2 * wh, 2 * ww), mode="bicubic").permute(0, 2, 3, 1)
    if shift[0] > 0 or shift[1] > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = x.reshape(b, 2, wh, 2, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, wh * ww, c)
    out = _diffusers_attn1(m, windows)
    out = out.view(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * wh, 2 * ww, c)
    if shift[0] > 0 or shift[1] > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    if h % 2 or w % 2:
        out = F.interpolate(out.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    return out


BASELINES = {"msw_msa": msw_msa_baseline}
