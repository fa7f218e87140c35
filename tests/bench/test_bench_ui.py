"""``nearfar bench`` as a user meets it: ``--sizes``, the head-to-head ``--compare``, the summary that opens the
report (shape and machine included), 1D and 2D variants kept apart, figure styles and legends, and the notes that
say "not separable here" when a difference is within the measured noise (fed synthetic timings and scores)."""

from __future__ import annotations

import csv
import json
import re

import pytest

import nearfar
from nearfar.bench import compare as C
from nearfar.bench import figures, noise, summary
from nearfar.bench.cli import _summary, main
from nearfar.bench.files import load_results
from nearfar.bench.report import environment, write_report
from nearfar.bench.shape import check_sizes, parse_sizes
from nearfar.bench.speed_metrics import crossovers

# ------------------------------------------------------------------------------------------------------- --sizes


def test_parse_sizes_splits_lengths_and_maps_sorted_without_repeats():
    assert parse_sizes(["1024", "256", "14X14", "7x9", "256"]) == {"1d": (256, 1024), "2d": ((7, 9), (14, 14))}
    assert parse_sizes(["64"]) == {"1d": (64,)}
    assert check_sizes({"2d": [(28, 28), (14, 14)]}) == {"2d": ((14, 14), (28, 28))}


@pytest.mark.parametrize("value", ["8", "200000", "14x", "3x14", "14x600", "abc", "-5", "2x2x2", "1e3"])
def test_a_bad_size_names_the_flag_and_the_ranges(value, capsys):
    with pytest.raises(ValueError, match=r"--sizes: .*\[16, 131072\].*\[4, 512\]"):
        parse_sizes([value])
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--sizes", value])
    err = capsys.readouterr().err
    assert "--sizes" in err and "[16, 131072]" in err and "Traceback" not in err


def test_sizes_only_go_with_the_speed_suite(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--sizes", "256"])
    assert "--sizes sets the speed suite's sizes" in capsys.readouterr().err


def test_sizes_are_timed_recorded_and_stated_in_the_report(tmp_path, capsys):
    assert main(["bench", "speed", "--mechanism", "streaming_llm", "--sizes", "48", "96", "--rounds", "3",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = [r for r in results["speed"]["rows"] if not r["peer"]]
    assert sorted({r["size"] for r in rows}) == [48, 96] and {r["dims"] for r in rows} == {"1d"}
    assert results["settings"]["sizes"] == {"1d": [48, 96]}
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Summary") < md.index("## Speed")
    assert "B=1, H=2 heads of d=32 (model width 64), N = 48, 96 tokens; float32" in md
    out = capsys.readouterr().out
    assert "fastest per pattern and size" in out and "48 (1d)" in out


# ----------------------------------------------------------------------------------------------------- --compare
def test_compare_times_the_named_mechanisms_in_the_same_rounds(tmp_path, capsys, monkeypatch):
    calls = []
    real = C.interleave

    def spy(methods, rounds, warmup):
        calls.append((sorted(methods), rounds, warmup))
        return real(methods, rounds=rounds, warmup=warmup)

    monkeypatch.setattr(C, "interleave", spy)
    assert main(["bench", "--compare", "streaming_llm", "longformer", "--sizes", "48", "--rounds", "3",
                 "--out", str(tmp_path)]) == 0
    # one CS group (streaming_llm has no NS variant), one call per phase, every method in it, warmed up first
    assert calls == [(["dense", "longformer", "streaming_llm"], 3, 1)] * 2
    results = load_results(tmp_path / "results.json")  # the results file checks, compare included
    assert results["speed"] is None and results["quality"] == {}
    (group,) = results["compare"]["groups"]
    assert (group["pattern"], group["dims"], group["mechanisms"]) == ("CS", "1d", ["streaming_llm", "longformer"])
    assert [len(t) for r in results["compare"]["rows"] for t in r["times_ms"].values()] == [3] * 6
    with (tmp_path / "compare.csv").open() as f:
        pairs = {(r["phase"], r["first"], r["second"]) for r in csv.DictReader(f)}
    assert pairs == {(ph, a, b) for ph in ("fwd", "fwd+bwd") for a, b in
                     (("streaming_llm", "longformer"), ("streaming_llm", "dense"), ("longformer", "dense"))}
    md = (tmp_path / "report.md").read_text()
    assert "## Head-to-head" in md and "streaming_llm vs longformer" in md
    assert "Head-to-head of streaming_llm, longformer on the same inputs in the same rounds" in md
    out = capsys.readouterr().out
    assert "streaming_llm vs longformer" in out and "longformer vs dense" in out
    # the report re-renders from results.json alone
    (tmp_path / "report.md").unlink()
    assert main(["bench", "report", "--out", str(tmp_path)]) == 0
    assert "## Head-to-head" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("argv,match", [
    (["--compare", "swin", "nonsense"], r"unknown \['nonsense'\]; mechanisms that can be compared: \[.*'swin'"),
    (["--compare", "swin", "dense"], "dense is the baseline"),
    (["--compare", "swin"], "at least two"),
    (["--compare", "swin", "swin"], "at least two"),
    (["--compare", "swin", "streaming_llm"], "share no CAB pattern and rank"),
    (["--compare", "swin", "hilo", "--mechanism", "swin"], "cannot go with --mechanism"),
    (["quality", "--compare", "swin", "hilo"], "cannot go with `quality`"),
    (["--compare", "swin", "hilo", "--resume"], "--resume"),
])
def test_compare_errors_are_clear(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert "--compare" in err and "Traceback" not in err
    assert re.search(match, err), err


def test_compare_plan_notes_what_a_mechanism_lacks():
    groups, notes = C.compare_plan(["neighborhood", "streaming_llm"])
    assert {(g["pattern"], g["dims"]) for g in groups} == {("CS", "1d")}
    groups, notes = C.compare_plan(["neighborhood", "longformer", "streaming_llm"])
    assert ("NS", "1d", ["neighborhood", "longformer"]) in [(g["pattern"], g["dims"], g["mechanisms"]) for g in groups]
    assert "streaming_llm: no NS 1d variant" in notes


# --------------------------------------------------------------------------------------------------------- noise
def test_pair_verdicts_from_synthetic_timings():
    a = [1.0, 1.2, 0.9, 1.1, 1.0]
    close = [t * f for t, f in zip(a, (1.1, 0.95, 1.05, 0.9, 1.02))]  # per-round ratios straddle 1
    apart = [t * f for t, f in zip(a, (1.9, 2.1, 2.0, 1.8, 2.2))]
    ratio, iv = noise.pair_ratio(a, close)
    assert noise.pair_verdict("A", "B", iv) == "not separable here" and iv.lo < 1 < iv.hi
    ratio, iv = noise.pair_ratio(a, apart)
    assert noise.pair_verdict("A", "B", iv) == "A faster" and ratio == pytest.approx(2.0)
    assert noise.pair_verdict("B", "A", noise.pair_ratio(apart, a)[1]) == "A faster"
    _, iv = noise.pair_ratio(a[:2], apart[:2])  # two rounds: no spread to speak of, whatever the numbers
    assert noise.pair_verdict("A", "B", iv).startswith("not separable here (fewer than 3 rounds)")
    assert noise.coverage(3) == 0.75 and noise.coverage(5) == pytest.approx(0.9375)


def _compare_row(times: dict, size=64, phase="fwd"):
    return {"pattern": "CS", "dims": "1d", "size": size, "tokens": size, "phase": phase, "rounds": 5,
            "times_ms": times}


def test_the_head_to_head_marks_a_difference_within_noise_and_not_a_clear_one():
    a = [1.0, 1.2, 0.9, 1.1, 1.0]
    row = _compare_row({"fast": a, "twin": [t * f for t, f in zip(a, (1.1, 0.95, 1.05, 0.9, 1.02))],
                        "slow": [3 * t for t in a], "dense": [2 * t for t in a]})
    comparison = {"mechanisms": ["fast", "twin", "slow"], "rows": [row], "config": {"rounds": 5},
                  "groups": [{"pattern": "CS", "dims": "1d", "mechanisms": ["fast", "twin", "slow"]}]}
    verdicts = {(p["first"], p["second"]): p["verdict"] for p in C.pairs(row)}
    assert verdicts == {("fast", "twin"): "not separable here", ("fast", "slow"): "fast faster",
                        ("twin", "slow"): "twin faster", ("fast", "dense"): "fast faster",
                        ("twin", "dense"): "twin faster", ("slow", "dense"): "dense faster"}
    (line,) = C.compare_summary(comparison)[1][2]
    assert line[3:5] == ["fast", "twin"]  # the fastest, and what it cannot be told from
    table = {r[2]: r[4] for r in [b for b in C.compare_blocks(comparison) if b[0] == "table"][1][2]}
    assert table["fast vs twin"] == "not separable here" and table["fast vs slow"] == "fast faster"


def _speed_row(mech, ratio, lo, hi, size=512, dims="1d", phase="fwd", rounds=3, pattern="CS", saved=False):
    tokens = size if dims == "1d" else int(size.split("x")[0]) ** 2
    return {"mechanism": mech, "pattern": pattern, "dims": dims, "size": size, "tokens": tokens, "phase": phase,
            "ratio": ratio, "ratio_min": lo, "ratio_max": hi, "rounds": rounds, "peer": None, "ms": 1.0,
            "dense_ms": ratio, "saved_mib": 1.0 if saved else None, "dense_saved_mib": 4.0 if saved else None,
            "peak_mib": None, "dense_peak_mib": None}


def test_the_summary_notes_runners_up_within_noise_only():
    rows = [_speed_row("a", 2.0, 1.9, 2.1), _speed_row("b", 1.95, 1.8, 2.05), _speed_row("c", 1.2, 1.1, 1.3),
            _speed_row("a", 3.0, 2.9, 3.1, size=2048), _speed_row("b", 1.5, 1.4, 1.6, size=2048),
            _speed_row("c", 0.9, 0.5, 1.5, size=4096), _speed_row("b", 0.3, 0.2, 0.4, size=4096),
            _speed_row("a", 5.0, 5.0, 5.0, size=8192, rounds=1), _speed_row("b", 1.0, 1.0, 1.0, size=8192, rounds=1)]
    found = {f["size"]: f for f in summary.fastest(rows)}
    assert found[512]["mechanism"] == "a" and found[512]["within"] == ["b"]  # b overlaps a; c is clearly slower
    assert found[2048]["within"] == [] and found[2048]["vs_dense"] == "faster"
    assert found[4096]["mechanism"] == "c" and found[4096]["vs_dense"] == "not separable here"
    assert found[8192]["within"] == ["b"]  # one round: no spread measured, nothing ranked
    table = summary.speed_summary({"rows": rows, "config": {}})[1][2]
    cells = {r[1]: r[2] for r in table}
    assert cells["512 (1D)"] == "a 2.00x [1.90-2.10]; not separable from b"
    assert cells["2048 (1D)"] == "a 3.00x [2.90-3.10]"
    assert cells["4096 (1D)"].endswith("(not separable from dense)")
    assert "spread not measured" in cells["8192 (1D)"]


def _quality_rows(scores: dict, metric_ci: dict | None = None):
    return [{"name": name, "seed": 0, "overall": score, "per_bin": {"a": score}, "seconds": 1.0, "steps": 10,
             "dim": 32, "depth": 2, "num_heads": 2, "ci_overall": (metric_ci or {}).get(name)}
            for name, score in scores.items()]


def test_quality_best_and_what_is_within_its_interval():
    rows = _quality_rows({"full": 0.95, "local": 0.30, "m1": 0.90, "m2": 0.89, "m3": 0.50},
                         {"full": (0.94, 0.96), "local": (0.28, 0.32), "m1": (0.88, 0.92), "m2": (0.87, 0.91),
                          "m3": (0.47, 0.53)})
    rank = summary.ranking(rows, "accuracy")
    assert rank["best"] == "m1"  # the best mechanism; the controls are references
    assert rank["verdict"] == {"full": "better", "local": "worse", "m1": "best", "m2": "not separable",
                               "m3": "worse"}
    # bits per character: lower is better; overlapping intervals are not ranked
    bpc = summary.ranking(_quality_rows({"m1": 2.10, "m2": 2.12, "m3": 2.60},
                                        {"m1": (2.05, 2.15), "m2": (2.07, 2.17), "m3": (2.55, 2.65)}), "bpc")
    assert bpc["best"] == "m1" and bpc["verdict"]["m2"] == "not separable" and bpc["verdict"]["m3"] == "worse"
    # no interval recorded and one seed: nothing is separable
    bare = summary.ranking(_quality_rows({"m1": 0.9, "m2": 0.1}), "accuracy")
    assert bare["verdict"]["m2"] == "not separable"


def _results(tmp_path):
    rows = [_speed_row(m, r, 0.9 * r, 1.1 * r, size=s, dims=d, phase=ph, pattern=p, saved=ph == "fwd+bwd")
            for m, p, d, s, r in (("neighborhood", "NS", "1d", 512, 2.0), ("neighborhood", "NS", "2d", "14x14", 0.8),
                                  ("swin", "NS", "2d", "14x14", 1.5), ("neighborhood", "NS", "1d", 2048, 4.0),
                                  ("neighborhood", "NS", "2d", "42x42", 3.0), ("swin", "NS", "2d", "42x42", 6.0))
            for ph in ("fwd", "fwd+bwd")]
    config = {"batch": 1, "dtype": "float32", "threads": 2, "rounds": 3,
              "sizes": {"1d": [512, 2048], "2d": ["14x14", "42x42"]}, "widths": {"1d": [64, 2], "2d": [96, 3]}}
    task = {"name": "char_lm", "pattern": "CS", "kind": "1d", "seq_len": 128, "grid": None, "bin_names": ["a"],
            "metric": "bpc", "description": "character LM"}
    qrows = _quality_rows({"full": 2.0, "local": 2.02, "cca": 2.01, "bigbird": 2.3},
                          {"full": (1.95, 2.05), "local": (1.97, 2.07), "cca": (1.96, 2.06), "bigbird": (2.25, 2.35)})
    return {"env": environment(), "command": "nearfar bench --quick",
            "speed": {"rows": rows, "gates": [], "skipped": [], "config": config,
                      "crossovers": crossovers(rows)},
            "quality": {"char_lm": {"task": task, "rows": qrows}}}


def test_the_report_opens_with_the_summary_shape_and_machine(tmp_path):
    md = write_report(_results(tmp_path), tmp_path)["md"].read_text()
    lines = md.splitlines()
    assert lines[0] == "# nearfar bench report" and lines[2] == "## Summary"
    head = md[:md.index("## Environment")]
    env = environment()
    assert f"torch {env['torch']}, nearfar {nearfar.__version__}" in head and env["cpu"] in head
    assert "1D: B=1, H=2 heads of d=32 (model width 64), N = 512, 2048 tokens" in head
    assert "2D: B=1, H=3 heads of d=32 (model width 96), maps 14x14, 42x42 (N = H\\*W tokens); float32, 2 thread(s)" \
        in head
    assert "| NS | 42x42 (2D) | swin 6.00x \\[5.40-6.60\\] |" in head
    assert "| NS | 14x14 (2D) | swin 1.50x \\[1.35-1.65\\] |" in head  # 0.8x neighborhood (2d) is clearly slower
    # quality: the best mechanism (lower bits per character), with what it cannot be told from (controls too)
    assert "| char_lm | CS | N=128 | bpc (lower is better) | cca 2.010 \\[1.960-2.060\\] | full, local |" in head
    quality = md[md.index("## Quality"):]
    assert "| bigbird | 2.300 | 2.250-2.350 | worse |" in quality and "| local | 2.020 | 1.970-2.070 | not " \
        "separable |" in quality


def test_1d_and_2d_variants_are_separate_series_and_rows(tmp_path, capsys):
    results = _results(tmp_path)
    md = write_report(results, tmp_path)["md"].read_text()
    crossover = md[md.index("### Crossover"):]
    assert "| neighborhood | NS | 1d | fwd | 512 |" in crossover
    assert "| neighborhood | NS | 2d | fwd | 42x42 |" in crossover
    fig = figures.speed_figure(results["speed"]["rows"], "NS", "speed")
    labels = fig.legends[0].get_texts()
    assert sorted(t.get_text() for t in labels) == ["neighborhood (1d)", "neighborhood (2d)", "swin"]
    figures.pyplot().close(fig)
    printed = _summary(results)
    assert "neighborhood         1d    NS" in printed and "neighborhood         2d    NS" in printed


def test_series_styles_are_distinct_and_the_legend_is_outside_the_plots():
    names = [f"m{i:02d}" for i in range(40)]
    styles = figures.series_styles(names)
    assert len({(s["color"], s["ls"]) for s in styles.values()}) == 40
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == 40
    rows = [_speed_row(m, 1.0 + i / 10, 0.9, 1.2 + i / 10, size=n, phase=ph)
            for i, m in enumerate(names[:22]) for n in (512, 2048) for ph in ("fwd", "fwd+bwd")]
    fig = figures.speed_figure(rows, "CS", "speed")
    fig.canvas.draw()
    per_axis = [{(c.lines[0].get_color(), c.lines[0].get_marker(), c.lines[0].get_linestyle())
                 for c in ax.containers if c.get_label() in names} for ax in fig.axes]  # the error-bar series
    assert [len(v) for v in per_axis] == [22, 22]
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert len(legend.get_texts()) == 22
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    figures.pyplot().close(fig)
