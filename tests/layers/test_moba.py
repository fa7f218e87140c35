"""MoBA: a float64 reference written from the paper and the official naive code (MoonshotAI/MoBA
``moba/moba_naive.py``: per-query gate against block mean keys, the current block forced, top-k, token causality,
one softmax), with the selection computed by plain loops and applied as a dense mask; oracles, decoding, varlen."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_against_reference,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)

import nearfar as nf
from nearfar.layers.moba import MoBAAttention, moba
from nearfar.models.tiny_lm import TinyLM


def selection_sets(q, k, c, topk, granularity="token"):
    """S_t per (batch, query head, token) by the paper's steps, in float64 loops: gate q_t . mean(k_b) over the
    blocks b < blk(t) (unscaled), the topk - 1 best (ties: lower block), plus blk(t). ``granularity="block"``: the
    gate uses the mean query of t's block."""
    b, hq, n, _ = q.shape
    g = hq // k.shape[1]
    q, k = q.detach().double(), k.detach().double()
    sets = {}
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, h // g]
            means = [kh[j * c:(j + 1) * c].mean(0) for j in range(n // c)]
            for t in range(n):
                cur = t // c
                qt = q[bi, h, cur * c:min(n, (cur + 1) * c)].mean(0) if granularity == "block" else q[bi, h, t]
                scored = sorted((-float(qt @ means[j]), j) for j in range(cur))
                sets[bi, h, t] = {cur} | {j for _, j in scored[:max(0, topk - 1)]}
    return sets


def moba_mask(q, k, c, topk, granularity="token"):
    b, hq, n, _ = q.shape
    sets = selection_sets(q, k, c, topk, granularity)
    mask = torch.zeros(b, hq, n, n, dtype=torch.bool)
    for (bi, h, t), blocks in sets.items():
        for u in range(t + 1):
            mask[bi, h, t, u] = u // c in blocks
    return mask


def moba_reference(q, k, v, c, topk, dense_fallback=True, granularity="token"):
    """q (B, Hq, N, d), k/v (B, Hkv, N, d), float64."""
    n = q.shape[2]
    if topk == 1 and dense_fallback:
        mask = torch.ones(n, n, dtype=torch.bool).tril()
    else:
        mask = moba_mask(q, k, c, topk, granularity)
    return ref.dense_reference(q, k, v, mask, q.shape[-1] ** -0.5)




def layer_reference(m, x):
    q, k, v = ref.rotary_qkv(m, x)
    o = moba_reference(q, k, v, m.chunk_size, m.topk, m.dense_fallback, m.granularity)
    return o.transpose(1, 2).reshape(*x.shape[:2], -1) @ m.o_proj.weight.double().T


def _fla(b, n, hq, hkv, d, layout, seed=0):
    """q, k, v in fla's (B, T, H, d) layout, as leaves of a contiguous, transposed or sliced memory layout."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h in (hq, hkv, hkv):
        if layout == "transposed":
            t = torch.randn(b, h, n, d, generator=g).transpose(1, 2)
        elif layout == "sliced":
            t = torch.randn(b, n, h, 2 * d, generator=g)[..., ::2]
        else:
            t = torch.randn(b, n, h, d, generator=g)
        out.append(t.requires_grad_())
    return out


def _heads(*xs):
    return [x.transpose(1, 2) for x in xs]


ENGINES = ["dense", "blocksparse"]


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 37), c=st.integers(1, 9), topk=st.integers(2, 5), heads=st.sampled_from([(2, 2), (4, 2),
                                                                                                  (16, 1), (3, 1)]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), engine=st.sampled_from(ENGINES))
def test_functional_matches_the_float64_reference(n, c, topk, heads, layout, engine):
    hq, hkv = heads
    q, k, v = _fla(2, n, hq, hkv, 4, layout, seed=n * 31 + c)
    with nf.engine_override(engine):
        out = moba(q, k, v, chunk_size=c, topk=topk)
    expected = moba_reference(*_heads(q, k, v), c, topk).transpose(1, 2)
    check_outputs_and_grads(out, expected, (q, k, v))


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2), dict(granularity="block"),
                                dict(topk=1, dense_fallback=False), dict(topk=1)],
                         ids=["mha", "gqa", "block", "k1-current", "k1-dense"])
@pytest.mark.parametrize("engine", ENGINES)
def test_layer_matches_the_float64_reference(kw, engine):
    torch.manual_seed(0)
    m = MoBAAttention(32, 4, **{"chunk_size": 5, "topk": 3, **kw})
    with nf.engine_override(engine):
        check_against_reference(m, torch.randn(2, 29, 32), layer_reference)


def _dense_causal(q, k, v):
    n = q.shape[2]
    return ref.dense_reference(q, k, v, torch.ones(n, n, dtype=torch.bool).tril(), q.shape[-1] ** -0.5)


@pytest.mark.parametrize("n,c,topk", [(37, 8, 100), (37, 8, 5), (8, 8, 2), (5, 8, 3), (37, 37, 2)])
def test_enough_blocks_or_one_block_is_dense_causal(n, c, topk):
    q, k, v = _fla(2, n, 4, 2, 8, "transposed")
    out = moba(q, k, v, chunk_size=c, topk=topk)
    check_outputs_and_grads(out, _dense_causal(*_heads(q, k, v)).transpose(1, 2), (q, k, v))


def test_topk_one_is_explicit():
    q, k, v = _fla(1, 30, 2, 2, 4, "contiguous")
    dense = _dense_causal(*_heads(q, k, v)).transpose(1, 2)
    assert_close(moba(q, k, v, 8, 1), dense)  # the efficient kernel's (and fla's) fallback
    blockdiag = torch.zeros(30, 30, dtype=torch.bool)
    for t in range(30):
        blockdiag[t, (t // 8) * 8:t + 1] = True
    own = ref.dense_reference(*_heads(q, k, v), blockdiag, 0.5).transpose(1, 2)
    assert_close(moba(q, k, v, 8, 1, dense_fallback=False), own)  # the naive reference
    assert (own - dense).abs().max() > 1e-3


def test_a_hand_built_selection():
    """Keys of block b are b * e0 (mean b * e0); head 0 queries +e0 (it prefers late past blocks), head 1 -e0 (early
    ones), both tiny so the softmax is ~uniform over the kept keys; one-hot values per block show which were read."""
    c, n = 4, 20
    k = torch.zeros(1, n, 1, 2)
    k[0, :, 0, 0] = (torch.arange(n) // c).float()
    v = torch.nn.functional.one_hot(torch.arange(n) // c, 5).float().view(1, n, 1, 5)
    q = torch.zeros(1, n, 2, 2)
    q[0, :, 0, 0], q[0, :, 1, 0] = 1e-6, -1e-6
    out = moba(q, k, v, chunk_size=c, topk=2)
    read = (out[0, 17] > 1e-3).int()  # token 17 is in block 4; past blocks 0..3
    assert read[0].tolist() == [0, 0, 0, 1, 1] and read[1].tolist() == [1, 0, 0, 0, 1]
    assert_close(out[0, 17, 0, 3:], torch.tensor([4 / 6, 2 / 6]), 1e-5)  # block 3 (4 keys) + tokens 16, 17


def test_lse_merge_of_the_two_streams():
    """The current block (causal) and the selected past blocks are disjoint: attending each and merging by LSE
    (in float64, differentiable LSE) gives MoBA's output and gradients."""
    q, k, v = _fla(2, 33, 4, 2, 8, "contiguous", seed=3)
    qh, kh, vh = (x.double() for x in _heads(q, k, v))
    full = moba_mask(qh, kh, 6, 3)
    pos = torch.arange(33)
    current = (pos[:, None] // 6 == pos[None] // 6) & (pos[None] <= pos[:, None])
    o1, l1 = ref.dense_reference(qh, kh, vh, full & current, 8 ** -0.5, return_lse=True)
    o2, l2 = ref.dense_reference(qh, kh, vh, full & ~current, 8 ** -0.5, return_lse=True)
    lse = torch.logaddexp(l1, l2)
    w2 = torch.where(torch.isinf(l2), 0.0, torch.exp(l2 - lse))
    merged = o1 * torch.exp(l1 - lse)[..., None] + o2 * w2[..., None]
    check_outputs_and_grads(moba(q, k, v, 6, 3), merged.transpose(1, 2), (q, k, v))


def test_sparsity_sanity():
    q, k, v = _fla(1, 256, 2, 2, 16, "contiguous", seed=4)
    with torch.no_grad():
        out = moba(q, k, v, chunk_size=32, topk=2)
        dense = _dense_causal(*_heads(q, k, v)).transpose(1, 2)
    assert (out.double() - dense).abs().max() > 1e-2
    assert_close(out[:, :32], dense[:, :32])  # the first block has no past block: dense causal there


def test_varlen_equals_separate_sequences():
    lens = [13, 1, 24, 8]
    q, k, v = _fla(1, sum(lens), 4, 2, 8, "contiguous", seed=5)
    cu = torch.tensor([0, 13, 14, 38, 46], dtype=torch.int32)
    out = moba(q, k, v, 5, 2, cu_seqlens=cu)
    parts = [moba(q[:, a:b], k[:, a:b], v[:, a:b], 5, 2) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    assert_close(out, torch.cat(parts, 1))
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    parts_grads = torch.autograd.grad((torch.cat(parts, 1) * g).sum(), (q, k, v))
    for a, b in zip(grads, parts_grads):
        assert_close(a, b, 3e-5)


def _decode(m, x, chunks):
    cache, outs, i = m.new_cache(x.shape[0]), [], 0
    with torch.no_grad():
        for c in chunks:
            outs.append(m(x[:, i:i + c], cache=cache))
            i += c
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=1), dict(topk=1, dense_fallback=False)],
                         ids=["mha", "mqa", "k1-current"])
def test_sparse_decode_equals_the_forward(kw):
    torch.manual_seed(6)
    m = MoBAAttention(32, 4, **{"chunk_size": 4, "topk": 3, **kw}).double().eval()
    x = torch.randn(2, 31, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
    out, cache = _decode(m, x, [6, 1, 1, 3, 9, 1, 10])
    assert_close(out, full, 1e-12)
    assert cache.num_means == (31 // 4 if m.topk > 1 else 0)  # one mean per completed block, if routing


def test_dense_decode_is_the_papers_generation():
    torch.manual_seed(7)
    m = MoBAAttention(32, 2, chunk_size=4, topk=2, decode="dense").double().eval()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    out, _ = _decode(m, x, [10, 1, 1, 11])
    with torch.no_grad():
        assert_close(out[:, :10], m(x)[:, :10], 1e-12)  # the prefill runs MoBA
        q, k, v = ref.rotary_qkv(m, x)
        dense = _dense_causal(q, k, v).transpose(1, 2).reshape(2, 23, -1) @ m.o_proj.weight.double().T
    assert_close(out[:, 10:], dense[:, 10:], 1e-7)  # later tokens attend every cached key (float32 RoPE angles)
    blk = MoBAAttention(32, 2, chunk_size=4, topk=2, granularity="block", decode="dense").double().eval()
    out, _ = _decode(blk, x, [12, 1, 10])
    with torch.no_grad():
        assert_close(out[:, :12], blk(x)[:, :12], 1e-12)


def test_tinylm_decodes():
    torch.manual_seed(8)
    lm = TinyLM(40, dim=32, depth=2, num_heads=4, mechanism="moba", chunk_size=4, topk=2, num_kv_heads=2).eval()
    tokens = torch.randint(0, 40, (2, 26))
    with torch.no_grad():
        full = lm(tokens)
        caches = lm.new_caches(2)
        steps = [lm(tokens[:, :7], caches)] + [lm(tokens[:, i:i + 1], caches) for i in range(7, 26)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_finite_compile_and_state_dict():
    torch.manual_seed(9)
    x = torch.randn(2, 19, 32)
    m = MoBAAttention(32, 4, chunk_size=4, topk=2, num_kv_heads=2)
    check_forward_backward_finite(m, x * 30)
    check_compile_matches_eager(m, x)
    check_state_dict_round_trip(lambda: MoBAAttention(32, 4, chunk_size=4, topk=2), x)


def test_registry_entry_and_errors():
    entry = {e.name: e for e in nf.mechanisms()}["moba"]
    assert (entry.family, entry.dims, entry.causal, entry.cross) == ("routed", ("1d",), True, False)
    m = entry.make(32, 2)
    assert (m.chunk_size, m.topk, m.granularity, m.decode, m.dense_fallback) == (512, 3, "token", "sparse", True)
    for kw, err, match in [(dict(chunk_size=0), ValueError, "chunk_size"), (dict(topk=0), ValueError, "topk"),
                           (dict(topk=2.0), TypeError, "topk"), (dict(granularity="head"), ValueError, "granularity"),
                           (dict(decode="full"), ValueError, "decode"), (dict(dense_fallback=1), TypeError,
                                                                          "dense_fallback"),
                           (dict(num_kv_heads=3), ValueError, "num_kv_heads")]:
        with pytest.raises(err, match=match):
            MoBAAttention(32, 4, **kw)
    with pytest.raises(ValueError, match="granularity='block'.*decode='dense'"):
        MoBAAttention(32, 4, granularity="block").new_cache(1)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 0, 32))
    q = torch.randn(1, 10, 4, 8)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        moba(q, torch.randn(1, 10, 3, 8), torch.randn(1, 10, 3, 8), 4, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba(q, q, q, 4, 2, cu_seqlens=torch.tensor([0, 4, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        moba(q, q, q, 4, 2, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        moba(q, q, q, 4, 2, cu_seqlens=torch.tensor([0.0, 10.0]))
