"""Block Transformer (itsnamgyu/block-transformer): properties (oracles), a per-block reference, training, caches,
errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from module_checks import assert_close, check_loss_halves

from nearfar.models.block_transformer import BlockTransformer

V, L = 11, 4


def _model(seed: int = 0, **kw) -> BlockTransformer:
    torch.manual_seed(seed)
    args = dict(vocab_size=V, block_len=L, dim_block=16, dim_token=8, depth_block=2, depth_token=2, num_heads=2,
                expansion_ratio=2)
    args.update(kw)
    return BlockTransformer(**args).double().eval()


def _tokens(b: int, blocks: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, blocks * L), generator=torch.Generator().manual_seed(seed))


def _reference_logits(m: BlockTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Written from the paper and the official code with loops: embed = concat of token rows; for each b the block
    decoder runs on blocks 0..b alone (no cache, no batching over b) and the token decoder on [prefix, emb(block b+1
    minus its last)]."""
    B, N = tokens.shape
    M, r = N // L, m.expansion_ratio
    out = torch.zeros(B, (M - 1) * L, V, dtype=torch.float64)
    for s in range(B):
        blocks = torch.stack([torch.cat([m.block_embed.weight[tokens[s, c * L + j]] for j in range(L)])
                              for c in range(M)])
        for b in range(M - 1):
            x = blocks[None, :b + 1]
            for blk in m.block_decoder:
                x = blk(x)
            h = m.block_norm(x)[0, -1]
            prefix = (m.expand.weight @ h + m.expand.bias).reshape(r, m.dim_token)
            y = torch.cat([prefix, m.token_embed.weight[tokens[s, (b + 1) * L:(b + 2) * L - 1]]])[None]
            for blk in m.token_decoder:
                y = blk(y)
            out[s, b * L:(b + 1) * L] = m.lm_head(m.token_norm(y))[0, r - 1:]
    return out


def test_teacher_forced_logits_match_per_block_reference():
    m, tokens = _model(), _tokens(2, 4)
    with torch.no_grad():
        assert_close(m.logits(tokens), _reference_logits(m, tokens), rtol=1e-10)


def test_teacher_forced_logits_equal_cached_generation_logits():
    m, prompt = _model(), _tokens(2, 2)
    out, info = m.generate(prompt, max_new_blocks=3, return_info=True)
    assert out.shape == (2, 5 * L) and torch.equal(out[:, :2 * L], prompt)
    with torch.no_grad():
        tf = m.logits(out)[:, L:]  # logits of blocks 2..4 (block 1 is a prompt block)
    assert_close(info["logits"], tf, rtol=1e-10, name="generation logits")
    assert torch.equal(info["logits"].argmax(-1), out[:, 2 * L:])  # greedy


@pytest.mark.parametrize("where", ["later_block", "later_position"])
def test_perturbing_later_tokens_leaves_earlier_logits_unchanged(where):
    m, tokens = _model(), _tokens(1, 5)
    b1, j = 2, 1  # block b+1 = 2; positions <= j of it must not move
    changed = tokens.clone()
    if where == "later_block":
        changed[:, (b1 + 1) * L:] = (changed[:, (b1 + 1) * L:] + 1) % V
    else:
        changed[:, b1 * L + j + 1:] = (changed[:, b1 * L + j + 1:] + 1) % V  # x_{b+1, j+1..} and later
    with torch.no_grad():
        a, c = m.logits(tokens), m.logits(changed)
    end = (b1 - 1) * L + j + 1  # logits of tokens < b1*L + j + 1 (logits row k predicts token L + k)
    assert_close(c[:, :end], a[:, :end], rtol=1e-12, name="earlier logits")
    assert not torch.allclose(c[:, end:], a[:, end:])  # the check can fail: later logits do move


def test_constant_context_makes_block_logits_independent_of_history():
    m = _model()
    h = torch.randn(1, m.dim_block, dtype=torch.float64).expand(2, -1)
    tok = _tokens(1, 1).expand(2, -1)
    with torch.no_grad():
        lg = m.decode_tokens(h, tok)
        other = m.decode_tokens(h + 0.1, tok)
    assert_close(lg[1], lg[0], rtol=1e-12)
    assert not torch.allclose(other, lg)


def test_cache_sizes():
    m, prompt = _model(), _tokens(2, 3)
    _, info = m.generate(prompt, max_new_blocks=4, return_info=True)
    assert info["token_cache_sizes"] == [m.expansion_ratio + L - 1] * 4
    assert info["block_cache_sizes"] == [3, 4, 5, 6]  # one key per block seen


def test_block_len_one_and_single_prefix_vector():
    m = _model(block_len=1, dim_block=8, expansion_ratio=1)
    tokens = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    out, info = m.generate(tokens[:, :2], 3, return_info=True)
    with torch.no_grad():
        assert_close(info["logits"], m.logits(out)[:, 1:], rtol=1e-10)
    assert info["token_cache_sizes"] == [1, 1, 1]


def test_loss_decreases_on_repeated_pattern():
    torch.manual_seed(0)
    m = BlockTransformer(V, block_len=L, dim_block=16, dim_token=16, depth_block=1, depth_token=1, num_heads=2)
    pattern = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 5])
    data = torch.stack([pattern.roll(s) for s in range(4)]).repeat(1, 2)  # (4, 24): 6 blocks
    check_loss_halves(m, data)


def test_loss_is_cross_entropy_of_logits():
    m, tokens = _model(), _tokens(2, 3)
    expected = F.cross_entropy(m.logits(tokens).reshape(-1, V), tokens[:, L:].reshape(-1))
    assert_close(m.loss(tokens), expected, rtol=1e-12)


def test_initialisation_of_expansion_layer():
    m = BlockTransformer(V, dim_block=256, dim_token=64)
    assert torch.equal(m.expand.bias, torch.zeros(2 * 64))
    assert abs(m.expand.weight.std().item() - 256 ** -0.5) < 0.1 * 256 ** -0.5
    assert m.block_embed.weight.shape == (V, 256 // 4) and m.expand.weight.shape == (2 * 64, 256)


def test_state_dict_round_trip():
    a, b = _model(seed=0), _model(seed=5)
    tokens = _tokens(2, 3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(a.logits(tokens), b.logits(tokens))
    assert torch.equal(a.generate(tokens, 2), b.generate(tokens, 2))


@pytest.mark.parametrize("kwargs, err", [
    (dict(vocab_size=0), ValueError), (dict(vocab_size=V, block_len=3, dim_block=16), ValueError),
    (dict(vocab_size=V, expansion_ratio=0), ValueError), (dict(vocab_size=V, block_len=2.0), TypeError),
    (dict(vocab_size=V, dim_token=10, num_heads=4), ValueError),
])
def test_bad_constructor_args(kwargs, err):
    with pytest.raises(err):
        BlockTransformer(**kwargs)


def test_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="multiple of block_len"):
        m.loss(torch.zeros(1, 2 * L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="at least"):
        m.loss(torch.zeros(1, L, dtype=torch.long))  # one block: nothing to predict
    with pytest.raises(ValueError, match="integer tensor"):
        m.logits(torch.zeros(2 * L))
    with pytest.raises(ValueError, match="token ids"):
        m.logits(torch.full((1, 2 * L), V))
    with pytest.raises(ValueError, match="multiple of block_len"):
        m.generate(torch.zeros(1, L + 1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_blocks"):
        m.generate(torch.zeros(1, L, dtype=torch.long), 0)
