"""The library needs only torch: importing nearfar, running attend, every registered layer's constructor and the
bench modules never import matplotlib (the ``bench`` extra: the report's figures only)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["matplotlib"] = None  # as if not installed: any import of it raises ImportError
import torch
import nearfar
from nearfar.bench import cli, quality, report, run, speed  # noqa: F401
q = torch.randn(1, 2, 64, 8)
nearfar.attend(q, q, q, nearfar.Causal())
for m in nearfar.mechanisms(kind="layer"):
    m.make(64, 4)
assert sys.modules["matplotlib"] is None
print("ok")
"""


def test_nearfar_works_without_matplotlib():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
