"""The mechanism registry: complete metadata, a working ``make`` for every entry, and every CAB pattern an entry
claims (checked on its outputs: causal patterns ignore later queries, cross patterns read the context, non-causal
self patterns see later tokens), with the reason given for every pattern it does not claim."""

from __future__ import annotations

import re

import pytest
import torch
from module_checks import SEQ_CASES, SMALL

import nearfar
from nearfar.layers.registry import CAB_PATTERNS, FAMILIES, Mechanism, register

MECHANISMS = nearfar.mechanisms()


def test_registry_lists_every_vision_mechanism_of_issue_3():
    names = {m.name for m in MECHANISMS}
    assert {"neighborhood", "swin", "swin_shifted", "maxvit_block", "maxvit_grid", "msw_msa", "craft_srwa",
            "msa_conv", "hilo", "gcvit_local", "gcvit_global", "agent", "proxy_tokens", "super_token",
            "uniformer_local", "uniformer_global", "shvit", "maformer", "dualtoken"} <= names


def test_registry_lists_every_sequence_mechanism_of_issue_4():
    names = {m.name for m in MECHANISMS}
    assert {"streaming_llm", "longformer", "bigbird", "s2_attention", "moa", "cca", "lightning", "linear_attention",
            "titans_mac", "dense", "block_transformer", "fit_ar"} <= names
    assert {m.name for m in nearfar.mechanisms(kind="model")} == {"block_transformer", "fit_ar"}
    assert {m.name for m in nearfar.mechanisms(pattern="CC")} == {"dense", "kdgqa", "linear_attention", "moh"}


@pytest.mark.parametrize("mech", MECHANISMS, ids=[m.name for m in MECHANISMS])
def test_entry_metadata_and_constructor(mech: Mechanism):
    assert mech.paper and mech.repo and mech.family in FAMILIES and mech.dims
    assert set(mech.patterns) | set(mech.why_not) == set(CAB_PATTERNS)
    assert mech.causal == bool({"CS", "CC"} & set(mech.patterns))
    assert all(len(why) > 20 for why in mech.why_not.values())
    module = mech.make(32, 2)
    assert isinstance(module, torch.nn.Module) and isinstance(module, mech.cls)
    assert module.__class__.__doc__
    assert module.__module__.startswith("nearfar.layers." if mech.kind == "layer" else "nearfar.models.")
    for pattern in mech.why_not:
        with pytest.raises(ValueError, match=f"does not support {pattern}"):
            mech.build(32, 2, pattern)
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
        register(Mechanism("x", "p", "r", "nonsense", ("2d",), make=lambda d, h: None, patterns={"NS": {}},
                           why_not={"CS": "a", "NC": "b", "CC": "c"}))
    with pytest.raises(ValueError, match="split"):
        register(Mechanism("x", "p", "r", "dense", ("2d",), make=lambda d, h: None, patterns={"NS": {}},
                           why_not={"CS": "a"}))
    with pytest.raises(ValueError, match="pattern must be one of"):
        mech.build(32, 2, "causal")


# ------------------------------------------------------------------------- every claimed CAB pattern, on outputs


@pytest.mark.parametrize("mech,pattern", SEQ_CASES, ids=[f"{m.name}-{p}" for m, p in SEQ_CASES])
def test_every_claimed_cab_pattern_holds(mech: Mechanism, pattern: str):
    torch.manual_seed(0)
    layer = mech.build(32, 2, pattern, **SMALL.get(mech.name, {})).double()
    x, ctx, t = torch.randn(2, 24, 32, dtype=torch.float64), torch.randn(2, 17, 32, dtype=torch.float64), 11
    cross = pattern in ("NC", "CC")

    def run(xx, cc=ctx):
        return layer(xx, context=cc) if cross else layer(xx)

    out = run(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    later = x.clone()
    later[:, t:] += torch.randn_like(later[:, t:])
    moved = run(later)
    if pattern in ("CS", "CC", "NC"):  # causal: later queries change no earlier output (NC: queries independent)
        assert torch.allclose(moved[:, :t], out[:, :t], atol=1e-12)
    else:  # a non-causal layer sees later tokens
        assert not torch.allclose(moved[:, :t], out[:, :t], atol=1e-6)
    if cross:  # every output reads the context, of any length
        assert not torch.allclose(run(x, ctx + 1)[:, :1], out[:, :1], atol=1e-6)
        assert run(x, ctx[:, :5]).shape == x.shape
    if pattern in ("CS", "CC") and hasattr(layer, "new_cache"):  # decoding one chunk at a time equals the forward
        cache, outs, i = layer.new_cache(2, dtype=torch.float64), [], 0
        with torch.no_grad():
            for c in (5, 1, 1, 9, 8):
                outs.append(layer(x[:, i:i + c], context=ctx, cache=cache) if cross else layer(x[:, i:i + c],
                                                                                                cache=cache))
                i += c
        assert torch.allclose(torch.cat(outs, 1), out, atol=1e-10)
    assert nearfar.mechanisms("window") and all(m.family == "window" for m in nearfar.mechanisms("window"))


LAYERS = [m for m in MECHANISMS if m.kind == "layer"]
#: attention *gates*: they return ``x`` times content-dependent weights (PSA: per-channel and per-pixel sigmoid
#: gates; ELA: per-channel row and column gates), and their papers insert them in place (``y = gate(x)``), not as a
#: residual branch, so their output is ``x`` rescaled, not an update uncorrelated with ``x``
GATES = {"ela", "psa_parallel", "psa_sequential"}
#: whole *blocks* with their own residual branches: LaMamba's block is what its paper defines (SS2D, then window
#: attention on the updated map, then an MLP, each ``x + branch(norm(x))``), so its output contains ``x``; its
#: update ``y - x`` (the sum of the three branches) is what must be uncorrelated with ``x``
BLOCKS = {"lamamba"}


@pytest.mark.parametrize("mech", LAYERS, ids=[m.name for m in LAYERS])
def test_a_layer_returns_its_update_not_the_input_plus_it(mech: Mechanism):
    """Every layer is a token mixer whose caller adds the residual (``x + layer(norm(x))``); a layer that adds its
    input itself puts it in the residual stream twice (PT-DiT proxy tokens did, cos 0.99 here; every other layer
    is at |cos| <= 0.03 with its random init)."""
    torch.manual_seed(0)
    pattern = next(iter(mech.patterns))
    if "2d" in mech.dims:
        layer, x = mech.build(32, 2, pattern), torch.randn(2, 14, 14, 32)
    else:
        layer, x = mech.build(32, 2, pattern, **SMALL.get(mech.name, {})), torch.randn(2, 24, 32)
    with torch.no_grad():
        y = layer.eval()(x)
    if mech.name in GATES:  # x times gates in (0, 1) (PSA parallel: a sum of two, in (0, 2)), not x itself
        ratio = y / x
        assert ((ratio > 0) & (ratio < 2)).all() and not torch.allclose(y, x)
        return
    if mech.name in BLOCKS:
        assert torch.nn.functional.cosine_similarity(y.flatten(), x.flatten(), dim=0) > 0.3
        y = y - x
    assert abs(torch.nn.functional.cosine_similarity(y.flatten(), x.flatten(), dim=0)) < 0.3


@pytest.mark.parametrize("arg,allowed", [("family", "'local+global'"), ("kind", "'model'"), ("pattern", "'CC'")])
def test_an_unknown_filter_value_is_an_error_naming_the_allowed_ones(arg, allowed):
    with pytest.raises(ValueError, match=f"{arg} must be None or one of .*{re.escape(allowed)}.*got 'nope'"):
        nearfar.mechanisms(**{arg: "nope"})
