"""Super token attention: float64 brute-force loops written from the paper's equations and the official code
(hhb072/STViT ``models/stvit.py`` ``StokenAttention``), its properties (oracles), hygiene, baseline."""

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
from oracles.super_token import BASELINES

import nearfar
from nearfar.layers.super_token import SuperTokenAttention

# ---------------------------------------------------------------------------------------------------------
# brute-force float64 reference: loops over cells, neighbours (and pixels for Q), per the paper's formulas
# ---------------------------------------------------------------------------------------------------------


def _neighbour(r: int, c: int, k: int, grid: tuple[int, int]):
    """Cell of neighbour k = 3 * (dy + 1) + (dx + 1) of cell (r, c), or None off the grid."""
    rr, cc = r + k // 3 - 1, c + k % 3 - 1
    return (rr, cc) if 0 <= rr < grid[0] and 0 <= cc < grid[1] else None


def _cell_pixels(xp: torch.Tensor, r: int, c: int, cell: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C): the pixels of cell (r, c), row-major inside the cell."""
    sh, sw = cell
    return xp[:, r * sh:(r + 1) * sh, c * sw:(c + 1) * sw].reshape(xp.shape[0], sh * sw, xp.shape[-1])


def brute_q(xp, s, cell):
    """Q (B, hh, ww, h*w, 9): per pixel, softmax over its cell's 9 neighbours of C^-0.5 p.S_j (0 off the grid)."""
    b, hh, ww, c = s.shape
    q = torch.zeros(b, hh, ww, cell[0] * cell[1], 9, dtype=xp.dtype)
    for r in range(hh):
        for col in range(ww):
            pix = _cell_pixels(xp, r, col, cell)
            for i in range(pix.shape[1]):
                logits = torch.zeros(b, 9, dtype=xp.dtype)
                for k in range(9):
                    nb = _neighbour(r, col, k, (hh, ww))
                    if nb is not None:
                        logits[:, k] = (pix[:, i] * s[:, nb[0], nb[1]]).sum(-1) * c ** -0.5
                q[:, r, col, i] = torch.softmax(logits, -1)
    return q


def brute_update(xp, q, cell):
    """S_j = sum over pixels i whose neighbourhood holds j of Q_ij p_i / (sum of those Q_ij (no grad) + 1e-12)."""
    b, hh, ww = q.shape[:3]
    rows = []
    for r in range(hh):
        cols = []
        for col in range(ww):
            num = torch.zeros(b, xp.shape[-1], dtype=xp.dtype)
            den = torch.zeros(b, 1, dtype=xp.dtype)
            for k in range(9):  # cell (r, col) is neighbour 8 - k of its neighbour k
                src = _neighbour(r, col, k, (hh, ww))
                if src is not None:
                    w = q[:, src[0], src[1], :, 8 - k]  # (B, h*w)
                    num = num + torch.einsum("bp,bpc->bc", w, _cell_pixels(xp, *src, cell))
                    den = den + w.sum(-1, keepdim=True)
            cols.append(num / (den.detach() + 1e-12))
        rows.append(torch.stack(cols, 1))
    return torch.stack(rows, 1)  # (B, hh, ww, C)


def brute_upsample(s, q, cell):
    """Pixel i of cell (r, c): sum over in-grid neighbours j of Q_ij S_j; back to the (B, H, W, C) map."""
    b, hh, ww, c = s.shape
    sh, sw = cell
    rows = []
    for r in range(hh):
        cols = []
        for col in range(ww):
            out = torch.zeros(b, sh * sw, c, dtype=s.dtype)
            for k in range(9):
                nb = _neighbour(r, col, k, (hh, ww))
                if nb is not None:
                    out = out + q[:, r, col, :, k, None] * s[:, None, nb[0], nb[1]]
            cols.append(out.reshape(b, sh, sw, c))
        rows.append(torch.cat(cols, 2))
    return torch.cat(rows, 1)


def mhsa_reference(refine, x):
    """Official refine MHSA: qkv channel (head * 3d + t * d + j), t = q, k, v; softmax over keys; proj."""
    b, c = x.shape[0], x.shape[-1]
    h = refine.num_heads
    d = c // h
    qkv = F.linear(x.reshape(b, -1, c), refine.qkv.weight, refine.qkv.bias)
    q, k, v = ([qkv[..., [hd * 3 * d + t * d + j for j in range(d)]] for hd in range(h)] for t in range(3))
    q, k, v = (torch.stack(t, 1) for t in (q, k, v))
    out = ref.dense_reference(q, k, v, torch.ones(1, dtype=torch.bool), d ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(x.shape), refine.proj.weight, refine.proj.bias)


def st_reference(m: SuperTokenAttention, x: torch.Tensor) -> torch.Tensor:
    b, h0, w0, c = x.shape
    cell = m.cell_size(h0, w0)
    if cell == (1, 1):
        return mhsa_reference(m.stoken_refine, x) if m.refine else x
    xp = F.pad(x, (0, 0, 0, -w0 % cell[1], 0, -h0 % cell[0]))
    hh, ww = xp.shape[1] // cell[0], xp.shape[2] // cell[1]
    with torch.no_grad():
        s = torch.stack([torch.stack([_cell_pixels(xp, r, col, cell).mean(1) for col in range(ww)], 1)
                         for r in range(hh)], 1)
        for it in range(m.n_iter):
            q = brute_q(xp, s, cell)
            if it < m.n_iter - 1:
                s = brute_update(xp, q, cell)
    s = brute_update(xp, q, cell)
    if m.refine:
        s = mhsa_reference(m.stoken_refine, s)
    return brute_upsample(s, q, cell)[:, :h0, :w0]


CASES = [  # (H, W), stoken_size, n_iter, refine, num_heads
    ((6, 9), (2, 3), 1, True, 2),  # divisible
    ((7, 8), (2, 3), 2, True, 1),  # padding on both axes, two iterations
    ((5, 5), 2, 3, True, 2),  # padding, three iterations
    ((9, 7), (3, 2), 1, False, 2),  # no refine
    ((5, 7), (1, 1), 1, True, 2),  # plain MHSA
]


@pytest.mark.parametrize("size,stoken_size,n_iter,refine,heads", CASES)
def test_matches_reference(size, stoken_size, n_iter, refine, heads):
    torch.manual_seed(0)
    m = SuperTokenAttention(8, heads, stoken_size=stoken_size, n_iter=n_iter, refine=refine, qkv_bias=True)
    check_against_reference(m, torch.randn(2, *size, 8), st_reference)


@settings(max_examples=6)
@given(h=st.integers(2, 8), w=st.integers(2, 8), sh=st.integers(1, 3), sw=st.integers(1, 3),
       n_iter=st.integers(1, 2), refine=st.booleans())
def test_matches_reference_hypothesis(h, w, sh, sw, n_iter, refine):
    torch.manual_seed(h * 10 + w)
    m = SuperTokenAttention(4, 2, stoken_size=(sh, sw), n_iter=n_iter, refine=refine, qkv_bias=True)
    check_against_reference(m, torch.randn(1, h, w, 4), st_reference)


# ---------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------


def test_oracle1_unit_cell_is_exact_mhsa():
    torch.manual_seed(1)
    m = SuperTokenAttention(12, 3, stoken_size=1, qkv_bias=True)
    x = torch.randn(2, 5, 6, 12)
    qkv = m.stoken_refine.qkv(x).reshape(2, 30, 3, 3, 4).permute(3, 0, 2, 1, 4)  # [heads, 3, d] -> 3, B, h, N, d
    full = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    assert_close(m(x), m.stoken_refine.proj(full.transpose(1, 2).reshape(x.shape)), 1e-5)
    auto = SuperTokenAttention(12, 3, qkv_bias=True)  # "auto" at 14x14 is the official stage-3 (1, 1)
    auto.load_state_dict(m.state_dict())
    x14 = torch.randn(1, 14, 14, 12)
    assert auto.cell_size(14, 14) == (1, 1) and torch.equal(auto(x14), m(x14))


def test_oracle2_constant_input_interior_exact_border_shrinks():
    c = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    m = SuperTokenAttention(4, 2, stoken_size=2, refine=False).double()
    out = m(c.expand(1, 8, 8, 4))[0]  # a 4x4 grid of 2x2 cells
    interior = torch.zeros(8, 8, dtype=torch.bool)
    interior[2:6, 2:6] = True
    assert_close(out[interior], c.expand(16, 4), 1e-12, "interior cells")
    ratio = out[~interior] / c  # border pixels: the same direction, shrunk by the mass on zero neighbours
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))
    assert (ratio < 1 - 1e-3).all() and (ratio > 0).all()


@pytest.mark.parametrize("grid,cell,n_iter", [((3, 4), (2, 3), 1), ((4, 2), (3, 1), 2), ((1, 3), (2, 2), 1)])
def test_oracle3_brute_force_q_update_upsample(grid, cell, n_iter):
    torch.manual_seed(2)
    m = SuperTokenAttention(6, 2, stoken_size=cell, n_iter=n_iter).double()
    b, (hh, ww), (sh, sw) = 2, grid, cell
    xp = torch.randn(b, hh * sh, ww * sw, 6, dtype=torch.float64)
    pixels = torch.stack([_cell_pixels(xp, r, c, cell) for r in range(hh) for c in range(ww)], 1)
    q, mass = m.associate(pixels, grid)
    with torch.no_grad():  # the brute-force chain of n_iter association steps
        s = pixels.mean(2).reshape(b, hh, ww, 6)
        for it in range(n_iter):
            q_ref = brute_q(xp, s, cell)
            if it < n_iter - 1:
                s = brute_update(xp, q_ref, cell)
    assert_close(q, q_ref.reshape(q.shape), 1e-12, "Q")
    s = m.update(pixels, q, mass, grid)
    s_ref = brute_update(xp, q_ref, cell)
    assert_close(s, s_ref.reshape(s.shape), 1e-12, "S update")
    up = m.upsample(s, q, grid).reshape(b, hh, ww, sh, sw, 6).transpose(2, 3).reshape(xp.shape)
    assert_close(up, brute_upsample(s_ref, q_ref, cell), 1e-12, "upsample")


# ---------------------------------------------------------------------------------------------------------
# hygiene
# ---------------------------------------------------------------------------------------------------------


def test_forward_backward_finite_and_compile():
    torch.manual_seed(3)
    m = SuperTokenAttention(8, 2, stoken_size=(2, 3), n_iter=2)
    x = torch.randn(2, 7, 8, 8)
    check_forward_backward_finite(m, x)
    check_compile_matches_eager(m, x)


def test_gradient_reaches_pixels_not_association():
    """Only the final update and the upsample carry gradient: a zero-refine module's input gradient is zero."""
    m = SuperTokenAttention(4, 2, stoken_size=2)
    with torch.no_grad():
        m.stoken_refine.proj.weight.zero_()
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    m(x).sum().backward()
    assert not x.grad.any()


def test_state_dict_names_and_official_checkpoint():
    m = SuperTokenAttention(16, 2, stoken_size=4, qkv_bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"stoken_refine.qkv.weight": (48, 16), "stoken_refine.qkv.bias": (48,),
                      "stoken_refine.proj.weight": (16, 16), "stoken_refine.proj.bias": (16,)}
    eye = torch.eye(9).reshape(9, 1, 3, 3)
    official = {"unfold.weights": eye, "fold.weights": eye,  # the official StokenAttention's state_dict
                "stoken_refine.qkv.weight": torch.randn(48, 16, 1, 1), "stoken_refine.qkv.bias": torch.randn(48),
                "stoken_refine.proj.weight": torch.randn(16, 16, 1, 1), "stoken_refine.proj.bias": torch.randn(16)}
    m.load_state_dict(official)
    assert torch.equal(m.stoken_refine.qkv.weight, official["stoken_refine.qkv.weight"][:, :, 0, 0])
    assert torch.equal(m.stoken_refine.proj.weight, official["stoken_refine.proj.weight"][:, :, 0, 0])
    check_state_dict_round_trip(lambda: SuperTokenAttention(8, 2, stoken_size=2), torch.randn(1, 5, 6, 8))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        SuperTokenAttention(10, 3)
    for bad in (0, (2,), (2, 0), "big"):
        with pytest.raises(ValueError, match="stoken_size"):
            SuperTokenAttention(8, 2, stoken_size=bad)
    # a wrong type is a TypeError (nearfar.checks' rule; it was a ValueError before the checks were unified)
    for bad in (2.0, (2, True)):
        with pytest.raises(TypeError, match="stoken_size"):
            SuperTokenAttention(8, 2, stoken_size=bad)
    with pytest.raises(ValueError, match="n_iter"):
        SuperTokenAttention(8, 2, n_iter=0)
    with pytest.raises(TypeError, match="refine"):
        SuperTokenAttention(8, 2, refine=1)
    with pytest.raises(ValueError, match="qk_scale"):
        SuperTokenAttention(8, 2, qk_scale=-1.0)
    m = SuperTokenAttention(8, 2, stoken_size=2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(4, 4, 8))


def test_baseline_matches_module():
    torch.manual_seed(4)
    for size, cell, n_iter, refine, heads in CASES:
        m = SuperTokenAttention(8, heads, stoken_size=cell, n_iter=n_iter, refine=refine, qkv_bias=True)
        x = torch.randn(2, *size, 8)
        with torch.no_grad():
            assert_close(m(x), BASELINES["super_token"](m, x), 1e-5)


def test_registry_make_on_benchmark_shapes():
    entry = {e.name: e for e in nearfar.mechanisms()}["super_token"]
    assert entry.repo == "hhb072/STViT" and entry.cls is SuperTokenAttention
    with torch.no_grad():
        for dim, heads, side, cell in ((96, 3, 56, (8, 8)), (384, 12, 14, (1, 1))):
            m = entry.make(dim, heads)
            assert m.cell_size(side, side) == cell and m.n_iter == 1
            assert m(torch.randn(1, side, side, dim)).shape == (1, side, side, dim)
