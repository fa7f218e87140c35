"""Per-chunk attention kernels shared by the block-sparse engines: PyTorch's fused CPU flash-attention operators
(with an additive mask), and a plain matmul + softmax pair for what they cannot do (another device, a bias that
needs its gradient). Both take the merged output and LSE in the backward pass, so a row's keys may be split over
several calls (chunks, or streams whose results are merged by LSE) and each call returns its share of the
gradients."""

from __future__ import annotations

import threading

import torch

_ONE_THREAD = threading.Lock()


def fused_available(device: torch.device) -> bool:
    """Whether PyTorch's fused CPU flash-attention operators (forward and backward, additive mask) exist here."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def index_add(dst: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.index_add_(dim, index, src)``, on CPU with one intra-op thread: PyTorch's CPU ``index_add_`` of rows of
    a few KB ran 10-20x slower with 2 threads than with 1 (torch 2.13; 2 threads 156 ms vs 1 thread 12 ms for
    4,704 rows of 8 KB into 1,176), and the block-sparse backward passes add every gathered key and value gradient
    back this way. The thread count is restored after (a lock keeps concurrent calls from restoring each other's)."""
    threads = torch.get_num_threads()
    if dst.device.type != "cpu" or threads == 1 or torch.compiler.is_compiling():
        return dst.index_add_(dim, index, src)
    with _ONE_THREAD:
        torch.set_num_threads(1)
        try:
            return dst.index_add_(dim, index, src)
        finally:
            torch.set_num_threads(threads)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores, LSEs and masks accumulate in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit last-dim stride: PyTorch's CPU flash-attention operators (forward and backward) silently
    return wrong values for a view whose last dim is strided."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def matmul_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one chunk; a row with no allowed key gets ``out = 0`` and ``lse = -inf``."""
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc_dtype(q.dtype)).mul_(scale).add_(mask)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p.div_(denom.clamp(min=1e-30)).to(v.dtype), v)
    return out, (m + denom.log()).squeeze(-1)


def matmul_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, ds)`` of one chunk from the row's final ``out`` and ``lse`` (``-inf``: a row with no key)."""
    acc = acc_dtype(q.dtype)
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc).mul_(scale).add_(mask)
    lse = torch.where(torch.isinf(lse), float("inf"), lse)
    p = s.sub_(lse[..., None]).exp_()
    dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), do)
    dp = torch.matmul(do, v.transpose(-1, -2)).to(acc)
    delta = (do.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    ds = p.mul_(dp.sub_(delta))
    dsd = ds.to(q.dtype)
    dq = torch.matmul(dsd, k).mul_(scale)
    dk = torch.matmul(dsd.transpose(-1, -2), q).mul_(scale)
    return dq, dk, dv, ds


def fused_mask(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The fused operator takes a float32 mask (float64 for float64 queries)."""
    return mask.to(acc_dtype(q.dtype))


def equal_head_dims(q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """q, k and v zero-padded to one head size for the fused operator, which wants one (the scores and the first
    ``dv`` output channels are unchanged); None when they already agree or the operator is not there."""
    d, dv = q.shape[-1], v.shape[-1]
    if d == dv or not fused_available(q.device):
        return None
    e = max(d, dv)
    pad = torch.nn.functional.pad
    return pad(q, (0, e - d)), pad(k, (0, e - d)), pad(v, (0, e - dv))

