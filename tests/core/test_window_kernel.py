"""The window kernel (``nearfar.backends.windows``: q, k, v read in place from the projection output, the bias and
region mask filled into the score buffer) through ``window_attention`` and ``WindowBatch.attend``, against float64
references built without the library (``tests/reference.py``: Swin's region mask, cyclic and grid windows, the window
bias table), forward and backward, in chunks of every size, heads one at a time or batched, on non-contiguous inputs,
queries shared by an image's windows; masked keys holding garbage never reach a query."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from window_checks import KINDS, Batched, Chunk, Spy, qkv_heads, window_pattern

import nearfar.backends.windows as windows
from nearfar import Blocks
from nearfar.functional import WindowBatch, window_attention


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
    pattern, allowed = window_pattern(kind, size, grid, shift)
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
    with Chunk(10**6 if batched else chunk, t), Batched(batched), Spy() as spy:
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
    q, k, v = qkv_heads(p if order == "sep" else p[0], order, heads, d)
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
    with Chunk(chunk, 6):
        with torch.no_grad():
            a = wb.attend(srcs if order == "sep" else srcs[0], heads, 0.5, table, qkv_order)
        b = wb.attend([s.requires_grad_() for s in srcs] if order == "sep" else srcs[0].requires_grad_(), heads, 0.5,
                      table, qkv_order)
    assert a.dtype == torch.float64 and torch.equal(a, b.detach())
    q, k, v = qkv_heads(maps if order == "sep" else maps[0], order, heads, d)
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
    with Chunk(10**6 if batched else chunk, t), Batched(batched), Spy() as spy:
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
                with Chunk(windows_per_chunk * heads * 2, t), Batched(batched):  # float64: 2x the float32 bytes
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


def test_heads_batched_only_with_several_threads_and_few_scores(monkeypatch):
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
    monkeypatch.setattr(windows, "HEADS_BATCHED_BYTES", 2 * 8 * 6 * 6 * 4 - 1)  # a byte under the batch's scores
    windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert len(ran) == 1
    monkeypatch.setattr(windows, "HEADS_BATCHED_BYTES", 2 * 8 * 6 * 6 * 4)
    windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert len(ran) == 2
    with Chunk(4, 6):  # the scores of all heads no longer fit in one chunk: per head, in chunks
        windows.window_kernel(srcs, roles, 2, 4, 0.5)
    assert len(ran) == 2


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
            with Batched(batched):
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
