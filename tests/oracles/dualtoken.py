"""DualToken-ViT mixer (PROVISIONAL design from the paper's abstract, no official code found) computed the plain
channels-first way: ConvNeXt-style conv encoder on ``(B, C, H, W)`` (permute for LN/MLP), stride-2 depth-wise +
point-wise convs, concatenation of the global tokens with the downsampled tokens and explicit ``q @ k^T`` softmax
attention for the refresh and the broadcast. No official DualToken-ViT code exists; this is the straightforward
implementation of the same design with the module's own weights (learned initial global tokens)."""

from __future__ import annotations

import torch

from oracles.maformer import _softmax_attention


def _heads(t, n_heads):
    b, n, c = t.shape
    return t.reshape(b, n, n_heads, c // n_heads).transpose(1, 2)


def dualtoken_baseline(module, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    heads, gs = module.num_heads, module.global_size
    xc = x.permute(0, 3, 1, 2).contiguous()
    loc = module.dwconv(xc).permute(0, 2, 3, 1)
    loc = module.pwconv2(module.act(module.pwconv1(module.norm(loc))))  # (B, H, W, C)
    ds = loc.permute(0, 3, 1, 2).contiguous()
    for step in module.downsample:
        if ds.shape[2] <= gs and ds.shape[3] <= gs:
            break
        ds = step(ds)
    x_ds = ds.flatten(2).transpose(1, 2)
    g = module.global_tokens.expand(b, -1, -1)
    tokens = torch.cat([g, x_ds], 1)
    att = module.global_attn
    q, k, v = att.qkv(tokens).chunk(3, -1)
    out = _softmax_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), att.scale)
    g_new = att.proj(out.transpose(1, 2).reshape(b, tokens.shape[1], c)[:, :g.shape[1]])
    br = module.broadcast
    t = loc.reshape(b, h * w, c)
    k, v = br.kv(g_new).chunk(2, -1)
    out = _softmax_attention(_heads(br.q(t), heads), _heads(k, heads), _heads(v, heads), br.scale)
    return (t + br.proj(out.transpose(1, 2).reshape(b, h * w, c))).reshape(b, h, w, c)


BASELINES = {"dualtoken": dualtoken_baseline}
