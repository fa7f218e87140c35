"""The report of ``nearfar bench``: results as JSON/CSV, figures (matplotlib), and one Markdown and one
self-contained HTML page built from the same blocks (headings, paragraphs, tables, figures).

Layout of ``results`` (what ``nearfar.bench.cli`` collects and saves as ``results.json``)::

    {"env": environment(), "speed": run_speed(...) or None,
     "quality": {task_name: {"task": {...task metadata...}, "rows": run_quality(...) rows}},
     "compare": run_compare(...) (``--compare`` only)}

The report opens with a summary (``summary.py``: per pattern and size the fastest mechanism, per task the best one,
what this run cannot tell apart from them, the shape and the machine). Speed tables follow CAB's lesson: one table
per attention pattern (NS, CS, NC, CC) and rank. Quality tables show every mechanism with the controls (full
attention, local-only, no attention) of the same task, with intervals (``noise.py``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

from ..layers.registry import CAB_PATTERNS, mechanisms
from .compare import compare_blocks, compare_summary, compare_table
from .figures import quality_figure, recall_figure, save_figure, speed_figures
from .files import warn, write_atomic
from .noise import joined_interval, row_interval, versus_one
from .render import ReportItem, md_escape, render_html, render_markdown
from .summary import CONTROLS, ranking, summary_blocks

__all__ = ["environment", "md_escape", "quality_blocks", "recall_vs_cost", "render_html", "render_markdown",
           "speed_blocks", "unregistered", "write_report"]

#: how a table marks a mechanism the registry does not know (renamed or removed since the run, or edited by hand)
UNREGISTERED = " (unregistered)"


def environment() -> dict:
    """What the numbers depend on: versions, threads, CPU, load, git commit."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import nearfar

    return {"nearfar": nearfar.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu": cpu, "cores": os.cpu_count(), "load": load, "git": sha, "platform": platform.platform()}


# ------------------------------------------------------------------------------------------------ speed blocks
def _size_key(size: object) -> tuple:
    return (0, size) if isinstance(size, int) else (1, int(str(size).split("x")[0]))


def speed_blocks(speed: dict, fig_dir: Path) -> list[ReportItem]:
    rows = [r for r in speed.get("rows", []) if not r.get("peer")]
    peers = [r for r in speed.get("rows", []) if r.get("peer")]
    out: list[ReportItem] = [("h", 2, "Speed"), ("p", "Median per-round ratio of fused dense SDPA time to the "
                                                   "mechanism's time, measured in the same interleaved rounds "
                                                   "(> 1: faster than dense). Cells: forward / forward+backward; "
                                                   "'~' marks a ratio whose per-round ratios straddle 1 (or that "
                                                   "had fewer than 3 rounds): not separable from dense here. The "
                                                   "min-max over rounds of every ratio is in speed.csv (ratio_min, "
                                                   "ratio_max) and drawn as error bars.")]
    for pattern, label in CAB_PATTERNS.items():
        mine = [r for r in rows if r["pattern"] == pattern]
        if not mine:
            continue
        out.append(("h", 3, f"{pattern}: {label}"))
        for dims in sorted({r.get("dims", "") for r in mine}):  # one table per rank: sequences, then maps
            same = [r for r in mine if r.get("dims", "") == dims]
            sizes = sorted({r["size"] for r in same}, key=_size_key)
            cells: dict = defaultdict(dict)
            for r in same:
                cells[_label(r["mechanism"])][(r["size"], r["phase"])] = _ratio_cell(r)
            table = [[mech] + [" / ".join(cells[mech].get((s, ph), "-") for ph in ("fwd", "fwd+bwd")) for s in sizes]
                     for mech in sorted(cells)]
            out.append(("table", [f"mechanism ({dims})" if dims else "mechanism"] + [str(s) for s in sizes], table))
        out += speed_figures(mine, pattern, fig_dir)
    if peers:
        out += [("h", 3, "Peers, timed beside nearfar on the same inputs"),
                ("table", ["peer", "beside", "pattern", "size", "phase", "peer ms", "dense ms", "dense / peer"],
                 [[r["peer"], _label(r["mechanism"]), r["pattern"], str(r["size"]), r["phase"], f"{r['ms']:.2f}",
                   f"{r['dense_ms']:.2f}", f"{r['ratio']:.2f}x"] for r in peers])]
    if speed.get("crossovers"):
        out += [("h", 3, "Crossover (CAB's efficiency length): smallest measured size from which the mechanism "
                         "stays faster / lighter than dense"),
                ("table", ["mechanism", "pattern", "rank", "phase", "time", "peak memory",
                           "memory saved for backward"],
                 [[_label(c["mechanism"]), c["pattern"], c.get("dims") or "", c["phase"], _none(c["time_crossover"]),
                   _none(c.get("peak_crossover")), _none(c["memory_crossover"])] for c in speed["crossovers"]])]
    gates = speed.get("gates", [])
    failed = [g for g in gates if not g["passed"]]
    out.append(("p", f"Correctness gate before timing: {len(gates) - len(failed)}/{len(gates)} passed."))
    if failed:
        out.append(("table", ["mechanism", "pattern", "detail"],
                    [[_label(g["mechanism"]), g["pattern"], g["detail"]] for g in failed]))
    if speed.get("skipped"):
        out += [("h", 3, "Not timed"),
                ("table", ["mechanism", "pattern", "why"],
                 [[_label(s["mechanism"]), s.get("pattern", ""), s["why"]] for s in speed["skipped"]])]
    return out


def _ratio_cell(row: dict) -> str:
    return f"{row['ratio']:.2f}x" + ("~" if versus_one(row_interval(row)) not in ("faster", "slower") else "")


def _registered(name: str) -> bool:
    # a peer's note reads "swin (peer natten)": the mechanism is the part before
    return name.split(" (peer ")[0] in {m.name for m in mechanisms()} | set(CONTROLS)


def _label(name: str) -> str:
    return name if _registered(name) else name + UNREGISTERED


def unregistered(results: dict) -> list[str]:
    """The mechanisms ``results`` holds rows or notes of that are neither registered nor a quality control."""
    speed = results.get("speed") or {}
    names = {r["mechanism"] for key in ("rows", "gates", "crossovers", "skipped") for r in speed.get(key) or []}
    for entry in (results.get("quality") or {}).values():
        names |= {r["name"] for r in entry["rows"]} | {s["mechanism"] for s in entry.get("skipped") or []}
    return sorted({n.split(" (peer ")[0] for n in names if not _registered(n)})


def _none(value: object) -> str:
    return "n/a" if value is None else str(value)


# ---------------------------------------------------------------------------------------------- quality blocks
def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.fmean(values) if values else float("nan")


def quality_blocks(quality: dict, fig_dir: Path) -> list[ReportItem]:
    out: list[ReportItem] = [("h", 2, "Quality"), ("p", "Trained from scratch for a fixed number of steps; mean over "
                                                   "seeds (min-max in brackets); controls: full attention (full), "
                                                   "sliding window (local), no attention (none). 95% interval: "
                                                   "Wilson (accuracy) or normal (bits per character) at evaluation, "
                                                   "from the lowest seed's lower end to the highest seed's upper "
                                                   "end. 'vs best': against the best mechanism; 'not separable': "
                                                   "the intervals overlap, so this run cannot rank the two.")]
    for name, entry in quality.items():
        task, rows = entry["task"], entry["rows"]
        if not rows:
            continue
        bins = list(task["bin_names"])
        by_mech: dict = defaultdict(list)
        for r in rows:
            by_mech[r["name"]].append(r)
        order = [m for m in CONTROLS if m in by_mech] + sorted(m for m in by_mech if m not in CONTROLS)
        rank = ranking(rows, task["metric"])
        table = []
        for mech in order:
            rs = by_mech[mech]
            overall = [r["overall"] for r in rs]
            cell = f"{_mean(overall):.3f} [{min(overall):.3f}-{max(overall):.3f}]" if len(rs) > 1 else \
                f"{overall[0]:.3f}"
            diverged = sum(1 for r in rs if r.get("final_loss") != r.get("final_loss"))
            if diverged:  # a NaN training loss: the score is that of a broken model, not of the mechanism
                cell += f" (NaN loss in {diverged} of {len(rs)} runs)"
            iv = rank["intervals"][mech]
            table.append([_label(mech), cell, f"{iv.lo:.3f}-{iv.hi:.3f}" if iv.measured else "n/a",
                          rank["verdict"][mech]] + [f"{_mean([r['per_bin'].get(b) for r in rs]):.3f}" for b in bins]
                         + [str(len(rs)), f"{_mean([r['seconds'] for r in rs]):.0f}"])
        metric = task["metric"]
        longest = max(rows, key=lambda r: r["seconds"])
        settings = ", ".join(f"{k} {longest.get(k)}"
                             for k in ("steps", "batch_size", "lr", "dim", "depth", "num_heads"))
        out += [("h", 3, f"{name} ({task['pattern']}): {task['description']}"),
                ("p", f"Training: {settings}. Longest run: {longest['seconds']:.0f} s ({longest['name']}, seed "
                      f"{longest['seed']}{_threads(longest)}; the suite's budget is 600 s a run on 2 cores)."),
                ("table", ["mechanism", f"{metric} overall", "95% interval", "vs best"] + bins
                 + ["seeds", "train s"], table)]
        out += _quality_figure(name, task, order, by_mech, fig_dir)
    return out


def _threads(row: dict) -> str:
    if "threads" not in row:
        return ""
    return f"; {row['threads']} thread(s)" + (f", {row['jobs']} runs at once" if row.get("jobs", 1) > 1 else "")


def _bin_interval(rows: list[dict], name: str) -> tuple[float, float] | None:
    """The seeds' 95% intervals of bin ``name`` joined (lowest to highest end), None where one is missing."""
    return joined_interval([(r.get("ci") or {}).get(name) for r in rows])


def _quality_figure(name: str, task: dict, order: list[str], by_mech: dict, fig_dir: Path) -> list[ReportItem]:
    scores = {m: [_mean([r["per_bin"].get(b) for r in by_mech[m]]) for b in task["bin_names"]] for m in order}
    fig = quality_figure(name, task, order, scores, {m: [_bin_interval(by_mech[m], b) for b in task["bin_names"]]
                                                     for m in order})
    if fig is None:
        return []
    return [("img", save_figure(fig, fig_dir, f"quality_{name}"), f"{name}: {task['metric']} by bin")]


def recall_vs_cost(quality: dict, speed: dict, fig_dir: Path) -> list[ReportItem]:
    """Zoology's recall-memory plot with measured cost: each accuracy task's overall score against the mechanism's
    forward+backward speed ratio to dense at the largest 1D size timed in the same pattern (dense itself at 1)."""
    blocks = []
    for name, entry in quality.items():
        task = entry["task"]
        if task["metric"] != "accuracy" or task.get("kind") == "2d":
            continue
        rows = [r for r in speed.get("rows", []) if r["pattern"] == task["pattern"] and r.get("dims") == "1d"
                and r["phase"] == "fwd+bwd" and not r.get("peer")]
        if not rows:
            continue
        largest = max(r["tokens"] for r in rows)
        ratio = {r["mechanism"]: r["ratio"] for r in rows if r["tokens"] == largest} | {"full": 1.0}
        scores: dict = defaultdict(list)
        for r in entry["rows"]:
            scores[r["name"]].append(r["overall"])
        points = [(ratio[m], _mean(v), m) for m, v in scores.items() if m in ratio]
        fig = recall_figure(name, task, points, largest) if len(points) >= 2 else None
        if fig is not None:
            path = save_figure(fig, fig_dir, f"recall_vs_cost_{name}")
            blocks.append(("img", path, f"{name}: accuracy against speed ratio"))
    return [("h", 2, "Recall against cost")] + blocks if blocks else []


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v for k, v in r.items()})
    write_atomic(path, buf.getvalue())


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json``, ``speed.csv``, ``quality.csv``, ``figures/*.png``, ``report.md`` and ``report.html``
    under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html"}
    write_atomic(paths["json"], json.dumps(results, indent=1, default=str))
    if results.get("speed"):
        paths["speed_csv"] = out / "speed.csv"
        _write_csv(paths["speed_csv"], results["speed"].get("rows", []))
    quality = results.get("quality") or {}
    if quality:
        paths["quality_csv"] = out / "quality.csv"
        _write_csv(paths["quality_csv"], [{"task": t, **r} for t, e in quality.items() for r in e["rows"]])
    comparison = results.get("compare")
    if comparison:
        paths["compare_csv"] = out / "compare.csv"
        _write_csv(paths["compare_csv"], compare_table(comparison))
    env = results.get("env") or environment()
    blocks: list[ReportItem] = [("h", 1, "nearfar bench report")]
    if results.get("interrupted"):
        blocks.append(("p", "Interrupted (Ctrl-C): the tables hold what finished before."))
    blocks += summary_blocks({**results, "env": env}, compare_summary(comparison) if comparison else None)
    changes = results.get("resumed_with_changes") or []
    if changes:
        blocks.append(("p", "Resumed with other settings (--force-resume): the tables mix rows made with "
                            + ", ".join(f"{c['setting']} {c['before']!r} and {c['after']!r}" for c in changes)
                            + "."))
    unknown = unregistered(results)
    if unknown:  # rows kept from a run whose mechanism was renamed or removed since, or edited by hand
        warn(f"{paths['json']} holds rows of mechanisms not in the registry: {', '.join(unknown)}; the report "
             f"shows them as recorded, marked '{UNREGISTERED.strip()}'")
        blocks.append(("p", f"Not in the registry: {', '.join(unknown)} (renamed or removed since the run, or "
                            f"edited by hand). Their rows are shown as recorded and marked "
                            f"'{UNREGISTERED.strip()}'; no registered mechanism stands behind them."))
    blocks += [("h", 2, "Environment"), ("p", ", ".join(f"{k}: {v}" for k, v in env.items()))]
    if comparison:
        blocks += compare_blocks(comparison)
    if results.get("speed"):
        blocks += speed_blocks(results["speed"], fig_dir)
    if quality:
        blocks += quality_blocks(quality, fig_dir)
    if quality and results.get("speed"):
        blocks += recall_vs_cost(quality, results["speed"], fig_dir)
    write_atomic(paths["md"], render_markdown(blocks, out))
    write_atomic(paths["html"], render_html(blocks, "nearfar bench report"))
    return paths
