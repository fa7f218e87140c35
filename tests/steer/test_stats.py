"""``nearfar.steer.stats``: rows, group masses and column aggregates of ``P`` from ``(q, k, lse)``.

Every statistic is compared with the materialised float64 softmax (the masks are the plain-loop oracles of
``tests/reference.py`` via ``strategies.problems``), with the LSE of each engine (dense, block-sparse with and
without the compiled kernel, partition for windows), GQA, B > 1, cross-attention, padding, biases, half precision and
every input layout of the fuzzer; fully masked rows give zeros; ``prob_rows`` of two rows of a 2048 x 2048 problem
never allocates anything near an ``(Nq, Nk)`` tensor; bad arguments raise before any work.
"""

from __future__ import annotations

import contextlib
import doctest
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from probe import LargestStorage
from strategies import problems

import nearfar as nf
from nearfar import native
from nearfar.functional import observe_calls
from nearfar.steer import group_mass, prob_rows, received

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from test_fuzz import LAYOUTS, as_layout, runs_on_partition  # noqa: E402  (the fuzzer's layouts, one definition)

#: max |got - ref| / max(1, |ref|) per input dtype. The CPU engines score half-precision inputs in float32 and the
#: statistics too, so only float32 rounding separates them from the reference (600 random problems: at most 3.3e-6)
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
ENGINES = ("dense", "blocksparse", "blocksparse-python")


def _engine(name):
    """``attend``'s engine name, and (a factory of) the context it runs in (the block-sparse engine's PyTorch path)."""
    return ("blocksparse", native.disabled) if name == "blocksparse-python" else (name, contextlib.nullcontext)


def ref_probs(q, k, allowed, scale, bias=None):
    """Masked softmax probabilities ``(B, Hq, Nq, Nk)`` in float64, zero rows where nothing is allowed."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = torch.broadcast_to(allowed, s.shape)
    s = s.masked_fill(~allowed, float("-inf"))
    any_row = allowed.any(-1, keepdim=True)
    p = torch.softmax(torch.where(any_row, s, 0.0), -1)
    return torch.where(allowed, p, 0.0)


def close(got, want, dtype, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert not got.isnan().any(), what
    err = float((got.detach().double() - want).abs().max()) if want.numel() else 0.0
    bound = TOL[dtype] * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def build(p, dtype, layouts, gen):
    b, hq, hkv, nq, nk, d = p["b"], p["hq"], p["hkv"], p["nq"], p["nk"], p["d"]

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mult).to(dtype)

    q = as_layout(rnd(b, hq, nq, d, mult=1.5), layouts[0], gen)
    k = as_layout(rnd(b, hkv, nk, d, mult=1.5), layouts[1], gen)
    v = rnd(b, hkv, nk, p["dv"])
    kpm = None
    if p["kpm_kind"] != "none":
        kpm = torch.rand(b, nk, generator=gen) > 0.25
        if p["kpm_kind"] == "empty_item":
            kpm[0] = False
    bias = rnd(*p["bias_shape"]) if p["bias_kind"] == "dense" else None
    allowed = p["mask"] if p["mask"].dim() == 3 else p["mask"][None]
    allowed = allowed[None] & (kpm[:, None, None, :] if kpm is not None else True)
    scale = p["scale"] if p["scale"] is not None else d ** -0.5
    return q, k, v, kpm, bias, allowed, scale


def check_all(p, dtype, layouts, engine, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, kpm, bias, allowed, scale = build(p, dtype, layouts, gen)
    pattern, b, hq, nq, nk = p["pattern"], p["b"], p["hq"], p["nq"], p["nk"]
    name, ctx = _engine(engine)
    kw = dict(scale=p["scale"], key_padding_mask=kpm, bias=bias)
    with ctx():
        _, lse = nf.attend(q, k, v, pattern, engine=name, return_lse=True, **kw)
        want = ref_probs(q, k, allowed, scale, bias)
        # rows: a list with a negative index, the same for every item and head
        rows = sorted({int(torch.randint(0, nq, (), generator=gen)) for _ in range(3)}) + [-1]
        close(prob_rows(q, k, lse, rows, pattern, **kw), want[:, :, rows], dtype, "prob_rows")
        # column aggregates, one weight vector and two
        r = torch.rand(b, hq, nq, 2, generator=gen, dtype=torch.float64).to(dtype)
        close(received(q, k, lse, r[..., 0], pattern, **kw, chunk_size=int(torch.randint(1, 40, (), generator=gen))),
              torch.einsum("bhij,bhi->bhj", want, r[..., 0].double()), dtype, "received")
        close(received(q, k, lse, r, pattern, **kw), torch.einsum("bhij,bhim->bhjm", want, r.double()), dtype,
              "received (m=2)")
        # masses of two random groups (one per batch item when B > 1) through passes on the same engine
        groups = torch.rand(b, 2, nk, generator=gen) < 0.4
        mass = group_mass(q, k, None, lse, groups, pattern, engine=name, **kw)
        close(mass, torch.einsum("bhij,bgj->bhig", want, groups.double()), dtype, "group_mass")


@st.composite
def layouts(draw):
    return [draw(st.sampled_from(LAYOUTS)) for _ in range(2)]


@settings(max_examples=150, deadline=None)
@given(p=problems(max_n=150, bias_kinds=("none", "dense"), batches=(1, 2)), dtype=st.sampled_from(
    [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]), lay=layouts(),
    engine=st.sampled_from(ENGINES), seed=st.integers(0, 2**31 - 1))
def test_statistics_equal_the_materialised_softmax(p, dtype, lay, engine, seed):
    check_all(p, dtype, lay, engine, seed)


@settings(max_examples=40, deadline=None)
@given(p=problems(max_n=64, bias_kinds=("none", "dense"), windows_only=True, batches=(1, 2)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), lay=layouts(),
       seed=st.integers(0, 2**31 - 1))
def test_statistics_with_the_partition_engines_lse(p, dtype, lay, seed):
    check_all(p, dtype, lay, "partition" if runs_on_partition(p) else "blocksparse", seed)


@pytest.mark.parametrize("engine", ENGINES)
def test_named_patterns_cross_attention_and_gqa(engine):
    """Causal cross-attention (Nq < Nk and Nq > Nk: early rows see no key), a window, a 2D neighbourhood, B=2, GQA."""
    gen = torch.Generator().manual_seed(1)
    cases = [(nf.Causal(), 20, 33), (nf.Causal(), 33, 20), (nf.SlidingWindow(5, 2) & nf.Causal(), 40, 40),
             (nf.Neighborhood(3, grid=(6, 7)), 42, 42), (nf.PerHead([nf.Causal(), nf.SlidingWindow(3, 3)] * 2), 30, 30),
             (nf.SlidingWindow(6), 1, 25)]  # decode: one query over a cache
    name, ctx = _engine(engine)
    for pattern, nq, nk in cases:
        q, k, v = torch.randn(2, 4, nq, 8, generator=gen), torch.randn(2, 2, nk, 8, generator=gen), \
            torch.randn(2, 2, nk, 8, generator=gen)
        with ctx():
            _, lse = nf.attend(q, k, v, pattern, engine=name, return_lse=True)
        want = ref_probs(q, k, pattern.mask(nq, nk), 8 ** -0.5)
        close(prob_rows(q, k, lse, slice(None), pattern), want, torch.float32, f"{pattern} rows")
        close(received(q, k, lse, torch.ones(2, 4, nq), pattern, chunk_size=7), want.sum(2), torch.float32,
              f"{pattern} received")
        close(prob_rows(q, k, lse, [0, -1, 0], pattern), want[:, :, [0, -1, 0]], torch.float32, f"{pattern} repeats")
        if nq > nk and isinstance(pattern, nf.Causal):  # rows 0..nq-nk-1 have no key: -inf LSE, zero statistics
            dead = slice(0, nq - nk)
            assert torch.isneginf(lse[:, :, dead]).all()
            assert (prob_rows(q, k, lse, slice(0, nq - nk), pattern) == 0).all()
            assert (group_mass(q, k, None, lse, torch.ones(1, nk, dtype=torch.bool), pattern)[:, :, dead] == 0).all()


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = torch.randn(2, 2, 9, 4), torch.randn(2, 1, 9, 4), torch.randn(2, 1, 9, 4)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1] = False  # every row of item 1 is masked
    _, lse = nf.attend(q, k, v, nf.Causal(), key_padding_mask=kpm, return_lse=True)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    kw = dict(key_padding_mask=kpm)
    rows = prob_rows(q, k, lse, [0, 4, 8], nf.Causal(), **kw)
    got = received(q, k, lse, torch.ones(2, 2, 9), nf.Causal(), **kw)
    mass, outs = group_mass(q, k, v, lse, {"all": slice(None), "none": []}, nf.Causal(), return_outputs=True, **kw)
    for t in (rows, got, mass, outs):
        assert not t.isnan().any()
    assert (rows[1] == 0).all() and (got[1] == 0).all() and (mass[1] == 0).all() and (mass[..., 1] == 0).all()
    assert torch.allclose(rows[0].sum(-1), torch.ones(2, 3)) and torch.allclose(mass[0, ..., 0], torch.ones(2, 9))
    # a row whose every allowed score is -inf through the bias is dead too
    bias = torch.zeros(2, 1, 9, 9)
    bias[:, :, 3] = float("-inf")
    _, lse = nf.attend(q, k, v, bias=bias, return_lse=True)
    assert torch.isneginf(lse[:, :, 3]).all()
    rows = prob_rows(q, k, lse, slice(None), bias=bias)
    got = received(q, k, lse, torch.ones(2, 2, 9), bias=bias)
    mass = group_mass(q, k, None, lse, torch.ones(1, 9, dtype=torch.bool), bias=bias)
    assert (rows[:, :, 3] == 0).all() and (mass[:, :, 3] == 0).all() and not rows.isnan().any()
    assert torch.allclose(got.sum(-1), torch.full((2, 2), 8.0)) and torch.allclose(mass[:, :, 4], torch.ones(2, 2, 1))


def test_per_item_and_head_rows_and_prob_rows_gradients():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 11, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 13, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(4, 1, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    pattern = nf.SlidingWindow(4, 1)
    _, lse = nf.attend(q.detach(), k.detach(), k.detach(), pattern, bias=bias.detach(), return_lse=True)
    rows = torch.randint(-11, 11, (2, 4, 3), generator=gen)  # per (item, head), negatives included
    got = prob_rows(q, k, lse, rows, pattern, bias=bias)
    allowed = pattern.mask(11, 13)
    want = ref_probs(q, k, allowed, 6 ** -0.5, bias)
    pick = torch.gather(want, 2, (rows % 11)[..., None].expand(2, 4, 3, 13))
    close(got, pick.detach(), torch.float64, "per-row selection")
    w = torch.randn(2, 4, 3, 13, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad((got * w).sum(), (q, k, bias))
    wants = torch.autograd.grad((pick * w).sum(), (q, k, bias))
    for g, r, name in zip(grads, wants, ("q", "k", "bias")):
        close(g, r, torch.float64, f"d{name}")


def test_group_forms_and_outputs():
    gen = torch.Generator().manual_seed(3)
    b, nk = 2, 16
    q, k, v = torch.randn(b, 2, 12, 8, generator=gen), torch.randn(b, 1, nk, 8, generator=gen), \
        torch.randn(b, 1, nk, 5, generator=gen)
    pattern = nf.Causal()
    _, lse = nf.attend(q, k, v, pattern, return_lse=True)
    per_item = torch.rand(b, nk, generator=gen) < 0.5
    forms = {"sink": 0, "tail": slice(-4, None), "picked": [1, 3, -5], "indices": torch.tensor([2, 7]),
             "mask": torch.arange(nk) % 3 == 0, "per_item": per_item}
    mass, outs = group_mass(q, k, v, lse, forms, pattern, return_outputs=True)
    member = torch.zeros(b, len(forms), nk, dtype=torch.bool)
    for g, idx in enumerate([[0], list(range(12, 16)), [1, 3, 11], [2, 7], list(range(0, 16, 3))]):
        member[:, g, idx] = True
    member[:, 5] = per_item
    same = group_mass(q, k, None, lse, member, pattern)
    assert torch.equal(mass, same) and list(forms) == ["sink", "tail", "picked", "indices", "mask", "per_item"]
    want = ref_probs(q, k, pattern.mask(12, nk), 8 ** -0.5)
    close(mass, torch.einsum("bhij,bgj->bhig", want, member.double()), torch.float32, "dict groups")
    # each group's output is attention restricted to its keys; groups that split the keys add up to the output
    for g in range(len(forms)):
        keep = member[:, g]
        allowed = pattern.mask(12, nk)[None, None] & keep[:, None, None, :]
        ref_out = torch.einsum("bhij,bhjd->bhid", ref_probs(q, k, allowed, 8 ** -0.5),
                               v.double().repeat_interleave(2, 1))
        close(outs[:, :, :, g], ref_out, torch.float32, f"output of group {g}")
    split = torch.stack([per_item, ~per_item], 1)
    mass2, outs2 = group_mass(q, k, v, lse, split, pattern, return_outputs=True)
    full = nf.attend(q, k, v, pattern)
    assert torch.allclose((mass2[..., None] * outs2).sum(3), full, atol=1e-5)


def test_no_nq_by_nk_allocation():
    n, d = 2048, 64
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, n, d, generator=gen) for _ in range(3))
    kpm = torch.rand(1, n, generator=gen) > 0.1
    _, lse = nf.attend(q, k, v, nf.Causal(), key_padding_mask=kpm, return_lse=True)
    limit = n * n * 4 // 8
    with LargestStorage() as seen:  # the tracker sees a materialised map: it can fail
        torch.matmul(q, k.transpose(-1, -2))
    assert seen.largest >= n * n * 4
    with LargestStorage() as seen:
        rows = prob_rows(q, k, lse, [5, n - 1], nf.Causal(), key_padding_mask=kpm)
    assert rows.shape == (1, 1, 2, n) and seen.largest < limit, seen.largest
    with LargestStorage() as seen:
        got = received(q, k, lse, torch.ones(1, 1, n), nf.Causal(), key_padding_mask=kpm, chunk_size=64)
    assert seen.largest < limit, seen.largest
    assert torch.allclose(got.sum(), torch.tensor(float(n)), rtol=1e-4)
    assert torch.allclose(rows.sum(-1), torch.ones(1, 1, 2), atol=1e-5)


def _bad_calls():
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    lse = torch.zeros(2, 4, 10)
    r = torch.ones(2, 4, 10)
    g = torch.ones(1, 12, dtype=torch.bool)
    return [
        (lambda: prob_rows(q[0], k, lse, 0), ValueError, "q must be 4D"),
        (lambda: prob_rows(q, k.double(), lse, 0), TypeError, "dtype"),
        (lambda: prob_rows(q, k[:, :, :, :4], lse, 0), ValueError, "head dim"),
        (lambda: prob_rows(q, torch.randn(2, 3, 12, 8), lse, 0), ValueError, "multiple"),
        (lambda: prob_rows(q, k, lse[..., :9], 0), ValueError, "lse must be (B, Hq, Nq)"),
        (lambda: prob_rows(q, k, lse.long(), 0), TypeError, "lse must be a floating"),
        (lambda: prob_rows(q, k, lse, 10), ValueError, "rows must lie in [-Nq, Nq - 1]"),
        (lambda: prob_rows(q, k, lse, [-11]), ValueError, "rows must lie"),
        (lambda: prob_rows(q, k, lse, torch.tensor([0.5])), TypeError, "rows must be"),
        (lambda: prob_rows(q, k, lse, torch.zeros(3, 4, 2, dtype=torch.long)), ValueError, "(B|1, Hq|1, R)"),
        (lambda: prob_rows(q, k, lse, torch.ones(9, dtype=torch.bool)), ValueError, "bool rows"),
        (lambda: prob_rows(q, k, lse, "0"), TypeError, "rows must be"),
        (lambda: prob_rows(q, k, lse, 0, nf.Neighborhood(3, grid=(3, 3))), ValueError, "grid"),
        (lambda: prob_rows(q, k, lse, 0, nf.PerHead([nf.Causal()] * 3)), ValueError, "PerHead"),
        (lambda: prob_rows(q, k, lse, 0, "causal"), TypeError, "pattern must be"),
        (lambda: prob_rows(q, k, lse, 0, bias=torch.zeros(3, 12)), ValueError, "bias of shape"),
        (lambda: prob_rows(q, k, lse, 0, key_padding_mask=torch.ones(2, 10, dtype=torch.bool)), ValueError,
         "key_padding_mask"),
        (lambda: prob_rows(q, k, lse, 0, scale=-1.0), ValueError, "scale"),
        (lambda: received(q, k, lse, r[..., :5]), ValueError, "r must be (B, Hq, Nq)"),
        (lambda: received(q, k, lse, r.bool()), TypeError, "r must be a floating"),
        (lambda: received(q, k, lse, r, chunk_size=0), ValueError, "chunk_size"),
        (lambda: group_mass(q, k, None, lse, torch.ones(1, 11, dtype=torch.bool)), ValueError, "groups must be"),
        (lambda: group_mass(q, k, None, lse, torch.ones(1, 12)), TypeError, "groups must be a bool"),
        (lambda: group_mass(q, k, None, lse, {}), TypeError, "non-empty dict"),
        (lambda: group_mass(q, k, None, lse, {"a": 12}), ValueError, "groups['a'] must lie in [-Nk, Nk - 1]"),
        (lambda: group_mass(q, k, None, lse, {"a": torch.ones(5, dtype=torch.bool)}), ValueError, "groups['a']"),
        (lambda: group_mass(q, k, None, lse, {"a": 1.5}), TypeError, "groups['a']"),
        (lambda: group_mass(q, k, None, lse, g, return_outputs=True), ValueError, "needs the values v"),
        (lambda: group_mass(q, k, v[..., :5, :], lse, g), ValueError, "same length"),
        (lambda: group_mass(q, k, None, lse, g, engine="fast"), ValueError, "engine"),
        (lambda: group_mass(q, k, None, lse, g, nf.Causal(), engine="partition"), ValueError, "partition"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_before_any_work(case):
    call, err, fragment = _bad_calls()[case]
    with observe_calls() as calls, pytest.raises(err) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    assert not calls  # no attention pass ran


def test_docstring_examples():
    import nearfar.steer.stats as module

    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
