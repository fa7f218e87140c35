"""Memory and time of Hugging Face generation from a long prompt: dense attention against StreamingLLM's sinks +
window through ``nearfar.integrations.transformers_patterns`` (``use_pattern`` + ``SinkWindowCache``).

    python benchmarks/hf_bounded_generation.py                              # 8,192-token prompt, every setting
    python benchmarks/hf_bounded_generation.py --contexts 8192 65536        # and 64K (dense: many minutes on CPU)
    python benchmarks/hf_bounded_generation.py --contexts 65536 --settings bounded bounded-chunked

A random-init Llama-style model (hidden 256, 4 layers, 4 query heads, 2 KV heads, head dim 64, vocab 1,024,
``max_position_embeddings`` 131,072; float32, batch 1) prefills the prompt, then generates ``--new`` tokens greedily
(``model.generate`` continuing from the filled cache). Settings:

- ``sdpa``: ``attn_implementation="sdpa"``, transformers' ``DynamicCache`` (every key kept);
- ``nearfar``: ``attn_implementation="nearfar"`` (the model's causal attention on nearfar's engines), ``DynamicCache``;
- ``bounded``: ``use_pattern`` with ``(Sinks(4) | SlidingWindow(left=1023)) & Causal()`` and ``SinkWindowCache(4,
  1024)``, the prompt in one forward call (block-sparse prefill; activations O(prompt));
- ``bounded-chunked``: the same with the prompt in chunks of ``--chunk`` tokens (what ``generate(...,
  prefill_chunk_size=...)`` does): every call's memory is bounded by the chunk, not the prompt.

Each setting and prompt length runs in its own process twice: once timed (no meter; the process's peak RSS is
read there, ``ru_maxrss``: model, prompt and all) and once under ``nearfar.bench.speed_metrics.peak_bytes`` (the
largest total of tensors alive at once that each phase allocates: the cache included, parameters and the prompt
excluded; scratch inside one kernel, e.g. fused SDPA's blocks, is not seen). "cache" is the bytes of keys and
values the cache holds after generation. The table is markdown on stdout.

What to expect: with ``bounded-chunked`` the cache (``sinks + window - 1`` keys per layer), the prefill peak and
the RSS are the same at 8K and 64K; the decode peak grows only by ``generate``'s own O(prompt) bookkeeping (the
token ids and the 2D attention mask it extends each step, a few MiB at 64K). ``bounded`` prefills in one call:
no ``(N, N)`` map, but the forward pass's activations are O(N). The dense settings' cache grows with the prompt.
On this project's 2-core CPU machine (one thread) the dense settings at 64K take tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nearfar as nf  # noqa: E402
import nearfar.integrations.transformers  # noqa: E402, F401  (registers "nearfar")
from nearfar.bench.speed_metrics import peak_bytes  # noqa: E402
from nearfar.integrations.transformers_patterns import SinkWindowCache, use_pattern  # noqa: E402

SETTINGS = ("sdpa", "nearfar", "bounded", "bounded-chunked")
SINKS, WINDOW = 4, 1024
MIB = 2 ** 20


def _model(setting: str):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=131072)
    torch.manual_seed(0)
    impl = "sdpa" if setting == "sdpa" else "nearfar"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    if setting.startswith("bounded"):
        use_pattern(model, (nf.Sinks(SINKS) | nf.SlidingWindow(left=WINDOW - 1)) & nf.Causal())
    return model


def _cache(setting: str):
    import transformers

    return SinkWindowCache(SINKS, WINDOW) if setting.startswith("bounded") else transformers.DynamicCache()


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def one(setting: str, context: int, new: int, chunk: int, meter: bool) -> dict:
    """Prefill ``context`` tokens and generate ``new`` in this process; times, or the metered peaks with ``meter``."""
    torch.set_grad_enabled(False)
    model = _model(setting)
    # token 0 is generate's pad_token_id below: drawn from 1.. so no prompt token reads as padding
    ids = torch.randint(1, 1024, (1, context), generator=torch.Generator().manual_seed(0))
    outside = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids]}
    cache = _cache(setting)
    step = chunk if setting == "bounded-chunked" else context
    state: dict = {}

    def prefill():
        for start in range(0, context, step):
            out = model(ids[:, start:start + step], cache=cache, use_cache=True, logits_to_keep=1)
        state["first"] = out.logits[:, -1].argmax(-1, keepdim=True)

    def decode():
        seq = torch.cat([ids, state["first"]], 1)  # generate continues from the cache: it feeds the last token
        state["out"] = model.generate(seq, cache=cache, max_new_tokens=new - 1, do_sample=False, min_new_tokens=new - 1,
                                      pad_token_id=0)

    row: dict = {"setting": setting, "context": context, "new": new}
    if meter:
        row["prefill_peak_mib"] = peak_bytes(prefill, outside) / MIB
        row["decode_peak_mib"] = peak_bytes(decode, outside) / MIB
    else:
        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        decode()
        t2 = time.perf_counter()
        row.update(prefill_s=t1 - t0, decode_ms_per_token=1e3 * (t2 - t1) / max(new - 1, 1),
                   rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    assert state["out"].shape[1] == context + new
    row["cache_mib"] = _cache_bytes(cache) / MIB
    row["cache_len"] = max(layer.keys.shape[2] for layer in cache.layers)
    return row


def _run(setting: str, context: int, new: int, chunk: int, meter: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", setting, str(context), "--new", str(new), "--chunk", str(chunk)]
    done = subprocess.run(cmd + (["--meter"] if meter else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} at {context}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192])
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--new", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk of bounded-chunked (default 512)")
    ap.add_argument("--one", nargs=2, metavar=("SETTING", "CONTEXT"), help=argparse.SUPPRESS)
    ap.add_argument("--meter", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.new, args.chunk, args.meter)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama-style hidden 256, 4 layers, 4/2 "
          f"heads, float32, batch 1; {args.new} new tokens; bounded: {SINKS} sinks + {WINDOW} window; "
          f"chunk {args.chunk}\n")
    print("| setting | prompt | prefill s | decode ms/token | prefill peak MiB | decode peak MiB | cache MiB "
          "| cache keys/layer | RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        for setting in args.settings:
            timed = _run(setting, context, args.new, args.chunk, meter=False)
            metered = _run(setting, context, args.new, args.chunk, meter=True)
            print(f"| {setting} | {context} | {timed['prefill_s']:.2f} | {timed['decode_ms_per_token']:.1f} | "
                  f"{metered['prefill_peak_mib']:.1f} | {metered['decode_peak_mib']:.1f} | {timed['cache_mib']:.1f} "
                  f"| {timed['cache_len']} | {timed['rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
