"""Window kernel: softmax attention inside windows that are already a batch, read in place from the projections.

The official window codes (Swin, MaxViT, GC ViT, HiDiffusion, PT-DiT, CRAFT) project the partitioned input to
``(B*nW, T, 3C)`` and then reorder it into ``(3, B*nW, heads, T, d)`` for batched attention: one copy of q, k and
v forward, and backward a zero-filled ``(3, ...)`` gradient per slice taken (``qkv[0]``, ``qkv[1]``, ``qkv[2]``),
summed and copied back. Here every head of q, k and v is a strided ``(B*nW, T, d)`` view of the projection output
(a batched GEMM reads it as it lies); per head, the scores are one ``baddbmm`` into a buffer that holds the bias
(and region mask) already, so scaling and the bias add cost no extra pass, the softmax runs in place and ``p @ v``
writes a contiguous per-head output; the heads are interleaved back with one copy. The backward pass writes the
gradients of q, k and v straight into one buffer laid out as the projection output, which the projection's
backward reads as is. The softmax probabilities are kept for the backward pass (``heads * B*nW * T * T`` floats,
as the matmul + softmax path keeps them).

CPU, float32/float64 only; a window of up to ``MAX_TOKENS`` tokens (above it the fused SDPA kernel, which never
materialises the scores, is faster: measured in ``tests/bench``-free micro-runs, see ``MAX_TOKENS``).
"""

from __future__ import annotations

import torch

#: a role's place in the sources: (source index, channel of head 0, channel step per head)
Role = tuple[int, int, int]

#: largest window (tokens) this kernel takes on CPU; larger windows go to SDPA's fused kernel
MAX_TOKENS = 256


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


def _forward(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int,
             add: torch.Tensor | None, scale: float, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(BW, T, heads*d)`` and the probabilities ``(heads, BW, T, T)`` (one head's buffer if not ``keep``)."""
    q0 = srcs[roles[0][0]]
    bw, t = q0.shape[0], q0.shape[1]
    s = torch.empty(heads if keep else 1, bw, t, t, dtype=q0.dtype, device=q0.device)
    o = torch.empty(heads, bw, t, d, dtype=q0.dtype, device=q0.device)
    for h in range(heads):
        q, k, v = (_head(srcs, r, h, d) for r in roles)
        sh = s[h if keep else 0]
        if add is not None:  # the bias fills the buffer; the GEMM adds the scaled scores to it
            sh.view(-1, *add.shape[1:]).copy_(add[h if add.shape[0] > 1 else 0])
            torch.baddbmm(sh, q, k.transpose(1, 2), beta=1.0, alpha=scale, out=sh)
        else:
            torch.baddbmm(sh, q, k.transpose(1, 2), beta=0.0, alpha=scale, out=sh)
        torch.softmax(sh, -1, out=sh)
        torch.bmm(sh, v, out=o[h])
    return o.permute(1, 2, 0, 3).reshape(bw, t, heads * d), s


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, roles, heads, d, scale, add, *srcs):  # type: ignore[override]
        out, p = _forward(srcs, roles, heads, d, add, scale, keep=True)
        ctx.save_for_backward(p, *srcs)
        ctx.roles, ctx.heads, ctx.d, ctx.scale = roles, heads, d, scale
        ctx.add_shape = None if add is None else add.shape
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        p, *srcs = ctx.saved_tensors
        roles, heads, d, scale = ctx.roles, ctx.heads, ctx.d, ctx.scale
        g = g.contiguous()
        bw, t = p.shape[1], p.shape[2]
        want = ctx.needs_input_grad
        # the gradients go straight into buffers laid out as the sources (every channel is some head's)
        dsrcs = [torch.empty_like(s) if want[5 + i] else None for i, s in enumerate(srcs)]
        dadd = None
        if ctx.add_shape is not None and want[4]:
            dadd = torch.zeros(ctx.add_shape, dtype=p.dtype, device=p.device)
        dp = torch.empty(bw, t, t, dtype=p.dtype, device=p.device)
        tmp = torch.empty(bw, t, d, dtype=p.dtype, device=p.device)
        for h in range(heads):
            q, k, v = (_head(tuple(srcs), r, h, d) for r in roles)
            gh, ph = g[..., h * d:(h + 1) * d], p[h]
            dq, dk, dv = (None if dsrcs[r[0]] is None else _head(tuple(dsrcs), r, h, d) for r in roles)
            if dv is not None:
                dv.copy_(torch.bmm(ph.transpose(1, 2), gh, out=tmp))
            torch.bmm(gh, v.transpose(1, 2), out=dp)
            ds = torch._softmax_backward_data(dp, ph, -1, ph.dtype)
            if dadd is not None:
                dadd[h if dadd.shape[0] > 1 else 0] += ds.view(-1, *dadd.shape[1:]).sum(0)
            if dq is not None:
                dq.copy_(torch.baddbmm(tmp, ds, k, beta=0.0, alpha=scale, out=tmp))
            if dk is not None:
                dk.copy_(torch.baddbmm(tmp, ds.transpose(1, 2), q, beta=0.0, alpha=scale, out=tmp))
        return None, None, None, None, dadd, *dsrcs


def window_kernel(srcs: tuple[torch.Tensor, ...], roles: tuple[Role, Role, Role], heads: int, d: int,
                  scale: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every window's tokens among themselves: ``(BW, T, heads*d)``.

    Args:
        srcs: One or three ``(BW, T, channels)`` tensors (last dim contiguous) holding q, k and v as ``roles`` say.
        roles: Where head ``h`` of q, k and v lies (``roles_of``).
        heads: Number of heads.
        d: Channels per head (q, k and v alike).
        scale: Score scale.
        add: Additive term of the scaled scores ``(heads or 1, W', T, T)``, the same for every ``W'``-th window
            (``BW`` a multiple of ``W'``: image-major windows), e.g. a relative-position bias plus a region mask.
            Every query must keep at least one finite entry.

    Returns:
        ``(BW, T, heads*d)``, heads in order.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*srcs, add) if x is not None):
        return _WindowAttention.apply(roles, heads, d, scale, add, *srcs)
    return _forward(srcs, roles, heads, d, add, scale, keep=False)[0]
