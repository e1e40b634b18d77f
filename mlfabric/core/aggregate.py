"""Exactly-once aggregation of one round up a ring-range tree. Sans-IO: time comes in, messages go out.

A round's tree (built by :mod:`mlfabric.core.jobs`) gives every member a *range* of the ring,
measured as clockwise distance from the round's root: ``[lo, hi)`` where ``lo`` is the member's own
distance. It keeps ``[lo, own_hi)`` for itself (up to its first child: only itself, by its
successor pointer) and delegates the rest to its children, each of which splits its part again. So
the ranges of a round partition the ring, and a partial aggregate can say exactly whose updates it
holds as a few :class:`~mlfabric.core.spans.Spans` instead of a member list.

Per instance (one range of one attempt of one round) at a member:

1. its own update arrives through :meth:`TreeAggregator.contribute` (a member that does not train
   this round covers its range with nothing at once);
2. partials from below arrive through :meth:`TreeAggregator.receive`; one whose spans are disjoint
   from what the node counted is merged; one inside what it counted is a copy and is dropped; an
   overlapping one, or one marked as a possible duplicate (a resend: its first target may have passed
   it on), goes on untouched and marked, straight to the root (only the root decides between
   overlaps). So no update is ever added twice, and the partials that hold a given update nest: the
   root can always keep the larger;
3. once its whole range is covered, or its adaptive deadline passes, the node sends its partial to
   its parent; anything later goes up on its own. Every partial is acknowledged; an unacknowledged
   one, or one whose target is reported dead (acknowledged or not), goes to the next ancestor up the
   path, marked (several parents: every ancestor is one, the root last);
4. the root keeps every unit and counts a disjoint cover of them (most updates first). When the
   cover plus the ranges known to hold no live member is the whole ring, it finalises; at its
   deadline it hands the gaps to the job machine, which finds the first live member of each gap on
   the ring and asks it to re-cover the gap (*repair*): a member that never heard of the round covers
   it from its kept update, one that did sends everything it sent up again, straight to the root
   (its parent may have died after acknowledging it, unknown to it); after ``repair_rounds`` it
   finalises with what it has.

So every live contributor's update is counted at most once by construction (disjoint spans only),
and at least once unless it stays unreachable through every repair; a contributor that dies
mid-round is in or out as a whole, since an update is never split.

Deadlines adapt per job: a smoothed mean and deviation of how long the node's waits took (Jacobson's
RTO estimator: wait = mean + 4 * deviation, within bounds); a wait that ran out while something live
was still coming (a first send arrives after it, or a member answers that it still trains) backs it
off by half; one that ran out over a dead member does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mlfabric.config import JobsConfig
from mlfabric.core.ring import SIZE
from mlfabric.core.spans import FULL, Spans
from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.messages import MAX_SPANS, JobAck, JobPartial, JobPending, Message, Peer

__all__ = ["DeadlineEstimator", "InstanceKey", "Strategy", "TreeAggregator", "WithPayload", "RootResult"]

P = TypeVar("P")
InstanceKey = tuple[str, int, int, int]  # (job, round, attempt, lo)


class Strategy(Protocol[P]):
    """How payloads combine. ``merge`` may reuse ``into`` (it is consumed) but must not touch ``other``;
    ``copy`` gives a payload that can be merged into without changing the original; ``nbytes`` is the
    payload's size on the wire (the simulator charges it to the link)."""

    def merge(self, into: P, other: P) -> P: ...

    def copy(self, payload: P) -> P: ...

    def nbytes(self, payload: P) -> int: ...


@dataclass(frozen=True, slots=True)
class WithPayload:
    """An outbox item or input that carries a payload: ``msg`` is a wire message (the bulk lane's
    header), ``payload`` the host's object (a tensor, a tally) that travels as the blob's body."""

    msg: Message
    payload: Any
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class RootResult(Generic[P]):
    key: InstanceKey
    payload: P | None
    count: int
    members: int
    spans: Spans
    empty: Spans  # ranges found to hold no live member
    repair_requests: int
    dropped: int


class DeadlineEstimator:
    """Jacobson/Karels smoothed estimate of how long a wait takes; timeout = mean + 4 * deviation."""

    def __init__(self, initial: float, lo: float, hi: float) -> None:
        self.mean: float | None = None
        self.dev = 0.0
        self.initial, self.lo, self.hi = initial, lo, hi

    def timeout(self) -> float:
        if self.mean is None:
            return self.initial
        return min(self.hi, max(self.lo, self.mean + 4.0 * self.dev))

    def observe(self, sample: float) -> None:
        if self.mean is None:
            self.mean, self.dev = sample, sample / 2.0
        else:
            err = sample - self.mean
            self.mean += err / 8.0
            self.dev += (abs(err) - self.dev) / 4.0

    def expired(self) -> None:
        """The wait ran out before everything came: back off, the next wait is half as long again (it
        was three times as long: the deviation was raised to a quarter of the new mean as well, so
        waits grew by 3x per expired round and rounds with dead members slowed down ever more)."""
        target = min(self.hi, self.timeout() * 1.5)
        self.dev = min(self.dev, target / 8.0)
        self.mean = target - 4.0 * self.dev


@dataclass
class _Unit(Generic[P]):
    """A partial this node sent upward; kept until the round's next notice arrives."""

    seq: int
    spans: Spans
    count: int
    members: int
    payload: P | None
    tried: list[int] = field(default_factory=list)  # ancestor ids it went to, in order
    target: Peer | None = None
    sent_at: float = 0.0
    acked: bool = False
    dup: bool = False  # may be counted elsewhere already (a resend, an overlap): goes up marked, never merged
    direct: bool = False  # an answer to the root's repair request: to the root only


@dataclass(frozen=True, slots=True)
class _Piece(Generic[P]):
    spans: Spans
    count: int
    members: int
    payload: P | None
    dup: bool = False  # arrived marked as a possible duplicate (JobPartial.repair)


@dataclass
class _Instance(Generic[P]):
    key: InstanceKey
    root: Peer
    lo: int
    hi: int
    own_hi: int
    path: tuple[Peer, ...]  # ancestors, root first; empty at the root
    started_at: float
    deadline_at: float
    own_ready: bool = False
    acc: list[_Piece[P]] = field(default_factory=list)  # merged lazily when forwarded
    acc_spans: Spans = field(default_factory=Spans)
    counted: Spans = field(default_factory=Spans)  # in acc or already sent up
    passed: Spans = field(default_factory=Spans)  # marked pieces passed up untouched (on their way, not ours)
    forwarded: bool = False
    late: bool = False  # the deadline passed while our own update was still coming
    repaired: bool = False  # what we sent up went to the root again on its request
    deadline_passed: bool = False
    backed_off: bool = False
    members_from: dict[int, int] = field(default_factory=dict)  # sender id -> members its partials covered
    units: dict[int, _Unit[P]] = field(default_factory=dict)
    done: bool = False
    # root only
    pieces: list[_Piece[P]] = field(default_factory=list)
    cover: list[int] = field(default_factory=list)
    cover_spans: Spans = field(default_factory=Spans)
    empty: Spans = field(default_factory=Spans)
    root_deadline_at: float | None = None
    repair_left: int = 0
    repair_requests: int = 0
    pending_at: float | None = None  # last "still training" answer
    dropped: int = 0

    @property
    def is_root(self) -> bool:
        return not self.path


class TreeAggregator(Generic[P]):
    """Every aggregation instance of one node. The job machine owns it and gives it narrow ports:
    ``send(peer, message)``, ``is_dead(node_id)``, ``repair(key, gaps, now)`` (root: find and ask
    the first live member of each gap) and ``finished(result)`` (root: the round's sum)."""

    def __init__(self, me: Peer, strategy: Strategy[P], cfg: JobsConfig, *, send: Callable[[Peer, Any], None],
                 is_dead: Callable[[int], bool], repair: Callable[[InstanceKey, list[tuple[int, int]], float], None],
                 finished: Callable[[RootResult[P]], None]) -> None:
        self.me = me
        self.strategy = strategy
        self.cfg = cfg
        self._send = send
        self._is_dead = is_dead
        self._repair = repair
        self._finished = finished
        self._instances: dict[InstanceKey, _Instance[P]] = {}
        self._seq = 0
        self._estimators: dict[tuple[str, str], DeadlineEstimator] = {}
        self.counters = {"partials_sent": 0, "partials_resent": 0, "partials_received": 0, "overlaps": 0,
                         "repairs_requested": 0, "deadline_expired": 0, "pending_sent": 0, "redundant": 0}

    # ---- the job machine's interface -------------------------------------------------------------

    def open(self, now: float, key: InstanceKey, root: Peer, hi: int, own_hi: int, path: tuple[Peer, ...],
             levels: int) -> None:
        """Join an instance: this node covers ``[key.lo, hi)``, itself ``[key.lo, own_hi)``.
        ``levels``: about how many tree levels lie below (the wait grows with it)."""
        if key in self._instances:
            return
        lo = key[3]
        wait = self._estimator(key[0], "root" if not path else "wait").timeout()
        inst = _Instance(key=key, root=root, lo=lo, hi=hi or SIZE, own_hi=own_hi or SIZE, path=path,
                         started_at=now, deadline_at=now + wait + self.cfg.hop_allowance * levels)
        self._instances[key] = inst
        if inst.is_root:
            inst.repair_left = self.cfg.repair_rounds
            inst.root_deadline_at = inst.deadline_at

    def contribute(self, now: float, key: InstanceKey, payload: P | None, count: int) -> None:
        """This node's own update for an instance (``count`` 0 and ``payload`` None: nothing this round)."""
        inst = self._instances.get(key)
        if inst is None or inst.done or inst.own_ready:
            return
        inst.own_ready = True
        own = _Piece(Spans.of(inst.lo, inst.own_hi), count, 1,
                     self.strategy.copy(payload) if payload is not None else None)
        self._take(now, inst, own, None)
        if inst.is_root and inst.root_deadline_at is None:
            inst.root_deadline_at = now  # we held the round open for our own update: decide now
        self._progress(now, inst)

    def pending(self, key: InstanceKey) -> None:
        """Tell the root this node is alive and still training (answer to a repair)."""
        inst = self._instances.get(key)
        if inst is not None and not inst.done:
            self.counters["pending_sent"] += 1
            self._send(inst.root, JobPending(key[0], key[1], key[2]))

    def add_empty(self, now: float, key: InstanceKey, lo: int, hi: int) -> None:
        """The ring holds no live member in ``[lo, hi)`` (a dead child's own range): cover it with nothing,
        unless something we hold already covers part of it."""
        inst = self._instances.get(key)
        if inst is None or inst.done or hi <= lo:
            return
        piece: _Piece[P] = _Piece(Spans.of(lo, min(hi, inst.hi)), 0, 0, None)
        if piece.spans.intersects(inst.counted if not inst.is_root else inst.cover_spans):
            return
        if inst.is_root:
            self.gap_empty(now, key, lo, hi)
            return
        self._take(now, inst, piece, None)
        self._progress(now, inst)

    def gap_empty(self, now: float, key: InstanceKey, lo: int, hi: int) -> None:
        """Root: the ring holds no live member in ``[lo, hi)``: stop waiting for it."""
        inst = self._instances.get(key)
        if inst is not None and not inst.done and inst.is_root:
            inst.empty = inst.empty | Spans.of(lo, hi)
            self._root_check(now, inst)

    def receive(self, now: float, src: Peer, msg: Message, payload: Any = None) -> None:
        match msg:
            case JobPartial():
                self._on_partial(now, src, msg, payload)
            case JobAck():
                for inst in self._of(msg.job, msg.round, msg.attempt):
                    unit = inst.units.get(msg.seq)
                    if unit is not None and unit.target is not None and unit.target.id == src.id:
                        unit.acked = True
            case JobPending():
                for inst in self._of(msg.job, msg.round, msg.attempt):
                    if inst.is_root:
                        inst.pending_at = now
                        self._late(inst)

    def peer_dead(self, now: float, node: int) -> None:
        """A failure verdict: everything sent to ``node`` goes to the next ancestor, even what it
        acknowledged (it may have died before passing it on), marked as a possible duplicate."""
        for inst in list(self._instances.values()):
            if inst.done:
                continue
            for unit in list(inst.units.values()):
                if unit.target is not None and unit.target.id == node:
                    self._resend(now, inst, unit)

    def repair_request(self, now: float, key: InstanceKey) -> bool:
        """The root asks us, a member that has an instance already, to re-cover our range: what we
        sent up may have reached a parent that died without our hearing of it. Everything we sent up
        goes again, straight to the root and marked (the root keeps a disjoint cover, so a copy of what
        it has costs nothing); if we have not forwarded yet, we say we are still at it (JobPending).
        False when we have no such instance (the job machine opens one)."""
        inst = self._instances.get(key)
        if inst is None or inst.is_root:
            return False
        if not inst.forwarded:
            self.pending(key)
            return True
        if inst.repaired:
            return True  # sent to the root already; its acknowledgements settle it
        inst.repaired = True
        for unit in list(inst.units.values()):
            if unit.direct:
                continue
            self._seq += 1
            copy = _Unit(self._seq, unit.spans, unit.count, unit.members, unit.payload, dup=True, direct=True)
            inst.units[copy.seq] = copy
            self._resend(now, inst, copy, first=True)
        return True

    def has(self, key: InstanceKey) -> bool:
        return key in self._instances

    def counted(self, key: InstanceKey) -> Spans:
        """The ranges a non-root instance holds or has sent up (empty when there is no such instance)."""
        inst = self._instances.get(key)
        return inst.counted if inst is not None else Spans()

    def forget(self, job: str, before: tuple[int, int] | None = None) -> None:
        """Drop the instances of ``job`` older than (attempt, round) ``before`` (all when None)."""
        for key in [k for k in self._instances if k[0] == job and (before is None or (k[2], k[1]) < before)]:
            del self._instances[key]

    def instances(self, job: str, round_: int) -> list[InstanceKey]:
        return [k for k in self._instances if k[0] == job and k[1] == round_]

    def members_from(self, key: InstanceKey) -> dict[int, int]:
        """Members covered by the partials each sender sent us in an instance (subtree sizes)."""
        inst = self._instances.get(key)
        return dict(inst.members_from) if inst is not None else {}

    def covered(self, key: InstanceKey) -> bool:
        inst = self._instances.get(key)
        return inst is not None and inst.forwarded

    def view(self, key: InstanceKey) -> dict[str, Any] | None:
        inst = self._instances.get(key)
        if inst is None:
            return None
        out = {"lo": inst.lo, "hi": inst.hi, "forwarded": inst.forwarded, "own_ready": inst.own_ready,
               "units_unacked": sum(1 for u in inst.units.values() if not u.acked),
               "parent": inst.path[-1].to_json() if inst.path else None, "depth": len(inst.path)}
        if inst.is_root:
            out.update({"pieces": len(inst.pieces), "covered_intervals": len(inst.cover_spans),
                        "repair_requests": inst.repair_requests, "dropped": inst.dropped})
        return out

    def handle_timer(self, now: float) -> None:
        for inst in list(self._instances.values()):
            if inst.done:
                continue
            for unit in list(inst.units.values()):
                if not unit.acked and now >= unit.sent_at + self.cfg.ack_timeout:
                    self._resend(now, inst, unit)
            if inst.is_root:
                if inst.root_deadline_at is not None and now >= inst.root_deadline_at:
                    self._root_deadline(now, inst)
            elif not inst.forwarded and now >= inst.deadline_at:
                if inst.own_ready:
                    self.counters["deadline_expired"] += 1
                    inst.deadline_passed = True
                    self._forward(now, inst)
                else:
                    inst.late, inst.deadline_at = True, math.inf  # our own update is still coming: go with it

    def next_deadline(self) -> float | None:
        best = math.inf
        for inst in self._instances.values():
            if inst.done:
                continue
            for u in inst.units.values():
                if not u.acked and u.sent_at + self.cfg.ack_timeout < best:
                    best = u.sent_at + self.cfg.ack_timeout
            if inst.is_root:
                if inst.root_deadline_at is not None and inst.root_deadline_at < best:
                    best = inst.root_deadline_at
            elif not inst.forwarded and inst.deadline_at < best:
                best = inst.deadline_at
        return None if best == math.inf else best

    # ---- the machine ----------------------------------------------------------------------------

    def _of(self, job: str, round_: int, attempt: int) -> list[_Instance[P]]:
        return [i for k, i in self._instances.items() if k[0] == job and k[1] == round_ and k[2] == attempt
                and not i.done]

    def _estimator(self, job: str, role: str) -> DeadlineEstimator:
        est = self._estimators.get((job, role))
        if est is None:
            c = self.cfg
            est = self._estimators[(job, role)] = DeadlineEstimator(c.initial_wait, c.min_wait, c.max_wait)
        return est

    def _on_partial(self, now: float, src: Peer, msg: JobPartial, payload: Any) -> None:
        self.counters["partials_received"] += 1
        # Acknowledge whatever happens: the sender must stop resending even if we drop it.
        self._send(src, JobAck(msg.job, msg.round, msg.attempt, msg.seq))
        if msg.count > 0 and payload is None:
            raise RemoteProtocolError("a partial with updates and no payload")
        spans = Spans.from_flat(msg.spans)
        piece = _Piece(spans, msg.count, msg.members, payload, dup=msg.repair)
        # The instance whose range holds the partial (a repair instance and the round's own may both
        # be open; the smallest range that contains it wins).
        best: _Instance[P] | None = None
        for inst in self._of(msg.job, msg.round, msg.attempt):
            if spans and inst.lo <= spans.intervals[0][0] and spans.intervals[-1][1] <= inst.hi:
                if best is None or inst.hi - inst.lo < best.hi - best.lo:
                    best = inst
        if best is None:
            return  # an old round or attempt, or nothing of ours: dropped (acknowledged above)
        best.members_from[src.id] = best.members_from.get(src.id, 0) + msg.members
        self._take(now, best, piece, src)
        self._progress(now, best)

    def _late(self, inst: _Instance[P]) -> None:
        """Something live came after our wait ran out (a first send, or a member still training): the
        wait was too short, back off once per instance. A wait that ran out over a dead member (nothing
        more comes, or only marked resends after its death) says nothing about how long to wait."""
        if inst.deadline_passed and not inst.backed_off:
            inst.backed_off = True
            self._estimator(inst.key[0], "root" if inst.is_root else "wait").expired()

    def _take(self, now: float, inst: _Instance[P], piece: _Piece[P], src: Peer | None) -> None:
        if src is not None and not piece.dup and piece.count > 0:
            self._late(inst)
        if inst.is_root:
            self._root_add(now, inst, piece)
            return
        if piece.spans and (piece.spans | inst.counted) == inst.counted:
            self.counters["redundant"] += 1  # inside what we counted (a failover copy of it): dropped
        elif piece.dup or piece.spans.intersects(inst.counted):
            # Merging a possible duplicate, or an overlap, into our partial would make it overlap another
            # partial that holds the same update, and the root could keep only one of the two: it goes
            # on as it came, marked, straight to the root (nobody on the way could merge it either, and
            # relaying it hop by hop would charge its payload to every ancestor), and the root chooses.
            self.counters["overlaps"] += 1
            inst.passed = inst.passed | piece.spans  # on its way up: our range need not wait for it
            self._send_unit(now, inst, piece, dup=True, direct=True)
        elif inst.forwarded:
            inst.counted = inst.counted | piece.spans
            self._send_unit(now, inst, piece)
        else:
            if len(inst.acc_spans) + len(piece.spans) > MAX_SPANS:
                self._flush_acc(now, inst)  # a partial's spans stay within the wire bound: split before
            inst.acc.append(piece)
            inst.acc_spans = inst.acc_spans | piece.spans
            inst.counted = inst.counted | piece.spans

    def _progress(self, now: float, inst: _Instance[P]) -> None:
        if inst.done or inst.is_root:
            if inst.is_root:
                self._root_check(now, inst)
            return
        if not inst.forwarded and inst.own_ready and (inst.late or (inst.counted | inst.passed).covers(inst.lo, inst.hi)):
            if not inst.late:
                self._estimator(inst.key[0], "wait").observe(max(0.0, now - inst.started_at))
            self._forward(now, inst)

    def _merge(self, pieces: list[_Piece[P]]) -> _Piece[P]:
        payload: P | None = None
        spans, count, members = Spans(), 0, 0
        for p in pieces:
            spans, count, members = spans | p.spans, count + p.count, members + p.members
            if p.payload is not None:
                payload = p.payload if payload is None else self.strategy.merge(payload, p.payload)
        return _Piece(spans, count, members, payload)

    def _flush_acc(self, now: float, inst: _Instance[P]) -> None:
        if inst.acc:
            merged = self._merge(inst.acc)
            inst.acc, inst.acc_spans = [], Spans()
            self._send_unit(now, inst, merged)

    def _forward(self, now: float, inst: _Instance[P]) -> None:
        inst.forwarded = True
        self._flush_acc(now, inst)

    def _send_unit(self, now: float, inst: _Instance[P], piece: _Piece[P], dup: bool = False,
                   direct: bool = False) -> None:
        self._seq += 1
        unit = _Unit(self._seq, piece.spans, piece.count, piece.members, piece.payload, dup=dup, direct=direct)
        inst.units[unit.seq] = unit
        self._resend(now, inst, unit, first=True)

    def _resend(self, now: float, inst: _Instance[P], unit: _Unit[P], first: bool = False) -> None:
        """To the nearest ancestor not tried yet and not known dead; when all were tried, round again
        from the nearest live one (a partial is never given up while an ancestor may be alive). A resend
        is marked as a possible duplicate (the first target may hold it): nobody merges it on the way."""
        ups = [inst.root] if unit.direct else list(reversed(inst.path))
        target = next((p for p in ups if p.id not in unit.tried and not self._is_dead(p.id)), None)
        if target is None:
            target = next((p for p in ups if not self._is_dead(p.id)), None)
            unit.tried.clear()
        if target is None:
            unit.target, unit.acked = None, True  # every ancestor is dead: the next attempt re-collects it
            return
        if not first:
            self.counters["partials_resent"] += 1
            unit.dup = True
        self.counters["partials_sent"] += 1
        unit.tried.append(target.id)
        unit.target, unit.sent_at, unit.acked = target, now, False
        job, rnd, attempt, _ = inst.key
        header = JobPartial(job, rnd, attempt, unit.seq, unit.spans.flat(), unit.count, unit.members,
                            repair=unit.dup)
        size = self.strategy.nbytes(unit.payload) if unit.payload is not None else 0
        self._send(target, WithPayload(header, unit.payload, size))

    # ---- the root -------------------------------------------------------------------------------

    def _root_add(self, now: float, inst: _Instance[P], piece: _Piece[P]) -> None:
        """Keep every piece; count a disjoint cover of them (most updates first), never an overlap."""
        inst.pieces.append(piece)
        if not piece.spans.intersects(inst.cover_spans):
            inst.cover.append(len(inst.pieces) - 1)
            inst.cover_spans = inst.cover_spans | piece.spans
            return
        inst.dropped += 1
        self.counters["overlaps"] += 1
        order = sorted(range(len(inst.pieces)), key=lambda i: (-inst.pieces[i].count, -inst.pieces[i].members,
                                                                -_extent(inst.pieces[i].spans), i))
        cover: list[int] = []
        spans = Spans()
        for i in order:
            s = inst.pieces[i].spans
            if not s.intersects(spans):
                cover.append(i)
                spans = spans | s
        counted = sum(inst.pieces[i].count for i in cover)
        if counted > sum(inst.pieces[i].count for i in inst.cover) or (
                counted == sum(inst.pieces[i].count for i in inst.cover) and len(spans) < len(inst.cover_spans)):
            inst.cover, inst.cover_spans = cover, spans

    def _root_check(self, now: float, inst: _Instance[P]) -> None:
        if inst.done:
            return
        if inst.own_ready and (inst.cover_spans | inst.empty) == FULL:
            self._estimator(inst.key[0], "root").observe(max(0.0, now - inst.started_at))
            self._finalise(inst)

    def _root_deadline(self, now: float, inst: _Instance[P]) -> None:
        gaps = (inst.cover_spans | inst.empty).gaps()
        if not gaps and inst.own_ready:
            self._finalise(inst)
            return
        recently_pending = inst.pending_at is not None and now - inst.pending_at <= 2 * self.cfg.repair_timeout
        if gaps and (inst.repair_left > 0 or recently_pending) and now - inst.started_at < self.cfg.max_wait:
            inst.deadline_passed = True
            if not recently_pending:
                inst.repair_left -= 1
            inst.repair_requests += len(gaps)
            self.counters["repairs_requested"] += len(gaps)
            inst.root_deadline_at = now + self.cfg.repair_timeout
            self._repair(inst.key, gaps, now)
            return
        if not inst.own_ready:
            inst.root_deadline_at = None  # we still train: contribute() finishes the round
            return
        self._finalise(inst)

    def _finalise(self, inst: _Instance[P]) -> None:
        merged = self._merge([inst.pieces[i] for i in inst.cover])
        inst.done = True
        inst.pieces, inst.acc = [], []
        self._finished(RootResult(inst.key, merged.payload, merged.count, merged.members, merged.spans,
                                  inst.empty, inst.repair_requests, inst.dropped))


def _extent(spans: Spans) -> int:
    """How much of the ring ``spans`` claims (between equal counts the root keeps the wider claim)."""
    return sum(hi - lo for lo, hi in spans.intervals)
