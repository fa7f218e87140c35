"""Correctness rows of ``gpu_check.py``: every engine against a float64 dense reference, and every registered
mechanism's fast paths against the same module on the dense engine. Each row catches its own failure.

Measures (ours): an engine row's error is ``max |got - ref| / max |ref|`` of the output and of each of the q, k, v
gradients (a fixed random cotangent), the reference being the dense engine in float64 on the same device from the
same (rounded) inputs; a mechanism row's is ``nearfar.bench.speed_gate.rel_err`` (over ``max(1, max |ref|)``) of its
output, input gradients and parameter gradients, the reference being the same module, same weights, inside
``nearfar.engine_override("dense")`` in float32 (the gate of ``nearfar bench``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import nearfar as nf
from nearfar import patterns as P
from nearfar.backends.blocksparse import blocksparse_attention
from nearfar.bench.speed_gate import GATE_1D, GATE_2D, GATE_SETTINGS, TOL, rel_err, run_layer
from nearfar.bench.timing import EXAMPLES
from nearfar.dispatch import choose_engine
from nearfar.plan import get_plan

#: relative tolerance of an engine row (error over max |reference|) per input dtype: fp32 engines differ from the
#: float64 reference by summation order only; bf16 engines round P (and on CUDA the kernels' accumulators) to bf16
TOLS = {torch.float32: 2e-4, torch.bfloat16: 4e-2}
#: relative tolerance of a mechanism row (float32, against the same module on the dense engine)
MECH_TOL = TOL
#: ``--quick`` counterparts of ``nearfar bench patterns``' examples (same names, same structure, tiny sizes)
TINY: dict[str, tuple[P.Pattern, int]] = {
    "neighborhood-1d k=129": (P.Neighborhood(33), 300),
    "dilated-neighborhood-1d k=33 d=4": (P.Neighborhood(9, dilation=4), 300),
    "neighborhood-2d 7x7": (P.Neighborhood(5, grid=(12, 12)), 144),
    "dilated-neighborhood-2d 7x7 d=3": (P.Neighborhood(3, dilation=3, grid=(12, 12)), 144),
    "causal-neighborhood-2d 9x9": (P.Neighborhood(5, is_causal=True, grid=(12, 12)), 144),
    "neighborhood-3d 5x5x5": (P.Neighborhood(3, grid=(4, 6, 6)), 144),
    "swin-shifted-window 8x8": (P.Blocks(4, shift=2, grid=(12, 12)), 144),
    "maxvit-grid 8x8": (P.Grid(4, grid=(12, 12)), 144),
    "sliding-window-256+sinks-4, causal": ((P.SlidingWindow(32) | P.Sinks(4)) & P.Causal(), 300),
    "global-tokens-16 | neighborhood-1d k=65": (P.GlobalTokens(4) | P.Neighborhood(17), 300),
    "strided-64 | sliding-window-64 (Sparse Transformer)": (P.Strided(16) | P.SlidingWindow(15), 300),
}


@dataclass
class Row:
    """One correctness check: ``status`` is "pass", "FAIL", "n/a" (the engine does not apply) or "skipped"."""

    section: str
    case: str
    engine: str
    dtype: str
    out_err: float | None = None
    grad_err: float | None = None
    tol: float | None = None
    status: str = "pass"
    note: str = ""

    def judge(self) -> Row:
        errs = [e for e in (self.out_err, self.grad_err) if e is not None]
        self.status = "pass" if errs and all(e <= (self.tol or 0.0) for e in errs) else "FAIL"
        return self


@dataclass
class Budget:
    """A wall-clock deadline: checks past it are reported as skipped, not run."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def over(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _failed(row: Row, exc: BaseException) -> Row:
    row.status, row.note = "FAIL", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:160]
    return row


def _blocksparse_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: P.Pattern,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """The block-sparse engine's plain-PyTorch chunk kernel (``kernel="matmul"``): what every non-CPU device runs."""
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.zeros(key_padding_mask.shape, device=q.device).masked_fill_(~key_padding_mask, float("-inf"))
    plan = get_plan(pattern, q.shape[2], k.shape[2], device=q.device)
    return blocksparse_attention(q, k, v, plan, 1.0 / math.sqrt(q.shape[-1]), kpm, None, False, kernel="matmul")[0]


def engines(device: torch.device, pattern: P.Pattern, n: int) -> list[str]:
    """The engines that apply to ``pattern`` at ``n`` tokens on ``device``: on CPU also the matmul kernel of the
    block-sparse engine (on other devices it is the block-sparse engine); "partition" for window patterns only."""
    names = ["dense", "blocksparse"] + (["blocksparse[matmul]"] if device.type == "cpu" else [])
    if pattern.may_partition and get_plan(pattern, n, n, device=device).partition:
        names.append("partition")
    return names + ["flex", "auto"]


@dataclass
class Case:
    """One attention problem of the pattern section."""

    name: str
    pattern: P.Pattern
    n: int
    heads: int = 4
    kv_heads: int = 4
    dim: int = 32
    batch: int = 1
    padded: bool = False


def pattern_cases(quick: bool) -> list[Case]:
    """``nearfar bench patterns``' examples at its correctness size (``--quick``: ``TINY``), then GQA and a key
    padding mask."""
    cases = []
    for ex in EXAMPLES:
        pattern, n = TINY[ex.name] if quick else ex.make(True)
        cases.append(Case(ex.name, pattern, n, heads=2 if quick else ex.heads, kv_heads=2 if quick else ex.heads,
                          dim=16 if quick else ex.dim))
    n = 300 if quick else 2048
    window = (P.SlidingWindow(32 if quick else 256) | P.Sinks(4)) & P.Causal()
    cases.append(Case("GQA Hq=4 Hkv=2, sliding-window+sinks causal", window, n, heads=4, kv_heads=2,
                      dim=16 if quick else 64, batch=2))
    cases.append(Case("key_padding_mask, neighborhood-1d", P.Neighborhood(33 if quick else 129), n, heads=2,
                      kv_heads=2, dim=16 if quick else 64, batch=2, padded=True))
    return cases


def _inputs(case: Case, dtype: torch.dtype,
            device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    shapes = [(case.batch, case.heads, case.n, case.dim)] + [(case.batch, case.kv_heads, case.n, case.dim)] * 2
    qkv = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    cot = torch.randn(shapes[0], generator=g).to(device, dtype)
    kpm = None
    if case.padded:  # every item keeps its first key; about a quarter of the others are dropped
        kpm = torch.rand(case.batch, case.n, generator=g) > 0.25
        kpm[:, 0] = True
        kpm = kpm.to(device)
    return qkv, cot, kpm


def _forward(engine: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: Case,
             kpm: torch.Tensor | None) -> torch.Tensor:
    if engine == "blocksparse[matmul]":
        return _blocksparse_matmul(q, k, v, case.pattern, kpm)
    return nf.attend(q, k, v, case.pattern, key_padding_mask=kpm, engine=engine)


def check_case(case: Case, dtype: torch.dtype, device: torch.device, budget: Budget,
               only: Sequence[str] | None = None) -> list[Row]:
    """Every applicable engine on ``case`` in ``dtype`` (or those of them in ``only``): output and q/k/v gradients
    against float64 dense."""
    dname = str(dtype).removeprefix("torch.")
    names = [e for e in engines(device, case.pattern, case.n) if only is None or e in only]
    if not names:
        return []
    if budget.over():
        return [Row("pattern", case.name, e, dname, status="skipped", note="time budget") for e in names]
    try:
        qkv, cot, kpm = _inputs(case, dtype, device)
        ref_in = [x.double().requires_grad_() for x in qkv]
        ref = nf.attend(*ref_in, case.pattern, key_padding_mask=kpm, engine="dense")
        ref_grads = torch.autograd.grad(ref, ref_in, cot.double())
    except Exception as exc:  # noqa: BLE001 - one broken case must not hide the others
        return [_failed(Row("pattern", case.name, "reference", dname), exc)]
    rows = []
    for engine in names:
        row = Row("pattern", case.name, engine, dname, tol=TOLS[dtype])
        if engine == "flex" and device.type == "cpu" and dtype != torch.float32:
            rows.append(Row("pattern", case.name, engine, dname, status="n/a",
                            note="CPU: fp32 only (eager FlexAttention takes ~0.5 s a call; GPUs run it compiled)"))
            continue
        forward_only = engine == "flex" and device.type != "cuda"  # FlexAttention trains on CUDA only
        try:
            leaves = [x.clone().requires_grad_(not forward_only) for x in qkv]
            with torch.set_grad_enabled(not forward_only):
                out = _forward(engine, *leaves, case, kpm)
            row.out_err = _err(out, ref)
            if engine == "auto":
                row.note = f"auto picked {choose_engine(qkv[0], case.pattern, case.n, case.n)}"
            if forward_only:
                row.note = "forward only (FlexAttention has no backward off CUDA)"
            else:
                grads = torch.autograd.grad(out, leaves, cot)
                row.grad_err = max(_err(a, b) for a, b in zip(grads, ref_grads))
            rows.append(row.judge())
        except Exception as exc:  # noqa: BLE001
            rows.append(_failed(row, exc))
    return rows


# ------------------------------------------------------------------------------------------------ mechanisms
def _small_settings() -> dict[str, dict]:
    """``tests/module_checks.SMALL``: the settings that fit a registered sequence layer into 24 tokens."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    sys.path.insert(0, tests)
    try:
        from module_checks import SMALL
    finally:
        sys.path.remove(tests)
    return SMALL


def mechanism_cases(quick: bool) -> Iterator[tuple[str, Callable[[], torch.nn.Module], tuple[int, ...],
                                                   tuple[int, ...] | None]]:
    """(label, build, x shape, context shape or None) for every registered layer and CAB pattern it claims:
    ``--quick``: the unit tests' sizes and ``SMALL`` settings (24 tokens, 14x14 maps); otherwise the speed gate's
    (``GATE_1D`` tokens, ``GATE_2D`` maps, ``GATE_SETTINGS``), where windows and blocks span several 128-token tiles
    of the block-sparse engine."""
    settings = _small_settings() if quick else GATE_SETTINGS
    n, grid, batch = (24, (14, 14), 2) if quick else (GATE_1D, GATE_2D, 1)
    for m in nf.mechanisms(kind="layer"):
        if "2d" in m.dims:
            pattern = next(iter(m.patterns))
            yield f"{m.name} 2d {pattern}", (lambda m=m, p=pattern: m.build(32, 2, p)), (batch, *grid, 32), None
        if "1d" in m.dims:
            kw = settings.get(m.name, {}) | ({"ndim": 1} if m.name == "neighborhood" else {})
            for p in m.patterns:
                ctx = (batch, 17 if quick else n // 2, 32) if p in ("NC", "CC") else None
                yield f"{m.name} 1d {p}", (lambda m=m, p=p, kw=kw: m.build(32, 2, p, **kw)), (batch, n, 32), ctx


def _module_grads(layer: torch.nn.Module, x: torch.Tensor, ctx: torch.Tensor | None,
                  engine: str) -> list[torch.Tensor]:
    """Output, input gradients and parameter gradients of a fixed random cotangent, inside ``engine_override``."""
    leaves = [t.clone().requires_grad_() for t in (x, ctx) if t is not None]
    params = [p for p in layer.parameters() if p.requires_grad]
    with nf.engine_override(engine) if engine != "auto" else contextlib.nullcontext():
        out = run_layer(layer, leaves[0], leaves[1] if ctx is not None else None, seed=0)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves + params, cot, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves + params)]


def check_mechanisms(device: torch.device, quick: bool, budget: Budget) -> list[Row]:
    """Each registered layer's "auto" and "blocksparse" paths against the dense engine, fp32, forward+backward."""
    rows = []
    for label, build, x_shape, ctx_shape in mechanism_cases(quick):
        if budget.over():
            rows += [Row("mechanism", label, e, "float32", status="skipped", note="time budget")
                     for e in ("auto", "blocksparse")]
            continue
        try:
            torch.manual_seed(0)
            layer = build().to(device).float().eval()
            g = torch.Generator().manual_seed(2)
            x = torch.randn(x_shape, generator=g).to(device)
            ctx = torch.randn(ctx_shape, generator=g).to(device) if ctx_shape is not None else None
            ref = _module_grads(layer, x, ctx, "dense")
        except Exception as exc:  # noqa: BLE001
            rows.append(_failed(Row("mechanism", label, "dense (reference)", "float32"), exc))
            continue
        for engine in ("auto", "blocksparse"):
            row = Row("mechanism", label, engine, "float32", tol=MECH_TOL)
            try:
                got = _module_grads(layer, x, ctx, engine)
                row.out_err = rel_err(got[0], ref[0])
                row.grad_err = max((rel_err(a, b) for a, b in zip(got[1:], ref[1:])), default=0.0)
                rows.append(row.judge())
            except Exception as exc:  # noqa: BLE001
                rows.append(_failed(row, exc))
    return rows


def skipped_models() -> list[Row]:
    """Registered whole language models are built from registered layers; they take token ids, not features."""
    return [Row("mechanism", m.name, "-", "-", status="n/a", note="a whole LM (kind='model'): its layers are checked")
            for m in nf.mechanisms(kind="model")]
