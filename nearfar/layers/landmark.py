"""Landmark attention: a landmark token closes every block of ``block_size`` tokens; a query attends to its own
block token by token and to earlier blocks through their landmarks (grouped softmax), and at inference retrieves the
top-k blocks by landmark score from a cache of the whole context (causal, for language models).

Paper: Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (NeurIPS
2023, arXiv 2305.16300). Official code: epfml/landmark-attention ``lm_benchmark/models/landmark.py``
(``landmark_grouped_softmax``, ``LandmarkGroupedSoftmaxFunction``, ``CausalSelfAttention``),
``lm_benchmark/models/caches/mem_cache.py`` (``MemLMCacheStorage.retrieve_for_query``) and ``llama/llama_mem.py``
(``LlamaAttention.forward``: retrieval and its positions).

Layout (``landmark_tokens``): position ``p`` holds a landmark iff ``p % (block_size + 1) == block_size``; the data
carries them (``LandmarkTokens`` inserts a learned vector), or ``is_mem (B, N)`` marks them anywhere (whole
sequences, ``top_k=None``). Block of token ``j``: the landmarks strictly before ``j`` (a landmark closes its block).

Grouped softmax (training, and in-context inference; ``top_k=None``), query ``i``, scores ``s_ij = q_i.k_j/sqrt(d)``:
the outer softmax runs over the regular tokens ``j <= i`` of ``i``'s block and the landmarks of earlier blocks; the
inner softmax over each earlier block's regular tokens; a token of earlier block ``c`` gets ``p_in(j) * p_out(L_c)``,
a token of the own block ``p_out(j)``, every landmark 0 (the own block's landmark is masked even for the landmark's
own query). We evaluate it as one ordinary softmax over logits ``s_ij + s_{i,L_c} - logsumexp_{j' in c} s_ij'`` for
earlier regular tokens, ``s_ij`` for the own block, ``-inf`` elsewhere: the same weights, vectorised (segment max /
sum by block id), with autograd. Like the official code it forms ``(queries x keys)`` scores, O(N^2) memory, but in
chunks of queries (``CHUNK_ELEMENTS`` scores at a time).

Retrieval (``top_k=k``, the paper's inference, whole sequences and decoding alike), per query ``i`` in block ``c``
and per head: if ``c > k``, score the landmarks of blocks ``0..c-1``, take the top ``k`` and sort them by block;
otherwise take all ``c`` blocks. The retrieved blocks (``block_size`` tokens + landmark each) and the own block's
tokens go through the grouped softmax. Keys are kept before RoPE and rotated at the positions of the official LLaMA
rule (``reposition=True``): with ``kk = min(k, c)`` and ``prefix = (c - kk - 1) * (block_size + 1)``, landmark ``b``
is scored at ``prefix + idx_b * (block_size + 1) + block_size`` (``idx_b = 0`` for the older blocks,
``1..kk`` for the last ``kk``), and the ``j``-th retrieved block starts at ``prefix + (j + [it is one of the last kk])
* (block_size + 1)``; queries and the own block keep their positions. With ``k >= c`` these are the true positions,
so retrieval equals the grouped softmax; ``reposition=False`` keeps every key at its true position. The retrieved
keys are gathered per query and head and rotated there, as in the official code (a block's positions depend on the
query, and the grouped softmax is not one softmax over a shared key set, so ``attend``'s selected blocks do not fit).

Decoding (``new_cache``): the cache keeps every key (before RoPE) and value, as the official cache (retrieval saves
compute, O(N/block_size + k*block_size) per token with ``top_k``, not memory); decoding equals the forward pass for
any ``top_k``, in any chunking.

Differences from the official code:
- retrieval is per query over every block completed before it, so a sequence gives the same outputs whole, in
  chunks or token by token (the official LLaMA code retrieves from the blocks cached before the current chunk and
  runs the chunk's own blocks in context; token by token the two agree); ``forward`` of a whole sequence with
  ``top_k`` retrieves too (the official code evaluates long inputs chunk by chunk);
- positions follow ``llama/llama_mem.py``; ``lm_benchmark``'s ``mem_cache.py`` places the query chunk after
  ``min(blocks, k + 1)`` blocks, which shifts retrieved blocks by one block while the cache holds ``<= k`` blocks;
- selection per token and head only (the official ``max_over_heads`` / ``max_over_tokens`` are not offered); with GQA
  each query head retrieves from its KV head; no group dropout, no ``max_groups_for_softmax`` (the number of blocks
  comes from the sequence), autograd instead of a custom backward; a row with no key gives 0 (as lm_benchmark), and
  the landmark of a block without regular tokens keeps its outer share, which reaches no value (as the official);
- ``key_padding_mask`` (ours) only in the grouped softmax of whole sequences; ``q_proj/k_proj/v_proj/o_proj`` (LLaMA
  names), RoPE in the LLaMA layout; no attention dropout.
"""

from __future__ import annotations

import torch

from ..checks import check_bool, check_positive_int, check_tokens
from ..functional import merge_heads, split_heads
from .kv_cache import KVCache
from .landmark_tokens import landmark_mask
from .projections import ProjectedAttention, add_projections
from .registry import Mechanism, register
from .sharding import whole_sequence

#: scores of one chunk of queries (``B * H * queries * keys``) that the grouped softmax forms at a time
CHUNK_ELEMENTS = 1 << 22
_NEG = float("-inf")


def _softmax0(z: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row of -inf only gives zeros (no NaN, in values or gradients)."""
    m = z.detach().amax(-1, keepdim=True)
    e = torch.exp(z - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def _gqa(q: torch.Tensor, hk: int) -> torch.Tensor:
    """``(B, H, ...)`` -> ``(B, Hkv, H // Hkv, ...)``: query head ``h`` reads KV head ``h // (H // Hkv)``."""
    return q.reshape(q.shape[0], hk, q.shape[1] // hk, *q.shape[2:])


def grouped_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_mem: torch.Tensor,
                              key_padding_mask: torch.Tensor | None = None,
                              num_groups: int | None = None) -> torch.Tensor:
    """Landmark grouped-softmax attention of the last ``T`` positions of a sequence of ``N`` (causal).

    Args:
        q: Queries ``(B, H, T, d)`` at positions ``N-T .. N-1`` (rotated already, if RoPE).
        k: Keys ``(B, Hkv, N, d)``, ``Hkv`` dividing ``H``.
        v: Values ``(B, Hkv, N, dv)``.
        is_mem: Bool ``(B, N)`` or ``(N,)``, True at landmark tokens.
        key_padding_mask: Optional bool ``(B, N)``, True = a real token.
        num_groups: More than the number of landmarks (None: ``N + 1``).

    Returns:
        ``(B, H, T, dv)``: per query, the own block's regular tokens weighted by the outer softmax, each earlier
        block's regular tokens by inner softmax x its landmark's outer probability, landmarks by 0.

    Raises:
        ValueError: ``q``, ``k``, ``v`` are not 4-D with matching batch, keys and heads (``Hkv`` dividing ``H``,
            ``T <= N``); ``is_mem`` or ``key_padding_mask`` is not bool of the keys' shape.

    Examples:
        >>> import torch
        >>> from nearfar.layers.landmark import grouped_softmax_attention
        >>> q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
        >>> mem = torch.tensor([0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
        >>> w = grouped_softmax_attention(q, k, torch.eye(7).expand(1, 2, 7, 7), mem)  # values = one-hot keys
        >>> round(w[0, 0, -1].sum().item(), 5), w[..., [2, 5]].abs().max().item()   # rows sum to 1, landmarks 0
        (1.0, 0.0)
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q, k, v must be (B, H, T, d), (B, Hkv, N, d), (B, Hkv, N, dv) with Hkv dividing H and "
                         f"T <= N, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    for name, mask in (("is_mem", is_mem), ("key_padding_mask", key_padding_mask)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) not in ((n,), (b, n))):
            raise ValueError(f"{name} must be a bool tensor of shape ({n},) or ({b}, {n}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    is_mem = is_mem.expand(b, n)
    grp = torch.cumsum(is_mem.long(), -1) - is_mem.long()  # landmarks strictly before each token
    g = n + 1 if num_groups is None else num_groups
    reg = ~is_mem if key_padding_mask is None else ~is_mem & key_padding_mask
    lmk = is_mem if key_padding_mask is None else is_mem & key_padding_mask
    has_lmk = torch.zeros(b, g, dtype=torch.long, device=q.device).scatter_add(1, grp, lmk.long()) > 0
    k_pos = torch.arange(n, device=q.device)
    kg, reg4, lmk4 = grp[:, None, None, :], reg[:, None, None, :], lmk[:, None, None, :]
    step = max(1, CHUNK_ELEMENTS // max(1, b * h * n))
    outs = []
    for i0 in range(0, t, step):
        qc = q[:, :, i0:i0 + step]
        tc = qc.shape[2]
        s = (_gqa(qc, hk) @ k.unsqueeze(2).transpose(-1, -2)).reshape(b, h, tc, n) * d ** -0.5
        q_pos = k_pos[n - t + i0:n - t + i0 + tc]
        qg = grp[:, None, n - t + i0:n - t + i0 + tc, None]
        earlier = (kg < qg) & reg4  # regular tokens of completed earlier blocks (all before the query)
        current = (kg == qg) & reg4 & (k_pos <= q_pos[:, None])
        idx = kg.expand(b, h, tc, n)
        s_in = s.masked_fill(~earlier, _NEG)
        mx = torch.full((b, h, tc, g), _NEG, dtype=s.dtype, device=s.device)
        mx = mx.scatter_reduce(-1, idx, s_in.detach(), "amax")
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        tot = torch.zeros_like(mx).scatter_add(-1, idx, torch.exp(s_in - mx.gather(-1, idx)))
        ok = tot > 0
        lse = torch.where(ok, torch.log(torch.where(ok, tot, torch.ones_like(tot))) + mx, torch.zeros_like(tot))
        lm = torch.zeros_like(mx).scatter_add(-1, idx, torch.where(lmk4, s, torch.zeros_like(s)))
        offset = torch.where(has_lmk[:, None, None, :], lm - lse, torch.full_like(lm, _NEG))
        z = torch.where(earlier, s + offset.gather(-1, idx), torch.where(current, s, torch.full_like(s, _NEG)))
        # a landmark whose block has no (real) regular token keeps its outer mass, which then reaches no value
        lost = lmk4 & (kg < qg) & ~ok.gather(-1, idx)
        w = _softmax0(torch.where(lost, s, z)).masked_fill(lost, 0.0)
        outs.append((_gqa(w, hk) @ v.unsqueeze(2)).reshape(b, h, tc, v.shape[-1]))
    return torch.cat(outs, 2)


class LandmarkCache(KVCache):
    """Decoding state of a ``LandmarkAttention``: every key (before RoPE) and value, ``(B, Hkv, length, d)``, as
    the official memory cache (retrieval reduces the work per token, not the memory)."""


@whole_sequence(tokens=("key_padding_mask", "is_mem"))
class LandmarkAttention(ProjectedAttention):
    """``LandmarkAttention(dim, num_heads, block_size=50, top_k=None, reposition=True, num_kv_heads=None,
    causal=True, rope=True, qkv_bias=False)``: causal landmark attention of ``x (B, N, dim)`` whose landmarks sit
    after every ``block_size`` tokens (``LandmarkTokens``), with RoPE and GQA.

    Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (NeurIPS 2023);
    official code: epfml/landmark-attention. Train with ``top_k=None`` (the grouped softmax over every earlier
    block); set ``top_k`` (e.g. ``layer.top_k = 4``) to retrieve that many blocks per query and head at inference.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of query heads, >= 1.
        block_size: Regular tokens per block, >= 1 (default 50, the official ``mem_freq``; a block holds
            ``block_size + 1`` tokens with its landmark).
        top_k: Blocks retrieved per query and head, >= 1; None (default): every earlier block (grouped softmax).
        reposition: Rotate retrieved blocks to the official positions (default True), or keep their own (False).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        causal: Must be True (landmark attention is defined for causal language models).
        rope: Rotary position embeddings (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``block_size``, ``top_k`` or ``num_kv_heads`` is not an int; ``reposition`` is not a bool.
        ValueError: ``causal`` is not True; ``block_size`` or ``top_k`` < 1; ``dim`` is not a positive multiple of
            ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import LandmarkAttention
        >>> layer = LandmarkAttention(64, 4, block_size=7)
        >>> x = torch.randn(2, 40, 64)                        # landmarks at positions 7, 15, 23, 31, 39
        >>> layer(x).shape
        torch.Size([2, 40, 64])
        >>> layer.top_k = 2                                   # inference: retrieve 2 blocks per query and head
        >>> cache = layer.new_cache(2)
        >>> out = torch.cat([layer(x[:, :30], cache=cache), layer(x[:, 30:], cache=cache)], 1)
        >>> bool((out - layer(x)).abs().max() < 1e-5)        # decoding equals the forward pass
        True
    """

    def __init__(self, dim: int, num_heads: int, block_size: int = 50, top_k: int | None = None,
                 reposition: bool = True, num_kv_heads: int | None = None, causal: bool = True, rope: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        if causal is not True:
            raise ValueError(f"causal must be True: landmark attention is defined for causal language models only, "
                             f"got {causal!r}")
        self.block_size = check_positive_int(block_size, "block_size")
        self.top_k = None if top_k is None else check_positive_int(top_k, "top_k")
        self.reposition, self.causal = check_bool(reposition, "reposition"), True
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, top_k={self.top_k}, reposition={self.reposition}"

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LandmarkCache:
        """An empty decoding state for ``batch`` sequences (landmarks every ``block_size + 1`` positions).

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            A ``LandmarkCache`` holding every key (before RoPE) and value.
        """
        return LandmarkCache(batch, device=device, dtype=dtype)

    def _rot(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE of ``t (..., d)`` at positions ``pos`` (broadcast to ``t.shape[:-1]``), as ``RotaryEmbedding``."""
        if self.rope is None:
            return t
        angles = pos.to(torch.float32)[..., None] * self.rope.inv_freq
        cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    def forward(self, x: torch.Tensor, cache: LandmarkCache | None = None,
                key_padding_mask: torch.Tensor | None = None, is_mem: torch.Tensor | None = None) -> torch.Tensor:
        """Causal landmark attention of ``x``, or of the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``, ``N >= 1``, landmarks included: whole sequences, or with ``cache`` the next
                ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Optional bool ``(B, N)``, True = a real token (whole sequences, ``top_k=None``).
            is_mem: Optional bool ``(B, N)``, True at landmarks (whole sequences, ``top_k=None``); None: every
                ``block_size + 1``-th position.

        Returns:
            The output ``(B, N, dim)`` (rows at landmarks included).

        Raises:
            ValueError: ``x`` is not ``(B, N >= 1, dim)``; ``is_mem`` or ``key_padding_mask`` of another shape or
                dtype, or given with ``cache`` or ``top_k``; ``cache`` made for another batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        check_tokens(x, self.dim)
        cache = LandmarkCache.checked(cache, x)
        b, n, _ = x.shape
        for name, mask in (("is_mem", is_mem), ("key_padding_mask", key_padding_mask)):
            if mask is None:
                continue
            if cache is not None or self.top_k is not None:
                raise ValueError(f"{name} is for whole sequences with top_k=None; with a cache or top_k the "
                                 f"landmarks sit every block_size + 1 positions and every token is real")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
                raise ValueError(f"{name} must be a bool tensor of shape ({b}, {n}), got "
                                 f"{getattr(mask, 'shape', type(mask).__name__)}")
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + n, device=x.device)
        q = self._rot(split_heads(self.q_proj(x), self.num_heads), pos)
        k, v = split_heads(self.k_proj(x), self.num_kv_heads), split_heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            cache.append(k, v)
            assert cache.k is not None and cache.v is not None  # appended above
            k, v = cache.k, cache.v
        total = start + n
        if self.top_k is None:
            groups = total + 1 if is_mem is not None else total // (self.block_size + 1) + 1
            mem = landmark_mask(total, self.block_size, device=x.device) if is_mem is None else is_mem
            k_rot = self._rot(k, torch.arange(total, device=x.device))
            out = grouped_softmax_attention(q, k_rot, v, mem, key_padding_mask, groups)
        else:
            out = self._retrieve(q, k, v, start)
        return self.o_proj(merge_heads(out, (n,)))

    def _retrieve(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Retrieval attention of queries ``q (B, H, T, d)`` (rotated) at positions ``start..start+T-1`` over the
        keys before RoPE ``k (B, Hkv, start+T, d)`` and values ``v``."""
        b, h, t, d = q.shape
        hk, dv = k.shape[1], v.shape[-1]
        size, ell = self.block_size + 1, self.block_size
        top = self.top_k
        assert top is not None  # retrieval only
        total = start + t
        full = total // size  # completed blocks (views of the cache, no copy)
        kb = k[:, :, :full * size].view(b, hk, full, size, d)
        vb = v[:, :, :full * size].view(b, hk, full, size, dv)
        offs = torch.arange(size, device=q.device)
        heads = (torch.arange(h, device=q.device) // (h // hk))[None, :, None, None]
        bidx = torch.arange(b, device=q.device)[:, None, None, None]
        scale = d ** -0.5
        per_query = b * h * (full * d + (min(top, full) + 1) * size * (d + dv))
        step = max(1, CHUNK_ELEMENTS // max(1, per_query))
        outs = []
        for i0 in range(0, t, step):
            tc = min(step, t - i0)
            p0 = start + i0
            pos = torch.arange(p0, p0 + tc, device=q.device)
            c, o = pos // size, pos % size  # own block, offset in it
            qc = q[:, :, i0:i0 + tc]
            q5 = _gqa(qc, hk)  # (B, Hkv, rep, Tc, d)
            # the own block's regular tokens j <= i, at their positions (past the end: masked)
            own = c[:, None] * size + offs  # (Tc, size)
            kl = self._rot(k[:, :, own.clamp(max=total - 1)], own)  # (B, Hkv, Tc, size, d)
            vl = v[:, :, own.clamp(max=total - 1)]
            s_loc = torch.einsum("bgrtd,bgtld->bgrtl", q5, kl).reshape(b, h, tc, size) * scale
            z_loc = s_loc.masked_fill(~((offs <= o[:, None]) & (offs < ell)), _NEG)
            m = (p0 + tc - 1) // size  # blocks completed before the chunk's last query
            if m == 0:
                w = _softmax0(z_loc)
                outs.append(torch.einsum("bgrtl,bgtle->bgrte", _gqa(w, hk), vl).reshape(b, h, tc, dv))
                continue
            blocks = torch.arange(m, device=q.device)
            ci = c[:, None]  # (Tc, 1): blocks completed before each query
            if m <= top:  # every query takes all its completed blocks, at their own positions
                kk, valid = m, (blocks < ci)[None, None]  # (1, 1, Tc, m)
                kt = self._rot(kb[:, :, :m], blocks[:, None] * size + offs)  # at their own positions
                s_r = torch.einsum("bgrtd,bgmld->bgrtml", q5, kt).reshape(b, h, tc, m, size)
            else:
                kq = ci.clamp(max=top)  # blocks taken: all of them while there are at most top_k
                if self.reposition:  # older blocks share one slot, the last kq keep theirs (llama_mem.py)
                    recent = blocks >= ci - kq
                    lm_pos = (ci - kq - 1 + torch.where(recent, blocks - (ci - kq) + 1, 0)) * size + ell
                else:
                    lm_pos = (blocks * size + ell).expand(tc, m)
                k_lm = self._rot(kb[:, :, None, :m, ell], lm_pos)  # (B, Hkv, Tc, m, d)
                score = torch.einsum("bgrtd,bgtmd->bgrtm", q5, k_lm).reshape(b, h, tc, m)
                sel = score.masked_fill(~(blocks < ci), _NEG).topk(top, dim=-1).indices.sort(-1).values
                kk, valid = top, sel < ci  # (B, H, Tc, top) block ids, in order
                if self.reposition:
                    base = (ci - kq - 1 + torch.arange(top, device=q.device) + (sel >= ci - kq).long()) * size
                else:
                    base = sel * size
                kg = self._rot(kb[bidx, heads, sel], base[..., None] + offs)  # (B, H, Tc, top, size, d)
                s_r = torch.einsum("bhtd,bhtkld->bhtkl", qc, kg)
            s_r = torch.where(valid[..., None], s_r * scale, torch.zeros_like(s_r))  # no -inf - -inf below
            lse = torch.logsumexp(s_r[..., :ell], -1, keepdim=True)
            z_r = torch.where(valid[..., None], s_r[..., :ell] + s_r[..., ell:] - lse, _NEG)
            w = _softmax0(torch.cat([z_r.flatten(-2), z_loc], -1))
            w_r, w_loc = w[..., :kk * ell].unflatten(-1, (kk, ell)), w[..., kk * ell:]
            if m <= top:
                out = torch.einsum("bgrtkl,bgkle->bgrte", _gqa(w_r, hk), vb[:, :, :m, :ell]).reshape(b, h, tc, dv)
            else:
                out = torch.einsum("bhtkl,bhtkle->bhte", w_r, vb[bidx, heads, sel][..., :ell, :])
            outs.append(out + torch.einsum("bgrtl,bgtle->bgrte", _gqa(w_loc, hk), vl).reshape(b, h, tc, dv))
        return torch.cat(outs, 2)


register(Mechanism(
    name="landmark",
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers (NeurIPS 2023)",
    repo="epfml/landmark-attention", family="routed", dims=("1d",), cls=LandmarkAttention,
    patterns={"CS": {}}, why_not={
        "NS": "a landmark gates the blocks before a query's own block and retrieval reads a cache of the past: the "
              "paper and its code define the causal language-model form only",
        "NC": "the landmarks are tokens of the attended sequence itself, one every block_size tokens; a separate "
              "source carries none and the paper defines no cross-attention form",
        "CC": "the landmarks are tokens of the attended sequence itself, one every block_size tokens; a separate "
              "source carries none and the paper defines no cross-attention form"},
    make=lambda dim, num_heads, **kw: LandmarkAttention(dim, num_heads, **kw),
    notes="a landmark token after every 50 tokens (LandmarkTokens inserts a learned one); grouped softmax over the "
          "own block's tokens and earlier blocks' landmarks (top_k=None, training); top_k=k retrieves k blocks per "
          "query and head from a cache of every key (official LLaMA re-positioning); O(N^2) scores in query chunks"))
