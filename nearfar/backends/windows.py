"""Window kernel: softmax attention inside windows that are already a batch, read in place from the projections.

The official window codes (Swin, MaxViT, GC ViT, HiDiffusion, PT-DiT, CRAFT) project the partitioned input to
``(B*nW, T, 3C)`` and then reorder it into ``(3, B*nW, heads, T, d)`` for batched attention: one copy of q, k and
v forward, and backward a zero-filled ``(3, ...)`` gradient per slice taken (``qkv[0]``, ``qkv[1]``, ``qkv[2]``),
summed and copied back. Here every head of q, k and v is a strided ``(B*nW, T, d)`` view of the projection output
(a batched GEMM reads it as it lies); per head, the scores are one ``baddbmm`` into a buffer that holds the bias
(and region mask) already, so scaling and the bias add cost no extra pass, the softmax writes the probabilities
(out of place: an aliased softmax is ~1.3-1.5x slower on CPU) and ``p @ v`` a contiguous per-head output; the heads
are interleaved in the same copy that puts the windows back in place (``WindowBatch``). The backward pass writes
the gradients of q, k and v straight into one buffer laid out as the projection output, which the projection's
backward reads as is. The probabilities are kept for the backward pass (``heads * B*nW * T * T`` floats, as the
matmul + softmax path keeps them).

CPU, float32/float64 only (``takes`` says when: small windows always; larger ones, up to ``MAX_TOKENS`` tokens, for
training with a bias and wherever a region mask is, which SDPA could only take materialised per window). The
scores are computed in chunks of about ``CHUNK_BYTES``, which stay in the L2 cache between the GEMM that writes them
and the softmax and the GEMM that read them.
"""

from __future__ import annotations

import torch

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


#: bytes of one chunk's scores: the scores, probabilities and their gradients of a chunk of windows stay in the
#: L2 cache between the GEMM that writes them and the softmax and GEMM that read them (measured 2026-12-06, 1 thread,
#: against whole-batch buffers: 1.2-1.3x faster forward and forward+backward at 98 tokens and 1 head of 48,
#: 1.05-1.1x at 49 tokens and 3 heads of 32; 256 KiB chunks were slower, 512 KiB-2 MiB alike)
CHUNK_BYTES = 1 << 20


def _chunk(bw: int, t: int, period: int, group: int, itemsize: int) -> int:
    """Windows per chunk: about ``CHUNK_BYTES`` of scores, a multiple or a divisor of the bias period, and a divisor
    of the group of windows that share a source (GC ViT's per-image queries), so that a chunk lies in one group."""
    c = min(bw, max(1, CHUNK_BYTES // (t * t * itemsize)), group if group > 1 else bw)
    while (c % period and period % c) or (group > 1 and group % c):
        c -= 1
    return c


def _fill(buf: torch.Tensor, a: torch.Tensor, w0: int) -> None:
    """Copy the additive term of windows ``w0 ...`` (period ``a.shape[0]``) into the chunk buffer ``buf``."""
    period, n = a.shape[0], buf.shape[0]
    if n >= period:
        buf.view(-1, *a.shape).copy_(a)
    else:
        buf.copy_(a[w0 % period:w0 % period + n])


def _rows(x: torch.Tensor, group: int, w0: int, w1: int) -> torch.Tensor:
    """Windows ``w0:w1`` of a source: a slice, or (a source shared by groups of windows) its group's entry
    broadcast over the chunk (stride 0: the batched GEMM reads it once per window, no copy)."""
    return x[w0:w1] if group == 1 else x[w0 // group].expand(w1 - w0, *x.shape[1:])


def _geometry(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role],
              add_shape: tuple[int, ...] | None) -> tuple[int, int, list[int], int]:
    """``(BW, T, windows per entry of each source, chunk)``: k's source has one entry per window."""
    k0 = srcs[roles[1][0]]
    bw, t = k0.shape[0], k0.shape[1]
    groups = [bw // x.shape[0] for x in srcs]
    c = _chunk(bw, t, 1 if add_shape is None else add_shape[1], max(groups), k0.element_size())
    return bw, t, groups, c


def _forward(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int,
             add: torch.Tensor | None, scale: float, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output ``(heads, BW, T, d)`` and, with ``keep``, the probabilities ``(heads, BW, T, T)``."""
    bw, t, groups, c = _geometry(srcs, roles, None if add is None else tuple(add.shape))
    gq, gk, gv = (groups[r[0]] for r in roles)
    opts = dict(dtype=srcs[0].dtype, device=srcs[0].device)
    s = torch.empty(c, t, t, **opts)
    p = torch.empty(heads, bw, t, t, **opts) if keep else torch.empty(c, t, t, **opts)
    o = torch.empty(heads, bw, t, d, **opts)
    for h in range(heads):
        q, k, v = (_head(srcs, r, h, d) for r in roles)
        a = None if add is None else add[h if add.shape[0] > 1 else 0]
        for w0 in range(0, bw, c):
            w1 = min(w0 + c, bw)
            sc, qc, kt = s[:w1 - w0], _rows(q, gq, w0, w1), _rows(k, gk, w0, w1).transpose(1, 2)
            if a is not None:  # the bias fills the buffer; the GEMM adds the scaled scores to it
                _fill(sc, a, w0)
                torch.baddbmm(sc, qc, kt, beta=1.0, alpha=scale, out=sc)
            else:
                torch.baddbmm(sc, qc, kt, beta=0.0, alpha=scale, out=sc)
            pc = p[h, w0:w1] if keep else p[:w1 - w0]
            torch.softmax(sc, -1, out=pc)  # not in place: an aliased softmax is ~1.3-1.5x slower on CPU
            torch.bmm(pc, _rows(v, gv, w0, w1), out=o[h, w0:w1])
    return o, p if keep else None


def _put(dst: torch.Tensor | None, group: int, w0: int, w1: int, val: torch.Tensor) -> None:
    """Write a chunk's gradient into its source's buffer (a source shared by a group of windows sums them)."""
    if dst is None:
        return
    if group == 1:
        dst[w0:w1].copy_(val)
    else:
        dst[w0 // group].add_(val.sum(0))


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, roles, heads, d, scale, add, *srcs):  # type: ignore[override]
        out, p = _forward(srcs, roles, heads, d, add, scale, keep=True)
        ctx.save_for_backward(p, *srcs)
        ctx.roles, ctx.heads, ctx.d, ctx.scale = roles, heads, d, scale
        ctx.add_shape = None if add is None else tuple(add.shape)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        p, *srcs = ctx.saved_tensors
        roles, heads, d, scale = ctx.roles, ctx.heads, ctx.d, ctx.scale
        g = g.contiguous()
        bw, t, groups, c = _geometry(tuple(srcs), roles, ctx.add_shape)
        gq, gk, gv = (groups[r[0]] for r in roles)
        want = ctx.needs_input_grad
        # the gradients go straight into buffers laid out as the sources (every channel is some head's); a shared
        # source accumulates over its windows
        dsrcs = [None if not want[5 + i] else torch.empty_like(x) if groups[i] == 1 else torch.zeros_like(x)
                 for i, x in enumerate(srcs)]
        dadd = None
        if ctx.add_shape is not None and want[4]:
            dadd = torch.zeros(ctx.add_shape, dtype=p.dtype, device=p.device)
        period = 1 if ctx.add_shape is None else ctx.add_shape[1]
        dp = torch.empty(c, t, t, dtype=p.dtype, device=p.device)
        ds = torch.empty(c, t, t, dtype=p.dtype, device=p.device)
        tmp = torch.empty(c, t, d, dtype=p.dtype, device=p.device)
        for h in range(heads):
            q, k, v = (_head(tuple(srcs), r, h, d) for r in roles)
            dq, dk, dv = (None if dsrcs[r[0]] is None else _head(tuple(dsrcs), r, h, d) for r in roles)
            gh = g[h]
            da = None if dadd is None else dadd[h if dadd.shape[0] > 1 else 0]
            for w0 in range(0, bw, c):
                w1 = min(w0 + c, bw)
                n, ph, gc = w1 - w0, p[h, w0:w1], gh[w0:w1]
                tc, dpc, dsc = tmp[:n], dp[:n], ds[:n]
                if dv is not None:
                    _put(dv, gv, w0, w1, torch.bmm(ph.transpose(1, 2), gc, out=tc))
                torch.bmm(gc, _rows(v, gv, w0, w1).transpose(1, 2), out=dpc)
                torch.ops.aten._softmax_backward_data.out(dpc, ph, -1, ph.dtype, grad_input=dsc)
                if da is not None:
                    if n >= period:
                        da += dsc.view(-1, *da.shape).sum(0)
                    else:
                        da[w0 % period:w0 % period + n] += dsc
                if dq is not None:
                    _put(dq, gq, w0, w1, torch.baddbmm(tc, dsc, _rows(k, gk, w0, w1), beta=0.0, alpha=scale, out=tc))
                if dk is not None:
                    qc = _rows(q, gq, w0, w1)
                    _put(dk, gk, w0, w1, torch.baddbmm(tc, dsc.transpose(1, 2), qc, beta=0.0, alpha=scale, out=tc))
        return None, None, None, None, dadd, *dsrcs


def window_kernel(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int,
                  scale: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every window's tokens among themselves: ``(heads, BW, T, d)``.

    Args:
        srcs: One or three ``(BW, T, channels)`` tensors (last dim contiguous) holding q, k and v as ``roles`` say;
            a source with ``BW / G`` entries is shared by each group of ``G`` consecutive windows (GC ViT's global
            queries, one per image); k's source has one entry per window.
        roles: Where head ``h`` of q, k and v lies (``roles_of``).
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
    k0 = srcs[roles[1][0]]
    bw, t = k0.shape[0], k0.shape[1]
    free = _chunk(bw, t, 1 if add is None else add.shape[1], 1, k0.element_size())
    # a source shared by fewer windows than a chunk holds would cut the chunks short: repeat it per window (cheap)
    srcs = tuple(x if x.shape[0] == bw or bw // x.shape[0] >= free else
                 x[:, None].expand(x.shape[0], bw // x.shape[0], *x.shape[1:]).reshape(bw, *x.shape[1:])
                 for x in srcs)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*srcs, add) if x is not None):
        return _WindowAttention.apply(roles, heads, d, scale, add, *srcs)
    return _forward(srcs, roles, heads, d, add, scale, keep=False)[0]
