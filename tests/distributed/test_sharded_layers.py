"""Every registered mechanism inside ``nearfar.distributed.sharded`` equals the one-process module (issue 23): output,
input gradient and parameter gradients (summed over the ranks), float64 to 1e-9, on 2 gloo ranks for all (the cases
come from the registry: a new mechanism is covered without editing this file) and on 4 ranks, uneven shards, for a
handful. Layers whose only cross-token work is ``attend`` run natively; the others (``@whole_sequence``) run on the
all-gathered sequence. One spawned process group per world size runs every case.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ok
from layer_cases import FOUR, N_SEQ, REFUSED, layer_cases, suite_2, suite_4

import nearfar as nf
from nearfar.layers.registry import Mechanism, register
from nearfar.layers.sharding import NATIVE, WHOLE, sharding_of, shards_natively, whole_sequence


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ok(suite_2, 2, timeout_s=240)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ok(suite_4, 4, timeout_s=240)


def _check(results: list[dict], name: str) -> None:
    missing = [r for r, res in enumerate(results) if name not in res["layers"]]
    assert not missing, f"ranks {missing} did not reach {name} (an earlier case broke the group)"
    errors = [f"rank {r}: {e}" for r, res in enumerate(results) for e in res["layers"][name]]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(layer_cases(2)))
def test_every_registered_mechanism_under_sharded_2_ranks(world2, name):
    _check(world2, name)


@pytest.mark.parametrize("name", sorted(FOUR))
def test_uneven_shards_4_ranks(world4, name):
    _check(world4, name)


def test_the_cases_cover_the_registry():
    """Every mechanism has a case (refused ones only with a stated reason), every self pattern of a sequence layer."""
    names = {c.mech for c in layer_cases(2).values()}
    assert names == {m.name for m in nf.mechanisms()}
    assert set(REFUSED) <= names and all(len(why) > 20 for why in REFUSED.values())
    assert set(FOUR) <= set(layer_cases(4))
    kinds = {sharding_of(m.cls) for m in nf.mechanisms()}
    assert {NATIVE, WHOLE} <= kinds and None not in kinds


def test_whole_sequence_layers_give_clear_errors_and_count_their_gather(world2):
    for res in world2:
        bad = res["bad"]
        assert "decoding with caches is not sharded" in bad["cache"]
        assert "each rank passes its own" in bad["tokens"]
        assert "whole rows" in bad["rows"]
        sent, recv = bad["bytes"]
        # MoBA: x (B, 11, 32) float64 from the other rank, and its gradient summed back (an all-reduce of 22 tokens)
        assert recv["whole.gather.fwd"] == B_ * (N_SEQ // 2) * 32 * 8
        assert recv["whole.gather.bwd"] == B_ * N_SEQ * 32 * 8
        assert not any(k.startswith("kv.") for k in recv)  # its attend calls ran locally on the whole sequence


B_ = 2


def test_register_refuses_an_undeclared_layer_and_an_override_that_drops_the_wrapper():
    class Undeclared(torch.nn.Module):
        def forward(self, x):
            return x

    entry = Mechanism("undeclared_layer", "p", "r", "dense", ("1d",), make=lambda d, h: Undeclared(),
                      patterns={"NS": {}}, why_not={"CS": "a", "NC": "b", "CC": "c"}, cls=Undeclared)
    with pytest.raises(ValueError, match="must declare how it runs inside nearfar.distributed.sharded"):
        register(entry)

    @whole_sequence()
    class Pooled(torch.nn.Module):
        def forward(self, x):
            return x.mean(1, keepdim=True).expand_as(x)

    class Override(Pooled):
        def forward(self, x):  # a new forward, not wrapped: it would run on the rank's tokens only
            return x.cumsum(1)

    assert sharding_of(Pooled) == WHOLE and sharding_of(Override) is None
    assert sharding_of(shards_natively(type("Native", (torch.nn.Module,), {}))) == NATIVE
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(Pooled()(x), x.mean(1, keepdim=True).expand_as(x))  # outside sharded: plain
