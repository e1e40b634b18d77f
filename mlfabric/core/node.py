"""NodeCore: the machines of one node composed behind one sans-IO interface.

The runtime (real TCP) and the simulator drive exactly this object:
``receive(src, msg, now)``, ``handle_timer(now)``, ``next_deadline()``, ``drain_outbox()`` ->
``[(address, message)]``, ``next_event()``. It holds the Chord overlay, the failure detector and the
training jobs (with their aggregator): one outbox, one event queue, one timer. The jobs see the
other machines' events (deaths, lookups they started, predecessor changes) before the host does.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from mlfabric.config import FailureConfig, JobsConfig, OverlayConfig
from mlfabric.core.aggregate import Strategy, WithPayload
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import Event
from mlfabric.core.failure import FailureDetector
from mlfabric.core.jobs import JOB_MESSAGES, JobMachine
from mlfabric.wire.messages import (
    Alive,
    BackpointerCopy,
    FailureNotice,
    Leaving,
    Message,
    NoticeAck,
    Peer,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResult,
    Register,
)

_DETECTOR_MESSAGES = (Ping, ProbeRequest, ProbeResult, FailureNotice, NoticeAck, Alive, Register, BackpointerCopy)


class NodeCore:
    def __init__(
        self,
        me: Peer,
        cfg: OverlayConfig,
        rng: random.Random,
        failure: FailureConfig | None = None,
        incarnation: int = 0,
        jobs: JobsConfig | None = None,
        strategy: Strategy[Any] | None = None,
        tasks: Iterable[str] | None = None,
    ) -> None:
        self.me = me
        self.cfg = cfg
        self.chord = ChordMachine(me, cfg, rng)
        self.detector = FailureDetector(self.chord, failure or FailureConfig(), incarnation)
        # Without a strategy (a node that only routes) job messages are counted and dropped.
        self.jobs: JobMachine | None = None
        if strategy is not None:
            self.jobs = JobMachine(me, jobs or JobsConfig(), self.chord, rng, strategy, send=self.chord.send,
                                   is_dead=self.detector.is_dead, tasks=tasks)
        self._events: deque[Event] = deque()
        self.ignored_job_messages = 0
        self._now = 0.0  # the latest time an input brought (events drained between inputs use it)
        self._started = False

    def bootstrap(self, seeds: list[str], now: float) -> None:
        self.chord.bootstrap(seeds, now)
        self.detector.start(now)
        self._started = True
        self._route_events(now)

    def install(self, predecessor: Peer | None, successors: list[Peer], fingers: list[Peer | None],
                now: float) -> None:
        """Start from a converged ring's routing state (simulations that skip the join protocol)."""
        self.chord.install(predecessor, successors, fingers, now)
        self.detector.start(now)
        self._started = True
        self._route_events(now)

    def receive(self, src: Peer, msg: Message | WithPayload, now: float) -> None:
        if self.chord.leaving:
            return
        self.detector.observe(src, now)
        if isinstance(msg, (WithPayload, *JOB_MESSAGES)):
            if self.jobs is not None:
                self.jobs.receive(src, msg, now)
            else:
                self.ignored_job_messages += 1
        elif isinstance(msg, _DETECTOR_MESSAGES):
            self.detector.receive(src, msg, now)
        elif isinstance(msg, Pong):
            if not self.detector.receive(src, msg, now):
                self.chord.receive(src, msg, now)
        else:
            if isinstance(msg, Leaving):
                self.detector.departed(src, now)  # before the overlay drops it: needs its neighbours
                self.chord.receive(src, msg, now)
                self.detector.verify_predecessor(now)
                if self.jobs is not None:
                    self.jobs.peer_gone(src.id, now)
            else:
                self.chord.receive(src, msg, now)
        self._route_events(now)

    def handle_timer(self, now: float) -> None:
        self.detector.observe(None, now)
        self.chord.handle_timer(now)
        if self._started and not self.chord.leaving:
            self.detector.handle_timer(now)
            if self.jobs is not None:
                self._route_events(now)
                self.jobs.handle_timer(now)
        self._route_events(now)

    def next_deadline(self) -> float | None:
        a = self.chord.next_deadline()
        if not self._started or self.chord.leaving:
            return a
        times = [a, self.detector.next_deadline(), self.jobs.next_deadline() if self.jobs is not None else None]
        return min((t for t in times if t is not None), default=None)

    def drain_outbox(self) -> list[tuple[str, Message]]:
        return self.chord.drain_outbox()

    def next_event(self) -> Event | None:
        self._route_events(self._now)
        return self._events.popleft() if self._events else None

    def _route_events(self, now: float) -> None:
        """Hand the overlay's and the detector's events to the jobs first (they consume the lookups they
        started), then queue them, and the jobs' own, for the host."""
        self._now = max(self._now, now)
        jobs = self.jobs
        while (ev := self.chord.next_event()) is not None:
            if jobs is not None and jobs.on_event(ev, self._now):
                continue
            self._events.append(ev)
        if jobs is not None:
            while jobs.events:
                self._events.append(jobs.events.popleft())

    def lookup(self, key: int, now: float) -> int:
        return self.chord.lookup(key, now)

    def leave(self, now: float) -> None:
        if self.jobs is not None:
            self.jobs.leave(now)
        self.chord.leave(now)
        self.detector.stop()
        self._route_events(now)

    def unreachable(self, address: str, now: float) -> None:
        self.chord.unreachable(address, now)
        if self._started and not self.chord.leaving:
            self.detector.unreachable(address, now)
        self._route_events(now)

    def status(self) -> dict[str, Any]:
        c = self.chord
        return {
            "id": self.me.id,
            "address": self.me.address,
            "joined": c.joined,
            "incarnation": self.detector.incarnation,
            "failure_scheme": self.detector.cfg.scheme,
            "predecessor": c.predecessor.to_json() if c.predecessor else None,
            "successors": [s.to_json() for s in c.successors] or [self.me.to_json()],
            "fingers": [f.to_json() if f else None for f in c.fingers],
            "counters": {**c.counters, **self.detector.counters},
        }
