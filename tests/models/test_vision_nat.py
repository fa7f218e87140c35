"""NAT / DiNAT backbones (``nearfar.models.vision.nat``) against the official-style reference (``tests/oracles/
nat_model.py``: SHI-Labs' ``classification/nat.py`` structure, neighbourhood attention by an explicit gather with
NATTEN's window/bias rules): the official checkpoints' key set, strict load, logits and gradients, feature maps,
timm's conventions; and through ``timm.create_model`` where timm is installed."""

from __future__ import annotations

import math

import backbone_checks as checks
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import nat_model as ref_mod
from timm_required import import_timm

from nearfar.models.vision import create_backbone
from nearfar.models.vision.nat import NAT, DiNAT, feature_take_indices

NAMES = ("nearfar_nat_mini", "nearfar_nat_tiny", "nearfar_dinat_mini", "nearfar_dinat_tiny")
SMALL = dict(embed_dim=16, mlp_ratio=2, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3)


def _pair(name: str, dtype=torch.float32, seed: int = 0, **kw):
    """(reference, nearfar) with the reference's random weights loaded strictly into the nearfar model, eval."""
    torch.manual_seed(seed)
    ref = ref_mod.build(name.removeprefix("nearfar_"), **kw).to(dtype)
    return checks.load_pair(ref, create_backbone(name, **kw).to(dtype))


def _small_pair(dilations, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    ref = checks.perturbed(ref_mod.NAT(**SMALL, dilations=dilations, num_classes=7).to(dtype))
    return checks.load_pair(ref, NAT(**SMALL, dilations=dilations, num_classes=7, **kw).to(dtype))


def _ref_levels(ref, x):
    """The reference's per-level maps before each downsampler (what the official detection backbone returns)."""
    x, out = ref.patch_embed(x), []
    for level in ref.levels:
        for blk in level.blocks:
            x = blk(x)
        out.append(x.permute(0, 3, 1, 2))
        if level.downsample is not None:
            x = level.downsample(x)
    return out


def _official_nat_mini_keys() -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of ``classification/nat.py``'s ``nat_mini`` (depths 3-4-6-5, heads 2-4-8-16,
    embed_dim 64, mlp_ratio 3, kernel 7), written out from the official module structure."""
    keys = {"patch_embed.proj.0.weight": (32, 3, 3, 3), "patch_embed.proj.0.bias": (32,),
            "patch_embed.proj.1.weight": (64, 32, 3, 3), "patch_embed.proj.1.bias": (64,),
            "patch_embed.norm.weight": (64,), "patch_embed.norm.bias": (64,),
            "norm.weight": (512,), "norm.bias": (512,), "head.weight": (1000, 512), "head.bias": (1000,)}
    for i, (depth, heads) in enumerate(zip((3, 4, 6, 5), (2, 4, 8, 16))):
        c = 64 * 2 ** i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            keys.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,), p + "attn.qkv.weight": (3 * c, c),
                         p + "attn.qkv.bias": (3 * c,), p + "attn.rpb": (heads, 13, 13),
                         p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,), p + "norm2.weight": (c,),
                         p + "norm2.bias": (c,), p + "mlp.fc1.weight": (3 * c, c), p + "mlp.fc1.bias": (3 * c,),
                         p + "mlp.fc2.weight": (c, 3 * c), p + "mlp.fc2.bias": (c,)})
        if i < 3:
            keys.update({f"levels.{i}.downsample.reduction.weight": (2 * c, c, 3, 3),
                         f"levels.{i}.downsample.norm.weight": (2 * c,), f"levels.{i}.downsample.norm.bias": (2 * c,)})
    return keys


def test_state_dict_is_the_official_checkpoint_layout():
    with torch.device("meta"):  # shapes only: no weights drawn
        shapes = {n: {k: tuple(v.shape) for k, v in create_backbone(n).state_dict().items()} for n in NAMES}
        ref = {k: tuple(v.shape) for k, v in ref_mod.build("nat_tiny").state_dict().items()}
    assert shapes["nearfar_nat_mini"] == shapes["nearfar_dinat_mini"] == _official_nat_mini_keys()
    assert shapes["nearfar_nat_tiny"] == shapes["nearfar_dinat_tiny"] == ref
    # the papers' parameter counts: NAT-Mini / DiNAT-Mini 20M, NAT-Tiny / DiNAT-Tiny 28M
    counts = [sum(math.prod(v) for v in shapes[n].values()) / 1e6 for n in NAMES]
    assert [round(c) for c in counts] == [20, 28, 20, 28]


def test_dilation_schedules_are_the_official_ones():
    with torch.device("meta"):
        m, nat = create_backbone("nearfar_dinat_tiny"), create_backbone("nearfar_nat_tiny")
    got = [[blk.attn.dilation[0] for blk in level.blocks] for level in m.levels]
    assert got == [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
    assert all(blk.attn.dilation == (1, 1) and blk.attn.kernel_size == (7, 7)
               for level in nat.levels for blk in level.blocks)
    assert isinstance(m, DiNAT) and type(nat) is NAT


@pytest.mark.parametrize("name", NAMES)
def test_real_configs_logits_equal_the_reference(name):
    ref, ours = _pair(name)
    x = torch.randn(2, 3, 64, 64)  # levels of 16, 8, 4, 2: most attention inputs are padded to kernel * dilation
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ("nearfar_nat_mini", "nearfar_dinat_mini"))
def test_real_configs_at_224(name):
    ref, ours = _pair(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


@settings(max_examples=6, deadline=None)
@given(size=st.integers(36, 70), d1=st.integers(1, 4), d2=st.integers(1, 3), batch=st.integers(1, 2))
def test_float64_forward_and_backward_equal_the_reference(size, d1, d2, batch):
    # non-divisible extents, dilated groups of unequal length and padded small maps all occur here
    dilations = [[1, d1], [d2], [d1, 1], [1]]
    ref, ours = _small_pair(dilations)
    checks.check_against_oracle_float64(ref, ours, torch.randn(batch, 3, size + 1, size, dtype=torch.float64))


def test_float32_gradients_match_and_inputs_may_be_views():
    ref, ours = _small_pair([[1, 2], [2], [1, 1], [1]], dtype=torch.float32)
    base = torch.randn(3, 48, 40, 2)
    checks.check_against_oracle_float32_on_a_view(ref, ours, base.permute(3, 0, 1, 2)[:, :, 1:])  # (2, 3, 47, 40)


def test_forward_intermediates_are_the_levels_before_downsampling():
    ref, ours = _small_pair([[1, 2], [1], [1, 1], [1]])
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    want = _ref_levels(ref, x)
    checks.check_stage_maps(ours, x, want, [(2, 16, 16, 12), (2, 32, 8, 6), (2, 64, 4, 3), (2, 128, 2, 2)])
    nhwc = ours.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NHWC", intermediates_only=True)
    assert torch.allclose(nhwc[0], want[0].permute(0, 2, 3, 1))
    assert torch.allclose(nhwc[1], ours.forward_features(x))  # norm=True: the last map gets the final norm
    _, early = ours.forward_intermediates(x, indices=2, stop_early=True)
    assert len(early) == 2 and torch.allclose(early[0], want[2])
    info = [(f["num_chs"], f["reduction"]) for f in ours.feature_info]
    assert info == [(16, 4), (32, 8), (64, 16), (128, 32)]
    assert feature_take_indices(4, None) == ([0, 1, 2, 3], 3) and feature_take_indices(4, [-3, 0]) == ([1, 0], 1)


def test_prune_intermediate_layers():
    _, ours = _small_pair([[1, 1], [1], [1, 1], [1]])
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    want = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert ours.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(ours.levels) == 2 and ours.levels[1].downsample is None and ours.num_classes == 0
    got = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_head_conventions():
    _, ours = _small_pair([[1, 1], [1], [1, 1], [1]])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feats = ours.forward_features(x)
    assert feats.shape == (2, 1, 1, 128)
    pooled = ours.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((1, 2)))
    assert torch.allclose(ours(x), ours.get_classifier()(pooled))
    ours.reset_classifier(3)
    assert ours.double()(x).shape == (2, 3)
    ours.reset_classifier(0, global_pool="")
    assert ours(x).shape == (2, 1, 1, 128) and isinstance(ours.get_classifier(), torch.nn.Identity)
    assert NAT(**SMALL, num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_state_dict_round_trip_and_drop_path():
    m = NAT(**SMALL, drop_path_rate=0.5, drop_rate=0.1)
    other = NAT(**SMALL)
    other.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(m.eval()(x), other.eval()(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))  # stochastic depth and dropout act in training


def test_layer_scale_parameters():
    m = NAT(**SMALL, layer_scale=1e-5)
    names = dict(m.named_parameters())
    assert torch.equal(names["levels.0.blocks.0.gamma1"], torch.full((16,), 1e-5))
    ref = ref_mod.NAT(**SMALL, layer_scale=1e-5)
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (m.eval()(x) - ref.eval()(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("kw, err, match", [
    (dict(depths=[1, 1], num_heads=[1]), ValueError, "same"),
    (dict(dilations=[[1], [1], [1, 1], [1]]), ValueError, r"dilations\[0\]"),
    (dict(dilations=[[1, 1], [1], [1, 1]]), ValueError, "one list per level"),
    (dict(dilations=[[1, 0], [1], [1, 1], [1]]), ValueError, r"dilations\[0\]"),
    (dict(embed_dim=15), ValueError, "even"),
    (dict(attn_drop_rate=0.1), ValueError, "attn_drop_rate"),
    (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
    (dict(global_pool="max"), ValueError, "global_pool"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(num_heads=[3, 2, 2, 4]), ValueError, "multiple"),
])
def test_bad_arguments_raise(kw, err, match):
    with pytest.raises(err, match=match):
        NAT(**{**SMALL, **kw})


def test_bad_call_arguments_raise():
    m = NAT(**SMALL)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NCL")
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[4])
    with pytest.raises(ValueError, match="indices"):
        m.forward_intermediates(torch.randn(1, 3, 32, 32), indices=5)


# ---- through timm ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_timm_create_model(name):
    timm = import_timm()
    m = timm.create_model(name, num_classes=10).eval()
    assert type(m).__name__ in ("NAT", "DiNAT") and m.num_classes == 10
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["first_conv"] == "patch_embed.proj.0"
    assert cfg["classifier"] == "head" and cfg["paper_ids"].startswith("arXiv:22")
    ref = ref_mod.build(name.removeprefix("nearfar_"), num_classes=10).eval()
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() <= 1e-5
    m.reset_classifier(0)
    assert m(x).shape == (1, 512) and m.forward_head(m.forward_features(x), pre_logits=True).shape == (1, 512)


def test_timm_features_only():
    timm = import_timm()
    ref, ours = _pair("nearfar_dinat_mini")
    f = timm.create_model("nearfar_dinat_mini", features_only=True, out_indices=(1, 3)).eval()
    kept = f.model.state_dict()
    assert set(kept) <= set(ref.state_dict()) and not any(k.startswith(("head", "norm.")) for k in kept)
    f.model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in kept}, strict=True)
    assert f.feature_info.channels() == [128, 512] and f.feature_info.reduction() == [8, 32]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = f(x), _ref_levels(ref, x)
    assert [tuple(g.shape) for g in got] == [(2, 128, 8, 8), (2, 512, 2, 2)]
    assert (got[0] - want[1]).abs().max() <= 1e-5 and (got[1] - want[3]).abs().max() <= 1e-5


def test_timm_pretrained_from_a_local_file(tmp_path):
    timm = import_timm()
    ref, _ = _pair("nearfar_nat_mini")
    torch.save(ref.state_dict(), tmp_path / "nat_mini.pth")
    m = timm.create_model("nearfar_nat_mini", pretrained=True,
                          pretrained_cfg_overlay={"file": str(tmp_path / "nat_mini.pth")}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="ships no weights"):
        timm.create_model("nearfar_nat_mini", pretrained=True)
