"""Skip-mesh aggregation of one shard per round, exactly once. Sans-IO: time comes in, messages go out.

One :class:`Aggregator` per node handles every aggregation *instance* it takes part in; an instance
is one shard of one round of one job, identified by an :data:`InstanceKey`, aggregated over a
:class:`~mlfabric.core.placement.Mesh`. Payloads are opaque: a :class:`Strategy` merges them (FedAvg
weighted sums of tensors in ``learn/``, exact integer sums in the simulator).

Per instance, at every member:

1. its own update arrives through :meth:`Aggregator.contribute` (after local training);
2. partial aggregates from children arrive through :meth:`Aggregator.receive`; each carries its
   *contributor set* (mesh positions). A partial is merged only if its set is disjoint from what
   this node has already counted; an overlapping one is kept apart and forwarded as it is, so no
   contribution is ever added twice (the root drops overlaps instead, see 4);
3. the node forwards its merged partial to its first live parent once its own update and every
   expected child are in, or when its adaptive deadline passes; anything later goes up on its own
   (a slow node is late, not cut off). Every partial is acknowledged; an unacknowledged one, or one
   whose parent is reported dead before the round's result arrived, is sent again to the next parent
   (and, when all ``k`` parents are gone, straight to the acting root);
4. the acting root (the first live member of the replica set: the owner, else its first replica...)
   keeps disjoint units only; an overlapping unit is dropped and the contributors it would have
   brought that are still missing are asked directly (*repair*: a contributor keeps its own update
   until the round's result arrives and sends it alone on request). It finalises when every expected
   contributor not known dead is in, or when its repair attempts run out, and sends the result to
   every member.

So every live contributor's update is counted at most once by construction (disjoint units only),
and at least once unless it stays unreachable through every repair attempt; a contributor that dies
mid-round is in or out as a whole, since an update is never split. ``k = 1`` with ``repair = False``
is the plain balanced tree, the baseline: no failover, no repair, a dead aggregator loses its subtree.

Deadlines adapt per (job, shard): each node keeps a smoothed mean and deviation of how long its
expected children took (Jacobson's RTO estimator: wait = mean + 4 * deviation, within bounds), and
a wait that ran out without every child backs the estimate off, so one slow round raises the next
deadline instead of cutting that node off again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mlfabric.core.placement import Mesh

__all__ = [
    "Abstain",
    "Aggregator",
    "AggregatorConfig",
    "DeadlineEstimator",
    "Final",
    "InstanceKey",
    "Partial",
    "PartialAck",
    "Pending",
    "RepairRequest",
    "ResultRequest",
    "Secured",
    "Strategy",
    "RoundResult",
]

P = TypeVar("P")
InstanceKey = tuple[str, int, int]  # (job id, round, shard index)


class Strategy(Protocol[P]):
    """How payloads combine. ``merge`` may reuse ``into`` (it is consumed) but must not touch ``other``;
    ``copy`` gives a payload that can be merged into without changing the original."""

    def merge(self, into: P, other: P) -> P: ...

    def copy(self, payload: P) -> P: ...


# ---- messages between aggregators (the host maps them to wire messages and the bulk lane) -----------


@dataclass(frozen=True, slots=True)
class Partial(Generic[P]):
    """A partial aggregate: the merged updates of ``contributors`` (mesh positions)."""

    key: InstanceKey
    sender: int
    seq: int
    contributors: frozenset[int]
    payload: P
    repair: bool = False  # a contributor's own update sent straight to the root on request


@dataclass(frozen=True, slots=True)
class PartialAck:
    key: InstanceKey
    sender: int
    seq: int


@dataclass(frozen=True, slots=True)
class Secured:
    """The partials ``seqs`` the receiver sent us are inside a partial our parent acknowledged: the
    receiver may let them go (it will not resend them if we die)."""

    key: InstanceKey
    sender: int
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Pending:
    """Answer to a repair request from a contributor still training: alive, update to follow."""

    key: InstanceKey
    sender: int


@dataclass(frozen=True, slots=True)
class Abstain:
    """The sender was expected to contribute but cannot this round (it missed the last result and has
    no current model, say): the root stops waiting for it."""

    key: InstanceKey
    sender: int


@dataclass(frozen=True, slots=True)
class ResultRequest:
    """A member that has waited ``result_timeout`` for an instance's result asks the root candidates."""

    key: InstanceKey
    sender: int


@dataclass(frozen=True, slots=True)
class RepairRequest:
    key: InstanceKey
    root: int


@dataclass(frozen=True, slots=True)
class Final(Generic[P]):
    """The round's result for one shard, from the acting root to every member."""

    key: InstanceKey
    root: int
    contributors: frozenset[int]
    payload: P


Message = Partial[Any] | PartialAck | Secured | Pending | Abstain | RepairRequest | ResultRequest | Final[Any]


@dataclass(frozen=True, slots=True)
class RoundResult(Generic[P]):
    """Event: this node learned (or, as acting root, decided) the result of an instance."""

    key: InstanceKey
    root: int
    contributors: frozenset[int]
    payload: P
    finalised_here: bool
    repair_requests: int = 0  # contributions the root had to ask for directly (0 unless finalised_here)
    dropped: int = 0  # overlapping units the root refused (0 unless finalised_here)


@dataclass(frozen=True)
class AggregatorConfig:
    """Timings in seconds. The defaults suit the ``local`` preset's failure detector (~2 s)."""

    ack_timeout: float = 1.0  # a partial not acknowledged by then goes to the next parent
    initial_wait: float = 5.0  # first-round wait for children, before any observation
    min_wait: float = 0.05
    max_wait: float = 60.0
    hop_allowance: float = 0.25  # extra wait per skip-list level, so a parent outwaits its children
    repair_timeout: float = 1.0  # how long the root waits for answers to one round of repair requests
    repair_rounds: int = 3  # repair attempts before the root finalises with what it has
    repair: bool = True  # False (with k = 1): the plain-tree baseline
    result_timeout: float = 30.0  # a member without the result this long after the start asks for it


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
        """The wait ran out before everything came: back off (the next one waits longer)."""
        base = self.timeout()
        self.mean = min(self.hi, base * 1.5)
        self.dev = max(self.dev, self.mean / 4.0)


@dataclass
class _Unit(Generic[P]):
    """Something this node has sent upward and keeps until the instance's result arrives."""

    seq: int
    contributors: frozenset[int]
    payload: P
    tried: list[int] = field(default_factory=list)  # node ids it went to, in order
    sources: list[tuple[int, int]] = field(default_factory=list)  # (child, its seq) merged into it
    sent_at: float = 0.0
    acked_by: int | None = None


@dataclass
class _Instance(Generic[P]):
    key: InstanceKey
    mesh: Mesh
    pos: int
    started: float
    contributor: bool  # this node brings an update of its own
    expected: set[int]  # positions whose updates the round wants (less those that abstain)
    own: P | None = None
    own_ready: bool = False
    acc: P | None = None
    acc_set: frozenset[int] = frozenset()
    acc_sources: list[tuple[int, int]] = field(default_factory=list)
    counted: set[int] = field(default_factory=set)  # positions in acc or in anything already sent up
    arrived: set[int] = field(default_factory=set)  # positions of senders heard from directly
    forwarded: bool = False
    deadline: float = 0.0
    units: dict[int, _Unit[P]] = field(default_factory=dict)
    repair_asked: bool = False  # the root asked us for our own update
    repair_root: int | None = None
    done: bool = False
    result: Final[P] | None = None  # kept (until forget) to answer ResultRequest
    next_pull: float = 0.0
    # acting-root state
    root_units: list[tuple[frozenset[int], P]] = field(default_factory=list)  # everything received
    root_counted: set[int] = field(default_factory=set)  # union of the disjoint cover chosen from them
    root_cover: list[int] = field(default_factory=list)  # indexes into root_units
    pending: dict[int, float] = field(default_factory=dict)  # position -> when it said "still training"
    root_deadline: float | None = None
    repair_left: int = 0
    repair_requests: int = 0
    dropped: int = 0


class Aggregator(Generic[P]):
    """All the aggregation instances of one node.

    ``is_dead(node_id)`` is the node's failure knowledge (the failure detector's verdicts); the host
    also calls :meth:`peer_dead` when a verdict arrives, so pending partials fail over at once.
    """

    def __init__(self, me: int, strategy: Strategy[P], config: AggregatorConfig | None = None,
                 is_dead: Callable[[int], bool] | None = None) -> None:
        self.me = me
        self.strategy = strategy
        self.config = config or AggregatorConfig()
        self._is_dead = is_dead or (lambda _node: False)
        self._dead: set[int] = set()
        self._instances: dict[InstanceKey, _Instance[P]] = {}
        self._outbox: list[tuple[int, Message]] = []
        self._events: list[RoundResult[P]] = []
        self._seq = 0
        self._estimators: dict[tuple[str, int, str], DeadlineEstimator] = {}
        self.counters = {"partials_sent": 0, "partials_resent": 0, "partials_received": 0, "overlaps": 0,
                         "repairs_requested": 0, "finals_sent": 0, "deadline_expired": 0}

    # ---- host interface ------------------------------------------------------------------------

    def start(self, now: float, key: InstanceKey, mesh: Mesh, *, contributor: bool = True,
              expected: Iterable[int] | None = None) -> None:
        """Join an instance. ``expected``: node ids whose updates the round wants (default: all members)."""
        if key in self._instances or self.me not in mesh.index:
            return
        exp = {mesh.index[n] for n in (mesh.order if expected is None else expected) if n in mesh.index}
        inst = _Instance(key=key, mesh=mesh, pos=mesh.index[self.me], started=now, contributor=contributor,
                         expected=exp)
        inst.deadline = now + self._estimator(key, "wait").timeout() + self._stagger(mesh, inst.pos)
        inst.next_pull = now + self.config.result_timeout
        self._instances[key] = inst
        if not contributor:
            inst.own_ready = True
            if inst.pos in exp:  # the round counts on us and we cannot: say so to the root candidates
                exp.discard(inst.pos)
                for q in range(min(mesh.replicas, len(mesh.order))):
                    if q != inst.pos:
                        self._outbox.append((mesh.order[q], Abstain(key, self.me)))
        self._progress(now, inst)

    def contribute(self, now: float, key: InstanceKey, payload: P) -> None:
        """This node's own update for an instance it has started."""
        inst = self._instances.get(key)
        if inst is None or inst.done or inst.own_ready:
            return
        inst.own, inst.own_ready = payload, True
        me = frozenset((inst.pos,))
        if inst.repair_asked:
            self._send_repair(now, inst)
        if self._acting_root(inst):
            self._root_add(now, inst, me, payload)
            if inst.root_deadline == float("inf"):
                inst.root_deadline = now  # we held the round open for our own update: decide now
        elif inst.forwarded:
            self._send_unit(now, inst, me, payload)
        else:
            # A copy: merges go into the accumulator in place, and our own update must stay as it is
            # for a repair request.
            self._merge_local(inst, me, self.strategy.copy(payload))
        self._progress(now, inst)

    def receive(self, now: float, msg: Message) -> None:
        if isinstance(msg, Partial):
            self._on_partial(now, msg)
        elif isinstance(msg, PartialAck):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done:
                unit = inst.units.get(msg.seq)
                if unit is not None and unit.tried and unit.tried[-1] == msg.sender and unit.acked_by is None:
                    unit.acked_by = msg.sender
                    self._secure(inst, unit)
        elif isinstance(msg, Secured):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done:
                for seq in msg.seqs:
                    unit = inst.units.get(seq)
                    if unit is not None and unit.acked_by == msg.sender:
                        del inst.units[seq]
        elif isinstance(msg, Pending):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done and msg.sender in inst.mesh.index:
                inst.pending[inst.mesh.index[msg.sender]] = now
        elif isinstance(msg, Abstain):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done and msg.sender in inst.mesh.index:
                pos = inst.mesh.index[msg.sender]
                inst.expected.discard(pos)
                inst.arrived.add(pos)  # as a child it is done too: nothing of its own to wait for
                self._progress(now, inst)
        elif isinstance(msg, RepairRequest):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done and not inst.contributor:
                self._outbox.append((msg.root, Abstain(msg.key, self.me)))
            elif inst is not None and not inst.done and inst.contributor:
                inst.repair_asked, inst.repair_root = True, msg.root
                if inst.own_ready:
                    self._send_repair(now, inst)
                else:
                    self._outbox.append((msg.root, Pending(msg.key, self.me)))
        elif isinstance(msg, Final):
            inst = self._instances.get(msg.key)
            if inst is not None and not inst.done:
                self._finish(inst)
                inst.result = msg
                self._events.append(RoundResult(msg.key, msg.root, msg.contributors, msg.payload, False))
        elif isinstance(msg, ResultRequest):
            inst = self._instances.get(msg.key)
            if inst is not None and inst.result is not None and msg.sender != self.me:
                res = inst.result
                self._outbox.append((msg.sender, Final(res.key, res.root, res.contributors, res.payload)))

    def peer_dead(self, now: float, node: int) -> None:
        """A failure verdict: fail over everything waiting on ``node``; maybe take over as root."""
        self._dead.add(node)
        for inst in list(self._instances.values()):
            if inst.done or node not in inst.mesh.index:
                continue
            for unit in list(inst.units.values()):
                if unit.tried and unit.tried[-1] == node:
                    self._resend(now, inst, unit)
            self._progress(now, inst)

    def peer_alive(self, node: int) -> None:
        """Withdraw a failure verdict (the node is back: a new round counts it as a member)."""
        self._dead.discard(node)

    def handle_timer(self, now: float) -> None:
        for inst in list(self._instances.values()):
            if inst.done:
                continue
            for unit in list(inst.units.values()):
                if unit.acked_by is None and now >= unit.sent_at + self.config.ack_timeout:
                    self._resend(now, inst, unit)
            if now >= inst.next_pull:
                # The result is late: ask every root candidate; whoever has it sends it again.
                inst.next_pull = now + self.config.repair_timeout
                asked = {inst.mesh.order[q] for q in range(min(inst.mesh.replicas, len(inst.mesh.order)))}
                acting = self._first_live_before(inst)
                if acting is not None:
                    asked.add(acting)
                for node in sorted(asked - {self.me}):
                    self._outbox.append((node, ResultRequest(inst.key, self.me)))
            if not inst.forwarded and not self._acting_root(inst) and now >= inst.deadline:
                self.counters["deadline_expired"] += 1
                self._estimator(inst.key, "wait").expired()
                self._forward(now, inst)
            self._progress(now, inst)

    def next_deadline(self) -> float | None:
        best: float | None = None
        for inst in self._instances.values():
            if inst.done:
                continue
            times: list[float] = [u.sent_at + self.config.ack_timeout for u in inst.units.values()
                                  if u.acked_by is None]
            if not inst.forwarded and not self._acting_root(inst):
                times.append(inst.deadline)
            if inst.root_deadline is not None and inst.root_deadline != float("inf"):
                times.append(inst.root_deadline)
            times.append(inst.next_pull)
            for t in times:
                if best is None or t < best:
                    best = t
        return best

    def drain_outbox(self) -> list[tuple[int, Message]]:
        out, self._outbox = self._outbox, []
        return out

    def drain_events(self) -> list[RoundResult[P]]:
        out, self._events = self._events, []
        return out

    def forget(self, key: InstanceKey) -> None:
        """Drop an instance's state (the host calls this once it has used the result)."""
        self._instances.pop(key, None)

    def active(self) -> int:
        return sum(1 for inst in self._instances.values() if not inst.done)

    # ---- the machine ----------------------------------------------------------------------------

    def _estimator(self, key: InstanceKey, role: str) -> DeadlineEstimator:
        k = (key[0], key[2], role)
        est = self._estimators.get(k)
        if est is None:
            c = self.config
            est = self._estimators[k] = DeadlineEstimator(c.initial_wait, c.min_wait, c.max_wait)
        return est

    def _stagger(self, mesh: Mesh, pos: int) -> float:
        """Deadlines grow with the level: when a child waits out a dead grandchild, its parent's
        deadline has not passed yet, so one death does not cut off every ancestor at the same instant."""
        return self.config.hop_allowance * min(mesh.heights[pos], mesh.heights[0])

    def _dead_node(self, node: int) -> bool:
        return node in self._dead or self._is_dead(node)

    def _acting_root(self, inst: _Instance[P]) -> bool:
        """True when every member before us in mesh order is known dead: the owner first, then its
        replicas, then (so that a round always ends, with repair on) whoever comes next."""
        mesh = inst.mesh
        if inst.pos >= mesh.replicas and not self.config.repair:
            return False
        return all(self._dead_node(mesh.order[q]) for q in range(inst.pos))

    def _first_live_before(self, inst: _Instance[P]) -> int | None:
        """The acting root as far as we know: the first member before us in mesh order not known dead."""
        for q in range(inst.pos):
            if not self._dead_node(inst.mesh.order[q]):
                return inst.mesh.order[q]
        return None

    def _expected_children(self, inst: _Instance[P]) -> set[int]:
        """Live positions whose first live parent is us: our own children and those of dead parents."""
        mesh = inst.mesh
        return {c for c in mesh.linked[inst.pos]
                if not self._dead_node(mesh.order[c]) and self._first_live_parent(mesh, c) == inst.pos}

    def _first_live_parent(self, mesh: Mesh, p: int) -> int | None:
        for q in mesh.parents[p]:
            if not self._dead_node(mesh.order[q]):
                return q
        return None

    def _merge_local(self, inst: _Instance[P], contributors: frozenset[int], payload: P,
                     source: tuple[int, int] | None = None) -> None:
        if source is not None:
            inst.acc_sources.append(source)
        if inst.acc is None:
            inst.acc, inst.acc_set = payload, contributors
        else:
            inst.acc = self.strategy.merge(inst.acc, payload)
            inst.acc_set = inst.acc_set | contributors
        inst.counted |= contributors

    def _on_partial(self, now: float, msg: Partial[P]) -> None:
        inst = self._instances.get(msg.key)
        self.counters["partials_received"] += 1
        # Acknowledge whatever happens: the sender must stop resending even if we drop it.
        self._outbox.append((msg.sender, PartialAck(msg.key, self.me, msg.seq)))
        if inst is None or inst.done:
            return
        if msg.sender in inst.mesh.index:
            inst.arrived.add(inst.mesh.index[msg.sender])
        if self._acting_root(inst):
            self._root_add(now, inst, msg.contributors, msg.payload)
        elif msg.contributors & inst.counted:
            # Overlap: merging would count someone twice. Pass it up untouched; the root decides.
            self.counters["overlaps"] += 1
            self._send_unit(now, inst, msg.contributors, msg.payload, [(msg.sender, msg.seq)])
        elif inst.forwarded:
            inst.counted |= msg.contributors
            self._send_unit(now, inst, msg.contributors, msg.payload, [(msg.sender, msg.seq)])
        else:
            self._merge_local(inst, msg.contributors, msg.payload, (msg.sender, msg.seq))
        self._progress(now, inst)

    def _progress(self, now: float, inst: _Instance[P]) -> None:
        if inst.done:
            return
        if self._acting_root(inst):
            self._become_root(now, inst)
            self._root_check(now, inst)
            return
        if inst.forwarded or not inst.own_ready:
            return
        if self._expected_children(inst) <= inst.arrived:
            self._estimator(inst.key, "wait").observe(max(0.0, now - inst.started))
            self._forward(now, inst)

    def _forward(self, now: float, inst: _Instance[P]) -> None:
        inst.forwarded = True
        if inst.acc is None and not inst.contributor:
            # Nothing from us or below us: tell the parent, which would otherwise wait out its deadline.
            parent = self._first_live_parent(inst.mesh, inst.pos)
            if parent is not None:
                self._outbox.append((inst.mesh.order[parent], Abstain(inst.key, self.me)))
        if inst.acc is not None:
            acc, acc_set, sources = inst.acc, inst.acc_set, inst.acc_sources
            inst.acc, inst.acc_set, inst.acc_sources = None, frozenset(), []
            self._send_unit(now, inst, acc_set, acc, sources)

    def _send_unit(self, now: float, inst: _Instance[P], contributors: frozenset[int], payload: P,
                   sources: list[tuple[int, int]] | None = None) -> None:
        self._seq += 1
        unit = _Unit(self._seq, contributors, payload, sources=sources or [])
        inst.units[unit.seq] = unit
        self._resend(now, inst, unit, first=True)

    def _resend(self, now: float, inst: _Instance[P], unit: _Unit[P], first: bool = False) -> None:
        """Send ``unit`` to the next parent it has not been to (or to the acting root as a last resort)."""
        if self._acting_root(inst):
            # We became the root while this was in flight: it is ours now (taking over the root moves
            # every unit we hold into the root's set; one still here arrived after that).
            self._become_root(now, inst)
            if inst.units.pop(unit.seq, None) is not None:
                self._root_add(now, inst, unit.contributors, unit.payload)
            return
        target = self._next_target(inst, unit)
        if target is None:
            unit.acked_by = -1  # nowhere left to go; the root's repair is what remains
            return
        if not first:
            self.counters["partials_resent"] += 1
        self.counters["partials_sent"] += 1
        unit.tried.append(target)
        unit.sent_at, unit.acked_by = now, None
        self._outbox.append((target, Partial(inst.key, self.me, unit.seq, unit.contributors, unit.payload)))

    def _next_target(self, inst: _Instance[P], unit: _Unit[P]) -> int | None:
        mesh = inst.mesh
        candidates = [mesh.order[q] for q in mesh.parents[inst.pos]]
        if self.config.repair:
            candidates += [mesh.order[q] for q in range(min(mesh.replicas, inst.pos))]
            acting = self._first_live_before(inst)
            if acting is not None and acting not in candidates:
                candidates.append(acting)
        for node in candidates:
            if node not in unit.tried and not self._dead_node(node):
                return node
        if not self.config.repair:
            return None  # every parent tried; without repair (the plain tree with k = 1) the unit is lost
        # Every parent and root candidate was tried: go round again to the first live one.
        for node in candidates:
            if not self._dead_node(node):
                return node
        return None

    def _secure(self, inst: _Instance[P], unit: _Unit[P]) -> None:
        """Our parent holds ``unit``: the children whose partials went into it may let theirs go.

        Not when the parent is a root candidate: if the acting root dies, its successor needs every
        partial again, so they stay with their senders until the round's result arrives.
        """
        if inst.mesh.k == 1 and not self.config.repair:
            return  # the plain tree never resends, so there is nothing to release
        if inst.mesh.index.get(unit.acked_by if unit.acked_by is not None else -1, inst.mesh.replicas) \
                < inst.mesh.replicas:
            return
        by_child: dict[int, list[int]] = {}
        for child, seq in unit.sources:
            by_child.setdefault(child, []).append(seq)
        for child, seqs in by_child.items():
            self._outbox.append((child, Secured(inst.key, self.me, tuple(seqs))))

    def _send_repair(self, now: float, inst: _Instance[P]) -> None:
        root = inst.repair_root
        if inst.own is None or root is None:
            return
        self._seq += 1
        self.counters["partials_sent"] += 1
        self._outbox.append((root, Partial(inst.key, self.me, self._seq, frozenset((inst.pos,)), inst.own,
                                           repair=True)))

    # ---- acting root ----------------------------------------------------------------------------

    def _become_root(self, now: float, inst: _Instance[P]) -> None:
        if inst.root_deadline is not None:
            return
        inst.forwarded = True
        inst.repair_left = self.config.repair_rounds if self.config.repair else 0
        inst.root_deadline = (inst.started + self._estimator(inst.key, "root").timeout()
                              + self._stagger(inst.mesh, 0))
        if inst.root_deadline < now:
            inst.root_deadline = now + self.config.repair_timeout
        # What we hold or already sent up to the root we replace is ours to count now.
        if inst.acc is not None:
            self._root_add(now, inst, inst.acc_set, inst.acc)
            inst.acc, inst.acc_set = None, frozenset()
        for seq, unit in list(inst.units.items()):
            del inst.units[seq]
            self._root_add(now, inst, unit.contributors, unit.payload)

    def _root_add(self, now: float, inst: _Instance[P], contributors: frozenset[int], payload: P) -> None:
        """Keep every unit; count a disjoint cover of them (largest first), never an overlap."""
        if inst.root_deadline is None:
            self._become_root(now, inst)
        if contributors & inst.root_counted:
            inst.dropped += 1
            self.counters["overlaps"] += 1
        inst.root_units.append((contributors, payload))
        if not contributors & inst.root_counted:
            inst.root_cover.append(len(inst.root_units) - 1)
            inst.root_counted |= contributors
            return
        # Overlap: re-pick the cover, since the new unit may cover more than the ones it overlaps.
        order = sorted(range(len(inst.root_units)), key=lambda i: -len(inst.root_units[i][0]))
        cover: list[int] = []
        counted: set[int] = set()
        for i in order:
            members = inst.root_units[i][0]
            if not members & counted:
                cover.append(i)
                counted |= members
        if len(counted) > len(inst.root_counted):
            inst.root_cover, inst.root_counted = cover, counted

    def _missing(self, inst: _Instance[P]) -> set[int]:
        return {p for p in inst.expected
                if p not in inst.root_counted and not self._dead_node(inst.mesh.order[p])}

    def _root_check(self, now: float, inst: _Instance[P]) -> None:
        if inst.done or inst.root_deadline is None:
            return
        missing = self._missing(inst)
        if not missing and inst.own_ready:
            self._estimator(inst.key, "root").observe(max(0.0, now - inst.started))
            self._finalise(now, inst)
            return
        if now < inst.root_deadline:
            return
        others = missing - {inst.pos}
        slow = {p for p in others if now - inst.pending.get(p, -1e18) <= 2 * self.config.repair_timeout}
        if others and others <= slow and now - inst.started < self.config.max_wait:
            # Everyone missing told us they are alive and still training: wait for them, ask again.
            for p in sorted(others):
                self._outbox.append((inst.mesh.order[p], RepairRequest(inst.key, self.me)))
            inst.root_deadline = now + self.config.repair_timeout
            return
        if inst.repair_left > 0 and others:
            if inst.repair_left == self.config.repair_rounds:
                self._estimator(inst.key, "root").expired()
            inst.repair_left -= 1
            for p in sorted(others):
                self.counters["repairs_requested"] += 1
                inst.repair_requests += 1
                self._outbox.append((inst.mesh.order[p], RepairRequest(inst.key, self.me)))
            inst.root_deadline = now + self.config.repair_timeout
            return
        if not inst.own_ready:
            # We are the root and still training: never finalise without our own update. contribute()
            # finishes the round; no timer until then.
            inst.root_deadline = float("inf")
            return
        if not inst.root_units and now - inst.started < self.config.max_wait:
            # Nothing at all yet (we took over a root that died, or everyone is late): an empty result
            # would throw the round away. Keep waiting, within max_wait of the start.
            inst.root_deadline = now + self.config.repair_timeout
            return
        self._finalise(now, inst)

    def _finalise(self, now: float, inst: _Instance[P]) -> None:
        units = [inst.root_units[i] for i in inst.root_cover]
        payload = units[0][1] if units else None
        for _, other in units[1:]:
            payload = self.strategy.merge(payload, other)
        contributors = frozenset(inst.root_counted)
        self._finish(inst)
        inst.result = Final(inst.key, self.me, contributors, payload)
        # To every member, also those we believe dead: a wrong verdict must not cost a member the
        # round's result (and a send to a dead node only fails).
        for node in inst.mesh.order:
            if node != self.me:
                self.counters["finals_sent"] += 1
                self._outbox.append((node, inst.result))
        self._events.append(RoundResult(inst.key, self.me, contributors, payload, True,
                                        repair_requests=inst.repair_requests, dropped=inst.dropped))

    def _finish(self, inst: _Instance[P]) -> None:
        inst.done = True
        inst.units.clear()
        inst.root_units = []
        inst.acc = inst.own = None
