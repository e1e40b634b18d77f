"""Whole training jobs on the simulator (sim/job.py): the real job machine in every node, exact tallies.

Every update is the tally {node id: 1}, so each committed round says whose updates it holds and how
often; JobSim's accounting compares that with who trained and who was alive at the commit. The
guarantees checked: no live trainer's update lost, none counted twice, none out of nowhere, every
round committed and recorded once (through aggregator kills, the coordinator's death, churn and a
whole-cluster restart), joiners train in a later round. The seed is in every assertion message:
``JobSim(JobRun(nodes=..., seed=...))`` reruns a failure.
"""

from __future__ import annotations

import json

import pytest

from mlfabric.cli import main
from mlfabric.sim.job import JOB, JobRun, JobSim, run_job

pytestmark = pytest.mark.sim


def exact(r: dict, seed: int, rounds: int) -> None:
    """The accounting of a finished job holds (and says so with the seed when it does not)."""
    assert r["rounds_completed"] == rounds, f"seed {seed}: {r['rounds_completed']}/{rounds} rounds"
    bad = {k: r[k] for k in ("lost", "duplicated", "unexpected", "double_commits", "kill_precondition_failures")
           if r[k]}
    assert not bad, f"seed {seed}: {bad}; per round {r['per_round']}"
    assert r["contributions_counted"] == r["contributions_expected"], f"seed {seed}: {r}"
    assert r["rounds_recorded"] == list(range(rounds)), f"seed {seed}: recorded {r['rounds_recorded']}"
    assert r["record_status"] == "done", f"seed {seed}"


def test_without_failures_every_member_is_counted_every_round() -> None:
    seed = 11
    r = run_job(JobRun(nodes=300, rounds=3, seed=seed, ring="protocol"))
    exact(r, seed, 3)
    assert r["ring"] == "protocol"
    assert [a["counted"] for a in r["per_round"]] == [300] * 3, f"seed {seed}: {r['per_round']}"
    assert r["dead_included"] == 0 and r["final_model_nodes"] == 300, f"seed {seed}: {r}"
    # per-node cost: a handful of job messages per round, nobody far above (fan-out 2, the heir first)
    assert r["msgs_per_node_round_median"] <= 6 and r["msgs_per_node_round_max"] <= 12, f"seed {seed}: {r}"
    assert r["bytes_out_max_over_median"] <= 3.0, f"seed {seed}: {r}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_aggregators_lose_nothing_and_count_nothing_twice(seed: int) -> None:
    r = run_job(JobRun(nodes=300, rounds=3, seed=seed, ring="ideal", kill_aggregators=15))
    assert r["killed_aggregators"] == 15, f"seed {seed}: {r['killed_aggregators']} killed"
    exact(r, seed, 3)
    kill_round = r["per_round"][1]
    assert kill_round["alive"] == 285 and kill_round["expected"] >= 285, f"seed {seed}: {kill_round}"
    assert r["per_round"][2]["counted"] == 285, f"seed {seed}: after the round the dead are out: {r['per_round']}"


def test_kills_spread_over_the_rounds() -> None:
    seed = 4
    r = run_job(JobRun(nodes=300, rounds=3, seed=seed, ring="ideal", kill_aggregators=9, kill_round="spread"))
    assert r["killed_aggregators"] == 9, f"seed {seed}"
    exact(r, seed, 3)
    assert [a["alive"] for a in r["per_round"]] == [297, 294, 291], f"seed {seed}: {r['per_round']}"


def test_the_coordinators_death_is_survived_and_every_round_recorded_once() -> None:
    seed = 5
    sim = JobSim(JobRun(nodes=300, rounds=5, seed=seed, ring="ideal", kill_coordinator=2))
    r = sim.run()
    exact(r, seed, 5)
    assert r["coordinator_killed"] and r["coordinator_takeover_s"] is not None, f"seed {seed}: {r}"
    assert 0 < r["coordinator_takeover_s"] < 15, f"seed {seed}: takeover took {r['coordinator_takeover_s']} s"
    changes = r["coordinator_changes"]
    assert len(changes) == 1 and changes[0]["round"] == 2 and changes[0]["attempt"] == 1, f"seed {seed}: {changes}"
    # round 2 was committed by the new coordinator, under the new attempt
    assert sim.commits[2].attempt == 1 and sim.commits[2].address == changes[0]["node"], f"seed {seed}"
    # the final model is the last round's tally: every trainer of it alive at its commit, once
    last = sim.commits[4]
    trainers = {i for i, (a, _) in sim.trained_by[4].items() if sim.alive(a)}
    final = sim.host[changes[0]["node"]].model
    assert final == last.payload and set(final) == trainers and set(final.values()) == {1}, f"seed {seed}"
    assert len(trainers) == 299, f"seed {seed}"


def test_churn_joiners_train_from_a_later_round_and_the_accounting_stays_exact() -> None:
    seed = 6
    sim = JobSim(JobRun(nodes=300, rounds=5, seed=seed, ring="protocol", churn=2.0))
    r = sim.run()
    exact(r, seed, 5)
    assert r["leaves"] >= 3 and r["joiners"] >= 3, f"seed {seed}: churn too light to mean much: {r}"
    assert r["joiners_eligible"] >= 2, f"seed {seed}: {r}"
    assert r["joiners_trained"] == r["joiners_eligible"], f"seed {seed}: {r}"
    # nobody trains in the round it joined in: its first counted round is later
    for addr, j in sim.joiners.items():
        nid = sim.net.nodes[addr].me.id
        rounds_in = [k for k, c in sim.commits.items() if nid in (c.payload or {})]
        if rounds_in and j["round"] is not None:
            assert min(rounds_in) > j["round"], f"seed {seed}: {addr} joined in round {j['round']}, in {rounds_in}"


def test_sampled_trainers_per_round() -> None:
    seed = 8
    r = run_job(JobRun(nodes=300, rounds=3, seed=seed, ring="ideal", nodes_per_round=30))
    exact(r, seed, 3)
    counts = [a["counted"] for a in r["per_round"]]
    assert all(24 <= c <= 36 for c in counts), f"seed {seed}: {counts}"
    small = run_job(JobRun(nodes=8, rounds=3, seed=seed, ring="protocol", nodes_per_round=3))
    exact(small, seed, 3)
    assert [a["counted"] for a in small["per_round"]] == [3, 3, 3], f"seed {seed}: {small['per_round']}"


def test_whole_cluster_restart_resumes_with_every_round_recorded_once() -> None:
    seed = 9
    rounds = 5
    sim = JobSim(JobRun(nodes=200, rounds=rounds, seed=seed, ring="ideal"))
    sim.build()
    sim.submit()
    assert sim.run_until(2), f"seed {seed}"
    sim.net.run_until(sim.net.now + 0.4)  # into round 2: some have trained it, nobody has its result
    assert 2 not in sim.commits and sim.trained_by.get(2), f"seed {seed}: the restart must fall inside round 2"
    before = {a: h.version for a, h in sim.host.items()}
    sim.restart_all()
    assert all(sim.net.nodes[a].jobs.jobs[JOB].version == v for a, v in before.items()
               if a in sim.net.nodes and sim.host[a].record is not None), f"seed {seed}: restored versions"
    assert sim.run_until(rounds), f"seed {seed}: the job did not resume ({sorted(sim.commits)})"
    r = sim.report()
    exact(r, seed, rounds)
    assert r["restarts"] == 1
    whys = [e["why"] for e in r["coordinator_changes"]]
    assert whys == ["resumed after restart"], f"seed {seed}: {whys}"
    assert [a["counted"] for a in r["per_round"]] == [200] * rounds, f"seed {seed}: {r['per_round']}"


def test_same_seed_same_job() -> None:
    a = run_job(JobRun(nodes=40, rounds=2, seed=3, kill_aggregators=2))
    b = run_job(JobRun(nodes=40, rounds=2, seed=3, kill_aggregators=2))
    a.pop("wall_s"), b.pop("wall_s")
    assert a == b


def test_cli_json_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "job", "--nodes", "30", "--rounds", "2", "--seed", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("nodes", "rounds_completed", "contributions_expected", "contributions_counted", "lost", "duplicated",
                "dead_included", "round_time_median_s", "msgs_per_node_round_median", "msgs_per_node_round_max",
                "bytes_out_max_over_median", "coordinator_takeover_s", "rounds_recorded", "ring", "wall_s"):
        assert key in r, key
    assert (r["nodes"], r["rounds_completed"], r["lost"], r["ring"]) == (30, 2, 0, "protocol")
    assert r["coordinator_takeover_s"] is None
    assert main(["sim", "job", "--nodes", "30", "--rounds", "2", "--kill-aggregators", "30"]) == 2
    assert "kill_aggregators" in capsys.readouterr().err
    assert main(["sim", "aggregate", "--nodes", "1000", "--parents", "2"]) == 2
    assert "sim job" in capsys.readouterr().err


def test_summary_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "job", "--nodes", "20", "--rounds", "2", "--kill-coordinator", "1"]) == 0
    out = capsys.readouterr().out
    assert "contributions: expected" in out and "coordinator killed: taken over in" in out, out
    assert "2/2 rounds" in out.splitlines()[0], out
