"""Attention of some query rows only: ``attend_rows``.

Mixture-of-head attention (MoH) runs a routed head only for the tokens that pick it; under a causal mask those rows
are scattered over the sequence, so gathering them breaks the causal kernels (each row needs its own key bound)
and a materialised per-row mask costs what the skipped rows save. The compiled CPU kernel takes the rows as a list
per (batch item, head) and bounds each row's keys by its position, so the work is the picked rows' share of the
causal pairs. It pays at every share of picked rows (``benchmarks/moh_rows.py``: 8 heads, 4,096 tokens, 2 threads,
6.6x PyTorch's fused causal SDPA on every row at 1/8 of the rows, 2.1x at 1/2, 1.08x at all of them). Without the
kernel (or under ``engine_override``) the rows are computed with every other row (PyTorch's fused kernel, or
``attend``) and the rest are zeroed: the same result, no saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends.native import supports as native_supports
from .backends.native_selected import causal_rows, lists_attention
from .calls import forced_engine, intercepted, record_call
from .checks import check_bool
from .dispatch import attend, check_attention_inputs
from .guard import output_finite, unsafe_tokens
from .patterns import Causal


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, *, causal: bool = True,
                scale: float | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output of the query rows ``rows`` selects, zero elsewhere (forward and backward).

    Args:
        q: Queries ``(B, Hq, Nq, d)``.
        k: Keys ``(B, Hkv, Nk, d)``, ``Hq`` a multiple of ``Hkv`` (GQA).
        v: Values ``(B, Hkv, Nk, dv)``.
        rows: Bool ``(B, Hq, Nq)``: True = compute this query row of this head.
        causal: Query ``i`` sits at key position ``Nk - Nq + i`` and sees the keys up to it (as
            ``attend(q, k, v, Causal())``); False: every key.
        scale: Score scale (default ``d ** -0.5``).
        key_padding_mask: Optional bool ``(B, Nk)``, True = a real key.

    Returns:
        ``(B, Hq, Nq, dv)``, equal to ``attend(q, k, v, Causal() if causal else None, ...) * rows[..., None]``.

    Raises:
        TypeError: ``rows`` is not a bool tensor, ``causal`` not a bool, or ``attend`` would refuse the inputs.
        ValueError: ``rows`` is not ``(B, Hq, Nq)`` on q's device, or ``attend`` would refuse the inputs.

    Examples:
        >>> import torch, nearfar as nf
        >>> q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
        >>> rows = torch.tensor([[[True, False, True, False, False, True]] * 2])
        >>> out = nf.attend_rows(q, k, v, rows)
        >>> torch.allclose(out, nf.attend(q, k, v, nf.Causal()) * rows[..., None], atol=1e-6)
        True
    """
    check_attention_inputs(q, k, v, scale, key_padding_mask)
    check_bool(causal, "causal")
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool:
        raise TypeError(f"rows must be a bool tensor (B, Hq, Nq), got "
                        f"{rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__}")
    if tuple(rows.shape) != tuple(q.shape[:3]) or rows.device != q.device:
        raise ValueError(f"rows must be (B, Hq, Nq) = {tuple(q.shape[:3])} on {q.device}, got {tuple(rows.shape)} "
                         f"on {rows.device}")
    pattern = Causal() if causal else None
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5

    nq, nk = q.shape[2], k.shape[2]
    forced = forced_engine() or ("auto" if intercepted() else None)  # an interceptor sees attend calls only
    trains = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    unsafe = trains and unsafe_tokens(q, k, v, scale) is not None

    def every_row() -> torch.Tensor:
        if forced is None and key_padding_mask is None and not unsafe and (not causal or nq in (nk, 1)):
            # attend's dense result on PyTorch's fused kernel (its block-sparse PyTorch path is slower for a plain
            # causal mask); a non-finite output from a masked key goes to attend's guard below
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and nq == nk and nq > 1, scale=scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            if trains or output_finite(out) or unsafe_tokens(q, k, v, scale) is None:
                record_call(pattern, tuple(q.shape), tuple(k.shape), tuple(v.shape))
                return out * rows[..., None].to(out.dtype)
        out = attend(q, k, v, pattern, scale=scale, key_padding_mask=key_padding_mask)
        return out * rows[..., None].to(out.dtype)

    if forced is not None or not native_supports(q) or torch.compiler.is_compiling() or unsafe:
        return every_row()
    record_call(pattern, tuple(q.shape), tuple(k.shape), tuple(v.shape))
    lists = causal_rows(rows, nk, causal=causal)
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.zeros(q.shape[0], nk).masked_fill_(~key_padding_mask, float("-inf"))
    out, _ = lists_attention(q, k, v, [[lists]], scale, kpm)
    if not trains and not output_finite(out) and unsafe_tokens(q, k, v, scale) is not None:
        return every_row()  # a huge or non-finite key outside some row's bound: attend's guard handles it
    return out
