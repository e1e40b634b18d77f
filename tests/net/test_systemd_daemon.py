"""systemd notification from a real daemon: ``mlfabric node`` as a process with NOTIFY_SOCKET and
WATCHDOG_USEC set (what systemd does for a Type=notify unit with WatchdogSec=), read by a fake systemd
socket in the test; plus the READY rule for a node whose seeds are not there yet (in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mlfabric.runtime.cluster import loopback_host
from mlfabric.runtime.control import get_json
from mlfabric.runtime.daemon import Daemon
from mlfabric.runtime.systemd import SystemdNotifier, first_join_bound, notify_lifecycle

pytestmark = pytest.mark.net

WATCHDOG_USEC = 400_000  # systemd would kill the node after 0.4 s without a ping; it pings every 0.2 s
INTERVAL = WATCHDOG_USEC / 2 / 1e6

DaemonFactory = Callable[..., Awaitable[Daemon]]  # the daemon_factory fixture of conftest.py


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram with its arrival time (monotonic)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[tuple[float, str]] = []
        self._new = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append((time.monotonic(), data.decode()))
            self._new.set()

    async def wait_for(self, line: str, timeout: float, after: int = 0) -> int:
        """Index of the first message from ``after`` on that contains ``line`` as one of its lines."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(after, len(self.messages)):
                    if line in self.messages[i][1].splitlines():
                        return i
                self._new.clear()
                await self._new.wait()

    def drain_now(self) -> int:
        """Read whatever is queued without yielding to the loop; returns how many datagrams there were."""
        n = 0
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return n
            self.messages.append((time.monotonic(), data.decode()))
            n += 1

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
async def fake_systemd(short_dir: Path) -> AsyncIterator[tuple[str, FakeSystemd]]:
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    fake = FakeSystemd(sock)
    yield path, fake
    await fake.close()
    sock.close()


async def start_node(tmp_path: Path, notify_socket: str, index: int) -> asyncio.subprocess.Process:
    host = loopback_host(index)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFABRIC_", "NOTIFY_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=notify_socket, WATCHDOG_USEC=str(WATCHDOG_USEC))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlfabric", "node", "--preset", "local", "--listen", f"{host}:0",
        "--control", f"{host}:0", "--data-dir", str(tmp_path / "node"),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.communicate()


async def test_ready_after_listening_then_watchdog_cadence_then_stopping_on_sigterm(
    tmp_path: Path, fake_systemd: tuple[str, FakeSystemd]
) -> None:
    address, fake = fake_systemd
    proc = await start_node(tmp_path, address, 11)
    try:
        ready = await fake.wait_for("READY=1", 20)
        # READY=1 must not come before the node serves: at this point both listeners are bound.
        control = (tmp_path / "node" / "control").read_text().strip()
        code, status = await get_json(control, "/status")
        assert code == 200 and status["joined"] is True and status["pid"] == proc.pid
        host, _, port = status["address"].rpartition(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        lines = fake.messages[ready][1].splitlines()
        assert any(x.startswith("STATUS=joined the ring") and status["address"] in x for x in lines), lines

        first = await fake.wait_for("WATCHDOG=1", 5)
        await fake.wait_for("WATCHDOG=1", 10, after=first + 8)  # nine pings: eight gaps
        pings = [t for t, text in fake.messages if text == "WATCHDOG=1\n"]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert abs(statistics.median(gaps) - INTERVAL) < 0.05, gaps
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # systemd's watchdog would never have fired

        before = len(fake.messages)
        code, err = await stop(proc)
        assert code == 0, err
        stopping = await fake.wait_for("STOPPING=1", 5, after=before)
        assert all("WATCHDOG=1" not in text for _, text in fake.messages[stopping:])  # pings end first
        assert "node stopped" in err
    finally:
        await kill(proc)


async def test_a_stopped_process_sends_no_watchdog_pings(
    tmp_path: Path, fake_systemd: tuple[str, FakeSystemd]
) -> None:
    address, fake = fake_systemd
    proc = await start_node(tmp_path, address, 12)
    try:
        await fake.wait_for("READY=1", 20)
        first = await fake.wait_for("WATCHDOG=1", 5)
        await fake.wait_for("WATCHDOG=1", 5, after=first + 1)
        proc.send_signal(signal.SIGSTOP)  # a hung node: its event loop does not turn
        try:
            # Let a datagram already in flight land, then take it out: from here on, nothing may arrive.
            time.sleep(0.05)
            fake.drain_now()
            time.sleep(5 * INTERVAL)  # blocking on purpose: the reader task must not run in this window
            assert fake.drain_now() == 0, "a ping arrived while the daemon was stopped"
        finally:
            proc.send_signal(signal.SIGCONT)
        before = len(fake.messages)
        await fake.wait_for("WATCHDOG=1", 2, after=before)  # the loop turns again: pings resume
        code, err = await stop(proc)
        assert code == 0, err
    finally:
        await kill(proc)


async def test_ready_while_seeds_are_down_then_status_when_joined(
    daemon_factory: DaemonFactory, fake_systemd: tuple[str, FakeSystemd]
) -> None:
    """A node whose seed is not up yet reports READY=1 after its first join attempt (saying it is still
    joining) instead of holding systemd's start job, then updates STATUS= once it joins."""
    address, fake = fake_systemd
    seed_host = loopback_host(21)
    with socket.socket() as probe:  # a free port on the seed's address; nothing listens there yet
        probe.bind((seed_host, 0))
        seed_port = probe.getsockname()[1]
    seed_address = f"{seed_host}:{seed_port}"
    node = await daemon_factory(seeds=[seed_address])
    notifier = SystemdNotifier(address)
    started = time.monotonic()
    bound = first_join_bound(node.settings)
    task = asyncio.get_running_loop().create_task(notify_lifecycle(
        notifier, node.wait_joined, node_id=node.node_id, address=node.address, control=node.control_address,
        seeds=node.settings.seeds, bound=bound))
    try:
        ready = await fake.wait_for("READY=1", bound + 5)
        assert time.monotonic() - started >= bound - 0.1
        assert any(x.startswith("STATUS=listening, still joining through " + seed_address)
                   for x in fake.messages[ready][1].splitlines())
        assert node.core is not None and not node.core.chord.joined
        await daemon_factory(listen=seed_address, name="seed")  # the seed comes up: the node's retry joins
        joined = await fake.wait_for(f"STATUS=joined the ring: node {node.node_id:016x} on {node.address}, "
                                     f"control {node.control_address}", 15, after=ready + 1)
        assert "READY=1" not in fake.messages[joined][1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()
