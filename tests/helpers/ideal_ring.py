"""The rest of a converged Chord ring, answering one real machine at once: the unit tests' stand-in ring.

One real ``ChordMachine`` (or a ``NodeCore`` around one) is driven on a virtual clock. :class:`IdealRing`
plays every other node: it takes what the machine sends and answers at once (zero latency) from the
ideal ring of its members, so the machine reaches its ideal state through its own protocol and nothing
private is touched.

- FindSuccessor: done, with the key's true successor and the r - 1 nodes after it.
- GetNeighbors: the asked node's true predecessor and successor list (min(r, N - 1) nodes).
- Ping: a Pong with the incarnation the test set in ``incarnation`` (0 by default).
- ProbeRequest: alive, at the target's incarnation, unless the target is silent or gone (then nothing).
- FailureNotice: a NoticeAck when it carries a sequence number.
- Notify: the ring learns the machine's node (it is no member until it notifies), and the node's live
  predecessor, stabilizing, notifies it in turn with its own predecessor. With ``notify_back`` False
  only the first Notify (the one that makes the ring learn the node) is answered so: the test plays
  the predecessor's later stabilize itself.

A *silent* node (crashed or stalled) answers nothing but the others still name it: hearsay lags behind
a crash. A *gone* node answers nothing and nobody names it. ``hold`` picks messages the test answers
itself: they go to ``held`` instead of being answered.

The truth is :func:`mlfabric.core.ring.successor_of` and :func:`mlfabric.core.ring.ideal_routing`, the
judge the simulator and the real-process checks (``runtime.cluster.ideal_ring``) use too, never the
machine under test. :meth:`IdealRing.problems` and :meth:`IdealRing.converged` hold the machine to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import Event
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import MASK, ideal_routing, successor_of
from mlfabric.wire.messages import (
    FailureNotice,
    FindSuccessor,
    FindSuccessorReply,
    GetNeighbors,
    Message,
    Neighbors,
    NoticeAck,
    Notify,
    Peer,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResult,
)

# ---------------------------------------------------------------------------- the ring both unit files use

K = 1 << 60
ME = 8  # the node under test
ALL = list(range(16))


def P(k: int) -> Peer:
    """Node k of the evenly spaced ring of 16: id k * 2^60."""
    return Peer(k * K, f"n{k}:7700")


BY_ADDRESS = {P(k).address: P(k) for k in ALL}

C = TypeVar("C", bound=BaseModel)
M = TypeVar("M", ChordMachine, NodeCore)


def changed(cfg: C, **changes: object) -> C:
    """``cfg`` with some fields changed, validated like any config."""
    return type(cfg)(**{**cfg.model_dump(), **changes})


# ---------------------------------------------------------------------------- the ideal state


@dataclass(frozen=True, slots=True)
class Ideal:
    """What a node holds in a converged ring (Chord §4): its predecessor and that one's predecessor, its
    successor list (min(r, N - 1) nodes) and its 64 fingers."""

    predecessor: Peer
    pred_pred: Peer
    successors: list[Peer]
    fingers: list[Peer]


def ideal_state(me: Peer, ring: Iterable[Peer], r: int) -> Ideal:
    """The ideal state of ``me`` in the ring of ``ring`` and ``me``, from ``ideal_routing``."""
    by_id = {p.id: p for p in ring} | {me.id: me}
    ids = sorted(by_id)
    pred, succ, fingers = ideal_routing(me.id, ids)
    succs: list[int] = []
    for _ in range(min(r, len(ids) - 1)):
        succs.append(successor_of(((succs[-1] if succs else me.id) + 1) & MASK, ids))
    assert not succs or succs[0] == succ
    pred_pred = ideal_routing(pred, ids)[0]
    return Ideal(by_id[pred], by_id[pred_pred], [by_id[s] for s in succs], [by_id[f] for f in fingers])


def _k(p: Peer | None) -> str:
    return "none" if p is None else p.address


def problems_of(chord: ChordMachine, want: Ideal) -> list[str]:
    """What ``chord`` holds that differs from ``want``, one line per wrong pointer; [] when ideal."""
    out = []
    if chord.predecessor != want.predecessor:
        out.append(f"predecessor {_k(chord.predecessor)}, should be {_k(want.predecessor)}")
    if chord.pred_pred != want.pred_pred:
        out.append(f"pred_pred {_k(chord.pred_pred)}, should be {_k(want.pred_pred)}")
    if chord.successors != want.successors:
        out.append(f"successors {[_k(s) for s in chord.successors]}, should be {[_k(s) for s in want.successors]}")
    for i, (got, should) in enumerate(zip(chord.fingers, want.fingers, strict=True)):
        if got != should:
            out.append(f"finger {i} {_k(got)}, should be {_k(should)}")
    return out


# ---------------------------------------------------------------------------- the ring


class IdealRing(Generic[M]):
    """Every node but the machine's, converged, answering it at once; records what it sends and reports."""

    def __init__(self, machine: M, peers: Iterable[Peer], r: int) -> None:
        self.machine = machine
        self.chord: ChordMachine = machine.chord if isinstance(machine, NodeCore) else machine
        self.me = self.chord.me
        self.r = r
        self.members = {p.address: p for p in peers if p.id != self.me.id}
        self.knows_me = False  # set by the machine's first Notify
        self.notify_back = True  # its live predecessor answers every Notify (False: only the first)
        self.now = 0.0
        self.silent: set[str] = set()  # answer nothing, still named by the others
        self.gone: set[str] = set()  # answer nothing, named by nobody
        self.incarnation: dict[str, int] = {}
        self.hold: Callable[[str, Message], bool] = lambda dst, msg: False
        self.held: list[tuple[float, str, Message]] = []
        self.sent: list[tuple[float, str, Message]] = []
        self.events: list[tuple[float, Event]] = []

    # ------------------------------------------------------------ the ideal ring as the others see it

    def named(self) -> list[Peer]:
        """The nodes the others name, by id: the members not gone, and the machine's once it notified."""
        peers = [p for a, p in self.members.items() if a not in self.gone]
        if self.knows_me:
            peers.append(self.me)
        return sorted(peers, key=lambda p: p.id)

    def successors(self, key: int) -> tuple[Peer, ...]:
        """successor(key) and the nodes after it, r in all (fewer in a smaller ring)."""
        by_id = {p.id: p for p in self.named()}
        ids = sorted(by_id)
        out: list[int] = []
        for _ in range(min(self.r, len(ids))):
            out.append(successor_of(((out[-1] + 1) if out else key) & MASK, ids))
        return tuple(by_id[i] for i in out)

    def successor_list(self, peer: Peer) -> tuple[Peer, ...]:
        """The successor list ``peer`` holds in the ideal ring: the min(r, N - 1) nodes after it (itself
        when alone), as a node answers GetNeighbors."""
        return tuple(s for s in self.successors((peer.id + 1) & MASK) if s.id != peer.id) or (peer,)

    def predecessor(self, peer: Peer, live_only: bool = False) -> Peer:
        """``peer``'s predecessor among the named nodes (only the non-silent ones with ``live_only``)."""
        ring = {p.id: p for p in self.named() if not (live_only and p.address in self.silent)}
        pred = ideal_routing(peer.id, sorted(ring.keys() | {peer.id}))[0]
        return ring.get(pred, peer)

    def ideal(self) -> Ideal:
        """The machine's ideal state in this ring (the named nodes and its own)."""
        return ideal_state(self.me, self.named(), self.r)

    def problems(self) -> list[str]:
        return problems_of(self.chord, self.ideal())

    def converged(self) -> bool:
        """The machine holds exactly its ideal predecessor, pred_pred, successor list and fingers."""
        return not self.problems()

    # ------------------------------------------------------------ answering

    def _answer(self, src: Peer, msg: Message) -> list[tuple[Peer, Message]]:
        match msg:
            case FindSuccessor(req=req, key=key):
                return [(src, FindSuccessorReply(req=req, done=True, nodes=self.successors(key)))]
            case GetNeighbors(req=req):
                succs = self.successor_list(src)
                return [(src, Neighbors(req=req, predecessor=self.predecessor(src), successors=succs))]
            case Ping(seq=seq):
                return [(src, Pong(seq=seq, incarnation=self.incarnation.get(src.address, 0)))]
            case ProbeRequest(req=req, target=target) if target.address not in self.silent | self.gone:
                inc = self.incarnation.get(target.address, 0)
                return [(src, ProbeResult(req=req, target=target, alive=True, incarnation=inc))]
            case FailureNotice(seq=seq) if seq:
                return [(src, NoticeAck(seq=seq))]
            case Notify() if self.notify_back or not self.knows_me:
                # the ring learns the node; its live predecessor's stabilize notifies it in turn
                self.knows_me = True
                q = self.predecessor(self.me, live_only=True)
                return [(q, Notify(predecessor=self.predecessor(q)))]
        return []

    def answer(self, now: float | None = None) -> list[tuple[str, Message]]:
        """Deliver everything the machine sends (at ``now``, or the ring's time), answering requests,
        until it goes quiet; what it sent. Its events stay with it."""
        if now is not None:
            self.now = max(self.now, now)
        m, now = self.machine, self.now
        sent: list[tuple[str, Message]] = []
        for _ in range(1000):
            out = m.drain_outbox()
            if not out:
                return sent
            sent += out
            for dst, msg in out:
                self.sent.append((now, dst, msg))
                if self.hold(dst, msg):
                    self.held.append((now, dst, msg))
                    continue
                src = self.members.get(dst)
                if src is None or dst in self.silent or dst in self.gone:
                    continue
                for frm, reply in self._answer(src, msg):
                    m.receive(frm, reply, now)
        raise AssertionError("the machine never went quiet")

    # ------------------------------------------------------------ driving

    def flush(self) -> list[tuple[str, Message]]:
        """:meth:`answer`, then move the machine's events to ``events``; what it sent."""
        sent = self.answer()
        while (ev := self.machine.next_event()) is not None:
            self.events.append((self.now, ev))
        return sent

    def deliver(self, src: Peer, msg: Message) -> None:
        """``src`` sends ``msg`` to the machine now."""
        self.machine.receive(src, msg, self.now)
        self.flush()

    def _tick(self, at: float) -> None:
        self.now = max(self.now, at)
        self.machine.handle_timer(self.now)
        self.flush()

    def run(self, until: float) -> None:
        """Fire the machine's timers up to ``until``, the ring answering; the clock ends at ``until``."""
        for _ in range(100_000):
            at = self.machine.next_deadline()
            if at is None or at > until:
                break
            self._tick(at)
        else:
            raise AssertionError("timers never ran past `until`")
        self.now = max(self.now, until)

    def run_until_sent(self, match: Callable[[str, Message], bool], limit: float) -> tuple[float, str, Message]:
        """Fire timers one at a time until the machine sends a matching message; (time, dst, msg)."""
        mark = len(self.sent)
        while True:
            hit = next(((t, d, m) for t, d, m in self.sent[mark:] if match(d, m)), None)
            if hit is not None:
                return hit
            at = self.machine.next_deadline()
            assert at is not None and at <= limit, f"nothing matching was sent by t={limit}"
            mark = len(self.sent)
            self._tick(at)

    def run_until_event(self, kind: type[Event], limit: float) -> tuple[float, Event]:
        """Fire timers one at a time until the machine reports ``kind`` (counting one reported at this very
        moment); (time, event)."""
        mark = next((i for i, (t, _) in enumerate(self.events) if t >= self.now), len(self.events))
        while True:
            hit = next(((t, e) for t, e in self.events[mark:] if isinstance(e, kind)), None)
            if hit is not None:
                return hit
            at = self.machine.next_deadline()
            assert at is not None and at <= limit, f"no {kind.__name__} by t={limit}"
            mark = len(self.events)
            self._tick(at)

    def join(self, seed: str, limit: float = 60.0, step: float = 0.5) -> None:
        """Bootstrap the machine through ``seed`` and run until it holds its ideal state (by ``limit``)."""
        self.machine.bootstrap([seed], self.now)
        self.flush()
        while (wrong := self.problems()):
            assert self.now < limit, f"{self.me.address} did not reach its ideal state against a perfect ring: {wrong}"
            self.run(self.now + step)

    # ------------------------------------------------------------ reading

    def sent_between(self, t0: float, t1: float, kind: type[Message] = Message) -> list[tuple[str, Message]]:
        return [(d, m) for t, d, m in self.sent if t0 <= t <= t1 and isinstance(m, kind)]

    def events_of(self, kind: type[Event]) -> list[tuple[float, Event]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind)]
