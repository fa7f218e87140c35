"""Peers of the speed suite: other libraries' kernels, timed beside ours on the same inputs in the same rounds.

Each peer is optional (timed only when importable) and runs with the mechanism's own projections (and weights,
where the peer is a whole module that can load them), so rows differ only in the attention kernel:

- ``flex_attention``: ``torch.compile``d ``torch.nn.attention.flex_attention`` with the mechanism's pattern as the
  ``mask_mod`` (``create_block_mask``), beside StreamingLLM and Longformer; the same function as ours. Forward only:
  FlexAttention has no CPU backward. Compile time is kept out of the timing and reported as ``compile_s``; at
  10-25 s a shape it is left out of ``--quick``.
- ``local_attention`` (lucidrains/local-attention): ``LocalAttention`` with the exact sliding window of the same width
  (no sinks, no global tokens: a similar, not the same, function), beside the causal StreamingLLM / Longformer.
- ``natten`` (SHI-Labs/NATTEN): ``NeighborhoodAttention1D/2D`` beside ``neighborhood``. On CPU NATTEN 0.21 has only
  its unfused Flex backend (compiling it needs CUDA), forward only. It has no relative-position bias, so it
  computes our function only without one (the CS pattern); with one (NS) it is timed, not compared.
- ``agent_attention_pytorch`` (lucidrains): ``AgentSelfAttention`` beside ``agent``: the same idea, another layer.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..functional import merge_heads
from ..layers.rotary import rotary_qkv

#: a peer's builder: (our layer, input) -> (one call on an input, whether it computes our function)
Builder = Callable[[torch.nn.Module, torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], bool]]


@dataclass(frozen=True)
class Peer:
    """``beside``: the ``(mechanism, CAB pattern, dims)`` it is timed with; ``quick_beside``: the subset timed by
    ``--quick`` (None: all), at one size there (``quick_size``: "smallest" or "largest"); ``max_tokens``: larger
    inputs are not timed (the peer is too slow there on CPU)."""

    name: str
    module: str
    beside: frozenset
    phases: tuple[str, ...]
    make: Builder
    note: str
    quick_beside: frozenset | None = None
    quick_size: str = "largest"
    max_tokens: int | None = None
    compiled: bool = False

    def available(self) -> str | None:
        """None if importable, else why not."""
        try:
            found = importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"{self.module} is not installed"


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(layer, x):
    from torch.nn.attention.flex_attention import create_block_mask

    n, pattern = x.shape[1], layer.pattern
    block_mask = create_block_mask(lambda b, h, qi, ki: pattern.allowed(qi, ki, n, n), None, None, n, n,
                                   device=x.device.type)
    flex = _compiled_flex()

    def run(inp):
        q, k, v, _ = rotary_qkv(layer, inp, 0)
        out = flex(q, k, v, block_mask=block_mask, enable_gqa=layer.num_kv_heads != layer.num_heads)
        return layer.o_proj(merge_heads(out, (n,)))
    return run, True


def _local(layer, x):
    from local_attention import LocalAttention

    # exact_windowsize with window_size w keeps keys i-w .. i: ours keeps i-(window-1) .. i
    local = LocalAttention(window_size=layer.window - 1, causal=True, look_backward=1, exact_windowsize=True,
                           use_rotary_pos_emb=False, autopad=True)
    rep = layer.num_heads // layer.num_kv_heads

    def run(inp):
        q, k, v, _ = rotary_qkv(layer, inp, 0)
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return layer.o_proj(merge_heads(local(q, k, v), (inp.shape[1],)))
    return run, False


def _natten(layer, x):
    import natten

    cls = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D}[layer.ndim]
    nat = cls(layer.dim, layer.num_heads, layer.kernel_size, dilation=layer.dilation, is_causal=layer.is_causal)
    same = layer.rpb is None
    if same:
        nat.load_state_dict(layer.state_dict())
    nat.eval()
    return nat, same


def _agent(layer, x):
    from agent_attention_pytorch import AgentSelfAttention

    agent = AgentSelfAttention(layer.dim, num_agent_tokens=layer.agent_num, dim_head=layer.dim // layer.num_heads,
                               heads=layer.num_heads).eval()
    return (lambda inp: agent(inp.flatten(1, -2))), False


_WINDOWED = frozenset({("streaming_llm", "CS", "1d"), ("longformer", "NS", "1d"), ("longformer", "CS", "1d")})
PEERS = (
    Peer("flex_attention", "torch.nn.attention.flex_attention", _WINDOWED, ("fwd",), _flex,
         "compiled torch flex_attention, the mechanism's pattern as mask_mod (CPU: forward only)",
         quick_beside=frozenset(), compiled=True),  # compiling costs 10-25 s a shape: full sweep only
    Peer("local_attention", "local_attention", frozenset(k for k in _WINDOWED if k[1] == "CS"),
         ("fwd", "fwd+bwd"), _local, "local_attention.LocalAttention: the same sliding window, no sinks/global tokens"),
    Peer("natten", "natten", frozenset(("neighborhood", p, d) for p in ("NS", "CS") for d in ("1d", "2d")), ("fwd",),
         _natten, "NATTEN NeighborhoodAttention1D/2D (CPU: unfused Flex backend, forward only; no rel. pos. bias)",
         quick_size="smallest", max_tokens=3136),
    Peer("agent_attention_pytorch", "agent_attention_pytorch", frozenset({("agent", "NS", "2d")}),
         ("fwd", "fwd+bwd"), _agent, "agent_attention_pytorch.AgentSelfAttention, same dim/heads/agent tokens"),
)


def check_names(names: bool | Sequence[str]) -> set[str] | None:
    """``run_speed``'s ``peers``: True (all), False (none: the empty set) or a list of peer names."""
    if isinstance(names, bool):
        return None if names else set()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"peers must be a bool or a list of peer names, got {names!r}")
    known = [p.name for p in PEERS]
    for n in names:
        if n not in known:
            raise ValueError(f"unknown peer {n!r}: peers are {known}")
    return set(names)


def status(only: set[str] | None = None) -> dict[str, str]:
    """Each peer (of ``only``, None: all): "available" or why not."""
    return {p.name: p.available() or "available" for p in PEERS if only is None or p.name in only}


def peers_for(mechanism: str, pattern: str, dims: str, phase: str, tokens: int, size_index: int, num_sizes: int,
              quick: bool, only: set[str] | None = None) -> list[Peer]:
    """The available peers (of ``only``, None: all) to time beside this row."""
    out = []
    for peer in PEERS:
        key = (mechanism, pattern, dims)
        if only is not None and peer.name not in only:
            continue
        if key not in peer.beside or phase not in peer.phases or peer.available() is not None:
            continue
        if peer.max_tokens is not None and tokens > peer.max_tokens:
            continue
        if quick:
            wanted = 0 if peer.quick_size == "smallest" else num_sizes - 1
            if size_index != wanted or (peer.quick_beside is not None and key not in peer.quick_beside):
                continue
        out.append(peer)
    return out
