"""Bulk lane: large tensors over TCP, received straight into preallocated memory (asyncio.BufferedProtocol).

Same listening port as the control lane; the dialler's first byte is ``b"B"`` (see transport.py).
After the usual handshake (the listener reads nothing else until the dialler's AuthProof verifies),
each blob is

    u32 big-endian header length | msgpack header (wire/blob.py: [name, dtype, shape, nbytes(, meta)]) | nbytes raw bytes

and the receiver answers each whole blob with one ``ACK`` byte, so :meth:`BulkLane.send` returns
only once the peer holds the data. Blobs to one address share one connection and are pipelined:
concurrent sends write one after another without waiting for the previous blob's ACK (a stall of
one round trip plus the receiver's handler per blob otherwise), and ACKs come back in order. The receiver validates the header (size bounded by
``transport.max_bulk_bytes``), allocates one ``bytearray`` of exactly ``nbytes`` and lets the kernel
write into it through ``get_buffer`` — no msgpack and no copy for the payload. The sender writes the
caller's buffer in slices (memoryviews, no copy on our side) and respects ``pause_writing``.
Received blobs go to the ``on_blob`` callback, by default the ``received`` queue.

Where the payload lands: an ``allocate(src, name, dtype, shape, nbytes)`` hook may return a writable
buffer of exactly ``nbytes`` (for instance a preallocated tensor's storage, so the bytes arrive in
place); otherwise payloads of 1 MiB and more go into a fresh anonymous mapping made with
``MAP_POPULATE`` (first-touch page faults of a fresh buffer cost more than the copy itself here:
~1.6 GB/s into a new bytearray versus ~3 GB/s into a populated mapping), smaller ones into a bytearray.
Must not import torch (learn/ converts blobs to tensors).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import secrets
from collections import deque
from collections.abc import Callable
from typing import Final

from mlfabric.config import parse_address
from mlfabric.errors import LocalProtocolError, RemoteProtocolError
from mlfabric.runtime._common import HANDSHAKE_MAX_FRAME, LANE_BULK, HandshakeFrames, TransportError, peername
from mlfabric.runtime.conns import CLOSED, HANDSHAKE, OPEN, Conn, ConnectionTable
from mlfabric.wire.blob import MAX_NAME, TensorBlob, pack_header, unpack_header
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.framing import HEADER, frame
from mlfabric.wire.handshake import DialerHandshake, ListenerHandshake
from mlfabric.wire.messages import NONCE_LEN, Peer

__all__ = ["BulkLane", "BlobHandler"]

logger = logging.getLogger(__name__)

BlobHandler = Callable[[Peer, str, TensorBlob], None]
Allocator = Callable[[Peer, str, str, tuple[int, ...], int], "bytearray | memoryview | mmap.mmap | None"]

ACK: Final = b"\x06"
MAX_HEADER: Final = 64 << 10  # name (<= 256 chars) + dtype + 8 dims + meta (<= wire.blob.MAX_META, 60 KiB): < 62 KiB
CHUNK: Final = 1 << 20  # sender slice; the socket buffer's high-water mark bounds what is queued
HIGH_WATER: Final = 4 << 20
POPULATE_MIN: Final = 1 << 20


def allocate_payload(nbytes: int) -> bytearray | mmap.mmap:
    """A zeroed writable buffer of ``nbytes``, prefaulted in one go when large."""
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes >= POPULATE_MIN and flags:
        try:
            return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
        except OSError:
            pass
    return bytearray(nbytes)

# receiver phases
_HS_LEN, _HS_BODY, _HDR_LEN, _HDR_BODY, _PAYLOAD = range(5)


class _BulkReceiver(Conn, asyncio.BufferedProtocol):
    """Listener side of a bulk connection; takes over the TCP transport after the lane byte."""

    tcp: asyncio.Transport

    def __init__(self, lane: BulkLane, tcp: asyncio.Transport, remote: str) -> None:
        table = lane.table
        super().__init__(table, outbound=False, state=HANDSHAKE, remote=remote, tcp=tcp)
        self.lane = lane
        assert table.me is not None
        self.hs = ListenerHandshake(table.me, table.key, secrets.token_bytes(NONCE_LEN))
        self._small = bytearray(HEADER)
        self._view = memoryview(self._small)
        self._pos = 0
        self._phase = _HS_LEN
        self._header: tuple[str, str, tuple[int, ...], bytes] | None = None
        self._payload: bytearray | memoryview | mmap.mmap | None = None

    def start(self, rest: bytes) -> None:
        self._arm_handshake_timer()
        self.tcp.set_protocol(self)
        view = memoryview(rest)
        while view and self.state != CLOSED:  # the few bytes read together with the lane byte
            k = min(len(view), len(self._view) - self._pos)
            self._view[self._pos : self._pos + k] = view[:k]
            view = view[k:]
            self.buffer_updated(k)

    # ---------------------------------------------------------------- asyncio callbacks

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._pos :]  # never empty: every phase expects at least one byte

    def buffer_updated(self, nbytes: int) -> None:
        if self.state == CLOSED:
            return
        self._pos += nbytes
        self.table.counters["bytes_in"] += nbytes
        self.last_active_at = self.table.loop.time()
        if self._pos < len(self._view):
            return
        try:
            self._complete()
        except RemoteProtocolError as exc:
            self.table.remote_error(self, exc)
        except Exception:  # our bug (e.g. an allocate hook): close this connection, keep the node serving
            self.table.counters["handler_errors"] += 1
            logger.exception("closing %s: local error while receiving", self.describe())
            self.abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self._cancel_timer()
        self._payload = None
        self.table.lost(self)

    # ---------------------------------------------------------------- protocol

    def _expect(self, buf: bytearray | memoryview | mmap.mmap, phase: int) -> None:
        self._view = memoryview(buf)
        self._pos = 0
        self._phase = phase

    def _length(self, limit: int, what: str) -> int:
        size = int.from_bytes(self._small, "big")
        if not 0 < size <= limit:
            raise RemoteProtocolError(f"{what} of {size} bytes outside 1..{limit}")
        return size

    def _complete(self) -> None:
        phase = self._phase
        if phase == _HS_LEN:
            self._expect(bytearray(self._length(HANDSHAKE_MAX_FRAME, "handshake frame")), _HS_BODY)
        elif phase == _HS_BODY:
            reply = self.hs.receive(decode(bytes(self._view), HANDSHAKE_MAX_FRAME))
            if reply is not None:
                self._write(frame(encode(reply)))
                self._expect(self._small, _HS_LEN)
                return
            self._cancel_timer()
            self.peer = self.hs.peer
            self.state = OPEN
            self._expect(self._small, _HDR_LEN)
        elif phase == _HDR_LEN:
            self._expect(bytearray(self._length(MAX_HEADER, "tensor header")), _HDR_BODY)
        elif phase == _HDR_BODY:
            name, dtype, shape, nbytes, meta = unpack_header(bytes(self._view), self.table.cfg.max_bulk_bytes)
            self._header = (name, dtype, shape, meta)
            if nbytes == 0:
                self._deliver(bytearray())
                return
            assert self.peer is not None
            self._payload = self.lane._allocate(self.peer, name, dtype, shape, nbytes)
            self._expect(self._payload, _PAYLOAD)
        else:
            payload, self._payload = self._payload, None
            assert payload is not None
            self._deliver(payload)

    def _deliver(self, payload: bytearray | memoryview | mmap.mmap) -> None:
        assert self._header is not None and self.peer is not None
        name, dtype, shape, meta = self._header
        self._header = None
        self._expect(self._small, _HDR_LEN)
        blob = TensorBlob(dtype=dtype, shape=shape, data=memoryview(payload), meta=meta)
        counters = self.table.counters
        counters["bulk_in"] += 1
        counters["bulk_bytes_in"] += len(payload)
        self.lane._deliver(self.peer, name, blob)
        if self.state == OPEN:
            self._write(ACK)

    # ---------------------------------------------------------------- used by the table

    def buffered(self) -> int:
        return self._pos

    def describe(self) -> str:
        who = f" (node {self.peer.id:#018x} at {self.peer.address})" if self.peer else ""
        return f"inbound bulk connection from {self.remote}{who}"

    def busy(self) -> bool:
        return self._phase in (_HDR_BODY, _PAYLOAD) or super().busy()


class _BulkSender(Conn, asyncio.Protocol):
    """Dialler side of a bulk connection: writes blobs, reads ACK bytes."""

    ready: asyncio.Future[BaseException | None]

    def __init__(self, lane: BulkLane, address: str) -> None:
        table = lane.table
        super().__init__(table, outbound=True, state=HANDSHAKE, remote=address)
        self.lane = lane
        self.address = address
        assert table.me is not None
        self.hs = DialerHandshake(table.me, table.key, secrets.token_bytes(NONCE_LEN))
        self._pre = HandshakeFrames()
        self.ready = table.loop.create_future()
        self._acks: deque[asyncio.Future[BaseException | None]] = deque()
        self._writable: asyncio.Future[None] | None = None
        self.paused = False
        self.sending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        if not self.table.admit(self):
            self.state = CLOSED
            transport.abort()
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._write(LANE_BULK + frame(encode(self.hs.start())))

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.table.counters["bytes_in"] += len(data)
        self.last_active_at = self.table.loop.time()
        try:
            if self.state == HANDSHAKE:
                self._pre.feed(data)
                msg = self._pre.next()
                if msg is None:
                    return
                self._write(frame(encode(self.hs.receive(msg))))
                assert self.hs.peer is not None
                self.peer = Peer(self.hs.peer.id, self.address)
                self.state = OPEN
                self.ready.set_result(None)
                data = self._pre.rest()
            for byte in data:
                if byte != ACK[0] or not self._acks:
                    raise RemoteProtocolError(f"unexpected byte {byte:#04x} instead of a bulk ACK")
                fut = self._acks.popleft()
                if not fut.done():
                    fut.set_result(None)
        except RemoteProtocolError as exc:
            self.table.remote_error(self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        failure = TransportError(f"bulk connection to {self.address} lost: {exc or 'closed by peer'}")
        if not self.ready.done():
            self.ready.set_result(exc or failure)
        while self._acks:
            fut = self._acks.popleft()
            if not fut.done():
                fut.set_result(failure)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self.lane._lost_sender(self)
        self.table.lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def write_blob(self, header: bytes, data: memoryview) -> asyncio.Future[BaseException | None]:
        """Write one blob; returns the future of its ACK (None, or the failure that lost the connection).

        Blobs are pipelined: the caller may write the next blob before this one's ACK is back (the
        receiver answers in order). A write interrupted halfway (cancelled, say by a timeout) would
        leave the stream mid-blob, so it aborts the connection.
        """
        loop = self.table.loop
        ack: asyncio.Future[BaseException | None] = loop.create_future()
        self._acks.append(ack)
        self.sending = True
        whole = False
        try:
            self._write(len(header).to_bytes(HEADER, "big") + header)
            for start in range(0, len(data), CHUNK):
                while self.paused and self.state == OPEN:
                    self._writable = loop.create_future()
                    await self._writable
                if self.state != OPEN:
                    break
                self._write(data[start : start + CHUNK])
            whole = True
        finally:
            self.sending = False
            if not whole and self.state == OPEN:
                logger.info("aborting %s: a blob write was interrupted", self.describe())
                self.abort()
        return ack

    def describe(self) -> str:
        return f"outbound bulk connection to {self.address}"

    def busy(self) -> bool:
        return self.sending or bool(self._acks) or super().busy()


class BulkLane:
    """Send and receive tensors on the bulk lane. Its connections count in ``table``, shared with the control
    lane; the listener (transport.py) hands it the inbound connections that name the bulk lane (:meth:`accept`)."""

    def __init__(self, table: ConnectionTable, on_blob: BlobHandler | None = None,
                 allocate: Allocator | None = None) -> None:
        self.table = table
        self.received: asyncio.Queue[tuple[Peer, str, TensorBlob]] = asyncio.Queue()
        self._on_blob = on_blob
        self.allocate = allocate
        self._senders: dict[str, _BulkSender] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(self, address: str, name: str, blob: TensorBlob, *, timeout: float | None = None) -> None:
        """Send ``blob`` to ``address``; returns once the peer has received all of it.

        ``blob.meta`` travels in the header; the receiver's delivered blob carries the same bytes.

        Raises :class:`TransportError` when the peer cannot be reached or the connection is lost, and
        ``TimeoutError`` after ``timeout`` seconds. ``blob.data`` must not change until this returns.
        """
        if len(name) > MAX_NAME:
            raise LocalProtocolError(f"tensor name longer than {MAX_NAME} characters")
        if self.table.closing or self.table.me is None:
            raise TransportError("transport is closed")
        header = pack_header(name, blob)
        if len(header) > MAX_HEADER:
            raise LocalProtocolError(f"tensor header of {len(header)} bytes exceeds {MAX_HEADER}")
        data = memoryview(blob.data).cast("B")
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with asyncio.timeout(timeout):
            async with lock:  # one writer at a time per connection; ACKs are awaited outside the lock
                sender = self._senders.get(address)
                if sender is None or sender.state != OPEN:
                    sender = await self._dial(address)
                ack = await sender.write_blob(header, data)
            failure = await ack
        if failure is not None:
            raise failure
        counters = self.table.counters
        counters["bulk_out"] += 1
        counters["bulk_bytes_out"] += len(data)

    async def _dial(self, address: str) -> _BulkSender:
        table = self.table
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise TransportError(str(exc)) from None
        if not table.make_room():
            raise TransportError(f"max_connections ({table.cfg.max_connections}) reached")
        sender = _BulkSender(self, address)
        try:
            async with asyncio.timeout(table.cfg.connect_timeout):
                await table.loop.create_connection(lambda: sender, host, port)
                failure = await sender.ready
        except (OSError, TimeoutError) as exc:
            sender.abort()
            table.counters["connect_failures"] += 1
            raise TransportError(f"cannot reach {address} on the bulk lane: {exc or type(exc).__name__}") from None
        except BaseException:
            sender.abort()
            raise
        if failure is not None:
            table.counters["connect_failures"] += 1
            raise TransportError(f"bulk handshake with {address} failed: {failure}")
        self._senders[address] = sender
        return sender

    def _allocate(self, src: Peer, name: str, dtype: str, shape: tuple[int, ...], nbytes: int
                  ) -> bytearray | memoryview | mmap.mmap:
        if self.allocate is not None:
            buf = self.allocate(src, name, dtype, shape, nbytes)
            if buf is not None:
                view = memoryview(buf)
                if view.readonly or view.nbytes != nbytes or not view.c_contiguous:
                    raise LocalProtocolError(f"allocate() returned an unusable buffer for {name!r} ({nbytes} bytes)")
                return view.cast("B") if view.format != "B" or view.ndim != 1 else view
        return allocate_payload(nbytes)

    def accept(self, tcp: asyncio.Transport, remote: str) -> _BulkReceiver:
        """Take over an inbound connection that named the bulk lane; the caller puts it in the table and starts it."""
        return _BulkReceiver(self, tcp, remote or peername(tcp))

    def _lost_sender(self, sender: _BulkSender) -> None:
        if self._senders.get(sender.address) is sender:
            del self._senders[sender.address]
            lock = self._locks.get(sender.address)
            if lock is not None and not lock.locked():
                del self._locks[sender.address]

    def _deliver(self, src: Peer, name: str, blob: TensorBlob) -> None:
        try:
            if self._on_blob is not None:
                self._on_blob(src, name, blob)
            else:
                self.received.put_nowait((src, name, blob))
        except Exception:
            self.table.counters["handler_errors"] += 1
            logger.exception("blob handler failed on %r from %s", name, src.address)

    async def close(self) -> None:
        for sender in list(self._senders.values()):
            sender.close()
        self._senders.clear()
