"""SHViT backbones (``nearfar.models.vision.shvit``) against timm's ``SHViT``: created through ``timm.create_model``
by the nearfar name, timm's state dict (BatchNorm running statistics included) loads strictly, and logits (eval and
train mode), gradients, features_only maps, intermediates and head outputs equal timm's on the same weights (float32).
Tiny configurations plus the real ``shvit_s1`` at 224x224; the timm-free tests run without timm
(``create_backbone``)."""

from __future__ import annotations

import backbone_checks as checks
import pytest
import torch
from timm_required import timm_or_none

import nearfar.models.vision.shvit as shvit_module
from nearfar.models.vision import backbones, create_backbone
from nearfar.models.vision.shvit import SHViT

timm = timm_or_none()
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (NEARFAR_REQUIRE_TIMM=1 makes it fail)")

#: a tiny SHViT: attention in the second and third stages (as S1), 64x64 input -> 4x4, 2x2, 1x1 maps
TINY = dict(embed_dim=(16, 24, 32), partial_dim=(4, 6, 8), qk_dim=(4, 4, 4), depth=(1, 2, 2), types=("i", "s", "s"))


def _images(b=4, size=64, seed=1):
    return checks.images(b, size, seed)


def _trained(model):
    """Running statistics and BatchNorm affine parameters away from their initial values (several start at 0)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.train()
        for s in (1.0, 2.0):
            model(_images(4, 64, 9) * s)
        for name, p in model.named_parameters():
            if ".bn." in name or "pre_norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _pair(name="shvit_s1", **kw):
    torch.manual_seed(0)
    ref = _trained(timm.create_model(name, **{**TINY, **kw}))
    return checks.load_pair(ref, timm.create_model("nearfar_" + name, **{**TINY, **kw}))


@needs_timm
def test_tiny_strict_load_and_logits_equal_timm():
    ref, ours = _pair(num_classes=9)
    assert isinstance(ours, SHViT) and set(ours.state_dict()) == set(ref.state_dict())
    x = _images()
    with torch.no_grad():
        a, b = ref(x), ours(x)
        assert b.shape == (4, 9) and a.abs().max() > 1e-2
        assert (a - b).abs().max() <= 1e-5  # eval: running statistics (folded into the convs here)
        ref.train(), ours.train()
        a, b = ref(x), ours(x)  # train: batch statistics
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
    for (n, r), o in zip(ref.state_dict().items(), ours.state_dict().values()):  # the running statistics moved alike
        assert torch.allclose(r.double(), o.double(), atol=1e-5), n


@needs_timm
def test_every_stage_with_attention_and_other_pools():
    ref, ours = _pair(num_classes=3, types=("s", "s", "s"), global_pool="avgmax")
    x = _images(3)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max() <= 1e-5


@needs_timm
def test_real_shvit_s1_at_224_equals_timm():
    torch.manual_seed(0)
    ref, ours = timm.create_model("shvit_s1"), timm.create_model("nearfar_shvit_s1")
    checks.check_real_model(_trained(ref), ours, {"first_conv": "patch_embed.0.c", "classifier": "head.l"})


@needs_timm
def test_gradients_equal_timm():
    # eval mode (running statistics; folded into the convs here), float32, against timm's float32
    ref, ours = _pair(num_classes=7)
    x, go = _images(4, 128), torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    checks.assert_grads_equal(checks.grads(ref, x, go), checks.grads(ours, x, go), rtol=1e-4, floor=1e-3)


@needs_timm
def test_training_mode_gradients_equal_timm_in_float64():
    # train mode (batch statistics) in float64: in float32 the tiny maps' batch statistics and ReLU kinks make both
    # models' gradients differ from the float64 ones by ~1e-4 relative, so the comparison is made in float64
    ref, ours = _pair(num_classes=7)
    ref.double().train(), ours.double().train()
    x, go = _images(3).double(), torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    checks.assert_grads_equal(checks.grads(ref, x, go), checks.grads(ours, x, go), rtol=1e-9, floor=1.0)


@needs_timm
def test_features_only_maps_equal_timm():
    kw = dict(TINY, features_only=True)
    x = _images(2, 96)
    _, ours = checks.check_features_only(
        lambda n: _trained(timm.create_model(n, **kw)) if n == "shvit_s1" else timm.create_model(n, **kw),
        "nearfar_shvit_s1", "shvit_s1", x, 3, absolute=True)  # NCHW shapes, as timm's
    assert ours.feature_info.channels() == [16, 24, 32] and ours.feature_info.reduction() == [16, 32, 64]
    torch.manual_seed(0)
    some = timm.create_model("nearfar_shvit_s1", **{**kw, "out_indices": (2,)})
    assert [f.shape[1] for f in some(x)] == [32]


@needs_timm
def test_head_intermediates_and_classifier_reset_follow_timm():
    ref, ours = _pair(num_classes=5)
    x = _images(2, 128)
    checks.check_bad_intermediate_indices(ours, x, 3)
    checks.check_head_and_reset(ref, ours, x, "head.l", "head", (2, 32, 2, 2), (2, 16, 8, 8))


@needs_timm
def test_num_classes_zero_and_drop_rate_through_timm():
    ref, ours = _pair(num_classes=0)
    x = _images(2)
    with torch.no_grad():
        assert ours(x).shape == (2, 32) and (ours(x) - ref(x)).abs().max() <= 1e-5
    torch.manual_seed(0)
    m = timm.create_model("nearfar_shvit_s1", **TINY, drop_rate=0.2).train()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_create_backbone_without_timm():
    assert "nearfar_shvit_s1" in backbones() and backbones()["nearfar_shvit_s1"].timm_name == "shvit_s1"
    torch.manual_seed(0)
    m = create_backbone("nearfar_shvit_s1", **TINY, num_classes=6)
    assert checks.check_per_image(m, _images(3)).shape == (3, 6)  # eval: no image affects another
    real = create_backbone("nearfar_shvit_s1")
    assert len(real.state_dict()) == 471 and real.num_features == 320
    assert [len(s.blocks) for s in real.stages] == [2, 4, 5]
    assert [s.blocks[0].mixer.m.pdim for s in real.stages[1:]] == [48, 68]


def test_docstring_examples_run():
    checks.check_doctests(shvit_module, 2)


@pytest.mark.parametrize("kw, err, match", [
    (dict(global_pool="catavgmax"), ValueError, "global_pool"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(embed_dim=(12, 24, 32)), ValueError, "multiple of 8"),
    (dict(partial_dim=(4, 6)), ValueError, "partial_dim"),
    (dict(partial_dim=(4, 30, 8)), ValueError, "partial_dim"),
    (dict(types=("i", "x", "s")), ValueError, "types"),
    (dict(depth=(1, 0, 1)), ValueError, "depth"),
    (dict(drop_rate=1.0), ValueError, "drop_rate"),
    (dict(embed_dim=16), TypeError, "embed_dim"),
])
def test_bad_arguments_raise_clear_errors(kw, err, match):
    with pytest.raises(err, match=match):
        SHViT(**{**TINY, **kw})
