"""Pathfinder-lite images (Long Range Arena's Pathfinder: Tay et al., "Long Range Arena: A Benchmark for Efficient
Transformers", ICLR 2021, google-research/long-range-arena; redrawn as our own generator): two long dashed curves,
distractor curves, two markers; the label says whether the markers lie on one curve. Deciding it needs the whole curve,
not a local view (tested in ``tests/bench/test_bench_tasks.py``)."""

from __future__ import annotations

import random

BACKGROUND, DASH_GAP, DASH, MARKER = 0, 2, 5, 7  # pixel levels; vocab 0..7
_DIRS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))  # 45 degrees apart, in turn order


def _free(grid: bytearray, pixel: int, head: int | None, steps: list[int]) -> bool:
    return grid[pixel] == 0 and all(grid[pixel + s] != 1 or pixel + s == head for s in steps)


def _curve(grid: bytearray, side: int, length: int, rng: random.Random) -> list[int] | None:
    """Grow a smooth random walk of ``length`` pixels on ``grid`` (flat, ``side`` wide, a frame of 2s around the
    image, 1 = drawn). A step turns by at most 45 degrees, and a new pixel may touch (8-neighbourhood) no drawn
    pixel but the walk's head, so curves never touch each other or themselves: each is its own 8-connected
    component, which is what makes "connected" well defined."""
    steps = [dr * side + dc for dr, dc in _DIRS]
    for _ in range(20):
        start = rng.randrange(1, side - 1) * side + rng.randrange(1, side - 1)
        if not _free(grid, start, None, steps):
            continue
        path, heading = [start], rng.randrange(8)
        grid[start] = 1
        while len(path) < length:
            head = path[-1]
            preferred = rng.choice((0, 0, 0, 1, -1))  # continuity: mostly straight on
            for turn in dict.fromkeys((preferred, 0, 1, -1)):
                nxt = head + steps[(heading + turn) % 8]
                if _free(grid, nxt, head, steps):
                    break
            else:
                break  # boxed in: start again elsewhere
            heading = (heading + turn) % 8
            path.append(nxt)
            grid[nxt] = 1
        if len(path) == length:
            return path
        for p in path:
            grid[p] = 0
    return None


def _chebyshev(a: int, b: int, side: int) -> int:
    return max(abs(a // side - b // side), abs(a % side - b % side))


def pathfinder_image(rng: random.Random, size: int, snake_length: int, num_distractors: int,
                      distractor_length: int, min_distance: int, connected: bool) -> bytes:
    """One Pathfinder-lite image (LRA's Pathfinder, redrawn): two long dashed curves, short distractor curves, and two
    markers on curve ends - both ends of one curve when ``connected``, else one end of each long curve. The
    curves are drawn before the label is looked at, so ink, curve count and free ends do not depend on it."""
    side = size + 2
    frame = bytes([2] * side) + (bytes([2]) + bytes(size) + bytes([2])) * size + bytes([2] * side)
    for _ in range(1000):
        grid = bytearray(frame)
        first = _curve(grid, side, snake_length, rng)
        second = _curve(grid, side, snake_length, rng) if first else None
        if first is None or second is None:  # second is None whenever first is None or empty
            continue
        curve = rng.choice((first, second))
        markers = (curve[0], curve[-1])
        if not connected:
            # the pair of ends of different curves about as far apart as the connected pair would have been,
            # so that the marker distance alone says little about the label
            pairs = [(a, b) for a in (first[0], first[-1]) for b in (second[0], second[-1])]
            rng.shuffle(pairs)
            gap = _chebyshev(*markers, side)
            markers = min(pairs, key=lambda pair: abs(_chebyshev(pair[0], pair[1], side) - gap))
        if _chebyshev(*markers, side) < min_distance:
            continue
        curves = [first, second]
        for _ in range(num_distractors):
            curves.append(_curve(grid, side, distractor_length, rng) or [])
        image = bytearray(side * side)
        for curve in curves:
            phase = rng.randrange(4)
            for i, p in enumerate(curve):
                image[p] = DASH_GAP if (i + phase) % 4 == 3 else DASH
        for p in markers:
            image[p] = MARKER
        return bytes(image)
    raise RuntimeError(f"could not draw a {size}x{size} Pathfinder image with snake_length={snake_length}")
