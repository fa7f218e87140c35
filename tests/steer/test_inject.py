"""``InjectKV`` (``nearfar/steer/inject.py``) and ``ReplaceMap``: the edited call equals attention over the injected
keys and values computed in float64, on the engine cases, from a batch branch or a record, with a schedule, a
region and a transform."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from probe import CASES, N, Probe, keys_mask, run_with
from torch import nn

import nearfar as nf
from nearfar.steer import Capture, FromBatch, FromRecord, InjectKV, PatchHeads, ReplaceMap, Site, control


def shift(x: torch.Tensor) -> torch.Tensor:
    """A spatial move of the source's tokens (the transform of DiffUHaul-like edits)."""
    return x.roll(3, dims=2)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_replace_and_lerp_equal_attention_over_the_injected_kv(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    mode = data.draw(st.sampled_from(["replace", "lerp"]))
    alpha = data.draw(st.floats(0.0, 1.0)) if mode == "lerp" else 1.0
    region = data.draw(st.none() | st.lists(st.integers(0, N - 1), min_size=1, max_size=20, unique=True))
    moved = data.draw(st.booleans())
    scheduled = data.draw(st.booleans())
    a = (lambda s: alpha if s.step == 0 else 0.0) if scheduled else alpha
    edit = InjectKV(FromBatch([0], [1]), mode=mode, alpha=a, keys=region, transform=shift if moved else None)
    out = run_with(probe, [(None, edit)])
    k, v = probe.k.double().clone(), probe.v.double().clone()
    src_k, src_v = (shift(x[:1]) if moved else x[:1] for x in (k, v))
    rm = torch.ones(N, dtype=torch.bool) if region is None else keys_mask(region)
    for x, src in ((k, src_k), (v, src_v)):
        x[1:] = torch.where(rm[None, None, :, None], x[1:] + alpha * (src - x[1:]), x[1:])
    expected = probe.out(probe.probabilities(k=k), v=v)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[:1], run_with(probe, [])[:1])  # the source item is untouched


class Plain(nn.Module):
    """Attention without a static pattern (concat's case), with key padding."""

    def __init__(self, engine: str, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.engine = engine
        self.q, self.k, self.v = torch.randn(3, 4, 10, 8, generator=g), *torch.randn(2, 3, 2, 10, 8, generator=g)
        self.kpm = torch.rand(3, 10, generator=g) > 0.2
        self.kpm[:, 0] = True

    def forward(self) -> torch.Tensor:
        return nf.attend(self.q, self.k, self.v, key_padding_mask=self.kpm, engine=self.engine)


@pytest.mark.parametrize("engine", ["dense", "blocksparse", "auto"])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_concat_equals_attention_over_the_longer_key_set(engine, alpha):
    m = Plain(engine, seed=1)
    sel = [1, 4, 5, 9]
    edit = InjectKV(FromBatch([0, 0], [1, 2]), mode="concat", alpha=alpha, keys=sel)
    with control(m, [(None, edit)], sites=[Site("m", m, 0, "self")]):
        out = m()
    q, k, v = (x.double() for x in (m.q, m.k, m.v))
    expected = []
    for b in range(3):
        kb, vb, keep, off = k[b], v[b], m.kpm[b], torch.zeros(10, dtype=torch.float64)
        if b > 0:  # the targets read the source item's selected keys after their own, weighted by alpha
            kb, vb = torch.cat([kb, k[0][:, sel]], 1), torch.cat([vb, v[0][:, sel]], 1)
            keep = torch.cat([keep, torch.ones(len(sel), dtype=torch.bool)])
            off = torch.cat([off, torch.full((len(sel),), float(torch.log(torch.tensor(alpha))), dtype=torch.float64)])
        s = q[b] @ kb.repeat_interleave(2, 0).transpose(-1, -2) * 8 ** -0.5 + off
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        expected.append(p @ vb.repeat_interleave(2, 0))
    torch.testing.assert_close(out.double(), torch.stack(expected), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["dense-causal", "partition-blocks-rpb"])
def test_injection_from_a_record(case):
    src, dst = Probe(case, seed=1), Probe(case, seed=2)
    with control(src, [(None, Capture(("k", "v")))], sites=[Site("probe", src, 0, "self")]) as rec:
        src()
    out = run_with(dst, [(None, InjectKV(FromRecord(rec.records), keys=slice(0, 20)))])
    rm = (torch.arange(N) < 20)[None, None, :, None]
    k, v = (torch.where(rm, a.double(), b.double()) for a, b in ((src.k, dst.k), (src.v, dst.v)))
    torch.testing.assert_close(out.double(), dst.out(dst.probabilities(k=k), v=v), atol=2e-5, rtol=1e-4)


def test_replace_map_is_the_pattern_patch_of_every_head():
    probe = Probe("blocksparse-window", seed=3)
    rows = list(range(10, 30))
    got = run_with(probe, [(None, ReplaceMap(FromBatch([0], [1]), rows=rows))])
    want = run_with(probe, [(None, PatchHeads(FromBatch([0], [1]), [0, 1, 2, 3], rows=rows, field="pattern"))])
    torch.testing.assert_close(got, want)
    # the target's rows read its own values (and key padding) through the source's q and k
    q2, k2 = probe.q.double().clone(), probe.k.double().clone()
    q2[1], k2[1] = q2[0], k2[0]
    expected = probe.out(probe.probabilities(q=q2, k=k2))[1][:, rows]
    torch.testing.assert_close(got[1, :, rows].double(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, :, :10], run_with(probe, [])[:, :, :10])  # other rows untouched


def test_inject_errors():
    probe = Probe("dense-causal")
    with pytest.raises(ValueError, match="mode must be one of"):
        InjectKV(FromBatch([0], [1]), mode="swap")
    with pytest.raises(TypeError, match="source must be FromBatch"):
        InjectKV([0, 1])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        InjectKV(FromBatch([0], [1]), mode="lerp", alpha=1.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        InjectKV(FromBatch([0], [1]), mode="concat", alpha=0.0)
    with pytest.raises(ValueError, match="needs a call without a static pattern"):
        run_with(probe, [(None, InjectKV(FromBatch([0], [1]), mode="concat"))])
    with pytest.raises(ValueError, match="the same length"):
        run_with(probe, [(None, InjectKV(FromBatch([0], [1]), transform=lambda x: x[:, :, :5]))])
    with pytest.raises(ValueError, match="alpha must be in"):  # a schedule out of range fails at the call
        run_with(probe, [(None, InjectKV(FromBatch([0], [1]), mode="lerp", alpha=lambda s: 2.0))])
