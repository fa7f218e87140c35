"""Dynamic key-driven grouped-query attention (DGQA): the query-head allocation of KDGQA driven by a cached key-norm
vector that training updates every ``window`` steps.

Paper: Khan, Khaquan, Tafveez, Samiwala, Raza, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
Attention" (2024, arXiv 2408.08454). Code read: yjzhang0505/key-driven-gqa (a fork whose README says it is the
official implementation), ``modules/attention/dgqa.py`` (``DGQA.forward``, ``update_splits_cache_training``,
``update_splits_cache_inference``, ``get_ratios_diff``, ``get_ratios_ema``).

``n`` is the vector of per-KV-head Frobenius norms of the current keys summed over the batch (as KDGQA) and ``c``
the cached vector (a buffer, zeros at first). The weights are ``|c - n|`` (``kind="diff"``) or ``0.9 n + 0.1 c``
(``kind="ema"``), turned into an allocation by ``allocate_heads`` (``a_g = round(H w_g / sum w)``, fixed up to sum
to ``H``), and query heads are assigned contiguously (``nearfar.layers.kdgqa``). In training, every ``window``-th
step (steps 0, window, 2 window, ...) computes the allocation from ``c`` and ``n``, keeps it for the following
steps, and updates ``c <- (c + n) / window`` (as the official update does; with ``window=1`` it accumulates the
norms of every step); a step is one forward in training mode. In eval mode each forward computes the allocation
from ``c`` and the current ``n``. Before the first update the allocation is uniform (plain GQA).

Differences from the official code: the rounding fix-ups are deterministic (the first largest allocation loses one
while the sum exceeds ``H``, the first smallest gains one while it falls short, as KDGQA) where the official code
picks random KV heads; weights summing to 0 give the uniform allocation (the official code divides by 0); the
training step is counted by the layer (buffer ``steps``) where the official code reads a global counter set by its
training loop; an eval forward changes no state (the official one overwrites the cache with the current norms and
the allocation kept for training, so an eval batch changed the next training steps); projections, RoPE, the
optional output bias and ``from_mha`` as in ``nearfar.layers.kdgqa``; no dropout.
"""

from __future__ import annotations

import torch

from ..checks import check_choice, check_positive_int
from ..functional import merge_heads
from .grouped_query import GroupedQueryAttention, allocate_heads, grouped_attention, squared_key_norms
from .projections import meta_forward
from .registry import Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

KINDS = ("diff", "ema")


def dgqa_weights(norms: torch.Tensor, cache: torch.Tensor, kind: str) -> torch.Tensor:
    """DGQA's allocation weights from the current key norms and the cached ones: ``|cache - norms|`` (``"diff"``) or
    ``0.9 norms + 0.1 cache`` (``"ema"``).

    Examples:
        >>> import torch
        >>> from nearfar.layers.dgqa import dgqa_weights
        >>> dgqa_weights(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0]), "diff").tolist()
        [1.0, 2.0]
    """
    return (cache - norms).abs() if kind == "diff" else 0.9 * norms + 0.1 * cache


@whole_sequence()
class DGQA(GroupedQueryAttention):
    """``DGQA(dim, num_heads, num_kv_heads=None, kind="diff", window=1, ...)``: x ``(B, N, dim)`` -> same shape;
    query heads shared out among the KV heads from a cached key-norm vector (see the module docstring).

    Buffers: ``cache`` (the key-norm vector, ``(G,)``), ``allocation`` (the one training uses between updates,
    ``(G,)``), ``steps`` (training forwards so far).

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with RoPE).
        num_heads: Number of query heads ``H``, >= 1.
        num_kv_heads: Number of KV heads ``G``, dividing ``num_heads``; None (default): ``num_heads // 2`` (the
            official default), or ``num_heads`` when that is odd.
        kind: ``"diff"`` (default) or ``"ema"``.
        window: Training steps between cache updates, >= 1 (default 1, the official default).
        qkv_bias: Biases on the q/k/v projections (default False).
        proj_bias: A bias on the output projection (default False; the official ViT layer has one).
        rope: Rotary positions on queries and keys (default True; the official ViT layer has none).

    Raises:
        TypeError: A flag that is not a bool; ``window`` or ``num_kv_heads`` not an int; ``kind`` not a str.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; ``num_kv_heads`` not dividing ``num_heads``;
            ``window`` < 1; an unknown ``kind``; an odd head dim with RoPE.

    Examples:
        >>> import torch
        >>> from nearfar import DGQA
        >>> layer = DGQA(64, 8, kind="ema", window=2)
        >>> layer(torch.randn(2, 16, 64)).shape
        torch.Size([2, 16, 64])
        >>> int(layer.steps), int(layer.allocation.sum())
        (1, 8)
    """

    cache: torch.Tensor
    allocation: torch.Tensor
    steps: torch.Tensor

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, kind: str = "diff",
                 window: int = 1, qkv_bias: bool = False, proj_bias: bool = False, rope: bool = True):
        kind = check_choice(kind, "kind", KINDS)
        window = check_positive_int(window, "window")
        super().__init__(dim, num_heads, num_kv_heads, qkv_bias, proj_bias, rope)
        self.kind, self.window = kind, window
        g = self.num_kv_heads
        self.register_buffer("cache", torch.zeros(g))
        self.register_buffer("allocation", torch.full((g,), num_heads // g, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """DGQA of ``x``; in training mode also a step of the cache (see the module docstring).

        Args:
            x: Input ``(B, N, dim)``.
            key_padding_mask: Optional bool ``(B, N)``, True = a real token: padded keys count neither in the norms
                nor in attention.

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; a bad ``key_padding_mask``.
        """
        if x.device.type == "meta":  # the routing reads values: shapes only
            return meta_forward(self, x)
        x = self.check_x(x)
        mask = self.check_padding(key_padding_mask, x.shape[0], x.shape[1])
        q, k, v, _ = rotary_qkv(self, x, 0)
        norms = squared_key_norms(k, mask).sum(-1).sqrt().sum(0)
        cache = self.cache.to(norms.dtype)
        if not self.training:
            counts = allocate_heads(dgqa_weights(norms, cache, self.kind), self.num_heads)
        else:
            if int(self.steps) % self.window == 0:
                self.allocation.copy_(allocate_heads(dgqa_weights(norms, cache, self.kind), self.num_heads))
                self.cache.copy_((cache + norms) / self.window)
            self.steps += 1
            counts = self.allocation
        out = grouped_attention(q, k, v, counts.tolist(), mask)
        return self.o_proj(merge_heads(out, (x.shape[1],)))


_WHOLE = ("the allocation comes from the key norms of every token of every sequence of the batch and a cache of "
          "past batches' norms; the paper and code define no prefix form (kdgqa has a causal variant)")
_SELF = ("the key-norm cache is a running statistic of one layer's self-attention keys (ViT); the paper defines no "
         "second source (kdgqa has a cross form)")
register(Mechanism(
    name="dgqa", paper="Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention (arXiv 2408.08454, "
                       "2024)",
    repo="yjzhang0505/key-driven-gqa", family="routed", dims=("1d",), cls=DGQA,
    patterns={"NS": {}}, why_not={"CS": _WHOLE, "NC": _SELF, "CC": _SELF},
    make=lambda dim, num_heads, **kw: DGQA(dim, num_heads, **kw),
    notes="GQA (num_heads // 2 KV heads) whose query-head allocation comes from a cached key-norm vector, updated "
          "every `window` training forwards ('diff': |cache - norms|, 'ema': 0.9 norms + 0.1 cache); stateful in "
          "training, pure in eval; deterministic rounding fix-ups"))
