"""Lightning Attention (-1/-2) and the TransNormerLLM (TNL) attention layer: ``(B, N, dim)`` in and out, causal.

Papers: Qin et al., "TransNormerLLM" (Lightning Attention-1, 2023); "Lightning Attention-2" (2024); "Various
Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention" (TNL, 2024). Official code:
OpenNLPLab/lightning-attention -- ``lightning_attn/ops/torch/linear_attention.py`` (the O(N^2) reference),
``lightning_attn/ops/triton/lightning_attn2.py`` (the blocked kernel), ``lightning_attn/utils/utils.py`` (slopes),
``examples/module/tnl_attn.py`` (the layer, ``TnlAttention``).

Per head, with decay ``lambda = exp(-s)`` (``s >= 0`` a fixed per-head rate, not learned), no softmax, no scale::

    o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j        i.e.  O = ((Q K^T) * M) V,  M_ij = lambda^(i-j), j <= i

There is no softmax, so ``nearfar.attend`` does not apply: the functional ops here are plain torch.
``lightning_attention`` is the Lightning-2 evaluation: blocks of ``block_size`` tokens, the intra-block part as a
masked left product, the inter-block part through one ``[d, e]`` state per head (fp32, fp64 for fp64 inputs), so
time is linear in N. Our state is the recurrent ``S_i = lambda S_{i-1} + k_i^T v_i`` after the last token seen (the
kernel's ``KV`` is ``lambda * S``, decayed to the next position); the same state feeds ``lightning_decode_step``
and the layer's decoding cache, so a sequence can be processed in chunks of any length.

Differences from the official code:

- Plain torch (no Triton): the intra-block products run batched over all whole blocks, the state is scanned over
  blocks in a loop of one multiply-add per block; a last partial block is processed as its own block (the kernel
  pads). The kernel's splitting of ``d > 128`` into slices and padding of ``e`` to a power of 2 are not needed.
- fp16/bf16 inputs are computed in fp32 and cast back (the kernel keeps q, k, v in their dtype and only the state
  in fp32).
- ``norm_type`` defaults to ``"srmsnorm"`` (TNL's SRMSNorm ``x * rsqrt(mean(x^2) + 1e-6)``, no parameters, as the
  TNL models use); the example module always builds ``nn.LayerNorm(embed_dim)`` (``norm_type="layernorm"`` here,
  parameters ``norm.weight``/``norm.bias``). Other parameter names equal ``TnlAttention``'s (``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``, ``output_gate.0``, ``output_gate.1``; ``bias=False``; ``slope_rate`` a non-persistent
  buffer), so its weights load unchanged.
- ``num_layers == 1`` (the official formula divides by ``num_layers - 1``) uses the layer-0 factor ``1 + 1e-5``.
- ``decay=False`` (registered as ``linear_attention``) is plain causal linear attention, the kernel's ``s=None``.
  It also has a non-causal form (``causal=False``: ``o = q (K^T V)``) and a cross form (``cross=True``: K, V
  from a ``context``), ours: the official kernel is causal self-attention only.
- ``gate_rank`` (default: the head dim, as the example) sets the rank of the low-rank output gate.
- Decoding cache and ``key_padding_mask`` are ours (the example takes neither). Masked tokens are removed as keys
  (their ``k`` is zeroed, so they enter no output and no state) while positions still count for the decay:
  left padding is therefore exact (a padded sequence's real tokens get the outputs and state of the unpadded
  one), right padding is exact for the outputs (causality), but decoding after right padding would see the pads as
  elapsed time, so prefill right-padded batches per sequence. Rows of masked tokens are computed, not zeroed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..patterns.base import as_positive_int
from .common import check_dim_heads, merge_heads, split_heads
from .registry import Mechanism, register
from .sequence import DecodeState


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes ``(H,)`` (float32): ``2^(-8h/H)``, ``h = 1..H`` for ``H`` a power of 2; otherwise those of the
    nearest lower power of 2 followed by every other slope of the next power of 2 (the ALiBi rule)."""
    n = as_positive_int(num_heads, "num_heads")

    def pow2(m: int) -> list[float]:
        return [2.0 ** (-8.0 * h / m) for h in range(1, m + 1)]

    low = 2 ** int(math.floor(math.log2(n)))
    slopes = pow2(low) + pow2(2 * low)[0::2][: n - low]
    return torch.tensor(slopes, dtype=torch.float32)


def tnl_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 12) -> torch.Tensor:
    """TNL's decay rates ``(H, 1, 1)`` for layer ``layer_idx`` of ``num_layers``: ALiBi slopes scaled by
    ``1 - layer_idx / (num_layers - 1) + 1e-5`` (deeper layers decay less; 1 + 1e-5 for a single layer)."""
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise ValueError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
    num_layers = as_positive_int(num_layers, "num_layers")
    if layer_idx >= num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers - 1] = [0, {num_layers - 1}], got {layer_idx}")
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return (alibi_slopes(num_heads) * (1 - depth + 1e-5)).reshape(-1, 1, 1)


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor [B, H, N, d], got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
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
    """
    _check_qkv(q, k, v)
    b = as_positive_int(block_size, "block_size")
    bs, h, _, d = q.shape
    ct = _compute_dtype(v)
    if initial_state is not None and tuple(initial_state.shape) != (bs, h, d, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, d, e] = {(bs, h, d, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    out, state = _lightning(q, k, v, _rates(s, h, ct, q.device), b, initial_state)
    return (out, state) if return_state else out


def _lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: torch.Tensor, b: int,
               state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``lightning_attention`` on checked inputs, ``rate`` [H, 1, 1] in the compute dtype."""
    bs, h, n, d = q.shape
    ct, out_dtype = _compute_dtype(v), v.dtype
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

    q, k ``[B, H, 1, d]``, v ``[B, H, 1, e]``, ``state`` ``[B, H, d, e]`` (None: zeros). Returns ``(o, new_state)``."""
    _check_qkv(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"lightning_decode_step takes one token (N = 1), got N = {q.shape[2]}")
    bs, h, _, d = q.shape
    ct = _compute_dtype(v)
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
    (as the official ``linear_attn`` reference; pass float64 for an oracle)."""
    _check_qkv(q, k, v)
    n = q.shape[2]
    rate = _rates(s, q.shape[1], q.dtype, q.device)
    pos = torch.arange(n, device=q.device, dtype=q.dtype)
    diff = pos[:, None] - pos[None, :]
    mask = torch.exp(-rate * diff.clamp(min=0)).masked_fill(diff < 0, 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


class LinearAttentionState(DecodeState):
    """A lightning layer's decoding state: ``S`` ``[B, H, d, e]`` (fp32; fp64 for fp64 layers), the recurrent state
    after ``length`` tokens. Its size does not depend on the sequence length. ``dtype`` is that of the inputs
    ``x`` (``S`` may be wider), given or fixed by the first call."""

    def __init__(self, batch: int, shape: tuple[int, int, int], state_dtype: torch.dtype,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.S = torch.zeros(self.batch, *shape, dtype=state_dtype, device=self.device)
        self.device, self.length = self.S.device, 0


def _check_seq(x: object, dim: int, name: str) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim or 0 in x.shape:
        raise ValueError(f"{name} must be (B, N, {dim}) with B, N >= 1, got {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def _srms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class LightningAttention(nn.Module):
    """TNL attention layer ``LightningAttention(dim, num_heads, bias=False, norm_type="srmsnorm", layer_idx=0,
    num_layers=12, decay=True, gate_rank=None, block_size=64)``: x ``(B, N, dim)`` -> ``(B, N, dim)``, causal.

    ``q, k, v = SiLU(x W)``; lightning attention with TNL's per-layer ALiBi decay (``decay=False``: none); merge
    heads; ``norm_type`` ("srmsnorm" or "layernorm"); times ``sigmoid(output_gate(x))`` (low rank ``dim -> gate_rank
    -> dim``); ``o_proj``. ``forward(x, cache=new_cache(B))`` continues a sequence with any number of tokens."""

    def __init__(self, dim: int, num_heads: int, bias: bool = False, norm_type: str = "srmsnorm", layer_idx: int = 0,
                 num_layers: int = 12, decay: bool = True, gate_rank: int | None = None, block_size: int = 64,
                 causal: bool = True, cross: bool = False):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        for name, val in (("bias", bias), ("decay", decay), ("causal", causal), ("cross", cross)):
            if not isinstance(val, bool):
                raise TypeError(f"{name} must be a bool, got {val!r}")
        if decay and (cross or not causal):
            raise ValueError("the decay lambda^(i-j) runs over the past of one sequence: causal=False and cross=True "
                             "need decay=False (LinearAttention)")
        self.causal, self.cross = causal, cross
        if norm_type not in ("srmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'srmsnorm' or 'layernorm', got {norm_type!r}")
        self.dim, self.num_heads, self.norm_type, self.decay = dim, num_heads, norm_type, decay
        self.block_size = as_positive_int(block_size, "block_size")
        self.gate_rank = self.head_dim if gate_rank is None else as_positive_int(gate_rank, "gate_rank")
        slopes = tnl_slopes(num_heads, layer_idx, num_layers)  # validates layer_idx/num_layers even without decay
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.norm = nn.LayerNorm(dim) if norm_type == "layernorm" else None
        self.output_gate = nn.Sequential(nn.Linear(dim, self.gate_rank, bias=bias),
                                         nn.Linear(self.gate_rank, dim, bias=bias))
        self.register_buffer("slope_rate", slopes if decay else None, persistent=False)

    def new_cache(self, batch: int, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> LinearAttentionState:
        """An empty state for ``batch`` sequences: ``S`` zeros ``[B, H, d, d]`` in fp32 (fp64 when ``dtype`` or the
        layer is fp64). A causal cross layer's state is the source's ``K^T V``, set at the first call."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__}(causal=False) is not causal: it has no decoding cache")
        ref = self.q_proj.weight
        ct = torch.float64 if (dtype or ref.dtype) == torch.float64 else torch.float32
        return LinearAttentionState(batch, (self.num_heads, self.head_dim, self.head_dim), ct,
                                    ref.device if device is None else device, dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cache: LinearAttentionState | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        bs, n = _check_seq(x, self.dim, "x")
        cache = LinearAttentionState.checked(cache, x)
        if context is not None and not self.cross:
            raise ValueError("context is for cross-attention layers: build the layer with cross=True")
        source_cached = self.cross and cache is not None and cache.length > 0  # the source's K^T V is set
        if self.cross and not source_cached:
            if context is None:
                raise ValueError(f"a cross layer needs context (B, M, {self.dim}) (on the first call with a cache)")
            if _check_seq(context, self.dim, "context")[0] != bs:
                raise ValueError(f"context must have x's batch {bs}, got {context.shape[0]}")
        src = context if self.cross else x
        if key_padding_mask is not None and not source_cached:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (B, N) (cross: (B, M)), True = keep")
            if tuple(key_padding_mask.shape) != tuple(src.shape[:2]):
                raise ValueError(f"key_padding_mask must have the keys' shape (B, N) (cross: (B, M)) = "
                                 f"{tuple(src.shape[:2])}, got {tuple(key_padding_mask.shape)}")
        q = split_heads(F.silu(self.q_proj(x)), self.num_heads)
        ct = _compute_dtype(q)
        if source_cached:  # causal cross decoding: the source's K^T V was stored at the first call
            out, state = (q.to(ct) @ cache.S).to(q.dtype), cache.S
        else:
            k = split_heads(F.silu(self.k_proj(src)), self.num_heads)
            v = split_heads(F.silu(self.v_proj(src)), self.num_heads)
            if key_padding_mask is not None:
                k = k * key_padding_mask[:, None, :, None].to(k.dtype)
            if self.cross or not self.causal:  # every query sees every key: o = q (K^T V)
                state = k.to(ct).transpose(-1, -2) @ v.to(ct)
                out = (q.to(ct) @ state).to(v.dtype)
            else:
                rate = (v.new_zeros(self.num_heads, 1, 1, dtype=ct) if self.slope_rate is None
                        else self.slope_rate.to(ct))
                out, state = _lightning(q, k, v, rate, self.block_size, None if cache is None else cache.S)
        if cache is not None:
            cache.S, cache.length = state.detach(), cache.length + n
        out = merge_heads(out, (n,))
        out = _srms_norm(out) if self.norm is None else self.norm(out)
        out = out * torch.sigmoid(self.output_gate(x))
        return self.o_proj(out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, norm_type={self.norm_type!r}, decay={self.decay}, "
                f"layer_idx={self.layer_idx}, num_layers={self.num_layers}, gate_rank={self.gate_rank}, "
                f"block_size={self.block_size}")


class LinearAttention(LightningAttention):
    """``LightningAttention`` without decay (``decay=False``): plain linear attention in the TNL layer; causal
    (default) or not (``causal=False``: ``o_i = q_i K^T V`` over every key), self or cross (``cross=True``: keys and
    values from ``context (B, M, dim)``, every query sees the whole source; with ``causal=True`` it decodes with the
    source's ``K^T V`` as its cache)."""

    def __init__(self, dim: int, num_heads: int, **kwargs):
        if "decay" in kwargs:
            raise TypeError("LinearAttention has no decay; use LightningAttention(decay=...)")
        super().__init__(dim, num_heads, decay=False, **kwargs)


_REPO = "OpenNLPLab/lightning-attention"
register(Mechanism(
    name="lightning", paper="Lightning Attention-2 / TransNormerLLM (TNL layer, Qin et al. 2023-2024)", repo=_REPO,
    family="dense", dims=("1d",), patterns={"CS": {}}, why_not={
        "NS": "the decay lambda^(i-j) runs over the past (TNL is a causal LM); linear_attention has the non-causal "
              "form", "NC": "the decay needs positions shared by queries and keys; linear_attention has the cross form",
        "CC": "the decay needs positions shared by queries and keys (as NC)"},
    make=lambda dim, num_heads, **kw: LightningAttention(dim, num_heads, **kw), cls=LightningAttention,
    notes="Linear attention with a fixed per-head decay (TNL's layer-scaled ALiBi slopes), no softmax; blocked "
          "Lightning-2 evaluation, linear in N; O(d^2)-per-head decoding state. SRMSNorm by default (the example "
          "layer uses LayerNorm: norm_type='layernorm')."))
register(Mechanism(
    name="linear_attention", paper="Lightning Attention-2 / TransNormerLLM (no-decay kernel, s=None)", repo=_REPO,
    family="dense", dims=("1d",), why_not={}, patterns={
        "NS": {"causal": False}, "CS": {"causal": True}, "NC": {"causal": False, "cross": True},
        "CC": {"causal": True, "cross": True}},
    make=lambda dim, num_heads, **kw: LinearAttention(dim, num_heads, **kw), cls=LinearAttention,
    notes="The TNL layer with plain causal linear attention (lambda = 1): outputs grow with the sequence length "
          "before the norm."))
