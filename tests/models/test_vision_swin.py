"""Swin-T backbone (``nearfar.models.vision.swin``) against timm's ``SwinTransformer``: built by name through
``timm.create_model``, a timm state dict loads strictly, and with the same weights the logits, gradients,
``features_only`` maps, ``forward_intermediates`` and the classifier API equal timm's (float32). The tests that need
timm skip without it (fail with ``NEARFAR_REQUIRE_TIMM=1``); the others run everywhere (``create_backbone``)."""

from __future__ import annotations

import doctest
import importlib
from types import ModuleType

import pytest
import torch
from timm_required import import_timm

import nearfar.models.vision.swin as swin_module
from nearfar.functional import observe_calls
from nearfar.models.vision import backbones, create_backbone
from nearfar.models.vision.swin import SwinTransformer

NAME, TIMM_NAME = "nearfar_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224"
# a small Swin: 16x16 patches, windows of 4 (stages 0-1 shifted, stage 2 one 4x4 window, stage 3 clipped to 2x2)
TINY = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
TOL = 1e-5


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    mod = import_timm()
    importlib.import_module("nearfar.integrations.timm")  # registers the nearfar names
    return mod


def pair(timm: ModuleType, seed: int = 0, **kw):
    """timm's model and nearfar's with timm's weights (strict load), both in eval mode."""
    torch.manual_seed(seed)
    ref = timm.create_model(TIMM_NAME, **kw).eval()
    ours = timm.create_model(NAME, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# ---------------------------------------------------------------- with timm


def test_real_swin_t_loads_timm_strictly_and_equals_its_logits(timm):
    ref, ours = pair(timm)
    assert type(ours) is SwinTransformer and ours.pretrained_cfg["classifier"] == "head.fc"
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = images(1, 224)
    with torch.no_grad():
        close(ours(x), ref(x))


def test_tiny_logits_features_and_head_equal_timms(timm):
    ref, ours = pair(timm, num_classes=7, **TINY)
    x = images(3)
    with torch.no_grad(), observe_calls() as calls:
        feats = ours.forward_features(x)
    assert len(calls) == sum(TINY["depths"])  # every block's attention runs on nearfar
    with torch.no_grad():
        close(feats, ref.forward_features(x))
        assert feats.shape == (3, 2, 2, 128)  # NHWC
        close(ours.forward_head(feats), ref.forward_head(feats))
        pre = ours.forward_head(feats, pre_logits=True)
        close(pre, ref.forward_head(feats, pre_logits=True))
        assert pre.shape == (3, ours.num_features) == (3, 128)
        close(ours(x), ref(x))


def test_gradients_equal_timms(timm):
    ref, ours = pair(timm, num_classes=5, drop_path_rate=0.0, **TINY)
    ref.train(), ours.train()
    x = images(2)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for n, want in grads[0].items():
        got = grads[1][n]
        assert got is not None, n
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * max(want.abs().max().item(), 1e-3), (n, err)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_features_only_equals_timms(timm, out_indices):
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAME, features_only=True, out_indices=out_indices, **TINY).eval()
    ours = timm.create_model(NAME, features_only=True, out_indices=out_indices, **TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    x = images(2)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == len(want) == len(out_indices)
    for a, b in zip(got, want):
        close(a, b)  # NHWC maps, as timm's


def test_forward_intermediates_equal_timms(timm):
    ref, ours = pair(timm, **TINY)
    x = images(2)
    with torch.no_grad():
        for kw in (dict(), dict(indices=2, norm=True), dict(indices=[0, 2], stop_early=True)):
            final, inter = ours.forward_intermediates(x, **kw)
            final_ref, inter_ref = ref.forward_intermediates(x, **kw)
            close(final, final_ref)
            assert len(inter) == len(inter_ref)
            for a, b in zip(inter, inter_ref):
                close(a, b)
        only = ours.forward_intermediates(x, indices=1, intermediates_only=True)
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


def test_registered_with_timm(timm):
    assert NAME in timm.list_models("nearfar_*")
    assert backbones()[NAME].timm_name == TIMM_NAME
    with pytest.raises(ValueError, match="no weights"):
        timm.create_model(NAME, pretrained=True)


# ---------------------------------------------------------------- without timm


def tiny(**kw) -> SwinTransformer:
    torch.manual_seed(0)
    return create_backbone(NAME, **{**TINY, "num_classes": 5, **kw})


def test_docstring_examples_run():
    result = doctest.testmod(swin_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


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
    m.train()
    x = images(2)
    m(x).sum().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6)


def test_drop_path_only_in_training():
    m = tiny(drop_path_rate=0.5)
    x = images(4)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        assert not torch.equal(a, m(x))


def test_state_dict_round_trip():
    a, b = tiny(), create_backbone(NAME, **{**TINY, "num_classes": 5})
    b.load_state_dict(a.state_dict(), strict=True)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


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
