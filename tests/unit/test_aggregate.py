"""The ring-range tree aggregator (core/aggregate.py) driven by hand: no job machine, no network model.

Node ids are their distances from the root (the root is id 0), so a node's ``lo`` is its id. Each
test builds a small tree by giving every node its range ``[lo, hi)``, the part it keeps for itself
``[lo, own_hi)`` and its ancestors; a tiny FIFO router delivers the outboxes and can hold messages
back, drop them and kill nodes. Updates are exact tallies (a Counter {node id: 1}), so a result says
whose updates it holds and how often.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mlfabric.config import JobsConfig
from mlfabric.core.aggregate import DeadlineEstimator, RootResult, TreeAggregator, WithPayload
from mlfabric.core.ring import SIZE
from mlfabric.core.spans import Spans
from mlfabric.wire.messages import MAX_SPANS, JobAck, JobPartial, JobPending, Peer

JOB = "j"
CFG = JobsConfig(initial_wait=5.0, ack_timeout=1.0, hop_allowance=0.5, repair_timeout=1.0, repair_rounds=2)


class Tally:
    def merge(self, into: Counter[int], other: Counter[int]) -> Counter[int]:
        return into + other

    def copy(self, payload: Counter[int]) -> Counter[int]:
        return Counter(payload)

    def nbytes(self, payload: Counter[int]) -> int:
        return 0


class Tree:
    """``spec``: node -> (hi, own_hi, ancestors root first); node 0 is the root (hi 0: the whole ring)."""

    def __init__(self, spec: dict[int, tuple[int, int, tuple[int, ...]]], cfg: JobsConfig = CFG) -> None:
        self.peers = {n: Peer(n, f"n{n}:1") for n in spec}
        self.dead: set[int] = set()
        self.queue: list[tuple[int, int, Any]] = []  # (src, dst, item)
        self.sent: list[tuple[int, int, Any]] = []
        self.held: list[tuple[int, int, Any]] = []
        self.hold = lambda src, dst, msg: False
        self.results: list[RootResult[Any]] = []
        self.repairs: list[list[tuple[int, int]]] = []
        self.aggs: dict[int, TreeAggregator[Any]] = {}
        for n in spec:
            self.aggs[n] = TreeAggregator(
                self.peers[n], Tally(), cfg,
                send=lambda peer, msg, n=n: self.queue.append((n, peer.id, msg)),
                is_dead=lambda x: x in self.dead,
                repair=lambda key, gaps, now: self.repairs.append(gaps),
                finished=self.results.append)
        for n, (hi, own_hi, path) in spec.items():
            self.aggs[n].open(0.0, self.key(n), self.peers[0], hi, own_hi, tuple(self.peers[p] for p in path), 1)

    @staticmethod
    def key(n: int) -> tuple[str, int, int, int]:
        return (JOB, 0, 0, n)

    def contribute(self, now: float, *nodes: int) -> None:
        for n in nodes:
            self.aggs[n].contribute(now, self.key(n), Counter({n: 1}), 1)
        self.pump(now)

    def pump(self, now: float) -> None:
        while self.queue:
            src, dst, item = self.queue.pop(0)
            self.sent.append((src, dst, item))
            if src in self.dead or dst in self.dead:
                continue
            if self.hold(src, dst, item):
                self.held.append((src, dst, item))
                continue
            msg, payload = (item.msg, item.payload) if isinstance(item, WithPayload) else (item, None)
            self.aggs[dst].receive(now, self.peers[src], msg, payload)

    def release(self, now: float) -> None:
        held, self.held = self.held, []
        self.queue = held + self.queue
        self.hold = lambda src, dst, msg: False
        self.pump(now)

    def kill(self, now: float, node: int) -> None:
        """Crash ``node``; every live node's detector says so at once."""
        self.dead.add(node)
        for n, agg in self.aggs.items():
            if n not in self.dead:
                agg.peer_dead(now, node)
        self.pump(now)

    def tick(self, until: float, start: float = 0.0, step: float = 0.05) -> None:
        t = start
        while t <= until:
            for n, agg in self.aggs.items():
                if n not in self.dead:
                    agg.handle_timer(t)
            self.pump(t)
            t += step

    def partials(self, src: int | None = None, dst: int | None = None) -> list[tuple[int, int, JobPartial, Any]]:
        out = []
        for s, d, item in self.sent:
            if isinstance(item, WithPayload) and isinstance(item.msg, JobPartial):
                if (src is None or s == src) and (dst is None or d == dst):
                    out.append((s, d, item.msg, item.payload))
        return out


def exact(tree: Tree, want: set[int]) -> Counter[int]:
    assert len(tree.results) == 1, f"{len(tree.results)} results"
    res = tree.results[0]
    tally = res.payload or Counter()
    assert set(tally) == want, f"missing {sorted(want - set(tally))}, extra {sorted(set(tally) - want)}"
    assert all(c == 1 for c in tally.values()), f"counted twice: {sorted(i for i, c in tally.items() if c > 1)}"
    assert res.count == len(want) == sum(tally.values())
    return tally


# root 0 keeps [0, 10); M at 10 keeps [10, 20); its child A at 20 keeps [20, 30); A's child P at 30
# keeps [30, 40) and has two children, G at 40 ([40, 50)) and H at 50 ([50, SIZE)).
CHAIN = {
    0: (0, 10, ()),
    10: (0, 20, (0,)),
    20: (0, 30, (0, 10)),
    30: (0, 40, (0, 10, 20)),
    40: (50, 50, (0, 10, 20, 30)),
    50: (0, 0, (0, 10, 20, 30)),
}
EVERYONE = set(CHAIN)


def test_failure_free_round_counts_everyone_once() -> None:
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 50, 30, 20, 10, 0)
    tally = exact(tree, EVERYONE)
    assert tree.results[0].spans == Spans.of(0, SIZE) and tree.results[0].dropped == 0
    # one partial per non-root node, each to its parent, and every one acknowledged
    assert sorted((s, d) for s, d, _, _ in tree.partials()) == [(10, 0), (20, 10), (30, 20), (40, 30), (50, 30)]
    acks = [(s, d) for s, d, m in tree.sent if isinstance(m, JobAck)]
    assert sorted(acks) == [(0, 10), (10, 20), (20, 30), (30, 40), (30, 50)]
    assert tally[0] == 1


def test_parent_dies_after_forwarding_counted_exactly_once() -> None:
    """P forwards its lump {P, G, H} to A, which still trains; then P dies. G's update is in that lump
    already, yet G (which only knows that its acknowledged partial went to a dead parent) fails over
    to A. M above has not heard from A. Whatever path the copy takes, no update may be counted twice and
    none may be lost (merging the copy into M's partial would make M's and A's partials overlap, and the
    root could keep only one of them)."""
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 50, 30, 10, 0)  # A (20) still trains; M (10) waits for A's range
    fwd = [(s, d, m.spans) for s, d, m, _ in tree.partials(src=30)]
    assert fwd == [(30, 20, Spans.of(30, SIZE).flat())], f"precondition: P forwarded its whole range to A: {fwd}"
    tree.kill(0.2, 30)
    tree.contribute(0.3, 20)
    tree.tick(10.0, start=0.3)
    exact(tree, EVERYONE)
    assert not tree.repairs, f"nothing was missing, yet the root asked for {tree.repairs}"


def test_parent_dies_before_forwarding_children_fail_over_to_the_next_ancestor() -> None:
    tree = Tree(CHAIN)
    tree.hold = lambda src, dst, msg: src == 30 and isinstance(msg, WithPayload)  # P's partial never leaves
    tree.contribute(0.1, 40, 50, 30)
    assert [d for _, d, _ in tree.held] == [20], f"precondition: P's lump was on its way to A: {tree.held}"
    tree.held.clear()  # P dies with it
    tree.hold = lambda src, dst, msg: False
    tree.kill(0.2, 30)
    tree.contribute(0.3, 20, 10, 0)
    tree.tick(10.0, start=0.3)
    # G and H fail over to A (their next ancestor); P's own update dies with it
    assert {(s, d) for s, d, _, _ in tree.partials() if s in (40, 50)} >= {(40, 20), (50, 20)}
    exact(tree, EVERYONE - {30})


def test_overlapping_partial_is_passed_up_untouched() -> None:
    """A node that gets a partial overlapping what it counted does not merge it (that would count
    someone twice): it goes on as it came, marked as a possible duplicate, straight to the root, which
    chooses."""
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 50, 30)  # P -> A: {P, G, H}
    # a stray copy of part of P's range, as a failover would send it, but overlapping P's lump partially
    stray = JobPartial(JOB, 0, 0, 99, Spans([(25, 35)]).flat(), 1, 1)
    tree.aggs[20].receive(0.15, tree.peers[50], stray, Counter({25: 1}))
    tree.pump(0.15)
    tree.contribute(0.2, 20, 10, 0)
    ups = [m for _, _, m, _ in tree.partials(src=20)]
    untouched = [(d, m) for _, d, m, _ in tree.partials(src=20) if m.spans == stray.spans]
    assert untouched and untouched[0][0] == 0, f"straight to the root: {untouched}"
    assert untouched[0][1].count == 1 and untouched[0][1].repair, f"A sent {ups}"
    merged = [m for m in ups if m.spans != stray.spans]
    assert merged and merged[0].count == 4, f"A sent {ups}"
    tree.tick(10.0, start=0.2)
    res = tree.results[0]
    assert res.dropped >= 1 and 25 not in (res.payload or {}), f"the root counted the overlap: {res}"
    exact(tree, EVERYONE)


def test_partial_inside_what_a_node_counted_is_dropped() -> None:
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 50, 30)  # A holds P's lump [30, SIZE)
    copy = JobPartial(JOB, 0, 0, 98, Spans.of(40, 50).flat(), 1, 1, repair=True)
    tree.aggs[20].receive(0.15, tree.peers[40], copy, Counter({40: 1}))
    tree.pump(0.15)
    acks = [m for s, d, m in tree.sent if s == 20 and d == 40 and isinstance(m, JobAck) and m.seq == 98]
    assert acks, "a dropped partial is still acknowledged (else it is resent forever)"
    tree.contribute(0.2, 20, 10, 0)
    assert len(tree.partials(src=20)) == 1, f"A passed a copy of what its lump holds up: {tree.partials(src=20)}"
    exact(tree, EVERYONE)


def test_root_cover_picks_the_disjoint_set_with_the_most_updates() -> None:
    tree = Tree({0: (0, 10, ())})
    root = tree.aggs[0]
    key = Tree.key(0)
    pieces = [  # (spans, tally): a big lump, a copy of a piece inside it, and a disjoint piece
        (Spans.of(40, 50), Counter({40: 1})),
        (Spans.of(10, 100), Counter({10: 1, 20: 1, 40: 1, 50: 1})),
        (Spans.of(100, SIZE), Counter({100: 1})),
        (Spans.of(20, 30), Counter({20: 1})),
    ]
    for seq, (spans, tally) in enumerate(pieces, 1):
        msg = JobPartial(JOB, 0, 0, seq, spans.flat(), sum(tally.values()), len(tally), repair=True)
        root.receive(0.1, tree.peers[0], msg, tally)
    root.contribute(0.2, key, Counter({0: 1}), 1)
    res = tree.results[0]
    assert res.payload == Counter({0: 1, 10: 1, 20: 1, 40: 1, 50: 1, 100: 1}) and res.dropped == 2, res


def test_root_asks_for_the_gap_at_its_deadline_then_finalises() -> None:
    tree = Tree(CHAIN)
    # M's partial, and its resends through the tree, are lost on the way (M's parent is the root)
    tree.hold = lambda src, dst, msg: src == 10 and isinstance(msg, WithPayload)
    tree.contribute(0.1, 40, 50, 30, 20, 10, 0)
    tree.tick(5.6, start=0.1)  # the root's deadline: 5 s + one level of hop allowance
    assert tree.repairs and tree.repairs[0] == [(10, SIZE)], f"the root asked {tree.repairs}"
    assert not tree.results
    # the job machine finds M, the first live member of the gap, and hands it the request
    tree.held.clear()
    tree.hold = lambda src, dst, msg: False
    before = len(tree.partials(src=10))
    assert tree.aggs[10].repair_request(5.6, Tree.key(10)) is True
    tree.pump(5.6)
    again = [(s, d, m.repair, m.count) for s, d, m, _ in tree.partials(src=10)[before:]]
    assert again == [(10, 0, True, 5)], f"M re-sends what it sent up straight to the root: {again}"
    tree.tick(8.0, start=5.6)
    exact(tree, EVERYONE)
    assert tree.results[0].repair_requests == 1


def test_repair_request_before_forwarding_says_pending() -> None:
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 50, 30)
    assert tree.aggs[20].repair_request(0.2, Tree.key(20)) is True  # A still trains
    tree.pump(0.2)
    pend = [(s, d) for s, d, m in tree.sent if isinstance(m, JobPending)]
    assert pend == [(20, 0)]
    assert tree.aggs[20].repair_request(0.2, (JOB, 0, 0, 12345)) is False  # no such instance


def test_deadline_forwards_what_arrived_and_the_late_part_goes_up_on_its_own() -> None:
    tree = Tree(CHAIN, CFG.model_copy(update={"ack_timeout": 100.0}))
    tree.hold = lambda src, dst, msg: src == 50  # H is slow
    tree.contribute(0.1, 40, 50, 30, 20, 10, 0)
    assert not tree.partials(src=30), "P waits for H until its deadline"
    tree.tick(7.0, start=0.1)  # P's deadline: 5 s + one level of hop allowance
    first = tree.partials(src=30)
    assert len(first) == 1 and Spans.from_flat(first[0][2].spans) == Spans.of(30, 50), first
    tree.release(7.1)
    tree.tick(20.0, start=7.1)
    ups = tree.partials(src=30)
    assert len(ups) == 2 and Spans.from_flat(ups[1][2].spans) == Spans.of(50, SIZE), ups
    exact(tree, EVERYONE)


def test_partials_are_split_before_they_exceed_max_spans() -> None:
    """A node holding more separate intervals than one partial may carry splits them over several."""
    n = MAX_SPANS + 10
    tree = Tree({0: (0, 2, ()), 2: (0, 3, (0,))})
    mid = tree.aggs[2]
    key = Tree.key(2)
    for k in range(n):  # intervals [4 + 2k, 5 + 2k): never adjacent, so they never merge
        lo = 4 + 2 * k
        mid.receive(0.1, tree.peers[0], JobPartial(JOB, 0, 0, k + 1, (lo, lo + 1), 1, 1), Counter({lo: 1}))
    mid.contribute(0.2, key, Counter({2: 1}), 1)
    tree.pump(0.2)
    tree.tick(7.0, start=0.2)  # its deadline: the gaps between the intervals never fill
    ups = tree.partials(src=2, dst=0)
    assert len(ups) >= 2 and all(len(m.spans) <= 2 * MAX_SPANS for _, _, m, _ in ups), [len(m.spans) for _, _, m, _ in ups]
    total: Counter[int] = Counter()
    for _, _, m, p in ups:
        total += p
        assert m.count == sum(p.values())
    assert total == Counter({2: 1, **{4 + 2 * k: 1 for k in range(n)}})


def test_unacknowledged_partial_goes_to_the_next_ancestor_marked() -> None:
    tree = Tree(CHAIN)
    tree.hold = lambda src, dst, msg: dst == 30 and src == 40  # G's partial to P vanishes (no ack)
    tree.contribute(0.1, 40)
    tree.tick(1.5, start=0.1)  # ack_timeout 1 s
    again = [(d, m.repair) for _, d, m, _ in tree.partials(src=40)]
    assert again[:2] == [(30, False), (20, True)], again


def test_deadline_estimator_adapts_and_backs_off() -> None:
    est = DeadlineEstimator(initial=10.0, lo=0.05, hi=120.0)
    assert est.timeout() == 10.0
    for _ in range(50):
        est.observe(1.0)
    assert 1.0 <= est.timeout() < 1.5
    before = est.timeout()
    est.expired()
    assert abs(est.timeout() - 1.5 * before) < 1e-9, (before, est.timeout())
    est.expired()
    assert abs(est.timeout() - 2.25 * before) < 1e-9, (before, est.timeout())
    for _ in range(60):  # fast rounds again: the wait comes back down
        est.observe(1.0)
    assert est.timeout() < 1.5
    fresh = DeadlineEstimator(initial=10.0, lo=0.05, hi=120.0)
    fresh.expired()  # before any observation
    assert abs(fresh.timeout() - 15.0) < 1e-9
    for _ in range(200):
        est.observe(500.0)
    assert est.timeout() == 120.0


def _next_wait(tree: Tree, node: int, now: float) -> float:
    """How long ``node`` would wait for its children in a new round opened at ``now``."""
    spec = CHAIN[node]
    key = (JOB, 1, 0, node)
    tree.aggs[node].open(now, key, tree.peers[0], spec[0], spec[1], tuple(tree.peers[p] for p in spec[2]), 1)
    due = tree.aggs[node].next_deadline()
    assert due is not None
    return round(due - now - CFG.hop_allowance, 6)


def test_a_wait_that_ran_out_over_a_dead_child_does_not_back_off() -> None:
    tree = Tree(CHAIN)
    tree.contribute(0.1, 40, 30)
    tree.kill(0.2, 50)  # H died before sending anything: P waits out its deadline for H's range
    tree.tick(6.0, start=0.2)
    assert tree.partials(src=30), "P forwarded at its deadline"
    assert _next_wait(tree, 30, 6.5) == CFG.initial_wait  # nothing was observed, nothing backed off


def test_a_wait_that_ran_out_before_a_live_child_came_backs_off_by_half() -> None:
    tree = Tree(CHAIN, CFG.model_copy(update={"ack_timeout": 100.0}))
    tree.hold = lambda src, dst, msg: src == 50  # H is slow, not dead
    tree.contribute(0.1, 40, 50, 30)
    tree.tick(6.0, start=0.1)
    tree.release(6.1)  # H's partial arrives after P forwarded
    assert _next_wait(tree, 30, 6.5) == 1.5 * CFG.initial_wait


def test_marked_pieces_passed_on_count_towards_the_range_of_the_node_that_passed_them() -> None:
    """P dies before forwarding; G and H fail over to A (marked: P may have passed them on). A sends
    them on untouched, straight to the root; they are on their way, so once its own update is in and
    P's own range is known empty (the job machine's lookup after the death), A's range is covered and
    A forwards at once instead of at its deadline."""
    tree = Tree(CHAIN)
    tree.hold = lambda src, dst, msg: src == 30 and isinstance(msg, WithPayload)
    tree.contribute(0.1, 40, 50, 30)
    tree.held.clear()  # P dies with its partial
    tree.kill(0.2, 30)
    marked = [(s, d) for s, d, m, _ in tree.partials() if m.repair]
    assert sorted(marked) == [(20, 0), (20, 0), (40, 20), (50, 20)], f"failovers, marked, passed on: {marked}"
    tree.contribute(0.3, 20)
    assert not [m for _, _, m, _ in tree.partials(src=20) if not m.repair], "P's own range is still open"
    tree.aggs[20].add_empty(0.4, Tree.key(20), 30, 40)
    tree.pump(0.4)
    own = [m for _, _, m, _ in tree.partials(src=20) if not m.repair]
    assert len(own) == 1 and Spans.from_flat(own[0].spans) == Spans.of(20, 40), own
    tree.contribute(0.5, 10, 0)
    tree.tick(10.0, start=0.5)  # M above does not know what went past it: it forwards at its deadline
    exact(tree, EVERYONE - {30})
    assert tree.results[0].spans | tree.results[0].empty == Spans.of(0, SIZE)
