"""Every decoding cache is made for one batch (``new_cache(batch)``), device and dtype, and every call with it
checks them before any work: a mismatch is a ``ValueError`` naming what was expected, not a raw broadcasting error
some calls later. Runs over every registered mechanism with ``new_cache``, so new ones are covered."""

from __future__ import annotations

import pytest
import torch
from module_checks import SMALL

import nearfar
from nearfar.layers.cca import CCAAttention
from nearfar.layers.kv_cache import DecodeState, KVCache
from nearfar.models.tiny_lm import TinyLM

CASES = [(m, p) for m in nearfar.mechanisms() if hasattr(m.cls, "new_cache") for p in ("CS", "CC")
         if p in m.patterns]
IDS = [f"{m.name}-{p}" for m, p in CASES]
N, PREFILL = 12, 5


class Case:
    """A built layer (or model) for one CAB pattern and its inputs: float ``(B, N, 32)`` rows, or token ids for a
    model; a cross layer gets a fixed context per batch size."""

    def __init__(self, mech, pattern: str):
        torch.manual_seed(0)
        self.model = mech.kind == "model"
        self.module = mech.build(32, 2, pattern, **SMALL.get(mech.name, {})).eval()
        self.cross = pattern == "CC"
        self.contexts: dict[int, torch.Tensor] = {}

    def inputs(self, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        if self.model:
            return torch.randint(0, 256, (batch, N), generator=g)
        return torch.randn(batch, N, 32, generator=g).to(dtype)

    def __call__(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if self.model:
            return self.module(x, cache)
        if not self.cross:
            return self.module(x, cache=cache)
        ctx = self.contexts.setdefault(x.shape[0], torch.randn(x.shape[0], 5, 32))
        return self.module(x, context=ctx.to(x.device, x.dtype), cache=cache)


@pytest.mark.parametrize("mech,pattern", CASES, ids=IDS)
def test_a_call_with_another_batch_is_refused_before_any_work(mech, pattern):
    case = Case(mech, pattern)
    name = "tokens" if case.model else "x"
    msg = rf"cache was made for batch 2 \(new_cache\(2\)\), got {name} with batch 3"
    x2, x3 = case.inputs(2), case.inputs(3)
    with torch.no_grad():
        full = case(x2)
        cache = case.module.new_cache(2)
        with pytest.raises(ValueError, match=msg):  # the first call
            case(x3[:, :PREFILL], cache)
        assert cache.length == 0
        outs = [case(x2[:, :PREFILL], cache)]
        with pytest.raises(ValueError, match=msg):  # after a prefill, one token
            case(x3[:, PREFILL:PREFILL + 1], cache)
        assert cache.length == PREFILL
        outs += [case(x2[:, t:t + 1], cache) for t in range(PREFILL, N)]  # the refused calls changed nothing
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


LAYER_CASES = [(m, p) for m, p in CASES if m.kind == "layer"]  # a model takes token ids: no float dtype to check


@pytest.mark.parametrize("mech,pattern", LAYER_CASES, ids=[f"{m.name}-{p}" for m, p in LAYER_CASES])
def test_a_call_with_another_dtype_is_refused(mech, pattern):
    case = Case(mech, pattern)
    x = case.inputs(2)
    with torch.no_grad():
        given = case.module.new_cache(2, dtype=torch.float32)
        with pytest.raises(ValueError, match=r"cache holds dtype torch.float32 .*got x with dtype torch.float64"):
            case(x.double()[:, :PREFILL], given)
        assert given.length == 0
        fixed = case.module.new_cache(2)  # no dtype given: the first call fixes it
        case(x[:, :PREFILL], fixed)
        with pytest.raises(ValueError, match=r"cache holds dtype torch.float32 .*got x with dtype torch.float64"):
            case(x.double()[:, PREFILL:PREFILL + 1], fixed)
        assert fixed.length == PREFILL


@pytest.mark.parametrize("mech,pattern", CASES, ids=IDS)
def test_a_call_on_another_device_is_refused(mech, pattern):
    """A cache on the ``meta`` device (given to ``new_cache``, or the model's) refuses CPU inputs, and a cache whose
    first call was on the CPU refuses ``meta`` inputs; both before any computation."""
    case = Case(mech, pattern)
    name = "tokens" if case.model else "x"
    x = case.inputs(2)
    with torch.no_grad():
        if case.model:  # a model's cache lives where the model does
            cache = Case(mech, pattern).module.to("meta").new_cache(2)
        else:
            cache = case.module.new_cache(2, device="meta")
        with pytest.raises(ValueError, match=rf"cache is on device meta .*got {name} on device cpu"):
            case(x[:, :PREFILL], cache)
        cache = case.module.new_cache(2)
        case(x[:, :PREFILL], cache)
        with pytest.raises(ValueError, match=rf"cache is on device cpu .*got {name} on device meta"):
            case(x[:, PREFILL:PREFILL + 1].to("meta"), cache)
        assert cache.length == PREFILL


@pytest.mark.parametrize("mech,pattern", CASES, ids=IDS)
@pytest.mark.parametrize("batch", [0, -2, 2.0, "2", True, None])
def test_new_cache_checks_batch(mech, pattern, batch):
    with pytest.raises((TypeError, ValueError), match="batch must be a positive int"):
        Case(mech, pattern).module.new_cache(batch)


@pytest.mark.parametrize("mech,pattern", LAYER_CASES, ids=[f"{m.name}-{p}" for m, p in LAYER_CASES])
def test_new_cache_checks_device_and_dtype(mech, pattern):
    layer = Case(mech, pattern).module
    with pytest.raises(ValueError, match="dtype must be a torch.dtype"):
        layer.new_cache(2, dtype="float32")
    with pytest.raises(ValueError, match="device must be a torch.device"):
        layer.new_cache(2, device="nowhere")


def test_a_cache_of_another_kind_is_a_type_error():
    with pytest.raises(TypeError, match="cache must come from new_cache \\(a CCACache\\), got KVCache"):
        CCAAttention(16, 2)(torch.randn(1, 3, 16), cache=KVCache(1))


def test_the_shared_check_directly():
    state = DecodeState(2, device="cpu", dtype=torch.float32)
    assert DecodeState.checked(None, torch.zeros(3)) is None
    assert DecodeState.checked(state, torch.zeros(2, 4)) is state
    with pytest.raises(ValueError, match="got x on device meta"):
        DecodeState.checked(state, torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="got y with dtype torch.float16"):
        DecodeState.checked(state, torch.zeros(2, 4, dtype=torch.float16), name="y")
    ids = DecodeState(2)
    DecodeState.checked(ids, torch.zeros(2, 4, dtype=torch.long), dtype=False)
    assert ids.dtype is None and ids.device == torch.device("cpu")
    # a device type without an index accepts any index of that type, then keeps the first call's
    from nearfar.layers.kv_cache import _same_device
    assert _same_device(torch.device("cuda"), torch.device("cuda:1"))
    assert not _same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not _same_device(torch.device("cuda"), torch.device("cpu"))


def test_tinylm_caches_check_the_batch():
    lm = TinyLM(64, dim=32, depth=2, num_heads=2, mechanism="streaming_llm", window=4, sinks=1).eval()
    caches = lm.new_caches(2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"made for batch 2 \(new_cache\(2\)\), got x with batch 3"):
        lm(torch.zeros(3, 4, dtype=torch.long), caches)
    assert lm.generate(torch.zeros(3, 4, dtype=torch.long), 3).shape == (3, 7)
