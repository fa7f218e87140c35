"""Routing Transformer (Roy et al., TACL 2021, arXiv 2003.05997; google-research ``routing_transformer/utils.py``,
lucidrains ``routing_transformer.py``): a float64 reference with explicit membership masks (per-token clusters, or
each balanced window's members) and a dense masked softmax, against the layer forward and backward; the oracles
(one cluster is dense attention, the EMA step and the commitment loss by hand), decoding against the eval forward,
causality, the block-sparse engine, compile, state_dict and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from module_checks import (
    assert_close,
    check_compile_matches_eager,
    check_outputs_and_grads,
    check_state_dict_round_trip,
)
from reference import dense_reference

import nearfar
from nearfar import RoutingTransformerAttention
from nearfar.functional import engine_override, kmeans_route, observe_calls, split_heads
from nearfar.layers.routing_transformer import RoutingCache

# ---------------------------------------------------------------- float64 reference


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / LLaMA layout), base 10000, in float64."""
    d = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def _mask(n: int, rule) -> torch.Tensor:
    return torch.tensor([[bool(rule(i, j)) for j in range(n)] for i in range(n)])


def reference(layer: RoutingTransformerAttention, x: torch.Tensor, clusters: torch.Tensor | None = None,
              windows: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output in float64 from its parameters (differentiable casts of the leaves). Local heads: RoPE and
    a sliding-window mask. Routing heads (q = k = the shared projection): with ``clusters (B, H_r, N)``, query i may
    attend key j iff both have the same cluster (and j <= i when causal); with ``windows (B, H_r, C, w)`` (token
    indices), each window is a softmax over its members (causal on positions) and a token's output is the mean over
    the windows holding it, 0 if none."""
    p = {name: t.double() for name, t in layer.named_parameters()}
    x = x.double()
    b, n, _ = x.shape
    h, hl, d = layer.num_heads, layer.local_heads, layer.head_dim
    causal, scale = layer.causal, 1 / math.sqrt(d)

    def proj(name: str, heads: int) -> torch.Tensor:
        y = x @ p[f"{name}.weight"].T
        if f"{name}.bias" in p:
            y = y + p[f"{name}.bias"]
        return y.reshape(b, n, heads, d).transpose(1, 2)

    q, v = proj("q_proj", h), proj("v_proj", h)
    outs = []
    if hl:
        ql, kl = q[:, :hl], proj("k_proj", hl)
        if layer.rope is not None:
            pos = torch.arange(n)
            ql, kl = _rope(ql, pos), _rope(kl, pos)
        w = layer.local_window
        rule = (lambda i, j: j <= i and i - j < w) if causal else (lambda i, j: abs(i - j) <= w // 2)
        outs.append(dense_reference(ql, kl, v[:, :hl], _mask(n, rule), scale))
    r, vr = q[:, hl:], v[:, hl:]
    if windows is None:
        assert clusters is not None
        allowed = clusters[..., :, None] == clusters[..., None, :]
        if causal:
            allowed = allowed & _mask(n, lambda i, j: j <= i)
        outs.append(dense_reference(r, r, vr, allowed, scale))
    else:
        rows = []
        for bi in range(b):
            heads = []
            for hi in range(layer.routing_heads):
                total, count = torch.zeros(n, d, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
                for members in windows[bi, hi].tolist():
                    inside = set(members)
                    allowed = _mask(n, lambda i, j, m=inside: i in m and j in m and (j <= i or not causal))
                    o = dense_reference(r[bi, hi][None, None], r[bi, hi][None, None], vr[bi, hi][None, None],
                                        allowed, scale)[0, 0]
                    member = torch.tensor([[float(i in inside)] for i in range(n)], dtype=torch.float64)
                    total, count = total + o * member, count + member
                heads.append(total / count.clamp(min=1))
            rows.append(torch.stack(heads))
        outs.append(torch.stack(rows))
    out = torch.cat(outs, 1).transpose(1, 2).reshape(b, n, h * d)
    return out @ p["o_proj.weight"].T


def _features(layer: RoutingTransformerAttention, x: torch.Tensor) -> torch.Tensor:
    return split_heads(layer.q_proj(x), layer.num_heads)[:, layer.local_heads:]


def _input(b: int, n: int, dim: int, layout: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        return torch.randn(b, dim, n, generator=g).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(b, 2 * n, dim + 3, generator=g)[:, ::2, 1:dim + 1]
    return torch.randn(b, n, dim, generator=g)


def _window(layer: RoutingTransformerAttention, n: int) -> int:
    return min(n, layer.window if layer.window is not None else -(-n // layer.num_clusters))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 19), heads=st.sampled_from([(2, 1), (3, 1), (2, 0), (3, 2)]), clusters=st.integers(1, 4),
       window=st.sampled_from([None, 1, 3, 6]), block=st.integers(1, 4), local_window=st.integers(1, 6),
       causal=st.booleans(), training=st.booleans(), balanced=st.sampled_from([None, True, False]),
       rope=st.booleans(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       seed=st.integers(0, 2 ** 16))
def test_matches_the_float64_reference_forward_and_backward(n, heads, clusters, window, block, local_window, causal,
                                                             training, balanced, rope, layout, seed):
    h, hl = heads
    torch.manual_seed(seed)
    layer = RoutingTransformerAttention(4 * h, h, local_heads=hl, num_clusters=clusters, window=window,
                                        local_window=local_window, causal=causal, balanced=balanced,
                                        block_size=block, rope=rope, qkv_bias=seed % 2 == 0).train(training)
    x = _input(2, n, 4 * h, layout, seed).requires_grad_()
    with torch.no_grad():
        if training and layer.balanced:
            route = dict(windows=kmeans_route(_features(layer, x), layer.centroids, _window(layer, n)))
        else:
            route = dict(clusters=layer.clusters(x))
    out = layer(x)
    expected = reference(layer, x, **route)
    check_outputs_and_grads(out, expected, [x, *layer.parameters()])


def test_the_block_sparse_engine_matches_the_reference():
    """Larger clusters over many blocks, forced onto the block-sparse engine (the tests above are small enough for
    the dense engine); the per-token layout and the balanced windows, causal and not."""
    for causal, training in ((True, False), (False, False), (True, True), (False, True)):
        torch.manual_seed(3)
        layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=9, causal=causal, block_size=8,
                                            balanced=training).train(training)
        x = torch.randn(2, 150, 16, requires_grad=True)
        with torch.no_grad():
            route = (dict(windows=kmeans_route(_features(layer, x), layer.centroids, 50)) if training
                     else dict(clusters=layer.clusters(x)))
        with engine_override("blocksparse"):
            out = layer(x)
        check_outputs_and_grads(out, reference(layer, x, **route), [x, *layer.parameters()])


def test_the_routing_heads_run_as_window_batches_or_a_block_layout():
    """What reaches attend: the local heads' sliding window; for the routing heads (B=1, 2 heads, 4 clusters,
    N=200, d=4) a batch of 1 * 2 * 4 balanced windows of 50 tokens (training), or per head one cluster-sorted
    layout of ceil((200 + 4 * 15) / 16) = 17 blocks of 16 slots read through selected blocks (eval)."""
    layer = RoutingTransformerAttention(16, 4, num_clusters=4, local_window=8, block_size=16)
    x = torch.randn(1, 200, 16)
    for training, routed in ((True, (8, 1, 50, 4)), (False, (2, 1, 272, 4))):
        with observe_calls() as calls:
            layer.train(training)(x)
        assert [(type(c[0]).__name__, c[1]) for c in calls] == [("SlidingWindow", (1, 2, 200, 4)),
                                                                ("NoneType", routed)]


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_one_cluster_of_routing_heads_is_dense_attention(causal, training):
    """num_clusters = 1, no local heads: every token is in the one cluster (balanced: the one window takes all N
    tokens), so the routing heads are dense (causal) attention with q = k."""
    torch.manual_seed(4)
    layer = RoutingTransformerAttention(12, 3, local_heads=0, num_clusters=1, causal=causal, balanced=training,
                                        block_size=4).double().train(training)
    x = torch.randn(2, 13, 12, dtype=torch.float64)
    r = split_heads(layer.q_proj(x), 3)
    v = split_heads(layer.v_proj(x), 3)
    dense = F.scaled_dot_product_attention(r, r, v, is_causal=causal)
    expected = layer.o_proj(dense.transpose(1, 2).reshape(2, 13, 12))
    assert_close(layer(x), expected, 1e-12)


def test_the_ema_step_applied_by_the_backward_pass_matches_a_hand_computation():
    torch.manual_seed(5)
    layer = RoutingTransformerAttention(12, 3, local_heads=1, num_clusters=3, local_window=4, ema_decay=0.9,
                                        balanced=True).double()
    x = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)
    before = layer.centroids.clone()
    feats = F.normalize(_features(layer, x).detach(), dim=-1)  # (B, 2, N, d)
    expected = before.clone()
    for hi in range(2):
        sums, counts = torch.zeros(3, 4, dtype=torch.float64), [0, 0, 0]
        for bi in range(2):
            for t in range(11):
                sims = [float(feats[bi, hi, t] @ before[hi, c]) for c in range(3)]
                c = sims.index(max(sims))
                sums[c] += feats[bi, hi, t]
                counts[c] += 1
        for c in range(3):
            new = sums[c] / sums[c].norm() if counts[c] else before[hi, c]
            expected[hi, c] = 0.9 * before[hi, c] + 0.1 * new
    out = layer(x)
    assert torch.equal(layer.centroids, before)  # the forward alone changes nothing
    (out.sum() + layer.aux_loss).backward()
    assert_close(layer.centroids, expected, 1e-12)
    assert not torch.equal(layer.centroids, before)


def test_the_centroids_move_only_after_a_training_backward():
    torch.manual_seed(6)
    layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4, causal=True)
    x = torch.randn(2, 9, 16)
    before = layer.centroids.clone()
    layer.eval()(x.requires_grad_()).sum().backward()  # eval: no update
    layer.train()
    with torch.no_grad():
        layer(x)  # no gradient: no update
        layer(x, cache=layer.new_cache(2))  # decoding: no update
    layer(x)  # never back-propagated
    assert torch.equal(layer.centroids, before)
    layer(x).sum().backward()
    assert not torch.equal(layer.centroids, before)


def test_commitment_loss_is_the_weighted_squared_distance_to_the_nearest_centroid():
    torch.manual_seed(7)
    layer = RoutingTransformerAttention(12, 3, local_heads=1, num_clusters=4, commitment=0.25).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    layer(x)
    feats = F.normalize(_features(layer, x), dim=-1)
    mu = layer.centroids
    terms = []
    for bi in range(2):
        for hi in range(2):
            for t in range(7):
                sims = [float(feats[bi, hi, t].detach() @ mu[hi, c]) for c in range(4)]
                terms.append(((feats[bi, hi, t] - mu[hi, sims.index(max(sims))]) ** 2).sum())
    expected = 0.25 * torch.stack(terms).sum() / (2 * 2 * 7 * 4)
    assert_close(layer.aux_loss, expected, 1e-12)
    g, = torch.autograd.grad(layer.aux_loss, x)
    g_ref, = torch.autograd.grad(expected, x)  # the centroids are constants in both
    assert_close(g, g_ref, 1e-12)
    assert layer.aux_loss.requires_grad and not mu.requires_grad


def test_clusters_are_each_tokens_nearest_centroid():
    torch.manual_seed(8)
    layer = RoutingTransformerAttention(16, 4, num_clusters=5).double()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    got = layer.clusters(x)
    feats = _features(layer, x)
    for bi in range(3):
        for hi in range(2):
            for t in range(10):
                f = feats[bi, hi, t] / feats[bi, hi, t].norm()
                sims = [float(f @ layer.centroids[hi, c]) for c in range(5)]
                assert got[bi, hi, t] == sims.index(max(sims))


def test_balanced_training_reads_later_tokens_so_causal_layers_default_to_per_token_clusters():
    """One centroid e_0, windows of 1 token: the window holds the most e_0-like token. A later token more like e_0
    takes the window from token 0, whose routing output drops to 0: balanced windows are not causal in membership
    (the pairs are: see the reference). The default causal layer (per-token clusters) ignores later tokens."""
    def layer_of(balanced):
        layer = RoutingTransformerAttention(4, 1, local_heads=0, num_clusters=1, window=1, causal=True,
                                            balanced=balanced).double()
        with torch.no_grad():
            for lin in (layer.q_proj, layer.v_proj, layer.o_proj):
                lin.weight.copy_(torch.eye(4))
            layer.centroids.copy_(torch.tensor([[[1.0, 0, 0, 0]]]))
        return layer

    x = torch.tensor([[[1.0, 0.2, 0, 0], [0.1, 1, 0, 0], [0.3, 0.5, 1, 0]]], dtype=torch.float64)
    later = x.clone()
    later[0, 2] = torch.tensor([1.0, 0, 0, 0])
    leaky = layer_of(True)
    assert torch.equal(leaky(x)[0, 0], x[0, 0]) and not leaky(later)[0, 0].any()
    assert not layer_of(None).balanced
    for layer in (layer_of(None), layer_of(True).eval()):
        assert torch.equal(layer(later)[:, :2], layer(x)[:, :2])


@pytest.mark.parametrize("balanced", [None, True])
def test_causal_outputs_ignore_later_tokens(balanced):
    torch.manual_seed(9)
    layer = RoutingTransformerAttention(16, 4, num_clusters=3, local_window=5, causal=True, balanced=balanced,
                                        block_size=4).double()
    x = torch.randn(2, 17, 16, dtype=torch.float64)
    later = x.clone()
    later[:, 9:] += 5 * torch.randn(2, 8, 16, dtype=torch.float64)
    modes = [False] if balanced else [False, True]  # balanced windows leak in training (test above)
    for training in modes:
        layer.train(training)
        with torch.no_grad():
            assert torch.equal(layer(later)[:, :9], layer(x)[:, :9])


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("local_heads", [0, 2])
def test_decoding_in_chunks_equals_the_eval_forward(local_heads):
    torch.manual_seed(10)
    layer = RoutingTransformerAttention(24, 3, local_heads=local_heads, num_clusters=4, local_window=5, causal=True,
                                        balanced=True, block_size=4).eval()
    x = torch.randn(2, 23, 24)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        lay, xx = layer.to(dtype), x.to(dtype)
        with torch.no_grad():
            full = lay(xx)
            for sizes in ([1] * 23, [5, 1, 1, 9, 7], [23], [4, 4, 15]):
                cache, outs, i = lay.new_cache(2), [], 0
                for s in sizes:
                    outs.append(lay(xx[:, i:i + s], cache=cache))
                    i += s
                assert cache.length == 23 and cache.clusters is not None
                assert torch.equal(cache.clusters, lay.clusters(xx))
                torch.testing.assert_close(torch.cat(outs, 1), full, atol=atol, rtol=atol)
    layer.float()


def test_decoding_equals_the_per_token_training_forward():
    """A causal layer trains on per-token clusters by default: its training forward (frozen centroids: no backward)
    is what decoding gives too."""
    torch.manual_seed(11)
    layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4, causal=True, block_size=2).double()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2)
        steps = torch.cat([layer(x[:, :6], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(6, 15)],
                          1)
    assert layer.training
    torch.testing.assert_close(steps, full, atol=1e-12, rtol=1e-12)


def test_the_cache_keeps_a_local_window_and_every_routing_key():
    layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4, causal=True).eval()
    cache = layer.new_cache(2)
    with torch.no_grad():
        layer(torch.randn(2, 30, 16), cache=cache)
        layer(torch.randn(2, 1, 16), cache=cache)
    assert isinstance(cache, RoutingCache) and cache.length == 31
    assert cache.local.size == 3 and cache.routed.size == 31 and cache.clusters.shape == (2, 1, 31)
    assert cache.nbytes() > 0


# ---------------------------------------------------------------- dtypes, hygiene


def test_bf16_autocast_trains_with_float32_centroids():
    torch.manual_seed(12)
    layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4)
    x = torch.randn(2, 12, 16, requires_grad=True)
    before = layer.centroids.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        loss = out.float().square().mean() + layer.aux_loss.float()
    loss.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert layer.centroids.dtype == torch.float32 and not torch.equal(layer.centroids, before)


def test_compile_matches_eager():
    torch.manual_seed(13)
    layer = RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4, causal=True, block_size=4)
    check_compile_matches_eager(layer, torch.randn(2, 11, 16))


def test_state_dict_round_trip():
    check_state_dict_round_trip(lambda: RoutingTransformerAttention(16, 2, num_clusters=3, local_window=4),
                                torch.randn(2, 9, 16))
    assert sorted(RoutingTransformerAttention(16, 2).state_dict()) == [
        "centroids", "k_proj.weight", "o_proj.weight", "q_proj.weight", "v_proj.weight"]
    assert "k_proj.weight" not in RoutingTransformerAttention(16, 2, local_heads=0).state_dict()


def test_defaults_and_registry_entry():
    layer = RoutingTransformerAttention(64, 8)
    assert (layer.local_heads, layer.routing_heads, layer.num_clusters, layer.window) == (4, 4, 16, None)
    assert (layer.local_window, layer.ema_decay, layer.commitment, layer.causal, layer.balanced) == (
        256, 0.999, 1e-4, False, True)
    assert layer.centroids.shape == (4, 16, 8)
    assert_close(layer.centroids.norm(dim=-1), torch.ones(4, 16), 1e-6)
    entry = {m.name: m for m in nearfar.mechanisms()}["routing_transformer"]
    assert entry.family == "routed" and set(entry.patterns) == {"NS", "CS"} and entry.cls is RoutingTransformerAttention
    cs = entry.build(32, 2, "CS")
    assert cs.causal and not cs.balanced and not entry.build(32, 2, "NS").causal
    with pytest.raises(ValueError, match="does not support NC"):
        entry.build(32, 2, "NC")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dim=10, num_heads=3), ValueError, r"dim \(10\) must be a positive multiple of num_heads \(3\)"),
    (dict(dim=8, num_heads=2, local_heads=2), ValueError, r"local_heads must be in \[0, 1\]"),
    (dict(dim=8, num_heads=2, local_heads=1.0), TypeError, r"local_heads must be an int in \[0, 1\]"),
    (dict(dim=8, num_heads=2, num_clusters=0), ValueError, "num_clusters must be a positive int"),
    (dict(dim=8, num_heads=2, window=0), ValueError, "window must be a positive int"),
    (dict(dim=8, num_heads=2, local_window=0), ValueError, "local_window must be a positive int"),
    (dict(dim=8, num_heads=2, causal=1), TypeError, "causal must be a bool"),
    (dict(dim=8, num_heads=2, balanced="yes"), TypeError, "balanced must be a bool"),
    (dict(dim=8, num_heads=2, ema_decay=1.5), ValueError, r"ema_decay must be a number in \[0.0, 1.0\]"),
    (dict(dim=8, num_heads=2, commitment=-1.0), ValueError, r"commitment must be a number in \[0.0, inf\)"),
    (dict(dim=8, num_heads=2, block_size=0), ValueError, "block_size must be a positive int"),
    (dict(dim=8, num_heads=2, rope=None), TypeError, "rope must be a bool"),
    (dict(dim=6, num_heads=2), ValueError, "rope on the local heads needs an even head dim"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RoutingTransformerAttention(**kwargs)


def test_bad_call_arguments():
    layer, causal = RoutingTransformerAttention(8, 2), RoutingTransformerAttention(8, 2, causal=True)
    assert RoutingTransformerAttention(6, 2, rope=False).local_heads == 1  # an odd head dim without RoPE
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0]])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"x must be \(B, N, 8\)"):
        layer(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="has no decoding cache"):
        layer.new_cache(2)
    with pytest.raises(ValueError, match="cache is for causal layers"):
        layer(torch.randn(2, 5, 8), cache=causal.new_cache(2))
    with pytest.raises(TypeError, match="cache must come from new_cache"):
        causal(torch.randn(2, 5, 8), cache=object())
    cache = causal.new_cache(2)
    with pytest.raises(ValueError, match=r"cache was made for batch 2"):
        causal(torch.randn(3, 5, 8), cache=cache)
    assert cache.length == 0 and cache.clusters is None  # refused before any work
