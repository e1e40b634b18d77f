"""Failure detection and failure-set propagation, sans-IO (Mizutani, IEEE Access 9, 2021; SWIM §4).

Detection: biased keep-alives. The first ``near_successors`` successors (and the predecessor when
``probe_predecessor``) are probed every ``near_interval``; the other routing entries (far fingers,
the rest of the successor list, the predecessor) every ``far_interval``. So every failure is
detected quickly by its predecessor, which knows pred(f) exactly, and every ring link is checked
once. A probe unanswered within ``probe_timeout`` makes the target a suspect;
``indirect_checks`` helpers probe it on our behalf (SWIM ping-req) and only when none of them reaches
it within ``suspicion_timeout`` is it declared dead. Incarnation numbers let a node declared dead by
mistake refute it (``Alive``); any direct message from a node clears its death mark, so a node that
comes back (or was only stalled) rejoins. A timer that fires ``stall_threshold`` late means *this*
process was stalled, and its own timed-out probes are not held against peers.

Propagation, three schemes (``FailureConfig.scheme``):

* ``stateless`` (the paper): no backpointers. With p = pred(f) on a 2^m ring, node y holds f as
  finger i exactly when y + 2^i lies in (p, f], i.e. y in (p - 2^i, f - 2^i]. The detector sends a
  notice into each of these intervals (routed to its start, then walked along successors), one
  notice backwards along f's r predecessors (their successor lists hold f) and one to succ(f) (its
  predecessor pointer). :func:`holder_intervals` is the pure estimate.
* ``stateful`` (boosting with backpointers, Zhuang et al. INFOCOM 2005): the same biased probing,
  and every node registers with each of its routing entries (at once when an entry appears, and
  every ``refresh_interval``; a backpointer expires after 3 refreshes); each node copies its
  backpointer set to its predecessor and successor, so the detector of f (a neighbour of f) holds
  f's set and notifies every holder directly.
* ``stabilize``: no propagation; every routing entry is probed every ``near_interval``.

Partition merge (Shafaat et al., "Dealing with network partitions in structured overlay networks",
2009): a partition longer than the failure timeout makes each side declare the other dead, leaving
two rings that stabilize alone never joins. So every node keeps a bounded *passive list*
(``merge_candidates``) of the peers it declared dead or saw leave (kept ``merge_ttl``) and, every
``merge_interval`` (jittered), sends one Ping to its least recently probed entry or configured seed.
A dead one stays silent. Any message straight from a passive peer (its Pong, or its own probe of
us) lifts the death mark (``observe``) and hands the peer to :meth:`ChordMachine.merge_with`, which
finds where it falls in our ring and hints both sides; stabilize zips the rings from there.

Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlfabric.config import FailureConfig
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import Event, PeerDied, PeerPurged, Refuted
from mlfabric.core.ring import BITS, MASK, SIZE, distance
from mlfabric.wire.messages import (
    NOTICE_BACKWARD,
    NOTICE_DIRECT,
    NOTICE_INTERVAL,
    Alive,
    BackpointerCopy,
    FailureNotice,
    Message,
    NoticeAck,
    Peer,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResult,
    Register,
)

MAX_NOTICE_HOPS = 2 * BITS
_MAX_REMEMBERED = 8192


# ------------------------------------------------------------------------------------ estimation


def holder_intervals(dead: int, pred: int) -> list[tuple[int, int]]:
    """The id intervals [start, end] (inclusive, clockwise) whose nodes hold ``dead`` as a finger.

    Node y holds f as finger i iff successor(y + 2^i) = f iff y + 2^i in (p, f], that is
    y in (p - 2^i, f - 2^i]. Measured as backward distance from f the interval is
    [2^i, g + 2^i - 1] with g = f - p; the 64 intervals are merged where they overlap (all those with
    2^i < g do, around p), so the result holds about log2 N disjoint intervals.
    """
    gap = distance(pred, dead) or SIZE  # a lone predecessor equal to f means f was alone
    spans: list[list[int]] = []
    for i in range(BITS):
        lo = 1 << i
        hi = min(gap + lo - 1, SIZE - 1)
        if spans and lo <= spans[-1][1] + 1:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [((dead - hi) & MASK, (dead - lo) & MASK) for lo, hi in spans]


def in_interval(x: int, start: int, end: int) -> bool:
    """x in [start, end] clockwise (inclusive at both ends)."""
    return distance(start, x) <= distance(start, end)


# ------------------------------------------------------------------------------------ machine


@dataclass(slots=True)
class _Check:
    target: Peer
    seq: int
    deadline_at: float
    indirect: bool = False
    heard: bool = False  # the target sent us something directly while the check ran


@dataclass(slots=True)
class _Forward:
    notice: FailureNotice
    target: Peer
    alternatives: list[Peer]
    deadline_at: float
    avoid: set[int]  # hops that did not ack this notice
    first_hop: bool


_MAX_AVOID = 4


KEEPALIVE_TYPES = (Ping, Pong, ProbeRequest, ProbeResult, Register, BackpointerCopy, Alive)


class FailureDetector:
    def __init__(self, chord: ChordMachine, cfg: FailureConfig, incarnation: int = 0) -> None:
        self.chord = chord
        self.cfg = cfg
        self.me = chord.me
        self.incarnation = incarnation
        self._send: Callable[[str, Message], None] = chord._send
        self._events: deque[Event] = chord._events
        self._checks: dict[int, _Check] = {}  # target id -> check in progress
        self._seq_to_target: dict[int, int] = {}
        self._helping: dict[int, tuple[str, int, Peer, float]] = {}  # our seq -> (asker, req, target, deadline)
        self._next_seq = 1
        self._near_at: float | None = None
        self._far_at: float | None = None
        self._refresh_at: float | None = None
        self._far_cursor = 0
        self._dead: dict[int, tuple[int, float]] = {}  # id -> (incarnation, forget_at)
        self._alive_inc: dict[int, int] = {}
        self._seen: dict[tuple[int, int, int, int, int], float] = {}
        self._backpointers: dict[int, tuple[Peer, float]] = {}  # stateful: who holds me
        self._copies: dict[int, tuple[tuple[Peer, ...], float]] = {}  # stateful: neighbours' sets
        self._registered: set[int] = set()
        self._holders_changed = False
        self._housekeep_at: float | None = None
        self._forwards: dict[int, _Forward] = {}  # seq -> notice awaiting the next hop's ack
        # partition merge: passive list id -> [peer, forget_at, last probed at]; seeds' last probes
        self._passive: dict[int, list] = {}
        self._seed_probed: dict[str, float] = {}  # seed address -> last probe; an answer defers it merge_ttl
        self._merge_probes: dict[int, tuple[str, float]] = {}  # seq -> (address, forget_at)
        self._merge_at: float | None = None
        # its own stream, seeded from the node id, so that merge jitter leaves the overlay's draws as they were
        self._merge_rng = random.Random(chord.me.id)
        self.counters: dict[str, int] = {
            "probes_sent": 0,
            "acks_received": 0,
            "suspicions": 0,
            "indirect_probes": 0,
            "deaths_declared": 0,
            "notices_sent": 0,
            "notices_received": 0,
            "notices_forwarded": 0,
            "notices_duplicate": 0,
            "purged_by_notice": 0,
            "refutations": 0,
            "stalls": 0,
            "departures": 0,
            "merge_probes": 0,
            "merge_contacts": 0,
        }
        chord.is_dead = self.is_dead
        chord.on_dead_hearsay = self._recheck
        self._now = 0.0
        self._rechecked: dict[int, float] = {}
        chord.on_unresponsive = self.suspect
        chord.check_predecessor_enabled = False

    # ------------------------------------------------------------------ queries

    def is_dead(self, node_id: int) -> bool:
        return node_id in self._dead

    def dead_ids(self) -> set[int]:
        return set(self._dead)

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        self._near_at = now + self.chord._rng.random() * self.cfg.near_interval
        if self.cfg.scheme != "stabilize":  # stabilize probes every entry at near_interval instead
            self._far_at = now + self.cfg.far_interval * self.chord._rng.random()
        if self.cfg.scheme == "stateful":
            self._refresh_at = now + self.cfg.refresh_interval * self.chord._rng.random()
        self._housekeep_at = now + self.cfg.dead_ttl
        if self.cfg.merge_candidates > 0:
            self._merge_at = now + self.cfg.merge_interval * self._merge_rng.random()

    def stop(self) -> None:
        self._near_at = self._far_at = self._refresh_at = self._housekeep_at = self._merge_at = None
        self._merge_probes.clear()
        self._checks.clear()
        self._seq_to_target.clear()
        self._helping.clear()
        self._forwards.clear()

    def next_deadline(self) -> float | None:
        times = [t for t in (self._near_at, self._far_at, self._refresh_at, self._housekeep_at, self._merge_at)
                 if t is not None]
        if self._checks:
            times.append(min(c.deadline_at for c in self._checks.values()))
        if self._helping:
            times.append(min(h[3] for h in self._helping.values()))
        if self._forwards:
            times.append(min(fw.deadline_at for fw in self._forwards.values()))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self._near_at is not None and now - self._near_at > self.cfg.stall_threshold:
            self._on_stall(now)
            return
        for tid, check in list(self._checks.items()):
            if check.deadline_at <= now and self._checks.get(tid) is check:
                self._on_check_timeout(check, now)
        for seq, (asker, req, target, deadline) in list(self._helping.items()):
            if deadline <= now:
                del self._helping[seq]
                self._seq_to_target.pop(seq, None)
                self._send(asker, ProbeResult(req=req, target=target, alive=False))
        for seq, fw in list(self._forwards.items()):
            if fw.deadline_at <= now and self._forwards.pop(seq, None) is not None:
                # the next hop did not acknowledge: check it, and route around it
                self.suspect(fw.target, now)
                fw.avoid.add(fw.target.id)
                if any(p.id not in fw.avoid for p in fw.alternatives):
                    self._forward(fw.notice, fw.alternatives, now, fw.first_hop, fw.avoid)
                elif len(fw.avoid) <= _MAX_AVOID:
                    self._reroute(fw.notice, now, fw.first_hop, fw.avoid)
        if self._near_at is not None and self._near_at <= now:
            self._near_at = now + self.cfg.near_interval
            self._probe_near(now)
        if self._far_at is not None and self._far_at <= now:
            self._probe_far(now)
        if self._refresh_at is not None and self._refresh_at <= now:
            self._refresh_at = now + self.cfg.refresh_interval
            self._refresh_backpointers(now, everyone=True)
        if self._housekeep_at is not None and self._housekeep_at <= now:
            self._housekeep_at = now + min(self.cfg.dead_ttl, 10 * self.cfg.near_interval)
            self._housekeep(now)
        if self._merge_at is not None and self._merge_at <= now:
            self._merge_at = now + self.cfg.merge_interval * (0.5 + self._merge_rng.random())
            self._probe_passive(now)

    def _on_stall(self, now: float) -> None:
        """Our own timers fired far too late: we were stalled (SIGSTOP, swap, a long GC), not the
        peers. Drop the checks in flight without suspecting anyone and restart the schedule."""
        self.counters["stalls"] += 1
        self._checks.clear()
        self._seq_to_target.clear()
        self._helping.clear()
        for fw in list(self._forwards.values()):  # resend, without holding the silence against anyone
            self._forward(fw.notice, [fw.target, *fw.alternatives], now, fw.first_hop, fw.avoid)
        self._forwards.clear()
        self.start(now)

    # ------------------------------------------------------------------ probing

    def _near_targets(self) -> list[Peer]:
        c = self.chord
        if self.cfg.scheme == "stabilize":
            return self._all_entries()
        out: dict[int, Peer] = {}
        if c.predecessor is not None and self.cfg.probe_predecessor:
            out[c.predecessor.id] = c.predecessor
        for s in c.successors[: self.cfg.near_successors]:
            out.setdefault(s.id, s)
        out.pop(self.me.id, None)
        return list(out.values())

    def _all_entries(self) -> list[Peer]:
        return self.chord.routing_state()

    def _probe_near(self, now: float) -> None:
        for peer in self._near_targets():
            self._probe(peer, now)
        if self.cfg.scheme == "stateful":
            self._refresh_backpointers(now, everyone=False)

    def _probe_far(self, now: float) -> None:
        near = {p.id for p in self._near_targets()}
        far = [p for p in self._all_entries() if p.id not in near]
        # spread the far probes evenly: one entry per far_interval / len(far)
        self._far_at = now + self.cfg.far_interval / max(1, len(far))
        if far:
            self._far_cursor = (self._far_cursor + 1) % len(far)
            self._probe(far[self._far_cursor], now)

    def _probe(self, peer: Peer, now: float) -> None:
        if peer.id in self._checks or peer.id == self.me.id:
            return
        seq = self._new_seq()
        self._checks[peer.id] = _Check(peer, seq, now + self.cfg.probe_timeout)
        self._seq_to_target[seq] = peer.id
        self.counters["probes_sent"] += 1
        self._send(peer.address, Ping(seq=seq, incarnation=self.incarnation))

    def suspect(self, peer: Peer, now: float) -> None:
        """Something else (a lookup, stabilize) got no answer from ``peer``: check it now."""
        if peer.id != self.me.id and not self.is_dead(peer.id):
            self._probe(peer, now)

    def _new_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = (seq + 1) & MASK or 1
        return seq

    def _on_check_timeout(self, check: _Check, now: float) -> None:
        if check.heard:
            # it spoke to us directly while we waited (it came back, or our probe was lost): alive
            self._clear_check(check.target.id)
            return
        if not check.indirect:
            self.counters["suspicions"] += 1
            helpers = [p for p in self._helpers(check.target)][: self.cfg.indirect_checks]
            if helpers:
                check.indirect = True
                check.deadline_at = now + self.cfg.suspicion_timeout
                # probe it directly once more as well: a single lost packet must not kill a node
                self._send(check.target.address, Ping(seq=check.seq, incarnation=self.incarnation))
                for h in helpers:
                    self.counters["indirect_probes"] += 1
                    self._send(h.address, ProbeRequest(req=check.seq, target=check.target))
                return
        self._clear_check(check.target.id)
        self.declare_dead(check.target, now)

    def _helpers(self, target: Peer) -> list[Peer]:
        c = self.chord
        cands = c.routing_state()  # nearest first: the successors, then fingers, the predecessor last
        seen: set[int] = set()
        out = []
        for p in cands:
            check = self._checks.get(p.id)  # a suspect cannot vouch; a routine probe in flight is no suspicion
            if p.id in (target.id, self.me.id) or p.id in seen or (check and check.indirect) or self.is_dead(p.id):
                continue
            seen.add(p.id)
            out.append(p)
        return out

    def _clear_check(self, target_id: int) -> None:
        check = self._checks.pop(target_id, None)
        if check is not None:
            self._seq_to_target.pop(check.seq, None)

    def _alive(self, peer: Peer, incarnation: int) -> None:
        if incarnation > self._alive_inc.get(peer.id, -1):
            if len(self._alive_inc) > _MAX_REMEMBERED:
                self._alive_inc.clear()
            self._alive_inc[peer.id] = incarnation
        self._clear_check(peer.id)

    def unreachable(self, address: str, now: float) -> None:
        """The transport could not connect to ``address``: a failed direct probe, without the wait."""
        for check in list(self._checks.values()):
            if check.target.address == address and not check.indirect:
                self._on_check_timeout(check, now)

    def verify_predecessor(self, now: float) -> None:
        """A predecessor taken from hearsay (a notice, a Leaving) may be dead already: check it now,
        since it is otherwise probed only at the far rate."""
        pred = self.chord.predecessor
        if pred is not None and self._near_at is not None:
            self._probe(pred, now)

    def _recheck(self, peer: Peer) -> None:
        """Hearsay still names ``peer``, which we marked dead: probe it (at most once per
        near_interval). If it restarted or was only stalled, its Pong lifts the mark at once instead
        of after dead_ttl; if it is dead, the check ends quietly (it is already declared)."""
        now = self._now
        last = self._rechecked.get(peer.id)
        if last is not None and now - last < self.cfg.near_interval:
            return
        if len(self._rechecked) > _MAX_REMEMBERED:
            self._rechecked.clear()
        self._rechecked[peer.id] = now
        self._probe(peer, now)

    def observe(self, src: Peer | None, now: float) -> None:
        """Any message straight from ``src`` proves it is running: lift its death mark."""
        self._now = now
        if src is None:
            return
        if src.id in self._dead:
            del self._dead[src.id]
        if src.id in self._passive:
            del self._passive[src.id]
            self._contact(src, now)
        check = self._checks.get(src.id)
        if check is not None and check.target.address == src.address:
            check.heard = True

    # ------------------------------------------------------------------ receiving

    def receive(self, src: Peer, msg: Message, now: float) -> bool:
        """Handle a failure-detection message; False when the message is not ours."""
        self._now = now
        match msg:
            case Ping(seq=seq):
                self._send(src.address, Pong(seq=seq, incarnation=self.incarnation))
            case Pong(seq=seq, incarnation=inc) if seq in self._merge_probes:
                address, _ = self._merge_probes.pop(seq)
                if address == src.address:
                    self._alive(src, inc)
                    self._contact(src, now)
                    if address in self._seed_probed:
                        # a seed answered: it is in our ring, or the merge with its ring starts now; within
                        # merge_ttl the passive lists find partitions, later the seeds are the fallback
                        self._seed_probed[address] = now + self.cfg.merge_ttl
            case Pong(seq=seq, incarnation=inc):
                helped = self._helping.pop(seq, None)
                # a Pong from another address must not use up the seq: the probed node's own Pong still counts
                target_id = self._seq_to_target.pop(seq, None) if helped is not None else self._seq_to_target.get(seq)
                if helped is not None:
                    asker, req, target, _ = helped
                    if target.address == src.address:
                        self._send(asker, ProbeResult(req=req, target=target, alive=True, incarnation=inc))
                    return True
                if target_id is None:
                    return False  # not a detector probe (chord's own check_predecessor, say)
                check = self._checks.get(target_id)
                if check is not None and check.target.address == src.address:
                    self.counters["acks_received"] += 1
                    self._alive(check.target, inc)
            case ProbeRequest(req=req, target=target):
                if target.id == self.me.id:
                    self._send(src.address, ProbeResult(req=req, target=target, alive=True,
                                                        incarnation=self.incarnation))
                else:
                    seq = self._new_seq()
                    self._helping[seq] = (src.address, req, target, now + self.cfg.suspicion_timeout * 0.8)
                    self._seq_to_target[seq] = target.id
                    self._send(target.address, Ping(seq=seq, incarnation=self.incarnation))
            case ProbeResult(req=req, target=target, alive=alive, incarnation=inc):
                check = self._checks.get(target.id)
                if check is not None and check.seq == req and alive:
                    self.counters["acks_received"] += 1
                    self._alive(target, inc)
            case FailureNotice(seq=seq):
                if seq:
                    self._send(src.address, NoticeAck(seq=seq))
                self._on_notice(src, msg, now)
            case NoticeAck(seq=seq):
                fw = self._forwards.get(seq)
                if fw is not None and fw.target.address == src.address:
                    del self._forwards[seq]
            case Alive(incarnation=inc):
                self._alive(src, inc)
            case Register():
                if src.id not in self._backpointers:
                    self._holders_changed = True  # neighbours' copies are stale: resend at the next near tick
                self._backpointers[src.id] = (src, now + 3 * self.cfg.refresh_interval)
            case BackpointerCopy(holders=holders):
                self._copies[src.id] = (holders, now + 3 * self.cfg.refresh_interval)
            case _:
                return False
        return True

    # ------------------------------------------------------------------ declaring and propagating

    def declare_dead(self, peer: Peer, now: float) -> None:
        if peer.id == self.me.id or peer.id in self._dead:
            return
        c = self.chord
        inc = self._alive_inc.get(peer.id, 0)
        pred, exact, repl = self._neighbours_of(peer)
        self.counters["deaths_declared"] += 1
        self._mark_dead(peer, inc, now)
        c.remove_dead(peer, repl)
        self._events.append(PeerDied(peer, inc, pred, exact))
        scheme = self.cfg.scheme
        if scheme == "stateless" and exact:
            # Only a detector that knows pred(f) from its own successor list estimates exactly; the
            # others (f's successor, a far finger holder) just purge: pred(f) probes f at the near
            # rate and propagates (DESIGN.md: keep-alives are biased so that near nodes detect).
            self._propagate_stateless(peer, inc, pred, repl, now)
        elif scheme == "stateful":
            self._notify_backpointers(peer, inc, repl, now)

    def departed(self, peer: Peer, now: float) -> None:
        """``peer`` left gracefully (it sent us Leaving). Its predecessor, which knows pred(peer)
        exactly, propagates the departure like a failure so finger holders drop it at once; every
        receiver marks it so that stale successor lists do not bring it back."""
        if peer.id == self.me.id or peer.id in self._dead:
            return
        inc = self._alive_inc.get(peer.id, 0)
        pred, exact, repl = self._neighbours_of(peer)
        self._mark_dead(peer, inc, now)
        self.counters["departures"] += 1
        if not (exact and pred is not None and pred.id == self.me.id):
            return  # only the predecessor propagates
        if self.cfg.scheme == "stateless":
            self._propagate_stateless(peer, inc, pred, repl, now)
        elif self.cfg.scheme == "stateful":
            self._notify_backpointers(peer, inc, repl, now)

    def _notify_backpointers(self, peer: Peer, inc: int, repl: Peer | None, now: float,
                             relay: Peer | None = None) -> None:
        """Notify the holders in our copy of ``peer``'s backpointer set. Without a copy (the detector
        was not one of its neighbours), hand the notice to ``peer``'s successor, which keeps a copy."""
        notice = FailureNotice(dead=peer, incarnation=inc, detector=self.me, mode=NOTICE_DIRECT,
                               start=0, end=0, back=0, replacement=repl)
        if peer.id not in self._copies:
            if repl is not None and repl.id != self.me.id and relay is None:
                self.counters["notices_sent"] += 1
                self._forward(notice, [repl], now, first_hop=True)
            return
        holders, _ = self._copies.pop(peer.id)
        for h in holders:
            if h.id not in (self.me.id, peer.id):
                self.counters["notices_sent"] += 1
                self._forward(notice, [h], now, first_hop=True)

    def _neighbours_of(self, peer: Peer) -> tuple[Peer | None, bool, Peer | None]:
        """(pred(peer), exact, succ(peer)) as far as this node knows them."""
        c = self.chord
        succs = c.successors
        for k, s in enumerate(succs):
            if s.id == peer.id:
                pred = self.me if k == 0 else succs[k - 1]
                repl = succs[k + 1] if k + 1 < len(succs) else None
                return pred, True, repl
        if c.predecessor is not None and c.predecessor.id == peer.id:
            # our predecessor told us its own predecessor in its last Notify
            pp = c.pred_pred
            if pp is not None and pp.id != peer.id:
                return pp, True, self.me
            repl: Peer | None = self.me
        else:
            repl = None
        # otherwise estimate pred(peer) by the closest node we know that precedes it
        before = c.closest_preceding(peer.id, 1)
        return (before[0] if before else None), False, repl

    def _propagate_stateless(self, peer: Peer, inc: int, pred: Peer | None, repl: Peer | None, now: float) -> None:
        r = self.chord.cfg.successors
        base = dict(dead=peer, incarnation=inc, detector=self.me, replacement=repl, predecessor=pred)
        if repl is not None and repl.id != self.me.id:
            self.counters["notices_sent"] += 1
            self._forward(FailureNotice(mode=NOTICE_DIRECT, start=0, end=0, back=0, **base), [repl], now,
                          first_hop=True)
        if pred is not None:
            back = FailureNotice(mode=NOTICE_BACKWARD, start=0, end=0, back=r - 1, **base)
            if pred.id == self.me.id:
                self._forward_backward(back, now)
            else:
                self.counters["notices_sent"] += 1
                self._forward(back, [pred], now, first_hop=True)
            for start, end in holder_intervals(peer.id, pred.id):
                notice = FailureNotice(mode=NOTICE_INTERVAL, start=start, end=end, back=0, **base)
                self.counters["notices_sent"] += 1
                self._route_interval(notice, now, first_hop=True)

    def _mark_dead(self, peer: Peer, inc: int, now: float) -> None:
        if len(self._dead) > _MAX_REMEMBERED:
            self._housekeep(now)
        self._dead[peer.id] = (inc, now + self.cfg.dead_ttl)
        self._remember_passive(peer, now)
        self._clear_check(peer.id)
        self._backpointers.pop(peer.id, None)
        self._registered.discard(peer.id)

    def _on_notice(self, src: Peer, n: FailureNotice, now: float) -> None:
        self.counters["notices_received"] += 1
        dead = n.dead
        if dead.id == self.me.id:
            # we were declared dead: refute with a higher incarnation (SWIM §4.2)
            if n.incarnation >= self.incarnation:
                self.incarnation = n.incarnation + 1
                self.counters["refutations"] += 1
                self._events.append(Refuted(self.incarnation))
            for addr in {src.address, n.detector.address}:
                if addr != self.me.address:
                    self._send(addr, Alive(incarnation=self.incarnation))
            return
        if self._alive_inc.get(dead.id, -1) > n.incarnation:
            return  # stale: the node has since proved itself alive at a higher incarnation
        key = (dead.id, n.incarnation, n.mode, n.start, n.back)
        if key in self._seen:
            self.counters["notices_duplicate"] += 1
            return
        if len(self._seen) > _MAX_REMEMBERED:
            self._housekeep(now)
        self._seen[key] = now + self.cfg.dead_ttl
        if dead.id not in self._dead:
            self._mark_dead(dead, n.incarnation, now)
        pred, exact, repl = self._neighbours_of(dead)
        if exact and pred is not None and pred.id == self.me.id and repl is not None \
                and repl.id not in (src.id, n.detector.id) and n.mode != NOTICE_DIRECT:
            # we are pred(dead) and know its successor, whose predecessor pointer the detector may not
            # have been able to reach (dead was the last entry of its successor list)
            self.counters["notices_sent"] += 1
            self._forward(replace(n, mode=NOTICE_DIRECT, start=0, end=0, back=0, replacement=repl,
                                  predecessor=self.me, hops=0), [repl], now, first_hop=True)
        if self.chord.remove_dead(dead, n.replacement or repl):
            self.counters["purged_by_notice"] += 1
            self._events.append(PeerPurged(dead))
        if n.predecessor is not None and n.replacement is not None and n.replacement.id == self.me.id:
            # we are the dead node's successor: its predecessor is our new predecessor (Chord's notify rule)
            self.chord.offer_predecessor(n.predecessor)
            self.verify_predecessor(now)
        if self.cfg.scheme == "stateful" and dead.id in self._copies:
            # we keep a copy of the dead node's backpointers: pass the notice on to its holders
            self._notify_backpointers(dead, n.incarnation, n.replacement, now, relay=src)
        if n.hops >= MAX_NOTICE_HOPS:
            return
        if n.mode == NOTICE_BACKWARD:
            self._forward_backward(n, now)
        elif n.mode == NOTICE_INTERVAL:
            self._route_interval(n, now)

    def _forward(self, n: FailureNotice, targets: list[Peer], now: float, first_hop: bool = False,
                 avoid: set[int] | None = None) -> None:
        """Send ``n`` to the first usable target, keeping the rest as fallbacks until it acks."""
        avoid = avoid if avoid is not None else set()
        for k, target in enumerate(targets):
            if target.id in (self.me.id, n.dead.id) or target.id in avoid or self.is_dead(target.id):
                continue
            seq = self._new_seq()
            rest = [p for p in targets[k + 1:] if p.id != target.id]
            self._forwards[seq] = _Forward(n, target, rest, now + self.cfg.notice_timeout, avoid, first_hop)
            if not first_hop:
                self.counters["notices_forwarded"] += 1
            self._send(target.address, replace(n, hops=n.hops + 1, seq=seq))
            return

    def _reroute(self, n: FailureNotice, now: float, first_hop: bool, avoid: set[int]) -> None:
        """Every planned hop stayed silent: plan again from the routing table as it is now."""
        if n.mode == NOTICE_INTERVAL:
            self._route_interval(n, now, first_hop, avoid)
        elif n.mode == NOTICE_BACKWARD:
            c = self.chord
            targets = [p for p in (c.predecessor, c.pred_pred) if p is not None]
            self._forward(n, targets, now, first_hop, avoid)

    def _forward_backward(self, n: FailureNotice, now: float) -> None:
        c = self.chord
        if n.back > 0 and c.predecessor is not None:
            targets = [c.predecessor] + ([c.pred_pred] if c.pred_pred is not None else [])
            self._forward(replace(n, back=n.back - 1), targets, now)

    def _route_interval(self, n: FailureNotice, now: float, first_hop: bool = False,
                        avoid: set[int] | None = None) -> None:
        """Route towards ``start`` (closest preceding node; ``back`` = 0), then walk successors through
        [start, end] (``back`` = 1). A node inside the interval that receives the notice while it is
        still being routed routes it on: the walk must begin at the interval's first node."""
        c = self.chord
        if not c.successors:
            return
        # the walk starts at the first successor-list entry at or after start (not just at our first
        # successor: a dead, not yet purged, first successor must not end the notice)
        walking = n.back == 1 or c.successor_answer(n.start) is not None
        if walking:
            targets = [x for x in c.successors if x.id != n.dead.id and in_interval(x.id, n.start, n.end)
                       and x.id not in (avoid or ())]
            if len(targets) > 1 and n.back == 1 and not avoid:
                # fan out: the successors we know inside the interval get a direct copy at once, the
                # last of them carries the walk on (a wide interval is covered r nodes per hop, not one)
                direct = replace(n, mode=NOTICE_DIRECT, start=0, end=0, back=0)
                for x in targets[:-1]:
                    self._forward(direct, [x], now, first_hop)
                self._forward(replace(n, back=1), [targets[-1], *reversed(targets[:-1])], now, first_hop)
                return
            self._forward(replace(n, back=1), targets[:3 + len(avoid or ())], now, first_hop, avoid)
            return
        targets = [*c.closest_preceding(n.start, 3 + len(avoid or ())), c.successor]
        self._forward(n, targets, now, first_hop, avoid)

    # ------------------------------------------------------------------ stateful backpointers

    def _refresh_backpointers(self, now: float, everyone: bool) -> None:
        entries = self._all_entries()
        ids = {p.id for p in entries}
        for p in entries:
            if everyone or p.id not in self._registered:
                self._send(p.address, Register())
        self._registered = ids
        if everyone or self._holders_changed:
            self._holders_changed = False
            holders = tuple(p for p, exp in self._backpointers.values() if exp > now)[:256]
            c = self.chord
            for nb in {x.address for x in (c.predecessor, c.successor) if x is not None and x.id != self.me.id}:
                self._send(nb, BackpointerCopy(holders=holders))

    # ------------------------------------------------------------------ housekeeping

    # ------------------------------------------------------------------ partition merge

    def passive(self) -> list[Peer]:
        """The merge candidates: peers declared dead or departed within merge_ttl."""
        return [entry[0] for entry in self._passive.values()]

    def _remember_passive(self, peer: Peer, now: float) -> None:
        cap = self.cfg.merge_candidates
        if cap <= 0:
            return
        entry = self._passive.get(peer.id)
        if entry is not None:
            entry[0], entry[1] = peer, now + self.cfg.merge_ttl
            return
        if len(self._passive) >= cap:
            # a random victim (not the oldest): after a partition the list then holds a spread of the
            # other side rather than only the last nodes declared
            victims = sorted(self._passive)
            del self._passive[victims[self._merge_rng.randrange(len(victims))]]
        # never probed yet: ``now`` as its last probe puts it behind entries already waiting
        self._passive[peer.id] = [peer, now + self.cfg.merge_ttl, now]

    def _probe_passive(self, now: float) -> None:
        """One Ping to the least recently probed passive entry or seed (O(1) per node per interval)."""
        if self._merge_probes:
            self._merge_probes = {k: v for k, v in self._merge_probes.items() if v[1] > now}
        chord = self.chord
        best: tuple[float, int, str] | None = None
        for nid, (peer, forget_at, probed_at) in list(self._passive.items()):
            if chord.holds(nid):
                del self._passive[nid]  # back in our routing state (hearsay, after its mark expired)
            elif forget_at > now and (best is None or probed_at < best[0]):
                best = (probed_at, nid, peer.address)
        in_touch = {p.address for p in self._all_entries()}
        for address in chord._seeds:
            if address == self.me.address or address in in_touch:
                continue  # a seed we route through is in our ring: no need to probe it
            probed_at = self._seed_probed.get(address, -1.0)
            if probed_at > now:
                continue  # it answered (and was merged or found in our ring) less than merge_ttl ago
            if best is None or probed_at < best[0]:
                best = (probed_at, -1, address)
        if best is None:
            return
        _, nid, address = best
        if nid >= 0:
            self._passive[nid][2] = now
        else:
            self._seed_probed[address] = now
        seq = self._new_seq()
        self._merge_probes[seq] = (address, now + 4 * self.cfg.merge_interval)
        self.counters["merge_probes"] += 1
        self._send(address, Ping(seq=seq, incarnation=self.incarnation))

    def _contact(self, peer: Peer, now: float) -> None:
        """A merge candidate reached us: if it is outside our ring, merge the rings."""
        if self.chord.merge_with(peer, now):
            self.counters["merge_contacts"] += 1

    def _housekeep(self, now: float) -> None:
        self._passive = {k: v for k, v in self._passive.items() if v[1] > now}
        self._dead = {k: v for k, v in self._dead.items() if v[1] > now}
        self._seen = {k: v for k, v in self._seen.items() if v > now}
        self._backpointers = {k: v for k, v in self._backpointers.items() if v[1] > now}
        self._copies = {k: v for k, v in self._copies.items() if v[1] > now}
