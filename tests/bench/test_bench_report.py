"""The ``nearfar bench`` report: files, one speed table per CAB pattern, quality tables with controls first,
self-contained HTML, CSV round trip."""

from __future__ import annotations

import csv
import json

from nearfar.bench.report import environment, render_markdown, write_report


def _speed_row(mech, pattern, n, phase, ratio, peer=None):
    return {"mechanism": mech, "family": "local", "pattern": pattern, "dims": "1d", "size": n, "tokens": n,
            "phase": phase, "ms": 10 / ratio, "dense_ms": 10.0, "ratio": ratio, "ratio_min": 0.9 * ratio,
            "ratio_max": 1.1 * ratio, "rounds": 3,
            "saved_mib": 1.0 if phase == "fwd+bwd" else None, "dense_saved_mib": 4.0 if phase == "fwd+bwd" else None,
            "pairs": None, "gflops": None, "load": [1.0, 1.0], "peer": peer}


def _results():
    rows = [_speed_row(m, p, n, ph, r * n / 256)
            for m, p, r in (("streaming_llm", "CS", 0.5), ("dense", "CC", 1.0), ("swin", "NS", 1.2))
            for n in (256, 1024) for ph in ("fwd", "fwd+bwd")]
    rows.append(_speed_row("streaming_llm", "CS", 1024, "fwd", 0.8, peer="flex"))
    speed = {"rows": rows, "gates": [{"mechanism": "streaming_llm", "pattern": "CS", "passed": True, "max_err": 0.0,
                                      "prefix_invariant": True, "decode_ok": True, "detail": ""},
                                     {"mechanism": "bad", "pattern": "NS", "passed": False, "max_err": 1.0,
                                      "prefix_invariant": None, "decode_ok": None, "detail": "differs from dense"}],
             "crossovers": [{"mechanism": "streaming_llm", "pattern": "CS", "phase": "fwd", "time_crossover": 1024,
                             "memory_crossover": 256}],
             "skipped": [{"mechanism": "fit_ar", "pattern": "CS", "why": "a whole LM"}], "config": {}}
    task = {"name": "mqar", "pattern": "CS", "bin_names": ["<=32", ">32"], "metric": "accuracy",
            "description": "multi-query associative recall"}
    qrows = [{"name": n, "seed": s, "steps": 10, "seconds": 1.0, "params": 100, "metric": "accuracy",
              "overall": acc, "per_bin": {"<=32": acc, ">32": acc / 2}, "items": 1000}
             for n, acc in (("streaming_llm", 0.5), ("full", 0.9), ("none", 0.1), ("local", 0.3)) for s in (0, 1)]
    return {"env": environment(), "speed": speed, "quality": {"mqar": {"task": task, "rows": qrows}},
            "command": "nearfar bench --quick", "interrupted": True}


def test_write_report_produces_every_file(tmp_path):
    paths = write_report(_results(), tmp_path)
    for key in ("json", "md", "html", "speed_csv", "quality_csv"):
        assert paths[key].exists() and paths[key].stat().st_size > 0, key
    md = paths["md"].read_text()
    for heading in ("### NS: non-causal self", "### CS: causal self", "### CC: causal cross"):
        assert heading in md
    assert "### NC" not in md  # no rows, no table
    assert "0.50x / 0.50x" in md and "2.00x / 2.00x" in md and "| mechanism (1d) |" in md  # fwd / fwd+bwd
    assert "1/2 passed" in md and "differs from dense" in md and "a whole LM" in md and "Interrupted" in md
    # controls first in the quality table, then the mechanisms; mean over seeds
    quality = md[md.index("## Quality"):].splitlines()
    rows = [line.split(" | ")[0][2:] for line in quality if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["full", "local", "none", "streaming_llm"]
    assert "| full | 0.900 \\[0.900-0.900\\] |" in md  # brackets escaped: plain text, never a link
    assert "figures/speed_CS.png" in md and (tmp_path / "figures" / "quality_mqar.png").exists()
    assert "## Recall against cost" in md and (tmp_path / "figures" / "recall_vs_cost_mqar.png").exists()
    html_text = paths["html"].read_text()
    assert "data:image/png;base64," in html_text and "src='figures" not in html_text
    assert json.loads(paths["json"].read_text())["command"] == "nearfar bench --quick"
    with paths["speed_csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(_results()["speed"]["rows"])


def test_markdown_tables_render(tmp_path):
    md = render_markdown([("h", 2, "T"), ("table", ["a", "b"], [[1, 2]]), ("p", "x")], tmp_path)
    assert md.splitlines()[:5] == ["## T", "", "| a | b |", "|---|---|", "| 1 | 2 |"]


def test_environment_records_versions():
    env = environment()
    assert env["torch"] and env["threads"] >= 1 and env["cores"] >= 1


def test_a_nan_training_loss_is_flagged(tmp_path):
    from nearfar.bench.report import quality_blocks

    bins = ("a", "b")
    row = {"name": "x", "seed": 0, "overall": 0.0, "per_bin": dict.fromkeys(bins, 0.0), "seconds": 1.0,
           "final_loss": float("nan"), "steps": 1, "batch_size": 1, "lr": 1e-3, "dim": 8, "depth": 1, "num_heads": 1}
    quality = {"t": {"task": {"bin_names": bins, "metric": "accuracy", "pattern": "CS", "description": "d"},
                     "rows": [row, {**row, "seed": 1, "final_loss": 1.0}]}}
    tables = [b for b in quality_blocks(quality, tmp_path) if b[0] == "table"]
    assert "NaN loss in 1 of 2 runs" in tables[0][2][0][1]


def test_markdown_escapes_what_comes_from_the_data(tmp_path):
    results = _results()
    note = "bad | cell\nsecond line `code` <b>*x*</b> [link](http://x) _em_"
    results["speed"]["gates"][1]["detail"] = note
    results["quality"]["mqar"]["task"]["description"] = "recall\n# not a heading"
    paths = write_report(results, tmp_path)
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| bad"))
    # still a 3-cell row on one line: every "|" of the note escaped, its newline a <br>
    assert len(row.replace("\\|", "").split("|")) == 3 + 2 and "second line" in row
    assert "bad \\| cell<br>second line \\`code\\` \\<b\\>\\*x\\*\\</b\\> \\[link\\](http://x) \\_em\\_" in row
    assert "\n# not a heading" not in md and "recall<br># not a heading" in md
    assert json.loads(paths["json"].read_text())["speed"]["gates"][1]["detail"] == note  # the data as it was


def test_rows_of_an_unregistered_mechanism_are_flagged(tmp_path, capsys):
    results = _results()
    results["quality"]["mqar"]["rows"].append({**results["quality"]["mqar"]["rows"][0], "name": "old_name"})
    results["speed"]["rows"].append({**results["speed"]["rows"][0], "mechanism": "renamed_llm"})
    md = write_report(results, tmp_path)["md"].read_text()
    assert "| old_name (unregistered) |" in md and "| renamed_llm (unregistered) |" in md
    assert "Not in the registry: bad, old_name, renamed_llm" in md  # "bad": the fixture's failed gate
    assert "| streaming_llm |" in md and "| full |" in md  # registered names and the controls as they are
    err = capsys.readouterr().err
    assert "warning:" in err and "bad, old_name, renamed_llm" in err


def test_every_report_file_is_written_atomically(tmp_path, monkeypatch):
    import os

    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(os.path.basename(dst)), real(src, dst)))
    write_report(_results(), tmp_path)
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(replaced) and {"results.json", "report.md", "report.html", "speed.csv",
                                             "quality.csv", "quality_mqar.png"} <= set(written)
