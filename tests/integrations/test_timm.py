"""``nearfar.integrations.timm``: a timm ViT on nearfar's engines gives timm's own logits and gradients (fused and
by-hand paths, every ``Attention`` option), a pattern equals timm's attention with the same mask, ``nearfar.steer``
finds one site per block and its captures and edits equal the attention computed by hand in float64, and the
backbones of ``nearfar.models.vision`` are timm names."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from timm_required import import_timm
from torch import nn

timm = import_timm()

from timm.layers import Attention, set_fused_attn  # noqa: E402

import nearfar as nf  # noqa: E402
import nearfar.integrations.timm as nft  # noqa: E402
from nearfar.integrations.timm import use_nearfar  # noqa: E402
from nearfar.models.vision import backbones  # noqa: E402
from nearfar.steer import Capture, KeyMask, control, find_sites  # noqa: E402

TOL = 1e-5


def tiny_vit(seed: int = 0, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def images(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_docstring_examples_run():
    result = doctest.testmod(nft, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "qkv_bias": False}, {"class_token": False,
                                                                           "global_pool": "avg"}])
def test_vit_logits_and_grads_equal_timm(fused, kw):
    set_fused_attn(fused)
    try:
        ref = tiny_vit(**kw)
        ours = use_nearfar(copy.deepcopy(ref))
        assert all(type(m).__name__ == "NearfarAttention" for m in ours.modules() if isinstance(m, Attention))
        x = images()
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ref(xr), ours(xo)
        assert (a - b).abs().max().item() <= TOL
        a.square().sum().backward()
        b.square().sum().backward()
        assert (xr.grad - xo.grad).abs().max().item() <= 1e-4
        for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
            assert (p.grad - q.grad).abs().max().item() <= 1e-4 * max(1.0, p.grad.abs().max().item()), name
        assert ours.state_dict().keys() == ref.state_dict().keys()
    finally:
        set_fused_attn(True)


@pytest.mark.parametrize("options", [dict(qk_norm=True, norm_layer=nn.LayerNorm),
                                     dict(scale_norm=True, norm_layer=nn.LayerNorm, proj_bias=False),
                                     dict(gated=True, qkv_bias=True)])
def test_attention_options_masks_and_causal(options):
    torch.manual_seed(0)
    ref = Attention(32, num_heads=4, **options).eval()
    ours = use_nearfar(copy.deepcopy(ref))
    x = torch.randn(2, 9, 32)
    keep = torch.rand(2, 1, 9, 9) > 0.3
    keep[..., 0] = True  # no query without keys: SDPA's NaN is not timm's answer either
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL
        assert (ours(x, attn_mask=keep) - ref(x, attn_mask=keep)).abs().max().item() <= TOL
        bias = torch.randn(2, 4, 9, 9)
        assert (ours(x, attn_mask=bias) - ref(x, attn_mask=bias)).abs().max().item() <= TOL
        assert (ours(x, is_causal=True) - ref(x, is_causal=True)).abs().max().item() <= TOL


def test_pattern_equals_timm_with_that_mask():
    ref = tiny_vit()
    n = 1 + 16  # CLS + a 4x4 patch grid
    pattern = nf.GlobalTokens(1) | nf.SlidingWindow(left=3, right=3)
    ours = use_nearfar(copy.deepcopy(ref), pattern=pattern)
    mask = pattern.mask(n, n)
    assert not mask.all()
    blocks = [blk.attn for blk in ref.blocks]
    calls = []
    for attn in blocks:  # timm's own attention, given the pattern as its mask
        attn.forward = (lambda f: lambda x, attn_mask=None, is_causal=False: f(x, attn_mask=mask))(attn.forward)
        calls.append(attn)
    x = images()
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= TOL
    built = use_nearfar(copy.deepcopy(tiny_vit()), pattern=lambda count: pattern)
    with torch.no_grad():
        assert (built(x) - ours(x)).abs().max().item() <= TOL


def attention_by_hand(attn: nn.Module, x: torch.Tensor, drop_keys: list[int] | None = None) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Probabilities and output of one timm ``Attention`` in float64, keys ``drop_keys`` masked out of ``P``."""
    b, n, c = x.shape
    qkv = nn.functional.linear(x.double(), attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) * attn.scale
    if drop_keys:
        s[..., drop_keys] = float("-inf")
    p = s.softmax(-1)
    out = (p @ v).transpose(1, 2).reshape(b, n, c)
    return p, nn.functional.linear(out, attn.proj.weight.double(), attn.proj.bias.double())


def test_steer_sites_capture_and_key_mask():
    vit = use_nearfar(tiny_vit())
    sites = find_sites(vit)
    assert [(s.name, s.kind, s.num_heads) for s in sites] == [("blocks.0.attn", "self", 4), ("blocks.1.attn",
                                                                                                "self", 4)]
    inputs: dict[str, torch.Tensor] = {}
    hook = sites[1].module.register_forward_pre_hook(lambda m, a: inputs.__setitem__("x", a[0]))
    x = images()
    with torch.no_grad(), control(vit, [(sites[1], Capture("probs", rows=[0, 5]))]) as run:
        vit(x)
    p_ref, _ = attention_by_hand(sites[1].module, inputs["x"])
    got = run.records[sites[1].name][0]["probs"]
    assert got.shape == (3, 4, 2, 17)
    assert (got.double() - p_ref[:, :, [0, 5]]).abs().max().item() <= TOL
    # KeyMask on the CLS key: the block's output equals the attention with that key removed from P, by hand
    outs: dict[str, torch.Tensor] = {}
    hook2 = sites[1].module.register_forward_hook(lambda m, a, o: outs.__setitem__("y", o))
    with torch.no_grad(), control(vit, [(sites[1], KeyMask([0]))]):
        vit(x)
    hook.remove()
    hook2.remove()
    _, y_ref = attention_by_hand(sites[1].module, inputs["x"], drop_keys=[0])
    assert (outs["y"].double() - y_ref).abs().max().item() <= TOL


def test_clear_errors():
    with pytest.raises(TypeError, match="model must be"):
        use_nearfar("vit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pattern must be"):
        use_nearfar(tiny_vit(), pattern=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="engine must be"):
        use_nearfar(tiny_vit(), engine=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no timm.layers.Attention"):
        use_nearfar(nn.Linear(2, 2))
    train = use_nearfar(tiny_vit(attn_drop_rate=0.1)).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        train(images())
    bad = use_nearfar(tiny_vit(), pattern=lambda n: "window")
    with pytest.raises(TypeError, match="must return a nearfar Pattern"):
        bad(images())


def test_backbones_are_timm_names():
    names = nft.register_models()
    assert names == sorted(backbones())
    assert set(timm.list_models("nearfar_*")) == set(names)
    for name in names:
        with pytest.raises(ValueError, match="ships no weights"):
            timm.create_model(name, pretrained=True)
