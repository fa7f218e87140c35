"""Straightforward implementations of each official repository's approach, used by ``benchmarks/vision.py``.

Each file exposes ``BASELINES: dict[str, Callable[[nn.Module, Tensor], Tensor]]`` keyed by the registry name:
given a nearfar module (its weights) and a channel-last input, compute the same output the way the official
code does (e.g. pad + window-partition + SDPA). Tests check every baseline against its module.
"""

import torch


def nn_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official code's ``nn.Linear`` call, ``F.linear`` with the layer's parameters (nearfar's layers may run the
    same product another way: ``PointwiseLinear``'s 1x1 convolution); other modules (``nn.Identity``) as they are."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    return layer(x)
