"""Attention-based multiple-instance learning on bags of digits, with ACMIL's branches and top-k instance masking.

Offline, CPU, ~1 minute. A bag holds 8-16 of sklearn's 8 x 8 digits; its label is 1 iff a "7" is in it (1-3 of
them), and training sees only bag labels. The instances are embedded by a small MLP and pooled by gated attention
(Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018, arXiv 1802.04712):
``a = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``. That score is the dot product of a learned query ``w`` with
a gated key ``tanh(V h_i) * sigmoid(U h_i)``, so the pooling is one ``nf.attend`` call (scale 1): the ``M``
branches' queries are ``M`` query heads over one shared key/value head (the instances). ``register_site_rule``
makes the pooling module a steering site, and ``Capture(("probs",), rows=[0])`` reads every branch's attention
over the instances from it at test time.

ACMIL (Zhang, Li, Sun, Zheng, Zhu and Yang, "Attention-Challenging Multiple Instance Learning for Whole Slide
Image Classification", ECCV 2024, arXiv 2311.07125; code ``dazhangyu123/ACMIL``: ``ACMIL_GA`` in
``architecture/transformer.py``, the loss in ``Step3_WSI_classification_ACMIL.py``): MBA, ``M`` branches that
share ``V`` and ``U``, each with its own ``w`` and classifier; the bag classifier reads the pooling by the
branches' mean attention (here the mean of the branch outputs, the same thing); the loss adds the branch losses and
the branches' mean pairwise cosine similarity of attention. STKIM: in training, a random ``int(k p)`` of each
branch's top-``k`` instances are hidden (``topk_tokens(scores, k, random_drop=p).dropped``; -inf where ACMIL
uses -1e9). What differs: no dropout, binary labels on a 2-way softmax, a tiny MLP trained with the pooling instead
of frozen features, ``k = 2`` and ``p = 0.5`` for bags this small (the official script passes ``n_token`` as
``n_masked_patch``), and few training bags (the overfitting regime ACMIL targets).

Measured on 1000 test bags, mean (std) over seeds: bag accuracy, AUC, true-positive and true-negative rates;
localisation (share of positive bags whose most-attended instance is a 7, by the mean attention and per branch),
attention mass on the 7s, each branch's top-1 attention (concentration), and branch diversity (``map_overlap`` and
cosine similarity between branches' attention). Run ``OMP_NUM_THREADS=1 python examples/mil_bags.py``.

In the run below STKIM costs bag accuracy (-0.08 to -0.09), mostly by false positives on negative bags: trained to
call a bag positive while its most-attended 7 is hidden, the classifier learns to accept weaker evidence; its AUC
drops less (-0.015). Localisation stays high with one branch and is partly restored with four (without masking,
the diversity loss spreads MBA's branches over other instances: 0.54 of their top instances are 7s), but with
masking the four branches attend alike (cosine 0.81 against 0.24) and each more sharply: not the lower attention
concentration ACMIL reports on slides, where a positive bag has many positive instances, not 1-3.

Output of one run (seed 0, OMP_NUM_THREADS=1, on a shared 2-core CPU):

    64 training bags, 1000 test bags of 8-16 digits (1-3 sevens in a positive bag); a 7 is 0.086 of the test instances
    positive training bags with a single 7 (STKIM hides it from a branch half the time): 0.438
    ABMIL: 1 branch; MBA: 4 branches (+ diversity loss); STKIM: k=2, p=0.5; ACMIL: MBA + STKIM.
    attention captured from the pooling site vs softmax of the scores: max abs difference 2.6e-06
    test metrics, mean (std) over 10 seeds; 64 s in all
                                                    ABMIL    ABMIL+STKIM            MBA          ACMIL
    bag accuracy                            0.914 (0.023)  0.825 (0.050)  0.903 (0.027)  0.823 (0.044)
    bag AUC                                 0.974 (0.014)  0.957 (0.004)  0.962 (0.015)  0.949 (0.017)
    true-positive rate (positive bags)      0.978 (0.014)  0.979 (0.005)  0.952 (0.022)  0.972 (0.020)
    true-negative rate (negative bags)      0.850 (0.036)  0.671 (0.104)  0.854 (0.046)  0.673 (0.100)
    top instance is a 7 (mean attention)    0.968 (0.025)  0.952 (0.007)  0.839 (0.132)  0.901 (0.086)
    top instance is a 7 (per branch)        0.968 (0.025)  0.952 (0.007)  0.543 (0.084)  0.891 (0.100)
    attention mass on the 7s                0.945 (0.029)  0.926 (0.006)  0.524 (0.066)  0.863 (0.114)
    top-1 attention per branch              0.502 (0.022)  0.562 (0.021)  0.582 (0.049)  0.647 (0.062)
    branch overlap (map_overlap, max 0.5)               -              -  0.106 (0.041)  0.377 (0.055)
    branch cosine similarity                            -              -  0.237 (0.093)  0.813 (0.088)
    STKIM's effect on the means (1 branch / 4 branches):
        bag accuracy -0.089 / -0.080; bag AUC -0.017 / -0.014; true-negative rate -0.179 / -0.181
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import nearfar as nf
from nearfar import steer

MAX_BAG, DIM, GATE = 16, 64, 32


class GatedPool(nn.Module):
    """Gated attention pooling with ``branches`` learned queries, through ``nf.attend``."""

    def __init__(self, branches: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = branches, 1
        self.v, self.u = nn.Linear(DIM, GATE), nn.Linear(DIM, GATE)
        self.w = nn.Parameter(0.1 * torch.randn(1, branches, 1, GATE))

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))[:, None]  # (B, 1, N, GATE)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return (self.keys(h) * self.w).sum(-1)  # (B, M, N), the pre-softmax attention

    def forward(self, h: torch.Tensor, valid: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``h (B, N, DIM)``, ``valid (B, N)``; ``drop (B, M, N)``: instances hidden from each branch (STKIM).
        Returns the branches' pooled features ``(B, M, DIM)``."""
        q = self.w.expand(h.shape[0], -1, -1, -1)
        bias = None if drop is None else torch.zeros(drop.shape).masked_fill(drop, float("-inf"))[:, :, None]
        return nf.attend(q, self.keys(h), h[:, None], scale=1.0, bias=bias, key_padding_mask=valid)[:, :, 0]


steer.register_site_rule(lambda m: ("cross", m.num_heads, 1) if isinstance(m, GatedPool) else None)


class MIL(nn.Module):
    def __init__(self, branches: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, DIM), nn.ReLU(), nn.Linear(DIM, DIM), nn.ReLU())
        self.pool = GatedPool(branches)
        self.branch_heads = nn.ModuleList(nn.Linear(DIM, 2) for _ in range(branches))
        self.bag_head = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, k: int = 0, p: float = 0.0,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bag logits ``(B, 2)``, branch logits ``(B, M, 2)`` and scores ``(B, M, N)`` (-inf where masked)."""
        h = self.embed(x)
        s = self.pool.scores(h).masked_fill(~valid[:, None], float("-inf"))
        drop = steer.topk_tokens(s, k, among=valid[:, None], random_drop=p, generator=gen).dropped if k else None
        z = self.pool(h, valid, drop)  # (B, M, DIM)
        branch = torch.stack([head(z[:, i]) for i, head in enumerate(self.branch_heads)], 1)
        s = s if drop is None else s.masked_fill(drop, float("-inf"))
        return self.bag_head(z.mean(1)), branch, s  # mean of the branch outputs = pooling by the mean attention


def make_bags(imgs: torch.Tensor, digits: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` bags, half positive: ``(x (n, 16, 64), valid (n, 16), is7 (n, 16), label (n,))``."""
    sevens, others = (digits == 7).nonzero()[:, 0], (digits != 7).nonzero()[:, 0]
    x, valid = torch.zeros(n, MAX_BAG, 64), torch.zeros(n, MAX_BAG, dtype=torch.bool)
    is7 = torch.zeros(n, MAX_BAG, dtype=torch.bool)
    label = torch.arange(n) % 2
    for b in range(n):
        size = int(torch.randint(8, MAX_BAG + 1, (1,), generator=gen))
        n7 = int(torch.randint(1, 4, (1,), generator=gen)) if label[b] else 0
        idx = torch.cat([sevens[torch.randint(0, len(sevens), (n7,), generator=gen)],
                         others[torch.randint(0, len(others), (size - n7,), generator=gen)]])
        idx = idx[torch.randperm(size, generator=gen)]
        x[b, :size], valid[b, :size], is7[b, :size] = imgs[idx].flatten(1), True, digits[idx] == 7
    return x, valid, is7, label


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a positive bag scores above a negative one (ties count half)."""
    pos, neg = score[label == 1], score[label == 0]
    return float(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean())


def run(branches: int, k: int, p: float, seed: int, train: tuple, test: tuple,
        epochs: int) -> tuple[dict[str, float], float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = MIL(branches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, valid, _, label = train
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(16):
            bag, branch, s = model(x[batch], valid[batch], k, p, gen)
            loss = F.cross_entropy(bag, label[batch])
            if branches > 1:  # ACMIL: the branch losses and the branches' attention similarity
                loss = loss + F.cross_entropy(branch.flatten(0, 1), label[batch].repeat_interleave(branches))
                a = s.softmax(-1)
                pairs = list(itertools.combinations(range(branches), 2))
                loss = loss + sum(F.cosine_similarity(a[:, i], a[:, j], dim=-1).mean() for i, j in pairs) / len(pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, valid, is7, label = test
    with torch.no_grad(), steer.control(model, [(None, steer.Capture(("probs",), rows=[0]))]) as ctl:
        bag, _, s = model(x, valid)
    a = ctl.records["pool"][0]["probs"][:, :, 0]  # (B, M, 16): each branch's attention over the instances
    pos = label == 1
    capture_err = float((a - s.softmax(-1)).abs().max())  # the captured rows against the softmax of the scores
    mean_a = a.mean(1)
    out = {"bag accuracy": float((bag.argmax(-1) == label).float().mean()),
           "bag AUC": auc(bag.softmax(-1)[:, 1], label),
           "true-positive rate (positive bags)": float((bag.argmax(-1)[pos] == 1).float().mean()),
           "true-negative rate (negative bags)": float((bag.argmax(-1)[~pos] == 0).float().mean()),
           "top instance is a 7 (mean attention)": float(is7[pos].gather(1, mean_a[pos].argmax(-1, keepdim=True))
                                                         .float().mean()),
           "top instance is a 7 (per branch)": float(is7[pos][:, None].expand(-1, branches, -1)
                                                     .gather(2, a[pos].argmax(-1, keepdim=True)).float().mean()),
           "attention mass on the 7s": float((mean_a[pos] * is7[pos]).sum(-1).mean()),
           "top-1 attention per branch": float(a.amax(-1).mean())}
    if branches > 1:
        pairs = list(itertools.combinations(range(branches), 2))
        out["branch overlap (map_overlap, max 0.5)"] = float(torch.stack(
            [steer.map_overlap(a[:, i], a[:, j], dims=1) for i, j in pairs]).mean())
        out["branch cosine similarity"] = float(torch.stack(
            [F.cosine_similarity(a[:, i], a[:, j], dim=-1) for i, j in pairs]).mean())
    return out, capture_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-bags", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = load_digits()
    imgs, digits = torch.tensor(data.images).float() / 16, torch.tensor(data.target)
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(args.seed))
    tr, te = perm[:1000], perm[1000:]
    gen = torch.Generator().manual_seed(args.seed)
    train = make_bags(imgs[tr], digits[tr], args.train_bags, gen)
    test = make_bags(imgs[te], digits[te], 1000, gen)
    single = float((train[2].sum(1) == 1)[train[3] == 1].float().mean())
    print(f"{args.train_bags} training bags, {len(test[0])} test bags of 8-16 digits (1-3 sevens in a positive bag); "
          f"a 7 is {float(test[2][test[1]].float().mean()):.3f} of the test instances\npositive training bags "
          f"with a single 7 (STKIM hides it from a branch half the time): {single:.3f}")
    configs = [("ABMIL", 1, 0, 0.0), ("ABMIL+STKIM", 1, 2, 0.5), ("MBA", 4, 0, 0.0), ("ACMIL", 4, 2, 0.5)]
    results, err = {}, 0.0
    for name, m, k, p in configs:
        runs = [run(m, k, p, args.seed + s, train, test, args.epochs) for s in range(args.seeds)]
        results[name] = {key: torch.tensor([r[key] for r, _ in runs]) for key in runs[0][0]}
        err = max([err, *(e for _, e in runs)])
    print(f"ABMIL: 1 branch; MBA: 4 branches (+ diversity loss); STKIM: k=2, p=0.5; ACMIL: MBA + STKIM.\n"
          f"attention captured from the pooling site vs softmax of the scores: max abs difference {err:.1e}\n"
          f"test metrics, mean (std) over {args.seeds} seeds; {time.perf_counter() - t0:.0f} s in all")
    print(f"{'':38s}" + "".join(f"{name:>15s}" for name, *_ in configs))
    for key in results["ACMIL"]:
        cells = [f"{float(v[key].mean()):.3f} ({float(v[key].std()):.3f})" if key in v else "-"
                 for v in results.values()]
        print(f"{key:38s}" + "".join(f"{c:>15s}" for c in cells))
    effect = [f"{key.split(' (')[0]} " + " / ".join(f"{float(results[w][key].mean() - results[wo][key].mean()):+.3f}"
                                                   for wo, w in (("ABMIL", "ABMIL+STKIM"), ("MBA", "ACMIL")))
              for key in ("bag accuracy", "bag AUC", "true-negative rate (negative bags)")]
    print(f"STKIM's effect on the means (1 branch / 4 branches):\n    {'; '.join(effect)}")


if __name__ == "__main__":
    main()
