"""DCAL's global-local cross-attention (GLCA): the top-``R`` tokens of an attention rollout query all tokens.

**PROVISIONAL: written from the paper, no official code.** Paper: Zhu, Ke, Li, Liu, Tian & Shan, "Dual
Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification" (DCAL, CVPR 2022,
arXiv 2205.02151). The authors released no code (the code index holds only third-party re-implementations), so
this follows the paper's equations; the parameter names are timm's ViT ``Attention`` names (``qkv``, ``proj``),
so a ViT block's ``attn.*`` weights load.

The paper's GLCA (its Eq. 3): the attention rollout of the self-attention branch up to layer ``i``
(``nearfar.functional.attention_rollout``: head mean, ``0.5 S + 0.5 I``, multiplied through the layers) gives the
class token's accumulated attention to every patch token; the ``R`` patches with the highest scores (``R = 10%``
of them for fine-grained categorization, ``30%`` for re-identification) give the local queries ``Q^l``, which
attend to the keys and values of *all* tokens: ``softmax(Q^l K^g^T / sqrt(d)) V^g``. The GLCA block has its own
weights (not shared with self-attention). The selection is not differentiable (no gradient flows to the scores).

This module is the attention of that block (the caller adds the norm, residual and MLP):

- ``attend_rows(tokens, rows)``: the paper's form on a token list ``(B, N, C)`` (class token included where the
  model has one): outputs ``(B, R, C)`` for the given query rows only, keys and values from every token; DCAL
  feeds these ``R`` outputs (plus the class token's) to the next blocks;
- ``forward_selected(x, scores=None, attn=None)``: on a feature map ``(B, H, W, C)``, selects the rows, returns
  the ``R`` outputs and their flat indices ``(B, R)`` (ascending, raster order);
- ``forward(x, ...)`` (the registry's ``x -> same shape`` contract): the ``R`` outputs scattered back at their
  positions of a **zero** map ``(B, H, W, C)``; every other position is 0, so ``x + glca(norm(x))`` leaves the
  unselected tokens as they were, as when the caller scatters the block's outputs itself.

Where the scores come from: ``scores`` ``(B, H*W)`` or ``(B, H, W)`` (e.g. the class-token row of a rollout with
the class column dropped); or ``attn``, the self-attention maps of the layers so far (first layer first, over
``1 + H*W`` tokens, class token first), from which the class-token row of the rollout is computed; or neither:
then this layer ranks the tokens by the head-averaged attention of the mean token's query over all keys (our
stand-in for the class token of the one-layer rollout, whose class row is ``0.5 S[0] + 0.5 e_0`` and so ranks the
patches as ``S[0]`` does; a layer used alone has no class token nor earlier maps).

What differs from the paper (no official code to compare with): the number of local queries is
``R = max(1, round(local_ratio * N))`` (the paper says 10% without a rounding rule); ``forward`` on a map has no
class token (the paper adds its class-token query and key: use ``attend_rows`` with the class token's row for
that); the pooled-query scores when none are given are ours; attention/projection dropout are not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_real_range, check_scale, check_tokens
from ..functional import attend, attention_rollout, merge_heads
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence()
class GLCAttention(nn.Module):
    """``GLCAttention(dim, num_heads, local_ratio=0.1, qkv_bias=True, qk_scale=None)``: DCAL's global-local
    cross-attention (PROVISIONAL, from the paper): the top ``R = round(local_ratio * N)`` tokens by a rollout score
    query all ``N`` tokens. ``forward``: ``(B, H, W, dim)`` -> ``(B, H, W, dim)``, the ``R`` outputs at their
    positions and **zeros elsewhere** (see the module docstring; ``forward_selected`` returns the ``R`` outputs
    and their indices, ``attend_rows`` works on token lists with a class token).

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        local_ratio: Share of the tokens used as local queries, in ``(0, 1]``: 0.1 (default) as the paper for
            fine-grained categorization, 0.3 for re-identification, 1 gives plain multi-head self-attention.
        qkv_bias: Biases on ``qkv`` (default True, as timm's ViT).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``local_ratio`` or ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``local_ratio`` outside ``(0, 1]``;
            ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import GLCAttention
        >>> from nearfar.functional import attention_rollout
        >>> glca = GLCAttention(64, 4, local_ratio=0.1)
        >>> x = torch.randn(2, 14, 14, 64)
        >>> maps = torch.randn(3, 2, 4, 197, 197).softmax(-1)   # three SA layers over class token + 196 patches
        >>> glca(x, attn=maps).shape                             # 20 of 196 positions non-zero per image
        torch.Size([2, 14, 14, 64])
        >>> out, idx = glca.forward_selected(x, scores=attention_rollout(maps, row=0)[:, 1:])
        >>> out.shape, idx.shape
        (torch.Size([2, 20, 64]), torch.Size([2, 20]))
        >>> tokens = torch.randn(2, 197, 64)                    # the paper's form: class token first
        >>> rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), idx + 1], 1)   # class query + 20 local ones
        >>> glca.attend_rows(tokens, rows).shape
        torch.Size([2, 21, 64])
    """

    def __init__(self, dim: int, num_heads: int, local_ratio: float = 0.1, qkv_bias: bool = True,
                 qk_scale: float | None = None):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        self.local_ratio = check_real_range(local_ratio, "local_ratio", 0.0, 1.0, open_low=True)
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def num_local(self, n: int) -> int:
        """``R``, the number of local queries among ``n`` tokens: ``round(local_ratio * n)`` (halves up), in
        ``[1, n]``."""
        return max(1, min(n, int(self.local_ratio * n + 0.5)))

    def _linear(self, t: torch.Tensor, part: slice) -> torch.Tensor:
        bias = self.qkv.bias
        return F.linear(t, self.qkv.weight[part], None if bias is None else bias[part])

    def _keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._linear(tokens, slice(self.dim, None))
        k, v = kv.unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v  # (B, heads, N, d) views

    def _attend(self, tokens: torch.Tensor, rows: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = self._keys_values(tokens) if kv is None else kv
        picked = tokens.gather(1, rows.unsqueeze(-1).expand(-1, -1, self.dim))
        q = self._linear(picked, slice(0, self.dim)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = attend(q, k, v, scale=self.scale)
        return self.proj(merge_heads(out, (rows.shape[1],)))

    def attend_rows(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The paper's GLCA on a token list: the queries of ``rows`` over the keys and values of all tokens.

        Args:
            tokens: ``(B, N, dim)`` (with the class token where the model has one).
            rows: Integer ``(B, R)`` query indices into ``tokens``, in ``[0, N)``.

        Returns:
            ``(B, R, dim)``: row ``r`` is the output of token ``rows[:, r]``.

        Raises:
            TypeError: ``tokens`` is not a tensor; ``rows`` is not an integer tensor.
            ValueError: wrong shapes, or ``rows`` outside ``[0, N)``.
        """
        tokens = check_tokens(tokens, self.dim, "tokens")
        if not isinstance(rows, torch.Tensor) or rows.is_floating_point() or rows.is_complex() \
                or rows.dtype == torch.bool:
            raise TypeError(f"rows must be an integer tensor (B, R), got {getattr(rows, 'dtype', type(rows))}")
        if rows.dim() != 2 or rows.shape[0] != tokens.shape[0] or rows.shape[1] == 0:
            raise ValueError(f"rows must be (B, R) = ({tokens.shape[0]}, R >= 1), got {tuple(rows.shape)}")
        if not torch.compiler.is_compiling() and (rows.min() < 0 or rows.max() >= tokens.shape[1]):
            raise ValueError(f"rows must be in [0, {tokens.shape[1]}) (token indices), got values in "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        return self._attend(tokens, rows.long())

    def pooled_scores(self, tokens: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """The default selection scores ``(B, N)`` (no gradient): the mean token's query, through this layer's
        ``qkv``, against every key, softmax per head, averaged over heads. ``k``: this layer's keys of ``tokens``
        if already computed."""
        with torch.no_grad():
            if k is None:
                k = self._keys_values(tokens)[0]
            q = self._linear(tokens.mean(1), slice(0, self.dim)).unflatten(-1, (self.num_heads, -1))
            logits = torch.einsum("bhd,bhnd->bhn", q, k) * self.scale
            return logits.softmax(-1).mean(1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The ``R`` highest-scoring token indices ``(B, R)``, ascending. ``scores``: ``(B, N)`` (no gradient)."""
        idx = scores.detach().topk(self.num_local(scores.shape[1]), dim=-1).indices
        return idx.sort(-1).values

    def _scores(self, b: int, spatial: tuple[int, ...], n: int, scores: object,
                attn: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | None:
        if scores is not None and attn is not None:
            raise ValueError("pass scores or attn, not both")
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
                raise TypeError(f"scores must be a floating tensor (B, H*W) or (B, H, W), got "
                                f"{getattr(scores, 'dtype', type(scores).__name__)}")
            if tuple(scores.shape) not in ((b, n), (b, *spatial)):
                raise ValueError(f"scores must be (B, H*W) = {(b, n)} or (B, H, W) = {(b, *spatial)}, "
                                 f"got {tuple(scores.shape)}")
            return scores.reshape(b, n)
        if attn is not None:
            full = attention_rollout(attn, row=0)
            if tuple(full.shape) != (b, n + 1):
                raise ValueError(f"attn must hold (B, heads, 1 + H*W, 1 + H*W) maps with the class token first, "
                                 f"B = {b}, H*W = {n}; their rollout row is {tuple(full.shape)}")
            return full[:, 1:]
        return None

    def forward_selected(self, x: torch.Tensor, scores: torch.Tensor | None = None,
                         attn: torch.Tensor | list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``R`` local queries' outputs and their flat (raster) indices.

        Args:
            x: Input ``(B, H, W, dim)``.
            scores: Selection scores ``(B, H*W)`` or ``(B, H, W)`` (higher = selected), or None.
            attn: Or the self-attention maps so far (``nearfar.functional.attention_rollout``'s ``maps``), over
                ``1 + H*W`` tokens with the class token first; the class row of their rollout is the score.
                Neither: this layer's pooled-query scores (``pooled_scores``).

        Returns:
            ``(out, idx)``: ``out (B, R, dim)``, ``idx (B, R)`` int64 ascending.

        Raises:
            TypeError: ``x`` or ``scores`` is not a (floating) tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; both ``scores`` and ``attn``; their shapes.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        s = self._scores(b, spatial, n, scores, attn)
        tokens = x.reshape(b, n, self.dim)
        kv = self._keys_values(tokens)
        idx = self.select(self.pooled_scores(tokens, kv[0]) if s is None else s)
        return self._attend(tokens, idx, kv), idx

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None,
                attn: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        """``forward_selected``'s outputs scattered at their positions of a zero map.

        Args:
            x: Input ``(B, H, W, dim)``.
            scores: As in ``forward_selected``.
            attn: As in ``forward_selected``.

        Returns:
            ``(B, H, W, dim)``: the GLCA output at the ``R`` selected positions of each image, 0 elsewhere.

        Raises:
            TypeError: ``x`` or ``scores`` is not a (floating) tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; both ``scores`` and ``attn``; their shapes.
        """
        out, idx = self.forward_selected(x, scores, attn)
        b = x.shape[0]
        full = out.new_zeros(b, x[0, ..., 0].numel(), self.dim)
        full = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, self.dim), out)
        return full.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, local_ratio={self.local_ratio}"


register(Mechanism(
    name="glca",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification "
          "(DCAL, CVPR 2022, arXiv 2205.02151)",
    repo="(no official code found)", family="routed", dims=("2d",),
    **image_layer(cross="the local queries and the global keys are cut from one feature map (GLCA's 'cross' is "
                        "local-to-global within one image); the paper defines no second source"),
    make=lambda dim, num_heads, **kw: GLCAttention(dim, num_heads, **kw), cls=GLCAttention,
    notes="PROVISIONAL, from the paper (no official code). The top-R tokens (R = 10% by default, 30% for Re-ID) "
          "by a rollout score query all tokens; forward returns their outputs at their positions and ZEROS "
          "elsewhere (forward_selected: the R outputs + indices). Scores: pass scores= or attn= (rollout of the "
          "SA maps, class token first); alone, the layer ranks tokens by its mean-token query's attention."))
