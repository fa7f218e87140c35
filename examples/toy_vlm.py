"""A toy vision-language model on sklearn's digits, and what three attention-steering methods do to its answers.

Offline, CPU, ~2 minutes. 16 image tokens (the 8 x 8 digit cut into 2 x 2 patches, each embedded linearly, plus a
learned position embedding) are followed by a 3-token question; a 4-layer causal decoder of ``nf.DenseAttention``
blocks (pre-norm, MLP) answers from the last position. Questions: "which digit?", "is quadrant r darker than
usual?" (ink above the training median), "is patch p inked?" (a middle-column patch, mean ink > 0.5). On held-out
images, with ``nearfar.steer``: the image tokens masked for the question rows (``KeyMask``) or a blank image, to
show that the answers use the image; then

- (a) VAR (Kang, Kim, Kim and Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal Models",
  ICLR 2025, arXiv 2503.03321): visual sinks by massive hidden dimensions (``massive_dims``, ``sink_tokens``) or by
  the attention they receive (captured rows), image-centric heads by their mass on the image (``group_mass``), then
  ``Redistribute`` from the sinks to the other image tokens in those heads at layers 1-3, keeping ``keep``;
- (b) VHR-style head reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
  Divergence", ACL 2025, arXiv 2412.13949): ``run_branches`` (image, blank image), ``Capture(("head_out",))``,
  ``head_divergence`` per head at the answer position (VHD), ``ScaleHeads`` (> 1) on the 4 heads of highest VHD;
- (c) VCD-style contrastive decoding (Leng et al., "Mitigating Object Hallucinations in Large Vision-Language
  Models through Visual Contrastive Decoding", CVPR 2024, arXiv 2311.16922): ``combine_logits`` of the image branch
  against a no-image branch (blank image, or image tokens masked; VCD itself distorts the image with noise).

What differs from the papers: the model is tiny and trained here, so its sinks, heads and priors are its own; heads
and sink dimensions are chosen once, on training images. Every effect is printed, small or negative: in the run
below no method beats the unsteered model by more than noise. The model grows no massive activations, the image
tokens that draw the most attention are inked (informative) patches, not background sinks, and up-weighting heads
or contrasting with a no-image branch costs accuracy, the more the stronger. Run ``python examples/toy_vlm.py``.

Output of one run (seed 0, OMP_NUM_THREADS=1, on a shared 2-core CPU):

    trained 1500 steps in 69 s
    (a) image tokens entering layers 1-3: largest |x| / rms(x) 3.93 (<= 8 at D = 64), top dims [23, 35];
        share of sinks by VAR's rule (tau = 20): 0.000
        image-centric heads (question rows' mass on the image >= 0.6), layers 1-3: [[1, 2, 3], [3], [0, 2]]; masses:
        [[0.69, 0.9, 0.99, 0.79], [0.6, 0.72, 0.83, 0.87], [0.5, 0.54, 0.42, 0.66], [0.87, 0.29, 0.77, 0.58]]
        sinks by attention received: 0.85 per image, holding 0.136 of the image mass;
        mean ink of a sink patch 0.584, of the other patches 0.290
    (b) top-4 heads (layer, head) by VHD: [(1, 0), (3, 2), (3, 1), (1, 2)]; VHD per head (rows: layers):
        [[0.7, 5.0, 6.8, 2.5], [9.0, 5.7, 7.0, 4.5], [3.5, 4.0, 5.3, 4.4], [5.3, 7.1, 8.6, 4.3]]
    (c) answers left by the plausibility cut (beta = 0.1), mean per question: 1.121

    accuracy on the held-out questions                 mean   digit    quad   patch
    no steering                                      0.9601  0.9759  0.9522  0.9522
    image masked for the question (KeyMask)          0.4015  0.0865  0.4975  0.6205
    blank image                                      0.3172  0.0805  0.5025  0.3687
    (a) sinks masked (KeyMask)                       0.9382  0.9537  0.9256  0.9354
    (a) VAR: Redistribute sinks -> image, keep=0.8   0.9604  0.9759  0.9527  0.9527
    (a) VAR: Redistribute sinks -> image, keep=0.5   0.9611  0.9759  0.9537  0.9537
    (a) VAR: Redistribute sinks -> image, keep=0.0   0.9531  0.9577  0.9527  0.9489
    (b) VHR: ScaleHeads x1.25, top-4 VHD heads       0.9599  0.9779  0.9517  0.9502
    (b) VHR: ScaleHeads x1.5, top-4 VHD heads        0.9572  0.9779  0.9482  0.9454
    (b) VHR: ScaleHeads x2.0, top-4 VHD heads        0.9425  0.9658  0.9432  0.9185
    (c) VCD vs blank image, alpha=0.25               0.9568  0.9779  0.9462  0.9464
    (c) VCD vs blank image, alpha=0.5                0.9479  0.9779  0.9336  0.9321
    (c) VCD vs blank image, alpha=1.0                0.9472  0.9759  0.9336  0.9321
    (c) VCD vs image masked, alpha=0.25              0.9568  0.9799  0.9477  0.9429
    (c) VCD vs image masked, alpha=0.5               0.9525  0.9839  0.9371  0.9364
    (c) VCD vs image masked, alpha=1.0               0.9477  0.9738  0.9371  0.9321
    questions per type [497, 1988, 3976]; unsteered accuracy's standard error [0.0069, 0.0048, 0.0034], mean's 0.0030
    best steered setting: (a) VAR: Redistribute sinks -> image, keep=0.5 (+0.0010 mean accuracy)
    worst steered setting: (b) VHR: ScaleHeads x2.0, top-4 VHD heads (-0.0176); total 114 s
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import nearfar as nf
from nearfar import steer

IMG, QLEN, DIM, DEPTH, HEADS = 16, 3, 64, 4, 4
N, TEXT = IMG + QLEN, slice(IMG, IMG + QLEN)  # sequence length; the question rows
WHICH, DIGIT, DARK, INK, QUAD, PATCH, ASK = 0, 1, 2, 3, 4, 8, 24  # question tokens (QUAD + r, PATCH + p)
NO = 10  # answers: 0..9 the digit, 10 no, 11 yes
MIDDLE = [p for p in range(16) if p % 4 in (1, 2)]  # the patches of the two middle columns


def questions(img: torch.Tensor, digit: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor,
              median: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, 64 + 3)`` (pixels in [0, 1], then the question's token ids) and answers ``(B,)``."""
    dark = img.view(-1, 2, 4, 2, 4).mean((2, 4)).flatten(1) > median  # (B, 4) quadrant ink above the median
    inked = F.unfold(img[:, None], 2, stride=2).mean(1) > 0.5  # (B, 16)
    q = torch.stack([torch.tensor([WHICH, DARK, INK])[kind],
                     torch.where(kind == 0, DIGIT, torch.where(kind == 1, QUAD + arg % 4, PATCH + arg)),
                     torch.full_like(kind, ASK)], 1)
    yes = torch.where(kind[:, None] == 1, dark.gather(1, arg[:, None] % 4), inked.gather(1, arg[:, None]))[:, 0]
    return torch.cat([img.flatten(1), q.float()], 1), torch.where(kind == 0, digit, NO + yes.long())


class ToyVLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.tok = nn.Linear(4, DIM), nn.Embedding(ASK + 1, DIM)
        self.pos = nn.Parameter(0.02 * torch.randn(1, N, DIM))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(2 * DEPTH + 1))
        self.attn = nn.ModuleList(nf.DenseAttention(DIM, HEADS, causal=True) for _ in range(DEPTH))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
                                 for _ in range(DEPTH))
        self.head = nn.Linear(DIM, 12)
        self.hidden: list[torch.Tensor] = []  # each block's input, from the last call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x[:, :64].view(-1, 1, 8, 8), 2, stride=2).transpose(1, 2)  # (B, 16, 4)
        h = torch.cat([self.embed(patches), self.tok(x[:, 64:].long())], 1) + self.pos
        self.hidden = []
        for i in range(DEPTH):
            self.hidden.append(h.detach())
            h = h + self.attn[i](self.norms[2 * i](h))
            h = h + self.mlp[i](self.norms[2 * i + 1](h))
        return self.head(self.norms[-1](h[:, -1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_digits()
    imgs, digits = torch.tensor(data.images).float() / 16, torch.tensor(data.target)
    perm = torch.randperm(len(imgs), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1300], perm[1300:]
    median = imgs[tr].view(-1, 2, 4, 2, 4).mean((2, 4)).flatten(1).median(0).values

    def sample(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = tr[torch.randint(0, len(tr), (b,), generator=gen)]
        kind = torch.randint(0, 3, (b,), generator=gen)
        arg = torch.tensor(MIDDLE)[torch.randint(0, 8, (b,), generator=gen)]
        arg = torch.where(kind == 1, torch.randint(0, 4, (b,), generator=gen), arg)
        return questions(imgs[idx], digits[idx], kind, arg, median)

    model = ToyVLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.steps, pct_start=0.1)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = sample(64)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s")

    # the test set: all 13 questions (1 digit, 4 quadrants, 8 patches) about every held-out image
    n, kinds = len(te), torch.tensor([0] + [1] * 4 + [2] * 8)
    kind = kinds.repeat(n)
    x, y = questions(imgs[te].repeat_interleave(13, 0), digits[te].repeat_interleave(13, 0), kind,
                     torch.tensor([0, 0, 1, 2, 3] + MIDDLE).repeat(n), median)
    blank = torch.cat([torch.zeros(len(x), 64), x[:, 64:]], 1)
    sites = steer.find_sites(model)

    def score(logits: torch.Tensor) -> list[float]:
        accs = [float((logits.argmax(-1) == y)[kind == k].float().mean()) for k in range(3)]
        return [sum(accs) / 3, *accs]

    rows: list[tuple[str, list[float]]] = []
    with torch.no_grad():
        base = model(x)
        rows.append(("no steering", score(base)))
        with steer.control(model, [(None, steer.KeyMask(slice(0, IMG), rows=TEXT))]):
            masked = model(x)
        rows.append(("image masked for the question (KeyMask)", score(masked)))
        rows.append(("blank image", score(model(blank))))

    # (a) VAR. Calibration on 1024 training questions: q, k, LSE and pattern of every layer, hidden states
    xc, _ = sample(1024)
    with torch.no_grad(), steer.control(model, [(None, steer.Capture(("q", "k", "lse", "pattern")))]) as run:
        model(xc)
    hid = torch.cat([h[:, :IMG] for h in model.hidden[1:]])  # image tokens entering layers 1-3
    dims = steer.massive_dims(hid, 2)
    top_val = float((hid * torch.rsqrt(hid.pow(2).mean(-1, keepdim=True) + 1e-6)).abs().amax())
    print(f"(a) image tokens entering layers 1-3: largest |x| / rms(x) {top_val:.2f} (<= 8 at D = 64), top dims "
          f"{dims.tolist()};\n    share of sinks by VAR's rule (tau = 20): "
          f"{float(steer.sink_tokens(hid, dims=dims).float().mean()):.3f}")
    mass = torch.stack([steer.group_mass(r["q"], r["k"], None, r["lse"], {"image": slice(0, IMG)}, r["pattern"])
                        [:, :, TEXT, 0].mean((0, 2)) for r in (run.records[s.name][0] for s in sites)])
    centric = [[h for h in range(HEADS) if mass[i, h] >= 0.6] for i in range(DEPTH)]
    print(f"    image-centric heads (question rows' mass on the image >= 0.6), layers 1-3: {centric[1:]}; masses:"
          f"\n    {[[round(float(v), 2) for v in r] for r in mass]}")
    # no massive activations, so sinks by attention received, question-independent as VAR's sinks are: the image
    # tokens with more than twice their share of the image mass (question rows, all heads of layers 1-3), averaged
    # over the 13 questions about the image
    capture = steer.Capture(("probs",), rows=TEXT, reduce="mean_heads")
    with torch.no_grad(), steer.control(model, [(s, capture) for s in sites[1:]]) as run:
        model(x)
    got = torch.stack([run.records[s.name][0]["probs"].mean(1)[:, :IMG] for s in sites[1:]]).mean(0)
    share = (got / got.sum(-1, keepdim=True)).view(n, 13, IMG).mean(1)  # (images, 16)
    image = (torch.arange(N) < IMG).expand(len(x), N)
    sinks = torch.cat([(share > 2 / IMG).repeat_interleave(13, 0), torch.zeros(len(x), QLEN, dtype=torch.bool)], 1)
    ink = F.unfold(imgs[te][:, None], 2, stride=2).mean(1).repeat_interleave(13, 0)
    print(f"    sinks by attention received: {float(sinks.sum(1).float().mean()):.2f} per image, holding "
          f"{float((share * (share > 2 / IMG)).sum(1).mean()):.3f} of the image mass;\n    mean ink of a sink patch "
          f"{float(ink[sinks[:, :IMG]].mean()):.3f}, of the other patches {float(ink[~sinks[:, :IMG]].mean()):.3f}")
    with torch.no_grad():
        with steer.control(model, [(None, steer.KeyMask(sinks, rows=TEXT))]):
            rows.append(("(a) sinks masked (KeyMask)", score(model(x))))
        for keep in (0.8, 0.5, 0.0):
            edits = [(s, steer.Redistribute(sinks, image & ~sinks, keep=keep, heads=centric[s.layer], rows=TEXT))
                     for s in sites[1:] if centric[s.layer]]
            with steer.control(model, edits):
                rows.append((f"(a) VAR: Redistribute sinks -> image, keep={keep}", score(model(x))))

    # (b) VHR-style: VHD per head = ||z(image) - z(blank image)|| at the answer position, on the calibration set
    with torch.no_grad(), steer.control(model, [(None, steer.Capture(("head_out",)))]) as run:
        steer.run_branches(model, {"image": xc, "blank": torch.cat([torch.zeros(len(xc), 64), xc[:, 64:]], 1)})
    vhd = torch.stack([steer.head_divergence(*run.records[s.name][0]["head_out"][:, :, -1].chunk(2)).mean(0)
                       for s in sites])  # (layers, heads)
    top = [(t // HEADS, t % HEADS) for t in vhd.flatten().topk(4).indices.tolist()]
    print(f"(b) top-4 heads (layer, head) by VHD: {top}; VHD per head (rows: layers):\n"
          f"    {[[round(float(v), 1) for v in r] for r in vhd]}")
    with torch.no_grad():
        for alpha in (1.25, 1.5, 2.0):
            with steer.control(model, [(s, steer.ScaleHeads({h: alpha for li, h in top if li == s.layer}))
                                       for s in sites if any(li == s.layer for li, _ in top)]):
                rows.append((f"(b) VHR: ScaleHeads x{alpha}, top-4 VHD heads", score(model(x))))

    # (c) VCD-style contrastive decoding against a no-image branch
    with torch.no_grad():
        out = steer.run_branches(model, {"image": x, "blank": blank})
    p = base.softmax(-1)
    print(f"(c) answers left by the plausibility cut (beta = 0.1), mean per question: "
          f"{float((p >= 0.1 * p.amax(-1, keepdim=True)).sum(-1).float().mean()):.3f}")
    for aux_name, aux in (("blank image", out["blank"]), ("image masked", masked)):
        for alpha in (0.25, 0.5, 1.0):
            rows.append((f"(c) VCD vs {aux_name}, alpha={alpha}",
                         score(steer.combine_logits(out["image"], aux, alpha=alpha))))

    print(f"\n{'accuracy on the held-out questions':48s} {'mean':>6s}  {'digit':>6s}  {'quad':>6s}  {'patch':>6s}")
    for name, acc in rows:
        print(f"{name:48s} " + "  ".join(f"{a:.4f}" for a in acc))
    hit = (base.argmax(-1) == y).float()
    se = [float((hit[kind == k].mean() * (1 - hit[kind == k].mean()) / (kind == k).sum()).sqrt()) for k in range(3)]
    print(f"questions per type {[int((kind == k).sum()) for k in range(3)]}; unsteered accuracy's standard error "
          f"{[round(v, 4) for v in se]}, mean's {sum(v * v for v in se) ** 0.5 / 3:.4f}")
    best, worst = max(rows[4:], key=lambda r: r[1][0]), min(rows[4:], key=lambda r: r[1][0])
    print(f"best steered setting: {best[0]} ({best[1][0] - rows[0][1][0]:+.4f} mean accuracy)\n"
          f"worst steered setting: {worst[0]} ({worst[1][0] - rows[0][1][0]:+.4f}); "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
