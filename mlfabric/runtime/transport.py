"""TCP transport: the control lane (asyncio.Protocol per connection) and the listener shared with the bulk lane.

Wire layout (one listening port for both lanes; the dialler's first byte names the lane):

    dialler -> listener : b"C" (control) or b"B" (bulk, see bulk.py)
    both ways           : handshake frames (wire/handshake.py: Hello, HelloAck, AuthProof),
                          u32 big-endian length + msgpack body, at most 1 KiB each
    control lane        : length-prefixed msgpack messages (wire/framing.py, wire/codec.py), both ways

The listener reads nothing but the handshake until the dialler's AuthProof verifies, and drops a
connection that has not finished it within ``transport.handshake_timeout``.

Connections are per peer address. Outbound ones are dialled on demand by :meth:`Transport.send_nowait`
(reconnecting after a failure); an inbound one is registered under the address the peer advertised
in its Hello, so replies go back on the same TCP connection. ``send_nowait`` never awaits: frames
wait in a per-peer bounded queue (``send_queue_frames``) while the connection is being set up or
the socket's buffer is over its high-water mark (``pause_writing``); beyond that they are dropped
and counted, and the protocol's own timeouts recover. A peer that cannot be reached (connect or
handshake failure, or an open connection lost) is reported through ``on_unreachable(address)`` so
the driver can fail its pending requests at once.

Every error caused by remote input (:class:`RemoteProtocolError`, including
:class:`AuthenticationError`) closes that connection, increments a counter and logs one warning with
the peer's address; it never raises out of the transport, and the node keeps serving.
Must not import torch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlfabric.config import TransportConfig, parse_address
from mlfabric.errors import MlfabricError, RemoteProtocolError
from mlfabric.runtime import bulk as bulk_lane
from mlfabric.runtime._common import (
    HANDSHAKE_MESSAGES,
    LANE_BULK,
    LANE_CONTROL,
    HandshakeFrames,
    TransportError,
    peername,
)
from mlfabric.runtime.conns import CLOSED, HANDSHAKE, LANE, OPEN, Conn, ConnectionTable
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.framing import Framer, frame
from mlfabric.wire.handshake import DialerHandshake, ListenerHandshake
from mlfabric.wire.messages import NONCE_LEN, Message, Peer

__all__ = ["Transport", "TransportError"]

logger = logging.getLogger(__name__)

MessageHandler = Callable[[Peer, Message], None]
UnreachableHandler = Callable[[str], None]


class _ControlConn(Conn, asyncio.Protocol):
    """One control-lane TCP connection, either direction. ``peer`` is the peer as presented to the core."""

    def __init__(self, owner: Transport, *, outbound: bool, address: str | None = None) -> None:
        table = owner.table
        super().__init__(table, outbound=outbound, state=HANDSHAKE if outbound else LANE)
        self.owner = owner
        self.address = address  # dialled address, or (inbound) the address the peer advertised
        nonce = secrets.token_bytes(NONCE_LEN)
        assert table.me is not None
        self.hs: DialerHandshake | ListenerHandshake = (
            DialerHandshake(table.me, table.key, nonce) if outbound else ListenerHandshake(table.me, table.key, nonce)
        )
        self._pre = HandshakeFrames()
        self._framer: Framer | None = None
        self.paused = False
        self.was_open = False
        self.ready = table.loop.create_future() if outbound else None

    # ---------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self.remote = peername(transport)
        if not self.table.admit(self):
            self.closed_by_us = True
            self.state = CLOSED
            transport.abort()
            return
        if self.outbound:
            hello = self.hs.start()  # type: ignore[union-attr]
            self._write(LANE_CONTROL + frame(encode(hello)))
        else:
            self._arm_handshake_timer()

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_active_at = self.table.loop.time()
        self.table.counters["bytes_in"] += len(data)
        try:
            if self.state == LANE:
                lane, data = data[:1], data[1:]
                if lane == LANE_BULK:
                    self._cancel_timer()
                    self.state = CLOSED
                    self.owner._switch_to_bulk(self, data)
                    return
                if lane != LANE_CONTROL:
                    raise RemoteProtocolError(f"unknown lane byte {lane!r}")
                self.state = HANDSHAKE
                if not data:
                    return
            if self.state == HANDSHAKE:
                self._pre.feed(data)
                while self.state == HANDSHAKE and (msg := self._pre.next()) is not None:
                    self._handshake_step(msg)
                if self.state != OPEN:
                    return
                data = self._pre.rest()
                if not data:
                    return
            self._receive_frames(data)
        except RemoteProtocolError as exc:
            self.table.remote_error(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self._cancel_timer()
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(exc or TransportError("connection closed during the handshake"))
        self.owner._lost(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.owner._flush_link(self)

    # ---------------------------------------------------------------- protocol

    def _handshake_step(self, msg: Message) -> None:
        if isinstance(self.hs, DialerHandshake):
            proof = self.hs.receive(msg)
            self._write(frame(encode(proof)))
            assert self.hs.peer is not None and self.address is not None
            # Present the peer under the address we dialled: that is where the core sent its requests.
            self.peer = Peer(self.hs.peer.id, self.address)
            self._opened()
        else:
            reply = self.hs.receive(msg)
            if reply is not None:
                self._write(frame(encode(reply)))
                return
            assert self.hs.peer is not None
            self.peer = self.hs.peer
            self.address = self.hs.peer.address
            self._opened()

    def _opened(self) -> None:
        self._cancel_timer()
        self.state = OPEN
        self.was_open = True
        self._framer = Framer(self.table.cfg.max_frame)
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)
        self.owner._opened(self)

    def _receive_frames(self, data: bytes) -> None:
        assert self._framer is not None and self.peer is not None
        max_frame = self.table.cfg.max_frame
        for body in self._framer.feed(data):
            msg = decode(body, max_frame)
            if isinstance(msg, HANDSHAKE_MESSAGES):
                raise RemoteProtocolError(f"unexpected {type(msg).__name__} after the handshake")
            self.table.counters["frames_in"] += 1
            self.owner._deliver(self.peer, msg)
            if self.state != OPEN:
                return

    # ---------------------------------------------------------------- used by the Transport and the table

    def buffered(self) -> int:
        return self._pre.buffered

    def describe(self) -> str:
        if self.outbound:
            return f"outbound connection to {self.address}"
        who = f" (node {self.peer.id:#018x} at {self.peer.address})" if self.peer else ""
        return f"inbound connection from {self.remote}{who}"


@dataclass(slots=True)
class _Link:
    """Sending state for one peer address."""

    address: str
    conn: _ControlConn | None = None
    queue: deque[bytes] = field(default_factory=deque)
    dial: asyncio.Task[None] | None = None


class Transport:
    """Control lane plus the shared listener and the connection table both lanes draw from (``table``,
    :class:`mlfabric.runtime.conns.ConnectionTable`). See the module docstring for the wire layout.

    Lifecycle: ``port = await bind(host, port)``, then ``start(me, on_message, on_unreachable)``
    (``me`` usually carries the real port), ``send_nowait`` ..., ``await drain(timeout)``,
    ``await close()``. ``bulk`` is the bulk lane (:class:`mlfabric.runtime.bulk.BulkLane`).
    """

    def __init__(
        self,
        cfg: TransportConfig,
        key: bytes | None = None,
        *,
        on_blob: bulk_lane.BlobHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.table = ConnectionTable(cfg, key, self.loop, logger)  # every connection, control and bulk
        self.bulk = bulk_lane.BulkLane(self.table, on_blob)
        self._on_message: MessageHandler | None = None
        self._on_unreachable: UnreachableHandler | None = None
        self._links: dict[str, _Link] = {}
        self._dials: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._local_queue: deque[Message] = deque()
        self._local_handle: asyncio.Handle | None = None

    @property
    def me(self) -> Peer | None:
        """This node as its peers know it; None until :meth:`start`."""
        return self.table.me

    @property
    def counters(self) -> dict[str, int]:
        """Both lanes' counters (``mlfabric.runtime.conns.COUNTERS``), for /status and /metrics."""
        return self.table.counters

    @property
    def closing(self) -> bool:
        return self.table.closing

    # ---------------------------------------------------------------- lifecycle

    async def bind(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks one) without accepting yet; returns the real port."""
        self._server = await self.loop.create_server(
            lambda: _ControlConn(self, outbound=False),
            host,
            port,
            start_serving=False,
            backlog=1024,
            reuse_address=True,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, me: Peer, on_message: MessageHandler, on_unreachable: UnreachableHandler) -> None:
        """Accept connections as ``me``; deliver messages and unreachable peers to the callbacks."""
        self.table.me = me
        self._on_message = on_message
        self._on_unreachable = on_unreachable
        if self._server is not None:
            await self._server.start_serving()
        self.table.start_sweeping()

    async def drain(self, timeout: float) -> bool:
        """Wait (bounded) until queued control frames are written and dials settled; True when all went out."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._dials:
                        await asyncio.wait(set(self._dials))
                        continue
                    queued = any(link.queue for link in self._links.values())
                    buffered = any(c.busy() for c in self.table if isinstance(c, _ControlConn) and c.state == OPEN)
                    if not queued and not buffered:
                        return True
                    await asyncio.sleep(0.005)
        except TimeoutError:
            logger.info("transport drain gave up after %.1fs with frames still queued", timeout)
            return False

    async def close(self) -> None:
        self.table.closing = True
        if self._server is not None:
            self._server.close()
        if self._local_handle is not None:
            self._local_handle.cancel()
            self._local_handle = None
        self._local_queue.clear()
        dials = list(self._dials)
        for task in dials:
            task.cancel()
        if dials:
            await asyncio.gather(*dials, return_exceptions=True)
        await self.bulk.close()
        self.table.close()
        for link in self._links.values():
            self.counters["dropped_frames"] += len(link.queue)
            link.queue.clear()
        self._links.clear()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    # ---------------------------------------------------------------- sending

    def send_nowait(self, address: str, msg: Message) -> None:
        """Queue ``msg`` for ``address``; never awaits, never raises for network reasons."""
        if self.closing:
            self.counters["dropped_frames"] += 1
            return
        if self.me is not None and address == self.me.address:
            self._local_queue.append(msg)
            if self._local_handle is None:
                self._local_handle = self.loop.call_soon(self._deliver_local)
            return
        payload = encode(msg)
        if len(payload) > self.cfg.max_frame:
            self.counters["dropped_frames"] += 1
            logger.error("not sending %s of %d bytes to %s: over max_frame %d",
                         type(msg).__name__, len(payload), address, self.cfg.max_frame)
            return
        data = frame(payload)
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address)
        conn = link.conn
        if conn is not None and conn.state == OPEN and not conn.paused and not link.queue:
            conn._write(data)
            self.counters["frames_out"] += 1
            return
        if len(link.queue) >= self.cfg.send_queue_frames:
            self.counters["dropped_frames"] += 1
            logger.debug("send queue to %s full (%d frames): dropped %s", address, len(link.queue), type(msg).__name__)
            return
        link.queue.append(data)
        if (conn is None or conn.state == CLOSED) and link.dial is None:
            self._dial(link)

    def _deliver_local(self) -> None:
        # Our own address: hand the messages straight back, on the next loop turn (never re-entrantly).
        self._local_handle = None
        while self._local_queue and not self.closing and self.me is not None:
            self._deliver(self.me, self._local_queue.popleft())

    def _flush_link(self, conn: _ControlConn) -> None:
        link = self._links.get(conn.address or "")
        if link is None or link.conn is not conn or not link.queue:
            return
        if conn.state != OPEN or conn.paused:
            return
        n = len(link.queue)
        data = b"".join(link.queue)
        link.queue.clear()
        conn._write(data)
        self.counters["frames_out"] += n

    def _dial(self, link: _Link) -> None:
        task = self.loop.create_task(self._dial_run(link), name=f"mlfabric-dial {link.address}")
        link.dial = task
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial_run(self, link: _Link) -> None:
        address = link.address
        conn: _ControlConn | None = None
        try:
            host, port = parse_address(address)
            if not self.table.make_room():
                raise TransportError(f"max_connections ({self.cfg.max_connections}) reached")
            conn = _ControlConn(self, outbound=True, address=address)
            link.conn = conn
            async with asyncio.timeout(self.cfg.connect_timeout):
                await self.loop.create_connection(lambda: conn, host, port)  # type: ignore[return-value]
                assert conn.ready is not None
                failure = await conn.ready
            if failure is not None:
                raise failure
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()
            raise
        except (OSError, TimeoutError, ValueError, MlfabricError) as exc:
            link.dial = None
            if conn is not None:
                conn.abort()
            if link.conn is conn:
                link.conn = None
            self.counters["connect_failures"] += 1
            self.counters["dropped_frames"] += len(link.queue)
            link.queue.clear()
            if link.conn is None and self._links.get(address) is link:
                del self._links[address]
            if not isinstance(exc, RemoteProtocolError):  # those were logged where they happened
                logger.debug("cannot reach %s: %s", address, exc or type(exc).__name__)
            self._notify_unreachable(address)
        finally:
            link.dial = None

    # ---------------------------------------------------------------- callbacks from connections

    def _opened(self, conn: _ControlConn) -> None:
        assert conn.address is not None
        link = self._links.get(conn.address)
        if conn.outbound:
            if link is not None and link.conn is conn:
                self._flush_link(conn)
            return
        if link is None:
            link = self._links[conn.address] = _Link(conn.address)
        if link.conn is None or link.conn.state == CLOSED:
            link.conn = conn
            self._flush_link(conn)
        # else: a connection to that address already exists; this one only carries what the peer sends

    def _lost(self, conn: _ControlConn, exc: Exception | None) -> None:
        self.table.lost(conn)
        if conn.address is None:
            return
        link = self._links.get(conn.address)
        if link is None or link.conn is not conn:
            return
        link.conn = None
        if link.dial is not None:
            return
        if link.queue:
            self.counters["dropped_frames"] += len(link.queue)
            link.queue.clear()
        del self._links[conn.address]
        if conn.was_open and not conn.closed_by_us and not self.closing:
            logger.debug("%s lost: %s", conn.describe(), exc or "closed by peer")
            self._notify_unreachable(conn.address)

    def _switch_to_bulk(self, conn: _ControlConn, rest: bytes) -> None:
        assert conn.tcp is not None
        receiver = self.bulk.accept(conn.tcp, conn.remote)
        self.table.replace(conn, receiver)
        receiver.start(rest)

    def _deliver(self, src: Peer, msg: Message) -> None:
        assert self._on_message is not None
        try:
            self._on_message(src, msg)
        except Exception:
            self.counters["handler_errors"] += 1
            logger.exception("handler failed on %s from %s", type(msg).__name__, src.address)

    def _notify_unreachable(self, address: str) -> None:
        if self._on_unreachable is None or self.closing:
            return
        try:
            self._on_unreachable(address)
        except Exception:
            self.counters["handler_errors"] += 1
            logger.exception("unreachable handler failed for %s", address)

    # ---------------------------------------------------------------- introspection

    def peers(self) -> list[dict[str, Any]]:
        """One entry per peer address with a connection, for /status."""
        out = []
        for address, link in sorted(self._links.items()):
            conn = link.conn
            out.append({
                "address": address,
                "id": conn.peer.id if conn is not None and conn.peer is not None else None,
                "direction": None if conn is None else ("out" if conn.outbound else "in"),
                "state": "dialling" if conn is None else conn.state,
                "queued": len(link.queue),
            })
        return out

    @property
    def open_connections(self) -> int:
        return len(self.table)
