"""Cross-attention maps, key masking and K/V injection in a tiny text-conditioned diffusion model.

Offline; on a 2-core CPU it does not learn in ~10 minutes (measured, see below). 16 x 16 RGB images hold one
red, green or blue square or disc in one of four quadrants; the prompt is three tokens (colour, shape, position)
embedded by an ``nn.Embedding`` as ``encoder_hidden_states`` of a tiny
diffusers ``UNet2DConditionModel`` (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022, arXiv 2112.10752; here on pixels) run on nearfar by ``use_nearfar``. It is trained as a DDPM
(Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, arXiv 2006.11239: epsilon prediction, 100
steps, linear betas 1e-3..0.2) and sampled with 25 deterministic DDIM steps (Song et al., "Denoising Diffusion
Implicit Models", ICLR 2021, arXiv 2010.02502). A sample is read by a fixed classifier: its foreground is the
pixels whose brightest channel is > 0; colour = the channel with the largest foreground sum, position = the
quadrant of the foreground's centroid, shape = disc when it has < 30 pixels (disc 24, square 36). With
``nearfar.steer``: 0. the edits' exactness on a random-init UNet (KeyMask against diffusers' own
``encoder_attention_mask``; InjectKV against a hand-written processor where item 1 attends over item 0's keys and
values); then on the trained model: 1. colour / shape / position accuracy of samples of random prompts; 2.
``Capture(("probs",), rows=slice(None), reduce="running_mean_steps")`` at the cross-attention sites: every query row's
map over the tokens, averaged over steps as DAAM does (Tang et al., "What the DAAM: Interpreting Stable Diffusion Using
Cross Attention", ACL 2023, arXiv 2210.04885) and over heads; each token's ``mask_from_map`` (Otsu) is scored by IoU
against the sample's foreground; 3. ``KeyMask`` of the colour or position token at every cross-attention site (cross-
attention as the place a token acts: Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR
2023, arXiv 2208.01626): the accuracies; 4. MasaCtrl-style (Cao et al., "MasaCtrl: Tuning-Free Mutual Self-Attention
Control for Consistent Image Synthesis and Editing", ICCV 2023, arXiv 2304.08465) ``InjectKV(FromBatch(source,
target))`` at the self-attention sites for the first k steps: pairs share the initial noise, branch 1's prompt differs
in colour and position and it reads branch 0's keys/values; measured: pixel RMS to branch 0, ``map_overlap`` of the
foregrounds (0.5 = identical), whose colour / position branch 1 shows, and that branch 0 does not change. It does not
train in a CPU budget here, measured: on the project's 2-core machine (shared with a benchmark) a step of batch 32 took
0.65-0.74 s on one thread alone, 2.4 s and 6.5 s under contention in the runs below. A first run (``--seconds 480``, 64
samples, 25 DDIM steps, stopped after section 3: one sampling took 76 s) trained 205 steps to a loss of 0.062 with
samples at chance (colour 0.391, shape 0.422, position 0.266; chance 0.333, 0.5, 0.25) and token-map IoUs 0.25-0.40
against a random map's 0.334. So sections 1-4 below describe an untrained model (noise-like samples, no change with k):
the pipeline, not the edits' effect on a prompt-following model; section 0 and 3's exactness line hold regardless. How
many steps it needs was not measured. One run (``--seconds 480 --samples 32 --sample-steps 10``, two threads; long lines
wrapped) printed::

    0. random-init UNet, one call: KeyMask([2]) at the 4 cross sites vs diffusers' encoder_attention_mask max |diff|
      0.0e+00 (edit's effect 2.5e-01)
       InjectKV(FromBatch([0], [1])) at the 4 self sites vs a hand-written processor max |diff| 9.5e-07; items 0, 2 vs
         no edit 0.0e+00; item 1's change 4.8e-02
    trained 74 steps (batch 32) in 481 s; loss of the last 50 steps 0.1333
    1. 32 samples, 10 DDIM steps (31.6 s with the capture); accuracy colour 0.375, shape 0.562, position 0.094 (chance
      0.333, 0.5, 0.25)
       training images read by the same classifier: [1.0, 1.0, 1.0]
    2. IoU of mask_from_map (Otsu) of each token's cross-attention map (heads and steps averaged) with the sample's
      foreground
       down_blocks.0.attentions.0.transformer_blocks.0.attn2 16x16, 10 steps: colour 0.444, shape 0.397, position 0.399
       up_blocks.1.attentions.0.transformer_blocks.0.attn2 16x16, 10 steps: colour 0.358, shape 0.454, position 0.440
       up_blocks.1.attentions.1.transformer_blocks.0.attn2 16x16, 10 steps: colour 0.442, shape 0.437, position 0.348
       mid_block.attentions.0.transformer_blocks.0.attn2 8x8, 10 steps: colour 0.388, shape 0.451, position 0.394
       mean of the sites                                  colour 0.452, shape 0.416, position 0.389
       random map 0.424; foreground share of the image 0.727
    3. KeyMask of one token at every cross-attention site: accuracy colour / shape / position
       no edit                  0.375 / 0.562 / 0.094
       colour token masked      0.375 / 0.562 / 0.094
       position token masked    0.438 / 0.562 / 0.094
       exactness, one UNet call: KeyMask([2]) vs diffusers' encoder_attention_mask max |diff| 0.00e+00 (the edit
         itself changes the output by 1.19e-01)
    4. InjectKV(FromBatch(source=branch 0, target=branch 1)) at the 4 self-attention sites for the first k of 10
      steps, 16 pairs (branch 1's prompt: another colour and position)
       k   RMS(b1 - b0)  overlap(b1, b0)  b1 colour: own / b0's  b1 position: own / b0's  b0 max|diff|
       0          0.043            0.480      0.438 / 0.312         0.125 / 0.438   0.0e+00
       3          0.044            0.480      0.438 / 0.312         0.125 / 0.438   0.0e+00
       6          0.043            0.480      0.438 / 0.312         0.125 / 0.438   0.0e+00
       10         0.044            0.480      0.438 / 0.312         0.125 / 0.438   0.0e+00
    total 615 s
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn

from nearfar.integrations.diffusers import use_nearfar
from nearfar.steer import Capture, FromBatch, InjectKV, KeyMask, control, find_sites, map_overlap, mask_from_map, steps

COLOURS, SHAPES, PLACES = ("red", "green", "blue"), ("square", "disc"), ("top-left", "top-right", "bottom-left",
                                                                         "bottom-right")
TOKENS = ("colour", "shape", "position")
OFFSETS = torch.tensor([0, len(COLOURS), len(COLOURS) + len(SHAPES)])  # token id = offset + value
SIZE, DIM, T_TRAIN = 16, 32, 100
SCHEDULE = dict(num_train_timesteps=T_TRAIN, beta_start=1e-3, beta_end=0.2, beta_schedule="linear")
_yy, _xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
SHAPE_MASKS = (torch.ones(6, 6, dtype=torch.bool), (_yy - 2.5) ** 2 + (_xx - 2.5) ** 2 <= 2.9 ** 2)


def random_prompts(n: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` prompts: colour, shape, position indices."""
    return torch.stack([torch.randint(0, len(v), (n,), generator=gen) for v in (COLOURS, SHAPES, PLACES)], 1)


def render(prompts: torch.Tensor) -> torch.Tensor:
    """The images ``(n, 3, 16, 16)`` in ``[-1, 1]``: black, the shape's pixels at 1 in its colour's channel."""
    img = -torch.ones(len(prompts), 3, SIZE, SIZE)
    for i, (c, s, p) in enumerate(prompts.tolist()):
        y, x = 8 * (p // 2) + 1, 8 * (p % 2) + 1
        img[i, c, y:y + 6, x:x + 6][SHAPE_MASKS[s]] = 1.0
    return img


def classify(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3)`` read-out (colour, shape, position) of samples ``x`` and their foregrounds ``(n, 16, 16)``."""
    fg = x.amax(1) > 0
    count = fg.flatten(1).sum(1)
    colour = ((x + 1) * fg[:, None]).flatten(2).sum(2).argmax(1)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cy, cx = ((fg * g).flatten(1).sum(1) / count.clamp(min=1) for g in (ys, xs))
    place = (cy >= SIZE / 2).long() * 2 + (cx >= SIZE / 2).long()
    return torch.stack([colour, (count < 30).long(), place], 1), fg


def accuracy(x: torch.Tensor, prompts: torch.Tensor) -> list[float]:
    return [float(v) for v in (classify(x)[0] == prompts).float().mean(0)]


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=DIM, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@torch.no_grad()
def sample(unet: nn.Module, enc: torch.Tensor, noise: torch.Tensor, edits: list, n_steps: int) -> tuple:
    """DDIM sampling inside ``control(unet, edits)``: each UNet call is one step. Returns (samples, run)."""
    sched = DDIMScheduler(**SCHEDULE)
    sched.set_timesteps(n_steps)
    x = noise.clone()
    with control(unet, edits) as run:
        for t in sched.timesteps:
            x = sched.step(unet(x, t, enc).sample, t, x).prev_sample
    return x, run


class SharedKV:
    """A hand-written reference processor (``AttnProcessor``'s self-attention, plain matmuls): batch item ``b``
    attends over the keys and values of item ``kv_from[b]``."""

    def __init__(self, kv_from: list[int]) -> None:
        self.kv_from = kv_from

    def __call__(self, attn: nn.Module, h: torch.Tensor, encoder_hidden_states: None = None,
                 **_: object) -> torch.Tensor:
        b, n, _ = h.shape
        q, k, v = (f(h).view(b, n, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        k, v = k[self.kv_from], v[self.kv_from]
        o = ((q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[0](o)


@torch.no_grad()
def exactness() -> None:
    """KeyMask and InjectKV on a random-init UNet against what diffusers computes with the edit done by hand."""
    torch.manual_seed(0)
    unet = use_nearfar(make_unet()).eval()
    cross, self_sites = find_sites(unet, kind="cross"), find_sites(unet, kind="self")
    x, enc, t = torch.randn(3, 3, SIZE, SIZE), torch.randn(3, 3, DIM), torch.tensor(50)
    keep = torch.ones(3, 3, dtype=torch.long)
    keep[:, 2] = 0
    plain = unet(x, t, enc).sample
    ref = unet(x, t, enc, encoder_attention_mask=keep).sample
    with control(unet, [(cross, KeyMask([2]))]):
        out = unet(x, t, enc).sample
    print(f"0. random-init UNet, one call: KeyMask([2]) at the {len(cross)} cross sites vs diffusers' "
          f"encoder_attention_mask max |diff| {float((out - ref).abs().max()):.1e} (edit's effect "
          f"{float((out - plain).abs().max()):.1e})")
    with control(unet, [(self_sites, InjectKV(FromBatch([0], [1])))]):
        out = unet(x, t, enc).sample
    saved = [s.module.processor for s in self_sites]
    for s in self_sites:
        s.module.set_processor(SharedKV([0, 0, 2]))
    ref = unet(x, t, enc).sample
    for s, proc in zip(self_sites, saved):
        s.module.set_processor(proc)
    print(f"   InjectKV(FromBatch([0], [1])) at the {len(self_sites)} self sites vs a hand-written processor max "
          f"|diff| {float((out - ref).abs().max()):.1e}; items 0, 2 vs no edit "
          f"{float((out[[0, 2]] - plain[[0, 2]]).abs().max()):.1e}; item 1's change "
          f"{float((out[1] - plain[1]).abs().max()):.1e}")


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).clamp(min=1).float()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--steps", 3000), ("--seconds", 420.0), ("--batch", 32), ("--samples", 64),
                          ("--sample-steps", 25), ("--lr", 1e-3), ("--seed", 0)):  # --steps/--seconds: training budget
        parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args()
    exactness()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    embed, unet = nn.Embedding(int(OFFSETS[-1]) + len(PLACES), DIM), use_nearfar(make_unet())
    opt = torch.optim.AdamW([*embed.parameters(), *unet.parameters()], lr=args.lr)
    train_sched = DDPMScheduler(**SCHEDULE)
    t0, done, losses = time.perf_counter(), 0, []
    while (frac := max(done / args.steps, (time.perf_counter() - t0) / args.seconds)) < 1:
        for group in opt.param_groups:  # cosine decay over the budget (steps or seconds, whichever ends first)
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * frac))
        prompts = random_prompts(args.batch, gen)
        x0, noise = render(prompts), torch.randn(args.batch, 3, SIZE, SIZE, generator=gen)
        t = torch.randint(0, T_TRAIN, (args.batch,), generator=gen)
        eps = unet(train_sched.add_noise(x0, noise, t), t, embed(prompts + OFFSETS)).sample
        loss = F.mse_loss(eps, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        done += 1
    unet.eval()
    print(f"trained {done} steps (batch {args.batch}) in {time.perf_counter() - t0:.0f} s; loss of the last 50 "
          f"steps {sum(losses[-50:]) / len(losses[-50:]):.4f}")

    n, k = args.samples, args.sample_steps
    test = torch.Generator().manual_seed(1000 + args.seed)
    prompts, noise = random_prompts(n, test), torch.randn(n, 3, SIZE, SIZE, generator=test)
    enc = embed(prompts + OFFSETS).detach()
    cross, self_sites = find_sites(unet, kind="cross"), find_sites(unet, kind="self")
    t1 = time.perf_counter()
    cap = Capture(("probs",), rows=slice(None), reduce="running_mean_steps")
    x, run = sample(unet, enc, noise, [(cross, cap)], k)
    base = accuracy(x, prompts)
    print(f"1. {n} samples, {k} DDIM steps ({time.perf_counter() - t1:.1f} s with the capture); accuracy colour "
          f"{base[0]:.3f}, shape {base[1]:.3f}, position {base[2]:.3f} (chance 0.333, 0.5, 0.25)")
    print(f"   training images read by the same classifier: {accuracy(render(prompts), prompts)}")

    _, fg = classify(x)
    print("2. IoU of mask_from_map (Otsu) of each token's cross-attention map (heads and steps averaged) with the "
          "sample's foreground")
    maps = []
    for site in cross:
        rec = run.records[site.name][0]
        p = rec["probs"].mean(1).transpose(1, 2)  # (B, 3 tokens, N)
        side = int(round(p.shape[-1] ** 0.5))
        m = F.interpolate(p.reshape(n, 3, side, side), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        maps.append(m)
        ious = [iou(mask_from_map(m[:, j]), fg) for j in range(3)]
        print(f"   {site.name:40s} {side}x{side}, {rec['steps']} steps: " +
              ", ".join(f"{name} {v:.3f}" for name, v in zip(TOKENS, ious)))
    mean_map = torch.stack(maps).mean(0)
    print("   mean of the sites" + " " * 34 + ", ".join(
        f"{name} {iou(mask_from_map(mean_map[:, j]), fg):.3f}" for j, name in enumerate(TOKENS)))
    rand = torch.rand(n, SIZE, SIZE, generator=test)
    print(f"   random map {iou(mask_from_map(rand), fg):.3f}; foreground share of the image "
          f"{float(fg.float().mean()):.3f}")

    print("3. KeyMask of one token at every cross-attention site: accuracy colour / shape / position")
    for j in (None, 0, 2):
        edits = [] if j is None else [(cross, KeyMask([j]))]
        acc = base if j is None else accuracy(sample(unet, enc, noise, edits, k)[0], prompts)
        label = "no edit" if j is None else f"{TOKENS[j]} token masked"
        print(f"   {label:24s} {acc[0]:.3f} / {acc[1]:.3f} / {acc[2]:.3f}")
    keep = torch.ones(n, 3, dtype=torch.long)
    keep[:, 2] = 0
    t_mid = torch.tensor(T_TRAIN // 2)
    with torch.no_grad():
        ref = unet(noise, t_mid, enc, encoder_attention_mask=keep).sample
        with control(unet, [(cross, KeyMask([2]))]):
            out = unet(noise, t_mid, enc).sample
        plain = unet(noise, t_mid, enc).sample
    print(f"   exactness, one UNet call: KeyMask([2]) vs diffusers' encoder_attention_mask max |diff| "
          f"{float((out - ref).abs().max()):.2e} (the edit itself changes the output by "
          f"{float((out - plain).abs().max()):.2e})")

    half = n // 2
    a = random_prompts(half, test)
    b = a.clone()
    b[:, 0] = (a[:, 0] + torch.randint(1, 3, (half,), generator=test)) % 3
    b[:, 2] = (a[:, 2] + torch.randint(1, 4, (half,), generator=test)) % 4
    pair_prompts = torch.stack([a, b], 1).reshape(n // 2 * 2, 3)
    pair_noise = torch.randn(half, 3, SIZE, SIZE, generator=test).repeat_interleave(2, 0)
    pair_enc = embed(pair_prompts + OFFSETS).detach()
    src, tgt = list(range(0, 2 * half, 2)), list(range(1, 2 * half, 2))
    print(f"4. InjectKV(FromBatch(source=branch 0, target=branch 1)) at the {len(self_sites)} self-attention sites "
          f"for the first k of {k} steps, {half} pairs (branch 1's prompt: another colour and position)")
    print("   k   RMS(b1 - b0)  overlap(b1, b0)  b1 colour: own / b0's  b1 position: own / b0's  b0 max|diff|")
    ref0 = None
    for k_inj in sorted({0, min(3, k), min(6, k), min(12, k), k}):
        edits = [] if k_inj == 0 else [(self_sites, InjectKV(FromBatch(src, tgt)), steps(0, k_inj))]
        xs = sample(unet, pair_enc, pair_noise, edits, k)[0]
        x0, x1 = xs[src], xs[tgt]
        ref0 = x0 if ref0 is None else ref0
        f0, (r1, f1) = classify(x0)[1], classify(x1)
        rms = float((x1 - x0).pow(2).mean((1, 2, 3)).sqrt().mean())
        ov = float(map_overlap(f1.float(), f0.float()).mean())
        own_c, b0_c = (float((r1[:, 0] == p[:, 0]).float().mean()) for p in (b, a))
        own_p, b0_p = (float((r1[:, 2] == p[:, 2]).float().mean()) for p in (b, a))
        print(f"   {k_inj:<3d} {rms:12.3f}  {ov:15.3f}  {own_c:9.3f} / {b0_c:.3f}  {own_p:12.3f} / {b0_p:.3f}   "
              f"{float((x0 - ref0).abs().max()):.1e}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
