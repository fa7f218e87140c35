"""GC ViT backbones (``nearfar.models.vision.gcvit``) against timm's ``GlobalContextVit``: created through
``timm.create_model`` by the nearfar name, timm's state dict loads strictly, and logits, gradients, features_only maps,
intermediates and head outputs equal timm's on the same weights (random init, float32). Tiny configurations
(timm's own class takes the same arguments) plus the real ``gcvit_xxtiny`` at 224x224; the timm-free tests run
without timm (``create_backbone``)."""

from __future__ import annotations

import importlib

import backbone_checks as checks
import pytest
import torch
from timm_required import timm_or_none

import nearfar.models.vision.gcvit as gcvit_module
from nearfar.models.vision import backbones, create_backbone
from nearfar.models.vision.gcvit import GlobalContextViT

timm = timm_or_none()
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (NEARFAR_REQUIRE_TIMM=1 makes it fail)")

#: a tiny GC ViT (64x64 input: windows 2, 2, 4, 2; query generators of 3, 2, 0, 0 levels), both global and local
#: blocks in every stage
TINY = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), mlp_ratio=2.0)


def _timm_gcvit(**kw):
    """timm's GC ViT built as its ``gcvit_xxtiny`` entrypoint builds it, with any depths (the entrypoint fixes them)."""
    return importlib.import_module("timm.models.gcvit")._create_gcvit("gcvit_xxtiny", **kw)


def _pair(**kw):
    torch.manual_seed(0)
    return checks.load_pair(_timm_gcvit(**{**TINY, **kw}), timm.create_model("nearfar_gcvit_xxtiny", **{**TINY, **kw}))


def _images(b=3, size=64, seed=1):
    return checks.images(b, size, seed)


@needs_timm
def test_tiny_strict_load_and_logits_equal_timm():
    ref, ours = _pair(num_classes=11)
    assert isinstance(ours, GlobalContextViT)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = _images()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert b.shape == (3, 11)
    assert (a - b).abs().max() <= 1e-5


@needs_timm
def test_real_gcvit_xxtiny_at_224_equals_timm():
    ref, ours = (timm.create_model(n) for n in ("gcvit_xxtiny", "nearfar_gcvit_xxtiny"))
    checks.check_real_model(ref, ours, {"first_conv": "stem.conv1", "classifier": "head.fc"})


@needs_timm
def test_gradients_equal_timm():
    ref, ours = _pair(num_classes=7)
    ref.train(), ours.train()
    x = _images(2)
    go = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    want, got = checks.grads(ref, x, go), checks.grads(ours, x, go)
    checks.assert_grads_equal(want, got, rtol=1e-4, floor=1e-3)
    assert (got["input"] - want["input"]).abs().max() <= 1e-4 * float(want["input"].abs().max())  # no floor


@needs_timm
def test_features_only_maps_equal_timm():
    kw = dict(TINY, features_only=True, out_indices=(0, 1, 2, 3))
    x = _images(2)
    ref, ours = checks.check_features_only(
        lambda n: _timm_gcvit(**kw) if n == "gcvit_xxtiny" else timm.create_model(n, **kw), "nearfar_gcvit_xxtiny",
        "gcvit_xxtiny", x, 4, absolute=True)  # NCHW, as timm's
    assert ours.feature_info.channels() == [16, 32, 64, 128] and ours.feature_info.reduction() == [4, 8, 16, 32]
    torch.manual_seed(0)
    some = timm.create_model("nearfar_gcvit_xxtiny", **{**kw, "out_indices": (1, 3)})
    assert [f.shape[1] for f in some(x)] == [32, 128]


@needs_timm
def test_head_intermediates_and_classifier_reset_follow_timm():
    ref, ours = _pair(num_classes=5)
    x = _images(2)
    checks.check_bad_intermediate_indices(ours, x, 4)
    assert ours.no_weight_decay() == ref.no_weight_decay() and len(ours.no_weight_decay()) == 8
    checks.check_head_and_reset(ref, ours, x, "head.fc", "head.fc", (2, 128, 2, 2), (2, 16, 16, 16))


@needs_timm
@pytest.mark.parametrize("pool", ["avgmax", "catavgmax"])
def test_pooling_variants_equal_timm(pool):
    ref, ours = _pair(num_classes=4, global_pool=pool)
    x = _images(2)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max() <= 1e-5


@needs_timm
def test_num_classes_zero_and_drop_path_through_timm():
    ref, ours = _pair(num_classes=0)
    x = _images(2)
    with torch.no_grad():
        assert ours(x).shape == (2, 128) and (ours(x) - ref(x)).abs().max() <= 1e-5
    torch.manual_seed(0)
    m = timm.create_model("nearfar_gcvit_xxtiny", **TINY, drop_path_rate=0.3, drop_rate=0.1).train()
    m(x).sum().backward()
    assert m.stages[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.3)  # timm's attribute name
    assert all(p.grad is not None for p in m.parameters())


def test_create_backbone_without_timm():
    assert "nearfar_gcvit_xxtiny" in backbones() and backbones()["nearfar_gcvit_xxtiny"].timm_name == "gcvit_xxtiny"
    torch.manual_seed(0)
    m = create_backbone("nearfar_gcvit_xxtiny", **TINY, num_classes=6)
    # each image on its own gives its own logits (the global queries of image b go to image b's windows)
    assert checks.check_per_image(m, _images(2)).shape == (2, 6)
    # the real variant's layout: 226 tensors, the real widths and stage windows
    real = create_backbone("nearfar_gcvit_xxtiny")
    assert len(real.state_dict()) == 226 and real.num_features == 512
    assert [s.window_size for s in real.stages] == [(7, 7), (7, 7), (14, 14), (7, 7)]
    assert [s.global_block.levels for s in real.stages] == [3, 2, 0, 0]


def test_grad_checkpointing_is_refused():
    m = create_backbone("nearfar_gcvit_xxtiny", **TINY)
    m.set_grad_checkpointing(False)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        m.set_grad_checkpointing(True)


def test_other_input_sizes_run():
    # timm requires the size it was built for; here maps the windows do not divide get masked edge windows and the
    # global queries are resized to the window (NVlabs' detection code)
    torch.manual_seed(0)
    m = create_backbone("nearfar_gcvit_xxtiny", **TINY, num_classes=3).eval()
    with torch.no_grad():
        out = m(_images(1, 96))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("kw, err, match", [
    (dict(attn_drop_rate=0.1), ValueError, "attn_drop_rate"),
    (dict(global_pool="mean"), ValueError, "global_pool"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(embed_dim=0), ValueError, "embed_dim"),
    (dict(num_heads=(1, 2)), ValueError, "num_heads"),
    (dict(window_size=(7, 7)), ValueError, "window_size"),
    (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
    (dict(mlp_ratio=0), ValueError, "mlp_ratio"),
    (dict(depths=(2, 0, 2, 2)), ValueError, "depths"),
    (dict(num_heads=(1, 3, 2, 4)), ValueError, "multiple"),
    (dict(depths=3), TypeError, "depths"),
])
def test_bad_arguments_raise_clear_errors(kw, err, match):
    with pytest.raises(err, match=match):
        GlobalContextViT(**{**TINY, **kw})


def test_docstring_examples_run():
    checks.check_doctests(gcvit_module, 2)
