"""Run a function on ``world`` gloo ranks in fresh processes, with a hard deadline (never hangs CI).

``run_ranks(fn, world, *args, timeout_s=...)`` starts ``world`` fresh processes (``torch.multiprocessing``), each
joining a gloo process group through a ``FileStore`` (no ports) with a short collective timeout, calls
``fn(rank, world, *args)`` and sends back its return value or its formatted exception. The parent polls the processes
against a wall-clock deadline and kills them all if it passes, naming the ranks still alive.

The ranks are forked from a ``forkserver`` that imported torch and nearfar once (it never runs a tensor op, so no
thread pool is forked): a "spawn" start re-imports both in every rank, ~6 s of CPU each, which was most of the
distributed tests' time (18 ranks over the modules). Each rank is still a fresh process with its own process group.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank: int, fn, world: int, store_path: str, out_dir: str, pg_timeout_s: float, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: tuple[str, object]
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        try:
            result = ("ok", fn(rank, world, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


#: imported once by the forkserver, before it forks the first rank (the module of the first ``fn`` is added)
_PRELOAD = ["torch", "torch.distributed", "nearfar", "nearfar.distributed"]


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0, pg_timeout_s: float = 30.0) -> list[tuple[str, object]]:
    """``[(status, value), ...]`` per rank: ``("ok", return value)`` or ``("error", formatted exception)``.

    Raises:
        TimeoutError: If the ranks are not all done within ``timeout_s`` (they are killed first).
    """
    # only takes effect before the forkserver starts (the first call in this process)
    multiprocessing.set_forkserver_preload([*_PRELOAD, fn.__module__])
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.start_processes(_worker, args=(fn, world, store, tmp, pg_timeout_s, args), nprocs=world,
                                 join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if ctx.join(timeout=1):
                        break
                except mp.ProcessExitedException:
                    break
                if time.monotonic() > deadline:
                    alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                    raise TimeoutError(f"ranks {alive} of {world} still running after {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
        out = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out.append(pickle.load(f))
            else:
                out.append(("error", f"rank {r} exited without a result (exit code {ctx.processes[r].exitcode})"))
        return out


def run_ok(fn, world: int, *args, timeout_s: float = 150.0, pg_timeout_s: float = 20.0) -> list:
    """``run_ranks``, asserting every rank returned: the ranks' return values."""
    res = run_ranks(fn, world, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s)
    bad = [f"rank {r}: {val}" for r, (st, val) in enumerate(res) if st != "ok"]
    assert not bad, "\n".join(bad)
    return [val for _, val in res]
