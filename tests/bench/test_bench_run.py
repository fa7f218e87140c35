"""``nearfar bench`` orchestration: which mechanisms each quality task gets (controls first, settings that build
and run at the task's length), the CLI's errors, Ctrl-C leaving a report, and re-rendering a report."""

from __future__ import annotations

import io
import json

import pytest
import torch

import nearfar
from nearfar.bench import run as R
from nearfar.bench.cli import main
from nearfar.bench.tasks import get_task


@pytest.mark.parametrize("name,size", [("mqar", "tiny"), ("bidir_mqar", "quick"), ("char_lm", "full")])
def test_quality_entries_build_every_supporting_mechanism(name, size):
    task = get_task(name, size)
    factories, skipped = R.quality_entries(task, None, quick=False)
    assert list(factories)[:3] == ["full", "local", "none"]
    want = {m.name for m in nearfar.mechanisms(kind="layer", pattern=task.pattern) if "1d" in m.dims} - {"dense"}
    assert set(factories) - {"full", "local", "none"} == want
    assert {s["mechanism"] for s in skipped} == {m.name for m in nearfar.mechanisms(kind="layer")
                                                 if "1d" in m.dims and task.pattern not in m.patterns}
    x = torch.randn(2, task.seq_len, 32)
    for mech, factory in factories.items():
        if factory is not None:  # the scaled settings build and run at the task's length
            assert factory(32, 2)(x).shape == x.shape, mech


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_every_vision_mechanism_runs_on_the_2d_task(size):
    task = get_task("spatial_recall", size)
    factories, skipped = R.quality_entries(task, None, quick=False)
    assert skipped == []  # image_settings fit every window design to the task's image (12x12 or 16x16)
    assert set(factories) - {"full", "local", "none"} == {m.name for m in nearfar.mechanisms(kind="layer")
                                                         if "2d" in m.dims} - {"dense"}
    x = torch.randn(1, *task.grid, 32)
    for mech, factory in factories.items():
        if factory is not None:
            assert factory(32, 2)(x).shape == x.shape, mech


@pytest.mark.parametrize("grid,w,p", [((16, 16), 5, 4), ((12, 12), 5, 4), ((14, 14), 5, 2), ((7, 9), 5, 1),
                                      ((30, 30), 7, 6)])
def test_image_settings_window_divides_the_image_within_reach(grid, w, p):
    assert R.image_settings("swin", w, grid) == {"window_size": p}
    assert R.image_settings("maxvit_grid", w, grid) == {"partition_size": p}
    assert R.image_settings("vsa", w, grid) == {"window_size": p}
    assert R.image_settings("hilo", w, grid) == {}


def test_quick_keeps_the_picks_and_the_name_filter_works():
    task = get_task("mqar", R.QUICK_SIZE)
    quick, _ = R.quality_entries(task, None, quick=True)
    assert set(quick) == {"full", "local", "none", *R.QUICK_PICKS["CS"]}
    only, _ = R.quality_entries(task, ["streaming_llm"], quick=False)
    assert set(only) == {"full", "local", "none", "streaming_llm"}
    named, _ = R.quality_entries(task, ["moba", "nsa"], quick=True)  # --quick --mechanism: the names, not the picks
    assert set(named) == {"full", "local", "none", "moba", "nsa"}


@pytest.mark.parametrize("w,n", [(8, 64), (16, 128), (32, 256)])
def test_routed_settings_keep_the_local_reach_and_a_far_path(w, n):
    """The routed mechanisms' own block / window is within the local control's ``w`` keys, and they route to at
    least two blocks beyond it."""
    moba = R.seq_settings("moba", w, n)
    assert moba["chunk_size"] <= w and moba["topk"] - 1 >= 2
    nsa = R.seq_settings("nsa", w, n)
    assert nsa["window_size"] == w and nsa["block_size"] <= w and nsa["block_counts"] - 3 >= 2
    seer = R.seq_settings("seer_attention", w, n)
    assert seer["block_size"] <= w and seer["token_budget"] // seer["block_size"] >= 2
    landmark = R.seq_settings("landmark", w, n)
    assert landmark["block_size"] + 1 == w and landmark["top_k"] >= 2


def test_bar_redraws_about_twenty_times():
    out = io.StringIO()
    bar = R.Bar("x", 1000, stream=out)
    for i in range(1, 1001):
        bar(i)
    assert 19 <= out.getvalue().count("\r") <= 22 and out.getvalue().endswith("\n")


def test_ctrl_c_leaves_the_finished_rows_in_a_report(tmp_path, monkeypatch):
    import nearfar.bench.speed as speed

    def interrupted(*args, on_row=None, into=None, **kwargs):  # run_speed fills ``into`` as rows come
        row = {"mechanism": "swin", "family": "window", "pattern": "NS", "dims": "2d", "size": "14x14",
                "tokens": 196, "phase": "fwd", "ms": 1.0, "dense_ms": 2.0, "ratio": 2.0, "ratio_min": 1.9,
                "ratio_max": 2.1, "rounds": 3, "saved_mib": None, "dense_saved_mib": None, "pairs": None,
                "gflops": None, "load": None, "peer": None}
        into["rows"].append(row)
        on_row(row)
        raise KeyboardInterrupt

    monkeypatch.setattr(speed, "run_speed", interrupted)
    results = R.run_bench("speed", ["swin"], True, 0, tmp_path, None)
    assert results["interrupted"] and len(results["speed"]["rows"]) == 1
    md = (tmp_path / "report.md").read_text()
    assert "Interrupted" in md and "| swin | 2.00x / - |" in md
    assert not (tmp_path / "results.partial.json").exists()
    # the report re-renders from results.json alone
    (tmp_path / "report.md").unlink()
    assert main(["bench", "report", "--out", str(tmp_path)]) == 130
    assert "swin" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["interrupted"]


def test_sigterm_ends_the_run_like_ctrl_c(tmp_path, monkeypatch):
    import os
    import signal

    import nearfar.bench.speed as speed

    def killed(*args, on_row=None, into=None, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. ``kill`` of a run started in the background
        raise AssertionError("SIGTERM did not interrupt the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(speed, "run_speed", killed)
    results = R.run_bench("speed", ["swin"], True, 0, tmp_path, None)
    assert results["interrupted"] and (tmp_path / "report.md").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


@pytest.mark.parametrize("argv,match", [
    (["bench", "speed", "--mechanism", "nonsense"], "unknown"),
    (["bench", "quality", "--task", "nonsense"], "--task"),
    (["bench", "--device", "tpu"], "not available"),
    (["bench", "--rounds", "0"], "--rounds"),
])
def test_cli_errors_name_the_option(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert match in capsys.readouterr().err


def test_cli_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"nearfar {nearfar.__version__}"


def test_report_needs_results(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "report", "--out", str(tmp_path)])
    assert "results.json" in capsys.readouterr().err


def _fake_rows(task, factories, seeds, progress=None, **kw):
    (name,) = factories
    bins = dict.fromkeys(task.bin_names, 0.5)
    return [{"name": name, "seed": seeds[0], "steps": 1, "batch_size": 1, "lr": 1e-3, "dim": 8, "depth": 1,
             "num_heads": 1, "params": 1, "seconds": 0.0, "final_loss": 1.0, "metric": task.metric, "overall": 0.5,
             "per_bin": bins, "items": 1, "targets": 1, "ci": {b: (0.4, 0.6) for b in bins},
             "ci_overall": (0.4, 0.6), "exact_match": 0.5}]


def test_resume_runs_only_what_is_missing(tmp_path, monkeypatch):
    calls = []

    def interrupt_on_third(task, factories, seeds, progress=None, **kw):
        calls.append((task.name, *factories, *seeds))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _fake_rows(task, factories, seeds)

    monkeypatch.setattr(R.Q, "run_quality", interrupt_on_third)
    first = R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    assert first["interrupted"] and len(first["quality"]["mqar"]["rows"]) == 2
    calls.clear()
    monkeypatch.setattr(R.Q, "run_quality", lambda *a, **kw: (calls.append(1), _fake_rows(*a, **kw))[1])
    again = R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"], resume=True)
    names = [r["name"] for r in again["quality"]["mqar"]["rows"]]
    want = ["full", "local", "none", *R.QUICK_PICKS["CS"]]
    assert not again["interrupted"] and sorted(names) == sorted(want) and len(calls) == len(want) - 2
    # nothing left to do: a second resume trains nothing and keeps every row; without --resume it starts over
    calls.clear()
    R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"], resume=True)
    assert not calls and len(json.loads((tmp_path / "results.json").read_text())["quality"]["mqar"]["rows"]) == 7
    fresh = R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    assert len(calls) == 7 and len(fresh["quality"]["mqar"]["rows"]) == 7


def test_resume_keeps_finished_speed_groups(tmp_path, monkeypatch):
    import nearfar.bench.speed as speed

    real = speed._time_row

    def interrupt_at_hilo(base, *args, **kwargs):
        if base["mechanism"] == "hilo":
            raise KeyboardInterrupt
        return real(base, *args, **kwargs)

    monkeypatch.setattr(speed, "_time_row", interrupt_at_hilo)
    first = R.run_bench("speed", ["swin", "hilo", "block_transformer"], True, 0, tmp_path, 1)
    assert first["interrupted"] and [g["mechanism"] for g in first["speed"]["gates"]] == ["swin", "hilo"]
    swin = [r for r in first["speed"]["rows"] if r["mechanism"] == "swin"]
    assert swin and not any(r["mechanism"] == "hilo" for r in first["speed"]["rows"])
    monkeypatch.setattr(speed, "_time_row", real)
    # resumed with hilo alone: swin's finished group is kept as it was, hilo's unfinished one is timed
    again = R.run_bench("speed", ["hilo"], True, 0, tmp_path, 1, resume=True)
    assert not again["interrupted"]
    assert [r for r in again["speed"]["rows"] if r["mechanism"] == "swin"] == swin
    assert sorted(g["mechanism"] for g in again["speed"]["gates"]) == ["hilo", "swin"]
    assert any(r["mechanism"] == "hilo" for r in again["speed"]["rows"])
    assert {c["mechanism"] for c in again["speed"]["crossovers"]} >= {"swin", "hilo"}
    # the notes on what the first run left out (swin's 3D variant, a whole model) survive the narrower resume
    notes = [(s["mechanism"], s["why"][:2]) for s in again["speed"]["skipped"] if s["pattern"] == "*"]
    assert sorted(notes) == [("block_transformer", "a "), ("swin", "3d")]


def test_resume_refuses_other_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R.Q, "run_quality", _fake_rows)
    R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    with pytest.raises(ValueError, match="--resume"):
        R.run_bench("quality", None, False, 0, tmp_path, None, tasks=["mqar"], resume=True)
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--task", "mqar", "--lr-sweep", "1e-3", "3e-3", "--resume", "--out",
              str(tmp_path)])
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("change,named", [({"seed": 1}, "seed 0 -> 1"), ({"rounds": 2}, "rounds 3 -> 2")])
def test_resume_refuses_another_seed_or_rounds_unless_forced(tmp_path, monkeypatch, capsys, change, named):
    monkeypatch.setattr(R.Q, "run_quality", _fake_rows)
    R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    args = {"seed": 0, "rounds": None, **change}
    with pytest.raises(ValueError, match=f"--resume: .*{named}.*--force-resume"):
        R.run_bench("quality", None, True, args["seed"], tmp_path, args["rounds"], tasks=["mqar"], resume=True)
    flags = ["--seed", str(args["seed"])] + (["--rounds", str(args["rounds"])] if args["rounds"] else [])
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "quality", "--task", "mqar", "--resume", "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and named in err and "Traceback" not in err
    # the rows on disk are untouched, and --force-resume keeps them, saying so in the report
    assert len(json.loads((tmp_path / "results.json").read_text())["quality"]["mqar"]["rows"]) == 7
    forced = R.run_bench("quality", None, True, args["seed"], tmp_path, args["rounds"], tasks=["mqar"],
                         force_resume=True)
    setting = next(iter(change))
    assert [(c["setting"], c["after"]) for c in forced["resumed_with_changes"]] == [(setting, change[setting])]
    assert "Resumed with other settings (--force-resume)" in (tmp_path / "report.md").read_text()
    # the new settings are the run's now: resuming with them again is no change
    R.run_bench("quality", None, True, args["seed"], tmp_path, args["rounds"], tasks=["mqar"], resume=True)


def test_parallel_jobs_give_the_serial_results():
    def run(jobs):
        results = {"quality": {}}
        R.run_quality_suite(["mqar"], None, True, 0, results, lambda: None, jobs=jobs,
                            overrides={"steps": 4, "batch_size": 4})
        return {(r["name"], r["seed"]): r for r in results["quality"]["mqar"]["rows"]}

    serial, parallel = run(1), run(2)
    assert set(serial) == set(parallel) and len(serial) == 3 + len(R.QUICK_PICKS["CS"])
    for key, row in serial.items():
        assert abs(row["final_loss"] - parallel[key]["final_loss"]) < 1e-3, key
        assert parallel[key]["jobs"] == 2 and parallel[key]["threads"] >= 1 and "jobs" not in row
        assert abs(row["overall"] - parallel[key]["overall"]) < 0.02, key


@pytest.mark.parametrize("argv,match", [(["--jobs", "0"], "--jobs"), (["--lr-sweep", "3"], "--lr-sweep")])
def test_jobs_and_lr_sweep_checked(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quality", *argv])
    assert match in capsys.readouterr().err
