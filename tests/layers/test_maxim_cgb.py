"""MAXIM's cross-gating block (``maxim_cgb``): the fast path against a float64 reference written from the official
Flax code (``tests/maxim_reference.py``), forward and backward through both inputs and every parameter; the official
Flax module's outputs (``tests/data/maxim_flax_parity.npz``, with and without ``upsample_y``); the oracles (zero
``out_project`` layers leave the shortcuts, the self form is ``y = x``, dependency sets); names, baseline, errors."""

from __future__ import annotations

import copy

import maxim_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from maxim_reference import flax_case, randomize
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_state_dict_round_trip,
)
from oracles.maxim import BASELINES

import nearfar
from nearfar.layers.maxim_cgb import MaximCrossGating
from nearfar.layers.maxim_mab import state_dict_from_flax


def check_cgb(m: MaximCrossGating, x: torch.Tensor, y: torch.Tensor | None) -> None:
    """Both outputs and the gradients of a random projection w.r.t. x, y and every parameter, fp32 vs float64."""
    x = x.detach().requires_grad_()
    y = None if y is None else y.detach().requires_grad_()
    out = torch.cat(m(x, y, return_y=True), -1)
    g = torch.randn_like(out)
    params = list(m.parameters())
    grads = torch.autograd.grad((out * g).sum(), [x, *params] + ([] if y is None else [y]))
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    y64 = None if y is None else y.detach().double().requires_grad_()
    expected = torch.cat(ref.cgb(m64, x64, y64), -1)
    params64 = list(m64.parameters())
    grads64 = torch.autograd.grad((expected * g.double()).sum(), [x64, *params64] + ([] if y is None else [y64]))
    assert_close(out, expected, 1e-5)
    names = ["x"] + [n for n, _ in m.named_parameters()] + ([] if y is None else ["y"])
    for name, a, b in zip(names, grads, grads64):
        assert_close(a, b, 3e-5, f"{name}.grad")


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), block=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       grid=st.tuples(st.integers(1, 2), st.integers(1, 3)), k=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       extra=st.tuples(st.sampled_from([0, 2]), st.sampled_from([0, 2])), features=st.sampled_from([4, 6]),
       cx=st.integers(2, 5), cy=st.integers(2, 5), upsample=st.booleans(), use_bias=st.booleans(),
       self_form=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_matches_reference(b, block, grid, k, extra, features, cx, cy, upsample, use_bias, self_form, layout):
    """Random sizes; ``extra`` > 0 makes the extents non-divisible (``padding="reflect"``, even so that ``y`` can be
    at half resolution)."""
    mult = ref.multiple_of(block, grid)
    h, w = mult[0] * k[0] + extra[0], mult[1] * k[1] + extra[1]
    if upsample:
        h, w = h + h % 2, w + w % 2
        self_form = False
    padding = "reflect" if h % mult[0] or w % mult[1] else None
    if self_form:
        cy = cx
    torch.manual_seed(h * 13 + w)
    m = randomize(MaximCrossGating(features, block, grid, in_features=cx, y_features=cy, upsample_y=upsample,
                                   use_bias=use_bias, padding=padding), seed=h + w)
    with torch.no_grad():  # keep the pre-LN activations O(1): fp32 LayerNorm gradients over few channels
        for p in m.parameters():
            p.mul_(0.7)

    def make(c, hh, ww):
        if layout == "transposed":
            return torch.randn(b, ww, hh, c).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(b, hh, ww, c + 2)[..., 1:c + 1]
        return torch.randn(b, hh, ww, c)

    x = make(cx, h, w)
    y = None if self_form else make(cy, *((h // 2, w // 2) if upsample else (h, w)))
    check_cgb(m, x, y)


@pytest.mark.parametrize("name,upsample", [("cgb_up", True), ("cgb_same", False)])
def test_official_flax_parity(name, upsample):
    params, (x, y), (x_out, y_out) = flax_case(name)
    m = MaximCrossGating(8, block_size=(2, 3), grid_size=(2, 2), in_features=5, y_features=7, upsample_y=upsample)
    m.load_state_dict(state_dict_from_flax(params), strict=True)
    with torch.no_grad():
        got = m(x, y, return_y=True)
    assert_close(got[0], x_out, 1e-5, "official Flax CGB x_out")
    assert_close(got[1], y_out, 1e-5, "official Flax CGB y_out")


def test_oracle_zero_out_projects_leave_the_shortcuts():
    torch.manual_seed(1)
    m = randomize(MaximCrossGating(8, 2, 2, in_features=5, y_features=3), seed=1)
    with torch.no_grad():
        for layer in (m.out_project_x, m.out_project_y):
            layer.weight.zero_()
            layer.bias.zero_()
    x, y = torch.randn(2, 4, 6, 5), torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        x_out, y_out = m(x, y, return_y=True)
        s_y = ref.conv1x1(ref.conv_transpose_2x2(y, m.ConvTranspose_0), m.Conv_1)
        s_x = ref.conv1x1(x, m.Conv_0)
        assert_close(y_out, s_y, 1e-6)
        assert_close(x_out, s_x + s_y, 1e-6)


def test_self_form_is_y_equals_x():
    torch.manual_seed(2)
    m = randomize(MaximCrossGating(8, 2, 3, upsample_y=False), seed=2)
    x = torch.randn(2, 6, 6, 8)
    with torch.no_grad():
        assert torch.equal(m(x), m(x, x))


def test_oracle_dependency_sets():
    """x_out at a pixel depends on x and y through the window and the dilated grid of that pixel only."""
    torch.manual_seed(3)
    h, w = 6, 8
    m = randomize(MaximCrossGating(4, block_size=(3, 2), grid_size=(2, 4), upsample_y=False), seed=3).double()
    x = torch.randn(1, h, w, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, h, w, 4, dtype=torch.float64, requires_grad=True)
    r, c = 4, 5
    m(x, y)[0, r, c].sum().backward()
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    window = (rows // 3 == r // 3) & (cols // 2 == c // 2)
    dilated = (rows % 3 == r % 3) & (cols % 2 == c % 2)
    for t in (x, y):
        assert torch.equal(t.grad[0].abs().sum(-1) > 0, window | dilated)


def test_baseline_matches_module():
    torch.manual_seed(4)
    m = randomize(MaximCrossGating(8, (2, 3), (3, 2), in_features=5, y_features=7), seed=4)
    x, y = torch.randn(2, 6, 12, 5), torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        for a, b in zip(BASELINES["maxim_cgb"](m, x, y, return_y=True), m(x, y, return_y=True)):
            assert_close(a, b, name="baseline")
        s = randomize(MaximCrossGating(8, 2, 2, upsample_y=False), seed=5)
        z = torch.randn(1, 4, 4, 8)
        assert_close(BASELINES["maxim_cgb"](s, z), s(z), name="baseline, self form")


def test_compile_state_dict_and_dropout():
    torch.manual_seed(5)
    m = MaximCrossGating(8, 2, 2, upsample_y=False)
    check_compile_matches_eager(m, torch.randn(1, 4, 4, 8))
    check_state_dict_round_trip(lambda: randomize(MaximCrossGating(8, 2, 2, upsample_y=False),
                                                  int(torch.randint(9, ()))), torch.randn(1, 4, 4, 8))
    d = MaximCrossGating(8, 2, 2, upsample_y=False, dropout_rate=0.5)
    x = torch.randn(1, 4, 4, 8)
    assert not torch.equal(d.train()(x), d.eval()(x))


def test_state_dict_names_and_shapes():
    f, cx, cy = 8, 5, 7
    expected = {"ConvTranspose_0.weight": (cy, f, 2, 2), "ConvTranspose_0.bias": (f,),
                "Conv_0.weight": (f, cx, 1, 1), "Conv_0.bias": (f,), "Conv_1.weight": (f, f, 1, 1), "Conv_1.bias": (f,)}
    for s in ("x", "y"):
        expected.update({f"LayerNorm_{s}.weight": (f,), f"LayerNorm_{s}.bias": (f,),
                         f"in_project_{s}.weight": (f, f), f"in_project_{s}.bias": (f,),
                         f"out_project_{s}.weight": (f, f), f"out_project_{s}.bias": (f,)})
        g = f"SplitHeadMultiAxisGating_{s}"
        expected.update({f"{g}.LayerNorm_in.weight": (f,), f"{g}.LayerNorm_in.bias": (f,),
                         f"{g}.in_project.weight": (2 * f, f), f"{g}.in_project.bias": (2 * f,),
                         f"{g}.Dense_0.weight": (4, 4), f"{g}.Dense_0.bias": (4,),
                         f"{g}.Dense_1.weight": (6, 6), f"{g}.Dense_1.bias": (6,),
                         f"{g}.out_project.weight": (f, 2 * f), f"{g}.out_project.bias": (f,)})
    m = MaximCrossGating(f, block_size=(2, 3), grid_size=(2, 2), in_features=cx, y_features=cy)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    m.load_state_dict({k: torch.randn(s) for k, s in expected.items()}, strict=True)
    same = MaximCrossGating(f, (2, 3), (2, 2), in_features=cx, y_features=cy, upsample_y=False)
    assert set(same.state_dict()) == set(expected) - {"ConvTranspose_0.weight", "ConvTranspose_0.bias"}
    assert same.Conv_1.weight.shape == (f, cy, 1, 1)
    params, _, _ = flax_case("cgb_up")
    assert set(state_dict_from_flax(params)) == set(expected)
    g = m.SplitHeadMultiAxisGating_x
    fresh = MaximCrossGating(64, 4, 4)
    assert torch.equal(fresh.SplitHeadMultiAxisGating_x.Dense_0.bias, torch.ones(16))  # Flax: bias init ones
    assert abs(fresh.in_project_x.weight.std().item() - 64 ** -0.5) < 0.01  # LeCun normal
    assert g.LayerNorm_in.eps == 1e-6


def test_errors():
    with pytest.raises(ValueError, match="features"):
        MaximCrossGating(0)
    with pytest.raises(ValueError, match="grid_size"):
        MaximCrossGating(8, grid_size=(2, 0))
    with pytest.raises(TypeError, match="upsample_y"):
        MaximCrossGating(8, upsample_y=0)
    with pytest.raises(ValueError, match="padding"):
        MaximCrossGating(8, padding="replicate")
    m = MaximCrossGating(8, 2, 2)
    with pytest.raises(ValueError, match="needs upsample_y=False"):
        m(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="y must be"):
        m(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="y_features == in_features"):
        MaximCrossGating(8, 2, 2, y_features=4, upsample_y=False)(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="divisible by block_size"):
        MaximCrossGating(8, 2, 3, upsample_y=False)(torch.randn(1, 6, 4, 8))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["maxim_cgb"]
    assert entry.cls is MaximCrossGating and entry.family == "local+global" and set(entry.patterns) == {"NS"}
    assert "self form" in entry.notes and "NC" in entry.why_not
    m = entry.make(96, 3)
    assert m.block_size == m.grid_size == (7, 7) and not m.upsample_y
    assert m(torch.randn(1, 14, 14, 96)).shape == (1, 14, 14, 96)
