"""Core Context Aware attention (CCA): globality-aware pooling of past groups into core tokens, plus a
locality-preserved local window, fused into one softmax (causal, for language models).

Paper: Chen et al., "Core Context Aware Transformers for Long Context Language Modeling" (ICML 2025). Official
code: chenyaofo/CCA-Attention (commit 052cc8e) ``codebase/core/cca_attn.py`` (``pooling_attention_wo_cache``,
``pooling_attention_w_cache``, ``generate_mask``) and ``codebase/core/cca_pooling.py``
(``fast_calculate_fusion_weights``, ``_weight_pooling``).

Per query head, after RoPE on q and k (0-based positions; ``g = group_size``, ``s = window_size``):

- group ``c`` is tokens ``[c*g, (c+1)*g)``; its core key/value are the keys/values of the group averaged with the
  weights ``softmax_j(q_{(c+1)g-1} . k_j / sqrt(d))`` (the group's last query; ``pooling="cca"``), or their plain
  mean / element-wise max (``pooling="mean"``/``"max"``, the official ablations);
- query ``i`` sees the first ``m(i) = max(0, floor((i + 1 - s) / g))`` core tokens and the raw keys
  ``m(i)*g <= j <= i``: the two sets tile the causal context exactly once, the raw window being ``s`` to
  ``s + g - 1`` keys long;
- one softmax over ``[core keys; raw keys]`` with that mask, through ``nearfar.attend``.

Cost: the fused softmax of a whole sequence is ``attend`` with the ``CoreAndWindow`` pattern over ``[core; raw]``
keys, so the block-sparse engine does O(N (N/g + s)) work and never forms the ``N x (N/g + N)`` mask (the official
code uses a dense mask below 300 tokens and a Triton kernel above); decoding steps use a small dense mask over the
cache. Sequences shorter than ``s + g`` (no core token yet) take the
``Causal()`` pattern path of ``attend`` instead (dense causal attention, the same function). The pooling softmax
is ``attend`` of each group's last query over its group (one head per (head, group) pair, values ``[k; v]``).
Memory (whole sequences): ``[core; raw]`` keys and values are built in one buffer each, which the fused softmax
saves, and the pooling's backward is written by hand from them (``_CoreAndRaw``), so training holds no other copy
of the keys/values; q and k are rotated with one cos/sin table (``benchmarks/memory.py`` compares the peaks with
the dense layer's).

Decoding (``new_cache``/``CCACache``): the cache keeps the core keys/values (one per completed group, per query
head), and the raw keys/values (and queries, for pooling) of the positions ``>= m(next)*g``: at most
``s + g - 2`` raw tokens after every step, so memory is ``N/g + s + g`` tokens, as in the official cache. When a
group leaves the window it is pooled from the cached (rotated) keys with its cached last query and evicted.

Differences from the official code:
- parameter names: ``group_size`` = official ``pooling_size`` (paper's group size ``g``), ``window_size`` = same,
  ``pooling`` = official ``pooling_func``; layer projections are ``q_proj/k_proj/v_proj/o_proj`` (LLaMA names;
  the official code patches LLaMA's attention, so a LLaMA layer's weights load unchanged);
- GQA: as in the official code (which pools after ``repeat_kv``) core tokens are per *query* head, so the raw
  keys/values are repeated to the query heads for the fused softmax (a copy when ``num_kv_heads < num_heads``);
- ``key_padding_mask`` (whole-sequence forward only, ``pooling="cca"`` only; the official code has no padding
  support): padded keys are left out of both the pooling softmax and the fused softmax, and a core token whose
  group is all padding is masked; ``pooling="mean"``/``"max"`` with a mask raise ``NotImplementedError``;
- no attention dropout; only the causal form (the paper defines no other); ``window_size >= 1`` (the official
  decode path slices ``K[:, :, -window_size:]``, which breaks for 0);
- the decode cache keeps all queries of the raw window (the official one does the same, ``update_kv``), and
  pools groups with the same arithmetic as the forward pass, so decoding equals teacher forcing exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_positive_int, check_tokens
from ..functional import attend, merge_heads
from ..patterns import Causal
from ..patterns.core_and_window import CoreAndWindow, cca_allowed, core_counts
from .kv_cache import DecodeState
from .projections import ProjectedAttention, add_projections
from .registry import POSITIONS_SHARED, Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

POOLINGS = ("cca", "mean", "max")


class CCACache(DecodeState):
    """Decoding state of a ``CCAAttention``: core keys/values ``(B, H, C, d)`` of the pooled groups and the raw
    queries/keys/values of positions ``raw_start .. length-1`` (keys/values with the KV heads)."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.length = 0  # tokens seen (the next token's position)
        self.raw_start = 0  # position of the first raw token kept
        self.core_k: torch.Tensor | None = None
        self.core_v: torch.Tensor | None = None
        self.raw_q: torch.Tensor | None = None
        self.raw_k: torch.Tensor | None = None
        self.raw_v: torch.Tensor | None = None

    @property
    def num_core(self) -> int:
        return 0 if self.core_k is None else self.core_k.shape[2]

    @property
    def num_raw(self) -> int:
        return self.length - self.raw_start

    @property
    def size(self) -> int:
        """Tokens of keys/values held: core tokens + raw tokens."""
        return self.num_core + self.num_raw


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=2)


def _expand(t: torch.Tensor, rep: int) -> torch.Tensor:
    """KV heads -> query heads (head ``h`` reads KV head ``h // rep``, as ``repeat_kv``): a copy unless ``rep == 1``."""
    if rep == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, rep, n, d).reshape(b, h * rep, n, d)


def pool_groups(q_end: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, pooling: str,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Core keys and values ``(B, H, C, d)`` of ``C`` whole groups: ``q_end (B, H, C, d)`` (each group's last
    query), ``k/v (B, H, C*g, d)``, ``keep (B, C*g)`` (True = a real token; ``pooling="cca"`` only)."""
    b, h, c, d = q_end.shape
    g = group_size
    kg, vg = k.reshape(b, h, c, g, d), v.reshape(b, h, c, g, d)
    if pooling == "mean":
        return kg.mean(-2), vg.mean(-2)
    if pooling == "max":
        return kg.amax(-2), vg.amax(-2)
    bias = None
    if keep is not None:
        bias = torch.zeros(b, 1, c, 1, g, dtype=q_end.dtype, device=q_end.device)
        bias = bias.masked_fill(~keep.view(b, 1, c, 1, g), float("-inf")).expand(b, h, c, 1, g)
        bias = bias.reshape(b, h * c, 1, g)
    # one head per (head, group): the group's last query attends to its own group, values = [k; v]
    kv = torch.cat([kg, vg], dim=-1).reshape(b, h * c, g, 2 * d)
    out = attend(q_end.reshape(b, h * c, 1, d), kg.reshape(b, h * c, g, d), kv, scale=d ** -0.5, bias=bias)
    ck, cv = out.reshape(b, h, c, 2 * d).split(d, dim=-1)
    return ck, cv


class _CoreAndRaw(torch.autograd.Function):
    """``[core; raw]`` keys and values ``(B, H, C + N, d)`` of a whole sequence, each in one buffer: the raw
    keys/values (repeated to the query heads) with the ``C`` core tokens pooled from them in front.

    Memory: autograd through ``pool_groups`` and ``torch.cat`` saved the pooling's ``[k; v]`` values and a copy of
    its keys, and the concatenations copied the raw keys/values once more, beside the buffers the fused softmax
    saves. Here nothing is saved but the two output buffers (which the fused softmax saves anyway) and a view of q:
    the backward reads the raw keys/values back from the buffers, recomputes the pooling weights (``B*H*C*g``
    numbers) and writes the gradients of the pooling (softmax-weighted sum, mean or max, as autograd would) by hand.
    The forward is ``pool_groups`` itself, so outputs are unchanged.
    """

    @staticmethod
    def forward(ctx: Any, q_end: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                group_size: int, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, c, d = q_end.shape
        n, p, rep = k.shape[2], c * group_size, h // k.shape[1]
        ck, cv = pool_groups(q_end, _expand(k[:, :, :p], rep), _expand(v[:, :, :p], rep), group_size, pooling, keep)
        out = []
        for core, raw in ((ck, k), (cv, v)):
            buf = raw.new_empty(b, h, c + n, d)
            buf[:, :, :c] = core
            buf[:, :, c:].unflatten(1, (h // rep, rep)).copy_(raw[:, :, None])
            out.append(buf)
        ctx.save_for_backward(q_end, out[0], out[1], keep)
        ctx.group_size, ctx.pooling, ctx.rep = group_size, pooling, rep
        return out[0], out[1]

    @staticmethod
    def backward(ctx: Any, dk_all: torch.Tensor, dv_all: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q_end, k_all, v_all, keep = ctx.saved_tensors
        b, h, c, d = q_end.shape
        g, rep = ctx.group_size, ctx.rep
        p = c * g
        dck, dcv = dk_all[:, :, :c], dv_all[:, :, :c]
        kg, vg = k_all[:, :, c:c + p].unflatten(2, (c, g)), v_all[:, :, c:c + p].unflatten(2, (c, g))
        dq_end = w = ds = None
        if ctx.pooling == "cca":  # core = sum_j w_j [k_j; v_j], w = softmax_j(scale q_end . k_j) over real tokens
            scale = d ** -0.5
            s = (kg @ q_end.unsqueeze(-1)).squeeze(-1) * scale  # (B, H, C, g)
            if keep is not None:
                s = s.masked_fill(~keep.view(b, 1, c, g), float("-inf"))
            w = torch.softmax(s, dim=-1)
            if keep is not None:  # a group of padding only: no weights (attend gives it a zero core token)
                w = w.masked_fill(~keep.view(b, 1, c, g).any(-1, keepdim=True), 0.0)
            dw = (kg @ dck.unsqueeze(-1)).squeeze(-1) + (vg @ dcv.unsqueeze(-1)).squeeze(-1)
            ds = w * (dw - (w * dw).sum(-1, keepdim=True)) * scale
            dq_end = (ds.unsqueeze(-2) @ kg).squeeze(-2)
        # the raw keys' gradient: the incoming one (copied: grad_outputs are not ours to modify; after the
        # temporaries above, so they never coexist) plus the pooling's share added in place into its first p rows
        # (through a query-head buffer with GQA)
        if rep == 1:
            dk, dv = dk_all[:, :, c:].clone(), dv_all[:, :, c:].clone()
            dkg, dvg = dk[:, :, :p].unflatten(2, (c, g)), dv[:, :, :p].unflatten(2, (c, g))
        else:
            dk, dv = (t[:, :, c:].unflatten(1, (h // rep, rep)).sum(2) for t in (dk_all, dv_all))
            dkg, dvg = kg.new_zeros(kg.shape), vg.new_zeros(vg.shape)
        if ctx.pooling == "mean":  # as autograd's mean: the gradient / g to each member
            dkg.add_((dck / g).unsqueeze(-2))
            dvg.add_((dcv / g).unsqueeze(-2))
        elif ctx.pooling == "max":  # as autograd's amax: shared evenly between the tied maxima
            for xg, core, dcore, dxg in ((kg, k_all[:, :, :c], dck, dkg), (vg, v_all[:, :, :c], dcv, dvg)):
                hit = xg == core.unsqueeze(-2)
                dxg.add_(hit * (dcore / hit.sum(-2)).unsqueeze(-2))
        else:
            assert w is not None and ds is not None
            dkg.addcmul_(w.unsqueeze(-1), dck.unsqueeze(-2)).addcmul_(ds.unsqueeze(-1), q_end.unsqueeze(-2))
            dvg.addcmul_(w.unsqueeze(-1), dcv.unsqueeze(-2))
        if rep > 1:  # query heads -> their KV head
            dk[:, :, :p] += dkg.flatten(2, 3).unflatten(1, (h // rep, rep)).sum(2)
            dv[:, :, :p] += dvg.flatten(2, 3).unflatten(1, (h // rep, rep)).sum(2)
        return dq_end, dk, dv, None, None, None


@whole_sequence()
class CCAAttention(ProjectedAttention):
    """``CCAAttention(dim, num_heads, group_size=16, window_size=1024, pooling="cca", num_kv_heads=None,
    causal=True, rope=True, qkv_bias=False)``: causal CCA self-attention of ``x (B, N, dim)`` with RoPE and GQA;
    decoding through ``new_cache`` keeps ``N/group_size + window_size + group_size`` tokens.

    Chen et al., "Core Context Aware Transformers for Long Context Language Modeling" (ICML 2025); official code:
    chenyaofo/CCA-Attention. Each group of ``group_size`` tokens that has left the local window is pooled into one
    core token; a query attends to every core token and to its last ``window_size`` raw tokens in one softmax.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of query heads, >= 1.
        group_size: Tokens pooled into one core token, >= 1 (default 16).
        window_size: Raw keys of the local window, >= 1 (default 1024).
        pooling: ``"cca"`` (default: weighted by the group's last query), ``"mean"`` or ``"max"``.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        causal: Must be True (CCA is defined for causal LMs only).
        rope: Rotary position embeddings (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``group_size``, ``window_size`` or ``num_kv_heads`` is not an int.
        ValueError: ``pooling`` is not one of the three; ``causal`` is not True; ``group_size`` or ``window_size`` < 1;
            ``dim`` is not a positive multiple of ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import CCAAttention
        >>> layer = CCAAttention(64, 4, group_size=4, window_size=8)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, group_size: int = 16, window_size: int = 1024, pooling: str = "cca",
                 num_kv_heads: int | None = None, causal: bool = True, rope: bool = True, qkv_bias: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if causal is not True:
            raise ValueError(f"causal must be True: CCA is defined for causal language models only, got {causal!r}")
        self.group_size = check_positive_int(group_size, "group_size")
        self.window_size = check_positive_int(window_size, "window_size")
        self.pooling, self.causal = pooling, True
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> CCACache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            A ``CCACache``: the core tokens of the pooled groups and the raw tokens still in reach (at most
            ``N / group_size + window_size + group_size`` tokens).
        """
        return CCACache(batch, device, dtype)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """KV heads -> query heads (head ``h`` reads KV head ``h // group``, as ``repeat_kv``)."""
        return _expand(t, self.num_heads // self.num_kv_heads)

    def _pool(self, q_end: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Core tokens of ``C`` whole groups: ``q_end (B, H, C, d)`` (each group's last query), ``k/v (B, H, C*g,
        d)``, ``keep (B, C*g)`` -> core keys and values ``(B, H, C, d)``."""
        return pool_groups(q_end, k, v, self.group_size, self.pooling, keep)

    def _fused(self, q: torch.Tensor, q_pos: torch.Tensor, core_k: torch.Tensor | None,
               core_v: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
               k_pos: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """One softmax over ``[core; raw]`` keys (raw keys already repeated to the query heads)."""
        num_core = 0 if core_k is None else core_k.shape[2]
        allowed = cca_allowed(q_pos, num_core, k_pos, self.window_size, self.group_size)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        if core_k is not None and core_v is not None and num_core:
            k, v = torch.cat([core_k, k], dim=2), torch.cat([core_v, v], dim=2)
        return attend(q, k, v, bias=bias, key_padding_mask=keep)

    def forward(self, x: torch.Tensor, cache: CCACache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal CCA attention of ``x``, or the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``, ``N >= 1``: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Optional bool ``(B, N)``, True = a real token (whole sequences only, ``pooling="cca"``).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N >= 1, dim)``; a ``key_padding_mask`` of another shape or dtype, or with
                ``cache``; ``cache`` made for another batch, device or dtype.
            NotImplementedError: A ``key_padding_mask`` with ``pooling`` other than ``"cca"``.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        check_tokens(x, self.dim)
        cache = CCACache.checked(cache, x)
        b, n, _ = x.shape
        if key_padding_mask is not None:
            if cache is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool or tuple(
                    key_padding_mask.shape) != (b, n):
                raise ValueError(f"key_padding_mask must be a bool tensor of shape ({b}, {n}), got "
                                 f"{getattr(key_padding_mask, 'shape', type(key_padding_mask).__name__)}")
            if self.pooling != "cca":
                raise NotImplementedError(f"key_padding_mask is supported with pooling='cca' only, got "
                                          f"{self.pooling!r}")
        q, k, v, pos = rotary_qkv(self, x, 0 if cache is None else cache.length, shared_tables=True)
        if cache is None:
            out = self._forward_full(q, k, v, pos, key_padding_mask)
        else:
            out = self._forward_cached(q, k, v, pos, cache)
        return self.o_proj(merge_heads(out, (n,)))

    def _forward_full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      kpm: torch.Tensor | None) -> torch.Tensor:
        n, g = q.shape[2], self.group_size
        num_core = max(0, (n - self.window_size) // g)
        if num_core == 0:  # no group has left the window yet: plain causal attention
            return attend(q, k, v, Causal(), key_padding_mask=kpm)
        p = num_core * g
        keep_pool = None if kpm is None else kpm[:, :p]
        keep = None if kpm is None or keep_pool is None else torch.cat([keep_pool.view(-1, num_core, g).any(-1), kpm],
                                                                        dim=1)
        k, v = _CoreAndRaw.apply(q[:, :, g - 1:p:g], k, v, keep_pool, g, self.pooling)
        return attend(q, k, v, CoreAndWindow(num_core, self.window_size, g), key_padding_mask=keep)

    def _pool_cache(self, cache: CCACache, upto: int) -> None:
        """Pool groups ``num_core .. upto-1`` from the cache's raw tokens (which must still hold them)."""
        c0, g = cache.num_core, self.group_size
        if upto <= c0:
            return
        lo, hi = c0 * g - cache.raw_start, upto * g - cache.raw_start
        assert cache.raw_q is not None and cache.raw_k is not None and cache.raw_v is not None  # appended before
        ck, cv = self._pool(cache.raw_q[:, :, lo + g - 1:hi:g], self._expand(cache.raw_k[:, :, lo:hi]),
                            self._expand(cache.raw_v[:, :, lo:hi]))
        cache.core_k, cache.core_v = _cat(cache.core_k, ck), _cat(cache.core_v, cv)

    def _forward_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        cache: CCACache) -> torch.Tensor:
        n = q.shape[2]
        raw_q, raw_k, raw_v = _cat(cache.raw_q, q), _cat(cache.raw_k, k), _cat(cache.raw_v, v)
        cache.raw_q, cache.raw_k, cache.raw_v = raw_q, raw_k, raw_v
        cache.length += n
        s, g = self.window_size, self.group_size
        self._pool_cache(cache, int(core_counts(pos[-1:], s, g)))
        k_pos = torch.arange(cache.raw_start, cache.length, device=q.device)
        out = self._fused(q, pos, cache.core_k, cache.core_v, self._expand(raw_k), self._expand(raw_v), k_pos)
        # the next query sees m(length) core tokens and raw keys from m(length)*g on: pool and evict the rest
        m = int(core_counts(torch.tensor([cache.length]), s, g))
        self._pool_cache(cache, m)
        drop = m * g - cache.raw_start
        if drop > 0:
            assert cache.raw_q is not None and cache.raw_k is not None and cache.raw_v is not None  # appended above
            cache.raw_q, cache.raw_k, cache.raw_v = (t[:, :, drop:] for t in (cache.raw_q, cache.raw_k, cache.raw_v))
            cache.raw_start = m * g
        return out


register(Mechanism(
    name="cca", paper="Core Context Aware Transformers for Long Context Language Modeling (ICML 2025)",
    repo="chenyaofo/CCA-Attention", family="local+global", dims=("1d",), cls=CCAAttention,
    patterns={"CS": {}}, why_not={
        "NS": "core tokens are pooled with the weights of each group's last query, a causal construction; the paper "
              "and its code define the causal LM form only",
        "NC": "core tokens pool groups of keys aligned with the queries' positions and a local window around "
              "them; a source of another length has neither", "CC": POSITIONS_SHARED},
    make=lambda dim, num_heads, **kw: CCAAttention(dim, num_heads, **kw),
    notes="group 16, window 1024, 'cca' pooling (last-query-weighted core token per group) fused with the local "
          "window in one softmax; causal only; O(N (N/g + window)) through attend's block-sparse engine; decode cache "
          "<= N/g + window + group tokens"))
