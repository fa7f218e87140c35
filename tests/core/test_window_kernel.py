"""Whole windows attended as a batch (``WindowBatch.split`` / ``attend`` / ``merge``, ``window_attention``): the window
kernel (q, k, v read in place from the projection output, the bias and region mask filled into the score buffer),
the SDPA path for windows without bias or mask, and ``fused_linear``, against float64 references built without the
library (``tests/reference.py``: Swin's region mask, cyclic and grid windows, the window bias table), forward and
backward, in chunks of every size, on non-contiguous inputs; masked keys holding garbage never reach a query."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import nearfar
import nearfar.backends.window_batch as window_batch
import nearfar.backends.windows as windows
from nearfar import Blocks, Grid
from nearfar.bench.speed_gate import gate_layer
from nearfar.functional import WindowBatch, engine_override, fused_linear, observe_calls, window_attention

KINDS = ["block", "swin", "cyclic", "grid"]


def _pattern(kind, size, grid, shift):
    if kind == "grid":
        return Grid(size, grid=grid), ref.grid_mask(grid, size)
    if kind == "block":
        return Blocks(size, grid=grid), ref.cyclic_blocks_mask(grid, size)
    if kind == "cyclic":
        return Blocks(size, grid=grid, shift=shift, wrap=True), ref.cyclic_blocks_mask(grid, size, shift)
    return Blocks(size, grid=grid, shift=shift), ref.swin_mask(grid, size, shift)


def _heads(p, order, heads, d):
    """(B, *spatial, channels) projections -> q, k, v (B, heads, N, d), as ``order`` lays the channels out."""
    if order == "sep":
        return [t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in p]
    split = (3, heads, d) if order == "3hd" else (heads, 3, d)
    t = p.reshape(p.shape[0], -1, *split)
    t = t.permute(2, 0, 3, 1, 4) if order == "3hd" else t.permute(3, 0, 2, 1, 4)
    return list(t)


class _Chunk:
    """Run the window kernel in chunks of about ``n`` windows' scores per head (several chunks, a partial last one),
    whatever the thread count."""

    def __init__(self, n, t):
        self.bytes, self.old = n * t * t * 4, (windows.CHUNK_BYTES, windows.CHUNK_BYTES_SERIAL)

    def __enter__(self):
        windows.CHUNK_BYTES = windows.CHUNK_BYTES_SERIAL = self.bytes

    def __exit__(self, *exc):
        windows.CHUNK_BYTES, windows.CHUNK_BYTES_SERIAL = self.old


class _Batched:
    """Run every head through each step of the window kernel together (one copy to a head-major layout, then one
    GEMM per step: what several threads get when every window fits one chunk), or one head at a time, whatever the
    thread count."""

    def __init__(self, on):
        self.on, self.old = on, windows.HEADS_BATCHED_THREADS

    def __enter__(self):
        windows.HEADS_BATCHED_THREADS = 1 if self.on else 10**9

    def __exit__(self, *exc):
        windows.HEADS_BATCHED_THREADS = self.old


class _Spy:
    def __init__(self):
        self.calls, self.real = 0, window_batch.window_kernel

    def __enter__(self):
        def spy(*args, **kw):
            self.calls += 1
            return self.real(*args, **kw)
        window_batch.window_kernel = spy
        return self

    def __exit__(self, *exc):
        window_batch.window_kernel = self.real


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), size=st.sampled_from([(2, 3), (3, 3), (4, 2)]),
       mult=st.sampled_from([(1, 2), (2, 2), (3, 1)]), shift=st.tuples(st.integers(1, 3), st.integers(0, 3)),
       heads=st.integers(1, 3), d=st.sampled_from([2, 5]), order=st.sampled_from(["3hd", "h3d", "sep"]),
       with_table=st.booleans(), b=st.integers(1, 3), transposed=st.booleans(), chunk=st.integers(1, 5),
       batched=st.booleans())
def test_window_attention_matches_the_float64_reference(kind, size, mult, shift, heads, d, order, with_table, b,
                                                        transposed, chunk, batched):
    grid = (size[0] * mult[0], size[1] * mult[1])
    shift = (shift[0] % size[0], shift[1] % size[1])
    pattern, allowed = _pattern(kind, size, grid, shift)
    c_in, c = 6, heads * d
    g = torch.Generator().manual_seed(b * 100 + heads * 10 + d)
    x = torch.randn(b, grid[1], grid[0], c_in, generator=g)
    x = (x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()).requires_grad_()  # (B, H, W, C)
    lins = [torch.nn.Linear(c_in, c) for _ in range(3)] if order == "sep" else [torch.nn.Linear(c_in, 3 * c)]
    table = torch.randn(heads, 2 * size[0] - 1, 2 * size[1] - 1, generator=g).requires_grad_() if with_table else None
    qkv = (lambda t: tuple(lin(t) for lin in lins)) if order == "sep" else lins[0]
    scale = 0.7
    t = size[0] * size[1]
    qkv_order = "h3d" if order == "h3d" else "3hd"
    # batched: all windows in one chunk, every head through each step at once
    with _Chunk(10**6 if batched else chunk, t), _Batched(batched), _Spy() as spy:
        with torch.no_grad():
            plain = window_attention(x, pattern, qkv, heads, scale, table, qkv_order)
        # inference: the kernel takes the window batches with a bias or a region mask, SDPA the others
        assert spy.calls == 1  # small windows: the kernel, with or without a bias, mask or gradient
        out = window_attention(x, pattern, qkv, heads, scale, table, qkv_order)
        assert spy.calls == 2
        assert out.shape == (b, *grid, c)
        go = torch.randn(out.shape, generator=g)
        params = [x, *(p for lin in lins for p in lin.parameters())] + ([table] if with_table else [])
        grads = torch.autograd.grad((out * go).sum(), params)

    xd = x.double()
    p = [F.linear(xd, lin.weight.double(), lin.bias.double()) for lin in lins]
    q, k, v = _heads(p if order == "sep" else p[0], order, heads, d)
    bias = None
    if with_table:
        bias = ref.window_rpb_bias(table.double(), grid, size, shift if kind in ("swin", "cyclic") else (0, 0),
                                   grid_partition=kind == "grid")
    want = ref.dense_reference(q, k, v, allowed, scale, bias).transpose(1, 2).reshape(out.shape)
    want_grads = torch.autograd.grad((want * go.double()).sum(), params)
    assert (out.double() - want).abs().max() < 1e-5
    assert (plain.double() - want).abs().max() < 1e-5
    for got, exp in zip(grads, want_grads):
        assert (got.double() - exp).abs().max() < 3e-5 * max(1.0, float(exp.abs().max()))


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), with_table=st.booleans(), order=st.sampled_from(["3hd", "h3d", "sep"]),
       grad=st.booleans())
def test_without_the_kernel_sdpa_and_attend_give_the_reference(kind, with_table, order, grad):
    # large windows, other devices and torch.compile go to SDPA (no region mask) or attend with the bias
    grid, size, shift, heads, d = (4, 6), (2, 3), (1, 2), 2, 3
    pattern, allowed = _pattern(kind, size, grid, shift)
    wb = WindowBatch.of(pattern, grid)
    g = torch.Generator().manual_seed(KINDS.index(kind) * 12 + ["3hd", "h3d", "sep"].index(order) * 4
                                      + int(with_table) * 2 + int(grad))
    maps = [torch.randn(2, *grid, heads * d if order == "sep" else 3 * heads * d, generator=g)
            for _ in range(3 if order == "sep" else 1)]
    table = torch.randn(heads, 3, 5, generator=g) if with_table else None
    srcs = [wb.split(m).requires_grad_(grad) for m in maps]
    real = window_batch.takes
    window_batch.takes = lambda *args: False
    try:
        with _Spy() as spy:
            out = wb.attend(srcs if order == "sep" else srcs[0], heads, 0.5, table,
                            "h3d" if order == "h3d" else "3hd", merge=True)
        assert spy.calls == 0
    finally:
        window_batch.takes = real
    back = [wb.merge(x, 2).double() for x in srcs]  # the maps again, differentiable in the window batches
    q, k, v = _heads(back if order == "sep" else back[0], order, heads, d)
    bias = None
    if with_table:
        bias = ref.window_rpb_bias(table.double(), grid, size, shift if kind in ("swin", "cyclic") else (0, 0),
                                   grid_partition=kind == "grid")
    want = ref.dense_reference(q, k, v, allowed, 0.5, bias).transpose(1, 2).reshape(out.shape)
    assert (out.double() - want).abs().max() < 1e-5
    if grad:
        go = torch.randn(out.shape, generator=g)
        got = torch.autograd.grad((out * go).sum(), srcs)
        exp = torch.autograd.grad((want * go.double()).sum(), srcs)
        for a, b in zip(got, exp):
            assert (a.double() - b).abs().max() < 3e-5


@settings(max_examples=10, deadline=None)
@given(order=st.sampled_from(["3hd", "h3d", "sep"]), with_table=st.booleans(), chunk=st.integers(1, 9))
def test_split_windows_in_float64_with_and_without_grad(order, with_table, chunk):
    # float64 through the kernel (shifted windows: region mask), against the reference; the no-grad path (one
    # chunk buffer, no saved probabilities) equals the autograd one exactly
    grid, size, shift, heads, d = (4, 6), (2, 3), (1, 1), 2, 3
    wb = WindowBatch.of(Blocks(size, grid=grid, shift=shift), grid)
    g = torch.Generator().manual_seed(chunk)
    maps = [torch.randn(3, *grid, heads * d if order == "sep" else 3 * heads * d, dtype=torch.float64, generator=g)
            for _ in range(3 if order == "sep" else 1)]
    table = torch.randn(heads, 3, 5, dtype=torch.float64, generator=g) if with_table else None
    qkv_order = "h3d" if order == "h3d" else "3hd"
    srcs = [wb.split(m) for m in maps]
    with _Chunk(chunk, 6):
        with torch.no_grad():
            a = wb.attend(srcs if order == "sep" else srcs[0], heads, 0.5, table, qkv_order)
        b = wb.attend([s.requires_grad_() for s in srcs] if order == "sep" else srcs[0].requires_grad_(), heads, 0.5,
                      table, qkv_order)
    assert a.dtype == torch.float64 and torch.equal(a, b.detach())
    q, k, v = _heads(maps if order == "sep" else maps[0], order, heads, d)
    bias = ref.window_rpb_bias(table, grid, size, shift) if with_table else None
    want = ref.dense_reference(q, k, v, ref.swin_mask(grid, size, shift), 0.5, bias)
    got = wb.merge(b, 3).reshape(3, -1, heads, d).transpose(1, 2)
    assert (got - want).abs().max() < 1e-12


@settings(max_examples=10, deadline=None)
@given(chunk=st.integers(1, 9), with_table=st.booleans(), shift=st.booleans(), b=st.integers(1, 3),
       batched=st.booleans())
def test_queries_shared_by_the_windows_of_an_image(chunk, with_table, shift, b, batched):
    # GC ViT's global queries: one (T, C) set per image, attended by every window of it; the reference repeats
    # them per window (as NVlabs' q_global.repeat), gradients summed back over the windows
    grid, size, heads, d = (4, 6), (2, 3), 2, 3
    pattern = Blocks(size, grid=grid, shift=(1, 1) if shift else 0)
    wb = WindowBatch.of(pattern, grid)
    n_win, t = 4, 6
    g = torch.Generator().manual_seed(chunk * 10 + b)
    q = torch.randn(b, t, heads * d, generator=g, requires_grad=True)
    kv = torch.randn(b * n_win, t, 2, heads * d, generator=g, requires_grad=True)
    table = torch.randn(heads, 3, 5, generator=g, requires_grad=True) if with_table else None
    with _Chunk(10**6 if batched else chunk, t), _Batched(batched), _Spy() as spy:
        out = wb.attend((q, *kv.unbind(2)), heads, 0.6, table)
        assert spy.calls == 1
        with torch.no_grad():
            plain = wb.attend((q, *kv.unbind(2)), heads, 0.6, table)
        assert spy.calls == 2
        go = torch.randn(out.shape, generator=g)
        leaves = [q, kv] + ([table] if with_table else [])
        grads = torch.autograd.grad((out * go).sum(), leaves)
    qw = q[:, None].expand(b, n_win, t, heads * d).reshape(b * n_win, t, heads * d)
    want = wb.attend((qw.double(), *kv.double().unbind(2)), heads, 0.6, None if table is None else table.double())
    # the per-window float64 path itself, against the reference on the map
    qm, km, vm = (wb.merge(x, b).reshape(b, -1, heads, d).transpose(1, 2) for x in (qw, *kv.unbind(2)))
    bias = ref.window_rpb_bias(table.double(), grid, size, (1, 1) if shift else (0, 0)) if with_table else None
    mask = ref.swin_mask(grid, size, (1, 1)) if shift else ref.cyclic_blocks_mask(grid, size)
    full = ref.dense_reference(qm, km, vm, mask, 0.6, bias).transpose(1, 2).reshape(b, *grid, heads * d)
    assert (wb.merge(want, b) - full).abs().max() < 1e-12
    assert (out.double() - want).abs().max() < 1e-5 and (plain.double() - want).abs().max() < 1e-5
    for got, exp in zip(grads, torch.autograd.grad((want * go.double()).sum(), leaves)):
        assert (got.double() - exp).abs().max() < 3e-5 * max(1.0, float(exp.abs().max()))


def test_chunks_of_every_size_give_the_whole_batch_result():
    # several heads, chunks that do not divide the batch (a partial last chunk), an additive term with a period
    g = torch.Generator().manual_seed(7)
    heads, d, t, bw = 3, 4, 5, 24
    for order, n_src in (("3hd", 1), ("h3d", 1), ("sep", 3)):
        srcs = [torch.randn(bw, t, (3 if n_src == 1 else 1) * heads * d, dtype=torch.float64, generator=g,
                            requires_grad=True) for _ in range(n_src)]
        for period in (1, 6):
            add = torch.randn(heads, period, t, t, dtype=torch.float64, generator=g, requires_grad=True)
            go = torch.randn(heads, bw, t, d, dtype=torch.float64, generator=g)
            results = []
            # all heads at once (head-major, one chunk), then one head at a time in chunks of every size
            for windows_per_chunk, batched in ((bw, True), (bw, False), (1, False), (2, False), (3, False),
                                               (5, False), (7, False), (13, False)):
                with _Chunk(windows_per_chunk * heads * 2, t), _Batched(batched):  # float64: 2x the float32 bytes
                    out = windows.window_kernel(tuple(srcs), windows.roles_of(order, heads, d), heads, d, 0.3, add)
                    with torch.no_grad():
                        plain = windows.window_kernel(tuple(srcs), windows.roles_of(order, heads, d), heads, d, 0.3,
                                                      add)
                    inside = torch.autograd.grad(out, [*srcs, add], go, retain_graph=True)
                # the backward pass reads the probabilities in the forward's chunks whatever the setting is by then
                outside = torch.autograd.grad(out, [*srcs, add], go)
                results.append((out, plain, *inside, *outside))
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("order", ["3hd", "h3d", "sep"])
def test_heads_batched_path_equals_the_per_head_path(order, monkeypatch):
    # with several threads the kernel copies q, k and v out head-major and runs every GEMM on all heads at once:
    # the same sums as the per-head path (float64: equal to 1e-12), forward, no-grad and backward, with an
    # additive term per head or shared, with a period, none, and with queries shared by the windows of an image
    g = torch.Generator().manual_seed(11)
    heads, d, t, bw = 3, 4, 5, 12
    n_src = 3 if order == "sep" else 1
    ran = []
    real = windows._heads_forward
    monkeypatch.setattr(windows, "_heads_forward", lambda *a: ran.append(1) or real(*a))
    for add_shape, shared in (((heads, 1), False), ((1, 4), False), ((heads, 4), True), (None, False)):
        srcs = [torch.randn(bw, t, (3 if n_src == 1 else 1) * heads * d, dtype=torch.float64, generator=g,
                            requires_grad=True) for _ in range(n_src)]
        if shared and order == "sep":  # one q per image of 4 windows (GC ViT)
            srcs[0] = torch.randn(bw // 4, t, heads * d, dtype=torch.float64, generator=g, requires_grad=True)
        add = None if add_shape is None else torch.randn(*add_shape, t, t, dtype=torch.float64, generator=g,
                                                         requires_grad=True)
        leaves = [*srcs] + ([add] if add is not None else [])
        go = torch.randn(heads, bw, t, d, dtype=torch.float64, generator=g)
        results = []
        for threshold in (10 ** 9, 1):  # per head, then all heads batched
            monkeypatch.setattr(windows, "HEADS_BATCHED_THREADS", threshold)
            before = len(ran)
            out = windows.window_kernel(tuple(srcs), windows.roles_of(order, heads, d), heads, d, 0.3, add)
            with torch.no_grad():
                plain = windows.window_kernel(tuple(srcs), windows.roles_of(order, heads, d), heads, d, 0.3, add)
            assert len(ran) - before == (2 if threshold == 1 else 0)
            results.append((out, plain, *torch.autograd.grad(out, leaves, go)))
        for a, b in zip(*results):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-12


def test_heads_batched_only_with_several_threads_and_one_chunk(monkeypatch):
    ran = []
    real = windows._heads_forward
    monkeypatch.setattr(windows, "_heads_forward", lambda *a: ran.append(1) or real(*a))
    srcs = (torch.randn(8, 6, 3 * 2 * 4),)
    roles = windows.roles_of("3hd", 2, 4)
    monkeypatch.setattr(windows, "HEADS_BATCHED_THREADS", torch.get_num_threads() + 1)
    windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert not ran
    monkeypatch.setattr(windows, "HEADS_BATCHED_THREADS", torch.get_num_threads())
    windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert len(ran) == 1
    with _Chunk(4, 6):  # the scores of all heads no longer fit in one chunk: per head, in chunks
        windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert len(ran) == 1


def test_strided_channel_groups_split_like_their_copy():
    # CRAFT cuts one channel half of a fused (B, H, W, [3, 2, C/2]) projection straight from its strided view
    grid = (4, 6)
    qkv = torch.randn(2, *grid, 3, 2, 5)
    for pattern in (Blocks((2, 3), grid=grid), Blocks((2, 3), grid=grid, shift=(1, 2), wrap=True)):
        wb = WindowBatch.of(pattern, grid)
        for half in qkv.unbind(4):
            assert torch.equal(wb.split(half), wb.split(half.contiguous()))
            flat = wb.split(half.reshape(2, *grid, 15))
            assert torch.equal(wb.split(half), flat)
            assert torch.equal(wb.merge(flat, 2), half.reshape(2, *grid, 15))


@settings(max_examples=12, deadline=None)
@given(shift=st.booleans(), with_table=st.booleans(), grad=st.booleans())
def test_attend_merged_and_added_in_place_equal_merge_of_attend(shift, with_table, grad):
    grid, heads, d = (4, 6), 3, 2
    wb = WindowBatch.of(Blocks((2, 3), grid=grid, shift=(1, 1) if shift else 0), grid)
    g = torch.Generator().manual_seed(int(shift) * 4 + int(with_table) * 2 + int(grad))
    p = torch.randn(2 * 4, 6, 3 * heads * d, generator=g, requires_grad=grad)
    table = torch.randn(heads, 3, 5, generator=g) if with_table else None
    with torch.set_grad_enabled(grad):
        want = wb.merge(wb.attend(p, heads, 0.5, table), 2)
        merged = wb.attend(p, heads, 0.5, table, merge=True)
        base = torch.randn(2, *grid, 2 * heads * d, generator=g)
        added = base.clone()
        out = wb.attend(p, heads, 0.5, table, add_to=added[..., heads * d:])
    torch.testing.assert_close(merged, want, rtol=0, atol=0)
    assert out.data_ptr() == added[..., heads * d:].data_ptr()
    torch.testing.assert_close(added[..., heads * d:], base[..., heads * d:] + want, rtol=0, atol=1e-6)
    assert torch.equal(added[..., :heads * d], base[..., :heads * d])
    if grad:
        go = torch.randn(want.shape, generator=g)
        (a,) = torch.autograd.grad((want * go).sum(), p)
        (b,) = torch.autograd.grad((merged * go).sum(), p)
        (c,) = torch.autograd.grad((out * go).sum(), p)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-6)


def test_split_and_merge_gradients_are_the_inverse_gathers():
    grid = (4, 6)
    wb = WindowBatch.of(Blocks((2, 3), grid=grid, shift=(1, 1)), grid)  # shifted: the token gather
    x = torch.randn(2, *grid, 3, requires_grad=True)
    y = wb.split(x)
    go = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * go).sum(), x)
    assert torch.equal(gx, wb.merge(go, 2))
    z = torch.randn_like(y, requires_grad=True)
    m = wb.merge(z, 2)
    gm = torch.randn_like(m)
    (gz,) = torch.autograd.grad((m * gm).sum(), z)
    assert torch.equal(gz, wb.split(gm))


def _poisoned(garbage, grad):
    """Shifted windows (region mask) on a 6x6 map, window 3, shift 1, with a bias table: token 0 (rolled into the
    bottom-right window, region (2, 2)) holds ``garbage`` in its k and v. Returns the output map, the gradient of
    the projections as a map (or None) and the tokens that may attend token 0."""
    grid, heads, d = (6, 6), 2, 4
    wb = WindowBatch.of(Blocks(3, grid=grid, shift=1), grid)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, *grid, 3 * heads * d, generator=g)
    x[0, 0, 0, heads * d:] = garbage  # k and v of token 0
    p = wb.split(x).requires_grad_(grad)
    table = torch.randn(heads, 5, 5, generator=g)
    out = wb.merge(wb.attend(p, heads, d ** -0.5, table), 1)
    grads = None
    if grad:
        (gp,) = torch.autograd.grad((out * torch.randn(out.shape, generator=g)).sum(), p)
        grads = wb.merge(gp, 1)
    reach = ref.swin_mask(grid, 3, 1)[:, 0].view(grid)
    return out, grads, reach


@pytest.mark.parametrize("batched", [False, True])
def test_masked_keys_holding_garbage_change_nothing(batched):
    for garbage in (float("nan"), float("inf"), 3e38):
        for grad in (False, True):
            with _Batched(batched):
                out, grads, reach = _poisoned(garbage, grad)
                clean, clean_grads, _ = _poisoned(0.0, grad)
            far = ~reach  # tokens that may not attend token 0 (other windows, or another region of its window)
            assert far.sum() > 27  # its region is 4 tokens: the rest of its window is masked from it
            assert torch.isfinite(out[0][far]).all(), (garbage, grad)
            torch.testing.assert_close(out[0][far], clean[0][far], rtol=1e-5, atol=1e-5)
            if garbage != garbage:  # NaN reaches exactly the queries that may attend it
                assert not torch.isfinite(out[0][reach]).all(-1).any()
            if grad:  # nothing flows from or to the poisoned region's tokens into the others
                assert torch.isfinite(grads[0][far]).all(), (garbage, grad)
                torch.testing.assert_close(grads[0][far], clean_grads[0][far], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "sdpa", "attend"])
@pytest.mark.parametrize("shift", [0, 2])
def test_observed_as_one_attend_call_on_the_whole_map(path, shift, monkeypatch):
    """Whichever path runs, ``observe_calls`` lists the windows as the ``attend`` call they stand for: the pattern on
    the whole map, q, k and v ``(B, heads, N, d)``; once (the ``attend`` calls inside are not listed again)."""
    if path != "kernel":
        monkeypatch.setattr(window_batch, "takes", lambda *a: False)
    # SDPA runs windows without a region mask; with one they go to attend over the windows
    grid, pattern = (8, 12), Blocks(4, grid=(8, 12), shift=shift if path != "sdpa" else 0)
    heads, d = 3, 4
    lin = torch.nn.Linear(6, 3 * heads * d)
    x = torch.randn(2, *grid, 6)
    with observe_calls() as calls:
        out = window_attention(x, pattern, lin, heads, d ** -0.5)
    assert calls == [(pattern, (2, heads, 96, d), (2, heads, 96, d), (2, heads, 96, d))]
    with engine_override("dense"), observe_calls() as forced:
        torch.testing.assert_close(window_attention(x, pattern, lin, heads, d ** -0.5), out, rtol=1e-5, atol=1e-5)
    assert forced == calls


@pytest.mark.parametrize("engine", ["dense", "blocksparse"])
def test_a_forced_engine_runs_instead_of_the_window_kernel(engine, monkeypatch):
    """Inside ``engine_override`` the windows run as ``attend`` with the pattern on the forced engine (so the bench's
    gate compares the window kernel with another engine): a broken kernel fails the gate."""
    torch.manual_seed(0)
    layer = {m.name: m for m in nearfar.mechanisms()}["swin_shifted"].build(16, 2, "NS")
    x = torch.randn(2, 14, 14, 16)  # whole shifted windows of 7x7
    want = layer(x)

    def refuse(*args, **kwargs):
        raise AssertionError("the window kernel ran under engine_override")

    real = window_batch.window_kernel
    monkeypatch.setattr(window_batch, "window_kernel", refuse)
    with engine_override(engine):
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert gate_layer(layer, "NS", x)["passed"] is False  # the kernel is called outside the override
    monkeypatch.setattr(window_batch, "window_kernel", lambda *a, **k: real(*a, **k) * 1.001)
    res = gate_layer(layer, "NS", x)
    assert not res["passed"] and res["max_err"] > 1e-4 and "Blocks" in res["detail"], res
    monkeypatch.setattr(window_batch, "window_kernel", real)
    assert gate_layer(layer, "NS", x)["passed"]


def test_fused_linear_is_the_layers_side_by_side():
    x = torch.randn(5, 7, 8, requires_grad=True)
    layers = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(8, 2)]
    out = fused_linear(x, layers)
    want = torch.cat([layer(x) for layer in layers], -1)
    torch.testing.assert_close(out, want)
    go = torch.randn_like(out)
    params = [x, *(p for layer in layers for p in layer.parameters())]
    for a, b in zip(torch.autograd.grad((out * go).sum(), params), torch.autograd.grad((want * go).sum(), params)):
        torch.testing.assert_close(a, b)
    assert fused_linear(x, layers[1:2]).shape == (5, 7, 3)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 4, 4, 6)
    lin = torch.nn.Linear(6, 18)
    try:
        window_attention(x, Blocks(2, grid=(4, 4)), lin, 2, 1.0, qkv_order="hd3")
    except ValueError as err:
        assert "qkv_order" in str(err)
    else:
        raise AssertionError("qkv_order='hd3' was accepted")
    for bad in ([], [torch.nn.Linear(6, 2), torch.nn.Linear(5, 2)]):
        try:
            fused_linear(x, bad)
        except ValueError as err:
            assert "in_features" in str(err)
        else:
            raise AssertionError(f"fused_linear accepted {bad}")


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["block", "cyclic", "grid"]), size=st.sampled_from([(2, 3), (3, 2)]),
       mult=st.sampled_from([(1, 2), (2, 2)]), shift=st.tuples(st.integers(1, 2), st.integers(0, 2)),
       heads=st.integers(1, 3), d=st.sampled_from([2, 5]), order=st.sampled_from(["3hd", "h3d"]),
       with_table=st.booleans(), b=st.integers(1, 2), layout=st.sampled_from(["contiguous", "transposed", "slice"]),
       batched=st.booleans(), grad=st.booleans())
def test_attend_map_matches_attend_of_split_and_the_reference(kind, size, mult, shift, heads, d, order, with_table,
                                                              b, layout, batched, grad):
    # a projection computed on the whole map (CRAFT's halves): attend_map cuts it straight into the kernel's
    # head-major layout (split_heads, one copy) where every head runs at once, and is attend(split(x)) elsewhere
    grid = (size[0] * mult[0], size[1] * mult[1])
    shift = (shift[0] % size[0], shift[1] % size[1])
    pattern, allowed = _pattern(kind, size, grid, shift)
    wb = WindowBatch.of(pattern, grid)
    c = 3 * heads * d
    g = torch.Generator().manual_seed(b * 1000 + heads * 100 + d * 10 + int(batched))
    if layout == "transposed":  # (B, W, H, C) stored, read as (B, H, W, C)
        x = torch.randn(b, grid[1], grid[0], c, dtype=torch.float64, generator=g).transpose(1, 2)
    elif layout == "slice":  # one half of a wider projection, as CRAFT's halves are
        x = torch.randn(b, *grid, 2 * c, dtype=torch.float64, generator=g)[..., c:]
    else:
        x = torch.randn(b, *grid, c, dtype=torch.float64, generator=g)
    x.requires_grad_(grad)
    table = torch.randn(heads, 2 * size[0] - 1, 2 * size[1] - 1, dtype=torch.float64, generator=g) if with_table \
        else None
    t = size[0] * size[1]
    with _Chunk(10**6, t), _Batched(batched), _Spy() as spy:
        # split_heads: the head-major windows of split(x), in one copy
        split = (3, heads, d) if order == "3hd" else (heads, 3, d)
        want_heads = wb.split(x).unflatten(-1, split).permute((2, 3, 0, 1, 4) if order == "3hd" else (3, 2, 0, 1, 4))
        got_heads = wb.split_heads(x, order, heads)
        assert got_heads.is_contiguous() and torch.equal(got_heads, want_heads)
        out = wb.attend_map(x, heads, 0.7, table, order, merge=True)
        assert spy.calls == 1
    want_split = wb.attend(wb.split(x), heads, 0.7, table, order, merge=True)
    assert (out - want_split).abs().max() < 1e-12
    q, k, v = _heads(x, order, heads, d)
    bias = None
    if with_table:
        bias = ref.window_rpb_bias(table, grid, size, shift if kind == "cyclic" else (0, 0),
                                   grid_partition=kind == "grid")
    want = ref.dense_reference(q, k, v, allowed, 0.7, bias).transpose(1, 2).reshape(out.shape)
    assert (out - want).abs().max() < 1e-10
    if grad:
        go = torch.randn(out.shape, dtype=torch.float64, generator=g)
        got_g, = torch.autograd.grad(out, x, go)
        want_g, = torch.autograd.grad(want, x, go)
        assert (got_g - want_g).abs().max() < 1e-9


def test_attend_map_cuts_the_windows_once_where_all_heads_run_together(monkeypatch):
    # with every head batched the kernel receives the head-major windows (roles None), not a split to reorder
    wb = WindowBatch.of(Blocks((2, 2), grid=(4, 4), shift=(1, 1), wrap=True), (4, 4))
    x = torch.randn(2, 4, 4, 3 * 2 * 3)
    seen = []
    real = window_batch.window_kernel
    monkeypatch.setattr(window_batch, "window_kernel", lambda srcs, roles, *a: seen.append(roles) or real(srcs, roles,
                                                                                                          *a))
    with _Batched(True):
        wb.attend_map(x, 2, 0.5)
    with _Batched(False):
        wb.attend_map(x, 2, 0.5)
    assert seen[0] is None and seen[1] is not None
