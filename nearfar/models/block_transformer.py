"""Block Transformer: a global-to-local LM (a coarse causal decoder over blocks, a small decoder inside each block).

Paper: Ho et al., "Block Transformer: Global-to-Local Language Modeling for Fast Inference" (NeurIPS 2024).
Code: itsnamgyu/block-transformer, ``model/block_transformer.py``, ``model/embedder/lookup.py``,
``model/token_decoder/gpt_neo_x.py``, ``model/block_decoder/base.py``.

    lm = BlockTransformer(vocab_size=256, block_len=4)
    loss = lm.loss(tokens)                       # (B, N), N a multiple of block_len; block 0 is context only
    out = lm.generate(prompt, max_new_blocks=8)  # greedy, one block-decoder step per block

Structure (the official main configuration: lookup/concat embedder, ``prefix`` decoding, ``expansion_layer``):
- embedder: table ``V x dim_block/block_len``; a block's vector is the concatenation of its tokens' embeddings;
- block decoder: pre-norm blocks (``tiny_lm.Block``: RMSNorm, causal ``PatternAttention`` with RoPE over block
  positions, SwiGLU) and a final RMSNorm; ``h_b`` is the context of block ``b + 1``;
- token decoder: for block ``b + 1`` the short sequence ``[P(h_b) (r vectors), emb(x_{b+1,0}), ..,
  emb(x_{b+1,L-2})]`` with ``P(h) = reshape(W_exp h + c, [r, dim_token])`` goes through its own pre-norm blocks,
  causal inside that sequence only (RoPE positions 0 .. r+L-2); positions ``r-1 ..`` predict the block's tokens.

Differences from the official code:
- layers are LLaMA-style (RMSNorm, SwiGLU, no biases) built from ``tiny_lm`` instead of GPT-NeoX (LayerNorm,
  GELU MLP, parallel residual, partial rotary); the output head is an untied Linear as in GPT-NeoX;
- ``random_pad_first_block`` is not implemented: block 0 is never a target, so the first ``block_len`` tokens of
  every sequence give context only (the caller may left-pad data itself); there is no padding mask, so fully padded
  blocks are not skipped;
- ``generate`` needs a prompt whose length is a multiple of ``block_len`` (the official code left-pads the prompt
  with the pad token; do that before calling, with whatever pad token the data uses);
- only the ``prefix`` decoding strategy and one embedding vector per block; no auxiliary losses (off in the main
  configs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_int
from ..layers.kv_cache import KVCache
from ..layers.pattern_attention import PatternAttention
from ..layers.registry import DECODER_ONLY, Mechanism, register
from ..layers.sharding import not_sharded
from ..patterns import Causal
from .tiny_lm import Block, check_token_ids, layer_caches


def _decoder(dim: int, depth: int, num_heads: int) -> nn.ModuleList:
    hidden = 64 * ((8 * dim // 3 + 63) // 64)  # TinyLM's SwiGLU width
    return nn.ModuleList(Block(dim, PatternAttention(dim, num_heads, Causal()), hidden) for _ in range(depth))


def _run(blocks: nn.ModuleList, x: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
    for i, block in enumerate(blocks):
        x = block(x, None if caches is None else caches[i])
    return x


@not_sharded("its logits start at the second block, so they are not aligned with its input tokens; run it "
             "on one process", methods=("forward", "logits", "loss"))
class BlockTransformer(nn.Module):
    """``BlockTransformer(vocab_size, block_len=4, dim_block=128, dim_token=128, depth_block=2, depth_token=2,
    num_heads=4, expansion_ratio=2)``; ``expansion_ratio`` is ``r``, the number of prefix vectors per block.

    Args:
        vocab_size: Vocabulary size.
        block_len: Tokens per block ``L``.
        dim_block: Width of the block decoder.
        dim_token: Width of the token decoder.
        depth_block: Layers of the block decoder.
        depth_token: Layers of the token decoder.
        num_heads: Attention heads.
        expansion_ratio: ``r``, prefix vectors per block.

    Examples:
        >>> import torch, nearfar as nf
        >>> model = nf.BlockTransformer(256, block_len=4, dim_block=64, dim_token=64)
        >>> tokens = torch.randint(0, 256, (2, 32))
        >>> model.logits(tokens).shape   # block 0 is context
        torch.Size([2, 28, 256])
        >>> model.generate(tokens[:, :8], max_new_blocks=2).shape
        torch.Size([2, 16])
    """

    def __init__(self, vocab_size: int, block_len: int = 4, dim_block: int = 128, dim_token: int = 128,
                 depth_block: int = 2, depth_token: int = 2, num_heads: int = 4, expansion_ratio: int = 2):
        super().__init__()
        vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.block_len = check_positive_int(block_len, "block_len")
        self.dim_block = check_positive_int(dim_block, "dim_block")
        self.dim_token = check_positive_int(dim_token, "dim_token")
        self.expansion_ratio = check_positive_int(expansion_ratio, "expansion_ratio")
        if dim_block % block_len:
            raise ValueError(f"dim_block ({dim_block}) must be a multiple of block_len ({block_len}): the concat "
                             f"embedder gives each token dim_block / block_len channels")
        self.vocab_size = vocab_size
        self.block_embed = nn.Embedding(vocab_size, dim_block // block_len)
        self.block_decoder = _decoder(dim_block, check_positive_int(depth_block, "depth_block"), num_heads)
        self.block_norm = nn.RMSNorm(dim_block)
        self.expand = nn.Linear(dim_block, self.expansion_ratio * dim_token)
        self.token_embed = nn.Embedding(vocab_size, dim_token)
        self.token_decoder = _decoder(dim_token, check_positive_int(depth_token, "depth_token"), num_heads)
        self.token_norm = nn.RMSNorm(dim_token)
        self.lm_head = nn.Linear(dim_token, vocab_size, bias=False)
        nn.init.normal_(self.block_embed.weight, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.expand.weight, std=dim_block ** -0.5)
        nn.init.zeros_(self.expand.bias)

    # -- pieces -------------------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: object, name: str, min_blocks: int) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"{name} must be an integer tensor (B, N), got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        n, L = tokens.shape[1], self.block_len
        if n % L or n < min_blocks * L:
            raise ValueError(f"{name} length must be a multiple of block_len ({L}) and at least {min_blocks * L} "
                             f"(left-pad it to a block boundary), got {n}")
        check_token_ids(tokens, self.vocab_size, name)
        return tokens.long()

    def embed_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, M*L)`` token ids -> ``(B, M, dim_block)`` block vectors (concatenated token embeddings)."""
        return self.block_embed(tokens).reshape(tokens.shape[0], -1, self.dim_block)

    def contexts(self, blocks: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Block decoder: ``(B, M, dim_block)`` block vectors -> context embeddings ``h`` (same shape)."""
        return self.block_norm(_run(self.block_decoder, blocks, caches))

    def prefix(self, h: torch.Tensor) -> torch.Tensor:
        """``(..., dim_block)`` contexts -> ``(..., r, dim_token)`` prefix vectors of the token decoder."""
        return self.expand(h).reshape(*h.shape[:-1], self.expansion_ratio, self.dim_token)

    def decode_tokens(self, h: torch.Tensor, block_tokens: torch.Tensor) -> torch.Tensor:
        """Token decoder, teacher-forced: contexts ``h (B', dim_block)`` and the ``L`` tokens of the block each
        one predicts ``(B', L)`` -> logits ``(B', L, V)`` (the last token is only a target, never an input)."""
        x = torch.cat([self.prefix(h), self.token_embed(block_tokens[:, :-1])], 1)
        x = _run(self.token_decoder, x, None)[:, self.expansion_ratio - 1:]
        return self.lm_head(self.token_norm(x))

    # -- teacher forcing ----------------------------------------------------------------------------------------
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, M*L)`` -> logits ``(B, (M-1)*L, V)`` of tokens ``L ..`` (blocks 1 .. M-1); block 0 is context.

        Also the model's ``forward``.

        Args:
            tokens: Token ids ``(B, M*L)``, an integer tensor with ``M >= 2`` blocks of ``L = block_len`` tokens.

        Returns:
            Logits ``(B, (M-1)*L, vocab_size)`` of the tokens of blocks 1 .. M-1.

        Raises:
            ValueError: ``tokens`` is not an integer ``(B, N)`` tensor, ``N`` is not a multiple of ``block_len`` or
                shorter than two blocks, or a token id is outside ``[0, vocab_size)``.
        """
        tokens = self._check_tokens(tokens, "tokens", 2)
        B, L = tokens.shape[0], self.block_len
        h = self.contexts(self.embed_blocks(tokens[:, :-L]))  # h_b for b = 0 .. M-2
        targets = tokens[:, L:].reshape(-1, L)
        return self.decode_tokens(h.reshape(-1, self.dim_block), targets).reshape(B, -1, self.vocab_size)

    forward = logits

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over blocks 1 .. M-1.

        Args:
            tokens: Token ids ``(B, M*L)``, ``M >= 2`` blocks (as ``logits``).

        Returns:
            The mean cross-entropy, a scalar tensor.

        Raises:
            ValueError: What ``logits`` raises.

        Examples:
            >>> import torch, nearfar as nf
            >>> model = nf.BlockTransformer(256, block_len=4, dim_block=64, dim_token=64)
            >>> model.loss(torch.randint(0, 256, (2, 16))).shape
            torch.Size([])
        """
        logits = self.logits(tokens)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), tokens[:, self.block_len:].reshape(-1).long())

    # -- decoding -----------------------------------------------------------------------------------------------
    def new_caches(self, decoder: nn.ModuleList, batch: int) -> list[KVCache]:
        """Empty caches of ``decoder`` (``self.block_decoder`` or ``self.token_decoder``) for ``batch`` sequences."""
        return layer_caches(decoder, batch)

    def _generate_block(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Greedy tokens ``(B, L)`` and their logits ``(B, L, V)`` from contexts ``h (B, dim_block)``, with a
        token-decoder cache that lives for this block only; also its largest key count."""
        caches = self.new_caches(self.token_decoder, h.shape[0])
        x, toks, logits, most = self.prefix(h), [], [], 0
        for _ in range(self.block_len):
            step = self.lm_head(self.token_norm(_run(self.token_decoder, x, caches)[:, -1]))
            most = max(most, max(c.size for c in caches))
            logits.append(step)
            toks.append(step.argmax(-1))
            if len(toks) < self.block_len:  # the block's last token is never a token-decoder input
                x = self.token_embed(toks[-1])[:, None]
        return torch.stack(toks, 1), torch.stack(logits, 1), most

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_blocks: int,
                 return_info: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, object]]:
        """Greedy decoding of ``max_new_blocks * block_len`` tokens after ``prompt (B, P)`` (``P`` a positive
        multiple of ``block_len``: left-pad it). The prompt's blocks go through the block decoder's cache in one
        step, then one step per generated block. ``return_info=True`` also returns a dict with ``logits``
        ``(B, new, V)``, ``token_cache_sizes`` (largest token-decoder key count of each block) and
        ``block_cache_sizes`` (block-decoder key count when each block was decoded).

        Args:
            prompt: Token ids ``(B, P)``, ``P`` a positive multiple of ``block_len``.
            max_new_blocks: Blocks to generate, >= 1.
            return_info: Also return the dict described above (default False).

        Returns:
            ``(B, P + max_new_blocks * block_len)`` tokens, or ``(tokens, info)`` with ``return_info=True``.

        Raises:
            ValueError: ``prompt`` is not an integer ``(B, P)`` tensor of whole blocks or holds an id outside
                ``[0, vocab_size)``; ``max_new_blocks`` < 1.
            TypeError: ``max_new_blocks`` is not an int.
        """
        prompt = self._check_tokens(prompt, "prompt", 1)
        max_new_blocks = check_positive_int(max_new_blocks, "max_new_blocks")
        block_caches = self.new_caches(self.block_decoder, prompt.shape[0])
        h = self.contexts(self.embed_blocks(prompt), block_caches)[:, -1]
        out, logits, token_sizes, block_sizes = [prompt], [], [], []
        for i in range(max_new_blocks):
            block_sizes.append(block_caches[0].size)
            toks, step_logits, most = self._generate_block(h)
            out.append(toks)
            logits.append(step_logits)
            token_sizes.append(most)
            if i + 1 < max_new_blocks:
                h = self.contexts(self.embed_blocks(toks), block_caches)[:, -1]
        tokens = torch.cat(out, 1)
        if not return_info:
            return tokens
        return tokens, {"logits": torch.cat(logits, 1), "token_cache_sizes": token_sizes,
                        "block_cache_sizes": block_sizes}


register(Mechanism(
    name="block_transformer", paper="Block Transformer: Global-to-Local Language Modeling for Fast Inference "
    "(NeurIPS 2024)", repo="itsnamgyu/block-transformer", family="local+global", dims=("1d",), kind="model",
    cls=BlockTransformer,
    make=lambda dim, num_heads, vocab_size=256, **kw: BlockTransformer(vocab_size, dim_block=dim, dim_token=dim,
                                                                       num_heads=num_heads, **kw),
    patterns={"CS": {}}, why_not={"NS": "an autoregressive LM (block decoder and token decoder are causal)",
                                  "NC": DECODER_ONLY, "CC": DECODER_ONLY},
    notes="a whole LM: a causal block decoder over blocks of 4 tokens and a prefix token decoder inside each block; "
          "decode state: one key per block + at most r + L - 1 token keys"))
