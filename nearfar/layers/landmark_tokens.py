"""The landmark-token layout of landmark attention: one landmark token after every ``block_size`` regular tokens.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (NeurIPS 2023,
arXiv 2305.16300); official code: epfml/landmark-attention. The official data carries the landmarks as a token of the
vocabulary: ``llama/train.py`` (``add_mem_tokens``) and ``LlamaForCausalLM`` (``auto_insert_landmarks``) insert the
landmark id after every ``mem_freq`` tokens, ``MemLMCache.forward`` does the same at inference, and the model reads
``is_mem = input_ids == landmark_id``. A sequence of ``n`` regular tokens thus becomes ``n + n // block_size`` tokens
in which position ``p`` is a landmark iff ``p % (block_size + 1) == block_size`` (``landmark_mask``).

``LandmarkTokens`` does the same for models whose input is already a sequence of vectors: it inserts one learned
vector (the landmark's embedding) after every ``block_size`` rows and removes the rows at those positions from the
output. It is used once, at the input of a model (as the official landmark embedding); every attention layer then
sees the landmarks' hidden states at the same positions. When decoding, feed ``landmark`` as the next input whenever
``landmark_mask`` says the next position is a landmark, and drop that step's output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_nonneg_int, check_positive_int


def landmark_mask(n: int, block_size: int, start: int = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Which of the positions ``start .. start+n-1`` hold a landmark: ``p % (block_size + 1) == block_size``.

    Args:
        n: Number of positions, >= 0.
        block_size: Regular tokens per block, >= 1 (the official ``mem_freq``).
        start: First position, >= 0 (default 0).
        device: Device of the result (default: the CPU).

    Returns:
        A bool tensor ``(n,)``.

    Raises:
        TypeError: An argument is not an int.
        ValueError: ``n`` or ``start`` < 0, or ``block_size`` < 1.

    Examples:
        >>> from nearfar.layers.landmark_tokens import landmark_mask
        >>> landmark_mask(8, 3).int().tolist()
        [0, 0, 0, 1, 0, 0, 0, 1]
    """
    n, start = check_nonneg_int(n, "n"), check_nonneg_int(start, "start")
    size = check_positive_int(block_size, "block_size") + 1
    return torch.arange(start, start + n, device=device) % size == size - 1


def insert_landmarks(x: torch.Tensor, landmark: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x (B, n, dim)`` with ``landmark (dim,)`` inserted after every ``block_size`` rows: ``(B, n + n // block_size,
    dim)``, landmarks where ``landmark_mask`` is True (one after the last rows too when ``block_size`` divides ``n``).

    Args:
        x: Regular tokens ``(B, n, dim)``.
        landmark: The landmark vector ``(dim,)`` (gradients reach it).
        block_size: Regular tokens per block, >= 1.

    Returns:
        The sequence with landmarks, ``(B, n + n // block_size, dim)``.

    Raises:
        ValueError: ``x`` is not 3-D, ``landmark`` is not ``(dim,)``; ``block_size`` < 1.
        TypeError: ``block_size`` is not an int.

    Examples:
        >>> import torch
        >>> from nearfar.layers.landmark_tokens import insert_landmarks
        >>> insert_landmarks(torch.zeros(1, 5, 2), torch.ones(2), 2)[0, :, 0].tolist()
        [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    """
    size = check_positive_int(block_size, "block_size")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (B, n, dim), got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(landmark, torch.Tensor) or tuple(landmark.shape) != (x.shape[-1],):
        raise ValueError(f"landmark must be ({x.shape[-1]},), got {getattr(landmark, 'shape', type(landmark))}")
    b, n, d = x.shape
    full = n // size
    blocks = x[:, :full * size].reshape(b, full, size, d)
    marks = landmark.to(x.dtype).expand(b, full, 1, d)
    return torch.cat([torch.cat([blocks, marks], dim=2).reshape(b, full * (size + 1), d), x[:, full * size:]], 1)


def remove_landmarks(y: torch.Tensor, block_size: int, start: int = 0) -> torch.Tensor:
    """The rows of ``y (B, m, ...)`` at positions ``start .. start+m-1`` that are not landmarks (``landmark_mask``).

    Args:
        y: A layer's or model's output ``(B, m, ...)``.
        block_size: Regular tokens per block, >= 1.
        start: Position of ``y``'s first row, >= 0 (default 0; when decoding, the tokens seen before).

    Returns:
        ``y`` without its landmark rows.

    Raises:
        ValueError: ``y`` has fewer than 2 dimensions; ``block_size`` < 1 or ``start`` < 0.
        TypeError: ``block_size`` or ``start`` is not an int.

    Examples:
        >>> import torch
        >>> from nearfar.layers.landmark_tokens import remove_landmarks
        >>> remove_landmarks(torch.arange(7.0).view(1, 7), 2).tolist()
        [[0.0, 1.0, 3.0, 4.0, 6.0]]
    """
    if not isinstance(y, torch.Tensor) or y.dim() < 2:
        raise ValueError(f"y must be (B, m, ...), got {getattr(y, 'shape', type(y).__name__)}")
    return y[:, ~landmark_mask(y.shape[1], block_size, start, y.device)]


class LandmarkTokens(nn.Module):
    """``LandmarkTokens(dim, block_size=50)``: a learned landmark vector, inserted after every ``block_size`` regular
    tokens of a model's input (``insert``) and removed from its output (``remove``).

    Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (NeurIPS 2023);
    the official code inserts a landmark *token id* into the data and embeds it with the vocabulary; this module is
    the same for inputs that are already vectors. Use it once, around a stack of ``LandmarkAttention`` layers with the
    same ``block_size``.

    Args:
        dim: Width of the tokens, >= 1.
        block_size: Regular tokens per block, >= 1 (default 50, the official ``mem_freq``).

    Raises:
        TypeError: ``dim`` or ``block_size`` is not an int.
        ValueError: ``dim`` or ``block_size`` < 1.

    Examples:
        >>> import torch
        >>> from nearfar import LandmarkAttention, LandmarkTokens
        >>> tokens, layer = LandmarkTokens(32, block_size=4), LandmarkAttention(32, 2, block_size=4)
        >>> x = tokens.insert(torch.randn(2, 10, 32))          # 10 regular tokens + 2 landmarks
        >>> x.shape, tokens.remove(layer(x)).shape
        (torch.Size([2, 12, 32]), torch.Size([2, 10, 32]))
    """

    def __init__(self, dim: int, block_size: int = 50):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.block_size = check_positive_int(block_size, "block_size")
        self.landmark = nn.Parameter(torch.randn(dim) * 0.02)  # the official GPT init of an embedding row

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n, dim)`` -> ``(B, n + n // block_size, dim)`` with the landmark after every block."""
        return insert_landmarks(x, self.landmark, self.block_size)

    def remove(self, y: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The non-landmark rows of ``y`` whose first row is at position ``start``."""
        return remove_landmarks(y, self.block_size, start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.insert(x)
