"""Every public function and method of the package is fully annotated (read from the source with ``ast``), so
``mypy nearfar`` (run by ``.ci/run``, configured in ``pyproject.toml``) checks every call into the public API.

Public: a ``def`` whose name does not start with ``_``, at module level or in a class body (nested classes
included); functions defined inside functions are not public. ``self``/``cls`` need no annotation. The ``nearfar
bench`` CLI and suite (``nearfar/bench``) are in scope too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import nearfar

PACKAGE = Path(nearfar.__file__).parent


def _defs(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield from _defs(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix, node
        elif isinstance(node, (ast.If, ast.Try)):  # e.g. defs under ``if TYPE_CHECKING`` / ``try: ... except``
            yield from _defs(node.body + node.orelse, prefix)


def _missing(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    out = []
    for prefix, fn in _defs(ast.parse(path.read_text()).body):
        if fn.name.startswith("_"):
            continue
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p is not None)]
        bare = [p.arg for i, p in enumerate(params)
                if p.annotation is None and not (i == 0 and prefix and p.arg in ("self", "cls"))]
        if bare or fn.returns is None:
            what = ([f"parameters {', '.join(bare)}"] if bare else []) + ([] if fn.returns else ["return"])
            out.append(f"{path.relative_to(root)}:{fn.lineno} {prefix}{fn.name}: no annotation for "
                       + " and ".join(what))
    return out


def test_public_functions_are_annotated() -> None:
    missing = [m for path in sorted(PACKAGE.rglob("*.py")) for m in _missing(path)]
    assert not missing, "public functions without full annotations:\n" + "\n".join(missing)


def test_the_check_finds_unannotated_defs(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f(x, y: int): ...\n"
                   "class C:\n"
                   "    def g(self, z: int): ...\n"
                   "    def _h(self, w): ...\n"
                   "    def k(self, *a: int, **kw: int) -> None:\n"
                   "        def inner(q): ...\n")
    assert _missing(src, tmp_path) == ["m.py:1 f: no annotation for parameters x and return",
                                       "m.py:3 C.g: no annotation for return"]
