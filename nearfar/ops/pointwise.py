"""``pointwise_linear``: ``F.linear`` over the channels of a channel-last map or token batch, run as a 1x1
convolution where that is faster.

A ``(B, H, W, C)`` tensor is, seen as ``(B, C, H, W)``, a channels-last image, which oneDNN's convolution takes as it
is; a 1x1 convolution is the same product as the linear layer. On this project's CPU box (2 threads, AVX-512,
torch 2.13) it ran 9-47% faster than ``F.linear`` forward and 4-16% forward+backward for the projection shapes of
the vision layers (``benchmarks/RESULTS.md``), so the layers whose cost is their projections use it. Other inputs
(non-contiguous, not float32, not on the CPU, under ``torch.compile``) take ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pointwise_linear"]


def pointwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x (B, H, W, C)`` or ``(B, N, C)``; the same values up to float32
    rounding (a 1x1 convolution where it is faster; see the module docstring).

    Args:
        x: Input ``(..., C)``.
        weight: ``(C', C)``.
        bias: ``(C',)`` or None.

    Returns:
        ``(..., C')``, contiguous when ``x`` is.

    Examples:
        >>> import torch
        >>> from nearfar.functional import pointwise_linear
        >>> x, w, b = torch.randn(2, 4, 4, 8), torch.randn(16, 8), torch.randn(16)
        >>> bool(torch.allclose(pointwise_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5))
        True
    """
    fast = (x.dim() in (3, 4) and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous() and x.numel() > 0 and not torch.compiler.is_compiling())
    if not fast:
        return F.linear(x, weight, bias)
    image = x if x.dim() == 4 else x.unsqueeze(2)  # (B, N, C) as (B, N, 1, C)
    out = F.conv2d(image.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1)
    return out if x.dim() == 4 else out.squeeze(2)
