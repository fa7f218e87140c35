"""Key-driven grouped-query attention (KDGQA): query heads are shared out among the KV heads in proportion to the
KV heads' key norms, so a KV head with larger keys serves more query heads (and one may serve none).

Paper: Khan, Khaquan, Tafveez, Samiwala, Raza, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
Attention" (2024, arXiv 2408.08454; ViT experiments). Code read: yjzhang0505/key-driven-gqa (a fork whose README
says it is the official implementation; the authors' own repository is not in our index),
``modules/attention/kdgqa.py`` (``KDGQA.forward``, ``att_weight_conversion``). What the variants share
(``dgqa.py``, ``pgqa.py``) -- the projections, the head allocation, the grouped attention and the MHA -> GQA
conversion -- is in ``grouped_query.py``; this module re-exports those names.

The allocation (``key_norm_allocation``), for ``G`` KV heads and ``H`` query heads: ``n_g`` is the Frobenius norm of
KV head ``g``'s keys over all tokens and head dims, summed over the batch (as the official ``torch.norm(k,
dim=(2, 3)).sum(0)``); min-max normalised ``n'_g = (n_g - min) / (max - min)``; ``a_g = round(H n'_g / sum n')``
(half to even, as ``torch.round``); then while ``sum a > H`` the first largest ``a_g`` loses one, while ``sum a < H``
the first smallest gains one (``torch.argmax``/``argmin`` pick the first index of a tie). Query heads are assigned
contiguously in order: the first ``a_0`` use KV head 0, the next ``a_1`` KV head 1, and so on. Attention is plain
softmax per head through ``nearfar.attend``: one GQA call when the allocation is uniform, else one call per KV head
on its slice of query heads, the KV head a view (no copy of K/V). The allocation is discrete: no gradient flows
through it (the official code rounds to ints too). It is read on the host (as the official ``tolist``), so
``torch.compile`` breaks the graph there and specialises the rest on each allocation it meets.

Causal variant (``causal=True``, for language models; the paper has none, its allocation reads every token of
every sequence of the batch): the sequence is cut into blocks of ``block_size`` positions, and the queries of block
``j`` use the allocation computed, per sequence, from the Frobenius norms of that sequence's keys at positions
``< j * block_size`` (the completed blocks before it); block 0 has no prefix and uses the uniform allocation (plain
GQA). So output ``i`` depends on tokens ``<= i`` only, and sequences of a batch do not see each other. Each block
attends its prefix through ``attend``: for one sequence with its KV heads sliced (as above, no copy); for a batch
with K/V gathered per query head, since each sequence has its own allocation (a copy of the prefix per block, kept
for backward: about ``N^2 / (2 block_size)`` key and value rows per query head in all; a batched decoding step
copies its prefix for ``H`` heads). Decoding (``new_cache``) keeps every key (a ``KVCache``, ``G`` heads) and
recomputes the prefix norms from it, so it equals the teacher-forced forward. Cross-attention (``cross=True``) takes
the allocation from the source's keys (summed over the batch, as self-attention); queries are independent, so it
serves NC and, with the source cached, CC.

Differences from the official code: the causal and cross forms above are ours; all-equal norms (the official
``0/0``, e.g. a single KV head) give the uniform allocation, which needs ``num_kv_heads`` to divide ``num_heads``
(checked); norms are taken in float32 or wider after RoPE (a rotation: it keeps each key's norm), without gradient;
padded keys (``key_padding_mask``) count neither in the norms nor in attention (the official code has no padding);
q/k/v/o are LLaMA-style ``q_proj``/``k_proj``/``v_proj``/``o_proj`` with RoPE on self-attention (the official ViT
layer has separate ``q``/``k``/``v`` Linears, ``proj`` with a bias (``proj_bias=True`` here) and no positions in
attention: ``rope=False``); no dropout. ``from_mha`` is the official ``att_weight_conversion``: each contiguous group
of the source's heads becomes one KV head whose K/V projection rows (and biases) are the group's mean.
"""

from __future__ import annotations

import torch

from ..checks import check_bool, check_positive_int
from ..functional import attend, merge_heads, split_heads
from ..patterns import Causal
from .dense import SourceCache
from .grouped_query import (
    GroupedQueryAttention,
    allocate_heads,
    grouped_attention,
    key_norm_allocation,
    kv_index,
    mean_pool_heads,
    squared_key_norms,
)
from .kv_cache import KVCache
from .projections import meta_forward
from .registry import Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

__all__ = [  # the shared names lived here before grouped_query.py: importing them from here still works
    "KDGQA",
    "GroupedQueryAttention",
    "allocate_heads",
    "grouped_attention",
    "key_norm_allocation",
    "kv_index",
    "mean_pool_heads",
    "prefix_allocated_attention",
    "squared_key_norms",
]


def prefix_allocated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, block_size: int,
                               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """KDGQA's causal variant: queries ``q (B, H, n, d)`` at positions ``start .. start+n-1`` over the keys of every
    position so far ``k, v (B, G, start+n, d)``; the queries of block ``j`` (positions ``[j*bs, (j+1)*bs)``) use
    the allocation from each sequence's key norms at positions ``< j*bs`` (block 0: uniform, i.e. GQA). One
    sequence: the KV heads are sliced (``grouped_attention``); more: gathered per query head (a copy)."""
    b, h, n, d = q.shape
    total = k.shape[2]
    if k.shape[1] == 1 or total <= block_size:  # one allocation possible, or every query in block 0: GQA
        return attend(q, k, v, Causal(), key_padding_mask=key_padding_mask)
    prefix = squared_key_norms(k, key_padding_mask).cumsum(-1)  # (B, G, total): over the keys at positions <= t
    outs = []
    for j in range(start // block_size, (total - 1) // block_size + 1):
        s, e = max(start, j * block_size), min(total, (j + 1) * block_size)
        qq, kk, vv = q[:, :, s - start:e - start], k[:, :, :e], v[:, :, :e]
        kpm = None if key_padding_mask is None else key_padding_mask[:, :e]
        counts = key_norm_allocation(prefix[:, :, j * block_size - 1].sqrt(), h) if j else None  # (B, G)
        if counts is None:
            outs.append(attend(qq, kk, vv, Causal(), key_padding_mask=kpm))
        elif b == 1:
            outs.append(grouped_attention(qq, kk, vv, counts[0].tolist(), kpm, Causal()))
        else:
            idx = kv_index(counts, h)[:, :, None, None]  # (B, H, 1, 1)
            kk, vv = kk.gather(1, idx.expand(b, h, e, d)), vv.gather(1, idx.expand(b, h, e, vv.shape[-1]))
            outs.append(attend(qq, kk, vv, Causal(), key_padding_mask=kpm))
    return torch.cat(outs, 2)


@whole_sequence()
class KDGQA(GroupedQueryAttention):
    """``KDGQA(dim, num_heads, num_kv_heads=None, causal=False, cross=False, block_size=128, ...)``: x
    ``(B, N, dim)`` -> ``(B, N, dim)``; query heads shared out among the KV heads by their key norms (see the module
    docstring). With ``cross=True`` call ``layer(x, context=(B, M, dim))``.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with RoPE).
        num_heads: Number of query heads ``H``, >= 1.
        num_kv_heads: Number of KV heads ``G``, dividing ``num_heads``; None (default): ``num_heads // 2`` (the
            official default), or ``num_heads`` when that is odd.
        causal: The causal prefix variant (CS; CC with ``cross``), which decodes through ``new_cache`` (default
            False: the official whole-sequence allocation, NS/NC).
        cross: Cross-attention: keys and values (and the allocation) from ``context`` (default False).
        block_size: Positions per allocation block of the causal variant, >= 1 (default 128).
        qkv_bias: Biases on the q/k/v projections (default False).
        proj_bias: A bias on the output projection (default False; the official ViT layer has one).
        rope: Rotary positions on queries and keys; None (default): on self-attention; a cross layer has none.

    Raises:
        TypeError: A flag that is not a bool; ``block_size`` or ``num_kv_heads`` not an int.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; ``num_kv_heads`` not dividing ``num_heads``;
            ``block_size`` < 1; an odd head dim with RoPE; ``rope=True`` with ``cross``.

    Examples:
        >>> import torch
        >>> from nearfar import KDGQA
        >>> KDGQA(64, 8)(torch.randn(2, 16, 64)).shape                   # 4 KV heads, NS
        torch.Size([2, 16, 64])
        >>> lm = KDGQA(64, 8, causal=True, block_size=4)
        >>> x = torch.randn(2, 10, 64)
        >>> cache = lm.new_cache(2)
        >>> steps = torch.cat([lm(x[:, :6], cache=cache)] + [lm(x[:, t:t + 1], cache=cache) for t in range(6, 10)], 1)
        >>> torch.allclose(steps, lm(x), atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, causal: bool = False,
                 cross: bool = False, block_size: int = 128, qkv_bias: bool = False, proj_bias: bool = False,
                 rope: bool | None = None):
        check_bool(causal, "causal")
        check_bool(cross, "cross")
        block_size = check_positive_int(block_size, "block_size")
        if cross and rope:
            raise ValueError("rope is for self-attention: a cross layer has no positions (rope=None or False)")
        super().__init__(dim, num_heads, num_kv_heads, qkv_bias, proj_bias, not cross if rope is None else rope)
        self.causal, self.cross, self.block_size = causal, cross, block_size

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache | SourceCache:
        """An empty decoding cache for ``batch`` sequences (causal layers only).

        Args:
            batch: Number of sequences, >= 1.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``KVCache`` of every key (self-attention: ``G`` heads), or a ``SourceCache`` holding the source's
            projected keys and values from the first call on (cross-attention).

        Raises:
            ValueError: The layer is not causal; ``batch`` < 1; a bad ``device`` or ``dtype``.
        """
        if not self.causal:
            raise ValueError("KDGQA(causal=False) is not causal: it has no decoding cache")
        return (SourceCache if self.cross else KVCache)(batch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cache: KVCache | SourceCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """KDGQA of ``x``: self-attention, or cross-attention to ``context`` (``cross=True``).

        Args:
            x: Queries ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens of each sequence.
            context: The source ``(B, M, dim)`` (cross layers only; with a cache, needed at the first call only).
            cache: A decoding state from ``new_cache`` (causal layers; None, the default: whole sequences).
            key_padding_mask: Optional bool mask of the keys, True = real: ``(B, N)`` for self-attention (not with
                ``cache``), ``(B, M)`` of the source for cross-attention. Padded keys are left out of the norms too.

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` or ``context`` of the wrong shape; a ``context`` for a self-attention layer; a
                ``cache`` for a non-causal layer, or one made for another batch, device or dtype; a bad
                ``key_padding_mask``, or one with a self-attention ``cache``.
            TypeError: ``cache`` does not come from this layer's ``new_cache``.
        """
        if x.device.type == "meta" and cache is None:  # the routing reads values: shapes only (a cache checks devices)
            return meta_forward(self, x)
        x = self.check_x(x)
        b, n = x.shape[0], x.shape[1]
        if cache is not None and not self.causal:
            raise ValueError("KDGQA(causal=False) is not causal: it takes no cache")
        if not self.cross:
            if context is not None:
                raise ValueError("context is for cross-attention layers: build KDGQA(..., cross=True)")
            kv_cache = KVCache.checked(cache, x)
            if kv_cache is not None and key_padding_mask is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            mask = self.check_padding(key_padding_mask, b, n)
            start = 0 if kv_cache is None else kv_cache.length
            q, k, v, _ = rotary_qkv(self, x, start)
            if not self.causal:
                out = grouped_attention(q, k, v, self.batch_allocation(k, mask), mask)
            else:
                if kv_cache is not None:
                    kv_cache.append(k, v)
                    ck, cv = kv_cache.k, kv_cache.v
                    assert ck is not None and cv is not None  # appended to just now
                    k, v = ck, cv
                out = prefix_allocated_attention(q, k, v, start, self.block_size, mask)
            return self.o_proj(merge_heads(out, (n,)))
        src = SourceCache.checked(cache, x)
        if src is None or src.k is None or src.v is None:
            context = self.check_x(context, "context")
            if context.shape[0] != b:
                raise ValueError(f"context must have x's batch {b}, got {context.shape[0]}")
            mask = self.check_padding(key_padding_mask, b, context.shape[1])
            k, v = split_heads(self.k_proj(context), self.num_kv_heads), split_heads(self.v_proj(context),
                                                                                   self.num_kv_heads)
            if src is not None:
                src.k, src.v, src.mask = k, v, mask
        else:
            k, v, mask = src.k, src.v, src.mask
        q = split_heads(self.q_proj(x), self.num_heads)
        out = grouped_attention(q, k, v, self.batch_allocation(k, mask), mask)
        if src is not None:
            src.length += n
        return self.o_proj(merge_heads(out, (n,)))


register(Mechanism(
    name="kdgqa", paper="Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention (arXiv 2408.08454, "
                        "2024)",
    repo="yjzhang0505/key-driven-gqa", family="routed", dims=("1d",), cls=KDGQA,
    patterns={"NS": {}, "CS": {"causal": True}, "NC": {"cross": True}, "CC": {"causal": True, "cross": True}},
    why_not={},
    make=lambda dim, num_heads, **kw: KDGQA(dim, num_heads, **kw),
    notes="GQA (num_heads // 2 KV heads) whose query heads are shared out among the KV heads by their key norms "
          "(min-max normalised, contiguous); non-causal by default (norms of the whole batch, as the paper's ViT); "
          "causal=True: per-sequence allocation from the completed blocks before each block, decode cache of every "
          "key (G heads); cross: allocation from the source's keys; from_mha converts an MHA layer (mean-pooled K/V "
          "heads)"))
