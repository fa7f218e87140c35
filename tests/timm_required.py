"""timm for the tests that need it: skipped where timm is absent, unless ``NEARFAR_REQUIRE_TIMM=1`` (CI's timm step),
where a missing or broken timm fails instead of skipping. Importing timm also registers nearfar's backbones with it."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest


def timm_or_none() -> ModuleType | None:
    """timm (nearfar's names registered), None where it is absent, an ImportError under ``NEARFAR_REQUIRE_TIMM=1``."""
    with warnings.catch_warnings():  # timm imports torchvision, whose ops may not load beside a CPU torch build
        warnings.simplefilter("ignore")
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            if os.environ.get("NEARFAR_REQUIRE_TIMM") == "1":
                raise
            return None
        importlib.import_module("nearfar.integrations.timm")  # registers the nearfar_* names
    return timm


def import_timm() -> ModuleType:
    """timm (nearfar's names registered), or a skip where it is absent (a failure under ``NEARFAR_REQUIRE_TIMM=1``)."""
    timm = timm_or_none()
    if timm is None:
        pytest.skip("timm cannot be imported (NEARFAR_REQUIRE_TIMM=1 makes this a failure)", allow_module_level=True)
    return timm
