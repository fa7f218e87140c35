"""DCAL's pair-wise cross-attention (PWCA): an image's queries attend to its own and a paired image's keys.

**PROVISIONAL: written from the paper, no official code.** Paper: Zhu, Ke, Li, Liu, Tian & Shan, "Dual
Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification" (DCAL, CVPR 2022,
arXiv 2205.02151). The authors released no code (the code index holds only third-party re-implementations), so
this follows the paper's Eq. 4; the parameter names are timm's ViT ``Attention`` names (``qkv``, ``proj``).

PWCA is a training-time regulariser: for a pair of images ``(I1, I2)`` the queries of ``I1`` attend to the
concatenated keys and values of both, ``softmax(Q1 [K1; K2]^T / sqrt(d)) [V1; V2]`` (``2N`` keys), so the
attention to ``I1``'s own tokens is diluted by a distractor. It **shares its weights with the self-attention**
(the same ``qkv``/``proj``; the paper runs it in all ``T = 12`` blocks) and is **removed at inference**. So this
module is one multi-head self-attention with two modes:

- ``forward(x, pair)``: PWCA of ``x`` ``(B, H, W, C)`` against the paired images ``pair`` ``(B, H', W', C)``
  (any size; ``pair[b]`` is the distractor of ``x[b]``);
- ``forward(x)`` in **training** mode: PWCA with each image paired with the previous one in the batch
  (``pair = x.roll(1, 0)``; the paper samples the pairs at random from the training set: with a shuffled batch
  this is such a draw, and every image is a query once); a batch of one is paired with itself, which is plain
  self-attention (duplicated keys and values change no softmax);
- ``forward(x)`` in **eval** mode, and ``self_attention(x)`` in any mode: plain self-attention (the inference
  path, and the SA branch that DCAL trains beside PWCA with the same weights).

What differs from the paper (no official code to compare with): the in-batch pairing by rolling the batch is our
default (pass ``pair`` for other pairings); the paper's class tokens are not part of a feature map (use
``attend_pair`` on token lists that hold them); attention/projection dropout are not implemented.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_scale, check_tokens
from ..functional import attend, merge_heads, split_qkv
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


@whole_sequence(tokens=("pair",))
class PWCAttention(nn.Module):
    """``PWCAttention(dim, num_heads, qkv_bias=True, qk_scale=None)``: DCAL's pair-wise cross-attention
    (PROVISIONAL, from the paper), a training-time regulariser sharing the self-attention's weights: ``x``'s
    queries over ``[K_x; K_pair]``, ``[V_x; V_pair]``. ``forward(x)``: in training, each image is paired with the
    previous one of the batch; in eval, plain self-attention (PWCA is removed at inference). ``(B, H, W, dim)``
    -> same shape.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        qkv_bias: Biases on ``qkv`` (default True, as timm's ViT).
        qk_scale: Score scale, a positive finite number; None (default): ``head_dim ** -0.5``.

    Raises:
        TypeError: ``qk_scale`` is not a number.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``qk_scale`` <= 0 or not finite.

    Examples:
        >>> import torch
        >>> from nearfar import PWCAttention
        >>> pwca = PWCAttention(64, 4)
        >>> x1, x2 = torch.randn(2, 14, 14, 64), torch.randn(2, 14, 14, 64)
        >>> pwca(x1, pair=x2).shape                     # x1's queries over the keys of x1 and x2
        torch.Size([2, 14, 14, 64])
        >>> y = pwca.train()(x1)                        # training: x1[b] paired with x1[b - 1]
        >>> bool(torch.allclose(pwca.eval()(x1), pwca.self_attention(x1)))   # inference: self-attention
        True
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        qk_scale = check_scale(qk_scale)
        self.dim, self.num_heads = dim, num_heads
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.qkv.bias
        kv = nn.functional.linear(tokens, self.qkv.weight[self.dim:], None if bias is None else bias[self.dim:])
        k, v = kv.unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def _run(self, tokens: torch.Tensor, pair: torch.Tensor | None, roll: bool) -> torch.Tensor:
        """Attention of ``tokens (B, N, C)``'s queries over their own keys, plus ``pair``'s (or, with ``roll``,
        the batch's previous item's) when given."""
        q, k, v = split_qkv(self.qkv(tokens), self.num_heads)
        if pair is not None:
            k2, v2 = self._kv(pair)
            k, v = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
        elif roll:
            k, v = torch.cat([k, k.roll(1, 0)], 2), torch.cat([v, v.roll(1, 0)], 2)
        out = attend(q, k, v, scale=self.scale)
        return self.proj(merge_heads(out, (tokens.shape[1],)))

    def attend_pair(self, tokens: torch.Tensor, pair_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """PWCA on token lists (class tokens included where the model has them): ``tokens (B, N, dim)``'s queries
        over the keys and values of ``tokens`` and ``pair_tokens (B, N2, dim)``; None: self-attention.

        Args:
            tokens: The queries' image ``(B, N, dim)``.
            pair_tokens: The distractor ``(B, N2, dim)``, or None.

        Returns:
            ``(B, N, dim)``.

        Raises:
            ValueError: ``tokens`` or ``pair_tokens`` is not ``(B, N >= 1, dim)``, or the batch sizes differ.
        """
        tokens = check_tokens(tokens, self.dim, "tokens")
        if pair_tokens is not None:
            pair_tokens = check_tokens(pair_tokens, self.dim, "pair_tokens")
            if pair_tokens.shape[0] != tokens.shape[0]:
                raise ValueError(f"pair_tokens must have the batch size of tokens ({tokens.shape[0]}), got "
                                 f"{pair_tokens.shape[0]}")
        return self._run(tokens, pair_tokens, roll=False)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Plain multi-head self-attention of ``x (B, H, W, dim)`` with the shared weights (the SA branch and the
        inference path)."""
        b, spatial, n = check_channels_last(x, 2, self.dim)
        return self._run(x.reshape(b, n, self.dim), None, roll=False).reshape(x.shape)

    def forward(self, x: torch.Tensor, pair: torch.Tensor | None = None) -> torch.Tensor:
        """PWCA of ``x`` against ``pair``; without ``pair``: against the batch rolled by one in training, plain
        self-attention in eval.

        Args:
            x: Input ``(B, H, W, dim)``.
            pair: The paired images ``(B, H', W', dim)`` (``pair[b]`` distracts ``x[b]``), or None.

        Returns:
            ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` or ``pair`` is not a tensor.
            ValueError: ``x`` or ``pair`` is not ``(B, H, W, dim)`` or is empty; the batch sizes differ.
        """
        b, spatial, n = check_channels_last(x, 2, self.dim)
        pair_tokens = None
        if pair is not None:
            pb, _, pn = check_channels_last(pair, 2, self.dim, "pair")
            if pb != b:
                raise ValueError(f"pair must have the batch size of x ({b}), got {pb}")
            pair_tokens = pair.reshape(pb, pn, self.dim)
        out = self._run(x.reshape(b, n, self.dim), pair_tokens, roll=pair is None and self.training)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


register(Mechanism(
    name="pwca",
    paper="Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification "
          "(DCAL, CVPR 2022, arXiv 2205.02151)",
    repo="(no official code found)", family="dense", dims=("2d",),
    **image_layer(cross="PWCA's queries attend to their own image's keys and a paired image's together, not to a "
                        "source alone (an output depends on the other query tokens' keys, which CAB's cross "
                        "patterns exclude); the pair is passed as pair=, not as a context"),
    make=lambda dim, num_heads, **kw: PWCAttention(dim, num_heads, **kw), cls=PWCAttention,
    notes="PROVISIONAL, from the paper (no official code). A training-only regulariser sharing the SA weights: "
          "queries over [K_x; K_pair] (2N keys). forward(x) in training pairs each image with the previous one of "
          "the batch (pass pair= for others); in eval it is plain self-attention (PWCA is removed at inference)."))
