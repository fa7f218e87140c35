"""PT-DiT proxy-token attention (Qihoo-T2X): the attention part of ``ProxyTokensTransformerBlock``.

Paper: Wang et al., "Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens for
Text-to-Any-Task" (ICLR 2025; arXiv 2409.04005). Official code: 360CVGroup/Qihoo-T2X points to
Ascend/MindSpeed-MM, ``mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py`` (``ProxyTokensTransformerBlock``,
``PTDiTDiffuser``).

What is in (the official block's steps 1-4, each with its residual, in the official order):

1. proxy tokens ``p`` from the input ``x`` (``proxy_mode``, below), then proxy self-attention
   ``p <- p + proxy_attn1(proxy_norm1(p))`` (global MHSA over all proxies of a sample);
2. visual <- proxy cross-attention ``z = x + linear_1_visual(pvisual_attn2(norm_before(x), proxy_cross_norm(p)))``,
   every token a query, every proxy a key; ``linear_1_visual`` is zero-initialised (official);
3. window self-attention ``z <- z + attn1(norm1(z))`` in non-overlapping ``compress_ratios`` windows, no
   position bias;
4. with ``shift_window``: ``z <- z + linear_2(attn3(shift_window_norm(z)))`` in the windows shifted by
   ``compress_ratios // 2`` with Swin's shifted-window region mask; ``linear_2`` is zero-initialised (official).

What is left out: the text cross-attention (``attn2``/``norm2`` on the T5 tokens), the feed-forward, and the
adaLN-single timestep modulation; the output equals the official steps 1-4 with every adaLN shift and scale
at 0 and every gate at 1 (``scale_shift_table``/``proxy_scale_shift_table`` are not created).

Parameter names follow the official block and diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``,
``to_out.0``), so the matching entries of a MindSpeed-MM checkpoint's block load with ``strict=False``.
Constructor defaults are the code defaults (``compress_ratios (1,)8,8``, ``proxy_compress_ratios (1,)4,4``,
``attention_bias=False``, ``norm_elementwise_affine=True``, ``norm_eps=1e-5``) except ``shift_window=True``
(the released image config; the code default ``False`` drops step 4). The released image config uses
``proxy_compress_ratios = compress_ratios = (1, 8, 8)``, ``attention_bias=True``,
``norm_elementwise_affine=False``, ``norm_eps=1e-6``.

Proxy modes (``proxy_mode``):

- ``"code_strided_mean"`` (default, the official ``get_proxy_token(mode="mean")``): with window ``c`` and
  proxy ratio ``p`` per spatial axis, ``rho = c / p``; window coordinate ``y = y1 * rho + y2`` and proxy
  ``(y2, x2)`` of a window is the mean over ``(y1, x1)``: ``rho_h * rho_w`` proxies per window, each the mean
  of a stride-``rho`` sub-lattice spanning the whole window. On the time axis the official code forces
  ``rho_f = 1`` (whatever ``proxy_compress_ratios[0]`` is), so all ``c_f`` frames of a window are averaged.
- ``"first"``: the official ``get_proxy_token(mode="first")``: the same grouping, taking ``y1 = 0`` (and the
  window's first frame) instead of the mean.
- ``"paper_window_mean"``: the paper's description: one proxy per ``proxy_compress_ratios`` window, its mean.

Differences from the official code:

- the output is the block's update ``z - x``, not ``z``: like every nearfar layer this is a token mixer whose
  caller adds the residual (``x + layer(norm(x))`` in a pre-norm block), so the official steps 1-4 are
  ``x + layer(x)``. Returning ``z`` put the input in the residual stream twice inside such a block (the
  ``nearfar bench`` backbone did that until this change).
- layout: input and output are channel-last spatial maps ``(B, H, W, C)`` / ``(B, T, H, W, C)``, not the
  official window-grouped ``(B * windows, tokens per window, C)``; the outputs are the same tokens in
  spatial order. The proxies' order differs (official: window-major), which changes nothing: proxies have
  no position information and are only attended to, never returned.
- the shifted-window mask: masked pairs are excluded exactly (``nearfar.Blocks(c, shift=c // 2)``, the
  non-wrapping Swin roll + region mask) instead of the official additive ``-10000``.
- every spatial extent must be divisible by ``compress_ratios`` (as the official code assumes), and every
  window ratio by its proxy ratio; anything else is a ``ValueError``.
- attention dropout is not implemented (official default 0).

Computation order (same result up to float rounding): ``to_q``/``to_k``/``to_v`` of the window attentions run as one
GEMM, and ``linear_1_visual``/``linear_2`` are merged with the ``to_out.0`` before them into one ``C -> C`` GEMM
(the two Linears have nothing between them), which saves one pass over the tokens each, forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_channels_last, check_dim_heads, check_per_axis
from ..functional import attend, fused_linear, merge_heads, split_heads, window_attention
from ..patterns import Blocks, Pattern
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence

PROXY_MODES = ("code_strided_mean", "paper_window_mean", "first")


class DiffusersAttention(nn.Module):
    """diffusers ``Attention`` with no processor extras: ``to_q``/``to_k``/``to_v`` (Linear C -> C, bias
    ``attention_bias``), ``to_out.0`` (Linear C -> C with bias), scale ``head_dim ** -0.5``; attention through
    ``nearfar.attend`` with an optional pattern."""

    def __init__(self, dim: int, num_heads: int, attention_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = check_dim_heads(dim, num_heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=attention_bias)
        self.to_k = nn.Linear(dim, dim, bias=attention_bias)
        self.to_v = nn.Linear(dim, dim, bias=attention_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, pattern: Pattern | None = None,
                then: nn.Linear | None = None) -> torch.Tensor:
        """``x (B, *spatial, C)`` queries; keys/values from ``context (B, M, C)`` (default: ``x``); ``then``: a
        Linear applied to the output (the block's zero-initialised ``linear_1_visual``/``linear_2``), merged with
        ``to_out.0`` into one ``C -> C`` GEMM (``then(to_out(o)) = o (W_then W_out)^T + W_then b_out + b_then``:
        one pass over the tokens instead of two, forward and backward; the parameters stay the two layers')."""
        if context is None and pattern is not None:
            # q, k, v of the windows by one GEMM (channels [3, heads, d]), read in place by the attention
            qkv = lambda t: fused_linear(t, (self.to_q, self.to_k, self.to_v))  # noqa: E731
            return self._out(window_attention(x, pattern, qkv, self.num_heads, self.scale), then)
        ctx = x if context is None else context
        h = self.num_heads
        q, k, v = split_heads(self.to_q(x), h), split_heads(self.to_k(ctx), h), split_heads(self.to_v(ctx), h)
        out = attend(q, k, v, pattern, scale=self.scale)
        return self._out(merge_heads(out, tuple(x.shape[1:-1])), then)

    def _out(self, o: torch.Tensor, then: nn.Linear | None) -> torch.Tensor:
        out = cast(nn.Linear, self.to_out[0])  # a ModuleList's item is typed Module
        if then is None:
            return out(o)
        return F.linear(o, then.weight @ out.weight, then.weight @ out.bias + then.bias)


@whole_sequence()
class ProxyTokenAttention(nn.Module):
    """``ProxyTokenAttention(dim, num_heads, compress_ratios=None, proxy_compress_ratios=None, shift_window=True,
    proxy_mode="code_strided_mean", attention_bias=False, norm_elementwise_affine=True, norm_eps=1e-5, ndim=2)``:
    x ``(B, H, W, dim)`` (``ndim=3``: ``(B, T, H, W, dim)``) -> the update, same shape (the official block's
    output is ``x + layer(x)``).

    ``compress_ratios`` are the window sizes, ``proxy_compress_ratios`` the proxy ratios (ints or per-axis
    tuples; default ``(8, 8)``/``(4, 4)``, in 3D ``(1, 8, 8)``/``(1, 4, 4)``). See the module docstring.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        compress_ratios: Window size, an int or one positive int per axis; None (default): ``(8, 8)``, in 3D
            ``(1, 8, 8)``.
        proxy_compress_ratios: Proxy ratio per axis, each dividing its ``compress_ratios`` entry; None (default):
            ``(4, 4)``, in 3D ``(1, 4, 4)``.
        shift_window: Add the shifted-window attention (default True).
        proxy_mode: ``"code_strided_mean"`` (default), ``"paper_window_mean"`` or ``"first"`` (module docstring).
        attention_bias: Biases on ``to_q``, ``to_k``, ``to_v`` (default False).
        norm_elementwise_affine: Affine LayerNorms (default True).
        norm_eps: The LayerNorms' epsilon (default 1e-5).
        ndim: Spatial axes, 2 (default, images) or 3 (video).

    Raises:
        TypeError: A bool argument is not a bool; a ratio entry is not an int.
        ValueError: ``ndim`` not 2 or 3; ``dim`` is not a positive multiple of ``num_heads``; an unknown
            ``proxy_mode``; a ratio entry < 1, a tuple of another length than ``ndim``, or a window not a multiple
            of its proxy ratio.

    Examples:
        >>> import torch
        >>> from nearfar import ProxyTokenAttention
        >>> layer = ProxyTokenAttention(64, 4)   # 8x8 windows, 4x4 proxy ratio
        >>> layer(torch.randn(2, 16, 16, 64)).shape
        torch.Size([2, 16, 16, 64])
    """

    def __init__(self, dim: int, num_heads: int, compress_ratios: int | Sequence[int] | None = None,
                 proxy_compress_ratios: int | Sequence[int] | None = None,
                 shift_window: bool = True, proxy_mode: str = "code_strided_mean", attention_bias: bool = False,
                 norm_elementwise_affine: bool = True, norm_eps: float = 1e-5, ndim: int = 2):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        check_dim_heads(dim, num_heads)
        if proxy_mode not in PROXY_MODES:
            raise ValueError(f"proxy_mode must be one of {PROXY_MODES}, got {proxy_mode!r}")
        for name, value in (("shift_window", shift_window), ("attention_bias", attention_bias),
                            ("norm_elementwise_affine", norm_elementwise_affine)):
            check_bool(value, name)
        default_c, default_p = ((1, 8, 8), (1, 4, 4)) if ndim == 3 else ((8, 8), (4, 4))
        self.compress_ratios = check_per_axis(default_c if compress_ratios is None else compress_ratios, ndim,
                                              "compress_ratios")
        self.proxy_compress_ratios = check_per_axis(
            default_p if proxy_compress_ratios is None else proxy_compress_ratios, ndim, "proxy_compress_ratios")
        for a, (c, p) in enumerate(zip(self.compress_ratios, self.proxy_compress_ratios)):
            if c % p:
                raise ValueError(f"compress_ratios[{a}]={c} must be a multiple of proxy_compress_ratios[{a}]={p}")
        self.dim, self.num_heads, self.ndim = dim, num_heads, ndim
        self.shift_window, self.proxy_mode = shift_window, proxy_mode
        self.shift_size = tuple(c // 2 for c in self.compress_ratios)
        # official: scale_ratio = (1, c_h / p_h, c_w / p_w): the time axis is never sub-sampled
        self.scale_ratio = tuple(1 if (ndim == 3 and a == 0) else c // p
                                 for a, (c, p) in enumerate(zip(self.compress_ratios, self.proxy_compress_ratios)))

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)

        self.proxy_norm1 = norm()
        self.proxy_attn1 = DiffusersAttention(dim, num_heads, attention_bias)
        self.norm_before = norm()
        self.proxy_cross_norm = norm()
        self.pvisual_attn2 = DiffusersAttention(dim, num_heads, attention_bias)
        self.linear_1_visual = nn.Linear(dim, dim)
        self.norm1 = norm()
        self.attn1 = DiffusersAttention(dim, num_heads, attention_bias)
        if shift_window:
            self.shift_window_norm = norm()
            self.attn3 = DiffusersAttention(dim, num_heads, attention_bias)
            self.linear_2 = nn.Linear(dim, dim)
        self.reset_zero_init()

    def reset_zero_init(self) -> None:
        """Zero ``linear_1_visual`` and ``linear_2`` (the official ``zero_module``)."""
        for lin in (self.linear_1_visual, getattr(self, "linear_2", None)):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def _check(self, x: torch.Tensor) -> tuple[int, ...]:
        _, spatial, _ = check_channels_last(x, self.ndim, self.dim)
        for a, (n, c) in enumerate(zip(spatial, self.compress_ratios)):
            if n % c:
                raise ValueError(f"spatial extent {n} of axis {a} must be divisible by compress_ratios[{a}]={c} "
                                 f"(input shape {tuple(x.shape)})")
        return spatial

    def patterns(self, spatial: tuple[int, ...]) -> tuple[Blocks, Blocks]:
        """The window pattern and the shifted-window pattern (Swin roll + region mask) on ``spatial``."""
        return (Blocks(self.compress_ratios, grid=spatial),
                Blocks(self.compress_ratios, grid=spatial, shift=self.shift_size))

    def proxy_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Proxy tokens ``(B, M, C)`` of ``x (B, *spatial, C)`` for ``proxy_mode``."""
        spatial = self._check(x)
        if self.proxy_mode == "paper_window_mean":
            window, rho = self.proxy_compress_ratios, (1,) * self.ndim
        else:
            window, rho = self.compress_ratios, self.scale_ratio
        # axis by axis, split the extent into (windows, outer y1, inner y2) and reduce y1: one axis at a time the
        # reduced dim sits in front of a contiguous block, about 10x faster than one mean over strided dims
        g, done = x, x.shape[0]
        for a, (n, c, r) in enumerate(zip(spatial, window, rho)):
            g = g.reshape(done, n // c, c // r, r * math.prod(spatial[a + 1:]) * self.dim)
            g = g[:, :, 0] if self.proxy_mode == "first" else g.mean(2)
            done *= (n // c) * r
        return g.reshape(x.shape[0], -1, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's update ``z - x`` (the official steps 1-4 give ``x + layer(x)``).

        Args:
            x: Input ``(B, H, W, dim)`` (``ndim=3``: ``(B, T, H, W, dim)``), each extent divisible by its
                ``compress_ratios`` entry.

        Returns:
            The update, the shape of ``x``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` has another rank or channel count, is empty, or an extent is not divisible by its window.
        """
        spatial = self._check(x)
        window, shifted = self.patterns(spatial)
        p = self.proxy_tokens(x)
        p = p + self.proxy_attn1(self.proxy_norm1(p))
        # the updates are summed apart from z, so that z - x is exact rather than a difference of large terms
        update = self.pvisual_attn2(self.norm_before(x), self.proxy_cross_norm(p), then=self.linear_1_visual)
        z = x + update
        step = self.attn1(self.norm1(z), pattern=window)
        update = update + step
        if self.shift_window:
            z = z + step
            update = update + self.attn3(self.shift_window_norm(z), pattern=shifted, then=self.linear_2)
        return update

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, compress_ratios={self.compress_ratios}, "
                f"proxy_compress_ratios={self.proxy_compress_ratios}, shift_window={self.shift_window}, "
                f"proxy_mode={self.proxy_mode!r}")


def _make(dim: int, num_heads: int, ndim: int = 2, **kw: Any) -> ProxyTokenAttention:
    # 8x8 windows do not tile a 14x14 map; 7x7 windows with one proxy each (proxy ratio = window ratio, as the
    # released image config) tile both benchmark maps (56x56 and 14x14)
    c = (1, 7, 7) if ndim == 3 else (7, 7)
    kw.setdefault("compress_ratios", c)
    kw.setdefault("proxy_compress_ratios", kw["compress_ratios"])
    return ProxyTokenAttention(dim, num_heads, ndim=ndim, **kw)


register(Mechanism(
    name="proxy_tokens",
    paper="Qihoo-T2X: An Efficiency-Focused Diffusion Transformer via Proxy Tokens (ICLR 2025)",
    repo="Ascend/MindSpeed-MM", family="local+global", dims=("2d", "3d"), **image_layer(),
    make=_make, cls=ProxyTokenAttention,
    notes="Attention part of ProxyTokensTransformerBlock (proxy self-attn, visual<-proxy cross-attn, window and "
          "shifted-window attention; no text cross-attn, FFN or adaLN). make() uses 7x7 windows with one proxy each "
          "(the code default 8x8 windows / 4x4 proxy ratios cannot tile 14x14); spatial sizes must be divisible "
          "by the windows."))

