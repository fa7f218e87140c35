"""SeerAttention (Gao et al., arXiv 2410.13276; SeerAttention-R, arXiv 2506.08889; microsoft/SeerAttention
``seer_attn/prefill_sparse/attn_gate.py``, ``modules/common.py``, ``decode_sparse/attn_gate_inf.py``): a float64
reference written from the papers' equations with plain loops (pooling, per-head maps, RoPE at block positions,
softmax and the selection rules, then dense masked attention with the selected mask), the oracles (threshold 0 is
dense causal, ``b = 1`` target equals the attention probabilities, target rows sum to 1 and vanish above the block
diagonal), the distillation (loss against a loop reference, only the gate learns), decoding against the
teacher-forced token gate, compile, state_dict and argument errors."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)

import nearfar
from nearfar import SeerAttention
from nearfar.layers.seer_attention import SeerCache

NEG = float("-inf")

# ---------------------------------------------------------------- float64 reference, plain loops


def _heads(layer, x):
    """Pre-RoPE q, k, rotated q, k, and v in float64, (B, heads, N, d)."""
    b, n, _ = x.shape

    def proj(lin, h):
        return (x.double() @ lin.weight.double().T).reshape(b, n, h, -1).transpose(1, 2)

    q0, k0, v = proj(layer.q_proj, layer.num_heads), proj(layer.k_proj, layer.num_kv_heads), proj(layer.v_proj,
                                                                                                   layer.num_kv_heads)
    pos = torch.arange(n)
    return q0, k0, ref.rope(q0, pos), ref.rope(k0, pos), v


def _rot(vec, p):
    return ref.rope(vec[None], torch.tensor([p]))[0]


def _gate_keys(k0, wk, b):
    """[bi][kv][J] -> rotated gate key of block J: [max, min, mean] of its pre-RoPE keys @ W_k, RoPE at J*b."""
    bsz, hkv, n, _ = k0.shape
    nb = -(-n // b)
    return [[[_rot(torch.cat([k0[bi, h, j * b:(j + 1) * b].amax(0), k0[bi, h, j * b:(j + 1) * b].amin(0),
                               k0[bi, h, j * b:(j + 1) * b].mean(0)]) @ wk[h], j * b) for j in range(nb)]
             for h in range(hkv)] for bi in range(bsz)]


def gate_logits_reference(layer, q0, k0, mode):
    """Block gate: (B, H, QB, QB) logits, -inf above the diagonal. Token gate: (B, Hkv, N, KB), key blocks before
    the token's block only; the token's query is the mean over its GQA group of q_h @ W_h, RoPE at its position."""
    b, dg = layer.block_size, layer.gate_dim
    wq, wk = layer.attn_gate.q_weight.double(), layer.attn_gate.k_weight.double()
    bsz, hq, n, _ = q0.shape
    hkv = k0.shape[1]
    g, nb = hq // hkv, -(-n // b)
    keys = _gate_keys(k0, wk, b)
    neg = torch.tensor(NEG, dtype=torch.float64)
    out = []
    for bi in range(bsz):
        heads = []
        for h in range(hq if mode == "block" else hkv):
            rows = []
            for r in range(nb if mode == "block" else n):
                if mode == "block":
                    qh = _rot(q0[bi, h, r * b:(r + 1) * b].mean(0) @ wq[h], r * b)
                    kv, last = h // g, r  # visible key blocks: J <= r
                else:
                    qh = _rot(sum(q0[bi, h * g + j, r] @ wq[h * g + j] for j in range(g)) / g, r)
                    kv, last = h, r // b - 1  # visible: J < the token's block
                rows.append(torch.stack([qh @ keys[bi][kv][j] / math.sqrt(dg) if j <= last else neg
                                         for j in range(nb)]))
            heads.append(torch.stack(rows))
        out.append(torch.stack(heads))
    return torch.stack(out)


def keep_reference(layer, logits, mode):
    """The kept blocks (bool, logits' shape) and the smallest margin of a decision (to the threshold, or between
    the last kept and the first dropped logit of a top-K)."""
    b = layer.block_size
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    margin = math.inf
    nb = logits.shape[-1]
    rows = logits.shape[2]
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in logits.shape[:3]]).tolist():
        row = logits[tuple(idx)].detach()
        r = idx[2]
        cur = r if mode == "block" else r // b
        vis = [j for j in range(nb) if row[j] > NEG]
        if vis and layer.sparsity == "threshold":
            p = torch.softmax(row[vis], 0)
            for j, pj in zip(vis, p.tolist()):
                keep[tuple(idx) + (j,)] = pj >= layer.threshold
                margin = min(margin, abs(pj - layer.threshold))
        elif vis:
            k = (max(1, int((1 - math.sqrt(1 - layer.nz_ratio)) * nb)) if layer.sparsity == "nz_ratio"
                 else layer.token_budget // b)
            order = sorted(vis, key=lambda j: (-row[j].item(), j))
            for j in order[:k]:
                keep[tuple(idx) + (j,)] = True
            if 0 < k < len(order):
                margin = min(margin, row[order[k - 1]].item() - row[order[k]].item())
        keep[tuple(idx) + (cur,)] = True  # the diagonal / current block
        if mode == "block" and layer.last_block_dense and r >= rows - 2:
            keep[tuple(idx)][:r + 1] = True
    return keep, margin


def seer_reference(layer, x):
    """The layer's output in float64 (differentiable in x and the projections) and the selection's margin."""
    mode, b = layer.gate, layer.block_size
    q0, k0, q, k, v = _heads(layer, x)
    keep, margin = keep_reference(layer, gate_logits_reference(layer, q0, k0, mode), mode)
    bsz, hq, n, d = q.shape
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    if mode == "block":
        allowed = keep[:, :, i // b, j // b]
    else:
        allowed = keep.repeat_interleave(hq // keep.shape[1], 1)[:, :, i, j // b]
    out = ref.dense_reference(q, k, v, allowed & (j <= i), 1 / math.sqrt(d))
    return out.transpose(1, 2).reshape(bsz, n, -1) @ layer.o_proj.weight.double().T, margin


def _input(b, n, dim, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return torch.randn(b, dim, n, generator=g).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(b, 2 * n, dim + 3, generator=g)[:, ::2, 1:dim + 1]
    return torch.randn(b, n, dim, generator=g)


def _layer(seed, **kw):
    torch.manual_seed(seed)
    return SeerAttention(**kw)


SPARSITY = {"block": ["threshold", "nz_ratio"], "token": ["threshold", "token_budget"]}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 29), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), block=st.sampled_from([1, 2, 3, 5, 8]),
       gate_dim=st.sampled_from([4, 8]), mode=st.sampled_from(["block", "token"]), pick=st.integers(0, 1),
       threshold=st.sampled_from([0.05, 0.2, 0.4]), nz_ratio=st.sampled_from([0.2, 0.5, 0.8]),
       budget=st.integers(0, 3), last_dense=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2 ** 16))
def test_matches_the_float64_reference_forward_and_backward(n, heads, block, gate_dim, mode, pick, threshold,
                                                             nz_ratio, budget, last_dense, layout, seed):
    hq, hkv = heads
    layer = _layer(seed, dim=8 * hq, num_heads=hq, num_kv_heads=hkv, block_size=block, gate_dim=gate_dim, gate=mode,
                   sparsity=SPARSITY[mode][pick], threshold=threshold, nz_ratio=nz_ratio,
                   token_budget=budget * block, last_block_dense=last_dense)
    x = _input(2, n, 8 * hq, layout, seed).requires_grad_()
    expected, margin = seer_reference(layer, x)
    assume(margin > 1e-4)  # float32 and float64 gates make the same decisions
    out = layer(x)
    params = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight, layer.o_proj.weight]
    check_outputs_and_grads(out, expected, [x, *params], rtol=1e-5, grad_rtol=1e-4)


def test_the_selection_is_sparse_and_not_differentiable():
    """A high threshold drops blocks (the output differs from dense causal attention and equals the reference);
    the output gives the gate no gradient (selection only)."""
    for mode in ("block", "token"):
        layer = _layer(0, dim=16, num_heads=2, block_size=4, gate_dim=8, gate=mode, threshold=0.3).double()
        x = torch.randn(2, 40, 16, dtype=torch.float64)
        q0, k0, *_ = _heads(layer, x)
        keep, _ = keep_reference(layer, gate_logits_reference(layer, q0, k0, mode), mode)
        dense_layer = _layer(0, dim=16, num_heads=2, block_size=4, gate_dim=8, gate=mode, threshold=0.0).double()
        sel = layer.select(layer.gate_logits(q0, k0))
        causal = dense_layer.select(dense_layer.gate_logits(q0, k0))
        assert sel.kv_num_blocks.sum() == keep.sum() < causal.kv_num_blocks.sum()
        out = layer(x)
        assert not torch.allclose(out, dense_layer(x), atol=1e-6)
        assert_close(out, seer_reference(layer, x)[0], 1e-7)  # the layer rotates with float32 angles
        out.sum().backward()
        assert all(p.grad is None for p in layer.gate_parameters())
        assert layer.q_proj.weight.grad is not None


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("mode", ["block", "token"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
def test_threshold_zero_is_dense_causal_attention(mode, heads):
    hq, hkv = heads
    layer = _layer(1, dim=8 * hq, num_heads=hq, num_kv_heads=hkv, block_size=3, gate_dim=8, gate=mode,
                   threshold=0.0, last_block_dense=False).double()
    x = torch.randn(2, 23, 8 * hq, dtype=torch.float64)
    _, _, q, k, v = _heads(layer, x)
    n = x.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    want = ref.dense_reference(q, k, v, causal, 1 / math.sqrt(8)).transpose(1, 2).reshape(2, n, -1)
    assert_close(layer(x), want @ layer.o_proj.weight.double().T, 1e-7)


def _probs(layer, x):
    _, _, q, k, _ = _heads(layer, x)
    k = k.repeat_interleave(layer.num_heads // layer.num_kv_heads, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(layer.head_dim)
    n = x.shape[1]
    return torch.softmax(s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), NEG), -1)


def test_with_blocks_of_one_token_the_target_is_the_attention_probabilities():
    layer = _layer(2, dim=32, num_heads=4, num_kv_heads=2, block_size=1, gate_dim=8).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    assert_close(layer.distill_target(x), _probs(layer, x), 1e-8)  # float32 RoPE angles


@pytest.mark.parametrize("block,n", [(2, 9), (3, 17), (4, 16), (5, 4)])
def test_the_target_is_the_normalised_tile_max_of_the_attention_map(block, n):
    """GT[I, J] = max over the b x b tile of P, rows divided by their sums: rows sum to 1, zero above the block
    diagonal. Token gate: per token, max over the block's keys and the GQA group, completed earlier blocks only."""
    layer = _layer(3, dim=32, num_heads=4, num_kv_heads=2, block_size=block, gate_dim=8).double()
    x = torch.randn(2, n, 32, dtype=torch.float64)
    p = _probs(layer, x)
    nb = -(-n // block)
    want = torch.zeros(2, 4, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            want[:, :, i, j] = p[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].amax((-1, -2))
    want = want / want.sum(-1, keepdim=True)
    gt = layer.distill_target(x)
    assert_close(gt, want, 1e-8)
    assert_close(gt.sum(-1), torch.ones(2, 4, nb, dtype=torch.float64), 1e-12)
    assert (gt.triu(1) == 0).all()
    token = _layer(3, dim=32, num_heads=4, num_kv_heads=2, block_size=block, gate_dim=8, gate="token").double()
    want = torch.zeros(2, 2, n, nb, dtype=torch.float64)
    for i in range(n):
        for j in range(i // block):
            want[:, :, i, j] = p[:, :, i, j * block:(j + 1) * block].amax(-1).reshape(2, 2, 2).amax(-1)
    total = want.sum(-1, keepdim=True)
    gt = token.distill_target(x)
    assert_close(gt, want / total.where(total > 0, torch.ones_like(total)), 1e-8)
    assert_close(gt.sum(-1), (torch.arange(n) >= block).double().expand(2, 2, n), 1e-12)


# ---------------------------------------------------------------- distillation


@pytest.mark.parametrize("mode", ["block", "token"])
def test_distill_loss_matches_a_reference_kl_and_trains_only_the_gate(mode):
    layer = _layer(4, dim=32, num_heads=4, num_kv_heads=2, block_size=3, gate_dim=8, gate=mode).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64, requires_grad=True)
    loss = layer.distill_loss(x)
    q0, k0, *_ = _heads(layer, x.detach())
    logits = gate_logits_reference(layer, q0, k0, mode)
    gt = layer.distill_target(x)
    skip = logits.shape[2] // 4
    logits, gt = logits[:, :, skip:], gt[:, :, skip:]
    logp = torch.log_softmax(logits.masked_fill(logits.isneginf().all(-1, keepdim=True), 0.0), -1)
    kl = torch.where(gt > 0, gt * (gt.clamp_min(1e-300).log() - logp.clamp_min(-1e300)), 0.0)
    want = kl.sum() / kl.numel()
    assert_close(loss, want, 1e-8)
    assert_close(layer.distill_loss(x, reduction="sum"), kl.sum(), 1e-8)
    grads = torch.autograd.grad(want, layer.gate_parameters())
    loss.backward()
    for p, g in zip(layer.gate_parameters(), grads):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert_close(p.grad, g, 1e-8)
    assert x.grad is None
    assert all(p.grad is None for n_, p in layer.named_parameters() if not n_.startswith("attn_gate."))


def test_a_few_distillation_steps_lower_the_loss():
    torch.manual_seed(5)
    layer = SeerAttention(32, 4, num_kv_heads=2, block_size=4, gate_dim=16)
    x = torch.randn(2, 48, 32)
    opt = torch.optim.Adam(layer.gate_parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        loss = layer.distill_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("sparsity,heads", [("threshold", (2, 2)), ("token_budget", (4, 2)), ("threshold", (4, 1))])
def test_decoding_in_chunks_equals_the_token_gate_forward(sparsity, heads):
    hq, hkv = heads
    layer = _layer(6, dim=8 * hq, num_heads=hq, num_kv_heads=hkv, block_size=4, gate_dim=8, gate="token",
                   sparsity=sparsity, threshold=0.15, token_budget=8).double()
    x = torch.randn(2, 27, 8 * hq, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        for sizes in ([1] * 27, [5, 1, 1, 9, 11], [3, 5, 4, 15], [27]):
            cache, outs, i = layer.new_cache(2), [], 0
            for s in sizes:
                outs.append(layer(x[:, i:i + s], cache=cache))
                i += s
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-12)
            assert isinstance(cache, SeerCache) and cache.length == 27
            q0, k0, *_ = _heads(layer, x)
            assert cache.block_keys.shape == (2, hkv, 6, 8) and cache.pending.shape == (2, hkv, 3, 8)
            assert_close(cache.block_keys, layer.attn_gate.keys(k0)[:, :, :6], 1e-12)
    assert_close(full, seer_reference(layer, x)[0], 1e-7)


def test_the_token_gate_is_causal_and_the_block_gate_is_not():
    """Token gate: later tokens change no earlier output. Block gate: a query block's mean query reads the later
    tokens of its block, so its selection (and the output of earlier tokens of that block) may change."""
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    later = x.clone()
    later[:, 10:] = torch.randn(1, 22, 16, dtype=torch.float64) * 3
    token = _layer(7, dim=16, num_heads=2, block_size=4, gate_dim=8, gate="token", threshold=0.3).double()
    assert torch.equal(token(later)[:, :10], token(x)[:, :10])
    block = _layer(7, dim=16, num_heads=2, block_size=4, gate_dim=8, threshold=0.3).double()
    q0, k0, *_ = _heads(block, x)
    q1, k1, *_ = _heads(block, later)
    row0, row1 = block.gate_logits(q0, k0)[:, :, 2], block.gate_logits(q1, k1)[:, :, 2]  # block 2: tokens 8..11
    assert not torch.allclose(row0, row1)


# ---------------------------------------------------------------- hygiene


def test_compile_matches_eager():
    layer = _layer(8, dim=16, num_heads=2, block_size=4, gate_dim=8, threshold=0.2)
    check_compile_matches_eager(layer, torch.randn(2, 21, 16))


def test_state_dict_round_trip_and_both_gates_share_the_parameters():
    x = torch.randn(2, 19, 16)
    check_state_dict_round_trip(lambda: SeerAttention(16, 2, block_size=4, gate_dim=8, threshold=0.2), x)
    block = SeerAttention(16, 2, num_kv_heads=1, block_size=4, gate_dim=8)
    assert sorted(block.state_dict()) == ["attn_gate.k_weight", "attn_gate.q_weight", "k_proj.weight",
                                          "o_proj.weight", "q_proj.weight", "v_proj.weight"]
    assert block.attn_gate.q_weight.shape == (2, 8, 8) and block.attn_gate.k_weight.shape == (1, 24, 8)
    token = SeerAttention(16, 2, num_kv_heads=1, block_size=4, gate_dim=8, gate="token")
    token.load_state_dict(block.state_dict())
    assert torch.equal(token.attn_gate.k_weight, block.attn_gate.k_weight)


def test_official_defaults_and_registry_entry():
    layer = SeerAttention(64, 4)
    assert (layer.block_size, layer.gate_dim, layer.gate, layer.sparsity, layer.threshold) == (64, 128, "block",
                                                                                                "threshold", 2e-3)
    assert layer.last_block_dense and layer.token_budget == 4096 and not layer.causal
    entry = {m.name: m for m in nearfar.mechanisms()}["seer_attention"]
    assert entry.family == "routed" and set(entry.patterns) == {"CS"} and entry.cls is SeerAttention
    built = entry.build(32, 2, "CS")
    assert built.gate == "token" and built.causal
    with pytest.raises(ValueError, match="does not support NS"):
        entry.build(32, 2, "NS")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dim=15, num_heads=2), ValueError, "must be a positive multiple of num_heads"),
    (dict(dim=16, num_heads=2, num_kv_heads=3), ValueError, "must be a multiple of num_kv_heads"),
    (dict(dim=16, num_heads=2, block_size=0), ValueError, "block_size must be a positive int"),
    (dict(dim=16, num_heads=2, block_size=2.0), TypeError, "block_size must be a positive int"),
    (dict(dim=16, num_heads=2, gate_dim=6 - 1), ValueError, "gate_dim must be even"),
    (dict(dim=16, num_heads=2, gate="tokens"), ValueError, "gate must be one of 'block', 'token'"),
    (dict(dim=16, num_heads=2, sparsity="topk"), ValueError, "sparsity must be one of"),
    (dict(dim=16, num_heads=2, sparsity="token_budget"), ValueError, "sparsity='token_budget' is for gate='token'"),
    (dict(dim=16, num_heads=2, gate="token", sparsity="nz_ratio"), ValueError, "sparsity='nz_ratio' is for gate='b"),
    (dict(dim=16, num_heads=2, threshold=-0.1), ValueError, r"threshold must be a number in \[0.0, 1.0\]"),
    (dict(dim=16, num_heads=2, nz_ratio=1.5), ValueError, r"nz_ratio must be a number in \[0.0, 1.0\]"),
    (dict(dim=16, num_heads=2, token_budget=-1), ValueError, "token_budget must be a non-negative int"),
    (dict(dim=16, num_heads=2, last_block_dense=1), TypeError, "last_block_dense must be a bool"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SeerAttention(**kwargs)


def test_bad_call_arguments():
    block = SeerAttention(16, 2, block_size=4, gate_dim=8)
    token = SeerAttention(16, 2, block_size=4, gate_dim=8, gate="token")
    x = torch.randn(2, 9, 16)
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\) with B, N >= 1"):
        block(torch.randn(2, 9, 15))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 16\) with B, N >= 1, got \(2, 0, 16\)"):
        token(torch.randn(2, 0, 16), cache=token.new_cache(2))
    with pytest.raises(ValueError, match="takes no key_padding_mask"):
        block(x, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="has no decoding cache"):
        block.new_cache(2)
    with pytest.raises(ValueError, match="cache is for gate='token' layers"):
        block(x, cache=token.new_cache(2))
    with pytest.raises(TypeError, match="cache must come from new_cache"):
        token(x, cache=object())
    cache = token.new_cache(2)
    with pytest.raises(ValueError, match=r"cache was made for batch 2"):
        token(torch.randn(3, 9, 16), cache=cache)
    assert cache.length == 0 and cache.block_keys is None
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum'"):
        block.distill_loss(x, reduction="batchmean")
