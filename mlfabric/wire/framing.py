"""Length-prefixed framing, sans-IO: 4-byte big-endian length, then the payload.

Feed bytes in any chunking and get whole frames back. A length over the limit is the peer's fault
(:class:`RemoteProtocolError`) and is detected from the header alone, before any payload is buffered.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

from mlfabric.errors import LocalProtocolError, RemoteProtocolError

HEADER = 4
MAX_FRAME_LIMIT = (1 << 32) - 1


class Framer:
    """Incremental decoder of length-prefixed frames."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int) -> None:
        if not 0 < max_frame <= MAX_FRAME_LIMIT:
            raise LocalProtocolError(f"max_frame must be in 1..{MAX_FRAME_LIMIT}, got {max_frame}")
        self._buf = bytearray()
        self._max = max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a frame cut short is left here)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        start = 0
        buf = self._buf
        end = len(buf)
        while end - start >= HEADER:
            size = int.from_bytes(buf[start : start + HEADER], "big")
            if size > self._max:
                raise RemoteProtocolError(f"frame of {size} bytes exceeds limit {self._max}")
            if end - start < HEADER + size:
                break
            frames.append(bytes(buf[start + HEADER : start + HEADER + size]))
            start += HEADER + size
        if start:
            del buf[:start]
        return frames


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    if len(payload) > MAX_FRAME_LIMIT:
        raise LocalProtocolError(f"payload of {len(payload)} bytes cannot be framed")
    return len(payload).to_bytes(HEADER, "big") + payload
