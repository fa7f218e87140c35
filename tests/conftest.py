"""Shared test configuration: a reproducible hypothesis profile and small helpers."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# make ``reference``, ``strategies`` and the ``oracles`` package importable from the test modules
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _usable_cores() -> int:
    """Cores this process may run on: its affinity mask, and a cgroup CPU quota where one is set (a container can
    see every core of its host and be allowed two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``pytest -n auto`` (the README's test command): a worker per usable core, at most 4 (each holds its own
    torch and test data, ~0.5-1 GB)."""
    return min(4, _usable_cores())


# at most 2 threads per test process; under pytest-xdist the cores are shared by the workers, so each takes its
# share (one thread each on a 2-core machine: no oversubscribed thread pools)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), _usable_cores() // _workers)))


@pytest.fixture
def eager_flex(monkeypatch):
    """The Flex engine run eagerly (compiling per shape would take minutes in CI)."""
    from nearfar.backends import flex

    monkeypatch.setenv("NEARFAR_FLEX_COMPILE", "0")
    flex._compiled.cache_clear()
    yield
    flex._compiled.cache_clear()
