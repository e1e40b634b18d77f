"""The skip-mesh Aggregator, driven by hand: exactly-once under the failure cases that matter."""

from __future__ import annotations

import random

from mlfabric.core.aggregate import (
    Aggregator,
    AggregatorConfig,
    DeadlineEstimator,
    Final,
    Partial,
    PartialAck,
    RepairRequest,
    Secured,
)
from mlfabric.core.placement import Mesh
from mlfabric.sim.aggregate import IntSum

KEY = ("job", 0, 0)


class Net:
    """A tiny synchronous router: delivers outboxes in FIFO order, can kill nodes and drop messages."""

    def __init__(self, ids: list[int], k: int = 2, repair: bool = True, replicas: int = 2) -> None:
        cfg = AggregatorConfig(repair=repair, initial_wait=5.0)
        self.mesh = Mesh.build(0, ids, k=k, replicas=replicas, salt=1)
        self.aggs = {n: Aggregator(n, IntSum(), cfg) for n in ids}
        self.dead: set[int] = set()
        self.sent: list[tuple[int, object]] = []
        self.results: dict[int, object] = {}
        self.drop = lambda dest, msg: False
        for n in ids:
            self.aggs[n].start(0.0, KEY, self.mesh)

    def pump(self, now: float) -> None:
        moved = True
        while moved:
            moved = False
            for n, agg in self.aggs.items():
                if n in self.dead:
                    continue
                for ev in agg.drain_events():
                    self.results[n] = ev
                for dest, msg in agg.drain_outbox():
                    moved = True
                    self.sent.append((dest, msg))
                    if dest not in self.dead and not self.drop(dest, msg):
                        self.aggs[dest].receive(now, msg)

    def contribute_all(self, now: float, skip: set[int] = frozenset()) -> None:
        for n in self.aggs:
            if n not in self.dead and n not in skip:
                self.aggs[n].contribute(now, KEY, (n, 1))
        self.pump(now)

    def kill(self, now: float, node: int) -> None:
        self.dead.add(node)
        for n, agg in self.aggs.items():
            if n not in self.dead:
                agg.peer_dead(now, node)
        self.pump(now)

    def tick(self, until: float, step: float = 0.05) -> None:
        t = 0.0
        while t <= until:
            for n, agg in self.aggs.items():
                if n not in self.dead:
                    agg.handle_timer(t)
            self.pump(t)
            t += step

    def root_result(self):
        finals = [ev for ev in self.results.values() if ev.finalised_here]
        assert len(finals) == 1, f"exactly one root finalises, got {len(finals)}"
        return finals[0]


def check_exact(net: Net, must_include: set[int]) -> None:
    res = net.root_result()
    ids = {net.mesh.order[p] for p in res.contributors}
    total, count = res.payload
    assert count == len(ids), "an update was added twice"
    assert total == sum(ids), "the result holds something other than its contributors"
    assert must_include <= ids, f"lost {must_include - ids}"
    for n in net.aggs:
        if n not in net.dead:
            assert net.results[n].contributors == res.contributors, "every live member gets the result"


IDS = list(range(1, 41))


def test_failure_free_round_counts_everyone_once() -> None:
    net = Net(IDS)
    net.contribute_all(0.1)
    check_exact(net, set(IDS))
    assert not any(isinstance(m, RepairRequest) for _, m in net.sent)


def test_parent_dead_before_forwarding_children_fail_over() -> None:
    net = Net(IDS)
    victim = max(net.mesh.aggregators(), key=lambda n: len(net.mesh.children[net.mesh.index[n]]))
    if victim == net.mesh.order[0]:
        victim = net.mesh.aggregators()[1]
    net.dead.add(victim)  # dies silently; nobody knows yet
    net.contribute_all(0.1, skip={victim})
    net.tick(0.9)
    net.kill(1.0, victim)  # the verdict arrives
    net.tick(20.0)
    check_exact(net, set(IDS) - {victim})


def test_parent_dead_after_forwarding_is_not_counted_twice() -> None:
    net = Net(IDS)
    victim = next(n for n in net.mesh.aggregators() if net.mesh.index[n] >= net.mesh.replicas)
    net.contribute_all(0.1)  # the whole round completes...
    # ...but rewind: a fresh round where the victim forwards, then dies before anyone has the result.
    net = Net(IDS)
    root = net.mesh.order[0]
    held: list[tuple[int, object]] = []
    net.drop = lambda dest, msg: (dest == root and isinstance(msg, Partial) and msg.sender != victim
                                  and held.append((dest, msg)) is None)
    net.contribute_all(0.1)
    net.kill(0.2, victim)  # children resend what the victim had already forwarded
    net.drop = lambda dest, msg: False
    for dest, msg in held:  # the held partials (with the victim's merged subtree) arrive late
        net.aggs[dest].receive(0.3, msg)
    net.pump(0.3)
    net.tick(20.0)
    check_exact(net, set(IDS) - {victim})


def test_root_dies_replica_finalises() -> None:
    net = Net(IDS)
    root = net.mesh.order[0]
    net.dead.add(root)
    net.contribute_all(0.1, skip={root})
    net.kill(0.5, root)
    net.tick(20.0)
    res = net.root_result()
    assert res.root == net.mesh.order[1]
    check_exact(net, set(IDS) - {root})


def test_lost_partial_is_repaired_from_the_contributor() -> None:
    net = Net(IDS)
    victim = next(n for n in net.mesh.order[3:] if not net.mesh.children[net.mesh.index[n]])
    # the leaf's partial is acknowledged but its parent drops it on the floor (a crash between ack and merge)

    def swallow(dest: int, msg: object) -> bool:
        if isinstance(msg, Partial) and msg.sender == victim and not msg.repair:
            net.aggs[victim].receive(0.1, PartialAck(msg.key, dest, msg.seq))  # acknowledged, then lost
            return True
        return False

    net.drop = swallow
    net.contribute_all(0.1)
    net.drop = lambda dest, msg: False
    net.tick(20.0)
    check_exact(net, set(IDS))
    assert any(isinstance(m, RepairRequest) and d == victim for d, m in net.sent)


def test_plain_tree_loses_the_subtree_of_a_dead_aggregator() -> None:
    net = Net(IDS, k=1, repair=False)
    victim = max((n for n in net.mesh.aggregators() if n != net.mesh.order[0]),
                 key=lambda n: len(net.mesh.children[net.mesh.index[n]]))
    net.dead.add(victim)
    net.contribute_all(0.1, skip={victim})
    net.kill(1.0, victim)
    net.tick(20.0)
    res = net.root_result()
    ids = {net.mesh.order[p] for p in res.contributors}
    lost = set(IDS) - {victim} - ids
    children = {net.mesh.order[c] for c in net.mesh.children[net.mesh.index[victim]]}
    assert children <= lost, "the plain tree has nowhere else to send"
    assert res.payload[1] == len(ids)


def test_secured_releases_children_and_acks_everything() -> None:
    net = Net(IDS)
    net.contribute_all(0.1)
    acks = [m for _, m in net.sent if isinstance(m, PartialAck)]
    partials = [m for _, m in net.sent if isinstance(m, Partial)]
    assert len(acks) == len(partials)
    assert any(isinstance(m, Secured) for _, m in net.sent)
    assert sum(isinstance(m, Final) for _, m in net.sent) == len(IDS) - 1


def test_random_kills_never_double_count() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        net = Net(IDS, k=rng.choice([2, 3]))
        # the root may die, but not with its replica too (then the shard is gone by design)
        victims = set(rng.sample([a for a in net.mesh.aggregators() if a != net.mesh.order[1]], 3))
        before = {v for v in victims if rng.random() < 0.5}
        net.dead |= before
        net.contribute_all(0.1, skip=before)
        for v in victims - before:
            net.dead.add(v)
        for v in sorted(victims):
            net.kill(0.5, v)
        net.tick(25.0)
        live = set(IDS) - victims
        try:
            check_exact(net, live)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc


def test_deadline_estimator_adapts_and_backs_off() -> None:
    est = DeadlineEstimator(initial=5.0, lo=0.05, hi=60.0)
    assert est.timeout() == 5.0
    for _ in range(30):
        est.observe(1.0)
    assert 1.0 <= est.timeout() < 1.5
    est.expired()
    assert est.timeout() > 1.5
    for _ in range(50):
        est.observe(8.0)
    assert est.timeout() >= 8.0, "a slow node's subtree raises the wait instead of being cut off"


def test_a_member_that_cannot_contribute_abstains_and_is_not_waited_for() -> None:
    cfg = AggregatorConfig(initial_wait=5.0)
    mesh = Mesh.build(0, IDS, k=2, replicas=2, salt=1)
    stale = mesh.order[7]
    aggs = {n: Aggregator(n, IntSum(), cfg) for n in IDS}
    for n in IDS:
        aggs[n].start(0.0, KEY, mesh, contributor=n != stale, expected=IDS)
    results = {}
    pending = [(d, m) for n in IDS for d, m in aggs[n].drain_outbox()]
    assert any(type(m).__name__ == "Abstain" and d == mesh.order[0] for d, m in pending)
    for n in IDS:
        if n != stale:
            aggs[n].contribute(0.1, KEY, (n, 1))
    while pending or any(a._outbox for a in aggs.values()):
        for a in aggs.values():
            pending += a.drain_outbox()
        while pending:
            d, m = pending.pop(0)
            aggs[d].receive(0.2, m)
    for n, a in aggs.items():
        for ev in a.drain_events():
            results[n] = ev
    root = results[mesh.order[0]]
    assert root.finalised_here, "finalised at once, without waiting for a deadline"
    ids = {mesh.order[p] for p in root.contributors}
    assert ids == set(IDS) - {stale} and root.payload == (sum(ids), len(ids))
    assert root.repair_requests == 0
    assert results[stale].contributors == root.contributors, "the stale member still gets the result"
