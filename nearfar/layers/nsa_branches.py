"""NSA's three branches and their gated sum, heads first (``(B, H, N, d)``): what ``NSAAttention`` runs, and what
the fla-layout functions of ``nsa_fla.py`` wrap.

Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention" (arXiv 2502.11089,
2025), following fla-org/flash-linear-attention ``fla/ops/nsa/naive.py`` (``naive_nsa_compression``,
``naive_nsa_topk``, ``naive_nsa_selection``). The branches, the selection rule and our differences from fla's code
are stated in ``nearfar.layers.nsa``. Each branch is one call of ``nearfar.attend``; the routing decisions
(run-time block lists) run eagerly inside compiled graphs.
"""

from __future__ import annotations

import torch

from ..functional import SelectedBlocks, attend, block_scores, topk_blocks
from ..patterns import Causal, SlidingWindow

__all__ = ["nsa_compressed_heads", "nsa_heads", "nsa_select_heads"]


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
