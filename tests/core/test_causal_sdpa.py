"""A plain ``Causal()`` runs on SDPA without a mask (dense engine): ``is_causal`` with as many queries as keys, plain
SDPA for one query after its keys (decoding), GQA read in place; ``auto`` sends it there where measured no slower
(``benchmarks/causal.py``): no mask is materialised, no plan is built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_native import _view

import nearfar as nf
from nearfar import native
from nearfar.backends import dense
from nearfar.dispatch import choose_engine


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 5, 64, 65, 130]), decode=st.booleans(), b=st.integers(1, 2),
       heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
       d=st.sampled_from([8, 24]), dv=st.sampled_from([None, 16]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["contiguous", "bnhd", "sliced", "last_strided"]), seed=st.integers(0, 2**16))
def test_dense_engine_causal_matches_float64_reference(n, decode, b, heads, d, dv, dtype, layout, seed):
    # n <= 64 takes the few-keys matmul path, d != dv the zero-padded fused call: both with the causal mask;
    # ``decode``: one query after n - 1 cached keys (bottom-right aligned: it sees them all)
    hq, hkv = heads
    nq = 1 if decode else n
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, n, dv or d, generator=g, dtype=torch.float64)
    leaves = [_view(t.to(dtype), layout).requires_grad_() for t in (q, k, v)]
    out = nf.attend(*leaves, nf.Causal(), engine="dense")
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(hq // hkv, 1) for t in refs[1:])
    s = refs[0] @ kr.transpose(-1, -2) * d ** -0.5
    s = s.masked_fill(torch.ones(nq, n, dtype=torch.bool).triu(n - nq + 1), float("-inf"))
    out_r = s.softmax(-1) @ vr
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=tol)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * go.to(dtype)).sum(), leaves)
    for name, a, r in zip("qkv", grads, torch.autograd.grad((out_r * go).sum(), refs)):
        torch.testing.assert_close(a.double(), r, atol=4 * tol, rtol=4 * tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_dense_engine_calls_is_causal_without_a_mask(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dense.F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 300, 16)
    nf.attend(q, q, q, nf.Causal(), engine="dense")
    nf.attend(q[:, :, -1:], q, q, nf.Causal(), engine="dense")  # a decoding step sees every key
    assert seen == [(None, True), (None, False)]
    seen.clear()  # anything beyond the plain mask goes the materialised way
    nf.attend(q, q, q, nf.Causal(), engine="dense", key_padding_mask=torch.rand(1, 300) > 0.2)
    nf.attend(q[:, :, :100], q, q, nf.Causal(), engine="dense")  # bottom-right aligned: not SDPA's diagonal
    nf.attend(q, q, q, nf.Causal() & nf.SlidingWindow(left=8), engine="dense")
    assert all(mask is not None and not causal for mask, causal in seen) and len(seen) == 3


@pytest.mark.skipif(not native.available(), reason=native.status())
def test_auto_rule_for_plain_causal():
    big, small = torch.randn(1, 2, 4096, 32), torch.randn(1, 2, 1024, 32)
    causal = nf.Causal()
    assert choose_engine(big, causal, 4096, 4096, trains=False) == "dense"  # fp32 from 4,096 tokens: is_causal
    assert choose_engine(big, causal, 4096, 4096, trains=True) == "dense"
    assert choose_engine(small, causal, 1024, 1024, trains=False) == "blocksparse"  # the kernel is faster below
    assert choose_engine(big.bfloat16(), causal, 4096, 4096, trains=False) == "dense"
    assert choose_engine(big.bfloat16(), causal, 4096, 4096, trains=True) == "blocksparse"  # SDPA's bf16 backward
    assert choose_engine(big.double(), causal, 4096, 4096) == "dense"  # no kernel for float64
    # what is_causal cannot run as it is stays on the block-sparse engine at this size
    assert choose_engine(big, causal, 4096, 4096, padded=True) == "blocksparse"
    assert choose_engine(big, causal, 4096, 4096, lse=True) == "blocksparse"
    assert choose_engine(big, causal, 4096, 4096, scored=True) == "blocksparse"
    assert choose_engine(big, causal, 2048, 4096) == "blocksparse"
    assert choose_engine(big, causal, 1, 1 << 21) == "dense"  # a decoding step over 2M keys: unmasked SDPA
    assert choose_engine(big, causal & nf.SlidingWindow(left=512), 4096, 4096) == "blocksparse"
    with torch.no_grad():  # trains=None: read from grad mode and q
        assert choose_engine(big.bfloat16().requires_grad_(), causal, 4096, 4096) == "dense"
    assert choose_engine(big.bfloat16().requires_grad_(), causal, 4096, 4096) == "blocksparse"
