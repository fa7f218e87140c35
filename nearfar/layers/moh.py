"""MoH: Mixture-of-Head attention -- each token uses its shared heads plus the top-K of its routed heads.

Paper: Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention" (2024, arXiv 2410.11842).
Official code: SkyworkAI/MoH -- ``MoH-ViT/attention.py`` (``Attention.forward``: the learned router of the models
trained from scratch) and ``MoH-LLaMA3/Inference_code/modeling_llama.py`` (``LlamaAttention.forward``: the
parameter-free router of the continue-tuned LLaMA3-8B).

Heads ``0 .. H_s-1`` are shared (on for every token), heads ``H_s .. H-1`` routed; token ``t``'s output is
``o_proj(sum_h g_h(t) head_h(t))`` with ``g_h(t) = 0`` for the routed heads it does not pick. Two routers:

- ``router="learned"`` (ViT form): ``p = softmax(W_r x)`` over the routed heads, keep the top-K, renormalise them to
  sum 1 and multiply by K; shared gates ``softmax(W_s x) * H_s`` (the constant 1 when ``H_s = 1``); with shared heads,
  ``[a1, a2] = 2 softmax(W_h x)`` scales shared gates by ``a1``, routed by ``a2``. Uniform router outputs (zero
  router weights) and ``K = H - H_s`` give every gate 1: plain multi-head attention. In training mode the forward
  stores the load-balance loss ``R^2 * mean_i(P_i f_i)`` (``R = H - H_s``; ``P_i`` the mean router probability of
  routed head ``i``, ``f_i`` the fraction of tokens that pick it) in ``layer.aux_loss`` (None in eval mode and for
  the other router), to be added to the task loss by the caller (the paper weights it 0.01); the official code
  appends it to the class-level list ``Attention.LOAD_BALANCING_LOSSES`` instead.
- ``router="query_norm"`` (LLaMA3 form): the routed heads' query norms (before RoPE) divided by their standard
  deviation over the routed heads, softmax, top-K; the gate is binary (1 on the picked and the shared heads, 0
  elsewhere), no parameters, no gradient through the routing. Softmax and the division by a positive standard
  deviation keep the order, so we take the top-K of the norms directly (the same heads).

Compute that is skipped: a routed head that no token of the call picks runs no attention at all (decoding one
sequence, exactly the shared and the K picked heads run, and the others' cached keys are not read unless a KV head
they share under GQA is). Non-causal and
cross-attention: a routed head also runs only the query rows of the tokens that pick it (gathered, padded to the
most picks among the heads of the call, attended against all keys, gated and scattered back). Causal
self-attention: a routed head runs only its picked rows too, through ``attend_rows`` (the compiled CPU kernel takes
each head's picked rows as a list and bounds every row's keys by its position, so no gathered copy and no per-row
mask; gathering the rows for a masked dense kernel was measured no faster than the causal kernel on all rows, the
masks costing what the skipped rows save). Where the kernel is not built, the head runs every row on the causal
kernel and the unpicked rows are multiplied by 0. K/V are sliced for contiguous runs of heads (whole GQA groups,
or one KV head), never copied.
Keys and values are projected, and cached, for every head: a later token may pick any head. Timings:
``MoHAttention``'s docstring.

Differences from the official code: the attention inside each head is plain scaled dot-product attention with
RoPE (self-attention), not TransNeXt's length-scaled cosine attention with query embedding and continuous position
bias of the ViT code; ``o_proj`` has no bias; no dropout; the official "no routed heads" mode (``routed_head=0``:
every head soft-gated by ``softmax(W_s x) * H``) is not offered (``top_k >= 1``); unpicked heads are skipped
instead of computed and multiplied by 0 (same outputs). Cross-attention (``cross=True``) is our extension, the
paper gates self-attention only: the router reads the query token and keys/values come from the context.
The router weights use the official names (``wg``, ``wg_0``, ``wg_1``) and the ViT code's truncated-normal init
(std 0.02), so that router outputs start near uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_choice, check_int_range, check_tokens
from ..functional import attend, attend_rows, intercepted, merge_heads, split_heads
from ..patterns import Causal
from .dense import SourceCache
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import Mechanism, register
from .sharding import whole_sequence


def _runs(heads: list[int] | range, split: int | None = None) -> list[tuple[int, int]]:
    """Maximal runs ``[a, e)`` of consecutive head indices in the increasing ``heads``, cut at ``split``."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h and h != split:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


def _group_pieces(a: int, e: int, group: int) -> list[tuple[int, int]]:
    """``[a, e)`` cut so that each piece's query heads use a contiguous slice of KV heads with ``group`` query heads
    each (whole GQA groups) or a single KV head (part of one group): K/V are sliced, never copied."""
    pieces: list[tuple[int, int]] = []
    while a < e:
        end = a + (e - a) // group * group if a % group == 0 and e - a >= group else min(e, (a // group + 1) * group)
        pieces.append((a, end))
        a = end
    return pieces


@whole_sequence()
class MoHAttention(ProjectedAttention):
    """``MoHAttention(dim, num_heads, causal=True, cross=False, shared_heads=None, top_k=None, router="learned",
    num_kv_heads=None, qkv_bias=False)``: x ``(B, N, dim)`` -> ``(B, N, dim)``; with ``cross=True`` call
    ``layer(x, context=(B, M, dim))``. Heads ``0 .. shared_heads-1`` are always on; each token picks ``top_k`` of the
    other ``num_heads - shared_heads`` (routed) heads. See the module docstring for the gates and the aux loss.

    Measured (CPU, one thread, B=1, dim 512, 16 heads, learned router; the same layer with every head on,
    ``shared_heads=8, top_k=8``, vs 8 shared + top-4 of 8 (75% of the (token, head) pairs) and 4 shared + top-4 of 12
    (50%)): non-causal forward at 4096 tokens 657 / 514 / 405 ms, forward + backward at 2048 tokens 621 / 524 /
    415 ms; causal, with the compiled kernel's row lists (2 threads, ``benchmarks/moh_rows.py``): forward at 4096
    tokens 200 / 169 / 146 ms, forward + backward at 2048 tokens 235 / 205 / 170 ms (every routed row computed and
    zeroed, as without the kernel: 219 / 213 / 207 and 250 / 258 / 253 ms). Decoding one sequence after 16384
    tokens (dim 1024, 16 heads, ``router="query_norm"``, 8 shared + top-4 of 8): 10.7 vs 8.1 ms per token, and
    with 4 KV heads 7.3 vs 6.6 ms.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim for self-attention: RoPE).
        num_heads: Number of query heads ``H``, >= 1 (at least one of them is routed).
        causal: Causal self-attention (CS) or, with ``cross``, causal cross-attention (CC) (default True); False:
            NS / NC. Routing is per token, so it never looks ahead.
        cross: Cross-attention: keys and values from ``context (B, M, dim)``, every query sees the whole source
            (default False).
        shared_heads: Always-on heads ``H_s``, in ``[0, H - 1]``; None (default): ``H // 2`` (the LLaMA3 setting).
        top_k: Routed heads each token picks, in ``[1, H - H_s]`` (the official ``routed_head``); None (default):
            ``H // 4`` clipped to ``[1, H - H_s]`` (the LLaMA3 setting: 75% of the heads on).
        router: ``"learned"`` (the ViT form, trained from scratch) or ``"query_norm"`` (the LLaMA3 form, no
            parameters, binary gates) (default ``"learned"``).
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``causal``/``cross`` not a bool; ``shared_heads``, ``top_k`` or ``num_kv_heads`` not an int;
            ``router`` not a str.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; ``shared_heads`` outside ``[0, H - 1]``;
            ``top_k`` outside ``[1, H - H_s]``; an unknown ``router``; ``num_kv_heads`` not dividing ``num_heads``;
            an odd head dim for self-attention.

    Examples:
        >>> import torch
        >>> from nearfar import MoHAttention
        >>> layer = MoHAttention(64, 8, shared_heads=2, top_k=3)   # 2 shared + 3 of 6 routed heads per token
        >>> layer(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> _ = layer.train()(torch.randn(2, 16, 64))
        >>> layer.aux_loss.shape   # the load-balance loss of that forward
        torch.Size([])
        >>> llama = MoHAttention(64, 8, router="query_norm", num_kv_heads=2)   # 4 shared + top-2 of 4
        >>> cache = llama.new_cache(2)
        >>> llama(torch.randn(2, 5, 64), cache=cache).shape   # prefill, then decode one token at a time
        torch.Size([2, 5, 64])
    """

    wg: nn.Linear
    wg_0: nn.Linear
    wg_1: nn.Linear

    def __init__(self, dim: int, num_heads: int, causal: bool = True, cross: bool = False,
                 shared_heads: int | None = None, top_k: int | None = None, router: str = "learned",
                 num_kv_heads: int | None = None, qkv_bias: bool = False):
        super().__init__()
        check_bool(causal, "causal")
        check_bool(cross, "cross")
        check_choice(router, "router", ("learned", "query_norm"))
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope=not cross)
        hs = num_heads // 2 if shared_heads is None else check_int_range(shared_heads, "shared_heads", 0,
                                                                          num_heads - 1)
        routed = num_heads - hs
        k = min(max(1, num_heads // 4), routed) if top_k is None else check_int_range(top_k, "top_k", 1, routed)
        self.causal, self.cross, self.router = causal, cross, router
        self.shared_heads, self.routed_heads, self.top_k = hs, routed, k
        if router == "learned":
            self.wg = nn.Linear(dim, routed, bias=False)
            if hs > 0:
                self.wg_0 = nn.Linear(dim, 2, bias=False)
            if hs > 1:
                self.wg_1 = nn.Linear(dim, hs, bias=False)
            for lin in (self.wg, getattr(self, "wg_0", None), getattr(self, "wg_1", None)):
                if lin is not None:
                    nn.init.trunc_normal_(lin.weight, std=0.02)
        self.aux_loss: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, object]:
        # copy.deepcopy / pickle after a training forward: the aux loss is a non-leaf tensor of that forward's graph
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache | SourceCache:
        """An empty decoding cache for ``batch`` sequences (causal layers only).

        Args:
            batch: Number of sequences, >= 1.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``KVCache`` of every key of every head (self-attention: a later token may pick any head), or a
            ``SourceCache`` (cross-attention) holding the source's projected keys and values from the first call.

        Raises:
            ValueError: The layer is not causal.
        """
        if not self.causal:
            raise ValueError("MoHAttention(causal=False) is not causal: it has no decoding cache")
        return (SourceCache if self.cross else KVCache)(batch, device=device, dtype=dtype)

    # the cross layers' interface (context second), as DenseAttention
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cache: KVCache | SourceCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mixture-of-head attention of ``x``: self-attention, or cross-attention to ``context`` (``cross=True``).

        Args:
            x: Queries ``(B, N, dim)``, ``N >= 1``: whole sequences, or with ``cache`` the next ``N`` tokens.
            context: The source ``(B, M, dim)`` (cross layers only; with a cache, needed at the first call only).
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Optional bool mask of the keys, True = real: ``(B, N)`` for self-attention (not with
                ``cache``; padded tokens are also left out of the aux loss), ``(B, M)`` for cross-attention.

        Returns:
            The output ``(B, N, dim)``. In training mode with the learned router, ``self.aux_loss`` is set.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; a ``context`` given to a self-attention layer, or a bad one to
                a cross layer; ``cache`` made for another batch, device or dtype; a bad ``key_padding_mask``, or one
                with a self-attention ``cache``.
            TypeError: ``cache`` does not come from this layer's ``new_cache``.
        """
        if x.device.type == "meta" and cache is None:  # the routing reads values: shapes only (a cache checks devices)
            return meta_forward(self, x)
        check_tokens(x, self.dim)
        b, n, _ = x.shape
        start = 0
        if self.cross:
            cache = SourceCache.checked(cache, x)
            if cache is None or cache.k is None or cache.v is None:
                if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[-1] != self.dim \
                        or context.shape[0] != b or context.shape[1] == 0:
                    raise ValueError(f"context must be (B, M, {self.dim}) with x's batch {b} and M >= 1, got "
                                     f"{getattr(context, 'shape', type(context).__name__)}")
                self._check_mask(key_padding_mask, b, context.shape[1])
                k = split_heads(self.k_proj(context), self.num_kv_heads)
                v = split_heads(self.v_proj(context), self.num_kv_heads)
                if cache is not None:
                    cache.k, cache.v, cache.mask = k, v, key_padding_mask
            else:
                k, v, key_padding_mask = cache.k, cache.v, cache.mask
            q = split_heads(self.q_proj(x), self.num_heads)
        else:
            if context is not None:
                raise ValueError("context is for cross-attention layers: build MoHAttention(..., cross=True)")
            cache = KVCache.checked(cache, x)
            if cache is not None and key_padding_mask is not None:
                raise ValueError("key_padding_mask is for whole sequences; decode each sequence's real tokens")
            self._check_mask(key_padding_mask, b, n)
            start = 0 if cache is None else cache.length
            q = split_heads(self.q_proj(x), self.num_heads)
            k = split_heads(self.k_proj(x), self.num_kv_heads)
            v = split_heads(self.v_proj(x), self.num_kv_heads)
        gates, picked = self.route(x, q, key_padding_mask if not self.cross else None)
        if self.rope is not None:
            pos = torch.arange(start, start + n, device=x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        if isinstance(cache, KVCache):
            cache.append(k, v)
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None  # appended to just now
            k, v = ck, cv
        elif isinstance(cache, SourceCache):
            cache.length += n
        out = self.mix_heads(q, k, v, gates, picked, key_padding_mask)
        return self.o_proj(merge_heads(out, (n,)))

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, b: int, nk: int) -> None:
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (b, nk)):
            raise ValueError(f"key_padding_mask must be a bool tensor (B, keys) = {(b, nk)}, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")

    def route(self, x: torch.Tensor, q: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gates ``(B, N, H)`` (shared heads first, 0 on the routed heads a token does not pick) and the picks
        ``(B, N, H - H_s)`` (bool) of ``x (B, N, dim)`` with pre-RoPE queries ``q (B, H, N, d)``; sets
        ``self.aux_loss`` (learned router in training mode, over the tokens ``key_padding_mask`` keeps)."""
        hs, r, k = self.shared_heads, self.routed_heads, self.top_k
        self.aux_loss = None
        if self.router == "query_norm":
            if k == r:
                picked = torch.ones(*x.shape[:2], r, dtype=torch.bool, device=x.device)
            else:
                top = q[:, hs:].norm(dim=-1).topk(k, dim=1).indices  # (B, K, N)
                picked = torch.zeros(q.shape[0], r, q.shape[2], dtype=torch.bool, device=x.device)
                picked = picked.scatter(1, top, True).transpose(1, 2)
            ones = torch.ones(*x.shape[:2], hs, dtype=q.dtype, device=x.device)
            return torch.cat([ones, picked.to(q.dtype)], -1), picked
        probs = F.softmax(self.wg(x), dim=-1)  # (B, N, R)
        top = probs.topk(k, dim=-1).indices
        picked = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
        routed = probs * picked
        routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(routed.dtype).eps) * k
        if self.training:
            w = torch.ones(x.shape[:2], dtype=probs.dtype, device=x.device) if key_padding_mask is None \
                else key_padding_mask.to(probs.dtype)
            w = (w / w.sum().clamp_min(1))[..., None]
            self.aux_loss = (probs * w).sum((0, 1)).mul((picked * w).sum((0, 1))).mean() * r * r
        if hs == 0:
            return routed, picked
        shared = F.softmax(self.wg_1(x), -1) * hs if hs > 1 else torch.ones_like(routed[..., :1])
        alpha = F.softmax(self.wg_0(x), -1) * 2
        return torch.cat([shared * alpha[..., :1], routed * alpha[..., 1:]], -1), picked

    def mix_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, picked: torch.Tensor,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gated per-head outputs ``(B, H, N, d)`` of ``q (B, H, N, d)`` over ``k, v (B, Hkv, Nk, d)`` with
        ``gates (B, N, H)`` and ``picked (B, N, H - H_s)``: heads no token picks are not run (zeros); a routed head
        runs only the rows of the tokens that pick it (causal: keys at positions ``0 .. Nk-1``, the queries the last
        ``N``, through ``attend_rows``)."""
        b, h, n, d = q.shape
        hs = self.shared_heads
        gt = gates.transpose(1, 2)  # (B, H, N)
        picked = picked.transpose(1, 2)  # (B, R, N)
        active = [hs + i for i in torch.nonzero(picked.any(2).any(0))[:, 0].tolist()]  # routed heads picked
        causal = self.causal and not self.cross
        g = h // k.shape[1]
        outs = []
        for run in _runs(list(range(hs)) + active, split=hs):
            for a, e in _group_pieces(*run, g):
                qs, ks, vs = q[:, a:e], k[:, a // g:(e - 1) // g + 1], v[:, a // g:(e - 1) // g + 1]
                if a < hs:
                    outs.append(self._dense(qs, ks, vs, causal, key_padding_mask) * gt[:, a:e, :, None])
                elif causal:  # each row bounded by its position: the kernel's row lists
                    rows = attend_rows(qs, ks, vs, picked[:, a - hs:e - hs], key_padding_mask=key_padding_mask)
                    outs.append(rows * gt[:, a:e, :, None])
                else:
                    outs.append(self._rows(qs, ks, vs, gt[:, a:e], picked[:, a - hs:e - hs], key_padding_mask))
        out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        if hs + len(active) == h:
            return out
        on = torch.tensor(list(range(hs)) + active, device=q.device)
        return q.new_zeros(b, h, n, d).index_copy(1, on, out)

    @staticmethod
    def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """All rows; causal: the queries are the last ``Nq`` positions of the ``Nk`` keys."""
        nq, nk = q.shape[2], k.shape[2]
        if key_padding_mask is None and (not causal or nq == nk or nq == 1) and not intercepted():  # as DenseAttention
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and nq == nk and nq > 1,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return attend(q, k, v, Causal() if causal else None, key_padding_mask=key_padding_mask)

    def _rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, picked: torch.Tensor,
              key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Non-causal routed heads ``q (B, h, N, d)``, ``gates``/``picked`` ``(B, h, N)``: each head's picked rows
        gathered (padded to the most picks of a head), attended, gated and scattered back; zeros elsewhere."""
        b, h, n, d = q.shape
        m = int(picked.sum(-1).max())
        if m == n:  # some head is picked by every token of some sequence: nothing to gather
            return self._dense(q, k, v, False, key_padding_mask) * gates[..., None]
        # the picked tokens first, in order (a stable sort of "not picked"), then padding rows: distinct tokens that
        # do not pick the head, so their gate is 0 and scattering them back writes the zeros those rows must hold
        tok = torch.argsort((~picked).to(torch.uint8), dim=-1, stable=True)[..., :m, None].expand(-1, -1, -1, d)
        out = self._dense(q.gather(2, tok), k, v, False, key_padding_mask) * gates.gather(2, tok[..., 0])[..., None]
        return q.new_zeros(b, h, n, d).scatter(2, tok, out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, shared_heads={self.shared_heads}, top_k={self.top_k}, "
                f"router={self.router!r}, causal={self.causal}, cross={self.cross}")


register(Mechanism(
    name="moh", paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (arXiv 2410.11842, 2024)",
    repo="SkyworkAI/MoH", family="routed", dims=("1d",), cls=MoHAttention,
    make=lambda dim, num_heads, **kw: MoHAttention(dim, num_heads, **kw),
    patterns={"NS": {"causal": False}, "CS": {"causal": True}, "NC": {"causal": False, "cross": True},
              "CC": {"causal": True, "cross": True}}, why_not={},
    notes="H/2 shared heads + top-H/4 of the routed heads per token (learned router, or router='query_norm': the "
          "LLaMA3 parameter-free binary form); unpicked (token, head) rows and unpicked heads are not computed; "
          "layer.aux_loss holds the load-balance loss after a training forward; decode cache: every head's keys "
          "(self) or the projected source (cross); cross-attention is our extension (the paper gates self-attention)"))
