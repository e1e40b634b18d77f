"""Fixtures for the chaos tier: real daemons in network namespaces (deploy/netns/testbed.py).

The tier needs root and ``ip netns``. Where they are missing the tests skip with the reason, except
under ``CI=true`` (CI runs as root), where a missing testbed is a failure, not a silent skip.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TESTBED_PATH = Path(__file__).resolve().parents[2] / "deploy" / "netns" / "testbed.py"


def load_testbed() -> ModuleType:
    """deploy/netns/testbed.py as a module (it is a script, not part of the package)."""
    name = "mlfabric_netns_testbed"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTBED_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def require_testbed() -> ModuleType:
    testbed = load_testbed()
    why = testbed.unavailable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the namespace testbed cannot run here: {why}")
        pytest.skip(f"namespace testbed unavailable: {why}")
    return testbed


@pytest.fixture
def testbed_factory() -> Iterator[Callable[..., Any]]:
    """``make(n, **kw)``: a started Testbed; every one is closed when the test ends, pass or fail."""
    testbed = require_testbed()
    made: list[Any] = []

    def make(n: int, **kw: Any) -> Any:
        tb = testbed.Testbed(n, **kw)
        made.append(tb)
        return tb.start()

    try:
        yield make
    finally:
        for tb in reversed(made):
            tb.close()
