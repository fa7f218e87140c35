"""FlexAttention's ``mask_mod`` (``nf.MaskMod``) and ``score_mod`` (``attend(..., score_mod=...)``) on every engine,
against FlexAttention itself and a float64 reference written here.

Oracles: PyTorch's ``flex_attention`` run eagerly on CPU with ``create_block_mask`` (forward; on CPU Flex refuses
gradients), and for gradients Flex's own eager math (``torch._higher_order_ops.flex_attention.math_attention``, what
eager ``flex_attention`` evaluates: the vmapped score_mod and mask_mod on the materialised scores, differentiated by
autograd); plus ``dense64``, a float64 masked softmax over the materialised pairs in plain torch.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import as_layout

import nearfar as nf
from nearfar import native
from nearfar.patterns import maskmod

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
math_attention = pytest.importorskip("torch._higher_order_ops.flex_attention").math_attention

ENGINES = ("dense", "blocksparse", "blocksparse-torch")
#: what hypothesis draws from: a skip inside a ``@given`` test would skip the whole test, every other engine too
RUNNABLE = tuple(e for e in ENGINES if e != "blocksparse" or native.available())


def engine_context(name):
    if name == "blocksparse-torch":
        return "blocksparse", native.disabled()
    if name == "blocksparse" and not native.available():
        pytest.skip(native.status())
    return name, contextlib.nullcontext()


def grid(b, h, nq, nk):
    return [torch.arange(n).view([-1 if i == j else 1 for j in range(4)]) for i, n in enumerate((b, h, nq, nk))]


def dense64(q, k, v, allowed, scale, score_mod=None, kpm=None):
    """Float64 masked softmax: ``score_mod`` on ``q . k * scale``, then the mask; an empty row gives 0."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, nq, _ = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    idx = grid(b, hq, nq, k.shape[2])
    if score_mod is not None:
        s = score_mod(s, *idx).double()
    ok = torch.broadcast_to(allowed, s.shape)
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    s = torch.where(ok, s, float("-inf"))
    live = ok.any(-1, keepdim=True)
    p = torch.softmax(torch.where(live, s, 0.0), -1) * live
    return p @ v


# ----- mask_mods and score_mods of the kinds Flex users write -----
def make_mask(kind, b, hq, nq, nk, gen):
    if kind == "causal":
        return lambda bi, h, qi, ki: qi >= ki
    if kind == "sliding":
        w = int(torch.randint(1, 12, (), generator=gen))
        return lambda bi, h, qi, ki: (qi >= ki) & (qi - ki < w)
    if kind == "document":  # per-item document ids (packed sequences), causal inside each document
        dq = torch.randint(0, 3, (b, nq), generator=gen).sort(-1).values
        dk = torch.randint(0, 3, (b, nk), generator=gen).sort(-1).values
        return lambda bi, h, qi, ki: (dq[bi, qi] == dk[bi, ki]) & (qi >= ki)
    if kind == "prefix_lm":  # bidirectional over a per-item prefix, causal after it
        prefix = torch.randint(0, max(1, nk // 2), (b,), generator=gen)
        return lambda bi, h, qi, ki: (ki <= prefix[bi]) | (qi >= ki)
    assert kind == "per_head"  # a window per head
    return lambda bi, h, qi, ki: (qi >= ki) & (qi - ki < 3 + 5 * h)


def make_score(kind, hq, nq, nk, gen):
    """(score_mod, captured tensors that get gradients)."""
    if kind == "none":
        return None, []
    if kind == "alibi":  # learned slopes, Press et al.'s linear bias
        slopes = (torch.rand(hq, generator=gen, dtype=torch.float64) * 0.5).float().requires_grad_()
        return (lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi)), [slopes]
    if kind == "softcap":  # Gemma 2: softcap * tanh(score / softcap)
        return (lambda s, b, h, qi, ki: 1.5 * torch.tanh(s / 1.5)), []
    assert kind == "table"  # a learned relative-position table per head
    tab = torch.randn(hq, nq + nk, generator=gen).requires_grad_()
    return (lambda s, b, h, qi, ki: s + tab[h, qi - ki + nk]), [tab]


@st.composite
def problems(draw):
    p = dict(b=draw(st.integers(1, 3)), hkv=draw(st.integers(1, 2)), nq=draw(st.integers(1, 150)), d=8,
             mask=draw(st.sampled_from(["causal", "sliding", "document", "prefix_lm", "per_head"])),
             score=draw(st.sampled_from(["none", "alibi", "softcap", "table"])), kpm=draw(st.booleans()),
             layouts=[draw(st.sampled_from(["contiguous", "bnhd", "d_major", "sliced", "last_strided"]))
                      for _ in range(3)], seed=draw(st.integers(0, 2 ** 16)))
    p["hq"] = p["hkv"] * draw(st.integers(1, 2))
    p["nk"] = p["nq"] if draw(st.booleans()) else draw(st.integers(1, 150))
    return p


def build(p):
    gen = torch.Generator().manual_seed(p["seed"])
    b, hq, hkv, nq, nk, d = p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"]
    q, k, v = (as_layout(torch.randn(b, h, n, d, generator=gen), lay, gen).requires_grad_()
               for (h, n), lay in zip(((hq, nq), (hkv, nk), (hkv, nk)), p["layouts"]))
    mask = make_mask(p["mask"], b, hq, nq, nk, gen)
    score, params = make_score(p["score"], hq, nq, nk, gen)
    kpm = torch.rand(b, nk, generator=gen) > 0.25 if p["kpm"] else None
    return q, k, v, mask, score, params, kpm


def flex_grads(q, k, v, mask, score, params, kpm, scale, go):
    """Output and gradients from Flex's eager math (the key padding folded into the mask_mod)."""
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    full = mask if kpm is None else (lambda bi, h, qi, ki: mask(bi, h, qi, ki) & kpm[bi, ki])
    bm = flex_mod.create_block_mask(full, b, hq, nq, nk, device="cpu")
    out = math_attention(q, k, v, score or (lambda s, *_: s), bm.as_tuple(), scale, {})[0]
    return out, torch.autograd.grad(out, [q, k, v, *params], go)


@settings(max_examples=25, deadline=None)
@given(problems(), st.sampled_from(RUNNABLE))
def test_mask_and_score_mods_match_flex(p, name):
    engine, ctx = engine_context(name)
    q, k, v, mask, score, params, kpm = build(p)
    scale = p["d"] ** -0.5
    go = torch.randn(p["b"], p["hq"], p["nq"], p["d"], generator=torch.Generator().manual_seed(1))
    with ctx:
        out = nf.attend(q, k, v, nf.MaskMod(mask), score_mod=score, key_padding_mask=kpm, engine=engine)
        grads = torch.autograd.grad(out, [q, k, v, *params], go)
    ref_out, ref_grads = flex_grads(q, k, v, mask, score, params, kpm, scale, go)
    allowed = mask(*grid(p["b"], p["hq"], p["nq"], p["nk"]))
    r64 = dense64(q, k, v, allowed, scale, score, kpm)
    r64_grads = torch.autograd.grad(r64, [q, k, v, *params], go.double())
    assert torch.isfinite(out).all()
    assert (out - ref_out).abs().max() < 2e-5 and (out - r64).abs().max() < 2e-5
    for g, gf, g64 in zip(grads, ref_grads, r64_grads):
        assert (g - gf).abs().max() < 2e-4 * max(1.0, gf.abs().max())
        assert (g - g64).abs().max() < 2e-4 * max(1.0, g64.abs().max())


FLEX_CASES = [("document", "table", 2, 4, 2, 90, 90), ("per_head", "alibi", 1, 4, 2, 70, 70),
              ("prefix_lm", "softcap", 2, 2, 1, 50, 80), ("sliding", "none", 3, 2, 2, 128, 128)]


@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_public_flex_attention_and_the_flex_engine(case, eager_flex):
    """Forward against public ``flex_attention`` + ``create_block_mask`` (eager), on every engine including
    ``"flex"`` (forward-only on CPU)."""
    mask_kind, score_kind, b, hq, hkv, nq, nk = case
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, nq, 16, generator=gen)
    k, v = (torch.randn(b, hkv, nk, 16, generator=gen) for _ in range(2))
    mask = make_mask(mask_kind, b, hq, nq, nk, gen)
    score, _ = make_score(score_kind, hq, nq, nk, gen)
    with torch.no_grad():
        bm = flex_mod.create_block_mask(mask, b, hq, nq, nk, device="cpu")
        want = flex_mod.flex_attention(q, k, v, score_mod=score, block_mask=bm, enable_gqa=hq != hkv)
        pattern = nf.MaskMod(mask)
        for engine in ("dense", "blocksparse", "flex"):
            out = nf.attend(q, k, v, pattern, score_mod=score, engine=engine)
            assert (out - want).abs().max() < 2e-5, engine


@pytest.mark.parametrize("name", ENGINES)
def test_empty_rows_are_zero_with_finite_gradients(name):
    engine, ctx = engine_context(name)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=gen).requires_grad_() for _ in range(3))
    tab = torch.randn(2, 80, generator=gen).requires_grad_()
    pattern = nf.MaskMod(lambda b, h, qi, ki: (qi >= ki) & (qi % 7 != 3))  # rows 3, 10, ... see nothing
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1] = False  # item 1: no key at all
    with ctx:
        out = nf.attend(q, k, v, pattern, key_padding_mask=kpm, engine=engine,
                        score_mod=lambda s, b, h, qi, ki: s + tab[h, qi - ki + 40])
        (out * torch.randn(out.shape, generator=gen) * 10).sum().backward()  # cotangents at the empty rows too
    assert out[1].abs().max() == 0 and out[0, :, 3::7].abs().max() == 0
    assert out[0, :, 4].abs().max() > 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, tab))


def test_partition_engine_takes_a_window_mask_mod_and_auto_does_not_pick_it():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 256, 8, generator=gen).requires_grad_() for _ in range(3))
    windows = nf.MaskMod(lambda b, h, qi, ki: qi // 128 == ki // 128)
    slopes = torch.tensor([0.1, 0.3], requires_grad=True)
    alibi = lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs()  # noqa: E731
    out = nf.attend(q, k, v, windows, score_mod=alibi, engine="partition")
    allowed = windows.fn(*grid(2, 2, 256, 256))
    ref = dense64(q, k, v, allowed, 8 ** -0.5, alibi)
    assert (out - ref).abs().max() < 1e-5
    g = torch.autograd.grad(out.sum(), [q, slopes])
    g64 = torch.autograd.grad(ref.sum(), [q, slopes])
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(g, g64))
    from nearfar.dispatch import choose_engine
    assert choose_engine(q, windows, 256, 256) != "partition"
    with pytest.raises(ValueError, match="partition"):
        nf.attend(q, k, v, nf.MaskMod(lambda b, h, qi, ki: qi >= ki), engine="partition")


@pytest.mark.parametrize("name", ENGINES + ("flex",))
def test_selected_blocks_with_a_mask_mod_and_a_score_mod(name, eager_flex):
    engine, ctx = engine_context(name) if name != "flex" else ("flex", torch.no_grad())
    gen = torch.Generator().manual_seed(6)
    b, hq, hkv, n, blk = 2, 4, 2, 96, 16
    q = torch.randn(b, hq, n, 8, generator=gen).requires_grad_(name != "flex")
    k, v = (torch.randn(b, hkv, n, 8, generator=gen).requires_grad_(name != "flex") for _ in range(2))
    num = torch.randint(0, 3, (b, hkv, n // blk), generator=gen)
    idx = torch.randint(-1, n // blk, (b, hkv, n // blk, 2), generator=gen)
    sel = nf.SelectedBlocks(num, idx, q_block=blk, within=nf.Causal())
    window = nf.MaskMod(lambda bi, h, qi, ki: (qi >= ki) & (qi - ki < 4 + 3 * h))  # per head: a PerHead inside
    soft = lambda s, bi, h, qi, ki: 2.0 * torch.tanh(s / 2.0)  # noqa: E731
    with ctx:
        out = nf.attend(q, k, v, window, blocks=sel, score_mod=soft, engine=engine)
    allowed = sel.pair_mask(n, n, hq, hkv) | window.fn(*grid(b, hq, n, n))
    ref = dense64(q, k, v, allowed, 8 ** -0.5, soft)
    assert (out - ref).abs().max() < 2e-5
    if name != "flex":
        g = torch.autograd.grad(out.sum(), [q, k, v])
        g64 = torch.autograd.grad(ref.sum(), [q, k, v])
        assert all((a - c).abs().max() < 1e-4 for a, c in zip(g, g64))


def test_scan_is_cached_and_blind_to_unused_batch_and_heads(monkeypatch):
    scans, pairs = [], []
    real = maskmod.scan

    def counted(fn, *args):
        scans.append(args)
        return real(fn, *args)

    def sliding(b, h, qi, ki):
        out = (qi >= ki) & (qi - ki < 50)
        if out.dim() == 4:  # the scan's calls (the engines' exact masks use 2D/3D indices)
            pairs.append(out.numel())
        return out

    monkeypatch.setattr(maskmod, "scan", counted)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(3, 4, 300, 8, generator=gen) for _ in range(3))
    p = nf.MaskMod(sliding)
    for engine in ("dense", "blocksparse", "dense", "blocksparse"):
        nf.attend(q, k, v, p, engine=engine)
    assert len(scans) == 1 and sum(pairs) == 300 * 300  # once, and over Nq x Nk pairs only, not B x H x ...
    calls = len(pairs)
    nf.attend(q[:, :, :200], k, v, p)
    assert len(scans) == 2 and len(pairs) > calls  # a new shape: a new scan
    found = p.scan(3, 4, 300, 300, "cpu")
    assert not found.by_batch and not found.by_head and found.any.shape[:2] == (1, 1)
    doc = torch.randint(0, 2, (3, 300), generator=gen)
    per_item = nf.MaskMod(lambda b, h, qi, ki: (doc[b, qi] == doc[b, ki]) & (h >= 0))
    found = per_item.scan(3, 4, 300, 300, "cpu")
    assert found.by_batch and not found.by_head and found.any.shape[:2] == (3, 1)


def test_bad_mods_raise_errors_naming_them():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(TypeError, match="mask_mod.*bool"):
        nf.attend(q, q, q, nf.MaskMod(lambda b, h, qi, ki: (qi >= ki).float()))
    with pytest.raises(ValueError, match="mask_mod.*shape"):
        nf.attend(q, q, q, nf.MaskMod(lambda b, h, qi, ki: torch.ones(3, 5, 7, dtype=torch.bool)))
    with pytest.raises(TypeError, match="mask_mod.*4 positional"):
        nf.MaskMod(lambda s, b, h, qi, ki: qi >= ki)
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        nf.MaskMod(torch.ones(2, 2, dtype=torch.bool))
    for engine in ("dense", "blocksparse"):
        with pytest.raises(TypeError, match="score_mod.*floating"):
            nf.attend(q, q, q, nf.Causal(), engine=engine, score_mod=lambda s, b, h, qi, ki: s > 0)
        with pytest.raises(ValueError, match="score_mod.*shape"):
            nf.attend(q, q, q, nf.Causal(), engine=engine, score_mod=lambda s, b, h, qi, ki: s.sum(-1))
    with pytest.raises(TypeError, match="score_mod.*5 positional"):
        nf.attend(q, q, q, score_mod=lambda b, h, qi, ki: qi >= ki)
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        nf.attend(q, q, q, score_mod=3.0)


def test_without_a_pattern_a_long_scored_call_is_not_materialised():
    from nearfar.dispatch import choose_engine

    q = torch.randn(1, 1, 2048, 8)
    assert choose_engine(q, None, 2048, 2048, scored=True) == "blocksparse"
    assert choose_engine(q, None, 2048, 2048) == "dense"
    decay = lambda s, b, h, qi, ki: s - 0.01 * (qi - ki).abs()  # noqa: E731
    out = nf.attend(q, q, q, score_mod=decay)
    ref = dense64(q, q, q, torch.ones((), dtype=torch.bool), 8 ** -0.5, decay)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("engine", ["dense", "blocksparse"])
def test_garbage_keys_with_a_score_mod(engine):
    """NaN in padded keys changes nothing; a huge value in an allowed key reaches its rows as the float64 reference
    has it (the guard's exact rows, ``nearfar.guard``, apply the score_mod too: here it caps the huge scores)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=gen) for _ in range(3))
    kpm = torch.rand(2, 64, generator=gen) > 0.3
    kpm[:, 5] = True
    tab = torch.randn(2, 128, generator=gen)
    mod = lambda s, b, h, qi, ki: 3.0 * torch.tanh(s / 3.0) + tab[h, qi - ki + 64]  # noqa: E731
    causal = nf.MaskMod(lambda b, h, qi, ki: qi >= ki)
    clean = [x.clone().requires_grad_() for x in (q, k, v)]
    out = nf.attend(*clean, causal, key_padding_mask=kpm, score_mod=mod, engine=engine)
    grads = torch.autograd.grad(out.sum(), clean)
    dirty = [q.clone(), k.masked_fill(~kpm[:, None, :, None], float("nan")), v.clone()]
    dirty = [x.requires_grad_() for x in dirty]
    out2 = nf.attend(*dirty, causal, key_padding_mask=kpm, score_mod=mod, engine=engine)
    grads2 = torch.autograd.grad(out2.sum(), dirty)
    for a, b in zip((out, *grads), (out2, *grads2)):
        assert torch.isfinite(b).all() and (a - b).abs().max() < 1e-5
    huge = k.clone()
    huge[:, :, 5] *= 1e30
    leaves = [x.clone().requires_grad_() for x in (q, huge, v)]
    out = nf.attend(*leaves, causal, key_padding_mask=kpm, score_mod=mod, engine=engine)
    ref = dense64(*leaves, causal.fn(*grid(2, 2, 64, 64)), 8 ** -0.5, mod, kpm)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-5


def test_docs_page_examples_run():
    """Every code block of docs/flex.md runs as written, in order (the page is copy-paste material)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "flex.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 5
    env: dict = {}
    torch.manual_seed(0)
    exec(compile("\n".join(blocks), "docs/flex.md", "exec"), env)
    assert env["out"].shape == (2, 4, 512, 32)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([1, 5, 16, 64, 128]), st.sampled_from(
    ["causal", "sliding", "document", "prefix_lm"]), st.integers(0, 2 ** 16))
def test_tile_answers_are_conservative(nq, nk, tile, kind, seed):
    """``block_allowed`` from the scan never misses an allowed pair, ``block_full`` never claims a forbidden one,
    for tiles of any size and offset (the engines ask at 128 tokens, the key-by-key narrowing at 1, run-time blocks
    at their own sizes), and both are exact at the scan's own 16-token blocks."""
    gen = torch.Generator().manual_seed(seed)
    fn = make_mask(kind, 1, 1, nq, nk, gen)
    p = nf.MaskMod(fn)
    exact = fn(*grid(1, 1, nq, nk))[0, 0]

    def chunks(n, t, start):
        i = torch.arange(-start, n + t)
        i = i[: (i.numel() // t) * t].view(-1, t)
        return torch.where((i >= 0) & (i < n), i, -1)

    for t, start in ((tile, 0), (tile, tile // 2), (16, 0)):
        qt, kt = nf.patterns.Tiles(chunks(nq, t, start)), nf.patterns.Tiles(chunks(nk, t, start))
        qi, ki = qt.idx.clamp(min=0), kt.idx.clamp(min=0)
        pairs = exact[qi[:, None, :, None], ki[None, :, None, :]]  # (nTq, nTk, t, t)
        both = (qt.idx >= 0)[:, None, :, None] & (kt.idx >= 0)[None, :, None, :]
        any_ok, all_ok = (pairs & both).flatten(2).any(-1), (pairs | ~both).flatten(2).all(-1)
        live = both.flatten(2).any(-1)
        got_any, got_full = p.block_allowed(qt, kt, nq, nk), p.block_full(qt, kt, nq, nk)
        assert not (any_ok & ~got_any).any() and not (got_full & ~(all_ok & live)).any()
        if t == 16 and start == 0:  # the scan's own blocks: exact
            assert torch.equal(got_any, any_ok) and torch.equal(got_full, all_ok & live)
        paired = p.block_allowed(qt, nf.patterns.Tiles(kt.idx.expand(qt.idx.shape[0], -1, -1)), nq, nk)
        assert torch.equal(paired, got_any)  # the paired form (nTq, M, t) gives the same answers


def test_unhashable_mask_mod_is_refused():
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, b, h, qi, ki):
            return qi >= ki

    with pytest.raises(TypeError, match="mask_mod must be hashable"):
        nf.MaskMod(Unhashable())


def test_partition_checks_every_head_of_a_head_dependent_mask_mod():
    q = torch.randn(1, 2, 256, 8)
    windows = nf.MaskMod(lambda b, h, qi, ki: torch.where(h == 0, qi // 128 == ki // 128, (qi - ki).abs() < 9))
    with pytest.raises(ValueError, match="partition"):  # head 0 is windows, head 1 is not
        nf.attend(q, q, q, windows, engine="partition")
    same = nf.MaskMod(lambda b, h, qi, ki: (qi // (64 * (h + 1)) == ki // (64 * (h + 1))))
    out = nf.attend(q, q, q, same, engine="partition")
    assert (out - dense64(q, q, q, same.fn(*grid(1, 2, 256, 256)), 8 ** -0.5)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ENGINES + ("partition", "table-blocksparse"))
def test_score_mod_with_a_bias_or_a_table_and_their_gradients(name):
    """``softmax(score_mod(q . k * scale) + bias)``: a dense bias and a relative-position table both get their
    gradients beside the score_mod's captured tensor."""
    tables = {"partition": ("partition", nf.Blocks(8, grid=(8, 8)), 15),
              "table-blocksparse": ("blocksparse", nf.Neighborhood(5, grid=(8, 8)), 9)}
    engine, ctx = engine_context(name) if name not in tables else (tables[name][0], native.disabled())
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=gen).requires_grad_() for _ in range(3))
    slopes = torch.tensor([0.2, 0.05], requires_grad=True)
    mod = lambda s, b, h, qi, ki: 2.0 * torch.tanh(s / 2.0) - slopes[h] * (qi - ki).abs()  # noqa: E731
    if name in tables:
        _, pattern, m = tables[name]
        extra = {"rpb": torch.randn(2, m, m, generator=gen).requires_grad_()}
    else:
        pattern, extra = nf.MaskMod(lambda b, h, qi, ki: qi >= ki), {
            "bias": torch.randn(2, 1, 64, 64, generator=gen).requires_grad_()}
    with ctx:
        out = nf.attend(q, k, v, pattern, score_mod=mod, engine=engine, **extra)
    leaves = [q, k, v, slopes, *extra.values()]
    grads = torch.autograd.grad(out.sum(), leaves)
    # the reference: the same call on the dense engine, in float64 (the bias or table looked up by it)
    with torch.no_grad():
        allowed = pattern.mask(64, 64)
    values = extra.get("bias")
    if values is None:  # the table as the dense bias it adds, through the dense engine's own lookup
        from nearfar.backends.dense import dense_bias
        from nearfar.bias import RelativePositionBias
        values = dense_bias(RelativePositionBias(extra["rpb"], pattern, 64), 64, 64, "cpu")
    ref = dense64(q, k, v, allowed, 8 ** -0.5, lambda s, *i: mod(s, *i) + values.double())
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    assert (out - ref).abs().max() < 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max())
