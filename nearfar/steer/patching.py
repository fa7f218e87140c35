"""Head patching, forced attention patterns and path patching: edits of chosen heads at the input of the output
projection (the per-head outputs ``(B, Hq, Nq, dv)``) or of their q, k and v.

Activation patching copies values of a *source* run (a corrupted prompt, another image, an earlier step) into a
*target* run at chosen heads and positions, and measures how the output moves: ``PatchHeads`` with a ``FromBatch``
source (both runs are items of one batch) or a ``FromRecord`` source (what ``Capture`` recorded in an earlier
``control`` block). Its ``field="pattern"`` injects the source's attention map through its queries and keys
(``softmax(Q_src K_src^T)`` over the target's values), as map-injection editing methods do, e.g. Hertz et al.,
"Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023, arXiv:2208.01626. ``ForcePattern`` sets
heads to given probabilities.

``path_patch`` is path patching: Wang, Variengien, Conmy, Shlegeris and Steinhardt, "Interpretability in the Wild: a
Circuit for Indirect Object Identification in GPT-2 small", ICLR 2023, arXiv:2211.00593 (their section on path
patching), formalised by Goldowsky-Dill, MacLeod, Sato and Arora, "Localizing Model Behavior with Path Patching",
arXiv:2304.05969 (2023). It measures the effect of sender heads on the output *through* receiver heads only: the
senders' corrupted outputs reach the receivers' inputs while every other head is frozen to its clean output, then
only the receivers' inputs are replaced in a clean run. MLPs and norms are recomputed, not frozen, as in the IOI
paper; with grouped-query attention a receiver's k/v are its KV head's, shared by its group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ..calls import AttendCall
from .edits import Edit, State
from .sites import Site, find_sites
from .sources import FromRecord, Source, check_source, put, substitute
from .steering import Capture, control

T = TypeVar("T")
PATCH_FIELDS = ("z", "q", "k", "v", "pattern")
Rows = slice | Sequence[int] | torch.Tensor | None


def _heads_list(heads: object, name: str = "heads") -> list[int]:
    """``heads`` (an int, a sequence of ints or an integer tensor) as a non-empty list of distinct ints."""
    if isinstance(heads, torch.Tensor) and not heads.is_floating_point() and heads.dtype != torch.bool:
        heads = heads.flatten().tolist()
    items = [heads] if isinstance(heads, int) and not isinstance(heads, bool) else heads
    if not isinstance(items, Sequence) or not items or not all(isinstance(h, int) and not isinstance(h, bool)
                                                               for h in items):
        raise TypeError(f"{name} must be an int or a non-empty sequence of ints, got {heads!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} must be distinct, got {list(items)}")
    return list(items)


def _head_index(heads: list[int], h: int, what: str, device: torch.device) -> torch.Tensor:
    if min(heads) < -h or max(heads) >= h:
        raise ValueError(f"heads: {what} indices must be in [-{h}, {h}) at this call, got {heads}")
    idx = torch.as_tensor(heads, dtype=torch.long) % h
    if len(set(idx.tolist())) != len(heads):
        raise ValueError(f"heads: {heads} name one {what[:-1]} twice at this call ({h} {what})")
    return idx.to(device)


def _check_rows(rows: object) -> Rows:
    if rows is None or isinstance(rows, slice):
        return rows
    if isinstance(rows, torch.Tensor):
        if rows.dim() in (1, 2) if rows.dtype == torch.bool else not rows.is_floating_point() and rows.dim() <= 1:
            return rows
        raise ValueError(f"rows: a tensor must be a bool mask (N,)/(B, N) or 1D positions, got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if isinstance(rows, Sequence) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        return rows
    raise TypeError(f"rows must be None, a slice, positions or a bool mask, got {rows!r}")


def _row_mask(rows: Rows, n: int, b: int, device: torch.device) -> torch.Tensor:
    """``rows`` as a bool ``(1 or B, n)`` mask."""
    if rows is None:
        return torch.ones(1, n, dtype=torch.bool, device=device)
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
        m = rows if rows.dim() == 2 else rows[None]
        if m.shape[1] != n or m.shape[0] not in (1, b):
            raise ValueError(f"rows: a bool mask must be (N,) or (B, N) with N={n}, B={b}, got {tuple(rows.shape)}")
        return m.to(device)
    idx = torch.arange(n)[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"rows: positions must be in [0, {n}) at this call, got {idx.tolist()}")
    return torch.zeros(1, n, dtype=torch.bool).index_fill_(1, idx, True).to(device)


def _patch(x: torch.Tensor, values: torch.Tensor, items: torch.Tensor, heads: torch.Tensor,
           rows: torch.Tensor) -> torch.Tensor:
    """``x (B, H, N, d)`` whose batch items ``items`` take ``values (T, H, N, d)`` at ``heads`` and the rows of the
    ``(1 or B, N)`` mask ``rows``."""
    hm = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device).index_fill_(0, heads, True)
    rm = rows if rows.shape[0] == 1 else rows[items]
    sel = hm[None, :, None, None] & rm[:, None, :, None]
    return put(x, items, torch.where(sel, values.to(x.dtype), x[items]))


class PatchHeads(Edit):
    """Copy the source run's values into this run at chosen heads and positions (activation patching).

    With ``FromBatch(source, target)`` only the target batch items change (the source items run as they are); with
    ``FromRecord(run.records)`` every item takes the recorded values of its batch position, from an earlier
    ``control`` block whose ``Capture`` recorded the field (``"head_out"`` for ``z``; ``"q"``, ``"k"``, ``"v"``;
    ``"q"`` and ``"k"`` for ``pattern``), without head selection or reduction.

    Args:
        source: ``FromBatch`` or ``FromRecord``.
        heads: Query heads (an int or ints) for ``z``, ``q`` and ``pattern``; key/value heads for ``k`` and ``v``
            (with grouped-query attention a KV head is shared by ``Hq // Hkv`` query heads).
        rows: Positions to patch: query positions for ``z``, ``q`` and ``pattern``, key positions for ``k`` and
            ``v``; None (all), a slice, positions, or a bool mask ``(N,)`` or ``(B, N)``.
        field: ``"z"``: the head outputs (before the output projection); ``"q"``, ``"k"``, ``"v"``: the call's
            inputs as this edit sees them; ``"pattern"``: the heads' outputs of the call run once more with the
            source's q and k (all heads: with grouped-query attention the source k of a KV head serves its whole
            group, so taking the patched query heads of that run is exact) and this run's v, key padding mask,
            relative-position table and score biases. It costs one more attention call of the site.

    Raises:
        TypeError: A source that is neither ``FromBatch`` nor ``FromRecord``; bad ``heads`` or ``rows`` types.
        ValueError: An unknown ``field``; repeated heads; at the call, heads or rows out of range.
        KeyError: ``FromRecord`` without a record of the field at this site, step and call.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import FromBatch, PatchHeads, control
        >>> lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense")
        >>> tokens = torch.randint(0, 64, (2, 10))
        >>> with torch.no_grad(), control(lm, [("blocks.1.attn", PatchHeads(FromBatch([0], [1]), heads=1))]):
        ...     logits = lm(tokens)
        >>> torch.allclose(logits[0], lm(tokens)[0], atol=1e-6)  # the source item is unchanged
        True
    """

    def __init__(self, source: Source, heads: int | Sequence[int] | torch.Tensor, rows: Rows = None,
                 field: str = "z") -> None:
        if not isinstance(field, str) or field not in PATCH_FIELDS:
            raise ValueError(f"field must be one of {PATCH_FIELDS}, got {field!r}")
        self.source, self.field = check_source(source), field
        self.heads_sel, self.rows = _heads_list(heads), _check_rows(rows)

    def kv(self, call: AttendCall, state: State) -> None:
        if self.field not in ("q", "k", "v"):
            return
        x: torch.Tensor = getattr(call, self.field)
        heads = _head_index(self.heads_sel, x.shape[1], "query heads" if self.field == "q" else "key/value heads",
                            x.device)
        values, items = substitute(self.source, self.field, x, state)
        setattr(call, self.field, _patch(x, values, items, heads, _row_mask(self.rows, x.shape[2], x.shape[0],
                                                                            x.device)))

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        if self.field not in ("z", "pattern"):
            return out
        heads = _head_index(self.heads_sel, out.shape[1], "query heads", out.device)
        rows = _row_mask(self.rows, out.shape[2], out.shape[0], out.device)
        if self.field == "z":
            values, items = substitute(self.source, "head_out", out, state)
        elif self.field == "pattern":
            q_src, items = substitute(self.source, "q", call.q, state)
            k_src, _ = substitute(self.source, "k", call.k, state)
            assert state.rerun is not None  # control sets it before the head hooks
            values = state.rerun(q=put(call.q, items, q_src), k=put(call.k, items, k_src))[0][items]
        return _patch(out, values, items, heads, rows)


class ReplaceMap(PatchHeads):
    """Replace the attention maps of the query heads ``heads`` (None: all) at the query rows ``rows`` (None: all)
    by the source run's maps, keeping this run's values: prompt-to-prompt's map injection (Hertz et al., "Prompt-to-
    Prompt Image Editing with Cross Attention Control", ICLR 2023, arXiv 2208.01626), PrimeComposer's and MAKIMA's
    steering. Since ``P_src = softmax(Q_src K_src^T)``, it runs as the call with the source's q and k (one more
    fused call), which is ``PatchHeads(source, heads, rows, field="pattern")``: see there for the sources."""

    def __init__(self, source: Source, heads: int | Sequence[int] | torch.Tensor | None = None,
                 rows: Rows = None) -> None:
        super().__init__(source, 0 if heads is None else heads, rows, field="pattern")
        self.every_head = heads is None

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        if self.every_head:
            self.heads_sel = list(range(out.shape[1]))
        return super().heads(out, lse, call, state)


class ForcePattern(Edit):
    """Force query heads to given attention probabilities: ``out[:, heads] = probs @ v`` (query head ``h`` reads
    KV head ``h // (Hq // Hkv)``), computed eagerly at those heads only, in float32 or wider.

    The probabilities are used as given: no renormalisation, and the call's pattern, key padding mask and biases
    do not apply at the forced heads (rows that do not sum to 1 scale the output). Memory: one
    ``(B, len(heads), Nq, Nk)`` tensor, the probabilities themselves.

    Args:
        heads: Query heads (an int or ints).
        probs: A tensor broadcastable to ``(B, len(heads), Nq, Nk)``, or ``fn(call) -> tensor`` (the
            ``AttendCall``, for probabilities that depend on the call's shapes or step).

    Raises:
        TypeError: Bad ``heads``; ``probs`` neither a tensor nor a callable, or not a floating tensor.
        ValueError: At the call, ``probs`` that does not broadcast, or heads out of range.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import ForcePattern, control
        >>> lm = nf.TinyLM(64, dim=32, depth=1, num_heads=2, mechanism="dense")
        >>> first = torch.zeros(10, 10)
        >>> first[:, 0] = 1.0  # every query of head 0 reads token 0 only
        >>> with control(lm, [(None, ForcePattern(0, first))]):
        ...     logits = lm(torch.randint(0, 64, (2, 10)))
        >>> logits.shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, heads: int | Sequence[int] | torch.Tensor,
                 probs: torch.Tensor | Callable[[AttendCall], torch.Tensor]) -> None:
        if not isinstance(probs, torch.Tensor) and not callable(probs):
            raise TypeError(f"probs must be a tensor or a callable fn(call), got {type(probs).__name__}")
        self.heads_sel, self.probs = _heads_list(heads), probs

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        b, hq, nq, _ = out.shape
        hkv, nk = call.v.shape[1], call.v.shape[2]
        idx = _head_index(self.heads_sel, hq, "query heads", out.device)
        p = self.probs if isinstance(self.probs, torch.Tensor) else self.probs(call)
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"probs must be a floating tensor, got {type(p).__name__} "
                            f"{getattr(p, 'dtype', '')}")
        want = (b, len(self.heads_sel), nq, nk)
        try:
            ok = torch.broadcast_shapes(p.shape, want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"probs must broadcast to (B, len(heads), Nq, Nk) = {want}, got {tuple(p.shape)}")
        ct = torch.promote_types(call.v.dtype, torch.float32)
        new = p.to(device=out.device, dtype=ct).expand(want) @ call.v[:, idx // (hq // hkv)].to(ct)
        return out.index_copy(1, idx, new.to(out.dtype))


def _pairs(pairs: Iterable[tuple[str, int]], names: dict[str, Site], what: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], int)
                and not isinstance(pair[1], bool)):
            raise TypeError(f"{what} must be (site_name, query_head) pairs, got {pair!r}")
        if pair[0] not in names:
            raise ValueError(f"{what}: no site named {pair[0]!r}; sites: {sorted(names)}")
        hq = names[pair[0]].num_heads
        if pair[1] < 0 or (hq is not None and pair[1] >= hq):
            raise ValueError(f"{what}: head {pair[1]} of site {pair[0]!r} must be in [0, {hq})")
        out.setdefault(pair[0], set()).add(pair[1])
    return out


def _record(model: nn.Module, forward: Callable[[nn.Module, Any], Any], inputs: Any, sites: list[Site],
            edits: Sequence[tuple[Site, Edit]]) -> tuple[Any, dict[str, list[dict]]]:
    with control(model, edits, sites=sites) as run:
        out = forward(model, inputs)
    return out, run.records


def path_patch(model: nn.Module, forward: Callable[[nn.Module, Any], Any] | None,
               senders: Iterable[tuple[str, int]], receivers: Iterable[tuple[str, int]], clean: Any, corrupt: Any,
               metric: Callable[[Any], T], receiver_fields: Sequence[str] = ("q", "k", "v"),
               sites: Sequence[Site] | None = None) -> T:
    """Path patching: the metric of the clean run in which the sender heads act on the receiver heads' inputs
    (and only there) as on the corrupted input.

    Three kinds of run: (1) the clean and the corrupted input, recording every site's head outputs; (2) the clean
    input with the senders' outputs taken from the corrupted record and every other head (but the receivers)
    frozen to its clean output, recording the receivers' q/k/v as their calls see them; (3) the clean input with
    only the receivers' ``receiver_fields`` taken from run (2) (q for the receiver query heads; k and v for their
    KV heads, which a GQA group shares), everything else recomputed. Each forward's steps and calls must match
    between the runs (the records are found by site, step and call); each receiver site must be called.

    Args:
        model: The model.
        forward: ``forward(model, inputs) -> output``; None: ``model(inputs)``.
        senders: ``(site_name, query_head)`` pairs (may be empty).
        receivers: ``(site_name, query_head)`` pairs, at least one, none of them a sender.
        clean: The clean inputs.
        corrupt: The corrupted inputs (same shapes, or a batch of one).
        metric: ``metric(output)`` of the last run, returned.
        receiver_fields: Which receiver inputs are patched, among ``"q"``, ``"k"``, ``"v"``.
        sites: The sites (default ``find_sites(model)``).

    Returns:
        ``metric`` of the run (3) output.

    Raises:
        TypeError: Pairs that are not ``(str, int)``.
        ValueError: Unknown site names, heads out of range, no receivers, a head both sender and receiver,
            unknown ``receiver_fields``, or a receiver site that the forward does not call.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import path_patch
        >>> lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense").eval()
        >>> clean, corrupt = torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))
        >>> with torch.no_grad():
        ...     m = path_patch(lm, None, [("blocks.0.attn", 1)], [("blocks.1.attn", 0)], clean, corrupt,
        ...                    metric=lambda logits: logits[0, -1, 3].item())
        >>> isinstance(m, float)
        True
    """
    fwd = forward if forward is not None else (lambda m, x: m(x))
    site_list = list(sites) if sites is not None else find_sites(model)
    names = {s.name: s for s in site_list}
    send, recv = _pairs(senders, names, "senders"), _pairs(receivers, names, "receivers")
    fields = tuple(receiver_fields)
    if not fields or not set(fields) <= {"q", "k", "v"} or len(set(fields)) != len(fields):
        raise ValueError(f"receiver_fields must be distinct, among ('q', 'k', 'v'), got {receiver_fields!r}")
    if not recv:
        raise ValueError("receivers: at least one (site_name, query_head) pair is needed")
    both = [(n, h) for n, hs in recv.items() for h in hs if h in send.get(n, set())]
    if both:
        raise ValueError(f"senders and receivers must differ, both: {both}")
    _, clean_rec = _record(model, fwd, clean, site_list, [(s, Capture(("head_out",))) for s in site_list])
    _, corrupt_rec = _record(model, fwd, corrupt, site_list, [(s, Capture(("head_out",))) for s in site_list])
    hq = {n: int(rec[0]["head_out"].shape[1]) for n, rec in clean_rec.items() if rec}
    for what, pairs in (("senders", send), ("receivers", recv)):
        for n, hs in pairs.items():
            if n not in hq:
                raise ValueError(f"{what}: site {n!r} is not called by the forward")
            if max(hs) >= hq[n]:
                raise ValueError(f"{what}: heads of site {n!r} must be in [0, {hq[n]}), got {sorted(hs)}")
    second: list[tuple[Site, Edit]] = []
    for s in site_list:
        if s.name not in hq:
            continue
        if s.name in recv:
            second.append((s, Capture(fields)))
        if send.get(s.name):
            second.append((s, PatchHeads(FromRecord(corrupt_rec), sorted(send[s.name]))))
        frozen = [h for h in range(hq[s.name]) if h not in send.get(s.name, set()) | recv.get(s.name, set())]
        if frozen:
            second.append((s, PatchHeads(FromRecord(clean_rec), frozen)))
    _, mid_rec = _record(model, fwd, clean, site_list, second)
    third: list[tuple[Site, Edit]] = []
    for n, hs in recv.items():
        entry = mid_rec[n][0]
        for f in fields:
            group = hq[n] // int(entry[f].shape[1]) if f != "q" else 1
            heads = sorted({h // group for h in hs})
            third.append((names[n], PatchHeads(FromRecord(mid_rec), heads, field=f)))
    out, _ = _record(model, fwd, clean, site_list, third)
    return metric(out)
