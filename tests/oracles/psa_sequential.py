"""``PSA_s`` the way DeLightCMU/PSA computes it: see ``oracles/psa_parallel.py`` (one official-style code for both
forms)."""

from __future__ import annotations

from .psa_parallel import psa_sequential_baseline

BASELINES = {"psa_sequential": psa_sequential_baseline}
