"""NodeDriver: runs one sans-IO NodeCore on asyncio (aioquic's shape, STYLE.md Example 5).

The driver is the only place that reads the clock for the core and the only timer the core has: after
every input (a message, an unreachable peer, the timer, a local call through :meth:`NodeDriver.call`)
it flushes the core's outbox, dispatches the core's events to waiters and listeners, and re-arms a
single ``call_at`` for ``core.next_deadline()``. Outbox items go to ``Transport.send_nowait``, except
those that carry a payload (:class:`~mlfabric.core.aggregate.WithPayload`), which go to the ``bulk``
port (the job host's bulk-lane sender); one whose payload is None is a plain message.
Also: :func:`loop_factory` / :func:`run`, which use uvloop when present. Must not import torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from mlfabric.core.aggregate import WithPayload
from mlfabric.core.events import Event, LookupDone
from mlfabric.core.node import NodeCore
from mlfabric.wire.messages import Message, Peer

logger = logging.getLogger(__name__)

T = TypeVar("T")
BulkSender = Callable[[str, WithPayload], None]
HISTORY = 256  # recent events kept for wait_for(include_past=True) and /status


class Sender(Protocol):
    def send_nowait(self, address: str, msg: Message) -> None: ...


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop factory when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """``asyncio.run`` on uvloop (when available)."""
    with asyncio.Runner(loop_factory=loop_factory(), debug=debug) as runner:
        return runner.run(main)


class NodeDriver:
    """Drives ``core`` with real time and a real transport. Create inside a running loop."""

    def __init__(self, core: NodeCore, transport: Sender, bulk: BulkSender | None = None) -> None:
        self.core = core
        self._transport = transport
        self.bulk = bulk  # where payload-carrying outbox items go (None: dropped, counted)
        self.dropped_payloads = 0
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        self._lookups: dict[int, asyncio.Future[LookupDone]] = {}
        self._subscribers: list[asyncio.Queue[Event]] = []
        self.listeners: list[Callable[[Event], None]] = []  # called synchronously with every event
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.stopped = False

    # ---------------------------------------------------------------- inputs

    def start(self, seeds: list[str]) -> None:
        self.core.bootstrap(list(seeds), now=self._loop.time())
        self._flush()

    def on_message(self, src: Peer, msg: Message | WithPayload) -> None:
        if self.stopped:
            return
        self.core.receive(src, msg, now=self._loop.time())
        self._flush()

    def on_unreachable(self, address: str) -> None:
        if self.stopped:
            return
        self.core.unreachable(address, now=self._loop.time())
        self._flush()

    def _on_timer(self) -> None:
        at = self._timer_at
        self._timer = None
        self._timer_at = None
        if self.stopped:
            return
        # uvloop's clock has millisecond resolution and may fire a hair before ``at``: the deadline
        # has been reached by definition when its timer runs, so never pass an earlier ``now``.
        now = self._loop.time()
        self.core.handle_timer(now=now if at is None else max(now, at))
        self._flush()

    def call(self, fn: Callable[[float], T]) -> T:
        """A direct input: ``fn(now)`` on the core with the loop clock (the job host's ``trained``,
        ``commit``, ``submit`` ...), then the flush. Call it on the loop thread."""
        if self.stopped:
            raise RuntimeError("driver stopped")
        try:
            return fn(self._loop.time())
        finally:
            self._flush()

    def leave(self) -> None:
        """Graceful leave (Chord §4.4): the core sends Leaving to its neighbours; flushed at once."""
        if self.stopped:
            return
        self.core.leave(now=self._loop.time())
        self._flush()

    def stop(self) -> None:
        """Stop driving the core: cancel the timer, fail waiters."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        for fut in self._lookups.values():
            if not fut.done():
                fut.cancel()
        self._lookups.clear()

    # ---------------------------------------------------------------- the one flush

    def _flush(self) -> None:
        for dst, msg in self.core.drain_outbox():
            if not isinstance(msg, WithPayload):
                self._transport.send_nowait(dst, msg)  # per-peer bounded queue; never awaits
            elif msg.payload is None:
                self._transport.send_nowait(dst, msg.msg)
            elif self.bulk is not None:
                self.bulk(dst, msg)
            else:
                self.dropped_payloads += 1
        while (event := self.core.next_event()) is not None:
            self._dispatch(event)
        at = self.core.next_deadline()
        if at != self._timer_at or (at is not None and self._timer is None):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = at
            if at is not None and not self.stopped:
                self._timer = self._loop.call_at(at, self._on_timer)

    def _dispatch(self, event: Event) -> None:
        self.history.append(event)
        if isinstance(event, LookupDone):
            fut = self._lookups.pop(event.token, None)
            if fut is not None and not fut.done():
                fut.set_result(event)
        for queue in self._subscribers:
            queue.put_nowait(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("event listener failed on %r", event)
        if self._waiters:
            keep = []
            for pred, fut in self._waiters:
                if fut.done():
                    continue
                try:
                    hit = pred(event)
                except Exception as exc:  # a broken predicate fails its own waiter, not the node
                    fut.set_exception(exc)
                    continue
                if hit:
                    fut.set_result(event)
                else:
                    keep.append((pred, fut))
            self._waiters = keep

    # ---------------------------------------------------------------- awaiting results

    async def lookup(self, key: int, timeout: float | None = None) -> LookupDone:
        """Run a lookup through the core; returns its LookupDone (``node`` is None when it failed)."""
        if self.stopped:
            raise RuntimeError("driver stopped")
        token = self.core.lookup(key, now=self._loop.time())
        fut: asyncio.Future[LookupDone] = self._loop.create_future()
        self._lookups[token] = fut
        self._flush()  # a lookup the core answers locally completes here
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._lookups.pop(token, None)

    async def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float | None, *, include_past: bool = False
    ) -> Event:
        """The first event matching ``predicate`` (optionally among the last HISTORY events too)."""
        if include_past:
            for event in self.history:
                if predicate(event):
                    return event
        fut: asyncio.Future[Event] = self._loop.create_future()
        self._waiters.append((predicate, fut))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            if not fut.done():
                fut.cancel()

    def subscribe(self) -> asyncio.Queue[Event]:
        """A queue receiving every later event; call :meth:`unsubscribe` when done with it."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)
