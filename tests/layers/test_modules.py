"""nn.Module mechanisms: against a float64 re-derivation of the official computation, and module hygiene."""

from __future__ import annotations

import pytest
import reference as ref
import torch

import nearfar
from nearfar import NeighborhoodAttention

NA_CASES = [  # (grid, kernel_size, dilation, is_causal, rel_pos_bias)
    ((23,), 7, 2, False, True),
    ((9, 11), (3, 5), (2, 1), False, True),
    ((7, 8), 4, 1, False, True),  # even kernel
    ((5, 6, 7), 3, 1, False, True),
    ((10, 9), 3, 1, (True, False), False),
]


def _reference(module: NeighborhoodAttention, x: torch.Tensor, grid, kernel_size, dilation, is_causal):
    """NAT forward in float64: qkv split [3, heads, head_dim], masked softmax over the neighbourhood (+ rpb), proj."""
    m = module.double()
    b, c, h = x.shape[0], x.shape[-1], module.num_heads
    n = x[0, ..., 0].numel()
    qkv = m.qkv(x.double()).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    allowed = ref.neighborhood_mask(grid, kernel_size, dilation, is_causal)
    bias = ref.rpb_bias(m.rpb, grid, kernel_size, dilation) if m.rpb is not None else None
    out = ref.dense_reference(qkv[0], qkv[1], qkv[2], allowed, module.scale, bias)
    return m.proj(out.transpose(1, 2).reshape(*x.shape))


@pytest.mark.parametrize("grid,kernel_size,dilation,is_causal,rpb", NA_CASES)
def test_neighborhood_module_matches_reference(grid, kernel_size, dilation, is_causal, rpb):
    torch.manual_seed(0)
    m = NeighborhoodAttention(16, 2, kernel_size, dilation, is_causal, rel_pos_bias=rpb, ndim=len(grid))
    if rpb:
        torch.nn.init.normal_(m.rpb)  # make the bias matter
    x = torch.randn(2, *grid, 16, requires_grad=True)
    out = m(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    x64 = x.detach().double().requires_grad_()
    m64 = NeighborhoodAttention(16, 2, kernel_size, dilation, is_causal, rel_pos_bias=rpb, ndim=len(grid))
    m64.load_state_dict(m.state_dict())
    expected = _reference(m64, x64, grid, kernel_size, dilation, is_causal)
    expected.square().sum().backward()
    grads64 = [p.grad for p in m64.parameters()] + [x64.grad]
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= 1e-5 * scale
    for g, g64 in zip(grads, grads64):
        assert (g.double() - g64).abs().max() <= 3e-5 * max(1.0, float(g64.abs().max()))


def test_full_kernel_is_full_attention():
    torch.manual_seed(1)
    m = NeighborhoodAttention(8, 2, (5, 7), rel_pos_bias=False)
    x = torch.randn(1, 5, 7, 8)
    qkv = m.qkv(x).reshape(1, 35, 3, 2, 4).permute(2, 0, 3, 1, 4)
    full = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    expected = m.proj(full.transpose(1, 2).reshape(1, 5, 7, 8))
    assert (m(x) - expected).abs().max() < 1e-5


def test_state_dict_names_match_natten_legacy():
    m = NeighborhoodAttention(32, 4, 7)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "qkv.weight": (96, 32), "qkv.bias": (96,), "rpb": (4, 13, 13), "proj.weight": (32, 32), "proj.bias": (32,)}
    clone = NeighborhoodAttention(32, 4, 7)
    clone.load_state_dict(m.state_dict())
    x = torch.randn(1, 12, 13, 32)
    assert torch.equal(m(x), clone(x))


def test_odd_sizes_large_enough_for_the_block_sparse_engine():
    torch.manual_seed(2)
    m = NeighborhoodAttention(24, 3, 7, dilation=2)
    x = torch.randn(2, 37, 41, 24, requires_grad=True)  # 1517 tokens: "auto" runs the block-sparse engine
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.rpb.grad).all()


def test_torch_compile_matches_eager():
    torch.manual_seed(3)
    m = NeighborhoodAttention(16, 2, 3)
    x = torch.randn(1, 9, 10, 16)
    assert (torch.compile(m)(x) - m(x)).abs().max() < 1e-5


def test_module_errors():
    with pytest.raises(ValueError, match="num_heads"):
        NeighborhoodAttention(10, 3, 3)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        NeighborhoodAttention(8, 2, 3, is_causal=True)
    with pytest.raises(ValueError, match="kernel_size"):
        NeighborhoodAttention(8, 2, (3, 3, 3), ndim=2)
    m = NeighborhoodAttention(8, 2, 3)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="kernel_size"):
        m(torch.randn(1, 2, 5, 8))  # 2 < kernel_size


def test_registry():
    entries = {m.name: m for m in nearfar.mechanisms()}
    na = entries["neighborhood"]
    assert na.repo == "SHI-Labs/NATTEN" and "2d" in na.dims
    assert isinstance(na.make(dim=8, num_heads=2, kernel_size=3), torch.nn.Module)


def test_dinat_schedule_matches_the_official_configs():
    from nearfar.layers.neighborhood import dinat_dilations

    assert dinat_dilations(2, 56) == [1, 8]
    assert dinat_dilations(4, 28) == [1, 4, 1, 4]
    assert dinat_dilations(6, 14) == [1, 2, 1, 2, 1, 2]
    assert dinat_dilations(5, 7) == [1, 1, 1, 1, 1]
