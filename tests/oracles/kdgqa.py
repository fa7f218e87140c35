"""KDGQA, DGQA and PGQA the way yjzhang0505/key-driven-gqa computes them (``modules/attention/kdgqa.py``,
``dgqa.py``, ``pgqa.py``), in float64 with plain loops: Frobenius norms per KV head, the allocation rounded and fixed
up in Python, one explicit softmax per (sequence, query head), and our documented choices (the causal prefix
variant, deterministic fix-ups, all-equal norms -> uniform). Parameters are read from the module and cast to float64
inside, so gradients flow back to the module's own parameters."""

from __future__ import annotations

import math

import torch
from reference import rope

EPS32 = torch.finfo(torch.float32).eps


def linear(x, lin):
    y = x @ lin.weight.double().T
    return y if lin.bias is None else y + lin.bias.double()


def heads_of(t, h):
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def project(m, x, context=None):
    """q ``(B, H, N, d)``, k, v ``(B, G, M, d)`` in float64, rotated when the layer uses RoPE."""
    x = x.double()
    src = x if context is None else context.double()
    q = heads_of(linear(x, m.q_proj), m.num_heads)
    k, v = heads_of(linear(src, m.k_proj), m.num_kv_heads), heads_of(linear(src, m.v_proj), m.num_kv_heads)
    if m.rope is not None:
        q, k = rope(q, torch.arange(x.shape[1])), rope(k, torch.arange(src.shape[1]))
    return q, k, v


def output(m, o):
    """Per-head outputs ``(B, H, N, d)`` -> the output projection ``(B, N, dim)``."""
    b, h, n, d = o.shape
    return linear(o.transpose(1, 2).reshape(b, n, h * d), m.o_proj)


def allocate(weights, heads):
    """round(H w / sum w), then the first max loses one / the first min gains one until the sum is H."""
    g = len(weights)
    total = sum(weights)
    if not (total > 0 and math.isfinite(total)):
        return [heads // g] * g
    a = [round(heads * w / total) for w in weights]  # Python's round: half to even, as torch.round
    while sum(a) > heads:
        a[a.index(max(a))] -= 1
    while sum(a) < heads:
        a[a.index(min(a))] += 1
    return a


def kdgqa_counts(norms, heads):
    lo, hi = min(norms), max(norms)
    if hi - lo <= 4 * EPS32 * abs(hi):
        return [heads // len(norms)] * len(norms)
    return allocate([(n - lo) / (hi - lo) for n in norms], heads)


def head_kv(counts):
    return [g for g, c in enumerate(counts) for _ in range(c)]


def frobenius(k, mask=None, upto=None):
    """||k[:upto]||_F of one sequence's KV head ``k (N, d)`` over the real keys, a Python float."""
    total = 0.0
    for t in range(k.shape[0] if upto is None else upto):
        if mask is None or bool(mask[t]):
            total += float((k[t].detach() ** 2).sum())
    return math.sqrt(total)


def batch_norms(k, mask=None):
    return [sum(frobenius(k[b, g], None if mask is None else mask[b]) for b in range(k.shape[0]))
            for g in range(k.shape[1])]


def softmax_rows(q, k, v, allowed):
    """Explicit masked softmax attention of ``q (n, d)`` over ``k, v (M, d)``; ``allowed (n, M)``; a row without
    an allowed key is 0."""
    s = (q @ k.T) / math.sqrt(q.shape[-1])
    empty = ~allowed.any(-1, keepdim=True)
    s = s.masked_fill(~allowed | empty, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(s, -1) @ v * ~empty


def grouped(q, k, v, counts, mask=None):
    """Every (sequence, query head) with the KV head of the contiguous allocation ``counts``."""
    b, h, n, _ = q.shape
    kv = head_kv(counts)
    rows = []
    for i in range(b):
        allowed = torch.ones(n, k.shape[2], dtype=torch.bool)
        if mask is not None:
            allowed = allowed & mask[i][None, :]
        rows.append(torch.stack([softmax_rows(q[i, j], k[i, kv[j]], v[i, kv[j]], allowed) for j in range(h)]))
    return torch.stack(rows)


def kdgqa_reference(m, x, context=None, key_padding_mask=None):
    """The KDGQA layer ``m`` on ``x`` (and ``context`` for a cross layer) in float64."""
    q, k, v = project(m, x, context)
    if not m.causal or m.cross:
        return output(m, grouped(q, k, v, kdgqa_counts(batch_norms(k, key_padding_mask), m.num_heads),
                                 key_padding_mask))
    b, h, n, d = q.shape
    bs, g = m.block_size, m.num_kv_heads
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for i in range(b):
        mask = None if key_padding_mask is None else key_padding_mask[i]
        for j in range((n + bs - 1) // bs):
            rows = list(range(j * bs, min(n, (j + 1) * bs)))
            counts = kdgqa_counts([frobenius(k[i, c], mask, j * bs) for c in range(g)], h) if j else [h // g] * g
            allowed = torch.tensor([[t <= r and (mask is None or bool(mask[t])) for t in range(n)] for r in rows])
            for hh, c in enumerate(head_kv(counts)):
                out[i, hh, rows] = softmax_rows(q[i, hh, rows], k[i, c], v[i, c], allowed)
    return output(m, out)


def dgqa_counts(norms, cache, kind, heads):
    w = [abs(c - n) for n, c in zip(norms, cache)] if kind == "diff" else [0.9 * n + 0.1 * c
                                                                           for n, c in zip(norms, cache)]
    return allocate(w, heads)


class DGQAState:
    """The official DGQA state machine (deterministic fix-ups, a pure eval): cache, allocation, training steps."""

    def __init__(self, heads, kv_heads, kind, window):
        self.heads, self.kind, self.window = heads, kind, window
        self.cache, self.counts, self.steps = [0.0] * kv_heads, [heads // kv_heads] * kv_heads, 0

    def __call__(self, m, x, training, key_padding_mask=None):
        q, k, v = project(m, x)
        norms = batch_norms(k, key_padding_mask)
        if not training:
            counts = dgqa_counts(norms, self.cache, self.kind, self.heads)
        else:
            if self.steps % self.window == 0:
                self.counts = dgqa_counts(norms, self.cache, self.kind, self.heads)
                self.cache = [(c + n) / self.window for c, n in zip(self.cache, norms)]
            self.steps += 1
            counts = self.counts
        return output(m, grouped(q, k, v, counts, key_padding_mask)), counts


def pgqa_reference(m, x, noise=None):
    """PGQA in float64; ``noise (H, N*d)`` the raw uniform draws (training mode), None for eval (plain GQA)."""
    q, k, v = project(m, x)
    h, g = m.num_heads, m.num_kv_heads
    o = grouped(q, k, v, [h // g] * g)
    if noise is None:
        return output(m, o)
    b, _, n, d = o.shape
    gs = h // g
    rows = []
    for i in range(b):
        heads = []
        for j in range(h):
            row = o[i, j].reshape(-1)
            z = noise[j].double().clone()
            if j % gs < n * d:
                z[j % gs] = 0.0
            sd = float(z.std())
            z = (z - z.mean()) / (sd if sd != 0 else 1.0)
            heads.append((row - (z * row.std() + row.mean())).reshape(n, d))
        rows.append(torch.stack(heads))
    return output(m, torch.stack(rows))
