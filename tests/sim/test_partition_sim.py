"""Network partitions on the deterministic simulator: each side keeps a ring, and the rings merge on heal.

A partition longer than the failure timeout makes each side declare the other dead. Without the merge
mechanism (core/failure.py "Partition merge", ``ChordMachine.merge_with``) the two rings would stay
apart for ever: ``test_without_merge_probes_the_rings_stay_apart`` shows it. With it, every node
probes one entry of its passive list (peers it declared dead or saw leave, then its seeds) per
``merge_interval``; the first reply from the other side starts a merge that stabilize finishes.

Scenario (``PartitionRun``): N nodes join through the real protocol and converge; a seeded random half
is cut off from the other half for ``split_s``; then the network heals. Measured: when each side's ring
was correct (successor, predecessor and the whole successor list of every node equal the ideal ones
over that side), when the merged ring's pointers (successor, predecessor) were correct, when every
successor list was, and when every finger was. Every assertion prints the scenario, seed included:
rerun it as ``PartitionRun(N, SEED, ...).run()``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.events import Event, LookupDone
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, successor_of
from mlfabric.sim.ring import RingSim

pytestmark = pytest.mark.sim

OVERLAY = OverlayConfig()
FAILURE = FailureConfig()
STEP = 0.1  # ring states are checked every STEP virtual seconds


def failure_timeout(cfg: FailureConfig = FAILURE) -> float:
    """Crash (or cut) to declaration by pred(f): test_failure_sim's detection window."""
    return cfg.near_interval + cfg.probe_timeout + cfg.suspicion_timeout


def merge_bound(cfg: FailureConfig = FAILURE, overlay: OverlayConfig = OVERLAY) -> float:
    """Heal to one correct ring, successor lists included. Every node holding a passive entry of the
    other side probes within 1.5 x merge_interval (its jittered period), the first reply starts a
    merge, and stabilize zips the two rings (each hint re-runs it at once, so a zip step costs a few
    round trips); the successor lists then travel back one node per stabilize round: r + 2 rounds."""
    return 1.5 * cfg.merge_interval + (overlay.successors + 2) * overlay.stabilize_interval


def finger_bound(cfg: FailureConfig = FAILURE, overlay: OverlayConfig = OVERLAY, n: int = 200) -> float:
    """Heal to every finger correct: the ring first, then fix_fingers visits the about log2 N distinct
    fingers (one lookup per fix_fingers_interval) a few times over."""
    return merge_bound(cfg, overlay) + 4 * math.ceil(math.log2(n)) * overlay.fix_fingers_interval


def ring_errors(cores: list[NodeCore], successors: int, pointers_only: bool = False) -> list[str]:
    """Addresses of the nodes whose predecessor, successor (and successor list) differ from the ideal ring
    over exactly ``cores``."""
    ids = sorted(c.me.id for c in cores)
    n = len(ids)
    pos = {x: i for i, x in enumerate(ids)}
    bad = []
    for c in cores:
        i = pos[c.me.id]
        want = [ids[(i + k) % n] for k in range(1, min(successors, n - 1) + 1)]
        got = [s.id for s in c.chord.successors]
        pred = c.chord.predecessor.id if c.chord.predecessor is not None else None
        wrong_list = got[:1] != want[:1] if pointers_only else got != want
        if wrong_list or pred != ids[i - 1]:
            bad.append(c.me.address)
    return bad


@dataclass
class PartitionRun:
    n: int
    seed: int
    split_s: float
    failure: FailureConfig = FAILURE
    overlay: OverlayConfig = OVERLAY
    heal_limit: float = 120.0
    lookups_per_side: int = 200
    sim: RingSim = field(init=False)
    sides: list[list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.sim = RingSim(self.n, self.seed, self.overlay, failure=self.failure)
        self.sim.net.on_event = self._on_event
        self.lookups: dict[tuple[str, int], LookupDone] = {}

    def _on_event(self, address: str, ev: Event) -> None:
        if isinstance(ev, LookupDone):
            self.lookups[(address, ev.token)] = ev

    def what(self) -> str:
        return f"PartitionRun({self.n}, seed={self.seed}, split_s={self.split_s}, failure={self.failure!r})"

    def cores(self, side: list[str] | None = None) -> list[NodeCore]:
        return [self.sim.core(a) for a in side] if side is not None else self.sim.net.live()

    def _side_lookups(self, side: list[str], rng: random.Random) -> dict[str, int]:
        """Lookups from random nodes of ``side`` for random keys: the answer must be the successor of the
        key among ``side`` (the other half is unreachable)."""
        ids = sorted(self.sim.core(a).me.id for a in side)
        issued = []
        for _ in range(self.lookups_per_side):
            core = self.sim.core(side[rng.randrange(len(side))])
            key = rng.getrandbits(BITS)
            issued.append((core.me.address, core.lookup(key, self.sim.net.now), key))
            self.sim.net.pump(core.me.address)
        self.sim.net.run_until(self.sim.net.now + 10 * self.overlay.rpc_timeout)
        out = {"ok": 0, "wrong": 0, "failed": 0}
        for address, token, key in issued:
            res = self.lookups.get((address, token))
            if res is None or res.node is None:
                out["failed"] += 1
            else:
                out["ok" if res.node.id == successor_of(key, ids) else "wrong"] += 1
        return out

    def run(self) -> dict[str, Any]:
        sim, net, r = self.sim, self.sim.net, self.overlay.successors
        sim.schedule_joins(max(5.0, self.n / 200))
        net.run_until(sim.last_join_at)
        converged = sim.run_until_converged(self.overlay.stabilize_interval, 300.0)
        addresses = [p.address for p in sim.peers]
        sim.rng.shuffle(addresses)
        self.sides = [sorted(addresses[: self.n // 2]), sorted(addresses[self.n // 2:])]
        t_split = net.now
        probes_at_split = sum(c.detector.counters["merge_probes"] for c in self.cores())
        net.partition(self.sides)
        sides_ok_at: list[float | None] = [None, None]
        while net.now < t_split + self.split_s:
            net.run_until(min(t_split + self.split_s, net.now + STEP))
            for k, side in enumerate(self.sides):
                errors = ring_errors(self.cores(side), r)
                if not errors and sides_ok_at[k] is None:
                    sides_ok_at[k] = net.now - t_split
                elif errors:
                    sides_ok_at[k] = None  # must hold until the heal, not only once
        rng = random.Random(f"partition-lookups:{self.seed}")
        side_lookups = [self._side_lookups(side, rng) for side in self.sides]
        side_errors = [ring_errors(self.cores(side), r) for side in self.sides]
        probes = sum(c.detector.counters["merge_probes"] for c in self.cores()) - probes_at_split
        net.heal()
        t_heal = net.now
        ptr_at = list_at = None
        while net.now < t_heal + self.heal_limit and list_at is None:
            net.run_until(net.now + STEP)
            if ptr_at is None and not ring_errors(self.cores(), r, pointers_only=True):
                ptr_at = net.now - t_heal
            if ptr_at is not None and not ring_errors(self.cores(), r):
                list_at = net.now - t_heal
        full = sim.run_until_converged(STEP, self.heal_limit) if list_at is not None else None
        report = {
            "nodes": self.n,
            "seed": self.seed,
            "split_s": self.split_s,
            "converged_before_split": converged is not None,
            "sides_correct_after_s": [None if t is None else round(t, 2) for t in sides_ok_at],
            "side_ring_errors_at_heal": [len(e) for e in side_errors],
            "side_lookups": side_lookups,
            "merge_probes_per_node_per_interval": round(
                probes / self.n / ((t_heal - t_split) / self.failure.merge_interval), 3),
            "ring_merged_s": None if ptr_at is None else round(ptr_at, 2),
            "successor_lists_merged_s": None if list_at is None else round(list_at, 2),
            "fingers_merged_s": None if full is None else round(full - t_heal, 2),
            "merges_started": sum(c.chord.counters["merges_started"] for c in self.cores()),
        }
        print("partition-sim " + json.dumps(report))
        return report


_RUNS: dict[tuple[Any, ...], tuple[PartitionRun, dict[str, Any]]] = {}


def run(n: int, seed: int, split_s: float, **kw: Any) -> tuple[PartitionRun, dict[str, Any]]:
    key = (n, seed, split_s, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _RUNS:
        pr = PartitionRun(n, seed, split_s, **kw)
        _RUNS[key] = (pr, pr.run())
    return _RUNS[key]


# 30 s: far longer than the failure timeout (2.5 s), shorter than dead_ttl (60 s): the death marks are
# still there at the heal. 90 s: they have expired.
CASES = [(200, 1, 30.0), (200, 2, 90.0), (12, 3, 20.0), (12, 4, 20.0)]


@pytest.mark.parametrize(("n", "seed", "split_s"), CASES)
def test_each_side_keeps_a_correct_ring_and_answers_lookups(n: int, seed: int, split_s: float) -> None:
    assert split_s > 4 * failure_timeout()
    pr, rep = run(n, seed, split_s)
    assert rep["converged_before_split"], pr.what()
    assert rep["side_ring_errors_at_heal"] == [0, 0], f"{pr.what()}: {rep}"
    assert all(t is not None for t in rep["sides_correct_after_s"]), f"{pr.what()}: {rep}"
    for side in rep["side_lookups"]:
        assert side["ok"] == pr.lookups_per_side, f"{pr.what()}: lookups inside one side: {rep['side_lookups']}"


@pytest.mark.parametrize(("n", "seed", "split_s"), CASES)
def test_the_two_rings_merge_into_one_after_the_heal(n: int, seed: int, split_s: float) -> None:
    pr, rep = run(n, seed, split_s)
    bound = merge_bound()
    assert rep["ring_merged_s"] is not None and rep["ring_merged_s"] <= bound, f"{pr.what()}: {rep}"
    assert rep["successor_lists_merged_s"] is not None and rep["successor_lists_merged_s"] <= bound, \
        f"{pr.what()}: {rep} (bound {bound:.1f}s)"
    assert rep["fingers_merged_s"] is not None and rep["fingers_merged_s"] <= finger_bound(n=n), \
        f"{pr.what()}: {rep} (bound {finger_bound(n=n):.1f}s)"


def test_merge_probes_cost_at_most_one_per_node_per_interval() -> None:
    pr, rep = run(200, 1, 30.0)
    # one probe per jittered period in [0.5, 1.5] x merge_interval: 1 on average, never 2
    assert rep["merge_probes_per_node_per_interval"] <= 1.1, f"{pr.what()}: {rep}"


def test_seeds_merge_the_rings_when_the_passive_lists_have_expired() -> None:
    """merge_ttl shorter than the partition: every passive entry is gone at the heal, and only the nodes
    whose join seed is on the other side can find it (RingSim joins each node through a random
    earlier one, so about half of them)."""
    cfg = FAILURE.model_copy(update={"merge_ttl": 10.0})
    pr, rep = run(64, 5, 40.0, failure=cfg)
    assert rep["side_ring_errors_at_heal"] == [0, 0], f"{pr.what()}: {rep}"
    assert rep["successor_lists_merged_s"] is not None and rep["successor_lists_merged_s"] <= merge_bound(cfg), \
        f"{pr.what()}: {rep}"


def test_without_merge_probes_the_rings_stay_apart() -> None:
    """The problem the mechanism solves: with merge_candidates = 0 (and so no probing at all) nothing
    makes either ring look for the other again."""
    cfg = FAILURE.model_copy(update={"merge_candidates": 0})
    pr, rep = run(64, 6, 30.0, failure=cfg, heal_limit=60.0)
    assert rep["side_ring_errors_at_heal"] == [0, 0], f"{pr.what()}: {rep}"
    assert rep["ring_merged_s"] is None, f"{pr.what()}: {rep}"
