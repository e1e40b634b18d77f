"""Skip-mesh aggregation on the simulator: exactly once under aggregator kills, and the plain-tree baseline."""

from __future__ import annotations

import json

import pytest

from mlfabric.cli import main
from mlfabric.sim.aggregate import AggregateRun, run_aggregate

pytestmark = pytest.mark.sim


def _stable(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "wall_s"}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_skip_mesh_loses_nothing_and_counts_nothing_twice(seed: int) -> None:
    r = run_aggregate(AggregateRun(nodes=300, parents=2, kill_aggregators=15, rounds=6, seed=seed))
    assert r["killed"] == 15, f"seed {seed}"
    assert (r["lost"], r["duplicated"], r["corrupt"]) == (0, 0, 0), f"seed {seed}: {r}"
    assert r["rounds_completed"] == 6, f"seed {seed}"
    assert r["contributions_counted"] == r["contributions_expected"] + r["dead_included"], f"seed {seed}"


def test_plain_tree_loses_subtrees_on_the_same_seed() -> None:
    mesh = run_aggregate(AggregateRun(nodes=300, parents=2, kill_aggregators=15, rounds=6, seed=7))
    tree = run_aggregate(AggregateRun(nodes=300, parents=1, kill_aggregators=15, rounds=6, seed=7))
    assert mesh["lost"] == 0
    assert tree["lost"] > 0, "killing inner nodes of a single-parent tree must cost their subtrees"
    assert tree["duplicated"] == 0 and tree["corrupt"] == 0


def test_skip_mesh_without_repair_still_survives_most_failures() -> None:
    mesh = run_aggregate(AggregateRun(nodes=300, parents=2, kill_aggregators=15, rounds=6, seed=7, repair=False))
    tree = run_aggregate(AggregateRun(nodes=300, parents=1, kill_aggregators=15, rounds=6, seed=7))
    assert mesh["duplicated"] == 0
    assert mesh["lost"] * 10 <= tree["lost"], (mesh["lost"], tree["lost"])


def test_same_seed_same_run() -> None:
    a = run_aggregate(AggregateRun(nodes=100, parents=2, kill_aggregators=5, rounds=3, seed=5))
    b = run_aggregate(AggregateRun(nodes=100, parents=2, kill_aggregators=5, rounds=3, seed=5))
    assert _stable(a) == _stable(b)


def test_failure_free_rounds_finish_quickly_and_need_no_repair() -> None:
    r = run_aggregate(AggregateRun(nodes=200, parents=2, rounds=4, seed=3, straggler_fraction=0.0))
    assert r["repair_requests"] == 0 and r["lost"] == 0
    assert r["round_time_median_s"] < 3.0, r  # training ~1 s; the deadlines do not hold it up


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sim", "aggregate", "--nodes", "120", "--parents", "2", "--kill-aggregators", "6",
               "--rounds", "3", "--seed", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for key in ("contributions_expected", "contributions_counted", "lost", "duplicated", "rounds_completed",
                "round_time_median_s", "messages_per_round", "wall_s"):
        assert key in out
    assert out["lost"] == 0 and out["duplicated"] == 0
