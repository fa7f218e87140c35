"""Aggregation of attention maps over heads and layers: head weights, rollout, attention flow.

- Head weights. Lin, Wang & Tang, "Training-Free Open-Ended Object Detection and Segmentation via Attention as
  Prompts" (VL-SAM, NeurIPS 2024, arXiv 2410.05963; no official code was found) weight each head by its
  peakedness, the mean over query rows of each row's maximum (``W = Mean(Max(S, dim=keys), dim=queries)``), and
  average the weighted maps over heads. ``head_weights`` computes that weight ("mean_max") and two alternatives:
  "entropy" (the mean over rows of ``exp(-H_i)``, the inverse perplexity of row ``i``: 1 for a one-hot row,
  ``1/N`` for a uniform one; never above the row max) and "group_mass" (the mean mass a head puts on a key group,
  e.g. the image tokens: VAR's image-centric heads, Kang et al. ICLR 2025, ``MICV-yonsei/VisAttnSink``).
- Rollout. Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020, arXiv 2005.00928; code
  ``samiraabnar/attention_flow``): ``rollout`` wraps ``nearfar.functional.attention_rollout`` (head aggregation,
  ``(1 - residual) S + residual I``, rows normalised, product over layers) with weighted heads, several query rows
  (VL-SAM's object-name tokens) and VL-SAM's causal correction.
- Attention flow. The same paper's max-flow: the layers form a graph whose edge from token ``a`` of layer ``l`` to
  token ``b`` of layer ``l - 1`` has capacity ``S'_l[a, b]``; the flow from output token ``i`` to input token ``j``
  is the maximum flow between them (Dinic's algorithm here, in plain Python on float64 values: small graphs only).

What differs from the papers and codes, and the choices where they are vague:

- VL-SAM averages the weighted maps, ``Mean_h(W_h S_h)``, whose rows sum to ``mean(W)``; here the weights are
  normalised to sum to 1 over heads, so the aggregated map stays row-stochastic and ``residual`` keeps the meaning
  it has in plain rollout (the two differ by a per-layer factor, which matters only through the residual mix).
- VL-SAM's causal correction (its "regularised attention flow") is reconstructed from the paper's description: a
  causal mask lets key ``j`` be seen by ``N - j`` of the ``N`` query rows, so early tokens collect mass in the
  product; each column ``j`` of the head-aggregated map of every layer is multiplied by ``1 - (N - j) / N = j / N``
  (the share of rows the mask hides from it) before the residual mix and the row normalisation. Column 0 (usually
  a sink token) gets weight 0; ``residual`` must then be > 0.
- Abnar & Zuidema's ``compute_flows`` normalises every output token's flows to sum to 1 (``normalize=True``, the
  default here); ``normalize=False`` gives the raw max-flow values, which are never below the rollout (the rollout
  is itself a feasible flow: see the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_bool, check_choice, check_int_range, check_positive_int, check_real_range
from ..ops.rollout import attention_rollout, stack_layer_maps
from .tokens import TokenSelection, token_mask, upcast

__all__ = ["attention_flow", "head_weights", "rollout"]

RULES = ("mean_max", "entropy", "group_mass")



def _lead_mask(sel: TokenSelection, n: int, name: str, batch_ndim: int, extra: int, device: torch.device
               ) -> torch.Tensor:
    """A token selection as a mask broadcastable to ``(*batch, <extra axes>, n)``."""
    mask = token_mask(sel, n, name=name, device=device)
    if mask.dim() > 1:
        if mask.dim() - 1 > batch_ndim:
            raise ValueError(f"{name} as a boolean mask must be (n,) or (*batch, n) with at most {batch_ndim} "
                             f"batch axes, got shape {tuple(mask.shape)}")
        for _ in range(extra):
            mask = mask.unsqueeze(-2)
    return mask


def _row_values(x: torch.Tensor, rule: str, group: TokenSelection | None, row_stats: bool) -> torch.Tensor:
    """Per query row, the quantity ``rule`` averages: ``(..., H, Nq)``."""
    if row_stats:
        return torch.exp(-x) if rule == "entropy" else x
    if rule == "mean_max":
        return x.amax(-1)
    if rule == "entropy":
        logp = torch.log(torch.where(x > 0, x, torch.ones_like(x)))
        return torch.exp((x * logp).sum(-1))
    assert group is not None
    mask = _lead_mask(group, x.shape[-1], "group", x.dim() - 3, 2, x.device)
    return (x * mask).sum(-1)


def _weights(x: torch.Tensor, rule: str | torch.Tensor, group: TokenSelection | None, rows: TokenSelection | None,
             row_stats: bool, normalize: bool) -> torch.Tensor:
    """``head_weights`` after its checks; also used per layer by ``rollout`` and ``attention_flow``."""
    out_shape = x.shape[:-1] if row_stats else x.shape[:-2]
    if isinstance(rule, torch.Tensor):
        w = rule.to(device=x.device, dtype=x.dtype).expand(out_shape)
    else:
        values = _row_values(x, rule, group, row_stats)
        if rows is None:
            w = values.mean(-1)
        else:
            m = _lead_mask(rows, values.shape[-1], "rows", values.dim() - 2, 1, x.device)
            w = (values * m).sum(-1) / m.sum(-1)
    if normalize:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / w.shape[-1])
    return w


def _check_weight_shape(w: torch.Tensor, shape: Sequence[int], name: str) -> None:
    ok = True
    try:
        ok = tuple(torch.broadcast_shapes(w.shape, tuple(shape))) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} as a tensor of head weights must broadcast to {tuple(shape)}, "
                         f"got shape {tuple(w.shape)}")


def _check_rule_args(x: torch.Tensor, rule: object, group: TokenSelection | None, rows: TokenSelection | None,
                     row_stats: bool) -> None:
    if isinstance(rule, torch.Tensor):
        if not rule.is_floating_point():
            raise TypeError(f"rule as a tensor of head weights must be floating, got {rule.dtype}")
        if not torch.isfinite(rule).all() or (rule < 0).any():
            raise ValueError("rule as a tensor of head weights must be finite and >= 0")
        return
    check_choice(rule, "rule", RULES)
    if rule == "group_mass" and group is None and not row_stats:
        raise ValueError("rule='group_mass' needs group (the key tokens whose mass is measured)")
    if rows is not None:
        n = x.shape[-1] if row_stats else x.shape[-2]
        m = _lead_mask(rows, n, "rows", x.dim() - (2 if row_stats else 3), 0, x.device)
        if not bool(m.any(-1).all()):
            raise ValueError("rows must select at least one query row (in every batch item)")
    if group is not None and not row_stats:
        _lead_mask(group, x.shape[-1], "group", x.dim() - 3, 0, x.device)


def head_weights(maps_or_stats: torch.Tensor, rule: str | torch.Tensor = "mean_max", *,
                 group: TokenSelection | None = None, rows: TokenSelection | None = None, row_stats: bool = False,
                 normalize: bool = True) -> torch.Tensor:
    """One weight per head from its attention map (or from a per-row statistic of it).

    Args:
        maps_or_stats: attention probabilities ``(..., H, Nq, Nk)`` (e.g. ``(B, H, Nq, Nk)`` or
            ``(L, B, H, Nq, Nk)``); with ``row_stats=True``, a per-row statistic ``(..., H, Nq)`` computed without
            the map (e.g. by ``nearfar.steer.stats`` from ``q``, ``k`` and the log-sum-exp): the row max for
            "mean_max", the row entropy in nats for "entropy", the row's mass on the group for "group_mass".
            Floating dtype (float16/bfloat16 work in float32).
        rule: "mean_max" (VL-SAM: mean over rows of the row max), "entropy" (mean over rows of ``exp(-H_row)``),
            "group_mass" (mean over rows of the mass on ``group``), or a tensor of weights broadcastable to
            ``(..., H)`` (finite, >= 0; only normalised).
        group: the key tokens of "group_mass" (a slice, indices or a boolean ``(Nk,)`` / ``(..., Nk)`` mask).
        rows: the query rows to average over (default all; VL-SAM uses all rows), as a slice, indices or a
            boolean ``(Nq,)`` / ``(..., Nq)`` mask selecting at least one row.
        row_stats: ``maps_or_stats`` holds per-row statistics ``(..., H, Nq)`` instead of maps.
        normalize: divide the weights by their sum over heads (uniform weights where that sum is 0).

    Returns:
        ``(..., H)``: the weights, in the input's dtype; differentiable with respect to it.

    Raises:
        TypeError: not a floating tensor; ``rule`` neither one of the names nor a floating tensor.
        ValueError: too few dimensions; ``rule`` unknown or a tensor with negative / non-finite entries;
            "group_mass" without ``group``; ``rows`` / ``group`` out of range or selecting no row.

    Examples:
        >>> import torch
        >>> from nearfar.steer import head_weights
        >>> maps = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]])  # (B=1, H=2, 2, 2)
        >>> head_weights(maps, normalize=False)                  # the peaked head gets the larger weight
        tensor([[1.0000, 0.5000]])
        >>> head_weights(maps).sum(-1)
        tensor([1.])
    """
    row_stats = check_bool(row_stats, "row_stats")
    normalize = check_bool(normalize, "normalize")
    if not isinstance(maps_or_stats, torch.Tensor) or not maps_or_stats.is_floating_point():
        raise TypeError(f"maps_or_stats must be a floating tensor, got {type(maps_or_stats).__name__}"
                        + (f" of {maps_or_stats.dtype}" if isinstance(maps_or_stats, torch.Tensor) else ""))
    need = 2 if row_stats else 3
    if maps_or_stats.dim() < need or 0 in maps_or_stats.shape:
        what = "(..., H, Nq) row statistics" if row_stats else "(..., H, Nq, Nk) maps"
        raise ValueError(f"maps_or_stats must be non-empty {what}, got shape {tuple(maps_or_stats.shape)}")
    _check_rule_args(maps_or_stats, rule, group, rows, row_stats)
    if isinstance(rule, torch.Tensor):
        _check_weight_shape(rule, maps_or_stats.shape[:-1] if row_stats else maps_or_stats.shape[:-2], "rule")
    x = upcast(maps_or_stats)
    return _weights(x, rule, group, rows, row_stats, normalize).to(maps_or_stats.dtype)


def _aggregate(maps: torch.Tensor | Sequence[torch.Tensor], weights: str | torch.Tensor | None,
               causal_correction: bool) -> torch.Tensor:
    """Checked maps, head-aggregated per layer (``(L, B, N, N)``, float32 or float64), column-corrected."""
    stacked = stack_layer_maps(maps)
    layers, b, h, n, _ = stacked.shape
    if weights is not None:
        if isinstance(weights, str) and check_choice(weights, "head_weights", RULES) == "group_mass":
            raise ValueError("head_weights='group_mass' needs a group: compute head_weights(maps, "
                             "rule='group_mass', group=...) and pass the (L, B, H) tensor")
        if isinstance(weights, torch.Tensor):
            _check_rule_args(stacked, weights, None, None, False)
            _check_weight_shape(weights, (layers, b, h), "head_weights")
        elif not isinstance(weights, str):
            raise TypeError(f"head_weights must be None, a rule name or a tensor, got {type(weights).__name__}")
    x = upcast(stacked)
    if weights is None:
        agg = x.mean(2)
    else:
        w = _weights(x, weights, None, None, False, True)
        agg = torch.einsum("lbh,lbhij->lbij", w, x)
    if causal_correction:
        agg = agg * (torch.arange(n, device=agg.device, dtype=agg.dtype) / n)
    return agg


def _check_residual(residual: object, causal_correction: object) -> None:
    residual = check_real_range(residual, "residual", 0.0, 1.0)
    if check_bool(causal_correction, "causal_correction") and residual == 0:
        raise ValueError("causal_correction needs residual > 0: column 0 gets weight 0, so a row that attends "
                         "only to token 0 would have no mass left")


def _check_rows(rows: int | Sequence[int] | None, n: int) -> int | list[int] | None:
    if rows is None:
        return None
    if isinstance(rows, Sequence) and not isinstance(rows, str):
        if not rows:
            raise ValueError("rows must be None, an int or a non-empty sequence of ints in [0, N), got []")
        return [check_int_range(r, f"rows[{i}]", 0, n - 1) for i, r in enumerate(rows)]
    return check_int_range(rows, "rows", 0, n - 1)


def rollout(maps: torch.Tensor | Sequence[torch.Tensor], residual: float = 0.5,
            head_weights: str | torch.Tensor | None = None, rows: int | Sequence[int] | None = None,
            causal_correction: bool = False) -> torch.Tensor:
    """Attention rollout with weighted heads, several query rows and VL-SAM's causal correction.

    Per layer: heads aggregated (mean, or weighted by ``head_weights`` normalised over heads), columns scaled by
    ``j / N`` with ``causal_correction``; then ``nearfar.functional.attention_rollout`` mixes in the identity,
    normalises the rows and multiplies the layers (the last on the left).

    Args:
        maps: attention probabilities of layers ``1..L`` (first layer first): one ``(L, B, H, N, N)`` tensor or a
            sequence of ``(B, H, N, N)`` tensors; floating.
        residual: weight of the identity (the residual connection), in ``[0, 1]``; > 0 with ``causal_correction``.
        head_weights: None (mean over heads), a rule of ``head_weights`` ("mean_max": VL-SAM, "entropy"), computed
            per layer over all query rows, or a tensor broadcastable to ``(L, B, H)`` (>= 0, normalised here).
        rows: None for the whole ``(B, N, N)`` rollout, an int for one row ``(B, N)``, a sequence of ``R`` ints for
            those rows ``(B, R, N)`` (e.g. the generated object-name tokens of VL-SAM).
        causal_correction: multiply column ``j`` of every layer's aggregated map by ``j / N`` (VL-SAM's correction
            of the early-token bias of causal masks, as reconstructed; see the module docstring).

    Returns:
        The rollout, rows summing to 1, in the maps' dtype; differentiable with respect to the maps (and to a
        tensor ``head_weights``).

    Raises:
        TypeError / ValueError: as ``attention_rollout`` for ``maps``, ``residual`` and ``rows``; an unknown rule,
            "group_mass" as a name, a tensor of weights of the wrong shape or with negative entries;
            ``causal_correction`` with ``residual == 0``.

    Examples:
        >>> import torch
        >>> from nearfar.steer import rollout
        >>> maps = torch.randn(4, 2, 3, 10, 10).softmax(-1)               # 4 layers, 3 heads, 10 tokens
        >>> rollout(maps, head_weights="mean_max", rows=[7, 9]).shape    # two query rows
        torch.Size([2, 2, 10])
        >>> eye = torch.eye(10).expand(4, 2, 3, 10, 10)
        >>> bool(torch.equal(rollout(eye), torch.eye(10).expand(2, 10, 10)))   # identity maps: identity
        True
    """
    _check_residual(residual, causal_correction)
    agg = _aggregate(maps, head_weights, causal_correction)
    row = _check_rows(rows, agg.shape[-1])
    dtype = maps.dtype if isinstance(maps, torch.Tensor) else maps[0].dtype
    return attention_rollout(agg.unsqueeze(2), residual=residual, row=row).to(dtype)


def _flow_graph(n_nodes: int, edges: list[tuple[int, int, float]]
                ) -> tuple[list[int], list[float], list[list[int]]]:
    """Residual graph arrays: edge ``e`` goes to ``to[e]`` with capacity ``cap[e]``; ``e ^ 1`` is its reverse."""
    to: list[int] = []
    cap: list[float] = []
    adj: list[list[int]] = [[] for _ in range(n_nodes)]
    for a, b, c in edges:
        adj[a].append(len(to))
        to.append(b)
        cap.append(c)
        adj[b].append(len(to))
        to.append(a)
        cap.append(0.0)
    return to, cap, adj


def _max_flow(to: list[int], capacity: list[float], adj: list[list[int]], s: int, t: int) -> float:
    """Maximum flow from ``s`` to ``t`` (Dinic: BFS levels, then blocking flows by iterative DFS)."""
    cap = list(capacity)
    n_nodes = len(adj)
    eps = 1e-15
    flow = 0.0
    while True:
        level = [-1] * n_nodes
        level[s] = 0
        queue = [s]
        for u in queue:
            for e in adj[u]:
                if cap[e] > eps and level[to[e]] < 0:
                    level[to[e]] = level[u] + 1
                    queue.append(to[e])
        if level[t] < 0:
            return flow
        it = [0] * n_nodes
        while True:  # blocking flow: augmenting paths along increasing levels
            path: list[int] = []
            u = s
            while u != t:
                while it[u] < len(adj[u]):
                    e = adj[u][it[u]]
                    if cap[e] > eps and level[to[e]] == level[u] + 1:
                        break
                    it[u] += 1
                if it[u] < len(adj[u]):
                    e = adj[u][it[u]]
                    path.append(e)
                    u = to[e]
                elif u == s:
                    break
                else:  # dead end: never enter u again in this phase, step back
                    level[u] = -1
                    e = path.pop()
                    u = to[e ^ 1]
                    it[u] += 1
            if u != t:
                break
            f = min(cap[e] for e in path)
            for e in path:
                cap[e] -= f
                cap[e ^ 1] += f
            flow += f


def attention_flow(maps: torch.Tensor | Sequence[torch.Tensor], residual: float = 0.5,
                   head_weights: str | torch.Tensor | None = None, rows: int | Sequence[int] | None = None,
                   causal_correction: bool = False, normalize: bool = True, max_edges: int = 4096
                   ) -> torch.Tensor:
    """Abnar & Zuidema's attention flow: the max-flow from each output token to each input token.

    The per-layer maps are aggregated and mixed as in ``rollout`` (``(1 - residual) S + residual I``, rows
    normalised); the graph has ``L + 1`` layers of ``N`` nodes and an edge of capacity ``S'_l[a, b]`` from node
    ``a`` of layer ``l`` to node ``b`` of layer ``l - 1``. ``B * R * N`` max-flow problems are solved in plain
    Python (Dinic), so this is for small graphs only: at most ``max_edges`` edges ``L * N * N``.

    Args:
        maps: as ``rollout``.
        residual: as ``rollout``.
        head_weights: as ``rollout``.
        causal_correction: as ``rollout``.
        rows: the output tokens: None (all, ``(B, N, N)``), an int (``(B, N)``) or a sequence (``(B, R, N)``).
        normalize: divide each output token's flows by their sum (as Abnar & Zuidema's ``compute_flows``).
        max_edges: the largest graph accepted, ``L * N * N <= max_edges`` (default 4096, e.g. 4 layers of 32
            tokens); raise it knowingly: the cost grows like ``B * R * N`` times a max-flow on that graph.

    Returns:
        The flows (rows summing to 1 when ``normalize``), in the maps' dtype. Not differentiable (a max-flow value
        is piecewise linear in the capacities; no gradient is recorded).

    Raises:
        TypeError / ValueError: as ``rollout``; ``max_edges`` not a positive int; a graph with more than
            ``max_edges`` edges.

    Examples:
        >>> import torch
        >>> from nearfar.steer import attention_flow
        >>> maps = torch.randn(2, 1, 2, 5, 5).softmax(-1)                 # 2 layers, 2 heads, 5 tokens
        >>> attention_flow(maps, rows=0).shape
        torch.Size([1, 5])
    """
    normalize = check_bool(normalize, "normalize")
    max_edges = check_positive_int(max_edges, "max_edges")
    stacked = stack_layer_maps(maps)
    layers, _, _, n, _ = stacked.shape
    if layers * n * n > max_edges:
        raise ValueError(f"attention_flow is for small graphs: L * N * N = {layers} * {n} * {n} = "
                         f"{layers * n * n} edges exceeds max_edges={max_edges} (raise max_edges knowingly, or "
                         f"use rollout)")
    _check_residual(residual, causal_correction)
    row = _check_rows(rows, n)
    agg = _aggregate(stacked, head_weights, causal_correction)
    out_rows = list(range(n)) if row is None else [row] if isinstance(row, int) else row
    with torch.no_grad():
        mixed = torch.stack([attention_rollout(agg[i][None, :, None], residual=residual) for i in range(layers)])
        mixed = mixed.double().cpu()  # (L, B, N, N)
    out = torch.zeros(mixed.shape[1], len(out_rows), n, dtype=torch.float64)
    for bi in range(mixed.shape[1]):
        caps = mixed[:, bi].tolist()  # caps[l - 1][a][c]: node a of layer l -> node c of layer l - 1
        edges = [(layer * n + a, (layer - 1) * n + c, caps[layer - 1][a][c])
                 for layer in range(1, layers + 1) for a in range(n) for c in range(n) if caps[layer - 1][a][c] > 0]
        graph = _flow_graph((layers + 1) * n, edges)
        for ri, i in enumerate(out_rows):
            for j in range(n):
                out[bi, ri, j] = _max_flow(*graph, layers * n + i, j)
    if normalize:
        out = out / out.sum(-1, keepdim=True)
    if isinstance(row, int):
        out = out.squeeze(1)
    return out.to(device=stacked.device, dtype=stacked.dtype)
