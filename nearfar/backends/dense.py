"""Dense engine: masked SDPA over the materialised (Nq, Nk) mask. The small-size path and the reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..bias import BiasSource, DenseBias, RelativePositionBias
from ..cache import CACHE
from ..guard import zero_rows
from ..mods import call_score_mod, index_grid
from ..patterns import Causal, Pattern
from ..selection import SelectedBlocks
from .kernels import acc_dtype


def dense_bias(bias: BiasSource | None, q_len: int, k_len: int,
               device: torch.device | str | None) -> torch.Tensor | None:
    """A bias source as a dense tensor broadcastable to (B, Hq, Nq, Nk)."""
    if bias is None:
        return None
    if isinstance(bias, DenseBias):
        return bias.b4
    assert isinstance(bias, RelativePositionBias)
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    table = bias.tensor.reshape(bias.tensor.shape[0], -1)
    return table[:, bias.pattern.rpb_index(q, k, q_len)][None]


def _additive_mask(pattern: Pattern, nq: int, nk: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pattern's (Nq, Nk) mask as 0 / -inf and its rows without keys (None if none), kept in the byte-bounded
    ``nearfar.cache.CACHE``: the dense engine serves small, repeated shapes."""
    key = ("dense_mask", pattern, nq, nk, str(device), dtype)
    hit = CACHE.get(key)
    if hit is None:
        mask = torch.where(pattern.mask(nq, nk, device), 0.0, float("-inf")).to(dtype)
        empty = torch.isinf(mask).all(-1, keepdim=True)
        hit = CACHE.put(key, (mask, empty if bool(empty.any()) else None))
    return hit


#: on CPU, up to this many keys per query plain matmul + softmax beats SDPA's fused kernel (float32/64 only).
#: Measured 2026-12-06, 2 threads, no mask, ~600K score entries per call: the fused kernel takes 2.1-2.7x the
#: matmul path's time at 25 keys, 1.6x at 49 (7x7 windows), 1.35-1.55x at 64 and 1.2-1.4x at 100, forward and
#: forward+backward alike, at head dims 32 and 64 (an earlier rule of 16 keys came from HiLo's 2x2 windows)
_FEW_KEYS = 64


def per_query_head(t: torch.Tensor, group: int) -> torch.Tensor:
    """KV heads ``(B, Hkv, ...)`` repeated for their ``group`` query heads each, for products written by hand."""
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         scale: float | None = None, is_causal: bool = False) -> torch.Tensor:
    """SDPA for rows that have at least one key; ``k``/``v`` may have fewer heads than ``q`` (GQA: the fused kernel
    reads each KV head for its group, ``enable_gqa``, instead of a repeated copy of the keys: 7x faster for a
    decoding step over 8K keys). On CPU: very short key lists go through matmul + softmax, and unequal q/k and v head
    dims are zero-padded to one size first (the fused kernel needs equal dims and PyTorch otherwise takes its ~5x
    slower math path; zero columns change neither q.k nor the output)."""
    d, dv = q.shape[-1], v.shape[-1]
    group = q.shape[1] // k.shape[1]
    if q.device.type == "cpu" and k.shape[-2] <= _FEW_KEYS and q.dtype in (torch.float32, torch.float64):
        k, v = per_query_head(k, group), per_query_head(v, group)
        s = torch.matmul(q, k.transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            s = s + attn_mask
        if is_causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return torch.matmul(s.softmax(-1), v)
    if d != dv and q.device.type == "cpu":
        e = max(d, dv)
        q, k, v = F.pad(q, (0, e - d)), F.pad(k, (0, e - d)), F.pad(v, (0, e - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                         enable_gqa=group > 1)
    return out if out.shape[-1] == dv else out[..., :dv]


def causal_as_sdpa(pattern: Pattern | None, nq: int, nk: int) -> bool | None:
    """How SDPA runs ``pattern`` as it is when it is a plain ``Causal()``: ``True``, as ``is_causal`` (as many queries
    as keys: SDPA aligns its diagonal top-left, ``Causal`` bottom-right, and the two agree only there); ``False``,
    with no mask at all (one query, a decoding step: it sees every key); ``None``: not a plain causal call SDPA can
    run unmasked. Either way the fused kernel needs no mask and no plan, and ``is_causal`` skips the blocks above the
    diagonal."""
    if pattern != Causal():
        return None
    return True if nq == nk else (False if nq == 1 else None)


def empty_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Rows of an additive mask with no finite entry. Eagerly, None when there are none (so the output needs no
    zeroing pass); under ``torch.compile`` always the tensor, since a data-dependent branch splits the graph. One
    max-reduction reads the mask once (``isinf(mask).all(-1)`` wrote a bool copy of it first: ~4x the time on a
    ``(B, h, N, N)`` bias, e.g. Sparsifiner's per-query connectivity)."""
    empty = mask.amax(-1, keepdim=True) == float("-inf")
    if torch.compiler.is_compiling() or bool(empty.any()):
        return empty
    return None


def harmless_rows(q: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``rows`` (bool, ``(..., Nq, 1)``) zeroed and allowed the first key only, so SDPA computes a finite row
    that the caller then drops or zeroes. One key and a zero query: a row over every key, some of them padding
    holding huge finite garbage, made SDPA's backward NaN (its ``exp(s - lse)`` overflows on the rounding of ~1e30
    logits), and even one such key did through the rounding of its lone logit; a zero score has nothing to round."""
    first = torch.arange(mask.shape[-1], device=mask.device) == 0
    return zero_rows(q, rows), mask.masked_fill(rows & first, 0.0)


def scored_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   score_mod: Callable, return_lse: bool,
                   index: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention with a ``score_mod`` on materialised scores: ``q (B, Hq, Nq, d)``, ``k``/``v`` with ``Hq`` heads,
    ``mask`` additive (``-inf`` = masked), broadcastable to ``(B, Hq, Nq, Nk)``. The score_mod sees ``q . k *
    scale`` (in float32, float64 for float64) and the whole ``(B, Hq, Nq, Nk)`` index grid; the mask is applied
    after it with ``where`` (what a masked pair holds never reaches the softmax); a row with no key gets 0 and LSE
    ``-inf``. Differentiable, through the score_mod too. ``index``: the score_mod's ``(b, h, q_idx, kv_idx)``
    when the rows and columns are not the tokens in order (windows)."""
    acc = acc_dtype(q.dtype)
    b, hq, nq, _ = q.shape
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    bi, hi, qi, ki = index if index is not None else index_grid(b, hq, nq, k.shape[2], q.device)
    s = call_score_mod(score_mod, s, bi, hi, qi, ki)
    neg = torch.tensor(float("-inf"), dtype=acc, device=q.device)
    if mask is not None:
        mask = mask.to(acc)
        s = torch.where(mask == neg, neg, s + mask)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=acc, device=q.device))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    out = (torch.matmul(e, v.to(acc)) / torch.where(den > 0, den, 1.0)).to(q.dtype)  # no key: e = 0, divide by 1
    return out, ((m + den.detach().log())[..., 0] if return_lse else None)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None, scale: float,
                    kpm: torch.Tensor | None = None, bias: BiasSource | None = None,
                    return_lse: bool = False, blocks: SelectedBlocks | None = None,
                    score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if kpm is None and bias is None and blocks is None and score_mod is None and not return_lse:
        causal = causal_as_sdpa(pattern, nq, nk)
        if pattern is None or causal is not None:  # nothing to materialise: the fused kernel as it is
            return sdpa(q, k, v, scale=scale, is_causal=bool(causal)), None
    group = hq // hkv  # SDPA reads GQA in place (``sdpa``); the paths that multiply by hand repeat the KV heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = None
    if blocks is not None:  # the union of the pattern's pairs and the selected ones, materialised per call
        pairs = blocks.pair_mask(nq, nk, hq, hkv)
        if pattern is not None:
            pairs = pairs | pattern.mask(nq, nk, q.device)
        mask = torch.where(pairs, 0.0, float("-inf")).to(acc)
        pattern = None
    elif pattern is not None:
        mask, pattern_empty = _additive_mask(pattern, nq, nk, q.device, acc)
    if kpm is not None:
        kp = kpm[:, None, None, :].to(acc)
        mask = kp if mask is None else mask + kp
    db = dense_bias(bias, nq, nk, q.device)
    if db is not None:
        mask = db.to(acc) if mask is None else mask + db.to(acc)
    if score_mod is not None:
        kr, vr = per_query_head(k, group), per_query_head(v, group)
        return scored_softmax(q, kr, vr, mask, scale, score_mod, return_lse)
    if mask is None and not return_lse:
        return sdpa(q, k, v, scale=scale), None
    if mask is None:
        mask = torch.zeros(nq, nk, dtype=acc, device=q.device)
    if pattern is not None and kpm is None and db is None:  # the cached pattern mask alone: so are its empty rows
        empty = pattern_empty
    else:
        empty = empty_rows(mask)
    if empty is not None:  # a query with no key gets zeros: a harmless row, then its output (and gradient) zeroed
        q, mask = harmless_rows(q, mask, empty)
    lse = None
    if return_lse:
        s = torch.matmul(q.to(acc), per_query_head(k, group).to(acc).transpose(-1, -2)) * scale + mask
        lse = torch.logsumexp(s, -1)
    out = sdpa(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
    if empty is not None:
        keep = ~empty
        out = out * keep.to(out.dtype)
        if lse is not None:
            lse = lse.masked_fill(empty[..., 0].expand_as(lse), float("-inf"))
    return out, lse
