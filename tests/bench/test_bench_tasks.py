"""Tests of the quality-task generators (nearfar/bench/tasks.py): interface, determinism, bins, and each task's
targets checked against an independent reading of its inputs (no training)."""

from __future__ import annotations

import re
import statistics
from collections import deque

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nearfar.bench import listops as L
from nearfar.bench import tasks as T
from nearfar.bench.tasks import TASK_NAMES, get_task


def draw(task: T.Task, batch: int = 16, seed: int = 0, split: str = "train") -> T.Batch:
    return task.sample(batch, torch.Generator().manual_seed(seed), split=split)


def bin_range(name: str) -> tuple[int, int]:
    """Inclusive [lo, hi] of a distance/position bin name: "<=32", "33-96", ">192"."""
    if name.startswith("<="):
        return 0, int(name[2:])
    if name.startswith(">"):
        return int(name[1:]) + 1, 1 << 30
    lo, hi = name.split("-")
    return int(lo), int(hi)


def in_bin(task: T.Task, bins: torch.Tensor, values: torch.Tensor) -> bool:
    ranges = torch.tensor([bin_range(n) for n in task.bin_names])[bins]
    return bool(((values >= ranges[:, 0]) & (values <= ranges[:, 1])).all())


# ----------------------------------------------------------------------------------------------- interface


@pytest.mark.parametrize("size", ["tiny", "quick", "full"])
@pytest.mark.parametrize("name", TASK_NAMES)
def test_shapes_dtypes_and_ranges(name: str, size: str) -> None:
    task = get_task(name, size)
    assert task.name == name and task.pattern in ("CS", "NS") and task.kind in ("seq", "cls", "2d")
    assert task.metric in ("accuracy", "bpc") and task.description and "\n" not in task.description
    b = draw(task, 6)
    for t in (b.inputs, b.targets, b.bins):
        assert t.dtype == torch.long and t.device.type == "cpu"
    if task.kind == "2d":
        assert task.grid and b.inputs.shape == (6, *task.grid) and task.seq_len == task.grid[0] * task.grid[1]
        assert b.targets.shape == b.bins.shape and b.targets.shape in ((6,), b.inputs.shape)  # per image or pixel
    else:
        assert task.grid == () and b.inputs.shape == b.targets.shape == b.bins.shape == (6, task.seq_len)
    assert 0 <= b.inputs.min() and b.inputs.max() < task.vocab_size
    scored = b.targets != -100
    assert torch.equal(scored, b.bins >= 0) and scored.any()
    assert b.targets[scored].min() >= 0 and b.targets[scored].max() < task.num_classes
    assert b.bins.max() < len(task.bin_names) and b.bins.min() >= -1
    if task.kind == "cls":
        assert scored[:, 0].all() and not scored[:, 1:].any()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_deterministic_given_the_generator(name: str) -> None:
    task = get_task(name, "tiny")
    a, b, c = draw(task, 8, seed=3), draw(task, 8, seed=3), draw(task, 8, seed=4)
    for x, y in ((a.inputs, b.inputs), (a.targets, b.targets), (a.bins, b.bins)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)
    g = torch.Generator().manual_seed(3)
    first, second = task.sample(8, g), task.sample(8, g)  # the generator advances
    assert torch.equal(first.inputs, a.inputs) and not torch.equal(second.inputs, a.inputs)


@pytest.mark.parametrize("name", ["mqar", "passkey", "bidir_mqar"])
def test_every_bin_populated_at_full_size(name: str) -> None:
    task = get_task(name, "full")
    counts = torch.bincount(draw(task, 64).bins.flatten() + 1, minlength=len(task.bin_names) + 1)[1:]
    assert (counts >= 0.2 * counts.sum()).all(), counts  # about even: 25 % each
    if name != "passkey":
        assert task.bin_names == ("<=32", "33-96", "97-192", ">192")


# ---------------------------------------------------------------------------------------------- T1 / T5a MQAR


def check_mqar(task: T.Task, b: T.Batch, num_pairs: int, causal: bool) -> None:
    """The target at each query is the value right after the one other occurrence of its key that is followed by a
    value; with causal=True that pair lies wholly before the query."""
    half = task.vocab_size // 2
    for x, y, bins in zip(b.inputs, b.targets, b.bins):
        queries = (y != -100).nonzero().flatten()
        assert len(queries) == num_pairs
        pair_starts = ((x[:-1] < half) & (x[1:] >= half)).nonzero().flatten()
        assert len(pair_starts) == num_pairs and len(set(x[pair_starts].tolist())) == num_pairs
        assert (x >= 1).all() and (x[queries] < half).all()
        distances = []
        for q in queries.tolist():
            (j,) = [s for s in pair_starts.tolist() if x[s] == x[q]]
            assert y[q] == x[j + 1]
            if causal:
                assert j + 1 < q
            distances.append(abs(q - j))
        assert in_bin(task, bins[queries], torch.tensor(distances))


@given(seq_len=st.integers(16, 160), pairs=st.integers(1, 40), vocab=st.integers(8, 300), bidir=st.booleans())
def test_mqar_targets_follow_from_the_context(seq_len: int, pairs: int, vocab: int, bidir: bool) -> None:
    pairs = min(pairs, seq_len // 4, vocab // 2 - 2)
    task = get_task("bidir_mqar" if bidir else "mqar", seq_len=seq_len, num_pairs=pairs, vocab_size=vocab)
    check_mqar(task, draw(task, 4, seed=seq_len), pairs, causal=not bidir)


@pytest.mark.parametrize("name", ["mqar", "bidir_mqar"])
def test_mqar_full_size(name: str) -> None:
    task = get_task(name, "full")
    b = draw(task, 32)
    check_mqar(task, b, 16, causal=name == "mqar")
    if name == "bidir_mqar":  # queries before their pair are common, so a causal model cannot solve it
        x = b.inputs
        before = sum(int((x[r, q + 1 :] == x[r, q]).any()) for r, q in (b.targets != -100).nonzero().tolist())
        assert before >= 0.3 * 32 * 16


# ------------------------------------------------------------------------------------------------ T2 passkey


@pytest.mark.parametrize("seq_len", [64, 256, 512])
def test_passkey_targets_are_the_needle_digits(seq_len: int) -> None:
    task = get_task("passkey", seq_len=seq_len)
    b = draw(task, 16)
    digits = 4
    hay_len = seq_len - digits
    for x, y, bins in zip(b.inputs, b.targets, b.bins):
        scored = (y != -100).nonzero().flatten().tolist()
        assert scored == list(range(hay_len, seq_len))
        assert x[hay_len] == T.QUERY and (x[:hay_len] != T.QUERY).all()
        text = bytes(x[:hay_len].tolist()).decode("latin-1")  # 128 = any non-ASCII byte
        (match,) = list(re.finditer(r"#k=(\d{4});", text))
        assert [ord(c) for c in match.group(1)] == y[hay_len:].tolist()
        assert x[hay_len + 1 :].tolist() == y[hay_len:-1].tolist()  # teacher-forced answer digits
        assert match.end() <= hay_len  # the needle is entirely in the past of every scored position
        depth = (0.1, 0.3, 0.5, 0.7)[int(bins[hay_len])]
        assert abs(match.start() - depth * (hay_len - 8)) <= 1
        assert (bins[hay_len:] == bins[hay_len]).all()


def test_stdlib_train_and_valid_text_are_disjoint() -> None:
    files = T.stdlib_files()
    modules = {split: {m for m, _ in files if T.stdlib_split(m) == split} for split in T.SPLITS}
    assert modules["train"] and modules["valid"] and not modules["train"] & modules["valid"]
    paths = [p for _, p in files]
    assert files == T.stdlib_files.__wrapped__() and len(set(paths)) == len(paths)  # a fixed order, no repeats
    assert not any("/test/" in p or "site-packages" in p for p in paths)
    train, valid = (T.stdlib_text(s).numpy().tobytes() for s in T.SPLITS)
    assert 0.05 < len(valid) / (len(train) + len(valid)) < 0.3
    assert max(train + valid) <= T.NON_ASCII
    # evaluation haystacks come from the held-out modules, and most of their text is unseen in training
    task = get_task("passkey", "full")
    b = draw(task, 16, split="valid")
    chunks = [bytes(x[200:252].tolist()) for x in b.inputs]  # the haystack's tail: the needle ends before 190
    assert all(c in valid for c in chunks)
    assert sum(c not in train for c in chunks) >= 12
    assert not torch.equal(b.inputs, draw(task, 16).inputs)


# ------------------------------------------------------------------------------------- T3 selective copying


@given(seq_len=st.integers(16, 200), tokens=st.integers(1, 16), vocab=st.integers(4, 20))
def test_selective_copy_targets_are_the_scattered_tokens_in_order(seq_len: int, tokens: int, vocab: int) -> None:
    tokens = min(tokens, seq_len // 4)
    task = get_task("selective_copy", seq_len=seq_len, num_tokens=tokens, vocab_size=vocab)
    b = draw(task, 8, seed=seq_len)
    data_len = seq_len - tokens
    for x, y, bins in zip(b.inputs, b.targets, b.bins):
        where = (x[:data_len] != 0).nonzero().flatten()
        assert len(where) == tokens and (x[data_len:] == vocab - 1).all()
        assert (x[where] < vocab - 1).all()
        assert y[data_len:].tolist() == x[where].tolist() and (y[:data_len] == -100).all()
        assert in_bin(task, bins[data_len:], data_len + torch.arange(tokens) - where)  # token -> its marker


def test_selective_copy_full_size() -> None:
    task = get_task("selective_copy", "full")
    assert task.seq_len == 256 and task.vocab_size == 16
    b = draw(task, 64)
    assert ((b.targets != -100).sum(1) == 8).all()
    assert (torch.bincount(b.bins[b.bins >= 0], minlength=4) > 0).all()


# ------------------------------------------------------------------------------------------------ T4 char LM


def test_char_lm_is_next_character_prediction_on_stdlib_text() -> None:
    task = get_task("char_lm", "full")
    assert task.metric == "bpc" and task.bin_names == ("0-63", "64-255", "256-511")
    b = draw(task, 4)
    assert torch.equal(b.targets[:, :-1], b.inputs[:, 1:])
    assert in_bin(task, b.bins[0], torch.arange(512))
    train = T.stdlib_text("train").numpy().tobytes()
    assert all(bytes(torch.cat([x, y[-1:]]).tolist()) in train for x, y in zip(b.inputs, b.targets))
    assert draw(get_task("char_lm", "tiny"), 2).bins[0].tolist() == [0] * 8 + [1] * 24 + [2] * 32


# ------------------------------------------------------------------------------------------- T5b ListOps-lite


def evaluate_listops(expr: str) -> tuple[int, int]:
    """Value and operator nesting depth of a prefix expression like "[MAX 2 [MIN 3 4 ] ]"."""
    stack: list[tuple[str, list[int]]] = []
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(statistics.median(a)), "[SM": lambda a: sum(a) % 10}
    depth = 0
    for tok in expr.split():
        if tok in ops:
            stack.append((tok, []))
            depth = max(depth, len(stack))
        elif tok == "]":
            op, args = stack.pop()
            value = ops[op](args)
            if not stack:
                return value, depth
            stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(tok))
    raise AssertionError(f"unbalanced expression {expr!r}")


@given(max_depth=st.integers(1, 5), max_args=st.integers(2, 5), seq_len=st.integers(16, 128))
def test_listops_labels_match_an_independent_evaluator(max_depth: int, max_args: int, seq_len: int) -> None:
    task = get_task("listops", seq_len=seq_len, max_depth=max_depth, max_args=max_args, min_len=4)
    b = draw(task, 8, seed=seq_len)
    assert (b.inputs[:, 0] == L.CLS).all()
    for x, y in zip(b.inputs, b.targets):
        tokens = [L.LISTOPS_TOKENS[i] for i in x[1:].tolist()]
        length = len(tokens) - tokens.count("<pad>")
        assert tokens[length:] == ["<pad>"] * (len(tokens) - length) and "<cls>" not in tokens
        value, depth = evaluate_listops(" ".join(tokens[:length]))
        assert value == y[0] and 1 <= depth <= max_depth


def test_listops_full_size_lengths_and_labels() -> None:
    task = get_task("listops", "full")
    b = draw(task, 64)
    lengths = (b.inputs[:, 1:] != L.PAD).sum(1)
    assert lengths.min() >= 63 and lengths.max() <= 255
    assert len(b.targets[:, 0].unique()) >= 8  # every class occurs, not one dominant label


# ----------------------------------------------------------------------------------------- 2D Pathfinder


def components(image: torch.Tensor) -> torch.Tensor:
    """8-connected component label of every non-background pixel (0 = background), by breadth-first search."""
    h, w = image.shape
    ink = (image > 0).tolist()
    label = [[0] * w for _ in range(h)]
    count = 0
    for r0 in range(h):
        for c0 in range(w):
            if ink[r0][c0] and not label[r0][c0]:
                count += 1
                label[r0][c0] = count
                todo = deque([(r0, c0)])
                while todo:
                    r, c = todo.popleft()
                    for rr in range(max(r - 1, 0), min(r + 2, h)):
                        for cc in range(max(c - 1, 0), min(c + 2, w)):
                            if ink[rr][cc] and not label[rr][cc]:
                                label[rr][cc] = count
                                todo.append((rr, cc))
    return torch.tensor(label)


@pytest.mark.parametrize("size", ["quick", "full"])
def test_pathfinder_label_is_marker_connectivity(size: str) -> None:
    task = get_task("pathfinder", size)
    b = draw(task, 48)
    assert b.targets.sum() == 24  # balanced
    for image, label in zip(b.inputs, b.targets):
        markers = (image == T.MARKER).nonzero()
        assert len(markers) == 2
        comp = components(image)
        assert int(comp[tuple(markers[0])] == comp[tuple(markers[1])]) == label
        assert comp.max() >= 2  # always two long curves (and distractors), whatever the label


def test_pathfinder_cannot_be_decided_locally() -> None:
    task = get_task("pathfinder", "quick")
    b = draw(task, 400, seed=1)
    padded = torch.nn.functional.pad(b.inputs, (1, 1, 1, 1))
    gaps = []
    for image in padded:
        markers = (image == T.MARKER).nonzero()
        for r, c in markers.tolist():
            # every marker looks the same in a 3x3 view: the end of a curve, one inked neighbour
            assert int((image[r - 1 : r + 2, c - 1 : c + 2] > 0).sum()) == 2
        gaps.append(int((markers[0] - markers[1]).abs().max()))
    gaps = torch.tensor(gaps)
    assert gaps.min() >= 3  # no 3x3 window holds both markers
    ink = (b.inputs > 0).sum((1, 2)).float()
    y = b.targets.bool()
    assert abs(ink[y].mean() - ink[~y].mean()) < 1.0  # the amount of ink says nothing
    # nor does the marker distance much: the best threshold on it is far from a solution
    best = max(float(((gaps > t) == y).float().mean()) for t in range(16))
    assert max(best, 1 - best) < 0.65


# --------------------------------------------------------------------------------------- 2D spatial recall


@given(size=st.integers(8, 24), pairs=st.integers(1, 12), vocab=st.integers(8, 80), seed=st.integers(0, 99))
def test_spatial_recall_targets_follow_from_the_image(size: int, pairs: int, vocab: int, seed: int) -> None:
    pairs = min(pairs, vocab // 2 - 1, size * size // 8)
    task = get_task("spatial_recall", "full", image_size=size, num_pairs=pairs, vocab_size=vocab)
    b = draw(task, 4, seed=seed)
    half = vocab // 2
    for x, y, bins in zip(b.inputs, b.targets, b.bins):
        queries = (y != -100).nonzero().tolist()
        assert len(queries) == pairs and int((x > 0).sum()) == 3 * pairs  # pairs + queries on a blank image
        distances = []
        for qy, qx in queries:
            key = int(x[qy, qx])
            assert 1 <= key < half
            (cell, *rest) = [c for c in (x == key).nonzero().tolist() if c != [qy, qx]]
            assert not rest  # the key appears once besides its query, with its value right of it
            assert int(x[cell[0], cell[1] + 1]) == int(y[qy, qx]) >= half
            distances.append(max(abs(qy - cell[0]), abs(qx - cell[1])))
        rows = torch.tensor(queries)
        assert in_bin(task, bins[rows[:, 0], rows[:, 1]], torch.tensor(distances))


def test_spatial_recall_fills_every_distance_bin_and_needs_far_context() -> None:
    task = get_task("spatial_recall", "full")
    b = draw(task, 64)
    counts = torch.bincount(b.bins[b.bins >= 0], minlength=4)
    assert (counts >= 0.2 * counts.sum()).all(), counts
    assert task.bin_names[-1] == ">8"  # beyond two layers of the full size's 5x5 local control plus the convs


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("name", "overrides", "error", "words"),
    [
        ("mqar", {"num_pairs": 100}, ValueError, "num_pairs"),
        ("mqar", {"seq_len": 8}, ValueError, "seq_len"),
        ("mqar", {"vocab_size": 16.0}, TypeError, "vocab_size"),
        ("mqar", {"window": 3}, TypeError, "window"),
        ("bidir_mqar", {"num_pairs": 0}, ValueError, "num_pairs"),
        ("passkey", {"depths": (0.5, 1.5)}, ValueError, "depths"),
        ("passkey", {"depths": ()}, TypeError, "depths"),
        ("passkey", {"num_digits": 9}, ValueError, "num_digits"),
        ("selective_copy", {"num_tokens": 100}, ValueError, "num_tokens"),
        ("selective_copy", {"vocab_size": 3}, ValueError, "vocab_size"),
        ("char_lm", {"seq_len": True}, TypeError, "seq_len"),
        ("listops", {"max_args": 1}, ValueError, "max_args"),
        ("listops", {"min_len": 200, "max_len": 100}, ValueError, "min_len"),
        ("listops", {"max_depth": 1, "max_len": 60}, ValueError, "max_len"),
        ("listops", {"op_prob": 1.5}, ValueError, "op_prob"),
        ("pathfinder", {"image_size": 4}, ValueError, "image_size"),
        ("spatial_recall", {"num_pairs": 40}, ValueError, "num_pairs"),
        ("spatial_recall", {"image_size": 4}, ValueError, "image_size"),
        ("pathfinder", {"distractor_length": 50}, ValueError, "distractor_length"),
    ],
)
def test_bad_overrides_raise_clear_errors(name: str, overrides: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        get_task(name, "full", **overrides)


def test_bad_names_sizes_and_sample_arguments() -> None:
    with pytest.raises(ValueError, match="name"):
        get_task("mqar2")
    with pytest.raises(ValueError, match="size"):
        get_task("mqar", "huge")
    task = get_task("mqar", "tiny")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(0, g)
    with pytest.raises(TypeError, match="generator"):
        task.sample(2, 0)
    with pytest.raises(ValueError, match="split"):
        task.sample(2, g, split="test")
