"""The wire pieces shared by the control lane (transport.py) and the bulk lane (bulk.py).

One TCP port serves both lanes; the dialler's first byte names the lane (``LANE_CONTROL`` or
``LANE_BULK``), then both lanes run the same handshake (wire/handshake.py) in length-prefixed frames.
Handshake frames are tiny, so they are split off the stream with a tight size limit before the
lane's own framing (and its much larger limits) takes over. The connection table and the connection
base class the lanes share are in conns.py. No torch here.
"""

from __future__ import annotations

from typing import Final

from mlfabric.errors import MlfabricError, RemoteProtocolError
from mlfabric.wire.codec import decode
from mlfabric.wire.framing import HEADER
from mlfabric.wire.messages import AuthProof, Hello, HelloAck, Message

LANE_CONTROL: Final = b"C"
LANE_BULK: Final = b"B"
HANDSHAKE_MAX_FRAME: Final = 1024  # Hello/HelloAck are < 400 bytes: a bigger "handshake" is garbage
HANDSHAKE_MESSAGES: Final = (Hello, HelloAck, AuthProof)


class TransportError(MlfabricError):
    """A local send could not be completed: peer unreachable, connection lost, or transport closed."""


class HandshakeFrames:
    """Splits the handshake frames off the front of a byte stream (frames over the limit are garbage)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def next(self) -> Message | None:
        """The next whole handshake message, or None until more bytes arrive."""
        buf = self._buf
        if len(buf) < HEADER:
            return None
        size = int.from_bytes(buf[:HEADER], "big")
        if size > HANDSHAKE_MAX_FRAME:
            raise RemoteProtocolError(f"handshake frame of {size} bytes exceeds limit {HANDSHAKE_MAX_FRAME}")
        if len(buf) < HEADER + size:
            return None
        body = bytes(buf[HEADER : HEADER + size])
        del buf[: HEADER + size]
        return decode(body, HANDSHAKE_MAX_FRAME)

    def rest(self) -> bytes:
        """Bytes after the handshake (the lane's own traffic), handed over once."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


def peername(tcp: object) -> str:
    """``host:port`` of the remote end of an asyncio transport, for log lines."""
    get = getattr(tcp, "get_extra_info", None)
    name = get("peername") if get else None
    if isinstance(name, tuple) and len(name) >= 2:
        host = str(name[0])
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return "?"
