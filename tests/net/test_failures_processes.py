"""Failure detection between real daemon processes (local preset): kill -9, restart, SIGSTOP stalls, counters.

Every bound below is derived from the configuration the daemons run with (``load_settings(preset="local")``,
which also sees any ``MLFABRIC_…`` environment the daemons inherit) plus a stated slack for this 2-core CI
machine; the measured times are printed. Victims are chosen with a seeded ``random.Random``
(``MLFABRIC_TEST_SEED`` overrides the seed); the seed, the node indices and the ids are in every failure
message, with the tail of the affected nodes' logs. Nodes are started the way ``cluster_up`` starts them
(own loopback address, port 0, own session); every process is stopped (SIGCONT, SIGTERM, SIGKILL) when a
test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mlfabric.config import load_settings
from mlfabric.runtime.cluster import (
    READY_RE,
    Cluster,
    ClusterNode,
    check_lookups,
    fetch_statuses,
    node_command,
    ring_report,
)

pytestmark = pytest.mark.net

SEED = int(os.environ.get("MLFABRIC_TEST_SEED", "1729"))
SETTINGS = load_settings(preset="local")
FAIL, OVERLAY = SETTINGS.failure, SETTINGS.overlay
R = OVERLAY.successors

# Crash (or stall) to declaration by the predecessor, worst case (FailureConfig's docstring): the next
# near probe is up to near_interval away, then probe_timeout for the direct ack, then suspicion_timeout
# for the indirect probes. On loopback a killed peer refuses the connection, which skips probe_timeout,
# so this is an over-estimate for kills and exact for a stopped process (whose kernel still accepts).
DETECT = FAIL.near_interval + FAIL.probe_timeout + FAIL.suspicion_timeout
# Slack for everything after the declaration (notices hop by hop, notice_timeout around a dead hop,
# stabilize rounds refilling successor lists, fix_fingers), for the polling itself, and for timers
# firing late on a loaded 2-core machine. Measured repairs (see the tests) need well under half of it.
SLACK = 2.0


# -------------------------------------------------------------------- helpers


def routing_entries(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Every peer a status names in its routing state: predecessor, successor list, fingers."""
    return [p for p in (status["predecessor"], *status["successors"], *status["fingers"]) if p]


def routing_ids(status: dict[str, Any]) -> set[int]:
    return {p["id"] for p in routing_entries(status)}


def counter_sum(statuses: list[dict[str, Any] | None], name: str) -> int:
    return sum(s["counters"][name] for s in statuses if s is not None)


async def ring_state(
    nodes: list[ClusterNode], dead: frozenset[int] | set[int] = frozenset()
) -> tuple[bool, dict[str, Any]]:
    """(ideal ring over ``nodes``, no routing entry names an id in ``dead`` and every entry naming a
    member carries its current address (a restarted node listens on a new port), a report)."""
    statuses = await fetch_statuses([n.control for n in nodes], timeout=2)
    report = ring_report(statuses, R)
    where = {n.id: n.address for n in nodes}
    stale: dict[str, list[str]] = {}
    for s in statuses:
        if s is None:
            continue
        bad = {
            f"{p['id']:016x}@{p['address']}"
            for p in routing_entries(s)
            if p["id"] in dead or (p["id"] in where and p["address"] != where[p["id"]])
        }
        if bad:
            stale[f"{s['id']:016x}"] = sorted(bad)
    report["stale_entries"] = stale
    report["statuses"] = statuses
    return report["converged"] and not stale, report


class FirstTime:
    """Wraps a ring_state check and remembers when every node first had the true successor and
    predecessor (the rest of the report, successor lists and fingers, may still lag)."""

    def __init__(self, check: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]], since: float) -> None:
        self.check, self.since, self.neighbours_at = check, since, None

    async def __call__(self) -> tuple[bool, dict[str, Any]]:
        done, report = await self.check()
        full = report["answered"] == report["nodes"] == report["successor"] == report["predecessor"]
        if self.neighbours_at is None and full:
            self.neighbours_at = time.monotonic() - self.since
        return done, report


def brief(detail: Any) -> Any:
    """A report without its statuses (too long for a failure message); any other detail as it is."""
    return {k: v for k, v in detail.items() if k != "statuses"} if isinstance(detail, dict) else detail


def kill_and_reap(cluster: Cluster, node: ClusterNode) -> None:
    os.kill(node.pid, signal.SIGKILL)
    proc = cluster.procs.pop(node.pid, None)
    if proc is not None:
        proc.wait(timeout=10)
    cluster.nodes = [n for n in cluster.nodes if n.pid != node.pid]  # its pid may be reused: never signal it


def restart(
    cluster: Cluster, node: ClusterNode, seed_address: str, timeout: float, context: Callable[[], str]
) -> ClusterNode:
    """Start ``node`` again with its data dir, exactly as cluster_up does (node_command: its loopback
    host, port 0, own session, log appended), through ``seed_address``; wait for its ready line
    (failing with ``context()``)."""
    log = Path(node.log)
    offset = log.stat().st_size
    cmd = node_command(node.index, Path(node.data_dir), cluster.preset, seed_address, [])
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True
        )
    cluster.procs[proc.pid] = proc
    fresh = ClusterNode(node.index, "", "", proc.pid, node.id, node.data_dir, node.log)
    cluster.nodes.append(fresh)  # stop() covers it
    deadline = time.monotonic() + timeout
    while (m := READY_RE.search(log.read_bytes()[offset:])) is None:
        assert proc.poll() is None, f"restarted node{node.index} exited {proc.returncode}\n{context()}"
        assert time.monotonic() < deadline, f"restarted node{node.index} not ready in {timeout}s\n{context()}"
        time.sleep(0.02)
    fresh.id, fresh.address, fresh.control = int(m.group(1), 16), m.group(2).decode(), m.group(3).decode()
    return fresh


def ring_order_runs(all_ids: list[int], dead: set[int]) -> int:
    """The longest run of consecutive dead ids in ring order (each waits for the previous declaration)."""
    ring = sorted(all_ids)
    start = next(i for i, x in enumerate(ring) if x not in dead)  # some node survives
    longest = run = 0
    for k in range(1, len(ring) + 1):
        if ring[(start + k) % len(ring)] in dead:
            run += 1
            longest = max(longest, run)
        else:
            run = 0
    return longest


# -------------------------------------------------------------------- kill -9 six of 24, restart two


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_kill_six_of_24_repairs_within_bound_and_two_restarted_rejoin(clusters, poll, log_tail) -> None:
    n, n_kill, n_back = 24, 6, 2
    cluster = clusters(n)
    nodes = list(cluster.nodes)
    ids = [x.id for x in nodes]
    rng = random.Random(SEED)
    victims = sorted(rng.sample(range(n), n_kill))
    back = sorted(rng.sample(victims, n_back))
    tag = (
        f"seed={SEED} victims={victims} ids={[f'{nodes[i].id:016x}' for i in victims]} restarted={back}"
        f" workdir={cluster.workdir}"
    )
    print(tag)

    def context() -> str:
        return tag + "\n" + "\n".join(log_tail(nodes[i]) for i in victims)

    await poll(lambda: ring_state(nodes), 20.0, "initial ideal ring of 24", context, show=brief)
    # -- kill six at once
    dead = {nodes[i].id for i in victims}
    live = [x for x in nodes if x.id not in dead]
    run = ring_order_runs(ids, dead)
    # A run of k consecutive dead nodes is declared one after the other by the same live predecessor.
    bound = run * DETECT + SLACK
    t0 = time.monotonic()
    for i in victims:
        kill_and_reap(cluster, nodes[i])
    repair, report = await poll(
        lambda: ring_state(live, dead),
        bound,
        f"ideal ring of the {len(live)} live nodes, holding no dead node",
        context,
        since=t0,
        show=brief,
    )
    lookups = await check_lookups([x.control for x in live], [x.id for x in live], keys_per_node=8, seed=SEED)
    looked = time.monotonic() - t0
    statuses = report["statuses"]
    print(
        f"kill -9 x{n_kill} (longest ring run {run}): ideal ring, no dead entries {repair:.3f}s after the kill, "
        f"lookups done at {looked:.3f}s; bound {bound:.2f}s; deaths_declared={counter_sum(statuses, 'deaths_declared')} "
        f"notices_sent={counter_sum(statuses, 'notices_sent')} purged_by_notice={counter_sum(statuses, 'purged_by_notice')}"
    )
    assert lookups["correct"] == lookups["lookups"] == 8 * len(live), f"{tag}: {lookups}"
    assert looked <= bound, f"{tag}: lookups finished {looked:.3f}s after the kill, bound {bound:.2f}s"
    assert counter_sum(statuses, "deaths_declared") >= n_kill, f"{tag}: {brief(report)}"

    # -- restart two of them with their old data dirs: same id, next incarnation
    seed_address = live[0].address
    incarnations = {i: int((Path(nodes[i].data_dir) / "incarnation").read_text()) for i in back}
    t1 = time.monotonic()
    restarted = [restart(cluster, nodes[i], seed_address, timeout=15.0, context=context) for i in back]
    ready = time.monotonic() - t1
    for old_index, fresh in zip(back, restarted, strict=True):
        old = nodes[old_index]
        assert fresh.id == old.id, f"{tag}: node{old_index} came back as {fresh.id:016x}, was {old.id:016x}"
        assert fresh.address.split(":")[0] == old.address.split(":")[0]  # same loopback host, new port
        on_disk = int((Path(old.data_dir) / "incarnation").read_text())
        assert on_disk == incarnations[old_index] + 1, f"{tag}: node{old_index} incarnation {on_disk}"
        print(
            f"node{old_index} {old.id:016x} restarted: {old.address} -> {fresh.address}, "
            f"incarnation {incarnations[old_index]} -> {on_disk}"
        )
    members = live + restarted
    still_dead = dead - {x.id for x in restarted}
    # The others still mark the restarted ids dead (declared before the restart). Hearsay naming a
    # dead-marked node makes them probe it (at most once per near_interval) and its Pong lifts the mark,
    # so a returning node is re-adopted within a few probe rounds, not after dead_ttl: the successor
    # hears from it at once, the predecessor within a stabilize round plus one probe, and the fingers
    # follow within a fix_fingers sweep. 3 DETECT + SLACK covers that with margin (measured ~2-3 s).
    rejoin_bound = 3 * DETECT + SLACK
    watch = FirstTime(lambda: ring_state(members, still_dead), t1)
    rejoin, report = await poll(
        watch,
        rejoin_bound,
        f"ideal ring of the {len(members)} nodes with the restarted ones",
        context,
        since=t1,
        show=brief,
    )
    lookups = await check_lookups([x.control for x in members], [x.id for x in members], keys_per_node=8, seed=SEED + 1)
    statuses = {s["id"]: s for s in report["statuses"]}
    for fresh in restarted:
        assert statuses[fresh.id]["incarnation"] == incarnations[fresh.index] + 1, tag
    print(
        f"restarted {back}: ready in {ready:.3f}s, true successor and predecessor everywhere "
        f"{watch.neighbours_at:.3f}s and ideal ring of {len(members)} {rejoin:.3f}s after the restart "
        f"(bound {rejoin_bound:.2f}s)"
    )
    assert lookups["correct"] == lookups["lookups"] == 8 * len(members), f"{tag}: {lookups}"


# -------------------------------------------------------------------- a slow node is not a dead node


@pytest.mark.timeout(120)
async def test_sigstop_shorter_than_suspicion_is_no_death_longer_is_and_the_node_comes_back(
    clusters, poll, log_tail
) -> None:
    n = 10
    cluster = clusters(n)
    nodes = list(cluster.nodes)
    rng = random.Random(SEED)
    victim = nodes[rng.randrange(n)]
    others = [x for x in nodes if x is not victim]
    tag = f"seed={SEED} stalled node{victim.index} {victim.id:016x} pid {victim.pid} workdir={cluster.workdir}"
    print(tag)

    def context() -> str:
        return tag + "\n" + log_tail(victim, 25)

    _, report = await poll(lambda: ring_state(nodes), 20.0, "initial ideal ring", context, show=brief)
    deaths0 = counter_sum(report["statuses"], "deaths_declared")

    # -- short stall. A probe sent just before the stop is answered (by the node or via the helpers'
    # indirect pings) as soon as it runs again, so a stall shorter than probe_timeout + suspicion_timeout
    # (minus a round trip) can never be declared. It is also shorter than stall_threshold and rpc_timeout.
    short = 0.3
    assert short < min(FAIL.probe_timeout + FAIL.suspicion_timeout - 0.2, FAIL.stall_threshold, OVERLAY.rpc_timeout)
    os.kill(victim.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        await asyncio.sleep(short)  # the stall itself, not a wait for readiness
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    stalled = time.monotonic() - t0
    # Watch for a full detection window after the stall: any declaration would land inside it.
    watch = stalled + DETECT + 1.0
    polls = 0
    while time.monotonic() - t0 < watch:
        ok, report = await ring_state(nodes)
        polls += 1
        deaths = counter_sum(report["statuses"], "deaths_declared")
        assert ok and deaths == deaths0, (
            f"{tag}: after a {stalled:.3f}s stall the ring changed: "
            f"deaths {deaths0} -> {deaths}, {brief(report)}\n{context()}"
        )
        await asyncio.sleep(0.05)
    mine = next(s for s in report["statuses"] if s["id"] == victim.id)["counters"]
    print(
        f"short stall {stalled:.3f}s (probe_timeout + suspicion_timeout = {FAIL.probe_timeout + FAIL.suspicion_timeout:g}s): "
        f"ring ideal in all {polls} polls over {watch:.2f}s, deaths_declared {deaths0} -> {deaths0}, "
        f"its refutations={mine['refutations']} stalls={mine['stalls']}"
    )
    assert mine["refutations"] == 0 and mine["stalls"] == 0, f"{tag}: {mine}"

    # -- long stall: past the detection window (and past stall_threshold, so the node sees its own stall)
    long = 3.0
    assert long > max(DETECT, FAIL.stall_threshold)
    os.kill(victim.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        gone = {victim.id}

        async def declared_and_purged() -> tuple[bool, Any]:
            statuses = await fetch_statuses([x.control for x in others], timeout=2)
            deaths = counter_sum(statuses, "deaths_declared")
            holders = [f"{s['id']:016x}" for s in statuses if s is not None and gone & routing_ids(s)]
            return deaths > deaths0 and not holders and None not in statuses, {"deaths": deaths, "holders": holders}

        purge_bound = DETECT + 1.5  # the declaration, then notices to every holder: a few hops
        assert purge_bound < long
        purged, detail = await poll(
            declared_and_purged,
            purge_bound,
            "stalled node declared dead and purged from every routing table",
            context,
            since=t0,
            show=brief,
        )
        deaths1 = detail["deaths"]
        await asyncio.sleep(max(0.0, long - (time.monotonic() - t0)))  # the rest of the stall
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    t1 = time.monotonic()
    stalled = t1 - t0
    # It comes back under the same id: the others re-adopt it on direct contact, or when hearsay about
    # it makes them probe it (see the restart bound above).
    back_bound = 3 * DETECT + SLACK
    watch = FirstTime(lambda: ring_state(nodes), t1)
    rejoin, report = await poll(watch, back_bound, "ideal ring with the stalled node back", context, since=t1,
                                show=brief)
    lookups = await check_lookups([x.control for x in nodes], [x.id for x in nodes], keys_per_node=8, seed=SEED)
    mine = next(s for s in report["statuses"] if s["id"] == victim.id)
    log = Path(victim.log).read_text(errors="replace")
    how = "refuted" if mine["counters"]["refutations"] else "rejoined without a refutation"
    print(
        f"long stall {stalled:.3f}s: declared and purged everywhere {purged:.3f}s into the stall "
        f"(bound {purge_bound:.2f}s), deaths_declared {deaths0} -> {deaths1}; after SIGCONT true neighbours in "
        f"{watch.neighbours_at:.3f}s, ideal ring in {rejoin:.3f}s (bound {back_bound:.2f}s); it {how}: refutations={mine['counters']['refutations']} "
        f"stalls={mine['counters']['stalls']} incarnation={mine['incarnation']} "
        f"'refuted' log lines={log.count('refuted with incarnation')}"
    )
    assert lookups["correct"] == lookups["lookups"] == 8 * n, f"{tag}: {lookups}"
    assert mine["counters"]["stalls"] >= 1, f"{tag}: a {stalled:.1f}s stall went unnoticed: {mine['counters']}"


# -------------------------------------------------------------------- counters in `mlfabric status`


@pytest.mark.timeout(60)
async def test_status_json_shows_failure_counters(clusters, poll) -> None:
    cluster = clusters(4)
    nodes = list(cluster.nodes)
    tag = f"seed={SEED} workdir={cluster.workdir}"
    await poll(lambda: ring_state(nodes), 20.0, "initial ideal ring", lambda: tag, show=brief)
    victim = nodes[random.Random(SEED).randrange(1, 4)]
    kill_and_reap(cluster, victim)
    live = [x for x in nodes if x is not victim]
    await poll(
        lambda: ring_state(live, {victim.id}),
        DETECT + SLACK,
        "ring repaired after a kill",
        lambda: f"{tag} victim node{victim.index}",
        show=brief,
    )

    def status(node: ClusterNode) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "mlfabric", "status", "--node", node.control, "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    statuses = [status(x) for x in live]
    names = (
        "probes_sent",
        "acks_received",
        "suspicions",
        "indirect_probes",
        "deaths_declared",
        "notices_sent",
        "notices_received",
        "purged_by_notice",
        "refutations",
        "stalls",
    )
    for s in statuses:
        assert s["failure_scheme"] == FAIL.scheme == "stateless"
        assert s["incarnation"] == 0  # first run of each data dir
        assert all(isinstance(s["counters"][k], int) and s["counters"][k] >= 0 for k in names), s["counters"]
        assert s["counters"]["probes_sent"] > 0 and s["counters"]["acks_received"] > 0
    total = {k: sum(s["counters"][k] for s in statuses) for k in names}
    print(f"{tag}: killed node{victim.index}; failure counters over the 3 live nodes: {total}")
    assert total["deaths_declared"] >= 1 and total["suspicions"] >= 1, total
    assert total["notices_sent"] >= 1 and total["notices_received"] >= 1, total
    table = subprocess.run(
        [sys.executable, "-m", "mlfabric", "status", "--node", live[0].control],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert table.returncode == 0 and "deaths_declared=" in table.stdout and "notices_received=" in table.stdout
