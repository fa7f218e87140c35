"""Where an edit takes another run's values from: items of the same batch, or what ``Capture`` recorded earlier.

Map replacement, K/V injection and head patching copy tensors from a *source* run into the *target* run at the
same site. Two kinds of source:

- ``FromBatch(source, target)``: branches in one batch (prompt-to-prompt's source/target prompts, clean and
  corrupted inputs, with and without the image): batch item ``target[i]`` takes the values of item ``source[i]``
  of the same call. Both runs happen in the one forward, so nothing is stored.
- ``FromRecord(records)``: the ``run.records`` of an earlier ``control`` block whose ``Capture`` recorded the
  fields needed (e.g. ``Capture(("q", "k"))``), matched by site name, step and call (or a fixed ``step``). Every
  batch item of the target takes the recorded values of the same batch position (a recorded batch of one is
  broadcast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .edits import State


@dataclass(frozen=True)
class FromBatch:
    """Batch item ``target[i]`` takes the values of batch item ``source[i]`` of the same call."""

    source: Sequence[int]
    target: Sequence[int]

    def __post_init__(self) -> None:
        if len(self.source) != len(self.target) or not len(self.target):
            raise ValueError(f"FromBatch: source and target must be non-empty and of one length, got "
                             f"{list(self.source)} and {list(self.target)}")
        if len(set(self.target)) != len(self.target):
            raise ValueError(f"FromBatch: target items must differ, got {list(self.target)}")


@dataclass(frozen=True)
class FromRecord:
    """Values ``Capture`` recorded in an earlier ``control`` block (its ``run.records``), found by site name, step
    (the current one, or ``step`` when given) and call within the step."""

    records: Mapping[str, list[dict]]
    step: int | None = None


Source = FromBatch | FromRecord


def check_source(source: object, name: str = "source") -> Source:
    if not isinstance(source, (FromBatch, FromRecord)):
        raise TypeError(f"{name} must be FromBatch(source, target) or FromRecord(run.records), got "
                        f"{type(source).__name__}")
    return source


def _batch_index(items: Sequence[int], b: int, name: str) -> torch.Tensor:
    idx = torch.as_tensor(list(items), dtype=torch.long)
    if int(idx.min()) < -b or int(idx.max()) >= b:
        raise ValueError(f"FromBatch: {name} items must be in [-{b}, {b}) for a batch of {b}, got {idx.tolist()}")
    return idx % b


def recorded(source: FromRecord, field: str, state: State) -> torch.Tensor:
    """The field recorded at this site, step and call; a clear error naming what is missing."""
    name = getattr(state.site, "name", "?")
    step = state.step if source.step is None else source.step
    for entry in source.records.get(name, []):
        if entry.get("step") == step and entry.get("call") == state.call:
            if field not in entry:
                raise KeyError(f"FromRecord: the record of site {name!r} step {step} call {state.call} has no "
                               f"{field!r} (capture it: Capture(({field!r}, ...)))")
            return entry[field]
    raise KeyError(f"FromRecord: no record of site {name!r} at step {step}, call {state.call}; recorded sites: "
                   f"{sorted(source.records)}")


def substitute(source: Source, field: str, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, rows)``: the source's values of ``field`` for the target batch items ``rows`` of ``x (B, ...)``;
    ``values`` has the shape of ``x[rows]`` (a recorded batch of one is expanded) and ``x``'s dtype and device."""
    b = x.shape[0]
    if isinstance(source, FromBatch):
        src, rows = _batch_index(source.source, b, "source"), _batch_index(source.target, b, "target")
        return x[src.to(x.device)], rows.to(x.device)
    values = recorded(source, field, state)
    if values.dim() != x.dim() or values.shape[0] not in (1, b) or values.shape[1:] != x.shape[1:]:
        raise ValueError(f"FromRecord: the recorded {field!r} has shape {tuple(values.shape)}; this call needs "
                         f"{tuple(x.shape)} (or a batch of one): record without head selection or reduction")
    return values.to(device=x.device, dtype=x.dtype).expand_as(x), torch.arange(b, device=x.device)


def put(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x`` with its batch items ``rows`` replaced by ``values`` (out of place, differentiable in both)."""
    return x.index_copy(0, rows, values.to(x.dtype))
