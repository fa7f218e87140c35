"""``Redistribute`` (``nearfar/steer/redistribute.py``) and unnormalised ``Rescale``: VAR's mass move, computed from
one more run of the call over masked values, equals the edit applied to the materialised float64 probabilities, on
every engine case, with other edits before it, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from probe import CASES, N, Probe, assert_grads_match, keys_mask, run_with

from nearfar.steer import Bias, KeyMask, Redistribute, Rescale


def redistributed(p: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, keep: float, edit: torch.Tensor
                  ) -> torch.Tensor:
    """VAR's rule on the float64 rows ``p (B, H, Nq, Nk)``: ``src``/``dst`` key masks (``dst`` without ``src``),
    ``edit`` (B|1, H, Nq) the rows to change; rows without mass on ``dst`` or ``src`` stay."""
    dst = dst & ~src
    mf = (p * src).sum(-1, keepdim=True)
    mt = (p * dst).sum(-1, keepdim=True)
    live = (mt > 0) & (mf > 0) & edit[..., None]
    c = torch.where(src, keep, torch.where(dst, 1 + (1 - keep) * mf / mt.clamp_min(1e-300), 1.0))
    return torch.where(live, p * c, p)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_redistribute_equals_the_moved_probabilities(case, data):
    probe = Probe(case, seed=data.draw(st.integers(0, 1000)))
    src = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=4, unique=True))
    dst = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=20, unique=True))
    keep = data.draw(st.floats(0.0, 1.0))
    heads = data.draw(st.none() | st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
    rows = data.draw(st.none() | st.lists(st.integers(0, N - 1), min_size=1, max_size=20, unique=True))
    before = data.draw(st.booleans())  # a score edit first: the move acts on the edited probabilities
    hm = torch.ones(4, dtype=torch.bool) if heads is None else keys_mask(heads)[:4]
    rm = torch.ones(N, dtype=torch.bool) if rows is None else keys_mask(rows)
    bias = torch.randn(1, 4, N, N, generator=torch.Generator().manual_seed(7)) if before else None
    edits = ([(None, Bias(bias))] if before else []) + [(None, Redistribute(src, dst, keep, heads=heads, rows=rows))]
    out = run_with(probe, edits)
    p = probe.probabilities(bias)
    edit = hm[None, :, None] & rm[None, None, :]
    expected = probe.out(redistributed(p, keys_mask(src), keys_mask(dst), keep, edit))
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_redistribute_moves_the_mass_and_keeps_rows_summing_to_one():
    """Through a value of ones per key group, the output reads the groups' masses directly."""
    probe = Probe("dense-causal", hq=2, hkv=2, seed=1)
    probe.kpm[:] = True
    src, dst = [0], list(range(1, 10))
    probe.v = torch.stack([keys_mask(src).float(), keys_mask(dst).float(), torch.ones(N)], -1)[None, None].expand(
        2, 2, N, 3).contiguous()
    base = run_with(probe, [])
    moved = run_with(probe, [(None, Redistribute(src, dst, keep=0.25))])
    torch.testing.assert_close(moved[..., 2], torch.ones_like(moved[..., 2]))  # still a distribution
    # row 0 (causal) sees key 0 only: no target key, nothing moves
    torch.testing.assert_close(moved[:, :, 0], base[:, :, 0])
    torch.testing.assert_close(moved[:, :, 1:, 0], 0.25 * base[:, :, 1:, 0])
    torch.testing.assert_close(moved[:, :, 1:, 1], base[:, :, 1:, 1] + 0.75 * base[:, :, 1:, 0])


def test_redistribute_gradients_match_the_reference():
    probe = Probe("blocksparse-window", seed=4)
    src, dst = [0, 1], list(range(2, 30))

    def reference(q, k, v):
        p = torch.nan_to_num(torch.softmax(probe.scores(q=q, k=k), -1), nan=0.0)
        return probe.out(redistributed(p, keys_mask(src), keys_mask(dst), 0.3, torch.ones(1, 4, N, dtype=bool)), v=v)

    assert_grads_match(probe, [(None, Redistribute(src, dst, keep=0.3))], reference, seed=2)


def test_redistribute_leaves_rows_without_targets_and_checks_keep():
    probe = Probe("dense-causal", seed=2)
    # every target key masked for all rows: nothing can move
    out = run_with(probe, [(None, KeyMask([5, 6])), (None, Redistribute([0], [5, 6], keep=0.0))])
    torch.testing.assert_close(out, run_with(probe, [(None, KeyMask([5, 6]))]))
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="keep must be a number in"):
            Redistribute([0], [1], keep=bad)


@pytest.mark.parametrize("case", ["blocksparse-window", "partition-blocks-rpb"])
def test_unnormalised_rescale_gradients_match_the_reference(case):
    """``(P c) V`` comes from one more run over masked values, so its gradient is exact on every engine."""
    probe = Probe(case, seed=6)
    keys, heads = [0, 3, 9, 20], [1, 2]
    c = torch.where(keys_mask(keys)[None, None, None, :] & keys_mask(heads)[:4][None, :, None, None], 2.5, 1.0)

    def reference(q, k, v):
        return probe.out(torch.nan_to_num(torch.softmax(probe.scores(q=q, k=k), -1), nan=0.0) * c.double(), v=v)

    assert_grads_match(probe, [(None, Rescale(keys, 2.5, heads=heads, renormalize=False))], reference, seed=3)
