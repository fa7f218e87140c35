"""GC ViT local and global-query window attention: float64 reference written from the paper
and the official code (NVlabs/GCVit ``models/gc_vit.py``: ``WindowAttentionGlobal``, ``GlobalQueryGen``), its
properties (oracles), timm names,
the benchmark baseline, module hygiene."""

from __future__ import annotations

import math
from functools import cache

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
from oracles.gcvit import BASELINES

import nearfar
from nearfar.layers.gcvit import GCViTWindowAttention, GlobalQueryAttention

# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


@cache
def _windows(h: int, w: int, ws: tuple[int, int]):
    """Allowed pairs (same ws-window; smaller edge windows), the Swin bias-table row of every pair (query-minus-key in
    the window), and each token's window slot, with plain loops."""
    allowed = ref.swin_mask((h, w), (min(ws[0], h), min(ws[1], w)))
    n = h * w
    idx = [[0] * n for _ in range(n)]
    slot = [0] * n
    for i in range(n):
        iy, ix = divmod(i, w)
        slot[i] = (iy % ws[0]) * ws[1] + ix % ws[1]
        for j in range(n):
            jy, jx = divmod(j, w)
            if (iy // ws[0], ix // ws[1]) == (jy // ws[0], jx // ws[1]):
                idx[i][j] = (iy - jy + ws[0] - 1) * (2 * ws[1] - 1) + (ix - jx + ws[1] - 1)
    return allowed, torch.tensor(idx), torch.tensor(slot)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _window_attention(m, q, k, v, h, w):
    allowed, idx, _ = _windows(h, w, m.window_size)
    bias = m.rel_pos.relative_position_bias_table[idx].permute(2, 0, 1)  # (heads, N, N), Swin table lookup
    out = ref.dense_reference(q, k, v, allowed, m.scale, bias)
    return F.linear(out.transpose(1, 2).reshape(q.shape[0], h, w, -1), m.proj.weight, m.proj.bias)


def local_reference(m: GCViTWindowAttention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, c = x.shape
    q, k, v = (_heads(t, m.num_heads) for t in F.linear(x.reshape(b, h * w, c), m.qkv.weight, m.qkv.bias).chunk(3, -1))
    return _window_attention(m, q, k, v, h, w)


def generator_reference(m: GlobalQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """The official ``FeatExtract`` chain on the raw input: z + PW(SE(GELU(DW_3 z))), max-pool(3, 2, 1) per level;
    bicubic to ws."""
    z = x.permute(0, 3, 1, 2)
    for i in range(max(1, m.levels)):
        blk = getattr(m.global_block.blocks, f"conv{i + 1}")
        y = F.gelu(F.conv2d(z, blk.conv_dw.weight, padding=1, groups=z.shape[1]))
        s = F.gelu(y.mean((2, 3)) @ blk.se.fc1.weight.flatten(1).t()) @ blk.se.fc2.weight.flatten(1).t()
        y = y * torch.sigmoid(s)[:, :, None, None]
        z = z + F.conv2d(y, blk.conv_pw.weight)
        if i < m.levels:
            z = F.max_pool2d(z, 3, 2, 1)
    if tuple(z.shape[2:]) != m.window_size:
        z = F.interpolate(z, size=m.window_size, mode="bicubic")
    return z.permute(0, 2, 3, 1)


def global_reference(m: GlobalQueryAttention, x: torch.Tensor, q_global: torch.Tensor | None = None):
    b, h, w, c = x.shape
    q_global = generator_reference(m, x) if q_global is None else q_global
    qg = _heads(q_global.reshape(q_global.shape[0], -1, c), m.num_heads).expand(b, -1, -1, -1)
    _, _, slot = _windows(h, w, m.window_size)
    q = torch.stack([qg[:, :, int(s)] for s in slot], dim=2)  # token i's query: the one at its window slot
    k, v = (_heads(t, m.num_heads) for t in F.linear(x.reshape(b, h * w, c), m.qkv.weight, m.qkv.bias).chunk(2, -1))
    return _window_attention(m, q, k, v, h, w)


class _WithQuery(torch.nn.Module):
    """``m(x, q_global)`` with a fixed (buffer) query map, for ``check_against_reference``."""

    def __init__(self, inner: GlobalQueryAttention, q_global: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("q_global", q_global)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, self.q_global)


def _bigger_bias(m: torch.nn.Module) -> None:
    torch.nn.init.normal_(m.rel_pos.relative_position_bias_table)  # make the bias matter


# ---------------------------------------------------------------------------------------------------------------
# against the reference
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=15)
@given(h=st.integers(1, 9), w=st.integers(1, 9), ws=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       heads=st.integers(1, 2), qkv_bias=st.booleans())
def test_local_matches_reference(h, w, ws, heads, qkv_bias):
    torch.manual_seed(h * 10 + w)
    m = GCViTWindowAttention(4 * heads, heads, ws, qkv_bias=qkv_bias)
    _bigger_bias(m)
    check_against_reference(m, torch.randn(2, h, w, 4 * heads), local_reference)


@settings(max_examples=12)
@given(h=st.integers(1, 9), w=st.integers(1, 9), ws=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       feat=st.sampled_from([1, 4, 8]), given_query=st.booleans())
def test_global_matches_reference(h, w, ws, feat, given_query):
    torch.manual_seed(h * 10 + w)
    m = GlobalQueryAttention(8, 2, ws, feat_size=feat)  # feat 8 with ws 1..3: 3, 2, 1 levels; feat 1: keep-dim
    _bigger_bias(m)
    x = torch.randn(2, h, w, 8)
    if given_query:
        check_against_reference(_WithQuery(m, torch.randn(2, *ws, 8)), x,
                                lambda mm, xx: global_reference(mm.inner, xx, mm.q_global))
    else:
        check_against_reference(m, x, global_reference)


def test_global_odd_size_bicubic_query_and_generator_grads():
    torch.manual_seed(0)
    m = GlobalQueryAttention(16, 2, window_size=3, feat_size=12)  # 2 levels: 11 -> 6 -> 3, 13 -> 7 -> 4 (resized)
    _bigger_bias(m)
    assert m.levels == 2
    check_against_reference(m, torch.randn(2, 11, 13, 16), global_reference)


# ---------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------------


def _pair(ws: int, dim: int = 16, heads: int = 2):
    """A local and a global module sharing k/v/proj/bias weights (global kv = the local qkv's k and v rows)."""
    torch.manual_seed(ws)
    local = GCViTWindowAttention(dim, heads, ws)
    _bigger_bias(local)
    glob = GlobalQueryAttention(dim, heads, ws, feat_size=ws)
    with torch.no_grad():
        glob.qkv.weight.copy_(local.qkv.weight[dim:])
        glob.qkv.bias.copy_(local.qkv.bias[dim:])
        glob.proj.load_state_dict(local.proj.state_dict())
        glob.rel_pos.load_state_dict(local.rel_pos.state_dict())
    return local, glob


def _local_queries(local: GCViTWindowAttention, x_window: torch.Tensor) -> torch.Tensor:
    """``W_q x_n`` of one window ``(B, ws, ws, C)`` as a ``q_global`` map."""
    dim = local.dim
    return F.linear(x_window, local.qkv.weight[:dim], local.qkv.bias[:dim])


def test_oracle1_local_queries_make_the_global_block_local():
    local, glob = _pair(5)
    x = torch.randn(2, 5, 5, 16)  # one window: its own W_q x_n is the whole query map
    assert_close(glob(x, _local_queries(local, x)), local(x), name="one window")
    tile = torch.randn(2, 5, 5, 16)
    x = tile.repeat(1, 3, 2, 1)  # six windows, each with the same content: W_q x_n is the same in every window
    assert_close(glob(x, _local_queries(local, tile)), local(x), name="six windows")


def test_oracle2_identical_windows_give_identical_outputs():
    torch.manual_seed(3)
    m = GlobalQueryAttention(16, 2, window_size=3, feat_size=9)
    x = torch.randn(2, 9, 9, 16)
    x[:, 3:6, 6:9] = x[:, 0:3, 0:3]  # window (1, 2) holds window (0, 0)'s content
    out = m(x)
    assert_close(out[:, 3:6, 6:9], out[:, 0:3, 0:3], name="shared queries")
    assert (out[:, 3:6, 3:6] - out[:, 0:3, 0:3]).abs().max() > 1e-3  # other windows differ
    qg = m.global_query(x)
    # image b's windows use image b's queries (batch-major, not timm's interleaved repeat)
    assert_close(out[1:], m(x[1:], qg[1:]), name="image 1 alone")
    assert (m(x[1:], qg[:1]) - out[1:]).abs().max() > 1e-3


def test_oracle3_one_window_is_cross_attention_of_the_generated_queries():
    torch.manual_seed(4)
    m = GlobalQueryAttention(16, 2, window_size=(6, 5), feat_size=5)  # ws = H x W: keep-dim generator
    _bigger_bias(m)
    assert m.levels == 0
    x = torch.randn(2, 6, 5, 16)
    qg = m.global_query(x)
    q = qg.reshape(2, 30, 2, 8).transpose(1, 2)
    k, v = m.qkv(x).reshape(2, 30, 2, 2, 8).permute(2, 0, 3, 1, 4)
    table = m.rel_pos.relative_position_bias_table
    coords = torch.cartesian_prod(torch.arange(6), torch.arange(5))
    d = coords[:, None] - coords[None]  # query minus key
    bias = table[(d[..., 0] + 5) * 9 + d[..., 1] + 4].permute(2, 0, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=m.scale)
    assert_close(m(x), m.proj(o.transpose(1, 2).reshape(2, 6, 5, 16)))


# ---------------------------------------------------------------------------------------------------------------
# timm names, baseline, hygiene, errors, registry
# ---------------------------------------------------------------------------------------------------------------


def test_parameter_names_match_timm():
    local = GCViTWindowAttention(64, 2, 7)  # timm WindowAttentionGlobal(use_global=False)
    assert {k: tuple(v.shape) for k, v in local.state_dict().items()} == {
        "rel_pos.relative_position_bias_table": (169, 2), "qkv.weight": (192, 64), "qkv.bias": (192,),
        "proj.weight": (64, 64), "proj.bias": (64,)}
    bare = GlobalQueryAttention(64, 2, 7, query_generator=False)
    assert {k: tuple(v.shape) for k, v in bare.state_dict().items()} == {  # timm WindowAttentionGlobal(use_global=True)
        "rel_pos.relative_position_bias_table": (169, 2), "qkv.weight": (128, 64), "qkv.bias": (128,),
        "proj.weight": (64, 64), "proj.bias": (64,)}
    full = GlobalQueryAttention(64, 2, 7, feat_size=56)  # timm GlobalContextVitStage.global_block = FeatureBlock(64, 3)
    gen = {k: tuple(v.shape) for k, v in full.state_dict().items() if k.startswith("global_block.")}
    expected = {}
    for i in (1, 2, 3):
        p = f"global_block.blocks.conv{i}."
        expected.update({p + "conv_dw.weight": (64, 1, 3, 3), p + "se.fc1.weight": (16, 64, 1, 1),
                         p + "se.fc2.weight": (64, 16, 1, 1), p + "conv_pw.weight": (64, 64, 1, 1)})
    assert gen == expected
    assert [n for n, _ in full.global_block.blocks.named_children()] == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "pool3"]
    assert [n for n, _ in GlobalQueryAttention(64, 2, 14, feat_size=14).global_block.blocks.named_children()] == [
        "conv1"]


def test_state_dict_round_trip_and_query_generator_optional():
    check_state_dict_round_trip(lambda: GlobalQueryAttention(16, 2, 3, feat_size=6), torch.randn(1, 7, 6, 16))
    check_state_dict_round_trip(lambda: GCViTWindowAttention(16, 2, 3), torch.randn(1, 7, 6, 16))
    full = GlobalQueryAttention(16, 2, 3, feat_size=6)
    bare = GlobalQueryAttention(16, 2, 3, query_generator=False)
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("global_block.")})
    x = torch.randn(2, 6, 6, 16)
    qg = full.global_query(x)
    assert torch.equal(bare(x, qg), full(x, qg))
    assert torch.equal(full(x), full(x, qg))


@pytest.mark.parametrize("name,shape,heads", [("gcvit_local", (2, 14, 21, 32), 2), ("gcvit_global", (2, 14, 21, 32), 2),
                                              ("gcvit_global", (3, 14, 14, 32), 1)])
def test_baseline_matches_module(name, shape, heads):
    torch.manual_seed(5)
    m = GCViTWindowAttention(32, heads) if name == "gcvit_local" else GlobalQueryAttention(32, heads, feat_size=28)
    _bigger_bias(m)
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(BASELINES[name](m, x), m(x), name=f"baseline {name}")


def test_forward_backward_finite_and_compile():
    torch.manual_seed(6)
    for m in (GCViTWindowAttention(16, 2, 3), GlobalQueryAttention(16, 2, 3, feat_size=6)):
        check_forward_backward_finite(m, torch.randn(2, 7, 5, 16))
        check_compile_matches_eager(m, torch.randn(1, 6, 6, 16))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        GCViTWindowAttention(10, 3)
    with pytest.raises(ValueError, match="window_size"):
        GCViTWindowAttention(8, 2, window_size=0)
    with pytest.raises(ValueError, match="qk_scale"):
        GCViTWindowAttention(8, 2, qk_scale=-1.0)
    with pytest.raises(TypeError, match="qkv_bias"):
        GlobalQueryAttention(8, 2, qkv_bias=1)
    with pytest.raises(ValueError, match="feat_size"):
        GlobalQueryAttention(8, 2, feat_size=(0, 4))
    with pytest.raises(TypeError, match="query_generator"):
        GlobalQueryAttention(8, 2, query_generator=None)
    m = GlobalQueryAttention(8, 2, 3, feat_size=6)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"q_global must be \(B, 3, 3, 8\)"):
        m(torch.randn(2, 6, 6, 8), torch.randn(2, 4, 4, 8))
    with pytest.raises(ValueError, match="B = 2 or 1"):
        m(torch.randn(2, 6, 6, 8), torch.randn(3, 3, 3, 8))
    with pytest.raises(TypeError, match="q_global"):
        m(torch.randn(2, 6, 6, 8), "q")
    with pytest.raises(ValueError, match="query_generator=False"):
        GlobalQueryAttention(8, 2, 3, query_generator=False)(torch.randn(1, 6, 6, 8))


def test_registry():
    reg = {e.name: e for e in nearfar.mechanisms()}
    assert reg["gcvit_local"].cls is GCViTWindowAttention and reg["gcvit_global"].cls is GlobalQueryAttention
    a, b = reg["gcvit_global"].make(96, 3), reg["gcvit_global"].make(384, 12)
    assert (a.window_size, a.levels, b.window_size, b.levels) == ((7, 7), 3, (14, 14), 0)
    assert reg["gcvit_local"].make(384, 12).window_size == (14, 14)
    assert reg["gcvit_local"].make(64, 2, window_size=5).window_size == (5, 5)
    assert a(torch.randn(1, 14, 14, 96)).shape == (1, 14, 14, 96)  # 14 -> 7 -> 4 -> 2, resized to 7 x 7
    assert math.isclose(a.scale, 32 ** -0.5)
