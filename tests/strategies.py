"""Hypothesis strategies shared by the engine tests and the fuzzer: patterns (positional, spatial 1D/2D/3D,
unions, intersections, PerHead) with their float64 reference masks, and whole attention problems."""

from __future__ import annotations

import math
from functools import lru_cache

import reference as ref
import torch
from hypothesis import strategies as st

from nearfar import Blocks, Causal, Dense, GlobalTokens, Grid, Neighborhood, PerHead, Sinks, SlidingWindow, Strided

# ---------------------------------------------------------------------------------------------------------
# cached reference masks (hashable arguments; callers must not modify the result)
# ---------------------------------------------------------------------------------------------------------

_cached = {name: lru_cache(maxsize=256)(getattr(ref, name)) for name in (
    "neighborhood_mask", "swin_mask", "cyclic_blocks_mask", "grid_mask", "causal_mask", "sliding_window_mask",
    "strided_mask", "global_tokens_mask", "sinks_mask", "dense_mask")}


def rmask(name, *args):
    return _cached[name](*args)


# ---------------------------------------------------------------------------------------------------------
# pattern strategies: each returns (pattern, reference mask (nq, nk), rpb info or None)
# ---------------------------------------------------------------------------------------------------------


@st.composite
def positional(draw, nq, nk):
    kind = draw(st.sampled_from(["causal", "sliding", "strided", "global", "sinks", "dense"]))
    if kind == "causal":
        return Causal(), rmask("causal_mask", nq, nk), None
    if kind == "sliding":
        left, right = draw(st.integers(0, 40)), draw(st.integers(0, 8))
        return SlidingWindow(left, right), rmask("sliding_window_mask", nq, nk, left, right), None
    if kind == "strided":
        stride, offset = draw(st.integers(1, 9)), draw(st.integers(0, 9))
        return Strided(stride, offset), rmask("strided_mask", nq, nk, stride, offset), None
    if kind == "global":
        n = draw(st.integers(1, 8))
        return GlobalTokens(n), rmask("global_tokens_mask", nq, nk, n), None
    if kind == "sinks":
        n = draw(st.integers(1, 8))
        return Sinks(n), rmask("sinks_mask", nq, nk, n), None
    return Dense(), rmask("dense_mask", nq, nk), None


@st.composite
def spatial(draw, grid, kinds=("na", "na", "blocks", "grid")):
    """A spatial pattern on ``grid`` (1D/2D/3D), of one of ``kinds``."""
    nd = len(grid)
    kind = draw(st.sampled_from(kinds))
    if kind == "na":
        ks, dil, cau, stride = [], [], [], []
        for extent in grid:
            k = draw(st.integers(1, min(extent, 15)))
            ks.append(k)
            dil.append(draw(st.one_of(st.just(1), st.integers(1, extent // k))))
            cau.append(draw(st.booleans()) if draw(st.integers(0, 3)) == 0 else False)
            stride.append(draw(st.integers(1, k)) if draw(st.integers(0, 3)) == 0 else 1)
        ks, dil, cau, stride = map(tuple, (ks, dil, cau, stride))
        p = Neighborhood(ks, dilation=dil, is_causal=cau, stride=stride, grid=grid) if nd > 1 or draw(
            st.booleans()) else Neighborhood(ks[0], dilation=dil[0], is_causal=cau[0], stride=stride[0])
        info = (grid, ks, dil) if not any(cau) and all(s == 1 for s in stride) else None
        return p, rmask("neighborhood_mask", grid, ks, dil, cau, stride), info
    if kind == "blocks":
        wrap = draw(st.booleans())
        size, shift = [], []
        for extent in grid:
            if wrap:
                m = draw(st.sampled_from([g for g in range(1, extent + 1) if extent % g == 0]))
            else:
                m = draw(st.integers(1, extent))
            size.append(m)
            shift.append(draw(st.integers(0, m - 1)))
        size, shift = tuple(size), tuple(shift)
        p = Blocks(size, grid=grid, shift=shift, wrap=wrap)
        name = "cyclic_blocks_mask" if wrap else "swin_mask"
        return p, rmask(name, grid, size, shift), None
    size = tuple(draw(st.sampled_from([g for g in range(1, e + 1) if e % g == 0])) for e in grid)
    return Grid(size, grid=grid), rmask("grid_mask", grid, size), None


@st.composite
def grids(draw, max_n):
    nd = draw(st.sampled_from([1, 1, 2, 2, 3]))
    if nd == 1:
        return (draw(st.integers(1, max_n)),)
    if nd == 2:
        h = draw(st.integers(1, 17))
        return h, draw(st.integers(1, max(1, min(17, max_n // h))))
    return tuple(draw(st.integers(1, 6)) for _ in range(3))


@st.composite
def base_pattern(draw, nq, nk, grid, windows_only=False):
    if windows_only:  # the partition engine's patterns: windows on a grid
        return draw(spatial(grid, kinds=("blocks", "grid")))
    if grid is not None and draw(st.integers(0, 2)) > 0:
        return draw(spatial(grid))
    return draw(positional(nq, nk))


SHAPES = ("none", "base", "union", "inter", "perhead")


@st.composite
def pattern_for(draw, nq, nk, grid, heads, shapes=SHAPES, windows_only=False):
    """Random pattern: none, a base, a union/intersection of two, or a PerHead of ``heads`` such (``windows_only``:
    every base pattern is a window pattern, ``Blocks`` or ``Grid``)."""
    shape = draw(st.sampled_from(shapes))
    if shape == "none":
        return None, rmask("dense_mask", nq, nk), None
    if shape in ("union", "inter"):
        (a, ma, _), (b, mb, _) = (draw(base_pattern(nq, nk, grid, windows_only)) for _ in range(2))
        return (a | b, ma | mb, None) if shape == "union" else (a & b, ma & mb, None)
    if shape == "perhead":
        parts = [draw(base_pattern(nq, nk, grid, windows_only)) for _ in range(heads)]
        return PerHead([p for p, _, _ in parts]), torch.stack([m for _, m, _ in parts]), None
    return draw(base_pattern(nq, nk, grid, windows_only))


DENSE_BIAS_SHAPES = ("bhqk", "1hqk", "hqk", "qk", "b1qk", "k", "b11k", "h1k")


@st.composite
def problems(draw, max_n=300, modes=("self", "cross", "decode"), shapes=SHAPES, bias_kinds=("none", "dense", "rpb"),
             kpm_kinds=("none", "random", "empty_item"), batches=(1, 2), windows_only=False):
    """A whole attention problem description (no tensors yet); ``windows_only``: self-attention with window
    patterns (what the partition engine runs)."""
    if windows_only:
        modes, shapes = ("self",), tuple(s for s in shapes if s != "none")
    b = draw(st.sampled_from(batches))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d = draw(st.sampled_from([8, 16, 24]))
    dv = draw(st.sampled_from([d, d, 8, 16, 24]))
    mode = draw(st.sampled_from(modes))
    if mode == "self":
        grid = draw(grids(max_n))
        nq = nk = math.prod(grid)
    else:
        grid = None
        nq = 1 if mode == "decode" else draw(st.integers(1, max_n))
        nk = draw(st.integers(1, max_n))
    pattern, mask, rpb_info = draw(pattern_for(nq, nk, grid, hq, shapes, windows_only))
    kpm_kind = draw(st.sampled_from(kpm_kinds))
    bias_kind = draw(st.sampled_from([x for x in bias_kinds if x != "rpb" or rpb_info is not None] or ["none"]))
    bias_shape = None
    if bias_kind == "dense":
        dims = dict(b=b, h=hq, q=nq, k=nk, **{"1": 1})
        bias_shape = tuple(dims[c] for c in draw(st.sampled_from(DENSE_BIAS_SHAPES)))
    return dict(b=b, hkv=hkv, hq=hq, d=d, dv=dv, nq=nq, nk=nk, pattern=pattern, mask=mask, rpb_info=rpb_info,
                kpm_kind=kpm_kind, bias_kind=bias_kind, bias_shape=bias_shape,
                scale=draw(st.sampled_from([None, None, 0.3, 1.0])), bias_grad=draw(st.booleans()),
                return_lse=draw(st.booleans()), bnhd=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))
