"""Gaussian Adaptive Attention (GAAM): each feature of each token is re-weighted by a product of learnable Gaussian
densities of its standardised value, normalised along the sequence; non-causal (the paper's form) or causal.

Paper: Ioannides et al., "Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across
Multiple Modalities" (arXiv 2401.11143, 2024). Official code: gioannides/Gaussian-Adaptive-Attention
``gaussian_adaptive_attention/GaussianBlock.py`` (``GaussianAdaptiveAttention``,
``MultiHeadGaussianAdaptiveAttention``, ``GaussianBlock``; commit 145d1bc).

Not a q/k/v attention: there are no projections and no scores between tokens. Per head ``h`` (a group of channels)
with learnable offsets ``mu_h[k]`` (init 0) and scales ``c_h[k]`` (init ``exp(randn)``), ``k < n_gaussians``, and
per channel with ``m``/``s2`` the mean and the (unbiased) variance of the channel along the sequence::

    g_i = prod_k N((x_i - (m + mu[k])) / sqrt(s2 + eps); 0, c[k]^2)     (a product, elementwise)
    w_i = g_i / sum_j g_j,        out_i = x_i * w_i

The product of the ``n_gaussians`` densities of one variable is one Gaussian up to a factor: with
``A = sum_k c_k^-2``, ``beta = sum_k mu_k c_k^-2 / A`` and ``gamma = sum_k (mu_k - beta)^2 c_k^-2``,
``log g_i = -(A (d_i - beta)^2 + gamma) / (2 (s2 + eps)) + const`` with ``d_i = x_i - m``. We evaluate that form
(one pass, no cancellation) and normalise in log space (``w = exp(log g - logsumexp log g)``); the constant
``prod_k (2 pi c_k^2)^-1/2`` cancels.

Causal form (``causal=True``, ours; the paper's statistics and normaliser run over the whole axis): token ``i``
uses the mean and unbiased variance of its prefix ``x_0..x_i`` (its channel's valid tokens), ``g_i`` is its density
under those prefix statistics, and the normaliser runs over the prefix: ``w_i = g_i / sum_{j <= i} g_j``, each
``g_j`` taken under the statistics of *its own* prefix. We chose this over re-evaluating every earlier token under
token ``i``'s statistics (the official layer applied to ``x[:i+1]``, read at ``i``): that sum,
``sum_j exp(-A (x_j - m_i - beta)^2 / (2 s2_i))``, is a kernel density estimate at a centre and bandwidth that move
with ``i``, which no fixed set of running sums gives, so it would need the whole prefix (O(N) state, O(N^2) work).
Ours keeps O(1) state: per channel the valid-token count, the first valid value (a shift ``K`` for stable sums),
``sum (x - K)``, ``sum (x - K)^2`` and the running ``log sum_j g_j``; it is what ``new_cache`` holds, and decoding
equals the teacher-forced forward. Each weight is then the newest token's share of its prefix's weights (the first
token gets weight 1; ``w_i prod_{j > i} (1 - w_j)`` are the non-causal-style weights of the whole sequence, which
sum to 1). A caveat of prefix statistics: the first token is its own mean (``d = 0``, variance ``eps``), so with
zero offsets (the init) it has the largest possible density and weighs in every later normaliser; non-zero offsets
make it tiny instead (``log g ~ -mu^2 / eps``), which the log-space normaliser handles.

Differences from the official code:

- Heads: ``MultiHeadGaussianAdaptiveAttention`` cuts the normalisation axis itself into ``num_heads`` pieces (each
  head normalises within its piece of the sequence). We cut the feature axis into heads (``dim // num_heads``
  channels each, the last taking the remainder, as the official split) and every head normalises over the whole
  sequence: with the sequence cut, a token's output would depend on ``N`` (which piece it falls in), which has no
  causal form and no decoding. Parameters are ``mean_offsets`` and ``c``, ``(num_heads, n_gaussians)``: row ``h``
  is the official ``attention_heads[h].mean_offsets`` / ``.c``.
- Padding: a bool ``key_padding_mask`` (True = real token) instead of the official ``padding_value`` (every element
  equal to it). Padded tokens pass through unchanged (as the official code) and are left out of the mean, the
  variance and the normaliser; the official code zeroes them but still counts them in the mean and variance, and
  adds their densities to the normaliser.
- The variance divides by ``max(n - 1, 1)`` (a single token has variance 0, then ``eps``; ``torch.var`` gives nan).
- The normaliser is an exact log-space softmax, so the weights always sum to 1; the official code clamps the sum
  of densities at ``eps`` (weights summing to less than 1 when all densities are tiny) and can underflow.
- ``eps`` is honoured; the official multi-head module passes its ``eps`` to the heads' unused ``mean_offset_init``,
  so the heads always use ``1e-8`` (the default here). No ``return_attention_details``: ``gaussian_weights(x)``
  returns the weights. ``GaussianBlock``'s residual ``x + layer(x)`` is the caller's (as for every nearfar layer).
- fp16/bf16 inputs are computed in fp32 (fp64 for fp64) and cast back.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_bool, check_positive_float, check_positive_int
from .kv_cache import DecodeState
from .registry import Mechanism, register
from .sharding import whole_sequence

#: a causal layer's running sums after a call: count, shift, sum (x - shift), sum (x - shift)^2
_Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class GAAMCache(DecodeState):
    """Decoding state of a causal ``GAAMAttention``, per sequence and channel: ``count`` of valid tokens ``(B, 1)``,
    the shift ``K``, ``s1 = sum (x - K)``, ``s2 = sum (x - K)^2`` and ``log_norm = log sum_j g_j`` (``-inf``
    before the first valid token), each ``(B, dim)`` in fp32 (fp64 for fp64 inputs). Its size does not depend on
    the sequence length; ``length`` counts the tokens seen, padded ones included."""

    def __init__(self, batch: int, dim: int, state_dtype: torch.dtype, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.count = torch.zeros(self.batch, 1, dtype=state_dtype, device=self.device)
        self.shift, self.s1, self.s2 = (torch.zeros(self.batch, dim, dtype=state_dtype, device=self.device)
                                        for _ in range(3))
        self.log_norm = torch.full((self.batch, dim), -torch.inf, dtype=state_dtype, device=self.device)
        self.device, self.length = self.count.device, 0


@whole_sequence()
class GAAMAttention(nn.Module):
    """``GAAMAttention(dim, num_heads, n_gaussians=5, eps=1e-8, causal=False)``: Gaussian Adaptive Attention of
    ``x (B, N, dim)`` along the sequence, ``out = x * w`` with per-channel weights ``w`` that sum to 1 over the
    sequence (causal: over the prefix, with prefix statistics; decoding through ``new_cache`` with O(1) state).

    Ioannides et al., "Gaussian Adaptive Attention is All You Need" (arXiv 2401.11143, 2024); official code:
    gioannides/Gaussian-Adaptive-Attention. Channels are split into ``num_heads`` contiguous groups, each with its
    own ``n_gaussians`` mean offsets and scales. Returns the update only (the official ``GaussianBlock`` adds ``x``).

    Args:
        dim: Model width, >= ``num_heads``.
        num_heads: Number of heads (channel groups of ``dim // num_heads``, the last taking the remainder), >= 1.
        n_gaussians: Gaussians per head, >= 1 (default 5, the official example's).
        eps: Added to the variance, > 0 (default 1e-8, the official default).
        causal: Prefix statistics and a prefix normaliser (default False: the whole sequence, as the paper).

    Raises:
        TypeError: ``dim``, ``num_heads`` or ``n_gaussians`` is not an int; ``eps`` is not a number; ``causal`` is
            not a bool.
        ValueError: ``dim``, ``num_heads`` or ``n_gaussians`` < 1; ``num_heads > dim``; ``eps`` not in (0, inf).

    Examples:
        >>> import torch
        >>> from nearfar import GAAMAttention
        >>> layer = GAAMAttention(64, 4)
        >>> x = torch.randn(2, 10, 64)
        >>> layer(x).shape
        torch.Size([2, 10, 64])
        >>> torch.allclose(layer.gaussian_weights(x).sum(1), torch.ones(2, 64))
        True
        >>> causal = GAAMAttention(64, 4, causal=True)
        >>> cache = causal.new_cache(2)   # O(1) state: the same outputs, one token at a time
        >>> steps = torch.cat([causal(x[:, i:i + 1], cache=cache) for i in range(10)], 1)
        >>> torch.allclose(steps, causal(x), atol=1e-6)
        True
    """

    head_of_channel: torch.Tensor  # a buffer: the head of each channel

    def __init__(self, dim: int, num_heads: int, n_gaussians: int = 5, eps: float = 1e-8, causal: bool = False):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.num_heads = check_positive_int(num_heads, "num_heads")
        if num_heads > dim:
            raise ValueError(f"num_heads ({num_heads}) must be at most dim ({dim}): each head takes >= 1 channel")
        self.n_gaussians = check_positive_int(n_gaussians, "n_gaussians")
        self.eps = check_positive_float(eps, "eps")
        self.causal = check_bool(causal, "causal")
        self.mean_offsets = nn.Parameter(torch.zeros(num_heads, n_gaussians))
        self.c = nn.Parameter(torch.exp(torch.randn(num_heads, n_gaussians)))
        heads = (torch.arange(dim) // (dim // num_heads)).clamp(max=num_heads - 1)
        self.register_buffer("head_of_channel", heads, persistent=False)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> GAAMCache:
        """An empty decoding state for ``batch`` sequences of a causal layer (running statistics, O(1) per channel).

        Args:
            batch: Number of sequences, >= 1 (default 1).
            device: The state's device; None (default): the layer's.
            dtype: The dtype of the inputs ``x``; None (default): fixed by the first call.

        Returns:
            A ``GAAMCache`` whose size does not depend on the sequence length.

        Raises:
            ValueError: The layer is not causal (``causal=False``); a bad ``batch``, ``device`` or ``dtype``.
        """
        if not self.causal:
            raise ValueError("GAAMAttention(causal=False) normalises over the whole sequence: it has no decoding "
                             "cache (build it with causal=True)")
        ref = self.c
        st = torch.float64 if (dtype or ref.dtype) == torch.float64 else torch.float32
        return GAAMCache(batch, self.dim, st, ref.device if device is None else device, dtype)

    def _check(self, x: object, key_padding_mask: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.dim or 0 in x.shape:
            raise ValueError(f"x must be (B, N, {self.dim}) with B, N >= 1, got {tuple(x.shape)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (B, N), True = real token")
            if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"key_padding_mask must have shape (B, N) = {tuple(x.shape[:2])}, got "
                                 f"{tuple(key_padding_mask.shape)}")
            if key_padding_mask.device != x.device:
                raise ValueError(f"key_padding_mask must be on x's device {x.device}, got {key_padding_mask.device}")

    def _density_terms(self, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per channel ``(A, beta, gamma)`` of the product of the head's Gaussians (see the file docstring)."""
        prec = self.c.to(ct).pow(-2)  # (H, G)
        mu = self.mean_offsets.to(ct)
        a = prec.sum(-1)
        beta = (mu * prec).sum(-1) / a
        gamma = ((mu - beta[:, None]).square() * prec).sum(-1)
        idx = self.head_of_channel
        return a[idx], beta[idx], gamma[idx]

    def _weights(self, x: torch.Tensor, cache: GAAMCache | None,
                 key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The weights ``w`` (B, N, dim) in the compute dtype (0 at padded tokens); updates ``cache``."""
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(ct)
        valid = None if key_padding_mask is None else key_padding_mask[..., None]  # (B, N, 1)
        vf = torch.ones_like(xc[..., :1]) if valid is None else valid.to(ct)
        stats = None
        if self.causal:
            d, var, stats = self._prefix_stats(xc, vf, valid, cache)
        else:
            n = vf.sum(1, keepdim=True)
            mean = (xc * vf).sum(1, keepdim=True) / n.clamp(min=1)
            d = xc - mean
            var = (d.square() * vf).sum(1, keepdim=True) / (n - 1).clamp(min=1) + self.eps
        a, beta, gamma = self._density_terms(ct)
        logg = -(a * (d - beta).square() + gamma) / (2 * var)
        old = None if cache is None else cache.log_norm
        if valid is not None:
            logg = torch.where(valid, logg, _negligible(logg, valid, old))
        if self.causal:
            log_norm = torch.logcumsumexp(logg, dim=1)
            if old is not None:
                log_norm = torch.logaddexp(old[:, None], log_norm)
        else:
            log_norm = torch.logsumexp(logg, dim=1, keepdim=True)
        w = torch.exp(logg - log_norm)
        if cache is not None:
            assert stats is not None  # a cache is for causal layers (checked by forward)
            any_valid = torch.ones_like(stats[0], dtype=torch.bool) if valid is None else valid.any(1)
            cache.count, cache.shift, cache.s1, cache.s2 = stats
            cache.log_norm = torch.where(any_valid, log_norm[:, -1].detach(), cache.log_norm)
        return w if valid is None else w * vf

    def _prefix_stats(self, xc: torch.Tensor, vf: torch.Tensor, valid: torch.Tensor | None,
                      cache: GAAMCache | None) -> tuple[torch.Tensor, torch.Tensor, _Sums]:
        """Deviation from the prefix mean, prefix variance + eps, and the running sums after the last token."""
        b = xc.shape[0]
        if valid is None:
            first = xc[:, 0]
        else:  # the first valid token of each sequence (token 0 where there is none: its sums stay 0)
            idx = valid[..., 0].to(torch.uint8).argmax(1)
            first = xc[torch.arange(b, device=xc.device), idx]
        first = first.detach()  # a constant shift: the statistics do not depend on it, only their rounding does
        count0: torch.Tensor | float
        s1_0: torch.Tensor | float
        s2_0: torch.Tensor | float
        if cache is None:
            count0, shift, s1_0, s2_0 = 0.0, first, 0.0, 0.0
        else:
            count0, s1_0, s2_0 = cache.count[:, None], cache.s1[:, None], cache.s2[:, None]
            shift = torch.where(cache.count == 0, first, cache.shift)
        y = (xc - shift[:, None]) * vf
        n = count0 + vf.cumsum(1)
        s1 = s1_0 + y.cumsum(1)
        s2 = s2_0 + y.square().cumsum(1)
        nc = n.clamp(min=1)
        d = xc - (shift[:, None] + s1 / nc)
        var = (s2 - s1.square() / nc).clamp(min=0) / (n - 1).clamp(min=1) + self.eps
        stats = (n[:, -1].detach(), shift, s1[:, -1].detach(), s2[:, -1].detach())
        return d, var, stats

    def gaussian_weights(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weights ``w`` with ``forward(x) = x * w`` at real tokens, in the compute dtype (0 at padded tokens).

        Args:
            x: ``(B, N, dim)``.
            key_padding_mask: Optional bool ``(B, N)``, True = real token.

        Returns:
            ``w`` ``(B, N, dim)`` (fp32, fp64 for fp64 inputs): non-causal, each channel's weights sum to 1 over the
            real tokens; causal, ``w_i`` is token ``i``'s share of the weights of its prefix.

        Raises:
            TypeError, ValueError: As ``forward``.
        """
        self._check(x, key_padding_mask)
        return self._weights(x, None, key_padding_mask)

    def forward(self, x: torch.Tensor, cache: GAAMCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x * w`` at real tokens, ``x`` at padded ones; with ``cache``, ``x`` holds the next tokens.

        Args:
            x: ``(B, N, dim)``, ``B, N >= 1``, floating.
            cache: A decoding state from ``new_cache`` (causal layers only; None, the default: whole sequences).
            key_padding_mask: Optional bool ``(B, N)``, True = real token: padded tokens are left out of the
                statistics and the normaliser and returned unchanged (with a cache they leave the state unchanged).

        Returns:
            ``(B, N, dim)`` in ``x``'s dtype.

        Raises:
            TypeError: ``x`` is not a floating tensor; ``key_padding_mask`` is not a bool tensor; ``cache`` does not
                come from ``new_cache``.
            ValueError: ``x`` is not ``(B, N, dim)``; ``key_padding_mask`` of another shape or device; a ``cache``
                given to a non-causal layer, or made for another batch, device or dtype.
        """
        self._check(x, key_padding_mask)
        if cache is not None and not self.causal:
            raise ValueError("cache is for causal layers: GAAMAttention(causal=False) normalises over the whole "
                             "sequence")
        cache = GAAMCache.checked(cache, x)
        w = self._weights(x, cache, key_padding_mask)
        out = (x.to(w.dtype) * w).to(x.dtype)
        if cache is not None:
            cache.length += x.shape[1]
        return out if key_padding_mask is None else torch.where(key_padding_mask[..., None], out, x)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, n_gaussians={self.n_gaussians}, eps={self.eps}, "
                f"causal={self.causal}")


def _negligible(logg: torch.Tensor, valid: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """A finite log-density for padded tokens, so far (> 1000 nats) below every real one and below the cached
    normaliser that ``exp`` of the difference is 0: they add nothing to any sum, without the nan that ``-inf``
    gives ``logcumsumexp``'s gradient."""
    with torch.no_grad():
        big = torch.finfo(logg.dtype).max
        low = logg.masked_fill(~valid, big).amin(1, keepdim=True)  # (B, 1, dim)
        if old is not None:
            low = torch.where(old[:, None] > -torch.inf, torch.minimum(low, old[:, None]), low)
        low = torch.where(low == big, torch.zeros_like(low), low)
        return low - 1000 - low.abs()


register(Mechanism(
    name="gaam", paper="Gaussian Adaptive Attention is All You Need (arXiv 2401.11143, 2024)",
    repo="gioannides/Gaussian-Adaptive-Attention", family="dense", dims=("1d",), cls=GAAMAttention,
    patterns={"NS": {"causal": False}, "CS": {"causal": True}}, why_not={
        "NC": "not a query/key/value attention: each token's features are re-weighted by Gaussian densities of "
              "their own values under statistics of the same sequence; the paper and its code define no second "
              "source", "CC": "no second source (as NC): the weights are densities of the sequence's own values"},
    make=lambda dim, num_heads, **kw: GAAMAttention(dim, num_heads, **kw),
    notes="No projections: out = x * w, w = normalised product of learnable Gaussians of each feature's "
          "standardised value (2 * n_gaussians parameters per head). Every output reads statistics of all tokens "
          "(causal: of its prefix), hence 'dense', in O(N dim) time. Causal form: prefix statistics and a prefix "
          "normaliser, decoded with O(dim) running sums."))
