"""MAXIM's multi-axis gMLP block (``maxim_mab``): the fast path against a float64 reference written from the official
Flax code (``tests/maxim_reference.py``: explicit blocking gathers, einsum token mixing), forward and backward; the
official Flax module's outputs (``tests/data/maxim_flax_parity.npz``); the structural oracles (full window = full
grid = one gMLP over all tokens, grid = permuted block, dependency sets, zero mixing = token-wise, zero
``out_project`` = identity); names, baseline, errors."""

from __future__ import annotations

import math

import maxim_reference as ref
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from maxim_reference import flax_case, randomize
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.maxim import BASELINES, block_images_einops, unblock_images_einops

import nearfar
from nearfar.layers.maxim_mab import GmlpLayer, MaximMultiAxisGmlp, multi_axis_mix, state_dict_from_flax


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), block=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       grid=st.tuples(st.integers(1, 3), st.integers(1, 3)), k=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       extra=st.tuples(st.integers(0, 2), st.integers(0, 2)), half=st.integers(2, 3),
       factors=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), use_bias=st.booleans(),
       residual=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_matches_reference(b, block, grid, k, extra, half, factors, use_bias, residual, layout):
    """Random sizes (odd ones included); ``extra`` > 0 makes the extents non-divisible (``padding="reflect"``)."""
    p, f_grid, f_block = factors
    dim = 2 * half
    branch = dim * p // 2
    if dim * p % 2 or any(branch * f % 2 or branch * f < 4 for f in (f_grid, f_block)):
        p = f_grid = f_block = 2  # even splits, and no LayerNorm over a single channel (ill-conditioned in fp32)
    mult = ref.multiple_of(block, grid)
    h, w = mult[0] * k[0] + extra[0], mult[1] * k[1] + extra[1]
    padding = "reflect" if extra != (0, 0) else None
    torch.manual_seed(h * 31 + w)
    m = randomize(MaximMultiAxisGmlp(dim, block, grid, block_gmlp_factor=f_block, grid_gmlp_factor=f_grid,
                                     input_proj_factor=p, use_bias=use_bias, residual=residual, padding=padding),
                  seed=h + w)
    if layout == "transposed":
        x = torch.randn(b, w, h, dim).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(b, h, w, dim + 3)[..., 1:dim + 1]
    else:
        x = torch.randn(b, h, w, dim)
    check_against_reference(m, x, ref.mab)


def test_reflect_padding_is_numpys():
    for n, before, after in ((5, 2, 3), (3, 4, 6), (1, 2, 1), (2, 3, 0)):
        rows = ref.reflect_rows(n, before, after)
        expected = np.pad(np.arange(n), (before, after), mode="reflect") if n > 1 else [0] * (n + before + after)
        assert rows == list(expected)
        got = nearfar.layers.maxim_mab.reflect_index(n, before, after, torch.device("cpu"))
        assert got.tolist() == rows


def test_official_flax_parity():
    params, (x,), (expected,) = flax_case("mab")
    m = MaximMultiAxisGmlp(8, block_size=(2, 3), grid_size=(2, 2))
    m.load_state_dict(state_dict_from_flax(params), strict=True)
    with torch.no_grad():
        assert_close(m(x), expected, 1e-5, "official Flax MAB")


def _same_weights(block: GmlpLayer, grid: GmlpLayer) -> None:
    sd = {k.replace("BlockGatingUnit", "GridGatingUnit"): v for k, v in block.state_dict().items()}
    grid.load_state_dict(sd, strict=True)


def test_oracle_full_window_equals_full_grid_equals_one_gmlp():
    torch.manual_seed(1)
    h, w, c = 3, 4, 6
    block = randomize(GmlpLayer(c, "block", (h, w), 2, True, 0.0), seed=1).double()
    grid = GmlpLayer(c, "grid", (h, w), 2, True, 0.0).double()
    _same_weights(block, grid)
    x = torch.randn(2, h, w, c, dtype=torch.float64)
    with torch.no_grad():
        # one gMLP over all h * w tokens in raster order, written out
        t = x.reshape(2, h * w, c)
        y = ref.gelu(ref.dense(ref.layer_norm(t, block.LayerNorm), block.in_project))
        u, v = y.chunk(2, -1)
        unit = block.BlockGatingUnit
        v = torch.einsum("bnc,mn->bmc", ref.layer_norm(v, unit.intermediate_layernorm), unit.Dense_0.weight)
        v = v + unit.Dense_0.bias[:, None]
        full = (t + ref.dense(u * (v + 1), block.out_project)).reshape(2, h, w, c)
        assert_close(block(x), full, 1e-12)
        assert_close(grid(x), full, 1e-12)


def test_oracle_grid_is_permuted_block():
    torch.manual_seed(2)
    (gh, gw), (fh, fw), c = (2, 3), (3, 2), 4
    h, w = gh * fh, gw * fw
    block = randomize(GmlpLayer(c, "block", (gh, gw), 2, True, 0.0), seed=2).double()
    grid = GmlpLayer(c, "grid", (gh, gw), 2, True, 0.0).double()
    _same_weights(block, grid)

    def perm(g, f):  # position i * f + j -> j * g + i
        p = torch.empty(g * f, dtype=torch.long)
        for i in range(g):
            for j in range(f):
                p[j * g + i] = i * f + j
        return p

    ph, pw = perm(gh, fh), perm(gw, fw)
    x = torch.randn(2, h, w, c, dtype=torch.float64)
    with torch.no_grad():
        moved = block(x[:, ph][:, :, pw])
        back = torch.empty_like(moved)
        back[:, ph[:, None], pw[None, :]] = moved
        assert_close(grid(x), back, 1e-12)


@pytest.mark.parametrize("axis", ["block", "grid", "mab"])
def test_oracle_dependency_sets(axis):
    torch.manual_seed(3)
    h, w, size = 6, 8, (2, 4)
    if axis == "mab":
        layer = randomize(MaximMultiAxisGmlp(4, block_size=(3, 2), grid_size=size), seed=3).double()
    else:
        layer = randomize(GmlpLayer(4, axis, size, 2, True, 0.0), seed=3).double()
    x = torch.randn(1, h, w, 4, dtype=torch.float64, requires_grad=True)
    r, c = 4, 5
    layer(x)[0, r, c].sum().backward()
    touched = x.grad[0].abs().sum(-1) > 0
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    window = (rows // 3 == r // 3) & (cols // 2 == c // 2) if axis == "mab" else (
        (rows // size[0] == r // size[0]) & (cols // size[1] == c // size[1]))
    dilated = (rows % (h // size[0]) == r % (h // size[0])) & (cols % (w // size[1]) == c % (w // size[1]))
    expected = {"block": window, "grid": dilated, "mab": window | dilated}[axis]
    assert torch.equal(touched, expected)


def test_oracle_zero_mixing_is_tokenwise_and_zero_out_project_is_identity():
    torch.manual_seed(4)
    m = randomize(MaximMultiAxisGmlp(8, block_size=2, grid_size=3), seed=4)
    with torch.no_grad():
        for layer in (m.GridGmlpLayer.GridGatingUnit, m.BlockGmlpLayer.BlockGatingUnit):
            layer.Dense_0.weight.zero_()
            layer.Dense_0.bias.zero_()
    x = torch.randn(2, 6, 6, 8)
    perm = torch.randperm(36)
    with torch.no_grad():
        shuffled = m(x.reshape(2, 36, 8)[:, perm].reshape(2, 6, 6, 8))
        assert_close(shuffled, m(x).reshape(2, 36, 8)[:, perm].reshape(2, 6, 6, 8), 1e-6)
        for layer in (m.GridGmlpLayer, m.BlockGmlpLayer):
            layer.out_project.weight.zero_()
            layer.out_project.bias.zero_()
            z = torch.randn(2, 6, 6, 8)
            assert torch.equal(layer(z), z)
        m.out_project.weight.zero_()
        m.out_project.bias.zero_()
        assert torch.equal(m(x), x)


def test_mix_with_identity_is_identity():
    v = torch.randn(2, 6, 4, 3)
    for axis, size in (("block", (3, 2)), ("grid", (2, 4))):
        n = math.prod(size)
        out = multi_axis_mix(v, torch.eye(n), None, size, axis)
        assert torch.equal(out.reshape(v.shape), v)


def test_baseline_blocking_is_the_official_rearrange():
    x = torch.randn(2, 6, 8, 3)
    for patch in ((2, 4), (3, 2), (6, 1)):
        blocked = block_images_einops(x, patch)
        assert torch.equal(blocked, ref.block_images(x, patch))
        assert torch.equal(unblock_images_einops(blocked, (6 // patch[0], 8 // patch[1]), patch), x)


def test_baseline_matches_module():
    torch.manual_seed(5)
    for residual in (True, False):
        m = randomize(MaximMultiAxisGmlp(16, block_size=(2, 3), grid_size=(3, 2), residual=residual), seed=5)
        x = torch.randn(2, 6, 12, 16)
        with torch.no_grad():
            assert_close(BASELINES["maxim_mab"](m, x), m(x), name="baseline")


def test_forward_backward_finite_compile_dropout():
    torch.manual_seed(6)
    m = MaximMultiAxisGmlp(16, block_size=2, grid_size=2)
    check_forward_backward_finite(m, torch.randn(2, 4, 6, 16))
    check_compile_matches_eager(m, torch.randn(1, 4, 4, 16))
    d = MaximMultiAxisGmlp(16, block_size=2, grid_size=2, dropout_rate=0.5)
    x = torch.randn(1, 4, 4, 16)
    assert not torch.equal(d.train()(x), d.eval()(x))
    with torch.no_grad():
        assert torch.equal(d.eval()(x), d(x))


def test_state_dict_names_and_shapes():
    m = MaximMultiAxisGmlp(8, block_size=(2, 3), grid_size=(4, 2))
    c = 8  # branch width p C / 2
    expected = {"LayerNorm_in.weight": (8,), "LayerNorm_in.bias": (8,), "in_project.weight": (16, 8),
                "in_project.bias": (16,), "out_project.weight": (8, 16), "out_project.bias": (8,)}
    for layer, unit, n in (("GridGmlpLayer", "GridGatingUnit", 8), ("BlockGmlpLayer", "BlockGatingUnit", 6)):
        expected.update({f"{layer}.LayerNorm.weight": (c,), f"{layer}.LayerNorm.bias": (c,),
                         f"{layer}.in_project.weight": (2 * c, c), f"{layer}.in_project.bias": (2 * c,),
                         f"{layer}.{unit}.intermediate_layernorm.weight": (c,),
                         f"{layer}.{unit}.intermediate_layernorm.bias": (c,),
                         f"{layer}.{unit}.Dense_0.weight": (n, n), f"{layer}.{unit}.Dense_0.bias": (n,),
                         f"{layer}.out_project.weight": (c, c), f"{layer}.out_project.bias": (c,)})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    m.load_state_dict({k: torch.randn(s) for k, s in expected.items()}, strict=True)
    # the official Flax names of the same block convert to exactly these keys
    params, _, _ = flax_case("mab")
    assert set(state_dict_from_flax(params)) == set(MaximMultiAxisGmlp(8, (2, 3), (2, 2)).state_dict())
    nobias = MaximMultiAxisGmlp(8, 2, 2, use_bias=False)
    assert not any(k.endswith("bias") and "LayerNorm" not in k and "layernorm" not in k for k in nobias.state_dict())
    check_state_dict_round_trip(lambda: randomize(MaximMultiAxisGmlp(8, 2, 2), int(torch.randint(9, ()))),
                                torch.randn(1, 4, 4, 8))


def test_init_follows_flax():
    torch.manual_seed(7)
    m = MaximMultiAxisGmlp(64, block_size=4, grid_size=4)
    w = m.in_project.weight
    assert abs(w.std().item() - 0.02) < 0.002 and not m.in_project.bias.any()
    assert not m.GridGmlpLayer.GridGatingUnit.Dense_0.bias.any()
    assert m.LayerNorm_in.eps == 1e-6 and m.GridGmlpLayer.GridGatingUnit.intermediate_layernorm.eps == 1e-6


def test_errors():
    with pytest.raises(ValueError, match="block_size"):
        MaximMultiAxisGmlp(8, block_size=0)
    with pytest.raises(TypeError, match="grid_size"):
        MaximMultiAxisGmlp(8, grid_size=2.0)
    with pytest.raises(ValueError, match="input_proj_factor"):
        MaximMultiAxisGmlp(3, input_proj_factor=1)
    with pytest.raises(ValueError, match="grid_gmlp_factor"):
        MaximMultiAxisGmlp(2, input_proj_factor=1, grid_gmlp_factor=1)
    with pytest.raises(ValueError, match="dropout_rate"):
        MaximMultiAxisGmlp(8, dropout_rate=1.0)
    with pytest.raises(ValueError, match="padding"):
        MaximMultiAxisGmlp(8, padding="zeros")
    with pytest.raises(TypeError, match="residual"):
        MaximMultiAxisGmlp(8, residual=1)
    m = MaximMultiAxisGmlp(8, block_size=2, grid_size=3)
    with pytest.raises(ValueError, match=r"divisible by block_size=\(2, 2\) and grid_size=\(3, 3\)"):
        m(torch.randn(1, 6, 4, 8))
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 6, 6))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["maxim_mab"]
    assert entry.cls is MaximMultiAxisGmlp and entry.family == "local+global" and set(entry.patterns) == {"NS"}
    m = entry.make(96, 3)
    assert m.block_size == m.grid_size == (7, 7) and not m.residual
    assert m(torch.randn(1, 14, 14, 96)).shape == (1, 14, 14, 96)
