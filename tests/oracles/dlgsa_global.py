"""DLGSANet SparseGSA the way NeonLeexiang/DLGSANet computes it (``SparseAttention``, training-time forward):
channels-first ``qkv`` and ``qkv_dwconv``, ``chunk``, ``(B, heads, d, H*W)`` rearrange, ``F.normalize`` of q and k,
``q @ k^T * temperature``, the activation, ``attn @ v``, rearrange back, ``project_out``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nearfar.layers.dlgsa_global import SparseGSA


def sparse_gsa_baseline(m: SparseGSA, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    qkv = m.qkv_dwconv(m.qkv(x.permute(0, 3, 1, 2)))
    q, k, v = (t.reshape(b, m.num_heads, c // m.num_heads, h * w) for t in qkv.chunk(3, dim=1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = m.act((q @ k.transpose(-2, -1)) * m.temperature)
    out = (attn @ v).reshape(b, c, h, w)
    return m.project_out(out).permute(0, 2, 3, 1)


BASELINES = {"dlgsa_global": sparse_gsa_baseline}
