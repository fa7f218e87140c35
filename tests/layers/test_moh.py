"""MoH (mixture-of-head attention): a float64 reference written from the paper's gate formulas and the official code
(SkyworkAI/MoH ``MoH-ViT/attention.py`` ``Attention.forward``, ``MoH-LLaMA3/Inference_code/modeling_llama.py``
``LlamaAttention.forward``): every head attends densely, then each token's head outputs are scaled by its gates.
Oracles: all heads on with uniform gates is multi-head attention; a token's output ignores other tokens' gates;
exactly ``H_s + K`` heads per token; the load-balance loss by hand; unpicked heads and rows are not computed."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from module_checks import (
    Split,
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)

import nearfar as nf
import nearfar.layers.moh as moh_module
import nearfar.rows as rows_module
from nearfar import DenseAttention, MoHAttention, native

D = 4  # head dim


def _lin(lin, t):
    y = t @ lin.weight.double().T
    return y if lin.bias is None else y + lin.bias.double()


def reference_gates(m, x):
    """Gates ``(B, N, H)`` in float64 token by token, as the official code writes them, and the smallest gap between
    the K-th and (K+1)-th routing score of any token (selections closer than that may differ in float32)."""
    b, n, _ = x.shape
    h, hs, k = m.num_heads, m.shared_heads, m.top_k
    r = h - hs
    q = _lin(m.q_proj, x).view(b, n, h, m.head_dim)  # before RoPE
    rows, gap = [], math.inf
    for bi in range(b):
        for t in range(n):
            xt = x[bi, t]
            if m.router == "query_norm":
                score = torch.stack([q[bi, t, hs + i].norm() for i in range(r)])
                if k < r:  # official: norms / their std (unbiased), softmax, top-K; binary gate
                    score = torch.softmax(score / score.std(), 0)
            else:
                score = torch.softmax(xt @ m.wg.weight.double().T, 0)
            order = sorted(range(r), key=lambda i: -float(score[i].detach()))
            chosen = order[:k]
            if k < r:
                gap = min(gap, float(score[order[k - 1]].detach() - score[order[k]].detach()))
            mask = torch.zeros(r, dtype=torch.float64)
            mask[chosen] = 1.0
            if m.router == "query_norm":
                rows.append(torch.cat([torch.ones(hs, dtype=torch.float64), mask]))
                continue
            routed = score * mask / (score * mask).sum() * k
            if hs == 0:
                rows.append(routed)
                continue
            shared = torch.softmax(xt @ m.wg_1.weight.double().T, 0) * hs if hs > 1 else torch.ones(1).double()
            alpha = torch.softmax(xt @ m.wg_0.weight.double().T, 0) * 2
            rows.append(torch.cat([shared * alpha[0], routed * alpha[1]]))
    return torch.stack(rows).view(b, n, h), gap


def moh_reference(m, x, context=None, key_padding_mask=None, gates=None):
    """The layer in float64: dense attention of every head (causal mask for causal self-attention), each head's
    output times the token's gate (``reference_gates``, or ``gates (B, N, H)``), then ``o_proj``."""
    b, n, _ = x.shape
    h, kv, d = m.num_heads, m.num_kv_heads, m.head_dim
    src = x if context is None else context
    q = _lin(m.q_proj, x).view(b, n, h, d).transpose(1, 2)
    k = _lin(m.k_proj, src).view(b, -1, kv, d).transpose(1, 2)
    v = _lin(m.v_proj, src).view(b, -1, kv, d).transpose(1, 2)
    if context is None:
        pos = torch.arange(n)
        q, k = ref.rope(q, pos), ref.rope(k, pos)
    nk = k.shape[2]
    allowed = torch.tril(torch.ones(n, nk, dtype=torch.bool)) if m.causal and context is None \
        else torch.ones(n, nk, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    heads = ref.dense_reference(q, k, v, allowed, d ** -0.5)  # (B, H, N, d)
    if gates is None:
        gates, _ = reference_gates(m, x)
    out = heads * gates.transpose(1, 2)[..., None]
    return out.transpose(1, 2).reshape(b, n, h * d) @ m.o_proj.weight.double().T


def _make(heads, hs, k, router="learned", causal=False, cross=False, kv=None, qkv_bias=False, seed=0):
    torch.manual_seed(seed)
    m = MoHAttention(heads * D, heads, causal=causal, cross=cross, shared_heads=hs, top_k=k, router=router,
                     num_kv_heads=kv, qkv_bias=qkv_bias)
    with torch.no_grad():  # routers far from uniform, so that gates differ and their gradients matter
        for name in ("wg", "wg_0", "wg_1"):
            if hasattr(m, name):
                getattr(m, name).weight.normal_()
    return m


def _layout(x, how):
    if how == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "sliced":
        return torch.cat([x, torch.randn_like(x)], -1)[..., :x.shape[-1]]
    return x


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    hs = draw(st.integers(0, heads - 1))
    return dict(heads=heads, hs=hs, k=draw(st.integers(1, heads - hs)),
                kv=draw(st.sampled_from([g for g in (1, 2, 3, 6) if heads % g == 0])),
                router=draw(st.sampled_from(["learned", "query_norm"])), causal=draw(st.booleans()),
                cross=draw(st.booleans()), qkv_bias=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(cfg=configs(), b=st.integers(1, 3), n=st.integers(1, 13), mctx=st.integers(1, 9),
       how=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 99))
def test_matches_float64_reference_forward_and_backward(cfg, b, n, mctx, how, seed):
    m = _make(**cfg, seed=seed)
    x = torch.randn(b, n + (mctx if cfg["cross"] else 0), cfg["heads"] * D)
    _, gap = reference_gates(m.double(), x[:, :n].double())
    m.float()
    assume(gap > 1e-4)  # a near tie may pick other heads in float32
    if cfg["cross"]:
        check_against_reference(Split(m, n), _layout(x, how),
                                lambda s, xc: moh_reference(s.layer, xc[:, :n], xc[:, n:]))
    else:
        check_against_reference(m, _layout(x, how), moh_reference)


CASES = [dict(causal=False), dict(causal=True), dict(causal=False, cross=True), dict(causal=True, cross=True)]
IDS = ["NS", "CS", "NC", "CC"]


def _run(m, x, ctx):
    return m(x, context=ctx) if m.cross else m(x)


@pytest.mark.parametrize("router", ["learned", "query_norm"])
@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_all_heads_on_with_uniform_gates_is_multi_head_attention(kw, router):
    m = _make(6, 2, 4, router, kv=3, qkv_bias=True, **kw)
    dense = DenseAttention(24, 6, num_kv_heads=3, qkv_bias=True, **kw)
    missing, unexpected = dense.load_state_dict(m.state_dict(), strict=False)
    assert not missing and set(unexpected) == ({"wg.weight", "wg_0.weight", "wg_1.weight"} if router == "learned"
                                               else set())
    x, ctx = torch.randn(2, 11, 24), torch.randn(2, 7, 24)
    with torch.no_grad():
        if router == "learned":
            assert (_run(m, x, ctx) - _run(dense, x, ctx)).abs().max() > 1e-3  # learned gates: not MHA yet
            for name in ("wg", "wg_0", "wg_1"):
                getattr(m, name).weight.zero_()  # uniform router outputs: every gate is 1
        assert_close(_run(m, x, ctx), _run(dense, x, ctx))
        m.top_k = 3  # fewer heads on: no longer MHA
        assert (_run(m, x, ctx) - _run(dense, x, ctx)).abs().max() > 1e-3


def _o_proj_input(m, x, ctx):
    seen = []
    hook = m.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        _run(m, x, ctx)
    hook.remove()
    return seen[0].view(*x.shape[:2], m.num_heads, m.head_dim)


@pytest.mark.parametrize("router", ["learned", "query_norm"])
@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_exactly_shared_plus_k_heads_are_on_per_token(kw, router):
    m = _make(8, 3, 2, router, kv=2, **kw)
    x, ctx = torch.randn(3, 17, 32), torch.randn(3, 5, 32)
    on = _o_proj_input(m, x, ctx).norm(dim=-1) > 0  # (B, N, H)
    assert bool(on[..., :3].all())
    assert torch.equal(on.sum(-1), torch.full((3, 17), 3 + 2))
    assert on[..., 3:].any(1).sum(-1).min() > 2  # the tokens of a sequence pick different heads


@pytest.mark.parametrize("kw", CASES, ids=IDS)
def test_a_tokens_output_ignores_the_other_tokens_gates(kw):
    m = _make(6, 2, 2, "learned", kv=2, **kw)
    x, ctx, t = torch.randn(2, 13, 24), torch.randn(2, 6, 24), 5
    with torch.no_grad():
        out = _run(m, x, ctx)
    route = m.route

    def other_gates(xx, q, kpm=None):
        gates, picked = route(xx, q, kpm)
        g = torch.Generator().manual_seed(0)
        new = torch.zeros_like(picked).scatter(-1, torch.rand(picked.shape, generator=g).topk(2, -1).indices, True)
        new_gates = torch.rand(gates.shape, generator=g) + 0.5
        new_gates[..., 2:] *= new
        mine = torch.zeros(xx.shape[1], dtype=torch.bool)
        mine[t] = True
        return torch.where(mine[:, None], gates, new_gates), torch.where(mine[:, None], picked, new)

    m.route = other_gates
    with torch.no_grad():
        moved = _run(m, x, ctx)
    assert_close(moved[:, t], out[:, t], 1e-6)
    assert (moved - out).abs().max() > 1e-3


def _spy(monkeypatch):
    """(heads, rows) of every attention call of the layer (the fused kernel and nearfar.attend)."""
    calls = []
    sdpa, attend = F.scaled_dot_product_attention, moh_module.attend

    def spy_sdpa(q, *a, **kw):
        calls.append(tuple(q.shape[1:3]))
        return sdpa(q, *a, **kw)

    def spy_attend(q, *a, **kw):
        calls.append(tuple(q.shape[1:3]))
        return attend(q, *a, **kw)

    attend_rows = moh_module.attend_rows

    def spy_rows(q, k, v, rows, **kw):  # (heads, most rows of a head) that the call computes
        calls.append((q.shape[1], int(rows.sum(-1).max())))
        return attend_rows(q, k, v, rows, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(moh_module, "attend", spy_attend)
    monkeypatch.setattr(moh_module, "attend_rows", spy_rows)
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_unpicked_heads_and_rows_are_not_computed(monkeypatch, causal):
    m = _make(4, 1, 1, "query_norm", causal=causal)
    picked = torch.zeros(2, 6, 3, dtype=torch.bool)
    picked[:, 0::2, 0] = picked[:, 1::2, 1] = True  # token t picks routed head t % 2; the third is never picked
    gates = torch.cat([torch.ones(2, 6, 1), picked.float()], -1)
    m.route = lambda xx, q, kpm=None: (gates, picked)
    x = torch.randn(2, 6, 16)
    calls = _spy(monkeypatch)
    kernel_rows = []
    if causal and native.available():  # the rows the compiled kernel is given: each head's 3 picked rows
        lists_attention = rows_module.lists_attention
        monkeypatch.setattr(rows_module, "lists_attention", lambda q, k, v, parts, *a: (
            kernel_rows.append(sorted(int((x.q_idx >= 0).sum()) for part in parts for x in part)),
            lists_attention(q, k, v, parts, *a))[1])
    with torch.no_grad():
        out = m(x)
    # the shared head on 6 rows, the two picked routed heads on their 3 rows each (causal: each row bounded by its
    # position, through attend_rows); head 3 never
    assert calls == [(1, 6), (2, 3)]
    if causal and native.available():
        assert kernel_rows == [[12]]  # B=2 x 2 heads x 3 rows, one kernel call
    monkeypatch.undo()
    assert_close(out, moh_reference(m, x.double(), gates=gates.double()))


def test_decoding_one_sequence_runs_the_shared_and_the_k_picked_heads_only(monkeypatch):
    m = _make(8, 4, 2, "query_norm", causal=True).eval()
    x = torch.randn(1, 9, 32)
    cache = m.new_cache(1)
    with torch.no_grad():
        m(x[:, :8], cache=cache)
        calls = _spy(monkeypatch)
        m(x[:, 8:], cache=cache)
    assert sum(h for h, _ in calls) == 4 + 2 and all(rows == 1 for _, rows in calls)


def test_aux_loss_by_hand():
    """3 routed heads, top-1; router logits = the first three channels. Probabilities (1/2, 1/4, 1/4),
    (1/6, 1/2, 1/3), (5/8, 1/8, 1/4) pick heads 0, 1, 0: P = (31/72, 21/72, 20/72), f = (2/3, 1/3, 0) and
    R^2 mean(P f) = 3 (31/72 * 2/3 + 21/72 * 1/3) = 83/72. Without the third token (padding): 17/16."""
    m = MoHAttention(8, 4, causal=False, shared_heads=1, top_k=1)
    with torch.no_grad():
        m.wg.weight.copy_(torch.eye(3, 8))
    ln = math.log
    x = torch.tensor([[[ln(2), 0, 0], [0, ln(3), ln(2)], [ln(5), 0, ln(2)]]])
    x = torch.cat([x, torch.randn(1, 3, 5)], -1)
    m(x)
    assert m.aux_loss is not None and abs(m.aux_loss.item() - 83 / 72) < 1e-6
    m(x, key_padding_mask=torch.tensor([[True, True, False]]))
    assert abs(m.aux_loss.item() - 17 / 16) < 1e-6
    m.aux_loss.backward()
    assert m.wg.weight.grad is not None and m.wg.weight.grad.abs().sum() > 0  # it trains the router
    m.eval()(x)
    assert m.aux_loss is None
    q_norm = MoHAttention(16, 4, router="query_norm").train()
    q_norm(torch.randn(1, 5, 16))
    assert q_norm.aux_loss is None and not any("wg" in name for name, _ in q_norm.named_parameters())


@pytest.mark.parametrize("router", ["learned", "query_norm"])
@pytest.mark.parametrize("cross", [False, True])
def test_decode_equals_teacher_forcing(router, cross):
    m = _make(6, 2, 2, router, causal=True, cross=cross, kv=3).eval()
    x, ctx = torch.randn(2, 19, 24), torch.randn(2, 7, 24)
    with torch.no_grad():
        full = _run(m, x, ctx)
        cache, outs, i = m.new_cache(2), [], 0
        for c in (4, 1, 1, 6, 1, 2, 4):
            outs.append(m(x[:, i:i + c], context=ctx if cross and i == 0 else None, cache=cache))
            i += c
    assert_close(torch.cat(outs, 1), full)


@pytest.mark.parametrize("kw", CASES[:3], ids=IDS[:3])
def test_key_padding_mask(kw):
    m = _make(6, 2, 2, "learned", **kw).train()
    x, ctx = torch.randn(2, 12, 24), torch.randn(2, 9, 24)
    if kw.get("cross"):
        kpm = torch.ones(2, 9, dtype=torch.bool)
        kpm[1, 6:] = False
        out = m(x, context=ctx, key_padding_mask=kpm)
        assert_close(out[1], m(x[1:], context=ctx[1:, :6])[0])
        assert (out[1] - m(x[1:], context=ctx[1:])[0]).abs().max() > 1e-4
        return
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, 8:] = False  # right padding: the real rows are those of the unpadded sequence
    out = m(x, key_padding_mask=kpm)
    aux = m.aux_loss
    assert_close(out[1, :8], m(x[1:, :8])[0])
    assert_close(out[0], m(x[:1])[0])
    if not m.causal:  # the mask does something
        assert (m(x)[1, :8] - out[1, :8]).abs().max() > 1e-4
    m(torch.cat([x[0], x[1, :8]])[None])
    assert abs(aux.item() - m.aux_loss.item()) < 1e-5  # the aux loss leaves padded tokens out


def test_finite_compile_and_state_dict():
    x = torch.randn(2, 13, 32)
    m = _make(8, 2, 3, "learned", causal=True, kv=4)
    check_forward_backward_finite(m, x * 50)
    check_compile_matches_eager(_make(8, 2, 3, "learned", causal=False), x)
    check_state_dict_round_trip(lambda: MoHAttention(32, 8, router="learned", num_kv_heads=2), x)


def test_registry_entry_defaults_and_errors():
    entry = {e.name: e for e in nf.mechanisms()}["moh"]
    assert (entry.family, entry.dims, sorted(entry.patterns)) == ("routed", ("1d",), ["CC", "CS", "NC", "NS"])
    m = entry.make(64, 8)
    assert (m.shared_heads, m.top_k, m.router, m.causal) == (4, 2, "learned", True)  # LLaMA3: 50% + 25% of heads
    assert (MoHAttention(32, 2).shared_heads, MoHAttention(32, 2).top_k) == (1, 1)
    for kw, exc, match in [(dict(shared_heads=8), ValueError, r"shared_heads must be in \[0, 7\]"),
                           (dict(shared_heads=-1), ValueError, "shared_heads"),
                           (dict(shared_heads=6, top_k=3), ValueError, r"top_k must be in \[1, 2\]"),
                           (dict(top_k=0), ValueError, "top_k"), (dict(top_k=2.0), TypeError, "top_k"),
                           (dict(router="norm"), ValueError, "router must be one of"),
                           (dict(causal=1), TypeError, "causal"), (dict(num_kv_heads=3), ValueError, "num_kv_heads")]:
        with pytest.raises(exc, match=match):
            MoHAttention(64, 8, **kw)
    with pytest.raises(ValueError, match="dim"):
        MoHAttention(30, 8)
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 0, 64))
    with pytest.raises(ValueError, match="context is for cross-attention"):
        m(x, context=x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask is for whole sequences"):
        m(x, cache=m.new_cache(2), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="context must be"):
        MoHAttention(64, 8, cross=True)(x)
    with pytest.raises(ValueError, match="not causal"):
        MoHAttention(64, 8, causal=False).new_cache(2)
