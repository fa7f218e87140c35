"""Run-time key blocks (``attend(..., blocks=SelectedBlocks(...))``) against the float64 dense reference of the same
pair set: the pairs are rebuilt here from the block lists with plain loops (FlexAttention's semantics: query ``i``
is in block ``i // q_block``, key ``j`` in ``j // kv_block``; only the first ``kv_num_blocks`` entries count; -1
and repeats are ours), united with the static pattern's mask, restricted by ``within``, padded keys dropped."""

from __future__ import annotations

import contextlib

import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import LAYOUTS, as_layout

import nearfar as nf
from nearfar import native
from nearfar.patterns import Tiles

#: "blocksparse" runs the compiled kernel where it is built; "blocksparse-torch" the PyTorch path it falls back to
ENGINES = ("dense", "blocksparse", "blocksparse-torch")


def engine_context(name):
    """(engine, context) for a name of ``ENGINES``; the kernel's name skips where the kernel is not built."""
    if name == "blocksparse-torch":
        return "blocksparse", native.disabled()
    if name == "blocksparse" and not native.available():
        pytest.skip(native.status())
    return name, contextlib.nullcontext()


def pairs_by_loops(num, idx, nq, nk, q_block, kv_block, hq, hkv):
    """(B', Hq or 1, Nq, Nk) bool from the block lists, one entry at a time."""
    bs, hs, qb, _ = idx.shape
    out = torch.zeros(bs, hs, nq, nk, dtype=torch.bool)
    for b in range(bs):
        for h in range(hs):
            for r in range(qb):
                for s in range(int(num[b, h, r])):
                    j = int(idx[b, h, r, s])
                    if j >= 0:
                        out[b, h, r * q_block:(r + 1) * q_block, j * kv_block:(j + 1) * kv_block] = True
    if hs not in (1, hq):
        out = out.repeat_interleave(hq // hkv, dim=1)
    return out


WITHIN = {"none": None, "causal": nf.Causal(), "window": nf.SlidingWindow(left=6, right=2)}
STATIC = {"none": lambda: None, "causal": nf.Causal, "window": lambda: nf.SlidingWindow(left=5) & nf.Causal(),
          "sinks": lambda: (nf.SlidingWindow(left=3) | nf.Sinks(2)) & nf.Causal(), "strided": lambda: nf.Strided(5),
          "dense": nf.Dense}


@st.composite
def problems(draw, max_n=70):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["self", "self", "cross", "decode"]))
    nk = draw(st.integers(1, max_n))
    nq = nk if mode == "self" else draw(st.integers(1, 4)) if mode == "decode" else draw(st.integers(1, max_n))
    q_block = draw(st.integers(1, 16))
    kv_block = draw(st.integers(1, 16))
    heads = draw(st.sampled_from(sorted({1, hkv, hq})))
    bsel = draw(st.sampled_from([1, b]))
    qb, nkb = -(-nq // q_block), -(-nk // kv_block)
    width = draw(st.integers(0, 6))
    return dict(b=b, hq=hq, hkv=hkv, nq=nq, nk=nk, q_block=q_block, kv_block=kv_block, heads=heads, bsel=bsel,
                qb=qb, nkb=nkb, width=width, d=draw(st.sampled_from([4, 8])), dv=draw(st.sampled_from([4, 6])),
                within=draw(st.sampled_from(sorted(WITHIN))), static=draw(st.sampled_from(sorted(STATIC))),
                kpm=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)])


def make(p):
    gen = torch.Generator().manual_seed(p["seed"])
    shape = (p["bsel"], p["heads"], p["qb"])
    idx = torch.randint(-1, p["nkb"], (*shape, p["width"]), generator=gen)  # repeats and -1 included
    num = torch.randint(0, p["width"] + 1, shape, generator=gen)
    sel = nf.SelectedBlocks(num.to(torch.int32), idx.to(torch.int32), q_block=p["q_block"], kv_block=p["kv_block"],
                            within=WITHIN[p["within"]])
    pattern = STATIC[p["static"]]()
    allowed = pairs_by_loops(num, idx, p["nq"], p["nk"], p["q_block"], p["kv_block"], p["hq"], p["hkv"])
    if sel.within is not None:
        allowed = allowed & sel.within.mask(p["nq"], p["nk"])
    if pattern is not None:
        allowed = allowed | pattern.mask(p["nq"], p["nk"])
    kpm = torch.rand(p["b"], p["nk"], generator=gen) > 0.25 if p["kpm"] else None
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    q = torch.randn(p["b"], p["hq"], p["nq"], p["d"], generator=gen, dtype=torch.float64)
    k = torch.randn(p["b"], p["hkv"], p["nk"], p["d"], generator=gen, dtype=torch.float64)
    v = torch.randn(p["b"], p["hkv"], p["nk"], p["dv"], generator=gen, dtype=torch.float64)
    return sel, pattern, allowed, kpm, q, k, v, gen


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_selected_blocks_match_the_dense_reference(engine, p):
    sel, pattern, allowed, kpm, q, k, v, gen = make(p)
    scale = p["d"] ** -0.5
    xs = [as_layout(x.float(), kind, gen).requires_grad_() for x, kind in zip((q, k, v), p["layouts"])]
    q, k, v = (x.detach().double() for x in xs)  # "expanded" repeats values: the reference sees the same ones
    expected, lse_ref = ref.dense_reference(q, k, v, allowed, scale, return_lse=True)
    go = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref.dense_reference(*(x.requires_grad_() for x in (q, k, v)), allowed, scale)
                                     * go).sum(), (q, k, v))
    engine, ctx = engine_context(engine)
    with ctx:
        out, lse = nf.attend(*xs, pattern, blocks=sel, key_padding_mask=kpm, engine=engine, return_lse=True)
        grads = torch.autograd.grad((out * go.float()).sum(), xs)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    live = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), live)
    torch.testing.assert_close(lse.double()[live], lse_ref[live], atol=2e-5, rtol=1e-4)
    for g, g_ref, name in zip(grads, grads_ref, "qkv"):
        torch.testing.assert_close(g.double(), g_ref, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("name", ENGINES[1:])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32_inside(dtype, name):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 50, 16), torch.randn(2, 2, 50, 16), torch.randn(2, 2, 50, 16)
    idx = torch.randint(0, 7, (2, 2, 7, 3))
    sel = nf.SelectedBlocks(torch.full((2, 2, 7), 3), idx, q_block=8, within=nf.Causal())
    pattern = nf.SlidingWindow(left=7) & nf.Causal()
    ref32 = nf.attend(q, k, v, pattern, blocks=sel, engine="dense")
    qh, kh, vh = (x.to(dtype).requires_grad_() for x in (q, k, v))
    engine, ctx = engine_context(name)
    with ctx:
        out = nf.attend(qh, kh, vh, pattern, blocks=sel, engine=engine)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref32, atol=3e-2, rtol=3e-2)
        out.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in (qh, kh, vh))


def test_bias_and_its_gradient():
    torch.manual_seed(1)
    b, hq, hkv, n = 2, 4, 2, 37
    q, k, v = torch.randn(b, hq, n, 8), torch.randn(b, hkv, n, 8), torch.randn(b, hkv, n, 8)
    bias = torch.randn(1, hq, n, n, requires_grad=True)
    sel = nf.SelectedBlocks(torch.full((b, hkv, 5), 2), torch.randint(-1, 5, (b, hkv, 5, 2)), q_block=8,
                            within=nf.Causal())
    pattern = nf.SlidingWindow(left=4) & nf.Causal()
    allowed = sel.pair_mask(n, n, hq, hkv) | pattern.mask(n, n)
    bias64 = bias.detach().double().requires_grad_()
    expected = ref.dense_reference(q, k, v, allowed, 8 ** -0.5, bias=bias64)
    expected.sum().backward()
    out = nf.attend(q, k, v, pattern, blocks=sel, bias=bias, engine="blocksparse")
    out.sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=1e-5, rtol=1e-4)


def test_an_empty_selection_gives_zeros_and_no_nan():
    q = torch.randn(1, 2, 20, 8, requires_grad=True)
    sel = nf.SelectedBlocks(torch.zeros(1, 2, 3, dtype=torch.int32), -torch.ones(1, 2, 3, 4, dtype=torch.int32),
                            q_block=8)
    for name in ENGINES:
        engine, ctx = engine_context(name)
        with ctx:
            out, lse = nf.attend(q, q, q, blocks=sel, engine=engine, return_lse=True)
            assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
            out.sum().backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None


def test_a_key_outside_the_selection_cannot_leak():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    k[0, :, 20], v[0, :, 20] = float("nan"), float("inf")  # key 20 is in block 2, which nobody selects
    sel = nf.SelectedBlocks(torch.ones(1, 1, 4, dtype=torch.int32), torch.zeros(1, 1, 4, 1, dtype=torch.int32),
                            q_block=8)
    for name in ENGINES:
        engine, ctx = engine_context(name)
        with ctx:
            out = nf.attend(q, k, v, nf.SlidingWindow(left=2) & nf.Causal(), blocks=sel, engine=engine)
        assert torch.isfinite(out[:, :, :20]).all() and torch.isfinite(out[:, :, 23:]).all()
        assert torch.isnan(out[:, :, 20:23]).any()  # those queries' windows do hold key 20


@pytest.mark.parametrize("name", ENGINES[1:])
def test_decode_with_selected_pages_equals_the_full_call(name):
    engine, ctx = engine_context(name)
    with ctx:
        torch.manual_seed(3)
        n, page = 96, 16
        q, k, v = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        idx = torch.tensor([0, 1, 2])  # pages every query past them reads (causally)
        nsel = nf.SelectedBlocks(torch.full((1, 2, n), 3), idx.expand(1, 2, n, 3), q_block=1, kv_block=page,
                                 within=nf.Causal())
        pattern = nf.SlidingWindow(left=7) & nf.Causal()
        full = nf.attend(q, k, v, pattern, blocks=nsel, engine="blocksparse")
        for t in (40, 95):
            step = nf.SelectedBlocks(torch.full((1, 2, 1), 3), idx.expand(1, 2, 1, 3), q_block=1, kv_block=page,
                                     within=nf.Causal())
            one = nf.attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pattern, blocks=step,
                            engine="blocksparse")
            torch.testing.assert_close(one, full[:, :, t:t + 1], atol=1e-5, rtol=1e-5)


def test_flex_engine_takes_the_same_blocks():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 4, 48, 16), torch.randn(2, 2, 48, 16), torch.randn(2, 2, 48, 16)
    sel = nf.SelectedBlocks(torch.full((2, 2, 3), 2), torch.randint(-1, 3, (2, 2, 3, 2)), q_block=16,
                            within=nf.Causal())
    pattern = nf.SlidingWindow(left=5) & nf.Causal()
    with torch.no_grad():
        expected = nf.attend(q, k, v, pattern, blocks=sel, engine="dense")
        out = nf.attend(q, k, v, pattern, blocks=sel, engine="flex")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_block_mask_round_trip():
    from torch.nn.attention import flex_attention as flex

    sel = nf.SelectedBlocks(torch.tensor([[[1, 2]]]), torch.tensor([[[[0, -1], [1, 0]]]]), q_block=4)
    bm = flex.BlockMask.from_kv_blocks(sel.kv_num_blocks.int(), sel.kv_indices.clamp(min=0).int(), BLOCK_SIZE=4,
                                       seq_lengths=(8, 8))
    back = nf.SelectedBlocks.from_block_mask(bm)
    assert torch.equal(back.block_table(8), sel.block_table(8))


def test_attend_compiles_around_the_engine():
    q = torch.randn(1, 2, 40, 8)
    sel = nf.SelectedBlocks(torch.full((1, 2, 5), 2), torch.randint(0, 5, (1, 2, 5, 2)), q_block=8)
    eager = nf.attend(q, q, q, nf.Causal(), blocks=sel, engine="blocksparse")
    compiled = torch.compile(lambda x: nf.attend(x, x, x, nf.Causal(), blocks=sel, engine="blocksparse"))
    torch.testing.assert_close(compiled(q), eager)


@pytest.mark.parametrize("bad,match", [
    (dict(num=torch.full((1, 2, 3), 5)), r"kv_num_blocks must be in \[0, KB=4\]"),
    (dict(idx=torch.full((1, 2, 3, 4), 9)), r"used kv_indices must be -1 .* \[0, 3\)"),
    (dict(idx=torch.full((1, 2, 3, 4), -2)), r"used kv_indices"),
    (dict(num=torch.ones(1, 2, 2, dtype=torch.long)), r"QB must be ceil\(Nq / q_block\)"),
    (dict(num=torch.ones(1, 3, 3, dtype=torch.long), idx=torch.zeros(1, 3, 3, 4, dtype=torch.long)),
     r"head dim must be 1, Hkv=2 or Hq=4"),
    (dict(num=torch.ones(3, 2, 3, dtype=torch.long), idx=torch.zeros(3, 2, 3, 4, dtype=torch.long)), r"batch dim"),
])
def test_bad_blocks_are_named(bad, match):
    q, k = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8)
    num, idx = bad.get("num", torch.ones(1, 2, 3, dtype=torch.long)), bad.get("idx", torch.zeros(1, 2, 3, 4,
                                                                                               dtype=torch.long))
    if num.shape[2] != idx.shape[2]:
        idx = torch.zeros(*num.shape, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        nf.attend(q, k, k, blocks=nf.SelectedBlocks(num, idx, q_block=8))


def test_bad_arguments_are_named():
    q = torch.randn(1, 2, 16, 8)
    sel = nf.SelectedBlocks(torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, 1, dtype=torch.long),
                            q_block=8)
    with pytest.raises(TypeError, match="integer tensor"):
        nf.SelectedBlocks(torch.ones(1, 2, 2), torch.zeros(1, 2, 2, 1), q_block=8)
    with pytest.raises(ValueError, match="q_block"):
        nf.SelectedBlocks(torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, 1, dtype=torch.long), q_block=0)
    with pytest.raises(ValueError, match=r"\(B, H, QB\)"):
        nf.SelectedBlocks(torch.ones(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, 1, dtype=torch.long), q_block=8)
    with pytest.raises(TypeError, match="blocks must be"):
        nf.attend(q, q, q, blocks=(1, 2))
    with pytest.raises(ValueError, match="partition"):
        nf.attend(q, q, q, blocks=sel, engine="partition")
    with pytest.raises(ValueError, match="PerHead"):
        nf.attend(q, q, q, nf.PerHead([nf.Causal(), nf.Causal()]), blocks=sel, engine="blocksparse")


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), tq=st.integers(1, 12), tk=st.integers(1, 12), nq=st.integers(1, 60),
       which=st.sampled_from(["causal", "window", "sinks", "blockwindow", "union", "inter", "dense", "strided"]))
def test_block_full_is_never_wrong(n, tq, tk, nq, which):
    """``block_full`` may say False for a full tile, never True for a tile with a forbidden pair."""
    pattern = {"causal": nf.Causal(), "window": nf.SlidingWindow(4, 2), "sinks": nf.Sinks(5),
               "blockwindow": nf.BlockWindow(4, 1, 0), "union": nf.SlidingWindow(3) | nf.Sinks(2),
               "inter": nf.SlidingWindow(6) & nf.Causal(), "dense": nf.Dense(), "strided": nf.Strided(3)}[which]
    nk = n

    def chunks(m, size):
        i = torch.arange(-(-m // size) * size)
        return torch.where(i < m, i, -1).view(-1, size)

    qt, kt = Tiles(chunks(nq, tq)), Tiles(chunks(nk, tk))
    full = pattern.block_full(qt, kt, nq, nk)
    mask = pattern.mask(nq, nk)
    for r in range(qt.idx.shape[0]):
        for j in range(kt.idx.shape[0]):
            qs, ks = qt.idx[r][qt.idx[r] >= 0], kt.idx[j][kt.idx[j] >= 0]
            truth = bool(mask[qs][:, ks].all())
            assert not (bool(full[r, j]) and not truth)


@pytest.mark.parametrize("name", ENGINES[1:])
@pytest.mark.parametrize("case", ["window", "window_cross", "sinks", "dense_static"])
def test_every_stream_matches_the_reference(case, name):
    """Shapes where the static blocks are read as runs (moving windows, fixed sinks), with gathered full and
    partial blocks beside them; GQA, B = 2, key padding and a bias with its gradient."""
    torch.manual_seed(5)
    b, hq, hkv, d, t, kb = 2, 4, 2, 8, 8, 4
    nq, nk = (64, 80) if case == "window_cross" else (64, 64)
    pattern = {"window": nf.SlidingWindow(left=19) & nf.Causal(), "window_cross": nf.SlidingWindow(left=19, right=3),
               "sinks": nf.Sinks(12) | nf.Causal() & nf.SlidingWindow(left=2), "dense_static": nf.Dense()}[case]
    qb, nkb = -(-nq // t), -(-nk // kb)
    sel = nf.SelectedBlocks(torch.full((b, hkv, qb), 3), torch.randint(-1, nkb, (b, hkv, qb, 3)), q_block=t,
                            kv_block=kb, within=nf.Causal())
    work = nf.backends.selected.selection_work(pattern, sel, b, hq, hkv, nq, nk)
    assert work["run"] > 0
    q = torch.randn(b, hq, nq, d, requires_grad=True)
    k, v = torch.randn(b, hkv, nk, d, requires_grad=True), torch.randn(b, hkv, nk, d, requires_grad=True)
    kpm = torch.rand(b, nk) > 0.1
    bias = torch.randn(b, 1, nq, nk, requires_grad=True)
    allowed = (sel.pair_mask(nq, nk, hq, hkv) | pattern.mask(nq, nk)) & kpm[:, None, None, :]
    xs64 = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
    expected = ref.dense_reference(*xs64[:3], allowed, d ** -0.5, bias=xs64[3])
    go = torch.randn_like(expected)
    (expected * go).sum().backward()
    for with_bias in (False, True):
        if not with_bias:
            exp0 = ref.dense_reference(*(x.detach() for x in xs64[:3]), allowed, d ** -0.5)
        engine, ctx = engine_context(name)
        with ctx:
            out = nf.attend(q, k, v, pattern, blocks=sel, key_padding_mask=kpm, bias=bias if with_bias else None,
                            engine=engine)
        torch.testing.assert_close(out.double(), expected.detach() if with_bias else exp0, atol=2e-5, rtol=1e-4)
    (out * go.float()).sum().backward()
    for x, x64 in zip((q, k, v, bias), xs64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ENGINES[1:])
@pytest.mark.parametrize("heads,q_block", [("q", 1), ("kv", 1), ("q", 2)])
def test_per_token_selections_read_pair_by_pair(heads, q_block, name):
    """Selections of one query (or two) per list go through the key-block-major path (``selected_pairs``), full
    and partial blocks:
    against the reference, forward and backward, with GQA, B = 2 and key padding."""
    torch.manual_seed(6)
    b, hq, hkv, n, kb = 2, 4, 2, 48, 8
    hs = hq if heads == "q" else hkv
    qb, nkb = n // q_block, n // kb
    idx = torch.randint(-1, nkb, (b, hs, qb, 3))
    sel = nf.SelectedBlocks(torch.full((b, hs, qb), 3), idx, q_block=q_block, kv_block=kb)
    pattern = nf.BlockWindow(kb, 0, 0) & nf.Causal()  # MoBA's current block; the selected ones are whole
    from nearfar.backends.selected import _Problem

    q = torch.randn(b, hq, n, 8, requires_grad=True)
    k, v = torch.randn(b, hkv, n, 8, requires_grad=True), torch.randn(b, hkv, n, 8, requires_grad=True)
    kpm = torch.rand(b, n) > 0.1
    kpm_add = torch.zeros(b, n).masked_fill(~kpm, float("-inf"))
    assert "sel_full" in _Problem(q, k, v, pattern, sel, 0.3, kpm_add, None).pair_streams
    allowed = (sel.pair_mask(n, n, hq, hkv) | pattern.mask(n, n)) & kpm[:, None, None, :]
    xs64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = ref.dense_reference(*xs64, allowed, 8 ** -0.5)
    go = torch.randn_like(expected)
    (expected * go).sum().backward()
    engine, ctx = engine_context(name)
    with ctx:
        out = nf.attend(q, k, v, pattern, blocks=sel, key_padding_mask=kpm, engine=engine)
        (out * go.float()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=1e-4)
    for x, x64 in zip((q, k, v), xs64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-3)


def test_auto_picks_dense_for_small_and_blocksparse_for_long_calls():
    from nearfar.dispatch import choose_engine

    q = torch.zeros(1, 2, 1, 8)
    assert choose_engine(q, nf.Causal(), 1024, 1024, blocks=True) == "dense"
    assert choose_engine(q, None, 4096, 4096, blocks=True) == "blocksparse"  # no pattern: still sparse with blocks
    assert choose_engine(q, nf.PerHead([nf.Causal()] * 2), 4096, 4096, blocks=True) == "dense"
    assert choose_engine(q, nf.Blocks(64), 4096, 4096, blocks=True) == "blocksparse"  # no partition with blocks


def test_auto_takes_the_kernel_for_small_sparse_selections():
    from nearfar.dispatch import _native_blocks_pay

    q = torch.randn(1, 2, 196, 8)
    few = nf.SelectedBlocks(torch.full((1, 1, 49), 4), torch.randint(0, 49, (1, 1, 49, 4)), q_block=4)
    many = nf.SelectedBlocks(torch.full((1, 1, 49), 30), torch.randint(0, 49, (1, 1, 49, 30)), q_block=4)
    assert _native_blocks_pay(q, None, few, 196, 196) == native.available()  # 8% of the pairs
    assert not _native_blocks_pay(q, None, many, 196, 196)  # 61%: the dense engine
    assert not _native_blocks_pay(q, nf.Causal(), few, 196, 196)  # the pattern's half of the pairs counts
    assert not _native_blocks_pay(q.double(), None, few, 196, 196)  # float64: the PyTorch engines


@pytest.mark.parametrize("kb,t", [(64, 64), (128, 32), (96, 16), (32, 100)])
def test_large_blocks_against_the_reference(kb, t):
    """Blocks of a whole 64-key sub-block or more (each sub-block inside one block), blocks that straddle
    sub-blocks, and query blocks over 64 rows (two mask words), with a window, GQA, B = 2 and key padding."""
    torch.manual_seed(7)
    b, hq, hkv, n = 2, 4, 2, 400
    nkb, qb = -(-n // kb), -(-n // t)
    sel = nf.SelectedBlocks(torch.randint(0, 4, (b, hkv, qb)), torch.randint(-1, nkb, (b, hkv, qb, 3)), q_block=t,
                            kv_block=kb, within=nf.Causal())
    pattern = nf.SlidingWindow(left=50) & nf.Causal()
    kpm = torch.rand(b, n) > 0.1
    allowed = (sel.pair_mask(n, n, hq, hkv) | pattern.mask(n, n)) & kpm[:, None, None, :]
    xs = [torch.randn(b, h, n, 16, requires_grad=True) for h in (hq, hkv, hkv)]
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    expected = ref.dense_reference(*xs64, allowed, 0.25)
    go = torch.randn_like(expected)
    (expected * go).sum().backward()
    engine, ctx = engine_context("blocksparse")
    with ctx:
        out = nf.attend(*xs, pattern, blocks=sel, key_padding_mask=kpm, scale=0.25, engine=engine)
        (out * go.float()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=1e-4)
    for x, x64 in zip(xs, xs64):
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-3)
