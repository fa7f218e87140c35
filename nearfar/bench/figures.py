"""The figures of the ``nearfar bench`` report (matplotlib, optional: without it the tables still come out).

Every series gets its own colour, marker and line style (``series_styles``: 10 colours x 4 line styles x 12 markers,
no two series of a figure alike up to 60 series), the legend sits outside the plot area,
beside it, and each rank (1D sequences, 2D maps) has its own row of panels, so that a mechanism registered for both
(``neighborhood``) is two series, ``name (1d)`` and ``name (2d)``. Speed ratios carry their min-max over the rounds
as error bars, quality scores by bin their 95% intervals.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .files import write_atomic
from .render import ReportItem

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
_LINESTYLES = ("-", "--", "-.", ":")
#: the quality controls: black and grey, apart from the mechanisms' colours
_CONTROL_STYLES = {"full": dict(color="black", marker="s", ls="-"), "local": dict(color="0.45", marker="D", ls="--"),
                   "none": dict(color="0.7", marker="x", ls=":")}


def series_styles(names: list[str]) -> dict[str, dict]:
    """Matplotlib keyword arguments (``color``, ``marker``, ``ls``) for each name, in the order given: series ``i``
    gets colour ``i % 10``, line style ``i // 10 % 4`` and marker ``i % 12``: up to 40 series differ in (colour,
    line style), up to 60 in (colour, marker); the quality controls keep fixed black and greys."""
    styles, i = {}, 0
    for name in names:
        if name in _CONTROL_STYLES:
            styles[name] = dict(_CONTROL_STYLES[name])
            continue
        styles[name] = dict(color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)],
                            ls=_LINESTYLES[i // len(_COLORS) % len(_LINESTYLES)])
        i += 1
    return styles


def series_label(mechanism: str, dims: str, both: set[str]) -> str:
    """``mechanism``, with its rank when it has rows in both ranks (``both``): ``neighborhood (1d)``."""
    return f"{mechanism} ({dims})" if mechanism in both else mechanism


def legend_outside(fig: Any, axes: list) -> None:
    """One legend for the whole figure, right of the panels (never over a line); duplicate labels once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if "dense SDPA" in seen:  # the reference last, after the mechanisms
        seen["dense SDPA"] = seen.pop("dense SDPA")
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                   ncol=1 if len(seen) <= 24 else 2, frameon=False)


#: how far apart (in octaves) neighbouring series of a speed panel are drawn along the tokens axis
_DODGE = 0.012
#: the panels of the speed figures: (phase, row key, dense row key or None, y label)
_FIGURES: dict[str, list[tuple[str, str, str | None, str]]] = {
    "speed": [(ph, "ratio", None, "dense time / mechanism time") for ph in ("fwd", "fwd+bwd")],
    "memory": [("fwd", "peak_mib", "dense_peak_mib", "peak (MiB)"),
               ("fwd+bwd", "peak_mib", "dense_peak_mib", "peak (MiB)"),
               ("fwd+bwd", "saved_mib", "dense_saved_mib", "saved for backward (MiB)")]}


def speed_figure(rows: list[dict], pattern: str, what: str) -> Any:
    """The ``what`` ("speed" or "memory") figure of ``pattern``'s rows: one row of panels per rank, one panel per
    phase (and memory kind); None without matplotlib or without data."""
    plt = pyplot()
    if plt is None:
        return None
    # runs made before the peak was measured have no peak rows: their panels are left out
    panels = [p for p in _FIGURES[what] if any(r.get(p[1]) is not None and r["phase"] == p[0] for r in rows)]
    ranks = sorted({r.get("dims") or "1d" for r in rows})
    if not panels or not ranks:
        return None
    both = {m for m in {r["mechanism"] for r in rows}
            if len({r.get("dims") or "1d" for r in rows if r["mechanism"] == m}) > 1}
    labels = sorted({series_label(r["mechanism"], r.get("dims") or "1d", both) for r in rows})
    styles = series_styles(labels)
    fig, axes = plt.subplots(len(ranks), len(panels), figsize=(4.6 * len(panels), 3.4 * len(ranks)), squeeze=False)
    for row_axes, dims in zip(axes, ranks):
        mine = [r for r in rows if (r.get("dims") or "1d") == dims]
        for ax, (phase, key, dense_key, ylabel) in zip(row_axes, panels):
            by: dict[str, list] = defaultdict(list)
            for r in mine:
                if r["phase"] == phase and r.get(key) is not None:
                    by[series_label(r["mechanism"], dims, both)].append(r)
            for i, label in enumerate(sorted(by)):
                pts = sorted(by[label], key=lambda r: r["tokens"])
                # each series a little apart along x (a fraction of an octave) so that error bars do not overlap
                dodge = 2.0 ** (_DODGE * (i - (len(by) - 1) / 2))
                xs, ys = [r["tokens"] * dodge for r in pts], [r[key] for r in pts]
                if dense_key is None and all(r.get("ratio_min") is not None for r in pts):
                    err = [[y - r["ratio_min"] for y, r in zip(ys, pts)], [r["ratio_max"] - y for y, r in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=err, label=label, capsize=2, lw=1.2, ms=5, **styles[label])
                else:
                    ax.plot(xs, ys, label=label, lw=1.2, ms=5, **styles[label])
            if dense_key is None:
                ax.axhline(1.0, color="k", lw=0.8, ls="--")
            else:
                dense = sorted({(r["tokens"], r[dense_key]) for r in mine if r["phase"] == phase
                                and r.get(dense_key) is not None})
                if dense:
                    ax.plot(*zip(*dense), color="k", ls="--", lw=1.5, label="dense SDPA")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens" if dims == "1d" else "tokens (H*W)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{pattern} {dims} {phase}", fontsize=9)
    legend_outside(fig, list(axes.flat))
    return fig


def speed_figures(rows: list[dict], pattern: str, fig_dir: Path) -> list[ReportItem]:
    """The speed and memory figures of one CAB pattern, saved under ``fig_dir``."""
    blocks = []
    for what in _FIGURES:
        fig = speed_figure(rows, pattern, what)
        if fig is not None:
            path = save_figure(fig, fig_dir, f"{what}_{pattern}")
            blocks.append(("img", path, f"{what} vs tokens, {pattern}"))
    return blocks


def quality_figure(name: str, task: dict, order: list[str], scores: dict[str, list[float]],
                   intervals: dict[str, list] | None = None) -> Any:
    """Score by bin of each mechanism in ``order`` (``scores[mech]``: one mean per bin), with its 95% intervals as
    error bars where ``intervals[mech]`` has them (``(lo, hi)`` per bin, None where missing); None without
    matplotlib or with fewer than two bins."""
    plt = pyplot()
    if plt is None or len(task["bin_names"]) < 2:
        return None
    bins = list(task["bin_names"])
    styles = series_styles(order)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mech in enumerate(order):
        xs = [x + 0.03 * (i - (len(order) - 1) / 2) for x in range(len(bins))]  # apart, so error bars show
        ivs = (intervals or {}).get(mech)
        if ivs and all(iv is not None for iv in ivs):
            err = [[max(0.0, y - lo) for y, (lo, _) in zip(scores[mech], ivs)],
                   [max(0.0, hi - y) for y, (_, hi) in zip(scores[mech], ivs)]]
            ax.errorbar(xs, scores[mech], yerr=err, label=mech, capsize=2, lw=1.2, ms=5, **styles[mech])
        else:
            ax.plot(xs, scores[mech], label=mech, lw=1.2, ms=5, **styles[mech])
    ax.set_xticks(range(len(bins)), bins, rotation=20, fontsize=7)
    ax.set_ylabel(task["metric"])
    ax.set_title(f"{name}: {task['metric']} by bin")
    legend_outside(fig, [ax])
    return fig


def recall_figure(name: str, task: dict, points: list[tuple[float, float, str]], largest: int) -> Any:
    """Accuracy against the forward+backward speed ratio, one point (own colour and marker) per mechanism."""
    plt = pyplot()
    if plt is None:
        return None
    styles = series_styles(sorted(m for _, _, m in points))
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, m in points:
        style = styles[m]
        ax.scatter(x, y, marker=style["marker"], color=style["color"], label=m)
        ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"speed vs dense, fwd+bwd, {largest} tokens ({task['pattern']})")
    ax.set_ylabel(f"{name} accuracy")
    ax.set_title(f"{name}: recall against measured cost")
    legend_outside(fig, [ax])
    return fig


def save_figure(fig: Any, fig_dir: Path, stem: str) -> Path:
    """Save ``fig`` as ``fig_dir/stem.png`` (atomically; the legend outside the axes included) and close it."""
    plt = pyplot()
    # task names come from the results file: no "/" or ".." of theirs may put a figure outside fig_dir
    path = fig_dir / (re.sub(r"[^\w.-]", "_", stem) + ".png")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    if plt is not None:
        plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures are optional: the tables still come out
        return None
    return plt
