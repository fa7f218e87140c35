"""Window kernel: softmax attention inside windows that are already a batch, read in place from the projections.

The official window codes (Swin, MaxViT, GC ViT, HiDiffusion, PT-DiT, CRAFT) project the partitioned input to
``(B*nW, T, 3C)`` and then reorder it into ``(3, B*nW, heads, T, d)`` for batched attention: one copy of q, k and
v forward, and backward a zero-filled ``(3, ...)`` gradient per slice taken (``qkv[0]``, ``qkv[1]``, ``qkv[2]``),
summed and copied back. Here every head of q, k and v is a strided ``(B*nW, T, d)`` view of the projection output
(a batched GEMM reads it as it lies); per head, the scores are one ``baddbmm`` into a buffer that holds the bias
(and region mask) already, so scaling and the bias add cost no extra pass; one softmax call for all heads writes
the probabilities (out of place: an aliased softmax is ~1.3-1.5x slower on CPU; float32 through the compiled row
softmax where it is built, 1.7x faster than ATen's on 49-score rows) and ``p @ v`` a contiguous per-head output;
the heads are interleaved in the same copy that puts the windows back in place (``WindowBatch``). The backward pass
writes the gradients of q, k and v into a buffer laid out as the projection output, which the projection's backward
reads as is. The probabilities are kept for the backward pass (``heads * B*nW * T * T`` floats, as the matmul +
softmax path keeps them).

CPU, float32/float64 only (``takes`` says when: small windows always; larger ones, up to ``MAX_TOKENS`` tokens, for
training with a bias and wherever a region mask is, which SDPA could only take materialised per window). With
several threads a batch with up to ``HEADS_BATCHED_BYTES`` of scores runs with all heads in each operation (few
operations: each is a parallel region, see ``CHUNK_BYTES`` and ``HEADS_BATCHED_THREADS``): q, k and v are first copied
out head-major ``(3, heads, BW, T, d)`` (one copy, as the official codes' reorder) and every GEMM covers all heads; a
larger batch runs per head in a few ``CHUNK_BYTES`` chunks, read in place; single-threaded, per head in chunks that
stay in the L2 cache (``CHUNK_BYTES_SERIAL``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import native

#: a role's place in the sources: (source index, channel of head 0, channel step per head)
Role = tuple[int, int, int]

#: Measured 2026-12-06 against SDPA on the same strided heads (float32; 25088 tokens in windows of T, 3 heads of 32;
#: 1568 tokens, 12 heads of 32; 1 head of 48). Forward+backward, with a bias table (SDPA's mask then needs a gradient,
#: which sends it to its math path): SDPA takes 1.4-2.6x this kernel's time at T = 49 ... 784, 1 and 2 threads;
#: without a bias 1.05-1.6x up to T = 144, 1.0-1.1x at 196, 0.75-0.85x at 784. Forward only, at 2 threads (the
#: benchmarks' setting): 1.2-1.35x up to T = 98 with or without a table, 0.95-1.05x at 196, 0.85-0.95x at 784; at
#: 1 thread SDPA's fused kernel is 0-14% faster there. A region mask differs per window, which SDPA could only take
#: materialised per window and image (B * nW * T * T per call), so masked windows stay here at every size. The
#: probabilities kept for the backward pass grow as T (heads * tokens * T floats): windows are capped at MAX_TOKENS.
MAX_TOKENS = 1024
MAX_TOKENS_PLAIN = 144


def takes(x: torch.Tensor, t: int, biased: bool, masked: bool, trains: bool) -> bool:
    """Whether windows of ``t`` tokens of projections like ``x`` run on this kernel (else on SDPA): CPU, float32 or
    float64, eager; windows of up to ``MAX_TOKENS_PLAIN`` tokens, and up to ``MAX_TOKENS`` for training with a bias
    or a region mask and for inference with a region mask (``biased``: a table or a region mask is added;
    ``masked``: a region mask is)."""
    limit = MAX_TOKENS if masked or (trains and biased) else MAX_TOKENS_PLAIN
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and t <= limit
            and not torch.compiler.is_compiling())


def roles_of(order: str, heads: int, d: int) -> tuple[Role, Role, Role]:
    """Where head ``h`` of q, k and v lies: ``"3hd"`` one fused source split ``[3, heads, d]`` (timm/Swin),
    ``"h3d"`` one fused source split ``[heads, 3, d]`` (timm's "rw" MaxViT), ``"sep"`` three sources of
    ``heads * d`` channels (diffusers' ``to_q``/``to_k``/``to_v``)."""
    if order == "3hd":
        return (0, 0, d), (0, heads * d, d), (0, 2 * heads * d, d)
    if order == "h3d":
        return (0, 0, 3 * d), (0, d, 3 * d), (0, 2 * d, 3 * d)
    assert order == "sep"
    return (0, 0, d), (1, 0, d), (2, 0, d)


def _head(srcs: tuple[torch.Tensor, ...], role: Role, h: int, d: int) -> torch.Tensor:
    i, base, step = role
    return srcs[i][..., base + h * step:base + h * step + d]


#: bytes of one chunk's scores, all heads together, with several threads. Every operation of this kernel is a
#: parallel region (OpenMP), and on a machine shared with other work each one waits at its end for a descheduled
#: thread: measured 2026-12-06 at load ~3.5 on 2 cores, 2 threads, GC ViT's 56x56x96 block forward took 544 ms with
#: 1 MiB chunks (one GEMM, softmax and GEMM per head per chunk), 160 ms with one chunk and 136 ms for the
#: official-style code. Without that oversubscription, chunks that stay in the cache win: 2026-12-07, load 1.0-1.5,
#: 2 threads, 512 windows of 49 tokens, 3 heads of 32 (GC ViT / Swin at 56x56x96, 14.7 MB of scores), inference
#: 30.0 ms all heads batched, 24.1 ms per head in one chunk, 20.0 ms per head in 4 MiB chunks (19.5 ms in 2 MiB);
#: forward+backward 76.9, 71.3, 60.2 ms (60.9). So batches are cut into chunks of this size, a few per call.
CHUNK_BYTES = 1 << 22
#: single-threaded there are no parallel regions to wait on, and chunks whose scores, probabilities and their
#: gradients stay in the L2 cache between the GEMM that writes them and the softmax and GEMM that read them pay
#: (1 thread, against whole batches: 1.2-1.3x faster at 98 tokens and 1 head of 48, 1.05-1.15x at 49 tokens and
#: 3 heads of 32, forward and forward+backward; 256 KiB chunks were slower, 512 KiB-2 MiB alike)
CHUNK_BYTES_SERIAL = 1 << 20


#: from this many threads on, a batch whose scores (all heads) fit in ``HEADS_BATCHED_BYTES`` runs with all heads in
#: each operation (``_heads_forward``): one GEMM for all heads instead of one per head, at the price of one copy of q,
#: k and v. Measured 2026-12-07 at load ~8 on 2 cores, 2 threads: Swin-T forward+backward (224x224, batch 8) spent
#: 6.7 s of 17 s in the per-head GEMMs (414 + 414 calls, 12-24 heads of 8-32 windows in the last stages: each call
#: a parallel region that waits for a descheduled thread) where timm's batched GEMMs took 0.9 s; the model took
#: 0.85-0.9x timm's time, against 1.0x at 1 thread (where the per-head chunks stay the faster way).
HEADS_BATCHED_THREADS = 2
#: ... and whose scores over all heads are at most this many bytes: past it, per head in ``CHUNK_BYTES`` chunks (the
#: measurement at ``CHUNK_BYTES``). At 12 heads of 32 windows (3.7 MB, Swin's 14x14x384 stage) all heads batched
#: stays the faster way: 6.7 ms against 7.4-8.5 ms in chunks, forward+backward 16.6 against 19.1-20.6 ms.
HEADS_BATCHED_BYTES = 1 << 23


def _chunk(bw: int, t: int, heads: int, period: int, itemsize: int) -> int:
    """Windows per chunk: at most ``CHUNK_BYTES`` (one thread: ``CHUNK_BYTES_SERIAL``) of scores over all heads, a
    multiple or a divisor of the period of the additive term."""
    size = CHUNK_BYTES_SERIAL if torch.get_num_threads() == 1 else CHUNK_BYTES
    c = min(bw, max(1, size // (heads * t * t * itemsize)))
    while c % period and period % c:
        c -= 1
    return c


def _fill(buf: torch.Tensor, add: torch.Tensor, w0: int) -> None:
    """Copy the additive term ``(heads or 1, W', T, T)`` of windows ``w0 ...`` into ``buf (heads, c, T, T)``."""
    period, n = add.shape[1], buf.shape[1]
    if n >= period:
        buf.view(buf.shape[0], -1, *add.shape[1:]).copy_(add[:, None])
    else:
        buf.copy_(add[:, w0 % period:w0 % period + n])


def _block(flat: torch.Tensor, w0: int, w1: int, *shape: int) -> torch.Tensor:
    """Windows ``w0:w1`` of a chunk-major buffer: a contiguous ``(shape[0], w1 - w0, *shape[1:])`` block (the
    softmax backward's ``out=`` variant computes wrong values on non-contiguous tensors, PyTorch 2.13)."""
    per = math.prod(shape)
    return flat[w0 * per:w1 * per].view(shape[0], w1 - w0, *shape[1:])


def _softmax(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(s, -1, out=out)``; float32 on the compiled row softmax (``nearfar/csrc/softmax_rows.cpp``)
    where it is built: 0.83 against 1.44 ms on (3, 145, 49, 49), 2 threads."""
    if s.dtype == torch.float32 and s.is_contiguous() and out.is_contiguous() and native.available():
        torch.ops.nearfar_native.softmax_rows(s, out)
        return out
    return torch.softmax(s, -1, out=out)


def _forward(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int,
             add: torch.Tensor | None, scale: float, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Output ``(heads, BW, T, d)``, with ``keep`` the probabilities (chunk-major: each chunk's ``(heads, c, T, T)``
    block contiguous, flat), and the chunk ``c`` (the backward pass reads the probabilities in the same chunks)."""
    q0 = srcs[0]
    bw, t = q0.shape[0], q0.shape[1]
    c = _chunk(bw, t, heads, 1 if add is None else add.shape[1], q0.element_size())
    opts: dict[str, Any] = dict(dtype=q0.dtype, device=q0.device)
    s = torch.empty(heads * c * t * t, **opts)
    # the probabilities chunk-major, each chunk's (heads, c, T, T) block contiguous
    p = torch.empty(heads * (bw if keep else c) * t * t, **opts)
    o = torch.empty(heads, bw, t, d, **opts)
    views = [[_head(srcs, r, h, d) for r in roles] for h in range(heads)]
    for w0 in range(0, bw, c):
        w1 = min(w0 + c, bw)
        sc = _block(s, 0, w1 - w0, heads, t, t)
        if add is not None:  # the bias fills the buffer; the GEMMs add the scaled scores to it
            _fill(sc, add, w0)
        for h, (q, k, _) in enumerate(views):
            torch.baddbmm(sc[h], q[w0:w1], k[w0:w1].transpose(1, 2), beta=0.0 if add is None else 1.0, alpha=scale,
                          out=sc[h])
        pc = _block(p, w0, w1, heads, t, t) if keep else _block(p, 0, w1 - w0, heads, t, t)
        _softmax(sc, pc)  # all heads at once, not in place (an aliased softmax is ~1.3-1.5x slower)
        for h, (_, _, v) in enumerate(views):
            torch.bmm(pc[h], v[w0:w1], out=o[h, w0:w1])
    return o, p if keep else None, c


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, roles: tuple[Role, Role, Role], heads: int, d: int, scale: float,
                add: torch.Tensor | None, *srcs: torch.Tensor) -> torch.Tensor:
        out, p, c = _forward(srcs, roles, heads, d, add, scale, keep=True)
        ctx.save_for_backward(p, *srcs)
        ctx.roles, ctx.heads, ctx.d, ctx.scale, ctx.chunk = roles, heads, d, scale, c
        ctx.add_shape = None if add is None else tuple(add.shape)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, *srcs = ctx.saved_tensors
        roles, heads, d, scale = ctx.roles, ctx.heads, ctx.d, ctx.scale
        g = g.contiguous()
        bw, t = g.shape[1], g.shape[2]
        period = 1 if ctx.add_shape is None else ctx.add_shape[1]
        c = ctx.chunk
        opts: dict[str, Any] = dict(dtype=p.dtype, device=p.device)
        # per chunk, the gradients of q, k and v of every head go to one buffer, then into buffers laid out as the
        # sources by one copy (every channel of a source is some head's)
        buf = torch.empty(3 * heads * c * t * d, **opts)
        dp = torch.empty(heads * c * t * t, **opts)
        ds = torch.empty(heads * c * t * t, **opts)
        dsrcs = [torch.empty_like(x) for x in srcs]
        targets = _role_views(dsrcs, roles, heads, d)
        dadd = None
        if ctx.add_shape is not None and ctx.needs_input_grad[4]:
            dadd = torch.zeros(heads, *ctx.add_shape[1:], **opts)
        views = [[_head(tuple(srcs), r, h, d) for r in roles] for h in range(heads)]
        for w0 in range(0, bw, c):
            w1 = min(w0 + c, bw)
            n, pc = w1 - w0, _block(p, w0, w1, heads, t, t)
            dpc, dsc = _block(dp, 0, n, heads, t, t), _block(ds, 0, n, heads, t, t)
            bc = buf[:3 * heads * n * t * d].view(3, heads, n, t, d)
            for h, (_, _, v) in enumerate(views):
                torch.bmm(pc[h].transpose(1, 2), g[h, w0:w1], out=bc[2, h])
                torch.bmm(g[h, w0:w1], v[w0:w1].transpose(1, 2), out=dpc[h])
            torch.ops.aten._softmax_backward_data.out(dpc, pc, -1, p.dtype, grad_input=dsc)
            if dadd is not None:
                if n >= period:
                    dadd += dsc.view(heads, -1, period, t, t).sum(1)
                else:
                    dadd[:, w0 % period:w0 % period + n] += dsc
            for h, (q, k, _) in enumerate(views):
                torch.baddbmm(bc[0, h], dsc[h], k[w0:w1], beta=0.0, alpha=scale, out=bc[0, h])
                torch.baddbmm(bc[1, h], dsc[h].transpose(1, 2), q[w0:w1], beta=0.0, alpha=scale, out=bc[1, h])
            for i in range(3):
                targets[i][:, w0:w1].copy_(bc[i])
        if dadd is not None and ctx.add_shape[0] == 1:
            dadd = dadd.sum(0, keepdim=True)
        want = ctx.needs_input_grad
        return None, None, None, None, dadd, *(x if want[5 + i] else None for i, x in enumerate(dsrcs))


def heads_batched(bw: int, t: int, heads: int, itemsize: int) -> bool:
    """Whether the batch runs with all heads in each operation (several threads, at most ``HEADS_BATCHED_BYTES`` of
    scores)."""
    return torch.get_num_threads() >= HEADS_BATCHED_THREADS and heads * bw * t * t * itemsize <= HEADS_BATCHED_BYTES


def _head_major(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int) -> torch.Tensor:
    """q, k and v copied out head-major: ``(3, heads, BW, T, d)``, contiguous (one copy)."""
    return torch.stack(_role_views(list(srcs), roles, heads, d))


def _role_views(srcs: list[torch.Tensor], roles: tuple[Role, Role, Role] | None, heads: int,
                d: int) -> list[torch.Tensor]:
    """q, k and v of tensors laid out as sources (or, ``roles`` None, one head-major ``(3, heads, BW, T, d)``):
    one ``(heads, BW, T, d)`` view each."""
    if roles is None:
        return list(srcs[0].unbind(0))
    bw, t = srcs[0].shape[0], srcs[0].shape[1]
    if len(srcs) == 3:
        return [x.view(bw, t, heads, d).permute(2, 0, 1, 3) for x in srcs]
    if roles[1][2] == d:  # [3, heads, d]
        return list(srcs[0].view(bw, t, 3, heads, d).permute(2, 3, 0, 1, 4).unbind(0))
    return list(srcs[0].view(bw, t, heads, 3, d).permute(3, 2, 0, 1, 4).unbind(0))  # [heads, 3, d]


def _heads_forward(qkv: torch.Tensor, add: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All heads at once from head-major ``qkv (3, heads, BW, T, d)``: the output ``(heads, BW, T, d)`` and the
    probabilities ``(heads, BW, T, T)``."""
    _, heads, bw, t, d = qkv.shape
    q, k, v = (x.view(heads * bw, t, d) for x in qkv.unbind(0))
    s = torch.empty(heads, bw, t, t, dtype=qkv.dtype, device=qkv.device)
    if add is not None:  # the bias fills the buffer; the GEMM adds the scaled scores to it
        s.view(heads, bw // add.shape[1], *add.shape[1:]).copy_(add[:, None])
    s3 = s.view(heads * bw, t, t)
    torch.baddbmm(s3, q, k.transpose(1, 2), beta=0.0 if add is None else 1.0, alpha=scale, out=s3)
    p = _softmax(s, torch.empty_like(s))  # not in place (an aliased softmax is ~1.3-1.5x slower)
    return torch.bmm(p.view(heads * bw, t, t), v).view(heads, bw, t, d), p


class _WindowAttentionHeads(torch.autograd.Function):
    """``_WindowAttention`` with all heads in each operation (see ``HEADS_BATCHED_THREADS``)."""

    @staticmethod
    def forward(ctx: Any, roles: tuple[Role, Role, Role] | None, heads: int, d: int, scale: float,
                add: torch.Tensor | None, *srcs: torch.Tensor) -> torch.Tensor:
        qkv = srcs[0] if roles is None else _head_major(srcs, roles, heads, d)
        out, p = _heads_forward(qkv, add, scale)
        ctx.save_for_backward(p, qkv)
        ctx.roles, ctx.heads, ctx.d, ctx.scale = roles, heads, d, scale
        ctx.add_shape = None if add is None else tuple(add.shape)
        ctx.src_shapes = [x.shape for x in srcs]
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, qkv = ctx.saved_tensors
        _, heads, bw, t, d = qkv.shape
        q, k, v = (x.view(heads * bw, t, d) for x in qkv.unbind(0))
        g3, p3 = g.contiguous().view(heads * bw, t, d), p.view(heads * bw, t, t)
        # the gradients go straight into tensors laid out as the sources, one (heads, BW, T, d) role at a time
        # through one scratch of that size: a head-major gradient of all three and then a copy of it into the
        # sources' layout would hold both at once (twice the projection's size, the layer's peak)
        dsrcs = [torch.empty_like(qkv)] if ctx.roles is None else [
            torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for shape in ctx.src_shapes]
        targets = _role_views(dsrcs, ctx.roles, heads, d)
        tmp = None if ctx.roles is None else torch.empty(heads * bw, t, d, dtype=qkv.dtype, device=qkv.device)

        def into(role: int) -> torch.Tensor:  # where a role's gradient is computed: its target, or the scratch
            return targets[role].view(heads * bw, t, d) if tmp is None else tmp

        def done(role: int) -> None:
            if tmp is not None:
                targets[role].copy_(tmp.view(heads, bw, t, d))

        torch.bmm(p3.transpose(1, 2), g3, out=into(2))
        done(2)
        # dS over dP in place: the row's dot product is taken before any of it is written (one buffer, not two)
        ds = torch.bmm(g3, v.transpose(1, 2))
        torch.ops.aten._softmax_backward_data.out(ds, p3, -1, p.dtype, grad_input=ds)
        torch.baddbmm(into(0), ds, k, beta=0.0, alpha=ctx.scale, out=into(0))
        done(0)
        torch.baddbmm(into(1), ds.transpose(1, 2), q, beta=0.0, alpha=ctx.scale, out=into(1))
        done(1)
        dadd = None
        if ctx.add_shape is not None and ctx.needs_input_grad[4]:
            dadd = ds.view(heads, -1, *ctx.add_shape[1:]).sum(1)
            if ctx.add_shape[0] == 1:
                dadd = dadd.sum(0, keepdim=True)
        want = ctx.needs_input_grad
        return None, None, None, None, dadd, *(x if want[5 + i] else None for i, x in enumerate(dsrcs))


def window_kernel(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role] | None, heads: int, d: int,
                  scale: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every window's tokens among themselves: ``(heads, BW, T, d)``.

    Args:
        srcs: One ``(BW, T, 3 * heads * d)`` or three ``(BW, T, heads * d)`` tensors (last dim contiguous) holding
            q, k and v as ``roles`` say (every channel is some head's); a q source with ``BW / G`` entries is
            shared by each group of ``G`` consecutive windows (GC ViT's global queries, one per image).
        roles: Where head ``h`` of q, k and v lies (``roles_of``); None: ``srcs`` is one head-major
            ``(3, heads, BW, T, d)`` tensor, contiguous (``WindowBatch.split_heads``), run with all heads in each
            operation (only where ``heads_batched`` says so).
        heads: Number of heads.
        d: Channels per head (q, k and v alike).
        scale: Score scale.
        add: Additive term of the scaled scores ``(heads or 1, W', T, T)``, the same for every ``W'``-th window
            (``BW`` a multiple of ``W'``: image-major windows), e.g. a relative-position bias plus a region mask.
            Every query must keep at least one finite entry.

    Returns:
        ``(heads, BW, T, d)``: each head's output, contiguous (the caller interleaves the heads, e.g. in the same
        copy that puts the windows back in place).
    """
    trains = torch.is_grad_enabled() and any(x.requires_grad for x in (*srcs, add) if x is not None)
    if roles is None:  # already head-major
        return (_WindowAttentionHeads.apply(None, heads, d, scale, add, *srcs) if trains
                else _heads_forward(srcs[0], add, scale)[0])
    bw = srcs[-1].shape[0]
    # a shared q source is repeated per window (one copy; its gradient is summed back over the windows)
    srcs = tuple(x if x.shape[0] == bw else
                 x[:, None].expand(x.shape[0], bw // x.shape[0], *x.shape[1:]).reshape(bw, *x.shape[1:])
                 for x in srcs)
    if heads_batched(bw, srcs[-1].shape[1], heads, srcs[-1].element_size()):
        if trains:
            return _WindowAttentionHeads.apply(roles, heads, d, scale, add, *srcs)
        return _heads_forward(_head_major(srcs, roles, heads, d), add, scale)[0]
    if trains:
        return _WindowAttention.apply(roles, heads, d, scale, add, *srcs)
    return _forward(srcs, roles, heads, d, add, scale, keep=False)[0]
