"""The last refusals of ``nearfar.distributed.attend`` lifted (issue 23), on 2 and 4 gloo processes: ``blocks`` with
``bias``; ``bias``, ``blocks`` and ``score_mod`` with the global queries of ``GlobalTokens``; ``score_mod`` on the
halo, gather, block and overlap paths and inside ``sharded``; Swin's shifted windows on slabs no taller than the
window. Every case equals single-process ``nearfar.attend`` (``dist_extras``: output, LSE, dQ/dK/dV, the bias, the
table and the tensors a score_mod captures), and the bytes each rank moved are the plan's.
"""

from __future__ import annotations

import pytest
import torch
from dist_extras import cases, run_all
from dist_harness import run_ok

import nearfar as nf
import nearfar.distributed as nd


@pytest.fixture(scope="module")
def extras2() -> list[dict]:
    return run_ok(run_all, 2)


@pytest.fixture(scope="module")
def extras4() -> list[dict]:
    return run_ok(run_all, 4)


def _world(world: int, extras2: list[dict], extras4: list[dict]) -> list[dict]:
    return extras2 if world == 2 else extras4


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", sorted(cases(4)))
def test_equals_single_process(world, name, extras2, extras4):
    errors = [f"rank {r}: {e}" for r, res in enumerate(_world(world, extras2, extras4))
              for e in res["cases"][name]["errors"]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("world", [2, 4])
def test_swin_shifted_on_slabs_no_taller_than_the_window(world, extras2, extras4):
    for r, res in enumerate(_world(world, extras2, extras4)):
        assert res["swin"] == [], (r, res["swin"])


@pytest.mark.parametrize("world", [2, 4])
def test_score_mod_inside_sharded_sees_global_indices(world, extras2, extras4):
    for r, res in enumerate(_world(world, extras2, extras4)):
        assert res["sharded_mod"] == [], (r, res["sharded_mod"])


def _size(case) -> int:
    return torch.tensor([], dtype=case.dtype).element_size()


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_are_the_plans(world, extras2, extras4):
    """K/V halo and broadcast bytes are the plan's token counts; the global queries' bias rows move as the plan's
    ``bias_rows`` (pairs of a global query and a key of the receiving rank, per batch item and head of the bias),
    and come back as gradients; a bias without a query axis moves nothing."""
    for name, case in cases(world).items():
        beta = 2 * case.heads[1] * 2 * 8 * _size(case)  # B = 2, d = 8
        moved = 0
        for r, res in enumerate(_world(world, extras2, extras4)):
            res = res["cases"][name]
            (p2p_s, p2p_r), (bc_s, bc_r) = res["traffic"]["p2p"], res["traffic"]["bcast"]
            got = (res["sent"].get("kv.halo.fwd", 0), res["recv"].get("kv.halo.fwd", 0),
                   res["sent"].get("kv.bcast.fwd", 0), res["recv"].get("kv.bcast.fwd", 0))
            assert got == (p2p_s * beta, p2p_r * beta, bc_s * beta, bc_r * beta), (name, r, got)
            sent, recv = res["sent"].get("bias.rows.fwd", 0), res["recv"].get("bias.rows.fwd", 0)
            if case.bias in ("rows", "shared_rows") and res["global_rows"]:
                b, h = res["bias_shape"][:2]
                pairs_s, pairs_r = res["traffic"]["bias_rows"]
                assert (sent, recv) == (pairs_s * b * h * _size(case), pairs_r * b * h * _size(case)), (name, r)
                moved += pairs_s + pairs_r
            elif case.bias != "row_col":
                assert sent == recv == 0, (name, r)
            assert (res["sent"].get("bias.rows.bwd", 0), res["recv"].get("bias.rows.bwd", 0)) == (recv, sent)
        assert moved or case.bias not in ("rows", "shared_rows") or not res["global_rows"], name


def test_global_queries_do_not_fetch_their_selected_blocks():
    """The global queries read every key through partials: the blocks selected for their query block are not
    fetched for them (rank 0 owns queries 0-3, whose block alone selects the last key block, on rank 1)."""
    lay = nd.Layout.contiguous(32, 2)
    num = torch.zeros(1, 1, 8, dtype=torch.long)
    num[..., 0] = 1
    sel = nf.SelectedBlocks(num, torch.full((1, 1, 8, 1), 7), q_block=4)
    plan = nd.make_plan(nf.SlidingWindow(1) | nf.GlobalTokens(4), lay, sel)
    assert plan.global_rows == 4
    assert plan.ranks[0].keys == ((0, 16),)  # its own keys (window, global keys), not keys 28-31
    assert plan.ranks[1].keys == ((0, 4), (15, 32))


def test_rpb_with_blocks_is_refused_as_on_one_process():
    q = torch.randn(1, 2, 12, 4)
    sel = nf.SelectedBlocks(torch.ones(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3, 1, dtype=torch.long),
                            q_block=4)
    with pytest.raises(ValueError, match="does not combine with blocks"):
        nf.attend(q, q, q, nf.Neighborhood(5), blocks=sel, rpb=torch.randn(2, 9))
    with pytest.raises(ValueError, match="does not combine with blocks"):
        nd.attend(q, q, q, nf.Neighborhood(5), layout=nd.Layout.contiguous(12, 1), blocks=sel, rpb=torch.randn(2, 9))
