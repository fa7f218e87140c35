"""HiDiffusion MSW-MSA: float64 reference written from the paper's equations and the official code
(megvii-research/HiDiffusion ``hidiffusion/hidiffusion.py``), its properties (oracles), the shift schedule, diffusers
names, the benchmark baseline, module hygiene."""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.msw_msa import BASELINES

import nearfar
from nearfar.layers.msw_msa import MSWAttention, draw_shift, msw_window


class _Fixed(torch.nn.Module):
    """``m(x, shift)`` with a fixed shift (the module draws one per call otherwise)."""

    def __init__(self, inner: MSWAttention, shift):
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.shift)


def _allowed(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """The shifted-window mask with loops: same window after the cyclic shift, rows and columns separately."""
    rows = [[((rq - shift[0]) % h) // window[0] == ((rk - shift[0]) % h) // window[0] for rk in range(h)]
            for rq in range(h)]
    cols = [[((cq - shift[1]) % w) // window[1] == ((ck - shift[1]) % w) // window[1] for ck in range(w)]
            for cq in range(w)]
    return ref.combine_axes([torch.tensor(rows), torch.tensor(cols)])


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def msw_reference(m: MSWAttention, x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    window = (-(-h // 2), -(-w // 2))
    grid = (2 * window[0], 2 * window[1])
    if grid != (h, w):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=grid, mode="bicubic").permute(0, 2, 3, 1)
    t = x.reshape(b, -1, c)
    q, k, v = (_heads(F.linear(t, lin.weight, lin.bias), m.num_heads) for lin in (m.to_q, m.to_k, m.to_v))
    out = ref.dense_reference(q, k, v, _allowed(*grid, window, shift), (c // m.num_heads) ** -0.5)
    out = F.linear(out.transpose(1, 2).reshape(b, *grid, c), m.to_out[0].weight, m.to_out[0].bias)
    if grid != (h, w):
        out = F.interpolate(out.permute(0, 3, 1, 2), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    return out


@settings(max_examples=20)
@given(h=st.integers(1, 9), w=st.integers(1, 9), shift=st.tuples(st.integers(0, 6), st.integers(0, 6)),
       heads=st.integers(1, 2), bias=st.booleans())
def test_matches_reference(h, w, shift, heads, bias):
    torch.manual_seed(h * 10 + w)
    m = MSWAttention(4 * heads, heads, bias=bias)
    check_against_reference(_Fixed(m, shift), torch.randn(2, h, w, 4 * heads),
                            lambda mm, xx: msw_reference(mm.inner, xx, shift))


@pytest.mark.parametrize("grid, heads, shift", [((26, 30), 2, (3, 7)), ((34, 34), 1, (0, 0))])
def test_matches_reference_with_windows_past_the_window_kernel(grid, heads, shift):
    # windows of 195 and 289 tokens: past the window kernel's 144, on the compiled kernel where it is built
    # (``nearfar.backends.native.dense_windows``), else on SDPA
    torch.manual_seed(grid[0])
    m = MSWAttention(16 * heads, heads)
    check_against_reference(_Fixed(m, shift), torch.randn(2, *grid, 16 * heads),
                            lambda mm, xx: msw_reference(mm.inner, xx, shift))


# ---------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------------


def test_oracle1_shift0_is_attention_inside_the_four_quadrants():
    torch.manual_seed(0)
    m = MSWAttention(16, 2)
    x = torch.randn(2, 6, 10, 16)
    out = torch.empty(2, 6, 10, 16)
    for r in (slice(0, 3), slice(3, 6)):
        for c in (slice(0, 5), slice(5, 10)):
            quad = x[:, r, c].reshape(2, 15, 16)
            q, k, v = (_heads(lin(quad), 2) for lin in (m.to_q, m.to_k, m.to_v))
            o = F.scaled_dot_product_attention(q, k, v)
            out[:, r, c] = m.to_out[0](o.transpose(1, 2).reshape(2, 3, 5, 16))
    assert_close(m(x, shift=(0, 0)), out)


@pytest.mark.parametrize("grid,shift", [((8, 8), (1, 1)), ((8, 12), (2, 3)), ((6, 10), (2, 4)), ((4, 4), (1, 0))])
def test_oracle2_shifted_equals_dense_reference_with_the_torus_mask(grid, shift):
    torch.manual_seed(1)
    m = MSWAttention(8, 2)
    x = torch.randn(2, *grid, 8)
    q, k, v = (_heads(lin(x.reshape(2, -1, 8)), 2) for lin in (m.to_q, m.to_k, m.to_v))
    window = msw_window(*grid)
    o = ref.dense_reference(q, k, v, _allowed(*grid, window, shift), 0.5)
    assert_close(m(x, shift=shift), m.to_out[0](o.transpose(1, 2).reshape(2, *grid, 8).float()))


@pytest.mark.parametrize("shift", [(1, 2), (3, 0), (5, 7)])
def test_oracle3_roll_equivariance(shift):
    torch.manual_seed(2)
    m = MSWAttention(8, 2)
    x = torch.randn(2, 8, 12, 8)
    rolled = m(torch.roll(x, (-shift[0], -shift[1]), (1, 2)), shift=(0, 0))
    assert_close(m(x, shift=shift), torch.roll(rolled, shift, (1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# shift schedule, resize, names, baseline, hygiene
# ---------------------------------------------------------------------------------------------------------------


def test_shift_schedule():
    draws = {draw_shift((28, 28), torch.Generator().manual_seed(s)) for s in range(40)}
    assert draws == {(0, 0), (7, 7), (14, 14), (21, 21)}
    for s in range(10):
        g = torch.Generator().manual_seed(s)
        u = float(torch.rand(1, generator=g))
        k = sum(u > t for t in (0.25, 0.5, 0.75))
        assert draw_shift((9, 17), torch.Generator().manual_seed(s)) == (2 * k, 4 * k)
    # windows under 4 rows: the official code never rolls, even when the column shift is positive
    assert {draw_shift((3, 16), torch.Generator().manual_seed(s)) for s in range(20)} == {(0, 0)}


def test_random_shift_is_reproducible_with_a_generator_or_the_global_seed():
    torch.manual_seed(3)
    m = MSWAttention(8, 2)
    x = torch.randn(1, 16, 16, 8)
    a = m(x, generator=torch.Generator().manual_seed(7))
    b = m(x, shift=draw_shift((8, 8), torch.Generator().manual_seed(7)))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = m(x)
    torch.manual_seed(11)
    assert torch.equal(c, m(x, shift=draw_shift((8, 8))))
    outs = {tuple(m(x, shift=s).flatten()[:4].tolist()) for s in ((0, 0), (2, 2), (4, 4), (6, 6))}
    assert len(outs) == 4  # the four shifts of the schedule give four different partitions


def test_shift_is_taken_modulo_the_window():
    torch.manual_seed(4)
    m = MSWAttention(8, 2)
    x = torch.randn(1, 6, 8, 8)
    assert_close(m(x, shift=(4, 6)), m(x, shift=(1, 2)))
    assert_close(m(x, shift=-1), m(x, shift=(2, 3)))


def test_parameter_names_match_diffusers_attention():
    m = MSWAttention(64, 8)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "to_q.weight": (64, 64), "to_k.weight": (64, 64), "to_v.weight": (64, 64),
        "to_out.0.weight": (64, 64), "to_out.0.bias": (64,)}
    assert set(MSWAttention(64, 8, bias=True).state_dict()) >= {"to_q.bias", "to_k.bias", "to_v.bias"}
    check_state_dict_round_trip(lambda: _Fixed(MSWAttention(16, 2, bias=True), (1, 2)), torch.randn(1, 7, 6, 16))


@pytest.mark.parametrize("shape", [(2, 12, 16, 16), (1, 9, 10, 16)])
def test_baseline_matches_module(shape):
    torch.manual_seed(5)
    m = MSWAttention(16, 2, bias=True)
    x = torch.randn(shape)
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(seed)
            expected = BASELINES["msw_msa"](m, x)
            torch.manual_seed(seed)
            assert_close(m(x), expected, name=f"baseline {shape} seed {seed}")
        assert_close(m(x, (2, 3)), BASELINES["msw_msa"](m, x, (2, 3)), name="explicit shift")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(6)
    m = MSWAttention(16, 2)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 16))
    check_forward_backward_finite(m, torch.randn(1, 1, 1, 16))
    check_compile_matches_eager(_Fixed(m, (1, 2)), torch.randn(1, 8, 6, 16))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        MSWAttention(10, 3)
    with pytest.raises(TypeError, match="out_bias"):
        MSWAttention(8, 2, out_bias=None)
    m = MSWAttention(8, 2)
    x = torch.randn(1, 4, 4, 8)
    with pytest.raises(TypeError, match="shift"):
        m(x, shift=(1, 2, 3))
    with pytest.raises(TypeError, match="shift"):
        m(x, shift=1.5)
    with pytest.raises(TypeError, match="generator"):
        m(x, generator=3)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["msw_msa"]
    assert entry.cls is MSWAttention and entry.repo == "megvii-research/HiDiffusion"
    m = entry.make(96, 3)
    assert (m.num_heads, m.head_dim, m.to_q.bias) == (3, 32, None)
    assert m(torch.randn(1, 14, 14, 96)).shape == (1, 14, 14, 96)
