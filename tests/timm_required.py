"""timm for the tests that need it: skipped where timm is absent, unless ``NEARFAR_REQUIRE_TIMM=1`` (CI's timm step),
where a missing or broken timm fails instead of skipping."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest


def import_timm() -> ModuleType:
    with warnings.catch_warnings():  # timm imports torchvision, whose ops may not load beside a CPU torch build
        warnings.simplefilter("ignore")
        if os.environ.get("NEARFAR_REQUIRE_TIMM") == "1":
            return importlib.import_module("timm")
        return pytest.importorskip("timm")
