"""BiFormer-T (``nearfar.models.vision.biformer``) against the official-style reference (``tests/oracles/
biformer_model.py``: rayleizhu/BiFormer's ``models/biformer.py`` + ``ops/bra_legacy.py`` structure in plain
PyTorch, routed K/V copied by ``KVGather``): the official checkpoint's key set, strict load, logits and gradients,
stage maps, timm's conventions; and through ``timm.create_model`` where timm is installed."""

from __future__ import annotations

import math

import backbone_checks as checks
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import biformer_model as ref_mod
from timm_required import import_timm

from nearfar.models.vision import create_backbone
from nearfar.models.vision.biformer import BiFormer

NAME = "nearfar_biformer_tiny"
SMALL = dict(depth=[1, 2, 1, 1], embed_dim=[16, 32, 32, 64], mlp_ratios=[2, 2, 2, 2], n_win=2,
             kv_downsample_mode="identity", kv_per_wins=[-1, -1, -1, -1], topks=[1, 2, 3, -2], side_dwconv=5,
             qk_dims=[16, 32, 32, 64], head_dim=8, num_classes=7)


ORACLE_KEYS = ("depth", "embed_dim", "mlp_ratios", "n_win", "topks", "side_dwconv", "qk_dims", "head_dim",
               "num_classes")


def _randomize(model, scale=0.2):
    """BatchNorm statistics and affine parameters away from their defaults, so that every term shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, scale)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, scale)
                m.bias.normal_(0, scale)
    return model


def _pair(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    ref = _randomize(ref_mod.build("biformer_tiny", **kw)).to(dtype)
    return checks.load_pair(ref, create_backbone(NAME, **kw).to(dtype))


def _small_pair(dtype=torch.float64, seed=0, auto_pad=True, **kw):
    torch.manual_seed(seed)
    ref = _randomize(checks.perturbed(ref_mod.BiFormer(**{k: SMALL[k] for k in ORACLE_KEYS}, auto_pad=auto_pad, **kw)))
    return checks.load_pair(ref.to(dtype), BiFormer(**SMALL, auto_pad=auto_pad, **kw).to(dtype))


def _ref_stages(ref, x):
    out = []
    for down, stage in zip(ref.downsample_layers, ref.stages):
        x = stage(down(x))
        out.append(x)
    return out


def _official_tiny_keys() -> dict[str, tuple[int, ...]]:
    """``biformer_tiny``'s state-dict keys and shapes (depths 2-2-8-2, dims 64-128-256-512, MLP ratio 3, stages 1-3
    ``bra_legacy.BiLevelRoutingAttention`` with identity kv pooling, stage 4 ``AttentionLePE``), written out from the
    official module structure."""
    def bn(p, c):
        return {p + "weight": (c,), p + "bias": (c,), p + "running_mean": (c,), p + "running_var": (c,),
                p + "num_batches_tracked": ()}

    e = (64, 128, 256, 512)
    keys = {"downsample_layers.0.0.weight": (32, 3, 3, 3), "downsample_layers.0.0.bias": (32,),
            **bn("downsample_layers.0.1.", 32), "downsample_layers.0.3.weight": (64, 32, 3, 3),
            "downsample_layers.0.3.bias": (64,), **bn("downsample_layers.0.4.", 64), **bn("norm.", 512),
            "head.weight": (1000, 512), "head.bias": (1000,)}
    for i in range(3):
        keys.update({f"downsample_layers.{i + 1}.0.weight": (e[i + 1], e[i], 3, 3),
                     f"downsample_layers.{i + 1}.0.bias": (e[i + 1],), **bn(f"downsample_layers.{i + 1}.1.", e[i + 1])})
    for i, depth in enumerate((2, 2, 8, 2)):
        c = e[i]
        for j in range(depth):
            p = f"stages.{i}.{j}."
            keys.update({p + "pos_embed.weight": (c, 1, 3, 3), p + "pos_embed.bias": (c,), p + "norm1.weight": (c,),
                         p + "norm1.bias": (c,), p + "attn.lepe.weight": (c, 1, 5, 5), p + "attn.lepe.bias": (c,),
                         p + "norm2.weight": (c,), p + "norm2.bias": (c,), p + "mlp.0.weight": (3 * c, c),
                         p + "mlp.0.bias": (3 * c,), p + "mlp.3.weight": (c, 3 * c), p + "mlp.3.bias": (c,)})
            if i < 3:
                keys.update({p + "attn.qkv.qkv.weight": (3 * c, c), p + "attn.qkv.qkv.bias": (3 * c,),
                             p + "attn.wo.weight": (c, c), p + "attn.wo.bias": (c,)})
            else:
                keys.update({p + "attn.qkv.weight": (3 * c, c), p + "attn.proj.weight": (c, c),
                             p + "attn.proj.bias": (c,)})
    return keys


def test_state_dict_is_the_official_checkpoint_layout():
    with torch.device("meta"):
        ours = create_backbone(NAME)
        ref = ref_mod.build("biformer_tiny")
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == _official_tiny_keys() == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert round(sum(math.prod(s) for k, s in got.items() if "running" not in k) / 1e6, 1) == 13.1  # the paper's 13.1M
    heads = [[blk.attn.num_heads for blk in stage] for stage in ours.stages]
    assert heads == [[2, 2], [4, 4], [8] * 8, [8, 8]]  # qk_dim / 32 in stages 1-3; AttentionLePE's default 8
    assert [stage[0].attn.topk for stage in ours.stages] == [1, 4, 16, -2]
    assert all(blk.attn.scale == blk.attn.qk_dim ** -0.5 for stage in ours.stages[:3] for blk in stage)


@pytest.mark.parametrize("size, batch", [(112, 2), (224, 1)])
def test_real_config_logits_equal_the_reference(size, batch):
    ref, ours = _pair()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


@settings(max_examples=5, deadline=None)
@given(h=st.integers(30, 72), w=st.integers(30, 72), batch=st.integers(1, 2))
def test_float64_forward_and_backward_equal_the_reference(h, w, batch):
    ref, ours = _small_pair()  # auto_pad: odd sizes pad every routed stage to multiples of n_win
    checks.check_against_oracle_float64(ref, ours, torch.randn(batch, 3, h, w, dtype=torch.float64))


def test_float32_gradients_match_and_inputs_may_be_views():
    ref, ours = _small_pair(dtype=torch.float32, auto_pad=False)
    base = torch.randn(3, 64, 65, 2)
    checks.check_against_oracle_float32_on_a_view(ref, ours, base.permute(3, 0, 1, 2)[..., 1:])  # (2, 3, 64, 64)


def test_layer_scale_and_mlp_dwconv_load_strictly():
    kw = dict(layer_scale_init_value=1e-2, mlp_dwconv=True)
    ref, ours = _small_pair(**kw)
    assert "stages.0.0.gamma1" in ours.state_dict() and "stages.0.0.mlp.1.dwconv.weight" in ours.state_dict()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert torch.allclose(ours(x), ref(x), atol=1e-12)


def test_forward_intermediates_are_the_stage_outputs():
    ref, ours = _small_pair()
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    want = _ref_stages(ref, x)
    checks.check_stage_maps(ours, x, want, [(2, 16, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3), (2, 64, 2, 2)])
    nhwc = ours.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NHWC", intermediates_only=True)
    assert torch.allclose(nhwc[0], want[1].permute(0, 2, 3, 1))
    assert torch.allclose(nhwc[1], ours.forward_features(x).permute(0, 2, 3, 1))
    _, early = ours.forward_intermediates(x, indices=[0], stop_early=True)
    assert len(early) == 1 and torch.allclose(early[0], want[0])
    assert [(f["num_chs"], f["reduction"]) for f in ours.feature_info] == [(16, 4), (32, 8), (32, 16), (64, 32)]
    assert ours.prune_intermediate_layers([0, 1]) == [0, 1] and len(ours.stages) == 2
    got = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.allclose(g, w) for g, w in zip(got, want[:2]))


def test_head_conventions_and_round_trip():
    _, ours = _small_pair()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    feats = ours.forward_features(x)
    assert feats.shape == (2, 64, 2, 2)
    pooled = ours.forward_head(feats, pre_logits=True)
    assert torch.allclose(pooled, feats.mean((2, 3))) and torch.allclose(ours(x), ours.get_classifier()(pooled))
    other = BiFormer(**SMALL, auto_pad=True).double().eval()
    other.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(other(x), ours(x))
    ours.reset_classifier(0, global_pool="")
    assert ours(x).shape == (2, 64, 2, 2)
    m = BiFormer(**{**SMALL, "num_classes": 0}, drop_path_rate=0.5).train()
    x32 = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    a = m(x32)
    torch.manual_seed(2)
    assert a.shape == (4, 64) and not torch.allclose(a, m(x32))  # stochastic depth acts in training


def test_unpadded_sizes_must_fit_the_regions():
    m = BiFormer(**SMALL)
    with pytest.raises(ValueError, match="multiples of n_win"):
        m(torch.randn(1, 3, 60, 64))


@pytest.mark.parametrize("kw, match", [
    (dict(depth=[1, 1, 1]), "depth"),
    (dict(embed_dim=[15, 32, 32, 64]), "even"),
    (dict(topks=[0, 2, 3, -2]), "topk"),
    (dict(qk_dims=[16, 24, 32, 64]), "multiple"),  # 3 heads for 32 channels
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(global_pool="token"), "global_pool"),
    (dict(num_classes=-2), "num_classes"),
    (dict(mlp_ratios=[2, 2, 0, 2]), "mlp_ratios"),
])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        BiFormer(**{**SMALL, **kw})


# ---- through timm ------------------------------------------------------------------------------------------------


def test_timm_create_model_and_features_only():
    timm = import_timm()
    ref, _ = _pair(num_classes=10)
    m = timm.create_model(NAME, num_classes=10).eval()
    assert type(m) is BiFormer and m.pretrained_cfg["first_conv"] == "downsample_layers.0.0"
    m.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert (m(x) - ref(x)).abs().max() <= 1e-5
        want = _ref_stages(ref, x)
    f = timm.create_model(NAME, features_only=True, out_indices=(0, 2)).eval()
    kept = f.model.state_dict()
    assert set(kept) <= set(ref.state_dict()) and not any(k.startswith(("head", "norm.", "stages.3")) for k in kept)
    f.model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in kept}, strict=True)
    assert f.feature_info.channels() == [64, 256] and f.feature_info.reduction() == [4, 16]
    with torch.no_grad():
        got = f(x)
    assert (got[0] - want[0]).abs().max() <= 1e-5 and (got[1] - want[2]).abs().max() <= 1e-5


def test_timm_pretrained_from_an_official_style_checkpoint(tmp_path):
    timm = import_timm()
    ref, _ = _pair()
    torch.save({"model": ref.state_dict()}, tmp_path / "biformer_tiny_in1k.pth")  # the official file's layout
    m = timm.create_model(NAME, pretrained=True,
                          pretrained_cfg_overlay={"file": str(tmp_path / "biformer_tiny_in1k.pth")})
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert (m.eval()(x) - ref(x)).abs().max() <= 1e-5
