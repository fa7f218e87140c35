"""The GPU check: correctness of every engine and registered mechanism on a device, then C1-C4 timings against
dense SDPA (flash backend) and compiled FlexAttention, in one run of under 8 minutes on one GPU.

    python benchmarks/gpu_check.py                        # cuda: correctness, then timing; markdown to stdout
    python benchmarks/gpu_check.py --device cpu --quick   # tiny sizes, few rounds (what the tests run)
    python benchmarks/gpu_check.py --skip-timing --json out.json

Needs torch only (nearfar is imported from this checkout). Exits 1 if any correctness row fails.

Correctness (``gpu_check_correct``): the example patterns of ``nearfar bench patterns`` (at its correctness size;
``--quick``: the same structures at tiny sizes), a GQA case and a key-padding-mask case, on every engine that
applies ("dense", "blocksparse", "partition" for windows, "flex", "auto"; on CPU also the block-sparse engine's
matmul kernel, which every other device runs), forward and q/k/v gradients, fp32 and bf16, against the dense engine
in float64 on the same device. Tolerances: error over max |reference| <= 2e-4 (fp32), 4e-2 (bf16). Then every
registered layer, fp32, forward+backward on "auto" and "blocksparse" against the same module on the dense engine
(``nearfar.engine_override``), error over max(1, max |reference|) <= 1e-4, as ``nearfar bench``'s gate.

Timing: C1-C4 of ``benchmarks/run.py`` (same sizes; ``--quick``: tiny ones), B=1, fp32 and bf16: ``nf.attend``
(default engine) against dense SDPA without a mask forced to the flash backend (efficient where flash does not take
the dtype, e.g. fp32 on CUDA) and FlexAttention compiled with ``create_block_mask`` from the pattern's ``allowed``
(eager if ``NEARFAR_FLEX_COMPILE=0``); forward for all, forward+backward for C1 and C2. Each method is warmed up
(Flex compiles then), then timed in interleaved rounds with the device synchronised around each call; the table
gives median ms and the median per-round ratio method / nearfar (> 1: nearfar faster). TF32 is off.

Every check is caught per row and reported. No check starts after ``--budget`` seconds (default 420, correctness
within its first 60% unless ``--skip-timing``): those are reported as skipped. Flex compiles per pattern, size and
dtype (tens of seconds each on a GPU), so its correctness rows run after the others, and dynamo's recompile limit is
raised for the run (past it, compiled Flex would silently run eagerly, unfused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):  # nearfar from this checkout; run.py and the helpers beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gpu_check_correct import (  # noqa: E402
    Budget,
    Row,
    check_case,
    check_mechanisms,
    pattern_cases,
    skipped_models,
)
from run import CASES  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import nearfar as nf  # noqa: E402
from nearfar import patterns as P  # noqa: E402
from nearfar.bench.timing import interleave, median_ratio  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)
#: ``--quick`` stand-ins of C1-C4: the same kinds of pattern at sizes a CPU test runs in a second
QUICK_CASES: dict[str, dict] = {
    "C1": dict(desc="1D Neighborhood(33), N=512, H=2, d=16", pattern=lambda: P.Neighborhood(33), n=512, heads=2,
               dim=16),
    "C2": dict(desc="2D Neighborhood((5,5)) on 16x16, H=2, d=16",
               pattern=lambda: P.Neighborhood((5, 5), grid=(16, 16)), n=256, heads=2, dim=16),
    "C3": dict(desc="3D Neighborhood((3,3,3)) on 4x8x8, H=2, d=16",
               pattern=lambda: P.Neighborhood((3, 3, 3), grid=(4, 8, 8)), n=256, heads=2, dim=16),
    "C4": dict(desc="(SlidingWindow(left=64) | Sinks(4)) & Causal(), N=512, H=2, d=16",
               pattern=lambda: (P.SlidingWindow(left=64) | P.Sinks(4)) & P.Causal(), n=512, heads=2, dim=16),
}
FWD_BWD_CASES = ("C1", "C2")
METHODS = ("nearfar", "SDPA", "Flex")
LATE = ("flex", "auto")
EARLY = ("dense", "blocksparse", "blocksparse[matmul]", "partition")
#: the share of ``--budget`` the correctness checks may start in; timing gets the rest
CHECK_SHARE = 0.6


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[str, Callable[..., torch.Tensor]]:
    """Dense SDPA (no mask) on the flash backend, or the efficient one where flash rejects the inputs."""
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        try:
            with torch.no_grad():
                call(q, k, v)
            return name, call
        except RuntimeError:
            continue
    raise RuntimeError("neither the flash nor the efficient SDPA backend takes these inputs")


def _flex(pattern: P.Pattern, q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention as a user writes it: ``create_block_mask`` from the pattern's ``allowed`` (raster order)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    block_mask = create_block_mask(lambda b, h, qi, ki: pattern.allowed(qi, ki, n, n), None, None, n, n,
                                   device=str(q.device))
    compiled = os.environ.get("NEARFAR_FLEX_COMPILE", "1") != "0"
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask)


def _timed(fn: Callable[..., torch.Tensor], qkv: list[torch.Tensor], phase: str,
           sync: Callable[[], None]) -> Callable[[], None]:
    """One synchronised call: forward under no_grad, or forward + backward of a fixed cotangent."""
    if phase == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                fn(*qkv)
            sync()
        return fwd
    leaves = [x.detach().clone().requires_grad_() for x in qkv]
    cot = torch.randn_like(qkv[0])

    def fwd_bwd() -> None:
        fn(*leaves).backward(cot)
        for x in leaves:
            x.grad = None
        sync()
    return fwd_bwd


def time_case(name: str, case: dict, dtype: torch.dtype, phase: str, device: torch.device, rounds: int) -> dict:
    """Median ms of each method and median per-round ratio to nearfar; a method that fails says why."""
    res: dict = dict(case=name, desc=case["desc"], dtype=str(dtype).removeprefix("torch."), phase=phase,
                     ms={}, ratio={}, errors={}, sdpa="")
    pattern, sync = case["pattern"](), _sync(device)
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, case["heads"], case["n"], case["dim"], generator=g).to(device, dtype) for _ in range(3)]
    makers: dict[str, Callable[[], Callable[..., torch.Tensor]]] = {
        "nearfar": lambda: lambda q, k, v: nf.attend(q, k, v, pattern), "Flex": lambda: _flex(pattern, qkv[0])}

    def sdpa() -> Callable[..., torch.Tensor]:
        res["sdpa"], call = _sdpa(*qkv)
        return call
    makers["SDPA"] = sdpa
    methods: dict[str, Callable[[], None]] = {}
    for method in METHODS:
        try:
            if method == "Flex" and phase != "fwd" and device.type != "cuda":
                raise RuntimeError("FlexAttention has no backward off CUDA")
            call = _timed(makers[method](), qkv, phase, sync)
            call()  # warm-up (compiles Flex), alone so a failure is this method's
            methods[method] = call
        except Exception as exc:  # noqa: BLE001 - one broken method must not hide the others
            res["errors"][method] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]
    if "nearfar" in methods:
        try:
            times = interleave(methods, rounds=rounds, warmup=1)
            res["ms"] = {m: statistics.median(t) * 1e3 for m, t in times.items()}
            res["ratio"] = {m: median_ratio(times, m, "nearfar") for m in times if m != "nearfar"}
        except Exception as exc:  # noqa: BLE001
            res["errors"]["timing"] = f"{type(exc).__name__}: {exc}"[:160]
    return res


def run_timing(device: torch.device, quick: bool, rounds: int, budget: Budget) -> list[dict]:
    """Every (case, dtype, phase), forwards first (each compiles Flex anew), listed in table order."""
    cases = QUICK_CASES if quick else CASES
    keys = [(name, dtype, phase) for name in cases for dtype in DTYPES
            for phase in (("fwd", "fwd+bwd") if name in FWD_BWD_CASES else ("fwd",))]
    done: dict = {}
    for key in sorted(keys, key=lambda k: k[2] != "fwd"):
        name, dtype, phase = key
        if budget.over():
            done[key] = dict(case=name, desc=cases[name]["desc"], dtype=str(dtype).removeprefix("torch."),
                             phase=phase, ms={}, ratio={}, errors={"skipped": "time budget"}, sdpa="")
            continue
        done[key] = time_case(name, cases[name], dtype, phase, device, rounds)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [done[k] for k in keys]


# --------------------------------------------------------------------------------------------------- output
def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def correctness_table(rows: Sequence[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skipped", "n/a")}
    lines = ["### Correctness", "", f"{counts['pass']} pass, {counts['FAIL']} FAIL, {counts['skipped']} skipped "
             f"(time budget), {counts['n/a']} n/a, of {len(rows)} rows", "",
             "| section | case | engine | dtype | out err | grad err | tol | result | note |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        note, case = (t.replace("|", "\\|") for t in (r.note, r.case))
        lines.append(f"| {r.section} | {case} | {r.engine} | {r.dtype} | {_num(r.out_err)} | "
                     f"{_num(r.grad_err)} | {_num(r.tol)} | {r.status} | {note} |")
    return "\n".join(lines) + "\n"


def timing_table(results: Sequence[dict]) -> str:
    lines = ["### Timing (median ms; x / nearfar > 1: nearfar faster)", "",
             "| case | dtype | phase | nearfar ms | SDPA dense ms | Flex ms | SDPA / nearfar | Flex / nearfar "
             "| SDPA backend | errors |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        ms = [f"{r['ms'][m]:.2f}" if m in r["ms"] else "-" for m in METHODS]
        ratio = [f"{r['ratio'][m]:.2f}x" if m in r["ratio"] else "-" for m in METHODS[1:]]
        errors = "; ".join(f"{m}: {e}" for m, e in r["errors"].items()).replace("|", "\\|")
        lines.append(f"| {r['case']} | {r['dtype']} | {r['phase']} | {' | '.join(ms)} | {' | '.join(ratio)} | "
                     f"{r['sdpa'] or '-'} | {errors} |")
    return "\n".join(lines) + "\n"


def _header(device: torch.device, argv: Sequence[str]) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"## nearfar GPU check\n\n`python benchmarks/gpu_check.py {' '.join(argv)}`\n\n"
            f"torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU threads, nearfar "
            f"{nf.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")


def _raise_recompile_limit(limit: int = 256) -> str:
    """Compiled Flex (nearfar's "flex" engine and the Flex peer) is one ``torch.compile``d function recompiled per
    pattern, size and dtype; past dynamo's recompile limit (8 by default) it would run eagerly, unfused, and this
    check would measure that. Raised for this process; the line says so."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    old = getattr(config, name)
    setattr(config, name, max(old, limit))
    return f"\ntorch._dynamo.config.{name} raised from {old} to {getattr(config, name)} for this run\n"


def check_all(device: torch.device, quick: bool, budget: Budget) -> list[Row]:
    """Every correctness row: patterns x engines x dtypes, then the registered mechanisms. Run in the order that
    keeps the cheap checks inside the budget: Flex compiles per pattern, size and dtype (on CUDA "auto" is Flex at
    these sizes), so the pattern rows on "flex" and "auto" run last, fp32 first; the table lists them in place."""
    cases = pattern_cases(quick)
    keys = [(i, dtype) for i in range(len(cases)) for dtype in DTYPES]
    early = {k: check_case(cases[k[0]], k[1], device, budget, only=EARLY) for k in keys}
    mechanisms = check_mechanisms(device, quick, budget)
    fp32_first = sorted(keys, key=lambda k: k[1] != DTYPES[0])
    late = {k: check_case(cases[k[0]], k[1], device, budget, only=LATE) for k in fp32_first}
    return [r for k in keys for r in early[k] + late[k]] + mechanisms + skipped_models()


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu allowed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two timing rounds (CI)")
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10, --quick 2)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no check starts (reported as skipped; default 420); correctness "
                             f"checks start within the first {CHECK_SHARE:.0%} of it unless --skip-timing")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    limits = _raise_recompile_limit()
    budget = Budget(args.budget)
    out(_header(device, sys.argv[1:] if argv is None else argv) + limits)
    rows = check_all(device, args.quick, Budget(args.budget * (1.0 if args.skip_timing else CHECK_SHARE),
                                                budget.start))
    out(correctness_table(rows))
    timing: list[dict] = []
    if not args.skip_timing:
        timing = run_timing(device, args.quick, args.rounds or (2 if args.quick else 10), budget)
        out(timing_table(timing))
    failed = [r for r in rows if r.status == "FAIL"]
    skipped = sum(r.status == "skipped" for r in rows) + sum("skipped" in t["errors"] for t in timing)
    out(f"{len(failed)} correctness rows failed; {time.perf_counter() - budget.start:.0f} s in all"
        + (f"; {skipped} rows skipped for time: rerun with a larger --budget to run them" if skipped else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=[asdict(r) for r in rows], timing=timing), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
