"""The files of ``nearfar bench``: every write atomic (a failed one leaves the old file and no temp file), results
files checked on load (one clear error naming the file and the field), a damaged partial file beside a sound
results.json, and an --out that cannot be a folder."""

from __future__ import annotations

import json
import os

import pytest

from nearfar.bench import run as R
from nearfar.bench.cli import main
from nearfar.bench.report import write_report


def _rows(task, factories, seeds, progress=None, **kw):
    (name,) = factories
    bins = dict.fromkeys(task.bin_names, 0.5)
    return [{"name": name, "seed": seeds[0], "steps": 1, "batch_size": 1, "lr": 1e-3, "dim": 8, "depth": 1,
             "num_heads": 1, "seconds": 0.0, "final_loss": 1.0, "metric": task.metric, "overall": 0.5,
             "per_bin": bins}]


def _results(n_rows: int = 2) -> dict:
    task = {"name": "mqar", "pattern": "CS", "bin_names": ["a"], "metric": "accuracy", "description": "d"}
    rows = [{"name": "full", "seed": s, "seconds": 1.0, "overall": 0.5, "per_bin": {"a": 0.5}} for s in range(n_rows)]
    return {"env": {"torch": "x"}, "speed": None, "quality": {"mqar": {"task": task, "rows": rows, "skipped": []}},
            "command": "nearfar bench", "interrupted": False}


def _stray(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_bench_report_never_truncates_results_json(tmp_path, capsys):
    resource = pytest.importorskip("resource")
    write_report(_results(200), tmp_path)
    before = (tmp_path / "results.json").read_text()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # a full disk, as the kernel gives it: writes past this many bytes fail (EFBIG; Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises((OSError, SystemExit)):
            main(["bench", "report", "--out", str(tmp_path)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "results.json").read_text() == before  # the only copy of the results is intact
    assert _stray(tmp_path) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "results.json" in err


def test_a_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(R.Q, "run_quality", _rows)
    real = os.replace

    def refuse_partial(src, dst):
        if str(dst).endswith("results.partial.json"):
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_partial)
    with pytest.raises(OSError, match="No space"):
        R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    assert _stray(tmp_path) == [] and not (tmp_path / "results.partial.json").exists()


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from nearfar.bench.files import write_atomic

    path = tmp_path / "report.md"
    write_atomic(path, "old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old" and _stray(tmp_path) == []


def _edit(data: dict, how: str) -> str:
    if how == "truncated":
        return json.dumps(data)[:-40]
    if how == "quality_str":
        data["quality"] = "mqar"
    elif how == "rows_str":
        data["quality"]["mqar"]["rows"] = "none"
    elif how == "overall_missing":
        del data["quality"]["mqar"]["rows"][1]["overall"]
    elif how == "speed_ratio_str":
        data["speed"] = {"rows": [{"mechanism": "swin", "pattern": "NS", "phase": "fwd", "size": "14x14",
                                   "tokens": 196, "ratio": "fast"}]}
    elif how == "not_an_object":
        data = [data]
    return json.dumps(data)


@pytest.mark.parametrize("how,match", [
    ("truncated", "not valid JSON"),
    ("quality_str", "field 'quality' must be an object or null, got str"),
    ("rows_str", "field 'quality.mqar.rows' must be a list of rows, got str"),
    ("overall_missing", "field 'quality.mqar.rows\\[1\\].overall' must be a number, missing"),
    ("speed_ratio_str", "field 'speed.rows\\[0\\].ratio' must be a number, got str"),
    ("not_an_object", "must hold a JSON object of results, got list"),
])
def test_a_damaged_results_json_is_one_clear_error(tmp_path, capsys, how, match):
    path = tmp_path / "results.json"
    path.write_text(_edit(_results(), how))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "report", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and "error" in err
    from nearfar.bench.files import load_results

    with pytest.raises(ValueError, match=f"results.json: .*{match}"):
        load_results(path)


def test_a_damaged_partial_beside_results_json_falls_back_to_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R.Q, "run_quality", _rows)
    R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"])
    partial = tmp_path / "results.partial.json"
    partial.write_text((tmp_path / "results.json").read_text()[:100])  # e.g. a disk that filled up mid-copy
    calls = []
    monkeypatch.setattr(R.Q, "run_quality", lambda *a, **kw: (calls.append(1), _rows(*a, **kw))[1])
    capsys.readouterr()
    again = R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"], resume=True)
    err = capsys.readouterr().err
    assert "warning:" in err and "results.partial.json" in err and "results.json instead" in err
    assert not calls and len(again["quality"]["mqar"]["rows"]) == 7  # nothing redone: results.json had it all
    # with no results.json to fall back on, the damaged partial is an error naming it
    (tmp_path / "results.json").unlink()
    partial.write_text("{")
    with pytest.raises(ValueError, match="results.partial.json: not valid JSON"):
        R.run_bench("quality", None, True, 0, tmp_path, None, tasks=["mqar"], resume=True)


def test_out_that_cannot_be_a_folder_is_a_clean_error(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out, match in ((a_file, "is a file"), (a_file / "sub", "cannot create")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "quality", "--task", "mqar", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code != 0 and match in err and str(out) in err and "Traceback" not in err
