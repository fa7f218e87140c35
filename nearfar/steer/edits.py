"""Edits of one attention call, applied by ``nearfar.steer.control`` at the sites and times it selects.

Every edit keeps the call on a fused or sparse engine: score edits become an additive bias of ``attend`` (pre-softmax:
``Bias``, ``KeyMask``, ``Temperature``); probability edits with a post-softmax meaning use the identity
``softmax(S) * c / sum(softmax(S) * c) = softmax(S + log c)`` (``Rescale``: renormalised it is one biased call;
unnormalised, ``(P * c) V = softmax(S + log c) V * exp(lse' - lse)`` costs a second LSE pass); K/V edits change the
call's keys and values; head edits change the per-head outputs at the input of the output projection
(``ScaleHeads``, ``AblateHeads``). Exactness against the edit applied to the materialised ``P`` in float64 is
tested on the dense, block-sparse and partition engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..bias import RelativePositionBias
from ..calls import AttendCall
from ..patterns.spatial import SpatialPattern
from .stats import score_rows


@dataclass
class State:
    """Where and when an edit is asked to act: the site, the step (model calls since ``control`` began, or what
    ``Control.set_step`` set) and which ``attend`` call of the site this is within the step (0-based).

    Inside ``Edit.heads``: ``lse_without(edit)`` is the call's LSE without that edit's bias (one more pass), and
    ``rerun(edit=None, extra_bias=None, q=None, k=None, v=None)`` runs the call once more (``(out, lse)``) with the
    score biases of the active edits (without ``edit``'s own), plus ``extra_bias``, and with ``q``/``k``/``v``
    replaced where given."""

    site: object
    step: int
    call: int
    lse_without: Callable[[Edit], torch.Tensor] | None = None
    rerun: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


class Edit:
    """Base of the edits: each hook is optional. ``kv`` may replace ``call.q/k/v``; ``scores`` returns an additive
    bias broadcastable to ``(B, Hq, Nq, Nk)`` (or None); ``heads`` maps the head outputs ``(B, Hq, Nq, dv)`` (with
    the call's LSE) to new ones. Head indices are those of the ``attend`` call: the site's own heads for every layer
    that attends all its heads in one call (MoH calls per run of heads; ``state.call`` tells the calls apart)."""

    needs_lse = False

    def kv(self, call: AttendCall, state: State) -> None:
        return None

    def scores(self, call: AttendCall, state: State) -> torch.Tensor | None:
        return None

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        return out


def _head_index(heads: int | Sequence[int] | torch.Tensor | None, hq: int, name: str) -> torch.Tensor | None:
    if heads is None:
        return None
    idx = torch.as_tensor([heads] if isinstance(heads, int) else heads, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < -hq or int(idx.max()) >= hq):
        raise ValueError(f"{name}: head indices must be in [-{hq}, {hq}), got {idx.tolist()}")
    return idx % hq


def key_mask_of(keys: torch.Tensor | Sequence[int] | slice, nk: int) -> torch.Tensor:
    """Keys (or query rows) as a bool ``(B or 1, Nk)`` mask: a bool mask ``(Nk,)``/``(B, Nk)``, positions or a
    slice."""
    if isinstance(keys, torch.Tensor) and keys.dtype == torch.bool:
        if keys.shape[-1] != nk or keys.dim() not in (1, 2):
            raise ValueError(f"keys: a bool mask must be (Nk,) or (B, Nk) with Nk={nk}, got {tuple(keys.shape)}")
        return keys if keys.dim() == 2 else keys[None]
    idx = torch.arange(nk)[keys] if isinstance(keys, slice) else torch.as_tensor(keys, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= nk):
        raise ValueError(f"keys: positions must be in [0, {nk}), got {idx.tolist()}")
    return torch.zeros(1, nk, dtype=torch.bool).index_fill_(1, idx, True)


def selected_heads(heads: int | Sequence[int] | None, hq: int, device: torch.device) -> torch.Tensor:
    """Bool ``(Hq,)``: the query heads ``heads`` (every head when None)."""
    idx = _head_index(heads, hq, "heads")
    if idx is None:
        return torch.ones(hq, dtype=torch.bool, device=device)
    return torch.zeros(hq, dtype=torch.bool, device=device).index_fill_(0, idx.to(device), True)


def _per_head(values: float | Sequence[float] | torch.Tensor, heads: torch.Tensor | None, hq: int,
              name: str) -> torch.Tensor:
    """A per-head float tensor ``(Hq,)``: ``values`` for the heads ``heads`` (all if None), 1 for the others."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    out = torch.ones(hq, dtype=torch.float64)
    target = heads if heads is not None else torch.arange(hq)
    if v.numel() not in (1, target.numel()):
        raise ValueError(f"{name}: one value or one per selected head ({target.numel()}), got {v.numel()}")
    out[target] = v.expand(target.numel()) if v.numel() == 1 else v
    return out


def dense_rpb(call: AttendCall) -> torch.Tensor:
    """A relative-position table as the dense bias it adds, ``(1, Hq, Nq, Nk)`` (for sites where score edits meet
    a table: the bias then carries both)."""
    assert call.rpb is not None
    nq, nk = call.q.shape[2], call.k.shape[2]
    assert isinstance(call.pattern, SpatialPattern)  # attend took the table, so the pattern takes one
    src = RelativePositionBias(call.rpb, call.pattern, nq)
    qi = torch.arange(nq, device=call.q.device)[None]
    ki = torch.arange(nk, device=call.q.device)[None, None]
    return src.tile(qi, ki)[:, :, 0]


class Bias(Edit):
    """Add a pre-softmax bias: a tensor broadcastable to ``(B, Hq, Nq, Nk)``, or ``fn(b, h, q, k)`` of broadcast
    index tensors (FlexAttention's ``score_mod`` without the score) returning one."""

    def __init__(self, values: torch.Tensor | Callable[..., torch.Tensor]) -> None:
        if not isinstance(values, torch.Tensor) and not callable(values):
            raise TypeError(f"values must be a tensor or a callable fn(b, h, q, k), got {type(values).__name__}")
        self.values = values

    def scores(self, call: AttendCall, state: State) -> torch.Tensor:
        if isinstance(self.values, torch.Tensor):
            return self.values
        b, hq, nq, _ = call.q.shape
        nk, dev = call.k.shape[2], call.q.device
        return self.values(torch.arange(b, device=dev)[:, None, None, None],
                           torch.arange(hq, device=dev)[None, :, None, None],
                           torch.arange(nq, device=dev)[None, None, :, None],
                           torch.arange(nk, device=dev)[None, None, None, :])


class KeyMask(Edit):
    """Forbid attention to ``keys`` (bool ``(Nk,)``/``(B, Nk)``, positions or a slice), for the heads ``heads``
    and the query rows ``rows`` (all when None). A row left without keys returns 0."""

    def __init__(self, keys: torch.Tensor | Sequence[int] | slice, heads: int | Sequence[int] | None = None,
                 rows: torch.Tensor | Sequence[int] | slice | None = None) -> None:
        self.keys, self.heads_sel, self.rows = keys, heads, rows

    def scores(self, call: AttendCall, state: State) -> torch.Tensor:
        b, hq, nq, _ = call.q.shape
        nk = call.k.shape[2]
        km = key_mask_of(self.keys, nk).to(call.q.device)[:, None, None, :]  # (B|1, 1, 1, Nk)
        if self.rows is not None:
            km = km & key_mask_of(self.rows, nq).to(call.q.device)[:, None, :, None]
        return _neg_inf_where(_heads_only(km, self.heads_sel, hq))


class Temperature(Edit):
    """Divide the scores by ``t`` (a float, or one per query head): ``softmax(S / t)``."""

    def __init__(self, t: float | Sequence[float] | torch.Tensor) -> None:
        tt = torch.as_tensor(t, dtype=torch.float64)
        if bool((tt <= 0).any()):
            raise ValueError(f"t must be > 0, got {tt.tolist()}")
        self.t = tt

    def kv(self, call: AttendCall, state: State) -> None:
        hq = call.q.shape[1]
        t = _per_head(self.t, None, hq, "t") if self.t.numel() > 1 else self.t.expand(hq)
        call.q = call.q / t.to(call.q)[None, :, None, None]


class Rescale(Edit):
    """Multiply the probabilities of ``keys`` by ``factor`` (a float, one per selected head, or a table ``(L, ...)``
    whose row ``site.layer`` is used: "fixing imbalanced attention"'s per-layer, per-head strengths) for the heads
    ``heads``; ``renormalize=True``: the rows sum to 1 again, i.e. ``softmax(S + log c)``, one biased call; False
    (prompt-to-prompt's ``AttentionReweight`` scales the map this way, without renormalising): the rows keep the
    other keys' probabilities, ``(P c) V = o + (c - 1) A`` with ``A = sum_{j in keys} P_j v_j`` from one more run of
    the call over the values masked to ``keys`` (gradients flow through it)."""

    def __init__(self, keys: torch.Tensor | Sequence[int] | slice, factor: float | Sequence[float] | torch.Tensor,
                 heads: int | Sequence[int] | None = None, renormalize: bool = True) -> None:
        f = torch.as_tensor(factor, dtype=torch.float64)
        if bool((f < 0).any()):
            raise ValueError(f"factor must be >= 0, got {f.tolist()}")
        self.keys, self.factor, self.heads_sel, self.renormalize = keys, f, heads, renormalize

    def _factors(self, hq: int, state: State) -> torch.Tensor:
        factor = self.factor
        if factor.dim() == 2:  # a table over layers (L, one per selected head): this site's row
            layer = getattr(state.site, "layer", None)
            if layer is None or not 0 <= layer < factor.shape[0]:
                raise ValueError(f"factor: a table of {factor.shape[0]} layers has no row for layer {layer}")
            factor = factor[layer]
        return _per_head(factor, _head_index(self.heads_sel, hq, "heads"), hq, "factor")  # (Hq,)

    def scores(self, call: AttendCall, state: State) -> torch.Tensor | None:
        if not self.renormalize:
            return None
        hq, nk = call.q.shape[1], call.k.shape[2]
        km = key_mask_of(self.keys, nk).to(call.q.device)[:, None, None, :]
        logc = torch.log(self._factors(hq, state)).to(torch.float32).to(call.q.device)[None, :, None, None]
        return torch.where(km, logc, torch.zeros((), device=call.q.device))

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        if self.renormalize:
            return out
        assert state.rerun is not None
        km = key_mask_of(self.keys, call.k.shape[2]).to(call.v)[:, None, :, None]  # (B|1, 1, Nk, 1)
        part = state.rerun(v=call.v * km)[0]
        c = self._factors(out.shape[1], state).to(out)[None, :, None, None]
        return out + (c - 1) * part


class ScaleHeads(Edit):
    """Multiply head outputs (before the output projection) by ``factors`` (VHR-style head rescaling): one per query
    head, a dict head -> factor, a table ``(L, Hq)`` whose row ``site.layer`` is used (one table for every layer of
    a model), or ``fn(out, lse, call, state) -> (Hq,)`` factors computed from the call (e.g. from head statistics)."""

    def __init__(self,
                 factors: Sequence[float] | torch.Tensor | dict[int, float] | Callable[..., torch.Tensor]) -> None:
        self.factors = factors

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        hq = out.shape[1]
        factors = self.factors(out, lse, call, state) if callable(self.factors) else self.factors
        if isinstance(factors, dict):
            f = _per_head(list(factors.values()), _head_index(list(factors), hq, "factors"), hq, "factors")
        else:
            f = torch.as_tensor(factors, dtype=torch.float64)
            if f.dim() == 2:  # a table over layers: this site's row
                layer = getattr(state.site, "layer", None)
                if layer is None or not 0 <= layer < f.shape[0]:
                    raise ValueError(f"factors: a table (L, Hq) of {f.shape[0]} layers has no row for layer {layer}")
                f = f[layer]
            f = f.flatten()
            if f.numel() != hq:
                raise ValueError(f"factors: one per query head ({hq}), got {f.numel()}")
        return out * f.to(out)[None, :, None, None]


class AblateHeads(Edit):
    """Ablate head outputs (before the output projection): ``mode="zero"`` sets them to 0, ``"mean"`` to their mean
    over the query positions of each batch item (mean ablation, as in circuit analysis), ``"resample"`` to those of
    another batch item (resample ablation): item ``p[i]`` takes item ``p[i + 1]``'s (cyclically) for a permutation
    ``p`` drawn from ``seed``, the same at every call with that batch size, so no item keeps its own (a batch of
    at least 2)."""

    def __init__(self, heads: int | Sequence[int], mode: str = "zero", seed: int = 0) -> None:
        if mode not in ("zero", "mean", "resample"):
            raise ValueError(f"mode must be 'zero', 'mean' or 'resample', got {mode!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.heads_sel, self.mode, self.seed = heads, mode, seed

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        idx = _head_index(self.heads_sel, out.shape[1], "heads")
        assert idx is not None
        sel = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device).index_fill_(0, idx.to(out.device), True)
        if self.mode == "resample":
            if out.shape[0] < 2:
                raise ValueError("AblateHeads: mode='resample' needs a batch of at least 2 items, got 1")
            p = torch.randperm(out.shape[0], generator=torch.Generator().manual_seed(self.seed))
            repl = out[torch.empty_like(p).index_copy_(0, p, p.roll(-1)).to(out.device)]
        else:
            repl = torch.zeros_like(out) if self.mode == "zero" else out.mean(2, keepdim=True).expand_as(out)
        return torch.where(sel[None, :, None, None], repl, out)


def _pair_tensor(spec: torch.Tensor | Callable[..., torch.Tensor], call: AttendCall, name: str) -> torch.Tensor:
    """A bool pair mask broadcastable to ``(B, Hq, Nq, Nk)``: the tensor itself, or ``fn(b, h, q, k)`` of broadcast
    index tensors (FlexAttention's ``mask_mod``)."""
    b, hq, nq, _ = call.q.shape
    nk, dev = call.k.shape[2], call.q.device
    if callable(spec) and not isinstance(spec, torch.Tensor):
        spec = spec(*(torch.arange(n, device=dev).view([-1 if i == j else 1 for j in range(4)])
                      for i, n in enumerate((b, hq, nq, nk))))
    if not isinstance(spec, torch.Tensor) or spec.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor or fn(b, h, q, k) returning one")
    try:
        torch.broadcast_shapes(spec.shape, (b, hq, nq, nk))
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(spec.shape)} must be broadcastable to (B, Hq, Nq, Nk) = "
                         f"{(b, hq, nq, nk)}") from None
    return spec.to(dev)


def _groups(groups: Sequence[torch.Tensor | Sequence[int] | slice], n: int, name: str) -> torch.Tensor:
    """Token groups as a float membership ``(B|1, G, n)``."""
    masks = [key_mask_of(g, n).float() for g in groups]
    if not masks:
        raise ValueError(f"{name}: at least one group")
    b = max(m.shape[0] for m in masks)
    return torch.stack([m.expand(b, n) for m in masks], 1)


def _heads_only(mask: torch.Tensor, heads: int | Sequence[int] | None, hq: int) -> torch.Tensor:
    """``mask (.., Hq|1, Nq, Nk)`` kept only at the query heads ``heads`` (all when None)."""
    return mask if heads is None else mask & selected_heads(heads, hq, mask.device)[None, :, None, None]


def _neg_inf_where(forbid: torch.Tensor) -> torch.Tensor:
    return torch.zeros(forbid.shape, dtype=torch.float32, device=forbid.device).masked_fill_(forbid, float("-inf"))


class PairMask(Edit):
    """Forbid query-key pairs (IR-Diffusion's isolation, DiffUHaul's masking, PrimeComposer's region constraint).

    Either ``allowed`` is a bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` or ``fn(b, h, q, k)`` returning one
    (FlexAttention's ``mask_mod``), True where the pair may attend; or ``allowed`` is a bool table ``(Gq, Gk)``
    over groups: a query of ``query_groups[i]`` may see a key of ``key_groups[j]`` only where ``allowed[i, j]``
    (each group a slice, positions or a bool mask ``(N,)``/``(B, N)``; pairs whose query or key is in no group
    are left as they are). ``heads`` limits the edit to these query heads. A row left without keys returns 0.
    """

    def __init__(self, allowed: torch.Tensor | Callable[..., torch.Tensor],
                 query_groups: Sequence[torch.Tensor | Sequence[int] | slice] | None = None,
                 key_groups: Sequence[torch.Tensor | Sequence[int] | slice] | None = None,
                 heads: int | Sequence[int] | None = None) -> None:
        if (query_groups is None) != (key_groups is None):
            raise ValueError("query_groups and key_groups go together (a group table), or neither (a pair mask)")
        if query_groups is not None and key_groups is not None:
            if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or \
                    tuple(allowed.shape) != (len(query_groups), len(key_groups)):
                raise ValueError(f"allowed must be a bool table (Gq, Gk) = ({len(query_groups)}, {len(key_groups)}) "
                                 f"with groups")
        self.allowed, self.query_groups, self.key_groups, self.heads_sel = allowed, query_groups, key_groups, heads

    def scores(self, call: AttendCall, state: State) -> torch.Tensor:
        hq, nq = call.q.shape[1], call.q.shape[2]
        nk, dev = call.k.shape[2], call.q.device
        if self.query_groups is not None and self.key_groups is not None:
            assert isinstance(self.allowed, torch.Tensor)
            qg = _groups(self.query_groups, nq, "query_groups").to(dev)
            kg = _groups(self.key_groups, nk, "key_groups").to(dev)
            bad = (~self.allowed).float().to(dev)
            forbid = (torch.einsum("bin,ij,bjm->bnm", qg, bad, kg) > 0)[:, None]  # (B|1, 1, Nq, Nk)
        else:
            forbid = ~_pair_tensor(self.allowed, call, "allowed")
        return _neg_inf_where(_heads_only(forbid, self.heads_sel, hq))


class Modulate(Edit):
    """Push the scores of ``pos`` pairs up and of ``neg`` pairs down (MAKIMA's and DenseDiffusion's attention
    modulation; ``pos``/``neg``: bool pair masks broadcastable to ``(B, Hq, Nq, Nk)`` or ``fn(b, h, q, k)``).

    ``relative_to="const"``: ``S' = S + strength * (pos - neg)``. ``"row_range"`` (DenseDiffusion, Kim et al., ICCV
    2023, arXiv 2308.12964, eq. 4): a positive pair moves the fraction ``strength`` of its way to the row's highest
    score, a negative pair to the row's lowest, ``S' = S + strength * (pos * (max S - S) - neg * (S - min S))``,
    max and min over the keys the row may see; ``S`` is the call's score matrix as the engine sees it (after K/V
    edits such as ``Temperature``, with the call's own bias, before the other score edits), formed here once:
    a ``(B, Hq, Nq, Nk)`` tensor, meant for the low-resolution sites where these methods act; gradients flow through
    it. A pair in both masks gets both terms. ``heads`` limits the edit to these query heads.
    """

    def __init__(self, pos: torch.Tensor | Callable[..., torch.Tensor] | None = None,
                 neg: torch.Tensor | Callable[..., torch.Tensor] | None = None, strength: float = 1.0,
                 relative_to: str = "const", heads: int | Sequence[int] | None = None) -> None:
        if relative_to not in ("const", "row_range"):
            raise ValueError(f"relative_to must be 'const' or 'row_range', got {relative_to!r}")
        if pos is None and neg is None:
            raise ValueError("Modulate needs pos or neg pairs")
        if not isinstance(strength, (int, float)) or not torch.isfinite(torch.tensor(float(strength))):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        self.pos, self.neg, self.strength, self.relative_to, self.heads_sel = pos, neg, float(strength), \
            relative_to, heads

    def scores(self, call: AttendCall, state: State) -> torch.Tensor:
        hq = call.q.shape[1]
        masks = [None if m is None else _heads_only(_pair_tensor(m, call, n), self.heads_sel, hq).float()
                 for m, n in ((self.pos, "pos"), (self.neg, "neg"))]
        if self.relative_to == "const":
            terms = [sign * m for sign, m in zip((1.0, -1.0), masks) if m is not None]
            return self.strength * sum(terms[1:], terms[0])
        bias = call.bias if call.rpb is None else dense_rpb(call) + (0 if call.bias is None else call.bias)
        s = score_rows(call.q, call.k, slice(None), call.pattern, scale=call.scale,
                       key_padding_mask=call.key_padding_mask, bias=bias, blocks=call.blocks, score_mod=call.score_mod)
        seen = torch.isfinite(s)
        top = torch.where(seen, s, float("-inf")).amax(-1, keepdim=True)
        low = torch.where(seen, s, float("inf")).amin(-1, keepdim=True)
        delta = torch.zeros_like(s)
        if masks[0] is not None:
            delta = delta + masks[0] * torch.where(seen, top - s, 0.0)
        if masks[1] is not None:
            delta = delta - masks[1] * torch.where(seen, s - low, 0.0)
        return self.strength * delta
