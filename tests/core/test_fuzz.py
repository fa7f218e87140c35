"""The fuzzer that stays: random attention problems against the float64 oracle, on every engine.

Each example draws a whole problem (pattern: positional, spatial 1D/2D/3D, windows, unions, intersections,
PerHead; self/cross/decode shapes, B in {1, 2, 3}, GQA, key padding, a dense bias or a relative-position table,
dtype), then a memory layout for every input (contiguous, (B, N, H, e) transposed, d-major, last dim strided,
every dim sliced, offset, expanded, a fused qkv projection's views, channels-last-derived), and sometimes garbage
(NaN, Inf, 1e30) in keys, values or queries: in padded keys, in random keys, in a query. The oracle is the
pairwise-masked float64 reference, in which a key a query may not attend cannot reach it; outputs, LSE and q/k/v/bias
gradients must match it (non-finite exactly where it is non-finite), on ``dense``, ``blocksparse``, ``partition``
(window patterns only: it must match the oracle or, where the windows are not whole at that size, refuse), ``auto``
and ``flex`` (forward only on CPU, run eagerly: compiling per shape would take minutes).

Profiles: by default (CI) ``FUZZ_EXAMPLES`` examples per engine, derandomized; ``NEARFAR_FUZZ=long`` runs 10,000
per engine with fresh random draws (release checks: minutes per engine, over an hour for eager Flex);
``NEARFAR_FUZZ=<n>`` runs n per engine.
"""

from __future__ import annotations

import math
import os

import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from strategies import problems
from test_engines import FLOOR, GRAD_TOL, TOL

import nearfar
from nearfar.plan import get_plan

FUZZ_EXAMPLES = 40
_MODE = os.environ.get("NEARFAR_FUZZ", "")
LONG = _MODE == "long"
EXAMPLES = 10_000 if LONG else int(_MODE) if _MODE.isdigit() else FUZZ_EXAMPLES
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not (LONG or _MODE.isdigit()), database=None,
                print_blob=True, suppress_health_check=list(HealthCheck))

LAYOUTS = ("contiguous", "bnhd", "d_major", "last_strided", "sliced", "offset", "expanded", "channels_last")
DTYPES = (torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64)
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)
#: half-precision gradients over many draws: a gradient that cancels to ~0 (identical keys, a global token) is
#: a sum of terms of size ~|k|·|dP| ~ 10 each rounded to bf16 (eps 2^-8) inside the kernels, so its error reaches
#: ~4e-2 with every engine and layout (checked against the contiguous call); the fixed bound is floored at 1
FUZZ_GRAD_TOL = {**GRAD_TOL, torch.bfloat16: 6e-2, torch.float16: 1e-2}


# ---------------------------------------------------------------------------------------------------------
# layouts: the same values (or, for "expanded", values repeated along a dim) in another memory layout
# ---------------------------------------------------------------------------------------------------------


def as_layout(t: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    def noise(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(t.dtype) if t.is_floating_point() else \
            torch.zeros(*shape, dtype=t.dtype)

    nd = t.dim()
    if kind == "bnhd" and nd >= 3:  # (B, N, H, e) memory seen as (B, H, N, e)
        return t.transpose(nd - 3, nd - 2).contiguous().transpose(nd - 3, nd - 2)
    if kind == "d_major" and nd >= 2:  # last dim slowest
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "last_strided":
        return torch.stack([t, noise(*t.shape)], -1)[..., 0]
    if kind == "sliced":  # every dim, the last included, a step-2 slice of a larger tensor
        big = noise(*(2 * s for s in t.shape))
        big[(slice(None, None, 2),) * nd] = t
        return big[(slice(None, None, 2),) * nd]
    if kind == "offset":
        big = noise(*(s + 1 for s in t.shape))
        big[(slice(1, None),) * nd] = t
        return big[(slice(1, None),) * nd]
    if kind == "expanded":  # a dim of stride 0 (the values of its first slice, repeated)
        dims = [i for i, s in enumerate(t.shape) if s > 1]
        if dims:
            return t.narrow(dims[0], 0, 1).expand(t.shape)
    if kind == "channels_last" and nd == 4:  # (B, H*e, N, 1) channels-last conv output split into heads
        b, h, n, e = t.shape
        x = torch.empty(b, h * e, n, 1, dtype=t.dtype).to(memory_format=torch.channels_last)
        x.copy_(t.transpose(-1, -2).reshape(b, h * e, n, 1))
        return x.squeeze(-1).unflatten(1, (h, e)).transpose(-1, -2)
    return t.contiguous()


def fused_qkv(q, k, v):
    """q, k, v as the views of one ``(B, N, H, d, 3)`` projection (last-dim stride 3), as in a fused qkv layer."""
    x = torch.stack([q, k, v], -1).permute(0, 2, 1, 3, 4).contiguous()
    return tuple(x.permute(4, 0, 2, 1, 3)[i] for i in range(3))


# ---------------------------------------------------------------------------------------------------------
# problems with tensors
# ---------------------------------------------------------------------------------------------------------


@st.composite
def cases(draw, engine):
    poison = draw(st.sampled_from(["none", "none", "none", "padding", "keys", "query"]))
    small = poison != "none"
    p = draw(problems(max_n=80 if small else 200, batches=(1, 2, 3), windows_only=engine == "partition",
                      kpm_kinds=("random", "empty_item") if poison == "padding" else ("none", "random", "empty_item")))
    dtypes = (torch.float32, torch.float64) if engine == "flex" else DTYPES
    p["dtype"] = draw(st.sampled_from(dtypes))
    p["poison"] = poison
    p["garbage"] = draw(st.sampled_from(GARBAGE))
    p["fused"] = p["hq"] == p["hkv"] and p["d"] == p["dv"] and p["nq"] == p["nk"] and draw(st.integers(0, 3)) == 0
    p["layouts"] = [draw(st.sampled_from(LAYOUTS)) for _ in range(6)]  # q, k, v, go, bias, kpm
    return p


def build(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = p["dtype"]

    def rnd(*shape, mult=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mult).to(dtype)

    b, hq, hkv, nq, nk = p["b"], p["hq"], p["hkv"], p["nq"], p["nk"]
    q, k, v = rnd(b, hq, nq, p["d"], mult=1.5), rnd(b, hkv, nk, p["d"], mult=1.5), rnd(b, hkv, nk, p["dv"])
    kpm = None
    if p["kpm_kind"] != "none":
        kpm = torch.rand(b, nk, generator=gen) > 0.25
        if p["kpm_kind"] == "empty_item":
            kpm[0] = False
        kpm = as_layout(kpm, p["layouts"][5], gen)  # before the garbage goes into the padded keys
    garbage = torch.tensor(p["garbage"]).to(dtype)  # 1e30 is Inf in float16
    if p["poison"] == "padding":
        k[~kpm[:, None].expand(b, hkv, nk)] = garbage
        v[~kpm[:, None].expand(b, hkv, nk)] = garbage
    elif p["poison"] == "keys":
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            bi, hi, j = (int(torch.randint(0, s, (), generator=gen)) for s in (b, hkv, nk))
            which = int(torch.randint(0, 3, (), generator=gen))
            if which != 1:
                k[bi, hi, j, int(torch.randint(0, p["d"], (), generator=gen))] = garbage
            if which != 0:
                v[bi, hi, j, int(torch.randint(0, p["dv"], (), generator=gen))] = garbage
    elif p["poison"] == "query":
        q[int(torch.randint(0, b, (), generator=gen)), int(torch.randint(0, hq, (), generator=gen)),
          int(torch.randint(0, nq, (), generator=gen))] = garbage
    lay = p["layouts"]
    if p["fused"]:
        q, k, v = fused_qkv(q, k, v)
    else:
        q, k, v = (as_layout(t, kind, gen) for t, kind in zip((q, k, v), lay[:3]))
    go = as_layout(rnd(b, hq, nq, p["dv"]), lay[3], gen)
    bias = None
    if p["bias_kind"] == "dense":
        bias = as_layout(rnd(*p["bias_shape"]), lay[4], gen)
    elif p["bias_kind"] == "rpb":
        _, ks, _ = p["rpb_info"]
        bias = as_layout(rnd(hq, *(2 * kk - 1 for kk in ks)), lay[4], gen)
    return q, k, v, go, kpm, bias


def oracle(p, q, k, v, go, kpm, bias):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    allowed = p["mask"] if p["mask"].dim() == 3 else p["mask"][None]
    allowed = allowed[None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    bias_dense = None
    if b64 is not None:
        bias_dense = b64 if p["bias_kind"] == "dense" else ref.rpb_bias(b64, *p["rpb_info"])[None]
    scale = p["scale"] if p["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = ref.pairwise_reference(*leaves, allowed, scale, bias_dense, return_lse=True)
    wrt = leaves + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad((out * go.double()).sum(), wrt, allow_unused=True)
    return out.detach(), lse.detach(), grads


def close(name, got, want, dtype, tol, floor=FLOOR):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    fin = torch.isfinite(want)
    bad = torch.isfinite(got) != fin
    assert not bad.any(), f"{name}: finite where the oracle is not, or the reverse, at {bad.nonzero()[:4].tolist()}"
    if fin.any():
        err = (got.double()[fin] - want[fin]).abs().max().item()
        bound = tol[dtype] * max(want[fin].abs().max().item(), floor)
        assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def reaching(p, q, k, v, kpm):
    """Rows ``(B, Hq, Nq)`` whose query is garbage or that may attend a garbage key or value (|x| > 1e20 or
    non-finite), and keys ``(B, Hkv, Nk)`` that no such row may attend."""
    def bad(x):
        return ~(x.double().abs() <= 1e20).all(-1)

    group = p["hq"] // p["hkv"]
    allowed = (p["mask"] if p["mask"].dim() == 3 else p["mask"][None])[None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    allowed = allowed.expand(p["b"], p["hq"], p["nq"], p["nk"])
    bad_k = (bad(k) | bad(v)).repeat_interleave(group, 1)
    rows = bad(q) | (allowed & bad_k[:, :, None, :]).any(-1)
    touched = (allowed & rows[..., None]).any(2)  # (B, Hq, Nk)
    return rows, ~touched.view(p["b"], p["hkv"], group, p["nk"]).any(2)


def check(p, engine):
    q, k, v, go, kpm, bias = build(p)
    rows = clean_keys = None
    if p["poison"] != "none" and math.isfinite(p["garbage"]):
        # huge finite garbage that a row may attend makes that row ill-conditioned (logits of 1e30, gradient terms
        # of 1e30 cancelling; SDPA's own kernel gives NaN there): such rows send no gradient, and only the rows
        # and keys they cannot reach are compared with the oracle
        rows, clean_keys = reaching(p, q, k, v, kpm)
        go = go.masked_fill(rows[..., None], 0.0)
    out_r, lse_r, grads_r = oracle(p, q, k, v, go, kpm, bias)
    dtype, tag = p["dtype"], f"[{engine} {p['dtype']} {p['layouts']} fused={p['fused']} {p['poison']}]"
    train = engine != "flex"
    leaves = [t.detach().requires_grad_(train) for t in (q, k, v)]
    b = bias.detach().requires_grad_(train and p["bias_grad"]) if bias is not None else None
    kw = {"rpb" if p["bias_kind"] == "rpb" else "bias": b}
    if engine == "partition" and not runs_on_partition(p):
        # a window pattern whose windows are not whole at this size: the engine must refuse it, before any work
        event("partition: refused (windows not whole)")
        with pytest.raises(ValueError, match="engine='partition' runs patterns whose token tiles attend only"):
            nearfar.attend(*leaves, p["pattern"], scale=p["scale"], key_padding_mask=kpm, engine=engine, **kw)
        return
    with torch.set_grad_enabled(train):
        out, lse = nearfar.attend(*leaves, p["pattern"], scale=p["scale"], key_padding_mask=kpm, engine=engine,
                                  return_lse=True, **kw)
    assert out.dtype == dtype, tag
    full_out = out
    if rows is not None:
        out, out_r, lse, lse_r = out[~rows], out_r[~rows], lse[~rows], lse_r[~rows]
    close(f"{tag} out", out, out_r, dtype, TOL)
    close(f"{tag} lse", lse, lse_r, dtype, TOL)
    if not train:
        return
    wrt = leaves + ([b] if b is not None and b.requires_grad else [])
    grads = torch.autograd.grad((full_out * go).sum(), wrt)
    # gradient terms (summed over up to Nq rows: dk of a global token) scale with scale * |q| * |k|: a bound floored
    # at 1 assumes the default scale (fp32 dk of GlobalTokens(1) at scale 1.0, d=24 is 3.3e-5 from the oracle)
    scale = p["scale"] if p["scale"] is not None else 1.0 / math.sqrt(p["d"])
    floor = max(FLOOR, scale * math.sqrt(p["d"]))
    for name, g, gr in zip(["dq", "dk", "dv", "dbias"], grads, grads_r):
        if rows is not None:
            if name == "dbias":
                continue
            keep = ~rows if name == "dq" else clean_keys
            g, gr = g[keep], gr[keep]
        close(f"{tag} {name}", g, gr, dtype, FUZZ_GRAD_TOL, floor)


def runs_on_partition(p) -> bool:
    """Whether every pattern of the problem is a partition at its size (what ``engine="partition"`` accepts)."""
    pattern = p["pattern"]
    parts = pattern.patterns if isinstance(pattern, nearfar.PerHead) and p["bias_kind"] == "none" else [pattern]
    return all(get_plan(x if x is not None else nearfar.Dense(), p["nq"], p["nk"]).partition for x in parts)


@pytest.mark.parametrize("engine", ["dense", "blocksparse", "partition", "auto", "flex"])
@FUZZ
@given(data=st.data())
def test_fuzz(engine, data, eager_flex):
    check(data.draw(cases(engine)), engine)


# ---------------------------------------------------------------------------------------------------------
# layouts: a view gives what its contiguous copy gives, forward and backward (no oracle needed)
# ---------------------------------------------------------------------------------------------------------


@st.composite
def layout_cases(draw):
    p = draw(problems(max_n=160, batches=(1, 3)))
    p.update(dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])), poison="none",
             garbage=0.0, layouts=[draw(st.sampled_from(LAYOUTS[1:])) for _ in range(6)])
    p["fused"] = p["hq"] == p["hkv"] and p["d"] == p["dv"] and p["nq"] == p["nk"] and draw(st.booleans())
    return p


def _run(p, engine, q, k, v, kpm, bias, go):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    b = bias.detach().requires_grad_() if bias is not None else None
    kw = {"rpb" if p["bias_kind"] == "rpb" else "bias": b}
    out, lse = nearfar.attend(*leaves, p["pattern"], scale=p["scale"], key_padding_mask=kpm, engine=engine,
                              return_lse=True, **kw)
    return [out, lse, *torch.autograd.grad((out * go).sum(), leaves + ([b] if b is not None else []))]


@pytest.mark.parametrize("engine", ["dense", "blocksparse", "auto"])
@settings(max_examples=max(25, EXAMPLES // 4), deadline=None, derandomize=not (LONG or _MODE.isdigit()),
          database=None, suppress_health_check=list(HealthCheck))
@given(p=layout_cases())
def test_views_equal_the_contiguous_call(engine, p):
    """q/k/v/bias/key_padding_mask as transposed, d-major, last-dim-strided, sliced (every dim), offset, expanded,
    fused-qkv and channels-last-derived views, B in {1, 3}: outputs, LSE and gradients equal the contiguous call's.
    (A strided last dim once gave outputs off by ~2 on the block-sparse engine, with B > 1 or a fused qkv.)"""
    q, k, v, go, kpm, bias = build(p)
    got = _run(p, engine, q, k, v, kpm, bias, go)
    want = _run(p, engine, *(t.contiguous() if t is not None else None for t in (q, k, v, kpm, bias, go)))
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    for name, a, b in zip(names, got, want):
        tol = TOL if name in ("out", "lse") else FUZZ_GRAD_TOL
        close(f"[{engine} {p['layouts']} fused={p['fused']}] {name}", a, b.double(), p["dtype"], tol)


@pytest.mark.parametrize("engine", ["dense", "blocksparse", "auto"])
def test_fused_qkv_views_of_the_issue(engine):
    """The audit's case: a fused projection ``(B, N, H, d, 3)`` viewed as ``(3, B, H, N, d)``, causal, 2048 tokens."""
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 2 * 16 * 3)
    qkv = x.view(2, 2048, 2, 16, 3).permute(4, 0, 2, 1, 3)
    out = nearfar.attend(qkv[0], qkv[1], qkv[2], nearfar.Causal(), engine=engine)
    want = nearfar.attend(*(t.contiguous() for t in qkv), nearfar.Causal(), engine=engine)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
