"""The speed suite of ``nearfar bench``: the correctness gate (and that it fails broken modules), crossovers,
work counting, and the row schema of a tiny run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nearfar
from nearfar.bench import speed, speed_metrics, speed_peers
from nearfar.bench.speed_gate import GATE_1D, GATE_SETTINGS, TOL, gate_layer
from nearfar.layers.pattern_attention import PatternAttention
from nearfar.patterns import Causal, SlidingWindow
from nearfar.patterns.base import overlaps

REG = {m.name: m for m in nearfar.mechanisms()}
ROW_KEYS = {"mechanism", "family", "pattern", "dims", "size", "tokens", "phase", "ms", "dense_ms", "ratio", "ratio_min",
            "ratio_max", "saved_mib", "dense_saved_mib", "peak_mib", "dense_peak_mib", "pairs", "gflops", "load",
            "peer"}
GATE_KEYS = {"mechanism", "pattern", "passed", "max_err", "prefix_invariant", "decode_ok", "detail"}


def _seq_layer(name: str, pattern: str = "CS") -> nn.Module:
    torch.manual_seed(0)
    return REG[name].build(32, 2, pattern, **GATE_SETTINGS.get(name, {}))


def _x(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------------------- gate
def test_gate_passes_real_mechanisms():
    res = gate_layer(_seq_layer("streaming_llm"), "CS", _x(2, GATE_1D, 32))
    assert res["passed"] and res["max_err"] <= TOL, res
    assert res["prefix_invariant"] is True and res["decode_ok"] is True
    assert "Intersection" in res["detail"]  # the pattern reached attend: the dense engine checked the mechanism
    torch.manual_seed(0)
    res = gate_layer(REG["swin"].build(32, 2, "NS"), "NS", _x(2, 14, 14, 32))
    assert res["passed"] and res["prefix_invariant"] is None and res["decode_ok"] is None, res
    torch.manual_seed(0)
    res = gate_layer(REG["neighborhood"].build(32, 2, "CS"), "CS", _x(1, 12, 12, 32))
    assert res["passed"] and res["prefix_invariant"] is True and "perturbed" in res["detail"], res


def test_gate_says_when_it_cannot_check_a_mechanism():
    torch.manual_seed(0)
    res = gate_layer(REG["linear_attention"].build(32, 2, "CS", block_size=16), "CS", _x(1, 64, 32))
    assert res["passed"] and "never calls nearfar.attend" in res["detail"] and "cannot check" in res["detail"]


class _LeaksNext(nn.Module):
    """A causal layer with a bug: every output also reads the next token's output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        flat = out.flatten(1, -2)
        return (flat + 0.5 * flat.roll(-1, 1)).reshape(out.shape)


@pytest.mark.parametrize("dims", ["1d", "2d"])
def test_gate_fails_a_layer_that_leaks_the_future(dims):
    if dims == "1d":
        layer, x = _LeaksNext(_seq_layer("streaming_llm")), _x(2, GATE_1D, 32)
    else:
        torch.manual_seed(0)
        layer, x = _LeaksNext(REG["neighborhood"].build(32, 2, "CS")), _x(1, 12, 12, 32)
    res = gate_layer(layer, "CS", x)
    assert res["max_err"] <= TOL  # the engines agree: only causality is broken
    assert res["prefix_invariant"] is False and not res["passed"], res


class _TileBlind(SlidingWindow):
    """A sliding window whose tile-level test is wrong: it keeps only tiles overlapping the query tile, so the
    block-sparse engine drops keys the exact ``allowed`` admits; the dense engine (exact mask) does not."""

    def block_allowed(self, qt, kt, nq, nk):
        qlo, qhi = qt.bounds(qt.idx)
        klo, khi = kt.bounds(kt.idx)
        return overlaps(qlo, qhi, klo, khi)

    def _key(self):
        return ("TileBlind", self.left, self.right)


def test_gate_fails_a_layer_whose_fast_engine_differs_from_the_dense_one():
    torch.manual_seed(0)
    layer = PatternAttention(32, 2, _TileBlind(100) & Causal(), causal=True)
    res = gate_layer(layer, "CS", _x(2, GATE_1D, 32))
    assert res["max_err"] > 100 * TOL and not res["passed"], res
    # (a) alone catches it; whether prefix invariance holds too depends on the engine "auto" picks at this size
    # (the block-sparse one drops keys differently for a prefix, whose last tile is shorter)


def test_gate_reports_a_layer_that_cannot_run():
    res = gate_layer(nn.Linear(3, 3), "NS", _x(1, 8, 32))
    assert not res["passed"] and "raised" in res["detail"]


# --------------------------------------------------------------------------------------------------- crossovers
def test_crossover_on_synthetic_numbers():
    sizes = [256, 512, 1024, 2048]
    assert speed_metrics.crossover(sizes, [False, True, True, True]) == 512
    assert speed_metrics.crossover(sizes, [True, False, True, True]) == 1024  # must win and keep winning
    assert speed_metrics.crossover(sizes, [True, True, True, False]) == "> largest"
    assert speed_metrics.crossover(sizes, [True] * 4) == 256
    assert speed_metrics.crossover([], []) is None


@given(st.lists(st.booleans(), min_size=1, max_size=8))
def test_crossover_is_the_start_of_the_final_winning_run(wins):
    labels = list(range(len(wins)))
    got = speed_metrics.crossover(labels, wins)
    if got == "> largest":
        assert not wins[-1]
    else:
        assert all(wins[got:]) and (got == 0 or not wins[got - 1])


def test_crossovers_from_rows_time_and_memory():
    def row(tokens, phase, ratio, saved, dense_saved):
        return {"mechanism": "m", "pattern": "CS", "dims": "1d", "size": tokens, "tokens": tokens, "phase": phase,
                "ratio": ratio, "saved_mib": saved, "dense_saved_mib": dense_saved, "peer": None}

    rows = [row(1024, "fwd+bwd", 1.3, 2.0, 1.0), row(256, "fwd+bwd", 0.5, 1.0, 2.0), row(512, "fwd+bwd", 1.1, 1.0, 1.5),
            row(256, "fwd", 2.0, None, None), row(512, "fwd", 0.9, None, None),
            {**row(256, "fwd", 9.0, None, None), "peer": "x"}]  # peers are left out
    got = {c["phase"]: c for c in speed_metrics.crossovers(rows)}
    assert got["fwd+bwd"]["time_crossover"] == 512 and got["fwd+bwd"]["memory_crossover"] == "> largest"
    assert got["fwd"]["time_crossover"] == "> largest" and got["fwd"]["memory_crossover"] is None
    assert got["fwd"]["peak_crossover"] is None  # rows from before the peak was measured
    peaks = {256: (3.0, 2.0), 512: (1.0, 2.0), 1024: (1.0, 4.0)}
    rows = [{**r, "peak_mib": peaks[r["tokens"]][0], "dense_peak_mib": peaks[r["tokens"]][1]} for r in rows]
    got = {c["phase"]: c for c in speed_metrics.crossovers(rows)}
    assert got["fwd"]["peak_crossover"] == 512 and got["fwd+bwd"]["peak_crossover"] == 512


# --------------------------------------------------------------------------------------------- work and memory
def test_work_counts_allowed_pairs_and_flops():
    calls = [(Causal(), (1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4)),  # 36 pairs per head
             (None, (3, 2, 5, 4), (3, 2, 7, 4), (3, 2, 7, 6))]  # 3 windows of 5 x 7, dv = 6
    pairs, flops = speed_metrics.work(calls)
    assert pairs == 36 + 3 * 35
    assert flops == 2 * 2 * 36 * 8 + 2 * 3 * 2 * 35 * 10
    assert speed_metrics.work([]) == (None, None)


def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    a, b = torch.randn(100, requires_grad=True), torch.randn(100, requires_grad=True)

    def fn():
        (a * b * b).sum().backward()  # b is saved twice: counted once

    assert speed_metrics.saved_bytes(fn, set()) == 400 + 400 + 400  # a, b, and the product a*b
    assert speed_metrics.saved_bytes(fn, {a.untyped_storage().data_ptr()}) == 800


def test_peak_bytes_follows_allocations_and_frees():
    a = torch.randn(100, requires_grad=True)

    def fn():
        b = a * 2
        c = b * 3  # b and c alive: 800 bytes
        del b
        d = c + 1  # b is freed: c and d, 800 again
        return d

    assert speed_metrics.peak_bytes(fn, set()) == 800
    assert speed_metrics.peak_bytes(lambda: a.view(10, 10).t().contiguous(), set()) == 400  # views cost nothing

    def train():  # forward keeps exp's output (400); backward adds its gradient (400) and the input's (400)
        (a * 2).exp().sum().backward()
        a.grad = None

    assert 800 <= speed_metrics.peak_bytes(train, set()) <= 1208


def test_peak_bytes_sees_a_materialised_score_matrix_and_not_fused_attention():
    q = torch.randn(1, 2, 256, 16)
    scores = 2 * 256 * 256 * 4  # bytes of one (heads, N, N) fp32 matrix
    math_path = speed_metrics.peak_bytes(lambda: torch.softmax(q @ q.transpose(-1, -2), -1) @ q, set())
    fused = speed_metrics.peak_bytes(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), set())
    assert 2 * scores <= math_path <= 2 * scores + 3 * q.nbytes  # scores and their softmax, then the output
    assert q.nbytes <= fused <= q.nbytes + 2 * 256 * 4  # the output and its log-sum-exp: the kernel works by blocks


# ------------------------------------------------------------------------------------------------- selection
def test_select_by_family_name_and_kind():
    chosen, _ = speed.select(["window"])
    assert {m.name for m in chosen} == {m.name for m in nearfar.mechanisms(family="window")}
    chosen, skipped = speed.select(["local", "neighborhood", "block_transformer"])
    assert [m.name for m in chosen].count("neighborhood") == 1 and all(m.kind == "layer" for m in chosen)
    assert any(s["mechanism"] == "block_transformer" and "kind='model'" in s["why"] for s in skipped)
    chosen, skipped = speed.select(None)
    assert "dense" not in {m.name for m in chosen} and any(s["mechanism"] == "dense" for s in skipped)


def test_unknown_names_and_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown mechanism or family 'nope'.*swin"):
        speed.run_speed(["nope"])
    with pytest.raises(TypeError, match="names must be a list"):
        speed.run_speed("swin")
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        speed.run_speed(["swin"], rounds=0)
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        speed.run_speed(["swin"], peers=["nope"])


# ------------------------------------------------------------------------------------------------ a tiny run
def test_run_speed_rows_have_the_schema():
    seen, steps = [], []
    res = speed.run_speed(["streaming_llm", "swin"], quick=True, rounds=1, peers=False,
                          sizes={"1d": (256,), "2d": ((14, 14),)}, widths={"1d": (32, 2), "2d": (32, 2)},
                          progress=lambda done, total, label: steps.append((done, total)), on_row=seen.append)
    rows = res["rows"]
    assert seen == rows and len(rows) == 4 and steps[-1][0] == steps[-1][1]
    assert {(r["mechanism"], r["phase"]) for r in rows} == {(m, p) for m in ("streaming_llm", "swin")
                                                            for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert ROW_KEYS <= set(r) and r["peer"] is None and r["ms"] > 0 and r["dense_ms"] > 0
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and len(r["load"]) == 2
        assert (r["saved_mib"] is None) == (r["phase"] == "fwd") and r["gflops"] > 0
    by = {(r["mechanism"], r["phase"]): r for r in rows}
    assert by["streaming_llm", "fwd"]["pairs"] == 256 * 257 // 2  # window 512 > 256: every causal pair
    assert by["swin", "fwd"]["pairs"] == 4 * 49 * 49 and by["swin", "fwd"]["size"] == "14x14"
    assert by["swin", "fwd"]["tokens"] == 196 and by["streaming_llm", "fwd"]["size"] == 256
    assert by["streaming_llm", "fwd+bwd"]["saved_mib"] > 0 and by["streaming_llm", "fwd+bwd"]["dense_saved_mib"] > 0
    for r in rows:  # the output alone is 1 x N x 32 fp32; training holds more than inference
        assert r["peak_mib"] * 2**20 >= r["tokens"] * 32 * 4 and r["dense_peak_mib"] * 2**20 >= r["tokens"] * 32 * 4
    assert by["swin", "fwd+bwd"]["peak_mib"] > by["swin", "fwd"]["peak_mib"]
    assert [GATE_KEYS <= set(g) and g["passed"] for g in res["gates"]] == [True, True]
    assert len(res["crossovers"]) == 4
    assert any(s["mechanism"] == "swin" and "3d" in s["why"] for s in res["skipped"])
    assert res["config"]["sizes"] == {"1d": [256], "2d": ["14x14"]} and res["config"]["peers"] == "off"


def test_peak_is_measured_with_the_warm_up_draws():
    # MSW-MSA draws a shift per call and caches a plan per shift: a peak call with another draw than the warm-up's
    # would count a cold plan (larger than the training step itself)
    # (84x84: a cold plan is ~65 MiB, the step's tensors ~5; three of four draws differ from the warm-up's)
    torch.manual_seed(0)
    res = speed.run_speed(["msw_msa"], rounds=1, peers=False, sizes={"2d": ((84, 84),)}, widths={"2d": (32, 2)})
    by = {r["phase"]: r for r in res["rows"]}
    assert by["fwd"]["peak_mib"] < 10 and by["fwd"]["peak_mib"] < by["fwd+bwd"]["peak_mib"]


def test_a_peer_is_timed_beside_in_the_same_rounds(monkeypatch):
    # a stand-in peer (always installed): the mechanism's own layer, so it must compute the same function
    peer = speed_peers.Peer("self", "torch", frozenset({("streaming_llm", "CS", "1d")}), ("fwd", "fwd+bwd"),
                            lambda layer, x: (layer, True), "the layer itself")
    monkeypatch.setattr(speed_peers, "PEERS", (peer,))
    res = speed.run_speed(["streaming_llm"], rounds=1, peers=["self"], sizes={"1d": (128,)},
                          widths={"1d": (32, 2)})
    peers = [r for r in res["rows"] if r["peer"] == "self"]
    assert len(peers) == 2 and all(ROW_KEYS <= set(r) for r in peers)
    fwd = next(r for r in peers if r["phase"] == "fwd")
    assert fwd["peer_err"] == 0.0 and fwd["note"] == "the layer itself"
    bwd = next(r for r in peers if r["phase"] == "fwd+bwd")
    ours = next(r for r in res["rows"] if r["peer"] is None and r["phase"] == "fwd+bwd")
    assert bwd["saved_mib"] == ours["saved_mib"]  # same computation, same saved bytes
    assert bwd["peak_mib"] is None and ours["peak_mib"] > 0  # peers' peaks are not measured (compiled code)
    assert res["config"]["peers"] == {"self": "available"}


def test_missing_peers_are_reported_not_required(monkeypatch):
    ghost = speed_peers.Peer("ghost", "no_such_module_xyz", frozenset({("streaming_llm", "CS", "1d")}), ("fwd",),
                             lambda layer, x: (layer, True), "")
    monkeypatch.setattr(speed_peers, "PEERS", (ghost,))
    assert speed_peers.status() == {"ghost": "no_such_module_xyz is not installed"}
    assert speed_peers.peers_for("streaming_llm", "CS", "1d", "fwd", 128, 0, 1, quick=False) == []
    res = speed.run_speed(["streaming_llm"], rounds=1, sizes={"1d": (128,)}, widths={"1d": (32, 2)})
    assert all(r["peer"] is None for r in res["rows"]) and len(res["rows"]) == 2


def test_a_failing_peer_is_reported_and_our_row_kept(monkeypatch):
    def broken(layer, x):
        raise RuntimeError("peer exploded")

    peer = speed_peers.Peer("bad", "torch", frozenset({("streaming_llm", "CS", "1d")}), ("fwd",), broken, "")
    monkeypatch.setattr(speed_peers, "PEERS", (peer,))
    res = speed.run_speed(["streaming_llm"], rounds=1, sizes={"1d": (128,)}, widths={"1d": (32, 2)})
    assert [r["peer"] for r in res["rows"]] == [None, None]
    assert any(s["mechanism"] == "streaming_llm (peer bad)" and "peer exploded" in s["why"] for s in res["skipped"])


def test_slow_rows_get_fewer_rounds():
    torch.manual_seed(0)
    ours, dense = REG["streaming_llm"].build(32, 2, "CS").eval(), REG["dense"].build(32, 2, "CS").eval()
    x = _x(1, 64, 32)
    base = {"mechanism": "streaming_llm", "family": "local+global", "pattern": "CS", "dims": "1d", "size": 64,
            "tokens": 64}
    assert speed._time_row(base, ours, dense, [x], [x], "fwd", 4, 0, [])[0]["rounds"] == 4
    assert speed._time_row(base, ours, dense, [x], [x], "fwd", 4, 0, [], budget_s=0.0)[0]["rounds"] == 1
