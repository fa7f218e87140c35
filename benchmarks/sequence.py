"""Sequence mechanisms: prefill time vs length and per-token decode latency vs context length, each against dense
SDPA (causal prefill; decoding over a full KV cache), plus each decoding state's memory.

    python benchmarks/sequence.py                       # every registered causal 1D mechanism
    python benchmarks/sequence.py --mechanisms streaming_llm lightning --prefill 1024 4096 --decode 1024 131072

fp32, B=1, ``make(dim=256, num_heads=4)`` (head dim 64), no grad. Prefill: the layer's forward over N tokens,
median of interleaved rounds (one timed call each above 16K tokens) against a layer with the same projections
and ``F.scaled_dot_product_attention(is_causal=True)``. Decode: the layer's state is filled to a context of L
tokens (random keys/values, or a random linear-attention state, then the layer's own eviction), and one token is
decoded per step (median of 15 steps); the dense baseline decodes over an L-long KV cache. A bounded mechanism's
decode latency should stay flat: the "longest / shortest" column is its latency at the longest context over the
shortest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar  # noqa: E402
from nearfar.bench import interleave, load, median_ratio  # noqa: E402
from nearfar.modules.common import merge_heads, split_heads  # noqa: E402
from nearfar.modules.sequence import KVCache, RotaryEmbedding  # noqa: E402

DIM, HEADS = 256, 4
CCA_GROUP, CCA_WINDOW = 16, 1024  # CCA's make() defaults


class DenseCausal(torch.nn.Module):
    """The baseline layer: q/k/v/o projections, RoPE, fused causal SDPA; decoding over the full KV cache."""

    causal = True

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.rope = RotaryEmbedding(dim // num_heads)

    def new_cache(self, batch=1, device=None, dtype=None):
        return KVCache()

    def forward(self, x, cache=None):
        n = x.shape[1]
        start = 0 if cache is None else cache.length
        pos = torch.arange(start, start + n)
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache.append(k, v)
            out = F.scaled_dot_product_attention(q, cache.k, cache.v)  # one new token: every cached key is past
        return self.o_proj(merge_heads(out, (n,)))


def fill(layer, cache, length: int, heads: int, head_dim: int) -> None:
    """A decoding state as after ``length`` tokens (random contents, the layer's own eviction)."""
    if isinstance(cache, KVCache):
        for start in range(0, length, 8192):  # in slices, as a long prefill would, so eviction keeps it bounded
            n = min(8192, length - start)
            cache.append(torch.randn(1, heads, n, head_dim), torch.randn(1, heads, n, head_dim))
            cache.evict()
    elif hasattr(cache, "core_k"):  # CCA: a core token per group that left the window, and the raw window
        layer_heads = HEADS  # core tokens are per query head
        g, s = CCA_GROUP, CCA_WINDOW
        cores = max(0, (length - s) // g)
        cache.core_k = torch.randn(1, layer_heads, cores, head_dim) if cores else None
        cache.core_v = torch.randn(1, layer_heads, cores, head_dim) if cores else None
        cache.raw_start = cores * g
        raw = length - cache.raw_start
        cache.raw_q = torch.randn(1, layer_heads, raw, head_dim)
        cache.raw_k, cache.raw_v = torch.randn(1, heads, raw, head_dim), torch.randn(1, heads, raw, head_dim)
        cache.length = length
    elif hasattr(cache, "S"):  # linear-attention state: O(d^2), whatever the length
        cache.S.normal_()
        cache.length = length
    else:  # any other state: build it the honest way, by a chunked prefill of random inputs
        for start in range(0, length, 4096):
            layer(torch.randn(1, min(4096, length - start), DIM), cache=cache)


def state_bytes(cache) -> int:
    if isinstance(cache, KVCache):
        return cache.nbytes()
    tensors = []
    for value in vars(cache).values():  # tensors held directly or in lists (per-layer weights, momenta)
        tensors += value if isinstance(value, (list, tuple)) else [value]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def decode_ms(layer, length: int, steps: int = 15) -> tuple[float, int]:
    cache = layer.new_cache(1)
    kv_heads = getattr(layer, "num_kv_heads", HEADS)
    fill(layer, cache, length, kv_heads, DIM // HEADS)
    x = torch.randn(1, 1, DIM)
    layer(x, cache=cache)  # warm-up step
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        layer(x, cache=cache)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), state_bytes(cache)


def run(selected, prefill_lengths, decode_lengths, rounds):
    torch.manual_seed(0)
    dense = DenseCausal(DIM, HEADS).eval()
    results = []
    for mech in nearfar.mechanisms():
        if not hasattr(mech.cls, "new_cache") or (selected and mech.name not in selected):  # sequence layers
            continue
        layer = mech.make(DIM, HEADS).eval()
        res = dict(mechanism=mech.name, prefill={}, decode={}, load_before=load())
        with torch.no_grad():
            for n in prefill_lengths:
                x = torch.randn(1, n, DIM)
                long = n > 16384  # dense causal SDPA takes ~a minute at 64K on 2 cores: one timed call each
                t = interleave({"nearfar": lambda x=x, f=layer: f(x), "dense SDPA": lambda x=x: dense(x)},
                               rounds=1 if long else rounds, warmup=0 if long else 1)
                res["prefill"][n] = dict(ms=1e3 * statistics.median(t["nearfar"]),
                                         dense_ms=1e3 * statistics.median(t["dense SDPA"]),
                                         speedup=median_ratio(t, "dense SDPA", "nearfar"))
                print(json.dumps({"mechanism": mech.name, "prefill": n, **res["prefill"][n]}), file=sys.stderr,
                      flush=True)
            for n in decode_lengths:
                ms, nbytes = decode_ms(layer, n)
                dms, dbytes = decode_ms(dense, n)
                res["decode"][n] = dict(ms=ms, bytes=nbytes, dense_ms=dms, dense_bytes=dbytes)
                print(json.dumps({"mechanism": mech.name, "decode": n, **res["decode"][n]}), file=sys.stderr,
                      flush=True)
        res["load_after"] = load()
        results.append(res)
    return results


def markdown(results) -> str:
    out = []
    if results and results[0]["prefill"]:
        lengths = list(results[0]["prefill"])
        out += ["Prefill (forward over N tokens), ms and speed-up vs dense causal SDPA:", "",
                "| mechanism | " + " | ".join(f"N={n}" for n in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        for r in results:
            cells = [f"{p['ms']:.0f} ({p['speedup']:.2f}x)" for p in r["prefill"].values()]
            out.append(f"| {r['mechanism']} | " + " | ".join(cells) + " |")
        dense = [f"{p['dense_ms']:.0f}" for p in results[0]["prefill"].values()]
        out += ["| dense SDPA | " + " | ".join(dense) + " |", ""]
    if results and results[0]["decode"]:
        lengths = list(results[0]["decode"])
        out += ["Decode (one token), ms per token and decoding-state size:", "",
                "| mechanism | " + " | ".join(f"L={n}" for n in lengths) + " | longest / shortest |",
                "|---|" + "---:|" * (len(lengths) + 1)]
        for r in results:
            d = r["decode"]
            cells = [f"{v['ms']:.2f} ({v['bytes'] / 2**20:.1f} MiB)" for v in d.values()]
            flat = d[lengths[-1]]["ms"] / d[lengths[0]]["ms"]
            out.append(f"| {r['mechanism']} | " + " | ".join(cells) + f" | {flat:.2f}x |")
        d = results[0]["decode"]
        cells = [f"{v['dense_ms']:.2f} ({v['dense_bytes'] / 2**20:.1f} MiB)" for v in d.values()]
        flat = d[lengths[-1]]["dense_ms"] / d[lengths[0]]["dense_ms"]
        out.append("| dense SDPA, full KV cache | " + " | ".join(cells) + f" | {flat:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="*")
    ap.add_argument("--prefill", nargs="*", type=int, default=[1024, 4096, 16384, 65536])
    ap.add_argument("--decode", nargs="*", type=int, default=[1024, 8192, 32768, 131072])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = run(args.mechanisms, args.prefill, args.decode, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
