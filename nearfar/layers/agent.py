"""Agent attention (Agent-PVT form, with optional spatial reduction): channel-last ``(B, H, W, C)`` in and out.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024).
Official code: LeapLabTHU/Agent-Attention, ``agent_transformer/models/agent_pvt.py`` (``AgentAttention``).

``n = agent_num`` agent tokens are the adaptive average pool (``sqrt(n) x sqrt(n)`` bins) of the projected
queries. Two softmax attentions, both through ``nearfar.attend`` with a dense additive position bias:
agent aggregation (agents attend over the keys, ``(n, N')`` scores) and agent broadcast (queries attend over the
agents, ``(N, n)`` scores), so no ``N x N`` tensor exists. A depth-wise 3x3 conv of ``v`` is added before ``proj``.

Parameter names and shapes equal the official ``AgentAttention`` (``q``, ``kv``, ``proj``, ``dwc``, ``sr``,
``norm``, ``an_bias``, ``na_bias``, ``ah_bias``, ``aw_bias``, ``ha_bias``, ``wa_bias``), so its checkpoints load
unchanged (timm does not ship agent attention).

Differences from the official code:

- Input is channel-last ``(B, H, W, C)`` instead of tokens ``(B, N, C)`` plus ``H, W`` arguments.
- The map size of the position biases is given as ``num_patches`` (as in the official code: an int, a perfect
  square) or as an ``(H, W)`` tuple (non-square maps; an extension). The official code only runs at that size.
  Here any other input size works: the per-axis biases ``ah/aw`` (key map) and ``ha/wa`` (query map) are
  resized along their spatial axis by linear interpolation (``align_corners=False``, i.e. the official
  ``bilinear`` interpolation restricted to one axis), exactly as ``an/na_bias`` are already resized from 7x7.
  At the construction size nothing is resized and the output equals the official one.
- With ``sr_ratio > 1`` and a map size that ``sr_ratio`` does not divide, the official code fails to reshape;
  here the strided conv's ``floor(H / r) x floor(W / r)`` key map is used (the rest of the formula unchanged).
- Attention and projection dropout are not implemented (the released models use 0). The official
  constructor's ``qk_scale`` is ignored by its ``AgentAttention`` (the scale is always ``head_dim ** -0.5``), so it
  is not offered here.
- ``qkv_bias`` defaults to False as in the official class; the released Agent-PVT models pass ``qkv_bias=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_channels_last, check_dim_heads, check_per_axis, check_positive_int
from ..functional import attend, merge_heads, split_heads
from .position_bias import trunc_normal_
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence


def _square_side(value: int, name: str) -> int:
    side = math.isqrt(value)
    if side * side != value:
        raise ValueError(f"{name} must be a perfect square (the code uses a sqrt x sqrt grid), got {value}")
    return side


def resize_axis(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Linear interpolation (``align_corners=False``) of ``t`` along ``axis`` to ``size`` (identity if equal)."""
    if t.shape[axis] == size:
        return t
    moved = t.movedim(axis, -1)
    out = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, axis)


@whole_sequence()
class AgentAttention(nn.Module):
    """``AgentAttention(dim, num_heads=8, num_patches=3136, qkv_bias=False, sr_ratio=1, agent_num=49)``:
    x ``(B, H, W, dim)`` -> same shape.

    ``num_patches``: the map size the position biases are built for (int perfect square, or ``(H, W)``);
    other input sizes resize them (see the module docstring). ``sr_ratio``: keys/values come from a
    ``sr_ratio x sr_ratio`` strided conv + LayerNorm (PVT spatial reduction). ``agent_num`` must be a square.

    Args:
        dim: Channels, a positive multiple of ``num_heads``.
        num_heads: Number of heads, >= 1 (default 8).
        num_patches: The map size the position biases are built for: an int perfect square (default 3136 = 56x56)
            or an ``(H, W)`` tuple of positive ints.
        qkv_bias: Biases on the ``q`` and ``kv`` projections (default False).
        sr_ratio: Spatial-reduction ratio of keys/values, in ``[1, min(H, W)]`` of ``num_patches`` (default 1: none).
        agent_num: Number of agent tokens, a perfect square >= 1 (default 49).

    Raises:
        TypeError: ``num_patches``, ``sr_ratio`` or ``agent_num`` is not an int (or a tuple of ints).
        ValueError: ``dim`` is not a positive multiple of ``num_heads``; ``num_patches`` or ``agent_num`` is not a
            perfect square, or < 1; ``sr_ratio`` outside ``[1, min(H, W)]``.

    Examples:
        >>> import torch
        >>> from nearfar import AgentAttention
        >>> layer = AgentAttention(64, 4, num_patches=(14, 14), sr_ratio=2, agent_num=16)
        >>> layer(torch.randn(2, 14, 14, 64)).shape
        torch.Size([2, 14, 14, 64])
    """

    def __init__(self, dim: int, num_heads: int = 8, num_patches: int | tuple[int, int] = 56 * 56,
                 qkv_bias: bool = False, sr_ratio: int = 1, agent_num: int = 49):
        super().__init__()
        head_dim = check_dim_heads(dim, num_heads)
        if isinstance(num_patches, (tuple, list)):
            window = check_per_axis(num_patches, 2, "num_patches")
        else:
            side = _square_side(check_positive_int(num_patches, "num_patches"), "num_patches")
            window = (side, side)
        sr_ratio = check_positive_int(sr_ratio, "sr_ratio")
        if sr_ratio > min(window):
            raise ValueError(f"sr_ratio must be in [1, {min(window)}] for a {window} map, got {sr_ratio}")
        self.pool_size = _square_side(check_positive_int(agent_num, "agent_num"), "agent_num")
        self.dim, self.num_heads, self.agent_num, self.sr_ratio = dim, num_heads, agent_num, sr_ratio
        self.window_size = window
        self.scale = head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        h, n, (wh, ww), r = num_heads, agent_num, window, sr_ratio
        self.an_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(h, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, wh // r, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, ww // r))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, wh, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, ww, n))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p)

    def position_biases(self, size: tuple[int, ...], kv_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive biases of the two softmaxes: agents->keys ``(1, h, n, N')`` and queries->agents ``(1, h, N, n)``."""
        h, n = self.num_heads, self.agent_num
        agent_to_key = F.interpolate(self.an_bias, size=kv_size, mode="bilinear", align_corners=False)
        axis_ak = resize_axis(self.ah_bias, 3, kv_size[0]) + resize_axis(self.aw_bias, 4, kv_size[1])
        bias1 = (agent_to_key.unsqueeze(0) + axis_ak).reshape(1, h, n, -1)
        query_to_agent = F.interpolate(self.na_bias, size=size, mode="bilinear", align_corners=False)
        axis_qa = resize_axis(self.ha_bias, 2, size[0]) + resize_axis(self.wa_bias, 3, size[1])
        bias2 = query_to_agent.reshape(1, h, n, -1).transpose(-1, -2) + axis_qa.reshape(1, h, -1, n)
        return bias1, bias2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Agent attention of a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, ``H, W >= sr_ratio`` (any size: the position biases are resized).

        Returns:
            The output ``(B, H, W, dim)``.

        Raises:
            TypeError: ``x`` is not a tensor.
            ValueError: ``x`` is not ``(B, H, W, dim)`` or is empty; ``H`` or ``W`` < ``sr_ratio``.
        """
        b, spatial, _ = check_channels_last(x, 2, self.dim)
        r = self.sr_ratio
        if r > min(spatial):
            raise ValueError(f"input map {spatial} is smaller than sr_ratio={r}; need H, W >= {r}")
        q = self.q(x)
        if r > 1:
            x = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        kv_size = tuple(x.shape[1:3])
        k, v = self.kv(x).chunk(2, dim=-1)
        agents = F.adaptive_avg_pool2d(q.permute(0, 3, 1, 2), self.pool_size).permute(0, 2, 3, 1)
        qh, kh, vh, ah = (split_heads(t, self.num_heads) for t in (q, k, v, agents))
        bias1, bias2 = self.position_biases(spatial, kv_size)
        agent_v = attend(ah, kh, vh, scale=self.scale, bias=bias1)
        out = merge_heads(attend(qh, ah, agent_v, scale=self.scale, bias=bias2), spatial)
        v_map = v.permute(0, 3, 1, 2)
        if r > 1:
            v_map = F.interpolate(v_map, size=spatial, mode="bilinear", align_corners=False)
        return self.proj(out + self.dwc(v_map).permute(0, 2, 3, 1))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"agent_num={self.agent_num}, sr_ratio={self.sr_ratio}")


register(Mechanism(
    name="agent", paper="Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024)",
    repo="LeapLabTHU/Agent-Attention", family="summary tokens", dims=("2d",), **image_layer(),
    make=lambda dim, num_heads, **kw: AgentAttention(dim, num_heads, **kw), cls=AgentAttention,
    notes="Agent-PVT form. Position biases are built for num_patches (default 56x56, Agent-PVT stage 1 at 224^2); "
          "other map sizes resize them by linear interpolation (not in the official code). agent_num must be a "
          "perfect square (default 49); sr_ratio (default 1) adds PVT spatial reduction of keys/values."))
