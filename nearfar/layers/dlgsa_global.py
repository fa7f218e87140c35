"""DLGSANet SparseGSA, sparse global self-attention: channel-last ``(B, H, W, C)`` in and out.

Paper: Li, Pan, Tang, Dong, "DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image
Super-Resolution" (ICCV 2023, arXiv 2301.02031). Official code: NeonLeexiang/DLGSANet,
``basicsr/archs/dlgsanet_arch.py`` (``SparseAttention``, the mixer of ``SparseAttentionLayerBlock``; ``Attention``,
Restormer's MDTA, the mixer of the ``'edge'`` blocks).

SparseGSA is Restormer's transposed (channel) attention with the softmax replaced by a ReLU. Per head ``h`` of
``d = C / heads`` channels, over all ``N = H*W`` tokens:

* ``qkv = qkv_dwconv(qkv(x))``: a bias-free 1x1 conv ``C -> 3C`` and a 3x3 depth-wise conv (zero padding 1), split
  into ``q, k, v`` (in that order, heads head-major inside each);
* ``q_hat = q / ||q||``, ``k_hat = k / ||k||``, the norms of each channel over the ``N`` tokens (``F.normalize``,
  eps ``1e-12``);
* ``A = act(temperature_h * q_hat^T k_hat)`` (``d x d``, ``temperature`` learnable, init 1) with ``act = ReLU``:
  the cosine similarities that are <= 0 give exact zeros, the "sparse" of the name;
* ``out[n, i] = sum_j A[i, j] v[n, j]``, heads concatenated, then ``project_out`` (bias-free 1x1 conv ``C -> C``).

``activation`` selects ``act`` among the official options: ``'relu'`` (default, SparseGSA), ``'gelu'`` and
``'sigmoid'`` (the paper's ablations; any other string gives the identity in the official code, ``'identity'``
here) and ``'softmax'`` (over the last index: the official ``Attention`` class, MDTA, which the repository's
``'edge'`` blocks use). The paper describes SparseGSA as keeping "the most useful similarity values"; the code does
that with the ReLU only: there is no top-k selection in it, so none is offered here. Cost ``O(N C^2)`` (the
projections) plus ``O(N C d)`` (the attention): linear in the number of tokens.

Registry family "dense": the attention is over channels, not tokens; every output channel of every token reads all
``H*W`` tokens (through the ``d x d`` affinity), and no key is selected per query by content (the ReLU zeroes
channel pairs, not tokens), so "routed" would be wrong.

Differences from the official code: the input is channel-last and the 1x1 convs run as matmuls on it; the cosine
similarities come from the raw Gram matrix divided by the two norms instead of normalising ``q`` and ``k`` first, and
on maps of more tokens than channels the affinity is folded into ``project_out`` (``A`` block-diagonal, ``W_out A``
applied to ``v`` in one matmul), the same function up to rounding. TLC (the test-time local converter of Chu et al.,
ECCV 2022, that the official code applies in evaluation: the attention runs on overlapping square tiles of side
``tlc_kernel``, each with its own cosine normalisation, and the tile outputs are averaged where they overlap) is
offered as ``tlc_kernel`` with the official tile placement, for any batch (the official ``grids`` asserts batch 1); it
is off by default (``tlc_kernel=None``: the same function in training and evaluation, the official training-time
forward), while DLGSANet turns it on for evaluation with a kernel of 96, 72 or 48 (x2, x3, x4 models). A map of at
most ``tlc_kernel`` pixels per side is one tile, the plain forward. Averaging the tile outputs after ``project_out``
instead of before is the same (the tile weights of a pixel sum to one). The parameter names and shapes are the
official ones (``temperature``, ``qkv.weight``, ``qkv_dwconv.weight``, ``project_out.weight``, and the ``.bias`` of
each conv with ``bias=True``), so an official ``SparseAttention`` state dict loads unchanged (strict).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_choice, check_dim_heads, check_positive_int
from ..functional import pointwise_linear
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

#: the affinity functions: the official ``SparseAttention`` activations and ``Attention``'s softmax
ACTIVATIONS = ("relu", "gelu", "sigmoid", "identity", "softmax")


def tlc_tiles(size: int, kernel: int) -> list[int]:
    """Start offsets of the TLC tiles along one axis of ``size`` pixels, as the official ``grids`` places them:
    ``ceil(size / kernel)`` tiles of ``min(kernel, size)`` evenly spread, the last one flush with the end.

    Examples:
        >>> tlc_tiles(10, 4), tlc_tiles(3, 4), tlc_tiles(8, 4)
        ([0, 3, 6], [0], [0, 4])
    """
    k = min(size, kernel)
    count = (size - 1) // k + 1
    step = k if count == 1 else math.ceil((size - k) / (count - 1) - 1e-8)
    starts, i = [], 0
    while i < size:
        if i + k >= size:
            starts.append(size - k)
            break
        starts.append(i)
        i += step
    return starts


@whole_sequence()
class SparseGSA(nn.Module):
    """``SparseGSA(dim, num_heads=6, bias=False, activation='relu', tlc_kernel=None)``: x ``(B, H, W, dim)`` -> same
    shape.

    Channel (transposed) attention per head: the ``d x d`` affinity ``act(temperature * cos(q_i, k_j))`` of the
    head's query and key channels (cosines over all tokens) mixes its value channels.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads (channel groups), >= 1 (default 6, official).
        bias: Biases on ``qkv``, ``qkv_dwconv`` and ``project_out`` (default False, as DLGSANet builds it).
        activation: The affinity function, one of ``'relu'`` (default, SparseGSA), ``'gelu'``, ``'sigmoid'``,
            ``'identity'``, ``'softmax'`` (Restormer's MDTA).
        tlc_kernel: In evaluation (``eval()``), run the attention on overlapping tiles of this side, >= 1, and
            average (TLC, as the official code does in evaluation); None (default): never (one function in
            training and evaluation).

    Raises:
        TypeError: ``bias`` is not a bool; ``activation`` is not a str; ``tlc_kernel`` is not an int or None.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``activation`` is not one of the above;
            ``tlc_kernel`` < 1.

    Examples:
        >>> import torch
        >>> from nearfar import SparseGSA
        >>> SparseGSA(96, 3)(torch.randn(2, 13, 11, 96)).shape
        torch.Size([2, 13, 11, 96])
    """

    dim: int
    num_heads: int
    head_dim: int
    activation: str
    tlc_kernel: int | None

    def __init__(self, dim: int, num_heads: int = 6, bias: bool = False, activation: str = "relu",
                 tlc_kernel: int | None = None):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        check_bool(bias, "bias")
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.tlc_kernel = None if tlc_kernel is None else check_positive_int(tlc_kernel, "tlc_kernel")
        self.dim, self.num_heads = dim, num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def act(self, logits: torch.Tensor) -> torch.Tensor:
        """The affinity function on ``temperature * cosine`` logits ``(..., d, d)``."""
        if self.activation == "relu":
            return F.relu(logits)
        if self.activation == "gelu":
            return F.gelu(logits)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return logits.softmax(dim=-1)
        return logits

    def affinity(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``act(temperature * cos)`` ``(B, heads, d, d)`` of queries and keys ``(B, N, dim)`` (channel-last)."""
        b = q.shape[0]
        heads, d = self.num_heads, self.head_dim
        # per head q_h^T k_h: one batched matmul over (B, heads) on (d, N) x (N, d) operands
        gram = q.reshape(b, -1, heads, d).permute(0, 2, 3, 1) @ k.reshape(b, -1, heads, d).transpose(1, 2)
        # F.normalize divides by max(norm, 1e-12) = sqrt(max(norm^2, 1e-24)); the sum of squares over the token
        # axis is several times faster than vector_norm on these strided (B, N, C) views
        nq = q.square().sum(dim=1).clamp_min(1e-24).sqrt().view(b, heads, d, 1)
        nk = k.square().sum(dim=1).clamp_min(1e-24).sqrt().view(b, heads, 1, d)
        return self.act(gram / (nq * nk) * self.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channel attention of a channel-last map, then ``project_out``.

        Args:
            x: Input ``(B, H, W, dim)``, any size.

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty.
        """
        b, (h, w), n = check_channels_last(x, 2, self.dim)
        c = self.dim
        qkv = pointwise_linear(x, self.qkv.weight.flatten(1), self.qkv.bias)
        # the channels-first view of a channel-last tensor is channels_last memory: the depth-wise conv runs on it
        qkv = self.qkv_dwconv(qkv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.training or self.tlc_kernel is None or (h <= self.tlc_kernel and w <= self.tlc_kernel):
            return self.attend(qkv.reshape(b, n, 3, c)).view(b, h, w, c)
        rows, cols = tlc_tiles(h, self.tlc_kernel), tlc_tiles(w, self.tlc_kernel)
        kh, kw = min(h, self.tlc_kernel), min(w, self.tlc_kernel)
        tiles = torch.cat([qkv[:, i:i + kh, j:j + kw] for i in rows for j in cols])  # (tiles * B, kh, kw, 3C)
        outs = self.attend(tiles.reshape(-1, kh * kw, 3, c)).view(len(rows) * len(cols), b, kh, kw, c)
        total, count = x.new_zeros(b, h, w, c), x.new_zeros(1, h, w, 1)
        for t, (i, j) in enumerate((i, j) for i in rows for j in cols):
            total[:, i:i + kh, j:j + kw] += outs[t]
            count[:, i:i + kh, j:j + kw] += 1
        return total / count

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """``project_out`` of the channel attention of ``qkv`` ``(B, N, 3, dim)`` (after the depth-wise conv)."""
        b, c, heads, d = qkv.shape[0], self.dim, self.num_heads, self.head_dim
        q, k, v = qkv.unbind(2)  # not slices: their backward would zero-fill three (B, N, 3C) buffers
        attn = self.affinity(q, k)  # (B, heads, d_i, d_j)
        n = q.shape[1]
        if n <= c:  # few tokens: A v per head (N C d), then project_out (N C^2)
            out = v.reshape(b, n, heads, d).transpose(1, 2) @ attn.transpose(-1, -2)
            return pointwise_linear(out.transpose(1, 2).reshape(b, n, c), self.project_out.weight.flatten(1),
                            self.project_out.bias)
        # many tokens: fold A into project_out (C^2 d, less than N C d):
        # project_out(blockdiag(A) v) = v @ M with M[h*d + j, o] = sum_i A[h, i, j] W_out[o, h*d + i]
        w_out = self.project_out.weight.view(c, heads, d)
        mix = torch.einsum("bhij,ohi->bhjo", attn, w_out).reshape(b, c, c)
        out = v @ mix
        if self.project_out.bias is not None:
            out = out + self.project_out.bias
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, activation={self.activation!r}, "
                f"tlc_kernel={self.tlc_kernel}")


register(Mechanism(
    name="dlgsa_global",
    paper="DLGSANet: Lightweight Dynamic Local and Global Self-Attention Networks for Image Super-Resolution "
          "(ICCV 2023, arXiv 2301.02031)",
    repo="NeonLeexiang/DLGSANet", family="dense", dims=("2d",), **image_layer(), cls=SparseGSA,
    make=lambda dim, num_heads, **kw: SparseGSA(dim, num_heads, **kw),
    notes="SparseGSA: Restormer-style transposed (channel) attention, d x d per head from cosine similarities "
          "of q and k channels over all tokens, ReLU instead of softmax (exact zeros: the sparsity; no top-k in "
          "the official code). Family dense: every channel reads all tokens, nothing is routed per query. "
          "activation='softmax' gives Restormer's MDTA. Official SparseAttention parameter names."))
