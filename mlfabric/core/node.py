"""NodeCore: the machines of one node composed behind one sans-IO interface.

The runtime (real TCP) and the simulator drive exactly this object:
``receive(src, msg, now)``, ``handle_timer(now)``, ``next_deadline()``, ``drain_outbox()`` ->
``[(address, message)]``, ``next_event()``. For now it holds the Chord overlay; failure detection,
placement and aggregation machines join it in later issues.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import random
from typing import Any

from mlfabric.config import OverlayConfig
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import Event
from mlfabric.wire.messages import Message, Peer


class NodeCore:
    def __init__(self, me: Peer, cfg: OverlayConfig, rng: random.Random) -> None:
        self.me = me
        self.cfg = cfg
        self.chord = ChordMachine(me, cfg, rng)

    def bootstrap(self, seeds: list[str], now: float) -> None:
        self.chord.bootstrap(seeds, now)

    def receive(self, src: Peer, msg: Message, now: float) -> None:
        self.chord.receive(src, msg, now)

    def handle_timer(self, now: float) -> None:
        self.chord.handle_timer(now)

    def next_deadline(self) -> float | None:
        return self.chord.next_deadline()

    def drain_outbox(self) -> list[tuple[str, Message]]:
        return self.chord.drain_outbox()

    def next_event(self) -> Event | None:
        return self.chord.next_event()

    def lookup(self, key: int, now: float) -> int:
        return self.chord.lookup(key, now)

    def leave(self, now: float) -> None:
        self.chord.leave(now)

    def unreachable(self, address: str, now: float) -> None:
        self.chord.unreachable(address, now)

    def status(self) -> dict[str, Any]:
        c = self.chord
        return {
            "id": self.me.id,
            "address": self.me.address,
            "joined": c.joined,
            "predecessor": c.predecessor.to_json() if c.predecessor else None,
            "successors": [s.to_json() for s in c.successors] or [self.me.to_json()],
            "fingers": [f.to_json() if f else None for f in c.fingers],
            "counters": dict(c.counters),
        }
