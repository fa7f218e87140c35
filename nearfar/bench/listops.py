"""ListOps-lite expressions for the "listops" task (``tasks.py``): LRA's MIN / MAX / MED / SM (sum mod 10) prefix
expressions over digits, drawn by LRA's recursive generator with our depth, arity and length bounds."""

from __future__ import annotations

import random

import torch

PAD, CLS, DIGIT0, OP0, CLOSE = 0, 1, 2, 12, 16
LISTOPS_TOKENS = ("<pad>", "<cls>", *"0123456789", "[MIN", "[MAX", "[MED", "[SM", "]")


def _listops_value(op: int, args: list[int]) -> int:
    ordered = sorted(args)
    k = len(ordered)
    return (ordered[0], ordered[-1], (ordered[(k - 1) // 2] + ordered[k // 2]) // 2, sum(args) % 10)[op]


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int, op_prob: float,
                  out: list[int], limit: int) -> int:
    """Append a random prefix expression to ``out`` (LRA's recursive generator, our depth/arity) and return its
    value. The root is always an operator; below ``max_depth`` operator levels only digits are drawn, and so they
    are once ``out`` is past ``limit`` (such a tree is rejected anyway; this only bounds the work)."""
    if depth == 0 or (depth < max_depth and len(out) <= limit and rng.random() < op_prob):
        op = rng.randrange(4)
        out.append(OP0 + op)
        args = [_listops_tree(rng, depth + 1, max_depth, max_args, op_prob, out, limit)
                for _ in range(rng.randint(2, max_args))]
        out.append(CLOSE)
        return _listops_value(op, args)
    digit = rng.randrange(10)
    out.append(DIGIT0 + digit)
    return digit



def listops_batch(rng: random.Random, batch: int, seq_len: int, min_len: int, max_len: int, max_depth: int,
                  max_args: int, op_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rows of ``seq_len`` tokens: CLS, a prefix expression of ``min_len``-``max_len`` tokens, padding;
    the target (the expression's value, 0-9) at position 0 and -100 elsewhere."""
    inputs = torch.full((batch, seq_len), PAD, dtype=torch.long)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    chance = op_prob
    for row in range(batch):
        for _ in range(100_000):  # rejection sampling on the length, as in LRA
            expr: list[int] = []
            value = _listops_tree(rng, 0, max_depth, max_args, chance, expr, max_len)
            if min_len <= len(expr) <= max_len:
                break
            # nudge the operator chance towards the length range, or deep wide trees are rarely accepted
            chance = min(0.95, chance * 1.02) if len(expr) < min_len else max(0.02, chance / 1.02)
        else:
            raise RuntimeError(f"no ListOps tree of length [{min_len}, {max_len}] with op_prob={op_prob}")
        inputs[row, 0] = CLS
        inputs[row, 1 : 1 + len(expr)] = torch.tensor(expr)
        targets[row, 0] = value
    return inputs, targets

