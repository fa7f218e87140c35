"""The benchmark's shape: which sizes ``nearfar bench --sizes`` may time (``parse_sizes``, ``check_sizes``) and the
sentences that state the shape and the machine at the top of the report (``speed_shape``, ``machine``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: the ranks the speed suite times: sequences (1D) and feature maps (2D)
SWEPT_DIMS = ("1d", "2d")
#: what ``--sizes`` (``sizes=``) may ask for: sequence lengths (1D) and the sides of a feature map (2D)
SIZE_RANGES = {"1d": (16, 131072), "2d": (4, 512)}
_SIZES_HELP = (f"sequence lengths are integers in [{SIZE_RANGES['1d'][0]}, {SIZE_RANGES['1d'][1]}], image sizes HxW "
               f"with H and W in [{SIZE_RANGES['2d'][0]}, {SIZE_RANGES['2d'][1]}] (e.g. --sizes 512 2048 14x14 42x42)")


def parse_sizes(values: Sequence[str]) -> dict[str, tuple]:
    """The sizes given to ``--sizes`` as ``run_speed``'s ``sizes``: an integer (``"512"``) is a sequence length, ``HxW``
    (``"14x14"``) a feature map; checked by ``check_sizes``. A ValueError naming ``--sizes``, the value and the
    allowed ranges for anything else."""
    if isinstance(values, str) or not values:
        raise ValueError(f"--sizes needs at least one size: {_SIZES_HELP}")
    out: dict[str, list] = {}
    for v in values:
        parts = str(v).lower().split("x")
        if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"--sizes: {v!r} is not a size: {_SIZES_HELP}")
        out.setdefault("1d" if len(parts) == 1 else "2d", []).append(
            int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1])))
    return check_sizes(out)


def check_sizes(sizes: dict) -> dict[str, tuple]:
    """``sizes`` (``{"1d": (N, ...), "2d": ((H, W), ...)}``, either key optional) with every size in ``SIZE_RANGES``,
    without repeats and sorted by tokens; a ValueError naming the bad size and the allowed ranges."""
    if not isinstance(sizes, dict) or not set(sizes) <= set(SWEPT_DIMS):
        raise ValueError(f"sizes must be a dict with keys among {SWEPT_DIMS}, got {sizes!r}")
    out = {}
    for dims, given in sizes.items():
        low, high = SIZE_RANGES[dims]
        if isinstance(given, (str, int)) or not given:
            raise ValueError(f"sizes[{dims!r}] must list at least one size, got {given!r}: {_SIZES_HELP}")
        checked = set()
        for size in given:
            sides = (size,) if dims == "1d" else tuple(size) if isinstance(size, (tuple, list)) else ()
            if len(sides) != (1 if dims == "1d" else 2) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in sides):
                label = size if dims == "1d" or not sides else "x".join(map(str, sides))
                what = "sequence length" if dims == "1d" else "image size"
                raise ValueError(f"--sizes: {label!r} is not an allowed {what}: {_SIZES_HELP}")
            checked.add(sides[0] if dims == "1d" else sides)
        out[dims] = tuple(sorted(checked, key=lambda s: s if dims == "1d" else (math.prod(s), s)))
    return out


def speed_shape(config: dict, ranks: Sequence[str] = SWEPT_DIMS) -> str:
    """The shape of a speed run (``run_speed``'s or ``run_compare``'s ``config``) in words: batch B, heads H, head
    dim d, tokens N per rank in ``ranks``, dtype, threads and rounds."""
    parts = []
    for dims in ranks:
        sizes, width = (config.get("sizes") or {}).get(dims), (config.get("widths") or {}).get(dims)
        if not sizes or not width:
            continue
        dim, heads = width
        listed = ", ".join(map(str, sizes))
        what = f"N = {listed} tokens" if dims == "1d" else f"maps {listed} (N = H*W tokens)"
        parts.append(f"{dims.upper()}: B={config.get('batch', 1)}, H={heads} heads of d={dim // heads} (model width "
                     f"{dim}), {what}")
    rounds = config.get("rounds")
    return (f"{'; '.join(parts) or 'no sizes recorded'}; {config.get('dtype', 'float32')}, "
            f"{config.get('threads', '?')} thread(s), {rounds if rounds is not None else '?'} interleaved round(s) "
            f"after a warm-up call")


def machine(env: dict) -> str:
    """The machine and versions of ``report.environment()`` in words."""
    return (f"{env.get('cpu', '?')} ({env.get('cores', '?')} cores), torch {env.get('torch', '?')}, nearfar "
            f"{env.get('nearfar', '?')}, Python {env.get('python', '?')}, git {env.get('git') or 'n/a'}")
