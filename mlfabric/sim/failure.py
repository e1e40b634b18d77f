"""``mlfabric sim failure``: crash nodes in a converged ring and measure detection and propagation.

The ring is built through the join protocol and left to settle (including one ``far_interval`` /
``refresh_interval`` of warm-up, so every scheme is in its steady state). Then F random nodes
crash (fail-stop) at random times within the failure window while lookups run. For every crash the
*true holders* are recorded at the moment of the crash: the live nodes whose predecessor, successor
list or fingers contain the victim. The detection delay of a crash is the time until every one of
them still alive has purged the victim (polled every ``poll`` virtual seconds). Message counts are
taken over the failure window only, from the moment the first crash is scheduled to the end of
the run:

* keep-alive messages: Ping, Pong, ProbeRequest, ProbeResult, Register, BackpointerCopy, Alive;
* propagation messages: FailureNotice and its hop-by-hop NoticeAck.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from typing import Any

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.events import Event, LookupDone
from mlfabric.core.failure import KEEPALIVE_TYPES, PeerDied, holder_intervals, in_interval
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, ring_id
from mlfabric.sim.ring import RingSim
from mlfabric.wire.messages import FailureNotice, NoticeAck

Progress = Callable[[str, float], None]
SCHEMES = ("stateless", "stateful", "stabilize")


def holds(core: NodeCore, dead_id: int) -> bool:
    c = core.chord
    if c.predecessor is not None and c.predecessor.id == dead_id:
        return True
    if any(s.id == dead_id for s in c.successors):
        return True
    return any(f is not None and f.id == dead_id for f in c.fingers)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class FailureRun:
    def __init__(
        self,
        nodes: int,
        seed: int,
        failures: int,
        scheme: str,
        loss: float = 0.0,
        churn: float = 0.0,
        overlay: OverlayConfig | None = None,
        failure: FailureConfig | None = None,
        window: float | None = None,
        lookup_rate: float = 20.0,
        poll: float = 0.05,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}")
        if not 0 <= failures < nodes:
            raise ValueError("--failures must be at least 0 and below --nodes")
        base = failure or FailureConfig()
        self.fcfg = base.model_copy(update={"scheme": scheme})
        self.scheme = scheme
        self.failures = failures
        self.loss = loss
        self.churn = churn
        self.window = window if window is not None else max(30.0, failures * 0.3)
        self.lookup_rate = lookup_rate
        self.poll = poll
        self.sim = RingSim(nodes, seed, overlay or OverlayConfig(), failure=self.fcfg, loss=0.0)
        self.rng = self.sim.rng
        self.net = self.sim.net
        self.counting = False
        self.sent: Counter[str] = Counter()
        self.notice_targets: dict[int, set[str]] = {}
        self.declared: list[tuple[float, str, PeerDied]] = []
        self.lookups: dict[tuple[str, int], tuple[int, float]] = {}
        self.lookup_done: list[tuple[str, LookupDone, float]] = []
        self.gone_at: dict[str, float] = {}  # crashed or left, and when
        self.added_at: dict[str, float] = {}
        self.net.on_send = self._on_send
        self.net.on_event = self._on_event
        self.crashed_at: dict[str, float] = {}
        self.holders: dict[str, set[str]] = {}
        self.resolved: dict[str, float] = {}
        self.left: set[str] = set()
        self.spare_index = nodes

    # ------------------------------------------------------------------ hooks

    def _on_send(self, src: str, dst: str, msg: object) -> None:
        if not self.counting:
            return
        if isinstance(msg, KEEPALIVE_TYPES):
            self.sent["keepalive"] += 1
        elif isinstance(msg, FailureNotice):
            self.sent["propagation"] += 1
            self.notice_targets.setdefault(msg.dead.id, set()).add(dst)
        elif isinstance(msg, NoticeAck):
            self.sent["propagation"] += 1
        else:
            self.sent["overlay"] += 1

    def _on_event(self, address: str, ev: Event) -> None:
        if isinstance(ev, PeerDied):
            self.declared.append((self.net.now, address, ev))
        elif isinstance(ev, LookupDone):
            self.lookup_done.append((address, ev, self.net.now))

    # ------------------------------------------------------------------ script

    def _crash(self, address: str) -> None:
        if address in self.net.crashed or address in self.left:
            return
        dead_id = self.net.nodes[address].me.id
        self.holders[address] = {
            a for a, c in self.net.nodes.items()
            if a != address and a not in self.net.crashed and a not in self.left and holds(c, dead_id)
        }
        self.crashed_at[address] = self.net.now
        self.gone_at[address] = self.net.now
        self.net.crash(address)

    def _churn_step(self) -> None:
        """One churn event: a new node joins through a random live node, or a random node leaves."""
        live = [a for a in self.net.nodes if a not in self.net.crashed and a not in self.left
                and a not in self.victims]
        if self.rng.random() < 0.5:
            i = self.spare_index
            self.spare_index += 1
            peer = self.sim._add_node(i, ring_id(f"{self.sim.seed}:{i}"))
            self.added_at[peer.address] = self.net.now
            seed = live[self.rng.randrange(len(live))]
            self.sim._bootstrap(peer.address, [seed])
        elif len(live) > 2:
            addr = live[self.rng.randrange(len(live))]
            self.left.add(addr)
            self.gone_at[addr] = self.net.now
            self.net.nodes[addr].leave(self.net.now)
            self.net.pump(addr)
            self.net.crash(addr)  # gone: it answers nothing more (its Leaving messages are already out)

    def _lookup(self) -> None:
        live = [a for a in self.net.nodes if a not in self.net.crashed and a not in self.left]
        addr = live[self.rng.randrange(len(live))]
        core = self.net.nodes[addr]
        if not core.chord.joined:
            return
        key = self.rng.getrandbits(BITS)
        token = core.lookup(key, self.net.now)
        self.lookups[(addr, token)] = (key, self.net.now)
        self.net.pump(addr)

    def _poll(self) -> None:
        now = self.net.now
        for addr, t0 in self.crashed_at.items():
            if addr in self.resolved:
                continue
            dead_id = self.net.nodes[addr].me.id
            if not any(h not in self.net.crashed and holds(self.net.nodes[h], dead_id) for h in self.holders[addr]):
                self.resolved[addr] = now - t0

    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        t_wall = time.perf_counter()
        sim = self.sim
        sim.schedule_joins(max(5.0, sim.n / 200))
        sim.net.run_until(sim.last_join_at)
        if progress:
            progress(f"{self.scheme}: joining", 1.0)
        converged_at = sim.run_until_converged(check_every=sim.cfg.stabilize_interval, limit=600.0)
        # warm-up: far probes and backpointer registrations reach their steady state
        warm = max(self.fcfg.far_interval, self.fcfg.refresh_interval) if self.scheme != "stabilize" else \
            self.fcfg.near_interval * 3
        sim.net.run_until(sim.net.now + warm)
        self.net.loss = self.loss
        t0 = sim.net.now
        live = list(self.net.nodes)
        self.victims = set(self.rng.sample(live, self.failures))
        for addr in sorted(self.victims):
            self.net.call_at(t0 + self.rng.uniform(0, self.window), lambda a=addr: self._crash(a))
        if self.churn > 0:
            for _ in range(int(self.churn * self.window)):
                self.net.call_at(t0 + self.rng.uniform(0, self.window), self._churn_step)
        for k in range(int(self.lookup_rate * self.window)):
            self.net.call_at(t0 + k / self.lookup_rate, self._lookup)
        self.counting = True
        node_seconds = 0.0
        limit = t0 + self.window + 2 * self.fcfg.far_interval + 10 * self.fcfg.near_interval
        while sim.net.now < limit:
            before = sim.net.now
            sim.net.run_until(sim.net.now + self.poll)
            node_seconds += (sim.net.now - before) * sum(
                1 for a in self.net.nodes if a not in self.net.crashed and sim.core(a).chord.joined)
            self._poll()
            if progress:
                progress(f"{self.scheme}: failures", min(1.0, (sim.net.now - t0) / (self.window + 1e-9)))
            if sim.net.now > t0 + self.window and len(self.resolved) == len(self.crashed_at) \
                    and self._missed() == 0:
                # every recorded holder has purged, and no node took a dead one in meanwhile (a
                # successor list can shift past a crashed node and pick up another for one round)
                break
        end = sim.net.now
        self.counting = False
        return self._report(t0, end, node_seconds, converged_at, time.perf_counter() - t_wall)

    # ------------------------------------------------------------------ metrics

    def _missed(self) -> int:
        """(live node, crashed node) pairs where the live node still routes through the crashed one."""
        nodes = self.net.nodes
        dead_ids = {nodes[a].me.id for a in self.crashed_at}
        count = 0
        for a, c in nodes.items():
            if a in self.net.crashed:
                continue
            ch = c.chord
            held = {f.id for f in ch.fingers if f is not None}
            held.update(x.id for x in ch.successors)
            if ch.predecessor is not None:
                held.add(ch.predecessor.id)
            count += len(held & dead_ids)
        return count

    def _report(self, t0: float, end: float, node_seconds: float, converged_at: float | None,
                wall: float) -> dict[str, Any]:
        nodes = self.net.nodes
        delays = list(self.resolved.values())
        unresolved = [a for a in self.crashed_at if a not in self.resolved]
        missed = self._missed()
        truly_dead = set(self.crashed_at) | self.left
        false_pos = {ev.peer.address for t, _, ev in self.declared if ev.peer.address not in truly_dead}
        precision, recall = self._estimation()
        wrong = failed = 0
        ring = sorted((c.me.id, a) for a, c in nodes.items())
        ids = [i for i, _ in ring]
        for address, ev, t_done in self.lookup_done:
            if (address, ev.token) not in self.lookups:
                continue
            if ev.node is None:
                failed += 1
                continue
            # correct when the answer is the true successor among the nodes present at completion
            k = bisect_left(ids, ev.key)
            for step in range(len(ring)):
                nid, a = ring[(k + step) % len(ring)]
                if self.gone_at.get(a, math.inf) > t_done and self.added_at.get(a, -1.0) < t_done:
                    break
            if ev.node.id != nid:
                wrong += 1
        issued = len(self.lookups)
        duration = end - t0
        touched = [len(v) for v in self.notice_targets.values()]
        return {
            "scheme": self.scheme,
            "nodes": self.sim.n,
            "seed": self.sim.seed,
            "failures": self.failures,
            "loss": self.loss,
            "churn": self.churn,
            "converged_before_failures": converged_at is not None,
            "detection_delay_median_s": _round(_percentile(delays, 0.5)),
            "detection_delay_p99_s": _round(_percentile(delays, 0.99)),
            "detection_delay_max_s": _round(max(delays) if delays else None),
            "detection_delays_s": sorted(round(d, 3) for d in delays),
            "undetected_failures": len(unresolved),
            "keepalive_msgs_per_node_s": round(self.sent["keepalive"] / node_seconds, 4) if node_seconds else None,
            "overlay_msgs_per_node_s": round(self.sent["overlay"] / node_seconds, 4) if node_seconds else None,
            "propagation_msgs_per_failure": round(self.sent["propagation"] / max(1, self.failures), 2),
            "nodes_notified_per_failure": round(sum(touched) / max(1, self.failures), 2),
            "true_holders_per_failure": round(
                sum(len(h) for h in self.holders.values()) / max(1, len(self.holders)), 2),
            "missed_holders": missed,
            "false_positives": len(false_pos),
            "estimation_precision": _round(precision),
            "estimation_recall": _round(recall),
            "lookups": issued,
            "lookup_failure_rate": round((failed + wrong) / issued, 5) if issued else 0.0,
            "lookups_failed": failed,
            "lookups_wrong": wrong,
            "window_virtual_s": round(duration, 3),
            "poll_s": self.poll,
            "messages": self.net.messages,
            "wall_s": round(wall, 2),
        }

    def _estimation(self) -> tuple[float | None, float | None]:
        """Precision and recall of the stateless estimate against the true holders, per failure,
        using the first exact declaration of each crashed node (the one that propagates), on the ideal
        ring of the nodes alive then."""
        if self.scheme != "stateless":
            return None, None
        r = self.sim.cfg.successors
        first: dict[str, tuple[float, PeerDied]] = {}
        for t, _, ev in self.declared:
            # score the estimate that was acted on: only a detector that knows pred(f) exactly propagates
            if ev.peer.address in self.crashed_at and ev.peer.address not in first and ev.pred is not None \
                    and ev.exact:
                first[ev.peer.address] = (t, ev)
        precisions, recalls = [], []
        all_ids = {c.me.id: a for a, c in self.net.nodes.items()}
        for addr, (t, ev) in first.items():
            alive = sorted(i for i, a in all_ids.items()
                           if a not in self.left and (a not in self.crashed_at or self.crashed_at[a] > t))
            est = self._estimated(ev.peer.id, ev.pred.id, alive, r)
            true = {self.net.nodes[a].me.id for a in self.holders[addr]
                    if a not in self.crashed_at or self.crashed_at[a] > t}
            if not est or not true:
                continue
            hit = len(est & true)
            precisions.append(hit / len(est))
            recalls.append(hit / len(true))
        if not precisions:
            return None, None
        return sum(precisions) / len(precisions), sum(recalls) / len(recalls)

    @staticmethod
    def _estimated(dead: int, pred: int, alive: list[int], r: int) -> set[int]:
        """Ids the stateless notice reaches on a consistent ring: the finger-holder intervals, the r
        predecessors of ``dead`` and its successor."""
        out: set[int] = set()
        n = len(alive)
        for start, end in holder_intervals(dead, pred):
            i = bisect_left(alive, start)
            for k in range(n):
                x = alive[(i + k) % n]
                if not in_interval(x, start, end) or x == dead:
                    break
                out.add(x)
        i = bisect_left(alive, dead)
        for k in range(1, r + 1):
            out.add(alive[(i - k) % n])
        out.add(alive[(i + 1) % n] if alive[i % n] == dead else alive[i % n])
        out.discard(dead)
        return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def run_failure(nodes: int, seed: int, failures: int, scheme: str, progress: Progress | None = None,
                **kwargs: Any) -> dict[str, Any]:
    return FailureRun(nodes, seed, failures, scheme, **kwargs).run(progress)
