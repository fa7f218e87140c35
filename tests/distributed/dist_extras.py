"""What each rank runs for the combinations of issue 23: ``blocks`` with ``bias``; ``bias`` and ``blocks`` with the
global queries of ``GlobalTokens``; ``score_mod`` (global indices, captured tensors) on every path; Swin on slabs no
taller than its window. Each case compares this rank's output, LSE and every gradient with single-process
``nearfar.attend`` on the whole sequence (float64 to 1e-10, float32 to 2e-5), and returns its byte counts.
"""

from __future__ import annotations

import dataclasses

import torch

import nearfar as nf
import nearfar.distributed as nd


@dataclasses.dataclass
class X:
    pattern: object
    layout: object
    heads: tuple[int, int] = (4, 2)
    kpm: bool = False
    dtype: torch.dtype = torch.float64
    bias: str | None = None  # "rows" (B, Hq, N, N), "shared_rows" (1, Hq, 1, N), "keys" (N,), "row_col" (B,1,N,1)
    rpb: bool = False
    sel: tuple | None = None  # (q_block, kv_block, within, batch dim, head dim)
    mod: bool = False  # a score_mod reading global indices and two captured tensors (gradients checked)
    overlap: bool = False
    method: str = "auto"


def cases(world: int) -> dict[str, X]:
    L = nd.Layout
    na_g = nf.Neighborhood(5) | nf.GlobalTokens(12)  # the global rows span two ranks of 4
    return {
        "sel_bias_rows": X(nf.SlidingWindow(2) & nf.Causal(), L.contiguous(37, world), kpm=True, bias="rows",
                           sel=(4, 4, nf.Causal(), 2, 4)),
        "sel_bias_keys_head_tail": X(None, L.head_tail(37, world), bias="keys", sel=(3, 5, None, 2, 2),
                                     dtype=torch.float32),
        "sel_bias_padding": X(nf.Neighborhood(5), L.contiguous(8 * world, world, n_real=8 * world - 5), kpm=True,
                              bias="rows", sel=(5, 3, None, 1, 1)),
        "global_bias_rows": X(na_g, L.contiguous(37, world), kpm=True, bias="rows"),
        "global_bias_shared_rows": X(nf.SlidingWindow(2, 2) | nf.GlobalTokens(3), L.contiguous(37, world),
                                     bias="shared_rows", dtype=torch.float32),
        "global_bias_keys": X((nf.SlidingWindow(3) | nf.GlobalTokens(2)) & nf.Causal(), L.contiguous(37, world),
                              bias="keys"),
        "global_bias_row_col_mqa": X(na_g, L.contiguous(37, world), heads=(4, 1), bias="row_col"),
        "global_sel": X(nf.SlidingWindow(2) | nf.GlobalTokens(3), L.contiguous(37, world), kpm=True,
                        sel=(4, 4, None, 2, 2)),
        "global_sel_bias_mod_padding": X(nf.SlidingWindow(1) | nf.GlobalTokens(5),
                                         L.contiguous(10 * world, world, n_real=10 * world - 3), kpm=True,
                                         bias="rows", sel=(3, 4, nf.Causal(), 1, 4), mod=True),
        "global_bias_head_tail": X(nf.SlidingWindow(2) | nf.GlobalTokens(4), L.head_tail(37, world), bias="rows"),
        "mod_na1d": X(nf.Neighborhood(7), L.contiguous(37, world), kpm=True, mod=True),
        "mod_causal_gathers": X(nf.Causal(), L.head_tail(37, world), mod=True, dtype=torch.float32),
        "mod_dense_bias": X(None, L.contiguous(30, world, n_real=27), mod=True, bias="rows"),
        "mod_rpb_na2d": X(nf.Neighborhood((5, 3), grid=(10, 6)), L.slabs((10, 6), world), rpb=True, mod=True),
        "mod_global": X(nf.Neighborhood(5) | nf.GlobalTokens(12), L.contiguous(37, world), mod=True, kpm=True),
        "mod_sel": X(nf.SlidingWindow(2) & nf.Causal(), L.contiguous(37, world), mod=True, sel=(4, 4, nf.Causal(),
                                                                                                  2, 4)),
        "mod_overlap": X(nf.SlidingWindow(3) & nf.Causal(), L.contiguous(77, world), mod=True, overlap=True,
                         bias="rows"),
        "zero_tokens_global_bias_mod": X(nf.SlidingWindow(1) | nf.GlobalTokens(2), L.contiguous(3, world),
                                         bias="rows", mod=True),
        "padding_rank_global_bias_sel": X(nf.SlidingWindow(1) | nf.GlobalTokens(3),
                                          L.contiguous(8 * world, world, n_real=8 * world - 8), kpm=True, bias="rows",
                                          sel=(4, 4, None, 2, 2), mod=True),
        "overlap_global_bias_mod": X(nf.SlidingWindow(2) | nf.GlobalTokens(3), L.contiguous(77, world), bias="rows",
                                     overlap=True, mod=True),
        "mod_per_head": X(nf.PerHead([nf.SlidingWindow(2), nf.Sinks(2), nf.GlobalTokens(3), nf.SlidingWindow(1, 3)]),
                          L.contiguous(37, world), mod=True, bias="rows"),
    }


def make_mod(slopes: torch.Tensor, table: torch.Tensor, n: int):
    """ALiBi-like slopes per head and a table over ``q_idx - kv_idx``: wrong unless the indices are global."""
    def mod(s, b, h, qi, ki):
        return s - slopes[h] * (qi - ki).abs().to(s.dtype) + table[qi - ki + n - 1] + 0.01 * b.to(s.dtype)
    return mod


def _inputs(case: X, seed: int):
    g = torch.Generator().manual_seed(seed)
    lay = case.layout
    n, nr = lay.n, lay.n_real
    (hq, hkv), b, d = case.heads, 2, 8

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=case.dtype)

    t = {"q": r(b, hq, n, d), "k": r(b, hkv, n, d), "v": r(b, hkv, n, d), "w": r(b, hq, n, d)}
    t["kpm"] = torch.rand(b, n, generator=g) > 0.25 if case.kpm else None
    shapes = {"rows": (b, hq, n, nr), "shared_rows": (1, hq, 1, nr), "keys": (nr,), "row_col": (b, 1, n, 1)}
    t["bias"] = r(*shapes[case.bias]) if case.bias else None
    t["rpb"] = r(*case.pattern.rpb_shape(hq)) if case.rpb else None
    t["slopes"], t["table"] = (r(hq) * 0.3, r(2 * nr - 1)) if case.mod else (None, None)
    t["sel"] = None
    if case.sel:
        qb, kb, within, bb, hb = case.sel
        nqb, nkb = -(-nr // qb), -(-nr // kb)
        num = torch.randint(0, 4, (bb, hb, nqb), generator=g)
        idx = torch.randint(-1, nkb, (bb, hb, nqb, 3), generator=g)
        t["sel"] = nf.SelectedBlocks(num.clamp(max=3), idx, q_block=qb, kv_block=kb, within=within)
    return t


def run_case(rank: int, world: int, case: X, seed: int = 0) -> dict:
    import torch.distributed as dist

    t = _inputs(case, seed)
    lay = case.layout
    nr = lay.n_real
    tol = dict(atol=1e-10, rtol=1e-10) if case.dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    per_row = case.bias in ("rows", "row_col")
    # one process, the real tokens
    ref = {k: t[k][:, :, :nr].clone().requires_grad_() for k in ("q", "k", "v")}
    shared = {k: t[k].clone().requires_grad_() for k in ("slopes", "table", "rpb") if t[k] is not None}
    if case.bias:
        shared["bias"] = (t["bias"][:, :, :nr] if per_row else t["bias"]).clone().requires_grad_()
    kw = {"bias": shared.get("bias"), "rpb": shared.get("rpb"), "blocks": t["sel"],
          "score_mod": make_mod(shared["slopes"], shared["table"], nr) if case.mod else None}
    kpm = t["kpm"]
    out, lse = nf.attend(ref["q"], ref["k"], ref["v"], case.pattern, return_lse=True,
                         key_padding_mask=None if kpm is None else kpm[:, :nr], **kw)
    (out * t["w"][:, :, :nr]).sum().backward()

    def pad(x, fill=0.0):
        shape = list(x.shape)
        shape[2] = lay.n - nr
        return nd.shard(torch.cat([x.detach(), x.new_full(shape, fill)], 2), lay, rank)

    want = {"out": pad(out), "lse": pad(lse[..., None], float("-inf"))[..., 0].double()}
    want.update({f"d{k}": pad(ref[k].grad) for k in ("q", "k", "v")})
    # distributed: this rank's tokens
    loc = {k: nd.shard(t[k], lay, rank).requires_grad_() for k in ("q", "k", "v")}
    mine = {k: t[k].clone().requires_grad_() for k in ("slopes", "table", "rpb") if t[k] is not None}
    if case.bias:
        mine["bias"] = (nd.shard(t["bias"], lay, rank) if per_row else t["bias"].clone()).requires_grad_()
    kw = {"bias": mine.get("bias"), "rpb": mine.get("rpb"), "blocks": t["sel"],
          "score_mod": make_mod(mine["slopes"], mine["table"], nr) if case.mod else None}
    with nd.count_bytes() as stats:
        o, l_ = nd.attend(loc["q"], loc["k"], loc["v"], case.pattern, layout=lay, return_lse=True,
                          key_padding_mask=None if kpm is None else nd.shard(kpm, lay, rank, dim=1),
                          method=case.method, overlap=case.overlap, **kw)
        (o * nd.shard(t["w"], lay, rank)).sum().backward()
    got = {"out": o.detach(), "lse": l_.double()}
    got.update({f"d{k}": loc[k].grad for k in ("q", "k", "v")})
    for key, x in mine.items():
        gx = x.grad if x.grad is not None else torch.zeros_like(x)
        if key == "bias" and per_row:
            want["dbias"] = pad(shared["bias"].grad)
        else:  # a replicated tensor: each rank holds its part of the gradient
            dist.all_reduce(gx)
            want[f"d{key}"] = shared[key].grad
        got[f"d{key}"] = gx
    errors = []
    for key, exp in want.items():
        g_ = got[key] if got[key] is not None else torch.zeros_like(exp)
        try:
            torch.testing.assert_close(g_.to(exp.dtype), exp, **tol)
        except AssertionError as err:
            errors.append(f"{key}: {str(err)[:400]}")
    plan = nd.make_plan(case.pattern, lay, t["sel"])
    bb = mine["bias"].shape if case.bias else None
    return {"errors": errors, "sent": dict(stats.sent), "recv": dict(stats.recv), "traffic": plan.traffic(rank),
            "bias_shape": bb, "global_rows": plan.global_rows}


def swin_short_slabs(rank: int, world: int) -> list[str]:
    """Swin's shifted windows (window 4, shift 2) on an 8x6 map: slabs of 4 rows on 2 ranks, 2 rows on 4, no taller
    than the window; inside ``sharded`` the layer keeps the map's window and shift."""
    from dist_cases import sharded_layer_errors

    return sharded_layer_errors(rank, world, (8, 6), lambda: nf.WindowAttention(16, 2, 4, shift_size=2))


def sharded_score_mod(rank: int, world: int) -> list[str]:
    """A layer's ``attend`` call with a ``score_mod`` inside ``sharded`` gets global indices."""
    lay = nd.Layout.contiguous(29, world)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 29, 8, generator=g, dtype=torch.float64) for _ in range(3))
    slopes, table = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(57, generator=g,
                                                                                  dtype=torch.float64)
    mod = make_mod(slopes, table, 29)
    ref = nf.attend(q, k, v, nf.SlidingWindow(3) & nf.Causal(), score_mod=mod)
    with nd.sharded(lay):
        out = nf.attend(*(nd.shard(x, lay, rank) for x in (q, k, v)), nf.SlidingWindow(3) & nf.Causal(),
                        score_mod=mod)
    try:
        torch.testing.assert_close(out, nd.shard(ref, lay, rank), atol=1e-10, rtol=1e-10)
    except AssertionError as err:
        return [str(err)[:300]]
    return []


def run_all(rank: int, world: int) -> dict:
    out: dict = {"cases": {}}
    for name, case in cases(world).items():
        try:
            out["cases"][name] = run_case(rank, world, case)
        except Exception as err:  # noqa: BLE001 - reported per case; the group may be broken after this
            import traceback

            out["cases"][name] = {"errors": [f"raised {type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"]}
            return out
    out["swin"] = swin_short_slabs(rank, world)
    out["sharded_mod"] = sharded_score_mod(rank, world)
    return out
