"""The summary that opens the ``nearfar bench`` report (and the lines the command prints at the end): per CAB
pattern and size the fastest mechanism, per quality task the best one, each with what cannot be told apart from
it in this run (``noise``), the benchmark's shape and the machine."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from ..layers.registry import CAB_PATTERNS
from .noise import Interval, higher_is_better, quality_interval, row_interval, separable, versus_one, within_noise
from .render import ReportItem
from .shape import machine, speed_shape

#: the quality controls of every task: full attention, a sliding window, no attention
CONTROLS = ("full", "local", "none")


def _size_key(size: object) -> tuple:
    return (0, size, "") if isinstance(size, int) else (1, math.prod(int(v) for v in str(size).split("x")), str(size))


def _ratio(value: float, iv: Interval) -> str:
    spread = f" [{iv.lo:.2f}-{iv.hi:.2f}]" if iv.measured else " [spread not measured]"
    return f"{value:.2f}x{spread}"


def fastest(rows: list[dict]) -> list[dict]:
    """Per (pattern, rank, size, phase) of the suite's rows (peers left out): the mechanism with the largest ratio
    to dense, its interval, the others not separable from it (``within``) and its verdict against dense."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if not r.get("peer"):
            groups[(r["pattern"], r.get("dims") or "1d", r["size"], r["phase"])].append(r)
    out = []
    for (pattern, dims, size, phase), rs in groups.items():
        rs = sorted(rs, key=lambda r: -r["ratio"])
        best, iv = rs[0], row_interval(rs[0])
        out.append({"pattern": pattern, "dims": dims, "size": size, "phase": phase, "mechanism": best["mechanism"],
                    "ratio": best["ratio"], "interval": iv, "vs_dense": versus_one(iv),
                    "within": within_noise(iv, {r["mechanism"]: row_interval(r) for r in rs[1:]})})
    order = list(CAB_PATTERNS)
    return sorted(out, key=lambda f: (order.index(f["pattern"]) if f["pattern"] in order else len(order),
                                      f["dims"], _size_key(f["size"]), f["phase"]))


def ranking(rows: list[dict], metric: str) -> dict:
    """The quality rows of one task ranked: ``scores`` (mean over seeds) and ``intervals`` by name, ``best`` (the
    best mechanism; a control only when the table holds nothing else), and ``verdict`` by name: "best", "not
    separable" (from the best), "better" or "worse"."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["name"]].append(r)
    scores = {m: statistics.fmean(v) if (v := [r["overall"] for r in rs if r["overall"] == r["overall"]])
              else math.nan for m, rs in by.items()}
    intervals = {m: quality_interval(rs) for m, rs in by.items()}
    up = higher_is_better(metric)
    pool = [m for m in by if m not in CONTROLS and scores[m] == scores[m]] or \
        [m for m in by if scores[m] == scores[m]]
    best = max(pool, key=lambda m: scores[m] if up else -scores[m]) if pool else None
    verdict = {}
    for m in by:
        if best is None or scores[m] != scores[m]:
            verdict[m] = "n/a"
        elif m == best:
            verdict[m] = "best"
        elif not separable(intervals[best], intervals[m]):
            verdict[m] = "not separable"
        else:
            verdict[m] = "better" if (scores[m] > scores[best]) == up else "worse"
    return {"scores": scores, "intervals": intervals, "best": best, "verdict": verdict}


def _score(value: float, iv: Interval) -> str:
    return f"{value:.3f}" + (f" [{iv.lo:.3f}-{iv.hi:.3f}]" if iv.measured else "")


def _speed_cell(f: dict) -> str:
    text = f"{f['mechanism']} {_ratio(f['ratio'], f['interval'])}"
    if f["vs_dense"] != "faster":
        text += " (not separable from dense)" if f["vs_dense"] != "slower" else " (dense is faster)"
    if f["within"]:
        text += "; not separable from " + ", ".join(f["within"])
    return text


def speed_summary(speed: dict) -> list[ReportItem]:
    """The speed part of the summary: the shape, then per pattern and size the fastest mechanism forward and
    forward+backward."""
    rows = [r for r in speed.get("rows", []) if not r.get("peer")]
    if not rows:
        return []
    config = speed.get("config") or {}
    ranks = sorted({r.get("dims") or "1d" for r in rows})
    by: dict[tuple, dict] = defaultdict(dict)
    for f in fastest(rows):
        by[(f["pattern"], f["dims"], f["size"])][f["phase"]] = f
    table = [[pattern, f"{size} ({dims.upper()})"] + [_speed_cell(c[ph]) if ph in c else "-"
                                                     for ph in ("fwd", "fwd+bwd")]
             for (pattern, dims, size), c in by.items()]
    return [("p", f"Speed shape: {speed_shape(config, ranks)}. Ratio = dense SDPA time / mechanism time (> 1: "
                  "faster), median over rounds; brackets: min-max of the per-round ratios. 'Not separable' lists "
                  "the mechanisms whose interval overlaps the fastest's (or that had fewer than 3 rounds)."),
            ("table", ["pattern", "size", "fastest, forward", "fastest, forward+backward"], table)]


def quality_summary(quality: dict) -> list[ReportItem]:
    """The quality part of the summary: per task (pattern and size) the best mechanism, full attention, and the
    mechanisms and controls not separable from the best."""
    table = []
    for name, entry in quality.items():
        task, rows = entry["task"], entry["rows"]
        if not rows:
            continue
        rank = ranking(rows, task["metric"])
        best = rank["best"]
        size = ("x".join(map(str, task["grid"])) if task.get("kind") == "2d" and task.get("grid")
                else f"N={task.get('seq_len', '?')}")
        first = rows[0]
        model = (f"d={first.get('dim')}, {first.get('depth')} layers, {first.get('num_heads')} heads, "
                 f"{first.get('steps')} steps, {len({r['seed'] for r in rows})} seed(s)")
        full = (_score(rank["scores"]["full"], rank["intervals"]["full"]) if "full" in rank["scores"] else "-")
        ties = [m for m, v in rank["verdict"].items() if v == "not separable"]
        arrow = "higher" if higher_is_better(task["metric"]) else "lower"
        table.append([name, task["pattern"], size, f"{task['metric']} ({arrow} is better)",
                      "-" if best is None else f"{best} {_score(rank['scores'][best], rank['intervals'][best])}",
                      ", ".join(ties) or "-", full, model])
    if not table:
        return []
    return [("p", "Quality: each mechanism in the same small backbone trained from scratch; brackets: 95% interval "
                  "(Wilson for accuracy, normal for bits per character; over seeds, lowest to highest end). 'Not "
                  "separable' lists what overlaps the best's interval: this run cannot rank them (a paired test on "
                  "the same evaluation items might)."),
            ("table", ["task", "pattern", "size", "metric", "best mechanism", "not separable from it",
                       "full attention", "model"], table)]


def summary_blocks(results: dict, compare: list[ReportItem] | None = None) -> list[ReportItem]:
    """The "Summary" section: machine, command, then the speed, head-to-head (``compare``) and quality parts."""
    env = results.get("env") or {}
    blocks: list[ReportItem] = [("h", 2, "Summary"), ("p", f"Machine: {machine(env)}; threads {env.get('threads')}."),
                                ("p", "Command: " + str(results.get("command", "nearfar bench")))]
    if results.get("speed"):
        blocks += speed_summary(results["speed"])
    blocks += compare or []
    if results.get("quality"):
        blocks += quality_summary(results["quality"])
    return blocks


def summary_lines(results: dict) -> list[str]:
    """The summary as plain lines for the terminal."""
    lines = []
    speed = results.get("speed") or {}
    found = fastest(speed.get("rows", []))
    if found:
        lines += ["", "fastest per pattern and size (ratio to dense SDPA, min-max over rounds):"]
        lines += [f"  {f['pattern']:<3} {str(f['size']) + ' (' + f['dims'] + ')':<14} {f['phase']:<8} "
                  f"{_speed_cell(f)}" for f in found]
    for task, entry in (results.get("quality") or {}).items():
        if not entry["rows"]:
            continue
        rank = ranking(entry["rows"], entry["task"]["metric"])
        lines += ["", f"{task} ({entry['task']['pattern']}, {entry['task']['metric']}, 95% interval):"]
        lines += [f"  {m:<22} {_score(rank['scores'][m], rank['intervals'][m]):<24} {rank['verdict'][m]}"
                  for m in sorted(rank["scores"], key=lambda m: (m not in CONTROLS, m))]
    return lines
