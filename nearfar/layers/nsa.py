"""NSA (Native Sparse Attention): a gated sum of three softmax attentions per query head -- over compressed past
blocks, over the raw tokens of the top-n blocks those compressed scores rank highest (shared by a GQA group), and
over a sliding window.

Paper: Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention"
(arXiv 2502.11089, 2025). No official code from the authors; we follow fla-org/flash-linear-attention
``fla/ops/nsa/naive.py`` (``naive_nsa``, ``naive_nsa_compression``, ``naive_nsa_topk``, ``naive_nsa_selection``)
and ``fla/layers/nsa.py`` (``NativeSparseAttention``), and offer lucidrains/native-sparse-attention-pytorch's
learned compressor as an option.

With ``BS = block_size`` (fla: one size for compression length, stride and selection blocks), positions ``t``
from 0 and ``blk(t) = t // BS``, per query head ``h`` of KV head ``h // G`` (keys after RoPE):

- **cmp**: compressed keys/values, one per *complete* block ``c`` (the mean of its keys/values, fla; or the
  learned MLP with an intra-block position embedding, ``compress="mlp"``); query ``t`` sees block ``c`` once its
  last token is ``<= t`` (``(c+1) BS - 1 <= t``); no visible block gives 0;
- **slc**: importance ``p_cmp`` (the cmp branch's softmax probabilities) averaged over the ``G`` heads of the group;
  blocks ``0``, ``blk(t)`` and ``blk(t) - 1`` are forced, the other slots of the ``block_counts`` go to the most
  important complete blocks; one softmax over the raw keys of those blocks, token-causal in the current block;
- **win**: the last ``window_size`` keys, ``t`` included (fla's flash-attn window ``(w - 1, 0)``); 0 turns it off;
- ``o = g_cmp o_cmp + g_slc o_slc + g_win o_win``, gates ``sigmoid(g_proj(x))`` per (token, head, branch), in
  fla's order (cmp, slc, win), not normalised; then ``o_proj``.

Each branch is one call of ``nearfar.attend``: cmp with ``SelectedBlocks`` over the compressed keys (blocks of one
key; the queries shifted by one so a query block's visible set is a prefix), slc with ``SelectedBlocks`` (one
list per KV head and token, ``within=Causal()``), win with ``SlidingWindow & Causal``: ``O(N (N/BS + n BS + w) d)``
work, no ``N x N`` mask; the importance map is ``(N, N/BS)`` per head (``block_scores``/``topk_blocks``).

Differences from fla's code:

- any GQA group size (fla's ``naive_nsa``/``parallel_nsa`` assert a power of two >= 16); ``block_counts >= 3``
  (it counts the three forced blocks; below 3 fla's choice among them is a tie); ``block_counts`` is an int;
- duplicate block ids given to ``nsa_selection`` count once (fla's naive code counts them with multiplicity; its
  top-k never repeats one); a query with no valid key gives 0 (fla's naive selection gives NaN);
- the window branch uses ``scale`` like the others (fla's flash-attn call ignores a custom scale);
- ties of importance go to the lower block; the importance is the group mean in the compute dtype (float32 for
  half inputs);
- decoding keeps the compressed keys of completed blocks and appends one per completed block (fla recomputes
  the pooling over the whole cache every step); the paper's separate K/V per branch, overlapping compression
  blocks (stride < length) and its Eq. 9 block mapping are not implemented (``l = l' = stride``, as fla).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice, check_int_range, check_nonneg_int, check_positive_int, check_tensor, check_tokens
from ..functional import SelectedBlocks, attend, block_scores, merge_heads, pool_blocks, topk_blocks
from ..patterns import Causal, SlidingWindow
from .fla_layout import (
    check_block_counts,
    check_cu_seqlens,
    check_fla_qkv,
    compressed_offsets,
    from_batch,
    from_fla_indices,
    heads_first,
    to_batch,
    to_fla_indices,
)
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import POSITIONS_SHARED, Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

COMPRESSORS = ("mean", "mlp")


@torch.compiler.disable  # run-time block lists: validated and run eagerly inside compiled graphs
def nsa_compressed_heads(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int,
                         start: int = 0, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cmp branch, heads first: ``q (B, Hq, Nq, d)`` at positions ``start ..``, compressed ``k_cmp (B, Hkv, C,
    d)``, ``v_cmp (B, Hkv, C, dv)``; block ``c`` is visible from position ``(c+1) * block_size - 1`` on.

    Returns:
        ``(out (B, Hq, Nq, dv), lse (B, Hq, Nq))``; rows with no visible block give 0 and ``-inf``.
    """
    nq, nc, bs = q.shape[2], k_cmp.shape[2], block_size
    first = start + 1  # shifted: query at p is row p + 1, so row block r sees the blocks c < r
    lead = first % bs
    rows = ((lead + nq) + bs - 1) // bs
    num = (torch.arange(rows, device=q.device) + first // bs).clamp(max=nc).to(torch.int32).view(1, 1, rows)
    idx = torch.arange(max(nc, 1), device=q.device, dtype=torch.int32).expand(1, 1, rows, max(nc, 1))
    if nc == 0:
        k_cmp, v_cmp = k_cmp.new_zeros(*k_cmp.shape[:2], 1, k_cmp.shape[3]), v_cmp.new_zeros(*v_cmp.shape[:2], 1,
                                                                                              v_cmp.shape[3])
        num = torch.zeros_like(num)
    qp = torch.nn.functional.pad(q, (0, 0, lead, 0)) if lead else q
    out, lse = attend(qp, k_cmp, v_cmp, blocks=SelectedBlocks(num, idx, q_block=bs, kv_block=1), scale=scale,
                      return_lse=True)
    return out[:, :, lead:], lse[:, :, lead:]


@torch.compiler.disable  # data-dependent indices: routed eagerly inside compiled graphs
def nsa_select_heads(q: torch.Tensor, k_cmp: torch.Tensor, block_counts: int, block_size: int, nk: int,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's top-n blocks per (token, KV head), fla's rule, for queries at the last ``Nq`` of ``nk`` positions.

    Returns:
        ``(kv_num_blocks (B, Hkv, Nq), kv_indices (B, Hkv, Nq, ceil(nk / block_size)))``, ascending, -1 padded.
    """
    b, hq, nq, _ = q.shape
    hkv, nc, bs = k_cmp.shape[1], k_cmp.shape[2], block_size
    start, nb = nk - nq, (nk + block_size - 1) // block_size
    with torch.no_grad():
        gd = torch.float64 if q.dtype == torch.float64 else torch.float32
        probs = torch.full((b, hkv, nq, nb), float("-inf"), dtype=gd, device=q.device)
        if nc:  # complete blocks, visible once their last token is <= t: rows at t + 1, current block masked
            probs[..., :nc] = block_scores(q.to(gd), k_cmp.to(gd), k_block_size=bs, q_block_size=1, q_start=start + 1,
                                           include_current=False, scale=scale, softmax=True, group_reduce="mean")
        return topk_blocks(probs, block_counts, force_first=True, force_last=2, q_block_size=1, k_block_size=bs,
                           q_start=start)


@torch.compiler.disable  # run-time block lists: validated and run eagerly inside compiled graphs
def _selected(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num: torch.Tensor, idx: torch.Tensor,
              block_size: int, scale: float | None) -> torch.Tensor:
    """The slc branch: each query reads the keys ``<= t`` of its selected blocks."""
    return attend(q, k, v, blocks=SelectedBlocks(num, idx, q_block=1, kv_block=block_size, within=Causal()),
                  scale=scale)


def nsa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
              gates: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], block_size: int,
              block_counts: int, window_size: int, scale: float | None = None,
              selection: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The three NSA branches and their gated sum, heads first: ``q (B, Hq, Nq, d)`` at the last ``Nq`` of the
    ``Nk`` positions of ``k``, ``v``; compressed ``k_cmp``, ``v_cmp`` of the complete blocks; ``gates`` (cmp, slc,
    win) broadcastable to ``(B, Hq, Nq, 1)``: a None cmp gate drops the cmp branch (fla), a None slc or win gate
    weighs 1; ``selection`` an optional ``(kv_num_blocks, kv_indices)`` per KV head (None: NSA's top-n).

    Returns:
        ``(out (B, Hq, Nq, dv), (kv_num_blocks, kv_indices))``: the output and the selection used.
    """
    nq, nk = q.shape[2], k.shape[2]
    g_cmp, g_slc, g_win = gates
    num, idx = selection if selection is not None else nsa_select_heads(q, k_cmp, block_counts, block_size, nk, scale)
    o_slc = _selected(q, k, v, num, idx, block_size, scale)
    out = o_slc if g_slc is None else g_slc * o_slc
    if g_cmp is not None:
        out = out + g_cmp * nsa_compressed_heads(q, k_cmp, v_cmp, block_size, nk - nq, scale)[0]
    if window_size:
        keep = min(nk, window_size + nq - 1)  # the keys any of the queries can reach (bottom-right aligned)
        o_win = attend(q, k[:, :, nk - keep:], v[:, :, nk - keep:], SlidingWindow(left=window_size - 1) & Causal(),
                       scale=scale)
        out = out + (o_win if g_win is None else g_win * o_win)
    return out, (num, idx)


def nsa_compression(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, block_size: int, scale: float | None,
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NSA's compressed attention in fla's layout (fla ``naive_nsa_compression``): ``q (B, T, Hq, d)`` over
    ``k_cmp (B, TC, Hkv, d)``, ``v_cmp (B, TC, Hkv, dv)``; block ``c`` is visible from ``t = (c+1) BS - 1`` on.
    With ``cu_seqlens`` (``B = 1``) the compressed tensors pack ``ceil(len / BS)`` blocks per sequence.

    Returns:
        ``(o (B, T, Hq, dv), lse (B, T, Hq) float32)``; a query with no visible block gives 0 and ``-inf``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa import nsa_compression
        >>> q, kc = torch.randn(1, 9, 2, 4), torch.randn(1, 3, 1, 4)
        >>> o, lse = nsa_compression(q, kc, kc, 4, None)
        >>> o.shape, lse[0, :4, 0].isinf().tolist()
        (torch.Size([1, 9, 2, 4]), [True, True, True, False])
    """
    bs, scale = check_fla_qkv(q, k_cmp, v_cmp, block_size, scale)
    if cu_seqlens is None:
        o, lse = nsa_compressed_heads(heads_first(q), heads_first(k_cmp), heads_first(v_cmp), bs, 0, scale)
        return heads_first(o), heads_first(lse[..., None])[..., 0].float()
    cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    cc = compressed_offsets(cu, bs)
    if k_cmp.shape[1] != int(cc[-1]):
        raise ValueError(f"k_cmp must pack ceil(len / block_size) blocks per sequence ({int(cc[-1])}), got "
                         f"{k_cmp.shape[1]}")
    (qb, valid), (kb, _), (vb, _) = to_batch(q, cu), to_batch(k_cmp, cc), to_batch(v_cmp, cc)
    o, lse = nsa_compressed_heads(heads_first(qb), heads_first(kb), heads_first(vb), bs, 0, scale)
    return from_batch(heads_first(o), valid), from_batch(heads_first(lse[..., None])[..., 0].float(), valid)


def nsa_topk(q: torch.Tensor, k_cmp: torch.Tensor, block_counts: int, block_size: int, scale: float | None,
             cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NSA's block selection in fla's layout (fla ``naive_nsa_topk``): ``block_indices (B, T, Hkv, S)`` int64,
    ``S = block_counts``, ascending, -1 padded; blocks 0, ``blk(t)`` and ``blk(t) - 1`` forced, the rest by the
    group-mean probability of the compressed attention over the complete blocks (``k_cmp (B, TC, Hkv, d)``).

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa import nsa_topk
        >>> q, kc = torch.randn(1, 40, 2, 4), torch.randn(1, 5, 1, 4)
        >>> nsa_topk(q, kc, 4, 8, None)[0, 36, 0].tolist()   # block 0, the current (4) and previous (3), one more
        [0, 1, 3, 4]
    """
    bs, scale = check_fla_qkv(q, k_cmp, None, block_size, scale)
    s = check_block_counts(block_counts)
    if cu_seqlens is None:
        qh, kh, nk = heads_first(q), heads_first(k_cmp), q.shape[1]
        num, idx = nsa_select_heads(qh, kh[:, :, :(nk + bs - 1) // bs], s, bs, nk, scale)
        return to_fla_indices(num, idx, s)
    cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    (qb, valid), (kb, _) = to_batch(q, cu), to_batch(k_cmp, compressed_offsets(cu, bs))
    num, idx = nsa_select_heads(heads_first(qb), heads_first(kb), s, bs, qb.shape[1], scale)
    return from_batch(to_fla_indices(num, idx, s), valid)


def nsa_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
                  block_size: int = 64, scale: float | None = None,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """NSA's selected attention in fla's layout (fla ``naive_nsa_selection``): query ``t`` of KV head ``h`` attends
    the keys ``u <= t`` of the blocks ``block_indices[b, t, h]`` (``(B, T, Hkv, S)``; -1 and out-of-range ids drop
    out, a repeated id counts once), one softmax; ``q (B, T, Hq, d)``, ``k (B, T, Hkv, d)``, ``v (B, T, Hkv, dv)``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa import nsa_selection
        >>> q, k, v = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 1, 4), torch.randn(1, 12, 1, 4)
        >>> nsa_selection(q, k, v, torch.tensor([0, -1]).expand(1, 12, 1, 2), block_size=4).shape
        torch.Size([1, 12, 2, 4])
    """
    bs, scale = check_fla_qkv(q, k, v, block_size, scale)
    if k.shape[1] != q.shape[1] or tuple(block_indices.shape[:3]) != (*q.shape[:2], k.shape[2]):
        raise ValueError(f"k must have T={q.shape[1]} tokens and block_indices be (B, T, Hkv, S), got "
                         f"{tuple(k.shape)} and {tuple(block_indices.shape)}")
    valid = None
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
        (q, valid), (k, _), (v, _), (block_indices, _) = (to_batch(x, cu) for x in (q, k, v, block_indices))
    sel = SelectedBlocks(*from_fla_indices(block_indices, k.shape[1], bs), q_block=1, kv_block=bs, within=Causal())
    out = heads_first(attend(heads_first(q), heads_first(k), heads_first(v), blocks=sel, scale=scale))
    return out if valid is None else from_batch(out, valid)


def nsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_cmp: torch.Tensor | None = None,
        g_slc: torch.Tensor | None = None, g_swa: torch.Tensor | None = None,
        block_indices: torch.Tensor | None = None, block_counts: int = 16, block_size: int = 64,
        window_size: int = 0, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
        return_block_indices: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NSA in fla's layout and argument order (fla ``naive_nsa`` / ``parallel_nsa``), any GQA group size:
    ``q (B, T, Hq, d)``, ``k (B, T, Hkv, d)``, ``v (B, T, Hkv, dv)``, activated gates ``(B, T, Hq)``. Mean-pooled
    compression; ``o = g_slc o_slc + g_cmp o_cmp + g_swa o_swa``: no ``g_cmp`` drops the cmp branch (then
    ``block_indices`` are needed), no ``g_slc``/``g_swa`` weighs 1; ``window_size=0`` drops the window branch.
    Given ``block_indices (B, T, Hkv, S)`` replace the top-n selection.

    Returns:
        ``o (B, T, Hq, dv)``, and with ``return_block_indices`` the ``block_indices`` used.

    Raises:
        TypeError: A tensor or argument of the wrong type (``block_counts`` must be an int).
        ValueError: Shapes that do not fit, sizes out of range, or neither ``g_cmp`` nor ``block_indices``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.nsa import nsa
        >>> q, k, v = torch.randn(1, 50, 16, 8), torch.randn(1, 50, 1, 8), torch.randn(1, 50, 1, 8)
        >>> g = torch.rand(3, 1, 50, 16)
        >>> o, idx = nsa(q, k, v, g[0], g[1], g[2], block_counts=4, block_size=8, window_size=16,
        ...              return_block_indices=True)
        >>> o.shape, idx.shape
        (torch.Size([1, 50, 16, 8]), torch.Size([1, 50, 1, 4]))
    """
    bs, scale = check_fla_qkv(q, k, v, block_size, scale)
    s, w = check_block_counts(block_counts), check_nonneg_int(window_size, "window_size")
    if g_cmp is None and block_indices is None:
        raise ValueError("nsa needs g_cmp (the selection comes from the compressed scores) or block_indices")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must have T={q.shape[1]} tokens, got {tuple(k.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if g is not None and (check_tensor(g, name, 3).shape != q.shape[:3]):
            raise ValueError(f"{name} must be (B, T, Hq) = {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    valid = None
    xs = [q, k, v, g_cmp, g_slc, g_swa, block_indices]
    if cu_seqlens is not None:
        cu = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
        valid = to_batch(q, cu)[1]
        xs = [None if x is None else to_batch(x, cu)[0] for x in xs]
    qb, kb, vb, gc, gs, gw, bi = xs
    assert qb is not None and kb is not None and vb is not None  # given
    selection = None if bi is None else from_fla_indices(bi, kb.shape[1], bs)
    kh, vh = heads_first(kb), heads_first(vb)
    gc, gs, gw = (None if g is None else heads_first(g)[..., None] for g in (gc, gs, gw))
    out, (num, idx) = nsa_heads(heads_first(qb), kh, vh, pool_blocks(kh, bs), pool_blocks(vh, bs), (gc, gs, gw), bs,
                                s, w, scale, selection)
    out = heads_first(out)
    if valid is not None:
        out = from_batch(out, valid)
    if not return_block_indices:
        return out
    if block_indices is None:
        block_indices = to_fla_indices(num, idx, s)
        block_indices = block_indices if valid is None else from_batch(block_indices, valid)
    return out, block_indices


class NSACache(KVCache):
    """Decoding state of ``NSAAttention``: every key and value (any block may be selected) and the compressed key
    and value of each completed block."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, None, device, dtype)
        self.k_cmp: torch.Tensor | None = None
        self.v_cmp: torch.Tensor | None = None

    @property
    def num_compressed(self) -> int:
        return 0 if self.k_cmp is None else self.k_cmp.shape[2]


@whole_sequence()
class NSAAttention(ProjectedAttention):
    """``NSAAttention(dim, num_heads, num_kv_heads=None, block_size=64, block_counts=16, window_size=512,
    compress="mean", rope=True, qkv_bias=False)``: causal NSA self-attention of ``x (B, N, dim)`` with RoPE and GQA.

    Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention"
    (arXiv 2502.11089); fla's ``NativeSparseAttention`` (fla-org/flash-linear-attention). Compressed-block, selected-
    block and sliding-window attention summed with sigmoid gates from ``x`` (see the module docstring). Defaults:
    fla's layer (blocks of 64, 16 selected blocks including block 0 and the two local ones, window 512, mean
    compression); the selection is shared by the ``num_heads / num_kv_heads`` query heads of a KV head.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of query heads, >= 1.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        block_size: Tokens per compression and selection block, >= 1 (default 64).
        block_counts: Blocks selected per query, the three forced ones included, >= 3 (default 16).
        window_size: Sliding-window keys, the query included, >= 0 (default 512; 0: no window branch).
        compress: ``"mean"`` (default, fla) or ``"mlp"`` (learned: a per-KV-head position embedding added in the
            block, then ``Linear(BS d, BS d) -> ReLU -> Linear(BS d, d)``, separate for keys and values; lucidrains).
        rope: Rotary position embeddings (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``block_size``, ``block_counts``, ``window_size`` or ``num_kv_heads`` is not an int.
        ValueError: ``block_size`` < 1, ``block_counts`` < 3, ``window_size`` < 0; an unknown ``compress``; ``dim``
            is not a positive multiple of ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import NSAAttention
        >>> layer = NSAAttention(64, 8, num_kv_heads=2, block_size=8, block_counts=4, window_size=16)
        >>> x = torch.randn(2, 50, 64)
        >>> y = layer(x)
        >>> cache = layer.new_cache(2)
        >>> steps = [layer(x[:, :21], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(21, 50)]
        >>> torch.allclose(torch.cat(steps, 1), y, atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, block_size: int = 64,
                 block_counts: int = 16, window_size: int = 512, compress: str = "mean", rope: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        self.block_size = check_positive_int(block_size, "block_size")
        self.block_counts = check_int_range(block_counts, "block_counts", 3, 2 ** 31 - 1)
        self.window_size = check_nonneg_int(window_size, "window_size")
        self.compress = check_choice(compress, "compress", COMPRESSORS)
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)
        self.g_proj = nn.Linear(dim, 3 * num_heads, bias=False)
        self.causal = True
        if compress == "mlp":
            width = self.block_size * self.head_dim
            self.k_pe = nn.Parameter(torch.zeros(self.num_kv_heads, self.block_size, self.head_dim))
            self.v_pe = nn.Parameter(torch.zeros(self.num_kv_heads, self.block_size, self.head_dim))
            self.k_mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.head_dim))
            self.v_mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.head_dim))

    def compress_blocks(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys and values of whole blocks: ``k, v (B, Hkv, C * BS, d)`` -> ``(B, Hkv, C, d)`` each."""
        bs = self.block_size
        if self.compress == "mean":
            return pool_blocks(k, bs), pool_blocks(v, bs)
        b, h, n, d = k.shape

        def mlp(x: torch.Tensor, pe: torch.Tensor, net: nn.Module) -> torch.Tensor:
            blocks = x.reshape(b, h, n // bs, bs, d) + pe[:, None].to(x.dtype)
            return net(blocks.reshape(b, h, n // bs, bs * d))

        return mlp(k, self.k_pe, self.k_mlp), mlp(v, self.v_pe, self.v_mlp)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> NSACache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            An ``NSACache`` (all keys and values, and the compressed key and value of every completed block).
        """
        return NSACache(batch, device, dtype)

    def forward(self, x: torch.Tensor, cache: NSACache | None = None) -> torch.Tensor:
        """Causal NSA attention of ``x``, or the next tokens of each sequence through ``cache``.

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
        cache = NSACache.checked(cache, x)
        n, bs = x.shape[1], self.block_size
        q, k, v, _ = rotary_qkv(self, x, 0 if cache is None else cache.length)
        gates = torch.sigmoid(self.g_proj(x)).view(*x.shape[:2], self.num_heads, 3).permute(3, 0, 2, 1)[..., None]
        if cache is None:
            done = n // bs
            k_cmp, v_cmp = self.compress_blocks(k[:, :, :done * bs], v[:, :, :done * bs])
        else:
            cache.append(k, v)
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None  # appended just now
            k, v = ck, cv
            done, c0 = cache.length // bs, cache.num_compressed
            if done > c0:
                kc, vc = self.compress_blocks(k[:, :, c0 * bs:done * bs], v[:, :, c0 * bs:done * bs])
                cache.k_cmp = kc if cache.k_cmp is None else torch.cat([cache.k_cmp, kc], 2)
                cache.v_cmp = vc if cache.v_cmp is None else torch.cat([cache.v_cmp, vc], 2)
            if cache.k_cmp is None:
                cache.k_cmp, cache.v_cmp = self.compress_blocks(k[:, :, :0], v[:, :, :0])
            assert cache.k_cmp is not None and cache.v_cmp is not None  # set together just now
            k_cmp, v_cmp = cache.k_cmp, cache.v_cmp
        out, _ = nsa_heads(q, k, v, k_cmp, v_cmp, (gates[0], gates[1], gates[2]), bs, self.block_counts,
                           self.window_size)
        return self.o_proj(merge_heads(out, (n,)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, block_counts={self.block_counts}, window_size={self.window_size}, "
                f"compress={self.compress!r}")


register(Mechanism(
    name="nsa", paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention "
                      "(arXiv 2502.11089, 2025)",
    repo="fla-org/flash-linear-attention (fla/layers/nsa.py; no official code from the authors)", family="routed",
    dims=("1d",), cls=NSAAttention, patterns={"CS": {}}, why_not={
        "NS": "the paper and fla define the causal form only (compressed blocks become visible once complete, the "
              "selection is forced to the query's own and previous block)",
        "NC": "the selection and the window are defined relative to the query's position among its own keys; the "
              "paper defines no second source", "CC": POSITIONS_SHARED},
    make=lambda dim, num_heads, **kw: NSAAttention(dim, num_heads, **kw),
    notes="fla's layer defaults: blocks of 64 (mean compression), 16 selected blocks shared per KV head (block 0 and "
          "the two local ones forced), window 512, sigmoid gates per head; O(N (N/64 + 16*64 + 512) d) through "
          "attend's block-sparse engine; decode cache: all keys plus one compressed key per completed block"))
