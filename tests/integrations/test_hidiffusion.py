"""``nearfar.integrations.hidiffusion``: MSW-MSA goes on exactly the modules HiDiffusion's ``apply_hidiffusion``
patches (its SD 1.5 and SDXL key lists, on tiny random-init UNets of those layouts), and each call equals
HiDiffusion's own procedure (roll, 2 x 2 window partition, attention per window, reverse) at the shift it drew."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import nearfar as nf  # noqa: E402
from nearfar.functional import observe_calls  # noqa: E402
from nearfar.integrations.diffusers import NearfarAttnProcessor  # noqa: E402
from nearfar.integrations.hidiffusion import MSWMSAProcessor, apply_msw_msa, msw_msa_blocks  # noqa: E402

TOL = 1e-5

# megvii-research/HiDiffusion, hidiffusion/hidiffusion.py: sd15_hidiffusion_key / sdxl_hidiffusion_key
SD15_KEYS = ["down_blocks.0.attentions.0.transformer_blocks.0", "down_blocks.0.attentions.1.transformer_blocks.0",
             "up_blocks.3.attentions.0.transformer_blocks.0", "up_blocks.3.attentions.1.transformer_blocks.0",
             "up_blocks.3.attentions.2.transformer_blocks.0"]
SDXL_KEYS = [f"{level}.attentions.{a}.transformer_blocks.{t}" for level, n in (("down_blocks.1", 2), ("up_blocks.1", 3))
             for a in range(n) for t in range(2)]


def sd15_like(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 16, 32, 32), layers_per_block=2, cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def sdxl_like(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 16, 32), layers_per_block=2, cross_attention_dim=16,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2, 3),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize(("make", "keys"), [(sd15_like, SD15_KEYS), (sdxl_like, SDXL_KEYS)])
def test_the_modules_hidiffusion_patches(make, keys):
    unet = make()
    assert msw_msa_blocks(unet) == [k + ".attn1" for k in keys]
    names = apply_msw_msa(unet)
    assert names == sorted(k + ".attn1" for k in keys)
    procs = {k.rpartition(".processor")[0]: p for k, p in unet.attn_processors.items()}
    assert {n for n, p in procs.items() if isinstance(p, MSWMSAProcessor)} == set(names)
    assert all(type(p) is NearfarAttnProcessor for n, p in procs.items() if n not in names)
    with pytest.raises(ValueError, match="no down_blocks/up_blocks"):
        msw_msa_blocks(torch.nn.Linear(2, 2))


def hidiffusion_windows(attn: Attention, x: torch.Tensor, h: int, w: int, shift: tuple[int, int]) -> torch.Tensor:
    """HiDiffusion's MSW-MSA around one attention module, as its transformer block does it: roll by -shift, 2 x 2
    windows, diffusers' AttnProcessor2_0 on each window, reverse, roll back (float64)."""
    a = copy.deepcopy(attn).double()
    a.set_processor(AttnProcessor2_0())
    b, _, c = x.shape
    wh, ww = h // 2, w // 2
    m = torch.roll(x.double().view(b, h, w, c), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    win = m.view(b, 2, wh, 2, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
    out = a(win).view(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    return torch.roll(out, shifts=shift, dims=(1, 2)).reshape(b, h * w, c)


def test_each_call_is_hidiffusion_at_its_shift():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    proc = MSWMSAProcessor(torch.Generator().manual_seed(5))
    attn.set_processor(proc)
    h, w = 8, 12
    proc.latent_hw = (h, w)
    x = torch.randn(2, h * w, 16)
    shifts = []
    with torch.no_grad():
        for _ in range(16):
            out = attn(x)
            shift = proc.last_shift
            shifts.append(shift)
            assert (out.double() - hidiffusion_windows(attn, x, h, w, shift)).abs().max().item() <= TOL
    assert set(shifts) == {(0, 0), (1, 1), (2, 2), (3, 3)}  # window (4, 6): k * (window // 4) for k in 0..3
    again = MSWMSAProcessor(torch.Generator().manual_seed(5))  # the same generator state: the same shifts
    attn.set_processor(again)
    again.latent_hw = (h, w)
    with torch.no_grad():
        for want in shifts[:4]:
            attn(x)
            assert again.last_shift == want


def test_odd_side_is_a_masked_shift():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    proc = MSWMSAProcessor(torch.Generator().manual_seed(1))
    attn.set_processor(proc)
    x = torch.randn(1, 16, 7, 10)
    with torch.no_grad(), observe_calls() as calls:
        attn(x)
    pattern = calls[0][0]
    assert isinstance(pattern, nf.Blocks)
    size, shift = (4, 5), proc.last_shift
    rows = [((i - shift[0]) // size[0], (j - shift[1]) // size[1]) for i in range(7) for j in range(10)]
    ids = torch.tensor([r * 100 + c for r, c in rows])
    assert torch.equal(pattern.mask(70, 70), ids[:, None] == ids[None, :])


def test_unet_runs_reproducibly_and_differs_from_dense():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    enc = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = sd15_like()(x, 3, enc).sample
        a, b = sd15_like(), sd15_like()
        apply_msw_msa(a, torch.Generator().manual_seed(7))
        apply_msw_msa(b, torch.Generator().manual_seed(7))
        with observe_calls() as calls:
            out_a = a(x, 3, enc).sample
        out_b = b(x, 3, enc).sample
    assert torch.equal(out_a, out_b)
    assert (out_a - dense).abs().max().item() > 1e-4
    assert sum(isinstance(c[0], nf.Blocks) for c in calls) == len(SD15_KEYS)
