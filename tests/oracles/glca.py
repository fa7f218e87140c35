"""DCAL GLCA (PROVISIONAL, from the paper; no official code exists) computed the straightforward way the public
re-implementations do: project ``qkv`` for every token, score with the module's default rule (the mean token's query
against every key, softmax, head mean), ``topk``, gather the selected rows of ``q``, explicit ``q @ k^T`` softmax
over all keys, ``@ v``, ``proj``, and scatter the outputs into a zero map (the module's ``forward`` layout)."""

from __future__ import annotations

import torch


def glca_baseline(module, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    n, heads = h * w, module.num_heads
    d = c // heads
    t = x.reshape(b, n, c)
    q, k, v = module.qkv(t).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        wq, bq = module.qkv.weight[:c], module.qkv.bias[:c]
        qbar = (t.mean(1) @ wq.T + bq).reshape(b, heads, 1, d)
        scores = ((qbar @ k.transpose(-2, -1)) * module.scale).softmax(-1).mean(1)[:, 0]  # (b, n)
        idx = scores.topk(module.num_local(n), dim=-1).indices
    q_local = q.gather(2, idx[:, None, :, None].expand(-1, heads, -1, d))
    attn = ((q_local * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    out = module.proj((attn @ v).transpose(1, 2).reshape(b, -1, c))
    full = torch.zeros(b, n, c, dtype=out.dtype, device=out.device)
    return full.scatter(1, idx[..., None].expand(-1, -1, c), out).reshape(b, h, w, c)


BASELINES = {"glca": glca_baseline}
