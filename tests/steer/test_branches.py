"""``nearfar.steer.branches``: batched and per-branch runs give the outputs of separate calls, outputs of every
structure are split back; ``combine_logits`` equals the contrastive and additive formulas with the plausibility
cut written on probabilities; bad arguments."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nearfar as nf
from nearfar.steer import Capture, combine_logits, control, run_branches


def counting(calls):
    def forward(model, x):
        calls.append(tuple(x.shape))
        return model(x)
    return forward


def test_run_branches_batched_and_separate_equal_separate_calls():
    torch.manual_seed(0)
    lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense").eval()
    same = {"image": torch.randint(0, 64, (2, 7)), "noised": torch.randint(0, 64, (1, 7)),
            "text": torch.randint(0, 64, (3, 7))}
    calls: list = []
    with torch.no_grad():
        out = run_branches(lm, same, forward=counting(calls))
        assert calls == [(6, 7)] and list(out) == ["image", "noised", "text"]  # one batched forward
        for name, x in same.items():
            torch.testing.assert_close(out[name], lm(x), atol=1e-5, rtol=1e-5)
        calls.clear()
        other = {"long": torch.randint(0, 64, (1, 9)), "short": torch.randint(0, 64, (2, 5))}
        out = run_branches(lm, other, forward=counting(calls))
        assert calls == [(1, 9), (2, 5)]  # shapes differ: one forward per branch
        for name, x in other.items():
            torch.testing.assert_close(out[name], lm(x))
        single = run_branches(lm, {"only": same["image"]})
        torch.testing.assert_close(single["only"], lm(same["image"]))


def test_run_branches_is_one_step_under_control():
    lm = nf.TinyLM(64, dim=32, depth=1, num_heads=2, mechanism="dense").eval()
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), control(lm, [(None, Capture(("lse",)))]) as run:
        run_branches(lm, {"a": x, "b": x.flip(1)})
    assert run.step == 1 and run.records["blocks.0.attn"][0]["lse"].shape[0] == 2


class Pair(NamedTuple):
    logits: torch.Tensor
    extra: dict


def test_run_branches_splits_structured_outputs():
    def forward(model, x):
        y = model(x)
        return y, [y.sum(-1), None], {"first": y[:, 0]}, Pair(y * 2, {"n": y[:, :1]})

    model = torch.nn.Linear(4, 3)
    inputs = {"a": torch.randn(2, 5, 4), "b": torch.randn(1, 5, 4)}
    with torch.no_grad():
        out = run_branches(model, inputs, forward=forward)
        for name, x in inputs.items():
            y = model(x)
            got = out[name]
            torch.testing.assert_close(got[0], y)
            torch.testing.assert_close(got[1][0], y.sum(-1))
            assert isinstance(got[1], list) and got[1][1] is None
            torch.testing.assert_close(got[2]["first"], y[:, 0])
            assert isinstance(got[3], Pair)
            torch.testing.assert_close(got[3].logits, y * 2)
            torch.testing.assert_close(got[3].extra["n"], y[:, :1])
    mixed = {"a": torch.randn(1, 4), "b": torch.randn(1, 4, dtype=torch.float64)}
    calls: list = []
    run_branches(torch.nn.Identity(), mixed, forward=counting(calls))
    assert len(calls) == 2  # dtypes differ: not batched


def test_run_branches_errors():
    model = torch.nn.Identity()
    x = torch.randn(1, 3)
    with pytest.raises(TypeError, match="inputs must be a dict"):
        run_branches(model, [x, x])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one branch"):
        run_branches(model, {})
    with pytest.raises(TypeError, match=r"inputs\['a'\] must be a tensor"):
        run_branches(model, {"a": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"inputs\['a'\] must have a non-empty batch"):
        run_branches(model, {"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="not a batch of 2 first"):
        run_branches(model, {"a": x, "b": x}, forward=lambda m, y: y.sum())
    with pytest.raises(ValueError, match=r"output\[1\] has shape \(3,\)"):
        run_branches(model, {"a": x, "b": x}, forward=lambda m, y: (y, y[0]))
    with pytest.raises(TypeError, match="cannot split the forward's output of type str"):
        run_branches(model, {"a": x, "b": x}, forward=lambda m, y: "text")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), alpha=st.floats(0.0, 3.0), beta=st.floats(0.0, 1.0),
       mode=st.sampled_from(["contrastive", "additive"]))
def test_combine_logits_formulas_and_plausibility_cut(seed, alpha, beta, mode):
    g = torch.Generator().manual_seed(seed)
    main, aux = torch.randn(3, 2, 17, generator=g) * 3, torch.randn(3, 2, 17, generator=g) * 3
    out = combine_logits(main, aux, alpha=alpha, plausibility_beta=beta, mode=mode)
    m, a = main.double(), aux.double()
    combined = (1 + alpha) * m - alpha * a if mode == "contrastive" else m + alpha * a
    p = torch.softmax(m, -1)
    keep = p >= beta * p.amax(-1, keepdim=True)
    assert keep.any(-1).all()  # the most likely token always stays
    margin = (p - beta * p.amax(-1, keepdim=True)).abs() > 1e-6  # away from the threshold, float32 decides alike
    assert torch.equal(torch.isinf(out)[margin], ~keep[margin])
    torch.testing.assert_close(out.double()[keep & margin], combined[keep & margin], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(out[torch.isinf(out)]).all()


def test_combine_logits_edges():
    main = torch.tensor([[1.0, 3.0, 3.0, -2.0]])
    aux = torch.tensor([[0.5, 1.0, -1.0, 0.0]])
    torch.testing.assert_close(combine_logits(main, aux, plausibility_beta=None), 2 * main - aux)
    torch.testing.assert_close(combine_logits(main, aux, plausibility_beta=0.0), 2 * main - aux)
    torch.testing.assert_close(combine_logits(main, aux, alpha=0.5, mode="additive", plausibility_beta=None),
                               main + 0.5 * aux)
    top = combine_logits(main, aux, plausibility_beta=1.0)  # only the tokens tied with the most likely
    assert torch.isinf(top).tolist() == [[True, False, False, True]]
    # beta just below p0 / p_max = e^-2: token 0 kept, token 3 (e^-5) cut
    cut = combine_logits(main, aux, plausibility_beta=math.exp(-2.0) * (1 - 1e-6))
    assert torch.isinf(cut).tolist() == [[False, False, False, True]]
    half = combine_logits(main.half(), aux, plausibility_beta=None)
    assert half.dtype == torch.float32


def test_combine_logits_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0.0, inf\)"):
        combine_logits(x, x, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        combine_logits(x, x, alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha must be"):
        combine_logits(x, x, alpha="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"plausibility_beta must be a number in \[0.0, 1.0\]"):
        combine_logits(x, x, plausibility_beta=1.5)
    with pytest.raises(ValueError, match="mode must be"):
        combine_logits(x, x, mode="subtract")
    with pytest.raises(ValueError, match="main and aux must have one shape"):
        combine_logits(x, x[:, :4])
    with pytest.raises(TypeError, match="main must be a floating tensor"):
        combine_logits(torch.ones(2, 5, dtype=torch.long), x)
    with pytest.raises(TypeError, match="aux must be a floating tensor"):
        combine_logits(x, x.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="main must have a vocabulary dimension"):
        combine_logits(torch.tensor(1.0), torch.tensor(1.0))
