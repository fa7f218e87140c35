"""The library needs only torch: importing nearfar, running attend, every registered layer's constructor and the
bench modules never import matplotlib (the ``bench`` extra: the report's figures only). The torch release the package
metadata claims as its floor is the one CI installs and tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def test_torch_floor_is_the_tested_release():
    """pyproject's ``torch>=X`` equals constraints.txt's ``torch==X`` (what ``.ci/run`` and the README install), so
    the metadata never claims an older torch than CI runs; the torch running these tests satisfies both."""
    deps = re.findall(r'^dependencies = \[(.*)\]', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    floors = re.findall(r'"torch>=([\d.]+)"', deps[0]) if len(deps) == 1 else []
    pins = re.findall(r"^torch==([\d.]+)\s*$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert len(floors) == 1 and len(pins) == 1, (deps, floors, pins)
    floor, pin = _release(floors[0]), _release(pins[0])
    assert floor == pin[: len(floor)], f"pyproject claims torch>={floors[0]} but CI tests torch=={pins[0]}"
    import torch

    assert _release(torch.__version__) >= floor, torch.__version__


def test_one_version_source():
    """The version lives in ``nearfar.__version__`` only: pyproject reads it from there (no second copy to forget)."""
    text = (ROOT / "pyproject.toml").read_text()
    tables = dict(re.findall(r"^\[([\w.-]+)\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S))
    project, dynamic = tables["project"], tables["tool.setuptools.dynamic"]
    assert not re.search(r"^version\s*=", project, flags=re.M), "[project] has a static version"
    assert re.search(r'^dynamic = \[[^\]]*"version"', project, flags=re.M), project
    assert re.search(r'^version = \{ attr = "nearfar.__version__" \}', dynamic, flags=re.M), dynamic
    import nearfar

    assert re.fullmatch(r"\d+\.\d+\.\d+", nearfar.__version__)
