"""Sequence mechanisms: prefill time vs length and per-token decode latency vs context length, each against dense
SDPA (causal prefill; decoding over a full KV cache), plus each decoding state's memory.

    python benchmarks/sequence.py                       # every registered causal 1D mechanism
    python benchmarks/sequence.py --mechanisms streaming_llm lightning --prefill 1024 4096 --decode 1024 131072
    python benchmarks/sequence.py --models-only          # Block Transformer and FIT-AR against a dense TinyLM

fp32, B=1, ``make(dim=256, num_heads=4)`` (head dim 64), no grad. Prefill: the layer's forward over N tokens,
median of interleaved rounds (one timed call each above 16K tokens) against a layer with the same projections
and ``F.scaled_dot_product_attention(is_causal=True)``. Decode: the layer's state is filled to a context of L
tokens (random keys/values, or a random linear-attention state, then the layer's own eviction), and one token is
decoded per step (median of 15 steps); the dense baseline decodes over an L-long KV cache. A bounded mechanism's
decode latency should stay flat: the "longest / shortest" column is its latency at the longest context over the
shortest.

Whole-model mechanisms (``kind="model"``: Block Transformer, FIT-AR) are timed as models against a dense
``TinyLM`` with the same width, heads and number of layers (``dim=256``, 4 heads, vocab 256): prefill is the
teacher-forced forward over N tokens (up to 16K: the dense model's 64K forward alone takes minutes); decode is
the per-token cost of continuing from a state filled to L tokens with random keys (Block Transformer: one block,
i.e. a block-decoder step and ``block_len`` token-decoder steps, divided by ``block_len``; FIT-AR: one whole
group, ``group_size`` tokens including the group's latent update, divided by ``group_size``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar  # noqa: E402
from nearfar.bench.timing import interleave, load, median_ratio  # noqa: E402
from nearfar.layers.dense import DenseAttention  # noqa: E402
from nearfar.layers.kv_cache import KVCache  # noqa: E402
from nearfar.models.tiny_lm import TinyLM  # noqa: E402

DIM, HEADS = 256, 4
CCA_GROUP, CCA_WINDOW = 16, 1024  # CCA's make() defaults


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
    dense = DenseAttention(DIM, HEADS, causal=True).eval()  # the registered "dense": fused causal SDPA
    results = []
    for mech in nearfar.mechanisms(kind="layer", pattern="CS"):
        if mech.name == "dense" or not hasattr(mech.cls, "new_cache") or (selected and mech.name not in selected):
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


def _random_keys(cache: KVCache, n: int, heads: int, head_dim: int) -> None:
    for start in range(0, n, 8192):
        m = min(8192, n - start)
        cache.append(torch.randn(1, heads, m, head_dim), torch.randn(1, heads, m, head_dim))


def model_decoder(name: str, model, length: int):
    """A per-token decode step function of ``model`` with a state of ``length`` tokens, its tokens per call and its
    state bytes."""
    tok, hd = torch.zeros(1, 1, dtype=torch.long), DIM // HEADS
    if name == "block_transformer":
        caches = model.new_caches(model.block_decoder, 1)
        for c in caches:
            _random_keys(c, length // model.block_len, HEADS, hd)
        h = torch.randn(1, DIM)

        def step():
            toks = model._generate_block(h)[0]
            model.contexts(model.embed_blocks(toks), caches)
        return step, model.block_len, sum(c.nbytes() for c in caches)
    if name == "fit_ar":
        cache = model.new_cache(1)
        for caches in cache.latent.values():
            for c in caches:
                _random_keys(c, length // model.group_size * model.latents_per_group, HEADS, hd)
        cache.length = length - length % model.group_size

        def step():
            for _ in range(model.group_size):
                model(tok, cache)
        return step, model.group_size, cache.nbytes()
    caches = model.new_caches(1)  # the dense TinyLM
    for c in caches:
        _random_keys(c, length, HEADS, hd)
    return (lambda: model(tok, caches)), 1, sum(c.nbytes() for c in caches)


def run_models(selected, prefill_lengths, decode_lengths, rounds):
    results = []
    for mech in nearfar.mechanisms(kind="model"):
        if selected and mech.name not in selected:
            continue
        torch.manual_seed(0)
        model = mech.make(DIM, HEADS).eval()
        depth = sum(isinstance(m, nearfar.modules.sequence.RotaryEmbedding) for m in model.modules())
        dense = TinyLM(256, dim=DIM, depth=depth, num_heads=HEADS, mechanism="dense").eval()
        res = dict(mechanism=f"{mech.name} ({depth} layers)", prefill={}, decode={}, load_before=load())
        with torch.no_grad():
            for n in prefill_lengths:
                tokens = torch.randint(0, 256, (1, n))
                t = interleave({"nearfar": lambda t=tokens, f=model: f(t),
                                "dense SDPA": lambda t=tokens, f=dense: f(t)}, rounds=rounds)
                res["prefill"][n] = dict(ms=1e3 * statistics.median(t["nearfar"]),
                                         dense_ms=1e3 * statistics.median(t["dense SDPA"]),
                                         speedup=median_ratio(t, "dense SDPA", "nearfar"))
                print(json.dumps({"model": mech.name, "prefill": n, **res["prefill"][n]}), file=sys.stderr, flush=True)
            for n in decode_lengths:
                row = {}
                for key, (name, m) in (("", (mech.name, model)), ("dense_", ("dense", dense))):
                    step, per_call, nbytes = model_decoder(name, m, n)
                    step()  # warm-up
                    t = interleave({"s": step}, rounds=5, warmup=0)["s"]
                    row[key + "ms"], row[key + "bytes"] = 1e3 * statistics.median(t) / per_call, nbytes
                res["decode"][n] = row
                print(json.dumps({"model": mech.name, "decode": n, **row}), file=sys.stderr, flush=True)
        res["load_after"] = load()
        results.append(res)
    return results


def markdown(results, per_row_baseline: bool = False) -> str:
    """Prefill and decode tables; the dense baseline is one row (layers share it) or, for whole models, a row
    after each model (each has its own dense TinyLM of the same depth)."""
    out = []

    def dense_rows(rows, cell, label):
        return [f"| {label} | " + " | ".join(cell(v) for v in rows.values())]

    if results and results[0]["prefill"]:
        lengths = list(results[0]["prefill"])
        out += ["Prefill (forward over N tokens), ms and speed-up vs dense causal SDPA:", "",
                "| mechanism | " + " | ".join(f"N={n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for r in results:
            out.append(f"| {r['mechanism']} | " + " | ".join(f"{p['ms']:.0f} ({p['speedup']:.2f}x)"
                                                             for p in r["prefill"].values()) + " |")
            if per_row_baseline or r is results[-1]:
                label = "dense TinyLM, same depth" if per_row_baseline else "dense SDPA"
                out += [row + " |" for row in dense_rows(r["prefill"], lambda p: f"{p['dense_ms']:.0f}", label)]
        out.append("")
    if results and results[0]["decode"]:
        lengths = list(results[0]["decode"])
        out += ["Decode (one token), ms per token and decoding-state size:", "",
                "| mechanism | " + " | ".join(f"L={n}" for n in lengths) + " | longest / shortest |",
                "|---|" + "---:|" * (len(lengths) + 1)]
        for r in results:
            d = r["decode"]
            for key, label in (("", r["mechanism"]), ("dense_", "dense, full KV cache")):
                if key and not (per_row_baseline or r is results[-1]):
                    continue
                cells = [f"{v[key + 'ms']:.2f} ({v[key + 'bytes'] / 2**20:.1f} MiB)" for v in d.values()]
                flat = d[lengths[-1]][key + "ms"] / d[lengths[0]][key + "ms"]
                out.append(f"| {label} | " + " | ".join(cells) + f" | {flat:.2f}x |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanisms", nargs="*")
    ap.add_argument("--prefill", nargs="*", type=int, default=[1024, 4096, 16384, 65536])
    ap.add_argument("--decode", nargs="*", type=int, default=[1024, 8192, 32768, 131072])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model-prefill", nargs="*", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--models-only", action="store_true", help="only Block Transformer / FIT-AR vs a dense TinyLM")
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results = [] if args.models_only else run(args.mechanisms, args.prefill, args.decode, args.rounds)
    models = [] if args.skip_models else run_models(args.mechanisms, args.model_prefill, args.decode, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": results, "models": models}, indent=1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}\n")
    if results:
        print(markdown(results))
    if models:
        print("\nWhole models against a dense TinyLM of the same width and depth:\n")
        print(markdown(models, per_row_baseline=True))


if __name__ == "__main__":
    main()
