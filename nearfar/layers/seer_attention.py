"""SeerAttention: a learned gate (AttnGate) picks the key blocks of causal attention; it is self-distilled from
the block max-pooled attention map of the frozen model.

Papers: Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (arXiv 2410.13276, 2024) and
"SeerAttention-R: Sparse Attention Adaptation for Long Reasoning" (arXiv 2506.08889, 2025). Official code:
microsoft/SeerAttention ``seer_attn/prefill_sparse/attn_gate.py`` (``AttnGate``, ``MultiHeadLinear``),
``seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py`` (``LlamaSeerAttention``, the block RoPE and the
block-causal gate mask), ``seer_attn/modules/common.py`` (``get_sparse_attn_mask_from_threshold``,
``get_sparse_attn_mask_from_nz_ratio``), ``seer_attn/modules/attention_distill.py`` (the pooled attention map) and
``seer_attn/decode_sparse/attn_gate_inf.py`` / ``attn_gate_training.py`` (SeerAttention-R's gate).

The gate (``b = block_size``, ``d_g = gate_dim``), on q and k *before* RoPE: per query head ``W_q (d, d_g)``, per
KV head ``W_k (3d, d_g)``; a key block is ``[max, min, mean]`` of its keys (``Kmaxminavg``) times ``W_k``, rotated
by a RoPE of head dim ``d_g`` at the position of the block's first token; logits are ``q_hat . k_hat / sqrt(d_g)``.

- ``gate="block"`` (SeerAttention's prefill, the default): a query block is the mean of its queries (``Qavg``)
  times ``W_q``, rotated at the block's first position; logits ``(B, H, N/b, N/b)``, block-causal. Selection per
  query head: ``threshold`` keeps blocks whose softmax probability is ``>= threshold``, ``nz_ratio`` keeps the top
  ``max(1, int((1 - sqrt(1 - nz_ratio)) N/b))`` logits of each row; then the last two query-block rows are made
  dense (``last_block_dense``). The query block's own (diagonal) block is always kept. The selected blocks go to
  ``attend(q, k, v, None, blocks=SelectedBlocks(..., within=Causal()))``: token-exact causality inside them. This
  mode is not causal token by token: a query block's mean reads later tokens of the block, and the dense last rows
  and the ``nz_ratio`` budget depend on ``N``; it has no decoding cache.
- ``gate="token"`` (SeerAttention-R): every token is its own gate row: ``mean_g(q_h W_h)`` over the query heads of
  a GQA group (one selection per KV head), rotated at the token's position, against the *completed* blocks
  before the token's block (softmax over those); ``threshold`` or ``token_budget`` (the best
  ``token_budget // b`` blocks), plus the token's own block, always. Causal; ``new_cache()`` decodes with a
  compressed block-key cache (one gate key per completed block, plus the pre-RoPE keys of the current block) and
  equals this forward exactly, in chunks of any size.

Distillation (``distill_loss``): ``KL(GT || softmax(logits))`` with ``GT`` the attention map max-pooled over
``b x b`` tiles (gate="token": over the ``b`` keys of a block for each token, then max over the GQA group, on the
completed blocks), each row normalised to sum 1, computed by ``block_attention_stat`` from q, k and the LSE without
the ``N x N`` map; the first quarter of the rows is left out (official). The q/k/v projections run without
gradient: only the gate (``gate_parameters()``) learns. The selection is not differentiable, so a model trained
end to end never trains the gate through its task loss: add ``distill_loss``.

Differences from the official code (our choices):
- the diagonal (prefill) / current (token) block is always kept, so no query is left without keys; the official
  prefill kernel attends only what the gate keeps (SeerAttention-R also forces the current block);
- ``threshold`` keeps ``p >= threshold`` (official: ``>``), so ``threshold=0`` is exactly dense causal attention;
- the Q map is always ``W_q`` per query head (the official prefill gate drops it when ``d_g == d`` with one Q pool
  and then gives K one map per query head); both modes share these parameters, so one state_dict serves both. The
  token gate's ``mean_g(q_h W_h)`` is SeerAttention-R's ``Qproj`` up to a factor ``1/G`` (``Qavgproj`` when the
  group's maps are equal). Gate weights are initialised per head with Xavier-uniform (SeerAttention-R);
- SeerAttention-R's decoder rotates a block completed while decoding at its last token's position and lets the
  current block's placeholder key compete in the softmax; here every gate key sits at its block's first position
  and only completed earlier blocks compete (its training masks), so decoding equals the teacher-forced forward.
  Chunked prefill with a cache uses the token gate too (the official SeerAttention-R prefill is dense);
- no padding masks, no RMSNorm on the gate, no per-head Q pooling other than the mean; the KL loss averages over
  all entries of the kept rows as ``torch.nn.KLDivLoss()`` does (``reduction="sum"`` is offered too).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_bool, check_choice, check_nonneg_int, check_positive_int, check_real_range
from ..functional import (
    SelectedBlocks,
    attend,
    block_attention_stat,
    block_scores,
    kv_blocks_from_mask,
    merge_heads,
    nz_ratio_blocks,
    pool_blocks,
    split_heads,
    threshold_blocks,
    topk_blocks,
)
from ..patterns import Causal
from .kv_cache import KVCache
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import DECODER_ONLY, Mechanism, register
from .rotary import RotaryEmbedding
from .sharding import whole_sequence

GATES = ("block", "token")
SPARSITY = ("threshold", "nz_ratio", "token_budget")


class AttnGate(nn.Module):
    """The gate's parameters and maps: ``q_weight (H, d, d_g)``, ``k_weight (Hkv, 3d, d_g)`` and a RoPE of head dim
    ``d_g`` (inputs are pre-RoPE ``(B, heads, N, d)``)."""

    def __init__(self, head_dim: int, gate_dim: int, num_heads: int, num_kv_heads: int, block_size: int):
        super().__init__()
        self.block_size, self.gate_dim, self.group = block_size, gate_dim, num_heads // num_kv_heads
        self.q_weight = nn.Parameter(torch.empty(num_heads, head_dim, gate_dim))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, 3 * head_dim, gate_dim))
        self.rope = RotaryEmbedding(gate_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.q_weight, self.k_weight):
            for h in range(w.shape[0]):
                nn.init.xavier_uniform_(w.data[h])

    def keys(self, k: torch.Tensor, first_block: int = 0) -> torch.Tensor:
        """Gate keys ``(B, Hkv, KB, d_g)`` of the blocks of ``k``, whose first block has index ``first_block``."""
        kp = torch.einsum("bhnc,hce->bhne", pool_blocks(k, self.block_size, "maxminavg"), self.k_weight.to(k.dtype))
        pos = (torch.arange(kp.shape[2], device=k.device) + first_block) * self.block_size
        return self.rope(kp, pos)

    def block_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Gate queries ``(B, H, QB, d_g)``: each block's mean query, rotated at its first position."""
        qp = torch.einsum("bhnc,hce->bhne", pool_blocks(q, self.block_size, "mean"), self.q_weight.to(q.dtype))
        return self.rope(qp, torch.arange(qp.shape[2], device=q.device) * self.block_size)

    def token_queries(self, q: torch.Tensor, start: int) -> torch.Tensor:
        """Gate queries ``(B, Hkv, N, d_g)``: ``mean_g(q_h W_h)`` over each GQA group, at positions ``start + i``."""
        b, h, n, _ = q.shape
        qp = torch.einsum("bhnc,hce->bhne", q, self.q_weight.to(q.dtype))
        qp = qp.reshape(b, h // self.group, self.group, n, self.gate_dim).mean(2)
        return self.rope(qp, torch.arange(start, start + n, device=q.device))


class SeerCache(KVCache):
    """Decoding state of a ``gate="token"`` ``SeerAttention``: every rotated key and value (``KVCache``), the gate
    keys of the completed blocks ``block_keys (B, Hkv, C, d_g)`` and the pre-RoPE keys of the current, incomplete
    block ``pending (B, Hkv, r, d)``, ``r < block_size``."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, None, device, dtype)
        self.block_keys: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in (self.block_keys, self.pending) if t is not None)
        return super().nbytes() + extra


@whole_sequence()
class SeerAttention(ProjectedAttention):
    """``SeerAttention(dim, num_heads, num_kv_heads=None, block_size=64, gate_dim=128, gate="block",
    sparsity="threshold", threshold=2e-3, nz_ratio=0.5, token_budget=4096, last_block_dense=True)``: causal
    attention of ``x (B, N, dim)`` (q/k/v/o, GQA, RoPE) over the key blocks a learned gate keeps.

    Gao et al., "SeerAttention" (arXiv 2410.13276, 2024) and "SeerAttention-R" (arXiv 2506.08889, 2025); official
    code: microsoft/SeerAttention. See the module docstring for the two gate modes and the distillation.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` with an even head dim (RoPE).
        num_heads: Number of query heads, >= 1.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        block_size: Tokens per gate block ``b`` (>= 1; default 64).
        gate_dim: Gate hidden size ``d_g``, a positive even int (default 128).
        gate: ``"block"`` (SeerAttention's block gate, default) or ``"token"`` (SeerAttention-R: causal, decodes).
        sparsity: ``"threshold"`` (default), ``"nz_ratio"`` (block gate only) or ``"token_budget"`` (token gate only).
        threshold: Keep blocks with gate probability ``>= threshold``, in ``[0, 1]`` (default 2e-3).
        nz_ratio: Kept fraction of the block-causal map for ``sparsity="nz_ratio"``, in ``[0, 1]`` (default 0.5).
        token_budget: Tokens of past blocks per query for ``sparsity="token_budget"``: the best
            ``token_budget // block_size`` completed blocks (>= 0; default 4096, SeerAttention-R's).
        last_block_dense: Block gate: the last two query-block rows keep every block (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, or ``sparsity`` does not fit ``gate``.

    Examples:
        >>> import torch
        >>> from nearfar import SeerAttention
        >>> layer = SeerAttention(64, 4, num_kv_heads=2, block_size=8, gate_dim=16, threshold=0.1)
        >>> x = torch.randn(2, 40, 64)
        >>> layer(x).shape
        torch.Size([2, 40, 64])
        >>> loss = layer.distill_loss(x)   # trains the gate only
        >>> loss.backward()
        >>> layer.q_proj.weight.grad is None, layer.attn_gate.k_weight.grad is not None
        (True, True)
        >>> dec = SeerAttention(64, 4, block_size=8, gate_dim=16, gate="token", sparsity="token_budget",
        ...                     token_budget=16)
        >>> cache = dec.new_cache(2)
        >>> steps = torch.cat([dec(x[:, i:i + 1], cache=cache) for i in range(40)], 1)
        >>> torch.allclose(steps, dec(x), atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, block_size: int = 64,
                 gate_dim: int = 128, gate: str = "block", sparsity: str = "threshold", threshold: float = 2e-3,
                 nz_ratio: float = 0.5, token_budget: int = 4096, last_block_dense: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        self.block_size = check_positive_int(block_size, "block_size")
        self.gate_dim = check_positive_int(gate_dim, "gate_dim")
        if gate_dim % 2:
            raise ValueError(f"gate_dim must be even (the gate's RoPE rotates pairs of channels), got {gate_dim}")
        self.gate = check_choice(gate, "gate", GATES)
        self.sparsity = check_choice(sparsity, "sparsity", SPARSITY)
        if (sparsity, gate) in (("nz_ratio", "token"), ("token_budget", "block")):
            other, own = ("block", "token_budget") if gate == "token" else ("token", "nz_ratio")
            raise ValueError(f"sparsity={sparsity!r} is for gate={other!r}; gate={gate!r} takes 'threshold' or "
                             f"{own!r}")
        self.threshold = check_real_range(threshold, "threshold", 0.0, 1.0)
        self.nz_ratio = check_real_range(nz_ratio, "nz_ratio", 0.0, 1.0)
        self.token_budget = check_nonneg_int(token_budget, "token_budget")
        self.last_block_dense = check_bool(last_block_dense, "last_block_dense")
        check_bool(qkv_bias, "qkv_bias")
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope=True)
        self.attn_gate = AttnGate(self.head_dim, gate_dim, self.num_heads, self.num_kv_heads, self.block_size)
        self.causal = self.gate == "token"

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate's parameters (``q_weight``, ``k_weight``): what ``distill_loss`` trains."""
        return list(self.attn_gate.parameters())

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> SeerCache:
        """An empty decoding cache for ``batch`` sequences (``gate="token"`` only).

        Args:
            batch: Number of sequences, >= 1.
            device: The cache's device; None (default): fixed by the first call.
            dtype: The cache's dtype; None (default): fixed by the first call.

        Returns:
            A ``SeerCache``: every key and value, one gate key per completed block and the current block's keys.

        Raises:
            ValueError: The layer has ``gate="block"`` (not causal token by token), or a bad ``batch``/``device``/
                ``dtype``.
        """
        if self.gate != "token":
            raise ValueError("SeerAttention(gate='block') pools queries over whole blocks and is not causal token "
                             "by token: it has no decoding cache (build it with gate='token'; the parameters are the "
                             "same)")
        return SeerCache(batch, device=device, dtype=dtype)

    def _heads(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """Pre-RoPE q, k, rotated q, k, and v, ``(B, heads, N, d)``."""
        q0, k0 = split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(x), self.num_kv_heads)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        assert self.rope is not None  # add_projections(rope=True)
        return q0, k0, self.rope(q0, pos), self.rope(k0, pos), v

    def _check(self, x: object, key_padding_mask: object) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim or 0 in x.shape:
            raise ValueError(f"x must be (B, N, {self.dim}) with B, N >= 1, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if key_padding_mask is not None:
            raise ValueError("SeerAttention takes no key_padding_mask: its gate pools whole blocks of real tokens")

    def gate_logits(self, q0: torch.Tensor, k0: torch.Tensor, block_keys: torch.Tensor | None = None,
                    start: int = 0) -> torch.Tensor:
        """The gate's logits from pre-RoPE ``q0 (B, H, N, d)`` and ``k0 (B, Hkv, N, d)``, ``-inf`` where masked.

        gate="block": ``(B, H, QB, QB)``, block-causal. gate="token": ``(B, Hkv, N, ceil((start + N) / b))``, only
        the completed blocks before each token's block visible; ``block_keys`` (the gate keys of the completed
        blocks) replaces ``k0`` when decoding, ``start`` is the first query's position.

        Args:
            q0: Pre-RoPE queries.
            k0: Pre-RoPE keys (ignored when ``block_keys`` is given).
            block_keys: Gate keys ``(B, Hkv, C, d_g)`` of the completed blocks, or None.
            start: Position of the first query.

        Returns:
            The logits.
        """
        g, scale = self.attn_gate, 1.0 / math.sqrt(self.gate_dim)
        if self.gate == "block":
            return block_scores(g.block_queries(q0), g.keys(k0), k_block_size=1, scale=scale)
        keys = g.keys(k0) if block_keys is None else block_keys
        q = g.token_queries(q0, start)
        logits = block_scores(q, keys.to(q.dtype), k_block_size=self.block_size, q_start=start,
                              include_current=False, scale=scale)
        total = ((start + q.shape[2]) + self.block_size - 1) // self.block_size
        return torch.nn.functional.pad(logits, (0, total - logits.shape[-1]), value=-math.inf)

    def select(self, logits: torch.Tensor, start: int = 0) -> SelectedBlocks:
        """The kept blocks for ``logits`` from ``gate_logits``: ``SelectedBlocks`` with ``within=Causal()``.

        Args:
            logits: Gate logits, ``-inf`` where masked.
            start: Position of the first query (token gate).

        Returns:
            The selection (per query head and block of ``block_size`` queries for the block gate; per KV head and
            query for the token gate).
        """
        b, dead = self.block_size, logits == -math.inf
        probs = logits
        if self.sparsity == "threshold":  # probabilities over the visible blocks, -inf kept where masked
            probs = torch.softmax(logits.masked_fill(dead.all(-1, keepdim=True), 0.0), -1).masked_fill(dead, -math.inf)
        if self.gate == "token":
            if self.sparsity == "threshold":
                num, idx = threshold_blocks(probs, self.threshold, force_current=True, k_block_size=b, q_start=start)
            else:
                num, idx = topk_blocks(logits, self.token_budget // b + 1, force_current=True, k_block_size=b,
                                       q_start=start)
            return SelectedBlocks(num, idx, q_block=1, kv_block=b, within=Causal())
        rows = 2 if self.last_block_dense else 0
        if self.sparsity == "threshold":
            num, idx = threshold_blocks(probs, self.threshold, force_current=True, dense_last_rows=rows)
        else:  # the official top-K, then the diagonal and the dense last rows added
            num, idx = nz_ratio_blocks(logits, self.nz_ratio)
            qb, kb = logits.shape[-2], logits.shape[-1]
            keep = torch.zeros(*logits.shape[:-1], kb + 1, dtype=torch.bool, device=logits.device)
            keep = keep.scatter(-1, idx.long().masked_fill(idx < 0, kb), True)[..., :kb]
            rq, rk = torch.arange(qb, device=logits.device)[:, None], torch.arange(kb, device=logits.device)
            keep = keep | (rk == rq) | ((rq >= qb - rows) & (rk <= rq))
            num, idx = kv_blocks_from_mask(keep)
        return SelectedBlocks(num, idx, q_block=b, kv_block=b, within=Causal())

    def forward(self, x: torch.Tensor, cache: SeerCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gated block-sparse causal attention of ``x``, or (token gate) the next tokens of each sequence.

        Args:
            x: ``(B, N, dim)``: whole sequences, or with ``cache`` the next ``N`` tokens of each sequence.
            cache: A decoding state from ``new_cache`` (token gate only; None, the default: whole sequences).
            key_padding_mask: Not supported (must be None).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N, dim)`` with ``B, N >= 1``; a ``key_padding_mask``; a ``cache`` with
                ``gate="block"`` or made for another batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        if x.device.type == "meta" and cache is None:  # the routing reads values: shapes only (a cache checks devices)
            return meta_forward(self, x)
        self._check(x, key_padding_mask)
        if cache is not None and self.gate != "token":
            raise ValueError("cache is for gate='token' layers: gate='block' has no decoding cache")
        cache = SeerCache.checked(cache, x)
        n, start = x.shape[1], 0 if cache is None else cache.length
        q0, k0, q, k, v = self._heads(x, start)
        block_keys = None
        if cache is not None:
            block_keys = self._update_cache(cache, k0, k, v)
            assert cache.k is not None and cache.v is not None  # appended to just now
            k, v = cache.k, cache.v
        sel = self.select(self.gate_logits(q0, k0, block_keys, start), start)
        out = attend(q, k, v, None, blocks=sel)
        return self.o_proj(merge_heads(out, (n,)))

    def _update_cache(self, cache: SeerCache, k0: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the new keys/values; turn every block they complete into a gate key; return all gate keys."""
        b = self.block_size
        pend = k0 if cache.pending is None else torch.cat([cache.pending, k0], 2)
        full = pend.shape[2] // b
        done = cache.length // b  # blocks completed before this call
        cache.append(k, v)
        keys = cache.block_keys
        if full:
            new = self.attn_gate.keys(pend[:, :, :full * b], done)
            keys = new if keys is None else torch.cat([keys, new], 2)
        if keys is None:
            keys = k0.new_zeros(*k0.shape[:2], 0, self.gate_dim)
        cache.block_keys, cache.pending = keys, pend[:, :, full * b:]
        return keys

    def distill_target(self, x: torch.Tensor) -> torch.Tensor:
        """The distillation target ``GT`` of ``x``, without gradient, rows summing to 1 (or 0 for a row with no
        visible block).

        gate="block": ``(B, H, QB, QB)``, the attention probabilities max-pooled over ``b x b`` tiles.
        gate="token": ``(B, Hkv, N, KB)``, for each token the max over the ``b`` keys of each completed earlier block
        and over the query heads of its GQA group.

        Args:
            x: ``(B, N, dim)``.

        Returns:
            ``GT`` in ``x``'s dtype.
        """
        self._check(x, None)
        with torch.no_grad():
            _, _, q, k, v = self._heads(x, 0)
            return self._target(q, k, v)

    def _target(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b = self.block_size
        _, lse = attend(q, k, v, Causal(), return_lse=True)
        if self.gate == "block":
            return block_attention_stat(q, k, lse, b, b, how="max", normalize=True)
        gt = block_attention_stat(q, k, lse, 1, b, how="max")
        bsz, h, n, kb = gt.shape
        gt = gt.reshape(bsz, self.num_kv_heads, h // self.num_kv_heads, n, kb).amax(2)
        gt = gt * (torch.arange(kb, device=q.device) < (torch.arange(n, device=q.device) // b)[:, None])
        total = gt.sum(-1, keepdim=True)
        return gt / torch.where(total > 0, total, torch.ones_like(total))

    def distill_loss(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """SeerAttention's gate loss ``KL(GT || softmax(gate logits))`` on rows from the first quarter on.

        The projections run without gradient, so only ``gate_parameters()`` get one (``x`` none).

        Args:
            x: ``(B, N, dim)``.
            reduction: ``"mean"`` over every entry of the kept rows (``torch.nn.KLDivLoss()``, official) or
                ``"sum"``.

        Returns:
            The loss, a scalar (float32, float64 for float64 inputs).
        """
        self._check(x, None)
        check_choice(reduction, "reduction", ("mean", "sum"))
        with torch.no_grad():
            q0, k0, q, k, v = self._heads(x, 0)
            gt = self._target(q, k, v)
        logits = self.gate_logits(q0, k0)
        ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
        skip = logits.shape[2] // 4
        logits, gt = logits[:, :, skip:].to(ct), gt[:, :, skip:].to(ct)
        logp = torch.log_softmax(logits.masked_fill(logits == -math.inf, torch.finfo(ct).min), -1)
        kl = torch.xlogy(gt, gt) - gt * logp
        return kl.mean() if reduction == "mean" else kl.sum()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, gate_dim={self.gate_dim}, gate={self.gate!r}, "
                f"sparsity={self.sparsity!r}")


register(Mechanism(
    name="seer_attention", paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (arXiv 2410.13276, "
    "2024); SeerAttention-R (arXiv 2506.08889, 2025)", repo="microsoft/SeerAttention", family="routed",
    dims=("1d",), cls=SeerAttention, make=lambda dim, num_heads, **kw: SeerAttention(dim, num_heads, **kw),
    patterns={"CS": {"gate": "token"}}, why_not={
        "NS": "a causal LM's gate: block-causal gate logits over causal attention; the paper defines no "
              "bidirectional form",
        "NC": DECODER_ONLY, "CC": DECODER_ONLY},
    notes="learned AttnGate (pooled q, max/min/mean-pooled k, per-head maps, block RoPE) keeps key blocks by "
          "threshold, nz_ratio or token budget; distill_loss trains it from the block max-pooled attention map. "
          "Default gate='block' (the paper's prefill: not causal within a block, no cache); CS and decoding use "
          "gate='token' (SeerAttention-R: per-token gate rows, compressed block-key cache)"))
