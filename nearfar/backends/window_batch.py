"""Whole windows as a batch (``WindowBatch``): the official window codes' "partition the input, project, attend per
window, merge", for modules that cut their input (not q, k and v) into windows. ``split`` and ``merge`` reorder
a map into its windows and back (one permute copy, or one token gather for shifted windows); ``attend`` runs the
windows' attention on the window kernel (``nearfar.backends.windows``), SDPA or ``attend``, and can put the
heads and the windows back in place in one copy or add them into a map in place.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..guard import output_finite, values_sane
from ..patterns import Pattern
from ..patterns.spatial import SpatialPattern
from ..plan import get_plan
from .native import dense_windows
from .partition import Recipe, Windows, restore, windows
from .windows import heads_batched, roles_of, takes, window_kernel


class WindowBatch:
    """The windows of a window pattern as a batch, for modules that partition their *input* (before the
    projections, as the official window codes do) instead of q, k and v: ``split`` (B, *grid, C) -> (B*nW, T, C),
    ``merge`` back, and ``bias`` for what ``attend`` must add inside the windows (a relative-position table shared
    by all windows, and Swin's region mask). Only for patterns whose windows are whole (``Blocks``/``Grid`` on
    divisible extents, shifted or cyclic): ``WindowBatch.of`` returns None otherwise, and the module uses
    ``attend(..., pattern)``.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.functional import WindowBatch
        >>> wb = WindowBatch.of(nf.Blocks(7, grid=(14, 14)), (14, 14))
        >>> x = torch.randn(2, 14, 14, 32)
        >>> windows = wb.split(x)        # 2 images x 4 windows of 7x7 tokens
        >>> windows.shape
        torch.Size([8, 49, 32])
        >>> torch.equal(wb.merge(windows, 2), x)
        True
        >>> WindowBatch.of(nf.Blocks(7, grid=(15, 15)), (15, 15)) is None   # partial windows
        True
    """

    def __init__(self, win: Windows, pattern: Pattern, n: int, device: torch.device | None = None):
        self.win, self.pattern, self.n = win, pattern, n
        self.t = win.order.shape[1]
        self._index: torch.Tensor | None = None
        self.device = device or win.order.device  # where ``bias`` puts the region mask

    @staticmethod
    def of(pattern: Pattern, spatial: tuple[int, ...],
           device: torch.device | str | None = None) -> WindowBatch | None:
        """The window batch of ``pattern`` on a map of size ``spatial``, or None when its windows are not whole.

        Args:
            pattern: A window pattern (``Blocks``/``Grid``, shifted or cyclic, possibly intersected with others).
            spatial: The map's spatial shape, e.g. ``(H, W)``.
            device: Where the region mask of ``bias`` lives (default: the CPU).

        Returns:
            A ``WindowBatch`` (cached per pattern, size and device), or None: then run ``attend(..., pattern)`` on the
            whole map.
        """
        return _window_batch(pattern, tuple(spatial), torch.device(device or "cpu"))

    @property
    def _win_recipe(self) -> Recipe:
        assert self.win.recipe is not None  # a WindowBatch is made only for windows with a recipe
        return self.win.recipe

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """Cut a channel-last map into its windows (rolled first for shifted windows).

        Args:
            x: A map ``(B, *spatial, C)`` of the size given to ``of``, or ``(B, *spatial, *channels)`` (e.g. one
                head group's ``(3, C')`` slice of a fused projection, any strides): the channels are flattened.

        Returns:
            ``(B * nW, T, C)``: ``nW`` windows of ``T = self.t`` tokens per image, image-major.
        """
        grid, shifts = self._win_recipe[:2]
        nd = len(grid)
        rest = x.shape[1 + nd:]
        if any(shifts):  # one gather instead of a roll and a permute copy
            flat = x.flatten(1, nd) if nd > 1 else x
            return _TokenGather.apply(flat, self.win.src, self.win.inv).view(-1, self.t, math.prod(rest))
        # one permute copy, straight from a strided slice (a view splits the spatial axes whatever the strides)
        return self._window_view(x).reshape(-1, self.t, math.prod(rest))

    def _window_view(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *spatial, *rest)`` viewed as ``(B, *windows, *slots, *rest)`` (unshifted windows; no copy)."""
        grid, _, shape, perm = self._win_recipe
        nd = len(grid)
        rest = x.shape[1 + nd:]
        tail = tuple(range(1 + 2 * nd, 1 + 2 * nd + len(rest)))
        return x.reshape(x.shape[0], *shape, *rest).permute(0, *(1 + p for p in perm), *tail)

    def split_heads(self, x: torch.Tensor, order: str, num_heads: int) -> torch.Tensor:
        """Cut a fused projection map into its windows head-major, in one copy: what ``split`` and then the window
        kernel's head-major reorder do in two.

        Args:
            x: A map ``(B, *spatial, *channels)`` of the size given to ``of`` whose channels hold q, k and v as
                ``order`` says (``"3hd"``: ``[3, heads, d]``; ``"h3d"``: ``[heads, 3, d]``), any strides.
            order: ``"3hd"`` or ``"h3d"``.
            num_heads: Number of heads.

        Returns:
            ``(3, heads, B * nW, T, d)``, contiguous: q, k, v of every head, windows image-major.
        """
        grid, shifts, _, _ = self._win_recipe
        b, nd = x.shape[0], len(grid)
        d = math.prod(x.shape[1 + nd:]) // (3 * num_heads)
        split = (3, num_heads, d) if order == "3hd" else (num_heads, 3, d)
        role, head = (0, 1) if order == "3hd" else (1, 0)
        if any(shifts):  # one token gather from the head-major view of the map
            heads = x.reshape(b, -1, *split).permute(2 + role, 2 + head, 0, 1, 4)  # (3, heads, B, N, d)
            out = _TokenGather.apply(heads, self.win.src, self.win.inv, 3)
        else:
            win = self._window_view(x.reshape(b, *grid, *split))  # (B, *windows, *slots, *split)
            tail = 1 + 2 * nd
            out = win.permute(tail + role, tail + head, *range(tail), tail + 2)
        return out.contiguous().view(3, num_heads, -1, self.t, d)  # the permute's one copy (the gather's: none)

    def merge(self, y: torch.Tensor, b: int, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Put the windows back in place: the inverse of ``split``.

        Args:
            y: Per-window tokens ``(B * nW, T, C')``.
            b: The batch size ``B``.
            add_to: A map ``(B, *spatial, C')`` (any strides, e.g. a channel slice of a larger map) that the windows
                are added to in place instead of being returned as a new map: unshifted windows are added straight
                from their window order, with no copy (a residual or a sum of branches costs no extra pass).

        Returns:
            The map ``(B, *spatial, C')``: a new one, or ``add_to`` after the in-place add.
        """
        grid, shifts, shape, perm = self._win_recipe
        if add_to is not None and not any(shifts):
            nd, e = len(grid), y.shape[-1]
            back = [0] * (2 * nd)
            for i, p in enumerate(perm):
                back[p] = i
            win = y.view(b, *(shape[p] for p in perm), e).permute(0, *(1 + i for i in back), 1 + 2 * nd)
            add_to.view(b, *shape, e).add_(win)
            return add_to
        if any(shifts):
            flat = y.reshape(b, -1, y.shape[-1])
            out = _TokenGather.apply(flat, self.win.inv, self.win.src).view(b, *grid, -1)
        else:
            out = restore(y.reshape(b, -1, self.t, y.shape[-1]), self._win_recipe, b, 1).reshape(b, *grid, -1)
        return out if add_to is None else add_to.add_(out)

    def attend(self, qkv: torch.Tensor | tuple[torch.Tensor, ...], num_heads: int, scale: float,
               table: torch.Tensor | None = None, order: str = "3hd", merge: bool = False,
               add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Attention inside the windows, of projections computed on ``split``'s output.

        The window kernel (``nearfar.backends.windows``) reads every head of q, k and v in place from the
        projection output and adds the table and the region mask inside its score GEMM (CPU, float32/64, where
        ``windows.takes`` says it is faster); otherwise, without a region mask, SDPA's fused kernel reads the same
        strided views (with the table as a broadcast mask; larger windows without a table, the compiled sparse
        kernel, ``native.dense_windows``), and anything else goes through ``attend`` with
        ``bias``. Where the region mask excludes pairs, values are checked as ``attend`` checks them (training: the
        inputs; inference: the output); when one is non-finite or could overflow, the windows go through ``attend``
        with the pattern on the whole map, whose guard keeps it away from every query the mask excludes it from,
        forward and backward.

        Args:
            qkv: The fused projection ``(B * nW, T, 3C')`` (channels split as ``order`` says), or ``(q, k, v)``,
                each ``(B * nW, T, C')``; q may be ``(B, T, C')``, one set of queries shared by the windows of each
                image (GC ViT's global queries).
            num_heads: Number of heads (``C'`` is a multiple of it).
            scale: Score scale.
            table: A relative-position table ``(heads, 2m-1, ...)`` as ``attend`` takes it with the pattern, or None.
            order: Channel order of a fused ``qkv``: ``"3hd"`` (``[3, heads, d]``, default) or ``"h3d"``
                (``[heads, 3, d]``, timm's "rw" MaxViT).
            merge: Return the map ``(B, *spatial, C')`` (``merge(attend(...))``, with the heads interleaved and the
                windows put back in place by one copy).
            add_to: A map ``(B, *spatial, C')`` to add the output into, in place (``merge(attend(...), add_to=...)``
                with no copy for unshifted windows).

        Returns:
            ``(B * nW, T, C')``, every window's output with its heads in order; with ``merge`` the map; with
            ``add_to`` that map after the add.
        """
        srcs = (qkv,) if isinstance(qkv, torch.Tensor) else tuple(qkv)
        if len(srcs) == 3:
            order = "sep"
        assert len(srcs) == 1 and order in ("3hd", "h3d") or len(srcs) == 3
        bw = srcs[-1].shape[0]
        c = srcs[-1].shape[-1] // (3 if len(srcs) == 1 else 1)
        batch = bw // self.win.order.shape[0]
        heads = self._heads(srcs, order, num_heads, c // num_heads, scale, table, batch)  # (heads, B * nW, T, d)
        return self._place(heads, batch, merge, add_to)

    def attend_map(self, x: torch.Tensor, num_heads: int, scale: float, table: torch.Tensor | None = None,
                   order: str = "3hd", merge: bool = False, add_to: torch.Tensor | None = None) -> torch.Tensor:
        """``attend(split(x), ...)`` for a fused projection computed on the whole map (e.g. shared with a branch that
        needs it unpartitioned): where the window kernel runs every head at once (several threads, whole windows
        without a region mask), the windows are cut straight into its head-major layout (``split_heads``: one copy
        of q, k and v instead of two); elsewhere exactly ``attend(split(x), ...)``.

        Args:
            x: The map ``(B, *spatial, *channels)``, channels ``[3, heads, d]`` (``"3hd"``) or ``[heads, 3, d]``.
            num_heads: Number of heads.
            scale: Score scale.
            table: A relative-position table as ``attend`` takes it, or None.
            order: ``"3hd"`` (default) or ``"h3d"``.
            merge: Return the map, as ``attend``.
            add_to: A map to add the output into in place, as ``attend``.

        Returns:
            As ``attend``.
        """
        from ..calls import forced_engine, intercepted

        batch, nd = x.shape[0], len(self._win_recipe[0])
        d = math.prod(x.shape[1 + nd:]) // (3 * num_heads)
        bw = batch * self.win.order.shape[0]
        trains = torch.is_grad_enabled() and (x.requires_grad or (table is not None and table.requires_grad))
        if (order not in ("3hd", "h3d") or self.win.mask is not None or forced_engine() is not None or intercepted()
                or not takes(x, self.t, table is not None, False, trains)
                or not heads_batched(bw, self.t, num_heads, x.element_size())):
            return self.attend(self.split(x), num_heads, scale, table, order, merge, add_to)
        with self._listed(batch, num_heads, d):
            add = self._additive(table, x.dtype, x.device)
            heads = window_kernel((self.split_heads(x, order, num_heads),), None, num_heads, d, scale, add)
        return self._place(heads, batch, merge, add_to)

    def _place(self, heads: torch.Tensor, batch: int, merge: bool, add_to: torch.Tensor | None) -> torch.Tensor:
        """Every head's output ``(heads, B * nW, T, d)`` as ``attend`` returns it: per window, or merged into a map
        (new, or added into ``add_to``)."""
        num_heads, bw, _, d = heads.shape
        c = num_heads * d
        grid, shifts, shape, perm = self._win_recipe
        if (merge or add_to is not None) and not any(shifts):
            # heads interleaved and windows put back in place by one permute: (h, B, windows..., slots..., d)
            nd = len(grid)
            back = [0] * (2 * nd)
            for i, p in enumerate(perm):
                back[p] = i
            win = heads.view(num_heads, batch, *(shape[p] for p in perm), d)
            win = win.permute(1, *(2 + i for i in back), 0, 2 + 2 * nd)  # (B, *shape, h, d)
            if add_to is None:
                return win.reshape(batch, *grid, c)
            add_to.view(batch, *shape, num_heads, d).add_(win)
            return add_to
        out = heads.permute(1, 2, 0, 3).reshape(bw, -1, c)
        return self.merge(out, batch, add_to) if merge or add_to is not None else out

    def _heads(self, srcs: tuple[torch.Tensor, ...], order: str, num_heads: int, d: int, scale: float,
               table: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``attend``'s engine choice and guard: every head's output ``(heads, B * nW, T, d)``.

        Seen from outside as ``attend(q, k, v, self.pattern, rpb=table)`` on the whole map: that is the call
        ``observe_calls`` lists (whichever path runs), and inside ``engine_override`` that call runs, on the forced
        engine, instead of the window kernel (so that the bench's gate compares this kernel with another engine)."""
        from ..calls import forced_engine, intercepted

        if forced_engine() is not None or intercepted():  # an interceptor (nearfar.steer) sees attend calls only
            return self._exact(srcs, order, num_heads, d, scale, table, batch)  # attend lists it and takes the engine
        with self._listed(batch, num_heads, d):
            return self._windows(srcs, order, num_heads, d, scale, table, batch)

    @contextlib.contextmanager
    def _listed(self, batch: int, num_heads: int, d: int) -> Iterator[None]:
        """Lists the windows' attention as one ``attend`` call on the whole map (``observe_calls``); what runs
        inside is not listed again."""
        from ..calls import record_call, unobserved

        whole = (batch, num_heads, self.n, d)
        record_call(self.pattern, whole, whole, whole)
        with unobserved():
            yield

    def _windows(self, srcs: tuple[torch.Tensor, ...], order: str, num_heads: int, d: int, scale: float,
                 table: torch.Tensor | None, batch: int) -> torch.Tensor:
        """``_heads`` on the window kernel, SDPA, or ``attend`` over the windows (unlisted)."""
        bw, t = srcs[-1].shape[0], srcs[-1].shape[1]
        add = self._additive(table, srcs[-1].dtype, srcs[-1].device)
        masked = self.win.mask is not None
        trains = torch.is_grad_enabled() and any(x.requires_grad for x in (*srcs, add) if x is not None)
        if masked and trains and not values_sane(srcs, d, scale):
            return self._exact(srcs, order, num_heads, d, scale, table, batch)
        if takes(srcs[-1], t, add is not None, masked, trains):
            srcs = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in srcs)
            out = window_kernel(srcs, roles_of(order, num_heads, d), num_heads, d, scale, add)
            if masked and not trains and not _finite(out):
                return self._exact(srcs, order, num_heads, d, scale, table, batch)
            return out
        srcs = tuple(_per_window(x, bw) for x in srcs)
        q, k, v = _head_views(srcs, order, num_heads, d)
        if not masked and (add is None or not add.requires_grad):
            # no pair masked: the fused kernel reads the strided heads as they lie (the table as a broadcast mask)
            fast = dense_windows(q, k, v, scale) if add is None else None  # larger windows: the compiled kernel
            if fast is not None:
                return fast.transpose(0, 1)
            mask = None if add is None else add.transpose(0, 1)  # (1, heads, T, T)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
        from ..dispatch import attend

        out = attend(q, k, v, scale=scale, bias=self.bias(table, batch))
        if masked and not trains and not _finite(out):
            return self._exact(srcs, order, num_heads, d, scale, table, batch)
        return out.transpose(0, 1)

    def _exact(self, srcs: tuple[torch.Tensor, ...], order: str, heads: int, d: int, scale: float,
               table: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The windows' attention through ``attend`` with the pattern on the whole map, whose guard keeps a
        non-finite or overflowing value away from every query the region mask excludes it from (only taken when
        such a value is there)."""
        from ..dispatch import attend

        maps = [self.merge(_per_window(x, srcs[-1].shape[0]), batch) for x in srcs]
        q, k, v = (x.reshape(batch, -1, heads, d).transpose(1, 2) for x in _head_views_map(maps, order, heads, d))
        out = attend(q, k, v, self.pattern, scale=scale, rpb=table)
        out = self.split(out.transpose(1, 2).reshape(batch, *self._win_recipe[0], heads * d))
        return out.view(out.shape[0], out.shape[1], heads, d).permute(2, 0, 1, 3)

    def _table_index(self, device: torch.device) -> torch.Tensor:
        if self._index is None:
            first = self.win.order[0].to(device)
            assert isinstance(self.pattern, SpatialPattern)  # only spatial patterns take a table
            self._index = self.pattern.rpb_index(first[:, None], first[None, :], self.n)
        return self._index.to(device)

    def _additive(self, table: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
        """``(heads or 1, nW or 1, T, T)``: the table's bias (through autograd) plus the region mask (-inf on
        masked pairs; kept per dtype and device, not rebuilt per call), or None when there is neither."""
        mask = None
        if self.win.mask is not None:
            key = ("mask", dtype, str(device))
            mask = self.win.memo.get(key)
            if mask is None:
                mask = self.win.memo[key] = self.win.mask.to(device=device, dtype=dtype)[None]
        if table is None:
            return mask
        bias = table.reshape(table.shape[0], -1)[:, self._table_index(table.device)].to(dtype)[:, None]
        return bias if mask is None else bias + mask

    def bias(self, table: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The additive bias of the split windows: ``(1, heads, T, T)`` from a table ``attend`` would take with
        the pattern (the same in every whole window: for Swin's shifted windows on the pairs the region mask
        allows), plus the region mask, which differs per window: then ``(batch * nW, heads or 1, T, T)``.

        Args:
            table: A relative-position table ``(heads, 2m-1, ...)`` as ``attend`` takes it with the pattern, or None.
            batch: The batch size ``B`` (the region mask is repeated per image).

        Returns:
            None (no table, whole unshifted windows), ``(1, heads, T, T)`` (a table only), or ``(batch * nW, heads
            or 1, T, T)`` when a region mask (-inf on masked pairs) is added.
        """
        out = None
        if table is not None:
            out = table.reshape(table.shape[0], -1)[:, self._table_index(table.device)][None]
        if self.win.mask is None:
            return out
        mask = self.win.mask[:, None].to(self.device)  # (nW, 1, T, T)
        mask = mask if out is None else mask.to(out.dtype) + out
        return mask.expand(batch, *mask.shape).reshape(batch * mask.shape[0], *mask.shape[1:])


class _TokenGather(torch.autograd.Function):
    """``x.index_select(dim, index)`` for a permutation ``index`` of the tokens (dim 1 by default), whose backward
    gathers with the inverse permutation (``index_select``'s own backward zero-fills and scatter-adds)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, dim: int = 1) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.dim = dim
        return x.index_select(dim, index.to(x.device))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return g.index_select(ctx.dim, inverse.to(g.device)), None, None, None


def _finite(out: torch.Tensor) -> bool:
    """The inference check of a region-masked output (``attend``'s): skipped on meta tensors and under
    ``torch.compile``, where it would read data."""
    return out.device.type == "meta" or torch.compiler.is_compiling() or output_finite(out)


def _per_window(x: torch.Tensor, bw: int) -> torch.Tensor:
    """A source with one entry per image ``(B, T, ...)`` repeated for each of its windows ``(B * nW, T, ...)``."""
    if x.shape[0] == bw:
        return x
    return x[:, None].expand(x.shape[0], bw // x.shape[0], *x.shape[1:]).reshape(bw, *x.shape[1:])


def _head_views_map(maps: list[torch.Tensor], order: str, heads: int,
                    d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, *spatial, heads * d)`` of projection maps laid out as ``order`` says."""
    if order == "sep":
        q, k, v = maps
        return q, k, v
    split = (3, heads, d) if order == "3hd" else (heads, 3, d)
    t = maps[0].unflatten(-1, split)
    q, k, v = t.unbind(-3) if order == "3hd" else t.unbind(-2)
    return q.flatten(-2), k.flatten(-2), v.flatten(-2)


def _head_views(srcs: tuple[torch.Tensor, ...], order: str, heads: int,
                d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``(B * nW, heads, T, d)`` views of the projections (see ``WindowBatch.attend``)."""
    if order == "sep":
        q, k, v = (x.unflatten(-1, (heads, d)).transpose(1, 2) for x in srcs)
    elif order == "3hd":
        q, k, v = srcs[0].unflatten(-1, (3, heads, d)).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = srcs[0].unflatten(-1, (heads, 3, d)).permute(3, 0, 2, 1, 4).unbind(0)
    return q, k, v


@torch.compiler.disable
def _window_batch(pattern: Pattern, spatial: tuple[int, ...], device: torch.device) -> WindowBatch | None:
    n = math.prod(spatial)
    # meta tensors (shape inference): the plan is data-independent, so it is made on the CPU
    meta = device.type == "meta"
    plan = get_plan(pattern, n, n, device="cpu" if meta else device)
    if not plan.partition:
        return None
    win = windows(plan)
    if win.recipe is None:
        return None
    if meta:
        return WindowBatch(win, pattern, n, device)
    wb = plan.engine_cache.get("window_batch")
    if wb is None:
        wb = plan.engine_cache.put("window_batch", WindowBatch(win, pattern, n), win.order.shape[1] ** 2 * 8)
    return wb
