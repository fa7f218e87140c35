"""What each rank runs: the distributed ``attend`` on its shard against single-process ``nearfar.attend`` on the whole
sequence (outputs, LSE, dQ/dK/dV), with the bytes it sent and received.

Every rank builds the same global inputs from a seed, computes the single-process reference, runs the distributed
call on its own tokens and compares its slice. Padding tokens (beyond ``n_real``) hold random values: they must
not leak into any real output or gradient. Results come back as plain dicts (pickled to the parent).
"""

from __future__ import annotations

import dataclasses
import time

import torch

import nearfar as nf
import nearfar.distributed as nd


@dataclasses.dataclass
class Case:
    pattern: object
    layout: object
    heads: tuple[int, int] = (4, 2)
    d: int = 8
    kpm: bool = False
    method: str = "auto"
    dtype: torch.dtype = torch.float64
    extra: str | None = None  # "bias" (B, Hq, N, N), "bias_keys" (N,), "rpb" (the pattern's table), "blocks"
    sel: tuple = ()  # blocks: (q_block, kv_block, within, batch dim, head dim)
    overlap: bool = False


def _na2(grid, k, **kw):
    return nf.Neighborhood(k, grid=grid, **kw)


def cases(world: int) -> dict[str, Case]:
    L = nd.Layout
    c = {
        "na1d": Case(nf.Neighborhood(7), L.contiguous(37, world)),
        "na1d_dilated": Case(nf.Neighborhood(5, dilation=2), L.contiguous(41, world)),
        "na1d_causal": Case(nf.Neighborhood(7, is_causal=True), L.contiguous(37, world)),
        "na1d_strided": Case(nf.Neighborhood(7, stride=2), L.contiguous(37, world)),
        "na1d_wider_than_shard": Case(nf.Neighborhood(13), L.contiguous(max(5 * world, 14), world)),
        "na1d_fp32_mask": Case(nf.Neighborhood(7), L.contiguous(37, world), kpm=True, dtype=torch.float32),
        "na1d_mqa": Case(nf.Neighborhood(5), L.contiguous(30, world), heads=(4, 1)),
        "sliding_window": Case(nf.SlidingWindow(5, 3), L.contiguous(37, world)),
        "sliding_window_causal": Case(nf.SlidingWindow(6) & nf.Causal(), L.contiguous(37, world), kpm=True),
        "causal_ring_head_tail": Case(nf.Causal(), L.head_tail(37, world), kpm=True),
        "causal_ring_contiguous": Case(nf.Causal(), L.contiguous(37, world), dtype=torch.float32),
        "dense_ring": Case(None, L.contiguous(30, world), kpm=True),
        "causal_gather": Case(nf.Causal(), L.head_tail(37, world), method="gather"),
        "blocks_aligned": Case(nf.Blocks(8), L.contiguous(8 * world, world)),
        "blocks_shifted": Case(nf.Blocks(8, shift=4), L.contiguous(8 * world, world)),
        "grid": Case(nf.Grid(4), L.contiguous(32, world)),
        "sinks_window": Case((nf.SlidingWindow(3) | nf.Sinks(4)) & nf.Causal(), L.contiguous(37, world)),
        "global_window": Case(nf.SlidingWindow(2, 2) | nf.GlobalTokens(3), L.contiguous(37, world), kpm=True),
        "global_spanning": Case(nf.Neighborhood(5) | nf.GlobalTokens(12), L.contiguous(37, world)),
        "global_causal": Case((nf.SlidingWindow(3) | nf.GlobalTokens(2)) & nf.Causal(), L.contiguous(37, world)),
        "per_head": Case(nf.PerHead([nf.SlidingWindow(2), nf.SlidingWindow(5), nf.Sinks(2), nf.SlidingWindow(1, 3)])
                         & nf.Causal(), L.contiguous(37, world)),
        "na2d_slabs": Case(_na2((10, 6), (5, 3)), L.slabs((10, 6), world)),
        "na2d_dilated_causal": Case(_na2((13, 5), (3, 3), dilation=(2, 1), is_causal=(True, False)),
                                    L.slabs((13, 5), world)),
        "padding_rank": Case(nf.Neighborhood(5), L.contiguous(8 * world, world, n_real=8 * world - 8), kpm=True),
        "padding_ring": Case(nf.Causal(), L.head_tail(8 * world, world, n_real=8 * world - 8)),
        "bias_na1d": Case(nf.Neighborhood(7), L.contiguous(37, world), kpm=True, extra="bias"),
        "bias_keys_window": Case(nf.SlidingWindow(4) & nf.Causal(), L.head_tail(37, world), extra="bias_keys"),
        "bias_dense_gather": Case(None, L.contiguous(30, world, n_real=27), extra="bias"),
        "bias_sinks_fp32": Case(nf.SlidingWindow(3) | nf.Sinks(2), L.contiguous(37, world), extra="bias",
                                dtype=torch.float32),
        "rpb_na1d": Case(nf.Neighborhood(7, dilation=2), L.contiguous(37, world), extra="rpb"),
        "rpb_na2d": Case(_na2((10, 6), (5, 3)), L.slabs((10, 6), world), extra="rpb"),
        "rpb_blocks": Case(nf.Blocks(8, shift=4), L.contiguous(8 * world, world), extra="rpb"),
        "overlap_na1d": Case(nf.Neighborhood(7), L.contiguous(77, world), kpm=True, overlap=True),
        "overlap_na2d_rpb": Case(_na2((24, 4), (3, 3)), L.slabs((24, 4), world), extra="rpb", overlap=True),
        "overlap_window_head_tail": Case(nf.SlidingWindow(3) & nf.Causal(), L.head_tail(77, world), extra="bias",
                                         overlap=True, dtype=torch.float32),
        "overlap_sinks_padding": Case(nf.SlidingWindow(3) | nf.Sinks(2),
                                      L.contiguous(16 * world, world, n_real=16 * world - 5), overlap=True),
        "sel_window_causal": Case(nf.SlidingWindow(2) & nf.Causal(), L.contiguous(37, world), extra="blocks",
                                  sel=(4, 4, nf.Causal(), 2, 4)),
        "sel_only_head_tail": Case(None, L.head_tail(37, world), extra="blocks", sel=(3, 5, None, 2, 2)),
        "sel_na_padding_mask": Case(nf.Neighborhood(5), L.contiguous(8 * world, world, n_real=8 * world - 5),
                                    kpm=True, extra="blocks", sel=(5, 3, None, 1, 1), dtype=torch.float32),
    }
    if world >= 4:
        c["zero_tokens"] = Case(nf.Neighborhood(3), L.contiguous(3, world))
        c["zero_tokens_ring"] = Case(nf.Causal(), L.contiguous(3, world))
    return c


def _inputs(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    lay = case.layout
    n, nr = lay.n, lay.n_real
    hq, hkv = case.heads
    b, d = 2, case.d

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=case.dtype)

    q, k, v, w = r(b, hq, n, d), r(b, hkv, n, d), r(b, hkv, n, d), r(b, hq, n, d)
    kpm = torch.rand(b, n, generator=g) > 0.25 if case.kpm else None
    extra = None
    if case.extra == "bias":
        extra = r(b, hq, n, nr)
    elif case.extra == "bias_keys":
        extra = r(nr)
    elif case.extra == "rpb":
        extra = r(*case.pattern.rpb_shape(hq))
    elif case.extra == "blocks":  # random lists over the real tokens: counts, -1 entries, repeats, junk past the count
        qb, kb, within, bb, hb = case.sel
        nqb, nkb = -(-nr // qb), -(-nr // kb)
        num = torch.randint(0, 4, (bb, hb, nqb), generator=g)
        idx = torch.randint(-1, nkb, (bb, hb, nqb, 3), generator=g)
        extra = nf.SelectedBlocks(num.clamp(max=3), idx, q_block=qb, kv_block=kb, within=within)
    return q, k, v, w, kpm, nr, extra


def run_case(rank: int, world: int, name: str, case: Case, seed: int = 0) -> dict:
    import torch.distributed as dist

    q, k, v, w, kpm, nr, extra = _inputs(case, seed)
    lay = case.layout
    tol = dict(atol=1e-10, rtol=1e-10) if case.dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    # reference: the real tokens only, one process
    qr, kr, vr = (x[:, :, :nr].clone().requires_grad_() for x in (q, k, v))
    er = None
    if extra is not None and case.extra != "blocks":
        er = (extra[:, :, :nr] if case.extra == "bias" else extra).clone().requires_grad_()
    kw = {"rpb" if case.extra == "rpb" else "bias": er} if er is not None else {}
    if case.extra == "blocks":  # the global block lists, the same on every rank
        kw = {"blocks": extra}
    ref, ref_lse = nf.attend(qr, kr, vr, case.pattern, key_padding_mask=None if kpm is None else kpm[:, :nr],
                             return_lse=True, **kw)
    (ref * w[:, :, :nr]).sum().backward()

    def pad(x, fill=0.0):
        extra = list(x.shape)
        extra[2] = lay.n - nr
        return torch.cat([x.detach(), x.new_full(extra, fill)], 2)

    want = {"out": pad(ref), "lse": pad(ref_lse[..., None], float("-inf"))[..., 0].to(torch.float64),
            "dq": pad(qr.grad), "dk": pad(kr.grad), "dv": pad(vr.grad)}
    # distributed: this rank's shard (padding holds random values)
    ql, kl, vl = (nd.shard(x, lay, rank).requires_grad_() for x in (q, k, v))
    kpml = nd.shard(kpm, lay, rank, dim=1) if kpm is not None else None
    el, kw = None, {"blocks": extra} if case.extra == "blocks" else {}
    if extra is not None and case.extra != "blocks":  # bias: my rows; else shared
        el = (nd.shard(extra, lay, rank) if case.extra == "bias" else extra.clone()).requires_grad_()
        kw = {"rpb" if case.extra == "rpb" else "bias": el}
    t0 = time.perf_counter()
    with nd.count_bytes() as stats:
        out, lse = nd.attend(ql, kl, vl, case.pattern, layout=lay, key_padding_mask=kpml, return_lse=True,
                             method=case.method, overlap=case.overlap, **kw)
        (out * nd.shard(w, lay, rank)).sum().backward()
    seconds = time.perf_counter() - t0
    got = {"out": out.detach(), "lse": lse.to(torch.float64), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
    if el is not None:
        gb = el.grad if el.grad is not None else torch.zeros_like(el)
        if case.extra == "bias":
            want["dbias"] = pad(er.grad)
        else:  # each rank holds its queries' part of a shared tensor's gradient: summed, the whole of it
            dist.all_reduce(gb)
            want["dbias"] = er.grad
        got["dbias"] = gb
    errors = []
    for key, ref_full in want.items():
        exp = nd.shard(ref_full, lay, rank, dim=2) if key != "dbias" or case.extra == "bias" else ref_full
        g_ = got[key]
        if g_ is None:
            g_ = torch.zeros_like(exp)
        try:
            torch.testing.assert_close(g_.to(exp.dtype), exp, **tol)
        except AssertionError as err:
            errors.append(f"{key}: {str(err)[:400]}")
    plan = nd.make_plan(case.pattern, lay, extra if case.extra == "blocks" else None)
    traffic = plan.traffic(rank) if case.method != "ring" else None
    return {"errors": errors, "sent": dict(stats.sent), "recv": dict(stats.recv), "messages": dict(stats.messages),
            "traffic": traffic, "seconds": seconds, "waited": dict(stats.waited),
            "interior": plan.ranks[rank].interior}


def run_suite(rank: int, world: int, names: list[str] | None = None) -> dict[str, dict]:
    out = {}
    for name, case in cases(world).items():
        if names is not None and name not in names:
            continue
        try:
            out[name] = run_case(rank, world, name, case)
        except Exception as err:  # noqa: BLE001 - reported per case; the group may be broken after this
            import traceback

            out[name] = {"errors": [f"raised {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"]}
            break
    return out


def fail_mid_call(rank: int, world: int) -> dict:
    """Rank 1 raises inside ``attend`` (while packing its halo); every other rank must get a clear
    ``DistributedAttentionError`` from the same call, soon, never a hang."""
    import nearfar.distributed.halo as halo

    case = cases(world)["na1d"]
    q, k, v, _, _, _, _ = _inputs(case, 1)
    ql, kl, vl = (nd.shard(x, case.layout, rank) for x in (q, k, v))
    if rank == 1:
        def broken(x, ranges):
            raise ValueError("injected failure on rank 1")

        halo._take = broken
    t0 = time.perf_counter()
    try:
        nd.attend(ql, kl, vl, case.pattern, layout=case.layout)
    except Exception as err:  # noqa: BLE001 - the error is the result
        return {"error": type(err).__name__, "message": str(err), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def run_example(rank: int, world: int) -> float:
    """``examples/distributed_attend.py`` as written (smaller sequence)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "distributed_attend.py"
    spec = importlib.util.spec_from_file_location("distributed_attend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(rank, world, n=512)


def train_tiny_lm(rank: int, world: int, steps: int = 5) -> dict[str, list[tuple[float, float]]]:
    """``TinyLM`` trained by SGD on the sequence split over the ranks (``nearfar.distributed.sharded``, gradients
    summed across ranks as data parallelism would) next to the same model trained in one process: the loss curves
    ``[(sharded, one process), ...]`` per mechanism (float64)."""
    import copy

    import torch.distributed as dist
    import torch.nn.functional as F

    curves = {}
    for mech, kw, layout in (("streaming_llm", {"window": 6, "sinks": 2}, nd.Layout.contiguous(32, world)),
                             ("dense", {}, nd.Layout.head_tail(32, world))):
        torch.manual_seed(0)
        lm = nf.TinyLM(64, dim=32, depth=2, num_heads=4, mechanism=mech, **kw).double()
        ref = copy.deepcopy(lm)
        opt, opt_ref = torch.optim.SGD(lm.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
        tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))  # one batch, memorised
        curve = []
        for _ in range(steps):
            opt_ref.zero_grad()
            loss_ref = ref.loss(tokens)
            loss_ref.backward()
            opt_ref.step()
            opt.zero_grad()
            x, y = (nd.shard(t, layout, rank, dim=1) for t in (tokens[:, :-1], tokens[:, 1:]))
            with nd.sharded(layout):
                logits = lm(x)
            loss = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1), reduction="sum") / (2 * 32)
            loss.backward()
            for p in lm.parameters():
                dist.all_reduce(p.grad)
            total = loss.detach().clone()
            dist.all_reduce(total)
            opt.step()
            curve.append((total.item(), loss_ref.item()))
        curves[mech] = curve
    return curves


def bad_arguments(rank: int, world: int) -> list[tuple[str, str]]:
    """Each bad call's exception ``(type, message)``: raised on every rank before any message (the group stays
    usable, which the next call checks)."""
    lay = nd.Layout.contiguous(24, world)
    n_local = lay.size(rank)
    q = torch.randn(1, 2, n_local, 4)
    sel = nf.SelectedBlocks(torch.ones(1, 1, 6, dtype=torch.long), torch.zeros(1, 1, 6, 1, dtype=torch.long),
                            q_block=4)
    calls = [
        lambda: nd.attend(q, q, q, nf.Neighborhood(5), layout=lay, bias=torch.randn(1, 2, n_local, 23)),
        lambda: nd.attend(q, q, q, nf.SlidingWindow(2), layout=lay, rpb=torch.randn(2, 9)),
        lambda: nd.attend(q, q, q, nf.Neighborhood(5), layout=lay, rpb=torch.randn(2, 7)),
        lambda: nd.attend(q, q, q, nf.Neighborhood(5), layout=lay, rpb=torch.randn(2, 9), bias=torch.randn(24)),
        lambda: nd.attend(q, q, q, nf.Causal(), layout=lay, bias=torch.randn(24), method="ring"),
        lambda: nd.attend(q, q, q, nf.Neighborhood(5), layout=lay, blocks=sel, rpb=torch.randn(2, 9)),
        lambda: nd.attend(q, q, q, None, layout=lay, score_mod=lambda s, b: s),
        lambda: nd.attend(q, q, q, None, layout=lay, overlap=1),
    ]
    out = []
    for call in calls:
        try:
            call()
            out.append(("none", ""))
        except Exception as err:  # noqa: BLE001 - the error is the result
            out.append((type(err).__name__, str(err)))
    odd = nd.Layout((((0, 10),), ((10, 24),)), 24, 24) if world == 2 else lay
    try:  # a map of rows of 4 split after 10 tokens: rank 0 sees (2, 5), rank 1 (2, 7): not whole rows
        with nd.sharded(odd):
            nf.NeighborhoodAttention(8, 2, 3)(torch.randn(1, 2, odd.size(rank) // 2, 8))
        out.append(("none", ""))
    except Exception as err:  # noqa: BLE001 - the error is the result
        out.append((type(err).__name__, str(err)))
    ok = nd.attend(q, q, q, nf.Neighborhood(5), layout=lay)  # the group still works
    out.append(("ok", str(tuple(ok.shape))))
    return out


def suite_then_fail(rank: int, world: int, names: list[str] | None = None) -> dict:
    """The suite, the example and TinyLM, then (the group is broken after it) the failure injection."""
    return {"suite": run_suite(rank, world, names), "example": run_example(rank, world),
            "lm": train_tiny_lm(rank, world), "vision": vision_layers(rank, world),
            "bad": bad_arguments(rank, world), "failure": fail_mid_call(rank, world)}


def suite_and_lm(rank: int, world: int) -> dict:
    return {"suite": run_suite(rank, world), "lm": train_tiny_lm(rank, world), "vision": vision_layers(rank, world)}


def vision_layers(rank: int, world: int) -> dict[str, list[str]]:
    """Unmodified 1D/2D layers on a map split into slabs (``sharded``) against the same layer in one process: the
    output, the input's gradient and every parameter's gradient (summed over the ranks), float64. Slabs of 4 ranks
    are narrower than the 2D kernel (partial grids)."""
    layers = {
        "na2d_rpb": ((10, 6), lambda: nf.NeighborhoodAttention(16, 2, (5, 3))),
        "na2d_dilated": ((13, 5), lambda: nf.NeighborhoodAttention(16, 2, 3, dilation=(2, 1))),
        "na1d_rpb": ((37,), lambda: nf.NeighborhoodAttention(16, 2, 7, dilation=2, ndim=1)),
        "swin_shifted": ((20, 8), lambda: nf.WindowAttention(16, 2, 4, shift_size=2)),
        "swin": ((16, 6), lambda: nf.WindowAttention(16, 2, (4, 3))),
    }
    return {name: sharded_layer_errors(rank, world, grid, make) for name, (grid, make) in layers.items()}


def sharded_layer_errors(rank: int, world: int, grid: tuple[int, ...], make) -> list[str]:
    """``make()``'s layer (float64, parameters perturbed) inside ``sharded`` on this rank's slab of a ``(2, *grid,
    16)`` input, against the same layer in one process: output, input gradient and every parameter's gradient
    (summed over the ranks); the mismatches, empty when all agree to 1e-10."""
    import torch.distributed as dist

    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # tables start at 0 or near it: make them matter
    x = torch.randn(2, *grid, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, *grid, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_()
    (layer(xr) * w).sum().backward()
    want = {"out": layer(x).detach(), "dx": xr.grad}
    want.update({f"d{n}": p.grad.clone() for n, p in layer.named_parameters()})
    layer.zero_grad()
    lay = nd.Layout.slabs(grid, world)
    (lo, hi), = lay.ranges[rank]
    row = x[0, 0].numel() // 16
    a, b = lo // row, hi // row
    xl = x[:, a:b].clone().requires_grad_()
    with nd.sharded(lay):
        y = layer(xl)
    (y * w[:, a:b]).sum().backward()
    got = {"out": y.detach(), "dx": xl.grad}
    for n, p in layer.named_parameters():
        dist.all_reduce(p.grad)
        got[f"d{n}"] = p.grad
    errors = []
    for key, ref in want.items():
        exp = ref[:, a:b] if key in ("out", "dx") else ref
        try:
            torch.testing.assert_close(got[key], exp, atol=1e-10, rtol=1e-10)
        except AssertionError as err:
            errors.append(f"{key}: {str(err)[:300]}")
    return errors
