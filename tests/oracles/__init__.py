"""Straightforward implementations of each official repository's approach, used by ``benchmarks/vision.py``.

Each file exposes ``BASELINES: dict[str, Callable[[nn.Module, Tensor], Tensor]]`` keyed by the registry name:
given a nearfar module (its weights) and a channel-last input, compute the same output the way the official
code does (e.g. pad + window-partition + SDPA). Tests check every baseline against its module.
"""
