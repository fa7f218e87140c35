"""What ``nearfar bench`` runs: the speed sweep, the quality tasks over the registered mechanisms with their
controls, and the report, writing as it goes so that Ctrl-C leaves every finished result on disk.

Quality settings: the registry's defaults are sized for long inputs (windows of 512-1024 tokens), which would make
every mechanism dense on the suite's 64-512-token tasks. ``seq_settings`` scales each mechanism's local reach to
the local control's window ``w`` of the task (the same reach as the "local" row) and keeps its far path (sinks,
global tokens, random, strided or content-routed blocks, core tokens, memory, linear state), so the tables compare
what each design adds beyond a window of the same size. ``image_settings`` does the same for the vision mechanisms
on the 2D task: their defaults are sized for 56x56 feature maps (7x7 windows), which do not tile the task's 16x16
image, so their windows become the largest divisor of the image side within the local control's reach.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from ..layers.registry import Mechanism, mechanisms
from . import quality as Q
from .files import BenchFileError, check_out_dir, load_results, warn, write_atomic
from .report import environment, write_report
from .shape import check_sizes
from .tasks import TASK_NAMES, Task, get_task

#: --quick: the tasks' "tiny" size (10-20 s a run on 2 cores), one seed, the controls and a few mechanisms: causal
#: and bidirectional MQAR show the local/global separation, the character LM that they all stay close on real text.
#: ``--mechanism`` replaces the picks (the controls and the named mechanisms or families run).
QUICK_TASKS = ("mqar", "bidir_mqar", "char_lm")
#: --full: every task but Pathfinder, which no control learns within a CPU budget (full attention at 67% after 800
#: steps on 16x16 images): its table would show nothing but chance. ``--task pathfinder`` still runs it; the 2D
#: task of the suite is ``spatial_recall``.
FULL_TASKS = tuple(name for name in TASK_NAMES if name != "pathfinder")
QUICK_SIZE = "tiny"
QUICK_PICKS = {"CS": ("streaming_llm", "bigbird", "linear_attention", "cca"),
               "NS": ("longformer", "bigbird", "linear_attention"), "2d": ("swin", "maxvit_grid")}


def seq_settings(name: str, w: int, seq_len: int) -> dict:
    """Constructor overrides of sequence mechanism ``name`` for a task of ``seq_len`` tokens whose local control
    sees ``w`` keys (see the module docstring)."""
    half = max(2, w // 2)
    by_name: dict[str, dict] = {
        "streaming_llm": dict(window=w, sinks=4),
        "longformer": dict(window=w, global_tokens=4),
        "bigbird": dict(block=half, global_blocks=1, random_blocks=2),
        "s2_attention": dict(block=half, local_blocks=2, vert_stride=4),
        "moa": dict(total_len=seq_len, alphas=None, betas=None, sink_size=4, minimum_cache_size=w, split_size=half),
        "cca": dict(group_size=half, window_size=w),
        "titans_mac": dict(segment_len=max(4, w), num_persistent=2),
        "neighborhood": dict(kernel_size=w + 1 - w % 2, ndim=1),
        "routing_transformer": dict(local_window=w, num_clusters=max(1, round(seq_len ** 0.5)), block_size=16),
        # routed: the own block (or window) is the local reach, a few content-selected blocks the far path
        "moba": dict(chunk_size=half, topk=3),  # own block + 2 routed blocks (w keys)
        "nsa": dict(block_size=half, block_counts=5, window_size=w),  # block 0, 2 local, 2 routed + compressed
        # the gate is trained by distillation only (SeerAttention's distill_loss); the bench trains on the task
        # loss, so it routes with its initial gate: own block + the best w // half = 2 completed blocks
        "seer_attention": dict(gate="token", block_size=half, gate_dim=32, sparsity="token_budget",
                               token_budget=2 * half),
        # a block of w tokens (w - 1 + its landmark); 2 blocks retrieved by landmark score in training and eval
        "landmark": dict(block_size=max(1, w - 1), top_k=2),
        "hip": dict(window=w, sinks=4, mask_k=w, q_block=1),  # q_block > 1: a block's later queries steer the search
        # selective from the first token (default 4096: dense at the bench's lengths); chunk 0, the previous chunk,
        # 2 routed chunks and the own chunk
        "longheads": dict(chunk_size=half, num_chunks=5, begin_selective_length=0),
    }
    return by_name.get(name, {})


def image_settings(name: str, w: int, grid: tuple[int, ...]) -> dict:
    """Constructor overrides of vision mechanism ``name`` on a ``grid`` image whose local control is a ``w x w``
    neighbourhood: windows / partitions of side ``p`` (the largest divisor of the smaller image side <= ``w``,
    e.g. 4 on 16x16 with w = 5), pooled or global maps of ``side / p`` per axis, position tables of the image size;
    mechanisms without a size parameter keep their defaults."""
    side = min(grid)
    p = max(d for d in range(1, min(w, side) + 1) if side % d == 0)
    by_name: dict[str, dict] = {
        "swin": dict(window_size=p), "swin_shifted": dict(window_size=p), "gcvit_local": dict(window_size=p),
        "gcvit_global": dict(window_size=p, feat_size=side), "maformer": dict(window_size=p, down_ratio=p),
        "maxvit_block": dict(partition_size=p), "maxvit_grid": dict(partition_size=p),
        "maxim_mab": dict(block_size=p, grid_size=p), "maxim_cgb": dict(block_size=p, grid_size=p),
        "craft_srwa": dict(split_size=(p, 2 * p if side % (2 * p) == 0 else p)),
        "proxy_tokens": dict(compress_ratios=(p, p)), "dualtoken": dict(global_size=side // p, kernel_size=w),
        "agent": dict(num_patches=tuple(grid), agent_num=(side // p) ** 2),
        "neighborhood": dict(kernel_size=w), "uniformer_local": dict(kernel_size=w),
        "wau": dict(window_size=max(1, p // 2)),  # key windows on the 2x pooled map: p x p query windows
        "vsa": dict(window_size=p),
        "sparsifiner": dict(input_size=tuple(grid)),  # token tables of the image size (no resize)
        "dlgsa_local": dict(window_size=w),
        "biformer": dict(n_win=side // p, topk=min(4, (side // p) ** 2)),
        "lamamba": dict(window_size=p),
    }
    return by_name.get(name, {})


def quality_entries(task: Task, names: list[str] | None, quick: bool) -> tuple[dict, list[dict]]:
    """The factories of ``task`` (controls first, then every registered layer that supports the task's pattern and
    dims, filtered by ``names``), and the mechanisms left out with the reason."""
    hp = Q.defaults(task)
    factories: dict = dict(Q.controls(task, hp["window"]))
    skipped = []
    dims = "2d" if task.kind == "2d" else "1d"
    for mech in mechanisms(kind="layer"):
        if mech.name == "dense" or dims not in mech.dims:
            continue  # "dense" is the "full" control
        if names and mech.name not in names and mech.family not in names:
            continue
        if quick and not names and mech.name not in QUICK_PICKS["2d" if dims == "2d" else task.pattern]:
            continue
        if task.pattern not in mech.patterns:
            skipped.append({"mechanism": mech.name, "task": task.name, "why": f"no {task.pattern}: "
                            f"{mech.why_not[task.pattern]}"})
            continue
        kw = (image_settings(mech.name, hp["window"], tuple(task.grid)) if dims == "2d"
              else seq_settings(mech.name, hp["window"], task.seq_len))
        factories[mech.name] = _factory(mech, task.pattern, kw)
    return factories, skipped


def _factory(mech: Mechanism, pattern: str, kw: dict) -> Callable:
    return lambda dim, heads: mech.build(dim, heads, pattern, **kw)


class Bar:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        # sys.stderr as it is now, not as it was at import (a test's or a caller's replacement of it)
        self.label, self.total, self.start = label, max(1, total), time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        self.shown = -1

    def __call__(self, done: int, total: int | None = None, note: object = "") -> None:
        total = total or self.total
        if done < total and done - self.shown < max(1, total // 20):  # about 20 redraws a bar: logs stay short
            return
        self.shown = done
        filled = int(30 * done / max(1, total))
        extra = f"{note:.3f}" if isinstance(note, float) else str(note)
        self.stream.write(f"\r{self.label[:40]:<40} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
                          f"{time.perf_counter() - self.start:5.0f}s {extra[:30]:<30}")
        self.stream.flush()
        if done >= total:
            self.stream.write("\n")


def quality_jobs(tasks: list[str], names: list[str] | None, quick: bool, seed: int,
                 results: dict) -> list[tuple[str, str, str, int]]:
    """The (task, size, mechanism, seed) runs still to do, in table order, after registering every task's metadata
    and left-out mechanisms in ``results["quality"]``; runs already in its rows (``--resume``) are left out."""
    seeds = (seed,) if quick else (seed, seed + 1)
    size = QUICK_SIZE if quick else "full"
    jobs = []
    for name in tasks:
        task = get_task(name, size)
        factories, skipped = quality_entries(task, names, quick)
        meta = {k: getattr(task, k) for k in ("name", "pattern", "kind", "seq_len", "grid", "bin_names", "metric",
                                              "description")}
        entry = results["quality"].setdefault(name, {"task": meta, "rows": [], "skipped": []})
        entry["task"] = meta
        entry.setdefault("skipped", [])  # optional in a results file (files.check_results)
        known = {s["mechanism"] for s in entry["skipped"]}
        entry["skipped"] += [s for s in skipped if s["mechanism"] not in known]
        done = {(r["name"], r["seed"]) for r in entry["rows"]}
        jobs += [(name, size, mech, s) for mech in factories for s in seeds
                 if (mech, s) not in done and mech not in known]
    return jobs


def _train_job(job: tuple[str, str, str, int], overrides: dict, progress: Callable | None = None) -> list[dict]:
    """One quality run; rebuilt from names so that it can run in a worker process."""
    name, size, mech, seed = job
    task = get_task(name, size)
    factories, _ = quality_entries(task, [mech], quick=False)
    return Q.run_quality(task, {mech: factories[mech]}, seeds=(seed,), progress=progress, **overrides)


def _worker_init(threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool and writes the report
    torch.set_num_threads(threads)


def _worker_job(job: tuple[str, str, str, int], overrides: dict, jobs: int
                ) -> tuple[tuple, list[dict] | None, str | None]:
    try:
        return job, [{**row, "jobs": jobs} for row in _train_job(job, overrides)], None
    except (ValueError, RuntimeError) as exc:
        return job, None, f"{type(exc).__name__}: {exc}"


def _record(results: dict, job: tuple, rows: list[dict] | None, err: str | None) -> str:
    entry = results["quality"][job[0]]
    if err is not None:  # e.g. an image size a window design cannot take: noted once, the other runs go on
        if job[2] not in {s["mechanism"] for s in entry["skipped"]}:
            entry["skipped"].append({"mechanism": job[2], "task": job[0], "why": err})
        return f"left out ({err.split(':')[0]})"
    assert rows is not None  # a job returns rows or an error
    entry["rows"] += rows
    return f"{rows[0]['overall']:.3f} in {rows[0]['seconds']:.0f}s"


def run_quality_suite(tasks: list[str], names: list[str] | None, quick: bool, seed: int, results: dict,
                      save: Callable[[], None], jobs: int = 1, overrides: dict | None = None) -> None:
    """Train every (task, mechanism, seed) not yet in ``results["quality"]``, saving after each. ``jobs`` > 1 runs
    that many trainings at once in worker processes, splitting the machine's threads between them: these models
    are too small for one run to use many cores, so a 2-core machine does about 1.5x the runs per hour with 2
    jobs. Results do not depend on ``jobs`` (fixed step budgets; each run seeds its own generators) beyond float
    rounding. ``overrides``: training settings passed to ``run_quality`` (e.g. ``steps``) instead of the defaults."""
    overrides = dict(overrides or {})
    todo = quality_jobs(tasks, names, quick, seed, results)
    save()
    if jobs <= 1 or len(todo) <= 1:
        failed = set()
        for job in todo:
            if job[:3] in failed:  # a mechanism that cannot run on this task fails for every seed
                continue
            bar = Bar(f"{job[0]} {job[2]} seed {job[3]}", 1)
            try:
                rows, err = _train_job(job, overrides, bar), None
            except (ValueError, RuntimeError) as exc:
                rows, err = None, f"{type(exc).__name__}: {exc}"
                failed.add(job[:3])
                sys.stderr.write("\n")
            _record(results, job, rows, err)
            save()
        return
    import functools
    import multiprocessing as mp

    threads = max(1, torch.get_num_threads() // jobs)
    bar = Bar(f"quality: {len(todo)} runs, {jobs} at a time", len(todo))
    pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(threads,))
    try:
        done = pool.imap_unordered(functools.partial(_worker_job, overrides=overrides, jobs=jobs), todo)
        for i, (job, rows, err) in enumerate(done, 1):
            note = _record(results, job, rows, err)
            save()
            sys.stderr.write(f"\r{job[0]} {job[2]} seed {job[3]}: {note}\n")
            bar(i, len(todo))
    except BaseException:
        pool.terminate()  # Ctrl-C: the runs in flight are dropped, the finished ones are saved
        raise
    pool.close()
    pool.join()


def _terminate_as_interrupt() -> Callable[[], object]:
    """Make SIGTERM (``kill``, a job scheduler's stop) end the run as Ctrl-C does, report included: a run started in
    the background by a shell ignores SIGINT. Returns the function that puts the previous handler back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _previous(out: Path) -> dict | None:
    """The results ``--resume`` goes on from: ``results.partial.json`` (newer than the last report) if it is there
    and sound, else ``results.json``; None if neither is there."""
    partial, final = out / "results.partial.json", out / "results.json"
    if partial.exists():
        try:
            return load_results(partial)
        except BenchFileError as err:
            if not final.exists():
                raise BenchFileError(f"--resume: {err}; remove it to start over") from None
            # a partial file is only ever written whole (write_atomic): one that is not was damaged afterwards
            warn(f"{err}; resuming from {final} instead (the runs saved only in {partial.name} will be redone)")
    return load_results(final) if final.exists() else None


def _check_resume(previous: dict, settings: dict, out: Path, force: bool) -> list[dict]:
    """The settings of ``previous`` that differ from ``settings`` (settings it did not record are taken as the
    same: older runs recorded fewer); a ``BenchFileError`` naming them unless ``force``."""
    before = previous.get("settings") or {}
    changed = [{"setting": k, "before": before[k], "after": v} for k, v in settings.items()
               if k in before and before[k] != v]
    if changed and not force:
        listed = ", ".join(f"{c['setting']} {c['before']!r} -> {c['after']!r}" for c in changed)
        raise BenchFileError(f"--resume: {out} holds a run with other settings ({listed}): its rows would be kept "
                             f"as if made with the new ones; give the same settings, another --out, or "
                             f"--force-resume to keep them anyway")
    return changed


def run_bench(what: str, names: list[str] | None, quick: bool, seed: int, out: Path, rounds: int | None,
              tasks: list[str] | None = None, command: str = "nearfar bench", resume: bool = False,
              jobs: int = 1, lrs: tuple[float, ...] | None = None, force_resume: bool = False,
              sizes: dict | None = None, compare: list[str] | None = None) -> dict:
    """Run ``what`` ("all", "speed" or "quality") and write the report under ``out`` (also after Ctrl-C).

    ``resume``: start from ``out``'s results (``results.partial.json`` left by an interrupted run, else
    ``results.json``) and run only what is missing there: quality runs by (task, mechanism, seed), speed by
    (mechanism, pattern, dims). A long full run can so be done in several sittings, or extended by another
    ``--task`` / ``--mechanism`` selection, and still give one report. It refuses a run made with other settings
    (size, seed, rounds, LR sweep, device: its rows would mean something else) unless ``force_resume``, which keeps
    them and notes the change in the report. ``jobs``: quality runs at once. ``sizes``: the speed sizes to time
    instead of the preset's (``shape.check_sizes``). ``compare``: a head-to-head of these mechanisms
    (``compare.run_compare``) instead of the speed and quality suites; it runs in one go (no ``resume``)."""
    from .compare import ROUNDS, run_compare
    from .speed import FULL, QUICK, run_speed

    out = Path(out)
    resume = resume or force_resume
    if compare and resume:
        raise BenchFileError("--compare runs in one go: --resume and --force-resume do not apply to it")
    sizes = check_sizes(sizes) if sizes else None
    check_out_dir(out)
    previous = _previous(out) if resume else None
    default_rounds = ROUNDS if compare else (QUICK if quick else FULL)["rounds"]
    settings: dict[str, Any] = {"size": "quick" if quick else "full", "lrs": list(lrs) if lrs else None,
                                "seed": seed,
                                "rounds": default_rounds if rounds is None else rounds,
                                "device": str(torch.get_default_device()),
                                "sizes": None if sizes is None else {d: [list(s) if isinstance(s, tuple) else s
                                                                         for s in v] for d, v in sizes.items()}}
    if compare:
        settings["compare"] = list(compare)
    changed = _check_resume(previous, settings, out, force_resume) if previous is not None else []
    torch.manual_seed(seed)
    results: dict = {"env": environment(), "command": command, "settings": settings, "speed": None, "quality": {},
                     "interrupted": False}
    if previous is not None:
        results.update(speed=previous.get("speed"), quality=previous.get("quality") or {},
                       commands=[*(previous.get("commands") or [previous.get("command")]), command],
                       resumed_with_changes=[*(previous.get("resumed_with_changes") or []), *changed])
        results["command"] = " ; ".join(c for c in results["commands"] if c)
    partial = out / "results.partial.json"

    def save() -> None:
        write_atomic(partial, json.dumps(results, default=str))

    restore = _terminate_as_interrupt()
    try:
        if compare:
            results["compare"] = {}
            run_compare(compare, quick=quick, rounds=rounds, seed=seed, sizes=sizes, progress=Bar("compare", 1),
                        into=results["compare"])
            save()
        elif what in ("all", "speed"):
            before = results["speed"] or None
            # run_speed fills these lists as it goes: an interrupted sweep leaves its finished groups resumable
            results["speed"] = {"rows": [], "gates": [], "crossovers": [], "skipped": [],
                                "config": (before or {}).get("config")}
            bar = Bar("speed", 1)
            results["speed"] = run_speed(names, quick=quick, rounds=rounds, seed=seed, sizes=sizes,
                                         progress=bar,
                                         on_row=lambda r: save(), previous=before, into=results["speed"])
            save()
        if what in ("all", "quality") and not compare:
            run_quality_suite(list(tasks or (QUICK_TASKS if quick else FULL_TASKS)), names, quick, seed, results,
                              save, jobs=jobs, overrides={"lrs": tuple(lrs)} if lrs else None)
    except KeyboardInterrupt:
        results["interrupted"] = True
        sys.stderr.write("\ninterrupted: writing the report of what finished (continue with --resume)\n")
    finally:
        restore()
    paths = write_report(results, out)
    partial.unlink(missing_ok=True)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results
