"""MkDocs hooks: pages and pictures generated from the code at build time (nothing is downloaded).

- ``mechanisms/<name>.md``: one page per entry of ``nearfar.mechanisms()`` (paper, official repository, family,
  dims, the CAB patterns it supports with their constructor arguments, why not the others, notes, the class's API);
  ``mechanisms/index.md``: the table of them all. The nav's "Mechanisms" section is filled from the registry.
- ``img/patterns/<name>.png``: the allowed (query, key) mask of each example pattern of ``PATTERN_PICTURES``,
  from ``pattern.mask(n, n)`` (True = may attend); 2D patterns also show one query's keys on the grid.

Also runnable by hand to write the pictures to a folder: ``python tools/docs_hooks.py OUT_DIR``.
"""

from __future__ import annotations

import inspect
import io
import sys
from pathlib import Path

MECH_DIR = "mechanisms"
IMG_DIR = "img/patterns"

CAB = {"NS": "non-causal self", "CS": "causal self", "NC": "non-causal cross", "CC": "causal cross"}


def _pattern_pictures():
    """(file stem, title, pattern, n tokens, grid or None, query shown on the grid) for every picture."""
    import nearfar as nf

    g = (12, 12)
    n2 = g[0] * g[1]
    q2 = 5 * g[1] + 6  # a query near the centre of the 12x12 grid
    q_edge = 1 * g[1] + 1  # a query near the corner (windows slide inward / are clipped there)
    return [
        ("causal", "Causal()", nf.Causal(), 24, None, None),
        ("sliding_window", "SlidingWindow(left=3, right=2)", nf.SlidingWindow(left=3, right=2), 24, None, None),
        ("sliding_window_causal", "SlidingWindow(left=3) & Causal()  (HF sliding_window=4)",
         nf.SlidingWindow(left=3) & nf.Causal(), 24, None, None),
        ("streaming", "(SlidingWindow(left=4) | Sinks(2)) & Causal()",
         (nf.SlidingWindow(left=4) | nf.Sinks(2)) & nf.Causal(), 24, None, None),
        ("strided", "Strided(4)", nf.Strided(4), 24, None, None),
        ("sinks", "Sinks(3)", nf.Sinks(3), 24, None, None),
        ("global_tokens", "GlobalTokens(2)", nf.GlobalTokens(2), 24, None, None),
        ("longformer", "SlidingWindow(2, 2) | GlobalTokens(2)", nf.SlidingWindow(2, 2) | nf.GlobalTokens(2), 24,
         None, None),
        ("block_window", "BlockWindow(4, before=1, after=1)", nf.BlockWindow(4, 1, 1), 24, None, None),
        ("random_blocks", "RandomBlocks(4, r=2, seed=0)", nf.RandomBlocks(4, r=2, seed=0), 24, None, None),
        ("bigbird", "BlockWindow(4) | GlobalTokens(4) | RandomBlocks(4, r=1)",
         nf.BlockWindow(4) | nf.GlobalTokens(4) | nf.RandomBlocks(4, r=1), 24, None, None),
        ("block_strided", "BlockStrided(block=2, stride=3)", nf.BlockStrided(2, 3), 24, None, None),
        ("core_and_window", "CoreAndWindow(num_core=4, window_size=6, group_size=4)",
         nf.CoreAndWindow(4, 6, 4), 24, None, None),
        ("neighborhood_1d", "Neighborhood(5)", nf.Neighborhood(5), 24, None, None),
        ("neighborhood_1d_dilated", "Neighborhood(3, dilation=2)", nf.Neighborhood(3, dilation=2), 24, None, None),
        ("neighborhood_1d_causal", "Neighborhood(5, is_causal=True)", nf.Neighborhood(5, is_causal=True), 24,
         None, None),
        ("neighborhood_2d", "Neighborhood(5, grid=(12, 12))", nf.Neighborhood(5, grid=g), n2, g, q_edge),
        ("neighborhood_2d_dilated", "Neighborhood(3, dilation=2, grid=(12, 12))",
         nf.Neighborhood(3, dilation=2, grid=g), n2, g, q2),
        ("blocks", "Blocks(4, grid=(12, 12))", nf.Blocks(4, grid=g), n2, g, q2),
        ("blocks_shifted", "Blocks(4, grid=(12, 12), shift=2)", nf.Blocks(4, grid=g, shift=2), n2, g, q_edge),
        ("blocks_wrap", "Blocks(4, grid=(12, 12), shift=2, wrap=True)", nf.Blocks(4, grid=g, shift=2, wrap=True),
         n2, g, q_edge),
        ("grid", "Grid(4, grid=(12, 12))", nf.Grid(4, grid=g), n2, g, q2),
        ("dense", "Dense()", nf.Dense(), 24, None, None),
    ]


def render_pattern(title: str, pattern, n: int, grid, query) -> bytes:
    """PNG bytes: the ``(n, n)`` mask (queries are rows), and for a 2D ``grid`` the keys of ``query`` on the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = pattern.mask(n, n).numpy()
    panels = 2 if grid is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    ax.imshow(mask, cmap="Blues", vmin=-0.15, vmax=1, interpolation="nearest")
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    ax.set_title(f"allowed (i, j): {int(mask.sum())} of {n * n}", fontsize=8)
    if n <= 32:
        ax.set_xticks(range(0, n, 4))
        ax.set_yticks(range(0, n, 4))
    if grid is not None:
        ax2 = axes[0][1]
        keys = mask[query].reshape(grid).astype(float)
        r, c = divmod(query, grid[1])
        keys[r, c] = 0.55  # the query itself, in a lighter shade when it attends itself
        ax2.imshow(keys, cmap="Blues", vmin=-0.15, vmax=1, interpolation="nearest")
        ax2.plot([c], [r], marker="x", color="crimson", markersize=7)
        ax2.set_title(f"keys of query {query} = ({r}, {c}) (x)", fontsize=8)
        ax2.set_xticks(range(grid[1]))
        ax2.set_yticks(range(grid[0]))
        ax2.tick_params(labelsize=6)
        ax2.set_xticks([x - 0.5 for x in range(grid[1] + 1)], minor=True)
        ax2.set_yticks([y - 0.5 for y in range(grid[0] + 1)], minor=True)
        ax2.grid(which="minor", color="white", linewidth=0.5)
    fig.suptitle(title, fontsize=9, family="monospace")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _api_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _args(kwargs) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


#: the "Build it" example: width, heads, batch, tokens of a 1D input, map of a 2D/3D input (the benchmark's 14x14
#: map, which every registered 2D layer's defaults tile), tokens of a cross-attention source
EXAMPLE_DIM, EXAMPLE_HEADS, EXAMPLE_BATCH, EXAMPLE_TOKENS = 64, 4, 2, 32
EXAMPLE_MAP = {"2d": (14, 14), "3d": (4, 14, 14)}
EXAMPLE_SOURCE = 48
_AXES = {"1d": "N", "2d": "H, W", "3d": "T, H, W"}


def example_input(m) -> tuple[str, tuple[int, ...]]:
    """The spatial rank ``make`` builds a layer for and an input shape of it: a 2D layer (any entry whose ``dims``
    holds "2d": their constructors default to 2D) takes ``(B, H, W, dim)``, a sequence layer ``(B, N, dim)``."""
    rank = "2d" if "2d" in m.dims else m.dims[0]
    spatial = (EXAMPLE_TOKENS,) if rank == "1d" else EXAMPLE_MAP[rank]
    return rank, (EXAMPLE_BATCH, *spatial, EXAMPLE_DIM)


def build_snippet(m) -> list[str]:
    """The lines of a page's runnable "Build it" example: build the entry with its defaults and with one CAB
    pattern, run a forward on a random input of the right shape and print the output shape (the comments give the
    printed value; ``tests/core/test_docstring_examples.py`` runs every snippet and checks them)."""
    lines = ["import torch", "import nearfar as nf", "", f'entry = {{m.name: m for m in nf.mechanisms()}}["{m.name}"]']
    if m.kind == "model":
        return lines + ["model = entry.make(128, 4, vocab_size=256)  # a whole LM: (dim, num_heads, vocab_size=...)",
                        "tokens = torch.randint(0, 256, (2, 64))  # (B, N) token ids",
                        "print(model.loss(tokens).shape)  # torch.Size([]) (a scalar: next-token cross-entropy)"]
    rank, shape = example_input(m)
    d, h = EXAMPLE_DIM, EXAMPLE_HEADS
    out = f"torch.Size({list(shape)})"
    lines += [f"layer = entry.make({d}, {h})  # (dim, num_heads), the official defaults otherwise",
              f"x = torch.randn{shape}  # (B, {_AXES[rank]}, dim)" + (", channel-last" if rank != "1d" else ""),
              f"print(layer(x).shape)  # {out}"]
    first = next(iter(m.patterns))
    lines += [f'layer = entry.build({d}, {h}, "{first}")  # one CAB pattern ({CAB[first]})',
              f"print(layer(x).shape)  # {out}"]
    cross = next((p for p in ("CC", "NC") if p in m.patterns), None)
    if cross is not None and rank == "1d":
        lines += [f'layer = entry.build({d}, {h}, "{cross}")  # {CAB[cross]}: keys and values from a source',
                  f"source = torch.randn({EXAMPLE_BATCH}, {EXAMPLE_SOURCE}, {d})  # (B, M, dim)",
                  f"print(layer(x, context=source).shape)  # {out}"]
    return lines


def mechanism_page(m, first_page_of_class: dict) -> str:
    """Markdown page for one registered mechanism."""
    lines = [f"# `{m.name}`", ""]
    if m.notes:
        lines += [m.notes, ""]
    repo = m.repo
    if "/" in repo and " " not in repo and not repo.startswith("("):
        repo = f"[{repo}](https://github.com/{repo})"
    elif repo.split(" ")[0].count("/") == 1 and not repo.startswith("("):
        head, _, tail = repo.partition(" ")
        repo = f"[{head}](https://github.com/{head}) {tail}"
    cls = f"`{_api_path(m.cls)}`" if m.cls is not None else "(built by a function)"
    lines += [
        "| | |",
        "|---|---|",
        f"| registry name | `{m.name}` |",
        f"| kind | {m.kind} |",
        f"| paper | {_md_escape(m.paper)} |",
        f"| official code | {repo} |",
        f"| family | {m.family} |",
        f"| dims | {', '.join(m.dims)} |",
        f"| class | {cls} |",
        "",
        "## CAB attention patterns",
        "",
        "CAB's four patterns (Zhang et al., *CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling*, "
        "ICML 2023): `NS` non-causal self, `CS` causal self, `NC` non-causal cross, `CC` causal cross.",
        "",
        "| pattern | supported | constructor arguments / why not |",
        "|---|---|---|",
    ]
    for p in CAB:
        if p in m.patterns:
            kw = _args(m.patterns[p])
            lines.append(f"| `{p}` ({CAB[p]}) | yes | `build(dim, num_heads, \"{p}\")`"
                         + (f": `{_md_escape(kw)}`" if kw else ": the defaults") + " |")
        else:
            lines.append(f"| `{p}` ({CAB[p]}) | no | {_md_escape(m.why_not[p])} |")
    lines += ["", "## Build it", "", "```python", *build_snippet(m), "```", ""]
    about = inspect.getdoc(sys.modules[m.cls.__module__]) if m.cls is not None else None
    if about:  # the module's docstring: paper, official repository (file, function) and what differs from it
        lines += ["## Paper, official code and what differs", "", about, ""]
    if m.cls is not None:
        path = _api_path(m.cls)
        owner = first_page_of_class.setdefault(path, m.name)
        lines += ["## API", ""]
        if m.kind == "model":  # documented with the other models
            public = f"nearfar.models.{m.cls.__name__}"
            lines += [f"See [`{public}`](../api/models.md#{public}).", ""]
        elif owner == m.name:
            # a sequence layer built on PatternAttention / LightningAttention documents the forward and new_cache
            # it inherits on its own page
            lines += [f"::: {path}", "    options:", "      heading_level: 3",
                      "      inherited_members: [forward, new_cache]", ""]
        else:
            lines += [f"The same class as [`{owner}`]({owner}.md#api), built with other arguments.", ""]
    return "\n".join(lines) + "\n"


def mechanisms_index(mechs) -> str:
    lines = [
        "# Mechanisms",
        "",
        "Every mechanism registered in `nearfar.mechanisms()`, generated from the registry when the site is built. "
        "Each page gives the paper, the official repository, the CAB patterns it supports (and why not the "
        "others) and the class's API. See [Which mechanism](../which-mechanism.md) for measured speed and quality.",
        "",
        "```python",
        "import nearfar as nf",
        "",
        'entries = {m.name: m for m in nf.mechanisms()}   # or nf.mechanisms("window"), nf.mechanisms(pattern="CC")',
        'attn = entries["swin_shifted"].make(96, 3)       # official defaults',
        'dec = entries["linear_attention"].build(256, 4, "CC")  # one CAB pattern',
        'print(entries["moa"].why_not["NC"])               # why a pattern is not supported',
        "```",
        "",
        "| name | kind | family | dims | CAB patterns | paper | official code |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in mechs:
        lines.append(f"| [`{m.name}`]({m.name}.md) | {m.kind} | {m.family} | {', '.join(m.dims)} | "
                     f"{', '.join(m.patterns)} | {_md_escape(m.paper)} | {_md_escape(m.repo)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# MkDocs events


def _mechanisms():
    import nearfar as nf

    return sorted(nf.mechanisms(), key=lambda m: (m.kind != "layer", m.name))


def on_config(config, **kwargs):
    """Fill the nav's "Mechanisms" section (a list holding ``mechanisms/index.md``) from the registry."""
    nav = config.get("nav") or []
    for item in nav:
        if isinstance(item, dict) and "Mechanisms" in item:
            item["Mechanisms"] = [f"{MECH_DIR}/index.md"] + [
                {m.name: f"{MECH_DIR}/{m.name}.md"} for m in _mechanisms()]
    return config


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    first_page_of_class: dict = {}
    mechs = _mechanisms()
    files.append(File.generated(config, f"{MECH_DIR}/index.md", content=mechanisms_index(mechs)))
    for m in mechs:
        files.append(File.generated(config, f"{MECH_DIR}/{m.name}.md", content=mechanism_page(m,
                                                                                               first_page_of_class)))
    for stem, title, pattern, n, grid, query in _pattern_pictures():
        files.append(File.generated(config, f"{IMG_DIR}/{stem}.png",
                                    content=render_pattern(title, pattern, n, grid, query)))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "pattern-pictures")
    out.mkdir(parents=True, exist_ok=True)
    for stem, title, pattern, n, grid, query in _pattern_pictures():
        (out / f"{stem}.png").write_bytes(render_pattern(title, pattern, n, grid, query))
    print(f"wrote {len(_pattern_pictures())} pictures to {out}")
