"""runtime/systemd.py against a fake NOTIFY_SOCKET: a datagram socket bound in a temp dir (or in the
abstract namespace) that plays systemd's part and reads what the notifier sends."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlfabric.runtime.systemd import SystemdNotifier, notify_address, watchdog_interval


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake_systemd(short_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """(NOTIFY_SOCKET value, the bound receiving socket) for a socket file."""
    path = str(short_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(65536).decode()


def test_unset_notify_socket_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environ({})
    assert not notifier.enabled and notifier.watchdog is None
    assert notifier.ready("x") is False and notifier.stopping() is False and notifier.send("WATCHDOG=1") is False
    notifier.close()


def test_ready_status_and_stopping_arrive_as_newline_separated_assignments(fake_systemd: tuple[str, socket.socket]) -> None:
    address, sock = fake_systemd
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    try:
        assert notifier.ready("joined the ring") is True
        assert recv(sock) == "READY=1\nSTATUS=joined the ring\n"
        assert notifier.status("still here")
        assert recv(sock) == "STATUS=still here\n"
        assert notifier.stopping()
        assert recv(sock) == "STOPPING=1\nSTATUS=leaving the ring\n"
    finally:
        notifier.close()


def test_abstract_socket_name() -> None:
    name = f"mlfabric-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert notify_address({"NOTIFY_SOCKET": "@" + name}) == b"\0" + name.encode()
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send("WATCHDOG=1")
        assert recv(sock) == "WATCHDOG=1\n"
        notifier.close()
    finally:
        sock.close()


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", ""])
def test_unsupported_addresses_disable_notification(value: str) -> None:
    assert notify_address({"NOTIFY_SOCKET": value}) is None
    assert not SystemdNotifier.from_environ({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}).enabled


def test_lost_notification_is_logged_once_and_never_raises(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="mlfabric.runtime.systemd"):
        assert notifier.send("WATCHDOG=1") is False
        assert notifier.send("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1
    notifier.close()


@pytest.mark.parametrize("line", ["READY=1\nMAINPID=1", "NOEQUALSSIGN"])
def test_assignments_cannot_smuggle_extra_lines(fake_systemd: tuple[str, socket.socket], line: str) -> None:
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": fake_systemd[0]})
    with pytest.raises(ValueError):
        notifier.send(line)
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),  # our pid is 4242 below
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0


def test_no_watchdog_without_a_socket() -> None:
    assert SystemdNotifier.from_environ({"WATCHDOG_USEC": "400000"}).watchdog is None


async def test_watchdog_pings_follow_the_interval_and_stop_when_the_loop_blocks(
    fake_systemd: tuple[str, socket.socket],
) -> None:
    address, sock = fake_systemd
    sock.setblocking(False)
    notifier = SystemdNotifier(address, watchdog=0.05)
    loop = asyncio.get_running_loop()
    pings: list[float] = []

    async def collect(n: int) -> None:
        while len(pings) < n:
            async with asyncio.timeout(5):
                assert (await loop.sock_recv(sock, 4096)) == b"WATCHDOG=1\n"
            pings.append(time.monotonic())

    task = loop.create_task(notifier.ping_watchdog())
    try:
        await collect(5)
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert all(0.03 < g < 0.5 for g in gaps), gaps
        # Block the event loop (a hung handler): the ping task is on this loop, so nothing is sent
        # until the loop turns again. Pings sent before the block were received above or are drained here.
        while True:
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        time.sleep(0.3)  # deliberately blocking: six ping intervals with the loop stuck
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        await collect(len(pings) + 1)  # the loop turns again: pings resume at once
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()
