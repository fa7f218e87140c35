"""Lightning Attention-2 kernels in plain torch: causal linear attention with a per-head decay, blocked.

Papers: Qin et al., "TransNormerLLM" (Lightning Attention-1, 2023); "Lightning Attention-2" (2024). Official code:
OpenNLPLab/lightning-attention -- ``lightning_attn/ops/torch/linear_attention.py`` (the O(N^2) reference),
``lightning_attn/ops/triton/lightning_attn2.py`` (the blocked kernel), ``lightning_attn/utils/utils.py`` (slopes).

Per head, with decay ``lambda = exp(-s)`` (``s >= 0`` a fixed per-head rate), no softmax, no scale::

    o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j        i.e.  O = ((Q K^T) * M) V,  M_ij = lambda^(i-j), j <= i

``lightning_attention`` evaluates it in blocks of ``block_size`` tokens: the intra-block part as a masked left
product, the inter-block part through one ``[d, e]`` state per head (fp32, fp64 for fp64 inputs), so time is
linear in N. The state is the recurrent ``S_i = lambda S_{i-1} + k_i^T v_i`` after the last token seen (the
kernel's ``KV`` is ``lambda * S``), so ``lightning_decode_step`` and a layer's cache continue it, and a sequence can
be processed in chunks of any length. Unlike the Triton kernel, the state is scanned over blocks in a loop of one
multiply-add per block, a last partial block is its own block (the kernel pads), and fp16/bf16 inputs are
computed in fp32 and cast back.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_int_range, check_positive_int


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``(H,)`` (float32): ``2^(-8h/H)``, ``h = 1..H`` for ``H`` a power of 2; otherwise those of the
    nearest lower power of 2 followed by every other slope of the next power of 2 (the ALiBi rule).

    Args:
        num_heads: Number of heads (>= 1).

    Returns:
        A float32 tensor ``(num_heads,)``.

    Raises:
        TypeError: If ``num_heads`` is not an int.
        ValueError: If ``num_heads < 1``.

    Examples:
        >>> from nearfar.functional import alibi_slopes
        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    n = check_positive_int(num_heads, "num_heads")

    def pow2(m: int) -> list[float]:
        return [2.0 ** (-8.0 * h / m) for h in range(1, m + 1)]

    low = 2 ** int(math.floor(math.log2(n)))
    slopes = pow2(low) + pow2(2 * low)[0::2][: n - low]
    return torch.tensor(slopes, dtype=torch.float32)


def tnl_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 12) -> torch.Tensor:
    """TNL's decay rates ``(H, 1, 1)`` for layer ``layer_idx`` of ``num_layers``: ALiBi slopes scaled by
    ``1 - layer_idx / (num_layers - 1) + 1e-5`` (deeper layers decay less; 1 + 1e-5 for a single layer).

    Args:
        num_heads: Number of heads (>= 1).
        layer_idx: This layer's index, ``0 <= layer_idx < num_layers``.
        num_layers: Number of layers.

    Returns:
        A float32 tensor ``(num_heads, 1, 1)``.

    Raises:
        ValueError: If ``layer_idx`` or ``num_layers`` is out of range.

    Examples:
        >>> from nearfar.functional import tnl_slopes
        >>> tnl_slopes(8, layer_idx=0, num_layers=12).shape
        torch.Size([8, 1, 1])
    """
    num_layers = check_positive_int(num_layers, "num_layers")
    check_int_range(layer_idx, "layer_idx", 0, num_layers - 1)
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return (alibi_slopes(num_heads) * (1 - depth + 1e-5)).reshape(-1, 1, 1)


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor [B, H, N, d], got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)  # checked above
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, e] with B, H, N of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")


def _rates(s: torch.Tensor | float | None, heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``s`` (None, a number, ``[H]`` or ``[H, 1, 1]``) as ``[H, 1, 1]`` in the compute dtype."""
    if s is None:
        return torch.zeros(heads, 1, 1, dtype=dtype, device=device)
    if not isinstance(s, torch.Tensor):
        s = torch.tensor(float(s))
    if s.dim() == 0:
        s = s.expand(heads)
    if s.numel() != heads or s.shape not in ((heads,), (heads, 1, 1)):
        raise ValueError(f"s must be None, a number, [H] or [H, 1, 1] with H = {heads}, got {tuple(s.shape)}")
    if not torch.compiler.is_compiling() and not bool((s >= 0).all() & torch.isfinite(s).all()):
        raise ValueError("s must be finite and >= 0 (decay lambda = exp(-s) in (0, 1])")
    return s.to(device=device, dtype=dtype).reshape(heads, 1, 1)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the lightning kernels accumulate in for inputs like ``t``: float64 for float64, else float32.

    Args:
        t: An input tensor.

    Returns:
        ``torch.float64`` or ``torch.float32``.

    Examples:
        >>> import torch
        >>> from nearfar.functional import compute_dtype
        >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16))
        torch.float32
    """
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, state: torch.Tensor,
            b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning-2 on ``T`` whole blocks of ``b`` tokens (``N = T b``), from recurrent state ``state`` [B,H,d,e]."""
    bs, h, n, d = q.shape
    e = v.shape[-1]
    t = n // b
    q, k, v = q.reshape(bs, h, t, b, d), k.reshape(bs, h, t, b, d), v.reshape(bs, h, t, b, e)
    idx = torch.arange(b, device=q.device, dtype=q.dtype)
    rate = s.reshape(h, 1, 1, 1)  # broadcasts over (T, b, .)
    diff = idx[:, None] - idx[None, :]
    # clamp before exp: the masked (j > i) entries would overflow for large s before being zeroed
    intra_decay = torch.exp(-rate * diff.clamp(min=0)).masked_fill(diff < 0, 0.0)  # [H, 1, b, b]
    out = ((q @ k.transpose(-1, -2)) * intra_decay) @ v
    # each block's keys decayed to the block's last position, then a sequential scan of the per-block states
    contrib = (k * torch.exp(-rate * (b - 1 - idx)[:, None])).transpose(-1, -2) @ v  # [B, H, T, d, e]
    block_decay = torch.exp(-s * b)  # [H, 1, 1]
    before = []
    for i in range(t):
        before.append(state)
        state = block_decay * state + contrib[:, :, i]
    prev = torch.stack(before, 2)  # state after the previous block, for each block
    out = out + (q * torch.exp(-rate * (idx + 1)[:, None])) @ prev
    return out.reshape(bs, h, n, e), state


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float | None = None,
                        block_size: int = 64, initial_state: torch.Tensor | None = None,
                        return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lightning Attention-2: ``o_i = sum_{j<=i} exp(-s)^(i-j) (q_i . k_j) v_j``, blocked, linear in N.

    q, k ``[B, H, N, d]``, v ``[B, H, N, e]``, ``s`` ``[H]``/``[H, 1, 1]`` (None or 0: no decay, plain causal linear
    attention). ``initial_state`` ``[B, H, d, e]``: the recurrent state of earlier tokens (as
    ``lightning_decode_step``'s). Returns ``o`` ``[B, H, N, e]`` in v's dtype, and with ``return_state`` also the
    state after the last token (fp32, fp64 for fp64 inputs). No softmax, hence plain torch (not ``nearfar.attend``).

    Args:
        q: Queries ``[B, H, N, d]``.
        k: Keys ``[B, H, N, d]``.
        v: Values ``[B, H, N, e]``.
        s: Decay rates ``[H]`` or ``[H, 1, 1]`` (e.g. ``tnl_slopes``), a float, or None/0 for no decay.
        block_size: Block length of the blocked algorithm (>= 1).
        initial_state: Optional state ``[B, H, d, e]`` of earlier tokens.
        return_state: Also return the state after the last token.

    Returns:
        ``o`` ``[B, H, N, e]``, or ``(o, state)`` with ``return_state``.

    Raises:
        TypeError: If q, k, v are not tensors of one floating dtype.
        ValueError: If shapes, ``block_size`` or ``initial_state`` do not fit.

    Examples:
        >>> import torch
        >>> from nearfar.functional import lightning_attention, linear_attention_reference, tnl_slopes
        >>> q, k, v = (torch.randn(1, 2, 100, 8, dtype=torch.float64) for _ in range(3))
        >>> s = tnl_slopes(2).double()
        >>> torch.allclose(lightning_attention(q, k, v, s, block_size=16), linear_attention_reference(q, k, v, s))
        True
    """
    _check_qkv(q, k, v)
    b = check_positive_int(block_size, "block_size")
    bs, h, _, d = q.shape
    ct = compute_dtype(v)
    if initial_state is not None and tuple(initial_state.shape) != (bs, h, d, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, d, e] = {(bs, h, d, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    out, state = lightning_blocked(q, k, v, _rates(s, h, ct, q.device), b, initial_state)
    return (out, state) if return_state else out


def lightning_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: torch.Tensor, b: int,
               state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lightning_attention`` on checked inputs, ``rate`` [H, 1, 1] in the compute dtype.

    Args:
        q: Queries ``[B, H, N, d]``.
        k: Keys ``[B, H, N, d]``.
        v: Values ``[B, H, N, e]``.
        rate: Decay rates ``[H, 1, 1]`` in the compute dtype.
        b: Block length.
        state: State ``[B, H, d, e]`` of earlier tokens, or None for zeros.

    Returns:
        ``(o, state)``: ``o`` ``[B, H, N, e]`` in v's dtype and the state after the last token.

    Examples:
        >>> import torch
        >>> from nearfar.functional import lightning_blocked
        >>> q = k = v = torch.randn(1, 2, 10, 4)
        >>> o, state = lightning_blocked(q, k, v, torch.zeros(2, 1, 1), 4, None)
        >>> o.shape, state.shape
        (torch.Size([1, 2, 10, 4]), torch.Size([1, 2, 4, 4]))
    """
    bs, h, n, d = q.shape
    ct, out_dtype = compute_dtype(v), v.dtype
    state = q.new_zeros(bs, h, d, v.shape[-1], dtype=ct) if state is None else state.to(ct)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    whole = (n // b) * b
    outs = []
    if whole:
        o, state = _blocks(q[:, :, :whole], k[:, :, :whole], v[:, :, :whole], rate, state, b)
        outs.append(o)
    if n > whole:  # the last partial block, as a block of its own length
        o, state = _blocks(q[:, :, whole:], k[:, :, whole:], v[:, :, whole:], rate, state, n - whole)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).to(out_dtype), state


def lightning_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float | None,
                          state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: ``S = exp(-s) S + k^T v``, ``o = q S`` (the token itself counts with weight 1).

    q, k ``[B, H, 1, d]``, v ``[B, H, 1, e]``, ``state`` ``[B, H, d, e]`` (None: zeros). Returns ``(o, new_state)``.

    Args:
        q: The new token's query ``[B, H, 1, d]``.
        k: Its key ``[B, H, 1, d]``.
        v: Its value ``[B, H, 1, e]``.
        s: Decay rates as in ``lightning_attention`` (None: no decay).
        state: The state ``[B, H, d, e]`` of earlier tokens, or None for zeros.

    Returns:
        ``(o, new_state)``: ``o`` ``[B, H, 1, e]`` in v's dtype.

    Raises:
        ValueError: If more than one token is given or ``state`` has the wrong shape.

    Examples:
        >>> import torch
        >>> from nearfar.functional import lightning_attention, lightning_decode_step
        >>> q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
        >>> state = None
        >>> for t in range(5):
        ...     o, state = lightning_decode_step(q[:, :, t:t+1], k[:, :, t:t+1], v[:, :, t:t+1], 0.1, state)
        >>> torch.allclose(o, lightning_attention(q, k, v, 0.1)[:, :, -1:])
        True
    """
    _check_qkv(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"lightning_decode_step takes one token (N = 1), got N = {q.shape[2]}")
    bs, h, _, d = q.shape
    ct = compute_dtype(v)
    rate = _rates(s, h, ct, q.device)
    if state is None:
        state = q.new_zeros(bs, h, d, v.shape[-1], dtype=ct)
    elif tuple(state.shape) != (bs, h, d, v.shape[-1]):
        raise ValueError(f"state must be [B, H, d, e] = {(bs, h, d, v.shape[-1])}, got {tuple(state.shape)}")
    state = torch.exp(-rate) * state.to(ct) + k.to(ct).transpose(-1, -2) @ v.to(ct)
    return (q.to(ct) @ state).to(v.dtype), state


def linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               s: torch.Tensor | float | None = None) -> torch.Tensor:
    """The O(N^2) left product ``((Q K^T) * M) V``, ``M_ij = exp(-s)^(i-j)`` for ``j <= i`` (else 0), in q's dtype
    (as the official ``linear_attn`` reference; pass float64 for an oracle).

    Args:
        q: Queries ``[B, H, N, d]``.
        k: Keys ``[B, H, N, d]``.
        v: Values ``[B, H, N, e]``.
        s: Decay rates as in ``lightning_attention`` (None: no decay).

    Returns:
        ``[B, H, N, e]`` in q's dtype.

    Examples:
        >>> import torch
        >>> from nearfar.functional import linear_attention_reference
        >>> q = k = v = torch.ones(1, 1, 3, 1)
        >>> linear_attention_reference(q, k, v).flatten().tolist()   # causal sums of q.k v
        [1.0, 2.0, 3.0]
    """
    _check_qkv(q, k, v)
    n = q.shape[2]
    rate = _rates(s, q.shape[1], q.dtype, q.device)
    pos = torch.arange(n, device=q.device, dtype=q.dtype)
    diff = pos[:, None] - pos[None, :]
    mask = torch.exp(-rate * diff.clamp(min=0)).masked_fill(diff < 0, 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v
