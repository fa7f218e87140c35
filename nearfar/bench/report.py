"""The report of ``nearfar bench``: results as JSON/CSV, figures (matplotlib), and one Markdown and one
self-contained HTML page built from the same blocks (headings, paragraphs, tables, figures).

Layout of ``results`` (what ``nearfar.bench.cli`` collects and saves as ``results.json``)::

    {"env": environment(), "speed": run_speed(...) or None,
     "quality": {task_name: {"task": {...task metadata...}, "rows": run_quality(...) rows}}}

Speed tables follow CAB's lesson: one table per attention pattern (NS, CS, NC, CC). Quality tables show every
mechanism with the controls (full attention, local-only, no attention) of the same task.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..layers.registry import CAB_PATTERNS, mechanisms
from .files import warn, write_atomic
from .render import ReportItem, md_escape, render_html, render_markdown

__all__ = ["environment", "md_escape", "quality_blocks", "recall_vs_cost", "render_html", "render_markdown",
           "speed_blocks", "unregistered", "write_report"]

CONTROLS = ("full", "local", "none")
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
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": cpu, "cores": os.cpu_count(), "load": load, "git": sha, "platform": platform.platform()}


# ------------------------------------------------------------------------------------------------ speed blocks
def _size_key(size: object) -> tuple:
    return (0, size) if isinstance(size, int) else (1, int(str(size).split("x")[0]))


def speed_blocks(speed: dict, fig_dir: Path) -> list[ReportItem]:
    rows = [r for r in speed.get("rows", []) if not r.get("peer")]
    peers = [r for r in speed.get("rows", []) if r.get("peer")]
    out: list[ReportItem] = [("h", 2, "Speed"), ("p", "Median per-round ratio of fused dense SDPA time to the "
                                                   "mechanism's time, measured in the same interleaved rounds "
                                                   "(> 1: faster than dense). Cells: forward / forward+backward.")]
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
                cells[_label(r["mechanism"])][(r["size"], r["phase"])] = r["ratio"]
            table = [[mech] + [" / ".join("-" if (s, ph) not in cells[mech] else f"{cells[mech][(s, ph)]:.2f}x"
                                          for ph in ("fwd", "fwd+bwd")) for s in sizes] for mech in sorted(cells)]
            out.append(("table", [f"mechanism ({dims})" if dims else "mechanism"] + [str(s) for s in sizes], table))
        out += _speed_figures(mine, pattern, fig_dir)
    if peers:
        out += [("h", 3, "Peers, timed beside nearfar on the same inputs"),
                ("table", ["peer", "beside", "pattern", "size", "phase", "peer ms", "dense ms", "dense / peer"],
                 [[r["peer"], _label(r["mechanism"]), r["pattern"], str(r["size"]), r["phase"], f"{r['ms']:.2f}",
                   f"{r['dense_ms']:.2f}", f"{r['ratio']:.2f}x"] for r in peers])]
    if speed.get("crossovers"):
        out += [("h", 3, "Crossover (CAB's efficiency length): smallest measured size from which the mechanism "
                         "stays faster / lighter than dense"),
                ("table", ["mechanism", "pattern", "phase", "time", "peak memory", "memory saved for backward"],
                 [[_label(c["mechanism"]), c["pattern"], c["phase"], _none(c["time_crossover"]),
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


#: the panels of the speed figures: (phase, row key, dense row key or None, y label)
_FIGURES: dict[str, list[tuple[str, str, str | None, str]]] = {
    "speed": [(ph, "ratio", None, "dense time / mechanism time") for ph in ("fwd", "fwd+bwd")],
    "memory": [("fwd", "peak_mib", "dense_peak_mib", "peak (MiB)"),
               ("fwd+bwd", "peak_mib", "dense_peak_mib", "peak (MiB)"),
               ("fwd+bwd", "saved_mib", "dense_saved_mib", "saved for backward (MiB)")]}


def _speed_figures(rows: list[dict], pattern: str, fig_dir: Path) -> list[ReportItem]:
    plt = _pyplot()
    if plt is None:
        return []
    blocks = []
    for what, panels in _FIGURES.items():
        # runs made before the peak was measured have no peak rows: their panels are left out
        panels = [p for p in panels if any(r.get(p[1]) is not None and r["phase"] == p[0] for r in rows)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (phase, key, dense_key, ylabel) in zip(axes[0], panels):
            for mech in sorted({r["mechanism"] for r in rows}):
                pts = sorted((r["tokens"], r[key]) for r in rows if r["mechanism"] == mech
                              and r["phase"] == phase and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=mech)
            if dense_key is None:
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
            else:
                dense = sorted({(r["tokens"], r[dense_key]) for r in rows if r["phase"] == phase
                                and r.get(dense_key) is not None})
                if dense:
                    ax.plot(*zip(*dense), color="k", ls="--", label="dense SDPA")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{pattern} {phase}")
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=6, ncol=2)
        path = _save_figure(plt, fig, fig_dir, f"{what}_{pattern}")
        blocks.append(("img", path, f"{what} vs tokens, {pattern}"))
    return blocks


# ---------------------------------------------------------------------------------------------- quality blocks
def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.fmean(values) if values else float("nan")


def quality_blocks(quality: dict, fig_dir: Path) -> list[ReportItem]:
    out: list[ReportItem] = [("h", 2, "Quality"), ("p", "Trained from scratch for a fixed number of steps; mean over "
                                                   "seeds (min-max in brackets); controls: full attention (full), "
                                                   "sliding window (local), no attention (none).")]
    for name, entry in quality.items():
        task, rows = entry["task"], entry["rows"]
        if not rows:
            continue
        bins = list(task["bin_names"])
        by_mech: dict = defaultdict(list)
        for r in rows:
            by_mech[r["name"]].append(r)
        order = [m for m in CONTROLS if m in by_mech] + sorted(m for m in by_mech if m not in CONTROLS)
        table = []
        for mech in order:
            rs = by_mech[mech]
            overall = [r["overall"] for r in rs]
            cell = f"{_mean(overall):.3f} [{min(overall):.3f}-{max(overall):.3f}]" if len(rs) > 1 else \
                f"{overall[0]:.3f}"
            diverged = sum(1 for r in rs if r.get("final_loss") != r.get("final_loss"))
            if diverged:  # a NaN training loss: the score is that of a broken model, not of the mechanism
                cell += f" (NaN loss in {diverged} of {len(rs)} runs)"
            table.append([_label(mech), cell] + [f"{_mean([r['per_bin'].get(b) for r in rs]):.3f}" for b in bins]
                         + [str(len(rs)), f"{_mean([r['seconds'] for r in rs]):.0f}"])
        metric = task["metric"]
        longest = max(rows, key=lambda r: r["seconds"])
        settings = ", ".join(f"{k} {longest.get(k)}"
                             for k in ("steps", "batch_size", "lr", "dim", "depth", "num_heads"))
        out += [("h", 3, f"{name} ({task['pattern']}): {task['description']}"),
                ("p", f"Training: {settings}. Longest run: {longest['seconds']:.0f} s ({longest['name']}, seed "
                      f"{longest['seed']}{_threads(longest)}; the suite's budget is 600 s a run on 2 cores)."),
                ("table", ["mechanism", f"{metric} overall"] + bins + ["seeds", "train s"], table)]
        out += _quality_figure(name, task, order, by_mech, fig_dir)
    return out


def _threads(row: dict) -> str:
    if "threads" not in row:
        return ""
    return f"; {row['threads']} thread(s)" + (f", {row['jobs']} runs at once" if row.get("jobs", 1) > 1 else "")


def _quality_figure(name: str, task: dict, order: list[str], by_mech: dict, fig_dir: Path) -> list[ReportItem]:
    plt = _pyplot()
    if plt is None or len(task["bin_names"]) < 2:
        return []
    bins = list(task["bin_names"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a table can hold more than the default 10 colours
    for mech in order:
        ys = [_mean([r["per_bin"].get(b) for r in by_mech[mech]]) for b in bins]
        ax.plot(range(len(bins)), ys, marker="o", label=mech, ls="--" if mech in CONTROLS else "-")
    ax.set_xticks(range(len(bins)), bins, rotation=20, fontsize=7)
    ax.set_ylabel(task["metric"])
    ax.set_title(f"{name}: {task['metric']} by bin")
    ax.legend(fontsize=6, ncol=2)
    path = _save_figure(plt, fig, fig_dir, f"quality_{name}")
    return [("img", path, f"{name}: {task['metric']} by bin")]


def recall_vs_cost(quality: dict, speed: dict, fig_dir: Path) -> list[ReportItem]:
    """Zoology's recall-memory plot with measured cost: each accuracy task's overall score against the mechanism's
    forward+backward speed ratio to dense at the largest 1D size timed in the same pattern (dense itself at 1)."""
    plt = _pyplot()
    if plt is None:
        return []
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
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for x, y, m in points:
            ax.scatter(x, y, marker="s" if m == "full" else "o")
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"speed vs dense, fwd+bwd, {largest} tokens ({task['pattern']})")
        ax.set_ylabel(f"{name} accuracy")
        ax.set_title(f"{name}: recall against measured cost")
        path = _save_figure(plt, fig, fig_dir, f"recall_vs_cost_{name}")
        blocks.append(("img", path, f"{name}: accuracy against speed ratio"))
    return [("h", 2, "Recall against cost")] + blocks if blocks else []


def _save_figure(plt: Any, fig: Any, fig_dir: Path, stem: str) -> Path:
    # task names come from the results file: no "/" or ".." of theirs may put a figure outside fig_dir
    path = fig_dir / (re.sub(r"[^\w.-]", "_", stem) + ".png")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures are optional: the tables still come out
        return None
    return plt


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
    env = results.get("env") or environment()
    blocks: list[ReportItem] = [("h", 1, "nearfar bench report"),
                           ("p", ", ".join(f"{k}: {v}" for k, v in env.items())),
                           ("p", "Command: " + str(results.get("command", "nearfar bench")))]
    if results.get("interrupted"):
        blocks.append(("p", "Interrupted (Ctrl-C): the tables hold what finished before."))
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
    if results.get("speed"):
        blocks += speed_blocks(results["speed"], fig_dir)
    if quality:
        blocks += quality_blocks(quality, fig_dir)
    if quality and results.get("speed"):
        blocks += recall_vs_cost(quality, results["speed"], fig_dir)
    write_atomic(paths["md"], render_markdown(blocks, out))
    write_atomic(paths["html"], render_html(blocks, "nearfar bench report"))
    return paths
