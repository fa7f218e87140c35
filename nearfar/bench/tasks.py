"""Quality-task generators of ``nearfar bench``: T1-T5 (our labels) and a 2D recall task.

Every generator is our own reimplementation of a published task: MQAR from Zoology (Arora et al., "Zoology: Measuring
and Improving Recall in Efficient Language Models", 2023, HazyResearch/zoology), selective copying as in S4 and Mamba
(Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023), passkey retrieval from Landmark
Attention (Mohtashami & Jaggi, 2023, epfml/landmark-attention), ListOps and Pathfinder from Long Range Arena (Tay et
al., ICLR 2021, google-research/long-range-arena; their generators in ``listops.py``, ``pathfinder.py``; the 2D recall
images in ``spatial_recall.py``). The only real text is the Python standard library's source, present on every machine,
so nothing is downloaded at run time. All randomness comes from the ``torch.Generator`` handed to ``Task.sample``, so a
batch is a pure function of the generator state.
"""

from __future__ import annotations

import functools
import math
import os
import random
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import check_int_range, check_real_range
from .listops import LISTOPS_TOKENS, listops_batch
from .pathfinder import MARKER, pathfinder_image
from .spatial_recall import distance_edges, recall_images

SIZES = ("full", "quick", "tiny")
SPLITS = ("train", "valid")


@dataclass
class Batch:
    """One batch of a task: inputs, per-position (or per-image) targets, and the scoring bin of each target."""

    inputs: torch.Tensor  # (B, L) int64 tokens; kind "2d": (B, H, W) int64 pixel levels
    targets: torch.Tensor  # (B, L) int64, -100 = not scored; kind "2d": (B,) labels
    bins: torch.Tensor  # like targets: bin index of each scored target, -1 = not scored


@dataclass(frozen=True)
class Task:
    """A generated quality task: what the model sees, how it is scored, and a sampler of batches.

    ``sample(batch_size, generator, split="train")`` is deterministic given the generator state; ``split="valid"``
    draws text tasks from held-out stdlib modules (the generated tasks ignore it: their generator seed separates
    train from evaluation data).
    """

    name: str
    pattern: str  # "CS" causal self, "NS" non-causal self
    kind: str  # "seq", "cls" or "2d"
    vocab_size: int
    num_classes: int
    seq_len: int
    grid: tuple[int, ...]
    bin_names: tuple[str, ...]
    metric: str  # "accuracy" or "bpc"
    description: str
    sample: Callable[..., Batch]


def _sampler(draw: Callable[[int, torch.Generator, str], Batch]) -> Callable[..., Batch]:
    """Wrap a batch drawer with the argument checks every task shares."""

    def sample(batch_size: int, generator: torch.Generator, split: str = "train") -> Batch:
        check_int_range(batch_size, "batch_size", 1, 1 << 20)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return draw(batch_size, generator, split)

    return sample


def _python_rng(generator: torch.Generator) -> random.Random:
    # the tree and curve generators are sequential loops; seeding them from the torch generator keeps one source
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


def _distance_bins(seq_len: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Edges and names of our distance bins [<=32, 33-96, 97-192, >192] at L=256, scaled with L so that
    every bin stays reachable at other lengths (seq_len >= 16 keeps the edges distinct)."""
    edges = tuple(max(1, round(e * seq_len / 256)) for e in (32, 96, 192))
    inner = [f"{a + 1}-{b}" for a, b in zip(edges, edges[1:])]
    return edges, (f"<={edges[0]}", *inner, f">{edges[-1]}")


def _bucket(values: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """Bin index of each value: value <= edges[0] -> 0, edges[0] < value <= edges[1] -> 1, ..."""
    return torch.bucketize(values, torch.tensor(edges, dtype=values.dtype))


def _place_queries(key_pos: torch.Tensor, free: torch.Tensor, edges: tuple[int, ...],
                   generator: torch.Generator) -> torch.Tensor:
    """A distinct free slot for every key, so that the key->query distances fill the bins about equally.

    Zoology draws the gaps from a power law, which leaves the far bins nearly empty. Here each row asks for
    n // bins queries per bin and serves the most constrained bin first (fewest free (key, slot) candidates), then
    draws a key in proportion to its candidates and a slot uniformly among them. A row with no candidate left in
    the bins it still needs takes any free key and slot (its bin is then whatever the distance gives).
    """
    batch, n = key_pos.shape
    seq_len, nb = free.shape[1], len(edges) + 1
    rows, free, big = torch.arange(batch), free.clone(), torch.iinfo(torch.long).max
    # distance range [near, far] of each bin, plus a last pseudo-bin "anywhere" for the fallback
    near = torch.tensor([1, *(e + 1 for e in edges), -seq_len])
    far = torch.tensor([*edges, seq_len, seq_len])
    k = key_pos[:, :, None]
    # candidate slots after the key, [k + near, k + far], and before it, [k - far, k - near]: (B, n, nb + 1, 2)
    start = torch.stack([k + near, k - far], -1).clamp(0, seq_len)
    stop = torch.stack([k + far, k - near], -1).clamp(-1, seq_len - 1) + 1
    offset = torch.randint(0, nb, (batch, 1), generator=generator)
    need = n // nb + ((torch.arange(nb + 1) - offset) % nb < n % nb).long()  # the remainder from a random bin
    key_free, slots = torch.ones(batch, n, dtype=torch.bool), torch.empty(batch, n, dtype=torch.long)
    for _ in range(n):
        cum = torch.nn.functional.pad(free.long().cumsum(1), (1, 0))  # cum[:, j] = free slots before j
        counts = (cum.gather(1, stop.flatten(1)) - cum.gather(1, start.flatten(1))).view(start.shape).clamp(min=0)
        counts *= key_free[:, :, None, None]
        per_bin = counts.sum((1, 3))
        score = torch.where((need > 0) & (per_bin > 0), per_bin, big)
        score[:, -1] = big - 1  # "anywhere" only when no needed bin has a candidate
        want = score.argmin(1)
        pick = torch.multinomial(counts[rows, :, want].flatten(1).float(), 1, generator=generator).squeeze(1)
        key, side = pick // 2, pick % 2
        lo, hi = start[rows, key, want, side], stop[rows, key, want, side]
        rank = (torch.rand(batch, generator=generator) * (cum[rows, hi] - cum[rows, lo])).long()
        slot = torch.searchsorted(cum, (cum[rows, lo] + rank + 1)[:, None]).squeeze(1) - 1  # the rank-th free one
        slots[rows, key] = slot
        key_free[rows, key] = False
        free[rows, slot] = False
        need[rows, want] -= 1
    return slots


def _mqar(seq_len: int, num_pairs: int, vocab_size: int, bidirectional: bool) -> Task:
    check_int_range(seq_len, "seq_len", 16, 1 << 16)
    check_int_range(vocab_size, "vocab_size", 8, 1 << 20)
    check_int_range(num_pairs, "num_pairs", 1, min(seq_len // 4, vocab_size // 2 - 2))
    edges, names = _distance_bins(seq_len)
    num_keys = vocab_size // 2 - 1  # keys are 1 .. V/2 - 1, values V/2 .. V - 1 (Zoology's split)

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        keys = torch.rand(batch, num_keys, generator=g).argsort(1) + 1  # distinct per row
        used, spare = keys[:, :num_pairs], keys[:, num_pairs:]
        values = torch.randint(vocab_size // 2, vocab_size, (batch, num_pairs), generator=g)
        if bidirectional:
            # num_pairs non-overlapping 2-slot pairs anywhere: choose places among L - n, shift the j-th by j
            compressed = torch.rand(batch, seq_len - num_pairs, generator=g).argsort(1)[:, :num_pairs]
            starts = compressed.sort(1).values + torch.arange(num_pairs)
        else:
            starts = (2 * torch.arange(num_pairs)).expand(batch, num_pairs)  # the context comes first
        taken = torch.zeros(batch, seq_len, dtype=torch.bool)
        taken.scatter_(1, starts, True)
        taken.scatter_(1, starts + 1, True)
        queries = _place_queries(starts, ~taken, edges, g)
        # filler = keys that have no pair, so the only "key value" bigrams in a row are the real pairs
        inputs = spare.gather(1, torch.randint(0, num_keys - num_pairs, (batch, seq_len), generator=g))
        inputs.scatter_(1, starts, used)
        inputs.scatter_(1, starts + 1, values)
        inputs.scatter_(1, queries, used)
        targets = torch.full((batch, seq_len), -100, dtype=torch.long).scatter_(1, queries, values)
        bins = torch.full((batch, seq_len), -1, dtype=torch.long)
        bins.scatter_(1, queries, _bucket((queries - starts).abs(), edges))
        return Batch(inputs, targets, bins)

    if bidirectional:
        name, pattern = "bidir_mqar", "NS"
        what = "T5a bidirectional recall: key-value pairs and queries anywhere (a query may precede its pair)"
    else:
        name, pattern = "mqar", "CS"
        what = "T1 multi-query associative recall (Zoology MQAR) with queries spread over key->query distance bins"
    return Task(name, pattern, "seq", vocab_size, vocab_size, seq_len, (), names, "accuracy",
                f"{what}; accuracy at query positions per distance bin; generated", _sampler(draw))


NON_ASCII = 128  # every byte >= 128 maps to this one id
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "ensurepip"}
_SKIP_MODULES = {"encodings"}  # generated codec tables: an eighth of the bytes and nothing like ordinary code


def stdlib_split(module: str) -> str:
    """The split of a top-level stdlib module: a stable hash sends about 1/7 of the bytes to "valid"."""
    return "valid" if zlib.crc32(module.encode()) % 8 == 0 else "train"


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, str], ...]:
    """(top-level module, path) of the stdlib .py files, tests and site-packages excluded, in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                module = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".py")
                if module not in _SKIP_MODULES:
                    found.append((module, path))
    if not found:
        raise RuntimeError(f"no Python standard-library source found under {root!r}")
    return tuple(found)


@functools.lru_cache(maxsize=2)
def stdlib_text(split: str) -> torch.Tensor:
    """The split's files joined by newlines, as uint8 ids: ASCII bytes keep their code, others -> NON_ASCII."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    chunks = []
    for module, path in stdlib_files():
        if stdlib_split(module) == split:
            with open(path, "rb") as f:
                chunks.append(f.read())
    data = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)
    return torch.where(data < 128, data, NON_ASCII)


def _windows(text: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(text) - length + 1, (batch, 1), generator=g)
    return text[starts + torch.arange(length)].long()


QUERY = 129  # the question marker before the answer; never occurs in the text
NEEDLE_HEAD, NEEDLE_TAIL = torch.tensor(list(b"#k=")), torch.tensor(list(b";"))  # "#k=<digits>;"


def _passkey(seq_len: int, num_digits: int, depths: tuple[float, ...]) -> Task:
    check_int_range(num_digits, "num_digits", 1, 8)
    needle_len = len(NEEDLE_HEAD) + num_digits + len(NEEDLE_TAIL)
    check_int_range(seq_len, "seq_len", needle_len + 2 * num_digits + 16, 1 << 16)
    if not isinstance(depths, (tuple, list)) or not depths:
        raise TypeError(f"depths must be a non-empty tuple of fractions in [0, 1], got {depths!r}")
    for i, d in enumerate(depths):
        check_real_range(d, f"depths[{i}]", 0, 1)
    hay_len = seq_len - num_digits  # text with the needle; then the query and the teacher-forced answer digits
    starts = torch.tensor([round(d * (hay_len - needle_len)) for d in depths])

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        hay = _windows(stdlib_text(split), batch, hay_len, g)
        depth = (torch.arange(batch) + torch.randint(0, len(depths), (1,), generator=g)) % len(depths)
        digits = torch.randint(0, 10, (batch, num_digits), generator=g) + ord("0")
        needle = torch.cat([NEEDLE_HEAD.expand(batch, -1), digits, NEEDLE_TAIL.expand(batch, -1)], 1)
        hay.scatter_(1, starts[depth][:, None] + torch.arange(needle_len), needle)  # written over the text
        inputs = torch.cat([hay, torch.full((batch, 1), QUERY), digits[:, :-1]], 1)
        targets = torch.full((batch, seq_len), -100, dtype=torch.long)
        targets[:, hay_len:] = digits
        bins = torch.full((batch, seq_len), -1, dtype=torch.long)
        bins[:, hay_len:] = depth[:, None]
        return Batch(inputs, targets, bins)

    names = tuple(f"depth {round(100 * d)}%" for d in depths)
    return Task("passkey", "CS", "seq", QUERY + 1, QUERY + 1, seq_len, (), names, "accuracy",
                f"T2 passkey retrieval: a '#k=<{num_digits} digits>;' needle at a depth of stdlib source text, "
                "the digits asked for at the end (loss on them only); accuracy per depth; held-out modules for "
                "split='valid'", _sampler(draw))


def _selective_copy(seq_len: int, num_tokens: int, vocab_size: int) -> Task:
    check_int_range(seq_len, "seq_len", 16, 1 << 16)
    check_int_range(num_tokens, "num_tokens", 1, seq_len // 4)
    check_int_range(vocab_size, "vocab_size", 4, 1 << 16)
    edges, names = _distance_bins(seq_len)
    data_len, marker = seq_len - num_tokens, vocab_size - 1  # noise is 0, tokens 1 .. V-2, then M markers

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        tokens = torch.randint(1, vocab_size - 1, (batch, num_tokens), generator=g)
        where = torch.rand(batch, data_len, generator=g).argsort(1)[:, :num_tokens].sort(1).values  # kept in order
        inputs = torch.zeros(batch, seq_len, dtype=torch.long).scatter_(1, where, tokens)
        inputs[:, data_len:] = marker
        targets = torch.full((batch, seq_len), -100, dtype=torch.long)
        targets[:, data_len:] = tokens
        bins = torch.full((batch, seq_len), -1, dtype=torch.long)
        bins[:, data_len:] = _bucket(data_len + torch.arange(num_tokens) - where, edges)
        return Batch(inputs, targets, bins)

    return Task("selective_copy", "CS", "seq", vocab_size, vocab_size, seq_len, (), names, "accuracy",
                f"T3 selective copying (S4/Mamba): {num_tokens} tokens scattered in order among noise, "
                "read back in order at the markers; accuracy per token->marker distance bin; generated",
                _sampler(draw))


def _char_lm(seq_len: int) -> Task:
    check_int_range(seq_len, "seq_len", 16, 1 << 16)
    edges = (seq_len // 8, seq_len // 2)  # 0-63, 64-255, 256-511 at L=512

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        window = _windows(stdlib_text(split), batch, seq_len + 1, g)
        bins = torch.bucketize(torch.arange(seq_len), torch.tensor(edges), right=True).expand(batch, -1)
        return Batch(window[:, :-1], window[:, 1:], bins.clone())

    names = (f"0-{edges[0] - 1}", f"{edges[0]}-{edges[1] - 1}", f"{edges[1]}-{seq_len - 1}")
    return Task("char_lm", "CS", "seq", NON_ASCII + 1, NON_ASCII + 1, seq_len, (), names, "bpc",
                "T4 next-character prediction on Python stdlib source (split by module); bits per character "
                "per position bucket", _sampler(draw))


def _listops(seq_len: int, max_depth: int, max_args: int, min_len: int | None, max_len: int | None,
             op_prob: float | None) -> Task:
    check_int_range(seq_len, "seq_len", 8, 1 << 16)
    check_int_range(max_depth, "max_depth", 1, 10)
    check_int_range(max_args, "max_args", 2, 10)
    longest = 1
    for _ in range(max_depth):
        longest = 2 + max_args * longest
    top = min(seq_len - 1, longest)
    max_len = check_int_range(top if max_len is None else max_len, "max_len", 4, top)
    min_len = check_int_range(max(4, max_len // 4) if min_len is None else min_len, "min_len", 4, max_len)
    if op_prob is None:
        # a median tree length near the geometric middle of [min_len, max_len]: measured with 5 arguments, the
        # median is 15 tokens at a mean branching (op_prob x mean arity) of 1.05 and doubles per +0.35
        branching = 1.05 + 0.35 * math.log2(math.sqrt(min_len * max_len) / 15)
        op_prob = min(0.9, max(0.05, branching / ((2 + max_args) / 2)))
    check_real_range(op_prob, "op_prob", 0, 1, open_low=True, open_high=True)

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        inputs, targets = listops_batch(_python_rng(g), batch, seq_len, min_len, max_len, max_depth, max_args, op_prob)
        return Batch(inputs, targets, torch.where(targets >= 0, 0, -1))

    return Task("listops", "NS", "cls", len(LISTOPS_TOKENS), 10, seq_len, (), ("all",), "accuracy",
                f"T5b ListOps-lite (LRA): MIN/MAX/MED/SM prefix expressions, depth <= {max_depth}, args <= "
                f"{max_args}, length {min_len}-{max_len}; the value 0-9 read at the CLS token; generated",
                _sampler(draw))


def _pathfinder(image_size: int, snake_length: int, num_distractors: int, distractor_length: int) -> Task:
    check_int_range(image_size, "image_size", 8, 256)
    check_int_range(snake_length, "snake_length", 4, image_size * image_size // 8)
    check_int_range(num_distractors, "num_distractors", 0, image_size * image_size // 16)
    check_int_range(distractor_length, "distractor_length", 2, snake_length)
    min_distance = max(3, image_size // 4)  # the markers never share a 3x3 window, and usually lie far apart
    side = image_size + 2

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        labels = (torch.randperm(batch, generator=g) % 2).long()  # balanced to within one image
        rng = _python_rng(g)
        images = b"".join(pathfinder_image(rng, image_size, snake_length, num_distractors, distractor_length,
                                            min_distance, bool(label)) for label in labels.tolist())
        pixels = torch.frombuffer(bytearray(images), dtype=torch.uint8).view(batch, side, side)
        return Batch(pixels[:, 1:-1, 1:-1].long(), labels, torch.zeros(batch, dtype=torch.long))

    return Task("pathfinder", "NS", "2d", MARKER + 1, 2, image_size * image_size, (image_size, image_size),
                ("all",), "accuracy", f"2D Pathfinder-lite (LRA): are the two markers on the same dashed curve of a "
                f"{image_size}x{image_size} image with distractor curves? generated", _sampler(draw))


def _spatial_recall(image_size: int, num_pairs: int, vocab_size: int) -> Task:
    check_int_range(image_size, "image_size", 8, 256)
    check_int_range(vocab_size, "vocab_size", 8, 1 << 16)
    check_int_range(num_pairs, "num_pairs", 1, min(vocab_size // 2 - 1, image_size * image_size // 8))
    edges = distance_edges(image_size)
    names = (f"<={edges[0]}", f"{edges[0] + 1}-{edges[1]}", f"{edges[1] + 1}-{edges[2]}", f">{edges[2]}")

    def draw(batch: int, g: torch.Generator, split: str) -> Batch:
        pixels, targets, distance = recall_images(batch, image_size, num_pairs, vocab_size, _python_rng(g))
        return Batch(pixels, targets, torch.where(targets == -100, -1, _bucket(distance, edges)))

    return Task("spatial_recall", "NS", "2d", vocab_size, vocab_size, image_size * image_size,
                (image_size, image_size), names, "accuracy", f"2D associative recall: {num_pairs} key-value pixel "
                f"pairs and a query per key on a blank {image_size}x{image_size} image; scored at the queries by "
                f"Chebyshev distance to the key; generated", _sampler(draw))


_MQAR_SIZES: dict[str, dict[str, object]] = {"full": dict(seq_len=256, num_pairs=16, vocab_size=256),
                                             "quick": dict(seq_len=128, num_pairs=8, vocab_size=128),
                                             "tiny": dict(seq_len=64, num_pairs=4, vocab_size=64)}
_TASKS: dict[str, tuple[Callable[..., Task], dict[str, dict[str, object]]]] = {  # builder, parameters by size
    "mqar": (functools.partial(_mqar, bidirectional=False), _MQAR_SIZES),
    "passkey": (_passkey, {size: dict(seq_len=length, num_digits=4, depths=(0.1, 0.3, 0.5, 0.7))
                           for size, length in zip(SIZES, (256, 128, 64))}),
    "selective_copy": (_selective_copy, {"full": dict(seq_len=256, num_tokens=8, vocab_size=16),
                                         "quick": dict(seq_len=128, num_tokens=8, vocab_size=16),
                                         "tiny": dict(seq_len=32, num_tokens=4, vocab_size=8)}),
    "char_lm": (_char_lm, {size: dict(seq_len=length) for size, length in zip(SIZES, (512, 128, 64))}),
    "bidir_mqar": (functools.partial(_mqar, bidirectional=True), _MQAR_SIZES),
    "listops": (_listops, {size: dict(seq_len=length, max_depth=5, max_args=5, min_len=None, max_len=None,
                                      op_prob=None) for size, length in zip(SIZES, (256, 128, 32))}),
    "pathfinder": (_pathfinder, {"full": dict(image_size=32, snake_length=24, num_distractors=5, distractor_length=8),
                                 **{size: dict(image_size=16, snake_length=12, num_distractors=2, distractor_length=4)
                                    for size in ("quick", "tiny")}}),
    "spatial_recall": (_spatial_recall, {size: dict(image_size=side, num_pairs=pairs, vocab_size=vocab)
                                         for size, side, pairs, vocab in zip(SIZES, (16, 16, 12), (8, 8, 4),
                                                                             (64, 64, 32))}),
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str, size: str = "full", **overrides: object) -> Task:
    """The task ``name`` at ``size`` ("full": the sizes of the full run, "quick": short runs, "tiny": unit tests), with
    any generator parameter overridden by keyword (e.g. ``get_task("mqar", seq_len=1024, num_pairs=64)``)."""
    if name not in _TASKS:
        raise ValueError(f"name must be one of {TASK_NAMES}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    build, sizes = _TASKS[name]
    params = dict(sizes[size])
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise TypeError(f"unknown parameter(s) {unknown} for task {name!r}; allowed: {sorted(params)}")
    params.update(overrides)
    return build(**params)
