"""``nearfar.steer.control`` (``nearfar/steer/steering.py``): every edit on the dense, block-sparse and partition
engines equals the edit applied to the materialised probabilities in float64; schedules, captures and their
budget; the layers whose attention does not run through ``attend`` (fused SDPA calls, the window kernel,
``attend_rows``) are still seen."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from probe import CASES, LargestStorage, N, Probe, keys_mask, run_with
from torch import nn

import nearfar as nf
from nearfar.steer import (
    AblateHeads,
    Bias,
    Capture,
    KeyMask,
    Redistribute,
    Rescale,
    ScaleHeads,
    Site,
    Temperature,
    TokenGroups,
    control,
    find_sites,
    layers,
    steps,
)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_each_edit_equals_the_edited_probabilities(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    keys = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=8, unique=True))
    heads = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    rows = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=10, unique=True))
    factor = data.draw(st.floats(0.0, 4.0))
    kind = data.draw(st.sampled_from(["keymask", "bias", "bias_fn", "temperature", "rescale", "rescale_raw",
                                      "scale_heads", "ablate_zero", "ablate_mean", "composed"]))
    km, hsel = keys_mask(keys), torch.tensor(heads)
    hmask = torch.zeros(4, dtype=torch.bool).index_fill_(0, hsel, True)
    rmask = keys_mask(rows)
    p = probe.probabilities()
    if kind == "keymask":
        edits = [(None, KeyMask(keys, heads=heads, rows=rows))]
        forbid = km[None, None, None, :] & hmask[None, :, None, None] & rmask[None, None, :, None]
        expected = probe.out(probe.probabilities(torch.zeros(forbid.shape).masked_fill(forbid, float("-inf"))))
    elif kind in ("bias", "bias_fn"):
        bias = torch.randn(1, 4, N, N)
        edits = [(None, Bias(bias if kind == "bias" else lambda b, h, q, k: bias[0][h, q, k]))]
        expected = probe.out(probe.probabilities(bias))
    elif kind == "temperature":
        t = torch.tensor([0.5, 1.0, 2.0, 3.0])
        edits = [(None, Temperature(t))]
        expected = probe.out(probe.probabilities(q=probe.q / t[None, :, None, None]))
    elif kind in ("rescale", "rescale_raw"):
        edits = [(None, Rescale(keys, factor, heads=heads, renormalize=kind == "rescale"))]
        c = torch.where(km[None, None, None, :] & hmask[None, :, None, None], factor, 1.0).double()
        pc = p * c
        if kind == "rescale":
            pc = pc / pc.sum(-1, keepdim=True).clamp_min(1e-300) * (p.sum(-1, keepdim=True) > 0)
        expected = probe.out(pc)
    elif kind == "scale_heads":
        f = [0.0, 2.0, -1.0, 0.5]
        edits = [(None, ScaleHeads(f))]
        expected = probe.out(p) * torch.tensor(f, dtype=torch.float64)[None, :, None, None]
    elif kind in ("ablate_zero", "ablate_mean"):
        edits = [(None, AblateHeads(heads, mode=kind.split("_")[1]))]
        o = probe.out(p)
        repl = torch.zeros_like(o) if kind == "ablate_zero" else o.mean(2, keepdim=True).expand_as(o)
        expected = torch.where(hmask[None, :, None, None], repl, o)
    else:  # temperature, then a key mask, then an unnormalised rescale, then a head scale: in this order
        t = 2.0
        edits = [(None, Temperature(t)), (None, KeyMask(keys[:1])), (None, Rescale(keys, factor, renormalize=False)),
                 (None, ScaleHeads([1.0, 0.0, 3.0, 1.0]))]
        forbid = keys_mask(keys[:1])[None, None, None, :].expand(1, 4, N, N)
        base = probe.probabilities(torch.zeros(forbid.shape).masked_fill(forbid, float("-inf")), q=probe.q / t)
        c = torch.where(km, factor, 1.0).double()
        expected = probe.out(base * c) * torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64)[None, :, None, None]
    out = run_with(probe, edits)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    assert torch.isfinite(out).all()


def test_capture_records_inputs_and_outputs_in_order():
    probe = Probe("blocksparse-na-rpb")
    first, last = Capture(("q", "k", "v", "pattern", "head_out")), Capture(("head_out", "lse"))
    with control(probe, [(None, first), (None, Temperature(2.0)), (None, ScaleHeads([2.0] * 4)), (None, last)],
                 sites=[Site("probe", probe, 0, "self")]) as run:
        out = probe()
    rec = run.records["probe"]
    assert len(rec) == 2 and rec[0]["pattern"] == probe.pattern  # the first capture, then the last
    torch.testing.assert_close(rec[0]["q"], probe.q)  # before the temperature edit
    torch.testing.assert_close(rec[1]["head_out"], out)  # after the head scale
    torch.testing.assert_close(rec[0]["head_out"] * 2, out)  # before it
    p = probe.probabilities(q=probe.q / 2.0)
    lse_ok = p.sum(-1) > 0
    assert torch.isneginf(rec[1]["lse"][~lse_ok]).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_captured_probability_rows_are_the_edited_ones(case):
    probe = Probe(case)
    rows = [0, 5, N - 1]
    cap = Capture(("probs", "scores"), rows=rows)
    forbid = keys_mask([3, 4])[None, None, None, :].expand(1, 4, N, N)
    edit_bias = torch.zeros(forbid.shape).masked_fill(forbid, float("-inf"))
    expected = probe.probabilities(edit_bias)[:, :, rows]
    with control(probe, [(None, KeyMask([3, 4])), (None, cap)], sites=[Site("probe", probe, 0, "self")]) as run:
        probe()
    torch.testing.assert_close(run.records["probe"][0]["probs"].double(), expected, atol=1e-5, rtol=1e-4)
    scores, want = run.records["probe"][0]["scores"].double(), probe.scores(edit_bias)[:, :, rows]
    assert torch.equal(torch.isinf(scores), torch.isinf(want))  # the same masked pairs
    torch.testing.assert_close(scores.nan_to_num(neginf=0.0), want.nan_to_num(neginf=0.0), atol=1e-5, rtol=1e-4)
    for fields in (("probs",), ("scores",)):
        with pytest.raises(ValueError, match="need rows="):
            Capture(fields)


def test_capture_reduces_selects_and_keeps_its_budget():
    probe = Probe("dense-causal")
    cap = Capture(("head_out",), heads=[1, 3], reduce="mean_heads")
    with control(probe, [(None, cap)], sites=[Site("probe", probe, 0, "self")]) as run:
        out = probe()
    torch.testing.assert_close(run.records["probe"][0]["head_out"], out[:, [1, 3]].mean(1))
    tight = Capture(("q",), budget_bytes=100)
    with pytest.raises(RuntimeError, match="budget_bytes=100"):
        run_with(probe, [(None, tight)])
    skip = Capture(("q",), budget_bytes=100, on_over_budget="skip")
    with control(probe, [(None, skip)], sites=[Site("probe", probe, 0, "self")]) as run:
        probe()
    assert skip.over_budget and not run.records


def test_capture_over_budget_fallbacks_and_step_means():
    probe = Probe("blocksparse-window")
    site = [Site("probe", probe, 0, "self")]
    q_bytes = probe.q.numel() * 4
    # over budget, the record is stored averaged over the heads (a quarter of the bytes), or in float16 (half)
    for policy, shape, dtype in (("reduce_heads", (2, N, 8), torch.float32), ("offload", (2, 4, N, 8), torch.float16)):
        cap = Capture(("q",), budget_bytes=q_bytes * 3 // 4, on_over_budget=policy)
        with control(probe, [(None, cap)], sites=site) as run:
            probe()
        got = run.records["probe"][0]["q"]
        assert got.shape == shape and got.dtype == dtype and cap.fallbacks == 1
        want = probe.q.mean(1) if policy == "reduce_heads" else probe.q.half()
        torch.testing.assert_close(got, want)
        with pytest.raises(RuntimeError, match=f"on_over_budget='{policy}'"):  # still too big: a clear error
            run_with(probe, [(None, Capture(("q",), budget_bytes=100, on_over_budget=policy))])
    # a running mean over steps: one record, the mean of the per-step values, in the bytes of one step
    mean_cap, each = Capture(("head_out", "lse"), reduce="running_mean_steps"), Capture(("head_out", "lse"))
    with control(probe, [(None, mean_cap), (None, each)], sites=site) as run:
        for step in range(3):
            run.set_step(step)
            probe.q = probe.q + 0.5  # each step sees other queries
            probe()
    records = run.records["probe"]
    means = [r for r in records if "steps" in r]
    steps = [r for r in records if "steps" not in r]
    assert len(means) == 1 and means[0]["steps"] == 3 and len(steps) == 3
    for name in ("head_out", "lse"):
        torch.testing.assert_close(means[0][name], torch.stack([r[name] for r in steps]).mean(0))
    assert mean_cap.used_bytes == each.used_bytes // 3
    # any reduction as a function of (field, tensor)
    fn = Capture(("lse",), reduce=lambda name, x: x.amax(-1))
    with control(probe, [(None, fn)], sites=site) as run:
        probe()
    assert run.records["probe"][0]["lse"].shape == (2, 4)
    with pytest.raises(ValueError, match="on_over_budget must be one of"):
        Capture(("q",), on_over_budget="rows")
    with pytest.raises(ValueError, match="'rows_only' needs rows="):
        Capture(("q",), on_over_budget="rows_only")


@pytest.mark.parametrize("rows", [[0, -1, 5], torch.arange(N) % 7 == 3])
def test_capture_over_budget_keeps_only_the_asked_rows(rows):
    probe = Probe("blocksparse-window")
    site = [Site("probe", probe, 0, "self")]
    fields = ("q", "k", "lse", "head_out", "probs")
    full = Capture(fields, rows=rows)
    with control(probe, [(None, full)], sites=site) as run:
        out = probe()
    whole = run.records["probe"][0]
    cap = Capture(fields, rows=rows, budget_bytes=full.used_bytes - 1, on_over_budget="rows_only")
    with control(probe, [(None, cap)], sites=site) as run:
        probe()
    got = run.records["probe"][0]
    idx = torch.tensor(rows) if isinstance(rows, list) else rows.nonzero()[:, 0]
    idx = torch.where(idx < 0, idx + N, idx)
    assert cap.fallbacks == 1 and "k" not in got and cap.used_bytes < full.used_bytes
    torch.testing.assert_close(got["q"], probe.q[:, :, idx])
    torch.testing.assert_close(got["head_out"], out[:, :, idx])
    torch.testing.assert_close(got["lse"], whole["lse"][:, :, idx])
    torch.testing.assert_close(got["probs"], whole["probs"])
    with pytest.raises(RuntimeError, match="on_over_budget='rows_only'"):  # the rows alone still too big
        run_with(probe, [(None, Capture(fields, rows=rows, budget_bytes=16, on_over_budget="rows_only"))])
    assert Capture("lse").fields == ("lse",)  # one field by name
    with pytest.raises(ValueError, match="reduce must be one of"):
        Capture(("q",), reduce="median")


def test_schedules_pick_steps_and_layers():
    torch.manual_seed(0)
    lm = nf.TinyLM(64, dim=32, depth=3, num_heads=2, mechanism="streaming_llm", window=8, sinks=2).eval()
    tokens = torch.randint(0, 64, (1, 20))
    cap = Capture(("lse",))
    with control(lm, [(None, cap, steps(1, 2)), ("blocks.2.*", AblateHeads([0, 1]), layers(1))]) as run:
        outs = [lm(tokens) for _ in range(3)]
    assert sorted(r["step"] for rs in run.records.values() for r in rs) == [1, 1, 1]
    assert run.step == 3
    torch.testing.assert_close(outs[0], outs[2])
    with control(lm, [(None, AblateHeads([0, 1]), layers(2))]):
        ablated = lm(tokens)
    torch.testing.assert_close(outs[0], ablated)  # the glob and layers(1) both select layer 2 only


def test_sites_of_models_and_nested_layers():
    lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense")
    assert [s.name for s in find_sites(lm, layers=-1)] == ["blocks.1.attn"]
    assert find_sites(lm, kind="cross") == [] and len(find_sites(lm, name_glob="blocks.0.*")) == 1
    layer = nf.mechanisms("local")[0].make(16, 2)
    assert [s.name for s in find_sites(layer)] == [""]  # a layer is its own site
    with pytest.raises(ValueError, match="kind must be among"):
        find_sites(lm, kind="other")
    with pytest.raises(TypeError, match="selector, Edit"):
        with control(lm, [(None, "not an edit")]):
            pass


@pytest.mark.parametrize("name", ["dense", "swin", "moh"])
def test_layers_with_their_own_kernels_are_seen(name):
    """DenseAttention's fused SDPA call, Swin's window kernel and MoH's row lists call attend under control, so
    an edit there equals the same edit on the dense engine."""
    torch.manual_seed(1)
    entry = next(m for m in nf.mechanisms() if m.name == name)
    layer = entry.make(32, 4).eval()
    x = torch.randn(2, 8, 8, 32) if "2d" in entry.dims and "1d" not in entry.dims else torch.randn(2, 40, 32)
    # MoH calls attend per run of heads (head edits would number the heads of each call): no head edit there
    heads = [] if name == "moh" else [(None, ScaleHeads([1.0, 0.0, 2.0, 1.0]))]
    edits = [(None, Temperature(3.0)), *heads, (None, cap := Capture(("lse",)))]
    with torch.no_grad(), control(layer, edits):
        out = layer(x)
    assert cap.used_bytes > 0
    with torch.no_grad(), control(layer, edits), nf.engine_override("dense"):
        ref = layer(x)
    with torch.no_grad():
        plain = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_token_groups():
    g = TokenGroups(10, sinks=[0], image=slice(1, 7), grid=(2, 3), offset=1)
    assert g.names == ["sinks", "image"] and g.mask("sinks").sum() == 1
    assert g.to_grid(torch.arange(10)).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="positions must be in"):
        TokenGroups(4, bad=[5])
    with pytest.raises(KeyError, match="no token group"):
        g.mask("text")


class Long(nn.Module):
    """One sliding-window call over 1,024 tokens: a map of every row would be 4 MiB per head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (torch.randn(1, 2, 1024, 16, generator=g) for _ in range(3))

    def forward(self) -> torch.Tensor:
        return nf.attend(self.q, self.k, self.v, nf.SlidingWindow(left=63) & nf.Causal(), engine="blocksparse")


def test_capture_and_edits_never_form_the_map_of_more_rows_than_asked():
    """Under a dispatch mode that sees every tensor made: captured probability rows, the LSE, a redistribution and
    an unnormalised rescale (each one more fused call) stay far below one (N, N) map of a head."""
    m = Long()
    n = 1024
    edits = [(None, Capture(("probs", "lse"), rows=[0, 500, -1])), (None, Redistribute([0, 1], slice(2, 64))),
             (None, Rescale([5], 3.0, renormalize=False))]
    with LargestStorage() as plain:
        m()
    with LargestStorage() as seen, control(m, edits, sites=[Site("m", m, 0, "self")]) as run:
        m()
    assert run.records["m"][0]["probs"].shape == (1, 2, 3, n)
    # a map of one head would be n * n * 4 bytes; the engine's own chunk workspace is the largest thing made
    assert seen.largest <= max(plain.largest, 2 * n * 40 * 4) < n * n, (seen.largest, plain.largest)
    with LargestStorage() as dense:  # the tracker sees a materialised map: it can fail
        torch.softmax(m.q @ m.k.transpose(-1, -2), -1)
    assert dense.largest >= n * n * 4


def test_head_and_rescale_tables_by_layer_and_functions():
    """A table (L, Hq) scales each site by its own row; a function of the call computes the factors."""
    torch.manual_seed(0)
    lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense").eval()
    tokens = torch.randint(0, 64, (2, 10))
    table = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    with torch.no_grad():
        with control(lm, [(None, ScaleHeads(table))]):
            got = lm(tokens)
        with control(lm, [("blocks.0.attn", ScaleHeads([1.0, 0.0])), ("blocks.1.attn", ScaleHeads([2.0, 0.5]))]):
            want = lm(tokens)
        torch.testing.assert_close(got, want)
        with control(lm, [(None, ScaleHeads(lambda out, lse, call, state: torch.tensor([0.0, 3.0])))]):
            got = lm(tokens)
        with control(lm, [(None, ScaleHeads([0.0, 3.0]))]):
            want = lm(tokens)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="has no row for layer 1"):
            with control(lm, [(None, ScaleHeads(table[:1]))]):
                lm(tokens)
        # Rescale with a per-layer table of per-head factors: each site uses its row
        with control(lm, [(None, Rescale([0, 1], torch.tensor([[2.0, 1.0], [0.5, 3.0]])))]):
            got = lm(tokens)
        per_site = [("blocks.0.attn", Rescale([0, 1], [2.0, 1.0])), ("blocks.1.attn", Rescale([0, 1], [0.5, 3.0]))]
        with control(lm, per_site):
            want = lm(tokens)
        torch.testing.assert_close(got, want)
