"""``prob_rows`` / ``score_rows`` and ``Capture`` on calls with a ``score_mod`` and run-time ``SelectedBlocks``.

The reference is the float64 softmax of ``score_mod(scale q.k)`` with the union of the pattern's pairs and the
selected blocks' (``SelectedBlocks.pair_mask``) materialised, bias and key padding added; the LSE comes from the
engine that ran the call (dense and block-sparse). Before these were passed through, a capture of a routed layer's
call (NSA, MoBA) or of a soft-capped one recomputed its rows without them: probabilities that did not sum to one.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nearfar as nf
from nearfar.steer import Capture, Site, control, prob_rows, score_rows


def softcap(s, b, h, q, k):
    return 5.0 * torch.tanh(s / 5.0)


def _alibi(slopes):
    return lambda s, b, h, q, k: s - slopes[h] * (q - k).abs()


def _item_head(s, b, h, q, k):
    return s * (1.0 + 0.25 * b) - 0.1 * h


PATTERNS = {"none": None, "causal": nf.Causal(), "window": nf.SlidingWindow(left=3) & nf.Causal()}


def _blocks(gen, b, heads, nq, q_block, kv_block, within):
    qb, kb = -(-nq // q_block), -(-nq // kv_block)
    num = torch.randint(0, kb + 1, (b, heads, qb), generator=gen)
    idx = torch.stack([torch.randperm(kb, generator=gen) for _ in range(b * heads * qb)]).view(b, heads, qb, kb)
    return nf.SelectedBlocks(num, idx, q_block=q_block, kv_block=kv_block, within=within)


def _reference(q, k, scale, score_mod, allowed, bias, kpm):
    b, hq, nq, _ = q.shape
    k = k.double().repeat_interleave(hq // k.shape[1], 1)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k) * scale
    if score_mod is not None:
        s = score_mod(s, torch.arange(b).view(-1, 1, 1, 1), torch.arange(hq).view(1, -1, 1, 1),
                      torch.arange(nq).view(1, 1, -1, 1), torch.arange(k.shape[2]).view(1, 1, 1, -1))
    if bias is not None:
        s = s + bias.double()
    allowed = torch.broadcast_to(allowed, s.shape)
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(torch.where(allowed.any(-1, keepdim=True), s, 0.0), -1)
    return torch.where(allowed, p, 0.0), s


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 2), hkv=st.integers(1, 2), g=st.sampled_from([1, 2]),
       n=st.integers(5, 40), q_block=st.sampled_from([4, 8, 16]), kv_block=st.sampled_from([4, 8, 16]),
       pattern=st.sampled_from(sorted(PATTERNS)), mod=st.sampled_from(["none", "softcap", "alibi", "item_head"]),
       use_blocks=st.booleans(), within=st.booleans(), per_kv=st.booleans(), extras=st.booleans(),
       engine=st.sampled_from(["dense", "blocksparse"]))
def test_rows_with_score_mod_and_blocks_equal_the_materialised_softmax(seed, b, hkv, g, n, q_block, kv_block,
                                                                        pattern, mod, use_blocks, within, per_kv,
                                                                        extras, engine):
    gen = torch.Generator().manual_seed(seed)
    hq, d = hkv * g, 8
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    slopes = torch.rand(hq, generator=gen, dtype=torch.float64)
    score_mod = {"none": None, "softcap": softcap, "alibi": _alibi(slopes), "item_head": _item_head}[mod]
    pat = PATTERNS[pattern]
    blocks = (_blocks(gen, b, hkv if per_kv else hq, n, q_block, kv_block, nf.Causal() if within else None)
              if use_blocks else None)
    bias = torch.randn(b, 1, n, n, generator=gen, dtype=torch.float64) if extras else None
    kpm = (torch.rand(b, n, generator=gen) > 0.2) if extras else None
    _, lse = nf.attend(q, k, v, pat, return_lse=True, blocks=blocks, score_mod=score_mod, bias=bias,
                       key_padding_mask=kpm, engine=engine)
    if blocks is not None:
        allowed = blocks.pair_mask(n, n, hq, hkv)
        if pat is not None:
            allowed = allowed | pat.mask(n, n)
    else:
        allowed = torch.ones(n, n, dtype=torch.bool) if pat is None else pat.mask(n, n)
    want_p, want_s = _reference(q, k, q.shape[-1] ** -0.5, score_mod, allowed, bias, kpm)
    rows = sorted({0, n // 2, n - 1})
    got_p = prob_rows(q, k, lse, rows, pat, blocks=blocks, score_mod=score_mod, bias=bias, key_padding_mask=kpm)
    torch.testing.assert_close(got_p, want_p[:, :, rows], atol=1e-9, rtol=1e-9)
    got_s = score_rows(q, k, rows, pat, blocks=blocks, score_mod=score_mod, bias=bias, key_padding_mask=kpm)
    assert torch.equal(torch.isneginf(got_s), torch.isneginf(want_s[:, :, rows]))
    torch.testing.assert_close(got_s.nan_to_num(neginf=0.0), want_s[:, :, rows].nan_to_num(neginf=0.0))


class _RoutedCall(torch.nn.Module):
    """One attend call with run-time blocks and a score_mod (what a routed, soft-capped layer makes)."""

    def __init__(self, q, k, v, pattern, blocks, score_mod):
        super().__init__()
        self.args, self.pattern, self.blocks, self.score_mod = (q, k, v), pattern, blocks, score_mod

    def forward(self):
        return nf.attend(*self.args, self.pattern, blocks=self.blocks, score_mod=self.score_mod)


def test_capture_of_a_routed_soft_capped_call_is_exact():
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, n, d = 2, 4, 2, 24, 8
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    blocks = _blocks(gen, b, hkv, n, 8, 8, nf.Causal())
    pattern = nf.SlidingWindow(left=2) & nf.Causal()
    probe = _RoutedCall(q, k, v, pattern, blocks, softcap)
    rows = [0, 9, n - 1]
    with control(probe, [(None, Capture(("probs", "scores"), rows=rows))],
                 sites=[Site("probe", probe, 0, "self")]) as run:
        probe()
    rec = run.records["probe"][0]
    want_p, want_s = _reference(q, k, d ** -0.5, softcap, blocks.pair_mask(n, n, hq, hkv) | pattern.mask(n, n),
                                None, None)
    torch.testing.assert_close(rec["probs"], want_p[:, :, rows], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rec["probs"].sum(-1), torch.ones(b, hq, len(rows), dtype=torch.float64))
    torch.testing.assert_close(rec["scores"].nan_to_num(neginf=0.0), want_s[:, :, rows].nan_to_num(neginf=0.0))


def test_row_range_modulation_of_a_routed_soft_capped_call():
    """DenseDiffusion's row-range modulation reads the call's scores: with run-time blocks and a score_mod, the
    ones the engine forms (it raised for blocks before)."""
    from nearfar.steer import Modulate

    gen = torch.Generator().manual_seed(4)
    b, hq, hkv, n, d = 1, 2, 1, 20, 8
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    blocks = _blocks(gen, b, hkv, n, 4, 4, None)
    pattern = nf.SlidingWindow(left=1) & nf.Causal()
    pos = torch.rand(b, hq, n, n, generator=gen) < 0.3
    probe = _RoutedCall(q, k, v, pattern, blocks, softcap)
    with control(probe, [(None, Modulate(pos, None, 0.5, relative_to="row_range"))],
                 sites=[Site("probe", probe, 0, "self")]):
        out = probe()
    _, s = _reference(q, k, d ** -0.5, softcap, blocks.pair_mask(n, n, hq, hkv) | pattern.mask(n, n), None, None)
    seen = torch.isfinite(s)
    top = torch.where(seen, s, float("-inf")).amax(-1, keepdim=True)
    edited = s + 0.5 * pos.double() * torch.where(seen, top - s, 0.0)
    p = torch.nan_to_num(torch.softmax(edited, -1), nan=0.0)
    want = p @ v.double().repeat_interleave(hq // hkv, 1)
    torch.testing.assert_close(out, want, atol=1e-9, rtol=1e-9)
