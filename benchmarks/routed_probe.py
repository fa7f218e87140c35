"""Why a routed mechanism misses on ``nearfar bench``'s recall tasks: train it as the bench does, then measure
whether its selection keeps the block that holds the answer (issue 18).

    python benchmarks/routed_probe.py moba --task mqar --size tiny
    python benchmarks/routed_probe.py seer_attention --task passkey --size tiny --distill 1.0
    python benchmarks/routed_probe.py nsa --task passkey --size tiny --steps 900

The model, settings (``nearfar.bench.run.seq_settings``) and training are the bench's (``quality.train``; with
``--distill`` a SeerAttention gate is also trained on ``distill_loss`` of each layer's input, the paper's
self-distillation, added to the task loss with that weight). After training, on 250 held-out items, every
``attend`` call that gets token-level run-time key blocks (``SelectedBlocks`` with one query a row and blocks of
more than one key) is recorded, and for every scored query beyond the local control's window we check whether the
block holding its answer is among the selected ones:

- MQAR: the block of the queried key's value (the token after the key's first occurrence) or of the key itself;
- passkey: the block of the digit the position asks for.

``recall any head``: some head of the layer keeps it; ``recall mean``: the average over heads; ``chance``: the
mean over those queries of (routed blocks kept) / (complete past blocks outside the own block), i.e. what a random
choice of the same number of blocks would keep. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearfar.bench import quality as Q  # noqa: E402
from nearfar.bench import run as R  # noqa: E402
from nearfar.bench.tasks import NEEDLE_HEAD, get_task  # noqa: E402
from nearfar.functional import SelectedBlocks  # noqa: E402

ROUTED_MODULES = ("moba", "nsa", "seer_attention", "hip", "longheads")


def answer_positions(task_name: str, inputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, int, tuple]]:
    """``(item, query position, answer positions)`` of every scored target."""
    out = []
    for b, i in (targets != -100).nonzero().tolist():
        row = inputs[b]
        if task_name == "mqar":
            j = int((row[:i] == row[i]).nonzero()[0])  # the key's first occurrence: the pairs come first
            out.append((b, i, (j, j + 1)))
        else:
            head = len(NEEDLE_HEAD)
            hits = [s for s in range(len(row) - head) if torch.equal(row[s:s + head], NEEDLE_HEAD)]
            hay = int((targets[b] != -100).nonzero()[0])
            out.append((b, i, (hits[0] + head + i - hay,)))
    return out


def record_blocks() -> tuple[list[SelectedBlocks], list]:
    """Patch ``attend`` in the routed layer modules to record their token-level block lists."""
    import importlib

    seen: list[SelectedBlocks] = []
    undo = []
    for name in ROUTED_MODULES:
        mod = importlib.import_module(f"nearfar.layers.{name}")
        orig = mod.attend

        def wrapped(*a, _orig=orig, **kw):
            sel = kw.get("blocks")
            if isinstance(sel, SelectedBlocks) and sel.q_block == 1 and sel.kv_block > 1:
                seen.append(sel)
            return _orig(*a, **kw)

        mod.attend = wrapped
        undo.append((mod, orig))
    return seen, undo


def recall(task_name: str, model: torch.nn.Module, task, window: int, items: int = 250) -> list[dict]:
    gen = torch.Generator().manual_seed(10_000)
    batch = task.sample(items, gen, split="valid")
    from nearfar.layers.routing_transformer import RoutingTransformerAttention

    seen, undo = record_blocks()
    clusters: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: clusters.append(mod.clusters(a[0])))
             for m in model.modules() if isinstance(m, RoutingTransformerAttention)]
    try:
        model.eval()
        with torch.no_grad():
            model(batch.inputs)
    finally:
        for mod, orig in undo:
            mod.attend = orig
        for hook in hooks:
            hook.remove()
    rows = cluster_recall(task_name, batch, clusters, window)
    for layer, sel in enumerate(seen):
        c = sel.kv_block
        num, idx = sel.kv_num_blocks, sel.kv_indices
        anyh, meanh, chance, n = 0.0, 0.0, 0.0, 0
        for b, i, answers in answer_positions(task_name, batch.inputs, batch.targets):
            if i - max(answers) < window:  # within the local control's reach: not a far query
                continue
            want = {a // c for a in answers}
            bb = b if num.shape[0] > 1 else 0
            hits = []
            for h in range(num.shape[1]):
                # LongHeads reads chunk j of copy s as block s * (L / c) + j: the chunk is the index mod L / c
                kept = {x % (task.seq_len // c) for x in idx[bb, h, i, :int(num[bb, h, i])].tolist() if x >= 0}
                hits.append(bool(kept & want))
            past = max(1, i // c)  # complete blocks before the own block
            chance += min(1.0, int(num[bb, :, i].float().mean()) / past)
            anyh, meanh, n = anyh + any(hits), meanh + sum(hits) / len(hits), n + 1
        rows.append({"layer": layer, "kv_block": c, "far_queries": n, "recall_any_head": anyh / max(1, n),
                     "recall_mean_head": meanh / max(1, n), "chance": chance / max(1, n)})
    return rows


def cluster_recall(task_name: str, batch, clusters: list[torch.Tensor], window: int) -> list[dict]:
    """Routing Transformer: does a far query share a cluster with its answer (some routing head)? ``chance``: the
    share of the query's past tokens in its cluster."""
    rows = []
    for layer, cl in enumerate(clusters):  # (B, H_r, N)
        anyh, meanh, chance, n = 0.0, 0.0, 0.0, 0
        for b, i, answers in answer_positions(task_name, batch.inputs, batch.targets):
            if i - max(answers) < window:
                continue
            hits = [any(bool(cl[b, h, a] == cl[b, h, i]) for a in answers) for h in range(cl.shape[1])]
            chance += float((cl[b, :, :i] == cl[b, :, i:i + 1]).float().mean())
            anyh, meanh, n = anyh + any(hits), meanh + sum(hits) / len(hits), n + 1
        rows.append({"layer": layer, "clusters": True, "far_queries": n, "recall_any_head": anyh / max(1, n),
                     "recall_mean_head": meanh / max(1, n), "chance": chance / max(1, n)})
    return rows


def number(v: str) -> int | float | None:
    """A ``--set`` value: an int, a float or None."""
    return None if v == "None" else int(v) if v.lstrip("-").isdigit() else float(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mechanism")
    ap.add_argument("--task", default="mqar", choices=("mqar", "passkey"))
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill", type=float, default=0.0, help="weight of SeerAttention's distill_loss")
    ap.add_argument("--set", nargs="*", default=[], help="extra constructor settings, key=number or key=None")
    args = ap.parse_args()
    task = get_task(args.task, args.size)
    hp = Q.defaults(task, args.size)
    steps, lr = args.steps or hp["steps"], args.lr or hp["lr"]
    factories, _ = R.quality_entries(task, [args.mechanism], quick=False)
    extra = {k: number(v) for k, v in (s.split("=") for s in args.set)}
    factory = factories[args.mechanism]
    if extra:
        from nearfar.layers.registry import mechanisms

        mech = next(m for m in mechanisms() if m.name == args.mechanism)
        kw = R.seq_settings(args.mechanism, hp["window"], task.seq_len) | extra

        def factory(dim, heads):
            return mech.build(dim, heads, task.pattern, **kw)

    torch.manual_seed(args.seed)
    model = Q.build_model(task, factory, hp["dim"], hp["depth"], hp["num_heads"])
    start = time.perf_counter()
    if args.distill:
        train_with_distill(model, task, steps, hp["batch_size"], lr, args.seed, args.distill)
    else:
        Q.train(model, task, steps, hp["batch_size"], lr, args.seed)
    seconds = time.perf_counter() - start
    res = Q.evaluate(model, task, 1000)
    out = {"mechanism": args.mechanism, "task": args.task, "size": args.size, "steps": steps, "lr": lr,
           "distill": args.distill, "set": extra, "seconds": round(seconds), "overall": res["overall"],
           "per_bin": res["per_bin"], "recall": recall(args.task, model, task, hp["window"])}
    print(json.dumps(out))


def train_with_distill(model, task, steps: int, batch_size: int, lr: float, seed: int, weight: float) -> None:
    """``quality.train``'s loop plus ``weight`` x the sum of every SeerAttention layer's ``distill_loss``."""
    from nearfar.layers.seer_attention import SeerAttention

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    seers = [m for m in model.modules() if isinstance(m, SeerAttention)]
    inputs: dict[int, torch.Tensor] = {}
    for k, m in enumerate(seers):
        m.register_forward_pre_hook(lambda mod, a, k=k: inputs.__setitem__(k, a[0]))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    for _ in range(steps):
        batch = task.sample(batch_size, gen, split="train")
        mask = batch.targets != -100
        logits = model.head(model.features(batch.inputs)[mask])
        loss = F.cross_entropy(logits, batch.targets[mask])
        loss = loss + weight * sum(m.distill_loss(inputs[k].detach()) for k, m in enumerate(seers))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


if __name__ == "__main__":
    main()
