"""``nearfar bench --compare A B ...``: a head-to-head of a few mechanisms, timed on the same inputs in the same
interleaved rounds (``timing.interleave``: every method warmed up, then rounds with a rotating order), with fused
dense SDPA (the registered ``dense`` layer) as one more method of each round.

For every CAB pattern and rank that at least two of the named mechanisms support, each passes the speed suite's
correctness gate, then every size and phase is timed; rows keep the per-round times, and every ratio is computed
from them: "A vs B" is the median over rounds of ``time_B / time_A`` (> 1: A is faster), with the min-max of the
per-round ratios as its interval, and a verdict that says "not separable here" when that interval holds 1
(``noise.pair_verdict``). Five rounds by default: the min-max of 5 per-round ratios holds their median with
probability 94%.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from itertools import combinations

import torch

from ..layers.registry import CAB_PATTERNS, Mechanism, mechanisms
from .noise import NOT_SEPARABLE, coverage, pair_ratio, pair_verdict
from .render import ReportItem
from .shape import SWEPT_DIMS, check_sizes, speed_shape
from .speed import DIMS_ARGS, FULL, QUICK, call_layer, dense_mechanism, gate_mechanism, make_inputs, timed_call
from .timing import interleave

#: rounds of a head-to-head unless ``--rounds`` says otherwise
ROUNDS = 5
DENSE = "dense"


def comparable() -> dict[str, Mechanism]:
    """The mechanisms ``--compare`` takes: registered layers with a 1D or 2D variant, but the ``dense`` baseline
    (in every comparison anyway)."""
    return {m.name: m for m in mechanisms(kind="layer") if m.name != DENSE and any(d in SWEPT_DIMS for d in m.dims)}


def compare_plan(names: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The groups of a head-to-head of ``names``: ``{"pattern", "dims", "mechanisms"}`` for every CAB pattern and rank
    that at least two of them support, and notes on the mechanisms left out of a group. A ValueError naming
    ``--compare`` for unknown names, fewer than two, or no pattern and rank in common."""
    valid = comparable()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"--compare takes a list of mechanism names, got {names!r}")
    bad = [n for n in names if n not in valid]
    if bad:
        extra = " (dense is the baseline of every comparison: name the others)" if DENSE in bad else ""
        raise ValueError(f"--compare: unknown {bad}{extra}; mechanisms that can be compared: {sorted(valid)}")
    chosen = list(dict.fromkeys(names))
    if len(chosen) < 2:
        raise ValueError(f"--compare needs at least two different mechanisms, got {list(names)}; to time one "
                         f"against dense: nearfar bench speed --mechanism NAME")
    groups, notes = [], []
    for dims in SWEPT_DIMS:
        for pattern in CAB_PATTERNS:
            members = [n for n in chosen if dims in valid[n].dims and pattern in valid[n].patterns]
            if len(members) >= 2:
                groups.append({"pattern": pattern, "dims": dims, "mechanisms": members})
                notes += [f"{n}: no {pattern} {dims} variant" for n in chosen if n not in members]
    if not groups:
        have = "; ".join(f"{n}: {' '.join(valid[n].patterns)} in "
                         f"{' '.join(d for d in valid[n].dims if d in SWEPT_DIMS)}" for n in chosen)
        raise ValueError(f"--compare: {', '.join(chosen)} share no CAB pattern and rank ({have}); time each against "
                         f"dense instead: nearfar bench speed --mechanism {' '.join(chosen)}")
    return groups, notes


def run_compare(names: Sequence[str], quick: bool = True, rounds: int | None = None, seed: int = 0,
                sizes: dict | None = None, widths: dict | None = None,
                progress: Callable[[int, int, str], None] | None = None, into: dict | None = None) -> dict:
    """Time ``names`` head to head (see the module docstring) at the speed preset's sizes and widths (``sizes`` /
    ``widths`` as ``speed.run_speed`` takes them). Returns ``{"mechanisms", "groups", "rows", "gates", "skipped",
    "config"}``; a row holds ``pattern``, ``dims``, ``size``, ``tokens``, ``phase``, ``rounds`` and ``times_ms``
    (milliseconds per round, by mechanism and ``"dense"``). ``into``: a dict whose lists receive the results as
    they come (an interrupted run keeps what finished)."""
    preset = QUICK if quick else FULL
    rounds = ROUNDS if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    sizes = {**preset["sizes"], **check_sizes(sizes or {})}
    widths = {**preset["widths"], **(widths or {})}
    groups, notes = compare_plan(names)
    registry = comparable()
    out = into if into is not None else {}
    out.update(mechanisms=list(dict.fromkeys(names)), groups=groups, rows=[], gates=[],
               skipped=[{"mechanism": n.split(":")[0], "why": n} for n in notes], config=None)
    total = sum(len(g["mechanisms"]) + len(sizes[g["dims"]]) * 2 for g in groups)
    done, started = 0, time.perf_counter()
    for group in groups:
        pattern, dims = group["pattern"], group["dims"]
        width: tuple[int, int] = widths[dims]
        layers = {}
        for name in group["mechanisms"]:
            gate = gate_mechanism(registry[name], pattern, dims, width, sizes[dims][0], seed)
            out["gates"].append(gate)
            done += 1
            if progress:
                progress(done, total, f"{name} {pattern} {dims}: gate {'passed' if gate['passed'] else 'FAILED'}")
            if gate["passed"]:
                torch.manual_seed(seed)
                layers[name] = registry[name].build(*width, pattern, **DIMS_ARGS.get((name, dims), {})).eval()
            else:
                out["skipped"].append({"mechanism": name, "why": f"{pattern} {dims}: failed the correctness gate"})
        group["timed"] = list(layers)
        torch.manual_seed(seed)
        dense = dense_mechanism().build(*width, pattern).eval()
        for size in sizes[dims]:
            ours_in, dense_in, label, tokens = make_inputs(dims, size, width[0], pattern, seed)
            for phase in ("fwd", "fwd+bwd"):
                done += 1
                if len(layers) < 2:
                    continue
                calls = {name: timed_call(call_layer(layer), ours_in, phase, list(layer.parameters()), seed)
                         for name, layer in layers.items()}
                calls[DENSE] = timed_call(call_layer(dense), dense_in, phase, list(dense.parameters()), seed)
                try:
                    times = interleave(calls, rounds=rounds, warmup=1)
                except Exception as exc:  # noqa: BLE001 - one failing size must not hide the others
                    out["skipped"].append({"mechanism": ", ".join(layers), "why": f"{pattern} {dims} {label} "
                                           f"{phase}: {type(exc).__name__}: {exc}"[:300]})
                    continue
                out["rows"].append({"pattern": pattern, "dims": dims, "size": label, "tokens": tokens,
                                    "phase": phase, "rounds": rounds,
                                    "times_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()}})
                if progress:
                    progress(done, total, f"{pattern} {dims} {label} {phase}")
    out["config"] = {"quick": quick, "rounds": rounds, "seed": seed, "batch": 1, "dtype": "float32",
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "sizes": {d: [s if d == "1d" else "x".join(map(str, s)) for s in sizes[d]] for d in SWEPT_DIMS},
                     "widths": {d: list(widths[d]) for d in SWEPT_DIMS},
                     "elapsed_s": round(time.perf_counter() - started, 1)}
    return out


def pairs(row: dict) -> list[dict]:
    """Every ratio of one row: each pair of mechanisms in the order named, then each against dense; ``ratio`` is
    the median over rounds of ``time_second / time_first`` (> 1: the first is faster)."""
    names = [n for n in row["times_ms"] if n != DENSE]
    out = []
    for a, b in [*combinations(names, 2), *((n, DENSE) for n in names)]:
        ratio, iv = pair_ratio(row["times_ms"][a], row["times_ms"][b])
        out.append({"first": a, "second": b, "ratio": ratio, "lo": iv.lo, "hi": iv.hi,
                    "verdict": pair_verdict(a, b, iv)})
    return out


def compare_table(compare: dict) -> list[dict]:
    """One record per row and pair (``compare.csv``): pattern, dims, size, phase, rounds, both medians, the ratio
    with its min-max over rounds, and the verdict."""
    out = []
    for row in compare.get("rows", []):
        for p in pairs(row):
            out.append({k: row[k] for k in ("pattern", "dims", "size", "tokens", "phase", "rounds")}
                       | {"first": p["first"], "second": p["second"],
                          "first_ms": statistics.median(row["times_ms"][p["first"]]),
                          "second_ms": statistics.median(row["times_ms"][p["second"]]),
                          "ratio": p["ratio"], "ratio_min": p["lo"], "ratio_max": p["hi"], "verdict": p["verdict"]})
    return out


def _fastest(row: dict) -> tuple[str, list[str]]:
    """The mechanism of ``row`` with the smallest median time, and those not separable from it in the same rounds."""
    names = [n for n in row["times_ms"] if n != DENSE]
    best = min(names, key=lambda n: statistics.median(row["times_ms"][n]))
    ties = [p["second"] if p["first"] == best else p["first"] for p in pairs(row)
            if best in (p["first"], p["second"]) and DENSE not in (p["first"], p["second"])
            and p["verdict"].startswith(NOT_SEPARABLE)]
    return best, ties


def compare_summary(compare: dict) -> list[ReportItem]:
    """The head-to-head part of the summary: shape, then per pattern, size and phase the fastest of the compared
    mechanisms and those it cannot be told from."""
    rows = compare.get("rows", [])
    if not rows:
        return [("p", "Head-to-head: nothing was timed (see the notes of the Head-to-head section).")]
    ranks = sorted({r["dims"] for r in rows})
    rounds = (compare.get("config") or {}).get("rounds") or rows[0]["rounds"]
    table = []
    for row in rows:
        best, ties = _fastest(row)
        vs_dense = next(p for p in pairs(row) if p["first"] == best and p["second"] == DENSE)
        table.append([row["pattern"], f"{row['size']} ({row['dims'].upper()})", row["phase"], best,
                      ", ".join(ties) or "-",
                      f"{vs_dense['ratio']:.2f}x [{vs_dense['lo']:.2f}-{vs_dense['hi']:.2f}] ({vs_dense['verdict']})"])
    return [("p", f"Head-to-head of {', '.join(compare.get('mechanisms', []))} on the same inputs in the same rounds. "
                  f"Shape: {speed_shape(compare.get('config') or {}, ranks)}. Intervals: min-max of the per-round "
                  f"ratios, which holds their median with probability {coverage(rounds):.0%} at {rounds} rounds."),
            ("table", ["pattern", "size", "phase", "fastest", "not separable from it", "fastest vs dense"], table)]


def compare_blocks(compare: dict) -> list[ReportItem]:
    """The "Head-to-head" section: per pattern and rank, the median times, then every ratio with its verdict."""
    out: list[ReportItem] = [("h", 2, "Head-to-head"),
                             ("p", "'A vs B' = median over rounds of time(B) / time(A): > 1 means A is faster. "
                                   "Brackets: min-max of the per-round ratios; 'not separable here' when they "
                                   "straddle 1. The same numbers are in compare.csv.")]
    for group in compare.get("groups", []):
        rows = [r for r in compare.get("rows", []) if (r["pattern"], r["dims"]) == (group["pattern"], group["dims"])]
        out.append(("h", 3, f"{group['pattern']} ({CAB_PATTERNS.get(group['pattern'], '')}), {group['dims']}"))
        if not rows:
            out.append(("p", "Not timed: fewer than two of the mechanisms passed the gate."))
            continue
        names = [n for n in rows[0]["times_ms"] if n != DENSE]
        out.append(("table", ["size", "phase"] + [f"{n} ms" for n in names] + ["dense ms"],
                    [[str(r["size"]), r["phase"]] + [f"{statistics.median(r['times_ms'][n]):.2f}"
                                                     for n in [*names, DENSE]] for r in rows]))
        out.append(("table", ["size", "phase", "comparison", "ratio [min-max]", "verdict"],
                    [[str(r["size"]), r["phase"], f"{p['first']} vs {p['second']}",
                      f"{p['ratio']:.2f}x [{p['lo']:.2f}-{p['hi']:.2f}]", p["verdict"]]
                     for r in rows for p in pairs(r)]))
    failed = [g for g in compare.get("gates", []) if not g["passed"]]
    if failed:
        out.append(("table", ["mechanism", "pattern", "rank", "gate detail"],
                    [[g["mechanism"], g["pattern"], g.get("dims", ""), g["detail"]] for g in failed]))
    if compare.get("skipped"):
        out.append(("table", ["mechanism", "left out because"],
                    [[s["mechanism"], s["why"]] for s in compare["skipped"]]))
    return out


def compare_lines(compare: dict) -> list[str]:
    """The head-to-head as plain lines for the terminal."""
    lines = []
    for row in compare.get("rows", []):
        lines.append(f"\n{row['pattern']} {row['dims']} {row['size']} {row['phase']} ({row['rounds']} rounds; "
                     f"ratio = time of the second / time of the first, min-max over rounds)")
        lines += [f"  {p['first'] + ' vs ' + p['second']:<40} {p['ratio']:6.2f}x [{p['lo']:.2f}-{p['hi']:.2f}]  "
                  f"{p['verdict']}" for p in pairs(row)]
    for s in compare.get("skipped", []):
        lines.append(f"left out: {s['why']}")
    return lines
