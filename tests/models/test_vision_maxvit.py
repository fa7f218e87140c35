"""MaxViT-T backbone (``nearfar.models.vision.maxvit``) against timm's ``MaxxVit`` (``maxvit_tiny_tf_224``): built by
name through ``timm.create_model``, a timm state dict loads strictly, and with the same weights the logits,
gradients, ``features_only`` maps, ``forward_intermediates`` and the classifier API equal timm's (float32). The
tests that need timm skip without it (fail with ``NEARFAR_REQUIRE_TIMM=1``); the others run everywhere."""

from __future__ import annotations

import functools

import backbone_checks as checks
import pytest
import torch
from timm_required import import_timm

import nearfar.models.vision.maxvit as maxvit_module
from nearfar.models.vision import create_backbone
from nearfar.models.vision.maxvit import MaxViT
from nearfar.models.vision.parts import same_pad

NAME, TIMM_NAME = "nearfar_maxvit_tiny_tf_224", "maxvit_tiny_tf_224"
# a small MaxViT: 64x64 input, windows and grids of 2x2 on maps of 16, 8, 4 and 2
TINY = dict(img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 2, 1), stem_width=16, head_hidden_size=64)
images, close = checks.images, checks.close


class TestMaxViTLikeTimm(checks.TimmBackboneSuite):
    NAME, TIMM_NAME, CLS, MODULE, TINY = NAME, TIMM_NAME, MaxViT, maxvit_module, TINY
    CFG = {"first_conv": "stem.conv1"}
    CALLS_PER_BLOCK = 2  # block and grid attention
    FEATS_SHAPE = (3, 64, 2, 2)  # NCHW
    NUM_FEATURES, INTERMEDIATES = 64, 5  # the stem and four stages


@pytest.fixture(scope="module")
def timm():
    return import_timm()


pair = functools.partial(checks.timm_pair, name=NAME, timm_name=TIMM_NAME)  # pair(timm, **kw): timm's, ours


# ---------------------------------------------------------------- with timm


def test_gradients_equal_timms(timm):
    ref, ours = pair(timm, num_classes=5, **TINY)
    ref.train(), ours.train()  # BatchNorm on batch statistics
    x = images(2)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    want, got = checks.grads(ref, x, g), checks.grads(ours, x, g)
    # a convolution bias ahead of a BatchNorm in training has a zero gradient up to rounding (~1e-7): the relative
    # tolerance is taken against 1% of the largest gradient at least
    checks.assert_grads_equal(want, got, rtol=1e-4, floor=1e-2 * max(w.abs().max().item() for w in want.values()))
    checks.assert_state_dicts_close(ref, ours)  # the BatchNorm running statistics moved alike


@pytest.mark.parametrize("out_indices", [None, (1, 4)])
def test_features_only_equals_timms(timm, out_indices):
    kw = {} if out_indices is None else {"out_indices": out_indices}
    # NCHW maps, stem first
    checks.check_features_only(lambda n: timm.create_model(n, features_only=True, **kw, **TINY), NAME, TIMM_NAME,
                               images(2), 5 if out_indices is None else 2)


def test_classifier_api_equals_timms(timm):
    ref, ours = pair(timm, num_classes=0, **TINY)
    x = images(2)
    with torch.no_grad():
        close(ours(x), ref(x))
        assert ours(x).shape == (2, 64)
        for pool in ("max", ""):  # no pooling: the head's Linears become 1x1 convolutions (weights kept)
            for m in (ref, ours):
                m.reset_classifier(9, pool)
                torch.manual_seed(5)
                torch.nn.init.normal_(m.head.fc.weight)
                torch.nn.init.normal_(m.head.fc.bias)
            close(ours(x), ref(x))
        assert ours(x).shape == (2, 9, 2, 2)
        for m in (ref, ours):
            m.reset_classifier(4, "avg", reset_other=True)
            torch.manual_seed(6)
            torch.nn.init.normal_(m.head.fc.weight)
            torch.nn.init.normal_(m.head.fc.bias)
        close(ours(x), ref(x))
        assert ours.get_classifier().out_features == 4 and ours.num_classes == 4
        assert ours.no_weight_decay() == ref.no_weight_decay()


def test_linear_head_variant_equals_timms(timm):
    ref, ours = pair(timm, num_classes=3, **{**TINY, "head_hidden_size": None})
    x = images(2)
    with torch.no_grad():
        close(ours(x), ref(x))


def test_same_padding_equals_timms(timm):
    from timm.layers.padding import pad_same

    for n in range(3, 10):
        x = torch.randn(1, 1, n, n + 1)
        for k, s in ((2, 2), (3, 2), (3, 1), (4, 3)):
            assert torch.equal(same_pad(x, (k, k), (s, s)), pad_same(x, (k, k), (s, s)))


# ---------------------------------------------------------------- without timm


def tiny(**kw) -> MaxViT:
    torch.manual_seed(0)
    return create_backbone(NAME, **{**TINY, "num_classes": 5, **kw})


def test_create_backbone_without_timm_trains_and_checkpoints():
    m = tiny()
    assert [f["num_chs"] for f in m.feature_info] == [16, 32, 32, 64, 64]
    assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 16, 32]
    checks.check_grad_checkpointing(m, images(2), rtol=1e-4)
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("kw, err, match", [
    (dict(depths=(1, 1), embed_dim=(32,)), ValueError, "equal length"),
    (dict(embed_dim=(32, 32, 48, 64)), ValueError, "multiples of the head dim"),
    (dict(depths=(1, 0, 1, 1)), ValueError, "depths"),
    (dict(global_pool="mean"), ValueError, "global_pool"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(transformer_attn_drop=0.1), ValueError, "transformer_attn_drop"),
    (dict(drop_path_rate=-0.1), ValueError, "drop_path_rate"),
    (dict(transformer_window_size=0), ValueError, "transformer_window_size"),
    (dict(bogus=1), ValueError, "bogus"),
    (dict(stem_width=16.0), TypeError, "stem_width"),
])
def test_bad_arguments_raise(kw, err, match):
    with pytest.raises(err, match=match):
        create_backbone(NAME, **{**TINY, **kw})
