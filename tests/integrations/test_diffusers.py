"""``nearfar.integrations.diffusers``: the nearfar processors give diffusers' own outputs (a tiny random-init
``UNet2DConditionModel``, ``Transformer2DModel`` DiT and ``SD3Transformer2DModel``, and single ``Attention`` modules
through every branch of ``AttnProcessor2_0``); windowed self-attention equals a hand-written masked attention in
float64; ``nearfar.steer`` finds the sites and its edits equal what diffusers computes with the edit done by hand."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import SD3Transformer2DModel, Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnAddedKVProcessor,
    AttnProcessor,
    AttnProcessor2_0,
)

import nearfar as nf  # noqa: E402
import nearfar.integrations.diffusers as nfd  # noqa: E402
from nearfar.functional import observe_calls  # noqa: E402
from nearfar.integrations.diffusers import NearfarAttnProcessor, NearfarJointAttnProcessor, use_nearfar  # noqa: E402
from nearfar.steer import Capture, FromBatch, InjectKV, KeyMask, control, find_sites, steps  # noqa: E402

TOL = 1e-5


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def inputs(b: int = 2, h: int = 16, w: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g), torch.randn(b, 6, 32, generator=g)


def test_docstring_examples_run():
    result = doctest.testmod(nfd, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("masked", [False, True])
def test_unet_dense_equals_attn_processor_2_0(masked):
    unet = tiny_unet()
    x, enc = inputs()
    mask = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1]]) if masked else None
    with torch.no_grad():
        ref = unet(x, 7, enc, encoder_attention_mask=mask).sample
        assert use_nearfar(unet) is unet
        assert all(type(p) is NearfarAttnProcessor for p in unet.attn_processors.values())
        with observe_calls() as calls:
            out = unet(x, 7, enc, encoder_attention_mask=mask).sample
    assert len(calls) == 8  # 4 self + 4 cross calls, all through nearfar.attend
    assert (out - ref).abs().max().item() <= TOL


def test_dit_and_sd3_transformers_equal_their_processors():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 5])
    dit = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                             num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                             norm_type="ada_norm_zero").eval()
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    enc, pooled = torch.randn(2, 5, 16), torch.randn(2, 16)
    runs = [(dit, lambda: dit(x, timestep=t, class_labels=torch.tensor([1, 2])).sample, ["self"]),
            (sd3, lambda: sd3(x, enc, pooled, t).sample, ["joint", "joint"])]
    for model, run, kinds in runs:
        with torch.no_grad():
            ref = run()
            use_nearfar(model)
            with observe_calls() as calls:
                out = run()
        assert len(calls) == len(kinds) and (out - ref).abs().max().item() <= TOL
        assert [s.kind for s in find_sites(model)] == kinds
    assert all(type(p) is NearfarJointAttnProcessor for p in sd3.attn_processors.values())


ATTENTION_CASES = {
    # VAE-style: group norm, residual connection, output rescale, 4D maps
    "group_norm_residual_4d": dict(kw=dict(norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0),
                                   four_d=True),
    # MoVQ-style spatial norm conditioned on a latent map (temb)
    "spatial_norm": dict(kw=dict(spatial_norm_dim=8), four_d=True, temb=True),
    # cross-attention with a layer norm of the context, q/k layer norms and a bool mask
    "cross_norms_bool_mask": dict(kw=dict(cross_attention_dim=12, cross_attention_norm="layer_norm",
                                          qk_norm="layer_norm"), cross=True, mask="bool"),
    "cross_float_mask": dict(kw=dict(cross_attention_dim=12), cross=True, mask="float"),
    # unit scale: diffusers runs AttnProcessor there
    "no_qk_scale": dict(kw=dict(scale_qk=False), ref=AttnProcessor),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_module_branches(case):
    spec = ATTENTION_CASES[case]
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, **spec["kw"]).eval()  # 32 channels: SpatialNorm's 32 groups
    attn.set_processor(spec.get("ref", AttnProcessor2_0)())
    x = torch.randn(3, 32, 4, 5) if spec.get("four_d") else torch.randn(3, 20, 32)
    kwargs = {}
    if spec.get("cross"):
        kwargs["encoder_hidden_states"] = torch.randn(3, 7, 12)
    if spec.get("temb"):
        kwargs["temb"] = torch.randn(3, 8, 2, 2)  # the quantised latent it is conditioned on
    keep = torch.rand(3, 1, 7 if spec.get("cross") else 20) > 0.3
    keep[..., 0] = True
    if spec.get("mask") == "bool":
        kwargs["attention_mask"] = keep
    elif spec.get("mask") == "float":
        kwargs["attention_mask"] = torch.zeros(keep.shape).masked_fill(~keep, -10000.0)
    with torch.no_grad():
        ref = attn(x, **kwargs)
        attn.set_processor(NearfarAttnProcessor())
        out = attn(x, **kwargs)
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= TOL


def neighborhood_mask(h: int, w: int, k: int) -> torch.Tensor:
    """NATTEN's neighbourhood written out: each query sees the k x k keys of a window centred on it, slid inward
    at the borders."""
    allowed = torch.zeros(h * w, h * w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            a0, b0 = min(max(i - k // 2, 0), h - k), min(max(j - k // 2, 0), w - k)
            for a in range(a0, a0 + k):
                for b in range(b0, b0 + k):
                    allowed[i * w + j, a * w + b] = True
    return allowed


def rolled_window_mask(h: int, w: int, size: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """HiDiffusion's rolled windows: tokens share a window when their rolled coordinates do."""
    win = [((i - shift[0]) % h) // size[0] * w + ((j - shift[1]) % w) // size[1] for i in range(h) for j in range(w)]
    ids = torch.tensor(win)
    return ids[:, None] == ids[None, :]


def masked_reference(attn: Attention, x: torch.Tensor, allowed: torch.Tensor,
                     kv_from: list[int] | None = None) -> torch.Tensor:
    """Self-attention of a plain ``Attention`` module in float64 with a materialised mask (``kv_from[b]``: the batch
    item whose keys and values item ``b`` reads)."""
    a = copy.deepcopy(attn).double()
    x = x.double()
    b, n, _ = x.shape
    heads, d = a.heads, a.inner_dim // a.heads
    q, k, v = (f(x).view(b, n, heads, d).transpose(1, 2) for f in (a.to_q, a.to_k, a.to_v))
    if kv_from is not None:
        k, v = k[kv_from], v[kv_from]
    s = (q @ k.transpose(-1, -2) * a.scale).masked_fill(~allowed, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, heads * d)
    return a.to_out[0](o)


@pytest.mark.parametrize("which", ["neighborhood", "hidiffusion_windows"])
def test_windowed_processor_equals_masked_reference(which):
    h, w = 4, 6
    if which == "neighborhood":
        proc = NearfarAttnProcessor(pattern=lambda hh, ww: nf.Neighborhood(3, grid=(hh, ww)))
        allowed = neighborhood_mask(h, w, 3)
    else:
        proc = NearfarAttnProcessor(pattern=lambda hh, ww: nf.Blocks((hh // 2, ww // 2), grid=(hh, ww),
                                                                      shift=(1, 2), wrap=True))
        allowed = rolled_window_mask(h, w, (2, 3), (1, 2))
    assert 0 < allowed.sum() < allowed.numel()
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    attn.set_processor(proc)
    x = torch.randn(2, h * w, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="latent_hw"):
            attn(x)
        proc.latent_hw = (2 * h, 2 * w)  # a latent twice the size: this map is one level down
        out = attn(x)
        out_4d = attn(x.transpose(1, 2).reshape(2, 16, h, w))  # a 4D map gives its own grid
    ref = masked_reference(attn, x, allowed)
    assert (out.double() - ref).abs().max().item() <= TOL
    assert (out_4d.flatten(2).transpose(1, 2) - out).abs().max().item() <= TOL


def test_windowed_unet_gets_each_level_grid():
    seen = []

    def window(h: int, w: int) -> nf.Pattern:
        seen.append((h, w))
        return nf.Neighborhood(3, grid=(h, w))

    def factory(name, attn):
        return NearfarAttnProcessor() if attn.is_cross_attention else NearfarAttnProcessor(pattern=window)

    unet = tiny_unet()
    x, enc = inputs(h=16, w=24)  # a latent that is not square
    with torch.no_grad():
        dense = unet(x, 7, enc).sample
        use_nearfar(unet, factory)
        with observe_calls() as calls:
            out = unet(x, 7, enc).sample
            unet(x, 7, enc)
    assert sorted(set(seen)) == [(8, 12), (16, 24)] and len(seen) == 4  # built once per module and size
    patterns = [c[0] for c in calls[:8]]
    assert sum(isinstance(p, nf.Neighborhood) for p in patterns) == 4 and patterns.count(None) == 4
    assert (out - dense).abs().max().item() > 1e-3


def test_argument_and_conversion_errors(monkeypatch):
    with pytest.raises(TypeError, match="pattern"):
        NearfarAttnProcessor(pattern=3)  # type: ignore[arg-type]
    attn = Attention(16, heads=2, dim_head=8)
    attn.set_processor(NearfarAttnProcessor(pattern=lambda h, w: "window"))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a nearfar Pattern"):
        attn(torch.randn(1, 16, 4, 4))
    proc = NearfarAttnProcessor(pattern=lambda h, w: nf.Neighborhood(3, grid=(h, w)))
    proc.latent_hw = (16, 16)
    with pytest.raises(ValueError, match="no downsample ratio"):
        proc.grid(60)
    with pytest.raises(ValueError, match="no diffusers Attention"):
        use_nearfar(torch.nn.Linear(2, 2))
    added = Attention(16, heads=2, dim_head=8, cross_attention_dim=16, added_kv_proj_dim=12,
                      processor=AttnAddedKVProcessor())
    holder = torch.nn.ModuleDict({"blk": added})
    with pytest.raises(ValueError, match="blk runs AttnAddedKVProcessor"):
        use_nearfar(holder)
    use_nearfar(holder, lambda name, a: None)  # None keeps the module's processor: not a site
    assert type(added.processor) is AttnAddedKVProcessor and find_sites(holder) == []
    monkeypatch.setattr(nfd, "_attention_class", lambda: None)  # as without diffusers installed
    with pytest.raises(ImportError, match="needs diffusers"):
        use_nearfar(holder)


def test_find_sites_lists_converted_modules_with_their_kinds():
    unet = tiny_unet()
    assert find_sites(unet) == []  # AttnProcessor2_0 never calls nearfar.attend: not steerable, not a site
    use_nearfar(unet)
    sites = find_sites(unet)
    assert [s.kind for s in sites] == ["self", "cross"] * 4
    assert all(s.name.endswith("attn1" if s.kind == "self" else "attn2") for s in sites)
    assert all(s.num_heads == 8 and s.module is unet.get_submodule(s.name) for s in sites)
    assert [s.layer for s in find_sites(unet, kind="cross")] == [1, 3, 5, 7]


def test_keymask_on_text_tokens_equals_encoder_attention_mask():
    unet = use_nearfar(tiny_unet())
    x, enc = inputs()
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[:, 2] = 0
    with torch.no_grad():
        plain = unet(x, 7, enc).sample
        ref = unet(x, 7, enc, encoder_attention_mask=keep).sample
        with control(unet, [(find_sites(unet, kind="cross"), KeyMask([2]))]):
            out = unet(x, 7, enc).sample
    assert (out - ref).abs().max().item() <= TOL and (out - plain).abs().max().item() > 1e-4


def test_inject_kv_from_batch_at_self_attention():
    unet = use_nearfar(tiny_unet())
    x, enc = inputs(b=3)
    edit = [(find_sites(unet, kind="self"), InjectKV(FromBatch([0], [1])))]
    with torch.no_grad():
        plain = unet(x, 7, enc).sample
        with control(unet, edit):
            out = unet(x, 7, enc).sample
    assert (out[[0, 2]] - plain[[0, 2]]).abs().max().item() <= TOL
    assert (out[1] - plain[1]).abs().max().item() > 1e-4
    # on one module: item 1 attends over item 0's keys and values
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    attn.set_processor(NearfarAttnProcessor())
    xs = torch.randn(3, 10, 16)
    with torch.no_grad(), control(attn, [(None, InjectKV(FromBatch([0], [1])))]):
        got = attn(xs)
    ref = masked_reference(attn, xs, torch.ones(10, 10, dtype=torch.bool), kv_from=[0, 0, 2])
    assert (got.double() - ref).abs().max().item() <= TOL


def test_capture_probs_and_steps_at_a_cross_site():
    unet = use_nearfar(tiny_unet())
    x, enc = inputs()
    site = find_sites(unet, kind="cross")[0]
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), control(unet, [(site, Capture(("q", "k", "probs"), rows=[0]), steps(1, 2))]) as run:
        unet(x, 7, enc, encoder_attention_mask=keep)
        unet(x, 7, enc, encoder_attention_mask=keep)
        run.set_step(5)
        unet(x, 7, enc, encoder_attention_mask=keep)
    recs = run.records[site.name]
    assert [r["step"] for r in recs] == [1]  # the second model call only
    p, q, k = recs[0]["probs"], recs[0]["q"], recs[0]["k"]
    assert p.shape == (2, 8, 1, 6)
    assert torch.allclose(p.sum(-1), torch.ones(2, 8, 1), atol=TOL)
    s = (q[:, :, :1].double() @ k.double().transpose(-1, -2)) * site.module.scale
    s = s + torch.where(keep.bool(), 0.0, -10000.0).double()[:, None, None, :]
    assert (p.double() - s.softmax(-1)).abs().max().item() <= TOL
    assert p[0, ..., 4:].abs().max().item() <= TOL
