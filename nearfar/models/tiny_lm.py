"""A small decoder-only LM (RMSNorm, SwiGLU, pre-norm blocks) whose attention layer is any registered sequence
mechanism, by name; used by the tests, examples and the benchmark. Decoding runs through each layer's cache.

    lm = TinyLM(vocab_size=256, mechanism="streaming_llm", window=64)
    loss = lm.loss(tokens)                                  # teacher forcing, next-token cross-entropy
    out = lm.generate(prompt, max_new_tokens=32)            # greedy, one token at a time through the caches
    out = lm.generate(prompt, 32, do_sample=True, temperature=0.8, top_p=0.95, generator=g)   # sampled

Sampling follows Hugging Face's ``generate``: greedy unless ``do_sample=True``; then temperature, top-k and top-p
(nucleus) filter the logits in that order (``filter_logits``) and the next token is drawn from the softmax of what
is left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_bool, check_nonneg_int, check_positive_float, check_positive_int, check_real_range
from ..layers.registry import mechanisms


def check_token_ids(tokens: torch.Tensor, vocab_size: int, name: str) -> None:
    """A clear error, before any work, if ``tokens`` holds an id outside ``[0, vocab_size)``: the embedding's own
    error is an IndexError that names neither the argument nor the range."""
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must hold token ids in [0, {vocab_size}) (vocab_size), got "
                             f"{lo if lo < 0 else hi}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Next-token logits ``(..., V)`` divided by ``temperature``, then limited to the ``top_k`` largest (ties with
    the k-th kept) and to the nucleus of ``top_p``: the most probable tokens, in order, until their probability
    reaches ``top_p`` (a token is kept when the tokens before it hold less than ``top_p``; the most probable one
    always is). What is left out becomes ``-inf``; ``softmax`` of the result is the sampling distribution. The order
    and the rules are those of Hugging Face's ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
    ``TopPLogitsWarper`` (``min_tokens_to_keep=1``).

    Args:
        logits: Float logits, the vocabulary last.
        temperature: > 0 (1: unchanged; lower: sharper).
        top_k: Keep the ``top_k`` >= 1 largest logits (None: all; more than ``V``: all).
        top_p: Nucleus mass in ``(0, 1]`` (None or 1: all).

    Returns:
        The filtered logits, same shape and dtype.

    Raises:
        ValueError: ``temperature``, ``top_k`` or ``top_p`` out of range.
        TypeError: one of them of the wrong type.

    Examples:
        >>> import torch
        >>> from nearfar.models.tiny_lm import filter_logits
        >>> filter_logits(torch.tensor([2.0, 1.0, 0.0, -1.0]), top_k=2)
        tensor([2., 1., -inf, -inf])
        >>> filter_logits(torch.log(torch.tensor([0.5, 0.3, 0.2])), top_p=0.7).softmax(-1)
        tensor([0.6250, 0.3750, 0.0000])
    """
    temperature = check_positive_float(temperature, "temperature")
    logits = logits / temperature
    if top_k is not None:
        top_k = min(check_positive_int(top_k, "top_k"), logits.shape[-1])
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and check_real_range(top_p, "top_p", 0, 1, open_low=True) < 1:
        ordered, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the more probable tokens
        drop = before >= top_p
        drop[..., 0] = False  # the most probable token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, hidden: int):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(dim), attn
        self.mlp_norm, self.mlp = nn.RMSNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cache: object = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache=cache)
        return x + self.mlp(self.mlp_norm(x))


def layer_caches(blocks: nn.ModuleList, batch: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> list:
    """One empty decoding cache per ``Block`` of ``blocks``, each made for ``batch`` sequences (and ``device`` /
    ``dtype`` where given): every call with them is checked against that."""
    # Blocks whose attention layer decodes (has new_cache); torch's stubs see plain Modules
    return [cast(Any, b).attn.new_cache(batch, device=device, dtype=dtype) for b in blocks]


class TinyLM(nn.Module):
    """``TinyLM(vocab_size, dim=128, depth=2, num_heads=4, mechanism="streaming_llm", mlp_hidden=None,
    layer_kwargs=None, **mechanism_kwargs)``: tokens ``(B, N)`` -> logits ``(B, N, vocab_size)``; the embedding is
    tied to the output. ``layer_kwargs(i)`` adds per-layer arguments (e.g. S2-Attention's dense every 2nd layer:
    ``nearfar.layers.s2_attention.s2_layer_kwargs``).

    Args:
        vocab_size: Vocabulary size.
        dim: Model width.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mechanism: Registry name of a causal sequence mechanism (CS), e.g. ``"streaming_llm"``, ``"dense"``.
        mlp_hidden: SwiGLU hidden width (default from ``dim``).
        layer_kwargs: Optional ``layer_kwargs(i) -> dict`` of extra arguments for layer ``i``.
        **mechanism_kwargs: Arguments of every attention layer (e.g. ``window=64``).

    Examples:
        >>> import torch, nearfar as nf
        >>> lm = nf.TinyLM(256, dim=64, depth=2, num_heads=4, mechanism="streaming_llm", window=32, sinks=4)
        >>> tokens = torch.randint(0, 256, (2, 40))
        >>> lm(tokens).shape
        torch.Size([2, 40, 256])
        >>> lm.generate(tokens[:, :8], max_new_tokens=4).shape
        torch.Size([2, 12])
    """

    def __init__(self, vocab_size: int, dim: int = 128, depth: int = 2, num_heads: int = 4,
                 mechanism: str = "streaming_llm", mlp_hidden: int | None = None,
                 layer_kwargs: Callable[[int], Mapping[str, object]] | None = None, **mechanism_kwargs: object):
        super().__init__()
        entries = {m.name: m for m in mechanisms(kind="layer", pattern="CS") if "1d" in m.dims}
        if mechanism not in entries:
            raise ValueError(f"mechanism must be a registered causal sequence layer, one of {sorted(entries)}; "
                             f"got {mechanism!r}")
        self.mechanism = mechanism
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, dim)
        hidden = mlp_hidden or 64 * ((8 * dim // 3 + 63) // 64)
        entry = entries[mechanism]
        self.blocks = nn.ModuleList(
            Block(dim, entry.build(dim, num_heads, "CS", **mechanism_kwargs,
                                   **(layer_kwargs(i) if layer_kwargs else {})), hidden)
            for i in range(depth))
        self.norm = nn.RMSNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """Next-token logits of ``tokens``, or of the next tokens of each sequence through ``caches``.

        Args:
            tokens: Token ids ``(B, N)`` in ``[0, vocab_size)``.
            caches: The per-layer decoding states of ``new_caches`` (None, the default: whole sequences).

        Returns:
            Logits ``(B, N, vocab_size)``.

        Raises:
            ValueError: A token id outside ``[0, vocab_size)``; what the layers raise for a cache of another batch.
        """
        check_token_ids(tokens, self.vocab_size, "tokens")
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return F.linear(self.norm(x), self.embed.weight)

    def new_caches(self, batch: int = 1) -> list:
        """One empty decoding state per layer, on the model's device and dtype.

        Args:
            batch: Number of sequences, >= 1 (default 1).

        Returns:
            A list of ``depth`` states (each layer's ``new_cache``), to pass as ``caches``.
        """
        p = self.embed.weight
        return layer_caches(self.blocks, batch, p.device, p.dtype)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token cross-entropy: position ``i`` predicts ``tokens[:, i + 1]``.

        Args:
            tokens: Token ids ``(B, N)``, ``N >= 2``, in ``[0, vocab_size)``.

        Returns:
            The mean cross-entropy, a scalar tensor.

        Raises:
            ValueError: A token id outside ``[0, vocab_size)``.

        Examples:
            >>> import torch, nearfar as nf
            >>> lm = nf.TinyLM(256, dim=64, depth=1, num_heads=4, mechanism="dense")
            >>> lm.loss(torch.randint(0, 256, (2, 16))).shape
            torch.Size([])
        """
        check_token_ids(tokens, self.vocab_size, "tokens")  # the last column is only a target: forward never sees it
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy decoding (the default) or sampling: the prompt goes through the caches in one step, then one token
        per step.

        The convention is Hugging Face's: ``do_sample=False`` picks the most probable token (argmax) and takes no
        sampling argument; ``do_sample=True`` draws each token from ``softmax(filter_logits(logits, temperature,
        top_k, top_p))`` with ``torch.multinomial`` (``generator``: its random stream, for reproducible samples).

        Args:
            prompt: Token ids ``(B, P)``, ``P >= 1``, in ``[0, vocab_size)``.
            max_new_tokens: Number of tokens to generate, >= 0.
            do_sample: Sample instead of greedy decoding (default False).
            temperature: Sampling temperature, > 0 (default 1).
            top_k: Sample among the ``top_k`` >= 1 most probable tokens (default None: all).
            top_p: Sample from the nucleus of probability ``top_p`` in ``(0, 1]`` (default None: all).
            generator: A ``torch.Generator`` on the model's device for the draws (default: torch's global one).

        Returns:
            ``(B, P + max_new_tokens)``: the prompt followed by the new tokens.

        Raises:
            ValueError: A token id outside ``[0, vocab_size)``; ``max_new_tokens``, ``temperature``, ``top_k`` or
                ``top_p`` out of range; a sampling argument given with ``do_sample=False``.
            TypeError: An argument of the wrong type.

        Examples:
            >>> import torch, nearfar as nf
            >>> lm = nf.TinyLM(64, dim=32, depth=1, num_heads=2, mechanism="dense")
            >>> prompt = torch.randint(0, 64, (2, 5))
            >>> g = torch.Generator().manual_seed(0)
            >>> out = lm.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, generator=g)
            >>> out.shape
            torch.Size([2, 13])
            >>> _ = g.manual_seed(0)  # the same stream: the same tokens
            >>> torch.equal(out, lm.generate(prompt, 8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
            ...                              generator=g))
            True
        """
        check_token_ids(prompt, self.vocab_size, "prompt")
        max_new_tokens = check_nonneg_int(max_new_tokens, "max_new_tokens")
        if not check_bool(do_sample, "do_sample"):
            given = [name for name, value, default in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                                       ("top_p", top_p, None), ("generator", generator, None))
                     if value is not default and value != default]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to sampling: pass do_sample=True (greedy decoding, "
                                 f"the default, takes the most probable token)")
        else:
            filter_logits(torch.zeros(1), temperature, top_k, top_p)  # argument errors before any work
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        caches = self.new_caches(prompt.shape[0])
        logits = self(prompt, caches)
        out = [prompt]
        for _ in range(max_new_tokens):
            last = logits[:, -1]
            if do_sample:
                last = last.to(torch.promote_types(last.dtype, torch.float32))  # half precision: draw in float32
                probs = filter_logits(last, temperature, top_k, top_p).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self(nxt, caches)
        return torch.cat(out, 1)
