"""S2-Attention: per-head heterogeneous strided context sharding with local blocks (causal).

Paper: Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024). Official code:
linxihui/dkernel ``dkernel/utils.py::get_sparse_attn_mask`` (the pattern), ``dkernel/interface.py``; used in
Phi-3-small (block 64, 16 local blocks, vertical stride 8, a dense layer every 2 layers).

Per KV head ``h``, query block ``I`` and key block ``J`` (dkernel's ``get_sparse_attn_mask``)::

    allowed = J <= I and ((I - J) < local_blocks or (J + h * head_sliding_step + offset) % vert_stride == 0)

with token-level causality on top; query heads of a GQA group share their KV head's pattern, so ``vert_stride``
consecutive KV heads together cover every past block. The last ``num_dense_heads`` heads are dense causal;
``dense=True`` makes the whole layer dense causal (the "dense every n layers" hybrid: see ``s2_layer_kwargs``).
Each head is a ``nearfar.PerHead`` entry ``(BlockWindow(block, local_blocks - 1, 0) | BlockStrided(...)) & Causal()``.

Differences from the official code: the non-causal ("relative stride") variant is not implemented; the decode
cache keeps every key (the union over heads of their residue classes is the whole past when the KV heads cover
all residues), where dkernel keeps per-head blocks, O(local + N / stride) per head.
"""

from __future__ import annotations

from ..checks import check_nonneg_int, check_positive_int
from ..patterns import BlockStrided, BlockWindow, Causal, PerHead
from .pattern_attention import PatternAttention
from .projections import kv_heads
from .registry import POSITIONS_SHARED, Mechanism, register


def s2_pattern(num_heads: int, num_kv_heads: int, block: int = 64, local_blocks: int = 16, vert_stride: int = 8,
               homo_head: bool = False, head_sliding_offset: int = 0, num_dense_heads: int = 0,
               dense: bool = False) -> PerHead | Causal:
    """The per-query-head pattern (a ``PerHead`` of length ``num_heads``; ``Causal()`` when ``dense``)."""
    if dense:
        return Causal()
    block, local_blocks = check_positive_int(block, "block"), check_positive_int(local_blocks, "local_blocks")
    vert_stride = check_positive_int(vert_stride, "vert_stride")
    offset = check_nonneg_int(head_sliding_offset, "head_sliding_offset")
    n_dense = check_nonneg_int(num_dense_heads, "num_dense_heads")
    if n_dense > num_kv_heads:
        raise ValueError(f"num_dense_heads must be in [0, num_kv_heads={num_kv_heads}], got {n_dense}")
    step = 0 if homo_head else max(1, vert_stride // num_kv_heads)
    local = BlockWindow(block, local_blocks - 1, 0)
    per_kv = [Causal() if h >= num_kv_heads - n_dense else
              (local | BlockStrided(block, vert_stride, (h * step + offset) % vert_stride)) & Causal()
              for h in range(num_kv_heads)]
    group = num_heads // num_kv_heads
    return PerHead([per_kv[h // group] for h in range(num_heads)])


def s2_layer_kwargs(layer: int, dense_every: int | None = 2) -> dict:
    """Phi-3-small's hybrid: every ``dense_every``-th layer (1-based) is dense, the others sparse."""
    return {"dense": bool(dense_every and (layer + 1) % dense_every == 0)}


class S2Attention(PatternAttention):
    """``S2Attention(dim, num_heads, num_kv_heads=None, block=64, local_blocks=16, vert_stride=8, homo_head=False,
    head_sliding_offset=0, num_dense_heads=0, dense=False)``: causal, RoPE, GQA; x ``(B, N, dim)``.

    Lin et al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (2024); official code:
    linxihui/dkernel. KV head ``h`` sees the last ``local_blocks`` blocks plus every ``vert_stride``-th block at its
    own offset (``(h * max(1, vert_stride // num_kv_heads) + head_sliding_offset) % vert_stride``); a GQA group's
    query heads share their KV head's pattern. ``forward`` and ``new_cache`` are ``PatternAttention``'s.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        block: Block size in tokens, >= 1 (default 64).
        local_blocks: Blocks of the local window, the query's own included, >= 1 (default 16).
        vert_stride: Stride of the vertical (strided) blocks, >= 1 (default 8).
        homo_head: Every KV head uses the same vertical offset (default False: heterogeneous heads).
        head_sliding_offset: Offset added to every head's vertical offset, >= 0 (default 0).
        num_dense_heads: The last KV heads that are dense (causal), in ``[0, num_kv_heads]`` (default 0).
        dense: The whole layer is dense causal attention (the hybrid's dense layers, default False).

    Raises:
        TypeError: An int argument is not an int.
        ValueError: ``block``, ``local_blocks`` or ``vert_stride`` < 1; ``head_sliding_offset`` < 0;
            ``num_dense_heads`` outside ``[0, num_kv_heads]``; ``dim`` is not a positive multiple of ``num_heads``;
            ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import S2Attention
        >>> layer = S2Attention(64, 4, num_kv_heads=2, block=4, local_blocks=2, vert_stride=4)
        >>> layer(torch.randn(2, 32, 64)).shape
        torch.Size([2, 32, 64])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, block: int = 64,
                 local_blocks: int = 16, vert_stride: int = 8, homo_head: bool = False, head_sliding_offset: int = 0,
                 num_dense_heads: int = 0, dense: bool = False):
        kv = kv_heads(num_heads, num_kv_heads)
        pattern = s2_pattern(num_heads, kv, block, local_blocks, vert_stride, homo_head, head_sliding_offset,
                             num_dense_heads, dense)
        super().__init__(dim, num_heads, pattern, kv, causal=True)
        self.block, self.local_blocks, self.vert_stride, self.dense = block, local_blocks, vert_stride, dense


register(Mechanism(
    name="s2_attention", paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (2024)",
    repo="linxihui/dkernel", family="local+global", dims=("1d",), cls=S2Attention, patterns={"CS": {}}, why_not={
        "NS": "dkernel checks that a pattern is causal ('Only causal attention is supported now'); a non-causal "
              "'relative stride' variant is not in the official code",
        "NC": POSITIONS_SHARED, "CC": POSITIONS_SHARED},
    make=lambda dim, num_heads, **kw: S2Attention(dim, num_heads, **kw),
    notes="block 64, 16 local blocks, vertical stride 8, heterogeneous heads (Phi-3-small); dense=True for the "
          "hybrid's dense layers (s2_layer_kwargs); causal only; the decode cache keeps every key"))
