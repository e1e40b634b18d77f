"""``mlfabric demo``: the main job. Real daemons train a CNN together, lose an aggregator, and go on.

1. start N daemons (local preset) on 127.0.0.1..N and wait for the ideal ring;
2. submit the ``digits`` job (a small CNN on the handwritten digits bundled with mlfabric, split
   non-IID across the nodes) and print each round as it completes: accuracy, updates, members;
3. in round ``kill_round``, as soon as it reaches it, SIGKILL one node that aggregates in that round's
   tree (it has children there, by its own ``/jobs`` view; not the job's coordinator): its children
   send their partials to the next ancestor up their path, the ring closes over it, the next rounds
   run without it, training goes on;
4. run the same job (same seed, same split) on a fresh cluster with no failure, as the reference;
5. print both final accuracies and write a PNG of accuracy per round with the failure marked.

The demo process itself never imports torch (the daemons do); the plot needs matplotlib.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from mlfabric.runtime.cluster import Cluster, ClusterNode, cluster_up, fetch_statuses, ring_report
from mlfabric.runtime.control import ControlError, get_json

# Eight daemons training on two cores stall each other's event loops for a few hundred milliseconds
# at a time: the local preset's 0.25 s probe timeout would call that a death. Training nodes get
# 1 s / 2 s, probing the successor every 1.2 s (a SIGKILL is still noticed at once through the
# refused connections).
TRAINING_ENV = {"MLFABRIC_PRELOAD_TORCH": "true", "MLFABRIC_FAILURE__PROBE_TIMEOUT": "1.0",
                "MLFABRIC_FAILURE__SUSPICION_TIMEOUT": "2.0", "MLFABRIC_FAILURE__NEAR_INTERVAL": "1.2"}
RING_TIMEOUT = 30.0
JOB_TIMEOUT = 600.0
TOLERANCE_PP = 1.0


async def _wait_ring(cluster: Cluster, timeout: float = RING_TIMEOUT) -> float | None:
    controls = [n.control for n in cluster.nodes]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ring_report(await fetch_statuses(controls, timeout=2.0))["converged"]:
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    return None


async def _job(control: str, job: str, timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        code, body = await get_json(control, f"/jobs?job={job}", timeout)
    except ControlError:
        return None
    return body.get("jobs", {}).get(job) if code == 200 else None


def _hex(node_id: int) -> str:
    return f"{node_id:016x}"


async def _kill_inner_aggregator(cluster: Cluster, job: str, kill_round: int, coord: ClusterNode,
                                 candidates: list[ClusterNode]) -> dict[str, Any] | None:
    """SIGKILL a node that has children in round ``kill_round``'s tree (by its own /jobs view in that
    round), not the coordinator. ``candidates``: nodes that had children in the round before (the
    ring is stable, so the tree usually is too); the first of them still inner in this round dies."""
    for v in candidates:
        view = None
        for _ in range(100):  # until the round's notice reached it (rounds take a fraction of a second)
            view = await _job(v.control, job)
            if view is None or view.get("round", -1) >= kill_round:
                break
            await asyncio.sleep(0.005)
        if view is None or view.get("round") != kill_round or not view["tree"]["children"]:
            continue
        os.kill(v.pid, signal.SIGKILL)
        record = await _job(coord.control, job)
        return {"index": v.index, "id": _hex(v.id), "round": kill_round,
                "children": [_hex(c["id"]) for c in view["tree"]["children"]],
                "recorded_at_kill": len(record["history"]) if record is not None else None}
    return None


async def run_job(cluster: Cluster, job: str, rounds: int, seed: int, out: TextIO, label: str,
                  kill_round: int | None = None) -> dict[str, Any]:
    """Submit the digits job, print progress, optionally SIGKILL an inner aggregator in ``kill_round``
    (0-based); return the coordinator's final view, with ``killed`` and every live node's last tree."""
    entry = cluster.nodes[0].control
    query = f"/job/submit?job_id={job}&task=digits&rounds={rounds}&seed={seed}"
    code, body = await get_json(entry, query, 30.0)
    if code != 200:
        raise RuntimeError(f"submit failed: {body}")
    coord_id = int(body["coordinator"]["id"])
    coord = next(n for n in cluster.nodes if n.id == coord_id)
    print(f"[{label}] job {job} submitted to node{cluster.nodes[0].index}; coordinator is node{coord.index} "
          f"({coord_id:016x})", file=out, flush=True)
    t0 = time.monotonic()
    shown = 0
    killed: dict[str, Any] | None = None
    candidates: list[ClusterNode] | None = None
    record: dict[str, Any] | None = None
    while time.monotonic() - t0 < JOB_TIMEOUT:
        record = await _job(coord.control, job)
        if record is None:
            await asyncio.sleep(0.05)
            continue
        hist = record.get("history", [])
        for h in hist[shown:]:
            print(f"[{label}] round {h['round'] + 1:>2}/{rounds}  test accuracy {h['test_accuracy'] * 100:6.2f}%  "
                  f"updates {h['updates']}/{h['members']} members  ({h['seconds']:.2f}s)", file=out, flush=True)
        shown = len(hist)
        if kill_round is not None and killed is None and candidates is None and len(hist) >= kill_round - 1:
            views = await asyncio.gather(*(_job(n.control, job) for n in cluster.nodes if n is not coord))
            others = [n for n in cluster.nodes if n is not coord]
            candidates = [n for n, v in zip(others, views, strict=True) if v is not None and v["tree"]["children"]]
            candidates.sort(key=lambda n: n.id)
            candidates = candidates[len(candidates) // 2:] + candidates[:len(candidates) // 2]
        if kill_round is not None and killed is None and candidates and len(hist) == kill_round:
            killed = await _kill_inner_aggregator(cluster, job, kill_round, coord, candidates)
            if killed is None:
                raise RuntimeError(f"no inner aggregator found in round {kill_round + 1}")
            killed["t"] = round(time.monotonic() - t0, 3)
            print(f"[{label}] SIGKILL node{killed['index']} ({killed['id']}) during round {kill_round + 1}: it "
                  f"aggregates the partials of {len(killed['children'])} children in this round's tree",
                  file=out, flush=True)
        if record.get("status") == "done" and len(hist) == rounds:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"job {job} did not finish within {JOB_TIMEOUT:g}s")
    assert record is not None
    live = [n for n in cluster.nodes if killed is None or _hex(n.id) != killed["id"]]
    trees = {}
    for n, v in zip(live, await asyncio.gather(*(_job(n.control, job) for n in live)), strict=True):
        if v is not None:
            trees[_hex(n.id)] = {"children": [_hex(c["id"]) for c in v["tree"]["children"]],
                                 "path": [_hex(p["id"]) for p in v["tree"]["path"]]}
    record["killed"] = killed
    record["final_trees"] = trees
    record["wall_s"] = time.monotonic() - t0
    return record


def _start(wd: Path, nodes: int, out: TextIO, label: str) -> Cluster:
    t0 = time.monotonic()
    cluster = cluster_up(wd, nodes, preset="local", extra_env=TRAINING_ENV)
    took = asyncio.run(_wait_ring(cluster))
    if took is None:
        cluster.stop(timeout=5.0)
        raise RuntimeError(f"the ring did not converge within {RING_TIMEOUT:g}s")
    print(f"[{label}] {nodes} daemons up, ideal ring {time.monotonic() - t0:.1f}s after the first spawn",
          file=out, flush=True)
    return cluster


def run_demo(nodes: int = 8, workdir: str | Path | None = None, seed: int = 1, out: TextIO | None = None,
             rounds: int | None = None, kill_round: int | None = None, plot: str | Path | None = None) -> int:
    out = out or sys.stdout
    rounds = rounds or 15
    kill_round = rounds // 3 if kill_round is None else kill_round
    tmp = tempfile.TemporaryDirectory(prefix="mlfabric-demo-") if workdir is None else None
    wd = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    plot_path = Path(plot) if plot is not None else Path.cwd() / "mlfabric-demo.png"
    t0 = time.monotonic()
    job = f"digits-demo-{seed}"
    print(f"mlfabric demo: {nodes} daemons train a CNN on handwritten digits (non-IID split, {rounds} rounds, "
          f"aggregated up a ring-range tree); one inner aggregator is SIGKILLed in round {kill_round + 1}", file=out,
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for label, wdir, kill in (("failure", wd / "run-failure", kill_round), ("reference", wd / "run-reference", None)):
            if wdir.exists():
                shutil.rmtree(wdir)
            cluster = _start(wdir, nodes, out, label)
            try:
                results[label] = asyncio.run(run_job(cluster, job, rounds, seed, out, label, kill))
            finally:
                cluster.stop(timeout=5.0)
    except RuntimeError as exc:
        print(f"demo FAILED: {exc} (logs in {wd})", file=out, flush=True)
        if tmp is not None:
            print("  (re-run with --workdir DIR to keep the logs)", file=out)
            tmp.cleanup()
        return 1
    fail, ref = results["failure"], results["reference"]
    acc = [h["test_accuracy"] for h in fail["history"]]
    ref_acc = [h["test_accuracy"] for h in ref["history"]]
    diff = (acc[-1] - ref_acc[-1]) * 100
    killed = fail.get("killed")
    after = fail["history"][kill_round + 1:]
    print(f"final test accuracy with one aggregator killed: {acc[-1] * 100:.2f}%  (rounds after the kill ran "
          f"with {sorted({h['members'] for h in after})} members, {sorted({h['updates'] for h in after})} updates)",
          file=out)
    print(f"final test accuracy of the failure-free reference: {ref_acc[-1] * 100:.2f}%  "
          f"(difference {diff:+.2f} percentage points)", file=out)
    ok = (killed is not None and killed["recorded_at_kill"] == kill_round and abs(diff) <= TOLERANCE_PP
          and len(fail["history"]) == rounds and all(h["members"] == h["updates"] == nodes - 1 for h in after))
    if killed is None:
        print("no aggregator was killed", file=out)
    elif killed["recorded_at_kill"] != kill_round:
        print(f"the kill landed after round {kill_round + 1} ended", file=out)
    try:
        from mlfabric.learn.plot import plot_accuracy

        marks = [killed["round"] + 1] if killed else []  # 1-based, like the x axis
        plot_accuracy(plot_path, [h["round"] + 1 for h in fail["history"]], acc, ref_acc, marks,
                      f"{nodes} daemons, digits CNN, one aggregator killed")
        print(f"plot: {plot_path}", file=out)
    except ImportError as exc:
        print(f"no plot ({exc}); install matplotlib", file=out)
    keep = ("round", "attempt", "updates", "members", "seconds", "test_accuracy", "test_loss", "recorded_by")
    summary = {"nodes": nodes, "rounds": rounds, "kill_round": kill_round, "final_accuracy": acc[-1],
               "reference_accuracy": ref_acc[-1], "difference_pp": round(diff, 3), "killed": killed,
               "coordinator": fail["coordinator"], "events": fail["events"],
               "history": [{k: h.get(k) for k in keep} for h in fail["history"]],
               "reference_history": [{k: h.get(k) for k in keep} for h in ref["history"]],
               "final_trees": fail["final_trees"], "accuracy": acc, "reference": ref_acc,
               "wall_s": round(time.monotonic() - t0, 1)}
    (wd / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"demo took {time.monotonic() - t0:.1f}s — {'OK' if ok else 'FAILED'}", file=out, flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1
