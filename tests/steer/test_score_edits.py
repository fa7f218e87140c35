"""``PairMask`` and ``Modulate`` (``nearfar/steer/edits.py``): on the dense, block-sparse and partition engines the
edited call equals softmax of the edited float64 scores, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from probe import CASES, N, Probe, assert_grads_match, keys_mask, run_with

from nearfar.steer import Modulate, PairMask

INF = float("-inf")


def _row_range_delta(s: torch.Tensor, pos: torch.Tensor | None, neg: torch.Tensor | None,
                     strength: float) -> torch.Tensor:
    """DenseDiffusion's modulation of the float64 scores ``s`` (-inf where masked), as plain tensor algebra."""
    seen = torch.isfinite(s)
    top = s.masked_fill(~seen, INF).amax(-1, keepdim=True)
    low = s.masked_fill(~seen, float("inf")).amin(-1, keepdim=True)
    d = torch.zeros_like(s)
    if pos is not None:
        d = d + pos.double() * torch.where(seen, top - s, 0.0)
    if neg is not None:
        d = d - neg.double() * torch.where(seen, s - low, 0.0)
    return strength * d


def _masks(data, shape=(1, 4, N, N)):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    return torch.rand(shape, generator=gen) < 0.3, torch.rand(shape, generator=gen) < 0.3


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_pair_mask_equals_masked_probabilities(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    heads = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    hmask = torch.ones(4, dtype=torch.bool) if heads is None else keys_mask(heads)[:4]
    kind = data.draw(st.sampled_from(["tensor", "fn", "groups"]))
    if kind == "groups":  # two query groups and three key groups, overlapping; the table forbids some pairs
        qg = [list(range(0, 20)), keys_mask(list(range(15, N)))]
        kg = [slice(0, 12), [3, 12, 13, 30], keys_mask(list(range(20, N)))]
        table = torch.tensor(data.draw(st.lists(st.booleans(), min_size=6, max_size=6))).view(2, 3)
        edit = PairMask(table, qg, kg, heads=heads)
        qm = torch.stack([keys_mask(qg[0]), qg[1]]).double()
        km = torch.stack([keys_mask(list(range(12))), keys_mask([3, 12, 13, 30]), keys_mask(list(range(20, N)))])
        forbid = (qm.T @ (~table).double() @ km.double()) > 0
        forbid = forbid[None, None] & hmask[None, :, None, None]
    else:
        allowed, _ = _masks(data)
        allowed = ~allowed  # most pairs allowed
        edit = PairMask(allowed if kind == "tensor" else (lambda b, h, q, k: allowed[0][h, q, k]), heads=heads)
        forbid = ~allowed & hmask[None, :, None, None]
    out = run_with(probe, [(None, edit)])
    expected = probe.out(probe.probabilities(torch.zeros(forbid.shape).masked_fill(forbid, INF)))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_modulate_equals_modulated_scores(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    pos, neg = _masks(data)
    which = data.draw(st.sampled_from(["both", "pos", "neg"]))
    pos, neg = (None if which == "neg" else pos), (None if which == "pos" else neg)
    strength = data.draw(st.floats(0.0, 1.0))
    heads = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
    hmask = (torch.ones(4, dtype=torch.bool) if heads is None else keys_mask(heads)[:4])[None, :, None, None]
    pos_h, neg_h = (None if m is None else m & hmask for m in (pos, neg))
    rel = data.draw(st.sampled_from(["const", "row_range"]))
    if rel == "const":
        terms = [m.double() * sgn for m, sgn in ((pos_h, 1.0), (neg_h, -1.0)) if m is not None]
        bias = strength * sum(terms[1:], terms[0])
    else:
        bias = _row_range_delta(probe.scores(), pos_h, neg_h, strength)
    out = run_with(probe, [(None, Modulate(pos, neg, strength, relative_to=rel, heads=heads))])
    expected = probe.out(probe.probabilities(bias.masked_fill(~torch.isfinite(bias), 0.0)))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["dense-causal", "blocksparse-na-rpb"])
def test_modulate_row_range_gradients(case):
    """The modulation depends on the scores (S + a (max S - S)): its gradient is the edited softmax's."""
    probe = Probe(case, seed=3)
    gen = torch.Generator().manual_seed(5)
    pos, neg = torch.rand(1, 4, N, N, generator=gen) < 0.3, torch.rand(1, 4, N, N, generator=gen) < 0.2

    def reference(q, k, v):
        s = probe.scores(q=q, k=k)
        return probe.out(torch.nan_to_num(torch.softmax(s + _row_range_delta(s, pos, neg, 0.6).nan_to_num(0.0), -1),
                                          nan=0.0), v=v)

    assert_grads_match(probe, [(None, Modulate(pos, neg, 0.6, relative_to="row_range"))], reference, seed=5)


def test_score_edit_errors():
    probe = Probe("dense-causal")
    with pytest.raises(ValueError, match="query_groups and key_groups"):
        PairMask(torch.ones(2, 2, dtype=torch.bool), [[0]], None)
    with pytest.raises(ValueError, match=r"allowed must be a bool table \(Gq, Gk\) = \(1, 2\)"):
        PairMask(torch.ones(2, 2, dtype=torch.bool), [[0]], [[0], [1]])
    with pytest.raises(ValueError, match="broadcastable to"):
        run_with(probe, [(None, PairMask(torch.ones(3, N, N, dtype=torch.bool)))])
    with pytest.raises(TypeError, match="allowed must be a bool tensor"):
        run_with(probe, [(None, PairMask(torch.ones(N, N)))])
    with pytest.raises(ValueError, match="relative_to"):
        Modulate(torch.ones(N, N, dtype=torch.bool), relative_to="max")
    with pytest.raises(ValueError, match="pos or neg"):
        Modulate()
    with pytest.raises(ValueError, match="strength must be a finite number"):
        Modulate(torch.ones(N, N, dtype=torch.bool), strength=float("nan"))
