"""FITAR: the causal (autoregressive) Far-reaching Interleaved Transformer, as a small language model.

Paper: Chen & Li, "FIT: Far-reaching Interleaved Transformers" (2023).
Official code: google-research/pix2seq ``architectures/transformers.py`` (``FITAR``, ``get_layer_config``,
``get_chunk_ar_mask``), TF/Keras.

    lm = FITAR(vocab_size=256, group_size=16, latents_per_group=4, layers="(1)1(1)")
    logits = lm(tokens)          # (B, N) -> (B, N, vocab_size), causal
    loss = lm.loss(tokens)       # next-token cross-entropy

The ``N`` tokens are split into ``t = ceil(N / n)`` groups of ``n = group_size`` tokens; every group owns
``m = latents_per_group`` latents. The layer string ``"(a1)b1(a2)b2..."`` gives, per block ``i``, ``a_i`` local
layers then ``b_i`` global layers (``b_i`` may be left out: 0). Per block:

1. local: ``a_i`` pre-norm layers on each group alone, causal inside the group (``nearfar.attend`` with ``Causal``
   on ``(B*t, n)``);
2. read (only if ``b_i > 0``): latents of group ``g`` cross-attend to *all* tokens of group ``g`` (no mask, as the
   official ``l2x_cross_attn``): this does not leak, since what a group's latents learn only reaches later groups;
3. global (only if ``b_i > 0``): ``b_i`` layers over all ``t*m`` latents with the block-causal mask
   ``tril(ones(t, t)) ⊗ ones(m, m)`` (``Causal() | BlockWindow(m, 0, 0)``, the official ``get_chunk_ar_mask``);
4. write (only if ``b_i > 0`` and not the last block): the latents are shifted by one group, so tokens of group ``g``
   cross-attend to the latents of group ``g - 1`` and group 0 reads zeros; the unshifted latents go on to the next
   block (the official ``_latent_shift`` / ``_latent_shift_back``).

Logits come from the final norm of the tokens and the tied token embedding. Perturbing tokens of group ``g`` or
later never changes the logits of positions before group ``g`` (tested).

Lengths: ``N`` need not be a multiple of ``group_size``: the tokens are right-padded with token 0 to ``t*n`` and the
logits of the padding are dropped. This is exact, not an approximation: the padding sits after every real token,
real tokens never see later tokens of their group, and the latents of the last group (the only ones that read the
padding) are dropped by the shift. So the logits of a length-``N`` input equal the first ``N`` rows for any
continuation (tested).

Decoding (``forward(tokens, cache=lm.new_cache(B))``, any number of tokens per call) works as follows: the
local layers keep a KV cache of the current group only (at most ``n`` keys, reset at each group start); each block
with a write keeps the current group's token states (the read's input) and the previous group's latents (the
write's source); when a group is complete its latents are read, pass the global layers, which keep a KV cache of
every finished group's latents (``t*m`` keys), and become the write source of the next group. Decoding equals the
teacher-forced logits (tested); the state is ``O(n + (N/n) m)`` vectors per layer, not ``O(N)``.

Differences from the official code (all deliberate, to reuse ``tiny_lm``'s pieces):
- Positions: the official adds learned absolute embeddings (``x_pos_emb`` per position inside a group,
  ``latent_pos_emb`` per (group, latent), which fixes the number of groups). Here the local layers use RoPE on the
  position inside the group (0..n-1, the same information as ``x_pos_emb``), the latents start from one learned
  ``(m, latent_dim)`` table shared by every group, and the global layers use RoPE on the flat latent index
  ``g*m + j`` (tells the groups apart), so any number of groups works.
- Layers are ``tiny_lm.Block`` (RMSNorm, SwiGLU with TinyLM's hidden size, no biases) instead of the official
  LayerNorm + GELU MLP (``mlp_ratio``); no dropout / drop path; one ``num_heads`` for tokens, latents and the
  cross-attentions (the official has ``x_num_heads``, ``latent_num_heads`` and uses their min for cross-attention).
- Cross-attention (read and write) is pre-norm on both sides (RMSNorm on the queries and on the keys/values, as the
  official ``use_enc_ln=True``), inner width ``min(dim, latent_dim)`` (as the official ``dim_x_att``), residual, no
  MLP, no positions. Because RMSNorm of zeros is zero and there are no biases, group 0's write adds exactly 0 (the
  official LayerNorm of zeros is its bias, a constant). Consequence: with one group (``t = 1``) the logits are
  exactly those of the plain causal Transformer made of the local layers; the latent path only matters for ``t >= 2``.
- A last block with global layers (e.g. ``"(2)1"``) has no write, so its read and global layers cannot change the
  logits: they are built (same parameters as the official) but skipped in ``forward`` (they get no gradient); the
  official computes them and drops the result.
- No output bias (official ``output_bias=True``); always a tied embedding (official ``shared_embedding=True``).
- The official takes a fixed ``x_size``; here any length works (padding above). The official's unused
  ``l_output_ln`` is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_dim_heads, check_positive_int
from ..functional import attend, merge_heads, split_heads
from ..layers.kv_cache import DecodeState
from ..layers.pattern_attention import PatternAttention
from ..layers.registry import DECODER_ONLY, Mechanism, register
from ..layers.sharding import whole_sequence
from ..patterns import BlockWindow, Causal, Pattern
from .tiny_lm import Block, check_token_ids, layer_caches

_LAYERS = re.compile(r"\((\d+)\)(\d*)")


def parse_layers(layers: str) -> list[tuple[int, int]]:
    """``"(a1)b1(a2)b2..."`` -> ``[(a1, b1), (a2, b2), ...]`` (a missing ``b`` is 0), as the official
    ``get_layer_config``."""
    if not isinstance(layers, str):
        raise TypeError(f"layers must be a string like '(2)4(2)', got {type(layers).__name__}")
    if not layers or _LAYERS.sub("", layers) != "":
        raise ValueError(f"layers must look like '(a1)b1(a2)b2...' with non-negative integers, got {layers!r}")
    config = [(int(a), int(b or 0)) for a, b in _LAYERS.findall(layers)]
    if sum(a + b for a, b in config) == 0:
        raise ValueError(f"layers must contain at least one layer, got {layers!r}")
    return config


def latent_pattern(latents_per_group: int) -> Pattern:
    """Block-causal pattern over the flat latents: latent ``i`` sees latent ``j`` iff ``j // m <= i // m``."""
    return Causal() | BlockWindow(latents_per_group, before=0, after=0)


class GroupCrossAttention(nn.Module):
    """Residual pre-norm cross-attention of ``x (B', Nq, dim)`` over ``mem (B', Nk, mem_dim)``, inner width
    ``min(dim, mem_dim)``, no positions, no mask (each batch row is one group)."""

    def __init__(self, dim: int, mem_dim: int, num_heads: int):
        super().__init__()
        inner = min(dim, mem_dim)
        check_dim_heads(inner, num_heads)
        self.num_heads = num_heads
        self.q_norm, self.kv_norm = nn.RMSNorm(dim), nn.RMSNorm(mem_dim)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(mem_dim, inner, bias=False)
        self.v_proj = nn.Linear(mem_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        mem = self.kv_norm(mem)
        q = split_heads(self.q_proj(self.q_norm(x)), self.num_heads)
        k, v = split_heads(self.k_proj(mem), self.num_heads), split_heads(self.v_proj(mem), self.num_heads)
        return x + self.o_proj(merge_heads(attend(q, k, v), (x.shape[1],)))


@whole_sequence(channels=False)
class FITAR(nn.Module):
    """``FITAR(vocab_size, group_size=16, latents_per_group=4, dim=128, latent_dim=128, layers="(1)1(1)",
    num_heads=4, mlp_hidden=None)``: tokens ``(B, N)`` -> logits ``(B, N, vocab_size)``, causal. See the module
    docstring for the structure and the differences from the official code.

    Args:
        vocab_size: Vocabulary size.
        group_size: Tokens per group.
        latents_per_group: Latent tokens per group.
        dim: Width of the local (token) layers.
        latent_dim: Width of the global (latent) layers.
        layers: The layer string, e.g. ``"(1)1(1)"`` (see the module docstring).
        num_heads: Attention heads.
        mlp_hidden: MLP hidden width (default from the widths).

    Examples:
        >>> import torch, nearfar as nf
        >>> model = nf.FITAR(256, group_size=8, latents_per_group=2, dim=64, latent_dim=64)
        >>> tokens = torch.randint(0, 256, (2, 32))
        >>> model(tokens).shape
        torch.Size([2, 32, 256])
    """

    def __init__(self, vocab_size: int, group_size: int = 16, latents_per_group: int = 4, dim: int = 128,
                 latent_dim: int = 128, layers: str = "(1)1(1)", num_heads: int = 4, mlp_hidden: int | None = None):
        super().__init__()
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.group_size = check_positive_int(group_size, "group_size")
        self.latents_per_group = check_positive_int(latents_per_group, "latents_per_group")
        check_dim_heads(dim, num_heads)
        check_dim_heads(latent_dim, num_heads)
        check_dim_heads(min(dim, latent_dim), num_heads)
        self.layer_config = parse_layers(layers)
        self.dim, self.latent_dim, self.num_heads = dim, latent_dim, num_heads
        hid, lhid = (mlp_hidden or 64 * ((8 * d // 3 + 63) // 64) for d in (dim, latent_dim))
        self.latent_pattern = latent_pattern(self.latents_per_group)

        self.embed = nn.Embedding(vocab_size, dim)
        self.latent_emb = nn.Parameter(torch.empty(self.latents_per_group, latent_dim))
        last = len(self.layer_config) - 1
        self.local = nn.ModuleList()  # per block: its local layers (maybe none)
        # per block with global layers, keyed by block index: read, global layers, write (not after the last block)
        self.read, self.latent_blocks, self.write = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for i, (a, b) in enumerate(self.layer_config):
            self.local.append(nn.ModuleList(
                Block(dim, PatternAttention(dim, num_heads, Causal()), hid) for _ in range(a)))
            if b > 0:
                self.read[str(i)] = GroupCrossAttention(latent_dim, dim, num_heads)
                self.latent_blocks[str(i)] = nn.ModuleList(
                    Block(latent_dim, PatternAttention(latent_dim, num_heads, self.latent_pattern), lhid)
                    for _ in range(b))
                if i < last:
                    self.write[str(i)] = GroupCrossAttention(dim, latent_dim, num_heads)
        self.norm = nn.RMSNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.latent_emb, std=0.02)

    def _local_stacks(self) -> Iterable[nn.ModuleList]:
        return cast("Iterable[nn.ModuleList]", self.local)  # a ModuleList of Blocks per block of the config

    def _latent_stack(self, key: str) -> nn.ModuleList:
        return cast(nn.ModuleList, self.latent_blocks[key])

    def latent_mask(self, num_groups: int) -> torch.Tensor:
        """The bool ``(t*m, t*m)`` mask of the global layers (True = may attend)."""
        t = check_positive_int(num_groups, "num_groups")
        n = t * self.latents_per_group
        return self.latent_pattern.mask(n, n, device=self.latent_emb.device)

    def _check_tokens(self, tokens: object, cache: object = None) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor (B, N) of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor (B, N) of token ids, got {tokens.dtype}")
        if tokens.dim() != 2 or 0 in tokens.shape:
            raise ValueError(f"tokens must be a non-empty (B, N) tensor, got shape {tuple(tokens.shape)}")
        # before the ids are read (they may be on another device); ids have no float dtype to match, the layers'
        # own caches check the float states
        FITCache.checked(cache, tokens, name="tokens", dtype=False)
        check_token_ids(tokens, self.vocab_size, "tokens")
        return tokens.long()

    def new_cache(self, batch: int = 1) -> FITCache:
        """An empty decoding state for ``batch`` sequences (see the module docstring).

        Args:
            batch: Number of sequences, >= 1 (default 1).

        Returns:
            A ``FITCache`` to pass to ``forward`` as ``cache``.
        """
        return FITCache(self, batch)

    def forward(self, tokens: torch.Tensor, cache: FITCache | None = None) -> torch.Tensor:
        """Next-token logits of ``tokens``, or of the next tokens of each sequence through ``cache``.

        Args:
            tokens: Token ids ``(B, N)``, a non-empty integer tensor, ids in ``[0, vocab_size)``; ``N`` need not be a
                multiple of ``group_size``.
            cache: A decoding state from ``new_cache`` (None, the default: whole sequences).

        Returns:
            Logits ``(B, N, vocab_size)``.

        Raises:
            TypeError: ``tokens`` is not an integer tensor; ``cache`` does not come from ``new_cache``.
            ValueError: ``tokens`` is not a non-empty ``(B, N)`` tensor or holds an id outside ``[0, vocab_size)``;
                ``cache`` made for another batch or device.
        """
        tokens = self._check_tokens(tokens, cache)
        if cache is not None:
            return self._decode(tokens, cache)
        bsz, length = tokens.shape
        n, m = self.group_size, self.latents_per_group
        t = (length + n - 1) // n
        if t * n != length:  # exact: see the module docstring
            tokens = F.pad(tokens, (0, t * n - length))
        x = self.embed(tokens).reshape(bsz * t, n, self.dim)
        latents = self.latent_emb.expand(bsz * t, m, self.latent_dim)
        for i, blocks in enumerate(self._local_stacks()):
            for block in blocks:
                x = block(x)
            key = str(i)
            if key not in self.write:  # no write after: this block's read and global layers cannot reach the logits
                continue
            latents = self.read[key](latents, x).reshape(bsz, t * m, self.latent_dim)
            for block in self._latent_stack(key):
                latents = block(latents)
            # group g reads the latents of group g-1, group 0 zeros: no token sees its own or a later group
            prev = latents.reshape(bsz, t, m, self.latent_dim)[:, :-1]
            prev = torch.cat([prev.new_zeros(bsz, 1, m, self.latent_dim), prev], 1)
            x = self.write[key](x, prev.reshape(bsz * t, m, self.latent_dim))
            latents = latents.reshape(bsz * t, m, self.latent_dim)
        x = x.reshape(bsz, t * n, self.dim)[:, :length]
        return F.linear(self.norm(x), self.embed.weight)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy of ``tokens (B, N)``, ``N >= 2``.

        Args:
            tokens: Token ids ``(B, N)``, ``N >= 2`` (as ``forward``).

        Returns:
            The mean cross-entropy, a scalar tensor.

        Raises:
            TypeError: What ``forward`` raises.
            ValueError: ``N < 2``; what ``forward`` raises.

        Examples:
            >>> import torch, nearfar as nf
            >>> model = nf.FITAR(256, group_size=8, latents_per_group=2, dim=64, latent_dim=64)
            >>> model.loss(torch.randint(0, 256, (2, 20))).shape
            torch.Size([])
        """
        tokens = self._check_tokens(tokens)
        if tokens.shape[1] < 2:
            raise ValueError(f"loss needs sequences of at least 2 tokens, got N={tokens.shape[1]}")
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def _decode(self, tokens: torch.Tensor, cache: FITCache) -> torch.Tensor:
        n, outs, i = self.group_size, [], 0
        while i < tokens.shape[1]:  # segments that stay inside one group
            start = cache.length % n
            seg = min(n - start, tokens.shape[1] - i)
            if start == 0:
                cache.local = [layer_caches(blocks, cache.batch) for blocks in self._local_stacks()]
            x = self.embed(tokens[:, i:i + seg])
            for b, blocks in enumerate(self._local_stacks()):
                for block, layer_cache in zip(blocks, cache.local[b]):
                    x = block(x, layer_cache)
                key = str(b)
                if key in self.write:
                    cache.group_x[key].append(x)
                    x = self.write[key](x, cache.prev[key])
            outs.append(x)
            cache.length, i = cache.length + seg, i + seg
            if cache.length % n == 0:
                self._close_group(cache)
        x = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return F.linear(self.norm(x), self.embed.weight)

    def _close_group(self, cache: FITCache) -> None:
        """A group is complete: its latents read its tokens, pass the global layers and become the next group's
        write source, block by block as in ``forward``."""
        latents = self.latent_emb.expand(cache.batch, self.latents_per_group, self.latent_dim)
        for key in self.write:
            group = torch.cat(cache.group_x[key], 1)
            cache.group_x[key] = []
            latents = self.read[key](latents, group)
            for block, layer_cache in zip(self._latent_stack(key), cache.latent[key]):
                latents = block(latents, layer_cache)
            cache.prev[key] = latents

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding through the cache: the prompt in one call, then one token per call.

        Args:
            prompt: Token ids ``(B, P)``, ``P >= 1`` (as ``forward``).
            max_new_tokens: Number of tokens to generate, >= 1.

        Returns:
            ``(B, P + max_new_tokens)``: the prompt followed by the greedy tokens.

        Raises:
            TypeError: What ``forward`` raises; ``max_new_tokens`` is not an int.
            ValueError: What ``forward`` raises; ``max_new_tokens`` < 1.

        Examples:
            >>> import torch, nearfar as nf
            >>> model = nf.FITAR(256, group_size=8, latents_per_group=2, dim=64, latent_dim=64)
            >>> model.generate(torch.randint(0, 256, (2, 5)), max_new_tokens=6).shape
            torch.Size([2, 11])
        """
        prompt = self._check_tokens(prompt)
        steps = check_positive_int(max_new_tokens, "max_new_tokens")
        cache = self.new_cache(prompt.shape[0])
        logits, out = self(prompt, cache), [prompt]
        for _ in range(steps):
            out.append(logits[:, -1:].argmax(-1))
            logits = self(out[-1], cache)
        return torch.cat(out, 1)


class FITCache(DecodeState):
    """FITAR's decoding state (see the module docstring): ``local`` KV caches of the current group per local layer,
    per block with a write the current group's token states ``group_x`` and the previous group's latents ``prev``,
    and ``latent`` KV caches of the finished groups' latents per global layer."""

    def __init__(self, model: FITAR, batch: int):
        p = model.latent_emb
        super().__init__(batch, p.device)  # its tensors are made here, on the model's device
        self.length = 0
        self.local = [layer_caches(blocks, self.batch) for blocks in model._local_stacks()]
        self.group_x: dict[str, list[torch.Tensor]] = {key: [] for key in model.write}
        self.prev = {key: p.new_zeros(self.batch, model.latents_per_group, model.latent_dim) for key in model.write}
        self.latent = {key: layer_caches(model._latent_stack(key), self.batch) for key in model.write}

    def nbytes(self) -> int:
        caches = [c for blocks in self.local for c in blocks] + [c for cs in self.latent.values() for c in cs]
        return (sum(c.nbytes() for c in caches) + sum(t.nbytes for t in self.prev.values())
                + sum(t.nbytes for xs in self.group_x.values() for t in xs))


register(Mechanism(
    name="fit_ar", paper="FIT: Far-reaching Interleaved Transformers (2023)", repo="google-research/pix2seq",
    family="local+global", dims=("1d",), kind="model", cls=FITAR,
    make=lambda dim, num_heads, vocab_size=256, **kw: FITAR(vocab_size, dim=dim, latent_dim=dim, num_heads=num_heads,
                                                             **kw),
    patterns={"CS": {}}, why_not={
        "NS": "only the autoregressive FIT-AR is implemented (the non-causal FIT for images is not)",
        "NC": DECODER_ONLY, "CC": DECODER_ONLY},
    notes="a whole LM: local causal layers on groups of 16 tokens, global layers on 4 latents per group, read/write "
          "cross-attention; decode state: the current group + every finished group's latents"))
