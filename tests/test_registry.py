"""The mechanism registry: complete metadata, a working ``make`` for every entry, and the benchmark shapes."""

from __future__ import annotations

import pytest
import torch

import nearfar
from nearfar.modules.registry import FAMILIES, Mechanism, register

MECHANISMS = nearfar.mechanisms()


def test_registry_lists_every_vision_mechanism_of_issue_3():
    names = {m.name for m in MECHANISMS}
    assert {"neighborhood", "swin", "swin_shifted", "maxvit_block", "maxvit_grid", "msw_msa", "craft_srwa",
            "msa_conv", "hilo", "gcvit_local", "gcvit_global", "agent", "proxy_tokens", "super_token",
            "uniformer_local", "uniformer_global", "shvit", "maformer", "dualtoken"} <= names


@pytest.mark.parametrize("mech", MECHANISMS, ids=[m.name for m in MECHANISMS])
def test_entry_metadata_and_constructor(mech: Mechanism):
    assert mech.paper and mech.repo and mech.family in FAMILIES and mech.dims
    assert isinstance(mech.causal, bool) and isinstance(mech.cross, bool)
    module = mech.make(32, 2)
    assert isinstance(module, torch.nn.Module) and isinstance(module, mech.cls)
    assert module.__class__.__doc__ and module.__module__.startswith("nearfar.modules.")
    doc = __import__(module.__module__, fromlist=["_"]).__doc__
    assert doc and "differ" in doc.lower(), "the file docstring must say what differs from the official code"


@pytest.mark.parametrize("mech", [m for m in MECHANISMS if "2d" in m.dims], ids=lambda m: m.name)
def test_make_runs_on_a_small_odd_or_even_map(mech: Mechanism):
    torch.manual_seed(0)
    module = mech.make(32, 2).eval()
    x = torch.randn(1, 14, 14, 32)
    with torch.no_grad():
        y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    assert y.shape[0] == 1 and torch.isfinite(y).all()


def test_register_rejects_duplicates_and_unknown_families():
    mech = MECHANISMS[0]
    with pytest.raises(ValueError, match="registered already"):
        register(mech)
    with pytest.raises(ValueError, match="family"):
        register(Mechanism("x", "p", "r", "nonsense", ("2d",), False, False, make=lambda d, h: None))
    assert nearfar.mechanisms("window") and all(m.family == "window" for m in nearfar.mechanisms("window"))
