"""``nearfar bench`` orchestration: which mechanisms each quality task gets (controls first, settings that build
and run at the task's length), the CLI's errors, Ctrl-C leaving a report, and re-rendering a report."""

from __future__ import annotations

import io
import json

import pytest
import torch

import nearfar
from nearfar.cli import main
from nearfar.suite import run as R
from nearfar.suite.tasks import get_task


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


def test_quick_keeps_the_picks_and_the_name_filter_works():
    task = get_task("mqar", R.QUICK_SIZE)
    quick, _ = R.quality_entries(task, None, quick=True)
    assert set(quick) == {"full", "local", "none", *R.QUICK_PICKS["CS"]}
    only, _ = R.quality_entries(task, ["streaming_llm"], quick=False)
    assert set(only) == {"full", "local", "none", "streaming_llm"}


def test_bar_redraws_about_twenty_times():
    out = io.StringIO()
    bar = R.Bar("x", 1000, stream=out)
    for i in range(1, 1001):
        bar(i)
    assert 19 <= out.getvalue().count("\r") <= 22 and out.getvalue().endswith("\n")


def test_ctrl_c_leaves_the_finished_rows_in_a_report(tmp_path, monkeypatch):
    import nearfar.suite.speed as speed

    def interrupted(*args, on_row=None, **kwargs):
        on_row({"mechanism": "swin", "family": "window", "pattern": "NS", "dims": "2d", "size": "14x14",
                "tokens": 196, "phase": "fwd", "ms": 1.0, "dense_ms": 2.0, "ratio": 2.0, "ratio_min": 2.0,
                "ratio_max": 2.0, "saved_mib": None, "dense_saved_mib": None, "pairs": None, "gflops": None,
                "load": None, "peer": None})
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


def test_report_needs_results(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "report", "--out", str(tmp_path)])
    assert "results.json" in capsys.readouterr().err
