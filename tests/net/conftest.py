"""Fixtures for real-TCP tests: in-process daemons on loopback, a polling helper with a hard timeout.

Every test here runs on uvloop (the daemon's loop) unless its module sets ``LOOP_FACTORIES``. No fixed
ports (port 0 everywhere), no sleeping for readiness: waits are on events or on conditions polled
under a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mlfabric.config import load_settings
from mlfabric.runtime.cluster import loopback_host
from mlfabric.runtime.daemon import Daemon

FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    module = getattr(item, "module", None)
    names = getattr(module, "LOOP_FACTORIES", ("uvloop",))
    return {name: FACTORIES[name] for name in names}


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """``await make(seeds=[...], **settings)``: a started in-process daemon (local preset, port 0)."""
    made: list[Daemon] = []
    numbers = itertools.count()

    async def make(*, seeds: list[str] | tuple[str, ...] = (), name: str | None = None, **overrides: Any) -> Daemon:
        i = next(numbers)
        host = loopback_host(i)
        fields: dict[str, Any] = {"listen": f"{host}:0", "control": f"{host}:0",
                                  "data_dir": tmp_path / (name or f"node{i}"), "seeds": list(seeds)}
        fields.update(overrides)
        daemon = Daemon(load_settings(preset=fields.pop("preset", "local"), **fields), rng_seed=i)
        await daemon.start()
        made.append(daemon)
        return daemon

    yield make
    for daemon in reversed(made):
        await daemon.stop(leave=False)


async def until(condition: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:g}s (last value {value!r})")
        await asyncio.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    return until
