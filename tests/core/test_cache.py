"""nearfar's caches stay within their byte budget however many shapes a process sees (``nearfar.cache``)."""

from __future__ import annotations

import pytest
import torch

import nearfar
from nearfar import cache as nf_cache
from nearfar.cache import ByteLRU


@pytest.fixture
def small_budget():
    old = nf_cache.cache_budget()
    nf_cache.clear_caches()
    nf_cache.set_cache_budget(2 << 20)
    yield 2 << 20
    nf_cache.set_cache_budget(old)
    nf_cache.clear_caches()


def test_byte_lru_evicts_least_recent_first():
    c = ByteLRU(100)
    c.put("a", 1, 40)
    c.put("b", 2, 40)
    assert c.get("a") == 1  # "b" is now the least recent
    c.put("c", 3, 40)
    assert "b" not in c and "a" in c and "c" in c and c.nbytes == 80
    c.put("huge", 4, 101)  # over the whole budget: used by its caller, never kept
    assert "huge" not in c and c.nbytes == 80
    c.resize("a", 50)  # an entry that grows in place pushes the others out, not itself
    assert "a" in c and "c" not in c and c.nbytes == 90


def test_nested_cache_charges_its_owner():
    outer = ByteLRU(1000)
    inner = ByteLRU(300, on_change=lambda delta: outer.resize("plan", delta))
    outer.put("plan", inner, 100)
    inner.put(1, None, 200)
    assert outer.nbytes == 300
    inner.put(2, None, 200)  # the inner LRU drops key 1 to stay within its own 300
    assert 1 not in inner and outer.nbytes == 300


def test_many_shapes_stay_within_the_budget(small_budget):
    """300 calls of distinct shapes (batch, head dim, length, pattern) through the block-sparse and dense engines:
    the cache never holds more than the budget after any call, and results stay right. Before the bound, 300 call
    shapes of one plan added 18.5 MiB of chunk indices, and the dense engine kept 8 N x N masks."""
    torch.manual_seed(0)
    seen = 0
    for i in range(300):
        b, d = 1 + i % 3, 8 + 8 * (i % 4)
        n = 1100 + 7 * (i % 25)
        q, k, v = (torch.randn(b, 1, n, d) for _ in range(3))
        engine = "blocksparse" if i % 2 else "dense"
        pattern = nearfar.SlidingWindow(16 + i % 5) & nearfar.Causal()
        out = nearfar.attend(q, k, v, pattern, engine=engine)
        seen = max(seen, nf_cache.cache_bytes())
        assert nf_cache.cache_bytes() <= small_budget, f"call {i}: {nf_cache.cache_bytes()} bytes cached"
        if i % 50 == 0:
            want = nearfar.attend(q.double(), k.double(), v.double(), pattern, engine="dense")
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert seen > small_budget // 2  # the loop did fill the cache: the bound was exercised


def test_a_plan_over_the_budget_is_built_and_used_but_not_kept(small_budget):
    nf_cache.set_cache_budget(1024)
    q, k, v = (torch.randn(1, 1, 2000, 8) for _ in range(3))
    out = nearfar.attend(q, k, v, nearfar.SlidingWindow(31), engine="blocksparse")
    want = nearfar.attend(q, k, v, nearfar.SlidingWindow(31), engine="dense")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert nf_cache.cache_bytes() <= 1024


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEARFAR_CACHE_BYTES", "12345")
    assert nf_cache._budget_from_env() == 12345
    monkeypatch.setenv("NEARFAR_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="NEARFAR_CACHE_BYTES"):
        nf_cache._budget_from_env()
    monkeypatch.setenv("NEARFAR_CACHE_BYTES", "-1")
    with pytest.raises(ValueError, match="NEARFAR_CACHE_BYTES"):
        nf_cache._budget_from_env()
    with pytest.raises(ValueError, match="nbytes"):
        nf_cache.set_cache_budget(-5)


def test_threads_share_the_cache_safely(small_budget):
    import threading

    errors = []

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            for i in range(40):
                n = 1100 + 13 * ((seed * 7 + i) % 11)
                q, k, v = (torch.randn(1, 1, n, 8, generator=g) for _ in range(3))
                nearfar.attend(q, k, v, nearfar.SlidingWindow(8 + i % 3), engine="blocksparse" if i % 2 else "dense")
                assert nf_cache.cache_bytes() <= small_budget
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
