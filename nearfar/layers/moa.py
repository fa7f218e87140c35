"""MoA: Mixture of (sparse) Attention spans -- per-head, length-elastic sinks + sliding window (causal).

Paper: Fu et al., "Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous
Sliding-Window Lengths" (CoLM 2025). Official code: thu-nics/MoA -- ``MoA/attention/cache_utils.py``
(``moa_config_to_cache_config``: the span rule; ``StaticCircularCache``: the decode cache),
``MoA/models/llama/modify_llama_profile.py`` (``LlamaModel_get_attention_matrix_log``: the influence), and
``MoA/universal/optimizer.py`` (the MILP search).

Head ``h`` with ``(alpha_h, beta_h)`` and total length ``N`` (prompt + new tokens) has the span
(``moa_config_to_cache_config``, checked in the code)::

    S = ceil(max(min(int(alpha + beta * N), N), minimum_cache_size) / split_size) * split_size   # 128, 64

and query ``i`` sees key ``j <= i`` iff ``j < min(S, sink_size)`` (sink_size 64: the cache's static part) or
``i - j < S - min(S, sink_size)`` (the circular part, which holds the current token once it is written: the
official cache writes before attending). A head whose span covers ``N`` is dense causal on sequences up to ``N``;
beyond ``N`` it stays a sinks + window head of its span, as the official circular cache does.

Profiling (``moa_profile``): per layer, the model runs with dense causal attention whose probabilities ``A`` are
built explicitly (an explicit softmax, for profiling only: it needs ``A`` and ``dL/dA``); with ``g = dL/dA`` the
first-order loss increase of masking ``A_ij`` and renormalising row ``i`` is
``E_ij = -A_ij (g_ij - sum_k A_ik g_ik) / (1 - A_ij + eps)``; row 0 (one key, ``A_00 = 1``) uses ``-A_0j g_0j``
as the official code does. A candidate's predicted loss is the sum of ``E`` (batch mean) over the causal
entries its mask removes; its density is its kept entries over the causal entries.

Differences from the official code:
- Heads are not permuted to group equal spans (an official kernel-layout optimisation; the function is the same),
  and the decode cache is one cache for all heads keeping the union (the largest sink and the largest window),
  not a ragged per-head cache; so it holds ``O(max span)`` keys, not ``sum of spans``.
- Profiling is at one length (the calibration tokens' length) with token-level entries (no 64-block pooling; the
  masks are summed exactly) on any token batch (not the official long-context QA calibration set whose loss is
  only on the dense model's own responses); the per-layer choice is exhaustive over small grids
  (``len(candidates) ** num_heads <= 65536``) and greedy above, instead of the multi-length Gurobi MILP with a
  Pareto front and validation at an unseen length.
- GQA: spans are per query head (the official code converts GQA models to MHA first, ``gqa_to_mha.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..checks import check_positive_int
from ..patterns import Causal, Pattern, PerHead, Sinks, SlidingWindow
from .pattern_attention import PatternAttention
from .projections import kv_heads
from .registry import POSITIONS_SHARED, Mechanism, register


def _check_spans_args(sink_size: int, minimum_cache_size: int, split_size: int) -> None:
    check_positive_int(sink_size, "sink_size")
    check_positive_int(minimum_cache_size, "minimum_cache_size")
    check_positive_int(split_size, "split_size")
    if minimum_cache_size <= sink_size:
        raise ValueError(f"minimum_cache_size ({minimum_cache_size}) must be > sink_size ({sink_size}): every head "
                         f"needs a non-empty recent window")


def moa_span(alpha: float, beta: float, total_len: int, *, sink_size: int = 64, minimum_cache_size: int = 128,
             split_size: int = 64) -> int:
    """The official span rule: ``int(alpha + beta * N)`` capped at ``N``, floored to ``minimum_cache_size``,
    rounded up to a multiple of ``split_size`` (so it may exceed ``N``: the head is then dense on ``N`` tokens)."""
    total_len = check_positive_int(total_len, "total_len")
    _check_spans_args(sink_size, minimum_cache_size, split_size)
    if not (math.isfinite(alpha) and math.isfinite(beta)) or beta < 0:
        raise ValueError(f"alpha must be finite and beta a finite number >= 0, got alpha={alpha}, beta={beta}")
    span = min(int(alpha + beta * total_len), total_len)
    return math.ceil(max(span, minimum_cache_size) / split_size) * split_size


def moa_head_pattern(span: int, sink_size: int) -> Pattern:
    sinks = min(span, sink_size)
    return (Sinks(sinks) | SlidingWindow(left=span - sinks - 1)) & Causal()


def moa_pattern(alphas: Sequence[float], betas: Sequence[float], total_len: int, num_heads: int,
                num_kv_heads: int | None = None, *, sink_size: int = 64, minimum_cache_size: int = 128,
                split_size: int = 64) -> PerHead:
    """A ``PerHead`` (one entry per query head) of ``(Sinks(min(S, sink)) | SlidingWindow(S - sink - 1)) & Causal``.

    ``num_kv_heads`` is only checked (spans are per query head; a GQA group's heads may differ)."""
    num_heads = check_positive_int(num_heads, "num_heads")
    kv_heads(num_heads, num_kv_heads)
    if len(alphas) != num_heads or len(betas) != num_heads:
        raise ValueError(f"alphas and betas need num_heads={num_heads} entries, got {len(alphas)} and {len(betas)}")
    spans = [moa_span(a, b, total_len, sink_size=sink_size, minimum_cache_size=minimum_cache_size,
                      split_size=split_size) for a, b in zip(alphas, betas)]
    return PerHead([moa_head_pattern(s, sink_size) for s in spans])


class MoAAttention(PatternAttention):
    """``MoAAttention(dim, num_heads, alphas=None, betas=None, total_len=4096, num_kv_heads=None, sink_size=64,
    minimum_cache_size=128, split_size=64)``: causal, RoPE, GQA; x ``(B, N, dim)``.

    Default ``alphas = 0, betas = 0.5`` for every head: the uniform half-length span of the official
    ``examples/*/streamingllm_alpha_beta.json`` baseline; pass ``moa_profile``'s result for a searched plan. The
    decode cache keeps the largest sink and the largest recent window over the heads (``<= max span`` keys).

    Fu et al., "Mixture of Attention Spans" (CoLM 2025); official code: thu-nics/MoA. Head ``h`` sees
    ``min(span_h, sink_size)`` sinks and the last ``span_h - sinks`` tokens, ``span_h = alphas[h] + betas[h] *
    total_len`` (capped at ``total_len``, at least ``minimum_cache_size``, rounded up to a multiple of
    ``split_size``). ``forward`` and ``new_cache`` are ``PatternAttention``'s.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        alphas: Per-head span offsets, ``num_heads`` finite numbers; None (default): 0 for every head.
        betas: Per-head span slopes, ``num_heads`` finite numbers >= 0; None (default): 0.5 for every head.
        total_len: The sequence length the spans are planned for, >= 1 (default 4096).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        sink_size: Sink tokens of a head, >= 1 (default 64).
        minimum_cache_size: Smallest span, > ``sink_size`` (default 128).
        split_size: Spans are rounded up to a multiple of it, >= 1 (default 64).

    Raises:
        TypeError: An int argument is not an int.
        ValueError: ``alphas``/``betas`` without ``num_heads`` entries, a non-finite alpha or beta or a beta < 0;
            ``total_len``, ``sink_size`` or ``split_size`` < 1; ``minimum_cache_size <= sink_size``; ``dim`` is not a
            positive multiple of ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import MoAAttention
        >>> layer = MoAAttention(64, 4, betas=[0.25, 0.25, 0.5, 1.0], total_len=64, sink_size=4,
        ...                      minimum_cache_size=8, split_size=8)
        >>> layer.spans
        [16, 16, 32, 64]
        >>> layer(torch.randn(2, 64, 64)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, dim: int, num_heads: int, alphas: Sequence[float] | None = None,
                 betas: Sequence[float] | None = None, total_len: int = 4096, num_kv_heads: int | None = None,
                 sink_size: int = 64, minimum_cache_size: int = 128, split_size: int = 64):
        num_heads = check_positive_int(num_heads, "num_heads")
        alphas = [0.0] * num_heads if alphas is None else [float(a) for a in alphas]
        betas = [0.5] * num_heads if betas is None else [float(b) for b in betas]
        pattern = moa_pattern(alphas, betas, total_len, num_heads, num_kv_heads, sink_size=sink_size,
                              minimum_cache_size=minimum_cache_size, split_size=split_size)
        spans = [moa_span(a, b, total_len, sink_size=sink_size, minimum_cache_size=minimum_cache_size,
                          split_size=split_size) for a, b in zip(alphas, betas)]
        # one cache for all heads: the union of their keys is the largest sink plus the largest window
        sinks = max(min(s, sink_size) for s in spans)
        window = max(s - min(s, sink_size) for s in spans)
        super().__init__(dim, num_heads, pattern, num_kv_heads, causal=True,
                         keep=lambda p, nxt: (p < sinks) | (p > nxt - window))
        self.spans = spans
        self.alphas, self.betas, self.total_len, self.sink_size = alphas, betas, total_len, sink_size
        self.minimum_cache_size, self.split_size = minimum_cache_size, split_size


# ---------------------------------------------------------------------------------------------- profiling


register(Mechanism(
    name="moa", paper="Mixture of Attention Spans: Optimizing LLM Inference Efficiency with Heterogeneous "
    "Sliding-Window Lengths (CoLM 2025)", repo="thu-nics/MoA", family="local", dims=("1d",),
    patterns={"CS": {}}, why_not={
        "NS": "spans alpha + beta*N are profiled for causal decoding (sinks + the recent past); the paper defines "
              "no bidirectional span", "NC": POSITIONS_SHARED, "CC": POSITIONS_SHARED},
    cls=MoAAttention, make=lambda dim, num_heads, **kw: MoAAttention(dim, num_heads, **kw),
    notes="per-head span S = alpha + beta * total_len (total_len 4096; rounded up to 64, >= 128): 64 sinks + the "
          "last S - 64 tokens; default alpha 0, beta 0.5 on every head (the official uniform baseline): use "
          "moa_profile for searched spans; decode cache <= max span keys"))
