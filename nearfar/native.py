"""The compiled CPU kernel of the block-sparse engine: build it ahead of time, load it if it is there.

``python -m nearfar.native build`` (run by the README's set-up commands) compiles ``nearfar/csrc/`` against the
installed torch with ``torch.utils.cpp_extension`` into ``nearfar/_native/<tag>/``, where the tag names the torch
version, the Python version, the CPU's vector level and a hash of the sources. At import nothing is compiled: the
library that matches the running torch and sources is loaded if it exists, and otherwise the engine keeps its
PyTorch path (slower, same results). ``python -m nearfar.native status`` says which.

``NEARFAR_NATIVE=0`` turns the kernel off; ``NEARFAR_NATIVE_DIR`` moves the build folder (e.g. a read-only install).
Installed from a wheel, the default folder is ``nearfar/_native/`` inside site-packages: writable in a virtual
environment, often not in a system-wide one, and not listed in the wheel's RECORD: ``pip uninstall`` leaves it, and the
left ``nearfar/`` folder then shadows a later editable install of nearfar as an empty namespace package (delete it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
SOURCES = sorted((_HERE / "csrc").glob("*.cpp"))
#: what the build depends on: the sources and their headers (the tag hashes both)
_INPUTS = SOURCES + sorted((_HERE / "csrc").glob("*.h"))
_NAME = "nearfar_native"
_state: dict[str, object] = {}


def _capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - very old torch: no vector level known, build the portable code
        return "DEFAULT"


def _flags(cap: str) -> list[str]:
    """Compiler flags for the CPU's vector level; ATen's ``Vectorized`` picks its AVX2/AVX-512 code from the
    ``CPU_CAPABILITY_*`` macros, as in PyTorch's own kernels."""
    # -fopenmp: ``at::parallel_for`` is an OpenMP pragma in a header; without it the kernel runs on one thread
    # (libgomp.so.1 then resolves to the copy PyTorch already loaded, by soname)
    base = ["-O3", "-fno-math-errno", "-std=c++17", "-fopenmp"]
    if cap == "AVX512":
        return base + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                       "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if cap == "AVX2":
        return base + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return base + ["-DCPU_CAPABILITY=DEFAULT"]


def tag() -> str:
    """Names one build: torch and Python versions, vector level, source hash."""
    h = hashlib.sha1(" ".join(_flags(_capability())).encode())
    for src in _INPUTS:
        h.update(src.read_bytes())
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__.replace('+', '_')}-py{py}-{_capability().lower()}-{h.hexdigest()[:12]}"


def build_dir() -> Path:
    root = Path(os.environ.get("NEARFAR_NATIVE_DIR", _HERE / "_native"))
    return root / tag()


def _library(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{_NAME}*.so"))
    return found[0] if found else None


def build(verbose: bool = False) -> Path:
    """Compile the kernel for the installed torch (about a minute); returns the library's path."""
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=_NAME, sources=[str(s) for s in SOURCES], extra_cflags=_flags(_capability()),
                       extra_ldflags=["-fopenmp"],
                       build_directory=str(folder), is_python_module=False, verbose=verbose)
    lib = _library(folder)
    if lib is None:
        raise RuntimeError(f"the build finished but left no {_NAME}*.so in {folder}")
    _state.pop("ok", None)
    _state.pop("error", None)
    return lib


def available() -> bool:
    """Whether the compiled kernel is loaded and in use (loads it on first call; never compiles)."""
    if _state.get("off"):
        return False
    if "ok" not in _state:
        _load()
    return bool(_state["ok"])


# eager even inside a compiled graph: the first call loads the library; later traces see "ok" set and read it in-graph
@torch.compiler.disable
def _load() -> None:
    _state["ok"] = False
    if os.environ.get("NEARFAR_NATIVE", "1") != "0" and sys.platform.startswith("linux"):
        lib = _library(build_dir())
        if lib is not None:
            try:
                torch.ops.load_library(str(lib))
                _state["ok"] = True
            except (OSError, RuntimeError) as e:  # a library of another torch build: keep the fallback
                _state["error"] = repr(e)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the engine's PyTorch path inside the block, as where the kernel is not built (tests, comparisons)."""
    before = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = before


def status() -> str:
    ok = available()
    where = build_dir()
    if ok:
        return f"native kernel: loaded from {where}"
    why = _state.get("error") or ("turned off by NEARFAR_NATIVE=0" if os.environ.get("NEARFAR_NATIVE") == "0"
                                  else "not built for this torch and these sources (python -m nearfar.native build)")
    return f"native kernel: not loaded ({why}); the engine uses its PyTorch path. Build folder: {where}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nearfar.native", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "status"])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            print(f"built {build(args.verbose)}")
        except Exception as e:  # noqa: BLE001 - no compiler here: the package still works, slower
            hint = ("; the build folder is not writable (an install in a read-only site-packages): set "
                    "NEARFAR_NATIVE_DIR to a writable folder, for the build and for every run") \
                if isinstance(e, PermissionError) else ""
            print(f"nearfar: the native kernel was not built ({e!r}){hint}; the engine will use its PyTorch path",
                  file=sys.stderr)
            return 0 if os.environ.get("NEARFAR_REQUIRE_NATIVE") != "1" else 1
    print(status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
