"""The real-process judge (runtime/cluster.py): ``ring_report``, ``ideal_ring`` and ``check_lookups``.

They give the only "converged" and "correct" verdict of the net and chaos tiers, so they are tested
here on hand-built /status dicts and against stub control endpoints. The truth in this file comes
from a brute-force successor (a linear scan of clockwise distances, not the product's bisect) and
from fingers written out by hand; each case breaks one thing and checks that the verdict is
"not converged", that exactly the right counters drop, and that ``problems`` names the fault.
"""

from __future__ import annotations

import copy
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

from mlfabric.runtime.cluster import MAX_PROBLEMS, check_lookups, ideal_ring, ring_report
from mlfabric.runtime.control import ControlServer, Response

BITS = 64
MOD = 1 << BITS
R = 3  # successor-list length in these rings
COUNTERS = ("answered", "joined", "successor", "predecessor", "successor_list", "fingers")

Status = dict[str, Any]


def true_successor(key: int, ids: list[int]) -> int:
    """The first id at or clockwise after ``key``: a linear scan, independent of the product's bisect."""
    return min(ids, key=lambda n: (n - key) % MOD)


def peer(node_id: int) -> dict[str, Any]:
    return {"id": node_id, "address": f"10.0.0.{node_id % 250 + 1}:7700"}


def status(node_id: int, ids: list[int], r: int = R) -> Status:
    """/status of ``node_id`` in the converged ring of ``ids`` (the fields the judge reads, as NodeCore reports them)."""
    ring = sorted(ids)
    pos = ring.index(node_id)
    n = len(ring)
    succ = [ring[(pos + k) % n] for k in range(1, min(r, n - 1) + 1)] or [node_id]
    return {
        "id": node_id,
        "joined": True,
        "predecessor": peer(ring[pos - 1]) if n > 1 else None,
        "successors": [peer(s) for s in succ],
        "fingers": [peer(true_successor((node_id + (1 << i)) % MOD, ring)) for i in range(BITS)],
        "incarnation": 0,
    }


def converged(ids: list[int]) -> list[Status | None]:
    return [status(i, ids) for i in ids]


_rng = random.Random(5)
IDS = sorted(_rng.getrandbits(BITS) for _ in range(6))
SMALL = [100, 200, 300, 400]


def test_the_test_oracle_itself_on_a_ring_written_out_by_hand() -> None:
    """Node 100 of {100, 200, 300, 400}: fingers 100+1 .. 100+64 land on 200, +128 on 300, +256 on 400,
    and from +512 on they wrap round to 100 itself."""
    s = status(100, SMALL)
    assert [f["id"] for f in s["fingers"]] == [200] * 7 + [300] + [400] + [100] * 55
    assert s["predecessor"]["id"] == 400 and [p["id"] for p in s["successors"]] == [200, 300, 400]
    assert [p["id"] for p in status(400, SMALL)["successors"]] == [100, 200, 300]


def test_ideal_ring_matches_the_brute_force_ring() -> None:
    for ids in (SMALL, IDS, [7], [1, MOD - 1]):
        ideal = ideal_ring(ids, R)
        assert sorted(ideal) == sorted(ids)
        for i in ids:
            want = status(i, ids)
            assert ideal[i] == {
                "predecessor": want["predecessor"]["id"] if want["predecessor"] else None,
                "successors": [p["id"] for p in want["successors"]],
                "fingers": [f["id"] for f in want["fingers"]],
            }, (ids, i)


@pytest.mark.parametrize("ids", [IDS, SMALL, [42], [1, MOD - 1]], ids=["six", "small", "alone", "two-at-the-ends"])
def test_a_converged_ring_passes(ids: list[int]) -> None:
    report = ring_report(converged(ids), R)
    assert report["converged"] is True, report
    assert all(report[k] == len(ids) for k in ("nodes", *COUNTERS)), report
    assert report["problems"] == []


def test_no_status_at_all_is_not_converged() -> None:
    assert ring_report([], R)["converged"] is False


# -------------------------------------------------------------------- one fault at a time

VICTIM = IDS[2]  # the node whose status each case breaks


def _mine(statuses: list[Status | None]) -> Status:
    return next(s for s in statuses if s is not None and s["id"] == VICTIM)


def wrong_successor(st: list[Status | None]) -> None:
    s = _mine(st)
    s["successors"][0] = peer(IDS[4])  # skips IDS[3]


def wrong_predecessor(st: list[Status | None]) -> None:
    _mine(st)["predecessor"] = peer(IDS[0])  # IDS[1] is the true one


def no_predecessor(st: list[Status | None]) -> None:
    _mine(st)["predecessor"] = None


def wrong_finger(st: list[Status | None]) -> None:
    fingers = _mine(st)["fingers"]
    fingers[40] = peer(IDS[5] if fingers[40]["id"] != IDS[5] else IDS[4])


def empty_finger(st: list[Status | None]) -> None:
    _mine(st)["fingers"][63] = None


def missing_finger(st: list[Status | None]) -> None:
    _mine(st)["fingers"].pop()


def stale_last_successor(st: list[Status | None]) -> None:
    _mine(st)["successors"][-1] = peer(IDS[1])  # the first entries are right, the last is behind


def short_successor_list(st: list[Status | None]) -> None:
    _mine(st)["successors"].pop()


def long_successor_list(st: list[Status | None]) -> None:
    _mine(st)["successors"].append(peer(IDS[0]))  # one stale entry past the r true ones


def not_joined(st: list[Status | None]) -> None:
    _mine(st)["joined"] = False


def did_not_answer(st: list[Status | None]) -> None:
    st[2] = None


def answered_twice(st: list[Status | None]) -> None:
    st.append(copy.deepcopy(st[1]))  # one node's status twice (a copied data dir, a control asked twice)


def unknown_to_the_others(st: list[Status | None]) -> None:
    """The victim believes it is in the ring; everyone else converged on the ring without it."""
    others = [i for i in IDS if i != VICTIM]
    for k, s in enumerate(st):
        if s is not None and s["id"] != VICTIM:
            st[k] = status(s["id"], others)


# Others whose true successor list (r = 3) holds the victim: its three predecessors. Others with a finger
# on the victim: counted by the brute force (it depends on the gaps), and there must be some.
LISTS_WITH_VICTIM = 3
FINGERS_ON_VICTIM = sum(any(f["id"] == VICTIM for f in status(i, IDS)["fingers"]) for i in IDS if i != VICTIM)
assert FINGERS_ON_VICTIM >= 1

Fault = Callable[[list[Status | None]], None]
# (fault, the counters that drop (by how much), a phrase the problems must contain)
CASES: list[tuple[Fault, dict[str, int], str]] = [
    (wrong_successor, {"successor": 1, "successor_list": 1}, f"node {VICTIM:016x}: successor {IDS[4]:016x}, "
                                                             f"should be {IDS[3]:016x}"),
    (wrong_predecessor, {"predecessor": 1}, f"node {VICTIM:016x}: predecessor {IDS[0]:016x}, should be {IDS[1]:016x}"),
    (no_predecessor, {"predecessor": 1}, f"node {VICTIM:016x}: predecessor none, should be {IDS[1]:016x}"),
    (wrong_finger, {"fingers": 1}, "1 of 64 fingers wrong, the first is finger 40:"),
    (empty_finger, {"fingers": 1}, "1 of 64 fingers wrong, the first is finger 63: none, should be"),
    (missing_finger, {"fingers": 1}, "the first is finger 63: absent, should be"),
    (stale_last_successor, {"successor_list": 1}, f"node {VICTIM:016x}: successor list"),
    (short_successor_list, {"successor_list": 1}, f"node {VICTIM:016x}: successor list"),
    (long_successor_list, {"successor_list": 1}, f"node {VICTIM:016x}: successor list"),
    (not_joined, {"joined": 1}, f"node {VICTIM:016x}: not joined"),
    # The truth is the ring of those who answered: without the victim, its neighbours' pointers to it are
    # wrong too (the silent node itself counts as wrong on every count).
    (did_not_answer, {"answered": 1, "joined": 1, "successor": 2, "predecessor": 2,
                      "successor_list": 1 + LISTS_WITH_VICTIM, "fingers": 1 + FINGERS_ON_VICTIM},
     "1 of 6 nodes did not answer"),
    (answered_twice, {}, f"node {IDS[1]:016x} answered 2 times"),  # every count is right: only the duplicate fails
    (unknown_to_the_others, {"successor": 1, "predecessor": 1, "successor_list": LISTS_WITH_VICTIM,
                             "fingers": FINGERS_ON_VICTIM},
     f"node {IDS[1]:016x}: successor {IDS[3]:016x}, should be {VICTIM:016x}"),
]


@pytest.mark.parametrize(("fault", "drops", "phrase"), CASES, ids=[c[0].__name__ for c in CASES])
def test_one_fault_is_not_converged_and_is_named(fault: Fault, drops: dict[str, int], phrase: str) -> None:
    statuses = converged(IDS)
    fault(statuses)
    report = ring_report(statuses, R)
    assert report["converged"] is False, report
    got = {k: report["nodes"] - report[k] for k in COUNTERS if report[k] != report["nodes"]}
    assert got == drops, report
    assert any(phrase in p for p in report["problems"]), report["problems"]


def test_problems_are_capped_and_say_how_many_more() -> None:
    statuses = converged(IDS)
    for s in statuses:  # four problems each
        assert s is not None
        s["joined"] = False
        s["predecessor"] = None
        s["successors"].append(peer(s["id"]))
        s["fingers"] = s["fingers"][:10]
    problems = ring_report(statuses, R)["problems"]
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == f"... and {4 * len(IDS) - MAX_PROBLEMS} more"


# -------------------------------------------------------------------- lookups against stub control endpoints

KEYS = 12


def answer_true(key: int) -> Response:
    return Response.json({"key": key, "node": peer(true_successor(key, IDS)), "hops": 2, "elapsed_s": 0.001})


def answer_predecessor(key: int) -> Response:
    """The classic off-by-one: the node before the key's successor."""
    ring = sorted(IDS)
    wrong = ring[ring.index(true_successor(key, IDS)) - 1]
    return Response.json({"key": key, "node": peer(wrong), "hops": 2, "elapsed_s": 0.001})


def answer_failed(key: int) -> Response:
    return Response.json({"key": key, "node": None, "hops": 3, "error": "lookup failed"}, 503)


async def stub(answer: Callable[[int], Response]) -> ControlServer:
    async def lookup(query: dict[str, str]) -> Response:
        return answer(int(query["key"], 0))

    server = ControlServer({"/lookup": lookup})
    await server.start("127.0.0.1", 0)
    return server


def free_address() -> str:
    with socket.socket() as s:  # nothing listens there once closed
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(
    ("answers", "correct", "wrong", "failed", "phrase"),
    [
        ([answer_true, answer_true, answer_true], 3 * KEYS, 0, 0, ""),
        ([answer_true, answer_predecessor, answer_true], 2 * KEYS, KEYS, 0, "should be"),
        ([answer_predecessor], 0, KEYS, 0, "should be"),
        ([answer_true, answer_failed], KEYS, 0, KEYS, "no node (HTTP 503: lookup failed)"),
        ([answer_true, None], KEYS, 0, KEYS, "cannot reach control endpoint"),
    ],
    ids=["all-right", "one-node-answers-its-predecessor", "all-wrong", "one-node-fails", "one-node-unreachable"],
)
async def test_check_lookups_counts_and_names_wrong_answers(
    answers: list[Callable[[int], Response] | None], correct: int, wrong: int, failed: int, phrase: str
) -> None:
    servers: list[ControlServer] = []
    controls: list[str] = []
    try:
        for answer in answers:
            if answer is None:
                controls.append(free_address())
            else:
                servers.append(await stub(answer))
                controls.append(str(servers[-1].address))
        result = await check_lookups(controls, IDS, keys_per_node=KEYS, seed=9, timeout=3)
    finally:
        for server in servers:
            await server.close()
    assert result["lookups"] == KEYS * len(answers), result
    assert (result["correct"], result["wrong"], result["failed"]) == (correct, wrong, failed), result
    if phrase:
        assert result["problems"] and all(phrase in p for p in result["problems"][:MAX_PROBLEMS]), result["problems"]
    else:
        assert result["problems"] == []


async def test_check_lookups_names_the_key_the_control_and_both_nodes() -> None:
    server = await stub(answer_predecessor)
    try:
        assert server.address is not None
        result = await check_lookups([server.address], IDS, keys_per_node=1, seed=4, timeout=3)
    finally:
        await server.close()
    key = random.Random(4).getrandbits(BITS)  # the one key check_lookups draws for seed 4
    ring = sorted(IDS)
    want = true_successor(key, IDS)
    got = ring[ring.index(want) - 1]
    assert result["problems"] == [f"lookup of {key:016x} at {server.address}: node {got:016x}, should be {want:016x}"]
