"""NAT / DiNAT classifiers written the way SHI-Labs/Neighborhood-Attention-Transformer writes them
(``classification/nat.py``: ``ConvTokenizer``, ``ConvDownsampler``, ``Mlp``, ``NATLayer``, ``NATBlock``, ``NAT``;
``classification/dinat.py``: the same model with per-block dilations), with the same module and parameter names,
so their state dicts are the official checkpoints' key set. Plain PyTorch, float64-capable: NATTEN's
``NeighborhoodAttention2D`` (legacy module of NATTEN v0.14.6, ``natten2d.py``: zero-pads inputs smaller than
``kernel_size * dilation``, ``qkv`` split ``[3, heads, head_dim]``, relative-position bias ``rpb``) is replaced by
an explicit gather of every query's ``kernel_size**2`` keys, with the window and bias offsets of NATTEN's CPU
kernels (``natten_cpu_commons.h``: ``get_window_start``, ``get_pb_start``) transcribed one to one. Nothing here
uses nearfar's patterns or engines: it is the independent reference for ``nearfar.models.vision.nat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_start(i: int, length: int, k: int, d: int) -> int:
    """NATTEN ``get_window_start``: the first key index of query ``i``'s window on an axis of ``length``."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    ni = i - ns * d
    if ni < 0:
        return i % d
    if i + ns * d >= length:
        imodd = i % d
        a = (length // d) * d
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * d
        return a + imodd - k * d
    return ni


def pb_start(i: int, length: int, k: int, d: int) -> int:
    """NATTEN ``get_pb_start``: the bias-table row of query ``i``'s first key on an axis of ``length``."""
    ns = k // 2
    if d <= 1:
        return ns + (i < ns) * (ns - i) + (i + ns >= length) * (length - i - 1 - ns)
    if i - ns * d < 0:
        return k - 1 - i // d
    if i + ns * d >= length:
        return (length - i - 1) // d
    return ns


def _axis_tables(length: int, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.tensor([[window_start(i, length, k, d) + t * d for t in range(k)] for i in range(length)])
    bias = torch.tensor([[pb_start(i, length, k, d) + t for t in range(k)] for i in range(length)])
    return keys, bias  # (length, k) each


class NeighborhoodAttention2D(nn.Module):
    """NATTEN's legacy 2D neighbourhood attention module (names ``qkv``, ``rpb``, ``proj``), computed by gathering."""

    def __init__(self, dim, num_heads, kernel_size, dilation=None, bias=True, qkv_bias=True, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = kernel_size
        self.dilation = dilation or 1
        self.window_size = self.kernel_size * self.dilation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, hp, wp, c = x.shape
        h, w = hp, wp
        pad_r = pad_b = 0
        if h < self.window_size or w < self.window_size:
            pad_r = max(0, self.window_size - w)
            pad_b = max(0, self.window_size - h)
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            _, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, h, w, head_dim)
        q = q * self.scale
        kk, d = self.kernel_size, self.dilation
        key_h, bias_h = _axis_tables(h, kk, d)
        key_w, bias_w = _axis_tables(w, kk, d)
        # (h, w, k, k): flat key index and flat bias index of every (query, neighbour) pair
        key = (key_h[:, None, :, None] * w + key_w[None, :, None, :]).reshape(h, w, kk * kk)
        k_n = k.flatten(2, 3)[:, :, key]  # (b, heads, h, w, k*k, head_dim)
        v_n = v.flatten(2, 3)[:, :, key]
        attn = (q.unsqueeze(-2) * k_n).sum(-1)  # (b, heads, h, w, k*k)
        if self.rpb is not None:
            bias = (bias_h[:, None, :, None] * (2 * kk - 1) + bias_w[None, :, None, :]).reshape(h, w, kk * kk)
            attn = attn + self.rpb.flatten(1)[:, bias]
        attn = attn.softmax(dim=-1)
        x = (attn.unsqueeze(-1) * v_n).sum(-2)  # (b, heads, h, w, head_dim)
        x = x.permute(0, 2, 3, 1, 4).reshape(b, h, w, c)
        if pad_r or pad_b:
            x = x[:, :hp, :wp, :]
        return self.proj(x)


class ConvTokenizer(nn.Module):
    def __init__(self, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
        )
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class ConvDownsampler(nn.Module):
    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
        self.norm = norm_layer(2 * dim)

    def forward(self, x):
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features or in_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features or in_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NATLayer(nn.Module):
    def __init__(self, dim, num_heads, kernel_size=7, dilation=None, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=dilation, bias=True,
                                            qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale = layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        if not self.layer_scale:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma1 * self.attn(self.norm1(x))
        return x + self.gamma2 * self.mlp(self.norm2(x))


class NATBlock(nn.Module):
    def __init__(self, dim, depth, num_heads, kernel_size, dilations=None, downsample=True, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        self.blocks = nn.ModuleList([
            NATLayer(dim, num_heads, kernel_size, None if dilations is None else dilations[i], mlp_ratio, qkv_bias,
                     qk_scale, norm_layer, layer_scale)
            for i in range(depth)])
        self.downsample = ConvDownsampler(dim, norm_layer) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class NAT(nn.Module):
    """``classification/nat.py``'s ``NAT`` (inference: no dropout or drop path); ``forward`` returns logits."""

    def __init__(self, embed_dim, mlp_ratio, depths, num_heads, in_chans=3, kernel_size=7, dilations=None,
                 num_classes=1000, qkv_bias=True, qk_scale=None, norm_layer=nn.LayerNorm, layer_scale=None):
        super().__init__()
        self.num_levels = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_levels - 1))
        self.patch_embed = ConvTokenizer(in_chans, embed_dim, norm_layer)
        self.levels = nn.ModuleList([
            NATBlock(int(embed_dim * 2 ** i), depths[i], num_heads[i], kernel_size,
                     None if dilations is None else dilations[i], downsample=i < self.num_levels - 1,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                     layer_scale=layer_scale)
            for i in range(self.num_levels)])
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x):
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        x = self.norm(x).flatten(1, 2)
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)

    def forward(self, x):
        return self.head(self.forward_features(x))


#: the official entrypoints' configurations (``nat.py``: nat_mini, nat_tiny; ``dinat.py``: dinat_mini, dinat_tiny)
CONFIGS = {
    "nat_mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3, kernel_size=7),
    "nat_tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3, kernel_size=7),
    "dinat_mini": dict(depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3, kernel_size=7,
                       dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]),
    "dinat_tiny": dict(depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], embed_dim=64, mlp_ratio=3, kernel_size=7,
                       dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1, 1, 1, 1, 1]]),
}


def build(name: str, **kwargs) -> NAT:
    """The official entrypoint ``name`` (``nat_mini``, ``nat_tiny``, ``dinat_mini``, ``dinat_tiny``), random init."""
    return NAT(**CONFIGS[name], **kwargs)
