"""The speed suite of ``nearfar bench``: every registered mechanism in each CAB pattern it supports, against fused
dense SDPA, forward and forward+backward, versus sequence length (1D) and feature-map size (2D).

Protocol (ours, one table per CAB pattern): fp32, batch 1, the caller's thread count. Before anything is
timed, a mechanism x pattern passes the correctness gate (``speed_gate``: fast engines vs the dense engine, CAB's
prefix invariance, decoding vs the forward); a failed gate is reported and not timed. Each row times the mechanism
and the registered ``dense`` layer (``DenseAttention``, fused SDPA, same CAB pattern, dim and heads; 2D maps as
``H*W`` tokens) on the same inputs, warmed up, then in interleaved rounds with a rotating order
(``nearfar.bench.interleave``): "ratio" is the median over rounds of dense time / ours (> 1: faster than dense), so
a slow spell of this shared machine hits both alike. Memory, both deterministic: the peak bytes of the tensors the
call allocates and holds at once (forward, or forward and backward; inputs and parameters excluded; measured with a
dispatch mode after the warm-up), and the bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
each storage once, parameters excluded). Useful FLOPs count only the
attention's allowed (query, key) pairs: ``2 (d + dv)`` per pair, head and batch element (``4 d`` per pair for
``d = dv``), 3.5x for forward+backward (backward = 2.5x forward, FlashAttention's convention). CAB's efficiency
length becomes the measured crossover: the smallest size from which ours is faster (or saves fewer bytes) and
stays so (work, bytes and crossovers: ``speed_metrics``). Installed peers (``speed_peers``: compiled FlexAttention,
NATTEN, local-attention, agent-attention-pytorch) are timed in the same rounds, on the same inputs, as extra rows.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch

from ..checks import check_positive_int
from ..layers.registry import FAMILIES, Mechanism, mechanisms
from . import speed_peers
from .shape import SWEPT_DIMS, check_sizes
from .speed_gate import GATE_1D, GATE_2D, GATE_SETTINGS, TOL, engine_check, gate_layer, recording_attend, rel_err
from .speed_metrics import crossovers, peak_bytes, saved_bytes, work
from .timing import interleave, median_ratio


class _Preset(TypedDict):
    sizes: dict[str, tuple[Any, ...]]  # "1d": lengths N, "2d": (H, W) maps
    widths: dict[str, tuple[int, int]]  # (dim, heads) per dims
    rounds: int
    row_budget_s: float


#: quick: the sweep of ``nearfar bench --quick`` (2.5-4 min for every mechanism on this shared 2-core machine);
#: full: CAB/FA-style lengths, head dim 64 (1D) and the 56x56x96 stage-1 map of the vision benchmarks (~40 min)
#: ``row_budget_s``: a row whose one round (every method once) takes longer gets fewer rounds (at least one)
QUICK: _Preset = {"sizes": {"1d": (512, 2048), "2d": ((14, 14), (42, 42))}, "widths": {"1d": (64, 2), "2d": (64, 2)},
                  "rounds": 3, "row_budget_s": 8.0}
FULL: _Preset = {"sizes": {"1d": (256, 512, 1000, 1024, 2048, 4096, 8192),
                           "2d": ((14, 14), (28, 28), (56, 56), (84, 84))},
                 "widths": {"1d": (128, 2), "2d": (96, 3)}, "rounds": 5, "row_budget_s": 30.0}
PHASES = ("fwd", "fwd+bwd")
#: constructor arguments a mechanism needs for a spatial rank other than its default
DIMS_ARGS = {("neighborhood", "1d"): {"ndim": 1}}
_MIB = float(1 << 20)


def select(names: Sequence[str] | None) -> tuple[list[Mechanism], list[dict]]:
    """The layer mechanisms named (registry names or families; None: all but the ``dense`` baseline) and the
    ``skipped`` entries for what is left out (whole models, 3D variants)."""
    registry = {m.name: m for m in mechanisms()}
    skipped: list[dict] = []
    if names is None:
        chosen = [m for m in registry.values() if m.name != "dense"]
        skipped.append({"mechanism": "dense", "pattern": "*", "why": "the baseline every row is timed against"})
    else:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a list of mechanism or family names, got {names!r}")
        chosen = []
        for n in names:
            if n in registry:
                chosen.append(registry[n])
            elif n in FAMILIES:
                chosen += [m for m in registry.values() if m.family == n and m.name != "dense"]
            else:
                raise ValueError(f"unknown mechanism or family {n!r}: mechanisms are {sorted(registry)}, "
                                 f"families {list(FAMILIES)}")
        chosen = list({m.name: m for m in chosen}.values())
    layers = []
    for m in chosen:
        if m.kind != "layer":
            skipped.append({"mechanism": m.name, "pattern": "*", "why": "a whole language model (kind='model'): "
                            "timed against a dense TinyLM in benchmarks/sequence.py"})
            continue
        if "3d" in m.dims:
            skipped.append({"mechanism": m.name, "pattern": "*", "why": "3d variant not swept (1d and 2d only)"})
        if any(d in SWEPT_DIMS for d in m.dims):
            layers.append(m)
    return layers, skipped


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def timed_call(fn: Callable, inputs: list[torch.Tensor], phase: str, params: list[torch.nn.Parameter],
               seed: int) -> Callable[[], torch.Tensor]:
    """One timed call of ``fn(*inputs)``: forward under no_grad, or forward + backward of a fixed random cotangent
    (input and parameter gradients cleared after each call, alike for every method)."""
    if phase == "fwd":
        def call_fwd() -> torch.Tensor:
            with torch.no_grad():
                return _output(fn(*inputs))
        return call_fwd
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    state: dict = {}

    def call() -> torch.Tensor:
        out = _output(fn(*leaves))
        if "g" not in state:
            state["g"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        out.backward(state["g"])
        for t in (*leaves, *params):
            t.grad = None
        return out.detach()
    return call


def make_inputs(dims: str, size: Any, dim: int, pattern: str,
                seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, int]:
    """(inputs of ours, inputs of dense, size label, tokens): x (1, N, dim) or (1, H, W, dim); cross: context
    (1, N, dim); dense sees a map as its H*W tokens."""
    g = torch.Generator().manual_seed(seed)
    shape = (size,) if dims == "1d" else tuple(size)
    x = torch.randn(1, *shape, dim, generator=g)
    tokens = math.prod(shape)
    ours = [x] + ([torch.randn(1, tokens, dim, generator=g)] if pattern in ("NC", "CC") else [])
    dense = [x.reshape(1, tokens, dim)] + ours[1:]
    return ours, dense, (size if dims == "1d" else "x".join(map(str, shape))), tokens


def dense_mechanism() -> Mechanism:
    """The registered ``dense`` layer (fused SDPA), the baseline of every row."""
    return next(m for m in mechanisms() if m.name == "dense")


def call_layer(layer: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``layer`` as a function of ``(x, context=None)``, the inputs of ``make_inputs``."""
    return lambda x, context=None: layer(x) if context is None else layer(x, context=context)


def gate_mechanism(mech: Mechanism, pattern: str, dims: str, width: tuple[int, int], smallest: Any,
                   seed: int) -> dict:
    """The correctness gate of ``mech`` in ``pattern`` at rank ``dims`` (``speed_gate.gate_layer``), as a record
    with ``mechanism``, ``pattern`` and ``dims``; a mechanism that cannot even be built fails it."""
    head = {"mechanism": mech.name, "pattern": pattern, "dims": dims}
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        extra = DIMS_ARGS.get((mech.name, dims), {})
        cross = pattern in ("NC", "CC")
        if dims == "1d":
            layer = mech.build(64, 2, pattern, **extra, **GATE_SETTINGS.get(mech.name, {}))
            x = torch.randn(2, GATE_1D, 64, generator=g)
            ctx = torch.randn(2, GATE_1D // 2 + 7, 64, generator=g) if cross else None
        else:
            layer = mech.build(*width, pattern, **extra)
            x, ctx = torch.randn(2, *GATE_2D, width[0], generator=g), None
        res = gate_layer(layer, pattern, x, ctx, seed=seed)
        if dims == "1d" and mech.name in GATE_SETTINGS and res["passed"]:
            # the gate's settings exercise the structure; the timed ones (make defaults) must agree too
            timed = mech.build(*width, pattern, **extra)
            ours, _, _, _ = make_inputs(dims, smallest, width[0], pattern, seed)
            err, _ = engine_check(timed, ours[0], ours[1] if len(ours) > 1 else None, grads=False, seed=seed)
            res["max_err"], res["passed"] = max(res["max_err"], err), err <= TOL
            res["detail"] += (f"; gated with {GATE_SETTINGS[mech.name]} at N={GATE_1D} (batch 2, dim 64); the timed "
                              f"make() defaults at N={smallest}: forward max rel err {err:.1e}")
        return {**head, **res}
    except Exception as exc:  # noqa: BLE001 - a mechanism that cannot even be built for the gate fails it
        return {**head, "passed": False, "max_err": float("inf"), "prefix_invariant": None, "decode_ok": None,
                "detail": f"gate raised {type(exc).__name__}: {exc}"[:300]}


def _warm(fn: Callable[[], torch.Tensor], params: list,
          phase: str) -> tuple[torch.Tensor, int | None, list[tuple], float]:
    """The warm-up call: its output, the bytes it saves for backward (None for "fwd"), its attend calls and
    seconds."""
    box: dict = {}
    t0 = time.perf_counter()
    with recording_attend() as seen:
        nbytes = saved_bytes(lambda: box.__setitem__("out", fn()), {p.untyped_storage().data_ptr() for p in params})
    return box["out"], (nbytes if phase != "fwd" else None), seen, time.perf_counter() - t0


def _time_row(base: dict, ours: torch.nn.Module, dense: torch.nn.Module, ours_in: list[torch.Tensor],
              dense_in: list[torch.Tensor], phase: str, rounds: int, seed: int, peers: list,
              budget_s: float = math.inf, failed: list | None = None) -> list:
    """The row of ``ours`` against ``dense`` (and one per peer) at one size and phase; a peer that fails is left
    out and appended to ``failed`` as ``(name, reason)``."""
    params = {"ours": list(ours.parameters()), "dense": list(dense.parameters())}
    calls = {"ours": timed_call(call_layer(ours), ours_in, phase, params["ours"], seed),
             "dense": timed_call(call_layer(dense), dense_in, phase, params["dense"], seed)}
    load_before = _load()
    rng = torch.get_rng_state()
    warm = {name: _warm(fn, params[name], phase) for name, fn in calls.items()}
    # after the warm-up and with its random draws (MSW-MSA draws a shift per call), so that the plans and masks
    # cached on the first call are not counted: a cold plan of MSW-MSA at 84x84 costs 65 MiB once
    peak = {}
    for name, fn in calls.items():
        torch.set_rng_state(rng)
        peak[name] = peak_bytes(fn, {p.untyped_storage().data_ptr() for p in params[name]}) / _MIB
    pairs, flops = work(warm["ours"][2])
    extra: dict[str, dict] = {}
    for peer in peers:
        try:
            run, same = peer.make(ours, ours_in[0])
            peer_params = params["ours"] + (list(run.parameters()) if isinstance(run, torch.nn.Module) else [])
            call = timed_call(run, ours_in[:1], phase, peer_params, seed)
            warm[peer.name] = _warm(call, peer_params, phase)
        except Exception as exc:  # noqa: BLE001 - peers are optional: a failing one must not cost our row
            if failed is not None:
                failed.append((peer.name, f"{type(exc).__name__}: {exc}"))
            continue
        calls[peer.name] = call
        extra[peer.name] = {"compile_s": round(warm[peer.name][3], 2) if peer.compiled else None,
                            "note": peer.note, "peer_err": rel_err(warm[peer.name][0], warm["ours"][0])
                            if same and phase == "fwd" else None}
    one_round = sum(w[3] for name, w in warm.items() if not extra.get(name, {}).get("compile_s"))
    rounds = max(1, int(min(rounds, budget_s / max(one_round, 1e-9))))
    times = interleave(calls, rounds=rounds, warmup=0)
    load = [load_before, _load()]
    rows = []
    for name in calls:
        if name == "dense":
            continue
        per_round = [d / o for d, o in zip(times["dense"], times[name])]
        saved, dense_saved = warm[name][1], warm["dense"][1]
        row = {**base, "phase": phase, "ms": 1e3 * statistics.median(times[name]),
               "dense_ms": 1e3 * statistics.median(times["dense"]), "ratio": median_ratio(times, "dense", name),
               "ratio_min": min(per_round), "ratio_max": max(per_round),
               "saved_mib": None if saved is None else saved / _MIB,
               "dense_saved_mib": None if dense_saved is None else dense_saved / _MIB,
               "peak_mib": peak.get(name), "dense_peak_mib": peak["dense"],
               "pairs": None, "gflops": None, "load": load, "peer": None, "compile_s": None, "rounds": rounds}
        if name == "ours":
            row["pairs"] = pairs
            if flops is not None:
                row["gflops"] = flops * (3.5 if phase != "fwd" else 1.0) / statistics.median(times[name]) / 1e9
        else:
            row.update(peer=name, **extra[name])
        rows.append(row)
    return rows


def _finished(previous: dict | None, sizes: dict) -> dict:
    """(mechanism, dims, pattern) -> (gate, rows, skipped) of the groups ``previous`` finished: gated, and (when
    the gate passed) timed at the last size of ``sizes`` in the last phase."""
    if not previous:
        return {}
    last = {d: sizes[d][-1] if d == "1d" else "x".join(map(str, sizes[d][-1])) for d in sizes}
    kept = {}
    for gate in previous.get("gates", []):
        key = (gate["mechanism"], gate.get("dims"), gate["pattern"])
        rows = [r for r in previous.get("rows", []) if (r["mechanism"], r["dims"], r["pattern"]) == key]
        if gate["passed"] and not any(r["size"] == last.get(key[1]) and r["phase"] == PHASES[-1] for r in rows):
            continue
        skips = [s for s in previous.get("skipped", []) if (s["mechanism"].split(" (peer")[0], s.get("pattern"))
                 == (key[0], key[2]) and str(s.get("why", "")).startswith(key[1])]
        kept[key] = (gate, rows, skips)
    return kept


def run_speed(names: list[str] | None = None, quick: bool = True, rounds: int | None = None, seed: int = 0,
              peers: bool | Sequence[str] = True, progress: Callable[[int, int, str], None] | None = None,
              on_row: Callable[[dict], None] | None = None, sizes: dict | None = None,
              widths: dict | None = None, previous: dict | None = None, into: dict | None = None) -> dict:
    """Gate, then time every selected mechanism x CAB pattern x size x phase against dense SDPA.

    ``names``: registry names or families (None: every layer mechanism; whole models are skipped with a note).
    ``peers``: time the installed peers beside ours (True), none (False) or those named (``speed_peers.PEERS``).
    ``sizes`` / ``widths`` override the preset's ``{"1d": (N, ...), "2d": ((H, W), ...)}`` (per rank given: a rank
    left out keeps the preset's sizes; ``check_sizes`` says what is allowed) and
    ``{"1d": (dim, heads), "2d": (dim, heads)}``. ``progress(done, total, label)`` is called as work finishes,
    ``on_row(row)`` after every row. Returns ``{"rows", "gates", "crossovers", "skipped", "config"}``; besides the
    documented row keys, rows carry ``rounds`` (fewer than asked when one round exceeds the preset's row budget) and
    ``compile_s``, peer rows ``note`` and ``peer_err`` (max rel. error against ours, when it computes our function).
    Gates and crossovers also carry ``dims`` (``neighborhood`` is swept in 1D and 2D).

    ``previous``: an earlier result of this function (``--resume``): each (mechanism, dims, pattern) it finished,
    gate and last size timed, is kept as it is (its rows are passed to ``on_row`` again) and not re-run; finished
    groups of mechanisms not selected now are kept too, so a resumed sweep of other mechanisms extends the result.
    ``into``: a dict whose "rows", "gates" and "skipped" lists receive the results as they come, so that a caller
    interrupted mid-sweep still holds every finished group, gate included."""
    preset = QUICK if quick else FULL
    rounds = preset["rounds"] if rounds is None else rounds
    check_positive_int(rounds, "rounds")
    sizes = {**preset["sizes"], **check_sizes(sizes or {})}
    widths = {**preset["widths"], **(widths or {})}
    chosen, left_out = select(names)
    only_peers = speed_peers.check_names(peers)
    items = [(m, d, p) for m in chosen for d in SWEPT_DIMS if d in m.dims for p in m.patterns]
    total, done = sum(1 + len(sizes[d]) * len(PHASES) for _, d, _ in items), 0
    into = {"rows": [], "gates": [], "skipped": []} if into is None else into
    rows, gates, skipped = into["rows"], into["gates"], into["skipped"]
    skipped += left_out
    started, load_start = time.perf_counter(), _load()
    kept = _finished(previous, sizes)
    for mech, dims, pattern in items:
        label = f"{mech.name} {pattern} {dims}"
        if (mech.name, dims, pattern) in kept:
            gate, old_rows, old_skips = kept[mech.name, dims, pattern]
            gates.append(gate)
            skipped += old_skips
            for row in old_rows:
                rows.append(row)
                if on_row:
                    on_row(row)
            done += 1 + len(sizes[dims]) * len(PHASES)
            if progress:
                progress(done, total, f"{label}: kept from the previous run")
            continue
        gate = gate_mechanism(mech, pattern, dims, widths[dims], sizes[dims][0], seed)
        gates.append(gate)
        done += 1
        if progress:
            progress(done, total, f"{label}: gate {'passed' if gate['passed'] else 'FAILED'}")
        if not gate["passed"]:
            skipped.append({"mechanism": mech.name, "pattern": pattern, "why": f"{dims}: failed the gate"})
            done += len(sizes[dims]) * len(PHASES)
            continue
        torch.manual_seed(seed)
        width: tuple[int, int] = widths[dims]
        ours = mech.build(*width, pattern, **DIMS_ARGS.get((mech.name, dims), {})).eval()
        dense = dense_mechanism().build(*width, pattern).eval()
        for i, size in enumerate(sizes[dims]):
            ours_in, dense_in, size_label, tokens = make_inputs(dims, size, widths[dims][0], pattern, seed)
            base = {"mechanism": mech.name, "family": mech.family, "pattern": pattern, "dims": dims,
                    "size": size_label, "tokens": tokens}
            for phase in PHASES:
                chosen_peers = speed_peers.peers_for(mech.name, pattern, dims, phase, tokens, i, len(sizes[dims]),
                                                     quick, only_peers)
                failed: list[tuple[str, str]] = []
                try:
                    new = _time_row(base, ours, dense, ours_in, dense_in, phase, rounds, seed, chosen_peers,
                                    preset["row_budget_s"], failed)
                except Exception as exc:  # noqa: BLE001 - one failing size must not hide the others
                    failed.append(("", f"{type(exc).__name__}: {exc}"))
                    new = []
                skipped += [{"mechanism": mech.name + (f" (peer {who})" if who else ""), "pattern": pattern,
                             "why": f"{dims} {size_label} {phase}: {why}"[:300]} for who, why in failed]
                for row in new:
                    rows.append(row)
                    if on_row:
                        on_row(row)
                done += 1
                if progress:
                    progress(done, total, f"{label} {size_label} {phase}")
    selected = {(m.name, d, p) for m, d, p in items}
    for key, (gate, old_rows, old_skips) in kept.items():  # finished groups of mechanisms not selected this time
        if key not in selected:
            gates.append(gate)
            rows += old_rows
            skipped += old_skips
    # and the earlier run's notes on what it left out (3D variants, whole models, the baseline), unless made again
    noted = {s["mechanism"] for s in left_out} | {m.name for m in chosen}
    skipped += [s for s in (previous or {}).get("skipped", [])
                if s.get("pattern") == "*" and s["mechanism"] not in noted]
    config = {"quick": quick, "rounds": rounds, "row_budget_s": preset["row_budget_s"], "seed": seed, "batch": 1,
              "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "phases": list(PHASES),
              "sizes": {d: [s if d == "1d" else "x".join(map(str, s)) for s in sizes[d]] for d in SWEPT_DIMS},
              "widths": {d: list(widths[d]) for d in SWEPT_DIMS},
              "gate": {"tol": TOL, "1d": GATE_1D, "2d": "x".join(map(str, GATE_2D)), "settings": GATE_SETTINGS},
              "peers": speed_peers.status(only_peers) if only_peers != set() else "off", "load": [load_start, _load()],
              "elapsed_s": round(time.perf_counter() - started
                                 + ((previous or {}).get("config") or {}).get("elapsed_s", 0.0), 1),
              "baseline": "registered 'dense' (DenseAttention: fused SDPA) built for the same CAB pattern"}
    return {"rows": rows, "gates": gates, "crossovers": crossovers(rows), "skipped": skipped, "config": config}
