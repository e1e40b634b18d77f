"""Fixtures for real-TCP tests: in-process daemons on loopback, clusters of daemon processes, and the
helpers every net test shares (one copy each, so a fix reaches every test):

- ``wait_until``: poll a condition (truthy protocol) under a hard timeout;
- ``poll``: poll a ``(done, detail)`` check under a bound measured from a given start, for timed repairs;
- ``log_tail``: the end of a cluster node's log, for failure messages;
- ``clusters``: ``up(n)`` starts a local-preset cluster of processes, all stopped at teardown;
- ``short_dir``: a temp dir with a path short enough for an AF_UNIX socket.

Every test here runs on uvloop (the daemon's loop) unless its module sets ``LOOP_FACTORIES``. No fixed
ports (port 0 everywhere), no sleeping for readiness: waits are on events or on conditions polled
under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mlfabric.config import load_settings
from mlfabric.runtime.cluster import Cluster, ClusterNode, cluster_up, loopback_host
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


# -------------------------------------------------------------------- polling


async def until(condition: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition",
                context: Callable[[], str] | None = None) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy, and return that; fail after
    ``timeout`` s with the last value and ``context()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            more = f"\n{context()}" if context is not None else ""
            pytest.fail(f"{what} not reached within {timeout:g}s (last value {value!r}){more}")
        await asyncio.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[Any]]:
    return until


async def poll_done(
    check: Callable[[], Awaitable[tuple[bool, Any]]],
    bound: float,
    what: str,
    context: Callable[[], str],
    since: float | None = None,
    show: Callable[[Any], object] = lambda detail: detail,
) -> tuple[float, Any]:
    """Call ``check`` until it reports done; fail (with ``show(detail)`` and ``context()``) past ``bound``
    seconds after ``since`` (default: now). Returns (seconds since ``since`` when done, check's detail)."""
    start = time.monotonic() if since is None else since
    while True:
        done, detail = await check()
        elapsed = time.monotonic() - start
        if done:
            return elapsed, detail
        if elapsed > bound:
            pytest.fail(f"{what} not reached within {bound:.2f}s; last: {show(detail)}\n{context()}")
        await asyncio.sleep(0.02)


@pytest.fixture
def poll() -> Callable[..., Awaitable[tuple[float, Any]]]:
    return poll_done


# -------------------------------------------------------------------- clusters of daemon processes


def node_log_tail(node: ClusterNode, lines: int = 15) -> str:
    """The last ``lines`` lines of ``node``'s log (stdout and stderr), headed by the node and the path."""
    try:
        text = Path(node.log).read_text(errors="replace").splitlines()
    except OSError:
        return f"[node{node.index}: no log at {node.log}]"
    return f"--- node{node.index} {node.id:016x} log tail ({node.log}) ---\n" + "\n".join(text[-lines:])


@pytest.fixture
def log_tail() -> Callable[..., str]:
    return node_log_tail


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``up(n, name=..., extra_args=[...], extra_env={...})``: a local-preset cluster of n daemon processes
    (cluster_up). Every cluster made is stopped at teardown, whatever happened: SIGCONT first (a stopped
    process would sit on SIGTERM until the timeout), SIGTERM, then SIGKILL for what is left."""
    made: list[Cluster] = []

    def up(n: int, name: str | None = None, extra_args: list[str] | None = None,
           extra_env: dict[str, str] | None = None) -> Cluster:
        cluster = cluster_up(tmp_path / (name or f"cluster{len(made)}"), n, preset="local", extra_args=extra_args,
                             extra_env=extra_env)
        made.append(cluster)
        return cluster

    yield up
    for cluster in made:
        for pid in list(cluster.procs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        cluster.stop(timeout=5)
        for proc in cluster.procs.values():  # nodes killed but not reaped (a failed test)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


# -------------------------------------------------------------------- files


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir under /tmp: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
