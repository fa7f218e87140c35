"""The package's architecture contract, read from the source (AST), so it stays true as mechanisms are added.

- Layers and models are built only on public APIs: under ``nearfar/layers`` and ``nearfar/models`` a module imports
  from nearfar only ``nearfar.functional``, ``nearfar.patterns``, ``nearfar.checks``, ``nearfar.contexts`` (context
  variables that compile) and ``nearfar.layers`` (models: also ``nearfar.models``); never an engine
  (``nearfar.backends``), the planner or the dispatcher.
- No module anywhere in the package imports another module's ``_private`` name.
- No module name is hidden by a function of the same name in its package (``nearfar.attend`` is a function).
- Registry entries are made where their classes are defined: ``nearfar/__init__.py`` imports no module only for
  its side effects, and every registered class and model is exported from ``nearfar``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import nearfar

PACKAGE = Path(nearfar.__file__).parent
ALLOWED = {
    "layers": ("nearfar.functional", "nearfar.patterns", "nearfar.checks", "nearfar.contexts", "nearfar.layers"),
    "models": ("nearfar.functional", "nearfar.patterns", "nearfar.checks", "nearfar.contexts", "nearfar.layers",
               "nearfar.models"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(absolute module, imported names, line)`` of every import from inside nearfar in ``path``."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "nearfar" or target.startswith("nearfar."):
                names = [a.name for a in node.names]
                # ``from nearfar.x import y`` may import the submodule ``y``: check it as a module too
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("nearfar"):
                    out.append((a.name, [], node.lineno))
    return out


def _sources(sub: str | None = None) -> list[Path]:
    root = PACKAGE / sub if sub else PACKAGE
    return sorted(root.rglob("*.py"))


def test_the_contract_sees_the_package():
    # a contract that reads no file would pass whatever the package does
    assert len(_sources("layers")) >= 30 and len(_sources("models")) >= 3
    assert any(t == "nearfar.functional" for t, _, _ in _imports(PACKAGE / "layers" / "swin.py"))


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_layers_and_models_use_only_public_apis(room):
    bad = []
    for path in _sources(room):
        for target, names, line in _imports(path):
            modules = [target] + [f"{target}.{n}" for n in names]
            if not any(m == a or m.startswith(a + ".") for m in modules for a in ALLOWED[room]):
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} {names}")
    assert not bad, "layers/models may import only " + ", ".join(ALLOWED[room]) + ":\n" + "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = [f"{path.relative_to(PACKAGE)}:{line} imports {n} from {target}"
           for path in _sources() for target, names, line in _imports(path)
           for n in names if n.startswith("_") and target != _module_name(path)]
    assert not bad, "import a public name (rename it) instead of another module's private one:\n" + "\n".join(bad)


def test_no_function_hides_a_module():
    clashes = []
    for path in _sources():
        name = _module_name(path)
        parent, _, leaf = name.rpartition(".")
        if not parent:
            continue
        importlib.import_module(name)
        attr = getattr(importlib.import_module(parent), leaf, None)
        if attr is not None and not isinstance(attr, type(nearfar)):
            clashes.append(f"{parent}.{leaf} is a {type(attr).__name__}, hiding the module {path.name}")
    assert not clashes, "\n".join(clashes)


def test_init_has_no_side_effect_imports_and_exports_every_mechanism():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    bare = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom) and n.module is None]
    assert not bare, f"imports only for their side effects: {bare}"
    exported = set(nearfar.__all__)
    missing = [m.name for m in nearfar.mechanisms() if m.cls is not None and m.cls.__name__ not in exported]
    assert not missing and nearfar.__all__ == sorted(nearfar.__all__, key=lambda s: (s.lower(), s))
    for name in nearfar.__all__:
        assert hasattr(nearfar, name), name
    # each entry is registered by the module that defines its class
    wrong = [(m.name, m.make.__module__, m.cls.__module__) for m in nearfar.mechanisms()
             if m.cls is not None and m.make.__module__ != m.cls.__module__]
    assert not wrong, f"registered away from the class: {wrong}"
