"""BiFormer bi-level routing attention: float64 reference written from the paper and the official code
(rayleizhu/BiFormer ``ops/bra_legacy.py``, ``models/_common.py``) with explicit loops over regions and a
materialised pixel mask, its oracles, the official-approach baseline, the topk = -1 / -2 stage modes, module
hygiene."""

from __future__ import annotations

import contextlib
import copy
import math
from unittest import mock

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.biformer import BASELINES

import nearfar
from nearfar.layers.biformer import BiLevelRoutingAttention


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling bins: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _pool_region(t: torch.Tensor, m: BiLevelRoutingAttention) -> torch.Tensor:
    """One region's pixels ``(B, rh, rw, C)`` -> its key pixels ``(B, n_kv, C)`` after the kv downsampling."""
    mode, r = m.kv_downsample_mode, m.kv_downsample_ratio
    rh, rw = t.shape[1:3]
    if mode.startswith("ada_"):
        rows, cols = _bins(rh, m.kv_per_win), _bins(rw, m.kv_per_win)
    elif mode in ("maxpool", "avgpool") and r > 1:
        rows = [(i * r, i * r + r) for i in range(rh // r)]
        cols = [(j * r, j * r + r) for j in range(rw // r)]
    else:
        rows, cols = [(i, i + 1) for i in range(rh)], [(j, j + 1) for j in range(rw)]
    how = "max" if mode.endswith("maxpool") else "mean"
    cells = []
    for a, bb in rows:
        for c0, c1 in cols:
            cell = t[:, a:bb, c0:c1].flatten(1, 2)
            cells.append(cell.amax(1) if how == "max" else cell.mean(1))
    return torch.stack(cells, 1)


def _route(m: BiLevelRoutingAttention, q: torch.Tensor, k: torch.Tensor, s: int):
    """Region descriptors by loops, affinity, scores ``(B, S*S, S*S)`` (float64)."""
    b, hp, wp, _ = q.shape
    rh, rw = hp // s, wp // s
    cells = [(slice(None), slice(i * rh, (i + 1) * rh), slice(j * rw, (j + 1) * rw))
             for i in range(s) for j in range(s)]
    qd = torch.stack([q[c].mean((1, 2)) for c in cells], 1)
    kd = torch.stack([k[c].mean((1, 2)) for c in cells], 1)
    emb = m.router.emb
    if isinstance(emb, torch.nn.Linear):
        qd, kd = F.linear(qd, emb.weight, emb.bias), F.linear(kd, emb.weight, emb.bias)
    return (qd * m.scale) @ kd.transpose(-1, -2)


def _project(m: BiLevelRoutingAttention, x: torch.Tensor):
    """Pad as the official ``auto_pad`` (zeros bottom/right), one Linear -> q, k, v maps."""
    s = m.n_win
    h, w = x.shape[1:3]
    xp = F.pad(x, (0, 0, 0, -w % s, 0, -h % s))
    qkv = F.linear(xp, m.qkv.qkv.weight, m.qkv.qkv.bias)
    return qkv.split([m.qk_dim, m.qk_dim, m.dim], dim=-1)


def routing_margin(m: BiLevelRoutingAttention, x: torch.Tensor) -> float:
    """Smallest gap between the topk-th and the next region score (inf with topk = S*S; exact ties of identical
    fully-padded regions do not count), relative to the scores' size: where it is tiny float32 may route
    otherwise than float64."""
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        q, k, _ = _project(m64, x.double())
        scores = _route(m64, q, k, m.n_win)
    if m.topk >= scores.shape[-1]:
        return math.inf
    top = scores.sort(-1, descending=True).values
    gap = top[..., m.topk - 1] - top[..., m.topk]
    gap = torch.where(gap == 0, torch.full_like(gap, math.inf), gap)
    return gap.min().item() / max(1.0, scores.abs().max().item())


def biformer_reference(m: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """Float64: pad, project, route by region loops; hard routing: expand the region top-k to a pixel-to-key-pixel
    mask, masked dense attention; soft routing: per query region, the routed regions' pooled K and V times their
    routing weights, concatenated (a loop); then LePE of v, output Linear, crop."""
    b, h, w, c = x.shape
    s, heads = m.n_win, m.num_heads
    q, k, v = _project(m, x)
    hp, wp = q.shape[1:3]
    rh, rw = hp // s, wp // s
    scores = _route(m, q, k, s) if m.diff_routing else _route(m, q.detach(), k.detach(), s)
    top = scores.topk(m.topk, dim=-1)  # (B, S*S, topk)
    chosen, weight = top.indices, top.values.softmax(-1)
    keys, vals, key_region = [], [], []
    for i in range(s):
        for j in range(s):
            sl = (slice(None), slice(i * rh, (i + 1) * rh), slice(j * rw, (j + 1) * rw))
            kk, vv = _pool_region(k[sl], m), _pool_region(v[sl], m)
            keys.append(kk)
            vals.append(vv)
            key_region += [i * s + j] * kk.shape[1]
    rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
    q_region = (rows // rh * s + cols // rw).reshape(-1)
    qh = _heads(q.reshape(b, hp * wp, -1), heads)
    if m.soft_routing:
        o = torch.zeros(b, heads, hp * wp, c // heads, dtype=x.dtype)
        for bi in range(b):
            for r in range(s * s):
                sel = chosen[bi, r].tolist()
                kk = torch.cat([weight[bi, r, n] * keys[g][bi] for n, g in enumerate(sel)])[None]
                vv = torch.cat([weight[bi, r, n] * vals[g][bi] for n, g in enumerate(sel)])[None]
                rows_r = (q_region == r).nonzero()[:, 0]
                o_r = ref.dense_reference(qh[bi:bi + 1, :, rows_r], _heads(kk, heads), _heads(vv, heads),
                                          torch.ones(1, dtype=torch.bool), m.scale)
                o = o.index_put((torch.tensor([bi]), torch.arange(heads)[:, None], rows_r[None]), o_r[0])
    else:
        routed = torch.zeros(b, s * s, s * s, dtype=torch.bool)
        for bi in range(b):
            for r in range(s * s):
                routed[bi, r, chosen[bi, r]] = True
        allowed = routed[:, q_region][:, :, torch.tensor(key_region)][:, None]  # (B, 1, Nq, Nk)
        o = ref.dense_reference(qh, _heads(torch.cat(keys, 1), heads), _heads(torch.cat(vals, 1), heads), allowed,
                                m.scale)
    o = o.transpose(1, 2).reshape(b, hp, wp, c)
    if m.side_dwconv:
        o = o + F.conv2d(v.permute(0, 3, 1, 2), m.lepe.weight, m.lepe.bias, padding=m.side_dwconv // 2,
                         groups=c).permute(0, 2, 3, 1)
    if isinstance(m.wo, torch.nn.Linear):
        o = F.linear(o, m.wo.weight, m.wo.bias)
    return o[:, :h, :w]


def _randomize_biases(m: torch.nn.Module) -> None:
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)  # padded pixels' k/v are the biases


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), s=st.integers(1, 3), rh=st.integers(1, 3), rw=st.integers(1, 3), heads=st.integers(1, 3),
       dq=st.integers(1, 3), dv=st.integers(1, 3), topk_frac=st.floats(0, 1), pad=st.booleans(),
       mode=st.sampled_from(["identity", "ada_avgpool", "ada_maxpool", "maxpool", "avgpool"]),
       kv=st.integers(1, 2), side=st.sampled_from([0, 3, 5]), layout=st.sampled_from(["plain", "transposed", "slice"]),
       engine=st.sampled_from(["auto", "blocksparse"]), seed=st.integers(0, 2 ** 16),
       routing=st.sampled_from(["hard", "hard_diff", "soft", "soft_diff", "soft_param"]))
def test_matches_reference(b, s, rh, rw, heads, dq, dv, topk_frac, pad, mode, kv, side, layout, engine, seed,
                           routing):
    assume(not (mode in ("maxpool", "avgpool") and (rh < kv or rw < kv)))
    torch.manual_seed(seed)
    topk = 1 + int(topk_frac * (s * s - 1))
    h, w = s * rh, s * rw
    if pad:  # odd sizes: drop up to n_win - 1 rows/columns, auto_pad restores them
        h, w = h - (seed % s), w - ((seed // 7) % s)
        assume(h >= 1 and w >= 1)
    dim = heads * dv
    m = BiLevelRoutingAttention(dim, heads, n_win=s, qk_dim=heads * dq, topk=topk, kv_downsample_mode=mode,
                                kv_per_win=kv, kv_downsample_ratio=kv, side_dwconv=side, auto_pad=pad,
                                soft_routing=routing.startswith("soft"), diff_routing=routing != "hard" and
                                routing != "soft", param_routing=routing == "soft_param")
    _randomize_biases(m)
    x = torch.randn(b, h, w, dim)
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "slice":
        x = torch.randn(b, h, w, dim + 3)[..., :dim]
    assume(routing_margin(m, x) > 1e-4)
    with nearfar.engine_override(engine) if engine != "auto" else contextlib.nullcontext():
        check_against_reference(m, x, biformer_reference)


def test_blocksparse_path_on_a_larger_map_matches_reference():
    """8x8 regions of 5x4 pixels: a map large enough (1.6M pairs) that ``attend`` picks the block-sparse engine."""
    torch.manual_seed(1)
    m = BiLevelRoutingAttention(16, 2, n_win=8, topk=5)
    _randomize_biases(m)
    x = torch.randn(2, 40, 32, 16)  # 1280 pixels: 1.6M pairs > the dense engine's limit
    assert routing_margin(m, x) > 1e-5
    check_against_reference(m, x, biformer_reference)


def _projects_descriptors(m: BiLevelRoutingAttention, x: torch.Tensor) -> bool:
    """Whether a no-grad forward computes the region descriptors as the projection of the region-mean input (an
    ``F.linear`` with the ``(2 qk_dim, dim)`` q/k rows of the weight) rather than from q and k."""
    real, shapes = F.linear, []

    def spy(inp, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return real(inp, weight, bias)

    with mock.patch.object(F, "linear", spy), torch.no_grad():
        m(x)
    return (2 * m.qk_dim, m.dim) in shapes


@pytest.mark.parametrize("dim, qk_dim, rh, projected", [
    (24, 24, 1, False),  # 1 pixel per region: the means of q and k
    (24, 24, 3, True),  # 9 pixels >= dim / 3: the projection of the region-mean input
    (8, 24, 1, False),
    (8, 24, 2, True),  # qk_dim > dim: the projection from 2x2 regions on
    (24, 4, 3, False),  # 2 qk_dim < dim: always from q and k
])
@pytest.mark.parametrize("routing", ["hard", "soft_diff", "soft_param"])
def test_region_descriptors_either_way_match_reference(dim, qk_dim, rh, projected, routing):
    """The region descriptors (means of q and k) are read from q and k at small regions and computed as the
    projection of the region-mean input at large ones: both paths match the float64 reference, forward and backward
    (with diff_routing the descriptors' gradient reaches x, the qkv weights and router.emb), and without autograd."""
    torch.manual_seed(10 + rh)
    m = BiLevelRoutingAttention(dim, 2, n_win=3, qk_dim=qk_dim, topk=3, soft_routing=routing != "hard",
                                diff_routing=routing != "hard", param_routing=routing == "soft_param",
                                side_dwconv=0 if routing == "soft_diff" else 5)
    _randomize_biases(m)
    x = torch.randn(2, 3 * rh, 3 * rh, dim)
    assert _projects_descriptors(m, x) == projected
    assert routing_margin(m, x) > 1e-4
    check_against_reference(m, x, biformer_reference)
    with torch.no_grad():
        assert_close(m(x), biformer_reference(copy.deepcopy(m).double(), x.double()), name="no-grad output")


def test_float16_descriptors_keep_the_range():
    """In float16 the region means of q and k (not their sums, whose score products are ``t**2`` larger) are used:
    large q and k over 4x4 regions, where most of the sums' scores overflow float16 (and would route otherwise),
    route as the float64 reference."""
    torch.manual_seed(11)
    m = BiLevelRoutingAttention(64, 2, n_win=3, topk=1, side_dwconv=3)
    with torch.no_grad():
        m.qkv.qkv.weight[:128].mul_(50)
    x = torch.randn(2, 12, 12, 64)
    assert not _projects_descriptors(m, x)
    assert routing_margin(m, x) > 1e-2
    q, k, _ = _project(copy.deepcopy(m).double(), x.double())
    q_sum, k_sum = (t.reshape(2, 3, 4, 3, 4, 64).sum((2, 4)).flatten(1, 2) for t in (q, k))
    assert ((q_sum @ k_sum.transpose(1, 2)).abs() > 65504).double().mean() > 0.5  # beyond the float16 maximum
    with torch.no_grad():
        out = m.half()(x.half())
    # float16 rounds these large logits (a 5% error); a wrong region is an error the size of the output itself
    assert_close(out, biformer_reference(m.double(), x.double()), 0.2, "float16 output")


def test_baseline_matches_module():
    torch.manual_seed(2)
    for kw in (dict(), dict(kv_downsample_mode="ada_avgpool", kv_per_win=1), dict(auto_pad=True, topk=2)):
        m = BiLevelRoutingAttention(24, 3, n_win=3, **kw)
        _randomize_biases(m)
        x = torch.randn(2, 8 if kw.get("auto_pad") else 9, 6, 24)
        with torch.no_grad():
            assert_close(BASELINES["biformer"](m, x), m(x), name=f"baseline {kw}")


def test_oracle_all_regions_is_full_attention():
    """topk = S*S, identity kv, no LCE: every pixel attends to every pixel, scale qk_dim ** -0.5."""
    torch.manual_seed(3)
    m = BiLevelRoutingAttention(16, 2, n_win=3, topk=9, side_dwconv=0)
    x = torch.randn(2, 6, 9, 16)
    q, k, v = m.qkv.qkv(x).reshape(2, 54, 48).split([16, 16, 16], -1)
    o = F.scaled_dot_product_attention(_heads(q, 2), _heads(k, 2), _heads(v, 2), scale=16 ** -0.5)
    assert_close(m(x), m.wo(o.transpose(1, 2).reshape(2, 6, 9, 16)))


def test_oracle_one_region_is_full_attention_plus_lce():
    torch.manual_seed(4)
    m = BiLevelRoutingAttention(16, 4, n_win=1, topk=1, side_dwconv=3)
    x = torch.randn(2, 5, 7, 16)
    q, k, v = m.qkv.qkv(x).split([16, 16, 16], -1)
    o = F.scaled_dot_product_attention(*(_heads(t.reshape(2, 35, 16), 4) for t in (q, k, v)), scale=0.25)
    lepe = m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert_close(m(x), m.wo(o.transpose(1, 2).reshape(2, 5, 7, 16) + lepe))


def test_scale_is_qk_dim_not_head_dim():
    m = BiLevelRoutingAttention(64, 4, qk_dim=32)
    assert m.scale == 32 ** -0.5
    assert BiLevelRoutingAttention(64, 4, topk=-1).scale == 16 ** -0.5  # plain attention: head dim


def _mha(x, qkv_w, proj, heads):
    b, h, w, c = x.shape
    q, k, v = F.linear(x.reshape(b, h * w, c), qkv_w).chunk(3, -1)
    o = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    return o.transpose(1, 2).reshape(b, h, w, c)


def test_topk_minus1_and_minus2_are_the_official_stage_attentions():
    torch.manual_seed(5)
    x = torch.randn(2, 5, 6, 16)
    a = BiLevelRoutingAttention(16, 2, topk=-1)
    assert set(a.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    assert_close(a(x), a.proj(_mha(x, a.qkv.weight, a.proj, 2)))
    b = BiLevelRoutingAttention(16, 2, topk=-2, side_dwconv=5)
    assert set(b.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias", "lepe.weight", "lepe.bias"}
    lepe = b.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LePE of the input, not of v (official quirk)
    assert_close(b(x), b.proj(_mha(x, b.qkv.weight, b.proj, 2) + lepe))
    check_forward_backward_finite(b, x)


def test_hard_diff_routing_routes_the_same_and_indices_carry_no_gradient():
    torch.manual_seed(6)
    a = BiLevelRoutingAttention(16, 2, n_win=2, topk=2)
    d = BiLevelRoutingAttention(16, 2, n_win=2, topk=2, diff_routing=True, param_routing=True)
    d.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        d.router.emb.weight.copy_(torch.eye(16))
        d.router.emb.bias.zero_()
    x = torch.randn(2, 6, 6, 16, requires_grad=True)
    ya, yd = a(x), d(x)
    assert_close(yd, ya)
    ga = torch.autograd.grad(ya.square().sum(), x)[0]
    yd.square().sum().backward()
    assert_close(x.grad, ga, name="x.grad")
    assert d.router.emb.weight.grad is None  # hard top-k indices: no gradient


def test_soft_diff_routing_gradients_reach_the_router():
    torch.manual_seed(8)
    m = BiLevelRoutingAttention(16, 2, n_win=2, topk=3, soft_routing=True, diff_routing=True, param_routing=True)
    _randomize_biases(m)
    x = torch.randn(2, 6, 4, 16)
    assert routing_margin(m, x) > 1e-4
    check_against_reference(m, x, biformer_reference)  # router.emb's gradient compared too
    m(x).square().sum().backward()
    assert m.router.emb.weight.grad is not None and m.router.emb.weight.grad.abs().max() > 0
    detached = BiLevelRoutingAttention(16, 2, n_win=2, topk=3, soft_routing=True)
    detached.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("router")})
    xg = x.clone().requires_grad_()
    g_soft = torch.autograd.grad(m(xg).square().sum(), xg)[0]
    g_det = torch.autograd.grad(detached(xg).square().sum(), xg)[0]
    assert (g_soft - g_det).abs().max() > 1e-6  # with diff_routing the descriptors' gradient reaches x


def test_soft_routing_matches_the_official_gather_on_the_block_sparse_engine():
    torch.manual_seed(9)
    m = BiLevelRoutingAttention(16, 2, n_win=8, topk=3, soft_routing=True, diff_routing=True)
    x = torch.randn(1, 40, 32, 16, requires_grad=True)  # 1.6M pairs: the block-sparse engine
    y, y0 = m(x), BASELINES["biformer"](m, x)
    assert_close(y, y0)
    g = torch.randn_like(y)
    assert_close(torch.autograd.grad((y * g).sum(), x)[0], torch.autograd.grad((y0 * g).sum(), x)[0], 3e-5, "x.grad")


def test_compile_and_non_contiguous():
    torch.manual_seed(7)
    m = BiLevelRoutingAttention(24, 3, n_win=2, topk=2, auto_pad=True)
    check_forward_backward_finite(m, torch.randn(2, 7, 5, 24))
    check_compile_matches_eager(m, torch.randn(1, 4, 6, 24))
    x = torch.randn(1, 6, 4, 24).transpose(1, 2)
    with torch.no_grad():
        assert_close(m(x), m(x.contiguous()), 1e-6)


def test_state_dict_keys_match_the_official_module():
    m = BiLevelRoutingAttention(64, 2, qk_dim=32, diff_routing=True, param_routing=True)
    official = {"lepe.weight": (64, 1, 5, 5), "lepe.bias": (64,), "router.emb.weight": (32, 32),
                "router.emb.bias": (32,), "qkv.qkv.weight": (128, 64), "qkv.qkv.bias": (128,),
                "wo.weight": (64, 64), "wo.bias": (64,)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official
    m.load_state_dict({k: torch.randn(v) for k, v in official.items()}, strict=True)
    assert set(BiLevelRoutingAttention(64, 2, side_dwconv=0, param_attention="qkv").state_dict()) == {
        "qkv.qkv.weight", "qkv.qkv.bias"}
    check_state_dict_round_trip(lambda: BiLevelRoutingAttention(32, 2), torch.randn(1, 14, 7, 32))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        BiLevelRoutingAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        BiLevelRoutingAttention(12, 3, qk_dim=10)
    for topk in (0, -3, 50):
        with pytest.raises(ValueError, match=r"topk must be .*\[1, n_win \*\* 2 = 49\]"):
            BiLevelRoutingAttention(16, 2, topk=topk)
    with pytest.raises(ValueError, match="n_win"):
        BiLevelRoutingAttention(16, 2, n_win=0)
    with pytest.raises(ValueError, match="kv_downsample_mode must be one of"):
        BiLevelRoutingAttention(16, 2, kv_downsample_mode="fracpool")
    with pytest.raises(ValueError, match="side_dwconv must be 0 or odd"):
        BiLevelRoutingAttention(16, 2, side_dwconv=4)
    with pytest.raises(ValueError, match="param_routing=True needs diff_routing"):
        BiLevelRoutingAttention(16, 2, param_routing=True)
    with pytest.raises(TypeError, match="soft_routing"):
        BiLevelRoutingAttention(16, 2, soft_routing=None)
    with pytest.raises(ValueError, match="param_attention"):
        BiLevelRoutingAttention(16, 2, param_attention="none")
    with pytest.raises(TypeError, match="auto_pad"):
        BiLevelRoutingAttention(16, 2, auto_pad=1)
    with pytest.raises(ValueError, match="qk_scale"):
        BiLevelRoutingAttention(16, 2, qk_scale=-1.0)
    m = BiLevelRoutingAttention(16, 2)
    with pytest.raises(ValueError, match=r"multiples of n_win=7 \(got 14x10\)"):
        m(torch.randn(1, 14, 10, 16))
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 16, 14, 14))
    with pytest.raises(ValueError, match="kv_downsample_ratio=4 exceeds the region size 2x2"):
        BiLevelRoutingAttention(16, 2, kv_downsample_mode="maxpool")(torch.randn(1, 14, 14, 16))
