"""Checks shared by the vision-backbone tests (``test_vision_*.py``): each takes the models (and the tolerances) a
test builds and asserts one property against a reference model, timm's or the official-style oracle, so that each
test states what it compares and the comparison is written once."""

from __future__ import annotations

import doctest
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

import pytest
import torch
from timm_required import import_timm
from torch import nn

from nearfar.functional import observe_calls
from nearfar.models.vision import backbones, create_backbone

TOL = 1e-5


def images(b: int = 2, size: int | tuple[int, int] = 64, seed: int = 1, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """A fixed batch of ``b`` random RGB images."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL, absolute: bool = False) -> None:
    """Same shape, and ``max |a - b| <= tol * max(1, max |b|)`` (``absolute``: ``<= tol``)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * (1.0 if absolute else max(1.0, b.abs().max().item())), err


def load_pair(ref: nn.Module, ours: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``ours`` with ``ref``'s weights (strict load); both in eval mode."""
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def timm_pair(timm: ModuleType, name: str, timm_name: str, seed: int = 0, **kw: Any) -> tuple[nn.Module, nn.Module]:
    """timm's ``timm_name`` and nearfar's ``name``, both by ``timm.create_model(**kw)``, timm's weights loaded."""
    torch.manual_seed(seed)
    ref = timm.create_model(timm_name, **kw)
    return load_pair(ref, timm.create_model(name, **kw))


def check_real_model(ref: nn.Module, ours: nn.Module, cfg: Mapping[str, Any]) -> None:
    """A real-size model at 224x224 against timm's: strict load, the same parameter count, logits within 1e-5,
    timm's ``feature_info`` and the ``pretrained_cfg`` entries ``cfg``."""
    ref, ours = load_pair(ref, ours)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = images(2, 224)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert b.shape == (2, 1000) and (a - b).abs().max() <= 1e-5
    assert all(ours.pretrained_cfg[k] == v for k, v in cfg.items())
    assert ours.feature_info == ref.feature_info


def check_stage_maps(ours: nn.Module, x: torch.Tensor, want: list[torch.Tensor], shapes: list[tuple[int, ...]]
                     ) -> None:
    """``forward_intermediates(x)``: the maps ``want`` (of ``shapes``, to 1e-12), and ``forward_features`` last."""
    final, maps = ours.forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == shapes
    assert all(torch.allclose(m, w, atol=1e-12) for m, w in zip(maps, want))
    assert torch.allclose(final, ours.forward_features(x))


def perturbed(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Weights moved by ``scale`` standard normals, so that every term (bias tables too) shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def grads(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients of ``<model(x), cotangent>`` for the input (key ``"input"``) and every parameter."""
    x = x.clone().requires_grad_()
    model.zero_grad()
    model(x).backward(cotangent)
    out = {"input": x.grad}
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        out[n] = p.grad
    return out


def assert_grads_equal(want: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], rtol: float,
                       floor: float = 1e-3) -> None:
    """The same gradient names, each within ``rtol * max(max |want|, floor)``."""
    assert set(got) == set(want)
    for n, w in want.items():
        err = (got[n] - w).abs().max().item()
        assert err <= rtol * max(w.abs().max().item(), floor), (n, err)


def assert_state_dicts_close(want: nn.Module, got: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every tensor of ``want``'s state dict (BatchNorm running statistics included) equals ``got``'s."""
    want_sd, got_sd = want.state_dict(), got.state_dict()
    assert set(got_sd) == set(want_sd)
    for n, w in want_sd.items():
        torch.testing.assert_close(got_sd[n], w, rtol=rtol, atol=atol)


def check_features_only(make: Callable[[str], nn.Module], name: str, timm_name: str, x: torch.Tensor,
                        count: int, tol: float = TOL, absolute: bool = False) -> tuple[nn.Module, nn.Module]:
    """``make(name)`` with ``features_only=True`` gives timm's channels, reductions and ``count`` maps on ``x``
    (``make`` builds either model from the same seed); returns both feature models."""
    torch.manual_seed(0)
    ref = make(timm_name)
    torch.manual_seed(0)
    ours = make(name)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    with torch.no_grad():
        got, want = ours.eval()(x), ref.eval()(x)
    assert len(got) == len(want) == count
    for a, b in zip(got, want):
        close(a, b, tol, absolute)
    return ref, ours


def check_intermediates(ref: nn.Module, ours: nn.Module, x: torch.Tensor, calls: Iterable[Mapping[str, Any]],
                        tol: float = TOL) -> None:
    """``forward_intermediates(x, **kw)`` equals the reference's, final map and every intermediate, for each kw."""
    with torch.no_grad():
        for kw in calls:
            final, inter = ours.forward_intermediates(x, **kw)
            final_ref, inter_ref = ref.forward_intermediates(x, **kw)
            close(final, final_ref, tol)
            assert len(inter) == len(inter_ref) > 0, kw
            for a, b in zip(inter, inter_ref):
                close(a, b, tol)


def check_bad_intermediate_indices(model: nn.Module, x: torch.Tensor, num: int) -> None:
    """timm's index rule: an int outside ``1..num`` or an index outside ``-num..num-1`` raises ValueError."""
    for indices in (0, num + 1, [num], [-num - 1]):
        with pytest.raises(ValueError, match="indices|out of range"):
            model.forward_intermediates(x, indices=indices)


def check_grad_checkpointing(model: nn.Module, x: torch.Tensor, rtol: float, atol: float = 1e-6) -> None:
    """Training with ``set_grad_checkpointing(True)`` gives the gradients of training without it."""
    model.train()
    model.zero_grad()
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=rtol, atol=atol)


def check_drop_path_only_in_training(model: nn.Module, x: torch.Tensor) -> None:
    """Deterministic in eval mode; two draws differ in training (stochastic depth acts)."""
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        assert not torch.equal(a, model(x))


def check_state_dict_round_trip(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """``b`` (built with other random weights: its outputs differ at first) loads ``a``'s state dict strictly and then
    gives ``a``'s outputs exactly."""
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))


def check_per_image(model: nn.Module, x: torch.Tensor, tol: float = TOL) -> torch.Tensor:
    """In eval mode each image gives the same logits alone as in the batch; returns the batch's."""
    with torch.no_grad():
        out = model.eval()(x)
        one = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])
    assert (out - one).abs().max() <= tol
    return out


def check_head_and_reset(ref: nn.Module, ours: nn.Module, x: torch.Tensor, classifier: str, head: str,
                         feat_shape: tuple[int, ...], first_map_shape: tuple[int, ...], tol: float = TOL) -> None:
    """timm's head API against timm's model (5 classes), all within ``tol`` absolute: ``forward_features``,
    ``forward_head(pre_logits=True)``, ``forward_intermediates(indices=2)`` and a stop-early first map,
    ``get_classifier`` (the module at ``classifier``), ``reset_classifier`` to 0 classes (the pooled features), to 3
    with max pooling (timm's logits once timm's new ``head`` weights are copied) and to 0 without pooling (the map)."""
    with torch.no_grad():
        fa, fb = ref.forward_features(x), ours.forward_features(x)
        assert fb.shape == feat_shape and (fa - fb).abs().max() <= tol
        pa, pb = ref.forward_head(fa, pre_logits=True), ours.forward_head(fb, pre_logits=True)
        assert pb.shape == feat_shape[:2] and (pa - pb).abs().max() <= tol
        (la, ia), (lb, ib) = ref.forward_intermediates(x, indices=2), ours.forward_intermediates(x, indices=2)
        assert (la - lb).abs().max() <= tol and len(ib) == 2
        for ma, mb in zip(ia, ib):
            assert (ma - mb).abs().max() <= tol
        only = ours.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
        assert len(only) == 1 and only[0].shape == first_map_shape
    assert ours.get_classifier() is ours.get_submodule(classifier) and ours.get_classifier().out_features == 5
    ours.reset_classifier(0)
    assert isinstance(ours.get_classifier(), nn.Identity) and ours.num_classes == 0
    with torch.no_grad():
        assert (ours(x) - pa).abs().max() <= tol  # pooled features
    ours.reset_classifier(3, "max")
    ref.reset_classifier(3, "max")
    ours.get_submodule(head).load_state_dict(ref.get_submodule(head).state_dict())
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= tol
    ours.reset_classifier(0, "")
    with torch.no_grad():
        assert ours(x).shape == feat_shape  # no pooling: the map


def check_against_oracle_float64(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    """Logits, input gradient and every parameter gradient equal the float64 oracle's to ~1e-10 relative."""
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(xr), ours(xo)
    assert torch.allclose(a, b, rtol=0, atol=1e-10 * a.abs().max().item())
    cot = torch.randn_like(a)
    a.backward(cot)
    b.backward(cot)
    assert torch.allclose(xr.grad, xo.grad, rtol=1e-9, atol=1e-10 * xr.grad.abs().max().item())
    mine = dict(ours.named_parameters())
    for k, p in ref.named_parameters():
        assert torch.allclose(p.grad, mine[k].grad, rtol=1e-9, atol=1e-10 * p.grad.abs().max().item()), k


def check_against_oracle_float32_on_a_view(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    """On a non-contiguous float32 input ``x`` (ours reads the view itself): logits and gradients within 1e-4 of
    the oracle's, relative to their largest entries."""
    assert not x.is_contiguous()
    xr, xo = x.detach().clone().requires_grad_(), x.detach().requires_grad_()
    a, b = ref(xr), ours(xo)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    a.square().sum().backward()
    b.square().sum().backward()
    assert (xr.grad - xo.grad).abs().max() <= 1e-4 * xr.grad.abs().max()
    mine = dict(ours.named_parameters())
    for k, p in ref.named_parameters():
        assert (p.grad - mine[k].grad).abs().max() <= 1e-4 * p.grad.abs().max(), k


def check_doctests(module: ModuleType, min_attempted: int) -> None:
    """The module's docstring examples run (at least ``min_attempted`` of them) and pass."""
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= min_attempted and result.failed == 0


class TimmBackboneSuite:
    """The tests every timm-named backbone passes against timm's model of the same weights; a test module subclasses
    it as ``Test...`` and sets the class attributes (pytest collects the inherited tests there, not here)."""

    NAME: str  # the nearfar name
    TIMM_NAME: str  # timm's model of the same architecture
    CLS: type[nn.Module]
    MODULE: ModuleType  # its module, for the docstring examples
    TINY: Mapping[str, Any]  # a small configuration (64x64 input) both accept
    CFG: Mapping[str, Any]  # pretrained_cfg entries to find
    CALLS_PER_BLOCK: int  # nearfar attention calls per block of TINY["depths"]
    FEATS_SHAPE: tuple[int, ...]  # forward_features of 3 tiny images
    NUM_FEATURES: int  # the pooled width of the tiny model
    INTERMEDIATES: int  # the number of forward_intermediates indices

    @pytest.fixture
    def timm(self) -> ModuleType:  # per test: importing is cached, and a class-scoped method fixture is deprecated
        return import_timm()

    def pair(self, timm: ModuleType, seed: int = 0, **kw: Any) -> tuple[nn.Module, nn.Module]:
        """timm's model and nearfar's with timm's weights (strict load), both in eval mode."""
        return timm_pair(timm, self.NAME, self.TIMM_NAME, seed, **kw)

    def tiny(self, **kw: Any) -> nn.Module:
        """The tiny model (5 classes) without timm, from seed 0."""
        torch.manual_seed(0)
        return create_backbone(self.NAME, **{**self.TINY, "num_classes": 5, **kw})

    def test_real_model_loads_timm_strictly_and_equals_its_logits(self, timm: ModuleType) -> None:
        ref, ours = self.pair(timm)
        assert type(ours) is self.CLS and all(ours.pretrained_cfg[k] == v for k, v in self.CFG.items())
        assert set(ours.state_dict()) == set(ref.state_dict())  # BatchNorm buffers included
        x = images(1, 224)
        with torch.no_grad():
            close(ours(x), ref(x))

    def test_tiny_logits_features_and_head_equal_timms(self, timm: ModuleType) -> None:
        ref, ours = self.pair(timm, num_classes=7, **self.TINY)
        x = images(3)
        with torch.no_grad(), observe_calls() as calls:
            feats = ours.forward_features(x)
        assert len(calls) == self.CALLS_PER_BLOCK * sum(self.TINY["depths"])  # every attention runs on nearfar
        with torch.no_grad():
            close(feats, ref.forward_features(x))
            assert feats.shape == self.FEATS_SHAPE
            close(ours.forward_head(feats), ref.forward_head(feats))
            pre = ours.forward_head(feats, pre_logits=True)
            close(pre, ref.forward_head(feats, pre_logits=True))
            assert pre.shape == (3, self.NUM_FEATURES)
            close(ours(x), ref(x))

    def test_forward_intermediates_equal_timms(self, timm: ModuleType) -> None:
        ref, ours = self.pair(timm, **self.TINY)
        x = images(2)
        check_intermediates(ref, ours, x, (dict(), dict(indices=2, norm=True), dict(indices=[0, 2], stop_early=True)))
        check_bad_intermediate_indices(ours, x, self.INTERMEDIATES)

    def test_registered_with_timm(self, timm: ModuleType) -> None:
        assert self.NAME in timm.list_models("nearfar_*")
        assert backbones()[self.NAME].timm_name == self.TIMM_NAME
        with pytest.raises(ValueError, match="no weights"):
            timm.create_model(self.NAME, pretrained=True)

    def test_docstring_examples_run(self) -> None:
        check_doctests(self.MODULE, 3)

    def test_drop_path_only_in_training(self) -> None:
        check_drop_path_only_in_training(self.tiny(drop_path_rate=0.5), images(4))

    def test_state_dict_round_trip(self) -> None:
        check_state_dict_round_trip(self.tiny(), create_backbone(self.NAME, **{**self.TINY, "num_classes": 5}),
                                    images(1))
