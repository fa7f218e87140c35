"""BiFormer written the way rayleizhu/BiFormer writes it (``models/biformer.py``: ``Block``, ``BiFormer``,
``biformer_tiny``; ``ops/bra_legacy.py``: ``TopkRouting``, ``KVGather``, ``QKVLinear``, ``BiLevelRoutingAttention``;
``models/_common.py``: ``AttentionLePE``, ``DWConv``), with the same module and parameter names, so its state dict
has the official checkpoints' key set. Plain PyTorch (``einops.rearrange`` spelled as reshape/permute), float64-
capable, independent of nearfar: the routed regions' K/V are copied by ``torch.gather`` (``KVGather``) and the
attention is an explicit ``softmax(q k^T) v`` per region, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _patchify(x, s):
    """``rearrange(x, "n (j h) (i w) c -> n (j i) h w c", j=s, i=s)``."""
    n, hh, ww, c = x.shape
    return x.reshape(n, s, hh // s, s, ww // s, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, hh // s, ww // s, c)


def _unpatchify(x, s):
    """``rearrange(x, "n (j i) h w c -> n (j h) (i w) c", j=s, i=s)``."""
    n, _, h, w, c = x.shape
    return x.reshape(n, s, s, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * h, s * w, c)


class TopkRouting(nn.Module):
    def __init__(self, qk_dim, topk=4, qk_scale=None, param_routing=False, diff_routing=False):
        super().__init__()
        self.topk = topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, query, key):
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        attn_logit = (self.emb(query) * self.scale) @ self.emb(key).transpose(-2, -1)  # (n, p^2, p^2)
        topk_logit, topk_index = torch.topk(attn_logit, k=self.topk, dim=-1)
        return topk_logit.softmax(dim=-1), topk_index


class KVGather(nn.Module):
    def __init__(self, mul_weight="none"):
        super().__init__()
        self.mul_weight = mul_weight

    def forward(self, r_idx, r_weight, kv):
        n, p2, w2, c_kv = kv.size()
        topk = r_idx.size(-1)
        topk_kv = torch.gather(kv.view(n, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1), dim=2,
                               index=r_idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c_kv))
        if self.mul_weight == "soft":
            topk_kv = r_weight.view(n, p2, topk, 1, 1) * topk_kv
        return topk_kv


class QKVLinear(nn.Module):
    def __init__(self, dim, qk_dim, bias=True):
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x):
        return self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """``bra_legacy.BiLevelRoutingAttention`` with identity kv downsampling (the released models' setting)."""

    def __init__(self, dim, num_heads=8, n_win=7, qk_dim=None, qk_scale=None, topk=4, param_routing=False,
                 diff_routing=False, soft_routing=False, side_dwconv=3, auto_pad=False):
        super().__init__()
        self.dim, self.n_win, self.num_heads = dim, n_win, num_heads
        self.qk_dim = qk_dim or dim
        self.scale = qk_scale or self.qk_dim ** -0.5
        self.lepe = nn.Conv2d(dim, dim, kernel_size=side_dwconv, stride=1, padding=side_dwconv // 2, groups=dim)
        self.topk = topk
        self.router = TopkRouting(self.qk_dim, qk_scale=self.scale, topk=topk, diff_routing=diff_routing,
                                  param_routing=param_routing)
        self.kv_gather = KVGather("soft" if soft_routing else "none")
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)
        self.kv_down = nn.Identity()
        self.auto_pad = auto_pad

    def forward(self, x):
        s, m = self.n_win, self.num_heads
        n, h_in, w_in, _ = x.size()
        pad_r = pad_b = 0
        if self.auto_pad:
            pad_r, pad_b = (s - w_in % s) % s, (s - h_in % s) % s
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, hh, ww, _ = x.size()
        assert hh % s == 0 and ww % s == 0
        x = _patchify(x, s)  # (n, p2, h, w, c)
        q, kv = self.qkv(x)
        rh, rw = q.shape[2], q.shape[3]
        q_pix = q.reshape(n, s * s, rh * rw, -1)
        kv_pix = self.kv_down(kv.reshape(n * s * s, rh, rw, -1).permute(0, 3, 1, 2))  # (n p2) c h w
        kv_pix = kv_pix.reshape(n, s * s, kv_pix.shape[1], -1).transpose(-1, -2)  # n p2 (h w) c
        q_win, k_win = q.mean([2, 3]), kv[..., 0:self.qk_dim].mean([2, 3])
        lepe = self.lepe(_unpatchify(kv[..., self.qk_dim:], s).permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        r_weight, r_idx = self.router(q_win, k_win)
        kv_pix_sel = self.kv_gather(r_idx=r_idx, r_weight=r_weight, kv=kv_pix)  # (n, p2, topk, w2, c_qk + c_v)
        k_sel, v_sel = kv_pix_sel.split([self.qk_dim, self.dim], dim=-1)
        topk, w2 = k_sel.shape[2], k_sel.shape[3]
        # 'n p2 k w2 (m c) -> (n p2) m c (k w2)' and 'n p2 k w2 (m c) -> (n p2) m (k w2) c'
        k_sel = k_sel.reshape(n * s * s, topk * w2, m, -1).permute(0, 2, 3, 1)
        v_sel = v_sel.reshape(n * s * s, topk * w2, m, -1).permute(0, 2, 1, 3)
        q_pix = q_pix.reshape(n * s * s, rh * rw, m, -1).permute(0, 2, 1, 3)  # (n p2) m w2 c
        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = attn @ v_sel  # (n p2) m (h w) c
        # '(n j i) m (h w) c -> n (j h) (i w) (m c)'
        out = out.reshape(n, s, s, m, rh, rw, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, hh, ww, -1)
        out = self.wo(out + lepe)
        if pad_r or pad_b:
            out = out[:, :h_in, :w_in, :].contiguous()
        return out


class AttentionLePE(nn.Module):
    """``_common.AttentionLePE``: attention over the whole map plus a depth-wise conv of the input."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, side_dwconv=5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, kernel_size=side_dwconv, stride=1, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        _, hh, ww, _ = x.size()
        x = x.reshape(x.shape[0], hh * ww, -1)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        lepe = self.lepe(x.transpose(1, 2).reshape(b, c, hh, ww)).flatten(2).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x + lepe).reshape(b, hh, ww, c)


class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x):
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Block(nn.Module):
    def __init__(self, dim, layer_scale_init_value=-1, num_heads=8, n_win=7, qk_dim=None, qk_scale=None, topk=4,
                 param_routing=False, diff_routing=False, soft_routing=False, mlp_ratio=4, mlp_dwconv=False,
                 side_dwconv=5, before_attn_dwconv=3, auto_pad=False):
        super().__init__()
        qk_dim = qk_dim or dim
        self.pos_embed = nn.Conv2d(dim, dim, kernel_size=before_attn_dwconv, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, qk_dim, qk_scale, topk, param_routing,
                                                diff_routing, soft_routing, side_dwconv, auto_pad)
        else:  # topk == -2
            self.attn = AttentionLePE(dim=dim, side_dwconv=side_dwconv)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, int(mlp_ratio * dim)),
                                 DWConv(int(mlp_ratio * dim)) if mlp_dwconv else nn.Identity(),
                                 nn.GELU(), nn.Linear(int(mlp_ratio * dim), dim))
        self.use_layer_scale = layer_scale_init_value > 0
        if self.use_layer_scale:
            self.gamma1 = nn.Parameter(layer_scale_init_value * torch.ones(dim))
            self.gamma2 = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x):
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        if self.use_layer_scale:
            x = x + self.gamma1 * self.attn(self.norm1(x))
            x = x + self.gamma2 * self.mlp(self.norm2(x))
        else:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2)


class BiFormer(nn.Module):
    """``models/biformer.py``'s ``BiFormer`` (pre-norm, identity kv downsampling; inference: no drop path)."""

    def __init__(self, depth=(3, 4, 8, 3), in_chans=3, num_classes=1000, embed_dim=(64, 128, 320, 512), head_dim=64,
                 qk_scale=None, n_win=7, topks=(8, 8, -1, -1), side_dwconv=5, layer_scale_init_value=-1,
                 qk_dims=(None, None, None, None), param_routing=False, diff_routing=False, soft_routing=False,
                 before_attn_dwconv=3, auto_pad=False, mlp_ratios=(4, 4, 4, 4), mlp_dwconv=False):
        super().__init__()
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
            nn.BatchNorm2d(embed_dim[0] // 2), nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
            nn.BatchNorm2d(embed_dim[0])))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
                nn.BatchNorm2d(embed_dim[i + 1])))
        self.stages = nn.ModuleList()
        nheads = [dim // head_dim for dim in qk_dims]
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(embed_dim[i], layer_scale_init_value, nheads[i], n_win, qk_dims[i], qk_scale, topks[i],
                      param_routing, diff_routing, soft_routing, mlp_ratios[i], mlp_dwconv, side_dwconv,
                      before_attn_dwconv, auto_pad) for _ in range(depth[i])]))
        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self.pre_logits = nn.Identity()
        self.head = nn.Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
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
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.pre_logits(self.norm(x))

    def forward(self, x):
        return self.head(self.forward_features(x).flatten(2).mean(-1))


#: ``biformer_tiny``'s configuration (``models/biformer.py``)
CONFIGS = {"biformer_tiny": dict(depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512], mlp_ratios=[3, 3, 3, 3], n_win=7,
                                 topks=[1, 4, 16, -2], side_dwconv=5, before_attn_dwconv=3, layer_scale_init_value=-1,
                                 qk_dims=[64, 128, 256, 512], head_dim=32)}


def build(name: str, **kwargs) -> BiFormer:
    """The official entrypoint ``name`` (``biformer_tiny``), random init."""
    return BiFormer(**{**CONFIGS[name], **kwargs})
