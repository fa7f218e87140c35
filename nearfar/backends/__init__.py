"""Engine registry: ``dense`` (masked SDPA), ``blocksparse`` (tiles + exact key lists), ``flex`` (FlexAttention)."""

from __future__ import annotations

ENGINES = ("dense", "blocksparse", "flex")


def engines() -> list[str]:
    """Names accepted by ``attend(..., engine=...)`` besides ``"auto"``.

    Returns:
        The engine names, ``["dense", "blocksparse", "flex"]``.

    Examples:
        >>> import nearfar as nf
        >>> nf.engines()
        ['dense', 'blocksparse', 'flex']
    """
    return list(ENGINES)
