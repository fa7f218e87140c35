"""``WindowBatch`` around the window kernel: the SDPA and ``attend`` paths where the kernel does not run, split and
merge (strided channel groups, their gradients), the output merged or added in place, ``attend_map`` cutting a map
straight into windows, the single ``attend`` call observers see, forced engines, ``fused_linear`` and bad arguments,
against float64 references built without the library (``tests/reference.py``)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from window_checks import KINDS, Batched, Chunk, Spy, qkv_heads, window_pattern

import nearfar
import nearfar.backends.window_batch as window_batch
from nearfar import Blocks
from nearfar.bench.speed_gate import gate_layer
from nearfar.functional import WindowBatch, engine_override, fused_linear, observe_calls, window_attention


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), with_table=st.booleans(), order=st.sampled_from(["3hd", "h3d", "sep"]),
       grad=st.booleans())
def test_without_the_kernel_sdpa_and_attend_give_the_reference(kind, with_table, order, grad):
    # large windows, other devices and torch.compile go to SDPA (no region mask) or attend with the bias
    grid, size, shift, heads, d = (4, 6), (2, 3), (1, 2), 2, 3
    pattern, allowed = window_pattern(kind, size, grid, shift)
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
        with Spy() as spy:
            out = wb.attend(srcs if order == "sep" else srcs[0], heads, 0.5, table,
                            "h3d" if order == "h3d" else "3hd", merge=True)
        assert spy.calls == 0
    finally:
        window_batch.takes = real
    back = [wb.merge(x, 2).double() for x in srcs]  # the maps again, differentiable in the window batches
    q, k, v = qkv_heads(back if order == "sep" else back[0], order, heads, d)
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
    pattern, allowed = window_pattern(kind, size, grid, shift)
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
    with Chunk(10**6, t), Batched(batched), Spy() as spy:
        # split_heads: the head-major windows of split(x), in one copy
        split = (3, heads, d) if order == "3hd" else (heads, 3, d)
        want_heads = wb.split(x).unflatten(-1, split).permute((2, 3, 0, 1, 4) if order == "3hd" else (3, 2, 0, 1, 4))
        got_heads = wb.split_heads(x, order, heads)
        assert got_heads.is_contiguous() and torch.equal(got_heads, want_heads)
        out = wb.attend_map(x, heads, 0.7, table, order, merge=True)
        assert spy.calls == 1
    want_split = wb.attend(wb.split(x), heads, 0.7, table, order, merge=True)
    assert (out - want_split).abs().max() < 1e-12
    q, k, v = qkv_heads(x, order, heads, d)
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
    with Batched(True):
        wb.attend_map(x, 2, 0.5)
    with Batched(False):
        wb.attend_map(x, 2, 0.5)
    assert seen[0] is None and seen[1] is not None
