"""Perturbed grouped-query attention (PGQA): GQA with fixed contiguous groups whose per-head outputs have a random
matrix, rescaled to each output's own mean and standard deviation, subtracted during training.

Paper: Khan, Khaquan, Tafveez, Samiwala, Raza, "Beyond Uniform Query Distribution: Key-Driven Grouped Query
Attention" (2024, arXiv 2408.08454). Code read: yjzhang0505/key-driven-gqa (a fork whose README says it is the
official implementation), ``modules/attention/pgqa.py`` (``PGQA.forward``, ``get_gaussian``).

Query head ``h`` uses KV head ``h // (H / G)`` (plain GQA). In training mode, each head's attention output, seen as
one row ``o`` of ``N * d`` numbers per sequence, becomes ``o - (z * std(o) + mean(o))``: ``z`` is a row of
``torch.rand`` samples with entry ``i`` set to 0 for the head's index ``i`` inside its group (the official
"diagonal" of each group's matrix), then standardised (its mean subtracted, divided by its std, or by 1 if that is
0); ``std`` is the unbiased one, as ``torch.std``. One matrix ``z (H, N * d)`` is drawn per forward from the global
generator and shared by the sequences of the batch (as the official code draws one matrix per group). The
perturbation is differentiable through ``mean(o)`` and ``std(o)``, as in the official code. Eval mode is plain
GQA.

Differences from the official code: the perturbation is applied in training mode only (the official forward
applies it always, so its evaluation outputs are random too); one draw for all groups instead of one per group (the
same distribution); a row of a single number (``N * d == 1``, no std) is left unperturbed; projections, RoPE, the
optional output bias and ``from_mha`` as in ``nearfar.layers.kdgqa``; no dropout. The official function is named
``get_gaussian`` but draws uniform samples; so does this one.
"""

from __future__ import annotations

import torch

from ..functional import attend, merge_heads
from .grouped_query import GroupedQueryAttention
from .projections import meta_forward
from .registry import Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence


def perturb_heads(out: torch.Tensor, group_size: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """PGQA's perturbation of per-head outputs ``out (B, H, N, d)``: each ``(b, h)`` row of ``N * d`` numbers minus
    the standardised random row ``z[h]`` rescaled to that row's mean and (unbiased) std.

    Args:
        out: Attention outputs ``(B, H, N, d)``.
        group_size: Query heads per KV head (``H / G``): entry ``h % group_size`` of ``z[h]`` is zeroed first.
        noise: The raw uniform samples ``(H, N * d)``; None (default): drawn with ``torch.rand``.

    Returns:
        The perturbed outputs ``(B, H, N, d)``; ``out`` itself when ``N * d < 2``.

    Examples:
        >>> import torch
        >>> from nearfar.layers.pgqa import perturb_heads
        >>> o = torch.randn(2, 4, 5, 3)
        >>> noise = o - perturb_heads(o, 2)      # rows with o's mean and std
        >>> torch.allclose(noise.flatten(2).mean(-1), o.flatten(2).mean(-1), atol=1e-6)
        True
    """
    b, h, n, d = out.shape
    if n * d < 2:
        return out
    z = torch.rand(h, n * d, device=out.device, dtype=out.dtype) if noise is None else noise.to(out)
    heads = torch.arange(h, device=out.device)
    heads = heads[heads % group_size < n * d]  # the official "diagonal" of each group's (group_size, N d) matrix
    z = z.index_put((heads, heads % group_size), torch.zeros((), dtype=z.dtype, device=z.device))
    std = z.std(-1, keepdim=True)
    z = (z - z.mean(-1, keepdim=True)) / torch.where(std == 0, torch.ones_like(std), std)
    rows = out.reshape(b, h, n * d)
    noisy = rows - (z * rows.std(-1, keepdim=True) + rows.mean(-1, keepdim=True))
    return noisy.reshape(b, h, n, d)


@whole_sequence()
class PGQA(GroupedQueryAttention):
    """``PGQA(dim, num_heads, num_kv_heads=None, ...)``: x ``(B, N, dim)`` -> same shape; GQA with contiguous groups,
    whose per-head outputs are perturbed in training mode (see the module docstring).

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with RoPE).
        num_heads: Number of query heads ``H``, >= 1.
        num_kv_heads: Number of KV heads ``G``, dividing ``num_heads``; None (default): ``num_heads // 2`` (the
            official default), or ``num_heads`` when that is odd.
        qkv_bias: Biases on the q/k/v projections (default False).
        proj_bias: A bias on the output projection (default False; the official ViT layer has one).
        rope: Rotary positions on queries and keys (default True; the official ViT layer has none).

    Raises:
        TypeError: A flag that is not a bool; ``num_kv_heads`` not an int.
        ValueError: ``dim`` not a positive multiple of ``num_heads``; ``num_kv_heads`` not dividing ``num_heads``;
            an odd head dim with RoPE.

    Examples:
        >>> import torch
        >>> from nearfar import PGQA
        >>> layer = PGQA(64, 8)
        >>> x = torch.randn(2, 16, 64)
        >>> layer(x).shape
        torch.Size([2, 16, 64])
        >>> torch.equal(layer.eval()(x), layer(x))   # eval: plain GQA
        True
    """

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """PGQA of ``x``.

        Args:
            x: Input ``(B, N, dim)``.
            key_padding_mask: Optional bool ``(B, N)``, True = a real token (padded rows still count in the
                perturbation's statistics, as every row of the official output does).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; a bad ``key_padding_mask``.
        """
        if x.device.type == "meta":  # the routing reads values: shapes only
            return meta_forward(self, x)
        x = self.check_x(x)
        mask = self.check_padding(key_padding_mask, x.shape[0], x.shape[1])
        q, k, v, _ = rotary_qkv(self, x, 0)
        out = attend(q, k, v, key_padding_mask=mask)
        if self.training:
            out = perturb_heads(out, self.num_heads // self.num_kv_heads)
        return self.o_proj(merge_heads(out, (x.shape[1],)))


_STATS = ("in training the subtracted perturbation is rescaled by the mean and std of each head's output over all "
          "positions, so every output depends on every query")
register(Mechanism(
    name="pgqa", paper="Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention (arXiv 2408.08454, "
                       "2024)",
    repo="yjzhang0505/key-driven-gqa", family="dense", dims=("1d",), cls=PGQA,
    patterns={"NS": {}}, why_not={"CS": _STATS + "; the paper's layer is a ViT encoder's",
                                  "NC": _STATS + " (NC needs independent queries); the paper defines no second source",
                                  "CC": _STATS + "; the paper defines no second source"},
    make=lambda dim, num_heads, **kw: PGQA(dim, num_heads, **kw),
    notes="GQA (num_heads // 2 KV heads, contiguous groups) with a random perturbation of each head's output, "
          "rescaled to its mean and std, subtracted in training (eval: plain GQA); the paper's control for KDGQA"))
