"""GAAM (Ioannides et al., arXiv 2401.11143; gioannides/Gaussian-Adaptive-Attention ``GaussianBlock.py``): a float64
reference written from the paper's equations with plain loops (a product of Gaussian densities, a plain sum as
the normaliser), the oracles (one standard Gaussian, weights summing to 1, shift invariance, padding), decoding
against the teacher-forced causal forward, dtypes, module hygiene and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_forward_backward_finite,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)

import nearfar
from nearfar import GAAMAttention
from nearfar.layers.gaam import GAAMCache

# ---------------------------------------------------------------- float64 reference, plain loops


def _stats(vals: list[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance (divided by max(n - 1, 1)) + eps of a list of per-channel rows."""
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / max(n - 1, 1) + eps
    return mean, var


def gaam_reference(x: torch.Tensor, mu: torch.Tensor, c: torch.Tensor, eps: float, causal: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """out = x * w at real tokens, x at padded ones. Per channel (head of channel ch: min(ch // (D // H), H - 1)):
    g_i = prod_k N((x_i - (mean + mu_k)) / sqrt(var); 0, c_k^2) with the statistics of the real tokens (causal: of
    the real tokens j <= i), w_i = g_i / sum_j g_j (causal: over the real tokens j <= i)."""
    x, mu, c = x.double(), mu.double(), c.double()
    b, n, d = x.shape
    h = mu.shape[0]
    head = [min(ch // (d // h), h - 1) for ch in range(d)]
    mu_c, c_c = mu[head], c[head]  # (D, G): each channel's head parameters

    def density(v: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        g = torch.ones_like(v)
        for k in range(mu.shape[1]):
            y = (v - (mean + mu_c[:, k])) / var.sqrt()
            g = g * torch.exp(-(y ** 2) / (2 * c_c[:, k] ** 2)) / torch.sqrt(2 * math.pi * c_c[:, k] ** 2)
        return g

    rows = []
    for bi in range(b):
        real = [i for i in range(n) if mask is None or bool(mask[bi, i])]
        out = [x[bi, i] for i in range(n)]  # padded tokens pass through
        if causal:
            total = torch.zeros(d, dtype=torch.float64)
            for i in real:
                mean, var = _stats([x[bi, j] for j in real if j <= i], eps)
                g = density(x[bi, i], mean, var)
                total = total + g
                out[i] = x[bi, i] * g / total
        elif real:
            mean, var = _stats([x[bi, j] for j in real], eps)
            gs = {i: density(x[bi, i], mean, var) for i in real}
            total = sum(gs.values())
            for i in real:
                out[i] = x[bi, i] * gs[i] / total
        rows.append(torch.stack(out))
    return torch.stack(rows)


def _layer(dim, heads, gaussians, eps, causal, seed):
    torch.manual_seed(seed)
    layer = GAAMAttention(dim, heads, n_gaussians=gaussians, eps=eps, causal=causal)
    with torch.no_grad():  # offsets and scales in a range where the reference's plain densities do not underflow
        layer.mean_offsets.uniform_(-0.5, 0.5)
        layer.c.uniform_(0.6, 2.0)
    return layer


def _input(b, n, dim, layout, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return torch.randn(b, dim, n, generator=g).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(b, 2 * n, dim + 3, generator=g)[:, ::2, 1:dim + 1]
    return torch.randn(b, n, dim, generator=g)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 7), heads=st.integers(1, 3), extra=st.integers(0, 3), gaussians=st.integers(1, 3),
       eps=st.sampled_from([0.05, 0.5]), causal=st.booleans(), padded=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2 ** 16))
def test_matches_the_float64_reference_forward_and_backward(n, heads, extra, gaussians, eps, causal, padded, layout,
                                                             seed):
    dim = 2 * heads + extra  # heads of 2 channels, the last taking the remainder
    layer = _layer(dim, heads, gaussians, eps, causal, seed)
    x = _input(2, n, dim, layout, seed).requires_grad_()
    mask = None
    if padded:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) > 0.3
        mask[:, seed % n] = True  # one real token at least (all padded: see the finiteness test)
    out = layer(x, key_padding_mask=mask)
    expected = gaam_reference(x, layer.mean_offsets, layer.c, eps, causal, mask)
    check_outputs_and_grads(out, expected, [x, layer.mean_offsets, layer.c], rtol=1e-5, grad_rtol=1e-4)


# ---------------------------------------------------------------- oracles


def test_one_standard_gaussian_gives_exp_of_minus_half_z_squared():
    """n_gaussians=1, offset 0, scale 1: w is proportional to exp(-z^2 / 2), z the standardised x (unbiased
    variance + eps), normalised along the sequence."""
    layer = GAAMAttention(6, 2, n_gaussians=1, eps=1e-6).double()
    with torch.no_grad():
        layer.c.fill_(1.0)
    x = torch.randn(3, 11, 6, dtype=torch.float64) * 2 + 1
    z = (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True) + 1e-6).sqrt()
    w = torch.exp(-z ** 2 / 2)
    assert_close(layer.gaussian_weights(x), w / w.sum(1, keepdim=True), 1e-12)
    assert_close(layer(x), x * w / w.sum(1, keepdim=True), 1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_weights_sum_to_one_along_the_sequence(seed):
    torch.manual_seed(seed)
    layer = GAAMAttention(16, 4)  # the official init: offsets 0, scales exp(randn)
    x = torch.randn(2, 13, 16)
    w = layer.gaussian_weights(x)
    assert (w >= 0).all()
    assert_close(w.sum(1), torch.ones(2, 16), 1e-6)
    mask = torch.rand(2, 13) > 0.4
    mask[:, 3] = True
    wm = layer.gaussian_weights(x, key_padding_mask=mask)
    assert_close(wm.sum(1), torch.ones(2, 16), 1e-6)
    assert (wm[~mask] == 0).all()


def test_causal_weights_are_each_tokens_share_of_its_prefix():
    """w_0 = 1 (a lone token); w_i = g_i / G_i with G_i = G_{i-1} + g_i, so w_i prod_{j > i} (1 - w_j) = g_i / G_last
    are weights over the whole sequence: they sum to 1."""
    torch.manual_seed(0)
    layer = _layer(8, 2, 3, 0.05, True, 0).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    w = layer.gaussian_weights(x)
    assert_close(w[:, 0], torch.ones(2, 8), 1e-12)
    later = torch.flip(torch.cumprod(torch.flip(1 - w, [1]), 1), [1])  # prod_{j >= i} (1 - w_j)
    tail = torch.cat([later[:, 1:], torch.ones_like(later[:, :1])], 1)  # prod_{j > i}
    assert_close((w * tail).sum(1), torch.ones(2, 8), 1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_adding_a_constant_leaves_the_weights_unchanged(causal):
    layer = _layer(8, 2, 3, 0.05, causal, 1).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    shift = torch.randn(8, dtype=torch.float64) * 100
    assert_close(layer.gaussian_weights(x + shift), layer.gaussian_weights(x), 1e-9)
    assert_close(layer(x + shift), (x + shift) * layer.gaussian_weights(x), 1e-9)


def test_fp32_statistics_are_stable_far_from_zero():
    """x = 1e4 + N(0, 1): the prefix sums are shifted by the first token, so fp32 keeps the fp64 weights."""
    layer = _layer(8, 2, 2, 0.05, True, 2)
    x = 1e4 + torch.randn(2, 40, 8, dtype=torch.float64)
    w64 = layer.double().gaussian_weights(x)
    w32 = layer.float().gaussian_weights(x.float())
    assert_close(w32, w64, 1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_passes_through_and_is_ignored(causal):
    """Padded tokens come back unchanged, their values change nothing else, and a left-padded sequence's real tokens
    get the outputs of the unpadded sequence (non-causal: any padding)."""
    layer = _layer(6, 2, 2, 0.05, causal, 3).double()
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 6, dtype=torch.float64), x], 1)
    mask = torch.tensor([[False] * 3 + [True] * 7])
    out = layer(padded, key_padding_mask=mask)
    assert torch.equal(out[:, :3], padded[:, :3])
    assert_close(out[:, 3:], layer(x), 1e-12)
    other = padded.clone()
    other[:, :3] = 1e3
    assert_close(layer(other, key_padding_mask=mask)[:, 3:], out[:, 3:], 1e-12)
    middle = torch.cat([x[:, :4], padded[:, :2], x[:, 4:]], 1)
    mid_mask = torch.tensor([[True] * 4 + [False] * 2 + [True] * 3])
    got = layer(middle, key_padding_mask=mid_mask)
    assert_close(torch.cat([got[:, :4], got[:, 6:]], 1), layer(x), 1e-12)


def test_heads_are_channel_groups_with_their_own_parameters():
    """dim 7, 3 heads: channels [0, 2), [2, 4), [4, 7); each group equals a one-head layer with that head's row."""
    layer = _layer(7, 3, 2, 0.05, False, 4)
    x = torch.randn(2, 9, 7)
    out = layer(x)
    for h, (lo, hi) in enumerate([(0, 2), (2, 4), (4, 7)]):
        one = GAAMAttention(hi - lo, 1, n_gaussians=2, eps=0.05)
        with torch.no_grad():
            one.mean_offsets.copy_(layer.mean_offsets[h:h + 1])
            one.c.copy_(layer.c[h:h + 1])
        assert_close(out[..., lo:hi], one(x[..., lo:hi]), 1e-6)


def test_the_first_token_of_an_empty_prefix_and_tiny_eps_stay_finite():
    """eps = 1e-8 with non-zero offsets: a one-token prefix has variance eps, log-densities of order -1e7; the
    log-space normaliser keeps outputs and gradients finite (also with leading padding and a fully padded row)."""
    for causal in (False, True):
        torch.manual_seed(5)
        layer = GAAMAttention(8, 2, causal=causal)
        with torch.no_grad():
            layer.mean_offsets.normal_()
        x = torch.randn(3, 12, 8)
        check_forward_backward_finite(layer, x)
        mask = torch.ones(3, 12, dtype=torch.bool)
        mask[0, :5] = False
        mask[1] = False
        xg = x.clone().requires_grad_()
        out = layer(xg, key_padding_mask=mask)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(xg.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        assert torch.equal(out[1], x[1])


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("padded", [False, True])
def test_decoding_in_chunks_equals_the_causal_forward(padded):
    layer = _layer(10, 3, 3, 1e-3, True, 6)
    x = torch.randn(2, 23, 10)
    mask = None
    if padded:  # leading padding, holes, a chunk of padding only
        mask = torch.ones(2, 23, dtype=torch.bool)
        mask[0, :4] = False
        mask[1, 8:12] = False
        mask[:, 17] = False
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        lay, xx = layer.to(dtype), x.to(dtype)
        with torch.no_grad():
            full = lay(xx, key_padding_mask=mask)
            for sizes in ([1] * 23, [5, 1, 1, 9, 7], [4, 4, 15]):
                cache, outs, i = lay.new_cache(2), [], 0
                for s in sizes:
                    outs.append(lay(xx[:, i:i + s], cache=cache,
                                    key_padding_mask=None if mask is None else mask[:, i:i + s]))
                    i += s
                assert cache.length == 23
                torch.testing.assert_close(torch.cat(outs, 1), full, atol=atol, rtol=atol)
    layer.float()


def test_decoding_through_leading_padding_with_tiny_eps():
    """Chunks of padding only before the first real token leave the state empty: with eps = 1e-8 and non-zero
    offsets the first real token's log-density is about -1e7, and it still gets weight 1."""
    torch.manual_seed(10)
    layer = GAAMAttention(8, 2, causal=True).double()
    with torch.no_grad():
        layer.mean_offsets.normal_()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, :3] = False
    with torch.no_grad():
        full = layer(x, key_padding_mask=mask)
        cache = layer.new_cache(2)
        steps = torch.cat([layer(x[:, i:i + 1], cache=cache, key_padding_mask=mask[:, i:i + 1]) for i in range(9)],
                          1)
    assert_close(full[:, 3], x[:, 3], 1e-12)  # a lone real token: weight 1
    torch.testing.assert_close(steps, full, atol=1e-12, rtol=1e-12)


def test_the_cache_holds_o1_state():
    layer = GAAMAttention(12, 3, causal=True)
    cache = layer.new_cache(2)
    with torch.no_grad():
        layer(torch.randn(2, 50, 12), cache=cache)
        layer(torch.randn(2, 1, 12), cache=cache)
    assert isinstance(cache, GAAMCache) and cache.length == 51
    sizes = [t.shape for t in (cache.count, cache.shift, cache.s1, cache.s2, cache.log_norm)]
    assert sizes == [(2, 1)] + [(2, 12)] * 4
    assert layer.new_cache(1, dtype=torch.float64).s1.dtype == torch.float64


def test_causal_outputs_ignore_later_tokens():
    layer = _layer(6, 2, 2, 0.05, True, 7).double()
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    later = x.clone()
    later[:, 7:] = torch.randn(2, 5, 6, dtype=torch.float64) * 10
    assert torch.equal(layer(later)[:, :7], layer(x)[:, :7])


# ---------------------------------------------------------------- dtypes, hygiene


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_run_in_fp32(causal, dtype):
    layer = _layer(8, 2, 2, 0.05, causal, 8)
    x = torch.randn(2, 15, 8).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, layer(x.float()), 1e-2)
    cache = layer.new_cache(2) if causal else None
    if cache is not None:
        steps = torch.cat([layer(x[:, i:i + 1], cache=cache) for i in range(15)], 1)
        assert steps.dtype == dtype
        assert_close(steps, out, 1e-2)


def test_compile_matches_eager():
    check_compile_matches_eager(_layer(8, 2, 3, 0.05, True, 9), torch.randn(2, 11, 8))


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda: GAAMAttention(8, 2, n_gaussians=3), torch.randn(2, 9, 8))
    assert sorted(GAAMAttention(8, 2).state_dict()) == ["c", "mean_offsets"]


def test_official_defaults_and_registry_entry():
    torch.manual_seed(0)
    layer = GAAMAttention(16, 4)
    assert layer.n_gaussians == 5 and layer.eps == 1e-8 and not layer.causal
    assert layer.mean_offsets.shape == (4, 5) and not layer.mean_offsets.any() and (layer.c > 0).all()
    entry = {m.name: m for m in nearfar.mechanisms()}["gaam"]
    assert entry.family == "dense" and set(entry.patterns) == {"NS", "CS"} and entry.cls is GAAMAttention
    assert entry.build(16, 4, "CS").causal and not entry.build(16, 4, "NS").causal
    with pytest.raises(ValueError, match="does not support NC"):
        entry.build(16, 4, "NC")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dim=0, num_heads=1), ValueError, "dim must be a positive int"),
    (dict(dim=8.0, num_heads=1), TypeError, "dim must be a positive int"),
    (dict(dim=8, num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(dim=4, num_heads=5), ValueError, r"num_heads \(5\) must be at most dim \(4\)"),
    (dict(dim=8, num_heads=2, n_gaussians=0), ValueError, "n_gaussians must be a positive int"),
    (dict(dim=8, num_heads=2, eps=0.0), ValueError, "eps must be a positive finite number"),
    (dict(dim=8, num_heads=2, eps="1e-8"), TypeError, "eps must be a positive finite number"),
    (dict(dim=8, num_heads=2, causal=1), TypeError, "causal must be a bool"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GAAMAttention(**kwargs)


def test_bad_call_arguments():
    layer, causal = GAAMAttention(8, 2), GAAMAttention(8, 2, causal=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0]])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\)"):
        layer(torch.randn(2, 0, 8))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        layer(x, key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(2, 5\)"):
        layer(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="has no decoding cache"):
        layer.new_cache(2)
    with pytest.raises(ValueError, match="cache is for causal layers"):
        layer(x, cache=causal.new_cache(2))
    with pytest.raises(TypeError, match="cache must come from new_cache"):
        causal(x, cache=object())
    cache = causal.new_cache(2)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        causal(x, cache=cache, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    assert cache.length == 0 and not cache.count.any()  # refused before any work
