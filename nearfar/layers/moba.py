"""MoBA (Mixture of Block Attention): each query attends to its own block (causally) plus the past key blocks
whose mean key it scores highest, in one softmax.

Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs" (arXiv 2502.13189, 2025). Official
code: MoonshotAI/MoBA ``moba/moba_naive.py`` (``moba_attn_varlen_naive``) and ``moba/moba_efficient.py``
(``moba_attn_varlen``); the fla port is fla-org/flash-linear-attention ``fla/ops/moba`` and ``fla/layers/moba.py``.

Per query head, with ``C = chunk_size`` and ``blk(t) = t // C`` (positions after RoPE, counted from 0):

- the gate of query ``t`` and key block ``b`` is ``q_t . mean(k_block b)``, unscaled, computed in float32 (the
  official code does so); only blocks wholly in the past compete (``b < blk(t)``);
- ``t`` keeps its ``topk - 1`` best past blocks (all of them if fewer) plus its current block ``blk(t)``, whose keys
  it sees up to itself; its output is one softmax over the union, scale ``d ** -0.5``.

Implementation: the current block is the static pattern ``BlockWindow(C, 0, 0) & Causal()`` and the selected past
blocks are ``SelectedBlocks`` (whole blocks) of ``nearfar.attend``, so the block-sparse engine computes only the
kept pairs (``O(N topk C d)`` per head, plus ``O(N^2 d / C)`` for the gate), never an ``N x N`` mask. The gate uses
``block_scores`` and ``topk_blocks`` of ``nearfar.functional`` (ties go to the lower block). With
``granularity="token"`` (default, the paper) every query selects its own blocks (``q_block=1``); with
``granularity="block"`` (our option) a block of ``C`` queries shares one selection, made from its mean query:
faster (the engine reads each key block once per query block), but the selection of a query depends on the later
queries of its block, so this variant is not causal token by token and only decodes with ``decode="dense"``.

Differences from the official code:

- ``topk = 1``: the official efficient kernel and fla fall back to dense causal attention over the whole sequence
  (``dense_fallback=True``, our default), while the official naive reference attends to the current block only
  (``dense_fallback=False``). A sequence of at most one block is dense causal either way.
- GQA: MoBA routes per query head. The official HF wrapper repeats the KV heads to the query heads before routing;
  we route each query head against the block means of its KV head ``h // G`` without copying the keys (the same
  selections), and the engine reads the shared KV head.
- Decoding: the paper and the official wrapper decode with dense attention over the cache (``decode="dense"``: a
  cached call on an empty cache, the prefill, runs MoBA; later calls attend every cached key). Our default,
  ``decode="sparse"``, routes the new tokens exactly as the forward does, from the cached means of the completed
  blocks, so decoding equals the teacher-forced forward; it reads ``topk`` blocks per token instead of the cache.
- No varlen packing in the layer (the functional ``moba`` takes ``cu_seqlens``); no per-head output RMSNorm or
  output gate (fla's layer adds them; the paper has neither).
- Ties among gate scores: the lower block wins (the official code leaves the order to ``torch.topk``).
"""

from __future__ import annotations

import torch

from ..checks import check_bool, check_choice, check_positive_int, check_scale, check_tensor, check_tokens
from ..functional import SelectedBlocks, attend, block_scores, merge_heads, pool_blocks, topk_blocks
from ..patterns import BlockWindow, Causal
from .fla_layout import check_cu_seqlens, from_batch, to_batch
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import POSITIONS_SHARED, Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

GRANULARITIES = ("token", "block")
DECODES = ("sparse", "dense")


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def _route(q: torch.Tensor, k: torch.Tensor, means: torch.Tensor | None, c: int, topk: int, granularity: str,
           complete: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk - 1`` past blocks of each query (or query block), ``(kv_num_blocks, kv_indices)`` per query head."""
    nq, nk = q.shape[2], k.shape[2]
    gd = _gate_dtype(q)
    if means is None:
        means = pool_blocks(k[:, :, :complete * c], c)
    means = means[:, :, :complete].to(gd)
    rows, rb = (q, 1) if granularity == "token" else (pool_blocks(q, c), c)
    scores = block_scores(rows.to(gd), means, k_block_size=c, q_block_size=rb, q_start=nk - nq,
                          include_current=False, scale=1.0)
    return topk_blocks(scores, topk - 1, q_block_size=rb, k_block_size=c, q_start=nk - nq)


@torch.compiler.disable  # run-time block lists: validated and run eagerly inside compiled graphs
def _routed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, means: torch.Tensor | None, c: int, topk: int,
            granularity: str, scale: float | None) -> torch.Tensor:
    """The current block (causal) and the routed past blocks, one softmax."""
    num, idx = _route(q, k, means, c, topk, granularity, k.shape[2] // c)
    sel = SelectedBlocks(num, idx, q_block=1 if granularity == "token" else c, kv_block=c)
    return attend(q, k, v, BlockWindow(c, 0, 0) & Causal(), blocks=sel, scale=scale)


def moba_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, topk: int, *,
               means: torch.Tensor | None = None, granularity: str = "token", dense_fallback: bool = True,
               scale: float | None = None) -> torch.Tensor:
    """MoBA attention of ``q (B, Hq, Nq, d)`` over ``k (B, Hkv, Nk, d)``, ``v (B, Hkv, Nk, dv)``, heads first.

    The queries are the last ``Nq`` positions of the ``Nk`` keys (``Nq = Nk`` for a whole sequence, fewer when
    decoding from a cache). ``means`` are the mean keys of the ``Nk // chunk_size`` complete blocks, if cached
    (None: pooled from ``k``). See the module docstring for the rule.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, floating.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq % Hkv == 0``, ``Nk >= Nq``.
        v: Values ``(B, Hkv, Nk, dv)``.
        chunk_size: Block size ``C`` (>= 1).
        topk: Blocks per query, the current one included (>= 1).
        means: Optional mean keys ``(B, Hkv, >= Nk // C, d)`` of the complete blocks.
        granularity: ``"token"`` (each query routes) or ``"block"`` (each block of ``C`` queries routes by its mean
            query; needs ``Nk - Nq`` to be a multiple of ``C``).
        dense_fallback: With ``topk == 1``, attend densely (True, the efficient kernel) or to the current block
            only (False, the naive reference).
        scale: Score scale of the attention; default ``d ** -0.5`` (the gate is unscaled).

    Returns:
        The output ``(B, Hq, Nq, dv)``.
    """
    nk, c = k.shape[2], chunk_size
    if topk == 1 and dense_fallback:
        return attend(q, k, v, Causal(), scale=scale)
    current = BlockWindow(c, 0, 0) & Causal()
    if topk == 1 or nk <= c:  # no past block can be kept
        return attend(q, k, v, current, scale=scale)
    return _routed(q, k, v, means, c, topk, granularity, scale)


def moba(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, topk: int,
         cu_seqlens: torch.Tensor | None = None, scale: float | None = None, *,
         dense_fallback: bool = True) -> torch.Tensor:
    """Causal MoBA attention in fla's layout: ``q (B, T, Hq, d)``, ``k (B, T, Hkv, d)``, ``v (B, T, Hkv, dv)``.

    fla's ``parallel_moba`` / the official ``moba_attn_varlen`` as a function (see the module docstring), on any
    device, with GQA (``Hq % Hkv == 0``; each query head routes on its own) and any ``dv``. ``cu_seqlens`` packs
    sequences into ``B = 1`` (blocks restart at each sequence start).

    Args:
        q: Queries ``(B, T, Hq, d)``, floating.
        k: Keys ``(B, T, Hkv, d)``.
        v: Values ``(B, T, Hkv, dv)``.
        chunk_size: Block size (>= 1).
        topk: Blocks per query, the current one included (>= 1).
        cu_seqlens: Optional int tensor ``(S + 1,)`` of sequence starts, from 0 to ``T`` (needs ``B = 1``).
        scale: Score scale; default ``d ** -0.5``.
        dense_fallback: ``topk == 1`` attends densely (True, fla and the efficient kernel) or to the current block
            only (False, the naive reference).

    Returns:
        ``(B, T, Hq, dv)``.

    Raises:
        TypeError: A tensor is not floating (``cu_seqlens``: not an integer tensor) or an argument has the wrong type.
        ValueError: Shapes that do not fit, ``chunk_size``/``topk`` < 1, or bad ``cu_seqlens``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.moba import moba
        >>> q, k, v = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8)
        >>> moba(q, k, v, chunk_size=8, topk=2).shape
        torch.Size([2, 40, 4, 8])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, 4)
    c, kk = check_positive_int(chunk_size, "chunk_size"), check_positive_int(topk, "topk")
    scale = check_scale(scale, "scale")
    check_bool(dense_fallback, "dense_fallback")
    b, n, hq, d = q.shape
    if k.shape[:2] != (b, n) or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hq % max(1, k.shape[2]):
        raise ValueError(f"q (B, T, Hq, d), k (B, T, Hkv, d), v (B, T, Hkv, dv) with Hq % Hkv == 0 expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if cu_seqlens is None:
        out = moba_heads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), c, kk,
                         dense_fallback=dense_fallback, scale=scale)
        return out.transpose(1, 2)
    cu = check_cu_seqlens(cu_seqlens, n, b)
    (qb, valid), (kb, _), (vb, _) = (to_batch(x, cu) for x in (q, k, v))
    out = moba_heads(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), c, kk,
                     dense_fallback=dense_fallback, scale=scale)
    return from_batch(out.transpose(1, 2), valid)  # causal: the right padding changed no real row


class MoBACache(KVCache):
    """Decoding state of ``MoBAAttention``: every key and value (any past block may be selected) and the mean
    key ``(B, Hkv, C, d)`` of each completed block (``decode="sparse"``)."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, None, device, dtype)
        self.means: torch.Tensor | None = None

    @property
    def num_means(self) -> int:
        return 0 if self.means is None else self.means.shape[2]


@whole_sequence()
class MoBAAttention(ProjectedAttention):
    """``MoBAAttention(dim, num_heads, chunk_size=512, topk=3, num_kv_heads=None, granularity="token",
    dense_fallback=True, decode="sparse", rope=True, qkv_bias=False)``: causal MoBA self-attention of
    ``x (B, N, dim)`` with RoPE and GQA.

    Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs" (arXiv 2502.13189); official code:
    MoonshotAI/MoBA. Each query attends causally to its own block of ``chunk_size`` tokens and to the ``topk - 1``
    past blocks whose mean key scores highest against it, in one softmax (see the module docstring). Defaults: the
    paper's scaling-law setting (blocks of 512, ``topk=3``: the current block and two past ones).

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of query heads, >= 1; each routes on its own.
        chunk_size: Tokens per block, >= 1 (default 512).
        topk: Blocks per query, the current one included, >= 1 (default 3).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        granularity: ``"token"`` (default: each query selects, the paper) or ``"block"`` (each block of queries
            selects by its mean query; faster, not causal token by token).
        dense_fallback: With ``topk=1``, dense causal attention (True, default: the official efficient kernel and
            fla) or the current block only (False: the official naive reference).
        decode: ``"sparse"`` (default: cached calls route like the forward, so decoding equals it) or ``"dense"``
            (the paper: a prefill on an empty cache runs MoBA, later cached calls attend every cached key).
        rope: Rotary position embeddings (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``chunk_size``, ``topk`` or ``num_kv_heads`` is not an int; ``dense_fallback`` not a bool.
        ValueError: ``chunk_size`` or ``topk`` < 1; an unknown ``granularity`` or ``decode``; ``dim`` is not a
            positive multiple of ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import MoBAAttention
        >>> layer = MoBAAttention(64, 4, chunk_size=8, topk=2, num_kv_heads=2)
        >>> x = torch.randn(2, 40, 64)
        >>> y = layer(x)
        >>> cache = layer.new_cache(2)
        >>> steps = [layer(x[:, :17], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(17, 40)]
        >>> torch.allclose(torch.cat(steps, 1), y, atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 512, topk: int = 3, num_kv_heads: int | None = None,
                 granularity: str = "token", dense_fallback: bool = True, decode: str = "sparse", rope: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.topk = check_positive_int(topk, "topk")
        self.granularity = check_choice(granularity, "granularity", GRANULARITIES)
        self.dense_fallback = check_bool(dense_fallback, "dense_fallback")
        self.decode = check_choice(decode, "decode", DECODES)
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)
        self.causal = self.granularity == "token"

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> MoBACache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            A ``MoBACache`` (all keys and values, and the mean key of every completed block).

        Raises:
            ValueError: ``granularity="block"`` with ``decode="sparse"`` (a block's selection needs all its
                queries); ``batch`` < 1; a bad ``device`` or ``dtype``.
            TypeError: ``batch`` is not an int.
        """
        if self.granularity == "block" and self.decode == "sparse":
            raise ValueError("granularity='block' routes a block of queries by its mean query, which needs the whole "
                             "block: it cannot decode token by token; use decode='dense' (the paper's generation) or "
                             "granularity='token'")
        return MoBACache(batch, device, dtype)

    def _means(self, cache: MoBACache) -> torch.Tensor | None:
        """The mean keys of the completed blocks, pooling the blocks completed since the last call."""
        c, ck = self.chunk_size, cache.k
        done = cache.length // c
        if done > cache.num_means and ck is not None:
            new = pool_blocks(ck[:, :, cache.num_means * c:done * c], c)
            cache.means = new if cache.means is None else torch.cat([cache.means, new], dim=2)
        return cache.means

    def forward(self, x: torch.Tensor, cache: MoBACache | None = None) -> torch.Tensor:
        """Causal MoBA attention of ``x``, or the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``, ``N >= 1``: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N >= 1, dim)``; ``cache`` made for another batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        if x.device.type == "meta" and cache is None:  # the routing reads values: shapes only (a cache checks devices)
            return meta_forward(self, x)
        check_tokens(x, self.dim)
        cache = MoBACache.checked(cache, x)
        n = x.shape[1]
        start = 0 if cache is None else cache.length
        q, k, v, _ = rotary_qkv(self, x, start)
        if cache is None:
            out = moba_heads(q, k, v, self.chunk_size, self.topk, granularity=self.granularity,
                             dense_fallback=self.dense_fallback)
        else:
            cache.append(k, v)
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None  # appended just now
            if self.decode == "dense" and start > 0:
                out = attend(q, ck, cv, Causal())
            else:
                means = self._means(cache) if self.decode == "sparse" and self.topk > 1 else None
                out = moba_heads(q, ck, cv, self.chunk_size, self.topk, means=means, granularity=self.granularity,
                                 dense_fallback=self.dense_fallback)
        return self.o_proj(merge_heads(out, (n,)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"chunk_size={self.chunk_size}, topk={self.topk}, granularity={self.granularity!r}, "
                f"dense_fallback={self.dense_fallback}, decode={self.decode!r}")


register(Mechanism(
    name="moba", paper="MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv 2502.13189, 2025)",
    repo="MoonshotAI/MoBA", family="routed", dims=("1d",), cls=MoBAAttention,
    patterns={"CS": {}}, why_not={
        "NS": "the paper and its code define the causal form only (the gate ranks blocks wholly in the past, and the "
              "current block is attended causally)",
        "NC": "a query routes among key blocks of its own sequence, relative to its own block; the paper defines no "
              "second source", "CC": POSITIONS_SHARED},
    make=lambda dim, num_heads, **kw: MoBAAttention(dim, num_heads, **kw),
    notes="blocks of 512, topk 3 (current block + 2 past blocks by q . mean(k_block)), one softmax; per-query-head "
          "routing (GQA: against the KV head's block means); O(N topk C d) through attend's block-sparse engine; "
          "decode='sparse' (default) routes from cached block means and equals the forward, decode='dense' is the "
          "paper's full-attention generation"))
