"""``nearfar.distributed.attend`` on 2 and 4 gloo processes (CPU) equals single-process ``nearfar.attend``: outputs,
LSE and dQ/dK/dV for every supported pattern (``dist_cases.cases``), with the bytes each rank sent and received
checked against the plan and the closed-form halo sizes, and against what a ring over all K/V sends.

Spawning is the slow part (each process imports torch): one process group per world size runs every case, and the
tests read its results. A rank failing mid-call must give every rank a clear error within the group's timeout.
"""

from __future__ import annotations

import pytest
import torch
from dist_cases import Case, cases, suite_and_lm, suite_then_fail
from dist_harness import run_ok

import nearfar as nf
import nearfar.distributed as nd

PG_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ok(suite_and_lm, 4, pg_timeout_s=PG_TIMEOUT)


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ok(suite_then_fail, 2, pg_timeout_s=PG_TIMEOUT)


def _suite(results: list[dict]) -> list[dict]:
    return [r["suite"] if "suite" in r else r for r in results]


def _check_case(results: list[dict], name: str) -> None:
    errors = [f"rank {r}: {e}" for r, res in enumerate(_suite(results)) for e in res[name]["errors"]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(cases(4)))
def test_equals_single_process_4_ranks(world4, name):
    _check_case(world4, name)


@pytest.mark.parametrize("name", sorted(cases(2)))
def test_equals_single_process_2_ranks(world2, name):
    _check_case(world2, name)


def _beta(case: Case) -> int:
    """Bytes of one token's K and V over the batch (B = 2 in every case)."""
    return 2 * case.heads[1] * 2 * case.d * torch.tensor([], dtype=case.dtype).element_size()


def _is_ring(case: Case) -> bool:
    return case.method == "ring" or (case.method == "auto" and case.extra is None
                                     and (case.pattern is None or isinstance(case.pattern, nf.Causal)))


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_equal_the_plan(world, world2, world4):
    """Each rank's counted K/V traffic, forward and backward, is what the plan says, token for token."""
    results = _suite(world2 if world == 2 else world4)
    for name, case in cases(world).items():
        if _is_ring(case):
            continue
        beta = _beta(case)
        for r in range(world):
            res = results[r][name]
            (p2p_s, p2p_r), (bc_s, bc_r) = res["traffic"]["p2p"], res["traffic"]["bcast"]
            got = (res["sent"].get("kv.halo.fwd", 0), res["recv"].get("kv.halo.fwd", 0),
                   res["sent"].get("kv.bcast.fwd", 0), res["recv"].get("kv.bcast.fwd", 0))
            assert got == (p2p_s * beta, p2p_r * beta, bc_s * beta, bc_r * beta), (name, r, got)
            back = (res["sent"].get("kv.halo.bwd", 0), res["recv"].get("kv.halo.bwd", 0),
                    res["recv"].get("kv.bcast.bwd", 0), res["sent"].get("kv.bcast.bwd", 0))
            assert back == (p2p_r * beta, p2p_s * beta, bc_s * beta, bc_r * beta), (name, r, back)
            # global queries: their q broadcast from the owner, each rank's partial (O and LSE rows) to the owner
            size = torch.tensor([], dtype=case.dtype).element_size()
            gamma, row = 2 * case.heads[0] * case.d * size, 2 * case.heads[0] * (case.d + 1) * size
            (q_s, q_r), (part_s, part_r) = res["traffic"]["q"], res["traffic"]["partial"]
            assert (res["sent"].get("q.bcast.fwd", 0), res["recv"].get("q.bcast.fwd", 0)) == (q_s * gamma,
                                                                                               q_r * gamma)
            assert (res["sent"].get("partial.fwd", 0), res["recv"].get("partial.fwd", 0)) == (part_s * row,
                                                                                               part_r * row)


# interior ranks of 4 (ranks 1 and 2): tokens received per call by the closed form
HALO_TOKENS = {
    "na1d": 7 - 1,                     # NA(k): (k - 1) * dilation
    "na1d_dilated": (5 - 1) * 2,
    "na1d_causal": 7 - 1,              # causal NA: all on the left
    "sliding_window": 5 + 3,           # SlidingWindow(l, r): l + r
    "sliding_window_causal": 6,        # & Causal: l
    "na2d_slabs": (5 - 1) * 6,         # 2D NA on slabs: (k0 - 1) * dilation0 * row width
    "blocks_aligned": 0,               # windows aligned with the shards: nothing
    "blocks_shifted": 8,               # shifted by M/2: M/2 rows per side
}


@pytest.mark.parametrize("name", sorted(HALO_TOKENS))
def test_halo_bytes_follow_the_formula_and_undercut_a_ring(world4, name):
    case = cases(4)[name]
    beta = _beta(case)
    for r in (1, 2):
        res = _suite(world4)[r][name]
        fwd, bwd = res["recv"].get("kv.halo.fwd", 0), res["sent"].get("kv.halo.fwd", 0)
        assert fwd == HALO_TOKENS[name] * beta, (r, fwd)
        assert res["recv"].get("kv.halo.bwd", 0) == bwd  # the gradients of what I sent come back
        ring = (case.layout.n - case.layout.size(r)) * beta  # a ring over all K/V: every other rank's tokens
        assert fwd < ring


@pytest.mark.parametrize("name", ["causal_ring_contiguous", "causal_ring_head_tail", "dense_ring", "padding_ring"])
def test_ring_bytes(world4, name):
    """Ring: forward receives every other rank's K/V once; backward receives them again plus every block's
    dK/dV accumulator (fp32, or fp64 for fp64 inputs) once; the key padding mask travels with its keys."""
    case = cases(4)[name]
    lay, beta = case.layout, _beta(case)
    mask = 2 if case.kpm else 0  # bytes of one token's mask over the batch
    for r in range(4):
        res = _suite(world4)[r][name]
        others = lay.n - lay.size(r)
        assert res["recv"]["ring.fwd"] == others * (beta + mask)
        assert res["recv"]["ring.bwd"] == others * (beta + mask) + lay.n * beta


def test_head_tail_balances_causal_work():
    """Causal pairs per rank: head-tail within a few percent of the mean, contiguous shards far from it."""
    def pairs(lay):
        return [sum(hi * (hi + 1) // 2 - lo * (lo + 1) // 2 for lo, hi in lay.ranges[r]) for r in range(lay.world)]

    ht, ct = pairs(nd.Layout.head_tail(4096, 8)), pairs(nd.Layout.contiguous(4096, 8))
    assert max(ht) / (sum(ht) / 8) < 1.01
    assert max(ct) / (sum(ct) / 8) > 1.8


def test_rank_failing_mid_call_gives_every_rank_a_clear_error(world2):
    fail = [r["failure"] for r in world2]
    assert fail[1]["error"] == "ValueError" and "injected" in fail[1]["message"]
    assert fail[0]["error"] == "DistributedAttentionError", fail[0]
    assert "kv.halo.fwd" in fail[0]["message"] and "rank 0" in fail[0]["message"]
    assert fail[0]["seconds"] < PG_TIMEOUT + 10


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mechanism", ["streaming_llm", "dense"])
def test_tiny_lm_loss_curve_equals_one_process(world, mechanism, world2, world4):
    """TinyLM trained on the sequence split over 2 and 4 ranks (sliding window + sinks on contiguous shards, dense
    causal by the ring on head-tail shards) follows the one-process loss curve (float64)."""
    for r, res in enumerate(world2 if world == 2 else world4):
        curve = res["lm"][mechanism]
        assert len(curve) == 5 and curve[0][1] > curve[-1][1]  # it trains
        for step, (got, want) in enumerate(curve):
            assert abs(got - want) < 1e-9, (r, step, got, want)


def test_the_example_runs(world2):
    assert all(r["example"] < 1e-5 for r in world2)


def test_one_rank_is_plain_attend():
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    lay = nd.Layout.contiguous(16, 1)
    out = nd.attend(q, k, v, nf.Neighborhood(5), layout=lay)
    assert torch.equal(out, nf.attend(q, k, v, nf.Neighborhood(5)))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["na2d_rpb", "na2d_dilated", "na1d_rpb", "swin_shifted", "swin"])
def test_vision_layers_under_sharded_equal_one_process(world, name, world2, world4):
    """NeighborhoodAttention (1D, 2D, dilated, with its table) and Swin's WindowAttention (shifted too) on slabs of
    the map, run unmodified inside ``sharded``: output, input gradient and parameter gradients (summed over ranks)
    equal the one-process layer; on 4 ranks the 10-row map's slabs (3, 3, 2, 2 rows) are narrower than the kernel."""
    for r, res in enumerate(world2 if world == 2 else world4):
        assert res["vision"][name] == [], (r, res["vision"][name])


@pytest.mark.parametrize("world", [2, 4])
def test_overlap_cases_run_an_interior_call(world, world2, world4):
    """The overlap cases (equal to one process above) had queries to run while the halo was in flight on every rank
    that receives a halo, and the wait for the halo was timed."""
    for name in ("overlap_na1d", "overlap_na2d_rpb", "overlap_window_head_tail"):
        case = cases(world)[name]
        for r, res in enumerate(_suite(world2 if world == 2 else world4)):
            res = res[name]
            if res["recv"].get("kv.halo.fwd", 0) and case.layout.size(r) >= 12:
                assert res["interior"], (name, r)
                assert "kv.halo.fwd" in res["waited"], (name, r)


def test_bad_bias_table_blocks_and_slabs_raise_clear_errors_on_every_rank(world2):
    want = [("ValueError", "broadcastable to (B, Hq, n_local, layout.n_real)"),
            ("ValueError", "needs a Neighborhood, Blocks or Grid"),
            ("ValueError", "rpb must have shape (2, 9)"),
            ("ValueError", "either bias or rpb"),
            ("ValueError", "method='ring' runs without bias"),
            ("ValueError", "does not combine with blocks"),
            ("TypeError", "score_mod must take 5 positional arguments"),
            ("TypeError", "overlap must be a bool"),
            ("ValueError", "does not split the map into whole rows"),
            ("ok", "(1, 2, 12, 4)")]
    for r, res in enumerate(world2):
        assert len(res["bad"]) == len(want), (r, res["bad"])
        for (kind, msg), (got_kind, got_msg) in zip(want, res["bad"]):
            assert got_kind == kind and msg in got_msg, (r, kind, msg, got_kind, got_msg)
