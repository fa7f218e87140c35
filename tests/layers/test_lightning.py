"""Lightning Attention / TNL layer: float64 references written from the paper and the official code
(OpenNLPLab/lightning-attention ``linear_attention.py``, ``examples/module/tnl_attn.py``), its properties (oracles),
decoding, module hygiene."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    Split,
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)

from nearfar.layers.lightning import LightningAttention, LinearAttentionState
from nearfar.layers.linear_attention import LinearAttention
from nearfar.layers.registry import mechanisms
from nearfar.ops.lightning import (
    alibi_slopes,
    lightning_attention,
    lightning_decode_step,
    linear_attention_reference,
    tnl_slopes,
)


def decay_mask(n: int, s: torch.Tensor) -> torch.Tensor:
    """[H, n, n] float64 with lambda^(i-j) for j <= i, built entry by entry."""
    lam = torch.exp(-s.double().flatten()).tolist()
    m = torch.zeros(len(lam), n, n, dtype=torch.float64)
    for h, lh in enumerate(lam):
        for i in range(n):
            for j in range(i + 1):
                m[h, i, j] = lh ** (i - j)
    return m


def dense_ref(q, k, v, s, keep=None):
    """((Q K^T) * M) V in float64 (keys with keep False removed)."""
    q, k, v = q.double(), k.double(), v.double()
    m = decay_mask(q.shape[2], s)
    if keep is not None:
        m = m * keep.double()[:, None, None, :]
    return ((q @ k.transpose(-1, -2)) * m) @ v


def qkv(b=2, h=3, n=20, d=8, e=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, x, generator=g, dtype=dtype) for x in (d, d, e or d))


S3 = torch.tensor([0.5, 0.05, 0.0])  # a strong, a weak and no decay


# --- slopes --------------------------------------------------------------------------------------------------------

def test_alibi_slopes_powers_of_two_and_interleave():
    for h in (1, 2, 4, 8, 16):
        expected = torch.tensor([2.0 ** (-8 * i / h) for i in range(1, h + 1)])
        assert_close(alibi_slopes(h), expected, 1e-7, f"slopes H={h}")
    # H=6: the 4 slopes of H=4, then every other slope of H=8 (2^-1, 2^-3)
    assert_close(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]), 1e-7)
    assert_close(alibi_slopes(3), torch.tensor([2.0**-4, 2.0**-8, 2.0**-2]), 1e-7)


def test_tnl_slopes_layer_scaling():
    base = alibi_slopes(4)
    assert tnl_slopes(4, 0, 12).shape == (4, 1, 1)
    assert_close(tnl_slopes(4, 0, 12).flatten(), base * (1 + 1e-5), 1e-7)
    assert_close(tnl_slopes(4, 11, 12).flatten(), base * 1e-5, 1e-7)
    assert_close(tnl_slopes(4, 3, 7).flatten(), base * (1 - 0.5 + 1e-5), 1e-7)
    assert_close(tnl_slopes(4, 0, 1).flatten(), base * (1 + 1e-5), 1e-7)


# --- functional oracles --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [None, 0.0, torch.zeros(3)])
def test_no_decay_is_cumulative_sum_linear_attention(s):
    q, k, v = qkv(n=37, e=5)
    kv = torch.cumsum(k.double()[..., :, None] * v.double()[..., None, :], dim=2)  # sum_{j<=i} k_j^T v_j
    expected = (q.double()[..., None, :] @ kv).squeeze(-2)
    assert_close(lightning_attention(q, k, v, s, block_size=16), expected)


def test_reference_matches_entrywise_mask():
    q, k, v = qkv(n=11, dtype=torch.float64)
    assert_close(linear_attention_reference(q, k, v, S3), dense_ref(q, k, v, S3), 1e-12)


@pytest.mark.parametrize("n", [1, 7, 65, 130])
def test_blocked_independent_of_block_size_and_equals_reference(n):
    q, k, v = qkv(n=n, e=6)
    s = S3.reshape(3, 1, 1)
    expected = dense_ref(q, k, v, s)
    outs = [lightning_attention(q, k, v, s, block_size=b) for b in (16, 32, 64, 128)]
    for b, o in zip((16, 32, 64, 128), outs):
        assert o.shape == (2, 3, n, 6) and o.dtype == torch.float32
        assert_close(o, expected, 1e-5, f"block_size={b}")
        assert_close(o, outs[0], 1e-5, f"block_size={b} vs 16")


@pytest.mark.parametrize("n", [1, 7, 65])
def test_blocked_equals_token_by_token_recurrence(n):
    q, k, v = qkv(n=n)
    state, rows = None, []
    for i in range(n):
        o, state = lightning_decode_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], S3, state)
        rows.append(o)
    out, final = lightning_attention(q, k, v, S3, block_size=16, return_state=True)
    assert_close(torch.cat(rows, 2), out)
    assert_close(final, state)
    assert state.dtype == torch.float32 and state.shape == (2, 3, 8, 8)


def test_blocked_resumes_from_initial_state():
    q, k, v = qkv(n=50)
    full = lightning_attention(q, k, v, S3, block_size=16)
    a, st_a = lightning_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], S3, 16, return_state=True)
    b = lightning_attention(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], S3, 16, initial_state=st_a)
    assert_close(torch.cat([a, b], 2), full)


@settings(max_examples=12)
@given(n=st.integers(1, 70), b=st.sampled_from([1, 3, 16, 64]), d=st.integers(1, 9), e=st.integers(1, 9),
       heads=st.integers(1, 3))
def test_blocked_matches_reference_hypothesis(n, b, d, e, heads):
    q, k, v = qkv(b=1, h=heads, n=n, d=d, e=e, seed=n)
    s = alibi_slopes(heads)
    assert_close(lightning_attention(q, k, v, s, block_size=b), dense_ref(q, k, v, s))


def test_gradients_match_float64_reference():
    q, k, v = (t.requires_grad_() for t in qkv(n=45, e=6))
    s = S3.reshape(3, 1, 1)
    out = lightning_attention(q, k, v, s, block_size=16)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    (dense_ref(q64, k64, v64, s) * g.double()).sum().backward()
    for name, a, b in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert_close(a.grad, b.grad, 3e-5, f"{name}.grad")


def test_half_precision_and_large_decay_finite():
    q, k, v = qkv(n=40, dtype=torch.bfloat16)
    s = torch.tensor([60.0, 1.0, 0.0])  # lambda^b underflows: no inf * 0
    out = lightning_attention(q, k, v, s, block_size=16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out, dense_ref(q, k, v, s), 2e-2)


# --- the TNL layer -------------------------------------------------------------------------------------------------

def tnl_reference(m: LightningAttention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """The TNL layer in float64: SiLU projections, dense decayed left product (non-causal or cross: every key, no
    decay), norm, low-rank gate, o_proj."""
    b, n, c = x.shape
    h = m.num_heads

    def heads(t, p):
        t = torch.nn.functional.silu(t @ p.weight.t() + (0 if p.bias is None else p.bias))
        return t.reshape(b, t.shape[1], h, c // h).transpose(1, 2)

    src = x if context is None else context
    q, k, v = heads(x, m.q_proj), heads(src, m.k_proj), heads(src, m.v_proj)
    if m.cross or not m.causal:
        o = (q @ k.transpose(-1, -2) @ v).transpose(1, 2).reshape(b, n, c)
        return _norm_gate_out(m, x, o)
    if m.decay:
        slopes = torch.tensor([2.0 ** (-8 * i / h) for i in range(1, h + 1)], dtype=torch.float64)  # H power of 2
        depth = m.layer_idx / (m.num_layers - 1) if m.num_layers > 1 else 0.0
        s = slopes * (1 - depth + 1e-5)
    else:
        s = torch.zeros(h, dtype=torch.float64)
    return _norm_gate_out(m, x, dense_ref(q, k, v, s).transpose(1, 2).reshape(b, n, c))


def _norm_gate_out(m: LightningAttention, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    c = x.shape[-1]
    if m.norm_type == "srmsnorm":
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    else:
        o = torch.nn.functional.layer_norm(o, (c,), m.norm.weight, m.norm.bias, m.norm.eps)
    gate = torch.sigmoid(x @ m.output_gate[0].weight.t() @ m.output_gate[1].weight.t())
    return (o * gate) @ m.o_proj.weight.t()


@pytest.mark.parametrize("kw,n", [({}, 37), ({"norm_type": "layernorm", "layer_idx": 2, "num_layers": 4}, 1),
                                  ({"decay": False}, 21), ({"gate_rank": 3, "layer_idx": 3, "num_layers": 4}, 64)])
def test_module_matches_reference(kw, n):
    torch.manual_seed(0)
    m = LightningAttention(32, 4, block_size=16, **kw)
    check_against_reference(m, torch.randn(2, n, 32), tnl_reference)


@pytest.mark.parametrize("causal,cross", [(False, False), (False, True), (True, True)])
def test_noncausal_and_cross_forms_match_reference(causal, cross):
    torch.manual_seed(0)
    m = LinearAttention(32, 4, causal=causal, cross=cross)
    if cross:
        check_against_reference(Split(m, 13), torch.randn(2, 13 + 9, 32),
                                lambda w, xc: tnl_reference(w.layer, xc[:, :13], xc[:, 13:]))
    else:
        check_against_reference(m, torch.randn(2, 21, 32), tnl_reference)


def test_cross_padding_and_decoding_from_the_source_state():
    torch.manual_seed(0)
    m = LinearAttention(16, 2, causal=True, cross=True).double()
    x, c = torch.randn(1, 7, 16, dtype=torch.float64), torch.randn(1, 6, 16, dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False, True]])
    full = m(x, context=c, key_padding_mask=keep)
    torch.testing.assert_close(full, m(x, context=c[:, keep[0]]), rtol=1e-12, atol=1e-12)
    cache = m.new_cache(1)
    with torch.no_grad():
        outs = [m(x[:, :2], context=c, cache=cache, key_padding_mask=keep)]
        outs += [m(x[:, i:i + 1], cache=cache) for i in range(2, 7)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    assert cache.length == 7 and cache.S.shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="needs context"):
        m(x)
    with pytest.raises(ValueError, match="cross=True"):
        LinearAttention(16, 2)(x, context=c)
    with pytest.raises(ValueError, match="decay=False"):
        LightningAttention(16, 2, causal=False)
    with pytest.raises(ValueError, match="no decoding cache"):
        LinearAttention(16, 2, causal=False).new_cache(1)


def _decode_check(m, x, prefill, step):
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(x.shape[0])
        rows = [m(x[:, :prefill], cache=cache)] if prefill else []
        for i in range(prefill, x.shape[1], step):
            rows.append(m(x[:, i:i + step], cache=cache))
    assert cache.length == x.shape[1]
    assert_close(torch.cat(rows, 1), full, 1e-5, f"decode prefill={prefill} step={step}")
    return cache


@pytest.mark.parametrize("cls", [LightningAttention, LinearAttention])
@pytest.mark.parametrize("prefill,step", [(0, 1), (19, 1), (5, 3), (33, 3)])
def test_decode_matches_teacher_forcing(cls, prefill, step):
    torch.manual_seed(1)
    m = cls(32, 4, block_size=16).eval()
    _decode_check(m, torch.randn(2, 50, 32), prefill, step)


def test_state_size_independent_of_length():
    m = LightningAttention(32, 4, block_size=16).eval()
    sizes = []
    for n in (3, 40, 200):
        cache = _decode_check(m, torch.randn(1, n, 32), n // 2, 7)
        assert isinstance(cache, LinearAttentionState) and cache.S.dtype == torch.float32
        assert torch.isfinite(cache.S).all()
        sizes.append(tuple(cache.S.shape))
    assert sizes == [(1, 4, 8, 8)] * 3


def test_left_padding_is_exact():
    torch.manual_seed(2)
    m = LightningAttention(32, 4, block_size=8).eval()
    x = torch.randn(1, 13, 32)
    padded = torch.cat([torch.randn(1, 5, 32) * 10, x], 1)
    keep = torch.arange(18)[None] >= 5
    with torch.no_grad():
        c_plain, c_pad = m.new_cache(1), m.new_cache(1)
        plain = m(x, cache=c_plain)
        out = m(padded, cache=c_pad, key_padding_mask=keep)
    assert_close(out[:, 5:], plain)
    assert_close(c_pad.S, c_plain.S)


def test_key_padding_mask_removes_keys():
    torch.manual_seed(3)
    m = LightningAttention(32, 4).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    keep = torch.rand(2, 9) > 0.4
    with torch.no_grad():
        out = m(x, key_padding_mask=keep)
        h = m.num_heads
        q, k, v = ((torch.nn.functional.silu(p(x))).reshape(2, 9, h, 8).transpose(1, 2)
                   for p in (m.q_proj, m.k_proj, m.v_proj))
        o = dense_ref(q, k, v, m.slope_rate, keep).transpose(1, 2).reshape(2, 9, 32)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
        expected = m.o_proj(o * torch.sigmoid(m.output_gate(x)))
    assert_close(out, expected, 1e-10)


def test_no_nan_forward_backward():
    m = LightningAttention(32, 4, block_size=16)
    check_forward_backward_finite(m, torch.randn(2, 45, 32) * 3)
    check_forward_backward_finite(LinearAttention(32, 4), torch.randn(1, 70, 32))


def test_compile_matches_eager():
    torch.manual_seed(4)
    check_compile_matches_eager(LightningAttention(32, 4, block_size=16), torch.randn(2, 40, 32))


def test_state_dict_round_trip_and_official_names():
    check_state_dict_round_trip(lambda: LightningAttention(32, 4, norm_type="layernorm"), torch.randn(2, 10, 32))
    m = LightningAttention(32, 4, norm_type="layernorm")
    expected = {"q_proj.weight": (32, 32), "k_proj.weight": (32, 32), "v_proj.weight": (32, 32),
                "o_proj.weight": (32, 32), "norm.weight": (32,), "norm.bias": (32,),
                "output_gate.0.weight": (8, 32), "output_gate.1.weight": (32, 8)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    srms = LightningAttention(32, 4)
    assert set(srms.state_dict()) == set(expected) - {"norm.weight", "norm.bias"}


def test_registry_entries():
    by_name = {m.name: m for m in mechanisms()}
    for name, cls in (("lightning", LightningAttention), ("linear_attention", LinearAttention)):
        mech = by_name[name]
        assert (mech.family, mech.dims, mech.cls) == ("dense", ("1d",), cls)
        assert set(mech.patterns) == ({"CS"} if name == "lightning" else {"NS", "CS", "NC", "CC"})
        mod = mech.make(64, 4)
        assert mod.causal and mod(torch.randn(2, 10, 64)).shape == (2, 10, 64)
    assert by_name["linear_attention"].make(64, 4).slope_rate is None
    assert math.isclose(by_name["lightning"].make(64, 4).slope_rate[0].item(), 2.0**-2 * (1 + 1e-5), rel_tol=1e-6)


def test_errors():
    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match="s must"):
        lightning_attention(q, k, v, torch.tensor([0.1, -0.1, 0.0]))
    with pytest.raises(ValueError, match="s must"):
        lightning_attention(q, k, v, torch.zeros(4))
    with pytest.raises(ValueError, match="q and k"):
        lightning_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must"):
        lightning_attention(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="q must"):
        lightning_attention(q[0], k, v)
    with pytest.raises(ValueError, match="block_size"):
        lightning_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, initial_state=torch.zeros(2, 3, 8, 7))
    with pytest.raises(ValueError, match="one token"):
        lightning_decode_step(q, k, v, None, None)
    with pytest.raises(ValueError, match="dim"):
        LightningAttention(30, 4)
    with pytest.raises(ValueError, match="norm_type"):
        LightningAttention(32, 4, norm_type="rmsnorm")
    with pytest.raises(ValueError, match="layer_idx"):
        LightningAttention(32, 4, layer_idx=12, num_layers=12)
    with pytest.raises(ValueError, match="gate_rank"):
        LightningAttention(32, 4, gate_rank=0)
    with pytest.raises(TypeError, match="decay"):
        LinearAttention(32, 4, decay=True)
    m = LightningAttention(32, 4)
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        m(torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(2, 5, 32), cache=m.new_cache(3))
    with pytest.raises(TypeError, match="cache"):
        m(torch.randn(2, 5, 32), cache={})
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(torch.randn(2, 5, 32), key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 5, 32), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
