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

from ..calls import AttendCall


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


def _key_mask(keys: torch.Tensor | Sequence[int] | slice, nk: int) -> torch.Tensor:
    """Keys as a bool ``(B or 1, Nk)`` mask."""
    if isinstance(keys, torch.Tensor) and keys.dtype == torch.bool:
        if keys.shape[-1] != nk or keys.dim() not in (1, 2):
            raise ValueError(f"keys: a bool mask must be (Nk,) or (B, Nk) with Nk={nk}, got {tuple(keys.shape)}")
        return keys if keys.dim() == 2 else keys[None]
    idx = torch.arange(nk)[keys] if isinstance(keys, slice) else torch.as_tensor(keys, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= nk):
        raise ValueError(f"keys: positions must be in [0, {nk}), got {idx.tolist()}")
    return torch.zeros(1, nk, dtype=torch.bool).index_fill_(1, idx, True)


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
        km = _key_mask(self.keys, nk).to(call.q.device)[:, None, None, :]  # (B|1, 1, 1, Nk)
        hsel = _head_index(self.heads_sel, hq, "heads")
        if hsel is not None:
            hm = torch.zeros(hq, dtype=torch.bool, device=call.q.device).index_fill_(0, hsel.to(call.q.device), True)
            km = km & hm[None, :, None, None]
        if self.rows is not None:
            km = km & _key_mask(self.rows, nq).to(call.q.device)[:, None, :, None]
        return torch.zeros(km.shape, dtype=torch.float32, device=call.q.device).masked_fill_(km, float("-inf"))


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
    """Multiply the probabilities of ``keys`` by ``factor`` (a float, or one per selected head) for the heads
    ``heads``; ``renormalize=True`` (VAR, "fixing imbalanced attention", P2P reweighting): the rows sum to 1 again,
    i.e. ``softmax(S + log c)``; False: the rows keep the other keys' probabilities (one more LSE pass)."""

    needs_lse = True

    def __init__(self, keys: torch.Tensor | Sequence[int] | slice, factor: float | Sequence[float] | torch.Tensor,
                 heads: int | Sequence[int] | None = None, renormalize: bool = True) -> None:
        f = torch.as_tensor(factor, dtype=torch.float64)
        if bool((f < 0).any()):
            raise ValueError(f"factor must be >= 0, got {f.tolist()}")
        self.keys, self.factor, self.heads_sel, self.renormalize = keys, f, heads, renormalize

    def scores(self, call: AttendCall, state: State) -> torch.Tensor:
        hq, nk = call.q.shape[1], call.k.shape[2]
        c = _per_head(self.factor, _head_index(self.heads_sel, hq, "heads"), hq, "factor")  # (Hq,)
        km = _key_mask(self.keys, nk).to(call.q.device)[:, None, None, :]
        logc = torch.log(c).to(torch.float32).to(call.q.device)[None, :, None, None]
        return torch.where(km, logc, torch.zeros((), device=call.q.device))

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        if self.renormalize:
            return out
        # (P * c) V = softmax(S + log c) V * exp(lse_edited - lse_original): the original LSE from a call without
        # this edit's bias (the other edits' biases kept)
        assert state.lse_without is not None
        w = torch.exp(lse - state.lse_without(self)).nan_to_num(0.0)
        return out * w[..., None].to(out.dtype)


class ScaleHeads(Edit):
    """Multiply head outputs (before the output projection) by ``factors``: one per query head, or a dict
    head -> factor (VHR-style head rescaling)."""

    def __init__(self, factors: Sequence[float] | torch.Tensor | dict[int, float]) -> None:
        self.factors = factors

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        hq = out.shape[1]
        if isinstance(self.factors, dict):
            f = _per_head(list(self.factors.values()), _head_index(list(self.factors), hq, "factors"), hq, "factors")
        else:
            f = torch.as_tensor(self.factors, dtype=torch.float64).flatten()
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
