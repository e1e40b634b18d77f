"""The job machine (core/jobs.py) in units: trainer apportioning, the tree's trainer counts on rings
small enough for every node's successor list to cover them, stale and bad notices, the heir flag and
the record. Nodes are real NodeCores with routing installed from the true ids; messages are fed in
by hand (or, for whole rounds, through sim/job.py on an ideal ring)."""

from __future__ import annotations

import random
from bisect import bisect_left
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlfabric.config import JobsConfig, OverlayConfig
from mlfabric.core.aggregate import WithPayload
from mlfabric.core.events import TrainRequested
from mlfabric.core.jobs import JobRecord, JobSpec, _apportion, job_key
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, MASK, distance, successor_of
from mlfabric.sim.job import JobRun, JobSim, Tally
from mlfabric.wire.messages import ALL_TRAIN, JobRound, JobRoundAck, JobSubmit, Peer

SPEC = JobSpec(job_id="j", task="sim", rounds=5)


def ring(ids: list[int]) -> dict[int, NodeCore]:
    """NodeCores with job machines, routing installed as a converged ring of ``ids``."""
    ids = sorted(ids)
    peers = [Peer(i, f"n{i}:1") for i in ids]
    cores = {}
    for k, p in enumerate(peers):
        core = NodeCore(p, OverlayConfig(), random.Random(k), jobs=JobsConfig(), strategy=Tally(1))
        succs = [peers[(k + j) % len(peers)] for j in range(1, min(8, len(peers) - 1) + 1)]
        fingers = [peers[bisect_left(ids, (p.id + (1 << b)) & MASK) % len(ids)] for b in range(BITS)]
        core.install(peers[k - 1], succs, fingers, 0.0)
        cores[p.id] = core
    return cores


def notice(root: Peer, round_: int = 0, attempt: int = 0, *, path: tuple[Peer, ...] | None = None, hi: int = 0,
           quota: int = ALL_TRAIN, rank: int = 1, spec: str | None = None) -> JobRound:
    return JobRound("j", spec or SPEC.model_dump_json(), round_, attempt, root, hi, (root,) if path is None else path,
                    quota, rank, 4, "")


def events(core: NodeCore) -> list[object]:
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


IDS = [100, 200, 300, 400, 500]


# ------------------------------------------------------------------------------------------- apportion


@given(st.integers(0, 5000), st.lists(st.integers(0, 1000), min_size=1, max_size=17), st.integers(0, 2**32))
def test_apportion_sums_to_the_quota_and_keeps_our_own_share_at_most_one(quota: int, weights: list[int],
                                                                          seed: int) -> None:
    shares = _apportion(quota, weights, random.Random(seed))
    assert len(shares) == len(weights)
    assert all(s >= 0 for s in shares) and all(s == 0 for s, w in zip(shares, weights, strict=True) if w == 0)
    assert shares[0] <= 1, shares
    if any(w > 0 for w in weights[1:]):
        # the whole quota goes out, even when our own share (at most one) could not take its part
        assert sum(shares) == quota, (quota, weights, shares)
    else:
        assert sum(shares) == min(quota, 1 if weights[0] > 0 else 0), (quota, weights, shares)


@pytest.mark.parametrize(("quota", "weights", "want"), [
    (10, [1, 4, 5], [1, 4, 5]),
    (4, [1, 1, 1, 1], [1, 1, 1, 1]),
    (3, [1, 0, 9], [0, 0, 3]),  # largest remainders: 0.3 for us, 0.7 for the child
    (7, [0, 3, 4], [0, 3, 4]),
    (100, [1, 3, 3], [1, 50, 49]),  # more trainers asked for than the estimates: the children take the rest
    (5, [1], [1]),
])
def test_apportion_table(quota: int, weights: list[int], want: list[int]) -> None:
    assert _apportion(quota, weights, random.Random(1)) == want


@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_sampled_trainers_are_exact_where_the_successor_list_covers_the_ring(n: int, m: int) -> None:
    """With at most 8 nodes every node knows the whole ring, so the subtree sizes are exact and every
    round trains exactly ``m`` nodes."""
    seed = 7 * n + m
    r = JobSim(JobRun(nodes=n, rounds=4, seed=seed, ring="ideal", nodes_per_round=m)).run()
    counts = [a["counted"] for a in r["per_round"]]
    assert counts == [m] * 4, f"seed {seed}, n {n}: {counts}"
    assert r["lost"] == 0 and r["duplicated"] == 0, f"seed {seed}: {r}"


# ------------------------------------------------------------------------------------------- notices


def test_a_member_trains_on_a_notice_acks_it_and_ignores_stale_ones() -> None:
    cores = ring(IDS)
    root, me = cores[100], cores[300]
    me.receive(root.me, notice(root.me, 0, 0), 1.0)
    out = me.drain_outbox()
    assert any(isinstance(m, JobRoundAck) for _, m in out)
    assert [e for e in events(me) if isinstance(e, TrainRequested)] == [TrainRequested("j", 0)]
    st_ = me.jobs.jobs["j"]
    me.receive(root.me, notice(root.me, 2, 0), 2.0)  # newer round: taken (no model: nothing to train)
    assert (st_.round, st_.attempt) == (2, 0)
    stale = me.jobs.counters["stale_messages"]
    me.receive(root.me, notice(root.me, 1, 0), 3.0)  # older round, same attempt
    assert me.jobs.counters["stale_messages"] == stale + 1 and (st_.round, st_.attempt) == (2, 0)
    me.receive(root.me, notice(root.me, 2, 0), 3.5)  # the same notice again
    assert me.jobs.counters["stale_messages"] == stale + 2
    me.receive(root.me, notice(root.me, 1, 1), 4.0)  # a newer attempt wins even for an earlier round
    assert (st_.round, st_.attempt) == (1, 1)
    assert not [e for e in events(me) if isinstance(e, TrainRequested)]  # no model of version 1 or 2 here


@pytest.mark.parametrize(("make", "why"), [
    (lambda root: JobRound("j", "{not json", 0, 0, root, 0, (root,), ALL_TRAIN, 1, 4, ""), "spec"),
    (lambda root: notice(root, spec=JobSpec(job_id="other", task="sim", rounds=3).model_dump_json()), "mismatch"),
    (lambda root: notice(root, spec=JobSpec(job_id="j", task="sim").model_dump_json()), "no rounds"),
    (lambda root: notice(root, hi=distance(100, 300)), "empty range"),
    (lambda root: notice(root, path=(root,) * 64), "path too long"),
    (lambda root: JobRound("j", SPEC.model_dump_json(), 1, 0, root, 0, (root,), ALL_TRAIN, 1, 4, "",
                           with_model=True), "model missing"),
    (lambda root: JobRound("j", SPEC.model_dump_json(), 1, 0, root, 0, (root,), ALL_TRAIN, 1, 4, "[1, 2]"),
     "entry not an object"),
])
def test_bad_round_notices_are_counted_not_raised(make, why: str) -> None:
    cores = ring(IDS)
    root, me = cores[100], cores[300]
    me.receive(root.me, make(root.me), 1.0)
    assert me.jobs.counters["bad_messages"] == 1, why
    assert me.jobs.last_error and me.jobs.last_error.startswith("bad JobRound from n100:1"), me.jobs.last_error
    assert not [e for e in events(me) if isinstance(e, TrainRequested)], why
    # and the node keeps serving: a good notice afterwards works
    me.receive(root.me, notice(root.me, 0, 0), 2.0)
    assert [e for e in events(me) if isinstance(e, TrainRequested)] == [TrainRequested("j", 0)], why


@pytest.mark.parametrize("spec", ['{"job_id": "j"', '{"job_id": "bad id!", "rounds": 3}', '{"job_id": "j"}',
                                  '{"job_id": "j", "rounds": 3, "surprise": 1}'])
def test_bad_submissions_are_counted_not_raised(spec: str) -> None:
    cores = ring(IDS)
    owner = cores[100]
    owner.receive(cores[200].me, JobSubmit(spec), 1.0)
    assert owner.jobs.counters["bad_messages"] == 1 and "j" not in owner.jobs.jobs
    assert owner.jobs.last_error and "JobSubmit" in owner.jobs.last_error


def test_a_task_outside_the_allowlist_is_refused_not_coordinated() -> None:
    peers = [Peer(i, f"n{i}:1") for i in IDS]
    core = NodeCore(peers[0], OverlayConfig(), random.Random(1), jobs=JobsConfig(), strategy=Tally(1),
                    tasks=["digits"])
    core.install(peers[-1], peers[1:], [], 0.0)
    core.receive(peers[1], JobSubmit(SPEC.model_dump_json()), 1.0)
    assert core.jobs.counters["bad_messages"] == 1 and "j" not in core.jobs.jobs


def test_the_roots_first_child_is_the_heir_and_nobody_else() -> None:
    cores = ring(IDS)
    owner = cores[100]  # whoever a JobSubmit reaches coordinates (the sender looked the owner up)
    owner.receive(cores[200].me, JobSubmit(SPEC.model_dump_json()), 0.5)
    out = owner.drain_outbox()
    sent = [(a, m.msg if isinstance(m, WithPayload) else m) for a, m in out]
    first = [(a, m) for a, m in sent if isinstance(m, JobRound)]
    assert first and first[0][0] == "n200:1", f"the heir (our successor) gets the round first: {first}"
    heir = cores[200]
    heir.receive(owner.me, first[0][1], 0.6)
    assert heir.jobs.jobs["j"].heir
    other = cores[400]
    other.receive(heir.me, notice(owner.me, 0, 0, path=(owner.me, heir.me), rank=3), 0.7)
    assert not other.jobs.jobs["j"].heir


# ------------------------------------------------------------------------------------------- the record


def test_record_add_entry() -> None:
    rec = JobRecord(SPEC)
    assert rec.add_entry({"round": 0, "updates": 5})
    assert not rec.add_entry({"round": 0, "updates": 6})  # known already: the first one stays
    assert rec.history == [{"round": 0, "updates": 5}] and rec.next_round == 1
    assert rec.add_entry({"round": 3, "updates": 2})  # missed rounds 1 and 2: placeholders
    assert [e.get("missed", False) for e in rec.history] == [False, True, True, False]
    assert rec.add_entry({"round": 1, "updates": 4})  # a placeholder is filled when the entry comes
    assert not rec.add_entry({"round": 1, "updates": 9})
    assert rec.history[1] == {"round": 1, "updates": 4} and rec.next_round == 4
    for bad in ({"round": -1}, {"round": "2"}, {"round": True}, {}, {"round": 10**9}):
        with pytest.raises(ValueError):
            rec.add_entry(bad)


def test_record_json_round_trip() -> None:
    rec = JobRecord(SPEC, status="done", attempt=2, parts=9, coordinator=0xABC,
                    history=[{"round": 0, "updates": 3}], events=[{"event": "submitted", "round": 0}])
    assert JobRecord.from_json(rec.to_json()) == rec
    with pytest.raises(KeyError):
        JobRecord.from_json({"spec": SPEC.model_dump()})


def test_restore_then_resume_reopens_the_round_after_the_last_recorded() -> None:
    cores = ring(IDS)
    owner = cores[successor_of(job_key("j"), IDS)]
    rec = JobRecord(SPEC, attempt=1, parts=5, coordinator=owner.me.id,
                    history=[{"round": 0, "attempt": 0}, {"round": 1, "attempt": 1}])
    owner.jobs.restore(rec.to_json(), 2, Counter({1: 1}), 0, 10.0)  # joined (installed) at 0
    owner.handle_timer(10.0 + JobsConfig().resume_settle - 0.01)
    assert not owner.jobs.jobs["j"].coordinating, "it waits resume_settle for the others to rejoin"
    owner.handle_timer(10.0 + JobsConfig().resume_settle + 0.01)
    st_ = owner.jobs.jobs["j"]
    assert st_.coordinating and (st_.round, st_.attempt) == (2, 2), (st_.round, st_.attempt)
    assert [e["event"] for e in st_.record.events] == ["resumed after restart"]


def test_a_restored_member_that_does_not_own_the_job_key_does_not_spin() -> None:
    """After a restart only the key's owner resumes; the others look again later. Their timer must lie
    in the future after each look (it stayed in the past, so the host's one timer fired at once,
    forever, at the same instant)."""
    cores = ring(IDS)
    owner = successor_of(job_key("j"), IDS)
    other = cores[next(i for i in IDS if i != owner)]
    rec = JobRecord(SPEC, attempt=0, parts=5, coordinator=owner, history=[{"round": 0, "attempt": 0}])
    other.jobs.restore(rec.to_json(), 1, Counter({1: 1}), 0, 10.0)
    now = 10.0 + JobsConfig().resume_settle + 0.01
    for _ in range(3):
        other.handle_timer(now)
        due = other.next_deadline()
        assert due is not None and due > now, f"the timer fires again at {due}, now is {now}"
        now = due
    assert not other.jobs.jobs["j"].coordinating


def test_a_restored_node_not_joined_yet_does_not_spin() -> None:
    peer = Peer(IDS[0], "n100:1")
    core = NodeCore(peer, OverlayConfig(), random.Random(1), jobs=JobsConfig(), strategy=Tally(1))
    core.bootstrap(["n200:1"], 0.0)  # started, joining through a seed that does not answer yet
    rec = JobRecord(SPEC, parts=5, history=[{"round": 0, "attempt": 0}])
    core.jobs.restore(rec.to_json(), 1, None, 0, 0.0)
    now = JobsConfig().resume_settle + 0.01
    core.handle_timer(now)
    due = core.next_deadline()
    assert due is not None and due > now, f"the timer fires again at {due}, now is {now}"
