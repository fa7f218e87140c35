"""HiP attention: training-free hierarchically pruned attention, a causal sequence layer over a full KV cache.

Paper: Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically
Pruned Attention" (HiP; ICLR 2025; first version "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical
Attention Pruning", arXiv 2406.09827). Official code: DeepAuto-AI/hip-attention: the tree search of
``src/hip_attn/v1_1/attention2_draft_causal_batch.py`` (``masking_iteration_draft_numba_kernel``), the defaults and
the sliding window + sink attention of ``src/hip_attn/v1_0/attention1_block_gpu.py`` (``hip_attention``:
``mask_k=512``, ``block_size_q=32``, ``block_size_k=2``, ``sliding_window_size=128``, ``reduce_stride=2``) and
``attention1_block_gpu_kernel/calc_prob_return_context.py`` (32 sink tokens), and the decode-time mask reuse of
``src/hip_attn/v1_2/hip_config.py`` (``mask_refresh_interval``).

Each query block of ``q_block`` queries keeps ``ceil(mask_k / kv_block)`` key blocks of ``kv_block`` keys, found
per head by ``nearfar.functional.hip_topk_blocks`` (its docstring has the search and our choices: the first key
block as a child's representative, as the official reference, rather than the paper's centre token), and attends
them (token-exact causal inside) together with a sliding window of its ``window`` latest keys and the first
``sinks`` tokens: ``attend(q, k, v, (SlidingWindow(window - 1) | Sinks(sinks)) & Causal(), blocks=selection)``.

What differs from the official code: the window is per query (each query sees its ``window`` latest keys; the
official kernel gives a whole query block the ``window`` keys before the block's end), the search partitions the
context exactly (see ``hip_topk_blocks``), the first queries of a prompt are not computed densely (the official
``dense_queries_exp`` heuristic; a context of at most ``mask_k + window`` keys keeps every block anyway), there is no
SparQ score approximation, head-group sharing or Self-Extend, and a prefill through the cache searches its query
blocks from its own first token.

Decoding (``new_cache``): the cache keeps every key (HiP saves compute, not memory). A single new token searches
with a block of one query (``q_block = 1``) and the selection is reused for ``refresh_interval`` tokens (the
official v1.2 ``mask_refresh_interval``; the keys appended meanwhile are in the window while ``refresh_interval <=
window``). With ``refresh_interval=1`` decoding equals the teacher-forced forward of the layer built with
``q_block=1``; the default forward (``q_block=32``, one selection per 32 queries, as the official prefill) is a
coarser selection, so decoded tokens match it in the query blocks that keep every block (those whose context, up to
their last query, has at most ``mask_k + window`` keys).
"""

from __future__ import annotations

import torch

from ..checks import check_nonneg_int, check_positive_int
from ..functional import SelectedBlocks, attend, hip_topk_blocks, merge_heads
from ..patterns import Causal, Sinks, SlidingWindow
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections
from .registry import Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence


class HiPCache(KVCache):
    """HiP's decoding state: every key and value, and the last single-token selection with its age (tokens it
    has served), reused until it has served ``refresh_interval`` tokens."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, keep=None, device=device, dtype=dtype)
        self.selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self.age = 0


@whole_sequence()
class HiPAttention(ProjectedAttention):
    """``HiPAttention(dim, num_heads, mask_k=512, q_block=32, kv_block=2, window=128, sinks=32, query_stride=2,
    refresh_interval=8, num_kv_heads=None, qkv_bias=False)``: causal ``(B, N, dim) -> (B, N, dim)``, training-free.

    Lee et al., HiP attention (ICLR 2025, arXiv 2406.09827); official code: DeepAuto-AI/hip-attention. Query ``i`` of
    query block ``r = i // q_block`` attends the keys ``j <= i`` that are among its ``window`` latest, the first
    ``sinks`` tokens, or in the ``ceil(mask_k / kv_block)`` key blocks the hierarchical search kept for block ``r``
    and its head. Gradients flow to q/k/v (and the projections) through the attended pairs, not the selection.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1; each head selects its own blocks.
        mask_k: Keys each query block selects besides the window and sinks, >= 1 (default 512).
        q_block: Queries sharing one selection, >= 1 (default 32); 1 is the teacher-forced model of decoding.
        kv_block: Keys per selected block, >= 1 (default 2).
        window: Latest keys every query sees, itself included, >= 1 (default 128); the search skips them.
        sinks: First tokens every query sees, >= 0 (default 32).
        query_stride: Every ``query_stride``-th query of a block, back from its last, scores the search, >= 1
            (default 2).
        refresh_interval: Decoded tokens one search serves, >= 1 (default 8); 1 searches at every token.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: An integer argument is not an int.
        ValueError: An integer argument is out of its range; ``dim`` is not a positive multiple of ``num_heads``;
            ``num_kv_heads`` does not divide ``num_heads``; an odd head dim.

    Examples:
        >>> import torch
        >>> from nearfar import HiPAttention
        >>> layer = HiPAttention(64, 4, mask_k=8, q_block=4, window=4, sinks=2, num_kv_heads=2)
        >>> layer(torch.randn(2, 40, 64)).shape
        torch.Size([2, 40, 64])
        >>> cache = layer.new_cache(2)
        >>> layer(torch.randn(2, 40, 64), cache=cache).shape      # prefill, then one token at a time
        torch.Size([2, 40, 64])
        >>> layer(torch.randn(2, 1, 64), cache=cache).shape
        torch.Size([2, 1, 64])
    """

    causal = True

    def __init__(self, dim: int, num_heads: int, mask_k: int = 512, q_block: int = 32, kv_block: int = 2,
                 window: int = 128, sinks: int = 32, query_stride: int = 2, refresh_interval: int = 8,
                 num_kv_heads: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.mask_k = check_positive_int(mask_k, "mask_k")
        self.q_block = check_positive_int(q_block, "q_block")
        self.kv_block = check_positive_int(kv_block, "kv_block")
        self.window = check_positive_int(window, "window")
        self.sinks = check_nonneg_int(sinks, "sinks")
        self.query_stride = check_positive_int(query_stride, "query_stride")
        self.refresh_interval = check_positive_int(refresh_interval, "refresh_interval")
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope=True)
        local = SlidingWindow(left=self.window - 1)
        self.pattern = (local | Sinks(self.sinks) if self.sinks else local) & Causal()

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> HiPCache:
        """An empty decoding cache for ``batch`` sequences: every key, and the selection being reused.

        Args:
            batch: Number of sequences, >= 1.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``HiPCache``.

        Raises:
            TypeError: ``batch`` is not an int.
            ValueError: ``batch`` < 1, or ``device``/``dtype`` is not one.
        """
        return HiPCache(batch, device=device, dtype=dtype)

    def select(self, q: torch.Tensor, k: torch.Tensor, q_block: int,
               key_padding_mask: torch.Tensor | None = None) -> SelectedBlocks:
        """The key blocks of rotated ``q (B, Hq, Nq, d)`` (the last ``Nq`` of the ``Nk`` tokens) over ``k (B, Hkv,
        Nk, d)`` with query blocks of ``q_block``, as the ``blocks`` argument of ``attend``."""
        num, idx = hip_topk_blocks(q, k, self.mask_k, q_block=q_block, kv_block=self.kv_block, window=self.window,
                                   query_stride=self.query_stride, key_padding_mask=key_padding_mask)
        return SelectedBlocks(num, idx, q_block=q_block, kv_block=self.kv_block, within=Causal())

    def forward(self, x: torch.Tensor, cache: HiPCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """HiP attention of ``x``, or its continuation through ``cache``.

        Args:
            x: Input ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens of each sequence (a
                chunk of several tokens is searched in query blocks from its first token; one token alone with
                ``q_block = 1``, its selection reused for ``refresh_interval`` tokens).
            cache: A decoding state from ``new_cache`` (None, the default: ``x`` is the whole sequence).
            key_padding_mask: Optional bool ``(B, N)``, True = a real token (whole sequences only): padded tokens
                take no part in the search (as keys or queries) and are not attended.

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; ``key_padding_mask`` is not ``(B, N)`` or comes with
                ``cache``; ``cache`` was made for another batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``; ``key_padding_mask`` is not bool.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {getattr(x, 'shape', type(x).__name__)}")
        cache = HiPCache.checked(cache, x)
        if key_padding_mask is not None:
            if cache is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor, got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"key_padding_mask must be (B, N) = {tuple(x.shape[:2])}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        n = x.shape[1]
        q, k, v, _ = rotary_qkv(self, x, 0 if cache is None else cache.length)
        if cache is None:
            blocks = self.select(q, k, self.q_block, key_padding_mask)
            out = attend(q, k, v, self.pattern, blocks=blocks, key_padding_mask=key_padding_mask)
            return self.o_proj(merge_heads(out, (n,)))
        cache.append(k, v)
        ck, cv = cache.k, cache.v
        assert ck is not None and cv is not None  # appended to just now
        k, v = ck, cv
        if n > 1:
            blocks, cache.selection = self.select(q, k, self.q_block), None
        else:
            if cache.selection is None or cache.age >= self.refresh_interval:
                fresh = self.select(q, k, 1)
                cache.selection, cache.age = (fresh.kv_num_blocks, fresh.kv_indices), 0
            cache.age += 1
            blocks = SelectedBlocks(*cache.selection, q_block=1, kv_block=self.kv_block, within=Causal())
        out = attend(q, k, v, self.pattern, blocks=blocks)
        return self.o_proj(merge_heads(out, (n,)))


_WHY_CROSS = ("the search runs over each query's own causal prefix minus its sliding window (the paper serves "
              "decoder-only LLMs); a separate source has neither, and the paper defines no cross form")
register(Mechanism(
    name="hip",
    paper="A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With Hierarchically Pruned "
          "Attention (HiP, ICLR 2025; arXiv 2406.09827)",
    repo="DeepAuto-AI/hip-attention", family="routed", dims=("1d",), cls=HiPAttention,
    make=lambda dim, num_heads, **kw: HiPAttention(dim, num_heads, **kw),
    patterns={"CS": {}},
    why_not={"NS": "HiP prunes the causal prefix of each query block for LLM serving (a window of the latest keys, "
                   "a tree search over the rest); the paper defines no bidirectional form", "NC": _WHY_CROSS,
             "CC": _WHY_CROSS},
    notes="training-free: per head and block of 32 queries, a tree search (halving nodes, first-block "
          "representatives, top-256 of 2-key blocks) keeps 512 keys, plus a 128-key window and 32 sinks; decode "
          "cache: every key, a single-query search reused for 8 tokens (refresh_interval=1 with q_block=1 equals the "
          "forward)"))
