"""LongHeads: every head of a causal layer reads its own few chunks of a long context, re-positioned to look short.

Paper: Lu, Zhou, He, Zhao, Ji, Gui, Zhang, Huang, "LongHeads: Multi-Head Attention is Secretly a Long Context
Processor" (2024, arXiv 2402.10685). Official code: LuLuLuyi/LongHeads, ``modeling_longheads/modeling_llama.py``
(``LlamaAttention.forward``: the prefill branch ``ori_len > 1`` and the decoding branch), README (the settings
``window_size=256``, ``atten_length=4096``, ``begin_selective_length=4096``). Training-free: the layer has the
ordinary q/k/v/o projections (GQA) and RoPE, no other parameters.

With chunk size ``w`` and ``n_c`` chunks per head (the official ``atten_length = n_c * w``), query ``i`` of each
query head:

- ``i < begin_selective_length``: ordinary causal attention with RoPE at positions ``0 .. i``;
- otherwise, with ``c = i // w`` its own chunk: it reads ``n_c - 1`` earlier whole chunks, namely chunk 0, chunk
  ``c - 1`` and the ``n_c - 3`` chunks ``1 .. c - 2`` with the largest ``q_i . r_j`` (``q_i`` before RoPE), plus
  its own chunk's tokens ``c*w .. i`` (every earlier chunk when there are at most ``n_c - 1``). The gathered keys
  (kept without RoPE) get new contiguous positions in chunk order, the query the last one, and one softmax runs
  over them. Each head picks its own chunks, so the heads together cover far more than ``n_c * w`` tokens.
- chunk summary ``r_j``, per query head, from chunk ``j``'s queries, keys and values rotated at chunk-local
  positions ``0 .. w-1``: ``u_j`` = mean over the chunk of the outputs of its full (non-causal) attention on
  itself, ``r_j = softmax(u_j . K_j^T / sqrt(d)) K_j``. It only steers the choice: no gradient flows through it.

How it runs (no loop over heads, queries or chunks): RoPE is relative, so rotating the query at position
``(n_c - 1) w + i % w`` and a key at offset ``o`` of the ``s``-th chunk it reads at ``s' w + o``
(``s' = s + n_c - 1 - m``, ``m`` the number of whole chunks read) gives the scores of the re-positioned set. The
keys are stored rotated once per slot ``s'`` (``n_c`` copies of the keys, ``n_c`` of the values), each query reads
its ``m`` chunks from them as run-time blocks of ``attend`` (``SelectedBlocks``, one query per block row, on the
block-sparse engine, which gathers a bounded number of query rows at a time) plus its own chunk in the last copy
through the static pattern ``BlockWindow(w, 0, 0) & Causal()``: one call for all heads and queries. Decoding
gathers the ``m`` chunks' keys of the cache per head and rotates them at the same positions, so decoding equals the
forward pass. Extra memory of a prefill: ``n_c`` rotated copies of K and V and the ``(query, chunk)`` scores (the
official code builds the score table too). Decoding cache: every key and value (un-rotated), ``r_j`` per complete
chunk per query head and the queries of the unfinished chunk (for its summary).

Measured (CPU, one thread, dim 256, 8 heads, 2 KV heads, 4096 tokens, ``w=64, n_c=8``, selective from 512):
forward 1.45 s, forward + backward 8.0 s, against 0.20 s / 0.57 s for dense SDPA; decoding at 4096 tokens 1.0 ms per
token. Each (query, head) gathers its own ``n_c w`` keys (the official code does the same, query by query): the
method extends a pretrained model's context without training; it is not a speed-up at lengths a dense kernel runs.

Differences from the official code:
- The official prefill picks chunks per query too but loops over the queries in Python (one at a time, or batches
  of ``encoding_batch_size`` whose key caches are filled query by query), each re-rotating its gathered keys.
- Consistency of prefill and decoding (the official branches differ, so its decoding is not its prefill): the
  query's own key is read (the official prefill stops one key short of it, its decoding includes it); the
  query's chunk is always the partial "tail", also at its last token (the official decoding then counts that
  chunk as complete and reads ``(n_c - 1) w`` keys); queries ``i >= begin_selective_length`` are selective in both
  (the official decoding starts one token earlier). ``begin_selective_length`` need not be a multiple of ``w``.
- Fewer whole chunks than ``n_c - 1`` before the query: all of them are read (positions unchanged up to a shift);
  the official top-k would fail there (not reached with its defaults, ``begin_selective_length = n_c * w``).
- GQA (the official code is multi-head): summaries and choices are per query head, keys shared by the group.
- The summary's ``u_j`` is not cached (only ``r_j`` is read); no CPU offloading; ``key_padding_mask`` is not
  supported (summaries and positions assume contiguous real tokens; right padding needs no mask, the layer is
  causal); no dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_nonneg_int, check_positive_int, check_tokens
from ..functional import SelectedBlocks, attend, merge_heads, split_heads
from ..patterns import BlockWindow, Causal
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections
from .registry import DECODER_ONLY, Mechanism, register
from .sharding import whole_sequence

_NONE = 1 << 40  # a chunk index past every real one (sorts last)


class LongHeadsCache(KVCache):
    """Decoding state of ``LongHeadsAttention``: every key (without RoPE) and value, the chunk summaries ``r``
    ``(B, H, C, d)`` of the ``C`` complete chunks, and the queries (without RoPE) of the unfinished chunk."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, None, device, dtype)
        self.summaries: torch.Tensor | None = None
        self.pending_q: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in (self.summaries, self.pending_q) if t is not None)
        return super().nbytes() + extra


@whole_sequence()
class LongHeadsAttention(ProjectedAttention):
    """``LongHeadsAttention(dim, num_heads, chunk_size=256, num_chunks=16, begin_selective_length=4096,
    num_kv_heads=None, qkv_bias=False)``: causal self-attention ``(B, N, dim) -> (B, N, dim)`` in which each query
    head of a query at ``i >= begin_selective_length`` reads ``num_chunks - 1`` whole chunks of ``chunk_size``
    tokens chosen from the content (the first, the last complete one, the best others) plus its own chunk, with
    contiguous new positions. See the module docstring.

    Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor" (2024, arXiv 2402.10685);
    official code: LuLuLuyi/LongHeads.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        chunk_size: Tokens per chunk ``w``, >= 1 (default 256, the official ``window_size``).
        num_chunks: Chunks a query head reads, its own included, >= 3 (default 16: the official
            ``atten_length = 4096`` over ``w``).
        begin_selective_length: Queries before this position use ordinary causal attention, >= 0 (default 4096).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: An argument is not an int (``qkv_bias``: not a bool).
        ValueError: ``chunk_size`` < 1, ``num_chunks`` < 3, ``begin_selective_length`` < 0; ``dim`` not a positive
            multiple of ``num_heads``, an odd head dim; ``num_kv_heads`` not dividing ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import LongHeadsAttention
        >>> layer = LongHeadsAttention(64, 4, chunk_size=4, num_chunks=4, begin_selective_length=16)
        >>> x = torch.randn(2, 40, 64)
        >>> layer(x).shape   # queries 16.. read 3 chosen chunks + their own: 13 to 16 keys each
        torch.Size([2, 40, 64])
        >>> chosen = layer.selected_chunks(x)[0, :, 39]   # per head: chunk 0, the best of chunks 1 .. 7, chunk 8
        >>> chosen[:, 0].tolist(), chosen[:, 2].tolist()
        ([0, 0, 0, 0], [8, 8, 8, 8])
        >>> cache = layer.new_cache(2)
        >>> steps = [layer(x[:, :30], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(30, 40)]
        >>> bool((torch.cat(steps, 1) - layer(x)).abs().max() < 1e-5)   # decoding equals the forward pass
        True
    """

    def __init__(self, dim: int, num_heads: int, chunk_size: int = 256, num_chunks: int = 16,
                 begin_selective_length: int = 4096, num_kv_heads: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.num_chunks = check_positive_int(num_chunks, "num_chunks")
        if num_chunks < 3:
            raise ValueError(f"num_chunks must be >= 3 (the first chunk, the last complete one and the query's own), "
                             f"got {num_chunks}")
        self.begin_selective_length = check_nonneg_int(begin_selective_length, "begin_selective_length")
        check_bool(qkv_bias, "qkv_bias")
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope=True)
        self.causal = True
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LongHeadsCache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            A ``LongHeadsCache``: every key (without RoPE) and value, one summary per complete chunk and query
            head, the unfinished chunk's queries.
        """
        return LongHeadsCache(batch, device, dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        assert self.rope is not None  # always built with RoPE
        return self.rope(x, pos)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(x), self.num_kv_heads),
                split_heads(self.v_proj(x), self.num_kv_heads))

    def chunk_summaries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``r (B, H, C, d)`` of ``C`` whole chunks from their queries ``q (B, H, C*w, d)`` and keys ``k`` (without
        RoPE) and values ``(B, Hkv, C*w, d)``; no gradient (it only steers the choice of chunks)."""
        w, g = self.chunk_size, self.num_heads // self.num_kv_heads
        b, h, n, d = q.shape
        with torch.no_grad():
            pos = torch.arange(n, device=q.device) % w
            ql, kl = self._rope(q.detach(), pos), self._rope(k.detach(), pos)
            u = attend(ql, kl, v.detach(), BlockWindow(w, 0, 0)).view(b, self.num_kv_heads, g, n // w, w, d).mean(4)
            kc = kl.view(b, self.num_kv_heads, 1, n // w, w, d)  # broadcast over the group's query heads
            a = torch.softmax(u.unsqueeze(-2) @ kc.transpose(-1, -2) * self.scale, -1)  # (B, Hkv, g, C, 1, w)
            return (a @ kc).reshape(b, h, n // w, d)

    def _choose(self, q: torch.Tensor, summaries: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        """The whole chunks read by queries ``q (B, H, n, d)`` (without RoPE) at positions ``pos (n,)`` (all
        selective), ascending, ``_NONE``-padded: ``(B, H, n, num_chunks - 1)``, the first ``min(pos // w,
        num_chunks - 1)`` entries real."""
        w, nc = self.chunk_size, self.num_chunks
        b, h, n, _ = q.shape
        own = pos // w
        none = torch.full_like(own, _NONE)
        forced = torch.stack([torch.where(own >= 1, 0, none), torch.where(own >= 2, own - 1, none)], -1)
        parts = [forced.expand(b, h, n, 2)]
        top = 0 if summaries is None else min(nc - 3, summaries.shape[2])
        if top > 0:
            assert summaries is not None
            c = torch.arange(summaries.shape[2], device=q.device)
            candidate = (c >= 1) & (c <= own[:, None] - 2)  # (n, C): the chunks strictly between 0 and own - 1
            scores = torch.einsum("bhnd,bhcd->bhnc", q.detach().to(summaries.dtype), summaries)
            vals, idx = scores.masked_fill(~candidate, float("-inf")).topk(top, dim=-1)
            parts.append(torch.where(vals > float("-inf"), idx, _NONE))
        chosen = torch.cat(parts, -1).sort(-1).values
        return F.pad(chosen, (0, nc - 1 - chosen.shape[-1]), value=_NONE)

    def selected_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """The whole chunks each (query head, query) reads: ``(B, H, N, num_chunks - 1)`` ascending chunk indices,
        -1 after the real ones; all -1 for the queries before ``begin_selective_length`` (ordinary attention).
        Every query also reads its own chunk's tokens up to itself."""
        check_tokens(x, self.dim)
        with torch.no_grad():
            q, k, v = self._project(x)
            n, w = x.shape[1], self.chunk_size
            full = n // w * w
            summaries = self.chunk_summaries(q[:, :, :full], k[:, :, :full], v[:, :, :full]) if full else None
            pos = torch.arange(n, device=x.device)
            chosen = self._choose(q, summaries, pos)
            m = (pos // w).clamp(max=self.num_chunks - 1)
            real = (torch.arange(self.num_chunks - 1, device=x.device) < m[:, None]) \
                & (pos >= self.begin_selective_length)[:, None]
            return torch.where(real, chosen, -1)

    def _rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, summaries: torch.Tensor | None,
              start: int) -> torch.Tensor:
        """Outputs ``(B, H, n, d)`` of queries ``q`` (without RoPE) at positions ``start .. T-1`` over the keys
        (without RoPE) and values ``(B, Hkv, T, d)`` of positions ``0 .. T-1``: one ``attend`` for the ordinary
        rows, one for the selective rows (see the module docstring)."""
        w, nc = self.chunk_size, self.num_chunks
        b, h, n, d = q.shape
        t = k.shape[2]
        dev = q.device
        pos = torch.arange(start, t, device=dev)
        n0 = min(max(self.begin_selective_length - start, 0), n)
        outs = []
        if n0:
            keys = torch.arange(start + n0, device=dev)
            outs.append(attend(self._rope(q[:, :, :n0], pos[:n0]), self._rope(k[:, :, :start + n0], keys),
                               v[:, :, :start + n0], Causal()))
        if n0 < n:
            s0, tp = start + n0, (t + w - 1) // w * w
            gp = tp // w
            slot = (torch.arange(nc, device=dev)[:, None] * w + torch.arange(tp, device=dev) % w).flatten()
            kv = self._rope(F.pad(k, (0, 0, 0, tp - t)).repeat(1, 1, nc, 1), slot)  # copy s: keys at s*w + offset
            vv = F.pad(v, (0, 0, 0, tp - t)).repeat(1, 1, nc, 1)
            qs = self._rope(F.pad(q[:, :, n0:], (0, 0, 0, tp - t)), (nc - 1) * w + torch.arange(s0, tp, device=dev) % w)
            chosen = self._choose(q[:, :, n0:], summaries, pos[n0:])
            m = (pos[n0:] // w).clamp(max=nc - 1)
            j = torch.arange(nc - 1, device=dev)
            slot_of = j[None] + (nc - 1 - m)[:, None]  # (n - n0, nc - 1): the copy each read chunk comes from
            ids = torch.where(j[None] < m[:, None], slot_of * gp + chosen, -1)
            ids = F.pad(ids, (0, 0, 0, tp - t), value=-1)  # the padding rows read only their own chunk
            sel = SelectedBlocks(torch.full((b, h, tp - s0), nc - 1, device=dev), ids, q_block=1, kv_block=w)
            # own chunk: the last copy, aligned with the queries (the last query row is the last key of that copy);
            # block-sparse engine: Flex would build a (query, key block) table of N x n_c N / w entries
            out = attend(qs, kv, vv, BlockWindow(w, 0, 0) & Causal(), blocks=sel, engine="blocksparse")
            outs.append(out[:, :, :t - s0])
        return torch.cat(outs, 2) if len(outs) > 1 else outs[0]

    def _step(self, q: torch.Tensor, cache: LongHeadsCache) -> torch.Tensor:
        """One decoding step ``q (B, H, 1, d)`` (without RoPE) at position ``T - 1`` of the updated cache: the
        chosen chunks' keys gathered per head and rotated at the forward pass's positions."""
        w, nc = self.chunk_size, self.num_chunks
        k, v = cache.k, cache.v
        assert k is not None and v is not None  # appended to just now
        b, h, _, d = q.shape
        t = k.shape[2]
        i, dev = t - 1, q.device
        if i < self.begin_selective_length:
            return attend(self._rope(q, torch.tensor([i], device=dev)), self._rope(k, torch.arange(t, device=dev)), v)
        own = i // w
        m = min(own, nc - 1)
        chosen = self._choose(q, cache.summaries, torch.tensor([i], device=dev))[:, :, 0, :m]  # (B, H, m)
        tok = torch.cat([(chosen[..., None] * w + torch.arange(w, device=dev)).flatten(2),
                         torch.arange(own * w, t, device=dev).expand(b, h, -1)], -1)  # (B, H, L)
        kvh = (torch.arange(h, device=dev) // (h // self.num_kv_heads))[None, :, None]
        bi = torch.arange(b, device=dev)[:, None, None]
        slots = (torch.arange(m, device=dev) + nc - 1 - m)[:, None] * w + torch.arange(w, device=dev)
        kpos = torch.cat([slots.flatten(), (nc - 1) * w + torch.arange(t - own * w, device=dev)])
        qpos = torch.tensor([(nc - 1) * w + i % w], device=dev)
        return attend(self._rope(q, qpos), self._rope(k[bi, kvh, tok], kpos), v[bi, kvh, tok])

    def _update(self, cache: LongHeadsCache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append the new tokens and summarise the chunks they complete."""
        w = self.chunk_size
        cache.append(k, v)
        pending = q if cache.pending_q is None else torch.cat([cache.pending_q, q], 2)
        done = 0 if cache.summaries is None else cache.summaries.shape[2]
        full = cache.length // w
        if full > done:
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None
            new = self.chunk_summaries(pending[:, :, :(full - done) * w], ck[:, :, done * w:full * w],
                                       cv[:, :, done * w:full * w])
            cache.summaries = new if cache.summaries is None else torch.cat([cache.summaries, new], 2)
            pending = pending[:, :, (full - done) * w:]
        cache.pending_q = pending.detach()

    def forward(self, x: torch.Tensor, cache: LongHeadsCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """LongHeads attention of ``x``, or of the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``, ``N >= 1``: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Must be None (see the module docstring).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N >= 1, dim)``; a ``key_padding_mask``; ``cache`` made for another
                batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        check_tokens(x, self.dim)
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported by LongHeadsAttention (chunk summaries and the new "
                             "positions assume contiguous tokens; the layer is causal, right padding needs no mask)")
        cache = LongHeadsCache.checked(cache, x)
        n, w = x.shape[1], self.chunk_size
        q, k, v = self._project(x)
        if cache is None:
            summaries = None
            full = n // w * w
            if n > self.begin_selective_length and full:
                summaries = self.chunk_summaries(q[:, :, :full], k[:, :, :full], v[:, :, :full])
            out = self._rows(q, k, v, summaries, 0)
        else:
            start = cache.length
            self._update(cache, q, k, v)
            if n == 1:
                out = self._step(q, cache)
            else:
                ck, cv = cache.k, cache.v
                assert ck is not None and cv is not None
                out = self._rows(q, ck, cv, cache.summaries, start)
        return self.o_proj(merge_heads(out, (n,)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"chunk_size={self.chunk_size}, num_chunks={self.num_chunks}, "
                f"begin_selective_length={self.begin_selective_length}")


register(Mechanism(
    name="longheads", paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor (arXiv 2402.10685, "
                            "2024)", repo="LuLuLuyi/LongHeads", family="routed", dims=("1d",), cls=LongHeadsAttention,
    make=lambda dim, num_heads, **kw: LongHeadsAttention(dim, num_heads, **kw),
    patterns={"CS": {}}, why_not={
        "NS": "chunks are chosen among those before the query and re-positioned with the query last: the method is "
              "defined for causal decoding (training-free context extension of a decoder LM)",
        "NC": DECODER_ONLY, "CC": DECODER_ONLY},
    notes="training-free: chunks of 256, each query head reads chunk 0, the last complete chunk, the top-13 others "
          "by q . r_chunk and its own chunk, re-positioned to 0 .. 4095; ordinary causal attention below 4096 "
          "tokens; decode cache: every key (un-rotated) + one summary per chunk and query head"))
