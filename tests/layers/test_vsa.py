"""VSA varied-size window attention: a float64 reference written from the paper and the official code
(ViTAE-Transformer/ViTAE-VSA ``Image-Classification/vitaev2_vsa/vsa.py``, ``VSAWindowAttention``) with plain loops
over windows and heads and a bilinear sampler written from its formula (no ``grid_sample``); the oracles (zero
predictors = Swin W-MSA, integer offsets = translated windows, scale 1 = dilated windows, far offsets = zero keys);
official parameter names; the benchmark baseline; module hygiene."""

from __future__ import annotations

import copy
import math

import pytest
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
from oracles.vsa import BASELINES

import nearfar
from nearfar import VSAWindowAttention, WindowAttention

# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


def _pw(conv: torch.nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on the last axis."""
    out = t @ conv.weight[:, :, 0, 0].t()
    return out if conv.bias is None else out + conv.bias


def _padded(t: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], hp, wp, t.shape[-1])
    out[:, :t.shape[1], :t.shape[2]] = t
    return out


def bilinear(img: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of ``img (B, Hp, Wp, d)`` at pixel coordinates ``px, py (B, T)`` (x = column),
    zero outside the map: the four neighbours with tent weights ``1 - |p - neighbour|``."""
    b, hp, wp, _ = img.shape
    x0, y0 = torch.floor(px).detach(), torch.floor(py).detach()
    batch = torch.arange(b)[:, None]
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - (px - xi).abs()) * (1 - (py - yi).abs())
            inside = (xi >= 0) & (xi <= wp - 1) & (yi >= 0) & (yi <= hp - 1)
            vals = img[batch, yi.clamp(0, hp - 1).long(), xi.clamp(0, wp - 1).long()]  # (B, T, d)
            out = out + (weight * inside)[..., None] * vals
    return out


def swin_bias(table: torch.Tensor, ws: int, head: int) -> torch.Tensor:
    """``(ws*ws, ws*ws)`` bias of one head: ``table[(iy - jy + ws - 1) * (2ws - 1) + ix - jx + ws - 1]``."""
    t = ws * ws
    bias = torch.zeros(t, t, dtype=table.dtype)
    for i in range(t):
        for j in range(t):
            (iy, ix), (jy, jx) = divmod(i, ws), divmod(j, ws)
            bias[i, j] = table[(iy - jy + ws - 1) * (2 * ws - 1) + ix - jx + ws - 1, head]
    return bias


def reference(m: VSAWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """VSA in float64, window by window and head by head."""
    b, h, w, _ = x.shape
    ws, heads, co = m.window_size, m.num_heads, m.out_dim
    d = co // heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    qkv = _pw(m.qkv, x)
    q, k, v = (_padded(qkv[..., i * co:(i + 1) * co], hp, wp) for i in range(3))  # zero vectors in the padding
    xp = _padded(x, hp, wp)
    # normalised coordinates u in [-1, 1] over the padded map: pixel p <-> -1 + 2p / (size - 1) (a one-pixel axis:
    # every point samples pixel 0; the official code divides by zero there)
    step_x, step_y = (2 / (wp - 1) if wp > 1 else 0.0), (2 / (hp - 1) if hp > 1 else 0.0)
    my, mx = (t.reshape(-1).double() for t in torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    out = torch.zeros(b, hp, wp, co, dtype=x.dtype)
    for a in range(hp // ws):
        for c in range(wp // ws):
            rows, cols = slice(a * ws, (a + 1) * ws), slice(c * ws, (c + 1) * ws)
            pooled = xp[:, rows, cols].mean((1, 2))
            act = torch.where(pooled >= 0, pooled, 0.01 * pooled)  # LeakyReLU
            off, scl = _pw(m.sampling_offsets[2], act), _pw(m.sampling_scales[2], act)  # (B, 2 * heads)
            for e in range(heads):
                cx, cy = -1 + (c * ws + (ws - 1) / 2) * step_x, -1 + (a * ws + (ws - 1) / 2) * step_y
                ux = (cx + (mx - (ws - 1) / 2) * step_x * (1 + scl[:, 2 * e, None])
                      + off[:, 2 * e, None] / (w // ws))
                uy = (cy + (my - (ws - 1) / 2) * step_y * (1 + scl[:, 2 * e + 1, None])
                      + off[:, 2 * e + 1, None] / (h // ws))
                px, py = (ux + 1) / 2 * (wp - 1), (uy + 1) / 2 * (hp - 1)
                ch = slice(e * d, (e + 1) * d)
                kk, vv = bilinear(k[..., ch], px, py), bilinear(v[..., ch], px, py)  # (B, T, d)
                qq = q[:, rows, cols, ch].reshape(b, ws * ws, d)
                logits = qq @ kk.transpose(1, 2) * m.scale + swin_bias(m.relative_position_bias_table, ws, e)
                out[:, rows, cols, ch] = (logits.softmax(-1) @ vv).reshape(b, ws, ws, d)
    return _pw(m.proj, out[:, :h, :w])


def _randomise(m: VSAWindowAttention, spread: float = 3.0) -> VSAWindowAttention:
    """Predictors that move and stretch the windows (past their neighbours and the border) and a bias that
    matters."""
    with torch.no_grad():
        for seq in (m.sampling_offsets, m.sampling_scales):
            torch.nn.init.uniform_(seq[2].weight, -spread / math.sqrt(m.dim), spread / math.sqrt(m.dim))
            torch.nn.init.uniform_(seq[2].bias, -0.5, 0.5)
        torch.nn.init.normal_(m.relative_position_bias_table)
    return m


# ---------------------------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(ws=st.integers(2, 3), extra_h=st.integers(0, 4), extra_w=st.integers(0, 4), heads=st.integers(1, 2),
       head_dim=st.sampled_from([2, 4]), wider_out=st.booleans(), qkv_bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_matches_reference(ws, extra_h, extra_w, heads, head_dim, wider_out, qkv_bias, layout):
    torch.manual_seed(ws * 100 + extra_h * 10 + extra_w)
    dim = heads * head_dim
    out_dim = 2 * dim if wider_out else None
    m = _randomise(VSAWindowAttention(dim, heads, out_dim=out_dim, window_size=ws, qkv_bias=qkv_bias,
                                      zero_init=False))
    h, w = ws + extra_h, ws + extra_w
    if layout == "transposed":
        x = torch.randn(2, w, h, dim).transpose(1, 2)
    elif layout == "sliced":
        x = torch.randn(2, h, w, dim + 3)[..., :dim]
    else:
        x = torch.randn(2, h, w, dim)
    assert layout == "contiguous" or not x.is_contiguous()
    check_against_reference(m, x, reference)


def test_gradients_reach_both_predictors():
    torch.manual_seed(1)
    m = _randomise(VSAWindowAttention(8, 2, window_size=3, zero_init=False))
    x = torch.randn(2, 7, 8, 8)
    check_against_reference(m, x, reference)
    m(x).square().sum().backward()
    for seq in (m.sampling_offsets, m.sampling_scales):
        assert seq[2].weight.grad.abs().min() > 0 and seq[2].bias.grad.abs().min() > 0


def test_one_pixel_windows_and_one_pixel_axis():
    torch.manual_seed(2)
    m = _randomise(VSAWindowAttention(4, 2, window_size=1, zero_init=False))
    check_against_reference(m, torch.randn(2, 1, 5, 4), reference)  # H = 1: every key on row 0
    check_against_reference(m, torch.randn(2, 3, 4, 4), reference)


# ---------------------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------------------


def _swin_twin(m: VSAWindowAttention) -> WindowAttention:
    swin = WindowAttention(m.dim, m.num_heads, m.window_size)
    with torch.no_grad():
        swin.qkv.weight.copy_(m.qkv.weight.flatten(1))
        swin.qkv.bias.copy_(m.qkv.bias)
        swin.proj.weight.copy_(m.proj.weight.flatten(1))
        swin.proj.bias.copy_(m.proj.bias)
        swin.relative_position_bias_table.copy_(m.relative_position_bias_table)
    return swin


@pytest.mark.parametrize("shape,ws", [((2, 6, 9, 8), 3), ((3, 14, 7, 16), 7)])
def test_oracle1_zero_predictors_are_swin_window_attention(shape, ws):
    torch.manual_seed(3)
    m = VSAWindowAttention(shape[-1], 2, window_size=ws)  # zero_init (default)
    torch.nn.init.normal_(m.relative_position_bias_table)
    swin = _swin_twin(m)
    x1, x2 = torch.randn(shape, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_()
    out, expected = m(x1), swin(x2)
    assert_close(out, expected, name="zero predictors")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert_close(x1.grad, x2.grad, 3e-5, "x.grad")
    assert_close(m.qkv.weight.grad.flatten(1), swin.qkv.weight.grad, 3e-5, "qkv.weight.grad")
    assert_close(m.relative_position_bias_table.grad, swin.relative_position_bias_table.grad, 3e-5, "table.grad")
    # the windows can start moving: the predictors get a gradient from the first step
    assert m.sampling_offsets[2].weight.grad.abs().sum() > 0 and m.sampling_scales[2].bias.grad.abs().sum() > 0


def _moved_windows(m: VSAWindowAttention, x: torch.Tensor, key_pixel) -> torch.Tensor:
    """Window attention in float64 whose key slot ``(my, mx)`` of window ``(a, c)``, head ``e`` reads the pixel
    ``key_pixel(a, c, e, my, mx)`` of the zero-padded k/v maps (zero off the map)."""
    m, x = copy.deepcopy(m).double(), x.double()
    b, h, w, _ = x.shape
    ws, heads, co = m.window_size, m.num_heads, m.out_dim
    d, hp, wp = co // heads, math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    qkv = _pw(m.qkv, x)
    q, k, v = (_padded(qkv[..., i * co:(i + 1) * co], hp, wp) for i in range(3))
    out = torch.zeros(b, hp, wp, co, dtype=torch.float64)
    for a in range(hp // ws):
        for c in range(wp // ws):
            for e in range(heads):
                ch = slice(e * d, (e + 1) * d)
                kk, vv = (torch.zeros(b, ws * ws, d, dtype=torch.float64) for _ in range(2))
                for j in range(ws * ws):
                    py, px = key_pixel(a, c, e, *divmod(j, ws))
                    if 0 <= py < hp and 0 <= px < wp:
                        kk[:, j], vv[:, j] = k[:, py, px, ch], v[:, py, px, ch]
                qq = q[:, a * ws:(a + 1) * ws, c * ws:(c + 1) * ws, ch].reshape(b, ws * ws, d)
                logits = qq @ kk.transpose(1, 2) * m.scale + swin_bias(m.relative_position_bias_table, ws, e)
                out[:, a * ws:(a + 1) * ws, c * ws:(c + 1) * ws, ch] = (logits.softmax(-1) @ vv).reshape(b, ws, ws, d)
    return _pw(m.proj, out[:, :h, :w])


def test_oracle2_integer_offsets_translate_each_heads_windows():
    torch.manual_seed(4)
    m = VSAWindowAttention(8, 2, window_size=3)
    torch.nn.init.normal_(m.relative_position_bias_table)
    h, w = 8, 10  # padded to 9 x 12
    shifts = [(1, -2), (-3, 4)]  # (dy, dx) in pixels, per head
    with torch.no_grad():
        for e, (dy, dx) in enumerate(shifts):  # offset o moves by o / (n // ws) * (n_padded - 1) / 2 pixels
            m.sampling_offsets[2].bias[2 * e] = dx * 2 * (w // 3) / (12 - 1)
            m.sampling_offsets[2].bias[2 * e + 1] = dy * 2 * (h // 3) / (9 - 1)
    x = torch.randn(2, h, w, 8)
    expected = _moved_windows(m, x, lambda a, c, e, my, mx: (a * 3 + my + shifts[e][0], c * 3 + mx + shifts[e][1]))
    assert_close(m(x), expected, name="translated windows")


def test_oracle2b_scale_one_doubles_the_window_around_its_centre():
    torch.manual_seed(5)
    m = VSAWindowAttention(8, 2, window_size=3)
    with torch.no_grad():
        m.sampling_scales[2].bias.fill_(1.0)  # 1 + scale = 2: slots 2 pixels apart, centred on the window
    x = torch.randn(2, 9, 6, 8)
    expected = _moved_windows(m, x, lambda a, c, e, my, mx: (a * 3 + 1 + 2 * (my - 1), c * 3 + 1 + 2 * (mx - 1)))
    assert_close(m(x), expected, name="dilated windows")


def test_oracle3_far_offsets_sample_zero_keys():
    torch.manual_seed(6)
    m = VSAWindowAttention(8, 2, window_size=3)
    with torch.no_grad():
        m.sampling_offsets[2].bias.fill_(1e3)
    out = m(torch.randn(2, 6, 7, 8))
    assert_close(out, m.proj.bias.detach().expand_as(out), name="zero keys and values: proj bias only")


def test_sampling_and_attention_run_once_per_call(monkeypatch):
    calls = []
    sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(a[0].shape) or sample(*a, **k))
    m = VSAWindowAttention(24, 3, window_size=7)
    with nearfar.functional.observe_calls() as attends:
        m(torch.randn(2, 14, 21, 24))
    assert calls == [torch.Size([6, 16, 14, 21])]  # B * heads maps of k and v (2 x head_dim channels)
    assert len(attends) == 1  # one batched call: B * nH * nW windows, 3 heads, 49 queries and 49 sampled keys
    assert [tuple(s) for s in attends[0][1:]] == [(12, 3, 49, 8)] * 3


# ---------------------------------------------------------------------------------------------------------------
# official names, baseline, hygiene, errors, registry
# ---------------------------------------------------------------------------------------------------------------

#: the state-dict keys and shapes of the official ``VSAWindowAttention(96, out_dim=96, num_heads=3, window_size=7)``
OFFICIAL = {
    "sampling_offsets.2.weight": (6, 96, 1, 1), "sampling_offsets.2.bias": (6,),
    "sampling_scales.2.weight": (6, 96, 1, 1), "sampling_scales.2.bias": (6,),
    "qkv.weight": (288, 96, 1, 1), "qkv.bias": (288,), "proj.weight": (96, 96, 1, 1), "proj.bias": (96,),
    "relative_position_bias_table": (169, 3), "relative_position_index": (49, 49),
}


def test_official_state_dict_loads_strictly():
    m = VSAWindowAttention(96, 3)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == OFFICIAL
    torch.manual_seed(7)
    official = {k: torch.randn(s) for k, s in OFFICIAL.items()}
    index = torch.zeros(49, 49, dtype=torch.long)  # Swin's relative_position_index, from its formula
    for i in range(49):
        for j in range(49):
            index[i, j] = (i // 7 - j // 7 + 6) * 13 + i % 7 - j % 7 + 6
    official["relative_position_index"] = index
    m.load_state_dict(official, strict=True)
    assert torch.equal(m.relative_position_index, index)
    m.double()
    x = torch.randn(1, 14, 14, 96, dtype=torch.float64)
    with torch.no_grad():
        assert_close(m(x), BASELINES["vsa"](m, x), 1e-10, name="loaded weights vs the official computation")


@pytest.mark.parametrize("shape,heads,ws", [((2, 14, 14, 32), 2, 7), ((2, 15, 17, 24), 3, 7), ((3, 9, 8, 16), 2, 3)])
def test_baseline_matches_module(shape, heads, ws):
    torch.manual_seed(8)
    m = _randomise(VSAWindowAttention(shape[-1], heads, window_size=ws, zero_init=False), spread=1.0)
    x = torch.randn(shape, requires_grad=True)
    xb = x.detach().clone().requires_grad_()
    out, base = m(x), BASELINES["vsa"](m, xb)
    assert_close(out, base, name="baseline")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (base * g).sum().backward()
    assert_close(x.grad, xb.grad, 3e-5, "x.grad")


def test_forward_backward_finite_compile_and_round_trip():
    torch.manual_seed(9)
    m = _randomise(VSAWindowAttention(16, 2, window_size=3, zero_init=False))
    check_forward_backward_finite(m, torch.randn(2, 7, 5, 16))
    check_compile_matches_eager(m, torch.randn(1, 6, 7, 16))
    check_state_dict_round_trip(lambda: VSAWindowAttention(16, 2, window_size=3, zero_init=False),
                                torch.randn(2, 7, 6, 16))


def test_zero_init_flag():
    on, off = VSAWindowAttention(16, 2), VSAWindowAttention(16, 2, zero_init=False)
    for seq in (on.sampling_offsets, on.sampling_scales):
        assert not seq[2].weight.any() and not seq[2].bias.any()
    assert off.sampling_offsets[2].weight.any() and off.sampling_scales[2].weight.any()
    off.reset_sampling()
    assert not off.sampling_scales[2].weight.any()


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        VSAWindowAttention(10, 3)
    with pytest.raises(ValueError, match="out_dim"):
        VSAWindowAttention(12, 3, out_dim=10)
    with pytest.raises(ValueError, match="window_size"):
        VSAWindowAttention(8, 2, window_size=0)
    with pytest.raises(TypeError, match="window_size"):
        VSAWindowAttention(8, 2, window_size=7.0)
    with pytest.raises(ValueError, match="qk_scale"):
        VSAWindowAttention(8, 2, qk_scale=-1.0)
    with pytest.raises(TypeError, match="qkv_bias"):
        VSAWindowAttention(8, 2, qkv_bias=1)
    with pytest.raises(TypeError, match="zero_init"):
        VSAWindowAttention(8, 2, zero_init=None)
    m = VSAWindowAttention(8, 2, window_size=3)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"H, W >= window_size=3"):
        m(torch.randn(1, 2, 6, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m("x")


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["vsa"]
    assert entry.cls is VSAWindowAttention and entry.family == "window" and entry.dims == ("2d",)
    assert set(entry.patterns) == {"NS"}
    a = entry.make(96, 3)
    assert a.window_size == 7 and math.isclose(a.scale, 32 ** -0.5) and a.out_dim == 96
    assert entry.make(64, 2, window_size=4).window_size == 4
    assert a(torch.randn(1, 14, 14, 96)).shape == (1, 14, 14, 96)
