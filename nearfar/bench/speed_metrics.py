"""What the speed suite (``speed.py``) measures besides time: the useful work of a call (allowed query-key pairs
and attention FLOPs, from the calls ``speed_gate.recording_attend`` saw), the bytes saved for backward, the peak
bytes of the tensors a call allocates, and the crossover sizes from which a mechanism beats dense attention."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..patterns import Dense, Pattern


def crossover(labels: Sequence, wins: Sequence[bool]) -> object:
    """The first label from which every later one wins; ``"> largest"`` when the largest does not; None when
    nothing was measured."""
    if not labels:
        return None
    first = None
    for label, win in zip(labels, wins):
        first = (first if first is not None else label) if win else None
    return first if first is not None else "> largest"


def crossovers(rows: list[dict]) -> list[dict]:
    """Time and memory crossovers of every mechanism x pattern x dims x phase (peer rows left out)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["peer"] is None:
            groups.setdefault((r["mechanism"], r["pattern"], r["dims"], r["phase"]), []).append(r)
    out = []
    for (mech, pattern, dims, phase), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["tokens"])
        labels = [r["size"] for r in rs]
        mem = None
        if phase == "fwd+bwd":
            mem = crossover(labels, [r["saved_mib"] < r["dense_saved_mib"] for r in rs])
        peak = None  # rows of runs before the peak was measured have none
        if all(r.get("peak_mib") is not None and r.get("dense_peak_mib") is not None for r in rs):
            peak = crossover(labels, [r["peak_mib"] < r["dense_peak_mib"] for r in rs])
        out.append({"mechanism": mech, "pattern": pattern, "dims": dims, "phase": phase,
                    "time_crossover": crossover(labels, [r["ratio"] > 1 for r in rs]), "memory_crossover": mem,
                    "peak_crossover": peak})
    return out


@functools.lru_cache(maxsize=256)
def _allowed(pattern: Pattern, nq: int, nk: int) -> int:
    """Allowed pairs of ``pattern`` (summed over heads for per-head patterns), counted in row chunks."""
    keys, total = torch.arange(nk)[None, :], 0
    step = max(1, (1 << 22) // nk)
    for start in range(0, nq, step):
        q = torch.arange(start, min(nq, start + step))[:, None]
        m = pattern.allowed(q, keys, nq, nk)
        total += int(m.expand(*m.shape[:-2], q.shape[0], nk).sum())
    return total


def work(calls: list[tuple]) -> tuple[int | None, float | None]:
    """Allowed (query, key) pairs per head (summed over attend calls and their batch, which for windowed modules
    holds the windows: the timed input has batch 1) and forward attention FLOPs, from the calls ``recording_attend``
    saw; (None, None) when the module never calls ``attend``."""
    if not calls:
        return None, None
    pairs, flops = 0.0, 0.0
    for pattern, (b, hq, nq, d), (_, _, nk, _), (*_, dv) in calls:
        if pattern is None or isinstance(pattern, Dense):
            all_heads = hq * nq * nk
        else:
            all_heads = _allowed(pattern, nq, nk) * (1 if pattern.heads is not None else hq)
        pairs += b * all_heads / hq
        flops += 2.0 * b * all_heads * (d + dv)
    return round(pairs), flops


def saved_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (``exclude``: storage
    pointers not to count, e.g. parameters)."""
    seen: dict[int, int] = {}

    def pack(t):
        ptr, nbytes = _storage(t) or (id(t), t.nbytes)
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


class _PeakTracker(TorchDispatchMode):
    """Bytes of the storages that ops create, alive at once: a storage counts from the op that returns it until it
    is freed (checked after each op); storages that existed before (inputs, parameters, caches) never count."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.outside = set(exclude)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage pointer -> (weak ref, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and (ptr := _storage(t)) is not None and ptr[0] not in self.live:
                self.outside.add(ptr[0])
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (ptr := _storage(t)) is not None:
                if ptr[0] not in self.live and ptr[0] not in self.outside and ptr[1]:
                    self.live[ptr[0]] = (StorageWeakRef(t.untyped_storage()), ptr[1])
                    self.current += ptr[1]
        self.peak = max(self.peak, self.current)
        return out


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None


def peak_bytes(fn: Callable[[], object], exclude: set[int]) -> int:
    """Peak bytes of the tensors ``fn`` allocates and holds at once, forward and backward alike (the CPU analogue
    of ``torch.cuda.max_memory_allocated`` minus the memory in use before; ``exclude``: storage pointers never to
    count, e.g. parameters). Scratch memory inside one kernel (e.g. fused SDPA's blocks) is not seen."""
    with _PeakTracker(exclude) as tracker:
        fn()
    return tracker.peak
