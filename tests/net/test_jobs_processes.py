"""Training jobs between real ``mlfabric node`` processes (local preset, loopback, port 0), on the core's
job machine (core/jobs.py) hosted by runtime/jobs.py.

Most tests run the probe task (mlfabric/learn/probe.py): a node's update is its data part + 1 (its rank
in the job, ``rank % parts``) with FedAvg weight 1, so a round's model times its update count is exactly
the sum of ``part + 1`` over the nodes counted (small integers: exact in float32). The ranks are read
from every node's ``/jobs`` view, the counts from the coordinator's record, the models from every
node's checkpoint; the expected value is computed here, the way FedAvg computes it (a float32 sum
divided by the count).

- three inner aggregators SIGKILLed in one round of 10 daemons: each victim is fully in or out, and the
  round's model is the full sum minus the victims that are out (all of them when they die while
  training); the next round counts exactly the survivors;
- a node started mid-job trains from a later round, and the rounds count it from then on;
- the coordinator SIGKILLed or SIGTERMed: the job finishes, every round recorded exactly once, the
  counts before and after the loss exact, every survivor holding the new coordinator's model;
- a whole cluster stopped mid-job and started again on the same data dirs resumes from its last round,
  every node counted in the resumed rounds;
- garbage job messages and blobs are counted (exactly) and logged, never import torch, and the node
  keeps serving jobs;
- ``nodes_per_round=3`` on 5 daemons: exactly 3 updates per round, no round waits for non-trainers;
- the digits job reaches 95 % on 8 daemons, every node counted in every round, every model bit-equal.

Seeds come from ``MLFABRIC_TEST_SEED``; the seed and the cluster's workdir (node logs in
``workdir/node<i>/log``) are in every failure message, with the tails of the relevant logs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from mlfabric.config import load_settings
from mlfabric.core.ring import ring_id
from mlfabric.runtime.cluster import Cluster, ClusterNode, cluster_add, cluster_down, fetch_statuses, ring_report
from mlfabric.runtime.control import ControlError, get_json
from mlfabric.runtime.demo import TRAINING_ENV
from mlfabric.runtime.transport import Transport
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.codec import encode
from mlfabric.wire.messages import ALL_TRAIN, JobPartial, JobRound, Peer, Ping

pytestmark = pytest.mark.net

SEED = int(os.environ.get("MLFABRIC_TEST_SEED", "2024"))
PROBE = "mlfabric.learn.probe:IndexTask"
SLOW = "mlfabric.learn.probe:SlowIndexTask"  # 0.1 s of training per local epoch
EPOCH_S = 0.1
TASKS = json.dumps(["digits", PROBE, SLOW])
# The settings the demo gives training nodes (torch preloaded, failure timeouts that tolerate the CPU
# bursts of several daemons training on two cores), and the slow probe allowed.
ENV = {**TRAINING_ENV, "MLFABRIC_TASKS": TASKS}
KILL_NODES = int(os.environ.get("MLFABRIC_TEST_KILL_NODES", "10"))  # daemons of the 3-kill test (32: the run)
NO_TORCH_ENV = {k: v for k, v in ENV.items() if k != "MLFABRIC_PRELOAD_TORCH"}


# -------------------------------------------------------------------- helpers


def log_lines(node: ClusterNode, needle: str) -> list[str]:
    try:
        return [ln for ln in Path(node.log).read_text(errors="replace").splitlines() if needle in ln]
    except OSError:
        return []


async def poll(check: Callable[[], Awaitable[Any]], bound: float, what: str, context: Callable[[], str],
               interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; fail (with ``context()``) after ``bound`` s."""
    deadline = time.monotonic() + bound
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {bound:g}s (last {value!r})\n{context()}")
        await asyncio.sleep(interval)


async def job_view(node: ClusterNode, job: str) -> dict[str, Any] | None:
    """The node's /jobs entry for ``job`` (None when unreachable or unknown there)."""
    try:
        code, body = await get_json(node.control, f"/jobs?{urlencode({'job': job})}", 3.0)
    except ControlError:
        return None
    return body.get("jobs", {}).get(job) if code == 200 else None


async def views(nodes: list[ClusterNode], job: str) -> dict[int, dict[str, Any] | None]:
    got = await asyncio.gather(*(job_view(n, job) for n in nodes))
    return {n.id: v for n, v in zip(nodes, got, strict=True)}


async def ring_converged(nodes: list[ClusterNode], context: Callable[[], str], bound: float = 30.0) -> None:
    async def check() -> bool:
        return bool(ring_report(await fetch_statuses([n.control for n in nodes], timeout=2), 8)["converged"])

    await poll(check, bound, f"ideal ring of {len(nodes)}", context, interval=0.1)


def cli_submit(node: ClusterNode, **params: Any) -> dict[str, Any]:
    """``mlfabric job submit ... --node CONTROL --json``, the way a user runs it."""
    argv = [sys.executable, "-m", "mlfabric", "job", "submit", "--node", node.control, "--json"]
    for key, value in params.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"job submit failed ({done.returncode}): {done.stdout} {done.stderr}"
    return json.loads(done.stdout)


async def api_submit(node: ClusterNode, **params: Any) -> dict[str, Any]:
    code, body = await get_json(node.control, f"/job/submit?{urlencode(params)}", 30.0)
    assert code == 200, f"/job/submit answered {code}: {body}"
    return body


def by_id(cluster: Cluster, node_id: int) -> ClusterNode:
    return next(n for n in cluster.nodes if n.id == node_id)


async def wait_done(node: ClusterNode, job: str, bound: float, context: Callable[[], str]) -> dict[str, Any]:
    """``node``'s view once it coordinates ``job`` and the job is done."""
    async def check() -> dict[str, Any] | None:
        view = await job_view(node, job)
        return view if view is not None and view["status"] == "done" and view["role"] == "coordinator" else None

    return await poll(check, bound, f"job {job} done at node{node.index}", context, interval=0.1)


def checkpoint(node: ClusterNode, job: str, *, polling: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The node's checkpoint of ``job``. While polling a missing one is None; a damaged one always raises."""
    from mlfabric.learn.checkpoint import load_checkpoint

    try:
        return load_checkpoint(Path(node.data_dir) / "jobs" / job / "model.ckpt")
    except FileNotFoundError:
        if polling:
            return None
        raise


async def final_models(nodes: list[ClusterNode], job: str, version: int, context: Callable[[], str],
                       bound: float = 15.0) -> None:
    """Wait until every node has checkpointed ``version`` (the coordinator's record says done when it
    commits; the final model then travels down the tree)."""
    async def check() -> bool:
        got = [checkpoint(x, job, polling=True) for x in nodes]
        return all(g is not None and g[1]["version"] == version for g in got)

    await poll(check, bound, f"model version {version} at every node", context)


def probe_value(tensors: dict[str, Any], where: str) -> float:
    """The probe model's value (it must be one constant)."""
    vec = tensors["value"]
    assert bool((vec == vec[0]).all()), f"{where}: the probe model is not constant ({vec.min()}..{vec.max()})"
    return float(vec[0])


def fedavg(total: int, count: int) -> float:
    """The probe round's model: the float32 sum of ``count`` weight-1 updates, divided by ``count``."""
    import torch

    return float(torch.tensor(float(total), dtype=torch.float32) / float(count))


def kill(cluster: Cluster, node: ClusterNode, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal ``node``; a killed one is reaped and dropped from the cluster (never signal a reused pid)."""
    os.kill(node.pid, sig)
    if sig == signal.SIGKILL:
        proc = cluster.procs.pop(node.pid, None)
        if proc is not None:
            proc.wait(timeout=10)
        cluster.nodes = [x for x in cluster.nodes if x.pid != node.pid]


def ranks_of(vs: dict[int, dict[str, Any] | None]) -> dict[int, int]:
    return {i: v["rank"] for i, v in vs.items() if v is not None and v.get("rank") is not None}


# -------------------------------------------------------------------- 1: exact sums, 3 aggregators killed


@pytest.mark.slow
@pytest.mark.timeout(240 * max(1, KILL_NODES // 10))
@pytest.mark.parametrize("moment", ["training", "trained"])
async def test_exact_sums_when_three_inner_aggregators_are_killed_in_one_round(clusters, log_tail,
                                                                               moment: str) -> None:
    """10 daemons (``MLFABRIC_TEST_KILL_NODES``), 3 rounds of the slow probe (2 s of training). In round 1, three nodes that have
    children in round 1's tree (each by its own /jobs view), none the coordinator, are SIGKILLed while
    they train (``training``: none of them can be counted) or each right after its own training ended
    (``trained``: its partial may be on the way up, counted or not, never in part or twice). Round 1's
    model (checkpoint version 2, taken while round 2 trains) must be the full sum minus exactly the
    victims left out; round 2 counts exactly the 7 survivors, whose final models all equal it."""
    n, epochs = KILL_NODES, 20
    scale = max(1.0, n / 10)  # the bounds below are for 10 daemons on 2 cores; more share the same cores
    rng = random.Random(f"{SEED}-{moment}")
    job = f"probe-kill3-{moment}-{SEED}"
    cluster = clusters(n, extra_args=["--log-level", "debug"], extra_env=ENV)
    tag = f"seed={SEED} moment={moment} job={job} workdir={cluster.workdir}"
    watch: list[ClusterNode] = []

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 25) for x in watch)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[rng.randrange(n)], job_id=job, task=SLOW, rounds=3,
                                 local_epochs=epochs, seed=SEED)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    watch.append(coord)

    # Round 0: every node has its rank (distance order from the coordinator) and round 0's tree.
    async def round0() -> dict[int, dict[str, Any]] | None:
        vs = await views(cluster.nodes, job)
        ok = all(v is not None and v["round"] == 0 and v["rank"] is not None for v in vs.values())
        return vs if ok else None  # type: ignore[return-value]

    vs0 = await poll(round0, 30.0 * scale, "round 0 open at every node", context)
    # Round 0's ranks and part count are estimates; from round 1 on they are exact (round 0's count):
    # the data part each node trains on in rounds 1 and 2 is read from its views in those rounds.
    print(f"{tag}: round 0: {len(set(ranks_of(vs0).values()))} distinct ranks of {n}, parts "
          f"{sorted({v['parts'] for v in vs0.values()})}")
    part: dict[int, int] = {}  # node id -> its data part from round 1 on
    inner = [x for x in cluster.nodes if x is not coord and vs0[x.id]["tree"]["children"]]
    assert len(inner) >= 3, f"{tag}: only {len(inner)} inner nodes besides the coordinator in round 0's tree"
    rng.shuffle(inner)

    # Round 1: the victims, confirmed inner in round 1 by their own views.
    victims: list[ClusterNode] = []
    children: dict[int, list[int]] = {}
    for x in inner:
        async def in_round1(x: ClusterNode = x) -> dict[str, Any] | None:
            v = await job_view(x, job)
            return v if v is not None and v["round"] >= 1 else None

        v = await poll(in_round1, 40.0 * scale, f"round 1 open at node{x.index}", context, interval=0.02)
        if v["round"] == 1 and v["tree"]["children"] and v["host"]["trainings"] == 1:
            part[x.id] = v["rank"] % v["parts"]
            assert (v["rank"], v["parts"]) == (v["host"]["rank"], v["host"]["parts"]), f"{tag}: {v}"
            victims.append(x)
            children[x.id] = [c["id"] for c in v["tree"]["children"]]
        if len(victims) == 3:
            break
    assert len(victims) == 3, f"{tag}: fewer than 3 nodes inner in round 1 and still training\n{context()}"
    watch += victims
    tag += (f" coordinator=node{coord.index} victims="
            + ",".join(f"node{v.index}(part {part[v.id]}, {len(children[v.id])} children)" for v in victims))
    print(tag)
    needle = f"job {job} round 1: trained"
    if moment == "training":
        for v in victims:
            kill(cluster, v)
        late = [f"node{v.index}" for v in victims if log_lines(v, needle)]
        assert not late, f"{tag}: {late} finished training before the kill; raise local_epochs"
    else:
        for v in victims:
            async def trained(v: ClusterNode = v) -> bool:
                return bool(log_lines(v, needle))

            await poll(trained, epochs * EPOCH_S + 20.0, f"node{v.index} trained round 1", context, interval=0.005)
            kill(cluster, v)
    survivors = list(cluster.nodes)
    assert len(survivors) == n - 3

    # Round 1's model at every survivor (version 2) while round 2 trains, then the end.
    snapshots: dict[int, float] = {}

    async def finished() -> dict[str, Any] | None:
        for x in survivors:
            if x.id not in snapshots and (got := checkpoint(x, job, polling=True)) is not None:
                if got[1]["version"] == 2:
                    snapshots[x.id] = probe_value(got[0], f"node{x.index} version 2")
        view = await job_view(coord, job)
        return view if view is not None and view["status"] == "done" else None

    view = await poll(finished, 120.0 * scale, f"job {job} done", context, interval=0.02)
    final_views = await views(survivors, job)
    for x in survivors:
        fv = final_views[x.id]
        assert fv is not None, f"{tag}: node{x.index} does not know the job"
        part[x.id] = fv["rank"] % fv["parts"]
    exact = {fv["parts"] for fv in final_views.values() if fv is not None}
    assert exact == {n}, f"{tag}: from round 1 the part count is round 0's {n} members: {exact}"
    assert sorted(part.values()) == list(range(n)), f"{tag}: from round 1 every node has its own part: {part}"
    hist = view["history"]
    print(f"{tag}: rounds " + "; ".join(f"r{h['round']} {h['updates']}/{h['members']} in {h['seconds']}s "
                                        f"(repairs {h['repair_requests']}, overlaps {h['dropped_overlaps']})"
                                        for h in hist))
    assert [h["round"] for h in hist] == [0, 1, 2], f"{tag}: {hist}"
    assert all(h["attempt"] == 0 for h in hist), f"{tag}: the coordinator changed: {view['events']}"
    assert hist[0]["updates"] == hist[0]["members"] == n, f"{tag}: {hist[0]}"
    r1 = hist[1]
    assert r1["updates"] == r1["members"], f"{tag}: every member trains: {r1}"
    out_count = n - r1["updates"]
    full = sum(p + 1 for p in part.values())
    if moment == "training":
        assert out_count == 3, f"{tag}: victims that died training were counted: {r1}"
    assert 0 <= out_count <= 3, f"{tag}: {out_count} left out of round 1, only 3 died: {r1}"
    sums = {tuple(sorted(part[v.id] for v in out)): full - sum(part[v.id] + 1 for v in out)
            for out in itertools.combinations(victims, out_count)}
    allowed = {fedavg(total, r1["updates"]): out for out, total in sums.items()}
    assert snapshots, f"{tag}: no survivor's version-2 checkpoint was seen"
    for node_id, value in snapshots.items():
        assert value in allowed, (f"{tag}: round 1's model at {node_id:016x} is {value!r}; with {r1['updates']} "
                                  f"updates it must be one of {allowed} (victims out by data part)")
    assert len(set(snapshots.values())) == 1, f"{tag}: the survivors hold different round-1 models: {snapshots}"
    print(f"{tag}: victims out of round 1 (data parts): {allowed[next(iter(snapshots.values()))]}")

    t_done = time.monotonic()
    await final_models(survivors, job, 3, context)
    print(f"{tag}: every survivor holds the final model {time.monotonic() - t_done:.2f}s after the record says done")
    live_sum = sum(part[x.id] + 1 for x in survivors)
    assert hist[2]["updates"] == hist[2]["members"] == n - 3, f"{tag}: round 2 counts the survivors: {hist[2]}"
    want = fedavg(live_sum, n - 3)
    ref, meta = checkpoint(coord, job)  # type: ignore[misc]
    assert meta == {"job": job, "version": 3, "rank": final_views[coord.id]["rank"], "parts": n}, f"{tag}: {meta}"
    for x in survivors:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["version"] == 3, f"{tag}: node{x.index}: {meta}"
        assert probe_value(tensors, f"node{x.index}") == want, f"{tag}: node{x.index} final model"


# -------------------------------------------------------------------- 2: a node started mid-job


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_node_started_mid_job_trains_from_a_later_round(clusters, log_tail) -> None:
    """4 daemons run 16 rounds of the slow probe (1 s each); after round 1 is recorded a 5th node starts.
    It becomes a member of the next rounds' trees, trains (rounds_trained > 0), the rounds count 5 from
    then on, and every node's final model is exactly the average of the 5 data parts."""
    rounds, epochs = 16, 10  # 1 s rounds; the joiner imports torch (up to ~6 s on a loaded 2-core machine) first
    job = f"probe-joiner-{SEED}"
    cluster = clusters(4, extra_env=ENV)
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 20) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[0], job_id=job, task=SLOW, rounds=rounds, local_epochs=epochs)
    coord = by_id(cluster, submitted["coordinator"]["id"])

    async def two_rounds() -> int | None:
        view = await job_view(coord, job)
        return len(view["history"]) if view is not None and len(view["history"]) >= 2 else None

    started_after = await poll(two_rounds, 60.0, "two rounds recorded", context)
    joiner = cluster_add(cluster, extra_env=ENV)
    tag += f" joiner=node{joiner.index}:{joiner.id:016x} (started after {started_after} rounds)"
    print(tag)
    view = await wait_done(coord, job, 90.0, context)
    hist = view["history"]
    print(f"{tag}: members by round {[h['members'] for h in hist]}, updates {[h['updates'] for h in hist]}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    members = [h["members"] for h in hist]
    assert members[:started_after] == [4] * started_after, f"{tag}: {members}"
    assert members == sorted(members) and members[-1] == 5, f"{tag}: the member count grows to 5: {members}"
    first5 = members.index(5)
    assert first5 >= started_after, f"{tag}: counted 5 before the joiner started: {members}"
    assert all(h["updates"] == h["members"] for h in hist), f"{tag}: {hist}"

    vs = await views(cluster.nodes, job)
    jv = vs[joiner.id]
    assert jv is not None, f"{tag}: the joiner does not know the job\n{context()}"
    assert jv["rounds_trained"] == rounds - first5 and jv["host"]["trainings"] == rounds - first5, \
        f"{tag}: the joiner trained {jv['rounds_trained']} rounds, rounds {first5}.. count it: {jv['host']}"
    parts = {v["parts"] for v in vs.values() if v is not None}
    assert parts == {4}, f"{tag}: data parts are fixed at round 0: {parts}"
    total = sum(v["rank"] % 4 + 1 for v in vs.values() if v is not None)
    await final_models(cluster.nodes, job, rounds, context)
    want = fedavg(total, 5)
    for x in cluster.nodes:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["version"] == rounds, f"{tag}: node{x.index}: {meta}"
        assert probe_value(tensors, f"node{x.index}") == want, f"{tag}: node{x.index}: want {want}"


# -------------------------------------------------------------------- 3: the coordinator goes away


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_job_survives_the_loss_of_its_coordinator(clusters, log_tail, how: str) -> None:
    """5 daemons, 8 rounds of the slow probe (0.5 s); after round 1 the coordinator is killed (crash) or
    stopped (graceful leave: it hands the job over). Its heir takes over with a higher attempt; every
    round is recorded exactly once; the rounds before the loss count 5, the ones after it 4 (the round
    in flight one or the other); every survivor ends with the new coordinator's model, which is
    exactly the average of the survivors' updates."""
    rounds = 8
    cluster = clusters(5, extra_env=ENV)
    job = f"coord-{how.lower()}-{SEED}"
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 20) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[0], job_id=job, task=SLOW, rounds=rounds, local_epochs=5)
    coord = by_id(cluster, submitted["coordinator"]["id"])

    async def two_rounds() -> int | None:
        view = await job_view(coord, job)
        return len(view["history"]) if view is not None and len(view["history"]) >= 2 else None

    await poll(two_rounds, 60.0, "two rounds recorded", context, interval=0.02)
    before = len((await job_view(coord, job) or {"history": []})["history"])
    kill(cluster, coord, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    survivors = [x for x in cluster.nodes if x is not coord]
    tag += f" coordinator=node{coord.index}:{coord.id:016x} lost after {before} rounds"
    print(tag)

    async def done_somewhere() -> dict[str, Any] | None:
        for x, v in (await views(survivors, job)).items():
            if v is not None and v["role"] == "coordinator" and v["status"] == "done":
                return {**v, "at": x}
        return None

    view = await poll(done_somewhere, 90.0, "the job done at a new coordinator", context, interval=0.2)
    heir = by_id(cluster, view["at"])
    hist = view["history"]
    print(f"{tag}: new coordinator node{heir.index}; rounds "
          + "; ".join(f"r{h['round']} a{h['attempt']} {h['updates']}/{h['members']} by {h['recorded_by'][:6]}"
                      for h in hist) + f"; events {view['events']}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: every round exactly once: {hist}"
    old = f"{coord.id:016x}"
    for h in hist[:before]:
        assert h["updates"] == h["members"] == 5 and h["recorded_by"] == old, f"{tag}: before the loss: {h}"
    flight = hist[before]
    assert (flight["updates"], flight["members"]) in ((5, 5), (4, 4)), f"{tag}: the round in flight: {flight}"
    if flight["members"] == 5:
        assert flight["recorded_by"] == old, f"{tag}: only the old coordinator can count itself: {flight}"
    for h in hist[before + 1:]:
        assert h["updates"] == h["members"] == 4 and h["attempt"] >= 1, f"{tag}: after the loss: {h}"
        assert h["recorded_by"] == f"{heir.id:016x}", f"{tag}: {h}"
    why = "handed over" if how == "SIGTERM" else f"coordinator {old} gone"
    assert any(e["event"] == why and e["node"] == f"{heir.id:016x}" for e in view["events"]), \
        f"{tag}: no '{why}' event by the heir: {view['events']}"

    final_views = await views(survivors, job)
    parts = {v["parts"] for v in final_views.values() if v is not None}
    assert parts == {5}, f"{tag}: the part count is round 0's 5 members: {parts}"
    want = fedavg(sum(v["rank"] % 5 + 1 for v in final_views.values() if v is not None), 4)
    await final_models(survivors, job, rounds, context)
    ref, _ = checkpoint(heir, job)  # type: ignore[misc]
    for x in survivors:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["version"] == rounds, f"{tag}: node{x.index}: {meta}"
        assert bool((tensors["value"] == ref["value"]).all()), f"{tag}: node{x.index} differs from the coordinator"
        assert probe_value(tensors, f"node{x.index}") == want, f"{tag}: node{x.index}: want {want}"


# -------------------------------------------------------------------- 4: restart resumes


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_restarted_cluster_resumes_the_job_from_its_last_round(clusters, log_tail) -> None:
    """4 daemons train digits (15 local epochs: rounds of seconds); once 2 rounds are recorded the whole
    cluster is stopped (SIGTERM) and started again on the same data dirs. The owner of the job key
    resumes from its record: the recorded rounds stay as they were, the job finishes with every round
    exactly once, every node is counted in every resumed round, and every node ends with the
    coordinator's model."""
    import torch

    n, rounds, stop_after = 4, 6, 2
    job = f"digits-restart-{SEED}"
    cluster = clusters(n, name="cluster", extra_env=ENV)
    workdir = cluster.workdir
    tag = f"seed={SEED} job={job} workdir={workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 20) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    ids_before = {x.index: x.id for x in cluster.nodes}
    submitted = cli_submit(cluster.nodes[0], task="digits", rounds=rounds, job_id=job, job_seed=SEED % 1000,
                           local_epochs=15)
    coord = by_id(cluster, submitted["coordinator"]["id"])

    async def enough() -> bool:
        view = await job_view(coord, job)
        return view is not None and len(view["history"]) >= stop_after

    await poll(enough, 120.0, f"{stop_after} rounds recorded", context, interval=0.02)
    result = cluster_down(workdir, timeout=10.0)
    for proc in cluster.procs.values():  # cluster_down (a fresh Cluster) terminated them; reap ours
        proc.wait(timeout=10)
    cluster.procs.clear()
    record = json.loads((Path(coord.data_dir) / "jobs" / job / "job.json").read_text())
    recorded = record["history"]
    versions = {x.index: (checkpoint(x, job, polling=True) or ({}, {"version": 0}))[1]["version"]
                for x in cluster.nodes}
    print(f"{tag}: stopped ({result}) with {len(recorded)} rounds recorded, status {record['status']}; "
          f"checkpoint versions {versions}")
    assert record["status"] == "running", f"{tag}: the job ended before the stop; slow the rounds down"
    assert [h["round"] for h in recorded] == list(range(len(recorded))), f"{tag}: {recorded}"
    for x in cluster.nodes:  # the first run's logs survive the restart (cluster_up truncates node<i>/log)
        Path(x.log).rename(Path(x.log).with_name("log.run1"))

    # cluster_up starts node0 alone and the others once it listens; each imports torch (seconds here)
    # before it joins, so node0 owns every key for a while: the default settings must not let it
    # resume the job alone.
    t_up = time.monotonic()
    again = clusters(n, name="cluster", extra_env=ENV)
    cluster = again
    assert {x.index: x.id for x in again.nodes} == ids_before, f"{tag}: ids changed on restart"
    coord2 = by_id(again, coord.id)
    view = await wait_done(coord2, job, 150.0, context)
    hist = view["history"]
    print(f"{tag}: done {time.monotonic() - t_up:.1f}s after the restart; rounds "
          + "; ".join(f"r{h['round']} a{h['attempt']} {h['updates']}/{h['members']} acc {h['test_accuracy']}"
                      for h in hist) + f"; events {view['events']}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: every round exactly once: {hist}"
    fields = ("round", "attempt", "updates", "members", "recorded_by", "test_accuracy", "test_loss")
    assert [{k: h[k] for k in fields} for h in hist[: len(recorded)]] == \
        [{k: h[k] for k in fields} for h in recorded], f"{tag}: the recorded rounds were rewritten"
    assert any(e["event"] == "resumed after restart" for e in view["events"]), f"{tag}: {view['events']}"
    for h in hist[len(recorded):]:
        assert h["updates"] == h["members"] == n, f"{tag}: round {h['round']} after the restart: {h}"
        assert h["attempt"] > recorded[-1]["attempt"], f"{tag}: {h}"
    await final_models(again.nodes, job, rounds, context)
    ref, _ = checkpoint(coord2, job)  # type: ignore[misc]
    for x in again.nodes:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["version"] == rounds, f"{tag}: node{x.index}: {meta}"
        different = [k for k in ref if not torch.equal(tensors[k], ref[k])]
        assert not different, f"{tag}: node{x.index} differs from the coordinator in {different}"


# -------------------------------------------------------------------- 5: garbage job input


async def attacker_transport() -> Transport:
    cfg = load_settings(preset="local").transport
    transport = Transport(cfg, None)
    port = await transport.bind("127.0.0.253", 0)
    me = Peer(ring_id("job-garbage-sender"), f"127.0.0.253:{port}")
    await transport.start(me, lambda src, msg: None, lambda address: None)
    return transport


def _round(spec: str, **kw: Any) -> JobRound:
    return JobRound("x", spec, 0, 0, Peer(1, "127.0.0.9:1"), 0, (), ALL_TRAIN, 0, 1, **kw)


def garbage_rounds() -> list[JobRound]:
    """Wire-valid JobRound notices whose spec is not a JobSpec (control lane: the core rejects them)."""
    rng = random.Random(SEED)
    specs = ['{"job_id": "x", "rounds": ', "not json at all", json.dumps({"job_id": "x", "rounds": -3}),
             json.dumps({"job_id": "x", "rounds": 2, "surprise": 1}), json.dumps({"job_id": "y", "rounds": 2}),
             "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(300))]
    return [_round(s) for s in specs]


def garbage_blobs() -> list[tuple[str, TensorBlob]]:
    """``job`` blobs that must be refused before torch: undecodable or wrong headers, a job this node
    does not know, a tensor that is not flat float32. (the reason the node must log, blob); random
    bytes may fail anywhere in the codec (reason "")."""
    import msgpack

    rng = random.Random(SEED + 1)
    data = bytes(16)
    spec = json.dumps({"job_id": "x", "rounds": 2})
    out = [("", TensorBlob("float32", (4,), data, rng.randbytes(rng.randrange(1, 200)))) for _ in range(8)]
    out += [
        ("message must be [version, type_id, fields]", TensorBlob("float32", (4,), data, msgpack.packb({"j": 1}))),
        ("incomplete input", TensorBlob("float32", (4,), data, encode(_round(spec, with_model=True))[:-3])),
        ("carries Ping, not a JobPartial", TensorBlob("float32", (4,), data, encode(Ping(7, 1)))),
        ("carries JobRound, not a JobPartial", TensorBlob("float32", (4,), data, encode(_round(spec)))),
        ("a partial of job 'x', which this node does not take part in",
         TensorBlob("float32", (4,), data, encode(JobPartial("x", 0, 0, 1, (0, 5), 1, 1, 1)))),
        ("flat float32 tensor, not int32[4]", TensorBlob("int32", (4,), data, encode(_round(spec, with_model=True)))),
        ("flat float32 tensor, not float32[2, 2]",
         TensorBlob("float32", (2, 2), data, encode(_round(spec, with_model=True)))),
        ("incomplete input", TensorBlob("float32", (4,), data)),  # no meta at all
    ]
    return out


async def send_garbage(target: Peer) -> None:
    attacker = await attacker_transport()
    try:
        for msg in garbage_rounds():
            attacker.send_nowait(target.address, msg)
        assert await attacker.drain(5.0), "garbage notices not sent"
        for _, blob in garbage_blobs():
            async with asyncio.timeout(10):
                await attacker.bulk.send(target.address, "job", blob, timeout=10)
    finally:
        await attacker.close()


@pytest.mark.timeout(120)
async def test_garbage_job_messages_are_counted_and_the_node_keeps_serving(clusters, log_tail) -> None:
    """Against a real daemon (torch not preloaded): every garbage notice adds one to ``bad_messages``,
    every garbage blob one to ``bad_blobs`` with one warning naming the sender, none of it imports
    torch, and a probe job submitted to the node afterwards completes with both nodes counted."""
    cluster = clusters(2, extra_env=NO_TORCH_ENV)
    target = cluster.nodes[1]
    tag = f"seed={SEED} workdir={cluster.workdir} target=node1:{target.id:016x}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 25) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    rounds, blobs = garbage_rounds(), garbage_blobs()
    await send_garbage(Peer(target.id, target.address))

    async def counted() -> dict[str, Any] | None:
        code, status = await get_json(target.control, "/status", 3.0)
        jobs = status["jobs"]
        done = jobs["bad_messages"] >= len(rounds) and jobs["bad_blobs"] >= len(blobs)
        return status if code == 200 and done else None

    status = await poll(counted, 15.0, f"{len(rounds)} bad notices and {len(blobs)} bad blobs counted", context)
    assert status["jobs"]["bad_messages"] == len(rounds), f"{tag}: {status['jobs']}"
    assert status["jobs"]["bad_blobs"] == len(blobs), f"{tag}: {status['jobs']}"
    assert status["jobs"]["blobs_received"] == 0, f"{tag}: {status['jobs']}"
    assert not status["torch_loaded"], f"{tag}: garbage made the node import torch"
    warned = log_lines(target, "bad job blob from 127.0.0.253:")
    assert len(warned) == len(blobs), f"{tag}: {len(warned)} warnings for {len(blobs)} blobs: {warned}"
    warned = log_lines(target, "bad job message from 127.0.0.253:")
    assert len(warned) == len(rounds), f"{tag}: {len(warned)} warnings for {len(rounds)} notices: {warned}"
    assert status["joined"], f"{tag}: /status {status}"

    job = f"after-garbage-{SEED}"
    submitted = await api_submit(target, job_id=job, task=PROBE, rounds=1)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    view = await wait_done(coord, job, 60.0, context)
    assert view["history"][0]["updates"] == view["history"][0]["members"] == 2, f"{tag}: {view['history']}"
    assert all(proc.poll() is None for proc in cluster.procs.values()), f"{tag}: a node exited\n{context()}"


async def test_garbage_job_input_leaves_no_state_in_an_in_process_daemon(daemon_factory, caplog) -> None:
    """The same garbage against an in-process daemon, whose core and host the test reads directly:
    the counters move by exactly the garbage sent, one warning per blob, and no job exists afterwards."""
    target = await daemon_factory()
    caplog.set_level(logging.WARNING, logger="mlfabric.jobs")
    assert target.jobs is not None and target.core is not None and target.core.jobs is not None
    core, host = target.core.jobs, target.jobs
    before_msgs, before_blobs = core.counters["bad_messages"], host.counters["bad_blobs"]
    rounds, blobs = garbage_rounds(), garbage_blobs()
    await send_garbage(Peer(target.node_id, target.address))
    async with asyncio.timeout(10):
        while core.counters["bad_messages"] < before_msgs + len(rounds) or \
                host.counters["bad_blobs"] < before_blobs + len(blobs):
            await asyncio.sleep(0.01)
    assert core.counters["bad_messages"] == before_msgs + len(rounds)
    assert host.counters["bad_blobs"] == before_blobs + len(blobs)
    assert core.last_error is not None and "JobRound" in core.last_error
    assert sum("bad job message from 127.0.0.253:" in r.getMessage() for r in caplog.records) == len(rounds)
    warned = [r.getMessage() for r in caplog.records if "bad job blob from 127.0.0.253:" in r.getMessage()]
    assert len(warned) == len(blobs), warned
    for (why, _), line in zip(blobs, warned, strict=True):  # one connection: in the order sent
        assert why in line, f"refused for the wrong reason: want {why!r}, logged {line!r}"
    assert core.jobs == {} and host.hosted == {}
    code, _ = await get_json(target.control_address, "/status", 3.0)
    assert code == 200


# -------------------------------------------------------------------- 6: a sample of trainers per round


@pytest.mark.timeout(120)
async def test_nodes_per_round_samples_trainers_and_the_rest_relay(clusters, log_tail) -> None:
    """``nodes_per_round=3`` on 5 daemons, 8 rounds: every round counts exactly 3 updates over 5 members,
    no round needed a repair (nobody waited for a non-trainer), 3 x 8 trainings in all, more than 3
    nodes sampled over the rounds, and the last round's model is exactly its 3 trainers' average."""
    rounds = 8
    cluster = clusters(5, extra_env=ENV)
    job = f"sample-{SEED}"
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 20) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[1], job_id=job, task=PROBE, rounds=rounds, nodes_per_round=3)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    view = await wait_done(coord, job, 60.0, context)
    hist = view["history"]
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    for h in hist:
        assert h["members"] == 5 and h["updates"] == 3, f"{tag}: {h}"
        assert h["repair_requests"] == 0 and h["missing_ranges"] == 0, f"{tag}: round waited on a gap: {h}"

    async def settled() -> dict[int, dict[str, Any]] | None:
        vs = await views(cluster.nodes, job)
        return vs if all(v is not None and v["status"] == "done" for v in vs.values()) else None  # type: ignore[return-value]

    vs = await poll(settled, 10.0, "the final notice at every node", context)
    trained = {i: v["rounds_trained"] for i, v in vs.items()}
    print(f"{tag}: rounds trained per node {sorted(trained.values())}")
    assert sum(trained.values()) == 3 * rounds, f"{tag}: {trained}"
    assert sum(1 for t in trained.values() if t) > 3, f"{tag}: the sample never changed: {trained}"
    last = [i for i, v in vs.items() if v["trainer"]]
    assert len(last) == 3, f"{tag}: the last round's trainers {last}"
    want = fedavg(sum(vs[i]["rank"] % vs[i]["parts"] + 1 for i in last), 3)
    await final_models(cluster.nodes, job, rounds, context)
    for x in cluster.nodes:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["version"] == rounds, f"{tag}: node{x.index}: {meta}"
        assert probe_value(tensors, f"node{x.index}") == want, f"{tag}: node{x.index}: want {want}"


# -------------------------------------------------------------------- 7: digits reaches 95 %


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_digits_reaches_95_percent_on_8_daemons(clusters, log_tail) -> None:
    import torch

    n, rounds = 8, 15
    job = f"digits-{SEED}"
    cluster = clusters(n, extra_env=ENV)
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    t0 = time.monotonic()
    submitted = cli_submit(cluster.nodes[SEED % n], task="digits", job_id=job, job_seed=SEED % 1000)
    assert submitted["rounds"] == rounds, f"{tag}: the task's default rounds: {submitted}"
    coord = by_id(cluster, submitted["coordinator"]["id"])
    view = await wait_done(coord, job, 200.0, context)
    hist = view["history"]
    print(f"{tag}: done in {time.monotonic() - t0:.1f}s; accuracy by round "
          + " ".join(f"{h['test_accuracy']:.3f}" for h in hist) + f"; seconds {[h['seconds'] for h in hist]}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    for h in hist:
        assert h["updates"] == h["members"] == n and h["attempt"] == 0, f"{tag}: round {h['round']}: {h}"
    assert hist[-1]["test_accuracy"] >= 0.95, f"{tag}: final accuracy {hist[-1]['test_accuracy']}\n{context()}"

    await final_models(cluster.nodes, job, rounds, context)
    ref, _ = checkpoint(coord, job)  # type: ignore[misc]
    for x in cluster.nodes:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta["job"] == job and meta["version"] == rounds and meta["parts"] == n, f"{tag}: {meta}"
        assert tensors.keys() == ref.keys()
        different = [k for k in ref if not torch.equal(tensors[k], ref[k])]
        assert not different, f"{tag}: node{x.index} differs from the coordinator in {different}"
