"""Selections and masks from attention (``nearfar.steer.masks``) against float64 plain-loop references: top tokens
(ACMIL's STKIM, DCAL's top-R), Gaussian smoothing and bilinear resizing, thresholds / quantiles / Otsu, AttenCraft's
argmax masks, VL-SAM-style point prompts, and the attention Grad-CAM of LAVIS / AGLA; with the oracles (the group
restriction, the kept share, Otsu separating the two modes of a bimodal map, the suppression radius)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nearfar.steer import argmax_masks, attention_gradcam, mask_from_map, sample_points, smooth_map, topk_tokens

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def _rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# top tokens
# ------------------------------------------------------------------------------------------------------------

def topk_ref(row: list[float], cand: list[bool], k: int | None, ratio: float | None, largest: bool) -> list[bool]:
    idx = [j for j in range(len(row)) if cand[j]]
    idx.sort(key=lambda j: (-row[j] if largest else row[j], j))
    count = len(idx) if k is None else min(k, len(idx))
    if ratio is not None:
        count = max(1, math.ceil(round(ratio * len(idx), 9)))
    keep = set(idx[:count])
    return [j in keep for j in range(len(row))]


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(1, 9), k=st.integers(1, 10), use_ratio=st.booleans(),
       ratio=st.sampled_from([0.1, 0.3, 0.5, 1.0]), among=st.sampled_from([None, "list", "bool"]),
       largest=st.booleans(), seed=st.integers(0, 100))
def test_topk_tokens_match_reference(b, n, k, use_ratio, ratio, among, largest, seed):
    s = torch.randint(0, 5, (b, n), generator=torch.Generator().manual_seed(seed)).float()  # ties on purpose
    if among == "list":
        sel, cand = list(range(0, n, 2)), [[j % 2 == 0 for j in range(n)]] * b
    elif among == "bool":
        m = _rand(b, n, seed=seed + 1) > 0.4
        m[:, 0] = True
        sel, cand = m, m.tolist()
    else:
        sel, cand = None, [[True] * n] * b
    out = topk_tokens(s, None if use_ratio else k, ratio=ratio if use_ratio else None, among=sel, largest=largest)
    want = [topk_ref(s[i].tolist(), cand[i], None if use_ratio else k, ratio if use_ratio else None, largest)
            for i in range(b)]
    assert out.selected.tolist() == want
    assert not out.dropped.any()
    assert not (out.selected & ~torch.tensor(cand)).any(), "only tokens of the group are selected"


def test_topk_random_drop_is_acmil_stkim():
    s = _rand(4, 3, 20, seed=1)
    top = topk_tokens(s, 10).selected
    out = topk_tokens(s, 10, random_drop=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.selected | out.dropped, top) and not (out.selected & out.dropped).any()
    assert (out.dropped.sum(-1) == 3).all()                         # int(10 * 0.3) of the top 10
    again = topk_tokens(s, 10, random_drop=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.dropped, again.dropped)                  # deterministic given the generator
    other = [topk_tokens(s, 10, random_drop=0.3, generator=torch.Generator().manual_seed(i)).dropped
             for i in range(1, 4)]
    assert any(not torch.equal(out.dropped, o) for o in other)
    masked = s.masked_fill(out.dropped, -1e9)                       # ACMIL: the dropped scores leave the softmax
    assert (masked.softmax(-1)[out.dropped] == 0).all()
    assert (topk_tokens(s, 10, random_drop=1.0).selected.sum() == 0)
    # ratio and a per-row group: ceil(0.5 * group size) kept, int(k * p) dropped
    group = torch.zeros(4, 3, 20, dtype=torch.bool)
    group[..., :7] = True
    r = topk_tokens(s, ratio=0.5, among=group, random_drop=0.5, generator=torch.Generator().manual_seed(1))
    assert ((r.selected | r.dropped).sum(-1) == 4).all() and (r.dropped.sum(-1) == 2).all()
    assert not ((r.selected | r.dropped) & ~group).any()


def test_topk_bad_arguments():
    s = torch.rand(2, 5)
    with pytest.raises(ValueError, match="exactly one of k"):
        topk_tokens(s)
    with pytest.raises(ValueError, match="exactly one of k"):
        topk_tokens(s, 2, ratio=0.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, "):
        topk_tokens(s, 0)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0.0, 1.0\]"):
        topk_tokens(s, ratio=0.0)
    with pytest.raises(ValueError, match=r"random_drop must be a number in \[0.0, 1.0\]"):
        topk_tokens(s, 2, random_drop=1.5)
    with pytest.raises(ValueError, match=r"among\[0\] must be in \[0, 4\]"):
        topk_tokens(s, 2, among=[7])
    with pytest.raises(ValueError, match="must broadcast to scores"):
        topk_tokens(s, 2, among=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="scores must have a floating dtype"):
        topk_tokens(torch.ones(5, dtype=torch.long), 2)


# ------------------------------------------------------------------------------------------------------------
# smoothing, resizing, masks
# ------------------------------------------------------------------------------------------------------------

def gaussian_ref(m: list[list[float]], sigma: float) -> list[list[float]]:
    """scipy.ndimage.gaussian_filter in plain loops: radius int(4 sigma + 0.5), edges mirrored (d c b a | a b c d)."""
    r = int(4 * sigma + 0.5)
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    k = [v / sum(k) for v in k]

    def mirror(i: int, n: int) -> int:
        while i < 0 or i >= n:
            i = -i - 1 if i < 0 else 2 * n - 1 - i
        return i

    h, w = len(m), len(m[0])
    rows = [[sum(k[t + r] * m[mirror(i + t, h)][j] for t in range(-r, r + 1)) for j in range(w)] for i in range(h)]
    return [[sum(k[t + r] * rows[i][mirror(j + t, w)] for t in range(-r, r + 1)) for j in range(w)]
            for i in range(h)]


def bilinear_ref(m: list[list[float]], oh: int, ow: int) -> list[list[float]]:
    """align_corners=False: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0; the upper neighbour
    clamped at the last pixel."""
    h, w = len(m), len(m[0])

    def src(d: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        x = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(x)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), x - i0

    out = []
    for i in range(oh):
        y0, y1, fy = src(i, h, oh)
        row = []
        for j in range(ow):
            x0, x1, fx = src(j, w, ow)
            top = m[y0][x0] * (1 - fx) + m[y0][x1] * fx
            bot = m[y1][x0] * (1 - fx) + m[y1][x1] * fx
            row.append(top * (1 - fy) + bot * fy)
        out.append(row)
    return out


@SETTINGS
@given(h=st.integers(1, 7), w=st.integers(1, 7), sigma=st.sampled_from([0.0, 0.5, 1.0, 2.5]),
       size=st.sampled_from([None, (5, 9), (3, 2)]), seed=st.integers(0, 100))
def test_smooth_map_matches_reference(h, w, sigma, size, seed):
    m = _rand(2, h, w, seed=seed)
    got = smooth_map(m, sigma, out_size=size)
    for i in range(2):
        want = m[i].double().tolist()
        if size is not None:
            want = bilinear_ref(want, *size)
        if sigma > 0:
            want = gaussian_ref(want, sigma)
        torch.testing.assert_close(got[i].double(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)


def test_smooth_map_gradients_and_dtypes():
    m = _rand(2, 4, 5, seed=2, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: smooth_map(u, 1.2, out_size=(6, 3)), (m,))
    got = smooth_map(m.detach().bfloat16(), 1.0, out_size=8)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="sigma must be a number in"):
        smooth_map(m, -1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        smooth_map(m, 1.0, mode="area")
    with pytest.raises(ValueError, match=r"out_size\[0\] must be a positive int"):
        smooth_map(m, 1.0, out_size=(0, 3))


def otsu_ref(values: list[float], bins: int = 256) -> float:
    """Otsu on a histogram of values in [0, 1] by loops: the first threshold bin maximising the between-class
    variance; returns the upper edge of that bin."""
    hist = [0] * bins
    for v in values:
        hist[min(int(v * bins), bins - 1)] += 1
    total = len(values)
    best, best_k = -1.0, 0
    for k in range(bins):
        w0 = sum(hist[: k + 1]) / total
        if w0 <= 0 or w0 >= 1:
            continue
        m0 = sum(hist[i] * (i + 0.5) / bins for i in range(k + 1)) / total
        mt = sum(hist[i] * (i + 0.5) / bins for i in range(bins)) / total
        var = (mt * w0 - m0) ** 2 / (w0 * (1 - w0))
        if var > best + 1e-15:
            best, best_k = var, k
    return (best_k + 1) / bins


def _unit(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
    return (m - lo) / (hi - lo)


def test_otsu_separates_the_modes_of_a_bimodal_map():
    g = torch.Generator().manual_seed(3)
    fg = torch.zeros(3, 16, 16, dtype=torch.bool)
    fg[0, 3:9, 4:12] = True
    fg[1, 10:, :5] = True
    fg[2, ::3, ::2] = True
    maps = torch.where(fg, 0.8, 0.15) + 0.04 * torch.randn(3, 16, 16, generator=g)
    assert torch.equal(mask_from_map(maps), fg)
    assert torch.equal(mask_from_map(maps, method="otsu"), fg)
    for i in range(3):  # and the threshold itself is the loop reference's
        unit = _unit(maps[i].double())
        t = otsu_ref(unit.flatten().tolist())
        assert torch.equal(mask_from_map(maps[i]), (torch.floor(unit * 256).clamp(max=255) + 1) / 256 > t)


@SETTINGS
@given(h=st.integers(2, 8), w=st.integers(2, 8), q=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 100))
def test_quantile_keeps_the_stated_share(h, w, q, seed):
    m = _rand(2, h, w, seed=seed)
    mask = mask_from_map(m, quantile=q)
    keep = int(math.floor((1 - q) * h * w + 0.5))
    assert mask.sum((-2, -1)).tolist() == [keep, keep]
    for i in range(2):  # the kept pixels are the highest ones
        if 0 < keep < h * w:
            assert m[i][mask[i]].min() > m[i][~mask[i]].max()


def test_threshold_dilate_and_pipeline():
    m = torch.zeros(1, 7, 7)
    m[0, 3, 3] = 2.0
    m[0, 0, 6] = 0.5
    assert mask_from_map(m, threshold=0.5).sum() == 1             # normalised: 1.0 and 0.25 vs 0.5
    assert mask_from_map(m, threshold=0.4, normalize=False).sum() == 2
    dil = mask_from_map(m, threshold=0.5, dilate=1)
    want = torch.zeros(1, 7, 7, dtype=torch.bool)
    want[0, 2:5, 2:5] = True
    assert torch.equal(dil, want)
    # resize then blur then threshold: the same as doing the steps by hand
    big = mask_from_map(m, threshold=0.3, smooth_sigma=1.0, out_size=14)
    by_hand = _unit(smooth_map(m, 1.0, out_size=14)) > 0.3
    assert big.shape == (1, 14, 14) and torch.equal(big, by_hand)
    assert not mask_from_map(torch.ones(4, 4), threshold=0.5).any()   # a constant map normalises to 0
    with pytest.raises(ValueError, match="at most one of threshold, quantile and method"):
        mask_from_map(m, threshold=0.5, quantile=0.5)
    with pytest.raises(ValueError, match=r"quantile must be a number in \[0.0, 1.0\]"):
        mask_from_map(m, quantile=1.5)
    with pytest.raises(ValueError, match="method must be one of 'otsu'"):
        mask_from_map(m, method="li")
    with pytest.raises(ValueError, match="dilate must be a non-negative int"):
        mask_from_map(m, dilate=-1)


# ------------------------------------------------------------------------------------------------------------
# argmax masks, points, Grad-CAM
# ------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), tau=st.sampled_from([0.0, 0.3, 0.7]),
       normalize=st.booleans(), seed=st.integers(0, 100))
def test_argmax_masks_match_reference(c, h, w, tau, normalize, seed):
    a = _rand(2, c, h, w, seed=seed)
    got = argmax_masks(a, tau, normalize=normalize)
    for bi in range(2):
        peak = [max(a[bi, ci].flatten().tolist()) for ci in range(c)]
        for y in range(h):
            for x in range(w):
                vals = [a[bi, ci, y, x].item() / (peak[ci] if normalize else 1.0) for ci in range(c)]
                best = max(range(c), key=lambda ci: (vals[ci], -ci))
                for ci in range(c):
                    assert got[bi, ci, y, x].item() == (ci == best and vals[ci] > tau)
    assert (got.sum(1) <= 1).all()


def test_argmax_masks_other_axis_and_errors():
    a = _rand(5, 3, 4, seed=1)   # (H, C, W): concepts on axis 1, spatial axis after it only
    got = argmax_masks(a, 0.0, dim=1)
    assert torch.equal(got.float().argmax(1), (a / a.amax(-1, keepdim=True)).argmax(1))
    with pytest.raises(ValueError, match=r"tau must be a number in \[0.0, 1.0\]"):
        argmax_masks(a, 1.5)
    with pytest.raises(ValueError, match=r"dim must be in \[-3, 1\]"):
        argmax_masks(a, 0.5, dim=2)


def test_sample_points_peaks_suppression_and_padding():
    m = torch.zeros(2, 9, 9)
    m[0, 2, 7] = 1.0
    m[0, 2, 6] = 0.9      # within min_dist of the first peak: suppressed
    m[0, 7, 1] = 0.8
    m[1] = _rand(9, 9, seed=4)
    p = sample_points(m, 2, 2, min_dist=2.0)
    assert p.coords.shape == (2, 4, 2) and p.labels.tolist() == [[1, 1, 0, 0]] * 2
    assert p.coords[0, :2].tolist() == [[7, 2], [1, 7]]           # (x, y)
    flat1 = m[1].flatten()
    assert p.coords[1, 0].tolist() == [int(flat1.argmax()) % 9, int(flat1.argmax()) // 9]
    for bi in range(2):
        pts = p.coords[bi].double()
        d = torch.cdist(pts, pts) + torch.eye(4) * 100
        assert (d >= 2.0).all(), "no two points closer than min_dist"
        vals = m[bi][p.coords[bi, :, 1], p.coords[bi, :, 0]]
        assert vals[2:].max() <= vals[:2].min()                    # negatives on low attention
    tiny = sample_points(torch.rand(2, 2), 3, 2, min_dist=5.0)       # one point exhausts the map
    assert tiny.labels.tolist() == [1, -1, -1, -1, -1] and tiny.coords[1:].eq(-1).all()


def test_sample_points_random_mode():
    m = torch.zeros(3, 8, 8)
    m[:, 1, 1] = 1.0
    m[:, 5, 6] = 1.0 / 3.0
    g = torch.Generator().manual_seed(0)
    a = sample_points(m, 1, 2, min_dist=1.0, generator=g)
    b = sample_points(m, 1, 2, min_dist=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.coords, b.coords) and torch.equal(a.labels, b.labels)   # deterministic given the seed
    # positives only where the map is above its minimum, with probability proportional to the normalised map
    many = sample_points(m[:1].expand(4000, 8, 8), 1, generator=torch.Generator().manual_seed(1))
    xy = many.coords[:, 0]
    assert set(map(tuple, xy.tolist())) == {(1, 1), (6, 5)}
    share = (xy[:, 0] == 1).double().mean().item()
    assert abs(share - 0.75) < 0.03
    neg = sample_points(m[:1].expand(200, 8, 8), 0, 1, generator=torch.Generator().manual_seed(2)).coords[:, 0]
    assert not (neg == torch.tensor([1, 1])).all(-1).any()           # weight 1 - 1 = 0 at the peak
    with pytest.raises(ValueError, match="at least one point"):
        sample_points(m, 0, 0)
    with pytest.raises(ValueError, match="min_dist must be a number in"):
        sample_points(m, 1, min_dist=-1.0)


@SETTINGS
@given(b=st.integers(1, 2), h=st.integers(1, 3), nq=st.integers(1, 4), nk=st.integers(1, 5),
       use_rows=st.booleans(), seed=st.integers(0, 100))
def test_attention_gradcam_matches_reference(b, h, nq, nk, use_rows, seed):
    p = _rand(b, h, nq, nk, seed=seed).softmax(-1)
    g = torch.randn(b, h, nq, nk, generator=torch.Generator().manual_seed(seed))
    rows = list(range(nq - 1, -1, -2)) if use_rows else None
    got = attention_gradcam(p, g, rows=rows)
    want = torch.zeros(b, nq, nk, dtype=F64)
    for bi in range(b):
        for i in range(nq):
            for j in range(nk):
                want[bi, i, j] = sum(max(g[bi, hi, i, j].item(), 0.0) * p[bi, hi, i, j].item()
                                     for hi in range(h)) / h
    if rows is not None:
        want = want[:, rows].mean(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_attention_gradcam_agla_flow_gradients_and_errors():
    # AGLA: the Grad-CAM of the matching score w.r.t. cross-attention, averaged over the text rows 1..T-2
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    probs = (q @ k.transpose(-1, -2)).softmax(-1).requires_grad_()
    score = (probs * torch.randn(1, 2, 6, 9)).sum()
    (grads,) = torch.autograd.grad(score, probs)
    rows = torch.tensor([False, True, True, True, True, False])
    cam = attention_gradcam(probs.detach(), grads, rows=rows)
    torch.testing.assert_close(cam, (grads.clamp(min=0) * probs.detach()).mean(1)[:, 1:5].mean(1))
    p64 = _rand(1, 2, 3, 4, seed=5, dtype=F64).requires_grad_()
    g64 = torch.randn(1, 2, 3, 4, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: attention_gradcam(u, v, rows=[0, 2]), (p64, g64))
    per_item = torch.tensor([[True, False, False], [False, True, True]])
    two = attention_gradcam(p64.detach().expand(2, 2, 3, 4), g64.detach().expand(2, 2, 3, 4), rows=per_item)
    full = attention_gradcam(p64.detach(), g64.detach())[0]
    torch.testing.assert_close(two, torch.stack([full[0], full[1:].mean(0)]))
    assert attention_gradcam(p64.detach().half(), g64.detach().half()).dtype == torch.float16
    with pytest.raises(ValueError, match="one shape"):
        attention_gradcam(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3, 5))
    with pytest.raises(ValueError, match="at least one query row"):
        attention_gradcam(torch.rand(1, 2, 3, 4), torch.rand(1, 2, 3, 4), rows=[])
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        attention_gradcam(torch.rand(3, 4), torch.rand(3, 4))


def test_resize_reference_agrees_with_interpolate_on_downsampling():
    # guards the bilinear reference itself (non-integer scale both ways)
    m = _rand(1, 1, 7, 5, seed=6, dtype=F64)
    want = torch.tensor(bilinear_ref(m[0, 0].tolist(), 3, 8), dtype=F64)
    torch.testing.assert_close(F.interpolate(m, size=(3, 8), mode="bilinear", align_corners=False)[0, 0], want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, F64])
def test_other_dtypes_give_the_float32_answers(dtype):
    g = torch.Generator().manual_seed(7)
    fg = torch.zeros(2, 12, 12, dtype=torch.bool)
    fg[0, 2:6, 3:9] = True
    fg[1, 7:, 1:4] = True
    maps = torch.where(fg, 0.9, 0.1) + 0.03 * torch.randn(2, 12, 12, generator=g)
    low = maps.to(dtype)
    assert torch.equal(mask_from_map(low, smooth_sigma=0.5), mask_from_map(maps, smooth_sigma=0.5))
    assert torch.equal(mask_from_map(low, quantile=0.8), mask_from_map(low.float(), quantile=0.8))
    s = torch.arange(10.0).flip(0).view(1, 10)
    assert torch.equal(topk_tokens(s.to(dtype), 3).selected, topk_tokens(s, 3).selected)
    assert torch.equal(argmax_masks(low.view(1, 2, 12, 12), 0.5), argmax_masks(maps.view(1, 2, 12, 12), 0.5))
    p = sample_points(low, 2, 1, min_dist=3.0)
    assert torch.equal(p.coords, sample_points(low.float(), 2, 1, min_dist=3.0).coords)
    assert smooth_map(low, 1.0).dtype == dtype
