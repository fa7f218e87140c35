"""Find, cut and restore an induction circuit in a tiny transformer with ``nearfar.steer``: offline, CPU, ~2 minutes.

A 2-layer ``nf.TinyLM`` (4 heads per layer) learns to continue a random segment that repeats (``... x_1..x_L
x_1..x_L``, ``L`` random): on the second copy it must predict the token that followed the current one the first
time, the task induction heads solve (Olsson et al., "In-context Learning and Induction Heads", 2022, arXiv
2209.11895). Then, with nothing but the steering API on the trained model:

1. ``Capture(("probs",), rows=...)`` reads exact attention rows from the fused engine (no ``(N, N)`` matrix);
2. ``AblateHeads`` (mean ablation) measures each head's share of the second-copy accuracy: the circuit's heads;
3. ``path_patch`` measures the path from the layer-0 heads to the layer-1 induction head's keys alone (clean
   input vs. the same tokens shifted by one: the path carries "which token came before");
4. ``ForcePattern`` gives the induction head the ideal induction pattern (attend to the token after the previous
   occurrence) while the layer-0 heads are ablated: the accuracy comes back.

Run ``python examples/induction_circuit.py``. It prints each measured effect.
"""

from __future__ import annotations

import argparse
import time

import torch

import nearfar as nf
from nearfar.steer import AblateHeads, Capture, ForcePattern, control, find_sites, path_patch

VOCAB, N, HEADS = 48, 32, 4  # tokens, sequence length, heads per layer


class Batch:
    """Random tokens, then a random segment ``x`` of length ``L`` (6..13, per item) written twice at the end:
    ``r_1..r_a x_1..x_L x_1..x_L``. The varying ``L`` rules out a fixed-offset shortcut: the second copy can only
    be predicted by finding the previous occurrence of the current token and reading what followed it."""

    def __init__(self, n: int, gen: torch.Generator):
        self.length = torch.randint(6, 14, (n,), generator=gen)
        self.tokens = torch.randint(0, VOCAB, (n, N), generator=gen)
        start = N - 2 * self.length  # where the first copy begins
        pos = torch.arange(N)
        first = (pos >= start[:, None]) & (pos < (start + self.length)[:, None])
        for b in range(n):  # the second copy repeats the first
            s, length = int(start[b]), int(self.length[b])
            self.tokens[b, s + length:] = self.tokens[b, s:s + length]
        del first
        # query i of the second copy (except its last) predicts token i + 1; its induction key is i - L + 1
        self.query = (pos[None, :-1] >= (N - self.length)[:, None])  # (n, N - 1)
        self.key = pos[None, :] - self.length[:, None] + 1  # (n, N)

    def accuracy(self, logits: torch.Tensor) -> float:
        hit = logits[:, :-1].argmax(-1) == self.tokens[:, 1:]
        return float(hit[self.query].float().mean())

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), self.tokens[:, 1:], reduction="none")
        return ce[self.query].mean()

    def induction_pattern(self) -> torch.Tensor:
        """The ideal induction head ``(B, 1, N, N)``: a second-copy query attends to the token after the previous
        occurrence of its token; other queries to themselves."""
        pos = torch.arange(N)
        second = pos[None, :] >= (N - self.length)[:, None]
        key = torch.where(second, self.key, pos[None, :])
        return torch.nn.functional.one_hot(key, N).float()[:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=6000, help="train until 0.9 accuracy, at most this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)
    lm = nf.TinyLM(VOCAB, dim=64, depth=2, num_heads=HEADS, mechanism="dense")
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3, weight_decay=0.0)
    t0, check = time.perf_counter(), Batch(128, torch.Generator().manual_seed(99))
    for step in range(1, args.max_steps + 1):
        data = Batch(64, gen)
        loss = data.loss(lm(data.tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:  # induction heads form in a sudden phase change (here after ~2,000-3,000 steps)
            with torch.no_grad():
                if check.accuracy(lm(check.tokens)) >= 0.9:
                    break
    lm.eval()
    test = Batch(256, torch.Generator().manual_seed(1000 + args.seed))
    sites = find_sites(lm)
    with torch.no_grad():
        base = test.accuracy(lm(test.tokens))
    print(f"trained {step} steps in {time.perf_counter() - t0:.0f} s; second-copy accuracy {base:.3f} "
          f"(chance {1 / VOCAB:.3f})")

    # 1. exact attention rows of the last 6 queries (all in the second copy), from the fused call's LSE
    rows = list(range(N - 7, N - 1))
    with torch.no_grad(), control(lm, [(sites[1], Capture(("probs",), rows=rows))]) as run:
        lm(test.tokens)
    probs = run.records[sites[1].name][0]["probs"]  # (B, H, R, N)
    target = test.key[:, rows]  # (B, R)
    on_target = probs.gather(-1, target[:, None, :, None].expand(-1, HEADS, -1, 1))[..., 0].mean((0, 2))
    head1 = int(on_target.argmax())
    print(f"layer-1 attention on 'the token after the previous occurrence', per head: "
          f"{[round(float(x), 3) for x in on_target]} -> induction head {head1}")

    # 2. mean ablation of every head: the accuracy each one carries
    drop = {}
    for site in sites:
        for h in range(HEADS):
            with torch.no_grad(), control(lm, [(site, AblateHeads([h], mode="mean"))]):
                drop[(site.name, h)] = base - test.accuracy(lm(test.tokens))
    print("accuracy lost by mean-ablating each head:")
    for (name, h), d in drop.items():
        print(f"  {name} head {h}: {d:+.3f}")
    head0 = max(range(HEADS), key=lambda h: drop[(sites[0].name, h)])

    # 3. path patching: the layer-0 heads -> the induction head's keys only; the corrupted input shifts the tokens
    # by one, so every "previous token" a layer-0 head reports is wrong
    corrupt = test.tokens.roll(1, dims=1)

    def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    with torch.no_grad():
        patched = path_patch(lm, forward, [(sites[0].name, h) for h in range(HEADS)], [(sites[1].name, head1)],
                             test.tokens, corrupt, metric=test.accuracy, receiver_fields=("k",))
    print(f"path layer-0 heads -> keys of layer-1 head {head1} corrupted (everything else clean): accuracy "
          f"{base:.3f} -> {patched:.3f}")

    # 4. cut the circuit (ablate layer 0's strongest head), then force the induction pattern on the layer-1 head
    cut = [(sites[0], AblateHeads([head0], mode="mean"))]
    force = [(sites[1], ForcePattern(head1, test.induction_pattern()))]
    with torch.no_grad():
        with control(lm, cut):
            cut_acc = test.accuracy(lm(test.tokens))
        with control(lm, cut + force):
            restored = test.accuracy(lm(test.tokens))
    print(f"ablate layer-0 head {head0}: accuracy {cut_acc:.3f}; plus ForcePattern(induction) on layer-1 head "
          f"{head1}: {restored:.3f}")


if __name__ == "__main__":
    main()
