"""systemd service notification (sd_notify(3)) with no external dependency: READY, WATCHDOG, STOPPING.

The protocol: the service manager sets ``NOTIFY_SOCKET`` to an ``AF_UNIX`` datagram socket (a path, or
an abstract name written ``@name``) and the service sends newline-separated ``KEY=VALUE`` assignments
to it. When ``WATCHDOG_USEC`` is set (and ``WATCHDOG_PID`` is unset or is our pid) the manager expects
``WATCHDOG=1`` at least that often; sd_watchdog_enabled(3) recommends pinging every half of it.
Without ``NOTIFY_SOCKET`` everything here is a no-op, so the daemon runs the same outside systemd.

What the daemon reports (the unit is ``Type=notify``, see deploy/systemd/mlfabric.service):

- ``READY=1`` once both TCP listeners are bound, the control address is written to the data dir, and
  the node has joined the ring, or its first join attempt has had time to finish without joining
  (every seed down, e.g. the whole cluster booting at once). A node that is still joining serves its
  control endpoint and keeps retrying on its own, so holding systemd's start job, and failing the
  unit at ``TimeoutStartSec``, would only turn a slow peer into a restart loop. ``STATUS=`` says
  which of the two it was, and is updated when the join succeeds later.
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from a task on the daemon's own event loop: a loop that
  hangs (a blocking call, a livelock) stops the pings and systemd restarts the service.
- ``STOPPING=1`` when the graceful shutdown begins (before the node leaves the ring).

Must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from mlfabric.config import Settings

logger = logging.getLogger(__name__)

WaitJoined = Callable[[float | None], Awaitable[object]]
"""``wait_joined(timeout)``: returns once the node has joined (at once if it has); TimeoutError after ``timeout``."""

MAX_DATAGRAM = 4096  # our messages are a few lines; systemd accepts far more


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The socket address named by ``NOTIFY_SOCKET``: a path, an abstract name (bytes, leading NUL), or None.

    ``@name`` is Linux's abstract namespace (sd_notify(3)); ``vsock:`` addresses (systemd 254+, for
    virtual machines) are not supported here and count as unset, with a warning.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    logger.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract @name: not notifying systemd", value)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None when no watchdog is asked of us.

    Like sd_watchdog_enabled(3): ``WATCHDOG_PID``, when set, must be our pid (the variable may have been
    inherited from a parent that is the one being watched); a missing, zero or malformed value is "off".
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            watched = int(raw_pid)
        except ValueError:
            return None
        if watched != (os.getpid() if pid is None else pid):
            return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Sends sd_notify messages to one socket. ``enabled`` is False (and every send a no-op) without one."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        return cls(notify_address(env), watchdog_interval(env, pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram. True when sent; never raises (a lost notification
        is logged once: systemd then times the start out or the watchdog fires, which is the honest outcome)."""
        if self.address is None:
            return False
        for line in assignments:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a single KEY=VALUE assignment: {line!r}")
        payload = ("\n".join(assignments) + "\n").encode()[:MAX_DATAGRAM]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the event loop on a full receive queue
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "leaving the ring") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    async def ping_watchdog(self) -> None:
        """``WATCHDOG=1`` now and every ``watchdog`` seconds until cancelled. Runs on the daemon's loop on
        purpose: if the loop stops turning, the pings stop and systemd's WatchdogSec restarts us."""
        if self.watchdog is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def first_join_bound(settings: Settings) -> float:
    """Seconds by which the first join attempt has joined or given up and scheduled a retry.

    Each seed is tried in turn (Chord §4.4 join through a known node): a dead one costs at most a TCP
    connect (``transport.connect_timeout``) plus the unanswered request (``overlay.rpc_timeout``); a live
    seed answers in a few round trips. A seedless node creates its ring at once.
    """
    s = settings
    return len(s.seeds) * (s.transport.connect_timeout + s.overlay.rpc_timeout) + s.overlay.rpc_timeout


async def notify_lifecycle(
    notifier: SystemdNotifier,
    wait_joined: WaitJoined,
    *,
    node_id: int,
    address: str,
    control: str | None,
    seeds: Sequence[str],
    bound: float,
) -> None:
    """Run beside a started node until cancelled: watchdog pings, READY=1 (see the module docstring),
    then a STATUS update when a late join succeeds. STOPPING=1 is the daemon's to send.

    ``wait_joined(timeout)`` returns once the node has joined the ring (at once if it already has) and
    raises TimeoutError after ``timeout`` seconds (None: no limit). ``node_id``, ``address``, ``control``
    and ``seeds`` only go into STATUS= and the log; ``bound`` is :func:`first_join_bound`.
    """
    if not notifier.enabled:
        return
    try:
        await _notify_lifecycle(notifier, wait_joined, node_id, address, control, seeds, bound)
    except Exception:  # a bug here must not take the node down; systemd's timeouts will show it
        logger.exception("systemd notification failed")


async def _notify_lifecycle(
    notifier: SystemdNotifier,
    wait_joined: WaitJoined,
    node_id: int,
    address: str,
    control: str | None,
    seeds: Sequence[str],
    bound: float,
) -> None:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(notifier.ping_watchdog(), name="systemd-watchdog")
        joined = False
        with contextlib.suppress(TimeoutError):
            await wait_joined(bound)
            joined = True
        where = f"node {node_id:016x} on {address}, control {control}"
        if joined:
            notifier.ready(f"joined the ring: {where}")
            return  # the watchdog task keeps the group (and this coroutine) alive
        listed = ", ".join(seeds)
        notifier.ready(f"listening, still joining through {listed}: {where}")
        logger.warning("not joined within %.1fs of start: told systemd READY=1, still retrying seeds %s",
                       bound, listed)
        await wait_joined(None)
        notifier.status(f"joined the ring: {where}")
