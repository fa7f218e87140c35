"""Sparsifiner: a float64 re-derivation from the paper (Wei et al., CVPR 2023) and the official code
(lim142857/Sparsifiner ``src/models/sparsifiner.py`` ``MaskPredictor`` / ``Attention``, ``src/losses.py``) with
materialised per-query masks, the oracles (keep rate 1 = dense, exactly K keys per query, identity tables = full-rank
proxy), the losses against direct formulas, the official-approach baseline, and module hygiene."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from module_checks import assert_close, check_compile_matches_eager, check_state_dict_round_trip
from oracles.sparsifiner import BASELINES

import nearfar
from nearfar.layers.sparsifiner import SparsifinerAttention, top_keys

# ---------------------------------------------------------------------------------------------------------
# float64 reference: explicit formulas, a mask materialised per (batch item, head, query) from a full sort
# ---------------------------------------------------------------------------------------------------------


def _linear_resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """1D linear interpolation, align_corners=False: source ``max((i + .5) L / size - .5, 0)``, edge clamped."""
    length = t.shape[axis]
    if length == size:
        return t
    rows = []
    for i in range(size):
        src = max((i + 0.5) * length / size - 0.5, 0.0)
        i0 = min(math.floor(src), length - 1)
        i1 = min(i0 + 1, length - 1)
        rows.append(t.select(axis, i0) * (1 - (src - i0)) + t.select(axis, i1) * (src - i0))
    return torch.stack(rows, dim=axis)


def _table(p: torch.Tensor, n_cls: int, size: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    grid = p[n_cls:].reshape(*size, -1)
    grid = _linear_resize(_linear_resize(grid, 0, new[0]), 1, new[1]).reshape(new[0] * new[1], -1)
    return torch.cat([p[:n_cls], grid]) if n_cls else grid


def reference(m: SparsifinerAttention, x: torch.Tensor, cls: torch.Tensor | None = None,
              recon: bool = False) -> dict:
    """Everything in float64 from the module's parameters (converted): out, cls_out, coef, approx, mask, dense
    attention of the non-CLS rows, the smallest top-K margin (ranking gap) over all rows."""
    p = {k: v.double() for k, v in m.named_parameters(remove_duplicate=False)}
    x = x.double()
    b, hgt, wid, c = x.shape
    h, d, n_cls = m.num_heads, c // m.num_heads, int(m.cls_token)
    t = x.reshape(b, hgt * wid, c)
    if cls is not None:
        t = torch.cat([cls.double()[:, None], t], 1)
    n = t.shape[1]
    qkv = t @ p["qkv.weight"].T + (p["qkv.bias"] if "qkv.bias" in p else 0)
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    qc = q @ p["mask_predictor.proj_c_q.weight"].T + p["mask_predictor.proj_c_q.bias"]
    kc = k @ p["mask_predictor.proj_c_k.weight"].T + p["mask_predictor.proj_c_k.bias"]
    e = _table(p["mask_predictor.proj_n"], n_cls, m.input_size, (hgt, wid))
    f = _table(p["mask_predictor.proj_back_n"], n_cls, m.input_size, (hgt, wid))
    logits = torch.einsum("bhic,bhjc,jr->bhir", qc, kc, e)[:, :, n_cls:] * h ** -0.5
    coef = logits.softmax(-1)
    if recon:
        basis = f.T
    else:
        basis = torch.where(f.abs() > m.basis_threshold, f.abs(), 0.0).T
        topc = m.basis_coef_topk
        if topc is not None and topc < coef.shape[-1]:
            srt = coef.sort(-1, descending=True).values
            coef = torch.where(coef >= srt[..., topc - 1:topc], coef, 0.0)
    approx = coef @ basis
    keep = min(n, math.ceil(m.attn_keep_rate * n))
    mask = torch.ones(b, h, n, n, dtype=torch.bool)
    margin = math.inf
    if not recon and keep < n:
        vals, order = approx.detach().sort(-1, descending=True)
        mask[:, :, n_cls:] = False
        for bi in range(b):
            for hi in range(h):
                for i in range(n - n_cls):
                    mask[bi, hi, n_cls + i, order[bi, hi, i, :keep]] = True
        margin = float((vals[..., keep - 1] - vals[..., keep]).min())
    s = q @ k.transpose(-1, -2) * m.scale
    attn = s.masked_fill(~mask, float("-inf")).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c) @ p["proj.weight"].T + p["proj.bias"]
    return dict(out=out[:, n_cls:].reshape(b, hgt, wid, c), cls_out=out[:, 0], coef=coef, approx=approx, mask=mask,
                dense=s.softmax(-1)[:, :, n_cls:], margin=margin, keep=keep)


def _spread(m: SparsifinerAttention, seed: int = 0) -> SparsifinerAttention:
    """Wider token tables than the 0.02 init, so that rankings have clear gaps (and some entries pass the
    threshold, some not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (m.mask_predictor.proj_n, m.mask_predictor.proj_back_n):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return m


def _grads(m: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> dict:
    params = [p for p in m.parameters()]
    gs = torch.autograd.grad((out * g).sum(), [x, *params], allow_unused=True)
    return {"x": gs[0], **{name: gr for (name, _), gr in zip(m.named_parameters(), gs[1:])}}


# ---------------------------------------------------------------------------------------------------------
# the fast path against the reference, forward and backward
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), hgt=st.integers(2, 7), wid=st.integers(2, 7), heads=st.integers(1, 3),
       d=st.sampled_from([4, 8]), cls=st.booleans(), rate=st.sampled_from([0.1, 0.25, 0.5]),
       rn=st.integers(1, 3), rc=st.sampled_from([1, 2]), thr=st.sampled_from([0.0, 0.3]),
       topc=st.sampled_from([None, 1, 3, 8]), bias=st.booleans(), layout=st.sampled_from(["plain", "t", "slice"]),
       other_size=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_matches_float64_reference_forward_backward(b, hgt, wid, heads, d, cls, rate, rn, rc, thr, topc, bias, layout,
                                                      other_size, seed):
    torch.manual_seed(seed)
    c = heads * d
    size = (hgt + 1, wid) if other_size else (hgt, wid)
    m = _spread(SparsifinerAttention(c, heads, input_size=size, cls_token=cls, attn_keep_rate=rate,
                                     reduce_n_factor=rn, reduce_c_factor=rc, basis_threshold=thr,
                                     basis_coef_topk=topc, qkv_bias=bias), seed)
    if layout == "t":  # a transposed view (strided H/W)
        x = torch.randn(b, wid, hgt, c).transpose(1, 2)
    elif layout == "slice":  # a channel slice of a wider tensor
        x = torch.randn(b, hgt, wid, c + 3)[..., 1:c + 1]
    else:
        x = torch.randn(b, hgt, wid, c)
    tok = torch.randn(b, c) if cls else None
    ref = reference(m, x.detach(), tok)
    assume(ref["margin"] > 1e-6)  # a (near-)tie in the ranking: float32 may keep the other key

    m.keep_aux = True
    x = x.detach().requires_grad_()
    res = m(x, tok) if cls else m(x)
    out = res[0] if cls else res
    assert torch.equal(m.attn_mask(), ref["mask"])
    assert_close(m.aux["approx_attn"], ref["approx"], 1e-5, "approx_attn")
    assert_close(out, ref["out"], 1e-5)
    if cls:
        assert_close(res[1], ref["cls_out"], 1e-5, "cls output")

    g = torch.randn_like(out)
    got = _grads(m, x, out, g)
    m64 = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_()
    tok64 = tok.double() if cls else None
    want = _grads(m64, x64, reference(m64, x64, tok64)["out"], g.double())
    for name, gr in got.items():
        w = want[name]
        if gr is None:  # the predictor: its mask carries no gradient
            assert name.startswith("mask_predictor") and (w is None or not w.any()), name
            continue
        assert_close(gr, w, 3e-5, f"grad {name}")


# ---------------------------------------------------------------------------------------------------------
# oracles
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [False, True])
def test_keep_rate_one_is_dense_attention(cls):
    torch.manual_seed(0)
    m = SparsifinerAttention(16, 2, input_size=(5, 6), cls_token=cls, attn_keep_rate=1.0, keep_aux=True)
    x, tok = torch.randn(2, 5, 6, 16), torch.randn(2, 16)
    res = m(x, tok) if cls else m(x)
    out = res[0] if cls else res
    ref = reference(m, x, tok if cls else None)
    assert ref["mask"].all() and m.aux["topk_indices"] is None and m.attn_mask().all()
    assert_close(out, ref["out"], 1e-5)


@pytest.mark.parametrize("cls", [False, True])
def test_every_query_keeps_exactly_k_keys_and_cls_all(cls):
    torch.manual_seed(1)
    m = SparsifinerAttention(24, 3, input_size=(6, 7), cls_token=cls).train()
    x = torch.randn(2, 6, 7, 24)
    m(x, torch.randn(2, 24)) if cls else m(x)
    mask = m.attn_mask()
    n = 42 + int(cls)
    k = math.ceil(0.25 * n)
    assert mask.shape == (2, 3, n, n)
    assert (mask[:, :, int(cls):].sum(-1) == k).all()
    if cls:
        assert mask[:, :, 0].all()


def test_identity_tables_make_the_predictor_a_full_rank_proxy():
    torch.manual_seed(2)
    n = 20
    m = SparsifinerAttention(16, 2, input_size=(4, 5), reduce_n_factor=1, basis_threshold=0.0,
                             basis_coef_topk=None, keep_aux=True)
    with torch.no_grad():
        m.mask_predictor.proj_n.copy_(torch.eye(n))
        m.mask_predictor.proj_back_n.copy_(torch.eye(n))
    x = torch.randn(2, 4, 5, 16)
    m(x)
    p = m.mask_predictor
    q, k = m.aux["q"], m.aux["k"]
    proxy = (p.proj_c_q(q) @ p.proj_c_k(k).transpose(-1, -2) * 2 ** -0.5).softmax(-1)
    assert_close(m.aux["approx_attn"], proxy, 1e-6)
    top = proxy.topk(5, -1).indices
    want = torch.zeros(2, 2, n, n, dtype=torch.bool).scatter(-1, top, True)
    assert torch.equal(m.attn_mask(), want)


def test_top_keys_ranks_non_negative_floats_as_torch_topk():
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        s = torch.rand(3, 4, 50, dtype=dtype)
        s[..., ::7] = 0.0  # zeros rank last
        got = top_keys(s, 12).sort(-1).values
        want = s.topk(12, -1).indices.sort(-1).values
        assert torch.equal(got, want)


def test_baseline_matches_module():
    torch.manual_seed(4)
    fn = BASELINES["sparsifiner"]
    for cls, size, shape in ((False, (14, 14), (2, 14, 14, 24)), (True, (7, 7), (2, 7, 9, 24))):
        m = SparsifinerAttention(24, 3, input_size=size, cls_token=cls).eval()
        x, tok = torch.randn(*shape), torch.randn(2, 24)
        with torch.no_grad():
            got, want = (m(x, tok), fn(m, x, tok)) if cls else (m(x), fn(m, x))
        if cls:
            assert_close(got[1], want[1], 1e-5, "cls output")
            got, want = got[0], want[0]
        assert_close(got, want, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# training: the reconstruction phase and the losses, against direct float64 formulas
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [False, True])
def test_recon_phase_runs_dense_attention_with_the_signed_basis(cls):
    torch.manual_seed(5)
    m = _spread(SparsifinerAttention(16, 2, input_size=(5, 5), cls_token=cls, attn_recon=True)).train()
    x, tok = torch.randn(2, 5, 5, 16), torch.randn(2, 16)
    res = m(x, tok) if cls else m(x)
    out = res[0] if cls else res
    ref = reference(m, x, tok if cls else None, recon=True)
    assert ref["mask"].all() and m.aux["topk_indices"] is None
    assert_close(out, ref["out"], 1e-5)
    assert_close(m.aux["approx_attn"], ref["approx"], 1e-5, "approx (signed basis, no top-k, no threshold)")
    assert (m.aux["approx_attn"] < 0).any()  # the signed basis: negative scores exist
    m.eval()  # outside training the phase flag does nothing: sparse attention again
    res = m(x, tok) if cls else m(x)
    assert_close(res[0] if cls else res, reference(m, x, tok if cls else None)["out"], 1e-5)


@pytest.mark.parametrize("recon,cls", [(True, False), (False, True), (False, False)])
def test_losses_equal_their_float64_formulas_values_and_grads(recon, cls):
    torch.manual_seed(6)
    m = _spread(SparsifinerAttention(16, 2, input_size=(4, 5), cls_token=cls, attn_recon=recon)).train()
    x, tok = torch.randn(2, 4, 5, 16), torch.randn(2, 16)
    m(x, tok) if cls else m(x)
    n = 20 + int(cls)
    teacher = torch.rand(2, 2, n, n).softmax(-1)
    losses = {"recon": m.attn_recon_loss(teacher), "self": m.attn_self_distill_loss(),
              "l1": m.basis_l1_loss()}
    assert torch.equal(m.loss(teacher), losses["recon"]) and torch.equal(m.loss(), losses["self"])

    m64 = copy.deepcopy(m).double()
    ref = reference(m64, x.double(), tok.double() if cls else None, recon=recon)
    n_cls = int(cls)
    want = {"recon": ((ref["approx"] - teacher.double()[:, :, n_cls:]) ** 2).sum(),
            "self": ((ref["approx"] - ref["dense"]) ** 2).sum(),
            "l1": m64.mask_predictor.proj_back_n.abs().sum()}
    params = [m.mask_predictor.proj_back_n, m.mask_predictor.proj_n, m.mask_predictor.proj_c_q.weight, m.qkv.weight]
    params64 = [m64.mask_predictor.proj_back_n, m64.mask_predictor.proj_n, m64.mask_predictor.proj_c_q.weight,
                m64.qkv.weight]
    for key, loss in losses.items():
        assert_close(loss, want[key], 1e-5, f"{key} loss")
        got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        exp = torch.autograd.grad(want[key], params64, allow_unused=True, retain_graph=True)
        for i, (a, e) in enumerate(zip(got, exp)):
            assert (a is None) == (e is None), f"{key}: grad {i} presence"
            if a is not None:
                assert_close(a, e, 1e-4, f"{key}: grad of param {i}")


def test_aux_is_kept_only_when_asked():
    m = SparsifinerAttention(16, 2, input_size=4).eval()
    with pytest.raises(RuntimeError, match="no forward"):
        m.loss()
    m(torch.randn(1, 4, 4, 16))
    assert m.aux is None
    m.train()(torch.randn(1, 4, 4, 16))
    assert m.aux is not None and m.aux["approx_attn"].requires_grad
    with pytest.raises(ValueError, match="teacher_attn"):
        m.attn_recon_loss(torch.rand(1, 2, 15, 16))


# ---------------------------------------------------------------------------------------------------------
# module hygiene
# ---------------------------------------------------------------------------------------------------------

OFFICIAL_KEYS = {  # the official Attention(dim=16, num_heads=2, num_tokens=26, reduce_n_factor=5, qkv_bias=True)
    "qkv.weight": (48, 16), "qkv.bias": (48,), "proj.weight": (16, 16), "proj.bias": (16,),
    "mask_predictor.proj_n": (26, 5), "mask_predictor.proj_back_n": (26, 5),
    "mask_predictor.proj_c_q.weight": (4, 8), "mask_predictor.proj_c_q.bias": (4,),
    "mask_predictor.proj_c_k.weight": (4, 8), "mask_predictor.proj_c_k.bias": (4,),
}


@pytest.mark.parametrize("share", [False, True])
def test_state_dict_keys_equal_the_official_attention(share):
    m = SparsifinerAttention(16, 2, input_size=5, cls_token=True, reduce_n_factor=5, qkv_bias=True,
                             share_inout_proj=share)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == OFFICIAL_KEYS
    state = {k: torch.randn(s) for k, s in OFFICIAL_KEYS.items()}
    if share:
        state["mask_predictor.proj_back_n"] = state["mask_predictor.proj_n"]
    m.load_state_dict(state, strict=True)
    assert torch.equal(m.mask_predictor.proj_back_n, state["mask_predictor.proj_back_n"])
    assert (m.mask_predictor.proj_back_n is m.mask_predictor.proj_n) == share


def test_compile_matches_eager_and_state_dict_round_trip():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 5, 16)
    check_compile_matches_eager(_spread(SparsifinerAttention(16, 2, input_size=(6, 5))), x)
    check_state_dict_round_trip(lambda: SparsifinerAttention(16, 2, input_size=(6, 5)), x)


def test_registry_entry():
    mech = {m.name: m for m in nearfar.mechanisms()}["sparsifiner"]
    assert mech.family == "routed" and mech.dims == ("2d",) and set(mech.patterns) == {"NS"}
    layer = mech.make(32, 2)
    assert isinstance(layer, SparsifinerAttention) and layer(torch.randn(1, 9, 11, 32)).shape == (1, 9, 11, 32)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dim=15, num_heads=2), ValueError, "multiple"),
    (dict(attn_keep_rate=0.0), ValueError, "attn_keep_rate"),
    (dict(attn_keep_rate=1.5), ValueError, "attn_keep_rate"),
    (dict(reduce_n_factor=0), ValueError, "reduce_n_factor"),
    (dict(reduce_n_factor=17), ValueError, "reduce_n_factor"),
    (dict(reduce_c_factor=9), ValueError, r"reduce_c_factor.*\[1, 8\]"),
    (dict(basis_threshold=-0.1), ValueError, "basis_threshold"),
    (dict(basis_coef_topk=0), ValueError, "basis_coef_topk"),
    (dict(basis_coef_topk=2.5), TypeError, "basis_coef_topk"),
    (dict(input_size=(4, 0)), ValueError, "input_size"),
    (dict(cls_token=1), TypeError, "cls_token"),
    (dict(attn_recon="yes"), TypeError, "attn_recon"),
    (dict(qk_scale=-1.0), ValueError, "qk_scale"),
])
def test_bad_arguments_raise_clear_errors(kwargs, err, match):
    args = dict(dim=16, num_heads=2, input_size=4)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        SparsifinerAttention(**args)


def test_bad_inputs_raise_clear_errors():
    m = SparsifinerAttention(16, 2, input_size=4)
    with pytest.raises(ValueError, match="channel-last"):
        m(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="cls_token=False"):
        m(torch.randn(1, 4, 4, 16), torch.randn(1, 16))
    mc = SparsifinerAttention(16, 2, input_size=4, cls_token=True)
    with pytest.raises(TypeError, match="cls must be"):
        mc(torch.randn(1, 4, 4, 16))
    with pytest.raises(ValueError, match=r"\(B, dim\)"):
        mc(torch.randn(1, 4, 4, 16), torch.randn(2, 16))
