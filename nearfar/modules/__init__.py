"""``nn.Module`` mechanisms built on ``nearfar.attend``, one file per family, and their registry
(``nearfar.mechanisms()``). Each file registers its own mechanisms when imported here."""

from __future__ import annotations

from .neighborhood import NeighborhoodAttention
from .registry import Mechanism, mechanisms, register

__all__ = ["Mechanism", "NeighborhoodAttention", "mechanisms", "register"]
