"""Architecture guards (DESIGN.md, "Layers"): wire/ and core/ stay sans-IO, and nothing unpickles.

Static checks on the AST of every module, so they hold for code no test happens to import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mlfabric

PKG = Path(mlfabric.__file__).resolve().parent
SANS_IO = ("core", "wire")
FORBIDDEN_IN_SANS_IO = {"asyncio", "socket", "time", "threading", "torch", "uvloop"}
# What core/ and wire/ may import from mlfabric itself: each other and the two plain modules.
SANS_IO_INTERNAL_OK = {"mlfabric.core", "mlfabric.wire", "mlfabric.config", "mlfabric.errors"}
PICKLE_FAMILY = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of everything the module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_packages_exist() -> None:
    for pkg in SANS_IO:
        assert _modules(PKG / pkg), f"mlfabric/{pkg} has no modules: the checks below would be vacuous"


@pytest.mark.parametrize("pkg", SANS_IO)
def test_package_is_sans_io(pkg: str) -> None:
    offenders = {}
    for path in _modules(PKG / pkg):
        bad = _top(_imports(path)) & FORBIDDEN_IN_SANS_IO
        if bad:
            offenders[str(path.relative_to(PKG.parent))] = sorted(bad)
    assert not offenders, f"sans-IO packages must not import {sorted(FORBIDDEN_IN_SANS_IO)}: {offenders}"


@pytest.mark.parametrize("pkg", SANS_IO)
def test_sans_io_depends_only_on_sans_io(pkg: str) -> None:
    """core/ and wire/ may not reach I/O through another mlfabric module (runtime/, learn/, cli ...)."""
    offenders = {}
    for path in _modules(PKG / pkg):
        internal = {n for n in _imports(path) if n == "mlfabric" or n.startswith("mlfabric.")}
        bad = {
            n
            for n in internal
            if n != "mlfabric" and not any(n == ok or n.startswith(ok + ".") for ok in SANS_IO_INTERNAL_OK)
        }
        if bad:
            offenders[str(path.relative_to(PKG.parent))] = sorted(bad)
    assert not offenders, f"core/ and wire/ may import only {sorted(SANS_IO_INTERNAL_OK)}: {offenders}"


@pytest.mark.parametrize("module", ["config.py", "errors.py"])
def test_modules_shared_with_sans_io_are_sans_io(module: str) -> None:
    bad = _top(_imports(PKG / module)) & FORBIDDEN_IN_SANS_IO
    assert not bad, f"mlfabric/{module} is imported by core/ and wire/, so it must not import {sorted(bad)}"


def test_importing_core_and_wire_does_not_load_torch_or_uvloop() -> None:
    """torch costs ~1.5 s and ~150 MB to import (DESIGN.md): only learn/ may pull it in, lazily."""
    names = [_module_name(p) for pkg in SANS_IO for p in _modules(PKG / pkg)]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(','.join(sorted(m for m in ('torch', 'uvloop') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"importing core/ and wire/ loaded: {out.stdout.strip()}"


def test_nothing_imports_pickle() -> None:
    offenders = {}
    for path in _modules(PKG):
        bad = _top(_imports(path)) & PICKLE_FAMILY
        if bad:
            offenders[str(path.relative_to(PKG.parent))] = sorted(bad)
    assert not offenders, f"never pickle (DESIGN.md, wire/): {offenders}"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def test_no_pickle_through_the_back_door() -> None:
    """``torch.load`` unpickles unless ``weights_only=True``; ``allow_pickle=True`` is never allowed."""
    offenders = []
    for path in _modules(PKG):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = str(path.relative_to(PKG.parent))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                offenders.append(f"{where}:{node.lineno}: allow_pickle")
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                only = _keyword(node, "weights_only")
                if not (isinstance(only, ast.Constant) and only.value is True):
                    offenders.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders
