"""Routing Transformer: local attention heads plus routing heads that attend inside online k-means clusters.

Paper: Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing Transformers" (TACL
2021, arXiv 2003.05997). Official code: google-research/google-research ``routing_transformer/utils.py``
(``clustered_local_attention_helper``, ``cluster_items``, ``online_kmeans``, ``gather_cluster_attention_items``,
``scatter_cluster_items``); PyTorch port: lucidrains/routing-transformer ``routing_transformer/routing_transformer.py``
(``Kmeans``, ``kmeans_iter``, ``distribution``, ``ema_inplace``, ``KmeansAttention``, ``SelfAttention``).

Heads ``0 .. local_heads - 1`` are local: RoPE and a sliding window of ``local_window`` keys (causal: the last
``local_window`` tokens; non-causal: ``local_window // 2`` on each side). The other heads route. A routing head
shares one projection for queries and keys (shared QK, the official default ``share_qk=True``, so one clustering
serves both roles); its features ``r`` are unit-normed for routing only (attention uses ``r`` itself, scale
``1/sqrt(d)``) and compared with per-head centroids ``mu (H_r, C, d)``, a buffer with no gradient:

- **Per-token clusters** (eval, decoding, and training when ``balanced=False``): token ``t`` belongs to its nearest
  centroid ``a_t = argmax_c r_hat_t . mu_c`` (ties: the lower cluster); query ``i`` attends the keys ``j`` with
  ``a_j = a_i`` (causal: ``j <= i``). Clusters have any size, every token is in exactly one, so a query always has
  a key (itself) and a token's cluster depends on that token only: decoding (assign the new token, attend the cached
  keys of its cluster) equals this forward exactly, and the causal form leaks nothing from later tokens.
- **Balanced windows** (training when ``balanced=True``, the paper's training form): each cluster takes its ``w``
  most similar tokens (``nearfar.functional.kmeans_route``: lucidrains ``distribution``), ``w = window`` or
  ``ceil(N / C)``; each window attends within itself (causal on positions), a token's output is the mean over the
  windows holding it, 0 if none. Which tokens a window takes depends on every token, later ones included, so with
  ``causal=True`` the pairs are causal but the membership is not: ``balanced`` defaults to ``not causal``.

Centroid update (training): a training forward computes the commitment loss ``layer.aux_loss = commitment *
mean((r_hat - sg(mu[a]))^2)`` (the caller adds it to the loss) and, when the backward pass reaches ``r``, applies one
EMA k-means step on that batch (``nearfar.functional.ema_update_centroids``: nearest-centroid means, unit-normed,
``decay * mu + (1 - decay) * new``), as lucidrains applies ``Kmeans.update`` after backward. A forward in eval
mode, under ``no_grad``, while decoding, or never back-propagated leaves the centroids as they are.

Computation, exact and without an ``N x N`` map: balanced windows are gathered into a ``(B * H_r * C, w)`` batch
of windows (lucidrains' layout) and run through ``attend`` (``Causal()``: windows are in position order). Per-token
clusters are laid out sorted by cluster, each cluster's run padded to a multiple of ``block_size`` so that no block
mixes clusters; every block then selects the blocks of its own cluster (``SelectedBlocks`` with ``within=Causal()``:
inside a run, slots are in position order) and pad slots are masked keys. Work is about ``sum_c n_c^2`` pairs
(half when causal; ``n_c`` the cluster sizes rounded up to blocks) over at most ``N + C * (block_size - 1)``
slots. Decoding ``block_size`` tokens or fewer attends the cached keys of their clusters directly (an ``(n, T)``
mask); a longer chunk lays out the cached tokens as above and runs the blocks that hold new tokens.

Differences from the official code:

- Routing uses unit L2 norms (lucidrains ``F.normalize``); the official code layer-norms q and k (no scale) and
  attends with those normalised vectors and no ``1/sqrt(d)``. Attention here uses the raw shared projection.
- No self mask: a query may attend itself (as the official clustered attention; lucidrains masks the self pair of
  shared-QK heads to -5e4 and unit-norms the keys).
- Eval and decoding use per-token clusters instead of the balanced windows (the official decoder recomputes the
  windows at every step over the blanked future, which differs from its teacher-forced forward); the official
  scatter divides by ``count + 1e-2`` (lucidrains ``+ 1e-5``), ours by ``max(count, 1)``.
- Local heads: a token-exact sliding window with RoPE and their own key projection (lucidrains' local heads have
  their own q/k/v; the official local attention is block-local with a memory flange).
- The centroids start as random normal vectors scaled to unit norm (the official init layer-norms them instead);
  lucidrains runs 10 k-means iterations on the first batch. The EMA step is lucidrains' (unit-normed cluster
  means blended into the centroids); the official code keeps EMA cluster counts and sums (VQ-VAE style,
  Laplace-smoothed) and divides them. The commitment loss covers the shared q/k features once (the official code
  adds a query and a key term: twice ours with shared QK).
- No dropout, no padding mask, no cross-attention form (lucidrains ``receives_context``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_dim_heads, check_int_range, check_positive_int, check_real_range
from ..functional import SelectedBlocks, attend, ema_update_centroids, kmeans_route, merge_heads, split_heads
from ..patterns import Causal, Pattern, SlidingWindow
from .kv_cache import DecodeState, KVCache
from .registry import Mechanism, register
from .rotary import RotaryEmbedding
from .sharding import whole_sequence


class RoutingCache(DecodeState):
    """Decoding state of a causal ``RoutingTransformerAttention``: the local heads' last ``local_window`` keys and
    values (``local``, a ``KVCache``), and for the routing heads every token's shared q/k features and values
    (``routed``) and its cluster (``clusters (B, H_r, T)``). ``length`` counts the tokens seen."""

    def __init__(self, batch: int, local_window: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.local = KVCache(self.batch, keep=lambda p, nxt: p > nxt - local_window, device=device, dtype=dtype)
        self.routed = KVCache(self.batch, device=device, dtype=dtype)
        self.clusters: torch.Tensor | None = None
        self.length = 0

    def add(self, r: torch.Tensor, v: torch.Tensor,
            clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append the new tokens' features, values and clusters; returns those of every token so far."""
        self.routed.append(r, v)
        self.clusters = clusters if self.clusters is None else torch.cat([self.clusters, clusters], 2)
        k_all, v_all = self.routed.k, self.routed.v
        assert k_all is not None and v_all is not None  # appended to just now
        return k_all, v_all, self.clusters

    def nbytes(self) -> int:
        ids = 0 if self.clusters is None else self.clusters.nbytes
        return self.local.nbytes() + self.routed.nbytes() + ids


@whole_sequence()
class RoutingTransformerAttention(nn.Module):
    """``RoutingTransformerAttention(dim, num_heads, local_heads=None, num_clusters=16, ...)``: ``x (B, N, dim)`` ->
    ``(B, N, dim)`` with ``local_heads`` sliding-window heads and ``num_heads - local_heads`` routing heads that
    attend within online k-means clusters (see the module docstring). ``layer.aux_loss`` holds the commitment loss
    of the last call; causal layers decode through ``new_cache``.

    Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers" (TACL 2021); official code:
    google-research/google-research ``routing_transformer``; defaults from its ``enwik8_local_cluster8k`` (16
    clusters, half the heads local, EMA decay 0.999, commitment 1e-4).

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim when local heads use RoPE).
        num_heads: Number of heads, >= 1.
        local_heads: Local heads, in ``[0, num_heads - 1]`` (at least one routing head); None (default):
            ``num_heads // 2``.
        num_clusters: Centroids per routing head, >= 1 (default 16; the paper takes about ``sqrt(N)``).
        window: Tokens per balanced window, >= 1 (capped at ``N``); None (default): ``ceil(N / num_clusters)``.
        local_window: Keys of a local query, >= 1 (default 256; non-causal: ``local_window // 2`` each side).
        causal: Causal attention in both kinds of heads (default False).
        balanced: Balanced windows in training (True) or per-token clusters (False); None (default): ``not
            causal`` (balanced windows read later tokens). Eval and decoding always use per-token clusters.
        ema_decay: EMA decay of the centroids, in ``[0, 1]`` (default 0.999).
        commitment: Weight of the commitment loss, in ``[0, inf)`` (default 1e-4).
        block_size: Block size of the per-token cluster layout, >= 1 (default 64).
        rope: Rotary positions on the local heads (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: An argument of the wrong type.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; an argument out of its range; an odd head dim
            with ``rope`` and local heads.

    Examples:
        >>> import torch
        >>> from nearfar import RoutingTransformerAttention
        >>> layer = RoutingTransformerAttention(64, 4, num_clusters=4, local_window=8, causal=True)
        >>> x = torch.randn(2, 30, 64)
        >>> y = layer(x)                                   # training mode: per-token clusters (causal default)
        >>> (y.square().mean() + layer.aux_loss).backward()  # the backward pass also moves the centroids (EMA)
        >>> layer = layer.eval()
        >>> cache = layer.new_cache(2)
        >>> with torch.no_grad():
        ...     steps = torch.cat([layer(x[:, :20], cache=cache)] + [layer(x[:, t:t + 1], cache=cache)
        ...                                                           for t in range(20, 30)], 1)
        ...     torch.allclose(steps, layer(x), atol=1e-5)
        True
    """

    centroids: torch.Tensor  # a buffer (H_r, C, d)
    aux_loss: torch.Tensor | None

    def __init__(self, dim: int, num_heads: int, local_heads: int | None = None, num_clusters: int = 16,
                 window: int | None = None, local_window: int = 256, causal: bool = False,
                 balanced: bool | None = None, ema_decay: float = 0.999, commitment: float = 1e-4,
                 block_size: int = 64, rope: bool = True, qkv_bias: bool = False):
        super().__init__()
        self.head_dim = hd = check_dim_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.local_heads = hl = (num_heads // 2 if local_heads is None
                                 else check_int_range(local_heads, "local_heads", 0, num_heads - 1))
        self.routing_heads = num_heads - hl
        self.num_clusters = check_positive_int(num_clusters, "num_clusters")
        self.window = None if window is None else check_positive_int(window, "window")
        self.local_window = check_positive_int(local_window, "local_window")
        self.causal = check_bool(causal, "causal")
        self.balanced = (not causal) if balanced is None else check_bool(balanced, "balanced")
        self.ema_decay = check_real_range(ema_decay, "ema_decay", 0.0, 1.0)
        self.commitment = check_real_range(commitment, "commitment", 0.0, math.inf, open_high=True)
        self.block_size = check_positive_int(block_size, "block_size")
        check_bool(rope, "rope")
        check_bool(qkv_bias, "qkv_bias")
        if rope and hl and hd % 2:
            raise ValueError(f"rope on the local heads needs an even head dim, got dim // num_heads = {hd}")
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)  # local queries, then the routing heads' shared q/k
        self.k_proj = nn.Linear(dim, hl * hd, bias=qkv_bias) if hl else None  # local keys
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(hd) if rope and hl else None
        self.register_buffer("centroids", F.normalize(torch.randn(self.routing_heads, num_clusters, hd), dim=-1))
        self.local_pattern: Pattern = (SlidingWindow(left=local_window - 1) & Causal() if causal
                                       else SlidingWindow(left=local_window // 2, right=local_window // 2))
        self.aux_loss = None

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> RoutingCache:
        """An empty decoding state for ``batch`` sequences (causal layers only): the local heads keep
        ``local_window`` keys, the routing heads every key with its cluster.

        Args:
            batch: Number of sequences, >= 1 (default 1).
            device: The state's device; None (default): fixed by the first call.
            dtype: The dtype of the inputs; None (default): fixed by the first call.

        Returns:
            A ``RoutingCache``.

        Raises:
            ValueError: The layer is not causal; a bad ``batch``, ``device`` or ``dtype``.
            TypeError: ``batch`` is not an int.
        """
        if not self.causal:
            raise ValueError("RoutingTransformerAttention(causal=False) has no decoding cache (build it with "
                             "causal=True)")
        return RoutingCache(batch, self.local_window, device, dtype)

    def _check(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.dim or 0 in x.shape:
            raise ValueError(f"x must be (B, N, {self.dim}) with B, N >= 1, got {tuple(x.shape)}")
        return x

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The routing heads' shared q/k features ``(B, H_r, N, d)``."""
        return split_heads(self.q_proj(x), self.num_heads)[:, self.local_heads:]

    def _nearest(self, r: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            sim = torch.matmul(F.normalize(r, dim=-1), self.centroids.to(r.dtype).transpose(-1, -2))
            return sim.argmax(-1)

    def clusters(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's cluster in every routing head, ``(B, H_r, N)`` int64: its nearest centroid (what eval,
        decoding and per-token training attend within).

        Args:
            x: ``(B, N, dim)``.

        Returns:
            Cluster indices in ``[0, num_clusters)``.

        Raises:
            TypeError, ValueError: As ``forward``.
        """
        return self._nearest(self._features(self._check(x)))

    def forward(self, x: torch.Tensor, cache: RoutingCache | None = None) -> torch.Tensor:
        """Attend ``x``, or continue each sequence through ``cache`` (the outputs equal the matching rows of the
        eval-mode forward over the whole sequence). Sets ``aux_loss``, the commitment loss of these tokens.

        Args:
            x: ``(B, N, dim)``, floating: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (causal layers only; None, the default: whole sequences).

        Returns:
            ``(B, N, dim)``.

        Raises:
            TypeError: ``x`` is not a floating tensor; ``cache`` does not come from ``new_cache``.
            ValueError: ``x`` is not ``(B, N, dim)``; a cache given to a non-causal layer, or made for another
                batch, device or dtype.
        """
        self._check(x)
        if cache is not None and not self.causal:
            raise ValueError("cache is for causal layers: RoutingTransformerAttention(causal=False) has none")
        cache = RoutingCache.checked(cache, x)
        n, hl = x.shape[1], self.local_heads
        start = 0 if cache is None else cache.length
        q = split_heads(self.q_proj(x), self.num_heads)
        v = split_heads(self.v_proj(x), self.num_heads)
        outs = []
        if hl:
            outs.append(self._local(x, q[:, :hl], v[:, :hl], start, cache))
        outs.append(self._routed(q[:, hl:], v[:, hl:], cache))
        if cache is not None:
            cache.length += n
        return self.o_proj(merge_heads(torch.cat(outs, 1), (n,)))

    def _local(self, x: torch.Tensor, q: torch.Tensor, v: torch.Tensor, start: int,
               cache: RoutingCache | None) -> torch.Tensor:
        assert self.k_proj is not None  # there are local heads
        k = split_heads(self.k_proj(x), self.local_heads)
        if self.rope is not None:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is None:
            return attend(q, k, v, self.local_pattern)
        # the kept keys are the positions just before and up to the last query: the pattern's bottom-right alignment
        cache.local.append(k, v)
        ck, cv = cache.local.k, cache.local.v
        assert ck is not None and cv is not None
        out = attend(q, ck, cv, self.local_pattern)
        cache.local.evict()
        return out

    def _routed(self, r: torch.Tensor, v: torch.Tensor, cache: RoutingCache | None) -> torch.Tensor:
        mu = self.centroids.to(r.dtype)
        nearest = self._nearest(r)
        heads = torch.arange(self.routing_heads, device=r.device)[:, None]
        self.aux_loss = self.commitment * F.mse_loss(F.normalize(r, dim=-1), mu[heads, nearest])
        if cache is None and self.training and self.balanced:
            out = self._balanced(r, v, mu)
        elif cache is None:
            out = self._clustered(r, v, nearest, 0)
        else:
            first = cache.length
            r_all, v_all, c_all = cache.add(r, v, nearest)
            if r.shape[2] <= self.block_size:  # a few new tokens: their rows over the cached keys directly
                out = self._over_cache(r, nearest, r_all, v_all, c_all, first)
            else:
                out = self._clustered(r_all, v_all, c_all, first)
        if cache is None and self.training and torch.is_grad_enabled() and r.requires_grad:
            r.register_hook(self._ema_step(r.detach()))
        return out

    def _ema_step(self, feats: torch.Tensor) -> Callable[[torch.Tensor], None]:
        """A gradient hook that applies one EMA k-means step on ``feats`` (the batch's routing features)."""

        def hook(_: torch.Tensor) -> None:
            with torch.no_grad():
                c = self.centroids
                c.copy_(ema_update_centroids(c, feats.to(c.dtype), self.ema_decay))

        return hook

    def _balanced(self, r: torch.Tensor, v: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Balanced windows: each cluster's top-``w`` tokens attend among themselves; outputs averaged."""
        b, h, n, d = r.shape
        c, dv = self.num_clusters, v.shape[-1]
        w = min(n, self.window if self.window is not None else (n + c - 1) // c)
        flat = kmeans_route(r, mu, w).reshape(b, h, c * w, 1)  # ascending within each window
        qw = r.gather(2, flat.expand(-1, -1, -1, d)).reshape(b * h * c, 1, w, d)
        vw = v.gather(2, flat.expand(-1, -1, -1, dv)).reshape(b * h * c, 1, w, dv)
        ow = attend(qw, qw, vw, Causal() if self.causal else None).reshape(b, h, c * w, dv)
        total = ow.new_zeros(b, h, n, dv).scatter_add(2, flat.expand(-1, -1, -1, dv), ow)
        count = ow.new_zeros(b, h, n, 1).scatter_add(2, flat, torch.ones_like(flat, dtype=ow.dtype))
        return total / count.clamp(min=1)

    @staticmethod
    def _over_cache(r: torch.Tensor, clusters: torch.Tensor, r_all: torch.Tensor, v_all: torch.Tensor,
                    c_all: torch.Tensor, first: int) -> torch.Tensor:
        """Decoding a few tokens: each new query over every cached key of its cluster up to its position, as a
        ``(new, cached)`` bias."""
        pos_q = torch.arange(first, first + r.shape[2], device=r.device)
        allowed = (clusters[..., :, None] == c_all[..., None, :]) & (
            torch.arange(r_all.shape[2], device=r.device) <= pos_q[:, None])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=r.device).masked_fill_(~allowed, -math.inf)
        return attend(r, r_all, v_all, bias=bias)

    def _clustered(self, r: torch.Tensor, v: torch.Tensor, clusters: torch.Tensor, first: int) -> torch.Tensor:
        """Per-token clusters: query ``i`` attends the keys of its cluster (causal: ``j <= i``), for the queries
        ``first ..`` of ``r``; block-sparse over a layout sorted by cluster (see the module docstring)."""
        b, h, t, d = r.shape
        dv, c, bs, rows, dev = v.shape[-1], self.num_clusters, self.block_size, b * h, r.device
        a = clusters.reshape(rows, t)
        size = torch.zeros(rows, c, dtype=torch.long, device=dev).scatter_add_(1, a, torch.ones_like(a))
        padded = (size + bs - 1) // bs * bs
        end = padded.cumsum(1)  # each cluster's run [end - padded, end) in the layout
        begin = end - padded
        a_sorted, order = torch.sort(a, dim=1, stable=True)  # by cluster, positions ascending inside
        rank = torch.arange(t, device=dev) - (size.cumsum(1) - size).gather(1, a_sorted)
        slot = torch.empty_like(order).scatter_(1, order, begin.gather(1, a_sorted) + rank)  # (rows, t)
        nblk = ((t + min(c, t) * (bs - 1)) + bs - 1) // bs  # bounds sum(padded) for every row
        length, idx = nblk * bs, slot[..., None]
        lay_r = r.new_zeros(rows, length, d).scatter(1, idx.expand(-1, -1, d), r.reshape(rows, t, d))
        lay_v = v.new_zeros(rows, length, dv).scatter(1, idx.expand(-1, -1, dv), v.reshape(rows, t, dv))
        real = torch.zeros(rows, length, dtype=torch.bool, device=dev).scatter_(1, slot, True)
        blk = torch.arange(nblk, device=dev)
        home = torch.searchsorted(end, (blk * bs).expand(rows, nblk).contiguous(), right=True)  # block's cluster
        used = home < c
        home = home.clamp(max=c - 1)
        lo = begin.gather(1, home) // bs
        hi = blk.expand(rows, nblk) if self.causal else end.gather(1, home) // bs - 1
        num = torch.where(used, hi - lo + 1, 0)
        if first:  # decoding: only the blocks holding new tokens
            new = torch.zeros(rows, nblk, dtype=torch.bool, device=dev).scatter_(1, slot[:, first:] // bs, True)
            num = torch.where(new, num, 0)
        kv = torch.where(blk < num[..., None], lo[..., None] + blk, -1)
        sel = SelectedBlocks(num[:, None].to(torch.int32), kv[:, None].to(torch.int32), q_block=bs,
                             within=Causal() if self.causal else None)
        out = attend(lay_r[:, None], lay_r[:, None], lay_v[:, None], blocks=sel, key_padding_mask=real)[:, 0]
        return out.gather(1, idx[:, first:].expand(-1, -1, dv)).reshape(b, h, t - first, dv)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, local_heads={self.local_heads}, "
                f"num_clusters={self.num_clusters}, window={self.window}, local_window={self.local_window}, "
                f"causal={self.causal}, balanced={self.balanced}, block_size={self.block_size}")


register(Mechanism(
    name="routing_transformer",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers (TACL 2021, arXiv 2003.05997)",
    repo="google-research/google-research (routing_transformer); lucidrains/routing-transformer",
    family="routed", dims=("1d",), cls=RoutingTransformerAttention,
    make=lambda dim, num_heads, **kw: RoutingTransformerAttention(dim, num_heads, **kw),
    patterns={"NS": {"causal": False}, "CS": {"causal": True}}, why_not={
        "NC": "routing heads share one projection for queries and keys so that one k-means assignment clusters "
              "both (the paper's shared-QK routing); a second source needs separate projections and per-side "
              "clusterings, and the local heads need positions shared by queries and keys",
        "CC": "no second source (as NC): queries and keys are clustered by one shared projection of the same "
              "sequence"},
    notes="Half the heads local (sliding window), half routing: tokens clustered by online k-means (EMA "
          "centroids, commitment loss in layer.aux_loss), each query attends the keys of its cluster. Training: "
          "balanced top-w windows (non-causal default) or per-token clusters (causal default); eval and decoding: "
          "per-token clusters, decoding equal to the eval forward (the cache keeps every routing key)."))
