"""Titans: a neural long-term memory updated at test time, and the MAC (Memory as Context) layer.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024); no official code. Reference
code: lucidrains/titans-pytorch (``titans_pytorch/neural_memory.py``, ``memory_models.py``, ``mac_transformer.py``).

Memory (per head, ``d = dim / num_heads``): an MLP ``mlp(k) = W_L(gelu(... gelu(k W_1)))`` without biases (hidden
``expansion * d``, xavier-uniform initial weights, learned in the outer loop; ``depth=1`` is a linear memory),
wrapped as ``M(k) = LayerNorm(mlp(k)) + k`` (the reference's default ``ResidualNorm``, from TTT). For a chunk ``c``
of keys/values ``k_t = normalize(silu(ŷ_t W_K))``, ``v_t = silu(ŷ_t W_V)`` with ``ŷ = RMSNorm(y)``:

    G_c = sum_{t in c} grad_M ||M_*(k_t) - v_t||^2 / d            (surprise, at M_* = M_0 or M_{c-1})
    S_c = eta_c S_{c-1} - theta_c G_c                              (momentum: past + momentary surprise)
    M_c = (1 - alpha_c) M_{c-1} + S_c                              (forgetting / weight decay)

with ``theta_c = max_lr * sigmoid(lin(mean_c ŷ))``, ``eta_c = sigmoid(lin(mean_c ŷ))``,
``alpha_c = sigmoid(lin(mean_c ŷ))``, one gate per head and chunk (data-dependent, shared within a chunk). The
gradient of the MLP is written out by hand (``memory_grads``), so the update is differentiable for the outer loop
and also runs under ``torch.no_grad`` (generation); the tests check it against autograd. ``M_*``
(``surprise_at``): ``"init"`` (default) takes every chunk's gradient at the learned initial memory ``M_0``, as the
reference does with its default ``NeuralMemory(batch_size=None)`` (the whole sequence is one mini-batch of the
paper's parallel form, §3.2); ``"chunk"`` takes it at ``M_{c-1}``, the paper's recurrence with mini-batches of
``chunk_size`` tokens.

MAC, per segment of ``segment_len`` tokens: retrieve ``h_j = M_{s-1}(q_j)`` with
``q_j = normalize(silu(RMSNorm(x_j) W_Q))``
(memory updated through the previous segment), attend causally over ``[persistent ; h ; segment]`` (query ``i``
sees every persistent token, ``h_j`` and ``x_j`` for ``j <= i``; RoPE at absolute positions on queries and on the
``h``/segment keys, persistent keys unrotated), then update the memory with the segment's attention output ``y``.
Output ``o_proj(y)``.

Differences from the paper / reference code (choices, documented):
- Retrieved tokens: one ``h_j`` per segment token, visible causally (``j <= i``), so the layer is causal and
  decoding is exact; the reference retrieves with the whole segment and uses separate long-term memory tokens.
- No output gate ``y * M_t(y)``: with chunk-parallel updates ``M_t`` already contains the whole segment, which
  would leak later tokens to earlier ones (the reference's ``gate_attn_output`` is optional too).
- ``surprise_at="init"`` is the default because the paper's recurrence (``"chunk"``) does not train in the suite's
  character LM (``nearfar bench --full``, 512 tokens = 16 segments): at initialisation the outer-loop gradient norm
  was 2,090 on a batch where the ``"init"`` form gives 4.2 (about 4 for both on its first 256 tokens); in an
  80-step probe it spiked to 1.7e5 and the loss climbed back, and the full run ended at 4.3 bpc (no attention:
  2.2). At the same settings ``"init"`` trained smoothly (80-step probe: 2.65 bpc, no attention 2.74). The
  gradient of a chunk's surprise passes through every earlier update, and the LayerNorm's backward scales with
  ``1 / std(mlp(k))``, which the decay (``alpha`` near 0.5 at init) shrinks. With ``"init"`` each surprise depends
  on ``M_0`` and its own chunk only; the memory is still a momentum + decay recurrence over the surprises.
- Chunk gradients are the sum (not mean) over the chunk's tokens; ``chunk_size`` (default ``segment_len``) must
  divide ``segment_len``; momentum and decay run as a loop over chunks (no associative scan).
- Keys are l2-normalised (the paper normalises q and k), values are not. The norms are the reference's defaults
  (``pre_rmsnorm``, ``mem_model_norm_add_residual``), not the paper's text; the LayerNorm has no learned gain
  (the reference's gain is a fast weight, trained at test time). They are on by default (``memory_norm=True``)
  because without them training diverged: on full-size MQAR (``nearfar bench --full``) the outer loop raised the
  momentum gate and lowered the decay until the test-time updates grew the memory weights to 1e18 within one
  forward pass, a NaN loss after ~110 steps at lr 3e-3. With the norms the output of the memory is bounded and its
  gradient shrinks as its weights grow. ``memory_norm=False`` gives the plain MLP memory of the paper's equations.
- The memory is updated only at full segments, in the forward pass and in decoding alike: the decode cache keeps
  the partial current segment (at most ``segment_len - 1`` input rows, recomputed each step) plus the memory
  weights and momentum, so its size does not depend on the sequence length and decoding equals the forward pass.
- ``key_padding_mask`` is not supported (padding would be written into the memory).

Measured (``nearfar bench --full``, ``benchmarks/RESULTS.md``, with ``surprise_at="init"``): on the character LM
2.08 bpc (full attention 2.01, no attention 2.16); on selective copying 0.63 / 0.13 by seed (the memory carries
tokens across segments with seed 0 only); on MQAR and passkey at chance. The segments are blocks, not sliding
windows, and in both MQAR sizes the key-value pairs fill exactly the first segment, so no query shares a segment
with its key: every answer has to come through the memory. In probes on quick MQAR (with ``"chunk"``) the outer
loop did not learn to use it: at ``max_lr=1`` (the reference's default) the memory's projections carry most of the
gradient for ~20 steps, then the loss settles at chance as with the memory frozen at zero. One test-time step
stores little: on a chunk of 16 random keys it cuts ``|M(k) - v|`` by 9% at ``theta=0.05`` (the gate's value at
init) and by at most 30% (``theta`` about 0.5; the LayerNorm bounds the output's scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_dim_heads, check_nonneg_int, check_positive_int, check_real_range
from ..functional import attend, merge_heads, split_heads
from .kv_cache import DecodeState
from .registry import Mechanism, register
from .rotary import RotaryEmbedding
from .sharding import whole_sequence

LN_EPS = 1e-5  # F.layer_norm's default
RMS_EPS = 1e-6


def memory_apply(weights: list[torch.Tensor], x: torch.Tensor, norm_residual: bool = True) -> torch.Tensor:
    """The memory on ``x (B, H, n, d)`` with per-(batch, head) weights ``(B, H, d_in, d_out)``: the MLP, then (with
    ``norm_residual``) ``LayerNorm(mlp(x)) + x`` as the reference's default ``ResidualNorm`` (no learned gain)."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    return F.layer_norm(h, h.shape[-1:], eps=LN_EPS) + x if norm_residual else h


def memory_grads(weights: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                 norm_residual: bool = True) -> list[torch.Tensor]:
    """Gradient of ``sum_t mean_dims (M(k_t) - v_t)^2`` w.r.t. each weight, per (batch, head): backprop by hand."""
    inputs, pre = [], []
    h = k
    for i, w in enumerate(weights):
        inputs.append(h)
        h = h @ w
        if i < len(weights) - 1:
            pre.append(h)
            h = F.gelu(h)
    if norm_residual:
        centred = h - h.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + LN_EPS)
        normed = centred * rstd
        h = normed + k
    delta = (h - v) * (2.0 / v.shape[-1])
    if norm_residual:  # back through the LayerNorm (the residual adds nothing: k is not a weight)
        delta = rstd * (delta - delta.mean(-1, keepdim=True) - normed * (delta * normed).mean(-1, keepdim=True))
    grads = []
    for i in range(len(weights) - 1, -1, -1):
        grads.append(inputs[i].transpose(-1, -2) @ delta)
        if i:
            # times d gelu(z)/dz = Phi(z) + z phi(z) (exact erf GELU, F.gelu's default), in one op that autograd
            # differentiates again for the outer loop (the explicit formula took ~10 ops each way)
            delta = torch.ops.aten.gelu_backward(delta @ weights[i].transpose(-1, -2), pre[i - 1])
    return grads[::-1]


def memory_update(weights: list[torch.Tensor], momentum: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                  lr: torch.Tensor, mom: torch.Tensor, decay: torch.Tensor, chunk_size: int,
                  norm_residual: bool = True, surprise_weights: list[torch.Tensor] | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Chunk-wise test-time training of the memory on ``k, v (B, H, n, d)``; ``lr``/``mom``/``decay`` are the
    per-chunk gates ``theta, eta, alpha`` ``(B, H, n // chunk_size)``. Returns the new weights and momentum.
    ``surprise_weights``: the memory at which every chunk's gradient is taken (all chunks in one batched call);
    None: each chunk's at the memory left by the previous chunk."""
    chunks = k.shape[2] // chunk_size
    if surprise_weights is not None:
        b, h = k.shape[:2]
        at = [w.unsqueeze(2) for w in surprise_weights]  # one copy of the memory for every chunk
        fixed = memory_grads(at, k.reshape(b, h, chunks, chunk_size, -1), v.reshape(b, h, chunks, chunk_size, -1),
                             norm_residual)
    for c in range(chunks):
        sl = slice(c * chunk_size, (c + 1) * chunk_size)
        if surprise_weights is None:
            grads = memory_grads(weights, k[:, :, sl], v[:, :, sl], norm_residual)
        else:
            grads = [g[:, :, c] for g in fixed]
        th, et, al = (g[:, :, c, None, None] for g in (lr, mom, decay))
        momentum = [et * s - th * g for s, g in zip(momentum, grads)]
        weights = [(1 - al) * w + s for w, s in zip(weights, momentum)]
    return weights, momentum


class TitansCache(DecodeState):
    """Decoding state of ``TitansMAC``: memory weights and momentum ``(B, H, d_in, d_out)`` per MLP layer, the input
    rows of the current (partial) segment, and the number of tokens seen."""

    def __init__(self, memory: nn.ParameterList, batch: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__(batch, device, dtype)
        self.weights = [w.to(device=self.device, dtype=dtype).expand(self.batch, -1, -1, -1) for w in memory]
        self.momentum = [torch.zeros_like(w) for w in self.weights]
        self.device = self.weights[0].device  # the memory lives there now, whether or not a device was given
        self.segment: torch.Tensor | None = None
        self.length = 0

    def nbytes(self) -> int:
        seg = 0 if self.segment is None else self.segment.nbytes
        return sum(t.nbytes for t in self.weights + self.momentum) + seg


@whole_sequence()
class TitansMAC(nn.Module):
    """``TitansMAC(dim, num_heads, segment_len=128, num_persistent=4, memory_depth=2, memory_expansion=2,
    chunk_size=None, max_lr=0.1, rope=True, memory_norm=True, surprise_at="init")``: causal Memory-as-Context layer
    on ``x (B, N, dim)``. ``memory_norm``: the memory's output is ``LayerNorm(mlp(k)) + k`` and its inputs are
    RMS-normalised (the reference's defaults); without them the test-time updates diverge in training.
    ``surprise_at``: where each chunk's gradient is taken: ``"init"`` at the learned initial memory ``M_0`` (the
    reference's default), ``"chunk"`` at the memory left by the previous chunk (the paper's equations); see the
    module docstring.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of heads (attention and memory), >= 1.
        segment_len: Tokens per segment (attention span and memory-update step), >= 1 (default 128).
        num_persistent: Learned persistent tokens every query sees, >= 0 (default 4).
        memory_depth: Layers of the memory MLP, >= 1 (default 2; 1: a linear memory).
        memory_expansion: Hidden width of the memory MLP in head dims, >= 1 (default 2).
        chunk_size: Tokens per surprise gradient, dividing ``segment_len``; None (default): ``segment_len``.
        max_lr: Largest memory learning rate ``theta``, a number in ``[0, inf)`` (default 0.1).
        rope: Rotary position embeddings (default True).
        memory_norm: ``LayerNorm(mlp(k)) + k`` memory and RMS-normalised memory inputs (default True).
        surprise_at: ``"init"`` (default) or ``"chunk"``: where each chunk's gradient is taken.

    Raises:
        TypeError: An int argument is not an int, ``max_lr`` is not a number or ``memory_norm`` not a bool.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``segment_len``, ``memory_depth``,
            ``memory_expansion`` or ``chunk_size`` < 1, ``num_persistent`` < 0; ``chunk_size`` does not divide
            ``segment_len``; ``max_lr`` < 0 or infinite; an unknown ``surprise_at``; an odd head dim with ``rope``.

    Examples:
        >>> import torch
        >>> from nearfar import TitansMAC
        >>> layer = TitansMAC(64, 4, segment_len=8, num_persistent=2)
        >>> layer(torch.randn(2, 20, 64)).shape
        torch.Size([2, 20, 64])
    """

    causal = True

    def __init__(self, dim: int, num_heads: int, segment_len: int = 128, num_persistent: int = 4,
                 memory_depth: int = 2, memory_expansion: int = 2, chunk_size: int | None = None,
                 max_lr: float = 0.1, rope: bool = True, memory_norm: bool = True, surprise_at: str = "init"):
        super().__init__()
        self.head_dim = d = check_dim_heads(dim, num_heads)
        self.segment_len = check_positive_int(segment_len, "segment_len")
        self.num_persistent = check_nonneg_int(num_persistent, "num_persistent")
        depth = check_positive_int(memory_depth, "memory_depth")
        hidden = check_positive_int(memory_expansion, "memory_expansion") * d
        self.chunk_size = self.segment_len if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
        if self.segment_len % self.chunk_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must divide segment_len ({self.segment_len})")
        check_real_range(max_lr, "max_lr", 0, math.inf, open_high=True)
        check_bool(memory_norm, "memory_norm")
        if surprise_at not in ("init", "chunk"):
            raise ValueError(f"surprise_at must be 'init' or 'chunk', got {surprise_at!r}")
        self.surprise_at = surprise_at
        self.dim, self.num_heads, self.max_lr, self.memory_norm = dim, num_heads, float(max_lr), memory_norm
        # the reference's store_norm / retrieve_norm: what the memory reads and writes does not grow with the model
        self.store_norm: nn.Module
        self.retrieve_norm: nn.Module
        self.store_norm, self.retrieve_norm = ((nn.RMSNorm(dim, eps=RMS_EPS), nn.RMSNorm(dim, eps=RMS_EPS))
                                               if memory_norm else (nn.Identity(), nn.Identity()))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(d) if rope else None
        # no empty parameter when there are no persistent tokens (an empty tensor breaks optimisers' checks)
        self.persistent = nn.Parameter(torch.randn(self.num_persistent, dim) * 0.02) if self.num_persistent else None
        self.mem_q, self.mem_k, self.mem_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_lr, self.to_momentum, self.to_decay = (nn.Linear(dim, num_heads) for _ in range(3))
        sizes = [d] + [hidden] * (depth - 1) + [d]
        self.memory = nn.ParameterList(
            nn.Parameter(torch.stack([nn.init.xavier_uniform_(torch.empty(a, b)) for _ in range(num_heads)]))
            for a, b in zip(sizes[:-1], sizes[1:]))

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> TitansCache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): the memory's.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            A ``TitansCache``: the memory weights and momentum per sequence and the current partial segment.
        """
        return TitansCache(self.memory, batch, device, dtype)

    def _rows(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """What rows ``x (B, L, dim)`` at positions ``start..`` contribute without the memory, computed once for
        a whole sequence: queries and own keys (RoPE'd), own values, and the memory queries, ``(B, H, L, d)``."""
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        qm = F.normalize(F.silu(split_heads(self.mem_q(self.retrieve_norm(x)), self.num_heads)), dim=-1)
        if self.rope is not None:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v, qm

    def _context(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """What every segment of one call shares, built once per call: the persistent tokens' keys and values
        ``(1, H, p, d)`` (not rotated; empty lists without them) and the segment masks, cached by segment length."""
        if self.persistent is None:
            return [], [], {}
        pers = self.persistent.to(dtype).unsqueeze(0)
        return [split_heads(self.k_proj(pers), self.num_heads)], [split_heads(self.v_proj(pers), self.num_heads)], {}

    def _segment(self, rows: tuple[torch.Tensor, ...], weights: list[torch.Tensor], start: int,
                 context: tuple[list[torch.Tensor], list[torch.Tensor], dict]) -> torch.Tensor:
        """Attention output (before ``o_proj``) of one segment's ``_rows`` at positions ``start..``: each query
        sees the persistent tokens, then causally the retrieved tokens ``h = M(q_mem)`` and the segment's rows."""
        q, kx, vx, qm = rows
        b, n = q.shape[0], q.shape[2]
        pk, pv, masks = context
        h = merge_heads(memory_apply(weights, qm, self.memory_norm), (n,))
        kh, vh = split_heads(self.k_proj(h), self.num_heads), split_heads(self.v_proj(h), self.num_heads)
        if self.rope is not None:
            kh = self.rope(kh, torch.arange(start, start + n, device=q.device))
        if n not in masks:
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            allowed = torch.cat([causal.new_ones(n, self.num_persistent), causal, causal], 1)
            masks[n] = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        k = torch.cat([t.expand(b, -1, -1, -1) for t in pk] + [kh, kx], 2)
        v = torch.cat([t.expand(b, -1, -1, -1) for t in pv] + [vh, vx], 2)
        return merge_heads(attend(q, k, v, bias=masks[n]), (n,))

    def _update(self, weights: list[torch.Tensor], momentum: list[torch.Tensor],
                y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Memory after training on one full segment's attention output ``y (B, segment_len, dim)``."""
        b, n, _ = y.shape
        y = self.store_norm(y)
        k = F.normalize(F.silu(split_heads(self.mem_k(y), self.num_heads)), dim=-1)
        v = F.silu(split_heads(self.mem_v(y), self.num_heads))
        pooled = y.reshape(b, n // self.chunk_size, self.chunk_size, -1).mean(2)
        lr = self.max_lr * torch.sigmoid(self.to_lr(pooled)).transpose(1, 2)
        mom = torch.sigmoid(self.to_momentum(pooled)).transpose(1, 2)
        decay = torch.sigmoid(self.to_decay(pooled)).transpose(1, 2)
        at = [w.to(y.dtype).unsqueeze(0) for w in self.memory] if self.surprise_at == "init" else None
        return memory_update(weights, momentum, k, v, lr, mom, decay, self.chunk_size, self.memory_norm, at)

    def forward(self, x: torch.Tensor, cache: TitansCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Memory-as-Context attention of ``x``, or the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Must be None (padding would enter the memory).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)``; a ``key_padding_mask``; ``cache`` made for another batch,
                device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}), got {getattr(x, 'shape', type(x).__name__)}")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is not supported by TitansMAC (padding would enter the memory)")
        cache = TitansCache.checked(cache, x)
        b, n, _ = x.shape
        c = self.segment_len
        if cache is None:
            cache = self.new_cache(b, x.device, x.dtype)
            weights, momentum = cache.weights, cache.momentum
            # split, not slices: the backward of a slice writes a zero tensor of the whole sequence per segment
            segments, outs, context = zip(*(t.split(c, dim=2) for t in self._rows(x, 0))), [], self._context(x.dtype)
            for s, rows in zip(range(0, n, c), segments):
                y = self._segment(rows, weights, s, context)
                outs.append(y)
                if s + c < n:  # the memory after the last segment is never read
                    weights, momentum = self._update(weights, momentum, y)
            return self.o_proj(torch.cat(outs, 1))
        outs, i, context = [], 0, self._context(x.dtype)
        while i < n:
            have = 0 if cache.segment is None else cache.segment.shape[1]
            take = min(c - have, n - i)
            seg = x[:, i:i + take] if cache.segment is None else torch.cat([cache.segment, x[:, i:i + take]], 1)
            # the segment's earlier rows are recomputed: causal within the segment, so they are unchanged
            y = self._segment(self._rows(seg, cache.length - have), cache.weights, cache.length - have, context)
            outs.append(y[:, have:])
            cache.length += take
            i += take
            if seg.shape[1] == c:
                cache.weights, cache.momentum = self._update(cache.weights, cache.momentum, y)
                cache.segment = None
            else:
                cache.segment = seg
        return self.o_proj(torch.cat(outs, 1))


register(Mechanism(
    name="titans_mac", paper="Titans: Learning to Memorize at Test Time (2024)", repo="lucidrains/titans-pytorch",
    family="local+global", dims=("1d",), cls=TitansMAC, patterns={"CS": {}}, why_not={
        "NS": "the neural memory is trained on the segments in order at test time: a causal recurrence",
        "NC": "the memory is written from and read by the same sequence (Memory as Context); the paper defines no "
              "source sequence", "CC": "as NC: the paper defines no source sequence"},
    make=lambda dim, num_heads, **kw: TitansMAC(dim, num_heads, **kw),
    notes="Memory as Context: segment 128, 4 persistent tokens, 2-layer MLP memory per head trained at test time "
          "(LayerNorm + residual output, RMS-normed inputs; surprises at the learned initial memory, as the "
          "reference; momentum + decay, data-dependent gates); causal "
          "retrieved tokens; decode state = memory weights + momentum + the partial segment (independent of N)"))
