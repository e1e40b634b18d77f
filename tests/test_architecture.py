"""Architecture guards (DESIGN.md, "Layers"): wire/ and core/ stay sans-IO, the module import graph has
no cycle, nothing unpickles, every random choice comes from an injected random.Random, and only
durations go on the wire.

Static checks on the AST of every module, so they hold for code no test happens to import.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import mlfabric
from mlfabric.errors import RemoteProtocolError
from mlfabric.wire import messages

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


def _package(path: Path) -> str:
    return _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ``from ... import`` statement reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of everything the module imports (relative imports resolved), wherever the
    statement is: top level, inside a function (lazy) or under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _package(path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
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


# -------------------------------------------------------------------- the import graph is a DAG


def _import_edges(source: str, package: str, modules: Iterable[str]) -> dict[str, int]:
    """The modules among ``modules`` that ``source`` imports, each with the line of its first import.

    Every import statement counts, lazy (inside a function) and ``if TYPE_CHECKING:`` ones included:
    a cycle through them is still a cycle in the design. ``from a.b import c`` is an edge to ``a.b.c``
    when that is a module, else to ``a.b``.
    """
    known = set(modules)
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in known and target not in edges:
            edges[target] = line

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in known else module, node.lineno)
    return edges


def _import_graph() -> dict[str, dict[str, int]]:
    paths = {_module_name(p): p for p in _modules(PKG)}
    return {
        name: _import_edges(path.read_text(encoding="utf-8"), _package(path), paths)
        for name, path in paths.items()
    }


def _cycles(graph: Mapping[str, Iterable[str]], limit: int = 100) -> list[list[str]]:
    """Elementary cycles of ``graph``, each as ``[a, b, ..., a]`` starting at its smallest node (at most ``limit``)."""
    found: list[list[str]] = []
    nodes = sorted(graph)
    for start in nodes:
        # cycles whose smallest node is ``start``: search only through nodes greater than it
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack and len(found) < limit:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    found.append([*path, start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    return sorted(found, key=lambda c: (len(c), c))


def _chain(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    """``a -> b -> a``, each arrow with the line of the import that makes it."""
    out = cycle[0]
    for a, b in zip(cycle, cycle[1:], strict=False):
        out += f" -({a.rpartition('.')[2]}.py:{graph[a][b]})-> {b}"
    return out


def test_the_cycle_finder_reports_cycles_and_passes_a_dag() -> None:
    """Negative control for the test below: a lazy and a TYPE_CHECKING import are edges, a cycle is found."""
    modules = ["pkg.a", "pkg.b", "pkg.c", "pkg.sub", "pkg.sub.d"]
    a = "def f():\n    from pkg import b\n"
    b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
    c = "import pkg.a\nfrom pkg.sub import d\nfrom pkg.sub import name\n"
    graph = {
        "pkg.a": _import_edges(a, "pkg", modules),
        "pkg.b": _import_edges(b, "pkg", modules),
        "pkg.c": _import_edges(c, "pkg", modules),
    }
    assert graph == {"pkg.a": {"pkg.b": 2}, "pkg.b": {"pkg.c": 3}, "pkg.c": {"pkg.a": 1, "pkg.sub.d": 2, "pkg.sub": 3}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert _chain(_cycles(graph)[0], graph) == "pkg.a -(a.py:2)-> pkg.b -(b.py:3)-> pkg.c -(c.py:1)-> pkg.a"
    assert _cycles({"x": {"y"}, "y": {"x", "z"}, "z": {"z"}}) == [["z", "z"], ["x", "y", "x"]]
    assert _cycles({"x": {"y", "z"}, "y": {"z"}, "z": set()}) == []


def test_the_module_import_graph_is_a_dag() -> None:
    """No two mlfabric modules import each other, directly or round a longer circle, counting lazy and
    TYPE_CHECKING imports (REVIEW §1.4: such circles hide a missing layer)."""
    graph = _import_graph()
    assert len(graph) > 30 and graph["mlfabric.runtime.daemon"], "the graph walker found too little"
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_chain(c, graph) for c in cycles)


# -------------------------------------------------------------------- seeded randomness only

# Construction of a seeded generator is the one thing taken from the random module.
RANDOM_ALLOWED = {"Random"}


def random_module_uses(source: str) -> list[str]:
    """``line: what`` for every use of the ``random`` module's hidden global generator in ``source``.

    Allowed: ``random.Random(seed)`` (and the name ``random.Random`` in annotations); anything else
    taken from the module (``random.random``, ``getrandbits``, ``choice``, ``shuffle``, ``seed``,
    ``SystemRandom`` ...) is reported, called or not, under any alias. ``secrets`` is not affected.
    """
    tree = ast.parse(source)
    aliases = set()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name == "random")
        elif isinstance(node, ast.ImportFrom) and node.module == "random" and not node.level:
            out += [f"{node.lineno}: from random import {a.name}" for a in node.names if a.name not in RANDOM_ALLOWED]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in RANDOM_ALLOWED):
            out.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return sorted(out, key=lambda x: int(x.partition(":")[0]))


def test_the_random_checker_reports_the_global_generator() -> None:
    """Negative control for the test below."""
    source = (
        "import random\nimport random as rnd\nimport secrets\nfrom random import Random, choice\n"
        "rng: random.Random = random.Random(7)\n"
        "epoch = random.getrandbits(63)\n"
        "rnd.shuffle([1, 2])\n"
        "pick = random.choice\n"
        "nonce = secrets.token_bytes(16)\n"
        "x = rng.random()\n"
    )
    assert random_module_uses(source) == [
        "4: from random import choice", "6: random.getrandbits", "7: rnd.shuffle", "8: random.choice",
    ]
    assert random_module_uses("import random\nrng = random.Random(1)\nrng.getrandbits(63)\n") == []


def test_every_random_choice_comes_from_an_injected_seeded_random() -> None:
    """DESIGN rule: every random choice comes from an injected, seeded ``random.Random``, so a run is
    replayed from its seeds (the simulator depends on it). The module's global generator is unseeded."""
    offenders = []
    for path in _modules(PKG):
        where = str(path.relative_to(PKG.parent))
        offenders += [f"{where}:{use}" for use in random_module_uses(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders


# -------------------------------------------------------------------- only durations on the wire

# Name words that say "a point in time": such a value is only meaningful on the clock that made it.
# Whole words of snake_case names (so "candidate" and "timeout" pass), plus words containing these:
TIME_WORDS = {"time", "date", "datetime", "timestamp"}
TIME_PARTS = ("unix", "stamp", "clock")
# A wire float must reject a value the size of a Unix time, in seconds (~1.7e9 in 2024) or milliseconds.
TIME_SIZED = (1.0e9, 1.7e9, 1.7e12)
FLOAT_KIND = type(messages.DURATION)


def _leaf_kinds(kind: messages.Kind) -> list[messages.Kind]:
    """The kinds inside Optional(...) and ListOf(...)."""
    if isinstance(kind, messages.Optional | messages.ListOf):
        return _leaf_kinds(kind.inner)
    return [kind]


def _accepts(kind: messages.Kind, raw: object) -> bool:
    try:
        kind.load(raw)
    except RemoteProtocolError:
        return False
    return True


def wire_time_offenders(fields: Iterable[tuple[str, str, str, messages.Kind]]) -> list[str]:
    """For (message, field name, annotation, kind) rows: the fields that could carry an absolute time.

    A name that says time (``*_at``, ``sent_time``, ``deadline_unix``, ``wall_clock`` ...), or a float
    field whose kind is not a bounded duration/measurement (the kind of ``messages.DURATION``, finite
    bounds, rejecting a value the size of a Unix timestamp).
    """
    out = []
    for message, name, annotation, kind in fields:
        words = name.lower().split("_")
        if name.endswith("_at") or any(w in TIME_WORDS or any(p in w for p in TIME_PARTS) for w in words):
            out.append(f"{message}.{name}: the name says a point in time")
        leaves = _leaf_kinds(kind)
        if "float" not in annotation and not any(isinstance(k, FLOAT_KIND) for k in leaves):
            continue
        for leaf in leaves:
            if not isinstance(leaf, FLOAT_KIND):
                out.append(f"{message}.{name}: float field with kind {type(leaf).__name__}, not a bounded duration")
            elif any(_accepts(leaf, v) for v in TIME_SIZED):
                out.append(f"{message}.{name}: float kind accepts a Unix-time-sized value")
    return out


def _wire_fields() -> list[tuple[str, str, str, messages.Kind]]:
    rows = []
    for cls in messages.registered().values():
        for fl in dataclasses.fields(cls):  # type: ignore[arg-type]
            rows.append((cls.__name__, fl.name, str(fl.type), fl.metadata["kind"]))
    return rows


def test_the_wire_time_checker_reports_timestamps() -> None:
    """Negative control for the test below, on a made-up field list."""

    class AnyNumber(messages.Kind):
        def load(self, raw: object) -> float:
            return float(raw)  # type: ignore[arg-type]

    bad = [
        ("Fake", "sent_at", "int", messages.U64),
        ("Fake", "deadline_unix", "float", messages.DURATION),
        ("Fake", "start_time", "int", messages.U64),
        ("Fake", "timestamp", "int", messages.U64),
        ("Fake", "wall_clock", "float | None", messages.Optional(messages.DURATION)),
        ("Fake", "origin", "float", AnyNumber()),
        ("Fake", "origins", "tuple[float, ...]", messages.ListOf(FLOAT_KIND(0.0, 1e13), 8)),
    ]
    assert [row.partition(":")[0] for row in wire_time_offenders(bad)] == [
        "Fake.sent_at", "Fake.deadline_unix", "Fake.start_time", "Fake.timestamp", "Fake.wall_clock",
        "Fake.origin", "Fake.origins",
    ]
    good = [
        ("Fake", "candidate", "Peer", messages.PEER),
        ("Fake", "timeout", "float", messages.DURATION),
        ("Fake", "update", "int", messages.U64),
        ("Fake", "elapsed", "float | None", messages.Optional(messages.DURATION)),
        ("Fake", "accuracy", "float", FLOAT_KIND(0.0, 1.0)),
    ]
    assert wire_time_offenders(good) == []


def test_only_durations_go_on_the_wire() -> None:
    """DESIGN rule: only durations go on the wire, never absolute local timestamps (clocks differ across
    nodes; a receiver measures against its own monotonic clock)."""
    rows = _wire_fields()
    assert len(rows) > 50, "too few wire fields found: the check would be vacuous"
    offenders = wire_time_offenders(rows)
    assert not offenders, offenders
