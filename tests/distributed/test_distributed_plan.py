"""The plan of ``nearfar.distributed`` in one process: layouts, the reach of each pattern against its exact mask,
the key pieces of every rank (each key exactly once), and the offset view against the global mask."""

from __future__ import annotations

import pytest
import torch

import nearfar as nf
import nearfar.distributed as nd
from nearfar.distributed.plan import rs_size, rs_subtract, rs_union
from nearfar.distributed.view import global_view


def _set(ranges) -> set[int]:
    return {i for lo, hi in ranges for i in range(lo, hi)}


def test_layout_sizes_follow_tensor_split():
    assert nd.Layout.contiguous(9, 4).sizes() == [3, 2, 2, 2]  # torch.chunk would give 3 pieces
    assert nd.Layout.contiguous(3, 4).sizes() == [1, 1, 1, 0]
    assert nd.Layout.contiguous(37, 4).sizes() == [len(t) for t in torch.arange(37).tensor_split(4)]
    assert nd.Layout.contiguous(20, 3, align=4).ranges == (((0, 8),), ((8, 16),), ((16, 20),))
    assert nd.Layout.slabs((10, 6), 4).ranges == (((0, 18),), ((18, 36),), ((36, 48),), ((48, 60),))
    ht = nd.Layout.head_tail(37, 2)
    assert ht.ranges == (((0, 10), (28, 37)), ((10, 19), (19, 28)))
    assert ht.positions(0).tolist() == list(range(10)) + list(range(28, 37))


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="world"):
        nd.Layout.contiguous(8, 0)
    with pytest.raises(TypeError, match="n"):
        nd.Layout.contiguous(8.0, 2)
    with pytest.raises(ValueError, match="tile"):
        nd.Layout(((( 0, 4),), ((5, 8),)), 8, 8)
    with pytest.raises(ValueError, match="n_real"):
        nd.Layout.contiguous(8, 2, n_real=9)


def test_shard_round_trip():
    x = torch.randn(2, 3, 37, 4)
    lay = nd.Layout.head_tail(37, 3)
    parts = [nd.shard(x, lay, r) for r in range(3)]
    assert [p.shape[2] for p in parts] == lay.sizes()
    back = torch.empty_like(x)
    for r in range(3):
        back[:, :, lay.positions(r)] = parts[r]
    assert torch.equal(back, x)


PATTERNS = [
    nf.Neighborhood(7), nf.Neighborhood(5, dilation=2), nf.Neighborhood(7, is_causal=True),
    nf.Neighborhood(7, stride=3), nf.SlidingWindow(4, 2), nf.SlidingWindow(6) & nf.Causal(), nf.Causal(),
    nf.Sinks(3), nf.GlobalTokens(2), nf.Blocks(6), nf.Blocks(6, shift=3), nf.Blocks(6, shift=2, wrap=True),
    nf.BlockWindow(4, 1, 1), nf.Grid(6), (nf.SlidingWindow(3) | nf.Sinks(4)) & nf.Causal(),
    nf.Neighborhood(5) | nf.GlobalTokens(3), nf.Strided(5),
    nf.Neighborhood((3, 3), grid=(6, 6)), nf.Neighborhood((5, 3), dilation=(1, 2), grid=(6, 6)),
    nf.Blocks((3, 2), grid=(6, 6), shift=(1, 0)),
]
#: patterns whose reach is exact (not only a superset) when every shard holds at least ``dilation`` rows
EXACT = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 17, 18, 19}


@pytest.mark.parametrize("head_tail", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("which", range(len(PATTERNS)))
def test_reach_covers_the_mask_and_pieces_tile_the_keys(which, world, head_tail):
    p = PATTERNS[which]
    n = 36
    if head_tail:
        lay = nd.Layout.head_tail(n, world)
    elif getattr(p, "grid", None) is not None:  # a 6x6 map: whole rows per rank
        lay = nd.Layout.slabs(p.grid, world)
    else:
        lay = nd.Layout.contiguous(n, world)
    mask = p.mask(n, n)
    plan = nd.make_plan(p, lay)
    for r, rp in enumerate(plan.ranks):
        rows = sorted(_set(rs_union(lay.ranges[r])))
        exact = {int(j) for j in torch.nonzero(mask[rows].any(0)).flatten()} if rows else set()
        keys = _set(rp.keys)
        glob = set(range(plan.global_rows)) & set(rows)
        if not glob:
            assert exact <= keys, (r, exact - keys)
            if which in EXACT and not head_tail:
                assert keys == exact, (r, keys ^ exact)
        # each key once: the pieces tile the key set
        assert sorted(i for lo, hi, _, _ in rp.pieces for i in range(lo, hi)) == sorted(keys)
        own = [(lo, hi) for lo, hi, kind, _ in rp.pieces if kind == "own"]
        assert not rs_subtract(tuple(own), rs_union(lay.ranges[r]))
    # what each rank receives is what the messages carry
    for m in plan.messages:
        assert not rs_subtract(m.ranges, rs_union(lay.ranges[m.src]))
        assert rs_size(m.ranges) > 0


def test_global_queries_go_by_partials_only_when_they_read_far():
    lay = nd.Layout.contiguous(64, 4)
    assert nd.make_plan(nf.SlidingWindow(2) | nf.GlobalTokens(2), lay).global_rows == 2
    assert nd.make_plan((nf.SlidingWindow(2) | nf.GlobalTokens(2)) & nf.Causal(), lay).global_rows == 0


@pytest.mark.parametrize("p", [nf.Neighborhood(5), nf.SlidingWindow(3, 1) & nf.Causal(), nf.Sinks(2) | nf.Causal(),
                               nf.PerHead([nf.SlidingWindow(1), nf.Causal()]),
                               nf.Neighborhood((3, 3), grid=(6, 6))])
def test_view_is_the_global_mask(p):
    n = 36
    q_ranges, k_ranges = ((12, 20),), ((3, 6), (10, 24))
    view = global_view(p, q_ranges, k_ranges, n)
    qi, ki = sorted(_set(q_ranges)), [j for lo, hi in k_ranges for j in range(lo, hi)]
    full = p.mask(n, n)
    want = full[..., qi, :][..., ki]
    assert torch.equal(view.mask(len(qi), len(ki)), want)
    # and attend through the view equals the global call restricted to those rows and keys
    q, k, v = torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)
    out = nf.attend(q[:, :, qi], k[:, :, ki], v[:, :, ki], view, engine="blocksparse")
    want_out = nf.attend(q[:, :, qi], k[:, :, ki], v[:, :, ki], bias=torch.where(want, 0.0, -torch.inf),
                         engine="dense")
    torch.testing.assert_close(out, torch.nan_to_num(want_out, nan=0.0))


def test_attend_rejects_bad_arguments():
    lay = nd.Layout.contiguous(8, 1)
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="layout"):
        nd.attend(q, q, q, layout="contiguous")
    with pytest.raises(ValueError, match="method"):
        nd.attend(q, q, q, layout=lay, method="alltoall")


def test_scaling_model_reads_the_plan():
    """``benchmarks/distributed_scaling.py``: halo tokens from the plan equal the closed form, and the model's
    efficiency stays at most 1 and below a ring's communication."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed_scaling.py"
    spec = importlib.util.spec_from_file_location("distributed_scaling", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._traffic("na1d", 1 << 16, 8) == (512, 2, 1 << 13)          # (k - 1) tokens from two neighbours
    assert mod._traffic("na2d", 256, 8) == (12 * 256, 2, 32 * 256)       # (k0 - 1) rows of 256 tokens
    fit = {"fwd": (1e-3, 1e-9), "fwd+bwd": (3e-3, 3e-9)}
    rows = mod.model_rows("na1d", [1 << 16], fit)
    assert [r["ranks"] for r in rows] == list(mod.RANKS)
    for r in rows:
        assert 0 < r["eff@25"] <= 1 + 1e-12 and r["halo_s@25"] <= r["ring_s@25"]


def test_interior_queries_read_only_own_keys():
    """``RankPlan.interior``: NA(7) on 4 contiguous shards of 16: a middle rank's queries 19..28 read keys 16..31
    only; an edge rank's queries reach its map border; a window's on head-tail chunks lie in each chunk."""
    plan = nd.make_plan(nf.Neighborhood(7), nd.Layout.contiguous(64, 4))
    assert plan.ranks[1].interior == ((19, 29),)
    assert plan.ranks[0].interior == ((0, 13),)
    lay = nd.Layout.head_tail(80, 4)
    plan = nd.make_plan(nf.SlidingWindow(3) & nf.Causal(), lay)
    for r in range(4):
        for lo, hi in plan.ranks[r].interior:
            assert not rs_subtract(nd.reach(nf.SlidingWindow(3) & nf.Causal(), ((lo, hi),), 80), lay.ranges[r])
        exact = 17 if r in (0, 3) else 14  # chunks of 10 but their first 3 rows (rank 0's first chunk, rank 3's pair)
        assert exact - 2 <= rs_size(plan.ranks[r].interior) <= exact  # found in chunks of 1 or 2 rows
    assert nd.make_plan(nf.Sinks(2) | nf.SlidingWindow(1), nd.Layout.contiguous(64, 4)).ranks[2].interior == ()


def test_selected_blocks_add_their_keys_to_the_plan():
    """Each rank fetches the selected key blocks of its query blocks (any item, head), cut by ``within``'s reach;
    -1 entries and entries past the count add nothing."""
    lay = nd.Layout.contiguous(32, 4)  # ranks hold 8 tokens; query blocks of 4, key blocks of 2
    num = torch.tensor([[[1, 0, 2, 0, 0, 0, 1, 1]], [[0, 0, 0, 0, 0, 0, 0, 1]]])
    idx = torch.full((2, 1, 8, 3), -1)
    idx[0, 0, 0, 0] = 15          # query block 0 (rank 0) reads keys 30, 31
    idx[0, 0, 2, :3] = torch.tensor([1, -1, 9])  # block 2 (rank 1): keys 2, 3 (the count is 2: 9 is junk)
    idx[0, 0, 6, 0] = 0           # block 6 (rank 3): keys 0, 1
    idx[1, 0, 7, 0] = 3           # block 7, item 1 (rank 3): keys 6, 7
    sel = nf.SelectedBlocks(num, idx, q_block=4, kv_block=2)
    assert nd.plan.selected_keys(sel, lay) == (((30, 32),), ((2, 4),), (), ((0, 2), (6, 8)))
    causal = nf.SelectedBlocks(num, idx, q_block=4, kv_block=2, within=nf.Causal())
    assert nd.plan.selected_keys(causal, lay)[0] == ()  # key 30 is after every query of rank 0
    plan = nd.make_plan(nf.SlidingWindow(1), lay, sel)
    assert plan.ranks[3].keys == ((0, 2), (6, 8), (23, 32))
    assert nd.make_plan(None, lay, sel).ranks[2].keys == ()  # no static pairs with blocks
