"""Regenerates ``maxim_flax_parity.npz``: random Flax parameters, inputs and outputs of the official MAXIM MAB and
CGB (google-research/maxim ``maxim/models/maxim.py``: ``ResidualSplitHeadMultiAxisGmlpLayer``,
``CrossGatingBlock``), for ``tests/layers/test_maxim_mab.py`` / ``test_maxim_cgb.py``.

Needs jax, flax, einops and numpy (not torch), and the official file:

    python tests/data/make_maxim_flax_parity.py /path/to/maxim/models/maxim.py

Generated with jax 0.10.2, flax 0.12.8 and the official file at commit 3c82651 (its MAB/CGB code equals
the earlier 31853b9 version).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def flat(tree, path=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flat(v, f"{path}{k}/"))
        else:
            out[f"{path}{k}"] = np.asarray(v, dtype=np.float32)
    return out


def randomize(params, key):
    """Every leaf ~ N(0, 0.5), so that LayerNorm affines, biases and spatial matrices are all exercised."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def main(official: str) -> None:
    spec = importlib.util.spec_from_file_location("maxim_official", official)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {}
    rng = np.random.default_rng(0)
    cases = {
        "mab": (mod.ResidualSplitHeadMultiAxisGmlpLayer(block_size=(2, 3), grid_size=(2, 2)),
                (rng.standard_normal((2, 4, 6, 8)),)),
        "cgb_up": (mod.CrossGatingBlock(features=8, block_size=(2, 3), grid_size=(2, 2), upsample_y=True),
                   (rng.standard_normal((2, 4, 6, 5)), rng.standard_normal((2, 2, 3, 7)))),
        "cgb_same": (mod.CrossGatingBlock(features=8, block_size=(2, 3), grid_size=(2, 2), upsample_y=False),
                     (rng.standard_normal((2, 4, 6, 5)), rng.standard_normal((2, 4, 6, 7)))),
    }
    for i, (name, (module, inputs)) in enumerate(cases.items()):
        inputs = tuple(jnp.asarray(a, dtype=jnp.float32) for a in inputs)
        params = randomize(module.init(jax.random.PRNGKey(i), *inputs), jax.random.PRNGKey(100 + i))
        result = module.apply(params, *inputs)
        result = result if isinstance(result, tuple) else (result,)
        for k, v in flat(params["params"]).items():
            out[f"{name}/params/{k}"] = v
        for j, a in enumerate(inputs):
            out[f"{name}/input_{j}"] = np.asarray(a)
        for j, a in enumerate(result):
            out[f"{name}/output_{j}"] = np.asarray(a)
    np.savez_compressed(Path(__file__).with_name("maxim_flax_parity.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
