"""Images of the 2D recall task "spatial_recall": associative recall (MQAR, ``tasks.py``) laid out on an image.

Key-value pairs sit on a blank image as two horizontally adjacent pixels; each key appears once more elsewhere as a
query, whose target is the pair's value. The query-to-pair distance (Chebyshev, in pixels) is drawn uniformly over
four bins, so accuracy by distance shows how far each mechanism's spatial reach goes. Pathfinder (``pathfinder.py``)
asks for a curve to be traced across the image, which our 2-layer CPU models do not learn in minutes; this task
keeps the long-range dependency in a form a 2-layer model learns (one attention hop, the conv reading the key
beside each value), as MQAR does in 1D."""

from __future__ import annotations

import random

import torch

BLANK = 0


def distance_edges(size: int) -> tuple[int, ...]:
    """Upper edges of the first three distance bins (the fourth runs to ``size - 1``) for a ``size`` x ``size``
    image: about size/8, size/4 and size/2."""
    return max(2, round(size / 8)), max(3, round(size / 4)), max(4, round(size / 2))


def _query_cell(rng: random.Random, free: set, size: int, y: int, x: int, bounds: list[tuple[int, int]]
                ) -> tuple[int, int, int] | None:
    """A free cell at a Chebyshev distance from (y, x) in a bin chosen uniformly (one of ``bounds``), with its
    distance; None when 50 draws in that bin found none. (Choosing the bin once, rather than per draw, keeps the
    far bins, which miss the image more often, as full as the near ones.)"""
    lo, hi = bounds[rng.randrange(len(bounds))]
    for _ in range(50):
        d = rng.randint(lo, hi)
        free_coord = rng.randint(-d, d)
        sign = rng.choice((-1, 1))
        dy, dx = (free_coord, sign * d) if rng.random() < 0.5 else (sign * d, free_coord)
        cell = (y + dy, x + dx)
        if 0 <= cell[0] < size and 0 <= cell[1] < size and cell in free:
            return (*cell, d)
    return None


def recall_images(batch: int, size: int, num_pairs: int, vocab_size: int, rng: random.Random
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pixels (B, size, size), targets (B, size, size) with -100 where not scored, distance (B, size, size)
    with -1 where not scored)``. Keys are ``1 .. vocab_size // 2 - 1`` (distinct within an image), values
    ``vocab_size // 2 .. vocab_size - 1``; a query's distance is measured to its pair's key pixel."""
    half = vocab_size // 2
    edges = distance_edges(size)
    bounds = [(1, edges[0]), (edges[0] + 1, edges[1]), (edges[1] + 1, edges[2]), (edges[2] + 1, size - 1)]
    at, put = [], []  # (b, y, x) and (pixel, target, distance) of every written cell, scattered at the end
    for b in range(batch):
        free = {(y, x) for y in range(size) for x in range(size)}
        for key in rng.sample(range(1, half), num_pairs):
            y, x = _pair_slot(rng, free, size)
            value = rng.randrange(half, vocab_size)
            free -= {(y, x), (y, x + 1)}
            query = _query_cell(rng, free, size, y, x, bounds)
            if query is None:  # crowded image: any free cell
                qy, qx = rng.choice(sorted(free))
                query = (qy, qx, max(abs(qy - y), abs(qx - x)))
            qy, qx, d = query
            free.discard((qy, qx))
            at += [(b, y, x), (b, y, x + 1), (b, qy, qx)]
            put += [(key, -100, -1), (value, -100, -1), (key, value, d)]
    out = torch.tensor([(BLANK, -100, -1)], dtype=torch.long).repeat(batch * size * size, 1)
    if at:
        cells = torch.tensor(at, dtype=torch.long)
        out[(cells[:, 0] * size + cells[:, 1]) * size + cells[:, 2]] = torch.tensor(put, dtype=torch.long)
    pixels, targets, distance = out.view(batch, size, size, 3).unbind(-1)
    return pixels.contiguous(), targets.contiguous(), distance.contiguous()


def _pair_slot(rng: random.Random, free: set, size: int) -> tuple[int, int]:
    """A uniformly drawn free cell whose right neighbour is free too: by rejection (the image is mostly blank),
    with a scan of every slot after 100 misses."""
    for _ in range(100):
        y, x = rng.randrange(size), rng.randrange(size - 1)
        if (y, x) in free and (y, x + 1) in free:
            return y, x
    return rng.choice(sorted((y, x) for (y, x) in free if x + 1 < size and (y, x + 1) in free))
