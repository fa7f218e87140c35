"""Core Context Aware attention: float64 reference written from the paper's equations and the official code
(chenyaofo/CCA-Attention ``codebase/core/cca_attn.py``, ``cca_pooling.py``), oracles, decoding, padding."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_state_dict_round_trip,
)

import nearfar as nf
from nearfar.layers.cca import CCAAttention, _CoreAndRaw, pool_groups
from nearfar.models.tiny_lm import TinyLM
from nearfar.patterns.core_and_window import cca_allowed


def _reference_mask(n, s, g, num_core):
    """The fused mask (official ``generate_mask``) with 1-based rows r:
    core c allowed iff r > s and floor((r-s)/g) >= c; raw j iff r-w_r < j <= r."""
    mask = torch.zeros(n, num_core + n, dtype=torch.bool)
    for r in range(1, n + 1):
        for c in range(1, num_core + 1):
            mask[r - 1, c - 1] = r > s and (r - s) // g >= c
        w = s + max(0, r - s - ((r - s) // g) * g)
        for j in range(1, n + 1):
            mask[r - 1, num_core + j - 1] = r - w < j <= r
    return mask


def cca_reference(m, x):
    """The layer in float64, from the paper and the official code: explicit per-group pooling loops, the reference
    mask, one dense softmax."""
    q, k, v = ref.rotary_qkv(m, x, repeat=True)
    n, s, g, d = x.shape[1], m.window_size, m.group_size, m.head_dim
    num_core = (n - s) // g if n - s >= g else 0
    ck, cv = [], []
    for c in range(num_core):
        kk, vv = k[:, :, c * g:(c + 1) * g], v[:, :, c * g:(c + 1) * g]
        if m.pooling == "cca":
            w = torch.softmax((kk * q[:, :, (c + 1) * g - 1:(c + 1) * g]).sum(-1) / math.sqrt(d), -1)[..., None]
            ck.append((w * kk).sum(2)), cv.append((w * vv).sum(2))
        elif m.pooling == "mean":
            ck.append(kk.mean(2)), cv.append(vv.mean(2))
        else:
            ck.append(kk.max(2).values), cv.append(vv.max(2).values)
    kall = torch.cat([torch.stack(ck, 2), k], 2) if ck else k
    vall = torch.cat([torch.stack(cv, 2), v], 2) if cv else v
    o = ref.dense_reference(q, kall, vall, _reference_mask(n, s, g, num_core), d ** -0.5)
    return o.transpose(1, 2).reshape(x.shape[0], n, -1) @ m.o_proj.weight.double().T


@pytest.mark.parametrize("n,s,g,heads,kv,pooling", [
    (23, 5, 3, 4, 4, "cca"), (29, 4, 4, 4, 2, "cca"), (17, 1, 1, 2, 1, "cca"), (7, 5, 3, 2, 2, "cca"),
    (21, 6, 2, 2, 2, "mean"), (19, 3, 5, 2, 2, "max")],
    ids=["odd", "gqa", "g1-s1", "no-core", "mean", "max"])
def test_matches_float64_reference(n, s, g, heads, kv, pooling):
    torch.manual_seed(0)
    m = CCAAttention(16, heads, group_size=g, window_size=s, pooling=pooling, num_kv_heads=kv)
    check_against_reference(m, torch.randn(2, n, 16), cca_reference)


@given(n=st.integers(1, 40), s=st.integers(1, 12), g=st.integers(1, 6))
def test_mask_is_the_reference_mask_and_tiles_the_causal_context(n, s, g):
    num_core = max(0, (n - s) // g)
    pos = torch.arange(n)
    mask = cca_allowed(pos, num_core, pos, s, g)
    assert torch.equal(mask, _reference_mask(n, s, g, num_core))
    # oracle: every past position is covered exactly once, through its core token or as a raw key
    cover = mask[:, num_core:].long()
    for c in range(num_core):
        cover[:, c * g:(c + 1) * g] += mask[:, c:c + 1].long()
    assert torch.equal(cover, torch.tril(torch.ones(n, n, dtype=torch.long)))
    window = mask[:, num_core:].sum(-1)
    assert bool(((window >= torch.clamp(pos + 1, max=s)) & (window <= s + g - 1)).all())


def _dense_causal(m, x):
    q, k, v = ref.rotary_qkv(m, x, repeat=True)
    n = x.shape[1]
    o = ref.dense_reference(q, k, v, torch.tril(torch.ones(n, n, dtype=torch.bool)), m.head_dim ** -0.5)
    return o.transpose(1, 2).reshape(x.shape[0], n, -1) @ m.o_proj.weight.double().T


@pytest.mark.parametrize("s", [1, 3])
def test_group_size_one_is_dense_causal(s):
    torch.manual_seed(1)
    m = CCAAttention(16, 2, group_size=1, window_size=s)
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        assert_close(m(x), _dense_causal(m, x.double()))


def test_window_covering_the_sequence_is_dense_causal():
    torch.manual_seed(2)
    m = CCAAttention(16, 2, group_size=4, window_size=30)
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        assert_close(m(x), _dense_causal(m, x.double()))
    # and the module is not dense causal once groups are pooled (the oracle above can fail)
    m.window_size = 5
    with torch.no_grad():
        assert (m(x).double() - _dense_causal(m, x.double())).abs().max() > 1e-4


def test_probabilities_sum_to_one():
    """v = 1 everywhere (so core values = 1 too) and o_proj = I: every output is the row's probability mass."""
    torch.manual_seed(3)
    m = CCAAttention(8, 2, group_size=3, window_size=4, qkv_bias=True)
    with torch.no_grad():
        m.v_proj.weight.zero_(), m.v_proj.bias.fill_(1.0), m.o_proj.weight.copy_(torch.eye(8))
        out = m(torch.randn(2, 25, 8) * 3)
    assert_close(out, torch.ones_like(out))


def _lm_decode(lm, tokens, prefill, chunk, s, g):
    caches = lm.new_caches(tokens.shape[0])
    steps = [lm(tokens[:, :prefill], caches)]
    for i in range(prefill, tokens.shape[1], chunk):
        steps.append(lm(tokens[:, i:i + chunk], caches))
        for c in caches:  # bounded: m(next) core tokens and at most s + g - 2 raw tokens
            m = max(0, (c.length + 1 - s) // g)
            assert c.num_core == m and c.raw_start == m * g and c.num_raw <= s + g - 2
    return torch.cat(steps, 1)


@pytest.mark.parametrize("kw", [dict(pooling="cca"), dict(pooling="cca", num_kv_heads=2), dict(pooling="max")],
                         ids=["cca", "cca-gqa", "max"])
@pytest.mark.parametrize("prefill,chunk", [(4, 1), (11, 3)])
def test_decode_equals_teacher_forcing_with_a_bounded_cache(kw, prefill, chunk):
    torch.manual_seed(4)
    s, g = 5, 3
    lm = TinyLM(40, dim=32, depth=2, num_heads=4, mechanism="cca", window_size=s, group_size=g, **kw).eval()
    tokens = torch.randint(0, 40, (2, 31))
    with torch.no_grad():
        full = lm(tokens)
        assert (_lm_decode(lm, tokens, prefill, chunk, s, g) - full).abs().max() < 1e-5


def test_key_padding_mask():
    torch.manual_seed(5)
    m = CCAAttention(16, 2, group_size=3, window_size=4)
    x = torch.randn(2, 20, 16)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1, 13:] = False  # right padding: causal, so the real rows are those of the unpadded sequence
    out = m(x, key_padding_mask=kpm)
    assert_close(out[1, :13], m(x[1:, :13])[0])
    assert_close(out[0], m(x[:1])[0])
    left = torch.ones(2, 20, dtype=torch.bool)
    left[0, :7] = False  # left padding: whole and partial groups of padding; the pad tokens' values do not matter
    y = x.clone()
    y[0, :7] = torch.randn(7, 16) * 10
    a, b = m(x, key_padding_mask=left), m(y, key_padding_mask=left)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert_close(a[0, 7:], b[0, 7:])
    assert (m(x)[0, 7:] - a[0, 7:]).abs().max() > 1e-4  # the mask does something
    with pytest.raises(NotImplementedError, match="pooling"):
        CCAAttention(16, 2, group_size=3, window_size=4, pooling="mean")(x, key_padding_mask=kpm)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, key_padding_mask=kpm[:, :5])
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, cache=m.new_cache(2), key_padding_mask=kpm)


def test_finite_compile_and_state_dict():
    torch.manual_seed(6)
    x = torch.randn(2, 17, 16)
    m = CCAAttention(16, 4, group_size=2, window_size=3, num_kv_heads=2)
    check_forward_backward_finite(m, x * 50)
    check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: CCAAttention(16, 4, group_size=2, window_size=3), x)


def test_registry_entry_and_errors():
    entry = {e.name: e for e in nf.mechanisms()}["cca"]
    assert (entry.family, entry.dims, entry.causal, entry.cross) == ("local+global", ("1d",), True, False)
    m = entry.make(32, 4)
    assert (m.group_size, m.window_size, m.pooling) == (16, 1024, "cca")
    assert m(torch.randn(1, 9, 32)).shape == (1, 9, 32)
    for kw, match in [(dict(group_size=0), "group_size"), (dict(window_size=0), "window_size"),
                      (dict(pooling="sum"), "pooling"), (dict(causal=False), "causal"),
                      (dict(num_kv_heads=3), "num_kv_heads")]:
        with pytest.raises(ValueError, match=match):
            CCAAttention(16, 4, **kw)
    with pytest.raises(ValueError, match="dim"):
        CCAAttention(10, 4)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 9, 16))


@pytest.mark.parametrize("pooling,kv,pad,ties", [("cca", 4, False, False), ("cca", 2, True, False),
                                                 ("mean", 2, False, False), ("max", 4, False, True)],
                         ids=["cca", "cca-gqa-padding", "mean-gqa", "max-ties"])
def test_core_and_raw_buffers_match_autograd_through_pooling_and_cat(pooling, kv, pad, ties):
    """The layer builds ``[core; raw]`` keys/values in one buffer each with a hand-written backward (for memory):
    its outputs and gradients equal autograd through ``pool_groups``, the GQA repeat and ``torch.cat``."""
    torch.manual_seed(7)
    b, h, n, d, g, c = 2, 4, 23, 8, 3, 5
    q, k, v = (torch.randn(b, hh, n, d, dtype=torch.float64) for hh in (h, kv, kv))
    if ties:  # few distinct values: tied maxima share the gradient
        k, v = k.round(), v.round()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = None
    if pad:  # group 0 all padding, group 1 partly, the rest real
        keep = torch.ones(b, c * g, dtype=torch.bool)
        keep[1, :5] = False
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _CoreAndRaw.apply(q[:, :, g - 1:c * g:g], k, v, keep, g, pooling)
    # memory: it saves its two output buffers (the fused softmax saves them too), a view of q and the mask, no copy
    storage = {t.untyped_storage().data_ptr() for t in saved}
    assert storage == {t.untyped_storage().data_ptr() for t in (q, *out, *([] if keep is None else [keep]))}
    rep = h // kv
    ke, ve = (t.repeat_interleave(rep, 1) for t in (k, v))
    ck, cv = pool_groups(q[:, :, g - 1:c * g:g], ke[:, :, :c * g], ve[:, :, :c * g], g, pooling, keep)
    expected = torch.cat([ck, ke], 2), torch.cat([cv, ve], 2)
    grads = [torch.randn_like(t) for t in expected]
    for got, want in zip(out, expected):
        assert torch.equal(got, want)
    got = torch.autograd.grad(out, (q, k, v), grads, allow_unused=True)
    want = torch.autograd.grad(expected, (q, k, v), grads, allow_unused=True)
    assert (got[0] is None) == (want[0] is None) == (pooling != "cca")  # mean/max pooling does not read q
    for name, a, w in zip("qkv", got, want):
        if w is not None:
            assert_close(a, w, 1e-10, f"{name}.grad")
