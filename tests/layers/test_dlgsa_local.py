"""DLGSANet MHDLSA: a float64 reference written from the paper's description and the official code
(NeonLeexiang/DLGSANet ``IDynamicDWConvBlock``, ``IDynamicDWConv`` and the ``_idynamic`` CUDA kernel's indexing) with
explicit loops over the filter taps and zero padding by bounds checks, its properties (oracles), the benchmark
baseline, the official state-dict names, module hygiene."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)
from oracles.dlgsa_local import BASELINES

import nearfar
from nearfar.layers.dlgsa_local import MHDLSA, dynamic_filter


def _taps(h: int, w: int, k: int):
    """Every tap (a, s) of a k x k filter with the output rows/cols whose input row/col is inside the map."""
    p = k // 2
    for a in range(k):
        for s in range(k):
            dy, dx = a - p, s - p
            ys, xs = range(max(0, -dy), min(h, h - dy)), range(max(0, -dx), min(w, w - dx))
            yield a, s, dy, dx, ys, xs


def depthwise_reference(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out[b, y, x, c] = bias[c] + sum_{a,s} weight[c, 0, a, s] * t[b, y + a - p, x + s - p, c]`` (zero outside)."""
    b, h, w, c = t.shape
    out = torch.zeros_like(t) + (bias if bias is not None else 0)
    for a, s, dy, dx, ys, xs in _taps(h, w, weight.shape[-1]):
        if len(ys) and len(xs):
            out[:, ys.start:ys.stop, xs.start:xs.stop] += (
                weight[:, 0, a, s] * t[:, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx])
    return out


def reference(m: MHDLSA, x: torch.Tensor) -> torch.Tensor:
    """conv0; kernels = PW2(DW_k(PW1(u))) read as (heads, k, k) per pixel; out[p, c] = sum over taps of
    kernel[p, c // (C / heads), a, s] * u[p + (a - k//2, s - k//2), c]; conv1."""
    b, h, w, c = x.shape
    k, heads = m.window_size, m.num_heads
    u = x @ m.conv0.weight[:, :, 0, 0].T
    pw1, dw, pw2 = m.conv.conv1[0], m.conv.conv1[1], m.conv.conv2[0]
    t = u @ pw1.weight[:, :, 0, 0].T + (pw1.bias if pw1.bias is not None else 0)
    t = depthwise_reference(t, dw.weight, dw.bias)
    kern = (t @ pw2.weight[:, :, 0, 0].T + (pw2.bias if pw2.bias is not None else 0)).view(b, h, w, heads, k, k)
    group = torch.arange(c) // (c // heads)  # the head of every channel
    out = torch.zeros_like(u)
    for a, s, dy, dx, ys, xs in _taps(h, w, k):
        for y in ys:
            for xx in xs:
                out[:, y, xx] += kern[:, y, xx, group, a, s] * u[:, y + dy, xx + dx]
    return out @ m.conv1.weight[:, :, 0, 0].T


def _randomize(m: torch.nn.Module) -> None:
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        return torch.cat([x, torch.randn_like(x)], dim=-1)[..., : x.shape[-1]]
    return x


@settings(max_examples=15, deadline=None)
@given(b=st.integers(2, 3), h=st.integers(1, 7), w=st.integers(1, 7), heads=st.integers(1, 3),
       cg=st.integers(2, 4), k=st.sampled_from([1, 3, 5]), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_matches_reference(b, h, w, heads, cg, k, bias, layout):
    torch.manual_seed(h * 100 + w * 10 + k)
    dim = heads * cg
    if dim < 4:
        dim, cg = 4 * heads, 4
    m = MHDLSA(dim, heads, window_size=k, bias=bias)
    _randomize(m)
    check_against_reference(m, _layout(torch.randn(b, h, w, dim), layout), reference)


def test_dynamic_filter_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 5, 2 * 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: dynamic_filter(x, w, 3), (x, w))


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_dynamic_filter_in_image_chunks(monkeypatch, per_chunk):
    """Large images run the shift loops a few images at a time (the last chunk shorter): same values and grads."""
    torch.manual_seed(6)
    x = torch.randn(3, 5, 4, 6, requires_grad=True)
    w = torch.randn(3, 5, 4, 3 * 9, requires_grad=True)
    g = torch.randn(3, 5, 4, 6)
    whole = dynamic_filter(x, w, 3)
    expected = torch.autograd.grad((whole * g).sum(), (x, w))
    monkeypatch.setattr("nearfar.layers.dlgsa_local._images_per_chunk", lambda per_image: per_chunk)
    chunked = dynamic_filter(x, w, 3)
    assert_close(chunked, whole)
    for a, b in zip(torch.autograd.grad((chunked * g).sum(), (x, w)), expected):
        assert_close(a, b)


def test_oracle1_centre_one_hot_kernels_are_the_identity():
    """Hyper-network output weights 0 and bias the centre one-hot: every pixel's filter is a delta, DynDW = identity,
    the layer is conv1(conv0(x))."""
    torch.manual_seed(1)
    m = MHDLSA(12, 3, window_size=5)
    k = m.window_size
    with torch.no_grad():
        m.conv.conv2[0].weight.zero_()
        m.conv.conv2[0].bias.copy_(torch.nn.functional.one_hot(torch.tensor(k * k // 2), k * k).repeat(3).double())
        x = torch.randn(2, 6, 7, 12)
        expected = x @ m.conv0.weight[:, :, 0, 0].T @ m.conv1.weight[:, :, 0, 0].T
        assert_close(m(x), expected)


def test_receptive_field_is_the_window():
    """Family "local": an output pixel reads exactly its window_size x window_size neighbourhood (the kernels come
    from a k x k depth-wise conv of the same neighbourhood, and the filter reads it)."""
    torch.manual_seed(2)
    m = MHDLSA(8, 2, window_size=3).double()
    _randomize(m)
    x = torch.randn(1, 9, 8, 8, dtype=torch.float64, requires_grad=True)
    m(x)[0, 4, 3].sum().backward()
    seen = x.grad.abs().sum(-1)[0] > 0
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(8), indexing="ij")
    assert torch.equal(seen, ((rows - 4).abs() <= 1) & ((cols - 3).abs() <= 1))


def test_baseline_matches_module():
    torch.manual_seed(4)
    for shape, heads, k in (((2, 8, 10, 24), 3, 7), ((1, 7, 5, 24), 6, 3)):
        m = MHDLSA(shape[-1], heads, window_size=k)
        _randomize(m)
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(BASELINES["dlgsa_local"](m, x), m(x), name=f"baseline {shape}")


def _official_state_dict(dim: int, group_channels: int, k: int) -> dict[str, torch.Tensor]:
    """The parameters of the official ``IDynamicDWConvBlock(dim, window_size=k, heads=group_channels)``."""
    g = torch.Generator().manual_seed(0)
    r, groups = dim // 4, dim // group_channels
    shapes = {"conv0.weight": (dim, dim, 1, 1), "conv1.weight": (dim, dim, 1, 1),
              "conv.conv1.0.weight": (r, dim, 1, 1), "conv.conv1.0.bias": (r,),
              "conv.conv1.1.weight": (r, 1, k, k), "conv.conv1.1.bias": (r,),
              "conv.conv2.0.weight": (k * k * groups, r, 1, 1), "conv.conv2.0.bias": (k * k * groups,)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_official_state_dict_loads_strict():
    sd = _official_state_dict(30, 6, 7)  # official defaults: 6 channels per group, window 7
    m = MHDLSA(30)
    assert m.num_heads == 5
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 5, 6, 30)
    with torch.no_grad():
        assert_close(m(x), BASELINES["dlgsa_local"](m, x))
    check_state_dict_round_trip(lambda: MHDLSA(24, 4, window_size=3), torch.randn(1, 5, 6, 24))


def test_finite_and_compile():
    torch.manual_seed(5)
    m = MHDLSA(24, 3, window_size=5)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 24))
    check_compile_matches_eager(MHDLSA(24, 3, window_size=3), torch.randn(1, 6, 5, 24))  # 9 taps: quick to trace


def test_registry_entry():
    entry = {e.name: e for e in nearfar.mechanisms()}["dlgsa_local"]
    assert entry.family == "local" and entry.dims == ("2d",) and entry.cls is MHDLSA
    assert entry.make(16, 4).num_heads == 4 and entry.make(16, 4).window_size == 7


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        MHDLSA(10, 3)
    with pytest.raises(ValueError, match="dim must be >= 4"):
        MHDLSA(3, 1)
    with pytest.raises(ValueError, match="multiple of 6"):
        MHDLSA(16)
    with pytest.raises(ValueError, match="window_size must be odd"):
        MHDLSA(8, 2, window_size=4)
    with pytest.raises(ValueError, match="window_size"):
        MHDLSA(8, 2, window_size=0)
    with pytest.raises(TypeError, match="bias"):
        MHDLSA(8, 2, bias=1)
    m = MHDLSA(8, 2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError):
        m([1.0])
