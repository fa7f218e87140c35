"""LaMamba block: a float64 reference written from the paper and the official code (yunxiangfu2001/LaMamba-Diff
``model/lamamba.py::LaMambaBlock_conditioned``, ``model/vmamba.py::SS2D.forwardv2/forward_corev2``,
``model/continuous_scan.py``) with a token-by-token scan and loop-built scan orders, compared forward and backward;
the scan-order, initialisation and identity oracles; official state-dict keys; the benchmark baseline; hygiene."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import assert_close, check_compile_matches_eager, check_state_dict_round_trip
from oracles.lamamba import BASELINES, get_continuous_paths
from test_swin import swin_reference

import nearfar
from nearfar.layers.lamamba import LaMambaBlock, scan_paths

# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


def snake_paths(h: int, w: int, continuous: bool) -> list[list[int]]:
    """The four visiting orders with loops (pixel ``r * w + c``): snakes as ``lr_tranverse`` / ``tb_tranverse``
    (row snakes from the top-left and the bottom-left, column snakes from the bottom-left and the bottom-right)
    on ``h x w``; else VMamba's row-major, column-major, reversed."""
    if not continuous:
        rows = [r * w + c for r in range(h) for c in range(w)]
        cols = [r * w + c for c in range(w) for r in range(h)]
        return [rows, cols, rows[::-1], cols[::-1]]
    out = []
    for top in (True, False):
        out.append([((i if top else h - 1 - i) * w + (j if i % 2 == 0 else w - 1 - j))
                    for i in range(h) for j in range(w)])
    for left in (True, False):
        path = []
        for j in range(w):
            for i in range(h):
                row = h - 1 - (i if j % 2 == 0 else h - 1 - i)
                path.append(row * w + (j if left else w - 1 - j))
        out.append(path)
    return out


def ss2d_reference(op, t: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = t.shape
    d, n, rank = op.d_inner, op.d_state, op.dt_rank
    xz = t @ op.in_proj.weight.t()
    a, z = xz[..., :d], F.silu(xz[..., d:])
    a = a.permute(0, 3, 1, 2)
    if op.conv2d is not None:
        a = F.conv2d(a, op.conv2d.weight, op.conv2d.bias, padding=op.conv2d.padding, groups=d)
    a = F.silu(a).reshape(b, d, h * w)
    y = torch.zeros_like(a)
    for k, path in enumerate(snake_paths(h, w, op.continuous_scan)):
        u = a[:, :, path]  # (b, d, L) in scan order
        proj = torch.einsum("cd,bdl->bcl", op.x_proj_weight[k], u)
        delta = F.softplus(torch.einsum("dr,brl->bdl", op.dt_projs_weight[k], proj[:, :rank])
                           + op.dt_projs_bias[k][:, None])
        bm, cm = proj[:, rank:rank + n], proj[:, rank + n:]
        A = -torch.exp(op.A_logs[k * d:(k + 1) * d])
        skip = op.Ds[k * d:(k + 1) * d]
        state = u.new_zeros(b, d, n)
        for t_, p in enumerate(path):
            state = torch.exp(delta[:, :, t_, None] * A) * state + delta[:, :, t_, None] * bm[:, None, :, t_] * \
                u[:, :, t_, None]
            y[:, :, p] = y[:, :, p] + (state * cm[:, None, :, t_]).sum(-1) + skip * u[:, :, t_]
    y = F.layer_norm(y.transpose(1, 2), (d,), op.out_norm.weight, op.out_norm.bias).reshape(b, h, w, d)
    return (y * z) @ op.out_proj.weight.t()


def block_reference(m: LaMambaBlock, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """The official block's output minus ``x`` (the module returns the update)."""
    x0 = x
    if m.condition_dim is None:
        mods = [torch.zeros(()), torch.zeros(()), torch.ones(())] * 3
    else:
        cp = m.condition_projection(c)
        mods = list((F.silu(cp) @ m.adaLN_modulation[1].weight.t() + m.adaLN_modulation[1].bias)[:, None, None]
                    .chunk(9, dim=-1))

    def ln(mod, t):
        return F.layer_norm(t, (m.dim,), mod.weight, mod.bias)

    x = x + mods[2] * ss2d_reference(m.op, ln(m.norm, x) * (1 + mods[1]) + mods[0])
    x = x + mods[5] * swin_reference(m.attn, ln(m.norm_swin, x) * (1 + mods[4]) + mods[3])
    if m.mlp is not None:
        hid = F.gelu((ln(m.norm2, x) * (1 + mods[7]) + mods[6]) @ m.mlp.fc1.weight.t() + m.mlp.fc1.bias)
        x = x + mods[8] * (hid @ m.mlp.fc2.weight.t() + m.mlp.fc2.bias)
    return x - x0


def _block(dim=8, heads=2, seed=0, randomize=True, **kw) -> LaMambaBlock:
    torch.manual_seed(seed)
    m = LaMambaBlock(dim, heads, **kw)
    if randomize:  # visible, non-trivial values everywhere (the adaLN output is not zero)
        with torch.no_grad():
            torch.nn.init.normal_(m.attn.relative_position_bias_table)
            for name, p in m.named_parameters():
                if name.endswith(("norm.weight", "norm_swin.weight", "norm2.weight", "out_norm.weight")):
                    p.add_(0.3 * torch.randn_like(p))
                elif "adaLN" in name or "condition_projection" in name:
                    p.normal_(0, 0.3)
    return m


def compare(m: LaMambaBlock, x: torch.Tensor, c: torch.Tensor | None = None, rtol=2e-5, grad_rtol=5e-5):
    """float32 module vs the float64 reference: output, grads of x (and c), every parameter's grad."""
    x = x.detach().float().requires_grad_()
    cc = None if c is None else c.detach().float().requires_grad_()
    out = m(x, cc)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    m64 = copy.deepcopy(m).double()
    m64.zero_grad()
    x64 = x.detach().double().requires_grad_()
    c64 = None if c is None else cc.detach().double().requires_grad_()
    expected = block_reference(m64, x64, c64)
    (expected * g.double()).sum().backward()
    assert_close(out, expected, rtol)
    assert_close(x.grad, x64.grad, grad_rtol, "x.grad")
    if c is not None:
        assert_close(cc.grad, c64.grad, grad_rtol, "c.grad")
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, p64.grad, grad_rtol, f"{name}.grad")
    m.zero_grad()


# ---------------------------------------------------------------------------------------------------------------
# module vs reference
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6), heads=st.integers(1, 2),
       window=st.integers(1, 4), shift=st.integers(0, 3), n=st.integers(1, 3), continuous=st.booleans(),
       conditioned=st.booleans(), chunk=st.sampled_from([1, 3, 64]), seed=st.integers(0, 50))
def test_block_matches_reference(b, h, w, heads, window, shift, n, continuous, conditioned, chunk, seed):
    m = _block(4 * heads, heads, seed, window_size=window, shift_size=shift % window, ssm_d_state=n,
               continuous_scan=continuous, condition_dim=6 if conditioned else None, chunk_size=chunk,
               ssm_ratio=1.5)
    c = torch.randn(b, 6) if conditioned else None
    compare(m, torch.randn(b, h, w, 4 * heads), c)


@pytest.mark.parametrize("kw", [
    dict(window_size=4, shift_size=2, condition_dim=8, full_condition_project=True),  # projected although 8 = dim
    dict(window_size=3, condition_dim=8, ssm_conv=1, mlp_ratio=0),  # identity projection, no conv, no MLP
    dict(window_size=8, shift_size=4, input_resolution=6, ssm_conv_bias=False, ssm_dt_rank=3),  # window -> 6
])
def test_block_options_match_reference(kw):
    m = _block(8, 2, 1, **kw)
    if kw.get("mlp_ratio") == 0:
        assert m.mlp is None and m.norm2 is None
    if "input_resolution" in kw:
        assert m.attn.window_size == (6, 6) and m.attn.shift_size == (0, 0)
    compare(m, torch.randn(2, 6, 6, 8), torch.randn(2, 8) if "condition_dim" in kw else None)


def test_non_contiguous_inputs():
    m = _block(8, 2, 2, window_size=3, shift_size=1, condition_dim=5)
    x = torch.randn(2, 7, 5, 8).transpose(1, 2).contiguous().transpose(1, 2)  # (2, 7, 5, 8) with swapped strides
    big = torch.randn(2, 7, 5, 16)[..., :8]  # sliced channels
    c = torch.randn(5, 2).t()
    for inp in (x, big):
        compare(m, inp, c)


# ---------------------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(1, 1), (4, 4), (5, 5), (3, 7), (6, 2)])
@pytest.mark.parametrize("continuous", [True, False])
def test_scan_orders(h, w, continuous):
    """Permutations; the loop construction; merge(scan(a)) = 4a; even square: path1 = reversed path0 and path3 =
    reversed path2; square: the official lists (``get_continuous_paths``)."""
    paths = scan_paths(h, w, continuous)
    assert paths.tolist() == snake_paths(h, w, continuous)
    for p in paths:
        assert sorted(p.tolist()) == list(range(h * w))
    a = torch.randn(3, h * w)
    scanned = a[:, paths]  # (3, 4, L)
    inverse = torch.argsort(paths, dim=1)
    assert torch.equal(scanned.gather(2, inverse[None].expand(3, 4, h * w)).sum(1), 4 * a)
    if continuous and h == w:
        lr, tb, _, _ = get_continuous_paths(h)
        assert paths.tolist() == lr + tb
        if h % 2 == 0:
            assert torch.equal(paths[1], paths[0].flip(0)) and torch.equal(paths[3], paths[2].flip(0))
        for p in paths:  # snakes: every step moves to a 4-neighbour
            r, c = p // w, p % w
            assert ((r.diff().abs() + c.diff().abs()) == 1).all()
    if not continuous:
        assert torch.equal(paths[2], paths[0].flip(0)) and torch.equal(paths[3], paths[1].flip(0))


def test_official_init_makes_the_block_the_identity():
    m = _block(8, 2, 3, randomize=False, window_size=4, shift_size=2, condition_dim=12).official_init()
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(m(x, torch.randn(2, 12)), torch.zeros_like(x))
    assert m.op.x_proj_weight.abs().max() <= 8 ** -0.5 * 2  # the stacked SS2D weights keep their own init


def test_ss2d_init():
    op = LaMambaBlock(32, 2, ssm_d_state=5).op
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert torch.allclose(-torch.exp(op.A_logs), -torch.arange(1, 6.0).expand(4 * 64, 5))
    assert torch.equal(op.Ds, torch.ones(4 * 64))
    assert op.dt_rank == 2 and op.dt_projs_weight.abs().max() <= 2 ** -0.5


def test_one_window_is_global_attention_with_the_bias():
    """M = H = W, no shift: the attention branch is full MHSA + the relative-position bias of the whole map."""
    m = _block(8, 2, 4, window_size=5)
    t = torch.randn(2, 5, 5, 8)
    q, k, v = m.attn.qkv(t).reshape(2, 25, 3, 2, 4).permute(2, 0, 3, 1, 4)
    coords = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + 4
    bias = m.attn.relative_position_bias_table[rel[0] * 9 + rel[1]].permute(2, 0, 1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert_close(m.attn(t), m.attn.proj(o.transpose(1, 2).reshape(2, 5, 5, 8)))


# ---------------------------------------------------------------------------------------------------------------
# official keys, baseline, hygiene
# ---------------------------------------------------------------------------------------------------------------


def official_keys(c, c_cond, d_state, m, heads, nw, conv_bias=True, shifted=True):
    """Keys and shapes of ``LaMambaBlock_conditioned(hidden_dim=c, condition_dim=c_cond, ...)``'s state dict."""
    d, rank = 2 * c, -(-c // 16)
    keys = {"condition_projection.weight": (c, c_cond), "condition_projection.bias": (c,),
            "norm_swin.weight": (c,), "norm_swin.bias": (c,), "norm.weight": (c,), "norm.bias": (c,),
            "norm2.weight": (c,), "norm2.bias": (c,),
            "attn.relative_position_bias_table": ((2 * m - 1) ** 2, heads),
            "attn.relative_position_index": (m * m, m * m), "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
            "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
            "op.out_norm.weight": (d,), "op.out_norm.bias": (d,), "op.in_proj.weight": (2 * d, c),
            "op.conv2d.weight": (d, 1, 3, 3), "op.x_proj_weight": (4, rank + 2 * d_state, d),
            "op.out_proj.weight": (c, d), "op.dt_projs_weight": (4, d, rank), "op.dt_projs_bias": (4, d),
            "op.A_logs": (4 * d, d_state), "op.Ds": (4 * d,),
            "mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,), "mlp.fc2.weight": (c, 4 * c), "mlp.fc2.bias": (c,),
            "adaLN_modulation.1.weight": (9 * c, c), "adaLN_modulation.1.bias": (9 * c,)}
    if conv_bias:
        keys["op.conv2d.bias"] = (d,)
    if shifted:
        keys["attn_mask"] = (nw, m * m, m * m)
    return keys


def test_official_state_dict_loads_strictly():
    derived = {"attn.relative_position_index", "attn_mask"}
    # a LaMamba-Diff-XL-like block (d_state 1, no conv bias), shifted: 16x16 map, window 8
    keys = official_keys(32, 48, 1, 8, 4, 4, conv_bias=False)
    m = LaMambaBlock(32, 4, 8, 4, condition_dim=48, ssm_d_state=1, ssm_conv_bias=False)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: v for k, v in keys.items()
                                                                        if k not in derived}
    torch.manual_seed(5)
    sd = {k: torch.randn(v) for k, v in keys.items()}
    m.load_state_dict(sd, strict=True)
    assert "attn_mask" in sd and all(torch.equal(m.state_dict()[k], sd[k]) for k in keys if k not in derived)
    # condition_dim == dim: no projection (Identity), as the official block
    m2 = LaMambaBlock(32, 4, 8, condition_dim=32)
    keys2 = {k: v for k, v in official_keys(32, 32, 16, 8, 4, 1, shifted=False).items()
             if not k.startswith("condition_projection")}
    m2.load_state_dict({k: torch.randn(v) for k, v in keys2.items()}, strict=True)
    x = torch.randn(1, 9, 9, 32)
    check_state_dict_round_trip(lambda: _block(32, 4, window_size=4, shift_size=2), x)


@pytest.mark.parametrize("size,kw", [(8, dict(window_size=4, shift_size=2)), (6, dict(window_size=3)),
                                     (8, dict(window_size=4, continuous_scan=False, condition_dim=6))])
def test_baseline_matches_module(size, kw):
    m = _block(12, 3, 6, **kw)
    x = torch.randn(2, size, size, 12)
    c = torch.randn(2, 6) if "condition_dim" in kw else None
    with torch.no_grad():
        assert_close(BASELINES["lamamba"](m, x, c), m(x, c), 1e-5, "baseline")


def test_compile_matches_eager_and_half_inputs():
    check_compile_matches_eager(_block(8, 2, 7, window_size=3, shift_size=1), torch.randn(1, 6, 5, 8))
    m = _block(8, 2, 8, window_size=3).bfloat16()
    out = m(torch.randn(1, 5, 6, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        LaMambaBlock(10, 3)
    with pytest.raises(ValueError, match="shift_size"):
        LaMambaBlock(8, 2, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="window_size"):
        LaMambaBlock(8, 2, window_size=0)
    with pytest.raises(ValueError, match="ssm_ratio"):
        LaMambaBlock(8, 2, ssm_ratio=0)
    with pytest.raises(ValueError, match="ssm_ratio"):
        LaMambaBlock(8, 2, ssm_ratio=0.05)  # int(0.4) = 0 channels
    with pytest.raises(ValueError, match="d_state"):
        LaMambaBlock(8, 2, ssm_d_state=0)
    with pytest.raises(ValueError, match="d_conv"):
        LaMambaBlock(8, 2, ssm_conv=2)
    with pytest.raises(ValueError, match="mlp_ratio"):
        LaMambaBlock(8, 2, mlp_ratio=-1)
    with pytest.raises(ValueError, match="condition_dim"):
        LaMambaBlock(8, 2, condition_dim=0)
    with pytest.raises(TypeError, match="continuous_scan"):
        LaMambaBlock(8, 2, continuous_scan="yes")
    with pytest.raises(ValueError, match="dt_rank"):
        LaMambaBlock(8, 2, ssm_dt_rank=0)
    m, mc = LaMambaBlock(8, 2, 4), LaMambaBlock(8, 2, 4, condition_dim=6)
    x = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="c must be None"):
        m(x, torch.randn(1, 6))
    with pytest.raises(ValueError, match="required"):
        mc(x)
    with pytest.raises(ValueError, match="condition_dim=6"):
        mc(x, torch.randn(1, 5))
    with pytest.raises(TypeError, match="c"):
        mc(x, [[1.0] * 6])


def test_registry():
    entry = {e.name: e for e in nearfar.mechanisms()}["lamamba"]
    assert entry.cls is LaMambaBlock and entry.family == "local+global" and entry.dims == ("2d",)
    for (dim, heads), grid in (((96, 3), 14), ((384, 12), 7)):
        m = entry.make(dim, heads)
        assert m.attn.window_size == (7, 7) and m.attn.num_heads == heads and m.condition_dim is None
        with torch.no_grad():
            assert m(torch.randn(1, grid, grid, dim)).shape == (1, grid, grid, dim)
