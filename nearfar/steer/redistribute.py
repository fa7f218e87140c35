"""``Redistribute``: move attention mass from one group of keys to another, exactly, on any engine.

VAR (Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025,
arXiv 2503.03321; official code: ``MICV-yonsei/VisAttnSink``) takes a share of the attention that image-centric
heads give to the *visual sink* tokens and gives it to the other image tokens, in proportion to the attention they
already get. On a row ``P`` with masses ``M_f`` on the ``from`` keys and ``M_t`` on the ``to`` keys, keeping
``keep`` of the ``from`` mass:

    P'_j = keep * P_j                         (j in from)
    P'_j = P_j * (1 + (1 - keep) M_f / M_t)   (j in to)
    P'_j = P_j                                (the others)

The row still sums to 1. A fused kernel never forms ``P``, but the output needs only the groups' partial outputs
``A_G = sum_{j in G} P_j v_j`` and masses ``M_G``:

    o' = o + (1 - keep) (M_f / M_t A_t - A_f),

and all four come out of one more run of the call (its other edits included) over the values ``[v 1_f | v 1_t | 1_f
| 1_t]``: nothing of size ``(Nq, Nk)`` is formed, and gradients flow through the outputs (the block-sparse engine's
log-sum-exp carries none). Rows that see no ``to`` key (or whose ``to`` mass underflows to 0) are left unchanged:
there is nowhere to put the mass. Keys in both groups count as ``from`` keys. What differs from VAR: VAR edits the
probabilities of the selected heads in an eager model (``P`` at hand) and picks the heads and sink tokens itself;
here the heads, query rows and the two key groups are arguments (``nearfar.steer.sink_tokens`` and ``group_mass``
find them), and only the proportional rule is offered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..calls import AttendCall
from .edits import Edit, State, key_mask_of, selected_heads


class Redistribute(Edit):
    """Keep ``keep`` of the attention on ``from_keys`` and give the rest to ``to_keys`` in proportion to their
    attention, for the query heads ``heads`` and rows ``rows`` (all when None); see the module docstring.

    Args:
        from_keys: Keys that give mass (e.g. the visual sink tokens): a bool mask ``(Nk,)``/``(B, Nk)``, positions
            or a slice.
        to_keys: Keys that receive it (e.g. the other image tokens), the same kinds.
        keep: The share of the ``from`` mass that stays, in ``[0, 1]`` (VAR's ``1 - p``).
        heads: Query heads to edit (default all).
        rows: Query rows to edit (default all): positions, a slice or a bool mask ``(Nq,)``.

    Raises:
        ValueError: ``keep`` outside ``[0, 1]``; keys or heads out of range (at the call).
    """

    needs_lse = True

    def __init__(self, from_keys: torch.Tensor | Sequence[int] | slice, to_keys: torch.Tensor | Sequence[int] | slice,
                 keep: float = 0.0, heads: int | Sequence[int] | None = None,
                 rows: torch.Tensor | Sequence[int] | slice | None = None) -> None:
        if not isinstance(keep, (int, float)) or not 0.0 <= float(keep) <= 1.0:
            raise ValueError(f"keep must be a number in [0, 1], got {keep!r}")
        self.from_keys, self.to_keys, self.keep = from_keys, to_keys, float(keep)
        self.heads_sel, self.rows = heads, rows

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        assert state.rerun is not None
        nk, dev, dv = call.k.shape[2], out.device, out.shape[-1]
        src = key_mask_of(self.from_keys, nk).to(dev)
        dst = key_mask_of(self.to_keys, nk).to(dev) & ~src
        # one more run of the call over the values [v on the from keys | v on the to keys | 1_from | 1_to]: the
        # partial outputs A_G = sum_{j in G} P_j v_j and masses M_G come out of the output (gradients included)
        v = call.v
        ind = [m.to(v.dtype)[:, None, :, None].expand(v.shape[0], v.shape[1], nk, 1) for m in (src, dst)]
        parts = state.rerun(v=torch.cat([v * ind[0], v * ind[1], *ind], -1))[0]
        a_f, a_t, m_f, m_t = parts[..., :dv], parts[..., dv:2 * dv], parts[..., 2 * dv:2 * dv + 1], parts[..., -1:]
        live = (m_t > 0) & (m_f > 0) & selected_heads(self.heads_sel, out.shape[1], dev)[None, :, None, None]
        if self.rows is not None:
            live = live & key_mask_of(self.rows, out.shape[2]).to(dev)[:, None, :, None]
        ratio = m_f / torch.where(live, m_t, torch.ones((), dtype=m_t.dtype, device=dev))
        delta = (1.0 - self.keep) * (ratio * a_t - a_f)
        return out + torch.where(live, delta, torch.zeros((), dtype=out.dtype, device=dev)).to(out.dtype)
