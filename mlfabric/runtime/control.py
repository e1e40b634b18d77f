"""Local control endpoint: a minimal HTTP/1.1 JSON server on asyncio, and a small client for it.

Routes are registered by the daemon (``GET /status``, ``GET /lookup?key=N``; later issues add
``/metrics``). One request per connection (``Connection: close``). The request head is bounded
(``MAX_REQUEST`` bytes) and must arrive within ``REQUEST_TIMEOUT``; a malformed request gets a 400
and the connection is closed. Handler tasks are tracked and cancelled on close.
Must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from mlfabric.errors import MlfabricError

logger = logging.getLogger(__name__)

MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
MAX_RESPONSE: Final = 64 << 20
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Request Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
            504: "Gateway Timeout"}


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json({"error": message}, status)


Handler = Callable[[dict[str, str]], Awaitable[Response]]


class ControlError(MlfabricError):
    """The control endpoint could not be reached or answered garbage."""


class _HttpConn(asyncio.Protocol):
    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.tcp: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handled = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        self._timer = self.server.loop.call_later(REQUEST_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.handled:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_REQUEST:
                self._respond(Response.error(413, "request head too large"))
            return
        if end > MAX_REQUEST:
            self._respond(Response.error(413, "request head too large"))
            return
        self.handled = True
        head = bytes(self.buf[:end])
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
        except (UnicodeDecodeError, ValueError):
            self._respond(Response.error(400, "malformed request"))
            return
        if method != "GET":
            self._respond(Response.error(405, "only GET is supported"))
            return
        url = urlsplit(target)
        handler = self.server.routes.get(url.path)
        if handler is None:
            self._respond(Response.error(404, f"no route {url.path}"))
            return
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        task = self.server.loop.create_task(self._run(handler, query), name=f"mlfabric-control {url.path}")
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, handler: Handler, query: dict[str, str]) -> None:
        try:
            response = await handler(query)
        except asyncio.CancelledError:
            if self.tcp is not None:
                self.tcp.abort()
            raise
        except Exception:
            logger.exception("control handler failed")
            response = Response.error(500, "internal error")
        self._respond(response)

    def _respond(self, response: Response) -> None:
        self.handled = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.tcp is None or self.tcp.is_closing():
            return
        reason = _REASONS.get(response.status, "Unknown")
        head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n").encode()
        self.tcp.write(head + response.body)
        self.tcp.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ControlServer:
    """``routes`` maps a path to ``async handler(query) -> Response``."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = dict(routes)
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.address: str | None = None

    async def start(self, host: str, port: int) -> str:
        self._server = await self.loop.create_server(lambda: _HttpConn(self), host, port, reuse_address=True)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        shown = f"[{sock_host}]" if ":" in sock_host else sock_host
        self.address = f"{shown}:{sock_port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


# -------------------------------------------------------------------- client


async def get_json(address: str, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``path`` from a control endpoint; returns (status, decoded JSON). Raises ControlError."""
    from mlfabric.config import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    writer = None
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            while chunk := await reader.read(1 << 16):  # to EOF, bounded
                raw += chunk
                if len(raw) > MAX_RESPONSE:
                    raise ControlError(f"response from {address} larger than {MAX_RESPONSE} bytes")
    except TimeoutError:
        raise ControlError(f"control endpoint {address} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach control endpoint {address}: {exc.strerror or exc}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body)
    except (IndexError, ValueError) as exc:
        raise ControlError(f"control endpoint {address} answered garbage: {exc}") from None
