"""Head weights, rollout and attention flow (``nearfar.steer.aggregate``) against float64 plain-loop references:
VL-SAM's mean-max head weight (Lin et al., NeurIPS 2024), Abnar & Zuidema's rollout and max-flow (ACL 2020), and
the oracles: identity maps roll out to the identity; the raw flow is never below the rollout (the rollout is a
feasible flow) and equals hand-computed values on tiny graphs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nearfar.functional import attention_rollout
from nearfar.steer import attention_flow, head_weights, rollout

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None)


def _maps(*shape: int, seed: int = 0, dtype=torch.float32, causal: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(*shape, generator=g, dtype=F64)
    if causal:
        n = shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return s.softmax(-1).to(dtype)


# ------------------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------------------

def row_value_ref(row: list[float], rule: str, group: set[int]) -> float:
    if rule == "mean_max":
        return max(row)
    if rule == "entropy":
        return math.exp(sum(p * math.log(p) for p in row if p > 0))
    return sum(p for j, p in enumerate(row) if j in group)


def head_weights_ref(maps: torch.Tensor, rule: str, group: set[int], rows: list[int] | None, normalize: bool
                     ) -> torch.Tensor:
    """maps (B, H, Nq, Nk) -> (B, H): per head, the mean over the chosen rows of the per-row value."""
    b, h, nq, _ = maps.shape
    out = torch.zeros(b, h, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            chosen = range(nq) if rows is None else rows
            vals = [row_value_ref(maps[bi, hi, i].double().tolist(), rule, group) for i in chosen]
            out[bi, hi] = sum(vals) / len(vals)
        if normalize:
            total = float(out[bi].sum())
            out[bi] = out[bi] / total if total > 0 else torch.full((h,), 1.0 / h, dtype=F64)
    return out


def rollout_ref(maps: torch.Tensor, residual: float, weights: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """maps (L, B, H, N, N), weights (L, B, H) or None -> the full (B, N, N) rollout, with loops per entry."""
    layers, b, h, n, _ = maps.shape
    m = maps.double()
    out = torch.zeros(b, n, n, dtype=F64)
    for bi in range(b):
        mixed = []
        for layer in range(layers):
            w = [1.0 / h] * h if weights is None else weights[layer, bi].double().tolist()
            if weights is not None:
                total = sum(w)
                w = [x / total for x in w] if total > 0 else [1.0 / h] * h
            s = torch.zeros(n, n, dtype=F64)
            for i in range(n):
                for j in range(n):
                    v = sum(w[hi] * float(m[layer, bi, hi, i, j]) for hi in range(h))
                    if causal:
                        v *= j / n
                    s[i, j] = (1 - residual) * v + (residual if i == j else 0.0)
                s[i] = s[i] / s[i].sum()
            mixed.append(s)
        prod = mixed[-1]
        for s in reversed(mixed[:-1]):
            prod = prod @ s
        out[bi] = prod
    return out


def max_flow_ref(cap: list[list[float]], s: int, t: int) -> float:
    """Edmonds-Karp on a dense capacity matrix (shortest augmenting paths by BFS)."""
    n = len(cap)
    res = [row[:] for row in cap]
    flow = 0.0
    while True:
        parent = [-1] * n
        parent[s] = s
        queue = [s]
        for u in queue:
            for v in range(n):
                if parent[v] < 0 and res[u][v] > 1e-15:
                    parent[v] = u
                    queue.append(v)
        if parent[t] < 0:
            return flow
        path, v = [], t
        while v != s:
            path.append((parent[v], v))
            v = parent[v]
        f = min(res[u][v] for u, v in path)
        for u, v in path:
            res[u][v] -= f
            res[v][u] += f
        flow += f


def flow_ref(mixed: torch.Tensor) -> torch.Tensor:
    """mixed (L, N, N) per-layer capacities -> raw flows (N, N) from top-layer token i to input token j."""
    layers, n, _ = mixed.shape
    size = (layers + 1) * n
    cap = [[0.0] * size for _ in range(size)]
    for layer in range(1, layers + 1):
        for a in range(n):
            for c in range(n):
                cap[layer * n + a][(layer - 1) * n + c] = float(mixed[layer - 1, a, c])
    return torch.tensor([[max_flow_ref(cap, layers * n + i, j) for j in range(n)] for i in range(n)], dtype=F64)


def mixed_ref(maps: torch.Tensor, residual: float) -> torch.Tensor:
    """Per layer of (L, 1, H, N, N): the head mean mixed with the identity, rows normalised -> (L, N, N)."""
    out = []
    for layer in maps.double():
        s = (1 - residual) * layer[0].mean(0) + residual * torch.eye(layer.shape[-1], dtype=F64)
        out.append(s / s.sum(-1, keepdim=True))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------------------
# head weights
# ------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(b=st.integers(1, 3), h=st.integers(1, 4), nq=st.integers(1, 6), nk=st.integers(1, 7),
       rule=st.sampled_from(["mean_max", "entropy", "group_mass"]), use_rows=st.booleans(),
       normalize=st.booleans(), seed=st.integers(0, 100))
def test_head_weights_match_reference(b, h, nq, nk, rule, use_rows, normalize, seed):
    maps = _maps(b, h, nq, nk, seed=seed)
    group = list(range(0, nk, 2))
    rows = list(range(nq - 1, -1, -2)) if use_rows else None
    got = head_weights(maps, rule, group=group, rows=rows, normalize=normalize)
    want = head_weights_ref(maps, rule, set(group), rows, normalize)
    assert got.dtype == torch.float32 and got.shape == (b, h)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_head_weights_from_row_stats_equal_the_maps_path():
    maps = _maps(2, 3, 5, 6, seed=1, dtype=F64)
    group = torch.tensor([True, False, True, True, False, False])
    rows = torch.tensor([[True, False, True, True, False], [False, False, False, True, True]])  # per batch item
    stats = {"mean_max": maps.amax(-1),
             "entropy": -(maps * maps.log()).sum(-1),
             "group_mass": maps[..., group].sum(-1)}
    for rule, stat in stats.items():
        want = head_weights(maps, rule, group=group, rows=rows)
        got = head_weights(stat, rule, rows=rows, row_stats=True)
        torch.testing.assert_close(got, want)
    # per-batch-item rows: item 1 averages rows 3 and 4 only
    w = head_weights(maps, "mean_max", rows=rows, normalize=False)
    torch.testing.assert_close(w[1], maps[1, :, 3:5].amax(-1).mean(-1))


def test_head_weights_leading_axes_and_peakedness_order():
    maps = _maps(3, 2, 4, 5, 6, seed=2)  # (L, B, H, Nq, Nk)
    w = head_weights(maps, normalize=False)
    assert w.shape == (3, 2, 4)
    ent = head_weights(maps, "entropy", normalize=False)
    assert bool((ent <= w + 1e-6).all()), "exp(-H) never exceeds the row max"
    peaked = torch.eye(4).expand(1, 1, 4, 4)
    flat = torch.full((1, 1, 4, 4), 0.25)
    both = torch.cat([peaked, flat], 1)
    torch.testing.assert_close(head_weights(both), torch.tensor([[0.8, 0.2]]))  # 1 vs 1/4, normalised
    torch.testing.assert_close(head_weights(both, "entropy"), torch.tensor([[0.8, 0.2]]))  # exp(-0), exp(-log 4)


def test_head_weights_tensor_rule_and_zero_total():
    maps = _maps(2, 3, 4, 4)
    got = head_weights(maps, torch.tensor([1.0, 3.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.75, 0.0]] * 2))
    # a group nobody attends to: weights fall back to uniform instead of 0/0
    zero = torch.zeros(1, 2, 3, 4)
    zero[..., 0] = 1.0
    assert head_weights(zero, "group_mass", group=[3]).tolist() == [[0.5, 0.5]]


def test_head_weights_gradients_match_finite_differences():
    maps = _maps(1, 2, 3, 4, seed=3, dtype=F64).requires_grad_()
    for rule in ("mean_max", "entropy", "group_mass"):
        assert torch.autograd.gradcheck(lambda m, r=rule: head_weights(m, r, group=[1, 2]), (maps,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_weights_low_precision(dtype):
    maps = _maps(2, 3, 4, 5, seed=4)
    got = head_weights(maps.to(dtype), "entropy")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), head_weights(maps, "entropy"), rtol=2e-2, atol=1e-2)


def test_head_weights_bad_arguments():
    maps = _maps(1, 2, 3, 3)
    with pytest.raises(ValueError, match="rule must be one of"):
        head_weights(maps, "max_mean")
    with pytest.raises(ValueError, match="needs group"):
        head_weights(maps, "group_mass")
    with pytest.raises(ValueError, match=r"rows\[0\] must be in \[0, 2\]"):
        head_weights(maps, rows=[3])
    with pytest.raises(ValueError, match="at least one query row"):
        head_weights(maps, rows=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="finite and >= 0"):
        head_weights(maps, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"broadcast to \(1, 1\)"):
        head_weights(_maps(1, 1, 3, 3), torch.ones(2))
    with pytest.raises(TypeError, match="maps_or_stats must be a floating tensor"):
        head_weights(torch.ones(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, Nq, Nk\) maps"):
        head_weights(torch.ones(3, 3))
    with pytest.raises(TypeError, match="row_stats must be a bool"):
        head_weights(maps, row_stats=1)


# ------------------------------------------------------------------------------------------------------------
# rollout
# ------------------------------------------------------------------------------------------------------------

@SETTINGS
@given(layers=st.integers(1, 3), b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 6),
       residual=st.sampled_from([0.0, 0.3, 0.5, 1.0]), weights=st.sampled_from([None, "mean_max", "entropy", "t"]),
       causal=st.booleans(), rows=st.sampled_from([None, "int", "list"]), seed=st.integers(0, 50))
def test_rollout_matches_reference(layers, b, h, n, residual, weights, causal, rows, seed):
    if causal and residual == 0:
        residual = 0.5
    maps = _maps(layers, b, h, n, n, seed=seed, causal=causal)
    if weights == "t":
        w_arg = torch.rand(layers, b, h, generator=torch.Generator().manual_seed(seed)) + 0.1
        w_ref = w_arg
    elif weights is None:
        w_arg = w_ref = None
    else:
        w_arg = weights
        w_ref = torch.stack([head_weights_ref(m, weights, set(), None, True) for m in maps.double()])
    r_arg = None if rows is None else (n - 1 if rows == "int" else [n - 1, 0])
    got = rollout(maps, residual, w_arg, r_arg, causal)
    want = rollout_ref(maps, residual, w_ref, causal)
    if rows == "int":
        want = want[:, n - 1]
    elif rows == "list":
        want = want[:, [n - 1, 0]]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_rollout_of_identity_maps_is_the_identity():
    eye = torch.eye(7).expand(3, 2, 4, 7, 7)
    for weights in (None, "mean_max", "entropy", torch.rand(3, 2, 4)):
        for residual in (0.0, 0.5, 1.0):
            assert torch.equal(rollout(eye, residual, weights), torch.eye(7).expand(2, 7, 7))
    assert torch.equal(rollout(eye, rows=[6, 2]), torch.eye(7)[[6, 2]].expand(2, 2, 7))


def test_rollout_extends_attention_rollout():
    maps = _maps(4, 2, 3, 9, 9, seed=5)
    torch.testing.assert_close(rollout(maps), attention_rollout(maps))
    torch.testing.assert_close(rollout(list(maps), rows=3), attention_rollout(maps, row=3))
    # the sequence form of ``row`` added to attention_rollout
    torch.testing.assert_close(attention_rollout(maps, row=[3, 0, 3]), attention_rollout(maps)[:, [3, 0, 3]])


def test_causal_correction_removes_the_first_token_bias():
    maps = _maps(6, 1, 2, 12, 12, seed=6, causal=True)
    plain = rollout(maps, rows=11)
    fixed = rollout(maps, rows=11, causal_correction=True)
    assert plain[0, 0] > plain[0, 1:].max()  # causal rollout piles mass on token 0
    assert fixed[0, 0] < plain[0, 0]
    torch.testing.assert_close(fixed.sum(-1), torch.ones(1))


def test_rollout_gradients_match_finite_differences():
    maps = _maps(2, 1, 2, 4, 4, seed=7, dtype=F64).requires_grad_()
    w = torch.rand(2, 1, 2, dtype=F64).add(0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, ww: rollout(m, 0.4, ww, [3, 1], True), (maps, w))
    assert torch.autograd.gradcheck(lambda m: rollout(m, 0.5, "mean_max"), (maps,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rollout_low_precision(dtype):
    maps = _maps(3, 2, 2, 6, 6, seed=8)
    got = rollout(maps.to(dtype), head_weights="mean_max", rows=[0, 5])
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), rollout(maps, head_weights="mean_max", rows=[0, 5]), rtol=3e-2,
                               atol=1e-2)


def test_rollout_bad_arguments():
    maps = _maps(2, 1, 2, 4, 4)
    with pytest.raises(ValueError, match="needs a group"):
        rollout(maps, head_weights="group_mass")
    with pytest.raises(ValueError, match=r"must broadcast to \(2, 1, 2\)"):
        rollout(maps, head_weights=torch.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        rollout(maps, head_weights=torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="causal_correction needs residual > 0"):
        rollout(maps, 0.0, causal_correction=True)
    with pytest.raises(ValueError, match=r"rows\[1\] must be in \[0, 3\]"):
        rollout(maps, rows=[0, 4])
    with pytest.raises(ValueError, match=r"residual must be a number in \[0.0, 1.0\]"):
        rollout(maps, 1.5)
    with pytest.raises(TypeError, match="head_weights must be None, a rule name or a tensor"):
        rollout(maps, head_weights=3)
    with pytest.raises(ValueError, match="head_weights must be one of"):
        rollout(maps, head_weights="max")


# ------------------------------------------------------------------------------------------------------------
# attention flow
# ------------------------------------------------------------------------------------------------------------

def test_flow_on_a_hand_computed_graph():
    a1 = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    a2 = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    maps = torch.stack([a1, a2]).view(2, 1, 1, 2, 2)
    # from output i to input j through the middle tokens k: sum_k min(a2[i, k], a1[k, j])
    raw = attention_flow(maps, residual=0.0, normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[[0.6, 0.6], [0.5, 1.0]]]))
    roll = rollout(maps, residual=0.0)
    torch.testing.assert_close(roll, torch.tensor([[[0.47, 0.53], [0.29, 0.71]]]))
    assert bool((raw >= roll).all())
    torch.testing.assert_close(attention_flow(maps, residual=0.0), raw / raw.sum(-1, keepdim=True))


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), b=st.integers(1, 2), h=st.integers(1, 2), n=st.integers(1, 4),
       residual=st.sampled_from([0.0, 0.5]), causal=st.booleans(), seed=st.integers(0, 50))
def test_flow_matches_edmonds_karp_and_bounds(layers, b, h, n, residual, causal, seed):
    maps = _maps(layers, b, h, n, n, seed=seed, causal=causal)
    raw = attention_flow(maps, residual, normalize=False)
    roll = rollout(maps, residual)
    for bi in range(b):
        mixed = mixed_ref(maps[:, bi:bi + 1], residual)
        want = flow_ref(mixed)
        torch.testing.assert_close(raw[bi].double(), want, rtol=1e-5, atol=1e-6)
        if layers == 1:
            torch.testing.assert_close(raw[bi].double(), mixed[0], rtol=1e-5, atol=1e-6)
        if layers == 2:
            closed = torch.minimum(mixed[1].unsqueeze(-1), mixed[0].unsqueeze(0)).sum(1)  # sum_k min(S2[i,k], S1[k,j])
            torch.testing.assert_close(raw[bi].double(), closed, rtol=1e-5, atol=1e-6)
    assert bool((raw >= roll - 1e-6).all()), "the rollout is a feasible flow, so max-flow >= rollout"
    assert bool((raw <= 1 + 1e-6).all()), "a source has out-capacity 1"
    norm = attention_flow(maps, residual, rows=[n - 1])
    torch.testing.assert_close(norm[:, 0], raw[:, n - 1] / raw[:, n - 1].sum(-1, keepdim=True))


def test_flow_three_layers_against_edmonds_karp():
    maps = _maps(3, 1, 2, 5, 5, seed=11, causal=True)
    want = flow_ref(mixed_ref(maps, 0.3))
    torch.testing.assert_close(attention_flow(maps, 0.3, normalize=False)[0].double(), want, rtol=1e-5, atol=1e-6)


def test_flow_options_and_limits():
    maps = _maps(2, 1, 3, 5, 5, seed=9, dtype=F64).requires_grad_()
    out = attention_flow(maps, head_weights="mean_max", rows=2, causal_correction=True)
    assert out.shape == (1, 5) and out.dtype == F64 and not out.requires_grad
    torch.testing.assert_close(out.sum(-1), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match="exceeds max_edges=10"):
        attention_flow(maps, max_edges=10)
    with pytest.raises(ValueError, match="max_edges must be a positive int"):
        attention_flow(maps, max_edges=0)
    with pytest.raises(ValueError, match="causal_correction needs residual > 0"):
        attention_flow(maps, 0.0, causal_correction=True)
