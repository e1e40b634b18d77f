"""A local multi-process cluster: N real ``mlfabric node`` processes on loopback, plus ring checks.

Used by ``mlfabric cluster up/down``, ``mlfabric demo``, the net tests and the benchmarks.
Node i listens on its own loopback address (127.0.0.1, 127.0.0.2, ... skipping x.x.x.0 and x.x.x.255),
port 0; its data dir and log (stdout + stderr) are ``workdir/node<i>/``. Each daemon runs in its own
session (process group), so it survives the command that started it; ``workdir/cluster.json``
records addresses and pids for ``cluster down``. Readiness is the daemon's ready line
(``mlfabric node <id> listening on <addr> control <addr>``) in its log.
Must not import torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlfabric.core.ring import BITS, ideal_routing, successor_of
from mlfabric.errors import MlfabricError
from mlfabric.runtime.control import ControlError, get_json

READY_RE = re.compile(rb"^mlfabric node ([0-9a-f]{16}) listening on (\S+) control (\S+)$", re.M)
CLUSTER_FILE = "cluster.json"


class ClusterError(MlfabricError):
    """A local cluster could not be started, found or stopped."""


def loopback_host(index: int) -> str:
    """127.0.0.1, 127.0.0.2, ... 127.0.0.254, 127.0.1.1, ... (never .0 or .255)."""
    block, last = divmod(index, 254)
    return f"127.{(block >> 8) & 255}.{block & 255}.{last + 1}"


@dataclass(slots=True)
class ClusterNode:
    index: int
    address: str
    control: str
    pid: int
    id: int
    data_dir: str
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cluster:
    workdir: Path
    nodes: list[ClusterNode]
    preset: str
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"nodes": [{"address": n.address, "pid": n.pid, "control": n.control} for n in self.nodes]}

    def save(self) -> None:
        data = {"preset": self.preset, "nodes": [n.to_json() for n in self.nodes]}
        tmp = self.workdir / f".{CLUSTER_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.workdir / CLUSTER_FILE)

    def stop(self, timeout: float = 10.0, *, indices: list[int] | None = None) -> dict[str, int]:
        """SIGTERM the nodes (all, or ``indices``), wait up to ``timeout``, then SIGKILL what is left."""
        chosen = [n for n in self.nodes if indices is None or n.index in indices]
        result = terminate([n.pid for n in chosen], timeout, self.procs)
        if indices is not None:
            self.nodes = [n for n in self.nodes if n.index not in indices]
        return result


# -------------------------------------------------------------------- processes


def node_command(index: int, data_dir: Path, preset: str, seed: str | None, extra: list[str]) -> list[str]:
    host = loopback_host(index)
    cmd = [sys.executable, "-m", "mlfabric", "node", "--preset", preset, "--listen", f"{host}:0",
           "--control", f"{host}:0", "--data-dir", str(data_dir)]
    if seed:
        cmd += ["--seed", seed]
    return cmd + list(extra)


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True,
                                env=None if env is None else {**os.environ, **env})


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_ready(pending: dict[int, tuple[subprocess.Popen[bytes], Path]], deadline: float) -> dict[int, tuple[int, str, str]]:
    """Poll the logs for the ready lines: index -> (id, address, control)."""
    ready: dict[int, tuple[int, str, str]] = {}
    while pending:
        for index, (proc, log) in list(pending.items()):
            try:
                data = log.read_bytes()
            except OSError:
                data = b""
            if (m := READY_RE.search(data)) is not None:
                ready[index] = (int(m.group(1), 16), m.group(2).decode(), m.group(3).decode())
                del pending[index]
            elif proc.poll() is not None:
                raise ClusterError(f"node {index} exited with code {proc.returncode}: {_tail(log)}")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise ClusterError(f"{len(pending)} node(s) not listening in time (first: node {min(pending)})")
        time.sleep(0.02)
    return ready


def cluster_up(
    workdir: Path | str,
    nodes: int,
    *,
    preset: str = "local",
    extra_args: list[str] | None = None,
    timeout: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> Cluster:
    """Start ``nodes`` daemons (node 0 first: it is every other node's seed); return once all listen."""
    if nodes < 1:
        raise ClusterError("a cluster needs at least one node")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    existing = workdir / CLUSTER_FILE
    if existing.exists():
        alive = [p for p in _recorded_pids(workdir) if _is_our_daemon(p)]
        if alive:
            raise ClusterError(f"a cluster is already running in {workdir} ({len(alive)} nodes); "
                               f"run 'mlfabric cluster down --workdir {workdir}' first")
    extra = list(extra_args or [])
    deadline = time.monotonic() + (timeout if timeout is not None else 30.0 + 0.5 * nodes)
    cluster = Cluster(workdir=workdir, nodes=[], preset=preset)
    try:
        seed: str | None = None
        for batch in ([0], list(range(1, nodes))):
            pending: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
            for index in batch:
                node_dir = workdir / f"node{index}"
                node_dir.mkdir(exist_ok=True)
                log = node_dir / "log"
                with contextlib.suppress(FileNotFoundError):
                    log.unlink()
                proc = _spawn(node_command(index, node_dir, preset, seed, extra), log, extra_env)
                cluster.procs[proc.pid] = proc
                pending[index] = (proc, log)
            procs = {i: p for i, (p, _) in pending.items()}
            logs = {i: lg for i, (_, lg) in pending.items()}
            for index, (node_id, address, control) in sorted(_wait_ready(pending, deadline).items()):
                cluster.nodes.append(ClusterNode(index, address, control, procs[index].pid, node_id,
                                                 str(workdir / f"node{index}"), str(logs[index])))
            if seed is None:
                seed = cluster.nodes[0].address
    except BaseException:
        terminate(list(cluster.procs), 5.0, cluster.procs)
        raise
    cluster.save()
    return cluster


def cluster_add(cluster: Cluster, *, extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None,
                timeout: float = 30.0) -> ClusterNode:
    """Start one more daemon in ``cluster`` (the next index, seeded by the first node still listed), for
    a node that joins while a job runs; return it once it listens."""
    if not cluster.nodes:
        raise ClusterError("no node left to seed a new one")
    index = max(n.index for n in cluster.nodes) + 1
    node_dir = cluster.workdir / f"node{index}"
    node_dir.mkdir(exist_ok=True)
    log = node_dir / "log"
    with contextlib.suppress(FileNotFoundError):
        log.unlink()
    cmd = node_command(index, node_dir, cluster.preset, cluster.nodes[0].address, list(extra_args or []))
    proc = _spawn(cmd, log, extra_env)
    cluster.procs[proc.pid] = proc
    try:
        node_id, address, control = _wait_ready({index: (proc, log)}, time.monotonic() + timeout)[index]
    except BaseException:
        terminate([proc.pid], 5.0, cluster.procs)
        raise
    node = ClusterNode(index, address, control, proc.pid, node_id, str(node_dir), str(log))
    cluster.nodes.append(node)
    cluster.save()
    return node


def load_cluster(workdir: Path | str) -> Cluster:
    workdir = Path(workdir)
    try:
        data = json.loads((workdir / CLUSTER_FILE).read_text())
        nodes = [ClusterNode(**n) for n in data["nodes"]]
    except FileNotFoundError:
        raise ClusterError(f"no cluster in {workdir} ({CLUSTER_FILE} not found)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{workdir / CLUSTER_FILE} is damaged: {exc}") from None
    return Cluster(workdir=workdir, nodes=nodes, preset=data.get("preset", "local"))


def cluster_down(workdir: Path | str, timeout: float = 10.0) -> dict[str, int]:
    cluster = load_cluster(workdir)
    result = cluster.stop(timeout)
    with contextlib.suppress(FileNotFoundError):
        (cluster.workdir / CLUSTER_FILE).unlink()
    return result


def _recorded_pids(workdir: Path) -> list[int]:
    try:
        return [int(n["pid"]) for n in json.loads((workdir / CLUSTER_FILE).read_text())["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _proc_state(pid: int) -> str | None:
    """The process state letter from /proc (None when gone); zombies count as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3].decode()
    return None if state in ("Z", "X", "") else state


def _is_our_daemon(pid: int) -> bool:
    if _proc_state(pid) is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    return b"mlfabric" in argv and b"node" in argv


def terminate(pids: list[int], timeout: float, procs: dict[int, subprocess.Popen[bytes]] | None = None) -> dict[str, int]:
    """SIGTERM each daemon's process group, wait up to ``timeout``, SIGKILL the rest. Reaps our children."""
    procs = procs or {}
    targets = [p for p in pids if _is_our_daemon(p)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(targets)
    while alive and time.monotonic() < deadline:
        for pid in alive:
            if pid in procs:
                procs[pid].poll()
        alive = [p for p in alive if _proc_state(p) is not None]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for pid in pids:
        proc = procs.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
    return {"terminated": len(targets) - len(alive), "killed": len(alive)}


# -------------------------------------------------------------------- ring checks


async def fetch_statuses(controls: list[str], timeout: float = 5.0, concurrency: int = 64) -> list[dict[str, Any] | None]:
    """GET /status from every control endpoint (None where it failed)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(address: str) -> dict[str, Any] | None:
        async with gate:
            try:
                code, body = await get_json(address, "/status", timeout)
            except ControlError:
                return None
            return body if code == 200 else None

    return list(await asyncio.gather(*(one(c) for c in controls)))


def ideal_ring(ids: list[int], successors: int) -> dict[int, dict[str, Any]]:
    """For each id: the true predecessor, successor list (length min(r, N-1)) and 64 fingers.

    Predecessor, successor and fingers come from :func:`mlfabric.core.ring.ideal_routing`, the judge the
    simulator uses too. A node alone has no predecessor (None) and itself as successor.
    """
    ring = sorted(set(ids))
    n = len(ring)
    out: dict[int, dict[str, Any]] = {}
    for pos, nid in enumerate(ring):
        pred, succ, fingers = ideal_routing(nid, ring)
        succ_list = [ring[(pos + k) % n] for k in range(1, min(successors, n - 1) + 1)] or [nid]
        assert succ_list[0] == succ
        out[nid] = {"predecessor": pred if n > 1 else None, "successors": succ_list, "fingers": fingers}
    return out


MAX_PROBLEMS = 20  # problems listed in a ring report; the counters count them all
_ABSENT = object()  # a finger a status does not list at all


def _hex(node_id: int | None) -> str:
    return "none" if node_id is None else f"{node_id:016x}"


def ring_report(statuses: list[dict[str, Any] | None], successors: int = 8) -> dict[str, Any]:
    """How many nodes have the true successor, predecessor, successor list and all fingers.

    The truth is the ideal ring of the ids that answered (``statuses`` holds None for a node that did
    not); ``converged`` needs every node to answer, be joined and match it exactly, with no id twice.
    ``problems`` says what is wrong, one line per wrong pointer (the first ``MAX_PROBLEMS``).
    """
    live = [s for s in statuses if s is not None]
    ids = [s["id"] for s in live]
    ideal = ideal_ring(ids, successors)
    report: dict[str, Any] = {"nodes": len(statuses), "answered": len(live), "joined": 0, "successor": 0,
                              "predecessor": 0, "successor_list": 0, "fingers": 0}
    problems: list[str] = []
    if len(live) < len(statuses):
        problems.append(f"{len(statuses) - len(live)} of {len(statuses)} nodes did not answer")
    twice = sorted({i for i in ids if ids.count(i) > 1})
    problems += [f"node {_hex(i)} answered {ids.count(i)} times" for i in twice]
    for s in live:
        me = _hex(s["id"])
        want = ideal[s["id"]]
        got_succ = [p["id"] for p in s["successors"]]
        pred = s["predecessor"]["id"] if s["predecessor"] else None
        fingers = [f["id"] if f else None for f in s["fingers"]]
        if s["joined"]:
            report["joined"] += 1
        else:
            problems.append(f"node {me}: not joined")
        if got_succ[:1] == want["successors"][:1]:
            report["successor"] += 1
        else:
            problems.append(f"node {me}: successor {_hex(got_succ[0] if got_succ else None)}, "
                            f"should be {_hex(want['successors'][0])}")
        if pred == want["predecessor"]:
            report["predecessor"] += 1
        else:
            problems.append(f"node {me}: predecessor {_hex(pred)}, should be {_hex(want['predecessor'])}")
        if got_succ == want["successors"]:  # exactly: no stale entries behind, none missing
            report["successor_list"] += 1
        else:
            problems.append(f"node {me}: successor list [{' '.join(map(_hex, got_succ))}], "
                            f"should be [{' '.join(map(_hex, want['successors']))}]")
        if fingers == want["fingers"]:
            report["fingers"] += 1
        else:
            pairs = itertools.zip_longest(fingers, want["fingers"], fillvalue=_ABSENT)
            wrong = [i for i, (g, w) in enumerate(pairs) if g != w]
            i = wrong[0]
            got = _hex(fingers[i]) if i < len(fingers) else "absent"
            should = _hex(want["fingers"][i]) if i < BITS else "absent"
            problems.append(f"node {me}: {len(wrong)} of {BITS} fingers wrong, the first is finger {i}: {got}, "
                            f"should be {should}")
    n = report["nodes"]
    report["converged"] = n > 0 and not twice and all(
        report[k] == n for k in ("answered", "joined", "successor", "predecessor", "successor_list", "fingers"))
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more"]
    report["problems"] = problems
    return report


async def check_lookups(
    controls: list[str], ids: list[int], keys_per_node: int, seed: int = 0, timeout: float = 10.0,
    concurrency: int = 32,
) -> dict[str, Any]:
    """Look up random keys (seeded) from every node; compare with the true successor among ``ids``.

    ``correct + failed + wrong == lookups``: a lookup fails when the control endpoint is unreachable or
    answers without a node, and is wrong when it names another node. ``problems`` says which lookups
    went wrong and how (the first ``MAX_PROBLEMS``).
    """
    ring = sorted(ids)
    rng = random.Random(seed)
    jobs = [(c, rng.getrandbits(BITS)) for c in controls for _ in range(keys_per_node)]
    gate = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []
    problems: list[str] = []

    async def one(control: str, key: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                code, body = await get_json(control, f"/lookup?key={key}", timeout)
            except ControlError as exc:
                results.append({"ok": False, "error": str(exc)})
                problems.append(f"lookup of {key:016x} at {control}: {exc}")
                return
            rtt = time.perf_counter() - t0
            node = body.get("node") if code == 200 else None
            want = successor_of(key, ring)
            ok = node is not None and node["id"] == want
            if node is None:
                problems.append(f"lookup of {key:016x} at {control}: no node (HTTP {code}: {body.get('error')})")
            elif not ok:
                problems.append(f"lookup of {key:016x} at {control}: node {_hex(node['id'])}, should be {_hex(want)}")
            results.append({"ok": ok, "failed": node is None, "hops": body.get("hops", 0),
                            "elapsed_s": body.get("elapsed_s"), "rtt_s": rtt})

    await asyncio.gather(*(one(c, k) for c, k in jobs))
    ok = [r for r in results if r["ok"]]
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more"]
    return {
        "lookups": len(results),
        "correct": len(ok),
        "failed": sum(1 for r in results if r.get("failed") or "error" in r),
        "wrong": sum(1 for r in results if not r["ok"] and not r.get("failed") and "error" not in r),
        "hops": [r["hops"] for r in results if "hops" in r],
        "elapsed_s": [r["elapsed_s"] for r in results if r.get("elapsed_s") is not None],
        "rtt_s": [r["rtt_s"] for r in results if "rtt_s" in r],
        "problems": problems,
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def rss_of(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon (private memory) of a process in bytes, from /proc."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        return None
    return out
