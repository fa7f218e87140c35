"""``nearfar.distributed.attend``: ``nearfar.attend`` over a sequence split across the ranks of a process group.

Each rank passes its own tokens' q, k, v (``layout`` says which global tokens those are) and gets its own tokens'
output. Fixed local patterns fetch exactly the keys their queries can reach (``plan.make_plan``): boundary keys
point to point from the neighbouring ranks (``halo``), sink and global keys by broadcast from their owner
(``gather``), then one ``attend`` call runs on the local queries and the gathered keys through the offset view
(``view.GlobalView``), so no merge is needed and the engine's own backward gives every gradient; the gradients of
fetched keys go back to their owners in the backward pass. The global queries of ``GlobalTokens`` are computed as
partials on every rank and merged on their owner (``globalq``). Dense and causal attention rotate K/V around a ring
(``ring``), as PyTorch's ``context_parallel`` does. A bias is passed as this rank's rows over the global keys and
sliced to the fetched columns; a relative-position table is read through the view (``view.TableView``); run-time
selected key blocks (global lists, replicated) add their blocks to the plan, and the local call runs on queries and
keys widened to whole blocks. A ``score_mod`` is called on the global indices (``view.global_mod``). With
``overlap`` the halo is posted, the plan's interior queries (those that read only this rank's keys) are computed,
and the rest follows the wait. Every rank must call this with the same pattern, layout and shapes (but its own
tensors), and run the backward pass through its output too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..checks import check_bool, check_choice
from ..dispatch import attend as single_attend
from ..dispatch import check_attention_inputs
from ..functional import SelectedBlocks
from ..mods import check_mod
from ..patterns import Causal, Dense, Pattern, PerHead
from ..patterns.spatial import SpatialPattern
from .blocks import blocked_attend
from .gather import broadcast_tokens
from .globalq import global_queries
from .globalq import local_index as _local_index
from .halo import start
from .layout import Layout, Ranges
from .plan import CommPlan, make_plan, rs_intersect, rs_size, rs_subtract, rs_union
from .ring import ring_attention
from .view import TableView, global_mod, global_view, local_attend


class _Tie(torch.autograd.Function):
    """Returns ``out``; its backward hands zero gradients to ``deps`` so that every communication op of this call
    runs its backward on this rank too, even when its output was not used here (the peers wait for it)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *deps: torch.Tensor) -> torch.Tensor:
        ctx.deps = [(d.shape, d.dtype, d.device) for d in deps]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (grad, *(torch.zeros(s, dtype=t, device=dv) for s, t, dv in ctx.deps))


def _index(ranges: Ranges, device: torch.device) -> torch.Tensor:
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _span(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``x[:, :, a:b]``, or ``x`` itself when that is all of it: the gradient of a slice is a zero-filled tensor of
    ``x``'s size plus a copy (and then one more add where ``x`` has other uses), measured at 32K tokens on 2 ranks as
    a tenth of the layer's forward+backward time."""
    return x if (a, b) == (0, x.shape[2]) else x[:, :, a:b]


def _rows(x: torch.Tensor, local: Ranges) -> torch.Tensor:
    """``x``'s tokens (dim 2) at the local ranges, concatenated; a view when there is one range."""
    if len(local) == 1:
        return _span(x, *local[0])
    return torch.cat([x[:, :, a:b] for a, b in local], 2) if local else x[:, :, :0]


class _TakeRows(torch.autograd.Function):
    """The tokens (dim 2) at ``segs`` of each tensor, channels side by side: ``(B, H, rows, sum of channels)``. Its
    backward writes each tensor's rows into one zero-filled gradient of that tensor, where slicing and concatenating
    made one zero-filled full-size gradient per slice and tensor (a 1D halo sends two slices: twice the memory
    traffic, measured at 32K tokens on 2 ranks)."""

    @staticmethod
    def forward(ctx: Any, segs: Ranges, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.segs, ctx.shapes = segs, [t.shape for t in tensors]
        rows = [torch.cat([t[:, :, a:b] for a, b in segs], 2) if len(segs) > 1 else _rows(t, segs) for t in tensors]
        return torch.cat(rows, -1) if len(rows) > 1 else rows[0].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        out: list[torch.Tensor | None] = [None]
        c0 = 0
        for shape, need in zip(ctx.shapes, ctx.needs_input_grad[1:]):
            c1 = c0 + shape[-1]
            if need:
                g = grad.new_zeros(shape)
                pos = 0
                for a, b in ctx.segs:
                    g[:, :, a:b] = grad[:, :, pos:pos + b - a, c0:c1]
                    pos += b - a
                out.append(g)
            else:
                out.append(None)
            c0 = c1
        return tuple(out)


class _Packed:
    """This rank's tokens that leave it (messages and broadcasts), K and V side by side in one buffer: only they
    are copied, and their gradients flow back to ``k`` and ``v`` through the packing."""

    def __init__(self, tensors: list[torch.Tensor], local: Ranges) -> None:
        self.segs = rs_union(local)
        if len(self.segs) > 1 or len(tensors) > 1:
            self.x = _TakeRows.apply(self.segs, *tensors)
        else:
            self.x = _rows(tensors[0], self.segs)

    def at(self, a: int) -> int:
        """Position in the buffer of local token ``a`` (which it holds)."""
        base = 0
        for lo, hi in self.segs:
            if lo <= a < hi:
                return base + a - lo
            base += hi - lo
        raise KeyError(a)


def _fetch(tensors: list[torch.Tensor], plan: CommPlan, layout: Layout, me: int, group: dist.ProcessGroup | None,
           what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive this rank's remote keys: the halo buffer (point to point) and the broadcast buffer, channels of
    ``tensors`` concatenated."""
    return _fetch_start(tensors, plan, layout, me, group, what)()


def _fetch_start(tensors: list[torch.Tensor], plan: CommPlan, layout: Layout, me: int,
                 group: dist.ProcessGroup | None, what: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """``_fetch`` in two steps: the halo messages are posted now; the returned function waits for them, then runs
    the broadcasts."""
    out_local = {m: tuple(r for lo, hi in m.ranges for r in layout.local(me, lo, hi))
                 for m in plan.messages if m.src == me}
    mine = [layout.local(me, b.lo, b.hi)[0] for b in plan.bcasts if b.src == me]
    pack = _Packed(tensors, tuple(r for rs in out_local.values() for r in rs) + tuple(mine))
    sends = tuple((m.dst, tuple((pack.at(a), pack.at(a) + b - a) for a, b in rs)) for m, rs in out_local.items())
    recvs = tuple((m.src, rs_size(m.ranges)) for m in plan.messages if m.dst == me)
    pending = start(pack.x, sends, recvs, group, f"{what}.halo")

    def finish() -> tuple[torch.Tensor, torch.Tensor]:
        halo = pending.finish()
        pieces = tuple((b.src, pack.at(layout.local(me, b.lo, b.hi)[0][0]) if b.src == me else -1, b.hi - b.lo)
                       for b in plan.bcasts)
        return halo, broadcast_tokens(pack.x, pieces, group, f"{what}.bcast", halo)

    return finish


def _gather_keys(x: torch.Tensor, plan: CommPlan, layout: Layout, me: int, halo: torch.Tensor,
                 bc: torch.Tensor) -> torch.Tensor:
    """This rank's keys in global order, from its own tokens ``x`` and the halo and broadcast buffers (already
    sliced to ``x``'s channels)."""
    offsets, pos = {}, 0
    for i, m in enumerate(plan.messages):
        if m.dst == me:
            for lo, hi in m.ranges:
                offsets[(i, lo)] = pos
                pos += hi - lo
    boff, pos = [], 0
    for b in plan.bcasts:
        boff.append(pos)
        pos += b.hi - b.lo
    parts = []
    for lo, hi, kind, i in plan.ranks[me].pieces:
        if kind == "own":
            parts += [_span(x, a, b) for a, b in layout.local(me, lo, hi)]
        elif kind == "p2p":
            o = offsets[(i, lo)]
            parts.append(halo[:, :, o:o + hi - lo])
        else:
            o = boff[i] + lo - plan.bcasts[i].lo
            parts.append(bc[:, :, o:o + hi - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None, *, layout: Layout,
           group: dist.ProcessGroup | None = None, scale: float | None = None, bias: torch.Tensor | None = None,
           rpb: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None, engine: str = "auto",
           return_lse: bool = False, method: str = "auto", blocks: SelectedBlocks | None = None,
           overlap: bool = False,
           score_mod: Callable | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the keys of every rank, restricted to ``pattern`` (at the global
    length ``layout.n_real``); the result equals ``nearfar.attend`` on the whole sequence, restricted to this rank.

    Args:
        q: This rank's queries ``(B, Hq, n_local, d)``, ``n_local = layout.size(rank)``, in the layout's order.
        k: This rank's keys ``(B, Hkv, n_local, d)`` (``Hq % Hkv == 0``).
        v: This rank's values ``(B, Hkv, n_local, dv)``.
        pattern: The pattern on the global sequence (None: dense).
        layout: Which global tokens each rank holds (``Layout.contiguous``, ``slabs`` or ``head_tail``); the same
            on every rank.
        group: The process group (None: the default group); its size must be ``layout.world``.
        scale: Score scale (default ``1 / sqrt(d)``).
        bias: Additive bias of this rank's query rows over every key: broadcastable to ``(B, Hq, n_local,
            layout.n_real)``, rows in local order, columns the global key indices. Each rank reads only the columns
            of the keys it fetches (no communication); its gradient covers this rank's rows. With ``blocks`` too.
            With the global queries of ``GlobalTokens`` (merged from partials), their owner sends each rank those
            rows at its own keys (``"bias.rows"``), unless the bias has no query axis (``(n_real,)``).
        rpb: Relative-position-bias table of a ``Neighborhood``, ``Blocks`` or ``Grid`` pattern (as in
            ``nearfar.attend``), the same on every rank; each rank's gradient holds its queries' part (sum it over
            the ranks, as data parallelism sums parameter gradients). Pass ``bias`` or ``rpb``, not both.
        key_padding_mask: This rank's keys' mask ``(B, n_local)``, True = keep.
        engine: The local engine (as in ``nearfar.attend``).
        return_lse: Also return the (detached) LSE ``(B, Hq, n_local)``.
        method: ``"auto"`` (ring for dense and causal, gather otherwise), ``"gather"`` or ``"ring"`` (dense and
            causal only). With ``bias``, ``rpb``, ``blocks`` or ``score_mod``, ``"auto"`` gathers.
        blocks: Key blocks chosen at run time (``nearfar.SelectedBlocks``) for the **global** query blocks, indexed
            in global query and key blocks: the same tensors on every rank (replicated, e.g. routed from replicated
            pooled keys, or all-gathered by the caller). Each rank fetches the selected blocks of its own query
            blocks beside the pattern's reach. Not with ``rpb`` (as on one process).
        overlap: Post the halo messages, then compute the queries that read only this rank's keys (the plan's
            ``interior``) while they are in flight, then the rest on the gathered keys (two local calls instead of
            one; the same result). Not with ``blocks``; the backward pass is not overlapped.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``, as in ``nearfar.attend``; it sees the
            **global** query and key indices (and the batch and head indices as given). Every rank holds the
            function and the tensors it captures; their gradients are each rank's part (sum them over the ranks,
            as for ``rpb``). Runs the gather method (``"auto"`` does not take the ring).

    Returns:
        The output ``(B, Hq, n_local, dv)`` (0 on padding tokens), and the LSE with ``return_lse``.

    Raises:
        TypeError: If an argument has the wrong type (``score_mod`` not a callable of five arguments).
        ValueError: If shapes disagree with the layout or each other, the group's size differs from the layout's,
            the pattern does not fit ``layout.n_real``, ``method`` is unknown, ``bias``/``rpb`` do not fit, or
            ``bias``, ``rpb``, ``blocks`` or ``score_mod`` come with ``method="ring"``, or ``rpb`` with ``blocks``.
        nearfar.distributed.DistributedAttentionError: If a peer fails or the group's timeout passes mid-call.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a nearfar.distributed.Layout, got {type(layout).__name__}")
    check_choice(method, "method", ("auto", "gather", "ring"))
    check_bool(overlap, "overlap")
    if layout.world == 1 and layout.n_real == layout.n:
        return single_attend(q, k, v, pattern, scale=scale, bias=bias, rpb=rpb, key_padding_mask=key_padding_mask,
                             engine=engine, return_lse=return_lse, blocks=blocks, score_mod=score_mod)
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if world != layout.world:
        raise ValueError(f"the layout splits the tokens over {layout.world} ranks but the group has {world}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != layout.size(me):
            raise ValueError(f"{name} must be 4D with layout.size({me}) = {layout.size(me)} tokens on dim 2, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a nearfar Pattern or None, got {type(pattern).__name__}")
        if layout.n_real:
            pattern.check(layout.n_real, layout.n_real)
    if isinstance(pattern, Dense):
        pattern = None
    if isinstance(pattern, PerHead) and pattern.heads != q.shape[1]:
        raise ValueError(f"PerHead has {pattern.heads} patterns but q has Hq={q.shape[1]} heads")
    if q.shape[2]:  # the local shapes, dtypes, heads, mask and scale through attend's own checks
        check_attention_inputs(q, k, v, scale, key_padding_mask)
    elif key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], 0):
        raise ValueError(f"key_padding_mask must have shape (B, 0) on a rank with no tokens, "
                         f"got {tuple(key_padding_mask.shape)}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    extras = _check_extras(q, k, pattern, layout, me, bias, rpb, blocks)
    if score_mod is not None:
        check_mod(score_mod, "score_mod", "score_mod")
        extras = True
    ring = method == "ring" or (method == "auto" and not extras and (pattern is None or isinstance(pattern, Causal)))
    if ring:
        if extras:
            raise ValueError("method='ring' runs without bias, rpb, blocks or score_mod; use method='gather'")
        if pattern is not None and not isinstance(pattern, Causal):
            raise ValueError(f"method='ring' runs dense or Causal() attention, got {pattern!r}")
        out, lse = ring_attention(q, k, v, layout, causal=pattern is not None, scale=scale,
                                  key_padding_mask=key_padding_mask, group=group, engine=engine)
        return (out, lse) if return_lse else out
    return _gathered(q, k, v, pattern, layout, group, scale, key_padding_mask, engine, return_lse, me,
                     bias, rpb, blocks, overlap, score_mod)


def _check_extras(q: torch.Tensor, k: torch.Tensor, pattern: Pattern | None, layout: Layout, me: int,
                  bias: torch.Tensor | None, rpb: torch.Tensor | None, blocks: SelectedBlocks | None) -> bool:
    """Check ``bias``, ``rpb`` and ``blocks`` against the global shapes; True if any is given."""
    if bias is not None and rpb is not None:
        raise ValueError("pass either bias or rpb, not both")
    hq, n_local, n = q.shape[1], q.shape[2], layout.n_real
    hkv = k.shape[1]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}")
        target = (q.shape[0], hq, n_local, n)
        if bias.dim() > 4 or not all(s in (1, t) for s, t in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"bias of shape {tuple(bias.shape)} must be broadcastable to (B, Hq, n_local, "
                             f"layout.n_real) = {target}: this rank's query rows over the global keys")
    if rpb is not None:
        if not isinstance(pattern, SpatialPattern) or pattern.rpb_size() is None:
            raise ValueError("rpb (a relative-position-bias table) needs a Neighborhood, Blocks or Grid pattern that "
                             f"takes one, got pattern {pattern!r}")
        if not isinstance(rpb, torch.Tensor) or tuple(rpb.shape) != pattern.rpb_shape(hq):
            raise ValueError(f"rpb must have shape {pattern.rpb_shape(hq)} for {pattern!r} and Hq={hq}, "
                             f"got {tuple(getattr(rpb, 'shape', ()))}")
        pattern.check_rpb()
    if blocks is not None:
        if not isinstance(blocks, SelectedBlocks):
            raise TypeError(f"blocks must be a nearfar.SelectedBlocks, got {type(blocks).__name__}")
        if rpb is not None:  # as on one process
            raise ValueError("rpb (a relative-position table) does not combine with blocks; pass its values as bias=")
        blocks.check(q.shape[0], hq, hkv, n, n, q.device)
    return bias is not None or rpb is not None or blocks is not None


def _bias4(bias: torch.Tensor | None, rows: Ranges) -> torch.Tensor | None:
    """``bias`` as 4D, cut to the local query ``rows`` (unless shared by every row)."""
    if bias is None:
        return None
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return _rows(b4, rows) if b4.shape[2] > 1 else b4


def _local_call(q, k, v, pattern, bias, rpb, rows, queries, keys, n, scale, kpm, engine, return_lse,
                score_mod=None):
    """One local ``attend`` of this rank's query rows ``rows`` (local; ``queries`` global) over the keys ``keys``
    (global, in ``k`` and ``v``): the pattern through the offset view, ``bias``'s rows and the columns of those keys,
    or the table through the view's index (tile by tile, as on one process); ``score_mod`` on global indices."""
    if rpb is not None:
        view: Pattern | None = TableView(pattern, queries, keys, n)
    else:
        view = global_view(pattern, queries, keys, n) if pattern is not None else None
    b4 = _bias4(bias, rows)
    if b4 is not None and b4.shape[3] > 1:
        b4 = b4.index_select(3, _index(keys, q.device))
    mod = global_mod(score_mod, queries, keys, n) if score_mod is not None else None
    return local_attend(_rows(q, rows), k, v, view, scale, kpm, engine, return_lse, b4, None, rpb, mod)


def _gathered(q, k, v, pattern, layout, group, scale, kpm, engine, return_lse, me, bias=None, rpb=None,
              blocks=None, overlap=False, score_mod=None):
    plan = make_plan(pattern, layout, blocks)
    n, rp, d = plan.n, plan.ranks[me], k.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, n_local, _ = q.shape
    kpm_ext = None
    if kpm is not None:  # the mask travels with its keys (no gradient)
        m = kpm.to(torch.uint8)[:, None, :, None]
        with torch.no_grad():
            mh, mb = _fetch([m], plan, layout, me, group, "mask")
        kpm_ext = _gather_keys(m, plan, layout, me, mh, mb)[:, 0, :, 0].bool() if rp.keys else None
    finish = _fetch_start([k, v], plan, layout, me, group, "kv")
    parts = []  # (global query ranges, output, lse) of each local call
    inner = rp.interior if overlap and blocks is None and any(m.dst == me for m in plan.messages) else ()
    if inner:  # the queries that read only this rank's keys run while the halo is in flight
        own = rs_intersect(rs_union(layout.ranges[me]), ((0, n),))
        irows = tuple(r for lo, hi in inner for r in layout.local(me, lo, hi))
        krows = tuple(r for lo, hi in own for r in layout.local(me, lo, hi))
        kpm_own = kpm.index_select(1, _local_index(layout, me, own, q.device)) if kpm is not None else None
        parts.append((inner, *_local_call(q, _rows(k, krows), _rows(v, krows), pattern, bias, rpb, irows, inner, own,
                                          n, scale, kpm_own, engine, return_lse, score_mod)))
    halo, bc = finish()
    deps = [halo, bc]
    outer = rs_subtract(rp.queries, inner)
    if outer and rp.keys:
        rows = tuple(r for lo, hi in outer for r in layout.local(me, lo, hi))
        kx = _gather_keys(k, plan, layout, me, halo[..., :d], bc[..., :d])
        vx = _gather_keys(v, plan, layout, me, halo[..., d:], bc[..., d:])
        if blocks is not None:
            o, l_ = blocked_attend(_rows(q, rows), kx, vx, kpm_ext, pattern, blocks, outer, rp.keys, n, scale, engine,
                                   return_lse, _bias4(bias, rows), score_mod)
        else:
            o, l_ = _local_call(q, kx, vx, pattern, bias, rpb, rows, outer, rp.keys, n, scale, kpm_ext, engine,
                                return_lse, score_mod)
        parts.append((outer, o, l_))
    out: torch.Tensor | None = None
    lse = torch.full((b, hq, n_local), -torch.inf, dtype=acc, device=q.device)
    whole = len(parts) == 1 and rs_union(tuple(r for lo, hi in parts[0][0] for r in layout.local(me, lo, hi))) \
        == ((0, n_local),)
    if whole:  # every local row in one call: the output as it is
        out, l_ = parts[0][1], parts[0][2]
        lse = l_.to(acc) if l_ is not None else lse
    elif parts:
        out = q.new_zeros(b, hq, n_local, v.shape[-1])
        for qs, o, l_ in parts:
            idx = _local_index(layout, me, qs, q.device)
            out = out.index_copy(2, idx, o)
            lse = lse.index_copy(2, idx, l_.to(acc)) if l_ is not None else lse
    if out is None:
        out = q.new_zeros(b, hq, n_local, v.shape[-1])
    if plan.global_rows:
        o_g, l_g, more = global_queries(q, k, v, kpm, pattern, plan, layout, me, group, scale, acc, bc, bias, blocks,
                                        score_mod)
        deps += list(more)
        if o_g is not None and l_g is not None:
            mine = tuple((x.lo, x.hi) for x in plan.q_bcasts if x.src == me)
            gidx = _local_index(layout, me, mine, q.device)
            out = out.index_copy(2, gidx, o_g.to(q.dtype))
            lse = lse.index_copy(2, gidx, l_g.detach())
    if any(t.requires_grad for t in deps):
        out = _Tie.apply(out, *deps)
    return (out, lse) if return_lse else out
