"""Key-driven grouped-query attention (KDGQA): query heads are shared out among the KV heads in proportion to the
KV heads' key norms, so a KV head with larger keys serves more query heads (and one may serve none).

Paper: Khan, Khaquan, Tafveez, Samiwala, Raza, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
Attention" (2024, arXiv 2408.08454; ViT experiments). Code read: yjzhang0505/key-driven-gqa (a fork whose README
says it is the official implementation; the authors' own repository is not in our index),
``modules/attention/kdgqa.py`` (``KDGQA.forward``, ``att_weight_conversion``). This file also holds what the
variants share (``dgqa.py``, ``pgqa.py``): the projections, the head allocation, the grouped attention and the
MHA -> GQA conversion.

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

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ..checks import check_bool, check_dim_heads, check_positive_int, check_tokens
from ..functional import attend, merge_heads, split_heads
from ..patterns import Causal
from .dense import SourceCache
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

_Layer = TypeVar("_Layer", bound="GroupedQueryAttention")


def allocate_heads(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Share ``num_heads`` query heads among ``G`` KV heads in proportion to non-negative ``weights (..., G)``.

    ``a_g = round(H w_g / sum w)`` (half to even); then while ``sum a > H`` the first largest ``a_g`` loses one,
    while ``sum a < H`` the first smallest gains one. A row whose weights sum to 0 (or is not finite) gets the
    uniform allocation ``H / G`` each.

    Args:
        weights: Non-negative weights ``(..., G)``; ``G`` must divide ``num_heads``.
        num_heads: Number of query heads ``H``.

    Returns:
        Allocations ``(..., G)`` (int64), each row summing to ``H``.

    Raises:
        ValueError: ``G`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.kdgqa import allocate_heads
        >>> allocate_heads(torch.tensor([1.0, 1.0, 2.0]), 6).tolist()
        [2, 2, 2]
        >>> allocate_heads(torch.tensor([0.0, 1.0, 3.0, 0.0]), 8).tolist()
        [0, 2, 6, 0]
    """
    g = weights.shape[-1]
    if g < 1 or num_heads % g:
        raise ValueError(f"the number of KV heads ({g}) must divide num_heads ({num_heads})")
    total = weights.sum(-1, keepdim=True)
    ok = (total > 0) & torch.isfinite(total)
    counts = torch.round(weights / torch.where(ok, total, torch.ones_like(total)) * num_heads).long()
    counts = torch.where(ok, counts, torch.full_like(counts, num_heads // g))
    # rounding leaves |sum - H| <= G / 2: G rounds of "one step towards H" always suffice (extra rounds change nothing)
    for _ in range(g):
        excess = counts.sum(-1, keepdim=True) - num_heads
        first_max, first_min = counts.argmax(-1, keepdim=True), counts.argmin(-1, keepdim=True)
        counts = counts.scatter_add(-1, first_max, -(excess > 0).long()).scatter_add(-1, first_min,
                                                                                       (excess < 0).long())
    return counts


def key_norm_allocation(norms: torch.Tensor, num_heads: int) -> torch.Tensor:
    """KDGQA's allocation of ``num_heads`` query heads from the KV heads' key norms ``(..., G)``: min-max normalised,
    then ``allocate_heads``. Norms that are all equal (within 4 float32 ulps of the largest) give the uniform
    allocation.

    Args:
        norms: Key norms per KV head ``(..., G)`` (non-negative); ``G`` must divide ``num_heads``.
        num_heads: Number of query heads ``H``.

    Returns:
        Allocations ``(..., G)`` (int64), each row summing to ``H``.

    Raises:
        ValueError: ``G`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.kdgqa import key_norm_allocation
        >>> key_norm_allocation(torch.tensor([3.0, 5.0, 4.0, 7.0]), 8).tolist()   # 8 * (0, .5, .25, 1) / 1.75
        [0, 2, 1, 5]
        >>> key_norm_allocation(torch.tensor([2.0, 2.0]), 4).tolist()
        [2, 2]
    """
    norms = norms.to(torch.promote_types(norms.dtype, torch.float32))
    lo, hi = norms.amin(-1, keepdim=True), norms.amax(-1, keepdim=True)
    span = hi - lo
    flat = span <= 4 * torch.finfo(torch.float32).eps * hi.abs()  # flat rows become all zeros: uniform
    return allocate_heads((norms - lo) / torch.where(flat, torch.ones_like(span), span) * ~flat, num_heads)


def kv_index(counts: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The KV head of each query head ``(..., H)`` under contiguous allocations ``counts (..., G)``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.kdgqa import kv_index
        >>> kv_index(torch.tensor([1, 0, 3]), 4).tolist()
        [0, 2, 2, 2]
    """
    ends = counts.cumsum(-1)
    heads = torch.arange(num_heads, device=counts.device)
    return (ends[..., None, :] <= heads[:, None]).sum(-1)


def squared_key_norms(k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared norms ``(B, G, N)`` of the keys ``k (B, G, N, d)``, 0 for padded ones (``key_padding_mask (B, N)``,
    True = real), in float32 or wider, without gradient."""
    sq = k.detach().to(torch.promote_types(k.dtype, torch.float32)).square().sum(-1)
    return sq if key_padding_mask is None else sq * key_padding_mask[:, None, :]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: Sequence[int],
                      key_padding_mask: torch.Tensor | None = None, pattern: Causal | None = None) -> torch.Tensor:
    """Softmax attention of ``q (B, H, Nq, d)`` where the contiguous query heads ``counts[g]`` use KV head ``g`` of
    ``k, v (B, G, Nk, d)``: one GQA call if ``counts`` is uniform, else one ``attend`` per KV head with queries
    (a KV head with 0 queries is skipped); K/V are never copied. ``pattern``: None (dense) or ``Causal()``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.kdgqa import grouped_attention
        >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
        >>> grouped_attention(q, k, v, [3, 1]).shape
        torch.Size([2, 4, 5, 8])
    """
    counts = [int(c) for c in counts]
    if all(c == counts[0] for c in counts):
        return attend(q, k, v, pattern, key_padding_mask=key_padding_mask)
    outs, start = [], 0
    for g, c in enumerate(counts):
        if c:
            outs.append(attend(q[:, start:start + c], k[:, g:g + 1], v[:, g:g + 1], pattern,
                               key_padding_mask=key_padding_mask))
        start += c
    return torch.cat(outs, 1)


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


def mean_pool_heads(param: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Rows of a projection's weight ``(num_heads * d, in)`` or bias ``(num_heads * d,)``, head-major, averaged
    over each contiguous group of ``num_heads / num_groups`` heads: ``(num_groups * d, ...)``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.kdgqa import mean_pool_heads
        >>> mean_pool_heads(torch.arange(8.0), 4, 2).tolist()   # 4 heads of dim 2 -> 2 groups
        [1.0, 2.0, 5.0, 6.0]
    """
    if num_heads % num_groups:
        raise ValueError(f"num_kv_heads ({num_groups}) must divide the source's KV heads ({num_heads})")
    d = param.shape[0] // num_heads
    return param.reshape(num_groups, num_heads // num_groups, d, *param.shape[1:]).mean(1).reshape(
        num_groups * d, *param.shape[1:])


_MHA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    found = getattr(module, name, None)
    return found if isinstance(found, nn.Linear) else None


def _default_kv_heads(dim: int, num_heads: int, num_kv_heads: int | None) -> int:
    check_dim_heads(dim, num_heads)
    if num_kv_heads is None:
        return num_heads // 2 if num_heads % 2 == 0 else num_heads
    return num_kv_heads


class GroupedQueryAttention(ProjectedAttention):
    """What KDGQA, DGQA and PGQA share: LLaMA-style projections with ``num_kv_heads`` KV heads (default
    ``num_heads // 2``, or ``num_heads`` when that is odd), optional RoPE and ``from_mha``. Not a layer by itself.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with RoPE).
        num_heads: Number of query heads ``H``.
        num_kv_heads: Number of KV heads ``G``, dividing ``num_heads``; None: the default above.
        qkv_bias: Biases on the q/k/v projections (default False).
        proj_bias: A bias on the output projection (default False; the official ViT layer has one).
        rope: Rotary positions on queries and keys (default True).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, qkv_bias: bool = False,
                 proj_bias: bool = False, rope: bool = True):
        super().__init__()
        check_bool(qkv_bias, "qkv_bias")
        check_bool(proj_bias, "proj_bias")
        check_bool(rope, "rope")
        add_projections(self, dim, num_heads, _default_kv_heads(dim, num_heads, num_kv_heads), qkv_bias, rope)
        if proj_bias:
            self.o_proj = nn.Linear(dim, dim, bias=True)

    def check_x(self, x: object, name: str = "x") -> torch.Tensor:
        """``x`` after checking that it is a ``(B, N, dim)`` tensor with ``N >= 1``."""
        return check_tokens(x, self.dim, name)

    @staticmethod
    def check_padding(mask: object, batch: int, n: int) -> torch.Tensor | None:
        """``key_padding_mask`` (None passes) after checking it is a bool ``(batch, n)`` tensor."""
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (batch, n)):
            raise ValueError(f"key_padding_mask must be a bool tensor ({batch}, {n}), got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        return mask

    def batch_allocation(self, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> list[int]:
        """KDGQA's allocation from keys ``(B, G, N, d)``: per-KV-head Frobenius norms summed over the batch."""
        norms = squared_key_norms(k, key_padding_mask).sum(-1).sqrt().sum(0)
        return key_norm_allocation(norms, self.num_heads).tolist()

    @classmethod
    def from_mha(cls: type[_Layer], mha: nn.Module, num_kv_heads: int | None = None, **kwargs: Any) -> _Layer:
        """The layer with ``num_kv_heads`` KV heads, initialised from a multi-head attention layer: queries and output
        copied, each KV head's K/V projection rows (and biases) the mean over a contiguous group of the source's heads
        (Khan et al.'s uptraining recipe, the official ``att_weight_conversion``).

        Args:
            mha: A layer with ``num_heads`` and either ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linears (nearfar's
                ``DenseAttention``, LLaMA-style layers; a GQA source's ``num_kv_heads`` KV heads are pooled further)
                or a fused ``qkv`` Linear ``(3 dim, dim)`` and ``proj`` (timm's ViT ``Attention``).
            num_kv_heads: KV heads of the new layer, dividing the source's KV heads; None: the class default.
            **kwargs: Further constructor arguments (``rope`` defaults to whether ``mha`` has RoPE: nearfar layers
                with ``rope`` set; others have none).

        Returns:
            The new layer, on ``mha``'s device and dtype.

        Raises:
            ValueError: ``mha`` has none of the two layouts, or ``num_kv_heads`` does not divide its KV heads.

        Examples:
            >>> import torch, nearfar as nf
            >>> mha = nf.DenseAttention(64, 4, causal=False)
            >>> gqa = nf.PGQA.from_mha(mha, num_kv_heads=4).eval()   # G = H: the same function
            >>> x = torch.randn(2, 10, 64)
            >>> torch.allclose(gqa(x), mha(x), atol=1e-5)
            True
        """
        heads, lin = getattr(mha, "num_heads", None), {n: _linear(mha, n) for n in _MHA_LINEARS}
        q, k, v, o, qkv, proj = (lin[n] for n in _MHA_LINEARS)
        w: list[torch.Tensor]
        b: list[torch.Tensor | None]
        if qkv is not None and proj is not None:  # timm's ViT Attention
            w, o, src_kv = list(qkv.weight.chunk(3, 0)), proj, heads
            b = [None] * 3 if qkv.bias is None else list(qkv.bias.chunk(3, 0))
        elif q is not None and k is not None and v is not None and o is not None:
            w, b, src_kv = [q.weight, k.weight, v.weight], [q.bias, k.bias, v.bias], getattr(mha, "num_kv_heads",
                                                                                              heads)
        else:
            raise ValueError("mha must have q_proj/k_proj/v_proj/o_proj Linears or a fused qkv Linear and proj, got "
                             f"{type(mha).__name__}")
        if not isinstance(heads, int) or not isinstance(src_kv, int):
            raise ValueError(f"mha must have an int num_heads, got {heads!r}")
        if not kwargs.get("cross"):
            kwargs.setdefault("rope", getattr(mha, "rope", None) is not None)
        layer = cls(w[0].shape[1], heads, num_kv_heads, qkv_bias=b[0] is not None, proj_bias=o.bias is not None,
                    **kwargs)
        layer.to(device=w[0].device, dtype=w[0].dtype)
        with torch.no_grad():
            for i, (t, wi, bi) in enumerate(zip((layer.q_proj, layer.k_proj, layer.v_proj), w, b)):
                t.weight.copy_(wi if i == 0 else mean_pool_heads(wi, src_kv, layer.num_kv_heads))
                if bi is not None:
                    t.bias.copy_(bi if i == 0 else mean_pool_heads(bi, src_kv, layer.num_kv_heads))
            layer.o_proj.weight.copy_(o.weight)
            if o.bias is not None:
                layer.o_proj.bias.copy_(o.bias)
        return layer


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
