"""LongHeads (Lu et al., arXiv 2402.10685; LuLuLuyi/LongHeads ``modeling_longheads/modeling_llama.py``,
``LlamaAttention.forward``) the way the official decoding branch computes one query, in float64 with plain loops
over (sequence, query head, query): chunk summaries from each chunk's locally rotated attention on itself, the
top-scoring chunks by the un-rotated query, the chosen chunks' un-rotated keys gathered in order, new positions
``0 .. len-1`` with the query last, RoPE, one softmax. Our documented choices: the query's own chunk is always the
tail (its own key included), fewer chunks than the budget means all of them, per-query-head choices under GQA.
Parameters are read from the module and cast to float64 inside, so gradients reach the module's parameters."""

from __future__ import annotations

import math

import torch
from reference import rope


def _linear(x, lin):
    y = x @ lin.weight.double().T
    return y if lin.bias is None else y + lin.bias.double()


def project(m, x):
    """Un-rotated q ``(B, H, N, d)``, k, v ``(B, G, N, d)`` in float64."""
    x = x.double()
    b, n, _ = x.shape
    d = m.head_dim

    def heads(t, h):
        return t.reshape(b, n, h, d).transpose(1, 2)

    return heads(_linear(x, m.q_proj), m.num_heads), heads(_linear(x, m.k_proj), m.num_kv_heads), \
        heads(_linear(x, m.v_proj), m.num_kv_heads)


def summary(qc, kc, vc):
    """``r`` of one chunk from its un-rotated queries, keys and values ``(w, d)`` (one query head)."""
    w, d = qc.shape
    pos = torch.arange(w)
    ql, kl = rope(qc, pos), rope(kc, pos)
    u = (torch.softmax(ql @ kl.T / math.sqrt(d), -1) @ vc).mean(0)
    return torch.softmax(kl @ u / math.sqrt(d), -1) @ kl


def chosen_chunks(m, q, summaries, bi, hi, i):
    """The whole chunks (ascending) query ``i`` of head ``hi`` reads (None: ordinary attention), and the gap between
    the last score taken and the best one left (inf if none is left: a choice closer than that may flip in float32).
    ``summaries[c]`` is chunk ``c``'s ``r`` for this (sequence, head)."""
    w, nc = m.chunk_size, m.num_chunks
    if i < m.begin_selective_length:
        return None, math.inf
    own = i // w
    if own <= nc - 1:
        return list(range(own)), math.inf
    scores = {c: float(q[bi, hi, i].detach() @ summaries[c]) for c in range(1, own - 1)}
    ranked = sorted(scores, key=lambda c: -scores[c])
    top = ranked[:nc - 3]
    gap = scores[top[-1]] - scores[ranked[nc - 3]] if nc - 3 < len(ranked) and top else math.inf
    return sorted([0, own - 1] + top), gap


def all_summaries(m, q, k, v):
    """``{(b, h): [r_0, r_1, ...]}`` over the whole chunks, no gradient."""
    b, h, n, _ = q.shape
    w, g = m.chunk_size, m.num_heads // m.num_kv_heads
    with torch.no_grad():
        return {(bi, hi): [summary(q[bi, hi, c * w:(c + 1) * w], k[bi, hi // g, c * w:(c + 1) * w],
                                   v[bi, hi // g, c * w:(c + 1) * w]) for c in range(n // w)]
                for bi in range(b) for hi in range(h)}


def longheads_reference(m, x, return_choices=False):
    """The layer's output ``(B, N, dim)`` in float64; with ``return_choices`` also ``{(b, h, i): chunks}`` and the
    smallest score gap of any choice (see ``chosen_chunks``)."""
    q, k, v = project(m, x)
    b, h, n, d = q.shape
    w = m.chunk_size
    g = h // m.num_kv_heads
    summaries = all_summaries(m, q, k, v)
    rows, choices, gap = [], {}, math.inf
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                chunks, gi = chosen_chunks(m, q, summaries[bi, hi], bi, hi, i)
                choices[bi, hi, i], gap = chunks, min(gap, gi)
                if chunks is None:
                    tokens = list(range(i + 1))
                else:
                    tokens = [c * w + o for c in chunks for o in range(w)] + list(range(i // w * w, i + 1))
                idx = torch.tensor(tokens)
                pos = torch.arange(len(tokens))
                kk = rope(k[bi, hi // g, idx], pos)
                qq = rope(q[bi, hi, i][None], pos[-1:])
                p = torch.softmax((qq @ kk.T)[0] / math.sqrt(d), -1)
                rows.append(p @ v[bi, hi // g, idx])
    out = torch.stack(rows).reshape(b, h, n, d)
    out = _linear(out.transpose(1, 2).reshape(b, n, h * d), m.o_proj)
    return (out, choices, gap) if return_choices else out

BASELINES: dict = {}  # a sequence layer: nothing for the vision benchmark (benchmarks/vision.py reads every file's)
