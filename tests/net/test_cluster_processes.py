"""Real daemon processes: `mlfabric cluster up` (8 nodes), convergence, lookups, CLI, SIGTERM, `cluster down`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mlfabric.core.ring import successor_of
from mlfabric.runtime.cluster import _proc_state, check_lookups, fetch_statuses, ring_report
from mlfabric.runtime.control import get_json

pytestmark = pytest.mark.net

NODES = 8


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlfabric", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workdir = tmp_path_factory.mktemp("cluster")
    up = cli("cluster", "up", "--nodes", str(NODES), "--workdir", str(workdir), "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert [set(n) for n in info["nodes"]] == [{"address", "pid", "control"}] * NODES
    assert json.loads((workdir / "cluster.json").read_text())["nodes"][0]["pid"] == info["nodes"][0]["pid"]
    yield workdir, info["nodes"]
    down = cli("cluster", "down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stderr
    assert all(_proc_state(n["pid"]) is None for n in info["nodes"])
    assert not (workdir / "cluster.json").exists()


async def converge(controls: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        statuses = await fetch_statuses(controls, timeout=2)
        report = ring_report(statuses)
        if report["converged"]:
            return statuses  # type: ignore[return-value]
        if time.monotonic() > deadline:
            pytest.fail(f"ring not ideal within {timeout}s: {report}")
        await asyncio.sleep(0.05)


async def test_cluster_converges_and_every_lookup_is_right(cluster) -> None:
    workdir, nodes = cluster
    statuses = await converge([n["control"] for n in nodes], timeout=20)
    assert {s["address"] for s in statuses} == {n["address"] for n in nodes}
    assert len({s["address"].split(":")[0] for s in statuses}) == NODES  # one loopback address each
    assert not any(s["torch_loaded"] for s in statuses)  # a node that does not train never imports torch
    ids = [s["id"] for s in statuses]
    result = await check_lookups([n["control"] for n in nodes], ids, keys_per_node=16, seed=3)
    assert result["correct"] == result["lookups"] == 16 * NODES, result


def test_status_and_lookup_commands(cluster) -> None:
    workdir, nodes = cluster
    node = nodes[3]
    raw = cli("status", "--node", node["control"], "--json")
    assert raw.returncode == 0, raw.stderr
    status = json.loads(raw.stdout)
    assert isinstance(status["id"], int) and status["address"] == node["address"]
    assert set(status["predecessor"]) == {"id", "address"}
    assert len(status["fingers"]) == 64 and status["successors"][0] == status["fingers"][0]
    assert "uptime_s" in status and "counters" in status and "transport" in status
    table = cli("status", "--data-dir", str(workdir / "node3"))
    assert table.returncode == 0 and f"{status['id']:016x}" in table.stdout and "fingers" in table.stdout
    looked = cli("lookup", "12345", "--node", node["control"], "--json")
    assert looked.returncode == 0, looked.stderr
    body = json.loads(looked.stdout)
    assert set(body) == {"key", "node", "hops", "elapsed_s"} and body["key"] == 12345
    plain = cli("lookup", "0x10", "--node", node["control"])
    assert plain.returncode == 0 and "-> node" in plain.stdout


async def test_sigterm_leaves_gracefully_and_neighbours_repair_quickly(cluster) -> None:
    workdir, nodes = cluster
    controls = [n["control"] for n in nodes]
    statuses = await converge(controls, timeout=20)
    victim_index = 5
    victim = statuses[victim_index]
    rest = [c for i, c in enumerate(controls) if i != victim_index]
    ring = sorted(s["id"] for s in statuses if s["id"] != victim["id"])
    succ_id = successor_of(victim["id"], ring)
    pred_id = ring[ring.index(succ_id) - 1]
    t0 = time.monotonic()
    os.kill(victim["pid"], signal.SIGTERM)
    while True:  # the neighbours take the hand-over from the Leaving messages, no failure detection needed
        by_id = {s["id"]: s for s in await fetch_statuses(rest, timeout=2) if s}
        pred_ok = by_id[pred_id]["successors"][0]["id"] == succ_id
        succ_ok = (by_id[succ_id]["predecessor"] or {}).get("id") == pred_id
        if pred_ok and succ_ok:
            break
        assert time.monotonic() - t0 < 2.0, "neighbours not repaired within 2 s of SIGTERM"
        await asyncio.sleep(0.02)
    repaired = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while _proc_state(victim["pid"]) is not None:
        assert time.monotonic() < deadline, "daemon did not exit after SIGTERM"
        time.sleep(0.02)
    log = Path(workdir / f"node{victim_index}" / "log").read_text()
    assert "left the ring" in log and "node stopped" in log and "Traceback" not in log
    assert not (workdir / f"node{victim_index}" / "control").exists()
    await converge(rest, timeout=20)
    code, body = await get_json(rest[0], f"/lookup?key={victim['id']}")
    assert code == 200 and body["node"]["id"] == succ_id
    print(f"neighbours repaired {repaired:.3f}s after SIGTERM")
