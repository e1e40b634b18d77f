"""Ring benchmark on real daemon processes (loopback TCP): convergence, lookups, memory. Prints one JSON object.

    python benchmarks/ring_cluster.py --nodes 32            # local preset
    python benchmarks/ring_cluster.py --nodes 200 --keys-per-node 4

Starts N ``mlfabric node`` processes with the cluster machinery (node 0 is everyone's seed), then
measures:
- ``listening_s``: from the first spawn until every node printed its ready line;
- ``converged_s``: from "all listening" until every node's predecessor, successor list and all 64
  fingers equal the ideal ring computed from all ids (read from each node's /status, polled);
- lookups of random keys from every node, checked against the true successor: hops, the core's
  own latency (``elapsed_s``; uvloop's clock has 1 ms resolution) and the HTTP round trip
  through the control endpoint (``rtt_ms``, perf_counter);
- memory per daemon from /proc/PID/status: VmRSS (what ``ps`` shows) and RssAnon (private memory;
  the rest is shared libraries mapped by every daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from mlfabric.runtime.cluster import (
    check_lookups,
    cluster_up,
    fetch_statuses,
    percentile,
    ring_report,
    rss_of,
)


async def wait_converged(controls: list[str], timeout: float, interval: float) -> tuple[float | None, dict[str, Any], list[tuple[float, dict[str, Any]]]]:
    t0 = time.monotonic()
    timeline: list[tuple[float, dict[str, Any]]] = []
    while True:
        report = ring_report(await fetch_statuses(controls, timeout=10.0))
        elapsed = time.monotonic() - t0
        timeline.append((round(elapsed, 2), {k: report[k] for k in ("successor", "predecessor", "successor_list", "fingers")}))
        if report["converged"]:
            return elapsed, report, timeline
        if elapsed > timeout:
            return None, report, timeline
        await asyncio.sleep(interval)


def mb(values: list[int]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values) / 2**20, 1), "max": round(max(values) / 2**20, 1)} if values else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--preset", default="local")
    parser.add_argument("--keys-per-node", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for convergence")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between status polls")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4, help="lookups in flight at once")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="mlfabric-bench-") if args.workdir is None else None
    workdir = args.workdir or tmp.name  # type: ignore[union-attr]
    out: dict[str, Any] = {"benchmark": "ring_cluster", "nodes": args.nodes, "preset": args.preset,
                           "cpus": os.cpu_count()}
    t0 = time.monotonic()
    cluster = cluster_up(workdir, args.nodes, preset=args.preset, timeout=60 + 1.0 * args.nodes)
    try:
        out["listening_s"] = round(time.monotonic() - t0, 2)
        controls = [n.control for n in cluster.nodes]
        converged, report, timeline = asyncio.run(wait_converged(controls, args.timeout, args.interval))
        out["converged_s"] = None if converged is None else round(converged, 2)
        out["ring"] = {k: report[k] for k in ("nodes", "answered", "successor", "predecessor", "successor_list", "fingers")}
        step = max(1, len(timeline) // 12)
        out["timeline"] = timeline[::step] + ([timeline[-1]] if (len(timeline) - 1) % step else [])
        ids = [n.id for n in cluster.nodes]
        res = asyncio.run(check_lookups(controls, ids, args.keys_per_node, seed=args.seed, timeout=30.0,
                                        concurrency=args.concurrency))
        hops = res["hops"]
        lat = [x * 1000 for x in res["elapsed_s"]]
        rtt = [x * 1000 for x in res["rtt_s"]]
        out["lookups"] = {
            "count": res["lookups"], "correct": res["correct"], "wrong": res["wrong"], "failed": res["failed"],
            "hops_mean": round(statistics.fmean(hops), 2) if hops else None,
            "hops_p50": percentile(hops, 50), "hops_p99": percentile(hops, 99), "hops_max": max(hops, default=None),
            "latency_ms_p50": percentile(lat, 50), "latency_ms_p99": percentile(lat, 99),
            "rtt_ms_p50": round(percentile(rtt, 50) or 0, 2), "rtt_ms_p99": round(percentile(rtt, 99) or 0, 2),
        }
        mem = [m for m in (rss_of(n.pid) for n in cluster.nodes) if m]
        out["memory_mb"] = {"vmrss": mb([m["VmRSS"] for m in mem]), "rss_anon": mb([m["RssAnon"] for m in mem]),
                            "rss_file": mb([m["RssFile"] for m in mem])}
        out["loadavg_1m"] = os.getloadavg()[0]
    finally:
        stopped = cluster.stop(timeout=20.0)
        out["stopped"] = stopped
        if tmp is not None:
            tmp.cleanup()
    json.dump(out, sys.stdout)
    print()
    return 0 if out.get("converged_s") is not None and out["lookups"]["correct"] == out["lookups"]["count"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
