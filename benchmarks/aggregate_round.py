"""One aggregation round of a 100 MB float32 model across 4 real processes: mlfabric against gloo.

    python benchmarks/aggregate_round.py                       # S = 4, 8, 16, 32; prints one JSON object
    python benchmarks/aggregate_round.py --shards 16 --reps 9
    python benchmarks/aggregate_round.py --shards 16 --profile /tmp/prof   # py-spy on every mlfabric worker

Both sides start from "every process holds its update" and stop when the last process holds the result:

- gloo: ``torch.distributed.all_reduce`` (SUM) of the flat float32 tensor, 4 ranks, ``GLOO_SOCKET_IFNAME=lo``,
  MASTER_ADDR 127.0.0.1 (it leaves the sum on every rank);
- mlfabric: the model is cut into S shards; shard i has ring key blake2b("bench-model/i") and its owner
  (aggregation root) is the ring successor of that key among the 4 processes' node ids (DESIGN.md,
  "Placement of model shards"). Reduce: every process sends each shard it does not own to the owner
  on the bulk lane (a memoryview over the tensor's storage, ``meta`` = the sender's FedAvg weight and
  contributor bit); the owner receives straight into preallocated tensors (the lane's ``allocate``
  hook) and adds each contribution as it lands (``add_(x, alpha=w)``), then divides by the weight
  sum. All-gather: the owner sends its averaged shard to the 3 others, which receive it in place
  into their result tensor. So mlfabric computes the weighted average, gloo only the sum.

Each process is a separate OS process (``--worker``); the parent only says "go" over a pipe and
collects ``CLOCK_MONOTONIC`` stamps (comparable between processes). A round's time is
max(end) - min(start) over the 4 processes, for both systems alike. Rounds alternate gloo, mlfabric,
gloo, ... so both see the same machine load. Both sides run torch with one intra-op thread.
The results are checked against the exact (float64) sum / weighted average in the workers.
No pickle on the mlfabric side (headers are msgpack, meta is struct-packed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any

KEY = b"bench-aggregate-key"
META = struct.Struct("<dQ")  # weight (sample count, or the sum of weights), contributor bitmap
READY_TIMEOUT = 120.0
ROUND_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------------- shared maths


IDS = {"mode": "hashed"}  # set from --ids in the parent and in every worker


def node_id(rank: int, world: int = 4) -> int:
    """A process's ring id: hashed from its name, as daemons get theirs, or (``--ids even``) evenly spread."""
    from mlfabric.core.ring import SIZE, ring_id

    if IDS["mode"] == "even":
        return (rank * SIZE // world + (1 << 60)) % SIZE
    return ring_id(f"bench-node-{rank}")


def shard_key(i: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"bench-model/{i}".encode(), digest_size=8).digest(), "big")


def owners(shards: int, world: int) -> list[int]:
    """Owner rank of each shard: the ring successor of its key among the processes' node ids."""
    from mlfabric.core.ring import successor_of

    ids = [node_id(r, world) for r in range(world)]
    rank_of = {nid: r for r, nid in enumerate(ids)}
    ring = sorted(ids)
    return [rank_of[successor_of(shard_key(i), ring)] for i in range(shards)]


def bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    return [(i * numel // shards, (i + 1) * numel // shards) for i in range(shards)]


def weight(rank: int) -> float:
    return float(100 * (rank + 1))  # FedAvg sample counts


def fill_update(x: Any, rank: int) -> None:
    import torch

    x.normal_(generator=torch.Generator().manual_seed(1000 + rank))


def exact_error(result: Any, world: int, weighted: bool) -> float:
    """max |result - exact| where exact is the float64 sum (gloo) or weighted average (mlfabric)."""
    import torch

    acc = torch.zeros(result.numel(), dtype=torch.float64)
    x = torch.empty(result.numel(), dtype=torch.float32)
    total = 0.0
    for r in range(world):
        fill_update(x, r)
        w = weight(r) if weighted else 1.0
        acc.add_(x.double(), alpha=w)
        total += w
    if weighted:
        acc.div_(total)
    return float((result.double() - acc).abs().max())


def cpu_times() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------- gloo worker


def gloo_worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world, timeout=_timedelta(ROUND_TIMEOUT))
    x = torch.empty(args.numel, dtype=torch.float32)
    fill_update(x, args.rank)
    work = torch.empty_like(x)
    work.copy_(x)
    dist.all_reduce(work)  # connections up, pages touched
    emit({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "go":
            work.copy_(x)
            emit({"armed": True})
            if sys.stdin.readline().strip() != "start":
                return 1
            u0, s0 = cpu_times()
            t0 = time.monotonic()
            dist.all_reduce(work)
            t1 = time.monotonic()
            u1, s1 = cpu_times()
            emit({"round": int(cmd[1]), "t_start": t0, "t_end": t1, "user": u1 - u0, "sys": s1 - s0})
        elif cmd[0] == "verify":
            emit({"max_abs_err": exact_error(work, args.world, weighted=False)})
        elif cmd[0] == "quit":
            break
    dist.destroy_process_group()
    return 0


def _timedelta(seconds: float) -> Any:
    import datetime

    return datetime.timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------- mlfabric worker


class MlfabricWorker:
    """One process of the mlfabric round: a real Transport with its bulk lane on 127.0.0.(rank+1)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from mlfabric.runtime.bulk import allocate_payload

        torch.set_num_threads(1)
        self.torch = torch
        self.rank, self.world, self.numel, self.shards = args.rank, args.world, args.numel, args.shards
        self.inline = args.sum == "inline"
        self.owner = owners(self.shards, self.world)
        self.bounds = bounds(self.numel, self.shards)
        self.owned = [s for s in range(self.shards) if self.owner[s] == self.rank]
        self.foreign = [s for s in range(self.shards) if self.owner[s] != self.rank]
        self.weight = weight(self.rank)
        # the update and the result live in populated anonymous mappings; tensors are views of them
        self.x_buf = allocate_payload(self.numel * 4)
        self.res_buf = allocate_payload(self.numel * 4)
        self.x = torch.frombuffer(self.x_buf, dtype=torch.float32)
        self.res = torch.frombuffer(self.res_buf, dtype=torch.float32)
        fill_update(self.x, self.rank)
        self.x_view = memoryview(self.x_buf)
        self.res_view = memoryview(self.res_buf)
        # one receive buffer per (owned shard, contributing rank): contributions land there in place
        self.recv_view: dict[tuple[int, int], memoryview] = {}
        self.recv: dict[tuple[int, int], Any] = {}
        for s in self.owned:
            a, b = self.bounds[s]
            for r in range(self.world):
                if r != self.rank:
                    buf = allocate_payload((b - a) * 4)
                    self.recv_view[s, r] = memoryview(buf)
                    self.recv[s, r] = torch.frombuffer(buf, dtype=torch.float32)
        self.rank_of_id = {node_id(r, self.world): r for r in range(self.world)}
        self.round = -1
        self.hellos = 0
        self.timers: dict[str, float] = {}
        self.executor: Any = None

    # ------------------------------------------------------------------ setup

    async def run(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        from mlfabric.config import TransportConfig
        from mlfabric.runtime.transport import Transport
        from mlfabric.wire.messages import Peer

        loop = asyncio.get_running_loop()
        self.loop = loop
        self.executor = None if self.inline else ThreadPoolExecutor(1, thread_name_prefix="sum")
        self.t = Transport(TransportConfig(max_bulk_bytes=self.numel * 4), KEY, on_blob=self.on_blob)
        self.t.bulk.allocate = self.allocate
        host = f"127.0.0.{self.rank + 1}"
        port = await self.t.bind(host, 0)
        await self.t.start(Peer(node_id(self.rank, self.world), f"{host}:{port}"), lambda src, msg: None, lambda a: None)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        emit({"address": f"{host}:{port}", "pid": os.getpid()})
        self.peers: list[str] = json.loads(await asyncio.wait_for(reader.readline(), READY_TIMEOUT))["peers"]
        try:
            await self._warm_connections()
            emit({"ready": True, "owned": self.owned,
                  "owned_bytes": sum((self.bounds[s][1] - self.bounds[s][0]) * 4 for s in self.owned)})
            while True:
                cmd = (await asyncio.wait_for(reader.readline(), 3600)).decode().split()
                if not cmd or cmd[0] == "quit":
                    break
                if cmd[0] == "go":
                    self.res.fill_(float("nan"))  # the round must overwrite every element
                    emit({"armed": True})
                    if (await asyncio.wait_for(reader.readline(), ROUND_TIMEOUT)).strip() != b"start":
                        return 1
                    emit(await asyncio.wait_for(self.one_round(int(cmd[1])), ROUND_TIMEOUT))
                elif cmd[0] == "verify":
                    nan = bool(self.torch.isnan(self.res).any())
                    emit({"max_abs_err": exact_error(self.res, self.world, weighted=True), "nan": nan})
        finally:
            await self.t.close()
            if self.executor is not None:
                self.executor.shutdown(wait=True)
        return 0

    async def _warm_connections(self) -> None:
        """Dial every peer's bulk lane once (a daemon keeps these open between rounds, as gloo does)."""
        from mlfabric.wire.blob import TensorBlob

        probe = TensorBlob("uint8", (1,), b"\x00")
        await asyncio.gather(*(self.t.bulk.send(addr, "hello", probe, timeout=10)
                               for r, addr in enumerate(self.peers) if r != self.rank))
        # and wait until every peer has dialled us (its hello arrived)
        async with asyncio.timeout(10):
            while self.hellos < self.world - 1:
                await asyncio.sleep(0.001)

    # ------------------------------------------------------------------ one round

    async def one_round(self, rnd: int) -> dict[str, Any]:
        from mlfabric.wire.blob import TensorBlob

        u0, s0 = cpu_times()
        t_start = time.monotonic()
        self._begin(rnd)
        meta = META.pack(self.weight, 1 << self.rank)
        by_owner: dict[int, list[int]] = {}
        for s in self.foreign:
            by_owner.setdefault(self.owner[s], []).append(s)

        async def reduce_to(owner: int, shards: list[int]) -> None:
            addr = self.peers[owner]
            for s in shards:
                a, b = self.bounds[s]
                blob = TensorBlob("float32", (b - a,), self.x_view[a * 4 : b * 4], meta=meta)
                await self.t.bulk.send(addr, f"r{rnd}/red/{s}", blob, timeout=ROUND_TIMEOUT)

        for owner, shards in by_owner.items():
            self.tasks.append(asyncio.ensure_future(reduce_to(owner, shards)))
        await self.done
        t_hold = time.monotonic()
        while self.tasks:  # our own sends (gathers to slower peers) finish before we report
            tasks, self.tasks = self.tasks, []
            await asyncio.gather(*tasks)
        t_sent = time.monotonic()
        u1, s1 = cpu_times()
        return {"round": rnd, "t_start": t_start, "t_end": t_hold, "t_sent": t_sent,
                "user": u1 - u0, "sys": s1 - s0, "dups": self.dups,
                "timers": {k: round(v, 6) for k, v in self.timers.items()}}

    def _begin(self, rnd: int) -> None:
        """Round state; made by our "go" or by the first blob of the round, whichever comes first."""
        if self.round == rnd:
            return
        self.round = rnd
        self.pending = {s: self.world - 1 for s in self.owned}
        self.wsum = dict.fromkeys(self.owned, self.weight)
        self.bits = dict.fromkeys(self.owned, 1 << self.rank)
        self.missing = set(self.foreign)
        self.unfinished = set(self.owned)
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.tasks: list[asyncio.Future[None]] = []
        self.dups = 0
        self.timers = dict.fromkeys(("init", "add", "finish", "handler", "first_gather_at"), 0.0)
        for s in self.owned:  # our own contribution starts each accumulator: res[s] = w * x[s]
            self._compute(self._init, s)
        self._check_done()

    def _init(self, s: int) -> None:
        a, b = self.bounds[s]
        t0 = time.perf_counter()
        self.torch.mul(self.x[a:b], self.weight, out=self.res[a:b])
        self.timers["init"] += time.perf_counter() - t0

    def _add(self, s: int, r: int, w: float) -> None:
        a, b = self.bounds[s]
        t0 = time.perf_counter()
        self.res[a:b].add_(self.recv[s, r], alpha=w)
        self.timers["add"] += time.perf_counter() - t0

    def _finish(self, s: int, total: float) -> None:
        a, b = self.bounds[s]
        t0 = time.perf_counter()
        self.res[a:b].mul_(1.0 / total)
        self.timers["finish"] += time.perf_counter() - t0

    def _compute(self, fn: Any, *args: Any, then: Any = None) -> None:
        """Run a summation step inline or on the summation thread (torch releases the GIL), in order."""
        if self.executor is None:
            fn(*args)
            if then is not None:
                then()
            return
        fut = self.loop.run_in_executor(self.executor, fn, *args)

        def settled(f: asyncio.Future[None]) -> None:
            exc = f.exception()
            if exc is not None:
                if not self.done.done():
                    self.done.set_exception(exc)
            elif then is not None:
                then()

        fut.add_done_callback(settled)

    # ------------------------------------------------------------------ bulk lane hooks

    def allocate(self, src: Any, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> memoryview | None:
        if name == "hello":
            return None
        _, kind, s_text = name.split("/")
        s = int(s_text)
        if kind == "red":
            return self.recv_view[s, self.rank_of_id[src.id]]
        a, b = self.bounds[s]
        return self.res_view[a * 4 : b * 4]

    def on_blob(self, src: Any, name: str, blob: Any) -> None:
        if name == "hello":
            self.hellos += 1
            return
        t0 = time.perf_counter()
        rnd_text, kind, s_text = name.split("/")
        self._begin(int(rnd_text[1:]))
        s = int(s_text)
        w, bits = META.unpack(blob.meta)
        if kind == "red":
            r = self.rank_of_id[src.id]
            if self.bits[s] & bits:  # a contribution already counted (a retry through another path)
                self.dups += 1
                return
            self.bits[s] |= bits
            self.wsum[s] += w
            self.pending[s] -= 1
            last = self.pending[s] == 0
            self._compute(self._add, s, r, w, then=(lambda: self._finished(s)) if last else None)
        else:
            self.missing.discard(s)
            self._check_done()
        self.timers["handler"] += time.perf_counter() - t0

    def _finished(self, s: int) -> None:
        """All contributions to shard s are in: divide, then send the average to every other process."""
        total = self.wsum[s]
        self._compute(self._finish, s, total, then=lambda: self._publish(s, total))

    def _publish(self, s: int, total: float) -> None:
        from mlfabric.wire.blob import TensorBlob

        if not self.timers["first_gather_at"]:
            self.timers["first_gather_at"] = time.monotonic()  # absolute; the parent subtracts the round start
        a, b = self.bounds[s]
        blob = TensorBlob("float32", (b - a,), self.res_view[a * 4 : b * 4], meta=META.pack(total, self.bits[s]))
        rnd = self.round
        for r, addr in enumerate(self.peers):
            if r != self.rank:
                self.tasks.append(asyncio.ensure_future(
                    self.t.bulk.send(addr, f"r{rnd}/gat/{s}", blob, timeout=ROUND_TIMEOUT)))
        self.unfinished.discard(s)
        self._check_done()

    def _check_done(self) -> None:
        if not self.missing and not self.unfinished and not self.done.done():
            self.done.set_result(None)


def mlfabric_worker(args: argparse.Namespace) -> int:
    from mlfabric.runtime.driver import run

    return run(MlfabricWorker(args).run())


# ---------------------------------------------------------------------------------------- parent


class Group:
    """Worker processes of one kind, driven line by line over pipes."""

    def __init__(self, kind: str, procs: list[asyncio.subprocess.Process]) -> None:
        self.kind = kind
        self.procs = procs

    @classmethod
    async def spawn(cls, kind: str, world: int, extra: list[str], env: dict[str, str],
                    profile: str | None = None) -> Group:
        procs = []
        for rank in range(world):
            prefix = profiler_prefix(profile, f"{kind}-{'-'.join(extra[1::2])}-rank{rank}") if profile else []
            procs.append(await asyncio.create_subprocess_exec(
                *prefix, sys.executable, __file__, "--worker", kind, "--rank", str(rank), "--world", str(world),
                *extra, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env))
        return cls(kind, procs)

    async def read_all(self, timeout: float) -> list[dict[str, Any]]:
        async def one(p: asyncio.subprocess.Process) -> dict[str, Any]:
            assert p.stdout is not None
            while True:
                line = await p.stdout.readline()
                if not line:
                    raise RuntimeError(f"{self.kind} worker {p.pid} exited (rc {await p.wait()})")
                if line.startswith(b"{"):  # py-spy, when it wraps the worker, talks on the same stdout
                    return json.loads(line)

        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def write_all(self, line: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line.encode() + b"\n")
        await asyncio.gather(*(p.stdin.drain() for p in self.procs if p.stdin is not None))

    async def round(self, rnd: int) -> dict[str, Any]:
        await self.write_all(f"go {rnd}")  # each worker resets its buffers, then says it is armed
        await self.read_all(ROUND_TIMEOUT)
        await self.write_all("start")
        reports = await self.read_all(ROUND_TIMEOUT)
        t = max(r["t_end"] for r in reports) - min(r["t_start"] for r in reports)
        return {"time": t, "reports": reports}

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.write_all("quit")
        for p in self.procs:
            try:
                async with asyncio.timeout(30):
                    await p.wait()
            except TimeoutError:
                p.kill()
                await p.wait()

    def kill(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_ceiling(nbytes: int = 256 << 20, reps: int = 3) -> float:
    """One TCP stream over loopback, plain sockets, payload straight into a preallocated buffer (GB/s)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    src = bytearray(nbytes)
    dst = bytearray(nbytes)
    best = 0.0
    with socket.create_connection(srv.getsockname()) as c, srv.accept()[0] as d:
        for _ in range(reps):
            def receive(view: memoryview) -> None:
                got = 0
                while got < nbytes:
                    got += d.recv_into(view[got:], nbytes - got)

            th = threading.Thread(target=receive, args=(memoryview(dst),))
            t0 = time.perf_counter()
            th.start()
            c.sendall(src)
            th.join()
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    srv.close()
    return best


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "n": len(times)}


def mean_report(reports: list[list[dict[str, Any]]], key: str) -> float:
    return statistics.mean(sum(r[key] for r in rep) for rep in reports)


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    world, numel = args.procs, args.numel
    size = numel * 4
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out: dict[str, Any] = {"benchmark": "aggregate_round", "procs": world, "ids": args.ids, "sum": args.sum, "numel": numel, "model_bytes": size,
                           "dtype": "float32", "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    out["loopback_one_stream_gbps"] = round(loopback_ceiling(), 2)
    groups: list[Group] = []
    gloo_times: list[float] = []
    gloo_reports: list[list[dict[str, Any]]] = []
    rnd = 0
    try:
        gloo = await Group.spawn("gloo", world, ["--numel", str(numel)], env, args.profile)
        groups.append(gloo)
        await gloo.read_all(READY_TIMEOUT)
        results = []
        for shards in args.shards:
            mlf = await Group.spawn("mlfabric", world, ["--numel", str(numel), "--shards", str(shards),
                                                        "--sum", args.sum, "--ids", args.ids], env, args.profile)
            groups.append(mlf)
            addresses = [r["address"] for r in await mlf.read_all(READY_TIMEOUT)]
            await mlf.write_all(json.dumps({"peers": addresses}))
            ready = await mlf.read_all(READY_TIMEOUT)
            for _ in range(args.warmup):
                await gloo.round(rnd)
                await mlf.round(rnd)
                rnd += 1
            m_times, m_reports, g_times = [], [], []
            for _ in range(args.reps):
                g = await gloo.round(rnd)
                m = await mlf.round(rnd)
                rnd += 1
                g_times.append(g["time"])
                gloo_reports.append(g["reports"])
                m_times.append(m["time"])
                m_reports.append(m["reports"])
            gloo_times += g_times
            await mlf.write_all("verify")
            check = await mlf.read_all(READY_TIMEOUT)
            await mlf.stop()
            groups.remove(mlf)
            results.append(mlfabric_result(shards, world, numel, ready, m_times, m_reports, g_times, check))
        await gloo.write_all("verify")
        gloo_check = await gloo.read_all(READY_TIMEOUT)
        await gloo.stop()
        groups.remove(gloo)
    finally:
        for g in groups:
            g.kill()
        for g in groups:
            for p in g.procs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.wait(), 10)
    gmed = statistics.median(gloo_times)
    per_rank = 2 * (world - 1) / world * size  # bytes each rank sends (and receives) in a ring all_reduce
    out["gloo"] = {**summary(gloo_times), "max_abs_err_vs_exact_sum": max(c["max_abs_err"] for c in gloo_check),
                   "algbw_gbps": round(size / gmed / 1e9, 3), "busbw_gbps": round(per_rank / gmed / 1e9, 3),
                   "loopback_total_gbps": round(world * per_rank / gmed / 1e9, 3),
                   "cpu_s_per_round": round(mean_report(gloo_reports, "user") + mean_report(gloo_reports, "sys"), 4),
                   "cpu_user_s": round(mean_report(gloo_reports, "user"), 4),
                   "cpu_sys_s": round(mean_report(gloo_reports, "sys"), 4)}
    out["mlfabric"] = results
    best = min(results, key=lambda r: r["median_s"])
    out["best_shards"] = best["shards"]
    out["ratio_mlfabric_over_gloo"] = round(best["median_s"] / gmed, 3)
    out["definitions"] = {
        "time": "max over processes of (holds the full result) - min over processes of (left the barrier), "
                "CLOCK_MONOTONIC; median over reps, rounds alternate gloo/mlfabric",
        "paired_ratio_median": "median over reps of mlfabric round / the gloo round just before it (robust to "
                               "the machine's load drifting during the run)",
        "algbw_gbps": "model bytes / time (NCCL's algbw)",
        "busbw_gbps": "algbw * 2(n-1)/n: bytes a bandwidth-optimal all_reduce makes each rank send (and receive) "
                      "per second (NCCL's busbw)",
        "per_process_gbps": "bytes one process sends + receives / time (mean over processes)",
        "loopback_total_gbps": "all bytes that crossed loopback in the round / time; compare with "
                               "loopback_one_stream_gbps (the machine has 2 cores: one stream already uses both)",
        "cpu_s_per_round": "user + system CPU seconds of all processes in one round (2 cores: <= 2 * time)",
    }
    out["loadavg_after"] = os.getloadavg()
    return out


def mlfabric_result(shards: int, world: int, numel: int, ready: list[dict[str, Any]], times: list[float],
                    reports: list[list[dict[str, Any]]], gloo_times: list[float],
                    check: list[dict[str, Any]]) -> dict[str, Any]:
    size = numel * 4
    med = statistics.median(times)
    owned = [r["owned_bytes"] for r in ready]
    # bytes each process sends + receives: reduce (non-owned out, 3 x owned in) and gather (3 x owned out, non-owned in)
    traffic = [2 * ((size - o) + (world - 1) * o) for o in owned]
    timer_keys = reports[0][0]["timers"].keys()
    timers = {k: round(statistics.mean(max(r["timers"][k] for r in rep) for rep in reports), 4)
              for k in timer_keys if k != "first_gather_at"}
    timers["first_gather_after_s"] = round(statistics.median(
        min(r["timers"]["first_gather_at"] for r in rep if r["timers"]["first_gather_at"])
        - min(r["t_start"] for r in rep) for rep in reports), 4)
    return {
        "shards": shards, **summary(times),
        "gloo_same_phase": summary(gloo_times),
        "ratio_vs_gloo_same_phase": round(med / statistics.median(gloo_times), 3),
        "paired_ratio_median": round(statistics.median(m / g for m, g in zip(times, gloo_times, strict=True)), 3),
        "times_s": [round(t, 4) for t in times],
        "gloo_times_s": [round(t, 4) for t in gloo_times],
        "owned_bytes_per_process": owned,
        "max_abs_err_vs_exact_fedavg": max(c["max_abs_err"] for c in check),
        "nan_left": any(c["nan"] for c in check),
        "duplicates": sum(r["dups"] for rep in reports for r in rep),
        "algbw_gbps": round(size / med / 1e9, 3),
        "busbw_gbps": round(2 * (world - 1) / world * size / med / 1e9, 3),
        "per_process_gbps": round(statistics.mean(traffic) / med / 1e9, 3),
        "loopback_total_gbps": round(sum(traffic) / 2 / med / 1e9, 3),
        "last_send_acked_s": round(statistics.median(
            max(r["t_sent"] for r in rep) - min(r["t_start"] for r in rep) for rep in reports), 4),
        "cpu_s_per_round": round(mean_report(reports, "user") + mean_report(reports, "sys"), 4),
        "cpu_user_s": round(mean_report(reports, "user"), 4),
        "cpu_sys_s": round(mean_report(reports, "sys"), 4),
        "summation_timers_s_max_process": timers,
    }


def profiler_prefix(folder: str, name: str) -> list[str]:
    """Run a worker under ``py-spy record`` (attaching by pid is refused on this machine; spawning works).

    On-CPU samples only, native frames included, raw collapsed stacks: the whole worker's life, so
    startup and the final check show up too (their frames are easy to drop: fill_update, exact_error).
    """
    spy = shutil.which("py-spy") or os.environ.get("PY_SPY")
    if not spy:
        raise SystemExit("py-spy not found (pip install py-spy, or set PY_SPY=/path/to/py-spy)")
    os.makedirs(folder, exist_ok=True)
    return [spy, "record", "--native", "--threads", "--rate", "200", "--format", "raw",
            "-o", os.path.join(folder, f"{name}.txt"), "--"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--numel", type=int, default=25_000_000, help="float32 elements (25M = 100 MB)")
    parser.add_argument("--shards", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sum", choices=("thread", "inline"), default="thread",
                        help="run each add_ on a summation thread (overlaps receiving) or inline in the event loop")
    parser.add_argument("--ids", choices=("hashed", "even"), default="hashed",
                        help="process ring ids: hashed from names (as daemons) or evenly spaced (balanced owners)")
    parser.add_argument("--profile", metavar="DIR", help="run every worker under py-spy record; collapsed stacks go to DIR")
    parser.add_argument("--worker", choices=("gloo", "mlfabric"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    IDS["mode"] = args.ids
    if args.worker == "gloo":
        return gloo_worker(args)
    if args.worker == "mlfabric":
        args.shards = args.shards[0]
        return mlfabric_worker(args)
    print(json.dumps(asyncio.run(orchestrate(args)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
