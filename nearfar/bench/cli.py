"""``nearfar`` command line.

    nearfar bench [--quick]                 # speed + quality over every registered mechanism, then the report
    nearfar bench speed --mechanism swin local --rounds 5
    nearfar bench speed --mechanism streaming_llm --sizes 256 1024      # choose the sizes (HxW for images)
    nearfar bench --compare swin maxvit_grid neighborhood --sizes 28x28 56x56   # head-to-head, same rounds
    nearfar bench quality --task mqar passkey --full --jobs 2
    nearfar bench --full --resume           # go on with an interrupted or partial run in the same --out
    nearfar bench --full --force-resume --seed 1   # the same, keeping rows made with other settings
    nearfar bench report --out nearfar-bench    # re-render report.md/html from results.json
    nearfar bench patterns                  # correctness + speed sweep of the example patterns (the engine check)
    nearfar --version
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .files import BenchFileError

_EXAMPLES = """examples:
  nearfar bench                                     # --quick: every mechanism, under 10 minutes on 2 cores
  nearfar bench speed --mechanism swin hilo --sizes 28x28 56x56
  nearfar bench --compare streaming_llm longformer --sizes 1024 4096   # head-to-head, ratios between them
  nearfar bench quality --task mqar char_lm --mechanism cca
  nearfar bench report --out nearfar-bench          # re-render the report from results.json
"""


def nearfar_version() -> str:
    """The package's version (``nearfar.__version__``, the one version source)."""
    import nearfar

    return str(nearfar.__version__)


def _summary(results: dict) -> str:
    """What the command prints at the end: per mechanism and rank its best speed ratio per pattern, the fastest
    per pattern and size, each quality task ranked with intervals, and the head-to-head's ratios."""
    from .compare import compare_lines
    from .summary import summary_lines

    lines = []
    speed = results.get("speed") or {}
    best: dict = {}
    for r in speed.get("rows", []):
        if not r.get("peer"):
            key = (r["mechanism"], r.get("dims") or "1d", r["pattern"])
            best[key] = max(best.get(key, 0.0), r["ratio"])
    if best:
        lines += ["", f"{'mechanism':<20} {'rank':<5} {'pattern':<8} {'best speed vs dense':>20}"]
        lines += [f"{m:<20} {d:<5} {p:<8} {v:>19.2f}x" for (m, d, p), v in sorted(best.items())]
    lines += summary_lines(results)
    if results.get("compare"):
        lines += compare_lines(results["compare"])
    return "\n".join(lines)


def _run(args: argparse.Namespace, out: Path, argv: list[str] | None) -> tuple[dict, dict[str, Path]]:
    if args.what == "report":
        from .files import load_results
        from .report import write_report

        source = out / "results.json"
        if not source.exists():
            raise BenchFileError(f"no {source}: run `nearfar bench` first (or give --out)")
        results = load_results(source)
        return results, write_report(results, out)
    from .run import run_bench

    command = "nearfar " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = run_bench(args.what, args.mechanism, not args.full, args.seed, out, args.rounds, args.task,
                        command=command, resume=args.resume, jobs=args.jobs, lrs=args.lr_sweep,
                        force_resume=args.force_resume, sizes=args.sizes, compare=args.compare)
    return results, {k: Path(v) for k, v in results["paths"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearfar", description="nearfar: near/far attention mechanisms")
    parser.add_argument("--version", action="version", version=f"nearfar {nearfar_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="speed and quality of every registered mechanism, with a report",
                           description="Speed (against fused dense SDPA) and quality (small models trained from "
                                       "scratch) of the registered mechanisms; the report opens with a summary.",
                           epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("what", nargs="?", default="all", choices=("all", "speed", "quality", "report", "patterns"),
                       help="what to run (default: all = speed + quality + report)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="under 10 minutes on 2 cores (the default)")
    size.add_argument("--full", action="store_true", help="the full suite: every task, mechanism and size")
    bench.add_argument("--mechanism", nargs="*", help="registry names or families (default: all)")
    bench.add_argument("--task", nargs="*", help="quality tasks (default: the size's set)")
    bench.add_argument("--device", default="cpu", help="torch device (default cpu)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--rounds", type=int, default=None,
                       help="interleaved timing rounds (default 3 with --quick, 5 with --full or --compare)")
    bench.add_argument("--sizes", nargs="+", metavar="SIZE",
                       help="the sizes to time instead of the preset's: sequence lengths (integers in [16, 131072]) "
                            "and image sizes HxW (sides in [4, 512]), e.g. --sizes 256 1024 14x14; a rank not "
                            "given keeps the preset's sizes (quick: 512 2048 and 14x14 42x42)")
    bench.add_argument("--compare", nargs="+", metavar="NAME",
                       help="head-to-head: time only these mechanisms (two or more registry names) on the same "
                            "inputs in the same interleaved rounds as dense SDPA, in every CAB pattern and rank they "
                            "share, and report the ratio of each pair and against dense, with the verdict 'not "
                            "separable here' when the rounds disagree (speed only)")
    bench.add_argument("--out", default="nearfar-bench", help="output directory (default ./nearfar-bench)")
    bench.add_argument("--resume", action="store_true",
                       help="keep the results already in --out and run only what is missing; refuses a run made "
                            "with other settings (size, --seed, --rounds, --lr-sweep, --device)")
    bench.add_argument("--force-resume", action="store_true",
                       help="--resume even if --out holds a run made with other settings: its rows are kept as "
                            "they are, mixed with the new ones (the report says so)")
    bench.add_argument("--lr-sweep", type=float, nargs="+", default=None, metavar="LR",
                       help="train each quality run at every LR given and keep the best on a validation split "
                            "(e.g. --lr-sweep 1e-3 3e-3; default: one tuned LR per task)")
    bench.add_argument("--jobs", type=int, default=1,
                       help="quality trainings at once, in worker processes sharing the threads (default 1)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.lr_sweep and not all(0 < v < 1 for v in args.lr_sweep):
        parser.error(f"--lr-sweep values must be in (0, 1), got {args.lr_sweep}")
    if args.sizes is not None:
        if args.what not in ("all", "speed"):
            parser.error(f"--sizes sets the speed suite's sizes: use it with `nearfar bench`, `nearfar bench speed` "
                         f"or --compare, not `{args.what}`")
        from .shape import parse_sizes

        try:
            args.sizes = parse_sizes(args.sizes)
        except ValueError as err:
            parser.error(str(err))
    if args.compare is not None:
        clash = [flag for flag, given in (("--mechanism", args.mechanism), ("--task", args.task),
                                          ("--resume", args.resume), ("--force-resume", args.force_resume),
                                          ("--lr-sweep", args.lr_sweep)) if given]
        if args.what not in ("all", "speed") or clash:
            parser.error(f"--compare is a speed head-to-head of the mechanisms it names: it cannot go with "
                         f"{', '.join(clash) or '`' + args.what + '`'}")
        from .compare import compare_plan

        try:
            compare_plan(args.compare)
        except ValueError as err:
            parser.error(str(err))
    if args.what == "patterns":
        from .timing import sweep

        sweep(quick=not args.full, rounds=args.rounds or 3)
        return 0
    import torch

    from ..layers.registry import FAMILIES, mechanisms
    from .tasks import TASK_NAMES

    known = {m.name for m in mechanisms()} | set(FAMILIES)
    bad = [n for n in args.mechanism or [] if n not in known]
    if bad:
        parser.error(f"--mechanism: unknown {bad}; registry names or families: {sorted(known)}")
    if any(t not in TASK_NAMES for t in args.task or []):
        parser.error(f"--task must be among {TASK_NAMES}, got {args.task}")
    if args.device != "cpu":
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            parser.error(f"--device {args.device!r} is not available here (cpu, or cuda with a GPU build of torch)")
        if args.jobs > 1:
            parser.error("--jobs > 1 trains in CPU worker processes; use --jobs 1 with --device cuda")
        torch.set_default_device(args.device)
    out = Path(args.out)
    try:
        results, paths = _run(args, out, argv)
    except BenchFileError as err:  # a bad --out or results file, a refused --resume: the message says it all
        bench.exit(2, f"nearfar bench: error: {err}\n")
    except OSError as err:
        if err.filename is None:
            raise
        bench.exit(1, f"nearfar bench: error: {err.filename}: {err.strerror}\n")
    print(_summary(results))
    print(f"\nreport: {paths['md']} and {paths['html']} (data: {paths['json']})")
    return 130 if results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
