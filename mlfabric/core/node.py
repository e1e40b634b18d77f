"""NodeCore: the machines of one node composed behind one sans-IO interface.

The runtime (real TCP) and the simulator drive exactly this object:
``receive(src, msg, now)``, ``handle_timer(now)``, ``next_deadline()``, ``drain_outbox()`` ->
``[(address, message)]``, ``next_event()``. It holds the Chord overlay and the failure detector
(which share the outbox and the event queue); placement and aggregation join in later issues.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import random
from typing import Any

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import Event
from mlfabric.core.failure import FailureDetector
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
    ) -> None:
        self.me = me
        self.cfg = cfg
        self.chord = ChordMachine(me, cfg, rng)
        self.detector = FailureDetector(self.chord, failure or FailureConfig(), incarnation)
        self._started = False

    def bootstrap(self, seeds: list[str], now: float) -> None:
        self.chord.bootstrap(seeds, now)
        self.detector.start(now)
        self._started = True

    def receive(self, src: Peer, msg: Message, now: float) -> None:
        if self.chord.leaving:
            return
        self.detector.observe(src, now)
        if isinstance(msg, _DETECTOR_MESSAGES):
            self.detector.receive(src, msg, now)
        elif isinstance(msg, Pong):
            if not self.detector.receive(src, msg, now):
                self.chord.receive(src, msg, now)
        else:
            if isinstance(msg, Leaving):
                self.detector.departed(src, now)  # before the overlay drops it: needs its neighbours
                self.chord.receive(src, msg, now)
                self.detector.verify_predecessor(now)
            else:
                self.chord.receive(src, msg, now)

    def handle_timer(self, now: float) -> None:
        self.detector.observe(None, now)
        self.chord.handle_timer(now)
        if self._started and not self.chord.leaving:
            self.detector.handle_timer(now)

    def next_deadline(self) -> float | None:
        a = self.chord.next_deadline()
        if not self._started or self.chord.leaving:
            return a
        b = self.detector.next_deadline()
        if a is None:
            return b
        return a if b is None or a < b else b

    def drain_outbox(self) -> list[tuple[str, Message]]:
        return self.chord.drain_outbox()

    def next_event(self) -> Event | None:
        return self.chord.next_event()

    def lookup(self, key: int, now: float) -> int:
        return self.chord.lookup(key, now)

    def leave(self, now: float) -> None:
        self.chord.leave(now)
        self.detector.stop()

    def unreachable(self, address: str, now: float) -> None:
        self.chord.unreachable(address, now)
        if self._started and not self.chord.leaving:
            self.detector.unreachable(address, now)

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
