"""MaxViT-T backbone (``nearfar.models.vision.maxvit``) against timm's ``MaxxVit`` (``maxvit_tiny_tf_224``): built by
name through ``timm.create_model``, a timm state dict loads strictly, and with the same weights the logits,
gradients, ``features_only`` maps, ``forward_intermediates`` and the classifier API equal timm's (float32). The
tests that need timm skip without it (fail with ``NEARFAR_REQUIRE_TIMM=1``); the others run everywhere."""

from __future__ import annotations

import doctest
import importlib
from types import ModuleType

import pytest
import torch
from timm_required import import_timm

import nearfar.models.vision.maxvit as maxvit_module
from nearfar.functional import observe_calls
from nearfar.models.vision import backbones, create_backbone
from nearfar.models.vision.maxvit import MaxViT
from nearfar.models.vision.parts import same_pad

NAME, TIMM_NAME = "nearfar_maxvit_tiny_tf_224", "maxvit_tiny_tf_224"
# a small MaxViT: 64x64 input, windows and grids of 2x2 on maps of 16, 8, 4 and 2
TINY = dict(img_size=64, embed_dim=(32, 32, 64, 64), depths=(1, 1, 2, 1), stem_width=16, head_hidden_size=64)
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


def test_real_maxvit_t_loads_timm_strictly_and_equals_its_logits(timm):
    ref, ours = pair(timm)
    assert type(ours) is MaxViT and ours.pretrained_cfg["first_conv"] == "stem.conv1"
    assert set(ours.state_dict()) == set(ref.state_dict())  # BatchNorm buffers included
    x = images(1, 224)
    with torch.no_grad():
        close(ours(x), ref(x))


def test_tiny_logits_features_and_head_equal_timms(timm):
    ref, ours = pair(timm, num_classes=7, **TINY)
    x = images(3)
    with torch.no_grad(), observe_calls() as calls:
        feats = ours.forward_features(x)
    assert len(calls) == 2 * sum(TINY["depths"])  # block and grid attention of every block run on nearfar
    with torch.no_grad():
        close(feats, ref.forward_features(x))
        assert feats.shape == (3, 64, 2, 2)  # NCHW
        close(ours.forward_head(feats), ref.forward_head(feats))
        pre = ours.forward_head(feats, pre_logits=True)
        close(pre, ref.forward_head(feats, pre_logits=True))
        assert pre.shape == (3, 64)
        close(ours(x), ref(x))


def test_gradients_equal_timms(timm):
    ref, ours = pair(timm, num_classes=5, **TINY)
    ref.train(), ours.train()  # BatchNorm on batch statistics
    x = images(2)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    # a convolution bias ahead of a BatchNorm in training has a zero gradient up to rounding (~1e-7): the relative
    # tolerance is taken against 1% of the largest gradient at least
    floor = 1e-2 * max(g.abs().max().item() for g in grads[0].values())
    for n, want in grads[0].items():
        got = grads[1][n]
        assert got is not None, n
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * max(want.abs().max().item(), floor), (n, err)
    want_sd, got_sd = ref.state_dict(), ours.state_dict()
    for n in want_sd:  # the BatchNorm running statistics moved alike
        torch.testing.assert_close(got_sd[n], want_sd[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_indices", [None, (1, 4)])
def test_features_only_equals_timms(timm, out_indices):
    kw = {} if out_indices is None else {"out_indices": out_indices}
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAME, features_only=True, **kw, **TINY).eval()
    ours = timm.create_model(NAME, features_only=True, **kw, **TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    x = images(2)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == len(want) == (5 if out_indices is None else 2)
    for a, b in zip(got, want):
        close(a, b)  # NCHW maps, stem first


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


def test_registered_with_timm(timm):
    assert NAME in timm.list_models("nearfar_*")
    assert backbones()[NAME].timm_name == TIMM_NAME


# ---------------------------------------------------------------- without timm


def tiny(**kw) -> MaxViT:
    torch.manual_seed(0)
    return create_backbone(NAME, **{**TINY, "num_classes": 5, **kw})


def test_docstring_examples_run():
    result = doctest.testmod(maxvit_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def test_create_backbone_without_timm_trains_and_checkpoints():
    m = tiny()
    x = images(2)
    assert [f["num_chs"] for f in m.feature_info] == [16, 32, 32, 64, 64]
    assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 16, 32]
    m.train()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6)


def test_drop_path_only_in_training():
    m = tiny(drop_path_rate=0.5)
    x = images(4)
    with torch.no_grad():
        m.eval()
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
