"""``mlfabric demo`` (first version): a local cluster of real daemons forms a ring, answers lookups and repairs.

1. start N daemons (local preset) on 127.0.0.1..N; node 0 is the seed;
2. print, as time passes, how many nodes have the true successor, predecessor, successor list and all
   64 fingers (from each node's /status, against the ideal ring computed from all ids);
3. look up random keys from every node and check each answer against the true successor;
4. SIGTERM one node, show the ring repairing, look up again; 5. stop everything.
Must not import torch.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from mlfabric.runtime.cluster import Cluster, check_lookups, cluster_up, fetch_statuses, percentile, ring_report

RING_TIMEOUT = 20.0
KEYS_PER_NODE = 16


def _bar(count: int, total: int) -> str:
    return f"{count:>3}/{total}"


async def watch_ring(cluster: Cluster, out: TextIO, timeout: float = RING_TIMEOUT) -> float | None:
    """Print ring correctness until it is ideal; returns seconds taken (None on timeout)."""
    controls = [n.control for n in cluster.nodes]
    t0 = time.monotonic()
    last: tuple[Any, ...] | None = None
    last_print = 0.0
    while True:
        report = ring_report(await fetch_statuses(controls, timeout=2.0))
        now = time.monotonic() - t0
        n = report["nodes"]
        row = tuple(report[k] for k in ("answered", "joined", "successor", "predecessor", "successor_list", "fingers"))
        if row != last or now - last_print >= 1.0 or report["converged"]:
            print(f"  t={now:5.2f}s  joined {_bar(report['joined'], n)}  successor {_bar(report['successor'], n)}"
                  f"  predecessor {_bar(report['predecessor'], n)}  successor list {_bar(report['successor_list'], n)}"
                  f"  fingers {_bar(report['fingers'], n)}", file=out, flush=True)
            last, last_print = row, now
        if report["converged"]:
            return now
        if now > timeout:
            return None
        await asyncio.sleep(0.2)


async def _lookups(cluster: Cluster, seed: int, out: TextIO) -> bool:
    controls = [n.control for n in cluster.nodes]
    ids = [n.id for n in cluster.nodes]
    res = await check_lookups(controls, ids, KEYS_PER_NODE, seed=seed)
    lat = [x * 1000 for x in res["elapsed_s"]]
    hops = res["hops"]
    mean_hops = sum(hops) / len(hops) if hops else 0.0
    print(f"  {res['correct']}/{res['lookups']} lookups returned the true successor "
          f"({res['wrong']} wrong, {res['failed']} failed); mean hops {mean_hops:.2f}, "
          f"latency p50 {percentile(lat, 50) or 0:.2f} ms, p99 {percentile(lat, 99) or 0:.2f} ms",
          file=out, flush=True)
    return res["correct"] == res["lookups"]


def run_demo(nodes: int = 8, workdir: str | Path | None = None, seed: int = 1, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    rng = random.Random(seed)
    tmp = tempfile.TemporaryDirectory(prefix="mlfabric-demo-") if workdir is None else None
    wd = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    ok = True
    t0 = time.monotonic()
    print(f"starting {nodes} mlfabric daemons (local preset) in {wd}", file=out, flush=True)
    cluster = cluster_up(wd, nodes, preset="local")
    try:
        print(f"all {nodes} listening after {time.monotonic() - t0:.1f}s (node0 is everyone's seed):", file=out)
        for n in cluster.nodes:
            print(f"  node{n.index:<3} {n.id:016x}  {n.address:<20} pid {n.pid}", file=out)
        print("the ring forms (nodes whose state matches the ideal ring):", file=out, flush=True)
        took = asyncio.run(watch_ring(cluster, out))
        if took is None:
            ok = False
            print(f"  ring not ideal after {RING_TIMEOUT:g}s", file=out)
        else:
            print(f"  ideal ring after {took:.2f}s", file=out)
        ok &= asyncio.run(_lookups(cluster, rng.randrange(1 << 30), out))

        victim = rng.choice(cluster.nodes[1:]) if len(cluster.nodes) > 1 else None
        if victim is not None:
            print(f"SIGTERM node{victim.index} ({victim.id:016x}): it hands its neighbours over and leaves",
                  file=out, flush=True)
            cluster.stop(timeout=5.0, indices=[victim.index])
            took = asyncio.run(watch_ring(cluster, out))
            if took is None:
                ok = False
                print(f"  ring not repaired after {RING_TIMEOUT:g}s", file=out)
            else:
                print(f"  ring repaired {took:.2f}s after the node stopped", file=out)
            ok &= asyncio.run(_lookups(cluster, rng.randrange(1 << 30), out))
    finally:
        result = cluster.stop(timeout=5.0)
        print(f"stopped {result['terminated']} daemons ({result['killed']} needed SIGKILL); "
              f"demo took {time.monotonic() - t0:.1f}s — {'OK' if ok else 'FAILED'}", file=out, flush=True)
        if tmp is not None:
            tmp.cleanup()
    return 0 if ok else 1
