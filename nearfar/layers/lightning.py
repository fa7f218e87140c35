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

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_dim_heads, check_positive_int
from ..functional import compute_dtype, lightning_blocked, merge_heads, split_heads, tnl_slopes
from .kv_cache import DecodeState
from .registry import Mechanism, register
from .sharding import whole_sequence


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


@whole_sequence()
class LightningAttention(nn.Module):
    """TNL attention layer ``LightningAttention(dim, num_heads, bias=False, norm_type="srmsnorm", layer_idx=0,
    num_layers=12, decay=True, gate_rank=None, block_size=64)``: x ``(B, N, dim)`` -> ``(B, N, dim)``, causal.

    ``q, k, v = SiLU(x W)``; lightning attention with TNL's per-layer ALiBi decay (``decay=False``: none); merge
    heads; ``norm_type`` ("srmsnorm" or "layernorm"); times ``sigmoid(output_gate(x))`` (low rank ``dim -> gate_rank
    -> dim``); ``o_proj``. ``forward(x, cache=new_cache(B))`` continues a sequence with any number of tokens.

    Args:
        dim: Model width, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1.
        bias: Biases on the q/k/v/o projections and the output gate (default False, as TNL).
        norm_type: ``"srmsnorm"`` (default, parameter-free) or ``"layernorm"``, applied after merging the heads.
        layer_idx: This layer's index in ``[0, num_layers - 1]`` (default 0): sets the decay rates.
        num_layers: Number of layers of the model, >= 1 (default 12).
        decay: TNL's per-head decay ``lambda^(i-j)`` (default True); False: plain linear attention.
        gate_rank: Rank of the low-rank output gate, >= 1; None (default): the head dim.
        block_size: Block length of the blocked (Lightning-2) evaluation, >= 1 (default 64); the result does not
            depend on it.
        causal: Causal (default True); False: every query sees every key (needs ``decay=False``).
        cross: Keys and values from a ``context`` (default False; needs ``decay=False``).

    Raises:
        TypeError: ``bias``, ``decay``, ``causal`` or ``cross`` is not a bool; an int argument is not an int.
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``decay=True`` with ``causal=False`` or
            ``cross=True``; an unknown ``norm_type``; ``block_size``, ``gate_rank`` or ``num_layers`` < 1;
            ``layer_idx`` outside ``[0, num_layers - 1]``.

    Examples:
        >>> import torch
        >>> from nearfar import LightningAttention
        >>> layer = LightningAttention(64, 4, block_size=16)
        >>> x = torch.randn(2, 40, 64)
        >>> layer(x).shape
        torch.Size([2, 40, 64])
        >>> cache = layer.new_cache(2)   # the same outputs, one chunk at a time
        >>> torch.allclose(torch.cat([layer(x[:, :25], cache=cache), layer(x[:, 25:], cache=cache)], 1), layer(x),
        ...                atol=1e-4)
        True
    """

    slope_rate: torch.Tensor | None  # a buffer: the per-head decay rates, None without decay

    def __init__(self, dim: int, num_heads: int, bias: bool = False, norm_type: str = "srmsnorm", layer_idx: int = 0,
                 num_layers: int = 12, decay: bool = True, gate_rank: int | None = None, block_size: int = 64,
                 causal: bool = True, cross: bool = False):
        super().__init__()
        self.head_dim = check_dim_heads(dim, num_heads)
        for name, val in (("bias", bias), ("decay", decay), ("causal", causal), ("cross", cross)):
            check_bool(val, name)
        if decay and (cross or not causal):
            raise ValueError("the decay lambda^(i-j) runs over the past of one sequence: causal=False and cross=True "
                             "need decay=False (LinearAttention)")
        self.causal, self.cross = causal, cross
        if norm_type not in ("srmsnorm", "layernorm"):
            raise ValueError(f"norm_type must be 'srmsnorm' or 'layernorm', got {norm_type!r}")
        self.dim, self.num_heads, self.norm_type, self.decay = dim, num_heads, norm_type, decay
        self.block_size = check_positive_int(block_size, "block_size")
        self.gate_rank = self.head_dim if gate_rank is None else check_positive_int(gate_rank, "gate_rank")
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
        layer is fp64). A causal cross layer's state is the source's ``K^T V``, set at the first call.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): the layer's.
            dtype: The dtype of the inputs ``x``; None (default): fixed by the first call.

        Returns:
            A ``LinearAttentionState`` whose size does not depend on the sequence length.

        Raises:
            ValueError: The layer is not causal (``causal=False``).
        """
        if not self.causal:
            raise ValueError(f"{type(self).__name__}(causal=False) is not causal: it has no decoding cache")
        ref = self.q_proj.weight
        ct = torch.float64 if (dtype or ref.dtype) == torch.float64 else torch.float32
        return LinearAttentionState(batch, (self.num_heads, self.head_dim, self.head_dim), ct,
                                    ref.device if device is None else device, dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cache: LinearAttentionState | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Lightning (or linear) attention of ``x``, or the next tokens of each sequence through ``cache``.

        Args:
            x: Queries (and, for self-attention, keys and values) ``(B, N, dim)``, ``B, N >= 1``.
            context: The source ``(B, M, dim)`` of a cross layer (with a cache: needed at the first call only).
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).
            key_padding_mask: Optional bool mask of the keys, True = real: ``(B, N)``, or ``(B, M)`` for cross layers.

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            TypeError: ``x`` or ``context`` is not a tensor; ``key_padding_mask`` is not a bool tensor; ``cache`` does
                not come from ``new_cache``.
            ValueError: ``x`` or ``context`` is not ``(B, N, dim)`` with ``B, N >= 1``; a ``context`` given to a self
                layer, missing for a cross layer or with another batch; a ``key_padding_mask`` of another shape;
                ``cache`` made for another batch, device or dtype.
        """
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
            assert src is not None  # a cross layer without its cached source has context (checked above)
            if tuple(key_padding_mask.shape) != tuple(src.shape[:2]):
                raise ValueError(f"key_padding_mask must have the keys' shape (B, N) (cross: (B, M)) = "
                                 f"{tuple(src.shape[:2])}, got {tuple(key_padding_mask.shape)}")
        q = split_heads(F.silu(self.q_proj(x)), self.num_heads)
        ct = compute_dtype(q)
        if source_cached:  # causal cross decoding: the source's K^T V was stored at the first call
            assert cache is not None  # source_cached needs a cache
            out, state = (q.to(ct) @ cache.S).to(q.dtype), cache.S
        else:
            assert src is not None  # a cross layer without its cached source has context (checked above)
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
                out, state = lightning_blocked(q, k, v, rate, self.block_size, None if cache is None else cache.S)
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
