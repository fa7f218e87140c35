"""MaxViT block / grid attention: float64 reference written from the paper and the official code (google-research/maxvit
``maxvit/models/maxvit.py``: ``window_partition``, ``grid_partition``, ``Attention``), its properties (oracles), the
benchmark baseline, timm ``AttentionCl`` parameter names, module hygiene."""

from __future__ import annotations

import itertools

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
from oracles import maxvit as baseline

import nearfar
from nearfar import Grid, Neighborhood, attend
from nearfar.layers.maxvit import MaxViTAttention

BASELINES = baseline.BASELINES


# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


def _windows(m: MaxViTAttention, spatial: tuple[int, int]):
    """Padded extents and, per window, the list of (padded token coordinate, slot) pairs, with loops.

    Block (``window_partition``): the map is zero-padded to a multiple of ``P`` (a window larger than the input is
    therefore the input plus masked padding, which is what clipping means); token ``(r, c)`` -> window
    ``(r // P_h, c // P_w)``, slot ``(r % P_h, c % P_w)``. Grid (``grid_partition``, divisible extents): stride
    ``t = H / G``; window ``(r % t_h, c % t_w)``, slot ``(r // t_h, c // t_w)``."""
    ps = m.partition_size
    windows: dict[tuple[int, int], list] = {}
    if m.partition == "block":
        padded = tuple(-(-n // p) * p for n, p in zip(spatial, ps))
        for r, c in itertools.product(*(range(p) for p in padded)):
            windows.setdefault((r // ps[0], c // ps[1]), []).append(((r, c), (r % ps[0], c % ps[1])))
    else:
        padded = spatial
        t = [n // g for n, g in zip(spatial, ps)]
        for r, c in itertools.product(*(range(n) for n in spatial)):
            windows.setdefault((r % t[0], c % t[1]), []).append(((r, c), (r // t[0], c // t[1])))
    return padded, list(windows.values())


def _bias(m: MaxViTAttention, slots) -> torch.Tensor | None:
    """``(heads, n, n)`` with loops: ``bias_tf``: ``R[h, k_y - q_y + P_h - 1, k_x - q_x + P_w - 1]`` (official
    ``attention_utils.py``, key minus query); ``bias``: Swin's table
    ``T[(q_y - k_y + P_h - 1) * (2 P_w - 1) + (q_x - k_x + P_w - 1), h]``."""
    if m.rel_pos is None:
        return None
    table, (ph, pw) = m.rel_pos.relative_position_bias_table, m.partition_size
    rows = []
    for sq in slots:
        row = []
        for sk in slots:
            if m.rel_pos.kind == "bias_tf":
                row.append(table[:, sk[0] - sq[0] + ph - 1, sk[1] - sq[1] + pw - 1])
            else:
                row.append(table[(sq[0] - sk[0] + ph - 1) * (2 * pw - 1) + (sq[1] - sk[1] + pw - 1)])
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)  # (heads, n, n)


def _split_qkv_timm(m: MaxViTAttention, t: torch.Tensor):
    """timm ``AttentionCl``: head_first splits the channels ``[heads, 3, d]``, otherwise ``[3, heads, d]``."""
    b, n, _ = t.shape
    qkv = m.qkv(t)
    if m.head_first:
        qkv = qkv.view(b, n, m.num_heads, 3, m.dim_head).permute(3, 0, 2, 1, 4)
    else:
        qkv = qkv.view(b, n, 3, m.num_heads, m.dim_head).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def maxvit_reference(m: MaxViTAttention, x: torch.Tensor) -> torch.Tensor:
    """The official attention in float64: partition (block or grid, loops), per-window MHA with the relative bias,
    masked padded keys, reverse, proj."""
    b, h, w, c = x.shape
    padded, windows = _windows(m, (h, w))
    xp = x.new_zeros(b, *padded, c)
    xp[:, :h, :w] = x
    out = x.new_zeros(b, *padded, c)
    for members in windows:
        coords = [p for p, _ in members]
        rows = torch.tensor([r for r, _ in coords])
        cols = torch.tensor([c_ for _, c_ in coords])
        real = torch.tensor([r < h and c_ < w for r, c_ in coords])
        q, k, v = _split_qkv_timm(m, xp[:, rows, cols])
        o = ref.dense_reference(q, k, v, real.view(1, -1), m.scale, _bias(m, [s for _, s in members]))
        out[:, rows, cols] = o.transpose(1, 2).reshape(b, len(members), c)
    return m.proj(out[:, :h, :w])


def _module(dim=8, partition="block", size=3, seed=0, **kw) -> MaxViTAttention:
    torch.manual_seed(seed)
    m = MaxViTAttention(dim, partition, size, dim_head=4, **kw)
    if m.rel_pos is not None:
        torch.nn.init.normal_(m.rel_pos.relative_position_bias_table)  # std 1: a wrong entry is visible
    return m


# ---------------------------------------------------------------------------------------------------------------
# module vs reference
# ---------------------------------------------------------------------------------------------------------------

_REL = st.sampled_from(["bias_tf", "bias", None])


@settings(max_examples=20)
@given(h=st.integers(1, 9), w=st.integers(1, 9), p0=st.integers(1, 4), p1=st.integers(1, 4), heads=st.integers(1, 2),
       rel=_REL, head_first=st.booleans())
def test_block_matches_reference(h, w, p0, p1, heads, rel, head_first):
    m = _module(4 * heads, "block", (p0, p1), seed=h * 10 + w, rel_pos_type=rel, head_first=head_first)
    check_against_reference(m, torch.randn(2, h, w, 4 * heads), maxvit_reference)


@settings(max_examples=20)
@given(g0=st.integers(1, 3), g1=st.integers(1, 3), t0=st.integers(1, 3), t1=st.integers(1, 3), heads=st.integers(1, 2),
       rel=_REL, head_first=st.booleans())
def test_grid_matches_reference(g0, g1, t0, t1, heads, rel, head_first):
    m = _module(4 * heads, "grid", (g0, g1), seed=g0 * 10 + t1, rel_pos_type=rel, head_first=head_first)
    check_against_reference(m, torch.randn(2, g0 * t0, g1 * t1, 4 * heads), maxvit_reference)


@pytest.mark.parametrize("partition,grid,size", [
    ("block", (14, 14), 7), ("grid", (14, 14), 7),  # the benchmark partition on a small map
    ("block", (9, 13), 7),  # odd: smaller edge windows
    ("block", (5, 3), 7),  # window larger than the input: clipped, centre of the table
    ("grid", (12, 8), (3, 4)),
])
def test_benchmark_like_matches_reference(partition, grid, size):
    m = _module(8, partition, size, seed=1)
    check_against_reference(m, torch.randn(1, *grid, 8), maxvit_reference)


# ---------------------------------------------------------------------------------------------------------------
# oracles (properties any correct implementation has)
# ---------------------------------------------------------------------------------------------------------------


def _lookup(length: int) -> torch.Tensor:
    """One-hot ``[n, m, v] = 1{m - n + length - 1 = v}`` (the TF/timm lookup)."""
    n = torch.arange(length)
    return F.one_hot(n[None, :] - n[:, None] + length - 1, 2 * length - 1).double()


def _full_mha(m: MaxViTAttention, x: torch.Tensor) -> torch.Tensor:
    """Full MHA over all tokens with the TF bias reindexed by einsum lookups over the whole map (slot = pixel)."""
    b, h, w, c = x.shape
    q, k, v = _split_qkv_timm(m, x.reshape(b, h * w, c))
    table = m.rel_pos.relative_position_bias_table.double()
    bias = torch.einsum("nhw,ixh,jyw->nijxy", table, _lookup(h), _lookup(w)).reshape(-1, h * w, h * w)
    o = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias, scale=m.scale)
    return m.proj(o.transpose(1, 2).reshape(b, h, w, c).float())


@pytest.mark.parametrize("partition", ["block", "grid"])
def test_oracle1_partition_equal_to_the_map_is_full_mha(partition):
    m = _module(8, partition, (5, 6), seed=2)
    x = torch.randn(2, 5, 6, 8)
    assert_close(m(x), _full_mha(m, x))


def test_oracle2_grid_of_one_is_proj_v():
    m = _module(8, "grid", 1, seed=3)
    x = torch.randn(2, 6, 5, 8)
    v = m.qkv(x)[..., 16:]  # [3, heads, d] split: the last C channels
    assert_close(m(x), m.proj(v))
    m.head_first = True  # [heads, 3, d]: v is the last d channels of every head's 3d block
    v = m.qkv(x).view(2, 6, 5, 2, 3, 4)[..., 2, :].reshape(2, 6, 5, 8)
    assert_close(m(x), m.proj(v))


@pytest.mark.parametrize("rel", [None, "bias_tf"])
def test_oracle3_grid_is_block_on_the_axis_transposed_map(rel):
    g, t = (3, 2), (2, 4)
    grid_m = _module(8, "grid", g, seed=4, rel_pos_type=rel)
    block_m = MaxViTAttention(8, "block", g, dim_head=4, rel_pos_type=rel)
    block_m.load_state_dict(grid_m.state_dict())
    x = torch.randn(2, g[0] * t[0], g[1] * t[1], 8)
    xt = x.view(2, g[0], t[0], g[1], t[1], 8).permute(0, 2, 1, 4, 3, 5).reshape(2, g[0] * t[0], g[1] * t[1], 8)
    yt = block_m(xt).view(2, t[0], g[0], t[1], g[1], 8).permute(0, 2, 1, 4, 3, 5).reshape(x.shape)
    assert_close(grid_m(x), yt)


def test_oracle3_grid_with_g_k_is_dina():
    h, w, k = 12, 8, (3, 2)
    gen = torch.Generator().manual_seed(5)
    q, kk, v = (torch.randn(2, 2, h * w, 8, generator=gen) for _ in range(3))
    dina = attend(q, kk, v, Neighborhood(k, dilation=(h // k[0], w // k[1]), grid=(h, w)))
    assert_close(attend(q, kk, v, Grid(k, grid=(h, w))), dina)
    # and the module without bias is that attention, with timm's qkv split
    m = _module(8, "grid", k, seed=5, rel_pos_type=None)
    x = torch.randn(1, h, w, 8)
    qm, km, vm = _split_qkv_timm(m, x.reshape(1, h * w, 8))
    o = attend(qm, km, vm, Neighborhood(k, dilation=(h // k[0], w // k[1]), grid=(h, w)), scale=m.scale)
    assert_close(m(x), m.proj(o.transpose(1, 2).reshape(1, h, w, 8)))


def test_partition_round_trip_and_block_grid_slots():
    x = torch.randn(2, 6, 8, 3)
    for part, rev, size in ((baseline.block_partition, baseline.block_reverse, (3, 2)),
                            (baseline.grid_partition, baseline.grid_reverse, (2, 4))):
        assert torch.equal(rev(part(x, size), size, (6, 8)), x)
    # block / grid window and slot of every token, by loops, against the baseline's view/permute partitions
    pos = torch.arange(48.0).view(1, 6, 8, 1)
    blocks = baseline.block_partition(pos, (3, 2))[:, :, 0].long()
    grids = baseline.grid_partition(pos, (2, 4))[:, :, 0].long()
    for r, c in itertools.product(range(6), range(8)):
        assert blocks[(r // 3) * 4 + c // 2, (r % 3) * 2 + c % 2] == r * 8 + c
        assert grids[(r % 3) * 2 + c % 2, (r // 3) * 4 + c // 2] == r * 8 + c


# ---------------------------------------------------------------------------------------------------------------
# baseline, timm names, hygiene
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,grid,kw", [
    ("maxvit_block", (14, 14), {}), ("maxvit_grid", (14, 14), {}),
    ("maxvit_block", (8, 12), dict(partition_size=4, rel_pos_type="bias", head_first=True)),
    ("maxvit_grid", (8, 12), dict(partition_size=(2, 3), rel_pos_type=None)),
])
def test_baseline_matches_module(name, grid, kw):
    torch.manual_seed(6)
    m = {e.name: e for e in nearfar.mechanisms()}[name].make(64, 2, **kw)
    if m.rel_pos is not None:
        torch.nn.init.normal_(m.rel_pos.relative_position_bias_table)
    x = torch.randn(2, *grid, 64)
    with torch.no_grad():
        assert_close(BASELINES[name](m, x), m(x), name=f"baseline {name} {grid}")


def _shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_state_dict_matches_timm_attention_cl_and_loads_derived_buffers():
    common = {"qkv.weight": (288, 96), "qkv.bias": (288,), "proj.weight": (96, 96), "proj.bias": (96,)}
    assert _shapes(MaxViTAttention(96)) == {**common, "rel_pos.relative_position_bias_table": (3, 13, 13)}
    assert _shapes(MaxViTAttention(96, rel_pos_type="bias")) == {**common,
                                                                 "rel_pos.relative_position_bias_table": (169, 3)}
    assert _shapes(MaxViTAttention(96, rel_pos_type=None)) == common
    assert set(_shapes(MaxViTAttention(96, bias=False))) == {"qkv.weight", "rel_pos.relative_position_bias_table",
                                                             "proj.weight"}
    # checkpoints saved with timm's (or older timm's persistent) lookup buffers load with strict=True
    x = torch.randn(1, 6, 9, 8)
    for rel, extras in (("bias_tf", {"rel_pos.height_lookup": _lookup(3).float(),
                                     "rel_pos.width_lookup": _lookup(3).float()}),
                        ("bias", {"rel_pos.relative_position_index": torch.zeros(81, dtype=torch.long)})):
        src = _module(8, "grid", 3, seed=7, rel_pos_type=rel)
        sd = {**src.state_dict(), **extras}
        dst = MaxViTAttention(8, "grid", 3, dim_head=4, rel_pos_type=rel)
        dst.load_state_dict(sd, strict=True)
        assert set(extras) <= set(sd)  # the caller's dict is not modified
        block = torch.nn.ModuleDict({"attn": MaxViTAttention(8, "grid", 3, dim_head=4, rel_pos_type=rel)})
        block.load_state_dict({f"attn.{k}": v for k, v in sd.items()}, strict=True)  # nested, as in a timm block
        with torch.no_grad():
            assert torch.equal(src(x), dst(x)) and torch.equal(src(x), block["attn"](x))
    check_state_dict_round_trip(lambda: MaxViTAttention(8, "block", 3, dim_head=4), x)


def test_no_nan_on_odd_sizes_and_compile_matches_eager():
    m = _module(8, "block", 7, seed=8)
    for grid in ((1, 1), (3, 10), (13, 9)):
        check_forward_backward_finite(m, torch.randn(2, *grid, 8))
    check_forward_backward_finite(_module(8, "grid", (3, 5), seed=8), torch.randn(2, 9, 5, 8))
    check_compile_matches_eager(_module(8, "grid", 3, seed=9), torch.randn(1, 6, 9, 8))


def test_errors():
    with pytest.raises(ValueError, match="partition"):
        MaxViTAttention(64, "window")
    with pytest.raises(ValueError, match="dim_head"):
        MaxViTAttention(48)
    with pytest.raises(ValueError, match="rel_pos_type"):
        MaxViTAttention(64, rel_pos_type="mlp")
    with pytest.raises(ValueError, match="partition_size"):
        MaxViTAttention(64, partition_size=0)
    with pytest.raises(ValueError, match="partition_size"):
        MaxViTAttention(64, partition_size=(7, 7, 7))
    m = MaxViTAttention(64, "grid", 7)
    with pytest.raises(ValueError, match=r"partition_size\[0\]=7"):
        m(torch.randn(1, 15, 14, 64))  # grid needs divisible extents
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 64, 14, 14))  # channels first
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 2, 14, 14, 64))  # 3D input
    with pytest.raises(TypeError, match="x"):
        m("x")


@pytest.mark.parametrize("name", ["maxvit_block", "maxvit_grid"])
def test_registry(name):
    entry = {e.name: e for e in nearfar.mechanisms()}[name]
    assert entry.cls is MaxViTAttention and entry.repo == "google-research/maxvit" and entry.dims == ("2d",)
    for (dim, heads), grid in (((96, 3), 56), ((384, 12), 14)):
        m = entry.make(dim, heads)
        assert (m.partition, m.partition_size, m.num_heads, m.rel_pos.kind) == (name[7:], (7, 7), heads, "bias_tf")
        with torch.no_grad():
            assert m(torch.randn(1, grid, grid, dim)).shape == (1, grid, grid, dim)
