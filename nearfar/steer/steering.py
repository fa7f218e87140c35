"""``control``: apply edits and captures to chosen attention sites of a model, on a schedule, inside a ``with`` block.

    with control(model, [(selector, edit, when), ...]) as run:
        model(inputs)                     # each call of the model is one step (run.step), unless set_step is used
    run.records                           # what Capture edits recorded, per site name

Every nearfar layer computes its attention through ``nearfar.attend`` (the layers with their own fused calls, the
window kernel and ``attend_rows`` call ``attend`` instead while an interceptor is active), so ``control`` sees each
call through ``nearfar.functional.intercept_calls`` together with the site whose forward is running (forward hooks
on the sites). An edit runs when its selector selects the site and its ``when(state)`` holds (``state.step``,
``state.site.layer``, ``state.call``): ``steps(a, b)``, ``layers(a, b)`` or any predicate. Edits act in the order
given: K/V hooks, then score biases (summed into ``attend``'s bias), then the engine runs once, then head hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calls import AttendCall, intercept_calls
from .edits import Edit, State, dense_rpb
from .sites import Site, SiteSelector, find_sites, matches
from .stats import prob_rows, rows_index, score_rows, take_rows

When = Callable[[State], bool]


def steps(start: int, stop: int | None = None) -> When:
    """Active at steps ``start <= step < stop`` (``stop`` None: from ``start`` on)."""
    return lambda s: s.step >= start and (stop is None or s.step < stop)


def layers(start: int, stop: int | None = None) -> When:
    """Active at sites whose layer index is in ``[start, stop)``."""
    return lambda s: getattr(s.site, "layer", -1) >= start and (stop is None or getattr(s.site, "layer", -1) < stop)


FIELDS = ("q", "k", "v", "lse", "head_out", "pattern", "probs", "scores")
REDUCTIONS = (None, "mean_heads", "max_heads", "running_mean_steps")
OVER_BUDGET = ("error", "skip", "reduce_heads", "offload", "rows_only")
#: the fields with a query-head axis (dim 1), which ``heads`` selects and the head reductions reduce
PER_QUERY_HEAD = ("q", "lse", "head_out", "probs", "scores")


class Capture(Edit):
    """Record fields of the calls it is applied to, into ``run.records[site.name]`` (one dict per call, with
    ``"step"`` and ``"call"``), bounded by ``budget_bytes``.

    Args:
        fields: Among ``"q"``, ``"k"``, ``"v"`` (as the call sees them at this edit's place in the list),
            ``"lse"``, ``"head_out"`` (the per-head outputs at this place: before later head edits), ``"pattern"``
            and ``"probs"``: the exact probability rows ``rows`` of the call as it runs (all its edits), recomputed
            from q, k and the LSE (``prob_rows``): ``(B, Hq, R, Nk)``, never a matrix of more rows; ``"scores"``: the
            same rows' logits as the engine forms them (``score_rows``; ``-inf`` where masked).
        heads: Keep only these query heads (q, lse, head_out; k/v keep their KV heads).
        reduce: None, ``"mean_heads"`` or ``"max_heads"`` (over the heads kept), ``"running_mean_steps"`` (one
            record per site and call index, holding the mean over the steps seen so far and their count in
            ``"steps"``: DAAM's and prompt-to-prompt's aggregation over denoising steps, in the memory of one step),
            or ``fn(field, tensor) -> tensor`` applied to each stored tensor.
        to: Device to store on (default ``"cpu"``).
        dtype: Store floating tensors in this dtype (default: as computed).
        differentiable: Keep the autograd graph (A-STAR-style losses on captured values); default detach.
        budget_bytes: Most bytes of stored tensors. What happens when a record would pass it, by
            ``on_over_budget``: ``"error"`` raises a RuntimeError naming the budget; ``"skip"`` stops recording
            (``self.over_budget`` becomes True); ``"reduce_heads"`` stores the record averaged over the query heads
            instead (``self.fallbacks`` counts it), and raises if that is still too big; ``"offload"`` stores its
            floating tensors in float16 (on ``to``), and raises if that is still too big; ``"rows_only"`` (needs
            ``rows``) stores only the rows ``rows`` of the per-query fields (q, lse, head_out; probs and scores are
            those rows already) and drops k, v and the pattern, and raises if that is still too big.

    ``fields`` may be one name (``Capture("probs", rows=[0])``) or several.
    """

    def __init__(self, fields: str | Sequence[str] = ("lse", "head_out"), rows: object = None,
                 heads: Sequence[int] | None = None,
                 reduce: str | Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                 to: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 differentiable: bool = False, budget_bytes: int | None = None, on_over_budget: str = "error") -> None:
        fields = (fields,) if isinstance(fields, str) else fields
        bad = [f for f in fields if f not in FIELDS]
        if bad:
            raise ValueError(f"fields must be among {FIELDS}, got {bad}")
        if reduce not in REDUCTIONS and not callable(reduce):
            raise ValueError(f"reduce must be one of {REDUCTIONS} or a function fn(field, tensor), got {reduce!r}")
        if on_over_budget not in OVER_BUDGET:
            raise ValueError(f"on_over_budget must be one of {OVER_BUDGET}, got {on_over_budget!r}")
        if ("probs" in fields or "scores" in fields) and rows is None:
            raise ValueError("fields with 'probs' or 'scores' need rows= (the query rows to recompute, e.g. [0, -1] "
                             "or a bool mask): all rows of a long sequence are the matrix fused kernels never form")
        if on_over_budget == "rows_only" and rows is None:
            raise ValueError("on_over_budget='rows_only' needs rows= (the query rows to keep when over budget)")
        self.fields, self.rows, self.heads_sel, self.reduce = tuple(fields), rows, heads, reduce
        self.to, self.dtype, self.differentiable = to, dtype, differentiable
        self.budget_bytes, self.on_over_budget = budget_bytes, on_over_budget
        self.used_bytes, self.over_budget, self.fallbacks = 0, False, 0
        self.sink: Callable[[State, dict], dict] | None = None
        self._pending: dict | None = None
        self._raw: dict[str, torch.Tensor] = {}  # this call's per-query fields as computed, for "rows_only"
        self._running: dict[tuple[str, int], dict] = {}

    def _keep(self, name: str, x: torch.Tensor, per_query_head: bool) -> torch.Tensor:
        if not self.differentiable:
            x = x.detach()
        if per_query_head and self.heads_sel is not None:
            x = x[:, torch.as_tensor(list(self.heads_sel), dtype=torch.long, device=x.device)]
        if per_query_head and self.reduce in ("mean_heads", "max_heads"):
            x = x.mean(1) if self.reduce == "mean_heads" else x.amax(1)
        elif callable(self.reduce):
            x = self.reduce(name, x)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        return x.to(self.to)

    @staticmethod
    def _size(values: dict) -> int:
        return sum(v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor))

    def _fallback(self, values: dict) -> dict:
        """The record in its over-budget form (``on_over_budget``): averaged over the query heads, or float16."""
        self.fallbacks += 1
        if self.on_over_budget == "rows_only":
            kept = {n: v for n, v in values.items() if n not in ("q", "k", "v", "pattern", "lse", "head_out")}
            for name, raw in self._raw.items():
                idx = rows_index(self.rows, raw.shape[0], raw.shape[1], raw.shape[2], raw.device)
                flat = raw.unsqueeze(-1) if raw.dim() == 3 else raw  # lse (B, Hq, Nq) -> (B, Hq, Nq, 1)
                picked = take_rows(flat, idx)
                kept[name] = self._keep(name, picked.squeeze(-1) if raw.dim() == 3 else picked, True)
            return kept
        if self.on_over_budget == "offload":
            return {n: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for n, v in values.items()}
        heads_kept = self.reduce not in ("mean_heads", "max_heads")
        return {n: v.float().mean(1).to(v.dtype) if heads_kept and n in PER_QUERY_HEAD and isinstance(v, torch.Tensor)
                else v for n, v in values.items()}

    def _store(self, state: State, values: dict) -> None:
        if self.over_budget:
            return
        key = (getattr(state.site, "name", "?"), state.call)
        if self.reduce == "running_mean_steps" and key in self._running:  # fold into the running mean: no new bytes
            entry = self._running[key]
            n = entry["steps"] + 1
            for name, v in values.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    entry[name] = entry[name] + (v.to(entry[name].dtype) - entry[name]) / n
            entry["steps"], entry["step"] = n, state.step
            return
        size = self._size(values)
        if self.budget_bytes is not None and self.used_bytes + size > self.budget_bytes:
            if self.on_over_budget == "skip":
                self.over_budget = True
                return
            if self.on_over_budget in ("reduce_heads", "offload", "rows_only"):
                values = self._fallback(values)
                size = self._size(values)
            if self.used_bytes + size > self.budget_bytes:
                raise RuntimeError(f"Capture: budget_bytes={self.budget_bytes} exceeded ({self.used_bytes} stored, "
                                   f"{size} more at site {key[0]} step {state.step}, on_over_budget="
                                   f"{self.on_over_budget!r}); capture fewer fields, heads or sites, reduce over "
                                   "heads, or raise the budget")
        self.used_bytes += size
        assert self.sink is not None
        if self.reduce == "running_mean_steps":
            values["steps"] = 1
        entry = self.sink(state, values)
        if self.reduce == "running_mean_steps":
            self._running[key] = entry

    def kv(self, call: AttendCall, state: State) -> None:
        got: dict = {}
        self._raw = {}
        for name in ("q", "k", "v"):
            if name in self.fields:
                got[name] = self._keep(name, getattr(call, name), name == "q")
        if "q" in self.fields and self.on_over_budget == "rows_only":
            self._raw["q"] = call.q
        if "pattern" in self.fields:
            got["pattern"] = call.pattern
        self._pending = got

    def heads(self, out: torch.Tensor, lse: torch.Tensor, call: AttendCall, state: State) -> torch.Tensor:
        got = self._pending or {}
        self._pending = None
        if "lse" in self.fields:
            got["lse"] = self._keep("lse", lse, True)
        if "head_out" in self.fields:
            got["head_out"] = self._keep("head_out", out, True)
        if self.on_over_budget == "rows_only":
            self._raw.update({n: t for n, t in (("lse", lse), ("head_out", out)) if n in self.fields})
        if "probs" in self.fields or "scores" in self.fields:
            bias = call.bias if call.rpb is None else dense_rpb(call) + (0 if call.bias is None else call.bias)
            if "probs" in self.fields:
                p = prob_rows(call.q, call.k, lse, self.rows, call.pattern,  # type: ignore[arg-type]
                              scale=call.scale, key_padding_mask=call.key_padding_mask, bias=bias,
                              blocks=call.blocks, score_mod=call.score_mod)
                got["probs"] = self._keep("probs", p, True)
            if "scores" in self.fields:
                sc = score_rows(call.q, call.k, self.rows, call.pattern,  # type: ignore[arg-type]
                                scale=call.scale, key_padding_mask=call.key_padding_mask, bias=bias,
                                blocks=call.blocks, score_mod=call.score_mod)
                got["scores"] = self._keep("scores", sc, True)
        self._store(state, got)
        self._raw = {}
        return out


@dataclass
class Control:
    """The state of a ``control`` block: ``step`` (model calls so far, or as set), ``records`` (site name -> list
    of recorded dicts) and the sites it watches."""

    sites: list[Site]
    edits: list[tuple[SiteSelector, Edit, When | None]]
    step: int = 0
    records: dict[str, list[dict]] = field(default_factory=dict)
    _stack: list[Site] = field(default_factory=list)
    _calls: dict[tuple[str, int], int] = field(default_factory=dict)
    _auto_step: bool = True

    def set_step(self, step: int) -> None:
        """Set the step (e.g. the denoising step) and stop counting model calls as steps."""
        self.step, self._auto_step = int(step), False

    def _record(self, state: State, values: dict) -> dict:
        site = state.site
        assert isinstance(site, Site)
        entry = {"step": state.step, "call": state.call, **values}
        self.records.setdefault(site.name, []).append(entry)
        return entry

    def intercept(self, call: AttendCall) -> object:
        if not self._stack:
            return call.run()
        site = self._stack[-1]
        key = (site.name, self.step)
        state = State(site, self.step, self._calls.get(key, 0))
        self._calls[key] = state.call + 1
        active = [e for sel, e, when in self.edits if matches(sel, site) and (when is None or when(state))]
        if not active:
            return call.run()
        for e in active:
            if isinstance(e, Capture):
                e.sink = self._record
            e.kv(call, state)
        own = {id(e): b for e in active if (b := e.scores(call, state)) is not None}
        base_bias, base_rpb = call.bias, call.rpb
        rpb_dense: list[torch.Tensor] = []  # a table meeting biases: made dense once, when first needed

        def with_biases(extra: list[torch.Tensor]) -> None:
            """The call's own bias (and table) plus ``extra``, summed into one bias when there is any."""
            call.bias, call.rpb = base_bias, base_rpb
            if extra:
                if base_rpb is not None and not rpb_dense:
                    rpb_dense.append(dense_rpb(call))
                terms = [t for t in (*rpb_dense, base_bias) if t is not None] + extra
                call.bias, call.rpb = sum(terms[1:], terms[0]), None

        with_biases(list(own.values()))
        out, lse = call.run(return_lse=True)

        def rerun(edit: Edit | None = None, extra_bias: torch.Tensor | None = None, q: torch.Tensor | None = None,
                  k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            kept = [b for i, b in own.items() if edit is None or i != id(edit)]
            with_biases(kept + ([] if extra_bias is None else [extra_bias]))
            saved = call.q, call.k, call.v
            call.q, call.k, call.v = (x if x is not None else y for x, y in zip((q, k, v), saved))
            try:
                return call.run(return_lse=True)  # type: ignore[return-value]  # return_lse=True: a pair
            finally:
                call.q, call.k, call.v = saved
                with_biases(list(own.values()))

        state.rerun = rerun
        state.lse_without = lambda edit: rerun(edit)[1]
        for e in active:
            out = e.heads(out, lse, call, state)
        return (out, lse) if call.return_lse else out


@contextlib.contextmanager
def control(model: nn.Module, edits: Sequence[tuple[SiteSelector, Edit] | tuple[SiteSelector, Edit, When | None]],
            sites: Sequence[Site] | None = None) -> Iterator[Control]:
    """Apply ``edits`` (``(selector, edit)`` or ``(selector, edit, when)``, in this order) to the attention calls of
    ``model``'s sites inside the block.

    Args:
        model: The model; its sites are ``find_sites(model)`` unless ``sites`` is given.
        edits: Each a site selector (None, a name glob, a ``Site``, sites, or a predicate), an ``Edit`` and
            optionally ``when(state) -> bool`` (``steps``, ``layers``, ...).
        sites: The sites to watch (default: every site of the model).

    Yields:
        The ``Control``: ``step``, ``set_step``, ``records``.

    Raises:
        TypeError: An entry that is not ``(selector, Edit[, when])``.

    Examples:
        >>> import torch, nearfar as nf
        >>> from nearfar.steer import control, AblateHeads, Capture
        >>> lm = nf.TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="dense")
        >>> tokens = torch.randint(0, 64, (1, 12))
        >>> with control(lm, [("blocks.1.*", AblateHeads([0])), (None, Capture(("lse",)))]) as run:
        ...     _ = lm(tokens)
        >>> sorted(run.records), run.records["blocks.0.attn"][0]["lse"].shape
        (['blocks.0.attn', 'blocks.1.attn'], torch.Size([1, 2, 12]))
    """
    parsed: list[tuple[SiteSelector, Edit, When | None]] = []
    for entry in edits:
        if not isinstance(entry, tuple) or len(entry) not in (2, 3) or not isinstance(entry[1], Edit):
            raise TypeError(f"each edit must be (selector, Edit) or (selector, Edit, when), got {entry!r}")
        parsed.append((entry[0], entry[1], entry[2] if len(entry) == 3 else None))
    run = Control(list(sites) if sites is not None else find_sites(model), parsed)
    handles = []
    def enter(site: Site) -> Callable[[nn.Module, object], None]:
        def hook(m: nn.Module, a: object) -> None:
            run._stack.append(site)
        return hook

    def leave(m: nn.Module, a: object, o: object) -> None:
        run._stack.pop()

    for site in run.sites:
        handles.append(site.module.register_forward_pre_hook(enter(site)))
        handles.append(site.module.register_forward_hook(leave, always_call=True))

    def next_step(m: nn.Module, a: object, o: object) -> None:
        if run._auto_step:
            run.step += 1

    handles.append(model.register_forward_hook(next_step, always_call=True))
    try:
        with intercept_calls(run.intercept):
            yield run
    finally:
        for h in handles:
            h.remove()
