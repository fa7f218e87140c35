"""``attend``: the one entry point. Validates everything before any work, then picks an engine."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal, overload

import torch

from .backends import ENGINES
from .backends.blocksparse import blocksparse_attention
from .backends.dense import causal_as_sdpa, dense_attention
from .backends.native import density as native_density
from .backends.native import supports as native_supports
from .backends.native_tiles import native_tile
from .backends.partition import partition_attention
from .backends.scored import scored_attention
from .backends.selected import selected_attention
from .bias import DenseBias, RelativePositionBias, TablePattern
from .calls import AttendCall, forced_engine, interceptor, record_tensors, unobserved
from .checks import check_bool, check_same_dtype_device, check_scale
from .guard import dirty_rows, exact_rows, output_finite, unsafe_tokens, zero_rows
from .mods import at_batch, at_heads, check_mod
from .patterns import Dense, Pattern, PerHead
from .patterns.maskmod import bind
from .plan import Plan, get_plan
from .selection import SelectedBlocks

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: up to this many (query, key) pairs "auto" uses the dense engine: below about 1024 x 1024 one fused dense
#: kernel beats per-chunk work on this CPU even at ~15% density (``nearfar bench``: 2D 7x7 on 32x32)
_SMALL = 1 << 20
#: ... except that the compiled CPU kernel (``nearfar.native``) computes a pattern's scores at about the cost per
#: score of fused dense SDPA, so below ``_SMALL`` pairs "auto" takes it when the plan's scored fraction is under
#: this: measured with ``benchmarks/small.py`` (2 threads, fp32): causal at 256 tokens (fraction 0.63) 1.6x
#: faster than dense SDPA forward and forward+backward, 2D 7x7 at 14x14 (0.60) 1.6x, 28x28 (0.17) 3.6-3.9x
_NATIVE_DENSITY = 0.85
#: and the problem is not tiny (where one dense call's lower fixed cost wins)
_NATIVE_MIN_PAIRS = 1 << 12


def _check_tensor(x: object, name: str, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4D {shape_doc}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def _validate(q, k, v, pattern, scale, bias, rpb, key_padding_mask, engine, return_lse, blocks=None,
              score_mod=None):
    _check_tensor(q, "q", "(B, Hq, Nq, d)")
    _check_tensor(k, "k", "(B, Hkv, Nk, d)")
    _check_tensor(v, "v", "(B, Hkv, Nk, dv)")
    check_same_dtype_device(q=q, k=k, v=v)
    (b, hq, nq, d), (bk, hkv, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"batch sizes differ: q has {b}, k has {bk}, v has {bv}")
    if hkv != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hkv} and {hv}")
    if hq % hkv:
        raise ValueError(f"query heads Hq={hq} must be a multiple of key/value heads Hkv={hkv} (GQA/MQA)")
    if nk != nv:
        raise ValueError(f"k and v must have the same length, got Nk={nk} and {nv}")
    if d != dk:
        raise ValueError(f"q and k must have the same head dim, got {d} and {dk}")
    check_scale(scale, "scale")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a nearfar Pattern or None, got {type(pattern).__name__}")
        if pattern.heads is not None and pattern.heads != hq:
            raise ValueError(f"PerHead has {pattern.heads} patterns but q has Hq={hq} heads; need one per query head")
        pattern.check(nq, nk)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (B, Nk), True = keep")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(b, nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    for name, x, what in (("bias", bias, ""), ("rpb", rpb, " (a relative-position-bias table)")):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor{what}, got {type(x).__name__}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}")
    if rpb is not None:
        if bias is not None:
            raise ValueError("pass either bias (dense, broadcastable to (B, Hq, Nq, Nk)) or rpb (a relative-position "
                             "table), not both: add the table's values into a dense bias to combine them")
    if not isinstance(engine, str) or (engine != "auto" and engine not in ENGINES):
        raise ValueError(f"engine must be 'auto' or one of {list(ENGINES)}, got {engine!r}")
    check_bool(return_lse, "return_lse")
    if score_mod is not None:
        check_mod(score_mod, "score_mod", "score_mod")
    if blocks is not None:
        _check_blocks(blocks, pattern, rpb, engine, q, k)
    elif engine == "partition" and q.device.type != "meta":
        _check_partition(pattern, bias, rpb, q.shape[2], k.shape[2])


def _check_blocks(blocks: object, pattern: Pattern | None, rpb: torch.Tensor | None, engine: str, q: torch.Tensor,
                  k: torch.Tensor) -> None:
    if not isinstance(blocks, SelectedBlocks):
        raise TypeError(f"blocks must be a nearfar.SelectedBlocks or None, got {type(blocks).__name__}")
    if rpb is not None:
        raise ValueError("rpb (a relative-position table) does not combine with blocks; pass its values as bias=")
    if engine == "partition":
        raise ValueError("engine='partition' runs fixed windows only; run-time blocks need engine='blocksparse', "
                         "'dense', 'flex' or 'auto'")
    if engine == "blocksparse" and isinstance(pattern, PerHead):
        raise ValueError("blocks with a PerHead pattern run on engine='dense' or 'flex' only (the block-sparse "
                         "engine of run-time blocks takes one static pattern for every head)")
    (b, hq, nq, _), (hkv, nk) = q.shape, k.shape[1:3]
    blocks.check(b, hq, hkv, nq, nk, q.device)


def _check_partition(pattern: Pattern | None, bias: torch.Tensor | None, rpb: torch.Tensor | None, nq: int,
                     nk: int) -> None:
    """``engine="partition"`` runs only patterns whose token tiles attend exactly to themselves at this size."""
    parts = pattern.patterns if isinstance(pattern, PerHead) and bias is None and rpb is None else [pattern]
    for p in parts:
        if not _plan(p if p is not None else Dense(), nq, nk, "cpu").partition:
            raise ValueError(f"engine='partition' runs patterns whose token tiles attend only to themselves (Blocks, "
                             f"Grid, their shifted forms and intersections with them) on whole windows; {p!r} is not "
                             f"one at Nq={nq}, Nk={nk}: use engine='blocksparse' or 'auto'")


def _bias_source(bias, rpb, pattern, b, hq, nq, nk):
    """A dense bias or a relative-position table, each from its own argument: a tensor is never interpreted by its
    shape (a (1, Nk) per-key bias can have the shape of a table)."""
    takes_table = isinstance(pattern, TablePattern) and pattern.rpb_size() is not None
    if rpb is not None:
        if not takes_table:
            raise ValueError("rpb (a relative-position-bias table) needs a Neighborhood, Blocks or Grid pattern that "
                             f"takes one, got pattern {pattern!r}")
        if tuple(rpb.shape) != pattern.rpb_shape(hq):
            raise ValueError(f"rpb must have shape (Hq, 2m-1, ...) = {pattern.rpb_shape(hq)} for {pattern!r} and "
                             f"Hq={hq}, got {tuple(rpb.shape)}")
        pattern.check_rpb()
        return RelativePositionBias(rpb, pattern, nq)
    if bias is None:
        return None
    target = (b, hq, nq, nk)
    ok = bias.dim() <= 4 and all(s in (1, t) for s, t in zip(reversed(bias.shape), reversed(target)))
    if not ok:
        table_shape = takes_table and tuple(bias.shape) == pattern.rpb_shape(hq)
        hint = "; a relative-position-bias table goes in rpb=, not bias=" if table_shape else ""
        raise ValueError(f"bias of shape {tuple(bias.shape)} must be broadcastable to (B, Hq, Nq, Nk) = "
                         f"{(b, hq, nq, nk)}{hint}")
    return DenseBias(bias)


def check_attention_inputs(q: object, k: object, v: object, scale: object = None, key_padding_mask: object = None,
                           pattern: object = None, bias: object = None) -> None:
    """``attend``'s checks of ``q, k, v``, ``scale``, ``key_padding_mask``, ``pattern`` (type, heads, sizes) and
    ``bias`` (type, dtype, device), with the same errors, for ops beside it."""
    _validate(q, k, v, pattern, scale, bias, None, key_padding_mask, "auto", False)


@overload
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None, *,
           scale: float | None = None, bias: torch.Tensor | None = None, rpb: torch.Tensor | None = None,
           key_padding_mask: torch.Tensor | None = None, engine: str = "auto",
           return_lse: Literal[False] = False, blocks: SelectedBlocks | None = None,
           score_mod: Callable | None = None) -> torch.Tensor: ...
@overload
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None, *,
           scale: float | None = None, bias: torch.Tensor | None = None, rpb: torch.Tensor | None = None,
           key_padding_mask: torch.Tensor | None = None, engine: str = "auto",
           return_lse: Literal[True], blocks: SelectedBlocks | None = None,
           score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None, *,
           scale: float | None = None, bias: torch.Tensor | None = None, rpb: torch.Tensor | None = None,
           key_padding_mask: torch.Tensor | None = None, engine: str = "auto",
           return_lse: bool = False, blocks: SelectedBlocks | None = None,
           score_mod: Callable | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    rpb: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    engine: str = "auto",
    return_lse: bool = False,
    blocks: SelectedBlocks | None = None,
    score_mod: Callable | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, Hq, Nq, d)`` over ``k (B, Hkv, Nk, d)``, ``v (B, Hkv, Nk, dv)`` restricted to ``pattern``.

    ``Hq % Hkv == 0`` (GQA/MQA); ``Nq != Nk`` is allowed (positional patterns align the last query with the
    last key). ``pattern=None`` is dense attention. ``bias`` is added to the scaled scores: a tensor
    broadcastable to ``(B, Hq, Nq, Nk)``. ``rpb``, with a ``Neighborhood``, ``Blocks`` or ``Grid`` pattern, is a
    relative-position-bias table ``(Hq, 2k-1, ...)`` (key-minus-query offsets, see the pattern) added the same way;
    pass one of the two. ``key_padding_mask (B, Nk)``: True = keep. A query with no allowed key returns 0
    (and LSE ``-inf``). A key a query may not attend (by pattern or padding) never affects that query's output or
    gradients, whatever it holds (NaN, Inf, garbage: see ``nearfar.guard``; not under ``torch.compile``).
    ``score_mod(score, b, h, q_idx, kv_idx)`` (FlexAttention's) rewrites each score before the softmax: it gets the
    scaled score ``q . k * scale`` (float32, float64 for float64 inputs), as Flex applies it, and its result is
    what ``bias`` is added to and the mask then applies to, so the probabilities are ``softmax(score_mod(q . k *
    scale) + bias)`` over the allowed keys. A pattern may be a ``MaskMod`` (Flex's ``mask_mod``, which sees the
    indices of the ``q`` and ``k`` tensors as they are, as in Flex).
    Any layout of q/k/v (views, transposes, expanded or strided dims) gives the result of the contiguous call.
    Meta tensors get outputs of the right shape (for tracing). Returns ``(B, Hq, Nq, dv)``, plus the LSE
    ``(B, Hq, Nq)`` (natural log, of the scores the softmax takes, not differentiable) when ``return_lse``.

    Args:
        q: Queries ``(B, Hq, Nq, d)``, a floating dtype (float16, bfloat16, float32, float64).
        k: Keys ``(B, Hkv, Nk, d)`` with ``Hq % Hkv == 0``; same dtype and device as ``q``.
        v: Values ``(B, Hkv, Nk, dv)``.
        pattern: Which (query, key) pairs may attend; None (or ``Dense()``) is dense attention. A ``PerHead``
            pattern needs one pattern per query head.
        scale: Score scale; default ``1 / sqrt(d)``.
        bias: Additive bias of the scaled scores, broadcastable to ``(B, Hq, Nq, Nk)``.
        rpb: Relative-position-bias table ``(Hq, 2m-1[, 2m-1[, 2m-1]])`` for a ``Neighborhood``, ``Blocks`` or
            ``Grid`` pattern, indexed by key-minus-query offsets. Pass ``bias`` or ``rpb``, not both.
        key_padding_mask: Bool ``(B, Nk)``, True = keep the key.
        engine: ``"auto"`` (see the Engines page) or one of ``nearfar.engines()``.
        return_lse: Also return the log-sum-exp of each row.
        blocks: Key blocks chosen at run time per (batch item, head, query block), in FlexAttention's block-list
            format (``nearfar.SelectedBlocks``): the pairs they allow are added to ``pattern``'s (a union); with
            ``blocks``, ``pattern=None`` adds no static pairs. No gradient flows through the indices.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, called on broadcastable index
            tensors (``nearfar.mods``): ALiBi, tanh soft-capping, relative-position tables. It should return finite
            scores or ``-inf`` (which masks the pair, as in Flex). Gradients flow through it to ``q``/``k`` and to
            the tensors it captures. Every engine takes it; the block-sparse engine
            evaluates it chunk by chunk through PyTorch ops (``nearfar.backends.scored``: the compiled CPU kernel
            and the fused chunk kernels take no Python function, so such a call runs without them).

    Returns:
        The output ``(B, Hq, Nq, dv)`` in ``q``'s dtype; with ``return_lse``, a tuple ``(out, lse)`` with ``lse``
        ``(B, Hq, Nq)`` (``-inf`` for a query with no allowed key).

    Raises:
        TypeError: If an argument has the wrong type or dtype (named in the message), ``score_mod`` is not a
            callable of five arguments, or it (or a ``MaskMod``'s function) returns a tensor of the wrong dtype.
        ValueError: If shapes, devices, heads, the pattern's sizes, ``scale``, ``bias``/``rpb`` or ``engine`` are out
            of range, before any work is done.

    Examples:
        >>> import torch, nearfar as nf
        >>> q = torch.randn(1, 8, 1024, 32, requires_grad=True)
        >>> k, v = torch.randn(1, 2, 1024, 32), torch.randn(1, 2, 1024, 32)   # GQA: 4 query heads per KV head
        >>> out = nf.attend(q, k, v, nf.SlidingWindow(left=255) & nf.Causal())   # HF sliding_window=256
        >>> out.shape
        torch.Size([1, 8, 1024, 32])
        >>> out.sum().backward()
        >>> softcap = lambda s, b, h, q_idx, kv_idx: 50.0 * torch.tanh(s / 50.0)   # Gemma 2
        >>> nf.attend(q, k, v, nf.Causal(), score_mod=softcap).shape
        torch.Size([1, 8, 1024, 32])
    """
    _validate(q, k, v, pattern, scale, bias, rpb, key_padding_mask, engine, return_lse, blocks, score_mod)
    hook = interceptor()
    if hook is not None and q.device.type != "meta":
        return hook(AttendCall(q, k, v, pattern, scale, bias, rpb, key_padding_mask, engine, return_lse,
                               blocks, score_mod))  # type: ignore[return-value]
    record_tensors(pattern, q, k, v)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    if q.device.type == "meta":
        return _meta(q, k, v, float(scale) if scale is not None else 1.0 / math.sqrt(d), return_lse)
    bound, items = bind(pattern, b, hq, nq, k.shape[2], q.device)
    if engine == "partition" and items is None and bound is not pattern:  # a MaskMod per head: check every head
        _check_partition(bound, bias, rpb, nq, k.shape[2])
    pattern = bound
    if items is not None:  # a MaskMod that varies over the batch: one call per item, each with its own plan
        with unobserved():
            return _per_item(q, k, v, items, scale, bias, rpb, key_padding_mask, engine, return_lse, blocks,
                             score_mod)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    bias_src = _bias_source(bias, rpb, pattern, b, hq, nq, nk)
    if isinstance(pattern, Dense) and blocks is None:
        pattern = None
    forced = forced_engine()
    if engine == "auto" and forced is not None:
        engine = forced
    if pattern is None and blocks is None and key_padding_mask is None and bias_src is None:
        # no masked pair that a huge value could poison: a non-finite output is the inputs' own, as in SDPA
        out, lse = _run(q, k, v, None, scale, None, None, engine, return_lse, None, score_mod)
        return (out, lse) if return_lse else out
    # training: check the inputs first (a huge finite value at a masked pair overflows only in the backward pass);
    # inference: any leak shows as a non-finite output, so only an output that has one is looked into
    trains = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, rpb))
    unsafe = unsafe_tokens(q, k, v, scale) if trains else None
    if unsafe is None:
        out, lse = _run(q, k, v, pattern, scale, bias_src, key_padding_mask, engine, return_lse, blocks, score_mod)
        if trains or torch.compiler.is_compiling() or output_finite(out):
            return (out, lse) if return_lse else out
        unsafe = unsafe_tokens(q, k, v, scale)
        if unsafe is None:  # non-finite for another reason (a bias): nothing masked leaked
            return (out, lse) if return_lse else out
    out, lse = _guarded(q, k, v, unsafe, pattern, scale, bias_src, key_padding_mask, engine, return_lse, blocks,
                        score_mod)
    return (out, lse) if return_lse else out


def _per_item(q, k, v, items, scale, bias, rpb, key_padding_mask, engine, return_lse, blocks, score_mod):
    """``attend`` item by item (each with its own pattern), concatenated over the batch: the slices of every
    per-item argument, and a ``score_mod`` that sees the items' own batch indices."""
    outs, lses = [], []
    for i, p in enumerate(items):
        one = slice(i, i + 1)
        bias_i = bias[one] if bias is not None and bias.dim() == 4 and bias.shape[0] > 1 else bias
        kpm_i = key_padding_mask[one] if key_padding_mask is not None else None
        blocks_i = blocks
        if blocks is not None and blocks.kv_num_blocks.shape[0] > 1:
            blocks_i = SelectedBlocks(blocks.kv_num_blocks[one], blocks.kv_indices[one], blocks.q_block,
                                      blocks.kv_block, blocks.within)
        mod_i = at_batch(score_mod, i) if score_mod is not None else None
        out, lse = attend(q[one], k[one], v[one], p, scale=scale, bias=bias_i, rpb=rpb, key_padding_mask=kpm_i,
                          engine=engine, return_lse=True, blocks=blocks_i, score_mod=mod_i)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


def _guarded(q, k, v, unsafe, pattern, scale, bias_src, key_padding_mask, engine, return_lse, blocks, score_mod):
    """Some value could poison scores it is masked out of: the engine sees zeros there, and the rows that may
    attend such a key (or whose query is unsafe) are recomputed exactly (``nearfar.guard``)."""
    unsafe_q, unsafe_k = unsafe
    uq, uk = unsafe_q[..., None], unsafe_k[..., None]
    out, lse = _run(zero_rows(q, uq), zero_rows(k, uk), zero_rows(v, uk), pattern, scale, bias_src, key_padding_mask,
                    engine, return_lse, blocks, score_mod)
    rows = dirty_rows(pattern, unsafe_q, unsafe_k, key_padding_mask, q.shape[2], k.shape[2], blocks)
    if rows.numel():
        rows, out_r, lse_r = exact_rows(q, k, v, unsafe_q, unsafe_k, rows, pattern, scale, bias_src,
                                        key_padding_mask, return_lse, blocks, score_mod)
        out = out.index_copy(2, rows, out_r)
        if return_lse:
            assert lse_r is not None  # exact_rows returns an lse when asked
            lse = lse.index_copy(2, rows, lse_r.to(lse.dtype))
        else:
            lse = None
    return out, lse


def _run(q, k, v, pattern, scale, bias_src, key_padding_mask, engine, return_lse, blocks=None, score_mod=None):
    nq, nk = q.shape[2], k.shape[2]
    kpm = None
    if key_padding_mask is not None:
        kpm = torch.zeros(q.shape[0], nk, dtype=torch.float32, device=q.device)
        kpm = kpm.masked_fill_(~key_padding_mask, float("-inf"))
    if blocks is not None:
        return _run_blocks(q, k, v, pattern, scale, bias_src, kpm, engine, return_lse, blocks, score_mod)
    chosen = engine == "auto"
    if chosen:
        trains = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        engine = choose_engine(q, pattern, nq, nk, bias_src, scored=score_mod is not None, padded=kpm is not None,
                               lse=return_lse, trains=trains)
        if engine == "flex":
            res = _try_flex(q, k, v, pattern, scale, kpm, bias_src, return_lse, score_mod)
            if res is not None:
                return res
            engine = "blocksparse"
    if engine == "dense":
        return dense_attention(q, k, v, pattern, scale, kpm, bias_src, return_lse, score_mod=score_mod)
    if engine in ("blocksparse", "partition") and isinstance(pattern, PerHead) and bias_src is None \
            and not (score_mod is None and _one_native_call(q, pattern, engine)):
        return _per_pattern(q, k, v, pattern, scale, key_padding_mask, return_lse, None if chosen else engine,
                            score_mod)
    if engine in ("blocksparse", "partition"):
        native = engine == "blocksparse" and score_mod is None and native_supports(q)
        plan = _plan(pattern if pattern is not None else Dense(), nq, nk, q.device, native,
                     masks=engine == "blocksparse" and not native)
        if engine == "partition":
            return partition_attention(q, k, v, plan, scale, kpm, bias_src, return_lse, score_mod)
        if score_mod is not None:  # a Python function per score: the PyTorch tile path, not the fused kernels
            return scored_attention(q, k, v, plan, scale, score_mod, kpm, bias_src, return_lse)
        return blocksparse_attention(q, k, v, plan, scale, kpm, bias_src, return_lse)
    from .backends.flex import flex_attention_engine

    return flex_attention_engine(q, k, v, pattern, scale, kpm, bias_src, return_lse, score_mod)


def _run_blocks(q, k, v, pattern, scale, bias_src, kpm, engine, return_lse, blocks, score_mod=None):
    """Run-time key blocks on the engine ``choose_engine`` picks for them; "blocksparse" is
    ``nearfar.backends.selected`` (``nearfar.backends.scored`` with a ``score_mod``)."""
    if engine == "auto":
        engine = choose_engine(q, pattern, q.shape[2], k.shape[2], bias_src, blocks=True)
        if engine == "dense" and bias_src is None and score_mod is None and \
                _native_blocks_pay(q, pattern, blocks, q.shape[2], k.shape[2]):
            engine = "blocksparse"
    if engine == "dense":
        return dense_attention(q, k, v, pattern, scale, kpm, bias_src, return_lse, blocks=blocks,
                               score_mod=score_mod)
    if engine == "flex":
        from .backends.flex import flex_selected

        return flex_selected(q, k, v, pattern, blocks, scale, kpm, bias_src, return_lse, score_mod)
    if score_mod is not None or isinstance(pattern, PerHead):  # (a PerHead here: a MaskMod bound per head)
        return scored_attention(q, k, v, None, scale, score_mod, kpm, bias_src, return_lse, pattern, blocks)
    return selected_attention(q, k, v, pattern, blocks, scale, kpm, bias_src, return_lse)


def _meta(q, k, v, scale, return_lse):
    """Shape inference on the meta device: the dense math on meta tensors (no memory, no data), differentiable, so
    tracing and ``torch.func`` shape checks see the real output shapes and dtypes."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    out = torch.matmul(s.softmax(-1), vr)
    if not return_lse:
        return out
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, torch.logsumexp(s.detach().to(acc), -1)


def _per_pattern(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: PerHead, scale: float,
                 key_padding_mask: torch.Tensor | None, return_lse: bool, engine: str | None,
                 score_mod: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``PerHead`` pattern as one block-sparse (or partition) call per distinct pattern over its query heads (and
    their KV heads); ``engine`` None picks partition or block-sparse by each pattern's plan. Each call keeps the
    shared-key-list path (strided K/V reads, GQA groups together, exact widths); one per-head plan would copy K/V
    per query head and pad every head to the widest (S2-Attention at 16K: 2.4x slower)."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    heads: dict = {}
    for i, p in enumerate(pattern.patterns):
        heads.setdefault(p, []).append(i)
    outs, lses, order = [], [], []
    for p, idx in heads.items():
        qi = torch.tensor(idx, device=q.device)
        kv = sorted({i // group for i in idx})
        if len(kv) * group == len(idx):  # whole GQA groups: keep the sharing
            ki = torch.tensor(kv, device=q.device)
        else:  # a GQA group split between patterns: K/V per query head for this call
            ki = qi // group
        qs, ks, vs = q.index_select(1, qi), k.index_select(1, ki), v.index_select(1, ki)
        record_tensors(p, qs, ks, vs)  # already validated and guarded as a whole: straight to the engine
        sub = engine or ("partition" if _is_partition(p, q.shape[2], k.shape[2], q.device) else "blocksparse")
        mod = at_heads(score_mod, qi) if score_mod is not None else None  # the heads' own indices
        out, lse = _run(qs, ks, vs, p, scale, None, key_padding_mask, sub, return_lse, None, mod)
        outs.append(out)
        lses.append(lse)
        order += idx
    inv = torch.argsort(torch.tensor(order, device=q.device))
    lse = torch.cat(lses, 1).index_select(1, inv) if return_lse else None  # asking for the LSE costs ~1.5x
    return torch.cat(outs, 1).index_select(1, inv), lse


@torch.compiler.disable
def _plan(pattern: Pattern, nq: int, nk: int, device: torch.device | str, native: bool = False,
          masks: bool = False) -> Plan:
    """The cached plan; ``native``: for the compiled kernel, whose tile shape is chosen by counting its work;
    ``masks``: for a PyTorch chunk path, which reads the exact masks on every call (and may be traced)."""
    tile = native_tile(pattern, nq, nk) if native and torch.device(device).type == "cpu" else None
    plan = get_plan(pattern, nq, nk, tile, device=device)
    if masks:
        plan.cache_masks()
    return plan


def _is_partition(pattern: Pattern | None, nq: int, nk: int, device: torch.device | str) -> bool:
    """Whether ``pattern``'s tiles attend exactly to themselves at this size: the plan decides
    (``Pattern.may_partition`` only says it is worth asking)."""
    return pattern is not None and pattern.may_partition and _plan(pattern, nq, nk, device).partition


def choose_engine(q: torch.Tensor, pattern: Pattern | None, nq: int, nk: int,
                  bias: DenseBias | RelativePositionBias | None = None, blocks: bool = False,
                  scored: bool = False, padded: bool = False, lse: bool = False, trains: bool | None = None) -> str:
    """The ``"auto"`` rule, in one place (``attend`` applies it per call):

    0. a plain ``Causal()`` with no bias, key padding (``padded``), run-time blocks, ``score_mod`` or LSE asked for
       (``lse``), which SDPA runs without a mask (``backends.dense.causal_as_sdpa``): ``"dense"``. One query after
       its keys (a decoding step) sees every key: always. As many queries as keys is SDPA's ``is_causal`` (a fused
       kernel that skips the blocks above the diagonal, with no plan) where that is measured no slower
       (``benchmarks/causal.py``, CPU, 2 threads): from ``_CAUSAL_SDPA_PAIRS`` pairs (4,096 tokens) up, except when
       a bf16/fp16 call trains (``trains``; SDPA's half-precision CPU backward is 5-7x slower than the compiled
       kernel); at any size off CPU or without the compiled kernel for the dtype. Below that the compiled kernel is
       1.08-1.4x faster than ``is_causal`` and the rules below apply;
    1. windows (a pattern whose plan is a partition at this size): on CPU with the compiled kernel loaded for the
       dtype, no ``score_mod`` and no dense bias, ``"blocksparse"`` (the kernel reads each window's q/k/v in place,
       one query tile per window: measured faster than the batched SDPA of ``"partition"``, ``_native_windows_pay``);
       otherwise ``"partition"``, one batched attention over the windows, whatever the size; a window pattern that
       is not a partition here (e.g. edge windows of another size) goes to ``"blocksparse"``;
    2. no pattern, or at most ``2**20`` (query, key) pairs: ``"dense"`` (one fused kernel beats per-chunk work),
       unless the compiled CPU kernel is loaded and the pattern's plan scores under 85% of the pairs (and the problem
       has at least 4,096 pairs): then ``"blocksparse"`` (measured faster than dense SDPA there, ``benchmarks/
       small.py``);
    3. on CUDA, with FlexAttention available and no bias that needs a gradient: ``"flex"`` (its Triton kernels beat
       our per-chunk kernels there; a pattern it fails to compile falls back to ``"blocksparse"`` with a warning);
    4. otherwise ``"blocksparse"``, which beats compiled Flex on CPU and trains.

    With run-time key blocks (``blocks``: ``attend(..., blocks=...)``) rule 1 does not apply (the partition engine
    takes none) and rule 2 reads: at most ``2**20`` pairs, or a ``PerHead`` pattern, ``"dense"`` (``attend`` still
    takes the compiled kernel when the call reads under a quarter of the pairs: ``_native_blocks_pay``).

    With a ``score_mod`` (``scored``) the compiled kernel cannot run the call, so rule 2 is ``"dense"`` up to
    ``2**20`` pairs, and a call without a pattern goes to ``"blocksparse"`` above that (the dense engine would
    materialise the scores to apply the function to them).
    """
    causal = causal_as_sdpa(pattern, nq, nk) if not (blocks or scored or padded or lse) and bias is None else None
    if causal is False or (causal and _causal_sdpa_pays(q, nq, nk, trains)):
        return "dense"
    if blocks:
        if nq * nk <= _SMALL or isinstance(pattern, PerHead):
            return "dense"
    elif pattern is not None and pattern.may_partition:
        if not _is_partition(pattern, nq, nk, q.device):
            return "blocksparse"
        return "blocksparse" if not scored and _native_windows_pay(q, nq, nk, bias) else "partition"
    elif pattern is None:
        return "blocksparse" if scored and nq * nk > _SMALL else "dense"
    elif nq * nk <= _SMALL:
        return "blocksparse" if not scored and _native_pays(q, pattern, nq, nk) else "dense"
    trains_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()  # Flex: no bias gradient
    if q.device.type == "cuda" and not trains_bias and (pattern, nq, nk) not in _FLEX_FAILED:
        from .backends.flex import available

        if available():
            return "flex"
    return "blocksparse"


_FLEX_FAILED: dict = {}

#: a plain causal call of at least this many pairs runs on SDPA's ``is_causal`` (fp32 at 4,096 tokens: forward
#: 0.98x, forward+backward 0.97x the compiled kernel's time, 16,384 tokens 0.82x / 1.00x, and no plan to build: its
#: first call at 16K took half as long)
_CAUSAL_SDPA_PAIRS = 1 << 24


def _causal_sdpa_pays(q: torch.Tensor, nq: int, nk: int, trains: bool | None) -> bool:
    """Whether SDPA's ``is_causal`` beats the block-sparse engine on a plain causal call (rule 0 of
    ``choose_engine``); ``trains`` None: whether grad mode is on and ``q`` requires a gradient."""
    if q.device.type != "cpu" or not native_supports(q):
        return True
    if trains is None:
        trains = torch.is_grad_enabled() and q.requires_grad
    if trains and q.dtype in (torch.bfloat16, torch.float16):
        return False
    return nq * nk >= _CAUSAL_SDPA_PAIRS


def _one_native_call(q: torch.Tensor, pattern: PerHead, engine: str) -> bool:
    """A ``PerHead`` pattern runs as one call of the compiled kernel (per-head key lists, each head's sub-blocks
    skipped on its own) instead of one call per distinct pattern over gathered heads: no copies of q/k/v per head
    group (MoA at 8,192 tokens held 1.33x dense SDPA's forward peak that way). Not for windows, which the
    per-pattern split may send to the partition engine."""
    return engine == "blocksparse" and native_supports(q) and not any(p.may_partition for p in pattern.patterns)


def _native_windows_pay(q: torch.Tensor, nq: int, nk: int, bias: DenseBias | RelativePositionBias | None) -> bool:
    """Whether the compiled kernel runs windows faster than the partition engine's batched SDPA: on CPU, for its
    dtypes, without a dense bias (a relative-position table is looked up in the kernel), from ``_NATIVE_MIN_PAIRS``,
    eager (a compiled graph keeps the partition engine's plain torch ops).

    Measured 2026-12-08 (2 threads, B=8, q/k/v strided views of a fused projection, A/B alternated, partition time /
    kernel time): float32 7x7 and 14x14 windows, plain, shifted with Swin's region mask and MaxViT's grid, on 56x56
    with 3 heads of 32 and 2 of 64: forward 1.05-2.39x, forward+backward 1.00-2.01x; on 14x14 and 28x28 with 12 and
    6 heads of 32, 8x8 and 1D blocks of 32: forward 1.22-1.91x, forward+backward 0.88-1.38x (plain unshifted windows
    train about as fast either way, shifted ones 1.2-2x faster); bfloat16/float16 shifted 7x7 on 56x56: forward
    1.7-1.9x, forward+backward 3.2-4.3x (SDPA's half-precision backward with a mask is slow)."""
    return (q.device.type == "cpu" and nq * nk >= _NATIVE_MIN_PAIRS and native_supports(q)
            and (bias is None or isinstance(bias, RelativePositionBias)) and not torch.compiler.is_compiling())


def _native_pays(q: torch.Tensor, pattern: Pattern, nq: int, nk: int) -> bool:
    """Whether the compiled CPU kernel beats the dense engine here: it is loaded, the problem is not tiny, and the
    plan's scored fraction (``backends.native.density``) is under ``_NATIVE_DENSITY``."""
    if q.device.type != "cpu" or nq * nk < _NATIVE_MIN_PAIRS or not native_supports(q):
        return False
    return native_density(_plan(pattern, nq, nk, q.device, True)) < _NATIVE_DENSITY


#: with run-time blocks below ``_SMALL`` pairs, the kernel takes the call when at most this share of the pairs is read
#: (BiFormer at 14x14, 4-token regions, B=8, 12 heads: 8% of the pairs 1.58x faster than the dense engine, 33% 0.94x)
_NATIVE_BLOCKS_DENSITY = 0.25


def _native_blocks_pay(q: torch.Tensor, pattern: Pattern | None, blocks: SelectedBlocks, nq: int, nk: int) -> bool:
    """Whether the compiled kernel beats the dense engine on a small call with run-time blocks: the selected pairs
    (an upper bound: repeats counted) and the pattern's scored share under ``_NATIVE_BLOCKS_DENSITY``."""
    if q.device.type != "cpu" or nq * nk < _NATIVE_MIN_PAIRS or not native_supports(q) or \
            isinstance(pattern, PerHead):
        return False
    num = blocks.kv_num_blocks
    lists = max(1, num.shape[0] * num.shape[1])
    share = float(num.clamp(max=blocks.kv_indices.shape[-1]).sum()) * blocks.q_block * blocks.k_block / (
        lists * nq * nk)
    if pattern is not None:
        share += native_density(_plan(pattern, nq, nk, q.device, True))
    return share < _NATIVE_BLOCKS_DENSITY


def _try_flex(q, k, v, pattern, scale, kpm, bias, return_lse, score_mod=None):
    """Flex on "auto": if it cannot compile this pattern, say so once and use the block-sparse engine."""
    from .backends.flex import flex_attention_engine

    try:
        return flex_attention_engine(q, k, v, pattern, scale, kpm, bias, return_lse, score_mod)
    except Exception as err:  # noqa: BLE001 - any compile failure means: use the engine that always works
        _FLEX_FAILED[(pattern, q.shape[2], k.shape[2])] = repr(err)
        warnings.warn(f"nearfar: FlexAttention failed for {pattern!r} ({type(err).__name__}); using the "
                      "block-sparse engine for it", RuntimeWarning, stacklevel=3)
        return None
