"""``mlfabric demo``: the main job. Real daemons train a CNN together, lose an aggregator, and go on.

1. start N daemons (local preset) on 127.0.0.1..N and wait for the ideal ring;
2. submit the ``digits`` job (a small CNN on the handwritten digits bundled with mlfabric, split
   non-IID across the nodes) and print each round as it completes: accuracy, members, failures;
3. in round ``kill_round``, as soon as it starts (the nodes are training), SIGKILL one node that
   aggregates in that round's skip meshes (not the job's coordinator): its children fail over to their
   next parent, the job leaves it out of the next rounds, training goes on;
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

from mlfabric.runtime.cluster import Cluster, cluster_up, fetch_statuses, ring_report
from mlfabric.runtime.control import get_json

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
    except (TimeoutError, OSError):
        return None
    return body.get("jobs", {}).get(job) if code == 200 else None


async def run_job(cluster: Cluster, job: str, rounds: int, seed: int, out: TextIO, label: str,
                  kill_round: int | None = None) -> dict[str, Any]:
    """Submit the digits job, print progress, optionally SIGKILL an aggregator; return the final record."""
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
    record: dict[str, Any] | None = None
    while time.monotonic() - t0 < JOB_TIMEOUT:
        record = await _job(coord.control, job)
        if record is None:
            await asyncio.sleep(0.05)
            continue
        hist = record.get("history", [])
        for h in hist[shown:]:
            fails = len(record.get("failures", []))
            print(f"[{label}] round {h['round'] + 1:>2}/{rounds}  test accuracy {h['test_accuracy'] * 100:6.2f}%  "
                  f"updates {h['participants']}/{h['members']}  members {h['members']}  "
                  f"failures detected {fails}  ({h['seconds']:.2f}s)", file=out, flush=True)
        shown = len(hist)
        if (kill_round is not None and killed is None and record.get("current_round") == kill_round
                and len(hist) == kill_round):
            aggs = set(record.get("round_aggregators", [])) - {f"{coord_id:016x}"}
            victims = [n for n in cluster.nodes if f"{n.id:016x}" in aggs and n.pid is not None]
            if victims:
                v = victims[len(victims) // 2]
                os.kill(v.pid, signal.SIGKILL)
                killed = {"index": v.index, "id": f"{v.id:016x}", "round": kill_round,
                          "t": time.monotonic() - t0}
                roots = record.get("round_roots", [])
                role = f", root of {roots.count(killed['id'])} of {len(roots)} shards" if killed["id"] in roots else ""
                print(f"[{label}] SIGKILL node{v.index} ({killed['id']}) during round {kill_round + 1}: it aggregates "
                      f"partials in this round's skip meshes{role}", file=out, flush=True)
        if record.get("status") == "done":
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"job {job} did not finish within {JOB_TIMEOUT:g}s")
    assert record is not None
    record["killed"] = killed
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
          f"skip mesh with 2 parents); one aggregator is SIGKILLed in round {kill_round + 1}", file=out, flush=True)
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
    failures = fail.get("failures", [])
    print(f"final test accuracy with one aggregator killed: {acc[-1] * 100:.2f}%  (failures detected: "
          f"{len(failures)}; rounds after the kill ran with {fail['history'][-1]['members']} members)", file=out)
    print(f"final test accuracy of the failure-free reference: {ref_acc[-1] * 100:.2f}%  "
          f"(difference {diff:+.2f} percentage points)", file=out)
    ok = killed is not None and abs(diff) <= TOLERANCE_PP and len(fail["history"]) == rounds
    if killed is None:
        print("no aggregator was killed (the kill round passed before the demo saw it)", file=out)
    try:
        from mlfabric.learn.plot import plot_accuracy

        marks = [killed["round"] + 1] if killed else []  # 1-based, like the x axis
        plot_accuracy(plot_path, [h["round"] + 1 for h in fail["history"]], acc, ref_acc, marks,
                      f"{nodes} daemons, digits CNN, skip mesh (2 parents)")
        print(f"plot: {plot_path}", file=out)
    except ImportError as exc:
        print(f"no plot ({exc}); install matplotlib", file=out)
    summary = {"nodes": nodes, "rounds": rounds, "final_accuracy": acc[-1], "reference_accuracy": ref_acc[-1],
               "difference_pp": round(diff, 3), "killed": killed, "failures": failures,
               "accuracy": acc, "reference": ref_acc, "wall_s": round(time.monotonic() - t0, 1)}
    (wd / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"demo took {time.monotonic() - t0:.1f}s — {'OK' if ok else 'FAILED'}", file=out, flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1
