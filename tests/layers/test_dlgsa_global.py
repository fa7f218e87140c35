"""DLGSANet SparseGSA: a float64 reference written from the paper's description and the official code
(NeonLeexiang/DLGSANet ``SparseAttention``, ``Attention``) with explicit per-head, per-channel-pair cosine
similarities and zero padding by bounds checks, its properties (oracles), the benchmark baseline, the official
state-dict names, module hygiene."""

from __future__ import annotations

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
from oracles.dlgsa_global import BASELINES

import nearfar
from nearfar.layers.dlgsa_global import ACTIVATIONS, SparseGSA, tlc_tiles


def _act(name: str, a: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.where(a > 0, a, torch.zeros_like(a))
    if name == "gelu":
        return 0.5 * a * (1 + torch.erf(a / 2 ** 0.5))
    if name == "sigmoid":
        return 1 / (1 + torch.exp(-a))
    if name == "softmax":
        e = torch.exp(a - a.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)
    return a


def qkv_reference(m: SparseGSA, x: torch.Tensor) -> torch.Tensor:
    """1x1 conv, then the 3x3 depth-wise conv with its taps looped (zero outside the map): ``(B, H, W, 3C)``."""
    b, h, w, c = x.shape
    t = x @ m.qkv.weight[:, :, 0, 0].T + (m.qkv.bias if m.qkv.bias is not None else 0)
    dw = torch.zeros_like(t) + (m.qkv_dwconv.bias if m.qkv_dwconv.bias is not None else 0)
    for a in range(3):
        for s in range(3):
            for y in range(h):
                for xx in range(w):
                    if 0 <= y + a - 1 < h and 0 <= xx + s - 1 < w:
                        dw[:, y, xx] += m.qkv_dwconv.weight[:, 0, a, s] * t[:, y + a - 1, xx + s - 1]
    return dw


def attention_reference(m: SparseGSA, qkv: torch.Tensor) -> torch.Tensor:
    """Per head, A[i, j] = act(t_h * <q_i, k_j> / (max(|q_i|, 1e-12) max(|k_j|, 1e-12))) over the tokens;
    out[n, i] = sum_j A[i, j] v[n, j]. ``qkv`` ``(B, H, W, 3C)`` -> ``(B, H, W, C)``, before ``project_out``."""
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    heads, d = m.num_heads, c // m.num_heads
    tok = qkv.reshape(b, h * w, 3 * c)
    q, k, v = tok[..., :c], tok[..., c:2 * c], tok[..., 2 * c:]
    out = torch.zeros(b, h * w, c, dtype=qkv.dtype)
    for head in range(heads):
        logits = torch.zeros(b, d, d, dtype=qkv.dtype)
        for i in range(d):
            for j in range(d):
                qi, kj = q[:, :, head * d + i], k[:, :, head * d + j]
                cos = (qi * kj).sum(1) / (qi.norm(dim=1).clamp_min(1e-12) * kj.norm(dim=1).clamp_min(1e-12))
                logits[:, i, j] = m.temperature[head, 0, 0] * cos
        attn = _act(m.activation, logits)
        for i in range(d):
            out[:, :, head * d + i] = (attn[:, i, None, :] * v[:, :, head * d:(head + 1) * d]).sum(-1)
    return out.reshape(b, h, w, c)


def _project(m: SparseGSA, out: torch.Tensor) -> torch.Tensor:
    return out @ m.project_out.weight[:, :, 0, 0].T + (m.project_out.bias if m.project_out.bias is not None else 0)


def reference(m: SparseGSA, x: torch.Tensor) -> torch.Tensor:
    """qkv, channel attention over the whole map, project_out."""
    return _project(m, attention_reference(m, qkv_reference(m, x)))


def tlc_reference(m: SparseGSA, x: torch.Tensor) -> torch.Tensor:
    """TLC as the official ``grids`` / ``grids_inverse`` do it: tiles of min(kernel, side) stepped evenly with the
    last one flush with the border, attention per tile, tile outputs averaged where they overlap, then project_out."""
    qkv = qkv_reference(m, x)
    b, h, w, _ = qkv.shape
    k1, k2 = min(h, m.tlc_kernel), min(w, m.tlc_kernel)
    nr, nc = (h - 1) // k1 + 1, (w - 1) // k2 + 1
    step_i = k1 if nr == 1 else math.ceil((h - k1) / (nr - 1) - 1e-8)
    step_j = k2 if nc == 1 else math.ceil((w - k2) / (nc - 1) - 1e-8)
    total = torch.zeros(b, h, w, m.dim, dtype=x.dtype)
    count = torch.zeros(1, h, w, 1, dtype=x.dtype)
    i, last_i = 0, False
    while i < h and not last_i:
        if i + k1 >= h:
            i, last_i = h - k1, True
        j, last_j = 0, False
        while j < w and not last_j:
            if j + k2 >= w:
                j, last_j = w - k2, True
            total[:, i:i + k1, j:j + k2] += attention_reference(m, qkv[:, i:i + k1, j:j + k2])
            count[:, i:i + k1, j:j + k2] += 1
            j += step_j
        i += step_i
    return _project(m, total / count)


def _randomize(m: torch.nn.Module) -> None:
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p)
    with torch.no_grad():
        m.temperature.uniform_(0.5, 2.0)  # per-head temperatures that differ


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        return torch.cat([x, torch.randn_like(x)], dim=-1)[..., : x.shape[-1]]
    return x


@settings(max_examples=20, deadline=None)
@given(b=st.integers(2, 3), h=st.integers(1, 7), w=st.integers(1, 7), heads=st.integers(1, 4),
       d=st.integers(1, 4), bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_matches_reference(b, h, w, heads, d, bias, activation, layout):
    torch.manual_seed(h * 100 + w * 10 + heads)
    m = SparseGSA(heads * d, heads, bias=bias, activation=activation)
    _randomize(m)
    check_against_reference(m, _layout(torch.randn(b, h, w, heads * d), layout), reference)


@settings(max_examples=10, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), kernel=st.integers(2, 5), activation=st.sampled_from(ACTIVATIONS))
def test_tlc_matches_reference_in_eval(h, w, kernel, activation):
    torch.manual_seed(h * 10 + w + kernel)
    m = SparseGSA(6, 2, bias=True, activation=activation, tlc_kernel=kernel)
    _randomize(m)
    check_against_reference(m.eval(), torch.randn(2, h, w, 6), tlc_reference)


def test_tlc_only_in_eval_and_only_past_the_kernel():
    torch.manual_seed(7)
    m = SparseGSA(8, 2, tlc_kernel=4)
    plain = SparseGSA(8, 2)
    plain.load_state_dict(m.state_dict())
    big, small = torch.randn(2, 9, 6, 8), torch.randn(2, 4, 3, 8)
    with torch.no_grad():
        assert torch.equal(m.train()(big), plain(big))  # training: the whole map, as the official code
        assert not torch.allclose(m.eval()(big), plain(big), atol=1e-4)
        assert torch.equal(m.eval()(small), plain.eval()(small))  # one tile: the plain forward
    assert tlc_tiles(10, 4) == [0, 3, 6] and tlc_tiles(96, 48) == [0, 48] and tlc_tiles(100, 48) == [0, 26, 52]


def test_oracle2_softmax_is_restormer_mdta():
    """activation='softmax' is Restormer's MDTA (the official ``Attention``): rows of the affinity sum to one and
    the output is project_out(A v)."""
    torch.manual_seed(1)
    m = SparseGSA(12, 3, activation="softmax")
    x = torch.randn(2, 5, 4, 12)
    with torch.no_grad():
        qkv = m.qkv_dwconv(m.qkv(x.permute(0, 3, 1, 2))).reshape(2, 3, 3, 4, 20)
        q, k, v = F.normalize(qkv[:, 0], dim=-1), F.normalize(qkv[:, 1], dim=-1), qkv[:, 2]
        attn = torch.softmax(q @ k.transpose(-1, -2) * m.temperature, dim=-1)
        assert_close(m.affinity(*(t.reshape(2, 12, 20).transpose(1, 2) for t in (qkv[:, 0], qkv[:, 1]))), attn)
        assert_close(attn.sum(-1), torch.ones(2, 3, 4))
        out = m.project_out((attn @ v).reshape(2, 12, 5, 4)).permute(0, 2, 3, 1)
        assert_close(m(x), out)


def test_oracle3_relu_affinity_is_sparse_and_bounded():
    """0 <= A <= temperature, and A = 0 exactly where the cosine is <= 0 (ReLU: the sparsity of SparseGSA)."""
    torch.manual_seed(2)
    m = SparseGSA(16, 2)
    _randomize(m)
    q, k = torch.randn(3, 30, 16), torch.randn(3, 30, 16)
    with torch.no_grad():
        attn = m.affinity(q, k)
        cos = torch.stack([F.normalize(q[..., i * 8:(i + 1) * 8], dim=1).transpose(1, 2)
                           @ F.normalize(k[..., i * 8:(i + 1) * 8], dim=1) for i in range(2)], dim=1)
    tau = m.temperature.detach().view(1, 2, 1, 1)
    assert (attn >= 0).all() and (attn <= tau * (1 + 1e-6)).all()
    assert torch.equal(attn == 0, cos <= 0) and (attn == 0).any() and (attn > 0).any()


def test_output_depends_on_every_token():
    """Family "dense": a change at any one token changes every token's output (through the channel affinity)."""
    torch.manual_seed(3)
    m = SparseGSA(8, 2, bias=True).double()
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64, requires_grad=True)
    m(x)[0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_baseline_matches_module(activation):
    torch.manual_seed(4)
    for shape, heads in (((2, 8, 10, 24), 3), ((1, 7, 5, 24), 6), ((2, 3, 4, 24), 4)):  # N > C and N <= C paths
        m = SparseGSA(shape[-1], heads, activation=activation)
        _randomize(m)
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(BASELINES["dlgsa_global"](m, x), m(x), name=f"baseline {shape}")


def test_official_state_dict_loads_strict():
    """The parameters of the official ``SparseAttention(dim, num_heads, bias=False)`` as DLGSANet builds it."""
    dim, heads = 24, 6
    g = torch.Generator().manual_seed(0)
    shapes = {"temperature": (heads, 1, 1), "qkv.weight": (3 * dim, dim, 1, 1), "qkv_dwconv.weight": (3 * dim, 1, 3, 3),
              "project_out.weight": (dim, dim, 1, 1)}
    sd = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    m = SparseGSA(dim)
    assert m.num_heads == 6 and m.activation == "relu"
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 5, 6, dim)
    with torch.no_grad():
        assert_close(m(x), BASELINES["dlgsa_global"](m, x))
    biased = {k for k in SparseGSA(dim, bias=True).state_dict()} - set(shapes)
    assert biased == {"qkv.bias", "qkv_dwconv.bias", "project_out.bias"}
    check_state_dict_round_trip(lambda: SparseGSA(24, 4, bias=True), torch.randn(1, 5, 6, 24))


def test_finite_and_compile():
    torch.manual_seed(5)
    m = SparseGSA(24, 3, bias=True)
    check_forward_backward_finite(m, torch.randn(2, 7, 9, 24))
    check_compile_matches_eager(m, torch.randn(1, 6, 5, 24))


def test_registry_entry():
    entry = {e.name: e for e in nearfar.mechanisms()}["dlgsa_global"]
    assert entry.family == "dense" and entry.dims == ("2d",) and entry.cls is SparseGSA
    assert entry.make(16, 4).num_heads == 4


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        SparseGSA(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        SparseGSA(8, 0)
    with pytest.raises(TypeError, match="bias"):
        SparseGSA(8, 2, bias=1)
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseGSA(8, 2, activation="topk")
    with pytest.raises(ValueError, match="tlc_kernel"):
        SparseGSA(8, 2, tlc_kernel=0)
    with pytest.raises(TypeError, match="tlc_kernel"):
        SparseGSA(8, 2, tlc_kernel=4.0)
    m = SparseGSA(8, 2)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(TypeError):
        m([1.0])
