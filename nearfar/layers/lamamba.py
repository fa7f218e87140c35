"""LaMamba block (LaMamba-Diff): 2D selective scan, then local window attention, then an MLP, channel-last.

Paper: Fu, Chen, Yu, "LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba"
(arXiv 2408.02615, 2024). Official code: yunxiangfu2001/LaMamba-Diff ``model/lamamba.py``
(``LaMambaBlock_conditioned``, ``WindowAttention``), ``model/vmamba.py`` (``SS2D``: ``__initv2__``,
``forwardv2``, ``forward_corev2``; from VMamba, Liu et al., NeurIPS 2024, MzeroMiko/VMamba) and
``model/continuous_scan.py`` (the snake scan orders).

The block is three residual branches in series, each on a LayerNorm of the running sum::

    x = x + g1 * SS2D(mod(norm(x)));  x = x + g2 * WindowAttn(mod(norm_swin(x)));  x = x + g3 * MLP(mod(norm2(x)))

With a conditioning vector ``c`` (``condition_dim`` set: a diffusion timestep/class embedding), ``mod(t) = t (1 +
scale) + shift`` and the gates ``g`` come from ``adaLN_modulation = Linear(SiLU(condition_projection(c)))``, nine
chunks in the order shift/scale/gate of SSM, attention, MLP (DiT's adaLN). Without one (``condition_dim=None``, our
unconditioned form) the modulation is the identity and the gates are 1, as in a VMamba block.
SS2D: ``in_proj`` (no bias) to ``x, z``; ``x`` through a depth-wise 3x3 conv and SiLU; four scans of the map
(snake paths, below), each with its own ``x_proj_weight`` (to ``dt, B, C``), ``dt_projs_weight/bias``, ``A_logs``,
``Ds``; the selective scan (``nearfar.functional.selective_scan``, in float32); the four outputs summed back per
pixel; ``out_norm``; times ``SiLU(z)``; ``out_proj`` (no bias). Scan orders (``continuous_scan=True``, the
official default): row snakes from the top-left and bottom-left corners, column snakes from the bottom-left and
bottom-right corners; ``continuous_scan=False``: VMamba's row-major, column-major and both reversed.
The window attention is ``nearfar.layers.swin.WindowAttention`` (Swin W-MSA / SW-MSA with relative position bias).

State-dict keys and shapes equal the official block's parameters (``norm``, ``op.*``, ``norm_swin``, ``attn.*``,
``norm2``, ``mlp.fc1/fc2``, ``condition_projection``, ``adaLN_modulation.1``); the derived buffers of official
checkpoints (``attn.relative_position_index``, ``attn_mask``) are accepted and dropped on load.

Differences from the official code:
- the module returns the block's update ``x3 - x`` (the three branch outputs summed), not ``x3``: like every
  nearfar layer it is a token mixer whose caller adds the residual, so the official block is ``x + layer(x)``
  (returning ``x3`` would put the input in a pre-norm model's residual stream twice);
- non-square maps: the official snake paths take one side for both (error unless ``H = W``); here the same four
  snakes run on any ``H x W`` (equal to the official ones on square maps);
- window attention: sizes not divisible by the window, windows clipped per axis, masked pairs excluded exactly
  instead of ``-100``: as ``nearfar.layers.swin`` (the official block requires divisibility and precomputes the
  shift mask for one resolution); ``input_resolution`` keeps the official rule that a map no larger than the
  window shrinks the window (and the bias table) to the map and drops the shift;
- the selective scan is the chunked pure-torch scan (same function; the official code calls a CUDA kernel); with
  float16/bfloat16 inputs its float32 output is cast back before ``out_norm`` (official: after);
- the unconditioned form (no ``c``) is ours; no dropout / drop-path (the official DropPath is built but unused);
- initialisation: PyTorch defaults and the SS2D ``v0`` init as the official block; ``official_init()`` applies
  the LaMamba-Diff model's re-initialisation (Xavier-uniform Linears with zero bias, zero adaLN output layer).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import (
    check_bool,
    check_channels_last,
    check_dim_heads,
    check_nonneg_int,
    check_positive_int,
    check_real_range,
    check_tensor,
)
from ..functional import selective_scan
from .registry import Mechanism, image_layer, register
from .sharding import whole_sequence
from .swin import WindowAttention


@lru_cache(maxsize=64)
def scan_paths(height: int, width: int, continuous: bool = True) -> torch.Tensor:
    """The four scan orders ``(4, H*W)``: entry ``[k, t]`` is the row-major pixel index ``r * W + c`` visited at
    step ``t`` of scan ``k``. ``continuous``: LaMamba-Diff's snakes (rows from the top-left, rows from the
    bottom-left, columns from the bottom-left, columns from the bottom-right; every step moves to a neighbour);
    else VMamba's row-major, column-major and both reversed."""
    r = torch.arange(height)[:, None].expand(height, width)
    c = torch.arange(width)[None, :].expand(height, width)
    if not continuous:
        rows, cols = r * width + c, (r * width + c).t()
        return torch.stack([rows.flatten(), cols.flatten(), rows.flatten().flip(0), cols.flatten().flip(0)])
    snake_c = torch.where(r % 2 == 0, c, width - 1 - c)  # rows visited in order i, column within the row
    snake_r = torch.where(c % 2 == 0, r, height - 1 - r)  # columns visited in order j, row within the column
    k0 = r * width + snake_c
    k1 = (height - 1 - r) * width + snake_c
    k2 = ((height - 1 - snake_r) * width + c).t()
    k3 = ((height - 1 - snake_r) * width + (width - 1 - c)).t()
    return torch.stack([k.flatten() for k in (k0, k1, k2, k3)])


class SS2D(nn.Module):
    """The 2D selective-scan branch of a LaMamba / VMamba block (``forward_type="v2"``, channel-last).

    Args:
        d_model: Channels ``C`` (>= 1).
        d_state: SSM state size ``N`` (>= 1, default 16).
        ssm_ratio: Inner width ``D = int(ssm_ratio * C)`` (> 0, ``D >= 1``; default 2).
        dt_rank: Rank ``R`` of the step projection, ``"auto"`` (``ceil(C / 16)``) or an int >= 1.
        d_conv: Depth-wise conv kernel (>= 1; 1 = no conv; odd, default 3).
        conv_bias: Bias on the conv (default True).
        continuous_scan: Snake scan orders (default True) or VMamba's raster orders.
        chunk_size: Tokens per chunk of the selective scan (>= 1, default 64).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.

    Examples:
        >>> import torch
        >>> from nearfar.layers.lamamba import SS2D
        >>> SS2D(32, d_state=4)(torch.randn(2, 6, 6, 32)).shape
        torch.Size([2, 6, 6, 32])
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, dt_rank: int | str = "auto",
                 d_conv: int = 3, conv_bias: bool = True, continuous_scan: bool = True, chunk_size: int = 64):
        super().__init__()
        d_model, n = check_positive_int(d_model, "d_model"), check_positive_int(d_state, "d_state")
        d_inner = int(check_real_range(ssm_ratio, "ssm_ratio", 0, math.inf, open_low=True) * d_model)
        if d_inner < 1:
            raise ValueError(f"ssm_ratio * d_model must be >= 1, got {ssm_ratio} * {d_model}")
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else check_positive_int(dt_rank, "dt_rank")
        d_conv = check_positive_int(d_conv, "d_conv")
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (same-size padding), got {d_conv}")
        self.continuous_scan = check_bool(continuous_scan, "continuous_scan")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.d_inner, self.d_state, self.dt_rank = d_inner, n, rank
        self.out_norm = nn.LayerNorm(d_inner)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner,
                                bias=check_bool(conv_bias, "conv_bias")) if d_conv > 1 else None
        bound = d_inner ** -0.5  # nn.Linear's default init, as the official stacked x_proj
        self.x_proj_weight = nn.Parameter(torch.empty(4, rank + 2 * n, d_inner).uniform_(-bound, bound))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dt_projs_weight = nn.Parameter(torch.empty(4, d_inner, rank).uniform_(-rank ** -0.5, rank ** -0.5))
        dt = torch.exp(torch.rand(4, d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(4 * d_inner, 1))
        self.Ds = nn.Parameter(torch.ones(4 * d_inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        b, h, w, _ = x.shape
        length, d, n, rank = h * w, self.d_inner, self.d_state, self.dt_rank
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = xs.permute(0, 3, 1, 2)
        if self.conv2d is not None:
            xs = self.conv2d(xs)
        xs = F.silu(xs).flatten(2)  # (B, D, L)
        paths = scan_paths(h, w, self.continuous_scan).to(x.device)
        us = xs[:, :, paths].transpose(1, 2)  # (B, 4, D, L)
        dbl = torch.einsum("bkdl,kcd->bkcl", us, self.x_proj_weight)
        dts, bs, cs = torch.split(dbl, [rank, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        ys = selective_scan(us.reshape(b, 4 * d, length).to(dtype), dts.reshape(b, 4 * d, length).to(dtype),
                            -torch.exp(self.A_logs.to(dtype)), bs.to(dtype), cs.to(dtype), self.Ds.to(dtype),
                            self.dt_projs_bias.reshape(-1).to(dtype), True, chunk_size=self.chunk_size)
        inverse = torch.argsort(paths, dim=1)  # position of each pixel in each scan
        y = ys.view(b, 4, d, length).gather(3, inverse[None, :, None].expand(b, 4, d, length)).sum(1)
        y = self.out_norm(y.transpose(1, 2).to(x.dtype)).view(b, h, w, d)
        return self.out_proj(y * F.silu(z))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``, the official names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@whole_sequence()
class LaMambaBlock(nn.Module):
    """LaMamba block: ``x + SS2D``, then ``+ window attention``, then ``+ MLP``, optionally adaLN-conditioned.

    Args:
        dim: Channels (the official ``hidden_dim``), a positive multiple of ``num_heads``.
        num_heads: Attention heads (>= 1; official default 8).
        window_size: Attention window (>= 1; official default 8).
        shift_size: Swin shift, in ``[0, window_size - 1]`` (official blocks: 0, then ``window_size // 2``).
        qkv_bias: Bias on ``attn.qkv`` (default True).
        qk_scale: Attention scale, a positive number; None: ``head_dim ** -0.5``.
        condition_dim: Size of the conditioning vector ``c`` (>= 1), or None (default): no conditioning, no
            adaLN parameters, gates 1 (our unconditioned form).
        full_condition_project: Project ``c`` even when ``condition_dim == dim`` (official flag).
        input_resolution: Optional map side; if <= ``window_size`` the window becomes this side and the shift 0
            (the official construction rule, which also sizes the bias table). None: windows clipped at run time.
        ssm_d_state: SSM state size (>= 1, default 16; LaMamba-Diff-XL uses 1).
        ssm_ratio: SS2D inner width ``int(ssm_ratio * dim)`` (> 0, default 2).
        ssm_dt_rank: ``"auto"`` (``ceil(dim / 16)``) or an int >= 1.
        ssm_conv: SS2D depth-wise conv kernel (odd >= 1, default 3).
        ssm_conv_bias: Conv bias (default True; LaMamba-Diff-XL: False).
        continuous_scan: Snake scan orders (default True) or VMamba's raster ones.
        mlp_ratio: MLP hidden width ``int(mlp_ratio * dim)`` (>= 0; 0: no MLP branch; default 4).
        chunk_size: Tokens per chunk of the selective scan (>= 1, default 64).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range (the message names it).

    Examples:
        >>> import torch
        >>> from nearfar import LaMambaBlock
        >>> LaMambaBlock(32, 2, window_size=4, ssm_d_state=4)(torch.randn(2, 8, 8, 32)).shape
        torch.Size([2, 8, 8, 32])
        >>> cond = LaMambaBlock(32, 2, window_size=4, shift_size=2, condition_dim=16)
        >>> cond(torch.randn(2, 8, 8, 32), torch.randn(2, 16)).shape
        torch.Size([2, 8, 8, 32])
    """

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 8, shift_size: int = 0,
                 qkv_bias: bool = True, qk_scale: float | None = None, condition_dim: int | None = None,
                 full_condition_project: bool = False, input_resolution: int | None = None, ssm_d_state: int = 16,
                 ssm_ratio: float = 2.0, ssm_dt_rank: int | str = "auto", ssm_conv: int = 3,
                 ssm_conv_bias: bool = True, continuous_scan: bool = True, mlp_ratio: float = 4.0,
                 chunk_size: int = 64):
        super().__init__()
        check_dim_heads(dim, num_heads)
        window_size = check_positive_int(window_size, "window_size")
        shift_size = check_nonneg_int(shift_size, "shift_size")
        if input_resolution is not None and check_positive_int(input_resolution, "input_resolution") <= window_size:
            window_size, shift_size = input_resolution, 0
        if shift_size >= window_size:
            raise ValueError(f"shift_size must be in [0, window_size - 1] = [0, {window_size - 1}], got {shift_size}")
        hidden = int(check_real_range(mlp_ratio, "mlp_ratio", 0, math.inf) * dim)
        self.dim, self.condition_dim = dim, condition_dim
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, ssm_d_state, ssm_ratio, ssm_dt_rank, ssm_conv, ssm_conv_bias, continuous_scan,
                       chunk_size)
        self.norm_swin = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim) if hidden else None
        self.mlp = Mlp(dim, hidden) if hidden else None
        if condition_dim is not None:
            condition_dim = check_positive_int(condition_dim, "condition_dim")
            project = check_bool(full_condition_project, "full_condition_project") or condition_dim != dim
            self.condition_projection = nn.Linear(condition_dim, dim) if project else nn.Identity()
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))

    def official_init(self) -> LaMambaBlock:
        """LaMamba-Diff's model-level re-initialisation of a block: every ``nn.Linear`` Xavier-uniform with zero
        bias (not the stacked SS2D parameters), then the adaLN output layer zeroed (the block is then the
        identity: its update is 0). Returns the block."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.condition_dim is not None:
            out_layer = cast(nn.Linear, self.adaLN_modulation[1])
            nn.init.zeros_(out_layer.weight)
            nn.init.zeros_(out_layer.bias)
        return self

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The block on a channel-last map.

        Args:
            x: Input ``(B, H, W, dim)``, any ``H, W >= 1``.
            c: Conditioning ``(B, condition_dim)``; required when the block has ``condition_dim``, else None.

        Returns:
            The block's update ``(B, H, W, dim)`` (the official block returns ``x`` plus it).

        Raises:
            TypeError: ``x`` or ``c`` is not a floating tensor.
            ValueError: a shape is wrong, or ``c`` is given to an unconditioned block or missing.
        """
        b = check_channels_last(x, 2, self.dim)[0]
        if self.condition_dim is None:
            if c is not None:
                raise ValueError("c must be None: this block has no conditioning (condition_dim=None)")
            mods = [(None, None, None)] * 3
        else:
            if c is None:
                raise ValueError(f"c (B, condition_dim={self.condition_dim}) is required by this block")
            if tuple(check_tensor(c, "c", 2).shape) != (b, self.condition_dim):
                raise ValueError(f"c must be (B={b}, condition_dim={self.condition_dim}), got {tuple(c.shape)}")
            m = self.adaLN_modulation(self.condition_projection(c)[:, None, None, :]).chunk(9, dim=-1)
            mods = [m[0:3], m[3:6], m[6:9]]
        branches: list[tuple[nn.Module, nn.Module]] = [(self.norm, self.op), (self.norm_swin, self.attn)]
        if self.mlp is not None and self.norm2 is not None:
            branches.append((self.norm2, self.mlp))
        update = None
        for (norm, fn), (shift, scale, gate) in zip(branches, mods):
            t = norm(x)
            if shift is not None:
                t = t * (1 + scale) + shift
            t = fn(t)
            t = t if gate is None else gate * t
            x = x + t
            # summed apart from x, so that the update is exact rather than a difference of large terms
            update = t if update is None else update + t
        assert update is not None  # the SS2D and attention branches always run
        return update

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "attn_mask" in state_dict:  # the official derived shift-mask buffer
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "attn_mask"}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, condition_dim={self.condition_dim}"


register(Mechanism(
    name="lamamba", paper="LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention "
    "and Mamba (arXiv 2408.02615, 2024)", repo="yunxiangfu2001/LaMamba-Diff", family="local+global",
    dims=("2d",), **image_layer(), cls=LaMambaBlock,
    make=lambda dim, num_heads, window_size=7, **kw: LaMambaBlock(dim, num_heads, window_size, **kw),
    notes="A whole block (SS2D selective scan, then Swin window attention, then MLP, each residual), returned as "
          "its update (the official block is x + layer(x)); window 7 "
          "here for the 56/14 maps (official default 8); unconditioned unless condition_dim is given."))
