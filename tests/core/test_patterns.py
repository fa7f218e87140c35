"""Every pattern's ``.mask`` against brute-force builders written from the papers and the
official code (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

from nearfar import Blocks, Causal, Dense, GlobalTokens, Grid, Neighborhood, PerHead, Sinks, SlidingWindow, Strided

# ---------------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------------


@st.composite
def na_axis(draw, max_len=40, causal=None):
    """(L, kernel, dilation, causal, stride) of one valid NA axis; kernel*dilation <= L, stride <= kernel."""
    length = draw(st.integers(1, max_len))
    kernel = draw(st.integers(1, length))
    dilation = draw(st.integers(1, length // kernel))
    stride = draw(st.one_of(st.just(1), st.integers(1, kernel)))
    is_causal = draw(st.booleans()) if causal is None else causal
    return length, kernel, dilation, is_causal, stride


@st.composite
def na_nd(draw, causal=None):
    """Per-axis NA parameters of a 1D/2D/3D problem (small extents in 2D/3D)."""
    nd = draw(st.sampled_from([1, 2, 3]))
    max_len = {1: 40, 2: 11, 3: 6}[nd]
    axes = [draw(na_axis(max_len, causal)) for _ in range(nd)]
    grid, ks, dil, cau, st_ = (tuple(x) for x in zip(*axes))
    return grid, ks, dil, cau, st_


def make_na(grid, ks, dil, cau, stride, with_grid=True):
    if len(grid) == 1 and not with_grid:
        return Neighborhood(ks[0], dilation=dil[0], is_causal=cau[0], stride=stride[0])
    return Neighborhood(ks, dilation=dil, is_causal=cau, grid=grid, stride=stride)


# ---------------------------------------------------------------------------------------------------------
# Neighborhood (NATTEN semantics, SHI-Labs/NATTEN ``get_na_flex_mask``)
# ---------------------------------------------------------------------------------------------------------


@given(na_axis(), st.booleans())
def test_neighborhood_1d_matches_bruteforce(axis, with_grid):
    length, k, d, c, s = axis
    p = Neighborhood(k, dilation=d, is_causal=c, stride=s, grid=(length,) if with_grid else None)
    expected = ref.neighborhood_mask((length,), k, d, c, s)
    assert torch.equal(p.mask(length, length), expected)


@given(na_nd())
def test_neighborhood_nd_matches_bruteforce(params):
    grid, ks, dil, cau, stride = params
    n = math.prod(grid)
    p = make_na(grid, ks, dil, cau, stride)
    assert torch.equal(p.mask(n, n), ref.neighborhood_mask(grid, ks, dil, cau, stride))


@given(na_nd(causal=False))
def test_neighborhood_noncausal_has_exactly_prod_k_keys(params):
    grid, ks, dil, cau, stride = params
    n = math.prod(grid)
    m = make_na(grid, ks, dil, cau, stride).mask(n, n)
    assert (m.sum(-1) == math.prod(ks)).all()


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("stride", [1, 2])
def test_neighborhood_kernel_equals_length_is_dense_or_causal(length, stride):
    stride = min(stride, length)
    n = length
    assert Neighborhood(length, stride=stride).mask(n, n).all()
    assert torch.equal(Neighborhood(length, is_causal=True, stride=stride).mask(n, n), Causal().mask(n, n))
    assert torch.equal(Neighborhood(length, is_causal=True).mask(n, n), torch.ones(n, n, dtype=torch.bool).tril())


def test_neighborhood_kernel_equals_extent_2d_is_dense():
    assert Neighborhood((4, 6), grid=(4, 6)).mask(24, 24).all()
    m = Neighborhood((4, 6), is_causal=(True, True), grid=(4, 6)).mask(24, 24)
    # per-axis causal: key (r', c') allowed iff r' <= r and c' <= c
    r, c = torch.arange(24) // 6, torch.arange(24) % 6
    assert torch.equal(m, (r[None, :] <= r[:, None]) & (c[None, :] <= c[:, None]))


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=2))
def test_neighborhood_dilation_extent_over_kernel_equals_grid(axes):
    # DiNA property: delta = L / k  =>  attention within the dilation group == MaxViT grid attention
    ks = tuple(k for k, _ in axes)
    grid = tuple(k * m for k, m in axes)
    dil = tuple(m for _, m in axes)
    n = math.prod(grid)
    na = Neighborhood(ks, dilation=dil, grid=grid)
    assert torch.equal(na.mask(n, n), Grid(ks, grid=grid).mask(n, n))
    assert torch.equal(na.mask(n, n), ref.grid_mask(grid, ks))


@given(na_axis(causal=False))
def test_neighborhood_query0_same_keys_as_centre(axis):
    length, k, _, _, _ = axis
    m = Neighborhood(k).mask(length, length)
    assert torch.equal(m[0], m[k // 2])


@given(na_axis(causal=True))
def test_neighborhood_causal_query0_sees_only_itself(axis):
    length, k, d, _, _ = axis
    m = Neighborhood(k, dilation=d, is_causal=True).mask(length, length)
    assert m[0].nonzero().flatten().tolist() == [0]


def test_neighborhood_even_kernel_extra_key_on_the_left():
    m = Neighborhood(4).mask(10, 10)
    assert m[5].nonzero().flatten().tolist() == [3, 4, 5, 6]  # left = 2, right = 1
    m = Neighborhood(4, dilation=2).mask(20, 20)
    assert m[10].nonzero().flatten().tolist() == [6, 8, 10, 12]


def test_neighborhood_dilation_not_dividing_length():
    # L = 11, delta = 3: groups {0,3,6,9}, {1,4,7,10}, {2,5,8}
    m = Neighborhood(3, dilation=3).mask(11, 11)
    assert m[2].nonzero().flatten().tolist() == [2, 5, 8]
    assert m[10].nonzero().flatten().tolist() == [4, 7, 10]
    assert torch.equal(m, ref.neighborhood_mask((11,), 3, 3))


def test_neighborhood_stride_leader_rule():
    # stride 3, kernel 3, L = 10: runs {0,1,2}, {3,4,5}, {6,7,8}, {9}; leaders 1, 4, 7, 9 -> windows
    m = Neighborhood(3, stride=3).mask(10, 10)
    rows = [m[i].nonzero().flatten().tolist() for i in range(10)]
    assert rows[0] == rows[1] == rows[2] == [0, 1, 2]
    assert rows[3] == rows[4] == rows[5] == [3, 4, 5]
    assert rows[9] == [7, 8, 9]
    mc = Neighborhood(3, stride=2, is_causal=True).mask(6, 6)
    # causal leader of run {0, 1} is 1: query 0 sees {0}, query 1 sees {0, 1}; run {2,3}: leader 3
    assert [mc[i].nonzero().flatten().tolist() for i in range(4)] == [[0], [0, 1], [1, 2], [1, 2, 3]]


@pytest.mark.parametrize("length,kernel,dilation", [(4, 5, 1), (9, 5, 2), (1, 2, 1), (10, 4, 3)])
def test_neighborhood_window_larger_than_sequence_is_an_error(length, kernel, dilation):
    p = Neighborhood(kernel, dilation=dilation)
    with pytest.raises(ValueError, match="kernel_size"):
        p.mask(length, length)
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood(kernel, dilation=dilation, grid=(length,))
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood((3, kernel), dilation=(1, dilation), grid=(5, length))


def test_neighborhood_needs_square_problem():
    with pytest.raises(ValueError):
        Neighborhood(3).mask(8, 9)


# ---------------------------------------------------------------------------------------------------------
# Blocks (Swin W-MSA / SW-MSA, cyclic shift) and Grid (MaxViT)
# ---------------------------------------------------------------------------------------------------------


@st.composite
def blocks_params(draw, wrap):
    nd = draw(st.sampled_from([1, 2, 3]))
    max_len = {1: 30, 2: 12, 3: 6}[nd]
    grid, size, shift = [], [], []
    for _ in range(nd):
        if wrap:
            m = draw(st.integers(1, max_len))
            extent = m * draw(st.integers(1, max_len // m))
        else:
            extent = draw(st.integers(1, max_len))
            m = draw(st.integers(1, extent))
        grid.append(extent)
        size.append(m)
        shift.append(draw(st.integers(0, m - 1)))
    return tuple(grid), tuple(size), tuple(shift)


def make_blocks(grid, size, shift, wrap):
    if len(grid) == 1:
        return Blocks(size[0], shift=shift[0], wrap=wrap)
    return Blocks(size, grid=grid, shift=shift, wrap=wrap)


@given(blocks_params(wrap=False))
def test_blocks_swin_matches_region_label_construction(params):
    grid, size, shift = params
    n = math.prod(grid)
    assert torch.equal(make_blocks(grid, size, shift, False).mask(n, n), ref.swin_mask(grid, size, shift))


@given(blocks_params(wrap=True))
def test_blocks_wrap_matches_cyclic_roll(params):
    grid, size, shift = params
    n = math.prod(grid)
    assert torch.equal(make_blocks(grid, size, shift, True).mask(n, n), ref.cyclic_blocks_mask(grid, size, shift))


@pytest.mark.parametrize("m", [2, 4, 6])
def test_swin_reference_label_counts(m):
    # Swin region-label property, on our own reference: H = W = 2M, shift M/2 -> windows with 1, 2, 2, 4 labels
    h = 2 * m
    mask = ref.swin_mask((h, h), m, m // 2)
    token = torch.arange(h * h).view(h, h)
    rolled = torch.roll(token, shifts=(-(m // 2), -(m // 2)), dims=(0, 1))
    counts = []
    for wr in range(2):
        for wc in range(2):
            members = rolled[wr * m:(wr + 1) * m, wc * m:(wc + 1) * m].flatten()
            sub = mask[members][:, members]
            counts.append(len({tuple(row.tolist()) for row in sub}))
    assert counts == [1, 2, 2, 4]


def test_blocks_unshifted_is_the_window_partition():
    m = Blocks((2, 3), grid=(4, 6)).mask(24, 24)
    r, c = torch.arange(24) // 6, torch.arange(24) % 6
    win = (r // 2) * 2 + c // 3
    assert torch.equal(m, win[:, None] == win[None, :])
    assert Blocks(4, grid=(4, 4)).mask(16, 16).all()


@st.composite
def grid_params(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    max_len = {1: 30, 2: 12, 3: 6}[nd]
    size, grid = [], []
    for _ in range(nd):
        g = draw(st.integers(1, max_len))
        size.append(g)
        grid.append(g * draw(st.integers(1, max_len // g)))
    return tuple(grid), tuple(size)


@given(grid_params())
def test_grid_matches_maxvit_grid_partition(params):
    grid, size = params
    n = math.prod(grid)
    p = Grid(size[0]) if len(grid) == 1 else Grid(size, grid=grid)
    assert torch.equal(p.mask(n, n), ref.grid_mask(grid, size))


def test_grid_full_size_is_dense():
    assert Grid((4, 6), grid=(4, 6)).mask(24, 24).all()


# ---------------------------------------------------------------------------------------------------------
# positional patterns (cross-attention aligned bottom-right)
# ---------------------------------------------------------------------------------------------------------

lengths = st.integers(1, 40)


@st.composite
def positional(draw, nq, nk):
    """(pattern, reference mask) of a random positional pattern."""
    kind = draw(st.sampled_from(["causal", "sliding", "strided", "global", "sinks", "dense"]))
    if kind == "causal":
        return Causal(), ref.causal_mask(nq, nk)
    if kind == "sliding":
        left, right = draw(st.integers(0, 12)), draw(st.integers(0, 5))
        return SlidingWindow(left, right), ref.sliding_window_mask(nq, nk, left, right)
    if kind == "strided":
        stride, offset = draw(st.integers(1, 6)), draw(st.integers(0, 8))
        return Strided(stride, offset), ref.strided_mask(nq, nk, stride, offset)
    if kind == "global":
        n = draw(st.integers(1, 6))
        return GlobalTokens(n), ref.global_tokens_mask(nq, nk, n)
    if kind == "sinks":
        n = draw(st.integers(1, 6))
        return Sinks(n), ref.sinks_mask(nq, nk, n)
    return Dense(), ref.dense_mask(nq, nk)


@given(st.data(), lengths, lengths)
def test_positional_patterns_match_reference(data, nq, nk):
    p, expected = data.draw(positional(nq, nk))
    assert torch.equal(p.mask(nq, nk), expected)


def test_sliding_window_default_right_is_zero_and_clips():
    m = SlidingWindow(2).mask(5, 5)
    assert m[0].nonzero().flatten().tolist() == [0]
    assert m[4].nonzero().flatten().tolist() == [2, 3, 4]
    # decode: the single query sits at the last key position
    assert SlidingWindow(2).mask(1, 7)[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert Causal().mask(1, 7).all()


# ---------------------------------------------------------------------------------------------------------
# algebra
# ---------------------------------------------------------------------------------------------------------


@st.composite
def any_pattern(draw, n):
    """(pattern, reference mask) for a square problem of n tokens laid out as a 1D sequence."""
    kind = draw(st.sampled_from(["positional", "na", "blocks", "grid"]))
    if kind == "na":
        k = draw(st.integers(1, n))
        d = draw(st.integers(1, n // k))
        c = draw(st.booleans())
        return Neighborhood(k, dilation=d, is_causal=c), ref.neighborhood_mask((n,), k, d, c)
    if kind == "blocks":
        m = draw(st.integers(1, n))
        s = draw(st.integers(0, m - 1))
        return Blocks(m, shift=s), ref.swin_mask((n,), m, s)
    if kind == "grid":
        divisors = [g for g in range(1, n + 1) if n % g == 0]
        g = draw(st.sampled_from(divisors))
        return Grid(g), ref.grid_mask((n,), g)
    return draw(positional(n, n))


@given(st.data(), st.integers(1, 30))
def test_union_and_intersection_are_elementwise(data, n):
    (a, ma), (b, mb), (c, mc) = (data.draw(any_pattern(n)) for _ in range(3))
    assert torch.equal((a | b).mask(n, n), ma | mb)
    assert torch.equal((a & b).mask(n, n), ma & mb)
    assert torch.equal(((a | b) & c).mask(n, n), (ma | mb) & mc)
    assert torch.equal((a | (b & c)).mask(n, n), ma | (mb & mc))
    assert torch.equal((a | b | c).mask(n, n), ma | mb | mc)


@given(st.data(), st.integers(1, 30), st.integers(1, 4))
def test_perhead_stacks_and_combines(data, n, heads):
    parts = [data.draw(any_pattern(n)) for _ in range(heads)]
    ph = PerHead([p for p, _ in parts])
    stacked = torch.stack([m for _, m in parts])
    assert ph.heads == heads
    assert torch.equal(ph.mask(n, n), stacked)
    other, mo = data.draw(any_pattern(n))
    assert torch.equal((ph | other).mask(n, n), stacked | mo)
    assert torch.equal((other & ph).mask(n, n), mo & stacked)
    assert torch.equal((ph & ph).mask(n, n), stacked)


def test_perhead_combination_head_count_mismatch():
    with pytest.raises(ValueError, match="head"):
        PerHead([Causal(), Dense()]) | PerHead([Causal()])


def test_perhead_rejects_bad_lists():
    with pytest.raises(TypeError):
        PerHead([])
    with pytest.raises(TypeError):
        PerHead(Causal())
    with pytest.raises(TypeError):
        PerHead([PerHead([Causal()])])
    with pytest.raises(TypeError):
        PerHead([Causal(), "dense"])


def test_patterns_compare_by_value():
    assert Neighborhood(3) == Neighborhood((3,))
    assert hash(Neighborhood(3, dilation=2)) == hash(Neighborhood((3,), dilation=(2,)))
    assert Neighborhood(3) != Neighborhood(5)
    assert Blocks(2, shift=1) != Blocks(2, shift=1, wrap=True)
    assert (Causal() | Sinks(2)) == (Causal() | Sinks(2))
    assert SlidingWindow(3) != SlidingWindow(3, 1)
