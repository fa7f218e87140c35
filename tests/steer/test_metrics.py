"""Metrics (``nearfar.steer.metrics``) against float64 plain-loop references: VHD's head divergence (He et al., ACL
2025), VAR's sink detection by massive dimensions (Kang et al., ICLR 2025) on planted activations, A-STAR's
overlap and retention losses (Agarwal et al., ICCV 2023) with gradients, entropy, spatial entropy (Peruzzo et al.,
SAR: components found by flood fill here) and group mass. Also runs the docstring examples of ``nearfar.steer``."""

from __future__ import annotations

import doctest
import importlib
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nearfar.steer import (
    entropy,
    head_divergence,
    map_overlap,
    map_retention,
    mass_on,
    massive_dims,
    sink_tokens,
    spatial_entropy,
    token_mask,
)

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def _rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@pytest.mark.parametrize("module", ["nearfar.steer", "nearfar.steer.tokens", "nearfar.steer.aggregate",
                                    "nearfar.steer.metrics", "nearfar.steer.masks"])
def test_docstring_examples(module):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module} failed"


# ------------------------------------------------------------------------------------------------------------
# head divergence
# ------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), metric=st.sampled_from(["l2", "cos"]),
       seed=st.integers(0, 100))
def test_head_divergence_matches_reference(shape, metric, seed):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    got = head_divergence(a, b, metric)
    flat_a, flat_b = a.double().reshape(-1, shape[-1]), b.double().reshape(-1, shape[-1])
    want = []
    for x, y in zip(flat_a.tolist(), flat_b.tolist()):
        if metric == "l2":
            want.append(math.sqrt(sum((u - v) ** 2 for u, v in zip(x, y))))
        else:
            dot = sum(u * v for u, v in zip(x, y))
            want.append(1 - dot / (math.sqrt(sum(u * u for u in x)) * math.sqrt(sum(v * v for v in y))))
    torch.testing.assert_close(got.double().flatten(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-5)
    assert got.shape == a.shape[:-1]


def test_head_divergence_axis_grad_dtypes_and_errors():
    a, b = torch.randn(2, 3, 5, 4, dtype=F64), torch.randn(2, 3, 5, 4, dtype=F64)
    torch.testing.assert_close(head_divergence(a, b, dim=1), (a - b).norm(dim=1))
    assert head_divergence(torch.zeros(3), torch.ones(3), "cos").item() == 1.0  # a zero vector: cos = 0
    for metric in ("l2", "cos"):
        assert torch.autograd.gradcheck(lambda x, y, m=metric: head_divergence(x, y, m),
                                        (a.requires_grad_(), b.requires_grad_()))
    got = head_divergence(a.detach().bfloat16(), b.detach().bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), head_divergence(a.detach(), b.detach()), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="one shape"):
        head_divergence(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(TypeError, match="one dtype"):
        head_divergence(torch.zeros(3), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="metric must be one of 'l2', 'cos'"):
        head_divergence(torch.zeros(3), torch.zeros(3), "l1")
    with pytest.raises(ValueError, match=r"dim must be in \[-1, 0\]"):
        head_divergence(torch.zeros(3), torch.zeros(3), dim=1)


# ------------------------------------------------------------------------------------------------------------
# massive dimensions and sink tokens
# ------------------------------------------------------------------------------------------------------------

def _planted(b=2, n=12, d=2048, dims=(37, 400), sinks=((0, 0), (0, 5), (1, 9)), value=300.0, seed=0):
    h = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))
    for bi, t in sinks:
        for k, dim in enumerate(dims):
            h[bi, t, dim] = value * (1 if k % 2 == 0 else -1)
    return h


def test_massive_dims_and_sink_tokens_find_planted_activations():
    h = _planted()
    assert set(massive_dims(h, 2).tolist()) == {37, 400}
    want = torch.zeros(2, 12, dtype=torch.bool)
    want[0, 0] = want[0, 5] = want[1, 9] = True
    assert torch.equal(sink_tokens(h), want)                      # dims found from the data
    assert torch.equal(sink_tokens(h, dims=[400]), want)           # VAR's fixed dims
    assert torch.equal(sink_tokens(h, dims=torch.tensor([37, 400])), want)
    assert not sink_tokens(h, dims=[3]).any()                      # an ordinary dimension
    assert not sink_tokens(h, tau=1e6).any()


def test_sink_tokens_match_reference_values():
    h = _planted(b=1, n=6, d=64, dims=(37, 5), sinks=((0, 2),), value=40.0, seed=1)
    dims, tau = [37, 5], 3.0
    ref = []
    for row in h[0].double().tolist():
        rms = math.sqrt(sum(v * v for v in row) / len(row) + 1e-6)
        ref.append(max(abs(row[d]) / rms for d in dims) > tau)
    assert sink_tokens(h, dims=dims, tau=tau)[0].tolist() == ref
    # norm="none": the raw magnitude, strictly above tau (VAR's ``>``)
    x = torch.zeros(1, 3, 4)
    x[0, 1, 2] = 20.0
    x[0, 2, 2] = -20.5
    assert sink_tokens(x, dims=[2], tau=20.0, norm="none").tolist() == [[False, False, True]]
    assert sink_tokens(h.bfloat16(), dims=dims, tau=tau)[0].tolist() == ref


def test_sink_and_massive_bad_arguments():
    h = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 8\]"):
        massive_dims(h, 9)
    with pytest.raises(ValueError, match=r"dims\[1\] must be in \[0, 7\]"):
        sink_tokens(h, dims=[1, 8])
    with pytest.raises(ValueError, match="at least one hidden dimension"):
        sink_tokens(h, dims=[])
    with pytest.raises(ValueError, match="tau must be a number in"):
        sink_tokens(h, tau=-1.0)
    with pytest.raises(ValueError, match="norm must be one of 'rms', 'none'"):
        sink_tokens(h, norm="layer")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        massive_dims(torch.randn(8), 1)


# ------------------------------------------------------------------------------------------------------------
# A-STAR losses
# ------------------------------------------------------------------------------------------------------------

def overlap_ref(a: torch.Tensor, b: torch.Tensor) -> float:
    num = sum(min(x, y) for x, y in zip(a.flatten().tolist(), b.flatten().tolist()))
    den = sum(x + y for x, y in zip(a.flatten().tolist(), b.flatten().tolist()))
    return num / den if den > 0 else 0.0


@SETTINGS
@given(c=st.integers(2, 4), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 100))
def test_map_overlap_matches_reference(c, h, w, seed):
    maps = _rand(2, c, h, w, seed=seed)
    pair = map_overlap(maps[:, 0], maps[:, 1])
    torch.testing.assert_close(pair.double(), torch.tensor([overlap_ref(m[0], m[1]) for m in maps], dtype=F64))
    total = map_overlap(maps)   # A-STAR's L_seg: the sum over concept pairs i < j
    want = [sum(overlap_ref(m[i], m[j]) for i, j in itertools.combinations(range(c), 2)) for m in maps]
    torch.testing.assert_close(total.double(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)


def test_map_overlap_bounds_grad_and_flat_maps():
    x = _rand(3, 4, 4, seed=1, dtype=F64)
    assert bool((map_overlap(x, x) == 0.5).all())
    disjoint = torch.zeros(2, 4)
    disjoint[0, :2] = 1.0
    disjoint[1, 2:] = 1.0
    assert map_overlap(disjoint[0], disjoint[1], dims=1).item() == 0.0
    assert map_overlap(torch.zeros(4, 4), torch.zeros(4, 4)).item() == 0.0
    a, b = x.clone().requires_grad_(), _rand(3, 4, 4, seed=2, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: map_overlap(u, v), (a, b))
    assert torch.autograd.gradcheck(lambda u: map_overlap(u), (a,))
    with pytest.raises(ValueError, match="must broadcast"):
        map_overlap(torch.zeros(2, 3, 3), torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match=r"dims must be in \[1, 2\]"):
        map_overlap(torch.zeros(3, 3), dims=3)
    with pytest.raises(ValueError, match="with b=None"):
        map_overlap(torch.zeros(3, 3))


@SETTINGS
@given(h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 100), as_bool=st.booleans())
def test_map_retention_matches_reference(h, w, seed, as_bool):
    a = _rand(2, h, w, seed=seed)
    m = _rand(2, h, w, seed=seed + 7) > 0.5
    got = map_retention(a, m if as_bool else m.float())
    want = []
    for ai, mi in zip(a.double(), m.double()):
        inter = sum(x * y for x, y in zip(ai.flatten().tolist(), mi.flatten().tolist()))
        union = sum(x + y - x * y for x, y in zip(ai.flatten().tolist(), mi.flatten().tolist()))
        want.append(1 - inter / union if union > 0 else 0.0)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)


def test_map_retention_grad_and_edges():
    a = _rand(2, 3, 3, seed=3, dtype=F64).requires_grad_()
    m = _rand(2, 3, 3, seed=4, dtype=F64) > 0.4
    assert torch.autograd.gradcheck(lambda u: map_retention(u, m), (a,))
    assert map_retention(torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.bool)).item() == 0.0
    assert map_retention(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(TypeError, match="m_prev must be boolean or floating"):
        map_retention(torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------------
# entropy, spatial entropy, group mass
# ------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), normalize=st.booleans(),
       seed=st.integers(0, 100), zeros=st.booleans())
def test_entropy_matches_reference(shape, normalize, seed, zeros):
    x = _rand(*shape, seed=seed)
    if zeros:
        x = torch.where(x < 0.3, torch.zeros_like(x), x)
    x = x / x.sum(-1, keepdim=True).clamp_min(1e-9)
    got = entropy(x, normalize=normalize)
    want = []
    for row in x.double().reshape(-1, shape[-1]).tolist():
        e = -sum(p * math.log(p) for p in row if p > 0)
        if normalize:
            e = e / math.log(len(row)) if len(row) > 1 else 0.0
        want.append(e)
    torch.testing.assert_close(got.double().flatten(), torch.tensor(want, dtype=F64), rtol=1e-5, atol=1e-6)


def test_entropy_axis_and_gradients():
    p = _rand(3, 4, seed=5, dtype=F64).softmax(0).requires_grad_()
    torch.testing.assert_close(entropy(p, 0), -(p * p.log()).sum(0))
    assert torch.autograd.gradcheck(lambda u: entropy(u, 0, normalize=True), (p,))
    q = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
    entropy(q).backward()
    assert torch.isfinite(q.grad).all() and q.grad[2] == 0  # 0 log 0 = 0, with a zero gradient


def components_ref(mask: list[list[bool]]) -> list[list[tuple[int, int]]]:
    """8-connected components by flood fill."""
    h, w = len(mask), len(mask[0])
    seen, comps = set(), []
    for i in range(h):
        for j in range(w):
            if mask[i][j] and (i, j) not in seen:
                stack, comp = [(i, j)], []
                seen.add((i, j))
                while stack:
                    y, x = stack.pop()
                    comp.append((y, x))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            v, u = y + dy, x + dx
                            if 0 <= v < h and 0 <= u < w and mask[v][u] and (v, u) not in seen:
                                seen.add((v, u))
                                stack.append((v, u))
                comps.append(comp)
    return comps


def spatial_entropy_ref(m: torch.Tensor, offset: float, threshold: float) -> float:
    vals = m.double().tolist()
    mean = sum(map(sum, vals)) / (len(vals) * len(vals[0]))
    r = [[max(v - offset * mean, 0.0) for v in row] for row in vals]
    comps = components_ref([[v > threshold for v in row] for row in r])
    masses = [sum(r[y][x] for y, x in c) for c in comps]
    total = sum(masses)
    if total <= 0:
        return math.inf
    return -sum(q / total * math.log(q / total) for q in masses if q > 0)


@SETTINGS
@given(h=st.integers(1, 7), w=st.integers(1, 7), offset=st.sampled_from([0.5, 1.0, 2.0]),
       threshold=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 200))
def test_spatial_entropy_matches_flood_fill_reference(h, w, offset, threshold, seed):
    maps = _rand(3, h, w, seed=seed) ** 3  # skewed: several separate blobs
    got = spatial_entropy(maps, offset=offset, threshold=threshold)
    want = torch.tensor([spatial_entropy_ref(m, offset, threshold) for m in maps], dtype=F64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_spatial_entropy_oracles_and_gradient():
    blobs = torch.zeros(4, 9, 9)
    blobs[1, 1:3, 1:3] = 1.0                           # one blob
    blobs[2, 1:3, 1:3] = blobs[2, 6:8, 6:8] = 1.0      # two equal blobs
    blobs[3, 0, 0] = blobs[3, 0, 8] = blobs[3, 8, 0] = 1.0
    blobs[3, 4, 4] = blobs[3, 5, 5] = 0.5              # diagonal neighbours: one 8-connected blob of mass 1
    got = spatial_entropy(blobs, offset=0.0)           # offset 0: the blobs keep equal masses
    assert got[0].item() == math.inf                   # flat map: nothing above the mean
    torch.testing.assert_close(got[1:], torch.tensor([0.0, math.log(2), math.log(4)]))
    m = (_rand(6, 6, seed=9, dtype=F64) ** 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: spatial_entropy(u), (m,))
    assert spatial_entropy(blobs.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="offset must be a number in"):
        spatial_entropy(blobs, offset=-1.0)


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(1, 6), kind=st.sampled_from(["slice", "list", "tensor", "bool"]),
       seed=st.integers(0, 100))
def test_mass_on_matches_reference(b, n, kind, seed):
    p = _rand(b, 2, 3, n, seed=seed).softmax(-1)
    idx = list(range(0, n, 2))
    group = {"slice": slice(0, n, 2), "list": idx, "tensor": torch.tensor(idx),
             "bool": torch.tensor([j % 2 == 0 for j in range(n)])}[kind]
    got = mass_on(p, group)
    want = torch.tensor([[[sum(p[bi, h, i, j].item() for j in idx) for i in range(3)] for h in range(2)]
                         for bi in range(b)], dtype=F64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_mass_on_per_item_groups_and_errors():
    p = torch.full((2, 1, 4), 0.25, requires_grad=True)
    group = torch.tensor([[True, True, True, False], [False, False, False, True]]).unsqueeze(1)
    out = mass_on(p, group)
    assert out.tolist() == [[0.75], [0.25]]
    out.sum().backward()
    assert torch.equal(p.grad, group.float().expand(2, 1, 4))
    assert token_mask(torch.tensor([1, 1]), 3).tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"group\[0\] must be in \[0, 3\]"):
        mass_on(p, [4])
    with pytest.raises(ValueError, match="4 entries on its last axis"):
        mass_on(p, torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="group must be a slice, indices or a boolean mask"):
        mass_on(p, torch.ones(4))
    with pytest.raises(ValueError, match="must broadcast to probs"):
        mass_on(p, torch.ones(3, 1, 4, dtype=torch.bool))


def test_token_mask_forms_and_errors():
    assert token_mask(slice(None, None, 3), 7).nonzero().flatten().tolist() == [0, 3, 6]
    assert token_mask(range(2, 4), 5).tolist() == [False, False, True, True, False]
    assert token_mask(torch.tensor([], dtype=torch.long), 3).tolist() == [False] * 3
    per_item = torch.tensor([[True, False], [False, True]])
    assert token_mask(per_item, 2) is per_item
    with pytest.raises(ValueError, match="group indices must be in \\[0, 2\\], got -1"):
        token_mask(torch.tensor([0, -1]), 3, name="group")
    with pytest.raises(ValueError, match="must be 1D"):
        token_mask(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="got a torch.float32 tensor"):
        token_mask(torch.zeros(3), 3)
    with pytest.raises(TypeError, match="got str"):
        token_mask("abc", 3)
    with pytest.raises(TypeError, match="got int"):
        token_mask(1, 3)
    with pytest.raises(ValueError, match="n must be a positive int"):
        token_mask([0], 0)
