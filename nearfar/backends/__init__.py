"""The engine table: every engine ``attend(..., engine=...)`` accepts besides ``"auto"``, and what it runs.

``"auto"`` picks one per call by one rule, ``nearfar.dispatch.choose_engine``.
"""

from __future__ import annotations

#: name -> what the engine does and what it is for
ENGINES: dict[str, str] = {
    "dense": "the pattern as a materialised mask through fused SDPA: the reference, and the fastest for small "
             "problems",
    "blocksparse": "token tiles with exact key lists, per-chunk fused kernels forward and backward (any pattern)",
    "partition": "patterns whose tiles attend only to themselves (Swin/MaxViT windows, grids, cyclic shifts): one "
                 "batched SDPA over the windows",
    "flex": "PyTorch FlexAttention with the pattern as its mask_mod (compiled on CUDA, eager elsewhere)",
}


def engines() -> list[str]:
    """Names accepted by ``attend(..., engine=...)`` besides ``"auto"`` (what each runs: ``ENGINES``).

    Returns:
        The engine names, ``["dense", "blocksparse", "partition", "flex"]``.

    Examples:
        >>> import nearfar as nf
        >>> nf.engines()
        ['dense', 'blocksparse', 'partition', 'flex']
    """
    return list(ENGINES)
