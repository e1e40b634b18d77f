"""The connection table both lanes share, and the behaviour every connection has (no torch here).

A node's control lane (transport.py) and bulk lane (bulk.py) draw from one pool of connections: one
``max_connections`` limit, one set of counters, one idle sweep, one identity (``me`` and the cluster
key for the handshake). :class:`ConnectionTable` holds that pool; each lane depends on the table and
not on the other lane, and :class:`~mlfabric.runtime.transport.Transport` is the listener, the
table and the two lanes.

:class:`Conn` is the base of the four connection classes (control in/out, bulk in/out): state, its
TCP transport, the handshake timer, ``abort``/``close``/``busy``/``describe``. Connection-level events
(admitted or rejected, handshake timeout, remote error, idle close) are logged by the table, through
the logger its owner hands it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Final

from mlfabric.config import TransportConfig
from mlfabric.errors import AuthenticationError, RemoteProtocolError
from mlfabric.wire.messages import Peer

__all__ = ["COUNTERS", "CLOSED", "HANDSHAKE", "LANE", "OPEN", "Conn", "ConnectionTable"]

# connection states
LANE, HANDSHAKE, OPEN, CLOSED = "lane", "handshake", "open", "closed"

COUNTERS: Final = (
    "frames_in",
    "frames_out",
    "bytes_in",
    "bytes_out",
    "bad_frames",
    "auth_failures",
    "handshake_timeouts",
    "dropped_frames",
    "connections_in",
    "connections_out",
    "connect_failures",
    "rejected_connections",
    "idle_closed",
    "handler_errors",
    "bulk_in",
    "bulk_out",
    "bulk_bytes_in",
    "bulk_bytes_out",
)

logger = logging.getLogger(__name__)


class Conn:
    """One TCP connection of either lane. Subclasses are also asyncio protocols and implement ``describe``.

    ``ready`` (dialled connections only) resolves to None once the handshake is done, or to the failure.
    """

    def __init__(self, table: ConnectionTable, *, outbound: bool, state: str, remote: str = "?",
                 tcp: asyncio.Transport | None = None) -> None:
        self.table = table
        self.outbound = outbound
        self.state = state
        self.remote = remote
        self.tcp = tcp
        self.peer: Peer | None = None
        self.ready: asyncio.Future[BaseException | None] | None = None
        self.closed_by_us = False
        self.last_active_at = table.loop.time()
        self._timer: asyncio.TimerHandle | None = None

    def describe(self) -> str:
        """What this connection is, for log lines (direction, lane, peer)."""
        raise NotImplementedError

    def buffered(self) -> int:
        """Bytes received and not yet consumed (reported when the handshake times out)."""
        return 0

    def busy(self) -> bool:
        """True while closing it would cut data in flight (here: bytes still in the socket's write buffer)."""
        return self.tcp is not None and self.tcp.get_write_buffer_size() > 0

    def abort(self) -> None:
        self._closing()
        if self.tcp is not None:
            self.tcp.abort()

    def close(self) -> None:
        self._closing()
        if self.tcp is not None:
            self.tcp.close()

    def _closing(self) -> None:
        self.closed_by_us = True
        self.state = CLOSED
        self._cancel_timer()

    def _write(self, data: bytes | memoryview) -> None:
        assert self.tcp is not None
        self.tcp.write(data)
        self.table.counters["bytes_out"] += len(data)
        self.last_active_at = self.table.loop.time()

    def _arm_handshake_timer(self) -> None:
        """Inbound connections: abort unless the handshake is done within ``handshake_timeout``."""
        self._timer = self.table.loop.call_later(self.table.cfg.handshake_timeout, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.state in (LANE, HANDSHAKE):
            self.table.counters["handshake_timeouts"] += 1
            self.table.log.warning("closing %s: no handshake within %.1fs (%d bytes buffered)",
                                   self.describe(), self.table.cfg.handshake_timeout, self.buffered())
            self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionTable:
    """Every connection of one node, control and bulk, open or still handshaking, and what they share.

    ``me`` is None until the owner starts; ``closing`` is set by the owner when it begins to shut down.
    """

    def __init__(self, cfg: TransportConfig, key: bytes | None, loop: asyncio.AbstractEventLoop,
                 log: logging.Logger = logger) -> None:
        self.cfg = cfg
        self.key = key
        self.loop = loop
        self.log = log
        self.me: Peer | None = None
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.closing = False
        self._conns: set[Conn] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[Conn]:
        return iter(list(self._conns))  # a snapshot: closing one while iterating is fine

    # ---------------------------------------------------------------- membership

    def admit(self, conn: Conn) -> bool:
        """Count in a connection whose TCP link just came up; False (and counted) for an inbound one over the limit."""
        if not conn.outbound and (self.closing or len(self._conns) >= self.cfg.max_connections):
            self.counters["rejected_connections"] += 1
            self.log.warning("rejecting inbound connection from %s: %d connections open (max_connections %d)",
                             conn.remote, len(self._conns), self.cfg.max_connections)
            return False
        self._conns.add(conn)
        self.counters["connections_out" if conn.outbound else "connections_in"] += 1
        return True

    def lost(self, conn: Conn) -> None:
        self._conns.discard(conn)

    def replace(self, old: Conn, new: Conn) -> None:
        """``new`` takes over ``old``'s TCP link (an inbound connection that named the bulk lane)."""
        self._conns.discard(old)
        self._conns.add(new)

    def make_room(self) -> bool:
        """Room for one more connection, closing the least recently used idle one if needed; False if none is idle."""
        if len(self._conns) < self.cfg.max_connections:
            return True
        idle = [c for c in self._conns if c.state == OPEN and not c.busy()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active_at)
        self.log.debug("max_connections reached: closing the least recently used %s", victim.describe())
        victim.close()
        self._conns.discard(victim)
        return True

    def remote_error(self, conn: Conn, exc: RemoteProtocolError) -> None:
        """The peer sent something invalid: count it, log one warning, fail a pending dial, abort the connection."""
        counter = "auth_failures" if isinstance(exc, AuthenticationError) else "bad_frames"
        self.counters[counter] += 1
        self.log.warning("closing %s: %s", conn.describe(), exc)
        if conn.ready is not None and not conn.ready.done():
            conn.ready.set_result(exc)
        conn.abort()

    # ---------------------------------------------------------------- idle sweep and shutdown

    def start_sweeping(self) -> None:
        """Close connections idle for ``idle_timeout`` (checked every quarter of it, 0.05 to 10 s)."""
        interval = min(max(self.cfg.idle_timeout / 4, 0.05), 10.0)
        self._sweep_handle = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweep_handle = None
        if self.closing:
            return
        cutoff = self.loop.time() - self.cfg.idle_timeout
        for conn in list(self._conns):
            if conn.state == OPEN and conn.last_active_at < cutoff and not conn.busy():
                self.counters["idle_closed"] += 1
                self.log.debug("closing idle %s", conn.describe())
                conn.close()
        self.start_sweeping()

    def close(self) -> None:
        """Stop the sweep and close every connection (their ``connection_lost`` follows on the loop)."""
        self.closing = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for conn in list(self._conns):
            conn.close()
