"""FITAR (``fit_ar.py``): a float64 reference on flat token/latent sequences with explicit masks (written from the
paper and google-research/pix2seq ``architectures/transformers.py`` ``FITAR``), its properties (no leakage from later
groups, one group = plain causal Transformer, block-causal latent mask), exact padding of odd lengths, training,
state_dict, errors."""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from module_checks import assert_close, check_loss_halves

from nearfar.models.fit_ar import FITAR, parse_layers

V = 37


def small(**kw) -> FITAR:
    args = dict(group_size=4, latents_per_group=2, dim=16, latent_dim=24, layers="(1)1(1)", num_heads=2)
    args.update(kw)
    torch.manual_seed(0)
    return FITAR(V, **args)


def tokens(b: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- float64 reference (flat sequences, dense masks)



def _heads(t, h):
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def _attn(wq, wk, wv, wo, xq, xk, allowed, h, pos_q=None, pos_k=None):
    q, k, v = _heads(xq @ wq.T, h), _heads(xk @ wk.T, h), _heads(xk @ wv.T, h)
    if pos_q is not None:
        q, k = ref.rope(q, pos_q), ref.rope(k, pos_k)
    o = ref.dense_reference(q, k, v, allowed, q.shape[-1] ** -0.5)
    return o.transpose(1, 2).reshape(xq.shape[0], xq.shape[1], -1) @ wo.T


def _rms(x, norm):
    # nn.RMSNorm(eps=None) uses the eps of the input dtype: the float32 module's, not float64's
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * norm.weight


def _block(blk, x, allowed, pos, h):
    a = blk.attn
    x = x + _attn(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, _rms(x, blk.attn_norm),
                  _rms(x, blk.attn_norm), allowed, h, pos, pos)
    y, mlp = _rms(x, blk.mlp_norm), blk.mlp
    return x + (torch.nn.functional.silu(y @ mlp.gate.weight.T) * (y @ mlp.up.weight.T)) @ mlp.down.weight.T


def _cross(ca, x, mem, allowed, h):
    return x + _attn(ca.q_proj.weight, ca.k_proj.weight, ca.v_proj.weight, ca.o_proj.weight, _rms(x, ca.q_norm),
                     _rms(mem, ca.kv_norm), allowed, h)


def reference(m: FITAR, tok: torch.Tensor) -> torch.Tensor:
    """Whole padded sequence of L tokens and t*m latents, every connection an explicit (query, key) mask."""
    n, mm, h = m.group_size, m.latents_per_group, m.num_heads
    length = tok.shape[1]
    t = -(-length // n)
    tok = torch.cat([tok, tok.new_zeros(tok.shape[0], t * n - length)], 1)
    i, j = torch.arange(t * n), torch.arange(t * mm)
    local = (i[:, None] // n == i[None] // n) & (i[None] <= i[:, None])
    glob = j[None] // mm <= j[:, None] // mm
    read = i[None] // n == j[:, None] // mm
    write = j[None] // mm == i[:, None] // n - 1  # group 0: no key, the reference returns 0
    x = m.embed.weight[tok]
    lat = m.latent_emb.repeat(t, 1)[None].expand(tok.shape[0], -1, -1)
    for b, (_, nglob) in enumerate(m.layer_config):
        for blk in m.local[b]:
            x = _block(blk, x, local, i % n, h)
        if nglob:
            lat = _cross(m.read[str(b)], lat, x, read, h)
            for blk in m.latent_blocks[str(b)]:
                lat = _block(blk, lat, glob, j, h)
            if b < len(m.layer_config) - 1:
                x = _cross(m.write[str(b)], x, lat, write, h)
    return _rms(x[:, :length], m.norm) @ m.embed.weight.T


@pytest.mark.parametrize("kw,length", [
    (dict(), 13),
    (dict(layers="(1)2(0)1(1)", dim=24, latent_dim=16, latents_per_group=3), 12),
    (dict(group_size=5, layers="(2)1"), 7),
])
def test_matches_float64_reference(kw, length):
    m = small(**kw)
    tok = tokens(2, length)
    out = m(tok)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    m64 = copy.deepcopy(m).double()
    m64.zero_grad()
    expected = reference(m64, tok)
    (expected * g.double()).sum().backward()
    assert_close(out, expected)
    last = str(len(m.layer_config) - 1)
    for (name, p), p64 in zip(m.named_parameters(), m64.parameters()):
        # the last block's read/global layers have no write after them: unused, as in the reference
        if name.startswith((f"read.{last}.", f"latent_blocks.{last}.")) or (not m.write and name == "latent_emb"):
            assert p.grad is None and p64.grad is None, name
            continue
        assert p.grad is not None, name
        assert_close(p.grad, p64.grad, 3e-5, f"{name}.grad")


# ---------------------------------------------------------------- oracles (properties any correct implementation has)

@pytest.mark.parametrize("start", [4, 8, 12, 6, 9, 15])
def test_later_tokens_do_not_change_earlier_logits(start):
    """Perturb every token from ``start`` on: group-aligned starts (group g and later) and mid-group starts (the
    rest of a group, which a missing latent shift would leak through the read)."""
    m = small(layers="(1)1(1)1(1)")
    tok = tokens(2, 16)  # 4 groups of 4
    base = m(tok)
    changed = tok.clone()
    changed[:, start:] = (changed[:, start:] + 1 + tokens(2, 16 - start, seed=9) % (V - 1)) % V
    out = m(changed)
    torch.testing.assert_close(out[:, :start], base[:, :start], rtol=0, atol=1e-6)
    assert (out[:, start:] - base[:, start:]).abs().max() > 1e-4  # the test can fail: later logits do move


def test_within_group_causal():
    m = small()
    tok = tokens(1, 8)
    changed = tok.clone()
    changed[0, 5] = (changed[0, 5] + 1) % V
    torch.testing.assert_close(m(changed)[:, :5], m(tok)[:, :5], rtol=0, atol=1e-6)


def test_one_group_is_plain_causal_transformer():
    """t = 1: group 0 reads zero latents, so the logits are those of the local layers alone, and the latent side
    path gets no gradient; with t = 2 the same path does move group 1's logits (and only those)."""
    m = small(layers="(1)1(1)1(1)")
    tok = tokens(2, 4)  # one group
    out = m(tok)
    x = m.embed(tok)
    for blocks in m.local:
        for blk in blocks:
            x = blk(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(m.norm(x), m.embed.weight), rtol=0, atol=1e-6)
    out.square().sum().backward()
    side = [p for name, p in m.named_parameters() if name.startswith(("latent", "read", "write"))]
    assert side and all(p.grad is None or not p.grad.any() for p in side)

    tok2 = tokens(2, 8)
    before = m(tok2)
    with torch.no_grad():
        for w in m.write.values():
            w.o_proj.weight.zero_()
    after = m(tok2)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-6)
    assert (after[:, 4:] - before[:, 4:]).abs().max() > 1e-4


@pytest.mark.parametrize("t,mm", [(1, 1), (3, 2), (4, 3)])
def test_latent_mask_is_block_lower_triangular(t, mm):
    m = small(latents_per_group=mm)
    expected = torch.zeros(t * mm, t * mm, dtype=torch.bool)
    for gi in range(t):
        for gj in range(gi + 1):  # tril(ones(t, t)) ⊗ ones(m, m)
            for a in range(mm):
                for b in range(mm):
                    expected[gi * mm + a, gj * mm + b] = True
    assert torch.equal(m.latent_mask(t), expected)
    assert torch.equal(expected, torch.kron(torch.ones(t, t).tril(), torch.ones(mm, mm)).bool())


def test_odd_length_padding_is_exact():
    m = small()
    tok = tokens(2, 16)
    for length in (1, 5, 13):
        torch.testing.assert_close(m(tok[:, :length]), m(tok)[:, :length], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- training and plumbing

def test_loss_decreases_with_adam():
    m = small(layers="(1)1(1)")
    data = torch.arange(24).remainder(6).repeat(4, 1)  # a periodic sequence: learnable
    check_loss_halves(m, data)


def test_forward_backward_finite():
    m = small(layers="(2)2(1)")
    out = m(tokens(3, 11))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_state_dict_round_trip():
    a, tok = small(), tokens(2, 9)
    torch.manual_seed(5)
    b = FITAR(V, group_size=4, latents_per_group=2, dim=16, latent_dim=24, layers="(1)1(1)", num_heads=2)
    assert not torch.equal(a(tok), b(tok))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(tok), b(tok))


def test_generate_is_greedy():
    m = small()
    out = m.generate(tokens(1, 3), 3)
    assert out.shape == (1, 6)
    assert torch.equal(out[:, 3], m(out[:, :3])[:, -1].argmax(-1))
    assert torch.equal(out[:, 5], m(out[:, :5])[:, -1].argmax(-1))


@pytest.mark.parametrize("layers", ["(1)1(1)", "(2)1(1)2(1)", "(1)1(0)1"])
@pytest.mark.parametrize("chunks", [[1] * 23, [3] * 7 + [2], [5, 1, 9, 8]])
def test_cached_decoding_equals_teacher_forcing(layers, chunks):
    """Any split of the sequence into calls gives the teacher-forced logits; the local caches never hold more
    than a group and the latent caches hold one group of latents per finished group."""
    m = small(layers=layers).double()
    tok = tokens(2, sum(chunks), seed=4)
    full = m(tok)
    cache, outs, i = m.new_cache(2), [], 0
    with torch.no_grad():
        for c in chunks:
            outs.append(m(tok[:, i:i + c], cache))
            i += c
            assert all(lc.size <= m.group_size for blocks in cache.local for lc in blocks)
            assert all(lc.size == (i // m.group_size) * m.latents_per_group
                       for cs in cache.latent.values() for lc in cs)
    assert_close(torch.cat(outs, 1), full.detach(), 1e-10, 1e-10)
    assert cache.nbytes() > 0
    with pytest.raises(ValueError, match="new_cache"):
        m(tok[:1, :2], cache)


def test_parse_layers():
    assert parse_layers("(1)1(1)") == [(1, 1), (1, 0)]
    assert parse_layers("(2)4(2)") == [(2, 4), (2, 0)]
    assert parse_layers("(0)3") == [(0, 3)]
    m = small(layers="(1)1(1)")
    assert set(m.read) == {"0"} and set(m.write) == {"0"}  # no read/write for the block without global layers
    m = small(layers="(1)1(1)1")
    assert set(m.read) == {"0", "1"} and set(m.write) == {"0"}  # no write after the last block


@pytest.mark.parametrize("kw,err,match", [
    (dict(group_size=0), ValueError, "group_size"),
    (dict(latents_per_group=-1), ValueError, "latents_per_group"),
    (dict(dim=15), ValueError, "dim"),
    (dict(latent_dim=7), ValueError, "dim"),
    (dict(layers="1(1)"), ValueError, "layers"),
    (dict(layers="(a)1"), ValueError, "layers"),
    (dict(layers="(0)0"), ValueError, "at least one"),
    (dict(layers=3), TypeError, "layers"),
])
def test_bad_constructor_args(kw, err, match):
    with pytest.raises(err, match=match):
        small(**kw)


def test_bad_tokens():
    m = small()
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        m(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="at least 2"):
        m.loss(torch.zeros(1, 1, dtype=torch.long))
