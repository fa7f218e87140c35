"""Titans MAC (paper and lucidrains/titans-pytorch): the test-time memory update against autograd, its properties
(oracles), the whole layer against
an independent float64 reference, and decoding through TinyLM."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from module_checks import assert_close, check_against_reference, check_forward_backward_finite

from nearfar.layers.registry import mechanisms
from nearfar.layers.titans_mac import TitansCache, TitansMAC, memory_update
from nearfar.models.tiny_lm import TinyLM

# ---------------------------------------------------------------- independent float64 reference


def _mlp(weights, x, norm=True):
    """The memory: an MLP, then (``norm``) LayerNorm without gain plus the input."""
    h = x
    for i, w in enumerate(weights):
        h = torch.einsum("bhna,bhac->bhnc", h, w)
        if i < len(weights) - 1:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if not norm:
        return h
    centred = h - h.mean(-1, keepdim=True)
    return centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt() + x


def _rms(layer, x):
    return x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * layer.weight


def _autograd_update(weights, momentum, k, v, lr, mom, decay, chunk, norm=True, at=None):
    """One explicit gradient step per chunk on sum_t mean_dims (M(k_t) - v_t)^2, via torch.autograd; the gradient
    is taken at the running memory, or at ``at`` (a fixed memory) when given."""
    for c in range(k.shape[2] // chunk):
        kc, vc = k[:, :, c * chunk:(c + 1) * chunk], v[:, :, c * chunk:(c + 1) * chunk]
        # fresh aliases: the partial derivative w.r.t. the memory, not through k/v (which may depend on it)
        alias = [w.clone() for w in (weights if at is None else at)]
        loss = ((_mlp(alias, kc, norm) - vc) ** 2).mean(-1).sum()
        grads = torch.autograd.grad(loss, alias, create_graph=True)
        new_m, new_w = [], []
        for w, s, g in zip(weights, momentum, grads):
            s = mom[:, :, c, None, None] * s - lr[:, :, c, None, None] * g
            new_m.append(s)
            new_w.append((1 - decay[:, :, c, None, None]) * w + s)
        weights, momentum = new_w, new_m
    return weights, momentum




def reference_mac(m: TitansMAC, x: torch.Tensor) -> torch.Tensor:
    b, n, dim = x.shape
    hh, d, c, p = m.num_heads, m.head_dim, m.segment_len, m.num_persistent

    def heads(t):
        return t.reshape(b, -1, hh, d).transpose(1, 2)

    def lin(layer, t):
        return t @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    weights = [w.unsqueeze(0).repeat(b, 1, 1, 1) for w in m.memory]
    momentum = [torch.zeros_like(w) for w in weights]
    outs = []
    for s in range(0, n, c):
        seg = x[:, s:s + c]
        L = seg.shape[1]
        qm = heads(F.silu(lin(m.mem_q, _rms(m.retrieve_norm, seg) if m.memory_norm else seg)))
        qm = qm / qm.norm(dim=-1, keepdim=True)
        h = _mlp(weights, qm, m.memory_norm).transpose(1, 2).reshape(b, L, dim)
        persistent = x.new_zeros(0, dim) if m.persistent is None else m.persistent
        ctx = torch.cat([persistent.unsqueeze(0).expand(b, -1, -1), h, seg], 1)
        q, k, v = heads(lin(m.q_proj, seg)), heads(lin(m.k_proj, ctx)), heads(lin(m.v_proj, ctx))
        if m.rope is not None:
            pos = torch.arange(s, s + L)
            q = ref.rope(q, pos)
            k = torch.cat([k[:, :, :p], ref.rope(k[:, :, p:p + L], pos), ref.rope(k[:, :, p + L:], pos)], 2)
        allowed = torch.zeros(L, p + 2 * L, dtype=torch.bool)
        for i in range(L):
            allowed[i, :p] = True
            for j in range(i + 1):
                allowed[i, p + j] = allowed[i, p + L + j] = True
        y = ref.dense_reference(q, k, v, allowed, d ** -0.5).transpose(1, 2).reshape(b, L, dim)
        outs.append(y)
        if L == c:
            y = _rms(m.store_norm, y) if m.memory_norm else y
            kk = heads(F.silu(lin(m.mem_k, y)))
            kk = kk / kk.norm(dim=-1, keepdim=True)
            vv = heads(F.silu(lin(m.mem_v, y)))
            ch = m.chunk_size
            pooled = torch.stack([y[:, i:i + ch].mean(1) for i in range(0, c, ch)], 1)  # (B, chunks, dim)
            gates = [torch.sigmoid(lin(g, pooled)).transpose(1, 2) for g in (m.to_lr, m.to_momentum, m.to_decay)]
            at = [w.unsqueeze(0).expand(b, -1, -1, -1) for w in m.memory] if m.surprise_at == "init" else None
            weights, momentum = _autograd_update(weights, momentum, kk, vv, m.max_lr * gates[0], gates[1],
                                                 gates[2], ch, m.memory_norm, at)
    return lin(m.o_proj, torch.cat(outs, 1))


def _rand_state(b, h, sizes, dtype=torch.float64):
    ws = [torch.randn(b, h, a, c, dtype=dtype) / math.sqrt(a) for a, c in zip(sizes[:-1], sizes[1:])]
    return ws, [torch.randn_like(w) * 0.1 for w in ws]


# ---------------------------------------------------------------- memory update


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("sizes,chunk", [([4, 8, 4], 2), ([4, 4], 1), ([4, 6, 5, 4], 3)])
def test_memory_update_equals_autograd_steps(sizes, chunk, norm, fixed):
    torch.manual_seed(0)
    b, h, n = 2, 3, 6
    ws, ms = _rand_state(b, h, sizes)
    ws = [w.requires_grad_() for w in ws]
    # the fixed memory as the layer passes it: one per head, shared by the batch
    at = [(w[:1] * 0.7).detach().requires_grad_() for w in ws] if fixed else None
    k, v = torch.randn(b, h, n, sizes[0], dtype=torch.float64), torch.randn(b, h, n, sizes[-1], dtype=torch.float64)
    gates = [torch.rand(b, h, n // chunk, dtype=torch.float64) for _ in range(3)]
    got_w, got_m = memory_update(ws, ms, k, v, *gates, chunk, norm, at)
    exp_w, exp_m = _autograd_update(ws, ms, k, v, *gates, chunk, norm, at and [w.expand(b, -1, -1, -1) for w in at])
    for a, e in zip(got_w + got_m, exp_w + exp_m):
        assert_close(a, e, 1e-12, "memory")
    # the hand-written gradient is differentiable for the outer loop, like autograd's double backward
    for wrt in [ws[0]] + (at or []):
        g1 = torch.autograd.grad(sum(w.sum() for w in got_w), wrt, retain_graph=True)[0]
        g2 = torch.autograd.grad(sum(w.sum() for w in exp_w), wrt, retain_graph=True)[0]
        assert_close(g1, g2, 1e-10, "outer grad")


def test_fixed_surprise_memory_differs_from_running_one():
    torch.manual_seed(8)
    ws, ms = _rand_state(1, 2, [4, 8, 4])
    k, v = torch.randn(1, 2, 6, 4, dtype=torch.float64), torch.randn(1, 2, 6, 4, dtype=torch.float64)
    gates = [torch.rand(1, 2, 3, dtype=torch.float64) for _ in range(3)]
    running, _ = memory_update(ws, ms, k, v, *gates, 2)
    fixed, _ = memory_update(ws, ms, k, v, *gates, 2, surprise_weights=ws)
    first, _ = memory_update(ws, ms, k[:, :, :2], v[:, :, :2], *(g[..., :1] for g in gates), 2, surprise_weights=ws)
    assert not torch.allclose(running[0], fixed[0])  # later chunks see different memories
    assert_close(first[0], memory_update(ws, ms, k[:, :, :2], v[:, :, :2], *(g[..., :1] for g in gates), 2)[0][0],
                 1e-12)  # the first chunk's memory is the same either way


def test_linear_memory_is_delta_rule():
    torch.manual_seed(1)
    b, h, d, n, theta = 1, 2, 5, 4, 0.3
    w0 = torch.randn(b, h, d, d, dtype=torch.float64)
    k, v = torch.randn(b, h, n, d, dtype=torch.float64), torch.randn(b, h, n, d, dtype=torch.float64)
    zero = torch.zeros(b, h, n, dtype=torch.float64)
    (got,), _ = memory_update([w0], [torch.zeros_like(w0)], k, v, zero + theta, zero, zero, 1, norm_residual=False)
    w = w0.clone()
    for t in range(n):
        kt, vt = k[:, :, t], v[:, :, t]  # row-vector convention: M(k) = k W
        err = vt - torch.einsum("bhi,bhij->bhj", kt, w)
        w = w + (2 * theta / d) * torch.einsum("bhi,bhj->bhij", kt, err)
    assert_close(got, w, 1e-12, "delta rule")


def test_no_update_memory_is_fixed_and_full_decay_wipes_it():
    torch.manual_seed(2)
    ws, ms = _rand_state(2, 2, [4, 8, 4])
    k, v = torch.randn(2, 2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
    zero = torch.zeros(2, 2, 3, dtype=torch.float64)
    fixed, _ = memory_update(ws, ms, k, v, zero, zero, zero, 2)  # theta = eta = alpha = 0
    for a, e in zip(fixed, ws):
        assert torch.equal(a, e)
    wiped, _ = memory_update(ws, ms, k, v, zero, zero, zero + 1, 2)  # alpha = 1, no new surprise
    assert all(not w.any() for w in wiped)


# ---------------------------------------------------------------- the MAC layer


@pytest.mark.parametrize("kw,n", [(dict(segment_len=4, chunk_size=2), 11), (dict(segment_len=3, num_persistent=0,
                                                                                  memory_depth=1), 7),
                                  (dict(segment_len=5, rope=False, memory_depth=3), 10),
                                  (dict(segment_len=4, memory_norm=False), 9),
                                  (dict(segment_len=4, chunk_size=2, surprise_at="chunk"), 11),
                                  (dict(segment_len=3, surprise_at="chunk", memory_norm=False), 10)])
def test_module_matches_reference(kw, n):
    torch.manual_seed(3)
    m = TitansMAC(16, 2, max_lr=0.5, **kw)
    check_against_reference(m, torch.randn(2, n, 16), reference_mac)


def test_reference_can_fail():
    torch.manual_seed(3)
    m = TitansMAC(16, 2, segment_len=4).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    out = m(x)
    with torch.no_grad():
        m.to_lr.bias += 3.0  # a larger learning rate changes the second and third segments only
    exp = reference_mac(m, x)
    assert torch.allclose(out[:, :4], exp[:, :4]) and not torch.allclose(out[:, 4:], exp[:, 4:])


def _freeze_memory(m: TitansMAC) -> TitansMAC:
    with torch.no_grad():
        m.to_decay.weight.zero_()
        m.to_decay.bias.fill_(-1e4)  # alpha = 0 exactly
    return m


def test_fixed_memory_makes_segments_independent():
    torch.manual_seed(4)
    m = _freeze_memory(TitansMAC(16, 2, segment_len=4, max_lr=0.0, rope=False)).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out = m(x)
    for s in range(0, 12, 4):
        assert_close(out[:, s:s + 4], m(x[:, s:s + 4]), 1e-12)
    m2 = TitansMAC(16, 2, segment_len=4, max_lr=0.5, rope=False).double()
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m2(x)[:, 4:8], out[:, 4:8])  # with updates, the memory carries the past


def test_zero_memory_is_segment_local_attention_plus_null_keys():
    torch.manual_seed(5)
    m = TitansMAC(16, 2, segment_len=4, num_persistent=0, max_lr=0.0, rope=False, memory_norm=False).double()
    with torch.no_grad():
        for w in m.memory:
            w.zero_()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    q = (x @ m.q_proj.weight.T).reshape(1, 10, 2, 8).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).reshape(1, 10, 2, 8).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).reshape(1, 10, 2, 8).transpose(1, 2)
    y = torch.zeros(1, 2, 10, 8, dtype=torch.float64)
    for i in range(10):
        js = range(4 * (i // 4), i + 1)
        e = torch.stack([torch.exp((q[:, :, i] * k[:, :, j]).sum(-1) / math.sqrt(8)) for j in js], -1)
        num = sum(e[..., t, None] * v[:, :, j] for t, j in enumerate(js))
        y[:, :, i] = num / (e.sum(-1) + len(js))[..., None]  # each zero retrieved token: score 0, value 0
    expected = y.transpose(1, 2).reshape(1, 10, 16) @ m.o_proj.weight.T
    assert_close(m(x), expected, 1e-12)


def _lm(surprise_at="init"):
    torch.manual_seed(6)
    return TinyLM(50, dim=16, depth=2, num_heads=2, mechanism="titans_mac", segment_len=4, chunk_size=2,
                  max_lr=0.5, surprise_at=surprise_at).double().eval()


@pytest.mark.parametrize("surprise_at", ["init", "chunk"])
@pytest.mark.parametrize("step,prefill", [(1, 0), (3, 0), (3, 6), (2, 5)])
def test_decode_matches_teacher_forcing_through_tinylm(step, prefill, surprise_at):
    lm = _lm(surprise_at)
    tokens = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        full = lm(tokens)
        caches = lm.new_caches(2)
        parts = [lm(tokens[:, :prefill], caches)] if prefill else []
        parts += [lm(tokens[:, i:i + step], caches) for i in range(prefill, 15, step)]
    assert_close(torch.cat(parts, 1), full, 1e-10, "decode")
    assert all(isinstance(c, TitansCache) and c.length == 15 for c in caches)


def test_generate_runs():
    out = _lm().generate(torch.randint(0, 50, (1, 3)), 6)
    assert out.shape == (1, 9)


def test_state_size_independent_of_length():
    m = TitansMAC(16, 2, segment_len=4).eval()
    sizes = []
    for n in (3, 13, 41):
        cache = m.new_cache(1)
        with torch.no_grad():
            for _ in range(n):
                m(torch.randn(1, 1, 16), cache)
        assert cache.nbytes() <= sum(2 * w.nbytes for w in m.memory) + 3 * 16 * 4
        sizes.append(tuple(tuple(w.shape) for w in cache.weights + cache.momentum))
    assert sizes[0] == sizes[1] == sizes[2] == ((1, 2, 8, 16), (1, 2, 16, 8)) * 2


def test_no_nan_and_gradients_reach_every_parameter():
    torch.manual_seed(7)
    m = mechanisms_by_name()["titans_mac"].make(32, 4, segment_len=8)
    x = torch.randn(2, 20, 32) * 5
    check_forward_backward_finite(m, x)
    m.zero_grad()
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_make_runs_long_sequence_finite():
    m = mechanisms_by_name()["titans_mac"].make(32, 4)
    with torch.no_grad():
        out = m(torch.randn(1, 300, 32))
    assert out.shape == (1, 300, 32) and torch.isfinite(out).all()


def mechanisms_by_name():
    return {e.name: e for e in mechanisms()}


def test_registry_entry():
    e = mechanisms_by_name()["titans_mac"]
    assert (e.family, e.dims, e.causal, e.cross, e.cls) == ("local+global", ("1d",), True, False, TitansMAC)
    assert TitansMAC.causal


def test_errors():
    with pytest.raises(ValueError, match="num_heads|dim"):
        TitansMAC(10, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        TitansMAC(16, 2, segment_len=6, chunk_size=4)
    with pytest.raises(ValueError, match="segment_len"):
        TitansMAC(16, 2, segment_len=0)
    with pytest.raises(ValueError, match="max_lr"):
        TitansMAC(16, 2, max_lr=-1.0)
    with pytest.raises(TypeError, match="memory_norm"):  # a wrong type is a TypeError (nearfar.checks)
        TitansMAC(16, 2, memory_norm=1)
    with pytest.raises(ValueError, match="surprise_at"):
        TitansMAC(16, 2, surprise_at="token")
    with pytest.raises(ValueError, match="num_persistent"):
        TitansMAC(16, 2, num_persistent=-1)
    m = TitansMAC(16, 2, segment_len=4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="cache"):
        m(torch.randn(2, 5, 16), cache=object())
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(2, 1, 16), cache=m.new_cache(3))
