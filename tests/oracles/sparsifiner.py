"""Sparsifiner attention computed the way the official ``src/models/sparsifiner.py`` does it (``MaskPredictor.forward``
and ``Attention.forward``, evaluation path: no token pruning).

Tokens ``(B, N, C)`` (CLS first when the module has one), ``qkv`` reshaped ``(B, N, 3, h, d)``; the predictor on every
row, CLS row dropped after the coefficient logits; coefficient top-k scattered into zeros; ``nn.Threshold`` on
``|proj_back_n|^T``; ``torch.topk`` of the approximate attention scattered into a float mask, an all-ones CLS row
concatenated, the mask detached; dense ``q k^T`` with ``masked_fill(-inf)``, softmax, ``nan_to_num``, ``@ v``,
``proj``; the module's own weights. (At a map size other than ``input_size`` the module's table resize, which the
official code does not have, is reused.)
"""

from __future__ import annotations

import math

import torch

from nearfar.layers.sparsifiner import SparsifinerAttention, resize_token_table


def sparsifiner_official(m: SparsifinerAttention, x: torch.Tensor, cls: torch.Tensor | None = None):
    b, hgt, wid, c = x.shape
    h = m.num_heads
    tokens = x.reshape(b, hgt * wid, c)
    if cls is not None:
        tokens = torch.cat([cls[:, None], tokens], 1)
    n_cls = int(m.cls_token)
    n = tokens.shape[1]
    qkv = m.qkv(tokens).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]

    mp = m.mask_predictor
    budget = math.ceil(m.attn_keep_rate * n)
    qp, kp = mp.proj_c_q(q), mp.proj_c_k(k)
    kp = kp.permute(0, 1, 3, 2) @ resize_token_table(mp.proj_n, n_cls, m.input_size, (hgt, wid))
    basis = torch.nn.Threshold(m.basis_threshold, 0.0)(
        resize_token_table(mp.proj_back_n, n_cls, m.input_size, (hgt, wid)).permute(1, 0).abs())
    cheap = (qp @ kp) * mp.scale
    coef = cheap[..., n_cls:, :].softmax(dim=-1)
    if m.basis_coef_topk is not None and m.basis_coef_topk < coef.shape[-1]:
        top, top_i = coef.topk(m.basis_coef_topk, sorted=False)
        coef = torch.zeros_like(coef).scatter_(-1, top_i, top)
    approx = coef @ basis
    score = approx.clone()
    cont = torch.topk(score, min(budget, n), sorted=False)[1]
    mask = torch.zeros_like(score).scatter_(-1, cont, True)
    if n_cls:
        mask = torch.cat([torch.ones(b, h, n_cls, n, dtype=mask.dtype), mask], dim=2)
    mask = mask.detach()

    attn = (q @ k.transpose(-2, -1)) * m.scale
    attn.masked_fill_(~mask.bool(), float("-inf"))
    attn = attn.softmax(dim=-1)
    attn = torch.nan_to_num(attn)
    out = m.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
    if n_cls:
        return out[:, n_cls:].reshape(b, hgt, wid, c), out[:, 0]
    return out.reshape(b, hgt, wid, c)


BASELINES = {"sparsifiner": sparsifiner_official}
