"""``mlfabric sim aggregate``: the skip-mesh aggregation protocol on the deterministic simulator.

The same :class:`~mlfabric.core.aggregate.Aggregator` the daemons run, driven by a seeded
discrete-event loop with a virtual clock. The tensor maths is replaced by exact integers: a node's
update is ``(its id, 1)`` and merging adds both fields, so a shard's result says exactly how many
updates went into it (``count``) and whose (``sum of ids``). Against the contributor set the root
reports, that makes loss and double counting checkable:

- ``duplicated`` = count - |contributor set| (an update added twice makes the count exceed the set);
- ``corrupt``    = results whose sum of ids differs from the sum over their contributor set;
- ``lost``       = members alive at the end of the round whose update is not in the result.

A member killed during the round may be in or out (its update is atomic); ``dead_included`` says
how many were in. Aggregators are killed mid-round: each victim is an inner node of at least one
shard's mesh in the round it dies, at a random moment of that round. Every live node learns of a
death ``detect_delay`` later (the failure detector measured ~2 s on the local preset); the
coordinator leaves dead nodes out of the next round's member list.
"""

from __future__ import annotations

import heapq
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mlfabric.core.aggregate import Aggregator, AggregatorConfig, InstanceKey
from mlfabric.core.placement import Mesh, mesh_order, shard_key

Payload = tuple[int, int]  # (sum of contributor ids, number of updates)


class IntSum:
    """Exact integer 'FedAvg': adds ids and counts."""

    def merge(self, into: Payload, other: Payload) -> Payload:
        return (into[0] + other[0], into[1] + other[1])

    def copy(self, payload: Payload) -> Payload:
        return payload  # immutable


@dataclass
class AggregateRun:
    nodes: int = 100
    parents: int = 2
    kill_aggregators: int = 0
    rounds: int = 5
    seed: int = 1
    shards: int = 2
    replicas: int = 2
    latency_min: float = 0.001
    latency_max: float = 0.010
    train_mean: float = 1.0  # seconds of local training, log-normal around this
    straggler_fraction: float = 0.05
    straggler_factor: float = 4.0
    detect_delay: float = 2.0
    round_limit: float = 120.0  # virtual seconds before a round is abandoned
    repair: bool | None = None  # default: on with parents >= 2, off with 1 (the plain tree)
    config: AggregatorConfig = field(default_factory=AggregatorConfig)


_DELIVER, _TIMER, _TRAINED, _KILL, _VERDICT = range(5)


class _Sim:
    def __init__(self, run: AggregateRun) -> None:
        self.run = run
        self.rng = random.Random(run.seed)  # the scenario: ids, training times, victims, kill times
        self.net_rng = random.Random(run.seed * 7919 + 1)  # latencies, so protocol variants see the same scenario
        repair = run.repair if run.repair is not None else run.parents >= 2
        cfg = AggregatorConfig(**{**asdict(run.config), "repair": repair})
        ids = set()
        while len(ids) < run.nodes:
            ids.add(self.rng.getrandbits(64))
        self.ids = sorted(ids)
        self.aggs = {n: Aggregator(n, IntSum(), cfg) for n in self.ids}
        self.alive = set(self.ids)
        self.killed_at: dict[int, float] = {}
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.armed: dict[int, float | None] = {n: None for n in self.ids}
        self.messages: Counter[str] = Counter()
        self.finals_seen: dict[int, int] = {}
        self.results: dict[InstanceKey, Any] = {}
        self.member_set: set[int] = set()
        self.live_members = 0
        self.done_live = 0

    def push(self, t: float, kind: int, data: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, data))

    def flush(self, node: int) -> None:
        agg = self.aggs[node]
        for dest, msg in agg.drain_outbox():
            self.messages[type(msg).__name__] += 1
            lat = self.net_rng.uniform(self.run.latency_min, self.run.latency_max)
            self.push(self.now + lat, _DELIVER, (dest, msg))
        for ev in agg.drain_events():
            if ev.finalised_here and ev.key not in self.results:
                self.results[ev.key] = ev
            self.finals_seen[node] = self.finals_seen.get(node, 0) + 1
            if self.finals_seen[node] == self.run.shards and node in self.member_set:
                self.done_live += 1
        nd = agg.next_deadline()
        if nd is not None and nd != self.armed[node]:
            self.armed[node] = nd
            self.push(max(nd, self.now), _TIMER, (node, nd))

    def kill(self, node: int) -> None:
        if node not in self.alive:
            return
        self.alive.discard(node)
        self.killed_at[node] = self.now
        if node in self.member_set:
            self.live_members -= 1
            if self.finals_seen.get(node, 0) >= self.run.shards:
                self.done_live -= 1
        for other in self.alive:
            delay = self.run.detect_delay * self.net_rng.uniform(0.75, 1.25)
            self.push(self.now + delay, _VERDICT, (other, node))

    def step(self, t: float, kind: int, data: Any) -> None:
        self.now = t
        if kind == _DELIVER:
            dest, msg = data
            if dest in self.alive:
                self.aggs[dest].receive(t, msg)
                self.flush(dest)
        elif kind == _TIMER:
            node, when = data
            if node in self.alive and self.armed[node] == when:
                self.armed[node] = None
                self.aggs[node].handle_timer(t)
                self.flush(node)
        elif kind == _TRAINED:
            node, keys = data
            if node in self.alive:
                for key in keys:
                    self.aggs[node].contribute(t, key, (node, 1))
                self.flush(node)
        elif kind == _KILL:
            self.kill(data)
        elif kind == _VERDICT:
            node, dead = data
            if node in self.alive:
                self.aggs[node].peer_dead(t, dead)
                self.flush(node)

    def round(self, r: int, kills: int) -> tuple[bool, float]:
        run, rng = self.run, self.rng
        t0 = self.now
        members = sorted(self.alive)
        self.member_set, self.live_members, self.done_live = set(members), len(members), 0
        keys: list[InstanceKey] = [("sim", r, s) for s in range(run.shards)]
        meshes = [Mesh.build(shard_key("sim", s), members, k=run.parents, replicas=run.replicas,
                             salt=r * 1_000_003 + s) for s in range(run.shards)]
        for node in members:
            self.finals_seen[node] = 0
            for key, mesh in zip(keys, meshes, strict=True):
                self.aggs[node].start(t0, key, mesh)
            slow = run.straggler_factor if rng.random() < run.straggler_fraction else 1.0
            train = rng.lognormvariate(0.0, 0.25) * run.train_mean * slow
            self.push(t0 + train, _TRAINED, (node, keys))
            self.flush(node)
        inner = sorted({n for mesh in meshes for n in mesh.aggregators()})
        for victim in rng.sample(inner, min(kills, len(inner))):
            self.push(t0 + rng.uniform(0.0, 1.5 * run.train_mean), _KILL, victim)
        deadline = t0 + run.round_limit
        while self.heap:
            if self.done_live >= self.live_members:
                break
            t, _, kind, data = heapq.heappop(self.heap)
            if t > deadline:
                heapq.heappush(self.heap, (t, 0, kind, data))
                break
            self.step(t, kind, data)
        complete = all(key in self.results for key in keys)
        return complete, self.now - t0

    def finish_round(self, r: int) -> None:
        """Let the tail of the round (acks, late partials, pending verdicts) play out, then forget it."""
        for node in self.ids:
            for s in range(self.run.shards):
                self.aggs[node].forget(("sim", r, s))


def run_aggregate(run: AggregateRun, progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run ``run.rounds`` rounds; return the metrics dict ``sim aggregate --json`` prints."""
    if run.nodes < 2:
        raise ValueError("need at least 2 nodes")
    wall0 = time.perf_counter()
    sim = _Sim(run)
    per_round = [run.kill_aggregators // run.rounds + (1 if r < run.kill_aggregators % run.rounds else 0)
                 for r in range(run.rounds)]
    expected = counted = lost = duplicated = corrupt = dead_included = 0
    repair_requests = dropped = 0
    rounds_completed = 0
    round_times: list[float] = []
    msgs_before = 0
    msgs_per_round: list[int] = []
    for r in range(run.rounds):
        members = sorted(sim.alive)
        complete, elapsed = sim.round(r, per_round[r])
        alive_end = set(sim.alive)
        for s in range(run.shards):
            key = ("sim", r, s)
            res = sim.results.get(key)
            live_members = {n for n in members if n in alive_end}
            expected += len(live_members)
            if res is None:
                lost += len(live_members)
                continue
            order = mesh_order(shard_key("sim", s), members)
            ids = {order[p] for p in res.contributors}
            total, count = res.payload if res.payload is not None else (0, 0)
            counted += count
            duplicated += count - len(ids)
            corrupt += int(total != sum(ids))
            lost += len(live_members - ids)
            dead_included += len(ids - alive_end)
            repair_requests += res.repair_requests
            dropped += res.dropped
        if complete:
            rounds_completed += 1
            round_times.append(elapsed)
        total_msgs = sum(sim.messages.values())
        msgs_per_round.append(total_msgs - msgs_before)
        msgs_before = total_msgs
        sim.finish_round(r)
        if progress:
            progress(f"round {r + 1}/{run.rounds}", (r + 1) / run.rounds)
    return {
        "nodes": run.nodes,
        "parents": run.parents,
        "repair": run.repair if run.repair is not None else run.parents >= 2,
        "shards": run.shards,
        "rounds": run.rounds,
        "kill_aggregators": run.kill_aggregators,
        "killed": len(sim.killed_at),
        "seed": run.seed,
        "contributions_expected": expected,
        "contributions_counted": counted,
        "lost": lost,
        "duplicated": duplicated,
        "corrupt": corrupt,
        "dead_included": dead_included,
        "repair_requests": repair_requests,
        "overlaps_dropped": dropped,
        "rounds_completed": rounds_completed,
        "round_time_median_s": round(statistics.median(round_times), 3) if round_times else None,
        "round_time_max_s": round(max(round_times), 3) if round_times else None,
        "messages_per_round": round(statistics.mean(msgs_per_round), 1),
        "messages_by_type": dict(sorted(sim.messages.items())),
        "wall_s": round(time.perf_counter() - wall0, 2),
    }


__all__ = ["AggregateRun", "IntSum", "run_aggregate"]
