"""``attend``'s arguments and state: a bias is never read as a relative-position table by its shape, overrides and
observers are per thread, and meta tensors get shapes instead of crashes."""

from __future__ import annotations

import threading

import pytest
import reference as ref
import torch

import nearfar
from nearfar import Blocks, Causal, Neighborhood, SlidingWindow
from nearfar.calls import _ENGINE_OVERRIDE, observe_calls

ENGINES = ["dense", "blocksparse", "auto"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("pattern", [Neighborhood(4), Blocks(4)])
def test_a_per_key_bias_with_a_table_shape_is_a_per_key_bias(engine, pattern):
    # N = 7 and a 4-wide window: the (1, 7) per-key bias has the shape of the (Hq=1, 2*4-1) table
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 7, 8) for _ in range(3))
    bias = torch.randn(1, 7)
    out = nearfar.attend(q, k, v, pattern, bias=bias, engine=engine)
    want = ref.dense_reference(q, k, v, pattern.mask(7, 7), 8 ** -0.5, bias)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_a_table_goes_in_rpb_and_a_table_in_bias_is_refused_with_a_hint():
    q, k, v = (torch.randn(1, 2, 36, 8) for _ in range(3))
    table = torch.randn(2, 5, 5)
    with pytest.raises(ValueError, match="rpb="):
        nearfar.attend(q, k, v, Blocks(3, grid=(6, 6)), bias=table)
    with pytest.raises(ValueError, match="not both"):
        nearfar.attend(q, k, v, Blocks(3, grid=(6, 6)), bias=torch.zeros(36), rpb=table)
    with pytest.raises(ValueError, match="needs a Neighborhood, Blocks or Grid"):
        nearfar.attend(q, k, v, Causal(), rpb=table)
    with pytest.raises(TypeError, match="rpb"):
        nearfar.attend(q, k, v, Blocks(3, grid=(6, 6)), rpb=table.tolist())


def test_engine_override_is_per_thread():
    """A thread inside ``engine_override("flex")`` once made another thread's auto call fail (flex refuses
    gradients on CPU), and leaving the block popped the other thread's entry."""
    q, k, v = (torch.randn(1, 1, 1100, 8, requires_grad=True) for _ in range(3))
    entered, leave, errors = threading.Event(), threading.Event(), []

    def hold_override():
        with nearfar.engine_override("flex"):
            entered.set()
            leave.wait(30)

    t = threading.Thread(target=hold_override)
    t.start()
    try:
        assert entered.wait(30)
        try:
            nearfar.attend(q, k, v, SlidingWindow(8)).sum().backward()  # auto: block-sparse, trains
        except Exception as err:  # noqa: BLE001
            errors.append(err)
        with nearfar.engine_override("dense"):
            leave.set()
            t.join(30)
            assert _ENGINE_OVERRIDE.get() == ("dense",)  # the other thread's exit did not pop ours
    finally:
        leave.set()
        t.join(30)
    assert not errors, errors


def test_observers_are_per_thread():
    q, k, v = (torch.randn(1, 1, 16, 8) for _ in range(3))
    with observe_calls() as mine:
        worker = threading.Thread(target=lambda: nearfar.attend(q, k, v, Causal()))
        worker.start()
        worker.join(30)
        nearfar.attend(q, k, v, SlidingWindow(2))
    assert [c[0] for c in mine] == [SlidingWindow(2)]


@pytest.mark.parametrize("engine", ENGINES + ["flex"])
@pytest.mark.parametrize("pattern", [None, Causal(), Neighborhood((3, 3), grid=(6, 8)), Blocks(4, grid=(6, 8))])
def test_meta_tensors_give_shapes(engine, pattern):
    q = torch.empty(2, 4, 48, 16, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 48, 16, device="meta", requires_grad=True)
    v = torch.empty(2, 2, 48, 24, device="meta", requires_grad=True)
    kpm = torch.ones(2, 48, dtype=torch.bool, device="meta")
    out, lse = nearfar.attend(q, k, v, pattern, key_padding_mask=kpm, engine=engine, return_lse=True)
    assert out.shape == (2, 4, 48, 24) and out.device.type == "meta" and lse.shape == (2, 4, 48)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def _layer_cases():
    from module_checks import SEQ_CASES

    vision = [(m, None) for m in nearfar.mechanisms(kind="layer") if "2d" in m.dims]
    return vision + list(SEQ_CASES)


@pytest.mark.parametrize("mech,pattern", _layer_cases(), ids=lambda c: getattr(c, "name", c))
def test_every_registered_layer_infers_shapes_on_meta(mech, pattern):
    """Shape inference through whole modules (as ``torch.device("meta")`` initialisation and tracing tools do):
    window modules once built their plan on the meta device and crashed in ``unique_consecutive``."""
    from module_checks import SMALL

    torch.manual_seed(0)
    if pattern is None:
        layer, x, kw = mech.make(32, 2), torch.randn(1, 14, 14, 32), {}
    else:
        layer, x = mech.build(32, 2, pattern, **SMALL.get(mech.name, {})), torch.randn(2, 24, 32)
        kw = {"context": torch.randn(2, 17, 32)} if pattern in ("NC", "CC") else {}
    with torch.no_grad():
        want = layer(x, **kw)
        got = layer.to("meta")(x.to("meta"), **{k: c.to("meta") for k, c in kw.items()})
    want, got = (y[0] if isinstance(y, tuple) else y for y in (want, got))
    assert got.device.type == "meta" and got.shape == want.shape
