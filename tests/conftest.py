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

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def eager_flex(monkeypatch):
    """The Flex engine run eagerly (compiling per shape would take minutes in CI)."""
    from nearfar.backends import flex

    monkeypatch.setenv("NEARFAR_FLEX_COMPILE", "0")
    flex._compiled.cache_clear()
    yield
    flex._compiled.cache_clear()
