"""What the grouped-query layers KDGQA, DGQA and PGQA share: the query-head allocations (``allocate_heads``,
``key_norm_allocation``, ``kv_index``), the key norms they read, attention with contiguous head groups
(``grouped_attention``), and ``GroupedQueryAttention``: LLaMA-style projections with ``num_kv_heads`` KV heads and
``from_mha``, the MHA -> GQA conversion (each KV head the mean of a contiguous group of the source's heads).

Paper: Khan, Khaquan, Tafveez, Samiwala, Raza, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
Attention" (2024, arXiv 2408.08454). Code read: yjzhang0505/key-driven-gqa ``modules/attention/kdgqa.py``
(``KDGQA.forward``, ``att_weight_conversion``). The allocation rule, its contiguous assignment and our choices
(all-equal norms give the uniform allocation; norms in float32 or wider, without gradient; padded keys left out)
are stated in ``nearfar.layers.kdgqa``; the layers are in ``kdgqa.py``, ``dgqa.py`` and ``pgqa.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ..checks import check_bool, check_dim_heads, check_tokens
from ..functional import attend
from ..patterns import Causal
from .projections import ProjectedAttention, add_projections

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
        >>> from nearfar.layers.grouped_query import allocate_heads
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
        >>> from nearfar.layers.grouped_query import key_norm_allocation
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
        >>> from nearfar.layers.grouped_query import kv_index
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
        >>> from nearfar.layers.grouped_query import grouped_attention
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

def mean_pool_heads(param: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Rows of a projection's weight ``(num_heads * d, in)`` or bias ``(num_heads * d,)``, head-major, averaged
    over each contiguous group of ``num_heads / num_groups`` heads: ``(num_groups * d, ...)``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.grouped_query import mean_pool_heads
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
