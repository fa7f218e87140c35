"""CRAFT SRWAB attention: float64 reference written from the paper's equations and the official code
(AVC2-UESTC/CRAFT-SR ``basicsr/archs/craft_arch.py`` ``SRWAB``), its properties (oracles), official names, the benchmark
baseline, module hygiene."""

from __future__ import annotations

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
from oracles.craft_srwa import BASELINES

import nearfar
from nearfar.layers.craft_srwa import SRWAttention

#: the position MLP's LayerNorms over 3 features are ill-conditioned where the features nearly agree; its parameter
#: gradients in float32 then differ from float64 by a few 1e-5 of their size
_GRAD_RTOL = 1e-4


def _rolled_slots(h: int, w: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(N, 2) slot of every token inside its window after ``torch.roll(-shift)``, with loops."""
    slots = []
    for i in range(h * w):
        r, c = divmod(i, w)
        slots.append((((r - shift[0]) % h) % window[0], ((c - shift[1]) % w) % window[1]))
    return torch.tensor(slots, dtype=torch.float64)


def _branch(m: SRWAttention, i: int, q, k, v, h: int, w: int, shift: tuple[int, int]):
    """One orientation: cyclic windows, bias = the position MLP at the (query - key) slot offset of every pair."""
    branch = m.attns[i]
    allowed = ref.cyclic_blocks_mask((h, w), branch.window, shift)
    slots = _rolled_slots(h, w, branch.window, shift)
    offsets = slots[:, None, :] - slots[None, :, :]  # (N, N, 2), query minus key (CRAFT's index)
    bias = branch.pos(offsets).permute(2, 0, 1)  # (heads, N, N)
    return ref.dense_reference(q, k, v, allowed, m.scale, bias)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def craft_reference(m: SRWAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    xn = F.layer_norm(x, (c,), m.norm1.weight, m.norm1.bias, m.norm1.eps).reshape(b, h * w, c)
    q, k, v = F.linear(xn, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
    a, s = m.shift_size
    halves = []
    for i, shift in enumerate(((a, s), (s, a))):
        part = slice(i * c // 2, (i + 1) * c // 2)
        qh, kh, vh = (_heads(t[..., part], m.num_heads // 2) for t in (q, k, v))
        halves.append(_branch(m, i, qh, kh, vh, h, w, shift).transpose(1, 2).reshape(b, h * w, c // 2))
    lcm = F.conv2d(v.transpose(1, 2).reshape(b, c, h, w), m.get_v.weight, m.get_v.bias, padding=1, groups=c)
    out = torch.cat(halves, dim=-1) + lcm.reshape(b, c, h * w).transpose(1, 2)
    return F.linear(out, m.proj.weight, m.proj.bias).reshape(b, h, w, c)


@settings(max_examples=15)
@given(split=st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 4])), mult=st.tuples(
       st.integers(1, 3), st.integers(1, 3)), shift=st.tuples(st.integers(0, 4), st.integers(0, 4)),
       heads=st.sampled_from([2, 4]))
def test_matches_reference(split, mult, shift, heads):
    step = math.lcm(*split)
    h, w = step * mult[0], step * mult[1]
    if h * w > 144:  # keep the float64 reference small
        h, w = step, step
    torch.manual_seed(h * 100 + w)
    m = SRWAttention(96, heads, split_size=split, shift_size=shift)  # dim 96: position MLP width 3 (see below)
    check_against_reference(m, torch.randn(2, h, w, 96), craft_reference, grad_rtol=_GRAD_RTOL)


def test_official_shifted_block_on_a_16x16_map():
    torch.manual_seed(0)
    m = SRWAttention(96, 2, split_size=(4, 16), shift_size=(2, 8))  # CRFB's odd block with the official split
    check_against_reference(m, torch.randn(1, 16, 16, 96), craft_reference, grad_rtol=_GRAD_RTOL)


def test_position_mlp_of_width_one_is_a_constant():
    """A quirk the official model has: with embed_dim 48 the MLP width is (24 // 4) // 4 = 1, and a LayerNorm over
    one feature outputs its bias, so the "dynamic position bias" does not depend on the offset; at width 2 the
    LayerNorm outputs +-1, so it takes two values. Tests that check the bias use dim 96 (width 3)."""
    torch.manual_seed(7)
    branch = SRWAttention(48, 6).attns[0]
    out = branch.pos(branch.offsets)
    assert torch.equal(out, out[:1].expand_as(out))
    two = SRWAttention(64, 2).attns[0]
    assert len(torch.unique(two.pos(two.offsets).detach().round(decimals=4), dim=0)) <= 2
    wide = SRWAttention(96, 2).attns[0]
    assert len(torch.unique(wide.pos(wide.offsets).detach().round(decimals=4), dim=0)) > 10


# ---------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------------


def test_oracle1_image_sized_rectangles_are_full_attention_per_half():
    torch.manual_seed(1)
    m = SRWAttention(96, 4, split_size=(6, 6))
    x = torch.randn(2, 6, 6, 96)
    qkv = m.qkv(m.norm1(x)).reshape(2, 36, 3, 2, 2, 24).permute(2, 3, 0, 4, 1, 5)  # 3, half, B, heads, N, d
    coords = torch.cartesian_prod(torch.arange(6.0), torch.arange(6.0))
    halves = []
    for i in range(2):
        bias = m.attns[i].pos(coords[:, None] - coords[None]).permute(2, 0, 1)  # query minus key, whole image
        o = F.scaled_dot_product_attention(qkv[0, i], qkv[1, i], qkv[2, i], attn_mask=bias)
        halves.append(o.transpose(1, 2).reshape(2, 6, 6, 48))
    lcm = m.get_v(qkv[2].permute(1, 0, 2, 4, 3).reshape(2, 96, 6, 6)).permute(0, 2, 3, 1)
    assert_close(m(x), m.proj(torch.cat(halves, -1) + lcm))


@pytest.mark.parametrize("shift", [(1, 2), (2, 8), (3, 5)])
def test_oracle2_shift_equivariance_per_half(shift):
    torch.manual_seed(2)
    shifted = SRWAttention(32, 2, split_size=(4, 8), shift_size=shift)
    with torch.no_grad():  # expose the two halves: identity projection, no LCM
        shifted.proj.weight.copy_(torch.eye(32))
        shifted.proj.bias.zero_()
        shifted.get_v.weight.zero_()
        shifted.get_v.bias.zero_()
    plain = SRWAttention(32, 2, split_size=(4, 8))
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(2, 16, 24, 32)
    out = shifted(x)
    for half, s in ((slice(0, 16), shift), (slice(16, 32), shift[::-1])):
        expected = torch.roll(plain(torch.roll(x, (-s[0], -s[1]), (1, 2))), s, (1, 2))
        assert_close(out[..., half], expected[..., half], name=f"half {half}")


def test_oracle3_bias_depends_only_on_the_offset():
    torch.manual_seed(3)
    m = SRWAttention(96, 4, split_size=(2, 3))
    for branch in m.attns:
        r, s = branch.window
        table = branch.table()  # (heads, 2r-1, 2s-1), key minus query
        # the official lookup: MLP over the query-minus-key offsets, gathered with Swin's relative_position_index
        coords = torch.cartesian_prod(torch.arange(r), torch.arange(s))
        d = coords[:, None] - coords[None]  # query minus key
        official = branch.pos(branch.offsets)[((d[..., 0] + r - 1) * (2 * s - 1) + d[..., 1] + s - 1)]
        ours = table[:, -d[..., 0] + r - 1, -d[..., 1] + s - 1].permute(1, 2, 0)
        assert_close(ours, official, name="table vs official lookup")
        for i in range(r * s):  # block-Toeplitz: equal offsets, equal biases
            for j in range(r * s):
                same = (d == d[i, j]).all(-1)
                assert torch.equal(official[same], official[i, j].expand(int(same.sum()), -1))
        assert torch.equal(table[:, r - 1, s - 1], branch.pos(torch.zeros(2))), "zero offset at the centre"


# ---------------------------------------------------------------------------------------------------------------
# names, baseline, hygiene, errors, registry
# ---------------------------------------------------------------------------------------------------------------


def test_parameter_names_match_official_srwab():
    m = SRWAttention(48, 6)  # CRAFT: embed_dim 48, heads 6 -> pos_dim (24 // 4) // 4 = 1
    expected = {"norm1.weight": (48,), "norm1.bias": (48,), "qkv.weight": (144, 48), "qkv.bias": (144,),
                "proj.weight": (48, 48), "proj.bias": (48,), "get_v.weight": (48, 1, 3, 3), "get_v.bias": (48,)}
    for i in (0, 1):
        p = f"attns.{i}.pos."
        expected.update({p + "pos_proj.weight": (1, 2), p + "pos_proj.bias": (1,)})
        for j, out in ((1, 1), (2, 1), (3, 3)):
            expected.update({f"{p}pos{j}.0.weight": (1,), f"{p}pos{j}.0.bias": (1,),
                             f"{p}pos{j}.2.weight": (out, 1), f"{p}pos{j}.2.bias": (out,)})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    check_state_dict_round_trip(lambda: SRWAttention(32, 2, (2, 4), (1, 2)), torch.randn(1, 8, 4, 32))


@pytest.mark.parametrize("shift", [(0, 0), (2, 4)])
def test_baseline_matches_module(shift):
    torch.manual_seed(4)
    m = SRWAttention(96, 4, split_size=(4, 8), shift_size=shift)
    x = torch.randn(2, 16, 24, 96)
    with torch.no_grad():
        assert_close(BASELINES["craft_srwa"](m, x), m(x), name=f"baseline shift {shift}")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(5)
    m = SRWAttention(32, 2, split_size=(2, 3), shift_size=(1, 1))
    check_forward_backward_finite(m, torch.randn(2, 6, 12, 32))
    check_compile_matches_eager(m, torch.randn(1, 6, 6, 32))


def test_errors():
    with pytest.raises(ValueError, match="even"):
        SRWAttention(48, 3)
    with pytest.raises(ValueError, match="num_heads"):
        SRWAttention(50, 4)
    with pytest.raises(ValueError, match=">= 32"):
        SRWAttention(16, 2)
    with pytest.raises(ValueError, match="split_size"):
        SRWAttention(32, 2, split_size=(0, 4))
    with pytest.raises(ValueError, match="shift_size"):
        SRWAttention(32, 2, shift_size=(-1, 0))
    with pytest.raises(ValueError, match="qk_scale"):
        SRWAttention(32, 2, qk_scale=0.0)
    m = SRWAttention(32, 2, split_size=(2, 4))
    with pytest.raises(ValueError, match=r"divisible by split_size \(2, 4\) \(multiples of 4\)"):
        m(torch.randn(1, 6, 8, 32))
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 32, 8, 8))


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["craft_srwa"]
    assert entry.cls is SRWAttention and entry.repo == "AVC2-UESTC/CRAFT-SR"
    a, b = entry.make(96, 3), entry.make(384, 12)
    assert (a.num_heads, a.split_size, a.shift_size, b.num_heads) == (2, (7, 14), (0, 0), 12)
    assert entry.make(48, 6, split_size=(4, 16)).split_size == (4, 16)
    assert a(torch.randn(1, 14, 28, 96)).shape == (1, 14, 28, 96)
