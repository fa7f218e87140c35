"""GC ViT backbones (``nearfar.models.vision.gcvit``) against timm's ``GlobalContextVit``: created through
``timm.create_model`` by the nearfar name, timm's state dict loads strictly, and logits, gradients, features_only maps,
intermediates and head outputs equal timm's on the same weights (random init, float32). Tiny configurations
(timm's own class takes the same arguments) plus the real ``gcvit_xxtiny`` at 224x224; the timm-free tests run
without timm (``create_backbone``)."""

from __future__ import annotations

import importlib

import pytest
import torch
from timm_required import timm_or_none

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
    ref = _timm_gcvit(**{**TINY, **kw})
    ours = timm.create_model("nearfar_gcvit_xxtiny", **{**TINY, **kw})
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _images(b=3, size=64, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


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
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = _images(2, 224)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert b.shape == (2, 1000) and (a - b).abs().max() <= 1e-5
    assert ours.pretrained_cfg["first_conv"] == "stem.conv1" and ours.pretrained_cfg["classifier"] == "head.fc"
    assert ours.feature_info == ref.feature_info


@needs_timm
def test_gradients_equal_timm():
    ref, ours = _pair(num_classes=7)
    ref.train(), ours.train()
    x = _images(2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    go = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))
    (ref(xa) * go).sum().backward()
    (ours(xb) * go).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g = theirs[name].grad
        assert p.grad is not None, name
        assert (p.grad - g).abs().max() <= 1e-4 * max(1e-3, float(g.abs().max())), name
    assert (xa.grad - xb.grad).abs().max() <= 1e-4 * float(xa.grad.abs().max())


@needs_timm
def test_features_only_maps_equal_timm():
    torch.manual_seed(0)
    kw = dict(TINY, features_only=True, out_indices=(0, 1, 2, 3))
    ref, ours = _timm_gcvit(**kw), timm.create_model("nearfar_gcvit_xxtiny", **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.feature_info.channels() == ref.feature_info.channels() == [16, 32, 64, 128]
    assert ours.feature_info.reduction() == [4, 8, 16, 32]
    x = _images(2)
    with torch.no_grad():
        fa, fb = ref.eval()(x), ours.eval()(x)
    assert len(fa) == len(fb) == 4
    for a, b in zip(fa, fb):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5  # NCHW, as timm's
    torch.manual_seed(0)
    some = timm.create_model("nearfar_gcvit_xxtiny", **{**kw, "out_indices": (1, 3)})
    assert [f.shape[1] for f in some(x)] == [32, 128]


@needs_timm
def test_head_intermediates_and_classifier_reset_follow_timm():
    ref, ours = _pair(num_classes=5)
    x = _images(2)
    with torch.no_grad():
        fa, fb = ref.forward_features(x), ours.forward_features(x)
        assert (fa - fb).abs().max() <= 1e-5 and fb.shape == (2, 128, 2, 2)
        pa, pb = ref.forward_head(fa, pre_logits=True), ours.forward_head(fb, pre_logits=True)
        assert pb.shape == (2, 128) and (pa - pb).abs().max() <= 1e-5
        (la, ia), (lb, ib) = ref.forward_intermediates(x, indices=2), ours.forward_intermediates(x, indices=2)
        assert (la - lb).abs().max() <= 1e-5 and len(ib) == 2
        for a, b in zip(ia, ib):
            assert (a - b).abs().max() <= 1e-5
        only = ours.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
        assert len(only) == 1 and only[0].shape == (2, 16, 16, 16)
    assert ours.get_classifier() is ours.head.fc and ours.get_classifier().out_features == 5
    ours.reset_classifier(0)
    assert isinstance(ours.get_classifier(), torch.nn.Identity) and ours.num_classes == 0
    with torch.no_grad():
        assert (ours(x) - pa).abs().max() <= 1e-5  # pooled features
    ours.reset_classifier(3, "max")
    ref.reset_classifier(3, "max")
    ours.head.fc.load_state_dict(ref.head.fc.state_dict())
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
    ours.reset_classifier(0, "")
    with torch.no_grad():
        assert ours(x).shape == (2, 128, 2, 2)  # no pooling: the map


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
    m = create_backbone("nearfar_gcvit_xxtiny", **TINY, num_classes=6).eval()
    x = _images(2)
    with torch.no_grad():
        out = m(x)
        # each image on its own gives its own logits (the global queries of image b go to image b's windows)
        one = torch.cat([m(x[i:i + 1]) for i in range(2)])
    assert out.shape == (2, 6) and (out - one).abs().max() <= 1e-5
    # the real variant's layout: 226 tensors, the real widths and stage windows
    real = create_backbone("nearfar_gcvit_xxtiny")
    assert len(real.state_dict()) == 226 and real.num_features == 512
    assert [s.window_size for s in real.stages] == [(7, 7), (7, 7), (14, 14), (7, 7)]
    assert [s.global_block.levels for s in real.stages] == [3, 2, 0, 0]


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
    import doctest

    import nearfar.models.vision.gcvit as module

    torch.manual_seed(0)
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 2 and result.failed == 0
