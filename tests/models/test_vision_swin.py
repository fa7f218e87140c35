"""Swin-T backbone (``nearfar.models.vision.swin``) against timm's ``SwinTransformer``: built by name through
``timm.create_model``, a timm state dict loads strictly, and with the same weights the logits, gradients,
``features_only`` maps, ``forward_intermediates`` and the classifier API equal timm's (float32). The tests that need
timm skip without it (fail with ``NEARFAR_REQUIRE_TIMM=1``); the others run everywhere (``create_backbone``)."""

from __future__ import annotations

import functools

import backbone_checks as checks
import pytest
import torch
from timm_required import import_timm

import nearfar.models.vision.swin as swin_module
from nearfar.models.vision import create_backbone
from nearfar.models.vision.swin import SwinTransformer

NAME, TIMM_NAME = "nearfar_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224"
# a small Swin: 16x16 patches, windows of 4 (stages 0-1 shifted, stage 2 one 4x4 window, stage 3 clipped to 2x2)
TINY = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
images, close = checks.images, checks.close


class TestSwinLikeTimm(checks.TimmBackboneSuite):
    NAME, TIMM_NAME, CLS, MODULE, TINY = NAME, TIMM_NAME, SwinTransformer, swin_module, TINY
    CFG = {"classifier": "head.fc"}
    CALLS_PER_BLOCK = 1
    FEATS_SHAPE = (3, 2, 2, 128)  # NHWC
    NUM_FEATURES, INTERMEDIATES = 128, 4


@pytest.fixture(scope="module")
def timm():
    return import_timm()


pair = functools.partial(checks.timm_pair, name=NAME, timm_name=TIMM_NAME)  # pair(timm, **kw): timm's, ours


# ---------------------------------------------------------------- with timm


def test_gradients_equal_timms(timm):
    ref, ours = pair(timm, num_classes=5, drop_path_rate=0.0, **TINY)
    ref.train(), ours.train()
    x = images(2)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    checks.assert_grads_equal(checks.grads(ref, x, g), checks.grads(ours, x, g), rtol=1e-4, floor=1e-3)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_features_only_equals_timms(timm, out_indices):
    # NHWC maps, as timm's
    checks.check_features_only(lambda n: timm.create_model(n, features_only=True, out_indices=out_indices, **TINY),
                               NAME, TIMM_NAME, images(2), len(out_indices))


def test_intermediates_only(timm):
    _, ours = pair(timm, **TINY)
    with torch.no_grad():
        only = ours.forward_intermediates(images(2), indices=1, intermediates_only=True)
    assert len(only) == 1 and only[0].shape == (2, 128, 2, 2)


def test_classifier_api_equals_timms(timm):
    ref, ours = pair(timm, num_classes=0, **TINY)
    x = images(2)
    with torch.no_grad():
        close(ours(x), ref(x))
        assert ours(x).shape == (2, 128)
        for m in (ref, ours):
            m.reset_classifier(9, "max")
            m.head.fc.weight.data.copy_(torch.linspace(-1, 1, 9 * 128).view(9, 128))
            m.head.fc.bias.data.zero_()
        close(ours(x), ref(x))
        assert ours.get_classifier().out_features == 9 and ours.num_classes == 9
        for m in (ref, ours):
            m.reset_classifier(0, "")
        close(ours(x), ref(x))  # no pooling: the NHWC map
        assert ours(x).shape == (2, 2, 2, 128)
        assert ours.no_weight_decay() == ref.no_weight_decay()


# ---------------------------------------------------------------- without timm


def tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    return create_backbone(NAME, **{**TINY, "num_classes": 5, **kw})


def test_create_backbone_without_timm_runs_and_trains():
    m = tiny()
    x = images(2)
    assert m(x).shape == (2, 5)
    assert [f["num_chs"] for f in m.feature_info] == [16, 32, 64, 128]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_other_input_sizes_and_grad_checkpointing():
    m = tiny(drop_path_rate=0.0).eval()
    with torch.no_grad():
        assert m(images(1, 96)).shape == (1, 5)  # windows re-clipped to the larger map
    checks.check_grad_checkpointing(m, images(2), rtol=1e-5)


@pytest.mark.parametrize("kw, err, match", [
    (dict(depths=(2, 2), num_heads=(1,)), ValueError, "equal length"),
    (dict(depths=(2, 0)), ValueError, "depths"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(global_pool="mean"), ValueError, "global_pool"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(attn_drop_rate=0.1), ValueError, "attn_drop_rate"),
    (dict(drop_path_rate=1.5), ValueError, "drop_path_rate"),
    (dict(window_size=0), ValueError, "window_size"),
    (dict(bogus=1), ValueError, "bogus"),
    (dict(patch_size=2.0), TypeError, "patch_size"),
])
def test_bad_arguments_raise(kw, err, match):
    with pytest.raises(err, match=match):
        create_backbone(NAME, **{**TINY, **kw})
    with pytest.raises(KeyError, match="nearfar_swin"):
        create_backbone("nearfar_swin_nope")
