"""The Chord ring on the deterministic simulator (sim/ring.py, sim/network.py): real NodeCores, virtual time.

Convergence means every live node holds exactly its ideal predecessor, successor and 64 fingers
(``RingSim.converged``, from ``core/ring.ideal_routing`` over the live ids). Time bounds are derived
from the config below (see the functions ``*_bound``) and carry a factor 2 of margin; the seed is in
every assertion message, so a failure reruns as ``RingSim(n, seed)``.
"""

from __future__ import annotations

import json
import math
import random
from bisect import bisect_left

import pytest

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.events import LookupDone
from mlfabric.core.ring import BITS, successor_of
from mlfabric.sim.ring import RingSim, run_ring

pytestmark = pytest.mark.sim

CFG = OverlayConfig()
FAILURE = FailureConfig()
LATENCY = (0.001, 0.020)  # RingSim's default link latency range


# ------------------------------------------------------------------------------------ bounds


def finger_cycle(n: int, cfg: OverlayConfig = CFG) -> float:
    """Seconds for a node to refresh every finger once: fix_fingers looks up one *distinct* finger per
    fix_fingers_interval, and a node of an N-node ring holds about log2 N + 1 distinct fingers."""
    return (math.log2(n) + 1) * cfg.fix_fingers_interval


def join_bound(n: int, cfg: OverlayConfig = CFG) -> float:
    """From the last join to full convergence: the newcomer's stabilize / notify / hint exchange (a
    couple of stabilize rounds), then one finger cycle at every node to take it in; times 2."""
    return 2 * (2 * cfg.stabilize_interval + finger_cycle(n, cfg))


def detection_bound(cfg: OverlayConfig = CFG, failure: FailureConfig = FAILURE) -> float:
    """Crash to removal at a neighbour: the slower of Chord's own (a stabilize round plus rpc_timeout)
    and the failure detector's worst case (near_interval + probe_timeout + suspicion_timeout)."""
    return max(
        cfg.stabilize_interval + cfg.rpc_timeout,
        failure.near_interval + failure.probe_timeout + failure.suspicion_timeout,
    )


def crash_bound(n: int, cfg: OverlayConfig = CFG) -> float:
    """Crash to full reconvergence: detection, a stabilize round to splice the ring, and one finger
    cycle in which a lookup may first hit a dead hop (rpc_timeout); times 2."""
    return 2 * (detection_bound(cfg) + cfg.stabilize_interval + cfg.rpc_timeout + finger_cycle(n, cfg))


# ------------------------------------------------------------------------------------ helpers


def build(n: int, seed: int, **kw: object) -> tuple[RingSim, float]:
    """A ring built through the real join protocol, run to convergence; (sim, seconds after the last join)."""
    sim = RingSim(n, seed, **kw)
    sim.schedule_joins(max(5.0, n / 200))
    sim.net.run_until(sim.last_join_at)
    at = sim.run_until_converged(check_every=CFG.stabilize_interval, limit=120.0)
    assert at is not None, f"seed={seed}: {n} nodes did not converge; unconverged: {len(sim._unconverged)}"
    return sim, at - sim.last_join_at


def reconverge(sim: RingSim, limit: float, what: str) -> float:
    """Run until the live nodes hold the ideal state of the live ids; the seconds it took."""
    start = sim.net.now
    at = sim.run_until_converged(check_every=0.5, limit=limit)
    assert at is not None, (
        f"seed={sim.seed}: no reconvergence within {limit:.1f}s after {what}; "
        f"{len(sim._unconverged)} of {len(sim.net.live())} live nodes off their ideal state; "
        f"successor cycles {cycles(sim)}"
    )
    return at - start


def cycles(sim: RingSim) -> tuple[list[int], int]:
    """(sizes of the cycles the live nodes' successor pointers form, live nodes on no cycle)."""
    live = {c.me.id: c for c in sim.net.live()}
    found: set[frozenset[int]] = set()
    for start in live:
        pos: dict[int, int] = {}
        path: list[int] = []
        cur = start
        while cur in live and cur not in pos:
            pos[cur] = len(path)
            path.append(cur)
            cur = live[cur].chord.successor.id
        if cur in pos:
            found.add(frozenset(path[pos[cur] :]))
    on_cycle = set().union(*found) if found else set()
    return sorted(len(c) for c in found), len(live) - len(on_cycle)


def lookup_all(sim: RingSim, pairs: list[tuple[str, int]], rate: float = 1000.0) -> list[LookupDone | None]:
    """Look up each (node address, key) at ``rate`` per virtual second; the results in order (None: no answer)."""
    tokens: list[tuple[str, int]] = []
    t0 = sim.net.now
    for k, (address, key) in enumerate(pairs):

        def go(address: str = address, key: int = key) -> None:
            tokens.append((address, sim.core(address).lookup(key, sim.net.now)))
            sim.net.pump(address)

        sim.net.call_at(t0 + k / rate, go)
    end = t0 + len(pairs) / rate + 30 * CFG.rpc_timeout
    while sim.net.now < end:
        sim.net.run_until(sim.net.now + 0.5)
        if len(tokens) == len(pairs) and all(t in sim.lookup_results for t in tokens):
            break
    return [sim.lookup_results.get(t) for t in tokens]


def random_lookups(sim: RingSim, count: int, rng: random.Random) -> list[tuple[str, int]]:
    live = sorted(c.me.address for c in sim.net.live())
    return [(live[rng.randrange(len(live))], rng.getrandbits(BITS)) for _ in range(count)]


def check_lookups(sim: RingSim, count: int, attempts: int = 1) -> dict[str, int]:
    """Random lookups from live nodes, each retried up to ``attempts`` times while it fails (a failure is
    reported; a wrong answer is not, so it is never retried). Counts of each outcome."""
    rng = random.Random(f"lookups:{sim.seed}:{sim.net.now}")
    ids = sorted(c.me.id for c in sim.net.live())
    pending = random_lookups(sim, count, rng)
    stats = {"lookups": count, "first_try_failed": 0, "retries": 0, "failed": 0, "wrong": 0, "max_hops": 0}
    for attempt in range(attempts):
        results = lookup_all(sim, pending)
        again = []
        for (address, key), res in zip(pending, results, strict=True):
            if res is None or res.node is None:
                again.append((address, key))
            else:
                stats["wrong"] += res.node.id != successor_of(key, ids)
                stats["max_hops"] = max(stats["max_hops"], res.hops)
        if attempt == 0:
            stats["first_try_failed"] = len(again)
        if not again:
            break
        if attempt + 1 < attempts:
            stats["retries"] += len(again)
        pending = again
    else:
        stats["failed"] = len(pending)
    return stats


def non_adjacent(sim: RingSim, count: int, rng: random.Random) -> list[str]:
    """``count`` node addresses no two of which are ring neighbours (every other ring position)."""
    ring = sorted(sim.peers, key=lambda p: p.id)
    return [ring[i].address for i in rng.sample(range(0, len(ring) - 1, 2), count)]


def neighbours_repaired(sim: RingSim, gone: list[str]) -> bool:
    """For each gone node: its live predecessor points at its live successor, and back."""
    live = sorted(sim.net.live(), key=lambda c: c.me.id)
    ids = [c.me.id for c in live]
    for address in gone:
        i = bisect_left(ids, sim.core(address).me.id)
        pred, succ = live[i - 1], live[i % len(live)]
        if pred.chord.successor.id != succ.me.id:
            return False
        if succ.chord.predecessor is None or succ.chord.predecessor.id != pred.me.id:
            return False
    return True


def time_to_repair_neighbours(sim: RingSim, gone: list[str], step: float, limit: float) -> float:
    start = sim.net.now
    while not neighbours_repaired(sim, gone):
        assert sim.net.now - start < limit, f"seed={sim.seed}: neighbours of {gone} not repaired in {limit}s"
        sim.net.run_until(sim.net.now + step)
    return sim.net.now - start


# ------------------------------------------------------------------------------------ building a ring


@pytest.mark.parametrize("seed", [1, 2])
def test_ring_of_300_converges_and_routes_in_half_log_n_hops(seed: int) -> None:
    n = 300
    res = run_ring(n, seed, lookups=1000)
    assert res["converged"], f"seed={seed}: {res}"
    assert res["converged_virtual_s"] <= join_bound(n), f"seed={seed}: bound {join_bound(n):.1f}s: {res}"
    assert res["correct_fraction"] == 1.0 and res["failed_lookups"] == 0, f"seed={seed}: {res}"
    # Chord §6.2: about (1/2) log2 N hops on average (with ~10% slack; +1 for our final done step)
    assert res["mean_hops"] <= 0.55 * math.log2(n), f"seed={seed}: {res}"
    assert res["max_hops"] <= math.log2(n) + 2, f"seed={seed}: {res}"


def test_same_seed_gives_the_same_run_and_another_seed_does_not() -> None:
    a, b, c = (RingSim(100, seed, trace=True) for seed in (11, 11, 12))
    for sim in (a, b, c):
        sim.schedule_joins(5.0)
        sim.net.run_until(20.0)
    assert a.net.trace_digest() == b.net.trace_digest(), "seed=11 twice"
    assert a.net.trace_digest() != c.net.trace_digest(), "seeds 11 and 12"

    first, second = run_ring(100, 11, lookups=200), run_ring(100, 11, lookups=200)
    for res in (first, second):
        res.pop("wall_s")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True), "seed=11"
    other = run_ring(100, 12, lookups=200)
    other.pop("wall_s")
    assert other != first, "seeds 11 and 12 gave the same result"


def test_ring_through_the_codec_converges_with_the_same_trace() -> None:
    """wire=True encodes and decodes every message: the run must be message-for-message the same."""
    seed, n = 3, 50
    wired, converged_after = build(n, seed, wire=True, trace=True)
    built_at = wired.net.now
    assert converged_after <= join_bound(n), f"seed={seed}"
    assert wired.net.bytes > 1000 * n, f"seed={seed}: only {wired.net.bytes} bytes went through the codec"
    stats = check_lookups(wired, 200)
    assert stats["wrong"] == stats["first_try_failed"] == 0, f"seed={seed}: {stats}"

    plain = RingSim(n, seed, trace=True)
    plain.schedule_joins(max(5.0, n / 200))
    plain.net.run_until(built_at)
    plain_lookups = check_lookups(plain, 200)
    assert plain_lookups == stats, f"seed={seed}"
    assert plain.net.trace_digest() == wired.net.trace_digest(), f"seed={seed}"


# ------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("seed", [1, 2])
def test_ten_percent_crash_at_once_reconverges_and_lookups_stay_correct(seed: int) -> None:
    n = 300
    sim, _ = build(n, seed)
    victims = random.Random(f"crash:{seed}").sample([p.address for p in sim.peers], n // 10)
    for address in victims:
        sim.net.crash(address)
    took = reconverge(sim, crash_bound(n), f"crashing {len(victims)} nodes")
    assert took >= min(CFG.rpc_timeout, FAILURE.probe_timeout), f"seed={seed}: no timeout, yet repaired"
    ideal_ids = sorted(sim._ideal())
    assert not set(ideal_ids) & set(victims)  # the ideal ring is that of the live nodes
    stats = check_lookups(sim, 1000)
    assert stats["wrong"] == stats["first_try_failed"] == 0, f"seed={seed}: {stats}"


@pytest.mark.parametrize("seed", [1, 2])
def test_graceful_leave_repairs_neighbours_faster_than_a_crash(seed: int) -> None:
    n, count, step = 200, 10, 0.005
    repair: dict[str, float] = {}
    for mode in ("leave", "crash"):
        sim, _ = build(n, seed)
        gone = non_adjacent(sim, count, random.Random(f"leave:{seed}"))
        for address in gone:
            if mode == "leave":
                sim.core(address).leave(sim.net.now)
                sim.net.pump(address)  # the Leaving messages go out before it disappears
            sim.net.crash(address)
        repair[mode] = time_to_repair_neighbours(sim, gone, step, limit=crash_bound(n))
        reconverge(sim, crash_bound(n), f"{mode} of {count} nodes")
        stats = check_lookups(sim, 300)
        assert stats["wrong"] == stats["first_try_failed"] == 0, f"seed={seed} {mode}: {stats}"
    # a Leaving message is one link latency away; a crash has to wait for a timeout. (Seed 2 used to
    # fail: a Notify sent just before the leave trailed the Leaving and undid the handover, see
    # tests/unit/test_chord.py::test_stale_notify_from_a_node_that_left_does_not_undo_its_handover.)
    assert repair["leave"] <= LATENCY[1] + step, f"seed={seed}: {repair}"
    assert repair["crash"] >= min(CFG.rpc_timeout, FAILURE.probe_timeout), f"seed={seed}: {repair}"


# ------------------------------------------------------------------------------------ partitions


def split_in_two(sim: RingSim) -> tuple[list[str], list[str]]:
    addresses = sorted(p.address for p in sim.peers)
    side = set(random.Random(f"partition:{sim.seed}").sample(addresses, len(addresses) // 2))
    return sorted(side), [a for a in addresses if a not in side]


def test_partition_shorter_than_the_timeouts_heals_at_once() -> None:
    """0.4 s is under probe_timeout (0.5 s) and rpc_timeout (1 s): requests caught by the cut are lost,
    but no one is declared dead, so the ring is back to its ideal state within a couple of rounds."""
    seed, n, cut = 4, 100, 0.4
    assert cut < min(FAILURE.probe_timeout, CFG.rpc_timeout)
    sim, _ = build(n, seed)
    sim.net.partition(split_in_two(sim))
    sim.net.run_until(sim.net.now + cut)
    sim.net.heal()
    reconverge(sim, 2 * (detection_bound() + CFG.stabilize_interval), f"a {cut}s partition")
    assert cycles(sim) == ([n], 0), f"seed={seed}"
    stats = check_lookups(sim, 300)
    assert stats["wrong"] == stats["first_try_failed"] == 0, f"seed={seed}: {stats}"


def death_mark_bound(failure: FailureConfig = FAILURE) -> float:
    """Longest a death mark can outlive its dead_ttl: marks are swept by a housekeeping pass every
    min(dead_ttl, 10 near_interval) seconds (core/failure.py)."""
    return failure.dead_ttl + min(failure.dead_ttl, 10 * failure.near_interval)


def test_partition_of_a_few_seconds_heals_into_one_ring() -> None:
    """A 3 s cut outlasts the timeouts: each side declares the other's nodes dead. After the heal the
    ring must become one again. Today it does, but only once the death marks are swept (about dead_ttl
    + 10 s: 75-79 s for seeds 1-6), so the bound is that plus a crash repair."""
    seed, n, cut = 5, 100, 3.0
    sim, _ = build(n, seed)
    sim.net.partition(split_in_two(sim))
    sim.net.run_until(sim.net.now + cut)
    sim.net.heal()
    took = reconverge(sim, death_mark_bound() + crash_bound(n), f"a {cut}s partition")
    assert cycles(sim) == ([n], 0), f"seed={seed}: took {took:.1f}s"
    stats = check_lookups(sim, 300)
    assert stats["wrong"] == stats["first_try_failed"] == 0, f"seed={seed}: {stats}"


# ------------------------------------------------------------------------------------ loss


def test_one_percent_loss_converges_and_lookups_are_correct_with_retries() -> None:
    """With 1% of messages dropped the ring still reaches its ideal state; a lookup whose last hop is
    lost fails (it never asks a node twice), so callers retry: here up to 3 attempts."""
    seed, n = 6, 200
    sim, took = build(n, seed, loss=0.01)
    assert took <= 3 * join_bound(n), f"seed={seed}: took {took:.1f}s"
    stats = check_lookups(sim, 1000, attempts=3)
    assert sim.net.dropped > 0, f"seed={seed}"
    assert stats["wrong"] == 0 and stats["failed"] == 0, f"seed={seed}: {stats}"
    assert stats["first_try_failed"] <= 0.05 * stats["lookups"], f"seed={seed}: {stats}"
