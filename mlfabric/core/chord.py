"""The Chord overlay as a sans-IO state machine (Stoica et al., SIGCOMM 2001 / ToN 2003).

Iterative lookups (the asker drives every hop, so a dead hop is skipped and hops are counted),
join through any seed, periodic stabilize / notify (§4.3), fix_fingers (§4.3), check_predecessor,
successor lists (§5.2) and graceful leave (§4.4 "voluntary departures").

Time comes in as ``now``; messages go out through the outbox as ``(address, message)``; facts go up
as events. A request that gets no reply within ``rpc_timeout`` marks the peer unresponsive, and it is
removed from the routing state (stabilize re-learns it if it was only slow).
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlfabric.config import OverlayConfig
from mlfabric.core.events import (
    Event,
    Joined,
    Left,
    LookupDone,
    PeerUnresponsive,
    PredecessorChanged,
    SuccessorChanged,
)
from mlfabric.core.ring import BITS, MASK, distance, finger_start, in_half_open, in_open
from mlfabric.wire.messages import (
    FindSuccessor,
    FindSuccessorReply,
    GetNeighbors,
    Leaving,
    Message,
    Neighbors,
    Notify,
    Peer,
    Ping,
    Pong,
    SuccessorHint,
)

# Lookup purposes
USER, FINGER, JOIN, MERGE = 0, 1, 2, 3
MAX_MERGES = 2  # ring-merge lookups in flight at once (merge_with)


@dataclass(slots=True)
class _Lookup:
    token: int
    key: int
    purpose: int
    started_at: float
    candidates: list[Peer] = field(default_factory=list)
    tried: set[int] = field(default_factory=set)
    timeouts: dict[int, int] = field(default_factory=dict)
    hops: int = 0
    finger: int = 0
    seeds: list[str] = field(default_factory=list)
    restarts: int = 0
    merge_peer: Peer | None = None


@dataclass(slots=True)
class _Pending:
    deadline_at: float
    address: str
    peer: Peer | None
    on_reply: Callable[[Peer, Message, float], None]
    on_timeout: Callable[[float], None]
    reply_type: type[Message]


class ChordMachine:
    """One node's Chord state and protocol."""

    def __init__(self, me: Peer, cfg: OverlayConfig, rng: random.Random) -> None:
        self.me = me
        self.cfg = cfg
        self._rng = rng
        self.predecessor: Peer | None = None
        self.pred_pred: Peer | None = None  # our predecessor's predecessor, from its Notify
        self._left_at: dict[int, float] = {}  # nodes that recently sent us Leaving
        self.successors: list[Peer] = []
        self.fingers: list[Peer | None] = [None] * BITS
        self.joined = False
        self.leaving = False
        self._outbox: list[tuple[str, Message]] = []
        self._events: deque[Event] = deque()
        self._pending: dict[int, _Pending] = {}
        self._lookups: dict[int, _Lookup] = {}
        self._next_req = 1
        self._next_token = 1
        self._finger_cursor = 0
        self._finger_lookup: int | None = None
        self._stabilizing = False
        self._pinging = False
        self._stabilize_at: float | None = None
        self._fix_at: float | None = None
        self._check_at: float | None = None
        self._join_at: float | None = None
        self._seeds: list[str] = []
        # routing view: distinct peers of fingers + successors, sorted by distance from me
        self._route_dirty = True
        self._route_dist: list[int] = []
        self._route_peers: list[Peer] = []
        self._route_ids: set[int] = set()
        # Hooks for a failure detector (core/failure.py). Without one, a timed-out peer is forgotten.
        self.is_dead: Callable[[int], bool] = lambda node_id: False
        # called when hearsay (a neighbour's list or pointer) names a node marked dead: it may be back
        self.on_dead_hearsay: Callable[[Peer], None] = lambda peer: None
        self.on_unresponsive: Callable[[Peer, float], None] | None = None
        self.check_predecessor_enabled = True
        self.counters: dict[str, int] = {
            "lookups_started": 0,
            "lookups_ok": 0,
            "lookups_failed": 0,
            "lookup_steps_served": 0,
            "rpc_timeouts": 0,
            "stabilize_rounds": 0,
            "successor_changes": 0,
            "merges_started": 0,
            "merge_hints": 0,
        }
        self._merging = 0

    # ------------------------------------------------------------------ public API

    @property
    def successor(self) -> Peer:
        return self.successors[0] if self.successors else self.me

    def bootstrap(self, seeds: list[str], now: float) -> None:
        """Create a new ring (no seeds) or join through the seeds, tried in order."""
        seeds = [s for s in seeds if s != self.me.address]
        if not seeds:
            self.successors = []
            self.joined = True
            self._events.append(Joined(self.me))
            self._arm_periodic(now)
            return
        self._seeds = list(seeds)
        self._start_join(now)

    def lookup(self, key: int, now: float) -> int:
        """Start a lookup of successor(key); a LookupDone event with the returned token follows."""
        return self._start_lookup(key & MASK, USER, now)

    def holds(self, node_id: int) -> bool:
        """Whether ``node_id`` is in our routing state: our predecessor, in our successor list or one of
        our fingers (the one definition the detector, the simulator's checks and the jobs use)."""
        if self.predecessor is not None and self.predecessor.id == node_id:
            return True
        self._routing()
        return node_id in self._route_ids

    def holds_entry(self, node_id: int) -> bool:
        """Whether ``node_id`` is a finger or in the successor list (the routing entries, not the predecessor)."""
        self._routing()
        return node_id in self._route_ids

    def routing_state(self) -> list[Peer]:
        """Every distinct peer we hold, the routing entries by distance and then the predecessor."""
        peers = list(self._routing()[1])
        pred = self.predecessor
        if pred is not None and pred.id not in self._route_ids:
            peers.append(pred)
        return peers

    def merge_with(self, peer: Peer, now: float) -> bool:
        """``peer`` answered us although we had given it up (a merge probe, or it spoke first): if it
        belongs to another ring, start joining the two (ring unification, Shafaat et al. 2009, §5).

        Look ``peer.id`` up in our ring. The answer s = successor(peer.id) in our ring is ``peer``
        itself when it is one of us already (nothing to do). Otherwise s and pred(s) (asked with
        GetNeighbors) are the two nodes of our ring that ``peer`` falls between: ``peer`` is hinted
        to pred(s) as a successor and s to ``peer``; each side adopts the hint only if it is closer
        than its own successor, and stabilize (which re-runs at once after a hint) then zips the two
        rings together from that point, both rings' nodes walking back along the other ring.
        The other ring does the same when its nodes reach ours, so zips start at many points. False
        when no merge lookup was started."""
        if not self.joined or self.leaving or peer.id == self.me.id or self.is_dead(peer.id):
            return False
        if self.holds(peer.id) or self._merging >= MAX_MERGES:
            return False
        if not self.successors or in_open(peer.id, self.me.id, self.successor.id):
            self._on_hint(peer, now)  # it falls right after us: adopt it (stabilize checks it at once)
            return True
        self.counters["merges_started"] += 1
        self._merging += 1
        self._start_lookup(peer.id, MERGE, now, merge_peer=peer)
        return True

    def leave(self, now: float) -> None:
        """Graceful leave: hand predecessor and successors to the neighbours, then go quiet."""
        if self.leaving:
            return
        self.leaving = True
        succ = [s for s in self.successors if s.id != self.me.id]
        if succ:
            self._send(succ[0].address, Leaving(predecessor=self.predecessor, successors=tuple(succ)))
        if self.predecessor is not None and self.predecessor.id != self.me.id:
            if not succ or self.predecessor.id != succ[0].id:
                self._send(self.predecessor.address, Leaving(predecessor=self.predecessor, successors=tuple(succ)))
        self._pending.clear()
        for lk in list(self._lookups.values()):
            self._finish_lookup(lk, None, now)
        self._stabilize_at = self._fix_at = self._check_at = self._join_at = None
        self._events.append(Left())

    def next_deadline(self) -> float | None:
        times = [t for t in (self._stabilize_at, self._fix_at, self._check_at, self._join_at) if t is not None]
        if self._pending:
            times.append(min(p.deadline_at for p in self._pending.values()))
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self._pending:
            expired = [req for req, p in self._pending.items() if p.deadline_at <= now]
            for req in expired:
                pending = self._pending.pop(req, None)
                if pending is not None:
                    self.counters["rpc_timeouts"] += 1
                    pending.on_timeout(now)
        if self._join_at is not None and self._join_at <= now:
            self._join_at = None
            self._start_join(now)
        if self._stabilize_at is not None and self._stabilize_at <= now:
            self._stabilize_at = now + self.cfg.stabilize_interval
            self._stabilize(now)
        if self._check_at is not None and self._check_at <= now:
            self._check_at = now + self.cfg.check_predecessor_interval
            self._check_predecessor(now)
        if self._fix_at is not None and self._fix_at <= now:
            self._fix_at = now + self.cfg.fix_fingers_interval
            self._fix_fingers(now)

    def receive(self, src: Peer, msg: Message, now: float) -> None:
        if self.leaving:
            return
        match msg:
            case FindSuccessor(req=req, key=key):
                self._serve_find_successor(src, req, key)
            case GetNeighbors(req=req):
                self._send(src.address, Neighbors(req=req, predecessor=self.predecessor,
                                                  successors=tuple(self._successor_list_for_reply())))
            case Notify(predecessor=their_pred):
                left_at = self._left_at.get(src.id)
                if left_at is not None and now - left_at < 4 * self.cfg.stabilize_interval:
                    return  # sent before its Leaving, delivered after it: the handover stands
                self._on_notify(src)
                if self.predecessor is not None and self.predecessor.id == src.id:
                    self.pred_pred = their_pred
            case Ping(seq=seq):
                self._send(src.address, Pong(seq=seq))
            case SuccessorHint(candidate=cand):
                self._on_hint(cand, now)
            case Leaving(predecessor=pred, successors=succs):
                self._on_leaving(src, pred, succs, now)
            case FindSuccessorReply(req=req) | Neighbors(req=req) | Pong(seq=req):
                pending = self._pending.get(req)
                if pending is None or pending.address != src.address or type(msg) is not pending.reply_type:
                    return  # late, forged or mismatched reply: ignore (the request times out if need be)
                del self._pending[req]
                pending.on_reply(src, msg, now)
            case _:
                pass

    def unreachable(self, address: str, now: float) -> None:
        """The transport could not reach ``address``: fail its pending requests now."""
        for req, pending in list(self._pending.items()):
            if pending.address == address and req in self._pending:
                del self._pending[req]
                self.counters["rpc_timeouts"] += 1
                pending.on_timeout(now)

    def drain_outbox(self) -> list[tuple[str, Message]]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def routing_entries(self) -> tuple[list[int], list[Peer]]:
        """This node's routing view, the one every machine uses: the distinct peers of its fingers and
        successor list, sorted by clockwise distance from it, with those distances (cached)."""
        return self._routing()

    def send(self, address: str, msg: Any) -> None:
        """Queue a message in the node's one outbox (the other machines of NodeCore send through it)."""
        self._outbox.append((address, msg))

    def install(self, predecessor: Peer | None, successors: list[Peer], fingers: list[Peer | None], now: float) -> None:
        """Start from given routing state instead of the join protocol: a simulation that starts from an
        already converged ring (``mlfabric sim job --ring ideal``). The periodic protocol runs from here."""
        self.predecessor = predecessor
        self.successors = [s for s in successors if s.id != self.me.id][: self.cfg.successors]
        self.fingers = list(fingers) + [None] * (BITS - len(fingers))
        if self.successors:
            self.fingers[0] = self.successors[0]
        self._route_dirty = True
        self.joined = True
        self._events.append(Joined(self.successor))
        self._arm_periodic(now)

    def distinct_fingers(self) -> list[Peer]:
        seen: dict[int, Peer] = {}
        for f in self.fingers:
            if f is not None:
                seen.setdefault(f.id, f)
        return list(seen.values())

    # ------------------------------------------------------------------ plumbing

    def _send(self, address: str, msg: Message) -> None:
        self._outbox.append((address, msg))

    def _request(
        self,
        address: str,
        peer: Peer | None,
        make: Callable[[int], Message],
        on_reply: Callable[[Peer, Message, float], None],
        on_timeout: Callable[[float], None],
        now: float,
        reply_type: type[Message],
    ) -> None:
        req = self._next_req
        self._next_req = (self._next_req + 1) & MASK or 1
        self._pending[req] = _Pending(now + self.cfg.rpc_timeout, address, peer, on_reply, on_timeout, reply_type)
        self._send(address, make(req))

    def _arm_periodic(self, now: float) -> None:
        # random phases so that nodes started together do not beat in step
        r = self._rng.random
        self._stabilize_at = now + r() * self.cfg.stabilize_interval
        self._fix_at = now + r() * self.cfg.fix_fingers_interval
        self._check_at = now + r() * self.cfg.check_predecessor_interval

    def _set_successors(self, succs: list[Peer]) -> None:
        out: list[Peer] = []
        seen = set()
        is_dead = self.is_dead
        for s in succs:
            if s.id == self.me.id or s.id in seen:
                continue
            if is_dead(s.id):
                self.on_dead_hearsay(s)
                continue
            seen.add(s.id)
            out.append(s)
            if len(out) >= self.cfg.successors:
                break
        if out == self.successors:
            return
        old = self.successors[0] if self.successors else None
        self.successors = out
        self._route_dirty = True
        new = out[0] if out else None
        if new != old:
            self.counters["successor_changes"] += 1
            self.fingers[0] = new
            self._events.append(SuccessorChanged(new or self.me))

    def _set_predecessor(self, pred: Peer | None) -> None:
        if pred is not None and pred.id == self.me.id:
            pred = None
        if pred != self.predecessor:
            self.predecessor = pred
            self._events.append(PredecessorChanged(pred))

    def _successor_list_for_reply(self) -> list[Peer]:
        return list(self.successors) if self.successors else [self.me]

    def _routing(self) -> tuple[list[int], list[Peer]]:
        if self._route_dirty:
            peers: dict[int, Peer] = {}
            for f in self.fingers:
                if f is not None:
                    peers[f.id] = f
            for s in self.successors:
                peers[s.id] = s
            peers.pop(self.me.id, None)
            me = self.me.id
            ordered = sorted(peers.values(), key=lambda p: distance(me, p.id))
            self._route_peers = ordered
            self._route_dist = [distance(me, p.id) for p in ordered]
            self._route_ids = {p.id for p in ordered}
            self._route_dirty = False
        return self._route_dist, self._route_peers

    def _closest_preceding(self, key: int, limit: int) -> list[Peer]:
        """Known nodes in (me, key), closest to key first (Chord's closest_preceding_node)."""
        dists, peers = self._routing()
        i = bisect_left(dists, distance(self.me.id, key))
        return [peers[j] for j in range(i - 1, max(i - 1 - limit, -1), -1)]

    def _unresponsive(self, peer: Peer, now: float) -> None:
        """A request to ``peer`` timed out: let the failure detector check it, or forget it."""
        if self.on_unresponsive is not None:
            self.on_unresponsive(peer, now)
        elif self.remove_dead(peer, None):
            self._events.append(PeerUnresponsive(peer))

    def remove_dead(self, peer: Peer, replacement: Peer | None) -> bool:
        """Drop ``peer`` from all routing state; fingers that pointed at it point at ``replacement``
        (the dead node's successor, which is the right new finger) when given. True if it was held."""
        held = False
        if any(s.id == peer.id for s in self.successors):
            self._set_successors([s for s in self.successors if s.id != peer.id])
            held = True
        if self.predecessor is not None and self.predecessor.id == peer.id:
            self._set_predecessor(None)
            held = True
        if replacement is not None and (replacement.id == peer.id or self.is_dead(replacement.id)):
            replacement = None
        for i, f in enumerate(self.fingers):
            if f is not None and f.id == peer.id:
                self.fingers[i] = replacement if replacement is None or replacement.id != self.me.id else None
                held = True
        if self.successors:
            self.fingers[0] = self.successors[0]
        if held:
            self._route_dirty = True
        if not self.successors and self.joined:
            # Successor list exhausted: fall back on the closest live entry we still know.
            _, peers = self._routing()
            if peers:
                self._set_successors([peers[0]])
        return held

    def closest_preceding(self, key: int, limit: int) -> list[Peer]:
        return self._closest_preceding(key, limit)

    def successor_answer(self, key: int) -> tuple[Peer, ...] | None:
        return self._successor_answer(key) if self.successors else None

    # ------------------------------------------------------------------ lookups

    def _start_lookup(self, key: int, purpose: int, now: float, finger: int = 0,
                      merge_peer: Peer | None = None) -> int:
        token = self._next_token
        self._next_token += 1
        lk = _Lookup(token=token, key=key, purpose=purpose, started_at=now, finger=finger, merge_peer=merge_peer)
        self._lookups[token] = lk
        if purpose == USER:
            self.counters["lookups_started"] += 1
        if not self.joined or self.leaving:
            self._finish_lookup(lk, None, now)
            return token
        answer = self._successor_answer(key)
        if answer is not None:
            self._finish_lookup(lk, answer[0], now)
            return token
        if self.predecessor is not None and in_half_open(key, self.predecessor.id, self.me.id):
            self._finish_lookup(lk, self.me, now)
            return token
        lk.candidates = self._closest_preceding(key, BITS + self.cfg.successors)
        self._lookup_next(lk, now)
        return token

    def _start_join(self, now: float) -> None:
        lk = _Lookup(token=self._next_token, key=self.me.id, purpose=JOIN, started_at=now)
        self._next_token += 1
        lk.seeds = list(self._seeds)
        self._lookups[lk.token] = lk
        self._lookup_next(lk, now)

    def _lookup_next(self, lk: _Lookup, now: float) -> None:
        if lk.hops >= self.cfg.max_lookup_hops:
            self._finish_lookup(lk, None, now)
            return
        while lk.candidates:
            cand = lk.candidates.pop(0)
            if cand.id in lk.tried or cand.id == self.me.id or self.is_dead(cand.id):
                continue
            lk.tried.add(cand.id)
            self._lookup_ask(lk, cand.address, cand, now)
            return
        if lk.seeds:  # only joins have seeds: ask the next one (its id is not known yet)
            self._lookup_ask(lk, lk.seeds.pop(0), None, now)
            return
        if lk.purpose != JOIN and lk.restarts < self.cfg.lookup_retries and self.joined:
            # every candidate timed out (lost messages, or dead hops not yet purged): start over
            # from our own, meanwhile repaired, routing table
            lk.restarts += 1
            lk.tried.clear()
            lk.candidates = self._closest_preceding(lk.key, BITS + self.cfg.successors)
            if in_half_open(lk.key, self.me.id, self.successor.id):
                self._finish_lookup(lk, self.successor, now)
                return
            if lk.candidates:
                self._lookup_next(lk, now)
                return
        self._finish_lookup(lk, None, now)

    def _lookup_ask(self, lk: _Lookup, address: str, peer: Peer | None, now: float) -> None:
        key = lk.key

        def on_reply(src: Peer, msg: Message, t: float) -> None:
            self._on_lookup_reply(lk, src, msg, t)

        def on_timeout(t: float) -> None:
            if peer is not None:
                self._unresponsive(peer, t)
                # one lost message must not exclude the node this lookup needs: it may be suggested
                # and asked once more; a second silence excludes it for this lookup
                n = lk.timeouts[peer.id] = lk.timeouts.get(peer.id, 0) + 1
                if n < 2:
                    lk.tried.discard(peer.id)
            self._lookup_next(lk, t)

        self._request(address, peer, lambda req: FindSuccessor(req=req, key=key), on_reply, on_timeout, now,
                      FindSuccessorReply)

    def _on_lookup_reply(self, lk: _Lookup, src: Peer, msg: FindSuccessorReply, now: float) -> None:
        if lk.token not in self._lookups:
            return
        lk.hops += 1
        lk.tried.add(src.id)
        if msg.done:
            if msg.nodes:
                self._finish_lookup(lk, msg.nodes[0], now, msg.nodes)
            else:
                self._lookup_next(lk, now)
            return
        # The responder's nodes (best first) lie between it and the key, so they are closer than every
        # remaining candidate of ours: try them first and keep ours as fallbacks for dead hops.
        tried = lk.tried
        fresh = [p for p in msg.nodes if p.id not in tried and p.id != self.me.id]
        if fresh:
            ids = {p.id for p in fresh}
            lk.candidates = fresh + [p for p in lk.candidates if p.id not in ids]
        self._lookup_next(lk, now)

    def _finish_lookup(self, lk: _Lookup, node: Peer | None, now: float,
                       successors: tuple[Peer, ...] = ()) -> None:
        if self._lookups.pop(lk.token, None) is None:
            return
        if lk.purpose == USER:
            self.counters["lookups_ok" if node is not None else "lookups_failed"] += 1
            self._events.append(LookupDone(lk.token, lk.key, node, lk.hops, now - lk.started_at))
        elif lk.purpose == FINGER:
            self._finger_lookup = None
            if node is not None and not self.leaving:
                self._on_finger_found(lk.finger, node)
        elif lk.purpose == MERGE:
            self._merging -= 1
            if node is not None and lk.merge_peer is not None and not self.leaving:
                self._merge_found(lk.merge_peer, node, now)
        elif lk.purpose == JOIN:
            if node is None or node.id == self.me.id and len(successors) <= 1:
                self._join_at = now + self.cfg.join_retry_interval
                return
            self.joined = True
            self._set_successors([node, *successors])
            self._arm_periodic(now)
            self._stabilize_at = now  # learn the successor's list and notify it at once
            self._events.append(Joined(self.successor))

    def _merge_found(self, peer: Peer, succ: Peer, now: float) -> None:
        """The merge lookup for ``peer`` ended at ``succ`` = successor(peer.id) in our ring."""
        if succ.id == peer.id:
            return  # it is in our ring already: only our routing state had lost it
        if succ.id == self.me.id:
            pred = self.predecessor
            self.counters["merge_hints"] += 1
            self._send(peer.address, SuccessorHint(candidate=self.me))
            if pred is not None and pred.id != peer.id:
                self._send(pred.address, SuccessorHint(candidate=peer))
            return
        self.counters["merge_hints"] += 1
        self._send(peer.address, SuccessorHint(candidate=succ))

        def on_reply(src: Peer, msg: Message, t: float) -> None:
            p = msg.predecessor
            if p is None or p.id == peer.id:
                return
            if p.id == self.me.id:
                self._on_hint(peer, t)
            else:
                self._send(p.address, SuccessorHint(candidate=peer))

        def on_timeout(t: float) -> None:
            self._unresponsive(succ, t)

        self._request(succ.address, succ, lambda req: GetNeighbors(req=req), on_reply, on_timeout, now, Neighbors)

    # ------------------------------------------------------------------ serving

    def _successor_answer(self, key: int) -> tuple[Peer, ...] | None:
        """successor(key) and the nodes after it, when key falls before an entry of our successor list.

        The list holds consecutive nodes, so key in (s_k, s_k+1] means successor(key) = s_k+1 (Chord
        §5.2 uses the list the same way); this also routes around a dead s_k the asker cannot reach."""
        if not self.successors:
            return (self.me,)
        prev = self.me.id
        for k, s in enumerate(self.successors):
            if in_half_open(key, prev, s.id):
                return tuple(self.successors[k:])
            prev = s.id
        return None

    def _serve_find_successor(self, src: Peer, req: int, key: int) -> None:
        self.counters["lookup_steps_served"] += 1
        if not self.joined:
            self._send(src.address, FindSuccessorReply(req=req, done=False, nodes=()))
            return
        if self.predecessor is not None and in_half_open(key, self.predecessor.id, self.me.id):
            nodes = (self.me, *self.successors[: self.cfg.successors - 1])
            self._send(src.address, FindSuccessorReply(req=req, done=True, nodes=nodes))
            return
        answer = self._successor_answer(key)
        if answer is not None:
            self._send(src.address, FindSuccessorReply(req=req, done=True, nodes=answer))
            return
        nodes = self._closest_preceding(key, self.cfg.lookup_fanout)
        if not nodes:
            nodes = [self.successor]
        self._send(src.address, FindSuccessorReply(req=req, done=False, nodes=tuple(nodes)))

    def offer_predecessor(self, cand: Peer) -> None:
        """Take ``cand`` as predecessor when we have none or it is closer (Chord's notify rule)."""
        if cand.id == self.me.id or self.is_dead(cand.id) or not self.joined:
            return
        if self.predecessor is None or in_open(cand.id, self.predecessor.id, self.me.id):
            self._set_predecessor(cand)

    def _on_notify(self, src: Peer) -> None:
        if src.id == self.me.id or not self.joined:
            return
        old = self.predecessor
        if old is None or in_open(src.id, old.id, self.me.id):
            self._set_predecessor(src)
            if old is not None and old.id != src.id:
                # the old predecessor's successor pointer now skips src: tell it at once
                self._send(old.address, SuccessorHint(candidate=src))
        elif old.id != src.id:
            # src skips our predecessor: tell it instead of letting it wait for its next stabilize
            self._send(src.address, SuccessorHint(candidate=old))
        if not self.successors:
            # Alone in the ring until now: the first node to notify us is also our successor.
            self._set_successors([src])

    def _on_hint(self, cand: Peer, now: float) -> None:
        if not self.joined or cand.id == self.me.id:
            return
        if self.is_dead(cand.id):
            # someone in touch with it says it is there (after a partition heals, say): check it; if it
            # answers, the detector lifts the mark and offers it to merge_with
            self.on_dead_hearsay(cand)
            return
        if not self.successors or in_open(cand.id, self.me.id, self.successor.id):
            self._set_successors([cand, *self.successors])
            self._stabilize_at = now  # verify the candidate and notify it straight away

    def _on_leaving(self, src: Peer, pred: Peer | None, succs: tuple[Peer, ...], now: float) -> None:
        if self.successors and self.successors[0].id == src.id:
            rest = [s for s in succs if s.id != src.id]
            self._set_successors(rest + [s for s in self.successors[1:] if s.id != src.id])
        else:
            self._set_successors([s for s in self.successors if s.id != src.id])
        if len(self._left_at) > 256:
            horizon = now - 4 * self.cfg.stabilize_interval
            self._left_at = {k: t for k, t in self._left_at.items() if t > horizon}
        self._left_at[src.id] = now
        if self.predecessor is None or self.predecessor.id == src.id:
            ok = pred is not None and pred.id not in (self.me.id, src.id) and not self.is_dead(pred.id)
            self._set_predecessor(pred if ok else None)
        elif pred is not None:
            self.offer_predecessor(pred)
        repl = self.successors[0] if self.successors else None
        for i, f in enumerate(self.fingers):
            if f is not None and f.id == src.id:
                self.fingers[i] = repl
        self._route_dirty = True

    # ------------------------------------------------------------------ periodic (Chord §4.3)

    def _stabilize(self, now: float) -> None:
        if self._stabilizing:
            return
        if not self.successors:
            return
        self.counters["stabilize_rounds"] += 1
        succ = self.successors[0]
        self._stabilizing = True

        def on_reply(src: Peer, msg: Message, t: float) -> None:
            self._stabilizing = False
            if not self.successors or self.successors[0].id != succ.id:
                self._stabilize_at = t  # the successor changed meanwhile (a hint): check the new one now
                return
            x = msg.predecessor
            new_list = [succ, *msg.successors]
            if x is not None and self.is_dead(x.id):
                self.on_dead_hearsay(x)  # our successor is in touch with it: it may have come back
            if x is not None and x.id != self.me.id and not self.is_dead(x.id) and in_open(x.id, self.me.id, succ.id):
                # a node joined between us and our successor: adopt it and ask it at once
                new_list = [x, *new_list]
                self._set_successors(new_list)
                self._stabilize_at = t
            else:
                self._set_successors(new_list)
            if self.successors:
                self._send(self.successors[0].address, Notify(predecessor=self.predecessor))

        def on_timeout(t: float) -> None:
            self._stabilizing = False
            self._unresponsive(succ, t)
            if not self.successors or self.successors[0].id != succ.id:
                self._stabilize_at = t  # it was dropped: repair with the next successor straight away

        self._request(succ.address, succ, lambda req: GetNeighbors(req=req), on_reply, on_timeout, now, Neighbors)

    def _check_predecessor(self, now: float) -> None:
        pred = self.predecessor
        if pred is None or self._pinging or not self.check_predecessor_enabled:
            return
        self._pinging = True

        def on_reply(src: Peer, msg: Message, t: float) -> None:
            self._pinging = False

        def on_timeout(t: float) -> None:
            self._pinging = False
            self._unresponsive(pred, t)

        self._request(pred.address, pred, lambda req: Ping(seq=req), on_reply, on_timeout, now, Pong)

    def _fix_fingers(self, now: float) -> None:
        if self._finger_lookup is not None:
            return
        if not self.successors:  # alone: every finger is this node
            self.fingers = [self.me] * BITS
            return
        succ = self.successors[0]
        if self.fingers[0] != succ:
            self.fingers[0] = succ
            self._route_dirty = True
        i = self._finger_cursor
        # fingers whose start lies in (me, succ] are the successor: no lookup needed
        while i < BITS and in_half_open(finger_start(self.me.id, i), self.me.id, succ.id):
            if self.fingers[i] != succ:
                self.fingers[i] = succ
                self._route_dirty = True
            i += 1
        if i >= BITS:
            self._finger_cursor = 0
            return
        self._finger_cursor = i
        token = self._start_lookup(finger_start(self.me.id, i), FINGER, now, finger=i)
        # a lookup answered from our own table finishes inside _start_lookup
        self._finger_lookup = token if token in self._lookups else None

    def _on_finger_found(self, i: int, node: Peer) -> None:
        if self.is_dead(node.id):
            self.on_dead_hearsay(node)  # the ring says it is there: check (it may have restarted)
            return
        me = self.me.id
        reach = distance(me, node.id) if node.id != me else MASK + 1
        fingers = self.fingers
        changed = fingers[i] != node
        fingers[i] = node
        j = i + 1
        # every later finger whose start is still at or before node also points at node
        while j < BITS and distance(me, finger_start(me, j)) <= reach:
            changed = changed or fingers[j] != node
            fingers[j] = node
            j += 1
        self._finger_cursor = 0 if j >= BITS else j
        if changed:
            self._route_dirty = True
