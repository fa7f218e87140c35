"""``InjectKV``: keys and values of a source run injected into the target run's attention (replace, lerp, concat).

Editing methods in diffusion share self-attention between a reference and an edited image: MasaCtrl (Cao et al.,
ICCV 2023, arXiv 2304.08465) queries the source's keys and values, DiffUHaul (Avrahami et al., SIGGRAPH Asia
2024, arXiv 2406.01594) blends the source's and the target's keys/values over the denoising steps and moves them
with the object, IR-Diffusion and DCAL's pair-wise cross-attention (Zhu et al., CVPR 2022, arXiv 2205.02151)
concatenate another image's keys and values to the target's, and MAKIMA injects features on a mask. All of them
are the same edit of the call's K and V, so the call stays on its fused or sparse engine:

- ``mode="replace"``: the target's keys/values at the positions ``keys`` (default all) become the source's;
- ``"lerp"``: ``k + alpha (k_src - k)`` there (likewise ``v``), ``alpha`` a number or ``alpha(state)`` (a
  schedule over steps, layers, calls);
- ``"concat"``: the source's keys/values at ``keys`` are appended after the target's (the batch items that take
  nothing get padded, masked keys), and ``alpha`` scales their attention before normalisation (a score offset of
  ``log alpha`` on the appended columns; 1 adds nothing). Only for calls without a static pattern, selected blocks
  or relative-position table: a pattern's pairs are not defined past the call's own keys.

``transform(x)`` maps the source's keys and values ``(T, Hkv, N, d)`` first (e.g. a spatial shift of an image's
tokens, or a nearest-neighbour match: any differentiable function); for ``replace`` and ``lerp`` it must keep
``N``. The source is ``FromBatch`` (branches in one batch) or ``FromRecord`` (``Capture(("k", "v"))`` of an
earlier block); see ``nearfar.steer.sources``. What differs from the papers: they edit their own attention
processors; here the edit applies to any site, and the schedule, region and transform are arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..calls import AttendCall
from .edits import Edit, State, key_mask_of
from .sources import FromBatch, FromRecord, check_source, put, substitute

MODES = ("replace", "lerp", "concat")


class InjectKV(Edit):
    """Inject the source run's keys and values (see the module docstring).

    Args:
        source: ``FromBatch(source, target)`` or ``FromRecord(run.records)``.
        mode: ``"replace"``, ``"lerp"`` or ``"concat"``.
        alpha: Blend weight (lerp, in ``[0, 1]``) or attention weight of the appended keys (concat, > 0); a number
            or ``alpha(state) -> float``; not used by ``replace``.
        keys: Key positions to replace or blend (replace/lerp: of the target; concat: of the source, after the
            transform); a bool mask, positions or a slice; None: all.
        transform: ``fn(x) -> x'`` applied to the source's keys and values ``(T, Hkv, N, d)``.

    Raises:
        TypeError: ``source`` of another kind; ``transform`` or ``alpha`` not callable/number.
        ValueError: ``mode`` unknown; ``alpha`` out of range (at the call when scheduled); at the call: a transform
            that changes the length (replace/lerp), or concat on a call with a pattern, blocks or table.
    """

    def __init__(self, source: FromBatch | FromRecord, mode: str = "replace",
                 alpha: float | Callable[[State], float] = 1.0,
                 keys: torch.Tensor | Sequence[int] | slice | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.source = check_source(source)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not callable(alpha) and not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a number or a function of the state, got {type(alpha).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.mode, self.alpha, self.keys, self.transform = mode, alpha, keys, transform
        if not callable(alpha):
            self._weight(None)  # a fixed alpha is checked now
        self._appended: tuple[int, torch.Tensor] | None = None

    def _weight(self, state: State | None) -> float:
        a = float(self.alpha(state)) if callable(self.alpha) and state is not None else float(self.alpha)  # type: ignore[arg-type]
        lo_ok = a > 0 if self.mode == "concat" else a >= 0
        if not (lo_ok and (self.mode == "concat" or a <= 1) and a < float("inf")):
            want = "> 0 and finite" if self.mode == "concat" else "in [0, 1]"
            raise ValueError(f"alpha must be {want} for mode={self.mode!r}, got {a}")
        return a

    def _source(self, call: AttendCall, state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k_src, rows = substitute(self.source, "k", call.k, state)
        v_src, _ = substitute(self.source, "v", call.v, state)
        if self.transform is not None:
            k_src, v_src = self.transform(k_src), self.transform(v_src)
        return k_src, v_src, rows

    def kv(self, call: AttendCall, state: State) -> None:
        self._appended = None
        k_src, v_src, rows = self._source(call, state)
        nk = call.k.shape[2]
        if self.mode != "concat":
            if k_src.shape[2] != nk or v_src.shape[2] != nk:
                raise ValueError(f"InjectKV(mode={self.mode!r}): the transformed source has {k_src.shape[2]} keys, "
                                 f"the call {nk}; replace and lerp need the same length")
            where = None if self.keys is None else key_mask_of(self.keys, nk).to(call.k.device)
            if where is not None:  # (T|1, 1, Nk, 1): the target items' own masks when given per item
                where = (where[rows] if where.shape[0] > 1 else where)[:, None, :, None]
            a = 1.0 if self.mode == "replace" else self._weight(state)
            for name, src in (("k", k_src), ("v", v_src)):
                cur = getattr(call, name)
                old = cur[rows]
                new = old + a * (src.to(old.dtype) - old) if a != 1.0 else src.to(old.dtype)
                if where is not None:
                    new = torch.where(where, new, old)
                setattr(call, name, put(cur, rows, new))
            return
        if call.pattern is not None or call.blocks is not None or call.rpb is not None:
            raise ValueError("InjectKV(mode='concat') needs a call without a static pattern, selected blocks or "
                             "relative-position table: the appended keys have no place in them")
        if self.keys is not None:
            sel = key_mask_of(self.keys, k_src.shape[2])
            if sel.shape[0] != 1:
                raise ValueError("InjectKV(mode='concat'): keys must be one selection for every batch item")
            idx = sel[0].nonzero()[:, 0].to(k_src.device)
            k_src, v_src = k_src[:, :, idx], v_src[:, :, idx]
        b, m = call.k.shape[0], k_src.shape[2]
        extra_k = call.k.new_zeros(b, call.k.shape[1], m, call.k.shape[3]).index_copy(0, rows, k_src.to(call.k.dtype))
        extra_v = call.v.new_zeros(b, call.v.shape[1], m, call.v.shape[3]).index_copy(0, rows, v_src.to(call.v.dtype))
        call.k, call.v = torch.cat([call.k, extra_k], 2), torch.cat([call.v, extra_v], 2)
        took = torch.zeros(b, dtype=torch.bool, device=call.k.device).index_fill_(0, rows, True)
        kpm = call.key_padding_mask
        own = torch.ones(b, nk, dtype=torch.bool, device=call.k.device) if kpm is None else kpm
        call.key_padding_mask = torch.cat([own, took[:, None].expand(b, m)], 1)
        if call.bias is not None and call.bias.shape[-1] != 1:  # a bias over the keys: 0 on the appended ones
            pad = call.bias.new_zeros(*call.bias.shape[:-1], m)
            call.bias = torch.cat([call.bias, pad], -1)
        self._appended = (m, took)

    def scores(self, call: AttendCall, state: State) -> torch.Tensor | None:
        if self.mode != "concat" or self._appended is None:
            return None
        a = self._weight(state)
        if a == 1.0:
            return None
        m, _ = self._appended
        nk = call.k.shape[2]
        offset = torch.zeros(nk, dtype=torch.float32, device=call.k.device)
        offset[nk - m:] = float(torch.log(torch.tensor(a)))
        return offset
