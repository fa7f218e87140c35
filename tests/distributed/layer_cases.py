"""Every registered mechanism inside ``nearfar.distributed.sharded`` against the same module in one process (what each
rank of ``test_sharded_layers`` runs): the output of its tokens, the input's gradient and every parameter's gradient
(summed over the ranks), float64, to 1e-9.

The cases come from the registry, so a newly registered mechanism is covered without editing this file: sequence
layers on ``(B, N, C)`` (small configs of ``module_checks.SMALL``) for each self pattern they claim, vision layers on a
``(B, H, W, C)`` map split into slabs, models on token ids. Layers with randomness in training mode run in eval
mode (the same forward, the gradients still flow).
"""

from __future__ import annotations

import dataclasses
import traceback

import torch
from module_checks import SMALL

import nearfar as nf
import nearfar.distributed as nd

DIM, HEADS, B = 32, 2, 2
N_SEQ, GRID = 22, (14, 14)
#: mechanisms that never run inside ``sharded``, each with its reason (the test checks the clear error instead)
REFUSED = {"block_transformer": "its logits start at the second block: they are not aligned with its input tokens"}


@dataclasses.dataclass
class LayerCase:
    mech: str
    pattern: str
    shape: tuple[int, ...]      # the global input's token shape (after the batch axis)
    layout: nd.Layout
    overrides: dict = dataclasses.field(default_factory=dict)


def _seq_layout(world: int, kind: str) -> nd.Layout:
    if kind == "head_tail":
        return nd.Layout.head_tail(N_SEQ, world)
    if kind == "padding":  # the last rank holds 3 padding tokens
        return nd.Layout.contiguous(N_SEQ + 3, world, n_real=N_SEQ)
    return nd.Layout.contiguous(N_SEQ, world)


#: the 4-rank cases (uneven shards): name -> layout kind of a sequence layer ("slabs" for maps: 4, 4, 3, 3 rows)
FOUR = {"dense-CS": "head_tail", "streaming_llm-CS": "padding", "neighborhood-NS": "contiguous",
        "moba-CS": "head_tail", "nsa-CS": "padding", "lightning-CS": "contiguous", "kdgqa-NS": "padding",
        "fit_ar": "contiguous", "swin_shifted": "slabs", "maxvit_block": "slabs", "agent": "slabs",
        "biformer": "slabs", "msa_conv": "slabs"}


def layer_cases(world: int, only: dict[str, str] | None = None) -> dict[str, LayerCase]:
    """Every registered mechanism (each self pattern of a sequence layer), or the ``only`` ones with their layout
    kinds; on 2 ranks the sequence layouts cycle through contiguous, head-tail and padded ones."""
    out: dict[str, LayerCase] = {}
    kinds = ("contiguous", "head_tail", "padding")
    for i, m in enumerate(nf.mechanisms()):
        self_patterns = [p for p in ("NS", "CS") if p in m.patterns]
        if m.kind == "model":
            out[m.name] = LayerCase(m.name, self_patterns[0], (N_SEQ + 2,), nd.Layout.contiguous(N_SEQ + 2, world),
                                    dict(vocab_size=16))
            continue
        if "1d" in m.dims:
            for j, p in enumerate(self_patterns):
                name = f"{m.name}-{p}"
                kind = (only or {}).get(name, kinds[(i + j) % 3])
                out[name] = LayerCase(m.name, p, (N_SEQ,), _seq_layout(world, kind), dict(SMALL.get(m.name, {})))
        if "2d" in m.dims:
            key = f"{m.name}-2d" if "1d" in m.dims else m.name
            out[key] = LayerCase(m.name, self_patterns[0], GRID, nd.Layout.slabs(GRID, world))
    return out if only is None else {k: v for k, v in out.items() if k in only}


def _build(case: LayerCase) -> torch.nn.Module:
    mech = {m.name: m for m in nf.mechanisms()}[case.mech]
    torch.manual_seed(0)
    layer = mech.build(DIM, HEADS, case.pattern, **case.overrides).double()
    with torch.no_grad():
        for p in layer.parameters():  # tables and gates start at 0 or near it: make them matter
            p.add_(0.05 * torch.randn_like(p))
    return layer.eval()


def _close(errors: list[str], key: str, got: torch.Tensor | None, want: torch.Tensor | None) -> None:
    if want is None and got is None:
        return
    if want is None or got is None:
        want = torch.zeros_like(got) if want is None else want
        got = torch.zeros_like(want) if got is None else got
    try:
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    except AssertionError as err:
        errors.append(f"{key}: {str(err)[:300]}")


def run_layer_case(rank: int, world: int, case: LayerCase) -> list[str]:
    import torch.distributed as dist

    layer = _build(case)
    lay = case.layout
    if case.mech in REFUSED:  # a clear error on every rank, before any message
        ids = torch.zeros(B, lay.size(rank), dtype=torch.long)
        try:
            with nd.sharded(lay):
                layer(ids)
        except ValueError as err:
            return [] if "does not run inside nearfar.distributed.sharded" in str(err) else [str(err)]
        return ["no error"]
    model = case.overrides.get("vocab_size") is not None
    g = torch.Generator().manual_seed(1)
    nr = lay.n_real
    full = (lay.n,) if len(case.shape) == 1 else case.shape
    if model:
        x = torch.randint(0, case.overrides["vocab_size"], (B, *full), generator=g)
    else:
        x = torch.randn(B, *full, DIM, dtype=torch.float64, generator=g)
    real = x[:, :nr] if len(case.shape) == 1 else x
    xr = real.clone().requires_grad_(not model)
    ref = layer(xr)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (ref * w).sum().backward()
    want = {"out": ref.detach(), "dx": xr.grad}
    want.update({f"d{n}": p.grad.clone() if p.grad is not None else None for n, p in layer.named_parameters()})
    layer.zero_grad(set_to_none=True)

    def mine(t: torch.Tensor, pad: float = 0.0) -> torch.Tensor:  # this rank's tokens, padded to the layout
        if len(case.shape) == 1 and lay.n > nr:
            t = torch.cat([t, t.new_full((t.shape[0], lay.n - nr, *t.shape[2:]), pad)], 1)
        flat = t.reshape(t.shape[0], lay.n, *t.shape[1 + len(full):])
        part = nd.shard(flat, lay, rank, dim=1)
        row = lay.n // full[0]
        return part.reshape(t.shape[0], part.shape[1] // row, *full[1:], *t.shape[1 + len(full):])

    # 1D: x holds the layout's padding tokens too, with random values (they must not leak)
    xl = (nd.shard(x, lay, rank, dim=1) if len(case.shape) == 1 else mine(x)).clone().requires_grad_(not model)
    with nd.sharded(lay):
        y = layer(xl)
    (y * mine(w)).sum().backward()
    got = {"out": y.detach(), "dx": xl.grad}
    for n, p in layer.named_parameters():
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(gp)
        got[f"d{n}"] = gp
    errors: list[str] = []
    for key, ref_t in want.items():
        exp = ref_t
        if key in ("out", "dx") and ref_t is not None:
            exp = mine(ref_t)
        if key == "dx" and model:
            continue
        if key == "out" and len(case.shape) == 1:  # padding tokens' outputs are not defined (a native layer's
            real = lay.positions(rank) < nr       # o_proj adds its bias to attend's 0); their gradients are: 0
            _close(errors, key, got[key][:, real], exp[:, real])
            continue
        _close(errors, key, got[key], exp)
    return errors


def run_layer_suite(rank: int, world: int, only: dict[str, str] | None = None,
                    names: list[str] | None = None) -> dict[str, list]:
    out: dict[str, list] = {}
    for name, case in layer_cases(world, only).items():
        if names is not None and name not in names:
            continue
        try:
            out[name] = run_layer_case(rank, world, case)
        except Exception as err:  # noqa: BLE001 - reported per case; the group may be broken after this
            out[name] = [f"raised {type(err).__name__}: {err}\n{traceback.format_exc()[-1200:]}"]
            break
    return out


def bad_calls_and_bytes(rank: int, world: int) -> dict:
    """Clear errors (the same on every rank, before any message) for what a whole-sequence layer cannot take inside
    ``sharded``, and the bytes its all-gather moves."""
    out: dict = {}
    lay = nd.Layout.contiguous(N_SEQ, world)
    moba = {m.name: m for m in nf.mechanisms()}["moba"].build(DIM, HEADS, "CS", **SMALL["moba"]).double()
    x = torch.randn(B, lay.size(rank), DIM, dtype=torch.float64)
    for key, call in {"cache": lambda: moba(x, cache=moba.new_cache(B)),
                      "tokens": lambda: moba(x[:, :3]),
                      # 6 tokens a rank as rows of 2, but the head-tail chunks of 12 tokens end at 3 and 9
                      "rows": lambda: {m.name: m for m in nf.mechanisms()}["agent"].make(DIM, HEADS).double()(
                          torch.randn(B, 3, 2, DIM, dtype=torch.float64))}.items():
        try:
            with nd.sharded(lay if key != "rows" else nd.Layout.head_tail(6 * world, world)):
                call()
            out[key] = "no error"
        except ValueError as err:
            out[key] = str(err)
    with nd.count_bytes() as stats, nd.sharded(lay):
        moba(x.requires_grad_()).sum().backward()
    out["bytes"] = (dict(stats.sent), dict(stats.recv))
    return out


def suite_2(rank: int, world: int) -> dict:
    return {"layers": run_layer_suite(rank, world), "bad": bad_calls_and_bytes(rank, world)}


def suite_4(rank: int, world: int) -> dict:
    return {"layers": run_layer_suite(rank, world, FOUR)}
