"""Swin W-MSA / SW-MSA and Video Swin 3D: float64 reference written from the papers and the official code
(microsoft/Swin-Transformer ``models/swin_transformer.py``: ``window_partition``, relative position index, region mask;
Video-Swin-Transformer ``WindowAttention3D``), its properties (oracles), the benchmark baseline, timm parameter names,
module hygiene."""

from __future__ import annotations

import itertools
import math

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
from oracles.swin import BASELINES

import nearfar
from nearfar import Blocks
from nearfar.layers.swin import WindowAttention

# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


def bias_index(window: tuple[int, ...], table_window: tuple[int, ...]) -> torch.Tensor:
    """Swin's relative position index with plain loops: ``(n, n)`` rows of the Swin table for query slot ``i`` and key
    slot ``j`` of a window of size ``window`` (row-major slots), the table being built for ``table_window`` (``M``). 2D:
    ``(i_y - j_y + M_h - 1) * (2 M_w - 1) + (i_x - j_x + M_w - 1)``; 3D: the same nesting with ``t`` outermost."""
    slots = list(itertools.product(*(range(w) for w in window)))
    idx = torch.zeros(len(slots), len(slots), dtype=torch.long)
    for a, si in enumerate(slots):
        for b, sj in enumerate(slots):
            flat = 0
            for i_ax, j_ax, m in zip(si, sj, table_window):
                flat = flat * (2 * m - 1) + (i_ax - j_ax + m - 1)
            idx[a, b] = flat
    return idx


def _region_band(t: int, extent: int, m: int, s: int) -> int:
    return 0 if t < extent - m else (1 if t < extent - s else 2)


def swin_reference(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin (2D and 3D) in float64: clip the window to the input (per axis, shift 0 on a clipped axis, as
    ``window_for``), zero-pad bottom/right to a multiple of the window with the padded *keys masked out*, roll by
    ``-shift``, partition (``window_partition``) with loops over windows, logits ``s q k^T`` + relative-position bias
    (module's table) + Swin's region mask (``-inf``), softmax, reverse, roll back, crop, proj."""
    b, *spatial, c = x.shape
    nd, heads = len(spatial), m.num_heads
    d = c // heads
    window = tuple(min(mw, n) for mw, n in zip(m.window_size, spatial))
    shift = tuple(0 if n <= mw else s for s, mw, n in zip(m.shift_size, m.window_size, spatial))
    padded = tuple(-(-n // w) * w for n, w in zip(spatial, window))
    crop = (slice(None),) + tuple(slice(0, n) for n in spatial)
    xp = x.new_zeros(b, *padded, c)
    xp[crop] = x
    real = torch.zeros(padded, dtype=torch.bool)
    real[crop[1:]] = True
    dims = tuple(range(1, nd + 1))
    xr = torch.roll(xp, tuple(-s for s in shift), dims)
    real_r = torch.roll(real, tuple(-s for s in shift), tuple(range(nd)))
    qkv = m.qkv(xr)  # (B, *padded, 3C): padded tokens' k, v are the qkv bias, masked below
    bias = m.relative_position_bias_table[bias_index(window, m.window_size)].permute(2, 0, 1)  # (heads, n, n)
    out = xr.new_zeros(b, *padded, c)
    for win in itertools.product(*(range(p // w) for p, w in zip(padded, window))):
        sl = tuple(slice(i * w, (i + 1) * w) for i, w in zip(win, window))
        # region labels of the rolled (padded) positions of this window, from the *unrolled* label map
        labels = [tuple(_region_band(i * w + o, p, w, s) for i, w, o, p, s in zip(win, window, off, padded, shift))
                  for off in itertools.product(*(range(w) for w in window))]
        same = torch.tensor([[li == lj for lj in labels] for li in labels])
        allowed = same & real_r[sl].reshape(1, -1)
        t = qkv[(slice(None),) + sl].reshape(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
        o = ref.dense_reference(t[0], t[1], t[2], allowed, m.scale, bias)
        out[(slice(None),) + sl] = o.transpose(1, 2).reshape(b, *window, c)
    out = torch.roll(out, shift, dims)[crop]
    return m.proj(out)


def _module(dim, heads, window, shift=0, ndim=2, seed=0, **kw) -> WindowAttention:
    torch.manual_seed(seed)
    m = WindowAttention(dim, heads, window, shift, ndim=ndim, **kw)
    torch.nn.init.normal_(m.relative_position_bias_table)  # std 1: a wrong table entry is visible
    return m


# ---------------------------------------------------------------------------------------------------------------
# module vs reference
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(h=st.integers(1, 9), w=st.integers(1, 9), m0=st.integers(1, 4), m1=st.integers(1, 4),
       s0=st.integers(0, 3), s1=st.integers(0, 3), heads=st.integers(1, 2))
def test_swin_2d_matches_reference(h, w, m0, m1, s0, s1, heads):
    m = _module(4 * heads, heads, (m0, m1), (s0 % m0, s1 % m1), seed=h * 10 + w)
    check_against_reference(m, torch.randn(2, h, w, 4 * heads), swin_reference)


@pytest.mark.parametrize("grid,window,shift", [
    ((14, 14), 7, 0),  # divisible, W-MSA
    ((14, 14), 7, 3),  # divisible, SW-MSA
    ((9, 13), 7, 3),  # odd, padded edge windows
    ((5, 11), 7, 3),  # H < M: clipped to 5 with shift 0 on H; W padded to 14 and shifted
    ((7, 7), 7, 3),  # H = W = M: one window, shift 0 (official: min(H, W) <= M)
])
def test_swin_benchmark_window_matches_reference(grid, window, shift):
    m = _module(12, 3, window, shift, seed=1)
    check_against_reference(m, torch.randn(1, *grid, 12), swin_reference)


@pytest.mark.parametrize("grid,window,shift", [
    ((4, 4, 4), (2, 2, 2), (1, 1, 1)),  # divisible
    ((3, 5, 4), (2, 3, 2), (1, 1, 1)),  # odd: padded on every axis
    ((3, 9, 10), (2, 7, 7), (1, 3, 3)),  # Video Swin-like window, non-divisible
    ((2, 5, 6), (8, 7, 7), (4, 3, 3)),  # every axis clipped: one window, no shift
    ((5, 3, 8), (2, 4, 4), (1, 2, 2)),  # H clipped (shift 0 there), T and W shifted
])
def test_swin_3d_matches_reference(grid, window, shift):
    m = _module(8, 2, window, shift, ndim=3, seed=2)
    check_against_reference(m, torch.randn(2, *grid, 8), swin_reference)


def test_qk_scale_and_no_qkv_bias():
    m = _module(8, 2, 3, 1, qk_scale=0.3, qkv_bias=False, seed=3)
    assert m.scale == 0.3 and m.qkv.bias is None
    check_against_reference(m, torch.randn(2, 7, 5, 8), swin_reference)


def test_window_for_clips_per_axis():
    m = WindowAttention(8, 2, 7, 3)
    assert m.window_for((56, 56)) == ((7, 7), (3, 3))
    assert m.window_for((7, 9)) == ((7, 7), (0, 3))  # extent == M: shift 0 on that axis
    assert m.window_for((5, 20)) == ((5, 7), (0, 3))  # per axis (official 2D: min(H, W) on both axes)
    m3 = WindowAttention(8, 2, (8, 7, 7), (4, 3, 3), ndim=3)
    assert m3.window_for((4, 14, 6)) == ((4, 7, 6), (0, 3, 0))


def test_bias_index_matches_swin_meshgrid_construction():
    """The loop bias index equals the official vectorised construction (coords difference, shift, multiply)."""
    for window in ((3, 4), (7, 7)):
        coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += window[0] - 1
        rel[:, :, 1] += window[1] - 1
        rel[:, :, 0] *= 2 * window[1] - 1
        assert torch.equal(bias_index(window, window), rel.sum(-1))


# ---------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------------


def _split_p1(m: WindowAttention, x: torch.Tensor):
    b, *spatial, c = x.shape
    return m.qkv(x).reshape(b, -1, 3, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)


def test_oracle1_one_window_is_full_mhsa_with_rpb():
    m = _module(12, 3, 5, 0, seed=4)
    x = torch.randn(2, 5, 5, 12)
    q, k, v = _split_p1(m, x)
    bias = m.relative_position_bias_table[bias_index((5, 5), (5, 5))].permute(2, 0, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert_close(m(x), m.proj(o.transpose(1, 2).reshape(2, 5, 5, 12)))


def test_oracle2_shifted_is_dense_ref_with_region_mask():
    m = _module(8, 2, 4, 2, seed=5)
    x = torch.randn(2, 8, 12, 8)
    q, k, v = _split_p1(m, x)
    allowed = ref.swin_mask((8, 12), 4, 2)
    # the Swin table (query-minus-key, flattened) as the key-minus-query (heads, 7, 7) table window_rpb_bias takes
    offsets = m.relative_position_bias_table.t().reshape(2, 7, 7).flip(1, 2)
    bias = ref.window_rpb_bias(offsets, (8, 12), 4, 2)
    o = ref.dense_reference(q, k, v, allowed, m.scale, bias)
    assert_close(m(x), m.proj(o.transpose(1, 2).reshape(2, 8, 12, 8).float()))


def test_oracle3_region_labels_per_window():
    """H = W = 2M, shift M/2: the rolled windows hold 1, 2, 2 and 4 Swin regions; shift 0: one region each."""
    mw = 4
    n = 2 * mw
    rolled = torch.roll(torch.arange(n * n).view(n, n), (-mw // 2, -mw // 2), (0, 1))
    windows = [rolled[i:i + mw, j:j + mw].reshape(-1) for i in (0, mw) for j in (0, mw)]
    for shift, expected in ((mw // 2, [1, 2, 2, 4]), (0, [1, 1, 1, 1])):
        masks = {"module": Blocks(mw, grid=(n, n), shift=shift).mask(n * n, n * n),
                 "reference": ref.swin_mask((n, n), mw, shift)}
        for name, mask in masks.items():
            win = windows if shift else [torch.arange(n * n).view(n, n)[i:i + mw, j:j + mw].reshape(-1)
                                         for i in (0, mw) for j in (0, mw)]
            counts = [len({tuple(r.tolist()) for r in mask[t][:, t]}) for t in win]
            assert counts == expected, (name, shift, counts)
            # and nothing crosses windows
            inside = torch.zeros_like(mask)
            for t in win:
                inside[t[:, None], t[None, :]] = True
            assert not (mask & ~inside).any(), name


# ---------------------------------------------------------------------------------------------------------------
# baseline, timm names, hygiene
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,grid,window", [
    ("swin", (14, 14), 7), ("swin_shifted", (14, 21), 7), ("swin_shifted", (8, 8), 4),
    ("swin_shifted", (7, 14), 7),  # H = M: shift 0 on H only
    ("swin_shifted", (4, 6, 6), (2, 3, 3)), ("swin", (4, 6, 6), (2, 3, 3)),  # Video Swin
])
def test_baseline_matches_module(name, grid, window):
    torch.manual_seed(6)
    m = {e.name: e for e in nearfar.mechanisms()}[name].make(24, 3, window_size=window, ndim=len(grid))
    torch.nn.init.normal_(m.relative_position_bias_table)
    x = torch.randn(2, *grid, 24)
    with torch.no_grad():
        assert_close(BASELINES[name](m, x), m(x), name=f"baseline {name} {grid}")


def test_state_dict_matches_timm_and_loads_official_buffers():
    m = WindowAttention(96, 3, 7)
    expected = {"qkv.weight": (288, 96), "qkv.bias": (288,), "relative_position_bias_table": (169, 3),
                "proj.weight": (96, 96), "proj.bias": (96,)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    m3 = WindowAttention(48, 3, (2, 7, 7), ndim=3)
    assert tuple(m3.relative_position_bias_table.shape) == (3 * 13 * 13, 3)
    # an official checkpoint also holds the derived relative_position_index buffer: loads with strict=True
    src = _module(16, 2, 3, 1, seed=7)
    sd = dict(src.state_dict())
    sd["relative_position_index"] = bias_index((3, 3), (3, 3))
    dst = WindowAttention(16, 2, 3, 1)
    dst.load_state_dict(sd, strict=True)
    assert "relative_position_index" in sd  # the caller's dict is not modified
    x = torch.randn(1, 6, 7, 16)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # nested, as in a timm / official block ("attn." prefix)
    block = torch.nn.ModuleDict({"attn": WindowAttention(16, 2, 3, 1)})
    block.load_state_dict({f"attn.{k}": v for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(src(x), block["attn"](x))
    check_state_dict_round_trip(lambda: WindowAttention(16, 2, 3, 1), x)


def test_no_nan_on_odd_sizes_and_compile_matches_eager():
    m = _module(12, 3, 7, 3, seed=8)
    for grid in ((1, 1), (3, 10), (13, 9)):
        check_forward_backward_finite(m, torch.randn(2, *grid, 12))
    check_forward_backward_finite(_module(8, 2, (2, 3, 3), (1, 1, 1), ndim=3), torch.randn(1, 3, 4, 5, 8))
    check_compile_matches_eager(_module(8, 2, 4, 2, seed=9), torch.randn(1, 9, 6, 8))


def test_errors():
    with pytest.raises(ValueError, match="ndim"):
        WindowAttention(8, 2, 7, ndim=4)
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(8, 2, 7, 7)
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(8, 2, (4, 4), (1, 5))
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention(10, 3, 7)
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention(8, 2, (7, 7, 7))
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention(8, 2, 0)
    m = WindowAttention(8, 2, 4)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 5, 5))  # channels first
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 2, 5, 5, 8))  # 3D input to a 2D module
    with pytest.raises(TypeError, match="x"):
        m([[1.0]])


@pytest.mark.parametrize("name", ["swin", "swin_shifted"])
def test_registry(name):
    entry = {e.name: e for e in nearfar.mechanisms()}[name]
    assert entry.cls is WindowAttention and entry.repo == "microsoft/Swin-Transformer" and "2d" in entry.dims
    shift = 3 if name == "swin_shifted" else 0
    for (dim, heads), grid in (((96, 3), 56), ((384, 12), 14)):
        m = entry.make(dim, heads)
        assert (m.window_size, m.shift_size, m.num_heads) == ((7, 7), (shift, shift), heads)
        with torch.no_grad():
            assert m(torch.randn(1, grid, grid, dim)).shape == (1, grid, grid, dim)
    m3 = entry.make(16, 2, window_size=(2, 4, 4), ndim=3)
    assert m3.shift_size == ((1, 2, 2) if shift else (0, 0, 0))
    assert math.prod(m3(torch.randn(1, 4, 8, 8, 16)).shape) == 4 * 64 * 16
