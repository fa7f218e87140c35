"""DCAL PWCA (PROVISIONAL, from the paper; no official code exists) computed the straightforward way the public
re-implementations do: ``qkv`` of both images of each pair (in training each image is paired with the previous one
of the batch, the module's default; in eval it is self-attention), concatenate the keys and values, explicit
``q @ k^T`` softmax over the ``2N`` keys, ``@ v``, ``proj``."""

from __future__ import annotations

import torch


def pwca_baseline(module, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    n, heads = h * w, module.num_heads
    t1 = x.reshape(b, n, c)
    q, k, v = module.qkv(t1).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    if module.training:
        t2 = x.roll(1, 0).reshape(b, n, c)
        _, k2, v2 = module.qkv(t2).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
    attn = ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    return module.proj((attn @ v).transpose(1, 2).reshape(b, n, c)).reshape(b, h, w, c)


BASELINES = {"pwca": pwca_baseline}
