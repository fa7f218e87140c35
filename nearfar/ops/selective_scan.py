"""The selective scan (S6) of Mamba in plain torch: chunked, no loop over tokens, with its own backward.

Papers: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv 2312.00752, 2023);
Liu et al., "VMamba: Visual State Space Model" (NeurIPS 2024). Official code: state-spaces/mamba
``mamba_ssm/ops/selective_scan_interface.py::selective_scan_ref`` (the float reference, a loop over tokens) and
the CUDA kernel ``selective_scan_fwd_kernel.cuh``; VMamba / LaMamba-Diff ship the same reference in
``kernels/selective_scan/test_selective_scan.py::selective_scan_ref``. The interface here is theirs::

    delta = softplus(delta + delta_bias)                      (each optional)
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[g(d), n] u_t[d],   h_{-1} = 0
    y_t[d] = sum_n C_t[g(d), n] h_t[d, n] + D[d] u_t[d]

with ``u, delta (batch, channels, L)``, ``A (channels, N)``, ``B, C (batch, G, N, L)`` shared by the
``channels / G`` consecutive channels of a group (or ``(batch, N, L)``: one group), ``D, delta_bias (channels,)``.

How it is computed (our choice; the CUDA kernel is a sequential scan per thread plus a block-parallel scan):
the sequence is cut into chunks of ``chunk_size`` tokens and the chunks are visited in a Python loop (one
iteration per chunk, never per token); inside a chunk the recurrence is evaluated at once with the closed form
``h_t = sum_{s<=t} exp(A (S_t - S_s)) delta_s B_s u_s + exp(A S_t) h_in`` (``S`` the chunk-local cumulative sum of
``delta``) as a cumulative sum of inputs weighted by ``exp(R - A S_s)`` and rescaled by ``exp(A S_t - R)``, where
the reference exponent ``R`` is half the chunk's total log-decay, so that every factor stays within
``exp(+-range / 2)``. A chunk whose exponent range ``max|A| * sum|delta|`` would leave the floating-point range
(more than 80 in float32, 900 in float64) is not computed that way: the chunk size is halved for the whole call
until every chunk fits (down to 1 token a chunk, the plain recurrence), which costs one host synchronisation per
call. The backward is written out (the adjoint scan ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` runs the same
way from the last chunk), recomputing each chunk's states from the carried state saved at its start, so memory
is ``O(batch * channels * (L + N * L / chunk_size))`` plus one chunk's ``(chunk, N)`` states. Inputs are computed
in float32 (float64 stays float64) and the output has ``u``'s dtype. Where it differs from the reference: the
order of floating-point operations only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..checks import check_positive_int, check_tensor

#: largest exponent range ``max|A| * sum|delta|`` of a chunk per compute dtype (factors stay within exp(+-0.75 x))
RANGE = {torch.float32: 80.0, torch.float64: 900.0}


def _pick_chunk(delta: torch.Tensor, A: torch.Tensor, chunk: int) -> int:
    """The largest ``chunk / 2^k`` whose every chunk has an exponent range within ``RANGE`` (1 always works); on the
    meta device (shapes only: no values to read) ``chunk`` itself."""
    if delta.device.type == "meta":
        return chunk
    with torch.no_grad():
        bound = RANGE[delta.dtype]
        amax = A.abs().amax(-1)[:, None]  # (channels, 1)
        cs = F.pad(delta.abs().cumsum(-1), (1, 0))  # (batch, channels, L + 1)
        length = delta.shape[-1]
        while chunk > 1:
            ends = torch.arange(chunk, length + chunk, chunk, device=delta.device).clamp(max=length)
            spread = (cs[..., ends] - cs[..., ends - chunk]) * amax
            if bool(spread.amax() <= bound):
                break
            chunk //= 2
        return max(chunk, 1)


def _chunk_states(d, uu, A, Bc, H):
    """States of one chunk, token-major: ``d, uu (b, G, T, Dg)``, ``A (1, G, 1, Dg, N)``, ``Bc (b, G, T, 1, N)``,
    entering state ``H (b, G, Dg, N)``. Returns ``h (b, G, T, Dg, N)``, the weights ``w = exp(R - A S)`` (``S``
    the local cumulative sum of ``d``, ``R = A S_last / 2``) and ``S``."""
    S = d.cumsum(2)
    ref = S[:, :, -1:] * (0.5 if d.shape[2] > 1 else 1.0)
    w = ((ref - S)[..., None] * A).exp_()
    h = ((d * uu)[..., None] * w).mul_(Bc).cumsum_(2)
    h += (ref[..., None] * A).exp_() * H[:, :, None]
    h /= w
    return h, w, S


def _tokens_major(t: torch.Tensor, sl: slice) -> torch.Tensor:
    return t[..., sl].transpose(2, 3)  # (b, G, X, L) -> (b, G, T, X)


class _Scan(torch.autograd.Function):
    """``y = sum_n C h`` of the recurrence above (no ``D``, ``delta`` already softplus-ed), chunked."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk: int) -> torch.Tensor:
        # u, delta (b, G, Dg, L); A (G, Dg, N); B, C (b, G, N, L)
        A5 = A[None, :, None]
        H = u.new_zeros(*u.shape[:3], A.shape[-1])
        ys, starts = [], []
        for t0 in range(0, u.shape[-1], chunk):
            sl = slice(t0, t0 + chunk)
            starts.append(H)
            h, _, _ = _chunk_states(_tokens_major(delta, sl), _tokens_major(u, sl), A5,
                                       _tokens_major(B, sl)[:, :, :, None], H)
            ys.append((h @ _tokens_major(C, sl)[..., None]).squeeze(-1))
            H = h[:, :, -1].clone()  # not a view: the chunk's states are freed
        ctx.save_for_backward(u, delta, A, B, C, *starts)
        ctx.chunk = chunk
        return torch.cat(ys, 2).transpose(2, 3)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, *starts = ctx.saved_tensors
        chunk, length, A5 = ctx.chunk, u.shape[-1], A[None, :, None]
        gu, gd = torch.empty_like(u), torch.empty_like(delta)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        G = u.new_zeros(*u.shape[:3], A.shape[-1])  # adjoint carried in from the right: exp(delta A) g of the next
        for i in reversed(range(len(starts))):
            sl = slice(i * chunk, min((i + 1) * chunk, length))
            d, uu, g = _tokens_major(delta, sl), _tokens_major(u, sl), _tokens_major(gy, sl)
            Bc, Cc = _tokens_major(B, sl)[:, :, :, None], _tokens_major(C, sl)[:, :, :, None]
            h, w, S = _chunk_states(d, uu, A5, Bc, starts[i])
            # g_t = sum_{s>=t} exp(A (S_s - S_t)) C_s dy_s + exp(A (S_last - S_t)) G: a reversed cumulative sum
            gh = g[..., None] * Cc
            gh /= w
            gh[:, :, -1] += G / w[:, :, -1]
            gh = gh.flip(2).cumsum_(2).flip(2)
            gh *= w
            G = (S[:, :, 0, :, None] * A5[:, :, 0]).exp_() * gh[:, :, 0]
            gC[..., sl] = (g[:, :, :, None] @ h).squeeze(3).transpose(2, 3)
            du = d * uu
            gB[..., sl] = (du[:, :, :, None] @ gh).squeeze(3).transpose(2, 3)
            gdu = (gh @ Bc.transpose(3, 4)).squeeze(-1)
            # g_t * exp(delta_t A) h_{t-1} (not g_t (h_t - x_t): that cancels when exp(delta_t A) is tiny)
            r = torch.cat([starts[i][:, :, None], h[:, :, :-1]], 2).mul_((d[..., None] * A5).exp_()).mul_(gh)
            gA += torch.einsum("bgtdn,bgtd->gdn", r, d)
            gu[..., sl] = (gdu * d).transpose(2, 3)
            gd[..., sl] = (gdu * uu + r.mul_(A5).sum(-1)).transpose(2, 3)
        return gu, gd, gA, gB, gC, None


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   delta_softplus: bool = False, *, chunk_size: int = 64) -> torch.Tensor:
    """Mamba's selective scan (S6), ``selective_scan_ref``'s interface, chunked and differentiable.

    Args:
        u: Input ``(batch, channels, L)``.
        delta: Step sizes before ``delta_bias`` / softplus, ``(batch, channels, L)``.
        A: State matrix (diagonal) ``(channels, N)``; Mamba uses ``-exp(A_log)``.
        B: Input projection ``(batch, G, N, L)`` (``G`` divides ``channels``: consecutive channel groups) or
            ``(batch, N, L)``.
        C: Output projection, shaped like ``B``.
        D: Optional skip ``(channels,)``: adds ``D u``.
        delta_bias: Optional ``(channels,)`` added to ``delta`` before the softplus.
        delta_softplus: Apply softplus to ``delta`` (Mamba: True).
        chunk_size: Tokens per chunk (>= 1, default 64); halved at run time where a chunk's decay would leave the
            floating-point range. Any value gives the same result up to rounding.

    Returns:
        ``y (batch, channels, L)`` in ``u``'s dtype (computed in float32, float64 for float64 inputs).

    Raises:
        TypeError: A tensor argument is not a floating tensor; ``chunk_size`` is not an int.
        ValueError: A shape does not match the ones above, ``L`` or ``N`` is 0, or ``chunk_size < 1``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import selective_scan
        >>> u, delta = torch.randn(2, 8, 50), torch.randn(2, 8, 50)
        >>> A, B, C = -torch.rand(8, 4), torch.randn(2, 2, 4, 50), torch.randn(2, 2, 4, 50)
        >>> selective_scan(u, delta, A, B, C, D=torch.ones(8), delta_softplus=True).shape
        torch.Size([2, 8, 50])
    """
    check_tensor(u, "u", 3)
    batch, channels, length = u.shape
    check_tensor(delta, "delta", 3)
    check_tensor(A, "A", 2)
    chunk = check_positive_int(chunk_size, "chunk_size")
    if tuple(delta.shape) != tuple(u.shape):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.shape[0] != channels or A.shape[1] < 1 or length < 1:
        raise ValueError(f"A must be (channels={channels}, N >= 1) and L >= 1, got A {tuple(A.shape)}, L={length}")
    n = A.shape[1]
    bc = []
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
            raise ValueError(f"{name} must be a (batch, G, N, L) or (batch, N, L) tensor")
        check_tensor(t, name, t.dim())
        t = t.unsqueeze(1) if t.dim() == 3 else t
        if t.shape[0] != batch or t.shape[2] != n or t.shape[3] != length or channels % t.shape[1]:
            raise ValueError(f"{name} must be (batch={batch}, G dividing {channels}, N={n}, L={length}), "
                             f"got {tuple(t.shape)}")
        bc.append(t)
    if bc[0].shape[1] != bc[1].shape[1]:
        raise ValueError(f"B and C must have the same groups, got {bc[0].shape[1]} and {bc[1].shape[1]}")
    for name, opt in (("D", D), ("delta_bias", delta_bias)):
        if opt is not None and (check_tensor(opt, name, 1).shape[0] != channels):
            raise ValueError(f"{name} must be ({channels},), got {tuple(opt.shape)}")
    dtype = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype) else torch.float32
    groups = bc[0].shape[1]
    uc, dc = u.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        dc = dc + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dc = F.softplus(dc)
    chunk = _pick_chunk(dc.detach(), A.detach().to(dtype), min(chunk, length))
    shape = (batch, groups, channels // groups, length)
    y = _Scan.apply(uc.reshape(shape), dc.reshape(shape), A.to(dtype).reshape(groups, -1, n),
                    bc[0].to(dtype), bc[1].to(dtype), chunk)
    y = y.reshape(batch, channels, length)
    if D is not None:
        y = y + D.to(dtype)[:, None] * uc
    return y.to(u.dtype)
