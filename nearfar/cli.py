"""``nearfar`` command line: ``nearfar bench [--full] [--rounds R]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nearfar", description="nearfar: near/far attention patterns")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="correctness + speed sweep of the example patterns (prints a table)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, about a minute (the default)")
    size.add_argument("--full", action="store_true", help="N = 9k-16k tokens, several minutes")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import sweep

        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        sweep(quick=not args.full, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
