"""The nearfar core benchmark: C1-C4 against dense SDPA, masked SDPA, compiled FlexAttention, NATTEN and
local-attention (the last two where installed), plus first-call cost and the 1M-token memory check.

    python benchmarks/run.py                 # everything, markdown to stdout
    python benchmarks/run.py --cases C1 C2   # a subset
    python benchmarks/run.py --skip-peers    # only nearfar and SDPA

fp32, B=1. Methods are timed in interleaved rounds with a rotating order (nearfar.bench.interleave);
each ratio is the median over rounds of the per-round ratio. Slow peers (masked SDPA, NATTEN's CPU path)
get a third of the rounds and no warm-up call (neither compiles), as said in the table. Compiled Flex is
timed warm; its compile time is reported apart. On CPU Flex and NATTEN are forward-only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import nearfar as nf
from nearfar import native
from nearfar.bench.timing import interleave, load, median_ratio

CASES = {
    "C1": dict(desc="1D Neighborhood(513), N=16384, H=4, d=64", pattern=lambda: nf.Neighborhood(513), n=16384,
               heads=4, dim=64, natten=("na1d", 513), local=dict(window_size=256, look_backward=1, look_forward=1)),
    "C2": dict(desc="2D Neighborhood((13,13)) on 128x128, H=4, d=32",
               pattern=lambda: nf.Neighborhood((13, 13), grid=(128, 128)), n=128 * 128, heads=4, dim=32,
               natten=("na2d", (13, 13)), grid=(128, 128)),
    "C3": dict(desc="3D Neighborhood((7,7,7)) on 16x32x32, H=2, d=32",
               pattern=lambda: nf.Neighborhood((7, 7, 7), grid=(16, 32, 32)), n=16 * 32 * 32, heads=2, dim=32,
               natten=("na3d", (7, 7, 7)), grid=(16, 32, 32)),
    "C4": dict(desc="(SlidingWindow(left=1024) | Sinks(4)) & Causal(), N=32768, H=4, d=64",
               pattern=lambda: (nf.SlidingWindow(left=1024) | nf.Sinks(4)) & nf.Causal(), n=32768, heads=4, dim=64,
               local=dict(window_size=1024, look_backward=1, look_forward=0, causal=True, exact_windowsize=True)),
}


def _natten(case, q, k, v):
    try:
        import natten
    except ImportError:
        return None
    fn_name, kernel = case["natten"]
    grid = case.get("grid", (case["n"],))
    b, h, _, d = q.shape

    def to_natten(x):  # (B, H, N, d) -> (B, *grid, H, d)
        return x.transpose(1, 2).reshape(b, *grid, h, d).contiguous()

    qn, kn, vn = to_natten(q), to_natten(k), to_natten(v)
    fn = getattr(natten, fn_name)
    return lambda: fn(qn, kn, vn, kernel_size=kernel)


def _local_attention(case, q, k, v):
    if "local" not in case:
        return None
    try:
        from local_attention import LocalAttention
    except ImportError:
        return None
    attn = LocalAttention(dim=q.shape[-1], autopad=True, use_rotary_pos_emb=False, **case["local"])
    return lambda: attn(q, k, v)


def _flex(pattern, q, k, v):
    """Compiled FlexAttention as a user would write it: the pattern as mask_mod on raster token order."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[2]
    t0 = time.perf_counter()
    block_mask = create_block_mask(lambda b, h, qi, ki: pattern.allowed(qi, ki, n, n), None, None, n, n,
                                   device="cpu")
    t_mask = time.perf_counter() - t0
    compiled = torch.compile(flex_attention, dynamic=False)
    t0 = time.perf_counter()
    compiled(q, k, v, block_mask=block_mask)
    t_compile = time.perf_counter() - t0
    return (lambda: compiled(q, k, v, block_mask=block_mask)), t_mask, t_compile


def _without_kernel(pattern, q, k, v):
    """The block-sparse engine's PyTorch path, as where the compiled kernel is not built (the issue-2 engine)."""
    def run():
        with native.disabled():
            nf.attend(q, k, v, pattern)
    return run


def run_case(name: str, rounds: int, peers: bool, out, dtype: torch.dtype = torch.float32) -> dict:
    case = CASES[name]
    pattern = case["pattern"]()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, case["heads"], case["n"], case["dim"], generator=g).to(dtype) for _ in range(3))
    res = dict(case=name, desc=case["desc"] + ("" if dtype == torch.float32 else f", {dtype}"), load_before=load())
    with torch.no_grad():
        ours = nf.attend(q, k, v, pattern)
        ref = nf.attend(q, k, v, pattern, engine="dense")
        res["max_abs_err_vs_masked_sdpa"] = float((ours - ref).abs().max())
        del ref
        fast = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                "nearfar": lambda: nf.attend(q, k, v, pattern)}
        if native.available():
            fast["nearfar without the kernel"] = _without_kernel(pattern, q, k, v)
        slow = {}
        if peers:
            mask = pattern.mask(case["n"], case["n"])
            slow["masked SDPA"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            try:
                flex_fn, t_mask, t_compile = _flex(pattern, q, k, v)
                fast["compiled Flex"] = flex_fn
                res["flex_block_mask_s"], res["flex_compile_s"] = t_mask, t_compile
            except Exception as e:  # noqa: BLE001 - report, don't die
                res["flex_error"] = repr(e)[:200]
            for label, maker in (("local-attention", _local_attention), ("NATTEN (CPU: eager Flex)", _natten)):
                if label.startswith("NATTEN") and "natten" not in case:
                    continue
                fn = maker(case, q, k, v)
                if fn is not None:
                    (fast if label == "local-attention" else slow)[label] = fn
        times = interleave(fast, rounds=rounds)
        if slow:
            slow_times = interleave({**slow, "nearfar": fast["nearfar"], "dense SDPA": fast["dense SDPA"]},
                                    rounds=max(1, rounds // 3), warmup=0)
    rows = []
    for m, t in times.items():
        rows.append((m, statistics.median(t) * 1e3, median_ratio(times, m, "nearfar"), len(t)))
    if slow:
        for m in slow:
            rows.append((m, statistics.median(slow_times[m]) * 1e3, median_ratio(slow_times, m, "nearfar"),
                         len(slow_times[m])))
    res["forward"] = rows
    res["speedup_vs_dense"] = median_ratio(times, "dense SDPA", "nearfar")
    if "compiled Flex" in times:
        res["speedup_vs_flex"] = median_ratio(times, "compiled Flex", "nearfar")
    if name in ("C1", "C2", "C3"):
        res["fwd_bwd_over_fwd"] = _fwd_bwd(pattern, q, k, v, rounds)
    res["load_after"] = load()
    out(_format(res))
    return res


def _fwd_bwd(pattern, q, k, v, rounds: int) -> dict:
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)

    def fb():
        torch.autograd.backward(nf.attend(qg, kg, vg, pattern), go)
        qg.grad = kg.grad = vg.grad = None

    def fwd():
        with torch.no_grad():
            nf.attend(q, k, v, pattern)

    times = interleave({"fwd": fwd, "fwd+bwd": fb}, rounds=rounds)
    return dict(fwd_ms=statistics.median(times["fwd"]) * 1e3, fwd_bwd_ms=statistics.median(times["fwd+bwd"]) * 1e3,
                ratio=median_ratio(times, "fwd+bwd", "fwd"))


def _format(res: dict) -> str:
    lines = [f"### {res['case']}: {res['desc']}", "",
             f"{res['load_before']} before, {res['load_after']} after; nearfar vs masked SDPA max abs err "
             f"{res['max_abs_err_vs_masked_sdpa']:.1e}", "",
             "| forward | median ms | time / nearfar | rounds |", "|---|---:|---:|---:|"]
    for m, ms, ratio, n in res["forward"]:
        lines.append(f"| {m} | {ms:.1f} | {ratio:.2f}x | {n} |")
    if "flex_compile_s" in res:
        lines.append(f"\nFlex: create_block_mask {res['flex_block_mask_s']:.1f} s, first (compiling) call "
                     f"{res['flex_compile_s']:.1f} s.")
    if "flex_error" in res:
        lines.append(f"\nFlex failed: {res['flex_error']}")
    if "fwd_bwd_over_fwd" in res:
        fb = res["fwd_bwd_over_fwd"]
        lines.append(f"\nnearfar forward {fb['fwd_ms']:.1f} ms, forward+backward {fb['fwd_bwd_ms']:.1f} ms: "
                     f"**{fb['ratio']:.2f}x** forward.")
    return "\n".join(lines) + "\n"


# ----- fresh-process checks -----
_FIRST_CALL = r"""
import json, sys, time, torch, nearfar as nf
sys.path.insert(0, "benchmarks")
from run import CASES
case = CASES[sys.argv[1]]
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, case["heads"], case["n"], case["dim"], generator=g) for _ in range(3))
p = case["pattern"]()
with torch.no_grad():
    t0 = time.perf_counter(); nf.attend(q, k, v, p); first = time.perf_counter() - t0
    warm = []
    for _ in range(5):
        t0 = time.perf_counter(); nf.attend(q, k, v, p); warm.append(time.perf_counter() - t0)
warm.sort()
print(json.dumps(dict(first=first, warm=warm[2])))
"""

_MEMORY = r"""
import json, time, torch, nearfar as nf
n = 1 << 20
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, n, 64, generator=g).requires_grad_() for _ in range(3))
t0 = time.perf_counter()
out = nf.attend(q, k, v, nf.Neighborhood(257))
out.backward(torch.ones_like(out))
dt = time.perf_counter() - t0
# VmHWM is this process' own peak; ru_maxrss would include the parent's pages from before exec. Read before the
# finiteness check, whose temporaries (isfinite forms |x|, a float copy of each gradient) are not the attention's
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
ok = all(torch.isfinite(x.grad).all() for x in (q, k, v))
print(json.dumps(dict(seconds=dt, peak_rss_mb=rss, finite=bool(ok))))
"""


def _subprocess(code: str, *args: str) -> dict:
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(res.stdout.strip().splitlines()[-1])


def first_call(cases, out) -> list[dict]:
    lines = ["### First call of the default engine in a fresh process", "",
             "| case | first call ms | warm call ms (median of 5) | first / warm |", "|---|---:|---:|---:|"]
    rows = []
    for name in cases:
        r = _subprocess(_FIRST_CALL, name)
        rows.append(dict(case=name, **r))
        lines.append(f"| {name} | {r['first'] * 1e3:.0f} | {r['warm'] * 1e3:.0f} | {r['first'] / r['warm']:.2f}x |")
    out("\n".join(lines) + "\n")
    return rows


def memory(out) -> dict:
    r = _subprocess(_MEMORY)
    out("### 1D Neighborhood(257), N = 1,048,576, H=1, d=64, forward+backward in a fresh process\n\n"
        f"whole-process peak RSS (VmHWM) **{r['peak_rss_mb']:.0f} MB**, {r['seconds']:.1f} s, "
        f"gradients finite: {r['finite']}\n")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-fresh", action="store_true", help="skip the first-call and memory subprocesses")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="q/k/v dtype of the cases (the fresh-process checks stay float32)")
    args = parser.parse_args()
    out = print
    out(f"## nearfar core benchmark\n\n`python benchmarks/run.py {' '.join(sys.argv[1:])}`\n\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"nearfar {nf.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    out(f"{native.status()}\n")
    dtype = getattr(torch, args.dtype)
    results = dict(cases=[run_case(c, args.rounds, not args.skip_peers, out, dtype) for c in args.cases])
    if not args.skip_fresh:
        results["first_call"] = first_call([c for c in args.cases if c in ("C1", "C2")], out)
        results["memory_1m"] = memory(out)
    out(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
