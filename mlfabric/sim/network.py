"""A seeded discrete-event network that runs real NodeCore objects on a virtual clock.

One heap of (time, seq, ...) entries; equal times pop in insertion order; every random choice
(latency, loss) comes from one seeded ``random.Random``, so the same seed gives the same event trace
(``trace_digest`` fingerprints it). Links have a latency drawn per message from ``latency``; an
optional ``link_latency(src, dst) -> (lo, hi)`` gives links their own range. Crashes are fail-stop:
a crashed node receives nothing and its timers stop. A partition assigns nodes to groups; messages
between groups are dropped. With ``wire=True`` every message goes through ``encode``/``decode``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import struct
from collections.abc import Callable, Iterable

from mlfabric.core.events import Event
from mlfabric.core.node import NodeCore
from mlfabric.wire.codec import decode, encode

_DELIVER, _FIRE, _CALL = 0, 1, 2


class SimNetwork:
    def __init__(
        self,
        seed: int,
        latency: tuple[float, float] = (0.001, 0.020),
        loss: float = 0.0,
        wire: bool = False,
        trace: bool = False,
        link_latency: Callable[[str, str], tuple[float, float]] | None = None,
    ) -> None:
        self.now = 0.0
        self.latency = latency
        self.loss = loss
        self.wire = wire
        self.link_latency = link_latency
        self._rng = random.Random(f"simnet:{seed}")
        self._heap: list[tuple] = []
        self._seq = itertools.count()
        self.nodes: dict[str, NodeCore] = {}
        self.crashed: set[str] = set()
        self._armed: dict[str, tuple[float, int]] = {}
        self._group: dict[str, int] = {}
        self.messages = 0
        self.dropped = 0
        self.bytes = 0
        self._trace = hashlib.sha256() if trace else None
        self.on_event: Callable[[str, Event], None] | None = None
        self.on_send: Callable[[str, str, object], None] | None = None  # (src, dst, msg) for every send

    # ------------------------------------------------------------------ topology

    def add(self, core: NodeCore) -> None:
        self.nodes[core.me.address] = core

    def crash(self, address: str) -> None:
        """Fail-stop: the node never sends or receives again."""
        self.crashed.add(address)
        self._armed.pop(address, None)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: messages between different groups are dropped. Unlisted nodes form group -1."""
        self._group = {}
        for g, members in enumerate(groups):
            for addr in members:
                self._group[addr] = g

    def heal(self) -> None:
        self._group = {}

    def live(self) -> list[NodeCore]:
        return [c for a, c in self.nodes.items() if a not in self.crashed]

    # ------------------------------------------------------------------ scheduling

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``at`` (scenario scripting: joins, crashes, lookups)."""
        heapq.heappush(self._heap, (max(at, self.now), next(self._seq), _CALL, fn, None, None))

    def pump(self, address: str) -> None:
        """Flush a node's outbox and events and (re)arm its timer. Call after any direct input."""
        core = self.nodes[address]
        out = core.drain_outbox()
        if out:
            rng = self._rng
            on_send = self.on_send
            for dst, msg in out:
                self.messages += 1
                if on_send is not None:
                    on_send(address, dst, msg)
                if self._trace is not None:
                    self._trace.update(struct.pack(">dI", self.now, msg.TYPE_ID) + address.encode() + dst.encode())
                if self.wire:
                    data = encode(msg)
                    self.bytes += len(data)
                    msg = decode(data)
                if self.loss and rng.random() < self.loss:
                    self.dropped += 1
                    continue
                if self._group and self._group.get(address, -1) != self._group.get(dst, -1):
                    self.dropped += 1
                    continue
                lo, hi = self.link_latency(address, dst) if self.link_latency else self.latency
                at = self.now + lo + (hi - lo) * rng.random()
                heapq.heappush(self._heap, (at, next(self._seq), _DELIVER, address, dst, msg))
        if self.on_event is not None:
            while (ev := core.next_event()) is not None:
                self.on_event(address, ev)
        else:
            while core.next_event() is not None:
                pass
        at = core.next_deadline()
        if at is not None:
            armed = self._armed.get(address)
            if armed is None or at < armed[0] or armed[0] < self.now:
                seq = next(self._seq)
                self._armed[address] = (at, seq)
                heapq.heappush(self._heap, (max(at, self.now), seq, _FIRE, address, seq, None))

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        nodes = self.nodes
        crashed = self.crashed
        while heap and heap[0][0] <= t_end:
            at, _, kind, a, b, msg = heapq.heappop(heap)
            self.now = at
            if kind == _DELIVER:
                if b in crashed:
                    continue
                core = nodes.get(b)
                src = nodes.get(a)
                if core is None or src is None:
                    continue
                core.receive(src.me, msg, at)
                self.pump(b)
            elif kind == _FIRE:
                armed = self._armed.get(a)
                if armed is None or armed[1] != b or a in crashed:
                    continue
                del self._armed[a]
                nodes[a].handle_timer(at)
                self.pump(a)
            else:
                a()
        self.now = max(self.now, t_end)

    def trace_digest(self) -> str:
        if self._trace is None:
            raise RuntimeError("SimNetwork was created without trace=True")
        return self._trace.hexdigest()
