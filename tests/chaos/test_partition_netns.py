"""A 6/6 partition of 12 real daemons in network namespaces, longer than the failure timeout, then a heal.

Each daemon runs in its own namespace with its own address (deploy/netns/testbed.py); the partition
is iptables DROP between the two groups, in both directions, so TCP connections across it go silent
as they would behind a failed switch. Timers are the ``local`` preset: failure timeout
near_interval + probe_timeout + suspicion_timeout = 1.05 s, dead_ttl 5 s, merge_interval 1 s.

While split, each side must keep a ring of its own: every node's successor, predecessor and
successor list, read from its ``/status``, are those of the ideal ring over exactly its side, and
lookups from that side for random keys end at the key's successor among that side. After the heal
the two rings must become one correct ring within ``SIM_MERGE_BOUND_S + split_s``; the merge is found by the
merge probes of core/failure.py (each node pings one peer it declared dead per merge_interval; a
reply from outside its ring starts ``ChordMachine.merge_with``). The measured times are printed as
one JSON line (``partition-netns {...}``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from mlfabric.config import PRESETS, FailureConfig, OverlayConfig
from mlfabric.runtime.cluster import ring_report

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

N = 12
LOCAL_OVERLAY = OverlayConfig(**PRESETS["local"]["overlay"])
LOCAL_FAILURE = FailureConfig(**PRESETS["local"]["failure"])
FAILURE_TIMEOUT = LOCAL_FAILURE.near_interval + LOCAL_FAILURE.probe_timeout + LOCAL_FAILURE.suspicion_timeout
# Heal to one correct ring (successor lists included), as in tests/sim/test_partition_sim.py's
# merge_bound (1.5 merge_interval + (r + 2) stabilize rounds = 2.5 s with the local preset), plus
# what real TCP adds: connections opened before the split sit in retransmission back-off when it
# heals, and the first message across may wait for the next retransmission (Linux doubles the RTO
# from 0.2 s: up to about split_s later). Measured here: see the printed JSON (about 1-1.5 s).
SIM_MERGE_BOUND_S = 1.5 * LOCAL_FAILURE.merge_interval + (LOCAL_OVERLAY.successors + 2) * LOCAL_OVERLAY.stabilize_interval
FORM_TIMEOUT_S = 20.0
SIDES_TIMEOUT_S = 15.0


def poll(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout:g}s")
        time.sleep(interval)


def side_ring(statuses: list[dict[str, Any] | None]) -> dict[str, Any]:
    """ring_report over exactly these nodes, and whether their successor/predecessor pointers and
    successor lists form the ideal ring over them (fingers are not required)."""
    rep = ring_report(statuses, LOCAL_OVERLAY.successors)
    n = rep["nodes"]
    rep["ring"] = all(rep[k] == n for k in ("answered", "joined", "successor", "predecessor"))
    rep["ring_and_lists"] = rep["ring"] and rep["successor_list"] == n
    return rep


# 3 s: longer than the failure timeout, shorter than dead_ttl (the death marks are still there at the
# heal); 8 s: longer than both (they have expired)
@pytest.mark.parametrize("split_s", [3.0, 8.0])
def test_a_six_six_partition_keeps_two_rings_and_they_merge_after_the_heal(testbed_factory: Any, split_s: float) -> None:
    merge_bound_s = SIM_MERGE_BOUND_S + split_s
    t0 = time.monotonic()
    tb = testbed_factory(N, preset="local")
    everyone = list(range(N))
    poll(lambda: side_ring(tb.statuses())["ring_and_lists"], FORM_TIMEOUT_S, "the 12-node ring")
    ids = [s["id"] for s in tb.statuses()]
    formed_s = time.monotonic() - t0

    sides = [everyone[: N // 2], everyone[N // 2:]]
    tb.partition(sides)
    t_split = time.monotonic()
    # each side repairs its ring: failure timeout, then the successor lists, one stabilize round a hop
    # (well under split_s on an idle machine; SIDES_TIMEOUT_S leaves room for a loaded one)
    poll(lambda: all(side_ring(tb.statuses(side))["ring_and_lists"] for side in sides), SIDES_TIMEOUT_S,
         "a correct ring on each side of the partition")
    sides_ok_s = time.monotonic() - t_split
    time.sleep(max(0.0, split_s - sides_ok_s))  # the partition must last split_s in all
    side_reports = [side_ring(tb.statuses(side)) for side in sides]
    assert all(r["ring_and_lists"] for r in side_reports), \
        f"after {split_s}s split, a side's ring is not correct any more: {side_reports}"
    side_lookups = [tb.lookups(side, keys_per_node=10, seed=k, ids=[ids[i] for i in side])
                    for k, side in enumerate(sides)]
    for k, res in enumerate(side_lookups):
        assert res["correct"] == res["lookups"], f"side {k} answered lookups wrongly while split: {res}"
    # still correct after the lookups (nothing slid in meanwhile)
    assert all(side_ring(tb.statuses(side))["ring_and_lists"] for side in sides)
    split_held_s = time.monotonic() - t_split

    tb.heal()
    t_heal = time.monotonic()
    times: dict[str, float | None] = {"ring": None, "ring_and_lists": None, "converged": None}
    while time.monotonic() - t_heal < merge_bound_s + 10.0 and times["converged"] is None:
        rep = side_ring(tb.statuses())
        for key in times:
            if times[key] is None and rep[key]:
                times[key] = round(time.monotonic() - t_heal, 2)
        time.sleep(0.05)
    merged_lookups = tb.lookups(everyone, keys_per_node=10, seed=7, ids=ids) if times["ring_and_lists"] else None
    result = {
        "nodes": N,
        "preset": "local",
        "failure_timeout_s": FAILURE_TIMEOUT,
        "formed_s": round(formed_s, 2),
        "split_s": round(split_held_s, 2),
        "sides_correct_after_s": round(sides_ok_s, 2),
        "sides_ok": [r["ring_and_lists"] for r in side_reports],
        "side_lookups_correct": [f"{r['correct']}/{r['lookups']}" for r in side_lookups],
        "ring_merged_s": times["ring"],
        "successor_lists_merged_s": times["ring_and_lists"],
        "fingers_merged_s": times["converged"],
        "merge_bound_s": merge_bound_s,
        "merged_lookups_correct": None if merged_lookups is None else
        f"{merged_lookups['correct']}/{merged_lookups['lookups']}",
        "total_s": round(time.monotonic() - t0, 2),
    }
    print("partition-netns " + json.dumps(result))
    assert times["ring_and_lists"] is not None and times["ring_and_lists"] <= merge_bound_s, result
    assert merged_lookups is not None and merged_lookups["correct"] == merged_lookups["lookups"], result
