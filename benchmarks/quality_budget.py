"""Does every quality run of ``nearfar bench --full`` fit the suite's budget of 10 minutes on 2 cores?

For every full-size task and every mechanism its table holds (controls included), time a few training steps of
the task's model on this machine, alone, and project one run: steps x median step time + one evaluation.

    python benchmarks/quality_budget.py                       # every --full task, 5 timed steps each
    python benchmarks/quality_budget.py --task mqar --steps 10

Markdown to stdout. The projection leaves out start-up (seconds) and assumes the machine stays as quiet as during
the timed steps; ``nearfar bench`` records the real training time of each run (``seconds`` in results.json).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nearfar.bench import quality as Q
from nearfar.bench.run import FULL_TASKS, quality_entries
from nearfar.bench.tasks import get_task

BUDGET_S = 600.0


def step_seconds(task, factory, hp: dict, steps: int) -> float:
    """Median wall time of one training step after one warm-up step."""
    torch.manual_seed(0)
    model = Q.build_model(task, factory, hp["dim"], hp["depth"], hp["num_heads"])
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(done: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if done > 1:
            times.append(now - last[0])
        last[0] = now

    Q.train(model, task, steps + 1, hp["batch_size"], hp["lr"], 0, progress=tick)
    return statistics.median(times)


def eval_seconds(task, factory, hp: dict) -> float:
    torch.manual_seed(0)
    model = Q.build_model(task, factory, hp["dim"], hp["depth"], hp["num_heads"])
    start = time.perf_counter()
    Q.evaluate(model, task, 1000)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="*", default=list(FULL_TASKS))
    parser.add_argument("--mechanism", nargs="*", help="registry names (default: every one a task takes)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per mechanism")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; budget {BUDGET_S:.0f} s a run\n")
    print("| task | steps x batch | mechanism | ms / step | eval s | projected run s | within budget |")
    print("|---|---|---|---:|---:|---:|---|")
    over = []
    for name in args.task:
        task = get_task(name, "full")
        hp = Q.defaults(task)
        factories, _ = quality_entries(task, args.mechanism, quick=False)
        evaluation = eval_seconds(task, factories["full"], hp)  # about the same for every mechanism
        for mech, factory in factories.items():
            try:
                step = step_seconds(task, factory, hp, args.steps)
            except (ValueError, RuntimeError) as err:  # e.g. an image size a window design cannot take
                print(f"| {name} | {hp['steps']} x {hp['batch_size']} | {mech} | - | - | - | not run: "
                      f"{str(err)[:80]} |", flush=True)
                continue
            run = step * hp["steps"] + evaluation
            ok = run <= BUDGET_S
            if not ok:
                over.append(f"{name}/{mech}")
            print(f"| {name} | {hp['steps']} x {hp['batch_size']} | {mech} | {step * 1e3:.0f} | {evaluation:.0f} | "
                  f"{run:.0f} | {'yes' if ok else '**no**'} |", flush=True)
    print(f"\nover budget: {', '.join(over) if over else 'none'}")


if __name__ == "__main__":
    main()
