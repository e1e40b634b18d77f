"""Federated jobs between real ``mlfabric node`` processes (local preset, loopback, port 0).

- an aggregator SIGKILLed mid-round: every survivor's model equals exactly the FedAvg of the updates
  the coordinator's history says were counted, shard by shard, with the probe task (update = roster
  index + 1, weight 1), and the dead node leaves the next round;
- the digits job reaches 95 % test accuracy with 8 nodes, every node counted in every round and every
  node holding the coordinator's model at the end;
- a cluster stopped mid-job and started again on the same data dirs resumes from the last completed
  round;
- garbage job messages (a RoundStart whose spec is not a JobSpec, ``agg`` blobs whose meta header is
  random bytes) are logged, counted where a counter exists, and the node keeps serving.

Jobs are submitted through the real CLI (``mlfabric job submit``) or the control API's ``/job/submit``
(the CLI has no ``--shard-bytes``); results are read from ``/jobs`` and from each node's checkpoint.
Seeds come from ``MLFABRIC_TEST_SEED`` (default below); the seed and the cluster's workdir (node logs
in ``workdir/node<i>/log``) are in every failure message, with the tails of the relevant logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from mlfabric.config import load_settings
from mlfabric.core.placement import Mesh, shard_key
from mlfabric.core.ring import ring_id
from mlfabric.runtime.cluster import Cluster, ClusterNode, cluster_down, cluster_up, fetch_statuses, ring_report
from mlfabric.runtime.control import ControlError, get_json
from mlfabric.runtime.demo import TRAINING_ENV
from mlfabric.runtime.transport import Transport
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.messages import Peer, RoundStart

pytestmark = pytest.mark.net

SEED = int(os.environ.get("MLFABRIC_TEST_SEED", "2024"))
PROBE = "mlfabric.learn.probe:IndexTask"
PROBE_SIZE = 4096  # IndexTask's vector: 16 KiB of float32
# MLFABRIC_PROBE_DELAY for the kill test: the window in which the victim dies. A victim killed while it
# trains must be declared dead before the round ends (so it is left out of the next one): local preset,
# worst case near_interval + probe_timeout + suspicion_timeout = 1.05 s, plus slack for a loaded machine.
DELAY = 2.0


# -------------------------------------------------------------------- helpers


def log_tail(node: ClusterNode, lines: int = 15) -> str:
    try:
        text = Path(node.log).read_text(errors="replace").splitlines()
    except OSError:
        return f"[node{node.index}: no log]"
    return f"--- node{node.index} {node.id:016x} log tail ({node.log}) ---\n" + "\n".join(text[-lines:])


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


async def ring_converged(nodes: list[ClusterNode], context: Callable[[], str], bound: float = 20.0) -> None:
    async def check() -> bool:
        report = ring_report(await fetch_statuses([n.control for n in nodes], timeout=2), 8)
        return bool(report["converged"])

    await poll(check, bound, f"ideal ring of {len(nodes)}", context, interval=0.1)


def cli_submit(node: ClusterNode, **params: Any) -> dict[str, Any]:
    """``mlfabric job submit ... --node CONTROL --json``, the way a user runs it."""
    argv = [sys.executable, "-m", "mlfabric", "job", "submit", "--node", node.control, "--json"]
    for key, value in params.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"job submit failed ({done.returncode}): {done.stdout} {done.stderr}"
    return json.loads(done.stdout)


async def api_submit(node: ClusterNode, **params: Any) -> dict[str, Any]:
    code, body = await get_json(node.control, f"/job/submit?{urlencode(params)}", 15.0)
    assert code == 200, f"/job/submit answered {code}: {body}"
    return body


def by_id(cluster: Cluster, node_id: int) -> ClusterNode:
    return next(n for n in cluster.nodes if n.id == node_id)


async def wait_done(coord: ClusterNode, job: str, bound: float, context: Callable[[], str]) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await job_view(coord, job)
        return view if view is not None and view.get("status") == "done" else None

    return await poll(check, bound, f"job {job} done at its coordinator", context, interval=0.1)


def checkpoint(node: ClusterNode, job: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    from mlfabric.learn.checkpoint import CheckpointError, load_checkpoint

    path = Path(node.data_dir) / "jobs" / job / "model.ckpt"
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        return None


def stop_all(cluster: Cluster) -> None:
    cluster.stop(timeout=5)
    for proc in list(cluster.procs.values()):  # killed but not reaped (a failed test)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    cluster.procs.clear()


@pytest.fixture
def clusters(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``up(n, name=..., extra_args=[...])``: a local-preset cluster (cluster_up); every cluster made is
    stopped at teardown, whatever happened (SIGTERM, then SIGKILL after 5 s)."""
    made: list[Cluster] = []

    def up(n: int, name: str = "cluster", extra_args: list[str] | None = None) -> Cluster:
        # The settings the demo gives training nodes (torch preloaded, failure timeouts that tolerate the
        # CPU bursts of eight daemons training on two cores): see mlfabric/runtime/demo.py.
        cluster = cluster_up(tmp_path / name, n, preset="local", extra_args=extra_args, extra_env=TRAINING_ENV)
        made.append(cluster)
        return cluster

    yield up
    for cluster in made:
        stop_all(cluster)


# -------------------------------------------------------------------- 1: exact sum under SIGKILL


def probe_plan(shard_bytes: int) -> list[Any]:
    from mlfabric.learn.probe import ProbeModel
    from mlfabric.learn.shards import plan_shards

    return plan_shards(ProbeModel(PROBE_SIZE).state_dict(), shard_bytes)


def check_probe_round(values: dict[int, Any], entry: dict[str, Any], plan: list[Any], roster: list[int],
                      members: set[int], must: set[int]) -> list[str]:
    """Problems with one round of the probe job: for every shard s and every node's model, the shard
    is constant and equals fl32(sum_{c in C_s} (index(c) + 1)) / |C_s|, the division FedAvg does, where
    C_s is the history's contributor list; C_s has no repeats, holds every id in ``must`` and only ids
    of ``members``."""
    import torch

    from mlfabric.learn.shards import flatten_shard

    problems = []
    if len(entry.get("contributors", [])) != len(plan):
        return [f"round {entry['round']}: history has {len(entry.get('contributors', []))} contributor lists "
                f"for {len(plan)} shards"]
    for s, spec in enumerate(plan):
        hexes = entry["contributors"][s]
        ids = [int(h, 16) for h in hexes]
        if len(ids) != len(set(ids)):
            problems.append(f"round {entry['round']} shard {s}: an id counted twice: {hexes}")
        if not must <= set(ids):
            problems.append(f"round {entry['round']} shard {s}: live {sorted(f'{m:016x}' for m in must - set(ids))}"
                            f" not counted")
        if not set(ids) <= members:
            problems.append(f"round {entry['round']} shard {s}: non-members counted: {hexes}")
        total = sum(roster.index(c) + 1 for c in set(ids))
        want = torch.full((1,), float(total), dtype=torch.float32) / float(len(set(ids)) or 1)
        for node_id, vec in sorted(values.items()):
            shard = flatten_shard({"value": vec}, spec)
            if not bool(torch.all(shard == shard[0])):
                problems.append(f"round {entry['round']} shard {s} at {node_id:016x}: not constant "
                                f"(min {shard.min().item()} max {shard.max().item()})")
            elif shard[0].item() != want[0].item():
                problems.append(f"round {entry['round']} shard {s} at {node_id:016x}: value {shard[0].item()!r}"
                                f" * {len(ids)} = {shard[0].item() * len(ids)!r}, contributors' sum {total} "
                                f"(want {want[0].item()!r})")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("moment", ["training", "trained"])
async def test_exact_sum_when_an_aggregator_is_killed_mid_round(clusters, monkeypatch, moment: str) -> None:
    """8 probe daemons, 8 shards (several roots), k=2; a non-coordinator inner node of round 0's meshes
    is SIGKILLed either while it trains (``training``: it is never counted) or right after its own
    training ended (``trained``: its update may be in flight up the mesh, counted or not, never twice).
    Both rounds' results are checked exactly on every survivor's checkpoint (round 0's snapshot taken
    while round 1 trains)."""
    monkeypatch.setenv("MLFABRIC_PROBE_DELAY", str(DELAY))  # the daemons inherit it
    n, shard_bytes, parents, replicas = 8, 2048, 2, 2
    rng = random.Random(f"{SEED}-{moment}")
    job = f"probe-kill-{moment}-{SEED}"
    plan = probe_plan(shard_bytes)  # imports torch here now: seconds on a loaded machine, not mid-round
    assert len(plan) == PROBE_SIZE * 4 // shard_bytes
    cluster = clusters(n, extra_args=["--log-level", "debug"])
    tag = f"seed={SEED} moment={moment} job={job} workdir={cluster.workdir}"
    print(tag)
    watch: list[ClusterNode] = []

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 25) for x in watch)

    await ring_converged(cluster.nodes, context)
    t0 = time.monotonic()
    submitted = await api_submit(cluster.nodes[rng.randrange(n)], job_id=job, task=PROBE, rounds=2,
                                 shard_bytes=shard_bytes, parents=parents, replicas=replicas, seed=SEED)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    watch.append(coord)

    async def round0_members() -> list[int] | None:
        view = await job_view(coord, job)
        if view is None or view.get("current_round") != 0:
            return None
        return [int(h, 16) for h in view["round_members"]]

    members = await poll(round0_members, 20.0, "round 0 started at the coordinator", context)
    assert len(members) == n, f"{tag}: round 0 has {len(members)} members, not {n}"
    roster = sorted(members)  # the coordinator's roster: sorted member ids at job start
    meshes = [Mesh.build(shard_key(job, s), members, k=parents, replicas=replicas, salt=0 * 1_000_003 + s)
              for s in range(len(plan))]
    inner = sorted({m.order[p] for m in meshes for p, kids in enumerate(m.children) if kids} - {coord.id})
    assert inner, f"{tag}: no inner node other than the coordinator"
    victim = by_id(cluster, rng.choice(inner))
    watch.append(victim)
    roles = [f"s{s}:{'root' if m.order[0] == victim.id else 'inner'}({len(m.children[m.index[victim.id]])} kids)"
             for s, m in enumerate(meshes) if m.children[m.index[victim.id]]]
    tag += (f" coordinator=node{coord.index}:{coord.id:016x} victim=node{victim.index}:{victim.id:016x} "
            f"(roster index {roster.index(victim.id)}, {' '.join(roles)})")
    print(tag)

    # The victim dies inside round 0: while it trains, or the moment its training has ended.
    async def victim_in_round0() -> bool:
        view = await job_view(victim, job)
        return view is not None and view.get("current_round") == 0

    await poll(victim_in_round0, 20.0, "round 0 started at the victim", context, interval=0.02)
    if moment == "training":
        await asyncio.sleep(0.1)
    else:
        needle = f"job {job} round 0: trained on"

        async def trained() -> bool:
            return bool(log_lines(victim, needle))

        await poll(trained, DELAY + 10.0, "the victim's training ended", context, interval=0.005)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    proc = cluster.procs.pop(victim.pid, None)
    if proc is not None:
        proc.wait(timeout=10)
    cluster.nodes = [x for x in cluster.nodes if x.pid != victim.pid]  # never signal a reused pid
    survivors = list(cluster.nodes)

    # Snapshot round 0's result at every survivor (checkpoint version 1) while round 1 trains, until done.
    snapshots: dict[int, Any] = {}
    finals: dict[int, Any] = {}

    async def finished() -> dict[str, Any] | None:
        for x in survivors:
            if x.id not in snapshots and (got := checkpoint(x, job)) is not None and got[1]["version"] == 1:
                snapshots[x.id] = got[0]["value"].clone()
        view = await job_view(coord, job)
        return view if view is not None and view.get("status") == "done" else None

    view = await poll(finished, 60.0, f"job {job} done", context, interval=0.05)
    elapsed, after_kill = time.monotonic() - t0, time.monotonic() - killed_at
    for x in survivors:
        got = checkpoint(x, job)
        assert got is not None and got[1] == {"job": job, "version": 2}, f"{tag}: node{x.index}: {got and got[1]}\n{context()}"
        finals[x.id] = got[0]["value"]
    hist = view["history"]
    print(f"{tag}: done {elapsed:.2f}s after submit, {after_kill:.2f}s after the kill; rounds: "
          + "; ".join(f"r{h['round']} {h['participants']}/{h['members']} in {h['seconds']}s" for h in hist)
          + f"; failures: {view['failures']}")
    missed = [f"node{x.index}" for x in survivors if x.id not in snapshots]
    relayed = [ln for x in survivors for ln in log_lines(x, f"job {job} round 1: our model is at version")]
    assert not missed, (f"{tag}: round 0's model (checkpoint version 1) never held by {missed}; nodes that "
                        f"sat round 1 out: {relayed}\n{context()}")

    assert [h["round"] for h in hist] == [0, 1], f"{tag}: {hist}"
    live = {x.id for x in survivors}
    assert hist[0]["members"] == n, f"{tag}: {hist}"
    if moment == "training":  # declared dead well before round 0 ended: left out of round 1
        assert hist[1]["members"] == n - 1, f"{tag}: the dead victim is a member of round 1: {hist[1]}"
    # ("trained": it died as round 0 ended, so round 1 may still name it; it must not be counted there)
    problems = check_probe_round(snapshots, hist[0], plan, roster, set(members), live)
    problems += check_probe_round(finals, hist[1], plan, roster, live, live)
    counted = sum(victim.id in {int(h, 16) for h in c} for c in hist[0]["contributors"])
    print(f"{tag}: victim counted in {counted} of {len(plan)} round-0 shards")
    if moment == "training":  # it died before its update existed
        assert counted == 0, f"{tag}: the victim was counted in round 0 though it died while training"
    failed = [f for f in view["failures"] if f["node"] == f"{victim.id:016x}"]
    assert failed, f"{tag}: the victim is not in failures {view['failures']}"
    # the round it died in: 0 (while training), or 0/1 when it died as round 0 ended
    assert failed[0]["round"] in ((0,) if moment == "training" else (0, 1)), f"{tag}: failures {view['failures']}"
    assert not problems, f"{tag}:\n" + "\n".join(problems) + "\n" + context()


# -------------------------------------------------------------------- 2: digits reaches 95 %


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_digits_reaches_95_percent_on_8_daemons(clusters, monkeypatch) -> None:
    import torch

    monkeypatch.delenv("MLFABRIC_PROBE_DELAY", raising=False)
    n, rounds = 8, 15  # DigitsTask.default_rounds; JobSpec's own default is 20, so it is passed explicitly
    job = f"digits-{SEED}"
    cluster = clusters(n)
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"
    print(tag)
    watch: list[ClusterNode] = []

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x) for x in watch)

    await ring_converged(cluster.nodes, context)
    t0 = time.monotonic()
    submitted = cli_submit(cluster.nodes[SEED % n], task="digits", rounds=rounds, job_id=job, job_seed=SEED % 1000)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    watch.append(coord)
    view = await wait_done(coord, job, 200.0, context)
    elapsed = time.monotonic() - t0
    hist = view["history"]
    print(f"{tag}: done in {elapsed:.1f}s; accuracy by round "
          + " ".join(f"{h['test_accuracy']:.3f}" for h in hist)
          + f"; seconds by round {[h['seconds'] for h in hist]}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    everyone = sorted(f"{x.id:016x}" for x in cluster.nodes)
    for h in hist:
        assert h["members"] == n and h["participants"] == n, f"{tag}: round {h['round']}: {h}"
        assert all(c == everyone for c in h["contributors"]), f"{tag}: round {h['round']}: {h['contributors']}"
    assert hist[-1]["test_accuracy"] >= 0.95, f"{tag}: final accuracy {hist[-1]['test_accuracy']}\n{context()}"
    assert view["failures"] == [], f"{tag}: {view['failures']}"

    # Every node holds the coordinator's model (all of its finals applied), exactly.
    async def all_at_version() -> bool:
        return all((got := checkpoint(x, job)) is not None and got[1]["version"] == rounds for x in cluster.nodes)

    await poll(all_at_version, 10.0, f"every checkpoint at version {rounds}", context)
    ref, _ = checkpoint(coord, job)  # type: ignore[misc]
    for x in cluster.nodes:
        tensors, meta = checkpoint(x, job)  # type: ignore[misc]
        assert meta == {"job": job, "version": rounds}, f"{tag}: node{x.index}: {meta}"
        assert tensors.keys() == ref.keys()
        different = [k for k in ref if not torch.equal(tensors[k], ref[k])]
        assert not different, f"{tag}: node{x.index} differs from the coordinator in {different}"


# -------------------------------------------------------------------- 3: restart resumes


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_restarted_cluster_resumes_the_job_from_its_last_round(clusters, monkeypatch) -> None:
    monkeypatch.delenv("MLFABRIC_PROBE_DELAY", raising=False)
    n, rounds, stop_after = 4, 6, 2  # stop once rounds 0 and 1 are recorded
    job = f"digits-restart-{SEED}"
    cluster = clusters(n, name="cluster")
    workdir = cluster.workdir
    tag = f"seed={SEED} job={job} workdir={workdir}"
    print(tag)
    watch: list[ClusterNode] = []

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 25) for x in watch)

    await ring_converged(cluster.nodes, context)
    ids_before = {x.index: x.id for x in cluster.nodes}
    submitted = cli_submit(cluster.nodes[0], task="digits", rounds=rounds, job_id=job, job_seed=SEED % 1000,
                           local_epochs=15)  # ~1.5 s rounds (2 epochs: 0.2 s), so the stop lands mid-job
    coord = by_id(cluster, submitted["coordinator"]["id"])
    watch.append(coord)

    async def enough() -> dict[str, Any] | None:
        view = await job_view(coord, job)
        return view if view is not None and len(view.get("history", [])) >= stop_after else None

    await poll(enough, 90.0, f"{stop_after} rounds recorded", context, interval=0.02)
    t_stop = time.monotonic()
    result = cluster_down(workdir, timeout=10.0)
    for proc in cluster.procs.values():  # cluster_down (a fresh Cluster) terminated them; reap ours
        proc.wait(timeout=10)
    cluster.procs.clear()
    stop_s = time.monotonic() - t_stop
    record = json.loads((Path(coord.data_dir) / "jobs" / job / "job.json").read_text())
    versions = {x.index: (checkpoint(x, job) or ({}, {"version": None}))[1]["version"] for x in cluster.nodes}
    print(f"{tag}: stopped ({result}) in {stop_s:.2f}s with next_round={record['next_round']} "
          f"status={record['status']}; checkpoint versions {versions}")
    assert record["status"] == "running", f"{tag}: the job ended before the stop ({record['status']}); " \
                                          f"slow the rounds down\n{context()}"
    recorded = record["history"]
    assert [h["round"] for h in recorded] == list(range(record["next_round"])), f"{tag}: {recorded}"
    for x in cluster.nodes:  # the first run's logs survive the restart (cluster_up truncates node<i>/log)
        Path(x.log).rename(Path(x.log).with_name("log.run1"))

    t_up = time.monotonic()
    again = clusters(n, name="cluster")  # the same workdir, node<i> dirs: same node.key, same ids
    assert {x.index: x.id for x in again.nodes} == ids_before, f"{tag}: ids changed on restart"
    coord2 = by_id(again, coord.id)
    watch[:] = [coord2]
    view = await wait_done(coord2, job, 120.0, context)
    resumed_s = time.monotonic() - t_up
    hist = view["history"]
    print(f"{tag}: done {resumed_s:.1f}s after the restart; rounds {[h['round'] for h in hist]} "
          f"accuracy {[h['test_accuracy'] for h in hist]}")
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: rounds {[h['round'] for h in hist]}"
    assert hist[: len(recorded)] == recorded, f"{tag}: the recorded rounds were rewritten"
    resumes = log_lines(coord2, f"job {job}: round {record['next_round']} starts")
    assert resumes, f"{tag}: the coordinator never started round {record['next_round']} after the restart"
    assert not log_lines(coord2, f"job {job}: round 0 starts"), f"{tag}: round 0 started again after the restart"
    last = {int(h, 16) for c in hist[-1]["contributors"] for h in c}
    for x in again.nodes:
        if x.id in last:
            got = checkpoint(x, job)
            assert got is not None and got[1]["version"] == rounds, f"{tag}: node{x.index}: {got and got[1]}"

    # Every node reloaded its checkpoint: a node at the recorded round trains in the first resumed round
    # (one already past it only relays), and every node trains in the rounds after it.
    first = next(h for h in hist if h["round"] == record["next_round"])
    at_round = {x.id for x in again.nodes if versions[x.index] == record["next_round"]}
    missing_ids = set()
    for h in hist[len(recorded):]:
        want = at_round if h is first else {x.id for x in again.nodes}
        missing_ids |= want - {int(i, 16) for c in h["contributors"] for i in c}
    if missing_ids:
        # Known bug (reported): the restarted coordinator announces the job as soon as it has joined the
        # ring; a node that joins the ring after the announce went round misses it and is sent the
        # RoundStart at its address from before the restart (job.json), so it sits the job out and the
        # round waits initial_wait for it. Recognised by that stale address in the coordinator's record.
        final = json.loads((Path(coord2.data_dir) / "jobs" / job / "job.json").read_text())
        now_at = {x.id: x.address for x in again.nodes}
        stale = {m for m in missing_ids if final["members"].get(str(m)) != now_at[m]}
        detail = (f"{tag}: nodes {sorted(f'{m:016x}' for m in missing_ids)} not counted after the restart; "
                  f"coordinator's members {final['members']}, addresses now {now_at}; rounds "
                  f"{[(h['round'], h['participants'], h['members'], h['seconds']) for h in hist]}")
        print(detail)
        if stale == missing_ids:
            pytest.xfail("known bug: resumed job announced before the restarted ring was whole; nodes that "
                         "missed the announce were sent RoundStart at their old address: " + detail)
        pytest.fail(detail)


# -------------------------------------------------------------------- 4: garbage job input


async def attacker_transport() -> Transport:
    cfg = load_settings(preset="local").transport
    transport = Transport(cfg, None)
    port = await transport.bind("127.0.0.253", 0)
    me = Peer(ring_id("job-garbage-sender"), f"127.0.0.253:{port}")
    await transport.start(me, lambda src, msg: None, lambda address: None)
    return transport


def garbage_specs() -> list[str]:
    rng = random.Random(SEED)
    return [
        '{"job_id": "x", "rounds": ',  # truncated JSON
        "not json at all",
        json.dumps({"job_id": "x", "rounds": -3}),  # JSON, but not a valid JobSpec
        json.dumps({"job_id": "x", "surprise": 1}),  # extra field (JobSpec forbids them)
        "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(300)),
    ]


def garbage_metas() -> list[bytes]:
    import msgpack

    rng = random.Random(SEED + 1)
    metas = [rng.randbytes(rng.randrange(1, 200)) for _ in range(12)]
    metas += [
        msgpack.packb({"job": "x"}),  # a map, not the 7-list
        msgpack.packb(["x", 0, 0, 0, b"\x01", 1]),  # 6 fields
        msgpack.packb(["x", -1, 0, 0, b"\x01", 1, False]),  # negative round
        msgpack.packb(["x", 0, 0, 0, "bitmap", 1, False]),  # bitmap as str
        msgpack.packb(["x", 0, 0, 0, b"\x01", 1, False]) + b"\x00",  # trailing bytes
    ]
    return metas


@pytest.mark.timeout(90)
async def test_garbage_job_messages_are_dropped_and_the_node_keeps_serving(clusters, monkeypatch) -> None:
    monkeypatch.delenv("MLFABRIC_PROBE_DELAY", raising=False)
    cluster = clusters(2)
    target = cluster.nodes[1]
    tag = f"seed={SEED} workdir={cluster.workdir} target=node1:{target.id:016x}"
    print(tag)

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(x, 25) for x in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    specs, metas = garbage_specs(), garbage_metas()
    attacker = await attacker_transport()
    try:
        members = (Peer(target.id, target.address), attacker.me)
        for spec in specs:
            attacker.send_nowait(target.address, RoundStart("x", spec, 0, members, b"\x03", (target.id,)))
        assert await attacker.drain(5.0), f"{tag}: RoundStarts not sent"
        data = bytes(16)
        for meta in metas:
            async with asyncio.timeout(10):
                await attacker.bulk.send(target.address, "agg", TensorBlob("float32", (4,), data, meta), timeout=10)
    finally:
        await attacker.close()

    async def warned() -> tuple[int, int] | None:
        got = (len(log_lines(target, "bad RoundStart from")), len(log_lines(target, "bad job blob from")))
        return got if got == (len(specs), len(metas)) else None

    await poll(warned, 10.0, f"{len(specs)} RoundStart and {len(metas)} blob warnings", context)
    attacker_address = attacker.me.address  # type: ignore[union-attr]
    assert all(attacker_address.rsplit(":", 1)[0] in ln for ln in log_lines(target, "bad job blob from"))
    code, status = await get_json(target.control, "/status", 3.0)
    assert code == 200 and status["joined"], f"{tag}: /status {code}"
    assert status["jobs"]["bad_messages"] == len(specs), f"{tag}: {status['jobs']}"
    assert status["jobs"]["bad_blobs"] == len(metas), f"{tag}: {status['jobs']}"

    # The node still does its job: a probe job submitted to it completes, both nodes counted.
    job = f"after-garbage-{SEED}"
    submitted = await api_submit(target, job_id=job, task=PROBE, rounds=1, shard_bytes=8192)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    view = await wait_done(coord, job, 30.0, context)
    assert view["history"][0]["participants"] == 2, f"{tag}: {view['history']}"
    assert all(proc.poll() is None for proc in cluster.procs.values()), f"{tag}: a node exited\n{context()}"


async def test_garbage_job_blobs_are_counted(daemon_factory, caplog) -> None:
    """The same garbage against an in-process daemon, whose JobService.counters the test can read:
    every bad ``agg`` blob adds one to ``bad_blobs``; a garbage RoundStart is logged (no counter)."""
    target = await daemon_factory()
    caplog.set_level(logging.WARNING, logger="mlfabric.jobs")
    assert target.jobs is not None
    before = dict(target.jobs.counters)
    specs, metas = garbage_specs(), garbage_metas()
    attacker = await attacker_transport()
    try:
        members = (Peer(target.node_id, target.address), attacker.me)
        for spec in specs:
            attacker.send_nowait(target.address, RoundStart("x", spec, 0, members, b"\x03", (target.node_id,)))
        assert await attacker.drain(5.0)
        for meta in metas:
            async with asyncio.timeout(10):
                await attacker.bulk.send(target.address, "agg", TensorBlob("float32", (4,), bytes(16), meta))
        async with asyncio.timeout(5):
            while target.jobs.counters["bad_blobs"] < before["bad_blobs"] + len(metas) or \
                    sum("bad RoundStart" in r.getMessage() for r in caplog.records) < len(specs):
                await asyncio.sleep(0.01)
    finally:
        await attacker.close()
    assert target.jobs.counters["bad_blobs"] == before["bad_blobs"] + len(metas)
    assert sum("bad RoundStart" in r.getMessage() for r in caplog.records) == len(specs)
    assert target.jobs.jobs == {} and target.jobs.rounds == {}
    code, _ = await get_json(target.control_address, "/status", 3.0)
    assert code == 200


# -------------------------------------------------------------------- 6: the coordinator goes away


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_job_survives_the_loss_of_its_coordinator(clusters, monkeypatch, how: str) -> None:
    """5 daemons run a probe job; after round 1 the coordinator is killed (crash) or stopped (graceful
    leave, which hands the job over). The member that now owns the job key takes over from its copy of
    the record, and the job ends with every round recorded exactly once."""
    monkeypatch.setenv("MLFABRIC_PROBE_DELAY", "0.4")
    cluster = clusters(5)
    job, rounds = f"coord-{how.lower()}-{SEED}", 8
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(f"--- node{n.index}\n{log_tail(n)}" for n in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[0], job_id=job, task=PROBE, rounds=rounds, shard_bytes=4096)
    coord = by_id(cluster, submitted["coordinator"]["id"])

    async def two_rounds() -> bool:
        view = await job_view(coord, job)
        return view is not None and len(view.get("history", [])) >= 2

    await poll(two_rounds, 60.0, "two rounds recorded", context)
    os.kill(coord.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    survivors = [n for n in cluster.nodes if n is not coord]

    async def done_somewhere() -> dict[str, Any] | None:
        for n in survivors:
            view = await job_view(n, job)
            if view is not None and view.get("role") == "coordinator" and view.get("status") == "done":
                return view
        return None

    view = await poll(done_somewhere, 90.0, "the job done at a new coordinator", context, interval=0.2)
    hist = view["history"]
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    assert any(f["node"] == f"{coord.id:016x}" for f in view["failures"]), f"{tag}: {view['failures']}"
    assert all(h["members"] in (0, 4) or h["round"] <= 2 for h in hist), f"{tag}: {hist}"
    assert hist[-1]["participants"] == 4, f"{tag}: the last round counts the 4 survivors: {hist[-1]}"


# -------------------------------------------------------------------- 7: a sample of trainers per round


async def test_nodes_per_round_samples_trainers_and_the_rest_relay(clusters, monkeypatch) -> None:
    """``--nodes-per-round 3`` on 5 daemons: every round counts exactly 3 updates (the sampled
    trainers), the sample changes between rounds, the others relay without being waited for, and the
    probe sums stay exact."""
    cluster = clusters(5)
    job, rounds = f"sample-{SEED}", 4
    tag = f"seed={SEED} job={job} workdir={cluster.workdir}"

    def context() -> str:
        return tag + "\n" + "\n".join(f"--- node{n.index}\n{log_tail(n)}" for n in cluster.nodes)

    await ring_converged(cluster.nodes, context)
    submitted = await api_submit(cluster.nodes[1], job_id=job, task=PROBE, rounds=rounds, shard_bytes=4096,
                                 nodes_per_round=3)
    coord = by_id(cluster, submitted["coordinator"]["id"])
    view = await wait_done(coord, job, 60.0, context)
    hist = view["history"]
    assert [h["round"] for h in hist] == list(range(rounds)), f"{tag}: {hist}"
    samples = []
    for h in hist:
        assert h["members"] == 5 and h["participants"] == 3, f"{tag}: {h}"
        sets = {tuple(c) for c in h["contributors"]}
        assert len(sets) == 1, f"{tag}: every shard counts the same 3 trainers: {h['contributors']}"
        samples.append(sets.pop())
        assert h["seconds"] < 5.0, f"{tag}: round {h['round']} waited for non-trainers: {h['seconds']} s"
    assert len(set(samples)) > 1, f"{tag}: the sample should change between rounds: {samples}"
    # The last round's model: every shard is the mean of (roster index + 1) over its 3 trainers.
    roster = sorted(int(x, 16) for x in view["member_ids"])
    import torch

    expected = torch.tensor(sum(roster.index(int(x, 16)) + 1 for x in samples[-1]), dtype=torch.float32) / 3
    for node in cluster.nodes:
        got = checkpoint(node, job)
        assert got is not None, f"{tag}: node{node.index} has no checkpoint"
        tensors, meta = got
        assert meta["version"] == rounds and torch.all(tensors["value"] == expected), f"{tag}: node{node.index}"
