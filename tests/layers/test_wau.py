"""WAU window attention upsample (PROVISIONAL design from the paper's abstract, no official code found) against a
float64 re-derivation of that design written with plain loops over windows, and the design's oracles."""

from __future__ import annotations

import copy
import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.wau import BASELINES

from nearfar import WindowAttention
from nearfar.bench.speed_gate import GATE_2D, gate_layer
from nearfar.layers.registry import mechanisms
from nearfar.layers.wau import WindowAttentionUpsample

# ---------------------------------------------------------------------------------------------------------
# float64 reference: explicit formulas on the module's parameters, one loop iteration per window
# ---------------------------------------------------------------------------------------------------------


def _ln(t, norm):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _lin(t, layer):
    return t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def ref_pool(x, s):
    """Mean of the pixels of each ``s x s`` cell that lie inside the map (edge cells are partial)."""
    b, h, w, c = x.shape
    rows = []
    for i in range(-(-h // s)):
        cells = [x[:, i * s:(i + 1) * s, j * s:(j + 1) * s].mean((1, 2)) for j in range(-(-w // s))]
        rows.append(torch.stack(cells, 1))
    return torch.stack(rows, 1)


def ref_bilinear(x, s):
    """Bilinear upsampling by ``s``, half-pixel centres (``align_corners=False``), edges clamped."""
    def taps(n):
        src = ((torch.arange(s * n, dtype=torch.float64) + 0.5) / s - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n - 1)
        return i0, (i0 + 1).clamp(max=n - 1), (src - i0).to(x.dtype)
    (y0, y1, ly), (x0, x1, lx) = taps(x.shape[1]), taps(x.shape[2])
    ly, lx = ly[None, :, None, None], lx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - lx) + x[:, y0][:, :, x1] * lx
    bottom = x[:, y1][:, :, x0] * (1 - lx) + x[:, y1][:, :, x1] * lx
    return top * (1 - ly) + bottom * ly


def ref_wau(m, x, skip=None):
    """The module's output, window by window: queries of window (i, j) of the lateral map against the valid keys of
    window (i, j) of the deep map, softmax over them only."""
    s, win, heads = m.scale_factor, m.window_size, m.num_heads
    if skip is None:
        skip, x = x, ref_pool(x, s)
    b, h, w, c = x.shape
    hs, ws = skip.shape[1:3]
    d = c // heads
    q = _lin(_ln(skip, m.norm_q), m.q)
    kv = _lin(_ln(x, m.norm_kv), m.kv)
    k, v = kv[..., :c], kv[..., c:]
    att = torch.zeros(b, hs, ws, c, dtype=x.dtype)
    table = m.relative_position_bias_table
    for wi in range(-(-h // win)):
        for wj in range(-(-w // win)):
            keys = [(i, j) for i in range(wi * win, min(h, (wi + 1) * win))
                    for j in range(wj * win, min(w, (wj + 1) * win))]
            queries = [(r, cc) for r in range(wi * s * win, min(hs, (wi + 1) * s * win))
                       for cc in range(wj * s * win, min(ws, (wj + 1) * s * win))]
            kk = torch.stack([k[:, i, j] for i, j in keys], 1).reshape(b, len(keys), heads, d).transpose(1, 2)
            vv = torch.stack([v[:, i, j] for i, j in keys], 1).reshape(b, len(keys), heads, d).transpose(1, 2)
            qq = torch.stack([q[:, r, cc] for r, cc in queries], 1).reshape(b, len(queries), heads, d).transpose(1, 2)
            scores = qq @ kk.transpose(-1, -2) * m.scale
            if table is not None:  # offset (query - s * key) in high-res pixels, window-local, per axis
                size = 2 * s * win - s
                bias = [[table[((r - wi * s * win) - s * (i - wi * win) + s * (win - 1)) * size
                               + ((cc - wj * s * win) - s * (j - wj * win) + s * (win - 1))]
                         for i, j in keys] for r, cc in queries]
                scores = scores + torch.stack([torch.stack(row) for row in bias]).permute(2, 0, 1)
            out = (scores.softmax(-1) @ vv).transpose(1, 2).reshape(b, len(queries), c)
            rows, cols = zip(*queries)
            att[:, list(rows), list(cols)] = out
    z = _lin(att, m.proj)
    if m.query_residual:
        z = z + (skip if m.skip_dim == c else _lin(skip, m.skip_proj))
    if m.ffn:
        hidden = _lin(_ln(z, m.norm_ffn), m.mlp.fc1)
        z = z + _lin(0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))), m.mlp.fc2)
    if m.bilinear_residual:
        z = z + (x if s == 1 else ref_bilinear(x, s)[:, :hs, :ws])
    return z


def _randomize(m):
    """Non-trivial norms and bias table, so that their gradients and effects are checked."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
        if m.relative_position_bias_table is not None:
            m.relative_position_bias_table.normal_()
    return m


def check_two_inputs(m, x, skip, rtol=1e-5, grad_rtol=3e-5):
    """``m(x, skip)`` in float32 against ``ref_wau`` in float64: output, both inputs' and every parameter's grads."""
    x32, s32 = x.detach().float().requires_grad_(), skip.detach().float().requires_grad_()
    out = m(x32, s32)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    m64 = copy.deepcopy(m).double()
    m64.zero_grad()
    x64, s64 = x.detach().double().requires_grad_(), skip.detach().double().requires_grad_()
    expected = ref_wau(m64, x64, s64)
    (expected * g.double()).sum().backward()
    assert_close(out, expected, rtol)
    assert_close(x32.grad, x64.grad, grad_rtol, "x.grad")
    assert_close(s32.grad, s64.grad, grad_rtol, "skip.grad")
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert p.grad is not None and p64.grad is not None, name
        assert_close(p.grad, p64.grad, grad_rtol, f"{name}.grad")


def check_one_input(m, x, rtol=1e-5, grad_rtol=3e-5):
    x32 = x.detach().float().requires_grad_()
    out = m(x32)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    expected = ref_wau(m64, x64)
    (expected * g.double()).sum().backward()
    assert out.shape == x.shape
    assert_close(out, expected, rtol)
    assert_close(x32.grad, x64.grad, grad_rtol, "x.grad")
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert_close(p.grad, p64.grad, grad_rtol, f"{name}.grad")


def test_reference_pool_and_bilinear_are_torchs():
    x = torch.randn(2, 7, 5, 3, dtype=torch.float64)
    for s in (1, 2, 3):
        up = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear", align_corners=False)
        assert_close(ref_bilinear(x, s), up.permute(0, 2, 3, 1), 1e-12)
    assert_close(ref_pool(x, 2)[:, -1, -1], x[:, 6, 4], 1e-12)  # a one-pixel corner cell is that pixel
    assert_close(ref_pool(x, 2)[:, 0, 0], x[:, :2, :2].mean((1, 2)), 1e-12)


# ---------------------------------------------------------------------------------------------------------
# reference match (outputs, input and parameter gradients), float32 vs float64
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,low,skip_dim", [
    (dict(scale_factor=2, window_size=2), (4, 6), 8),
    (dict(scale_factor=2, window_size=3, rpb=True, query_residual=True), (3, 6), 12),  # skip_proj is a Linear
    (dict(scale_factor=3, window_size=2, ffn=False, bilinear_residual=False, rpb=True), (2, 4), 8),
    (dict(scale_factor=1, window_size=3, query_residual=True), (6, 3), 16),  # skip_proj is the identity
])
def test_two_input_form_matches_reference(kw, low, skip_dim):
    torch.manual_seed(0)
    m = _randomize(WindowAttentionUpsample(16, 2, skip_dim=skip_dim, **kw))
    s = kw["scale_factor"]
    check_two_inputs(m, torch.randn(2, *low, 16), torch.randn(2, s * low[0], s * low[1], skip_dim))


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(1, 7), s=st.integers(1, 3), win=st.integers(1, 4),
       heads=st.sampled_from([1, 2, 4]), cut=st.integers(0, 2), rpb=st.booleans(), flags=st.integers(0, 7))
def test_padded_sizes_match_reference_hypothesis(h, w, s, win, heads, cut, rpb, flags):
    """Any deep map size and any skip size in (s(h-1), sh] (odd U-Net skips): padded keys are masked, output cropped."""
    torch.manual_seed(h * 97 + w * 13 + s)
    m = _randomize(WindowAttentionUpsample(8, heads, scale_factor=s, window_size=win, skip_dim=4, pad=True, rpb=rpb,
                                           ffn=bool(flags & 1), query_residual=bool(flags & 2),
                                           bilinear_residual=bool(flags & 4)))
    hs, ws = s * h - min(cut, s - 1), s * w - min(cut // 2, s - 1)
    check_two_inputs(m, torch.randn(2, h, w, 8), torch.randn(2, hs, ws, 4))


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), s=st.integers(1, 3), win=st.integers(1, 4),
       heads=st.sampled_from([1, 2]))
def test_one_input_form_matches_reference_hypothesis(h, w, s, win, heads):
    torch.manual_seed(h * 31 + w)
    m = _randomize(WindowAttentionUpsample(8, heads, scale_factor=s, window_size=win, pad=True, rpb=True))
    check_one_input(m, torch.randn(2, h, w, 8))


def test_non_contiguous_inputs_give_the_contiguous_result():
    torch.manual_seed(3)
    m = _randomize(WindowAttentionUpsample(16, 4, window_size=2, skip_dim=8, rpb=True, query_residual=True))
    x, skip = torch.randn(2, 4, 4, 16), torch.randn(2, 8, 8, 8)
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided view
    skip_s = torch.cat([skip, torch.randn(2, 8, 8, 5)], -1)[..., :8]  # sliced channel view
    assert not x_t.is_contiguous() and not skip_s.is_contiguous()
    check_two_inputs(m, x_t, skip_s)
    with torch.no_grad():
        assert_close(m(x_t, skip_s), m(x, skip), 1e-6)
        one = WindowAttentionUpsample(16, 4, window_size=2, rpb=True)
        big = torch.randn(2, 8, 8, 20)[..., 4:20]
        assert_close(one(big), one(big.contiguous()), 1e-6)


def test_registry_form_matches_reference_and_baseline_at_a_bench_like_size():
    torch.manual_seed(4)
    m = next(e for e in mechanisms() if e.name == "wau").make(16, 2)
    assert (m.window_size, m.pad, m.bilinear_residual, m.scale_factor) == (7, True, False, 2)
    x = torch.randn(1, 28, 30, 16)  # 14x15 pooled: the second window column is padded
    check_one_input(m, x)
    x = x.requires_grad_()
    out, base = m(x), BASELINES["wau"](m, x)
    g = torch.randn_like(out)
    assert_close(out, base, 1e-5)
    assert_close(torch.autograd.grad((out * g).sum(), x)[0], torch.autograd.grad((base * g).sum(), x)[0], 3e-5)


@pytest.mark.parametrize("kw,low,high", [
    (dict(rpb=True, query_residual=True, skip_dim=8), (4, 6), (8, 12)),
    (dict(pad=True, rpb=True, skip_dim=8), (5, 3), (9, 6)),
])
def test_baseline_equals_the_module_two_inputs(kw, low, high):
    torch.manual_seed(5)
    m = _randomize(WindowAttentionUpsample(16, 2, window_size=2, **kw))
    x, skip = torch.randn(2, *low, 16), torch.randn(2, *high, 8)
    with torch.no_grad():
        assert_close(BASELINES["wau"](m, x, skip), m(x, skip), 1e-5)


# ---------------------------------------------------------------------------------------------------------
# oracles of the design
# ---------------------------------------------------------------------------------------------------------


def test_oracle_one_window_is_global_cross_attention():
    """M = h = w: every high-res query attends to every low-res key."""
    torch.manual_seed(6)
    m = _randomize(WindowAttentionUpsample(16, 4, scale_factor=2, window_size=5, skip_dim=8, ffn=False,
                                           bilinear_residual=False)).double()
    x, skip = torch.randn(2, 5, 5, 16, dtype=torch.float64), torch.randn(2, 10, 10, 8, dtype=torch.float64)
    with torch.no_grad():
        q = _lin(_ln(skip, m.norm_q), m.q).reshape(2, 100, 4, 4).transpose(1, 2)
        kv = _lin(_ln(x, m.norm_kv), m.kv).reshape(2, 25, 2, 4, 4).permute(2, 0, 3, 1, 4)
        out = ref.dense_reference(q, kv[0], kv[1], torch.ones(100, 25, dtype=torch.bool), m.scale)
        expected = _lin(out.transpose(1, 2).reshape(2, 10, 10, 16), m.proj)
        assert_close(m(x, skip), expected, 1e-10)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_oracle_zero_output_layers_leave_the_bilinear_upsample(s):
    torch.manual_seed(7)
    m = _randomize(WindowAttentionUpsample(16, 2, scale_factor=s, window_size=2, rpb=True))
    with torch.no_grad():
        for layer in (m.proj, m.mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
        x = torch.randn(2, 4, 6, 16)
        up = x if s == 1 else F.interpolate(x.permute(0, 3, 1, 2), scale_factor=s, mode="bilinear",
                                            align_corners=False).permute(0, 2, 3, 1)
        assert torch.equal(m(x, torch.randn(2, 4 * s, 6 * s, 16)), up)


@pytest.mark.parametrize("rpb", [False, True])
def test_oracle_locality(rpb):
    """Output (r, c) reads the deep map only in key window (r // sM, c // sM) (bilinear path off: it reads the
    neighbouring pixels), and the lateral map only at (r, c)."""
    torch.manual_seed(8)
    s, win = 2, 3
    m = _randomize(WindowAttentionUpsample(8, 2, scale_factor=s, window_size=win, rpb=rpb, bilinear_residual=False))
    x, skip = torch.randn(1, 6, 9, 8), torch.randn(1, 12, 18, 8)
    r, c = 7, 11  # key window (1, 1): rows 3..5, cols 3..5
    with torch.no_grad():
        out = m(x, skip)
        outside = torch.ones(6, 9, dtype=torch.bool)
        outside[3:6, 3:6] = False
        x2 = x + 5 * torch.randn_like(x) * outside[None, :, :, None]
        skip2 = skip + 5 * torch.randn_like(skip)
        skip2[:, r, c] = skip[:, r, c]
        assert_close(m(x2, skip)[:, r, c], out[:, r, c], 1e-6)
        assert_close(m(x, skip2)[:, r, c], out[:, r, c], 1e-6)
        x3 = x.clone()
        x3[:, 4, 4] += torch.randn(8)  # inside the key window: the output moves
        assert not torch.allclose(m(x3, skip)[:, r, c], out[:, r, c], atol=1e-4)


@pytest.mark.parametrize("rpb", [False, True])
def test_oracle_permuting_keys_inside_windows(rpb):
    """Without a position bias the same permutation of the pixels inside every key window changes nothing."""
    torch.manual_seed(9)
    win = 3
    m = _randomize(WindowAttentionUpsample(8, 2, window_size=win, rpb=rpb, bilinear_residual=False))
    x, skip = torch.randn(2, 6, 6, 8), torch.randn(2, 12, 12, 8)
    perm = torch.randperm(win * win)
    windows = x.reshape(2, 2, win, 2, win, 8).permute(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, win * win, 8)
    xp = windows[:, :, :, perm].reshape(2, 2, 2, win, win, 8).permute(0, 1, 3, 2, 4, 5).reshape(x.shape)
    with torch.no_grad():
        same = torch.allclose(m(xp, skip), m(x, skip), atol=1e-5)
    assert same != rpb


def test_oracle_scale_one_self_is_swin_w_msa_without_rpb():
    """s = 1, skip = x, tied norms, no FFN or query residual: out = x + W-MSA(LN(x)) (Swin, bias table zero)."""
    torch.manual_seed(10)
    m = _randomize(WindowAttentionUpsample(16, 2, scale_factor=1, window_size=4, ffn=False))
    swin = WindowAttention(16, 2, window_size=4)
    with torch.no_grad():
        m.norm_kv.load_state_dict(m.norm_q.state_dict())
        swin.qkv.weight.copy_(torch.cat([m.q.weight, m.kv.weight]))
        swin.qkv.bias.copy_(torch.cat([m.q.bias, m.kv.bias]))
        swin.proj.load_state_dict(m.proj.state_dict())
        swin.relative_position_bias_table.zero_()
        x = torch.randn(2, 8, 12, 16)
        expected = x + swin(m.norm_q(x))
        assert_close(m(x), expected, 1e-5)
        assert_close(m(x, x), expected, 1e-5)


def test_one_input_form_is_the_two_input_form_on_the_pooled_map():
    torch.manual_seed(11)
    m = WindowAttentionUpsample(16, 2, window_size=2, pad=True)
    x = torch.randn(2, 9, 7, 16)
    with torch.no_grad():
        low = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1)
        assert torch.equal(m(x), m(low, x))


# ---------------------------------------------------------------------------------------------------------
# module contract: compile, state_dict, registry, speed gate, errors
# ---------------------------------------------------------------------------------------------------------


def test_compile_matches_eager():
    torch.manual_seed(12)
    check_compile_matches_eager(WindowAttentionUpsample(16, 2, window_size=2, pad=True, rpb=True),
                                torch.randn(2, 9, 8, 16))


def test_state_dict_keys_and_round_trip():
    m = WindowAttentionUpsample(16, 2, skip_dim=8, rpb=True, query_residual=True)
    assert sorted(m.state_dict()) == sorted(
        ["norm_q.weight", "norm_q.bias", "norm_kv.weight", "norm_kv.bias", "q.weight", "q.bias", "kv.weight",
         "kv.bias", "proj.weight", "proj.bias", "relative_position_bias_table", "skip_proj.weight", "skip_proj.bias",
         "norm_ffn.weight", "norm_ffn.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"])
    assert m.relative_position_bias_table.shape == ((2 * 2 * 8 - 2) ** 2, 2)
    check_state_dict_round_trip(lambda: WindowAttentionUpsample(16, 2, window_size=3, pad=True, rpb=True),
                                torch.randn(1, 10, 7, 16))


def test_registry_entry_runs_and_passes_the_speed_gate():
    entry = next(e for e in mechanisms() if e.name == "wau")
    assert entry.family == "window" and entry.dims == ("2d",) and set(entry.patterns) == {"NS"}
    layer = entry.build(32, 2, "NS")
    check_forward_backward_finite(layer, torch.randn(2, 15, 13, 32))
    res = gate_layer(layer, "NS", torch.randn(2, *GATE_2D, 32))
    assert res["passed"], res["detail"]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttentionUpsample(10, 3)
    for name, bad, err in (("scale_factor", 0, ValueError), ("window_size", 0, ValueError),
                           ("skip_dim", 0, ValueError), ("mlp_ratio", 0.0, ValueError), ("window_size", 2.5, TypeError),
                           ("ffn", 1, TypeError), ("rpb", "yes", TypeError), ("pad", None, TypeError),
                           ("qk_scale", -1.0, ValueError)):
        with pytest.raises(err, match=name):
            WindowAttentionUpsample(16, 2, **{name: bad})
    m = WindowAttentionUpsample(16, 2, window_size=2, skip_dim=8)
    x = torch.randn(2, 4, 4, 16)
    with pytest.raises(ValueError, match=r"skip must be \(B, H, W, 8\)"):
        m(x, torch.randn(2, 8, 8, 16))
    with pytest.raises(ValueError, match="skip must be scale_factor=2 times x: 8x8 for x of 4x4, got 7x8"):
        m(x, torch.randn(2, 7, 8, 8))
    with pytest.raises(ValueError, match="batch size"):
        m(x, torch.randn(1, 8, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        m(x, torch.randn(2, 8, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="without skip needs skip_dim == dim"):
        m(x)
    with pytest.raises(ValueError, match="multiples of window_size=2, got 3x4"):
        m(torch.randn(2, 3, 4, 16), torch.randn(2, 6, 8, 8))
    with pytest.raises(ValueError, match="multiples of window_size=8, got 7x7"):
        WindowAttentionUpsample(16, 2)(torch.randn(1, 7, 7, 16), torch.randn(1, 14, 14, 16))
    with pytest.raises(ValueError, match="multiples of scale_factor\\*window_size=16, got 14x16"):
        WindowAttentionUpsample(16, 2)(torch.randn(1, 14, 16, 16))
    padded = WindowAttentionUpsample(16, 2, window_size=2, pad=True)
    with pytest.raises(ValueError, match=r"skip's height and width must be in \(2\*\(h-1\), 2\*h\]"):
        padded(torch.randn(1, 3, 3, 16), torch.randn(1, 4, 6, 16))
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 16\)"):
        padded(torch.randn(1, 4, 4, 8))
