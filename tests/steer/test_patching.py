"""``nearfar.steer.patching``: every ``PatchHeads`` field and ``ForcePattern`` on the dense, block-sparse and
partition engines equal the patch applied to the materialised q/k/v, probabilities and head outputs in float64
(loops over items, heads and rows); ``path_patch`` equals a hand-written path patching of an attention-only model;
resample ablation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from probe import CASES, N, Probe, run_with
from torch import nn

import nearfar as nf
from nearfar.steer import (
    AblateHeads,
    Capture,
    ForcePattern,
    FromBatch,
    FromRecord,
    PatchHeads,
    Site,
    control,
    path_patch,
)

HQ, HKV = 4, 2


def rows_strategy():
    return st.one_of(
        st.none(),
        st.builds(lambda a, w: slice(a, a + w), st.integers(0, N - 1), st.integers(1, N)),
        st.lists(st.integers(0, N - 1), min_size=1, max_size=10, unique=True),
        st.lists(st.booleans(), min_size=N, max_size=N).map(torch.tensor),
        st.lists(st.booleans(), min_size=2 * N, max_size=2 * N).map(lambda b: torch.tensor(b).view(2, N)),
    )


def rows_mask(rows):
    """The reference's ``(2, N)`` bool mask of ``rows``."""
    if rows is None:
        return torch.ones(2, N, dtype=torch.bool)
    if isinstance(rows, torch.Tensor):
        return rows.expand(2, N)
    m = torch.zeros(N, dtype=torch.bool)
    for r in (range(N)[rows] if isinstance(rows, slice) else rows):
        m[r] = True
    return m.expand(2, N)


def patched(x, values, items, heads, mask):
    """``x`` (float64) whose items ``items[i]`` take ``values[i]`` at ``heads`` and the rows of ``mask[item]``."""
    y = x.double().clone()
    for i, t in enumerate(items):
        for h in heads:
            for r in range(x.shape[2]):
                if mask[t, r]:
                    y[t, h, r] = values[i, h, r].double()
    return y


def recorded_source(case, seed):
    """A probe with other inputs and the record of its q, k, v and head outputs."""
    other = Probe(case, seed=seed)
    with control(other, [(None, Capture(("q", "k", "v", "head_out")))], sites=[Site("probe", other, 0, "self")]) \
            as run:
        other()
    return other, FromRecord(run.records)


@pytest.mark.parametrize("field", ["z", "q", "k", "v", "pattern"])
@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_patch_heads_equals_the_patched_reference(case, field, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    nh = HKV if field in ("k", "v") else HQ
    heads = data.draw(st.lists(st.integers(0, nh - 1), min_size=1, max_size=nh, unique=True))
    rows = data.draw(rows_strategy())
    if data.draw(st.booleans(), label="from_batch"):
        src, tgt = data.draw(st.sampled_from([([0], [1]), ([1], [0]), ([1, 0], [0, 1])]))
        source, items = FromBatch(src, tgt), tgt
        sq, sk, sv = probe.q[src], probe.k[src], probe.v[src]
        sz = probe.out(probe.probabilities())[src]
    else:
        other, source = recorded_source(case, data.draw(st.integers(1001, 2000)))
        items, src, tgt = [0, 1], [], [0, 1]
        sq, sk, sv = other.q, other.k, other.v
        sz = other.out(other.probabilities())
    mask, base = rows_mask(rows), probe.out(probe.probabilities())
    if field == "z":
        expected = patched(base, sz, items, heads, mask)
    elif field == "q":
        expected = probe.out(probe.probabilities(q=patched(probe.q, sq, items, heads, mask)))
    elif field == "k":
        expected = probe.out(probe.probabilities(k=patched(probe.k, sk, items, heads, mask)))
    elif field == "v":
        expected = probe.out(probe.probabilities(), v=patched(probe.v, sv, items, heads, mask))
    else:  # the source's map over this run's values: softmax(q_src k_src^T) at the target items
        q, k = probe.q.double().clone(), probe.k.double().clone()
        q[items], k[items] = sq.double(), sk.double()
        expected = patched(base, probe.out(probe.probabilities(q=q, k=k))[items], items, heads, mask)
    out = run_with(probe, [(None, PatchHeads(source, heads, rows=rows, field=field))])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    for s in set(src) - set(tgt):  # FromBatch: a source item that is no target runs unchanged
        torch.testing.assert_close(out[s].double(), base[s], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_force_pattern_equals_the_forced_probabilities(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    heads = data.draw(st.lists(st.integers(0, HQ - 1), min_size=1, max_size=HQ, unique=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    kind = data.draw(st.sampled_from(["full", "shared", "callable"]))
    if kind == "full":  # unnormalised rows are used as given
        probs = torch.rand(2, len(heads), N, N, generator=g)
    else:
        probs = torch.softmax(torch.randn(N, N, generator=g), -1)
    edit = ForcePattern(heads, probs if kind != "callable" else lambda call: probs[None, None])
    expected = probe.out(probe.probabilities())
    full = probs.double().expand(2, len(heads), N, N)
    for j, h in enumerate(heads):
        expected[:, h] = full[:, j] @ probe.v.double()[:, h // (HQ // HKV)]
    out = run_with(probe, [(None, edit)])
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_patch_and_force_errors():
    probe = Probe("dense-causal")
    src = FromBatch([0], [1])
    with pytest.raises(ValueError, match="field must be one of"):
        PatchHeads(src, 0, field="x")
    with pytest.raises(TypeError, match="source must be"):
        PatchHeads("item 0", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="heads must be an int or a non-empty"):
        PatchHeads(src, [])
    with pytest.raises(TypeError, match="heads must be"):
        PatchHeads(src, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heads must be distinct"):
        PatchHeads(src, [1, 1])
    with pytest.raises(TypeError, match="rows must be"):
        PatchHeads(src, 0, rows="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows: a tensor must be a bool mask"):
        PatchHeads(src, 0, rows=torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"query heads indices must be in \[-4, 4\)"):
        run_with(probe, [(None, PatchHeads(src, 4))])
    with pytest.raises(ValueError, match=r"key/value heads indices must be in \[-2, 2\)"):
        run_with(probe, [(None, PatchHeads(src, 2, field="k"))])
    with pytest.raises(ValueError, match="rows: positions must be in"):
        run_with(probe, [(None, PatchHeads(src, 0, rows=[N]))])
    with pytest.raises(ValueError, match="rows: a bool mask must be"):
        run_with(probe, [(None, PatchHeads(src, 0, rows=torch.ones(N + 1, dtype=torch.bool)))])
    with control(probe, [(None, Capture(("head_out",)))], sites=[Site("probe", probe, 0, "self")]) as run:
        probe()
    with pytest.raises(KeyError, match="has no 'q'"):
        run_with(probe, [(None, PatchHeads(FromRecord(run.records), 0, field="q"))])
    with pytest.raises(ValueError, match=r"probs must broadcast to \(B, len\(heads\), Nq, Nk\)"):
        run_with(probe, [(None, ForcePattern([0, 1], torch.ones(3, N, N)))])
    with pytest.raises(TypeError, match="probs must be a tensor or a callable"):
        ForcePattern(0, "uniform")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="probs must be a floating tensor"):
        run_with(probe, [(None, ForcePattern(0, lambda call: torch.ones(N, N, dtype=torch.long)))])


def test_resample_ablation_takes_another_items_heads():
    out = torch.randn(5, 3, 4, 2)
    edit = AblateHeads([1], mode="resample", seed=3)
    got = edit.heads(out, out[..., 0], None, None)  # type: ignore[arg-type]  # the hook reads neither
    torch.testing.assert_close(got[:, [0, 2]], out[:, [0, 2]])
    src = [next(j for j in range(5) if torch.equal(got[i, 1], out[j, 1])) for i in range(5)]
    assert sorted(src) == list(range(5)) and all(s != i for i, s in enumerate(src))  # a derangement
    torch.testing.assert_close(edit.heads(out, out[..., 0], None, None), got)  # type: ignore[arg-type]
    probe = Probe("blocksparse-window")
    base = probe.out(probe.probabilities())
    expected = base.clone()
    expected[:, [0, 3]] = base[[1, 0]][:, [0, 3]]  # two items: each takes the other's
    torch.testing.assert_close(run_with(probe, [(None, AblateHeads([0, 3], mode="resample"))]).double(), expected,
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 2 items"):
        edit.heads(out[:1], out[:1, ..., 0], None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'zero', 'mean' or 'resample'"):
        AblateHeads(0, mode="shuffle")
    with pytest.raises(TypeError, match="seed must be an int"):
        AblateHeads(0, mode="resample", seed=1.0)  # type: ignore[arg-type]


class HeadsLayer(nn.Module):
    """Causal attention with explicit per-head projections (GQA: ``hkv`` key/value heads)."""

    def __init__(self, dim: int, hq: int, hkv: int, dh: int, g: torch.Generator):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(hq, dim, dh, generator=g) * 0.4)
        self.wk = nn.Parameter(torch.randn(hkv, dim, dh, generator=g) * 0.4)
        self.wv = nn.Parameter(torch.randn(hkv, dim, dh, generator=g) * 0.4)
        self.wo = nn.Parameter(torch.randn(hq, dh, dim, generator=g) * 0.4)

    def qkv(self, x):
        return [torch.einsum("bnd,hde->bhne", x, w) for w in (self.wq, self.wk, self.wv)]

    def forward(self, x):
        z = nf.attend(*self.qkv(x), nf.Causal())
        return torch.einsum("bhne,hed->bnd", z, self.wo)


class AttnOnly(nn.Module):
    """Embedding, attention-only residual layers, unembedding."""

    def __init__(self, vocab=11, dim=12, depth=3, hq=4, hkv=2, dh=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.layers = nn.ModuleList(HeadsLayer(dim, hq, hkv, dh, g) for _ in range(depth))
        self.unembed = nn.Parameter(torch.randn(dim, vocab, generator=g) * 0.4)

    def forward(self, tokens):
        x = self.embed[tokens]
        for layer in self.layers:
            x = x + layer(x)
        return x @ self.unembed

    def sites(self):
        return [Site(f"layers.{i}", m, i, "self", 4, 2) for i, m in enumerate(self.layers)]


def heads_of(q, k, v):
    """Per-head outputs (float64), GQA by repeating the KV heads, causal."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def manual_path_patch(model, clean, corrupt, sender, receiver, fields):
    """One sender ``(layer, head)`` and one receiver, written out on explicit tensors in float64."""
    layers = [[p.double() for p in (m.wq, m.wk, m.wv, m.wo)] for m in model.layers]

    def project(i, x):
        wq, wk, wv, _ = layers[i]
        return [torch.einsum("bnd,hde->bhne", x, w) for w in (wq, wk, wv)]

    def write(i, z):
        return torch.einsum("bhne,hed->bnd", z, layers[i][3])

    def run(tokens):
        x, zs = model.embed.double()[tokens], []
        for i in range(len(layers)):
            zs.append(heads_of(*project(i, x)))
            x = x + write(i, zs[-1])
        return zs

    zc, zx = run(clean), run(corrupt)
    x = model.embed.double()[clean]  # the run of step 2 up to the receiver's layer: clean heads but the sender
    for i in range(receiver[0]):
        z = zc[i].clone()
        if i == sender[0]:
            z[:, sender[1]] = zx[i][:, sender[1]]
        x = x + write(i, z)
    patched_inputs = project(receiver[0], x)
    x = model.embed.double()[clean]  # step 3: clean, the receiver's inputs from step 2
    g = 4 // 2
    for i in range(len(layers)):
        q, k, v = project(i, x)
        if i == receiver[0]:
            r = receiver[1]
            for name, t, src, head in (("q", q, patched_inputs[0], r), ("k", k, patched_inputs[1], r // g),
                                       ("v", v, patched_inputs[2], r // g)):
                if name in fields:
                    t[:, head] = src[:, head]
        x = x + write(i, heads_of(q, k, v))
    return x @ model.unembed.double()


@pytest.mark.parametrize("fields", [("q",), ("k", "v"), ("q", "k", "v")])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), s_layer=st.integers(0, 1), s_head=st.integers(0, 3), r_layer=st.integers(1, 2),
       r_head=st.integers(0, 3))
def test_path_patch_equals_a_hand_written_one(fields, seed, s_layer, s_head, r_layer, r_head):
    assume((s_layer, s_head) != (r_layer, r_head))
    model = AttnOnly(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    clean, corrupt = torch.randint(0, 11, (2, 7), generator=g), torch.randint(0, 11, (2, 7), generator=g)

    def metric(logits):
        return logits[:, -1, 3] - logits[:, -1, 5]

    with torch.no_grad():
        got = path_patch(model, None, [(f"layers.{s_layer}", s_head)], [(f"layers.{r_layer}", r_head)], clean,
                         corrupt, metric, receiver_fields=fields, sites=model.sites())
        expected = metric(manual_path_patch(model, clean, corrupt, (s_layer, s_head), (r_layer, r_head), fields))
        clean_metric = metric(manual_path_patch(model, clean, clean, (s_layer, s_head), (r_layer, r_head), fields))
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metric(model(clean)).double(), clean_metric, atol=1e-4, rtol=1e-4)
    if s_layer < r_layer:  # the sender reaches the receiver: the patch moves the metric (the check can fail)
        assert not torch.allclose(expected, clean_metric, atol=1e-9, rtol=0)


def test_path_patch_without_a_difference_gives_the_clean_metric():
    torch.manual_seed(0)
    lm = nf.TinyLM(32, dim=32, depth=3, num_heads=4, mechanism="dense", num_kv_heads=2).eval()
    clean, corrupt = torch.randint(0, 32, (2, 9)), torch.randint(0, 32, (2, 9))

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, 7]

    receivers = [("blocks.2.attn", 1), ("blocks.1.attn", 3)]
    with torch.no_grad():
        with control(lm, []):  # the layer's attention through attend, as in every run of path_patch
            base = metric(lm(clean))
        torch.testing.assert_close(base, metric(lm(clean)))  # its fused call: equal up to rounding
        empty = path_patch(lm, None, [], receivers, clean, corrupt, metric)
        same = path_patch(lm, lambda m, x: m(x), [("blocks.0.attn", 0), ("blocks.1.attn", 2)], receivers, clean,
                          clean.clone(), metric)
        moved = path_patch(lm, None, [("blocks.0.attn", h) for h in range(4)], receivers, clean, corrupt, metric)
    assert torch.equal(empty, base) and torch.equal(same, base)
    assert not torch.allclose(moved, base, atol=1e-4)


def test_path_patch_errors():
    model = AttnOnly()
    x = torch.randint(0, 11, (1, 5))
    sites = model.sites()

    def call(senders, receivers, **kw):
        return path_patch(model, None, senders, receivers, x, x, lambda o: o, sites=sites, **kw)

    with pytest.raises(ValueError, match="no site named 'layers.9'"):
        call([("layers.9", 0)], [("layers.1", 0)])
    with pytest.raises(ValueError, match=r"head 4 of site 'layers.1' must be in \[0, 4\)"):
        call([], [("layers.1", 4)])
    with pytest.raises(TypeError, match=r"senders must be \(site_name, query_head\) pairs"):
        call([("layers.0",)], [("layers.1", 0)])
    with pytest.raises(ValueError, match="receivers: at least one"):
        call([("layers.0", 0)], [])
    with pytest.raises(ValueError, match="senders and receivers must differ"):
        call([("layers.1", 0)], [("layers.1", 0)])
    with pytest.raises(ValueError, match="receiver_fields must be"):
        call([], [("layers.1", 0)], receiver_fields=("z",))
