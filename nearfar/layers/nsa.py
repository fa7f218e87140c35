"""NSA (Native Sparse Attention): a gated sum of three softmax attentions per query head -- over compressed past
blocks, over the raw tokens of the top-n blocks those compressed scores rank highest (shared by a GQA group), and
over a sliding window.

Paper: Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention"
(arXiv 2502.11089, 2025). No official code from the authors; we follow fla-org/flash-linear-attention
``fla/ops/nsa/naive.py`` (``naive_nsa``, ``naive_nsa_compression``, ``naive_nsa_topk``, ``naive_nsa_selection``)
and ``fla/layers/nsa.py`` (``NativeSparseAttention``), and offer lucidrains/native-sparse-attention-pytorch's
learned compressor as an option.

With ``BS = block_size`` (fla: one size for compression length, stride and selection blocks), positions ``t``
from 0 and ``blk(t) = t // BS``, per query head ``h`` of KV head ``h // G`` (keys after RoPE):

- **cmp**: compressed keys/values, one per *complete* block ``c`` (the mean of its keys/values, fla; or the
  learned MLP with an intra-block position embedding, ``compress="mlp"``); query ``t`` sees block ``c`` once its
  last token is ``<= t`` (``(c+1) BS - 1 <= t``); no visible block gives 0;
- **slc**: importance ``p_cmp`` (the cmp branch's softmax probabilities) averaged over the ``G`` heads of the group;
  blocks ``0``, ``blk(t)`` and ``blk(t) - 1`` are forced, the other slots of the ``block_counts`` go to the most
  important complete blocks; one softmax over the raw keys of those blocks, token-causal in the current block;
- **win**: the last ``window_size`` keys, ``t`` included (fla's flash-attn window ``(w - 1, 0)``); 0 turns it off;
- ``o = g_cmp o_cmp + g_slc o_slc + g_win o_win``, gates ``sigmoid(g_proj(x))`` per (token, head, branch), in
  fla's order (cmp, slc, win), not normalised; then ``o_proj``.

Each branch is one call of ``nearfar.attend``: cmp with ``SelectedBlocks`` over the compressed keys (blocks of one
key; the queries shifted by one so a query block's visible set is a prefix), slc with ``SelectedBlocks`` (one
list per KV head and token, ``within=Causal()``), win with ``SlidingWindow & Causal``: ``O(N (N/BS + n BS + w) d)``
work, no ``N x N`` mask; the importance map is ``(N, N/BS)`` per head (``block_scores``/``topk_blocks``).
The branches, heads first, are in ``nsa_branches.py``, and NSA in fla's layout and argument order (``nsa``,
``nsa_compression``, ``nsa_topk``, ``nsa_selection``) in ``nsa_fla.py``; this module re-exports them.

Differences from fla's code:

- any GQA group size (fla's ``naive_nsa``/``parallel_nsa`` assert a power of two >= 16); ``block_counts >= 3``
  (it counts the three forced blocks; below 3 fla's choice among them is a tie); ``block_counts`` is an int;
- duplicate block ids given to ``nsa_selection`` count once (fla's naive code counts them with multiplicity; its
  top-k never repeats one); a query with no valid key gives 0 (fla's naive selection gives NaN);
- the window branch uses ``scale`` like the others (fla's flash-attn call ignores a custom scale);
- ties of importance go to the lower block; the importance is the group mean in the compute dtype (float32 for
  half inputs);
- decoding keeps the compressed keys of completed blocks and appends one per completed block (fla recomputes
  the pooling over the whole cache every step); the paper's separate K/V per branch, overlapping compression
  blocks (stride < length) and its Eq. 9 block mapping are not implemented (``l = l' = stride``, as fla).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_choice, check_int_range, check_nonneg_int, check_positive_int, check_tokens
from ..functional import merge_heads, pool_blocks
from .kv_cache import KVCache
from .nsa_branches import nsa_compressed_heads, nsa_heads, nsa_select_heads
from .nsa_fla import nsa, nsa_compression, nsa_selection, nsa_topk
from .projections import ProjectedAttention, add_projections, meta_forward
from .registry import POSITIONS_SHARED, Mechanism, register
from .rotary import rotary_qkv
from .sharding import whole_sequence

__all__ = [  # the NSA functions lived here before nsa_branches.py and nsa_fla.py: importing them from here still works
    "COMPRESSORS",
    "NSAAttention",
    "NSACache",
    "nsa",
    "nsa_compressed_heads",
    "nsa_compression",
    "nsa_heads",
    "nsa_select_heads",
    "nsa_selection",
    "nsa_topk",
]

COMPRESSORS = ("mean", "mlp")


class NSACache(KVCache):
    """Decoding state of ``NSAAttention``: every key and value (any block may be selected) and the compressed key
    and value of each completed block."""

    def __init__(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(batch, None, device, dtype)
        self.k_cmp: torch.Tensor | None = None
        self.v_cmp: torch.Tensor | None = None

    @property
    def num_compressed(self) -> int:
        return 0 if self.k_cmp is None else self.k_cmp.shape[2]


@whole_sequence()
class NSAAttention(ProjectedAttention):
    """``NSAAttention(dim, num_heads, num_kv_heads=None, block_size=64, block_counts=16, window_size=512,
    compress="mean", rope=True, qkv_bias=False)``: causal NSA self-attention of ``x (B, N, dim)`` with RoPE and GQA.

    Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention"
    (arXiv 2502.11089); fla's ``NativeSparseAttention`` (fla-org/flash-linear-attention). Compressed-block, selected-
    block and sliding-window attention summed with sigmoid gates from ``x`` (see the module docstring). Defaults:
    fla's layer (blocks of 64, 16 selected blocks including block 0 and the two local ones, window 512, mean
    compression); the selection is shared by the ``num_heads / num_kv_heads`` query heads of a KV head.

    Args:
        dim: Model width, a positive multiple of ``num_heads`` (an even head dim with ``rope=True``).
        num_heads: Number of query heads, >= 1.
        num_kv_heads: Number of key/value heads (GQA), dividing ``num_heads``; None (default): ``num_heads``.
        block_size: Tokens per compression and selection block, >= 1 (default 64).
        block_counts: Blocks selected per query, the three forced ones included, >= 3 (default 16).
        window_size: Sliding-window keys, the query included, >= 0 (default 512; 0: no window branch).
        compress: ``"mean"`` (default, fla) or ``"mlp"`` (learned: a per-KV-head position embedding added in the
            block, then ``Linear(BS d, BS d) -> ReLU -> Linear(BS d, d)``, separate for keys and values; lucidrains).
        rope: Rotary position embeddings (default True).
        qkv_bias: Biases on the q/k/v projections (default False).

    Raises:
        TypeError: ``block_size``, ``block_counts``, ``window_size`` or ``num_kv_heads`` is not an int.
        ValueError: ``block_size`` < 1, ``block_counts`` < 3, ``window_size`` < 0; an unknown ``compress``; ``dim``
            is not a positive multiple of ``num_heads``; ``num_kv_heads`` does not divide ``num_heads``.

    Examples:
        >>> import torch
        >>> from nearfar import NSAAttention
        >>> layer = NSAAttention(64, 8, num_kv_heads=2, block_size=8, block_counts=4, window_size=16)
        >>> x = torch.randn(2, 50, 64)
        >>> y = layer(x)
        >>> cache = layer.new_cache(2)
        >>> steps = [layer(x[:, :21], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(21, 50)]
        >>> torch.allclose(torch.cat(steps, 1), y, atol=1e-5)
        True
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, block_size: int = 64,
                 block_counts: int = 16, window_size: int = 512, compress: str = "mean", rope: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        self.block_size = check_positive_int(block_size, "block_size")
        self.block_counts = check_int_range(block_counts, "block_counts", 3, 2 ** 31 - 1)
        self.window_size = check_nonneg_int(window_size, "window_size")
        self.compress = check_choice(compress, "compress", COMPRESSORS)
        add_projections(self, dim, num_heads, num_kv_heads, qkv_bias, rope)
        self.g_proj = nn.Linear(dim, 3 * num_heads, bias=False)
        self.causal = True
        if compress == "mlp":
            width = self.block_size * self.head_dim
            self.k_pe = nn.Parameter(torch.zeros(self.num_kv_heads, self.block_size, self.head_dim))
            self.v_pe = nn.Parameter(torch.zeros(self.num_kv_heads, self.block_size, self.head_dim))
            self.k_mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.head_dim))
            self.v_mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.head_dim))

    def compress_blocks(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed keys and values of whole blocks: ``k, v (B, Hkv, C * BS, d)`` -> ``(B, Hkv, C, d)`` each."""
        bs = self.block_size
        if self.compress == "mean":
            return pool_blocks(k, bs), pool_blocks(v, bs)
        b, h, n, d = k.shape

        def mlp(x: torch.Tensor, pe: torch.Tensor, net: nn.Module) -> torch.Tensor:
            blocks = x.reshape(b, h, n // bs, bs, d) + pe[:, None].to(x.dtype)
            return net(blocks.reshape(b, h, n // bs, bs * d))

        return mlp(k, self.k_pe, self.k_mlp), mlp(v, self.v_pe, self.v_mlp)

    def new_cache(self, batch: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> NSACache:
        """An empty decoding state for ``batch`` sequences.

        Args:
            batch: Number of sequences, >= 1.
            device: The state's device; None (default): fixed by the first call.
            dtype: The state's dtype; None (default): fixed by the first call.

        Returns:
            An ``NSACache`` (all keys and values, and the compressed key and value of every completed block).
        """
        return NSACache(batch, device, dtype)

    def forward(self, x: torch.Tensor, cache: NSACache | None = None) -> torch.Tensor:
        """Causal NSA attention of ``x``, or the next tokens of each sequence through ``cache``.

        Args:
            x: Input ``(B, N, dim)``, ``N >= 1``: whole sequences, or with ``cache`` the next ``N`` tokens.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).

        Returns:
            The output ``(B, N, dim)``.

        Raises:
            ValueError: ``x`` is not ``(B, N >= 1, dim)``; ``cache`` made for another batch, device or dtype.
            TypeError: ``cache`` does not come from ``new_cache``.
        """
        if x.device.type == "meta" and cache is None:  # the routing reads values: shapes only (a cache checks devices)
            return meta_forward(self, x)
        check_tokens(x, self.dim)
        cache = NSACache.checked(cache, x)
        n, bs = x.shape[1], self.block_size
        q, k, v, _ = rotary_qkv(self, x, 0 if cache is None else cache.length)
        gates = torch.sigmoid(self.g_proj(x)).view(*x.shape[:2], self.num_heads, 3).permute(3, 0, 2, 1)[..., None]
        if cache is None:
            done = n // bs
            k_cmp, v_cmp = self.compress_blocks(k[:, :, :done * bs], v[:, :, :done * bs])
        else:
            cache.append(k, v)
            ck, cv = cache.k, cache.v
            assert ck is not None and cv is not None  # appended just now
            k, v = ck, cv
            done, c0 = cache.length // bs, cache.num_compressed
            if done > c0:
                kc, vc = self.compress_blocks(k[:, :, c0 * bs:done * bs], v[:, :, c0 * bs:done * bs])
                cache.k_cmp = kc if cache.k_cmp is None else torch.cat([cache.k_cmp, kc], 2)
                cache.v_cmp = vc if cache.v_cmp is None else torch.cat([cache.v_cmp, vc], 2)
            if cache.k_cmp is None:
                cache.k_cmp, cache.v_cmp = self.compress_blocks(k[:, :, :0], v[:, :, :0])
            assert cache.k_cmp is not None and cache.v_cmp is not None  # set together just now
            k_cmp, v_cmp = cache.k_cmp, cache.v_cmp
        out, _ = nsa_heads(q, k, v, k_cmp, v_cmp, (gates[0], gates[1], gates[2]), bs, self.block_counts,
                           self.window_size)
        return self.o_proj(merge_heads(out, (n,)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block_size={self.block_size}, block_counts={self.block_counts}, window_size={self.window_size}, "
                f"compress={self.compress!r}")


register(Mechanism(
    name="nsa", paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention "
                      "(arXiv 2502.11089, 2025)",
    repo="fla-org/flash-linear-attention (fla/layers/nsa.py; no official code from the authors)", family="routed",
    dims=("1d",), cls=NSAAttention, patterns={"CS": {}}, why_not={
        "NS": "the paper and fla define the causal form only (compressed blocks become visible once complete, the "
              "selection is forced to the query's own and previous block)",
        "NC": "the selection and the window are defined relative to the query's position among its own keys; the "
              "paper defines no second source", "CC": POSITIONS_SHARED},
    make=lambda dim, num_heads, **kw: NSAAttention(dim, num_heads, **kw),
    notes="fla's layer defaults: blocks of 64 (mean compression), 16 selected blocks shared per KV head (block 0 and "
          "the two local ones forced), window 512, sigmoid gates per head; O(N (N/64 + 16*64 + 512) d) through "
          "attend's block-sparse engine; decode cache: all keys plus one compressed key per completed block"))
