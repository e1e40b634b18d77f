"""Federated training jobs on the ring: coordinator, rounds, local training, skip-mesh aggregation over TCP.

A job is submitted to any node (``mlfabric job submit``); that node forwards it to the **coordinator**,
the owner of the job's ring key. The coordinator sends a ``JobAnnounce`` once round the ring
(successor to successor); every node that sees it answers ``JobJoin``. Then, round after round:

1. the coordinator sends ``RoundStart`` (members, who trains, the roster that fixes each node's data
   split) to every live member;
2. every member starts one aggregation instance per model shard (the sans-IO
   :class:`~mlfabric.core.aggregate.Aggregator`, over the shard's skip mesh, rooted at the shard's
   owner on the ring), trains a copy of the global model on its own data in a worker thread (the
   event loop keeps answering probes), and contributes its FedAvg partial for each shard;
3. partial aggregates go up the mesh on the **bulk lane** (the tensor's bytes straight from its memory;
   a small msgpack header in the blob's ``meta`` carries the instance, sequence number, weight and
   contributor bitmap); acks, ``Secured``, repair requests travel on the control lane;
4. each shard's acting root finalises (FedAvg: weighted sum / total weight) and sends the new shard
   to every member; a member that has every shard of the round holds the next global model and
   checkpoints it atomically (``data_dir/jobs/<job>/model.ckpt``);
5. the coordinator, a member too, evaluates the new model on the task's test set, records the round
   (``data_dir/jobs/<job>/job.json``, copied to its successor), and starts the next round.

Failures: a member's failure detector verdicts (``PeerDied``) and refused connections are passed to
the aggregator as ``peer_dead``, so children fail over to their next parent and the first live
replica of a dead root takes over; dead members are left out of the next round. Restarting the
cluster with the same data dirs resumes from the last completed round: the coordinator reloads its
record, every node its checkpoint.

torch is imported only when a node takes part in a job (the daemon itself never needs it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlfabric.core.aggregate import (
    Abstain,
    Aggregator,
    AggregatorConfig,
    Final,
    Partial,
    PartialAck,
    Pending,
    RepairRequest,
    ResultRequest,
    RoundResult,
    Secured,
)
from mlfabric.core.events import Event, PeerDied, PeerPurged
from mlfabric.core.placement import Mesh, shard_key
from mlfabric.core.ring import ring_id
from mlfabric.errors import ConfigError, RemoteProtocolError
from mlfabric.runtime.files import write_atomic
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.messages import (
    MAX_PEER_LIST,
    AggAbstain,
    AggAck,
    AggPending,
    AggRepair,
    AggResultRequest,
    AggSecured,
    JobAnnounce,
    JobJoin,
    JobLeave,
    JobStateCopy,
    JobSubmit,
    Message,
    Peer,
    RoundStart,
)

if TYPE_CHECKING:
    from mlfabric.runtime.daemon import Daemon

logger = logging.getLogger("mlfabric.jobs")

JOB_MESSAGES = (JobSubmit, JobAnnounce, JobJoin, RoundStart, AggAck, AggSecured, AggPending, AggRepair,
                JobStateCopy, JobLeave, AggAbstain, AggResultRequest)
PARTIAL_BLOB = "agg"
FINAL_BLOB = "fin"
MAX_BITMAP = MAX_PEER_LIST // 8
MAX_STASH_PER_INSTANCE = 64
RESUME_WAIT = 15.0  # seconds a restarted coordinator waits for the job's members to come back
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class JobSpec(BaseModel):
    """What ``mlfabric job submit`` sends. Unset hyper-parameters take the task's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=_JOB_ID.pattern, description="unique name of the job")
    task: str = Field("digits", max_length=200, description="'digits' or package.module:attr")
    rounds: int | None = Field(None, ge=1, le=100_000, description="default: the task's")
    local_epochs: int | None = Field(None, ge=1, le=1000)
    lr: float | None = Field(None, gt=0, le=10)
    batch_size: int | None = Field(None, ge=1, le=1 << 16)
    nodes_per_round: int = Field(0, ge=0, le=MAX_PEER_LIST, description="0: every member trains")
    seed: int = Field(0, ge=0, le=(1 << 63) - 1)
    parents: int = Field(2, ge=1, le=8, description="parents per node in the skip mesh (1: plain tree)")
    replicas: int = Field(2, ge=1, le=8, description="shard owner plus replicas (root candidates)")
    shard_bytes: int = Field(16 << 10, ge=1024, le=64 << 20, description="largest shard in bytes")


def job_key(job_id: str) -> int:
    return ring_id(f"job:{job_id}")


def _bitmap(positions: set[int] | frozenset[int], n: int) -> bytes:
    out = bytearray((n + 7) // 8)
    for p in positions:
        out[p >> 3] |= 1 << (p & 7)
    return bytes(out)


def _unbitmap(data: bytes, n: int) -> frozenset[int]:
    if len(data) != (n + 7) // 8:
        raise RemoteProtocolError("contributor bitmap of the wrong length")
    out = {i for i in range(n) if data[i >> 3] >> (i & 7) & 1}
    return frozenset(out)


class _TensorStrategy:
    """FedAvg partials (learn.strategy) as the aggregator's payloads."""

    def __init__(self) -> None:
        from mlfabric.learn import strategy

        self._s = strategy

    def merge(self, into: Any, other: Any) -> Any:
        return self._s.merge(into, other)

    def copy(self, payload: Any) -> Any:
        return self._s.Partial(payload.weighted_sum.clone(), payload.weight)


@dataclass
class _Round:
    number: int
    members: tuple[Peer, ...]
    meshes: list[Mesh]
    started: float
    contributor: bool
    finals: dict[int, Any] = field(default_factory=dict)  # shard -> averaged tensor
    contributors: dict[int, frozenset[int]] = field(default_factory=dict)  # shard -> member ids counted
    train_loss: float | None = None


def _history_entry(number: int, rnd: _Round | None, loss: float, acc: float, seconds: float) -> dict[str, Any]:
    """One round of a job's record. ``rnd``: the round as this node saw it (None: not seen here)."""
    entry: dict[str, Any] = {
        "round": number, "participants": 0, "members": 0, "test_loss": round(loss, 5),
        "test_accuracy": round(acc, 5), "train_loss": None, "seconds": round(seconds, 3), "time_unix": time.time()}
    if rnd is not None and rnd.number == number:
        entry["participants"] = min((len(c) for c in rnd.contributors.values()), default=0)
        entry["members"] = len(rnd.members)
        entry["train_loss"] = rnd.train_loss
        if len(rnd.members) <= 64:  # small jobs keep who was counted, shard by shard
            entry["contributors"] = [sorted(f"{m:016x}" for m in rnd.contributors.get(s, ()))
                                     for s in range(len(rnd.meshes))]
    return entry


class LocalJob:
    """This node's part in one job: the global model, its data, the round in progress."""

    def __init__(self, spec: JobSpec, roster: tuple[int, ...], me: int, directory: Path) -> None:
        import torch

        from mlfabric.learn.checkpoint import load_checkpoint
        from mlfabric.learn.shards import plan_shards
        from mlfabric.learn.tasks import resolve_task

        self.spec, self.roster, self.dir = spec, roster, directory
        # One intra-op thread: the event loop needs the other cores' time slices, and several daemons
        # share a machine in tests and the demo. MLFABRIC_TORCH_THREADS overrides it on a big server.
        torch.set_num_threads(max(1, int(os.environ.get("MLFABRIC_TORCH_THREADS", "1"))))
        self.task = resolve_task(spec.task)
        torch.manual_seed(spec.seed)
        self.model = self.task.build_model(spec.seed)
        self.train_model = self.task.build_model(spec.seed)
        self.plan = plan_shards(self.model.state_dict(), spec.shard_bytes)
        self.version = 0  # rounds applied to self.model
        ckpt = directory / "model.ckpt"
        if ckpt.exists():
            tensors, meta = load_checkpoint(ckpt)
            if meta.get("job") == spec.job_id:
                self.model.load_state_dict(tensors)
                self.version = int(meta["version"])
        index = roster.index(me) if me in roster else None
        self.data = self.task.load_data(index, len(roster), spec.seed) if index is not None else None
        self.test = None

    @property
    def epochs(self) -> int:
        return self.spec.local_epochs or self.task.default_local_epochs

    def lr(self, round_no: int) -> float:
        """The round's learning rate: the job's (or task's) rate on a cosine decay to a tenth of it by
        the last round. With non-IID data, clients pull apart at a constant rate and the global model's
        accuracy swings from round to round; the decay lets the last rounds settle."""
        base = self.spec.lr or self.task.default_lr
        total = max(1, (self.spec.rounds or 1) - 1)
        return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(round_no, total) / total)))

    def train(self, round_no: int) -> tuple[int, float, list[Any]]:
        """Local training on a copy of the global model; returns (samples, loss, one partial per shard)."""
        from mlfabric.learn.shards import flatten_shard
        from mlfabric.learn.strategy import contribution
        from mlfabric.learn.tasks import derive_seed

        assert self.data is not None
        self.train_model.load_state_dict(self.model.state_dict())
        res = self.task.train_local(self.train_model, self.data, self.epochs, self.lr(round_no),
                                    self.spec.batch_size or self.task.default_batch_size,
                                    derive_seed(self.spec.seed, round_no, len(self.data)))
        sd = self.train_model.state_dict()
        parts = [contribution(flatten_shard(sd, spec), res.n_samples) for spec in self.plan]
        return res.n_samples, res.loss, parts

    def apply(self, shards: dict[int, Any], version: int) -> None:
        from mlfabric.learn.checkpoint import save_checkpoint
        from mlfabric.learn.shards import apply_shard

        for i, spec in enumerate(self.plan):
            if shards.get(i) is not None:  # None: no update reached the root; the shard keeps its value
                apply_shard(self.model, spec, shards[i])
        self.version = version
        self.dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.dir / "model.ckpt", self.model.state_dict(),
                        {"job": self.spec.job_id, "version": version})

    def evaluate(self) -> tuple[float, float]:
        if self.test is None:
            self.test = self.task.test_data()
        return self.task.evaluate(self.model, self.test)


@dataclass
class CoordinatorState:
    spec: JobSpec
    roster: list[int] = field(default_factory=list)
    members: dict[int, str] = field(default_factory=dict)  # id -> address
    next_round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    status: str = "starting"
    submitted_unix: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"spec": self.spec.model_dump(), "roster": self.roster,
                           "members": {str(k): v for k, v in self.members.items()},
                           "next_round": self.next_round, "history": self.history, "failures": self.failures,
                           "status": self.status, "submitted_unix": self.submitted_unix})

    @classmethod
    def from_json(cls, text: str) -> CoordinatorState:
        raw = json.loads(text)
        return cls(spec=JobSpec(**raw["spec"]), roster=[int(x) for x in raw["roster"]],
                   members={int(k): str(v) for k, v in raw["members"].items()},
                   next_round=int(raw["next_round"]), history=list(raw["history"]),
                   failures=list(raw["failures"]), status=str(raw["status"]),
                   submitted_unix=float(raw.get("submitted_unix", 0.0)))


class JobService:
    """Jobs for one daemon. Messages of :data:`JOB_MESSAGES` and bulk blobs named agg/fin come here."""

    def __init__(self, daemon: Daemon, agg_config: AggregatorConfig | None = None) -> None:
        self.daemon = daemon
        self.loop = asyncio.get_running_loop()
        self.me: Peer = daemon.peer  # type: ignore[assignment]
        self.dir = Path(daemon.data_dir) / "jobs"
        self.agg_config = agg_config or AggregatorConfig(ack_timeout=3.0, initial_wait=10.0,
                                                                repair_timeout=2.0, result_timeout=15.0)
        self._agg: Aggregator[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.jobs: dict[str, LocalJob] = {}
        self.rounds: dict[str, _Round] = {}
        self.coord: dict[str, CoordinatorState] = {}
        self.replicas: dict[str, str] = {}  # job -> coordinator state JSON copied to us
        self.replica_from: dict[str, int] = {}  # job -> the coordinator that sent it
        self.coordinator_of: dict[str, Peer] = {}  # job -> who sent us its last RoundStart
        self.finishing: dict[str, _Round] = {}  # job -> the previous round, kept for late results
        self._refused: set[str] = set()
        self._final_cache: tuple[Any, Any] | None = None  # (result payload, its average): one finalize per result
        self._confirmed: dict[str, set[int]] = {}  # job -> members heard from since a resume began
        self.dead: set[int] = set()
        self.addresses: dict[int, str] = {}
        self._seen_announce: set[tuple[str, int]] = set()
        self._stash: dict[tuple[str, int, int], list[tuple[int, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._round_timers: dict[str, asyncio.TimerHandle] = {}
        self._waiting_joins: dict[str, asyncio.Event] = {}
        self._closed = False
        self.counters = {"rounds_completed": 0, "partials_sent": 0, "partials_received": 0, "finals_received": 0,
                         "bulk_send_failures": 0, "bad_blobs": 0, "aggregation_seconds_total": 0.0,
                         "rounds_trained": 0, "bad_messages": 0, "jobs_refused": 0}
        self.last_aggregation_s: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.daemon.driver.listeners.append(self._on_event)  # type: ignore[union-attr]
        for path in sorted(self.dir.glob("*/model.ckpt")) if self.dir.exists() else []:
            name = path.parent.name
            if _JOB_ID.match(name) and not (path.parent / "job.json").exists():
                self._spawn(self._rejoin(name), f"rejoin {name}")
        for path in sorted(self.dir.glob("*/job.json")) if self.dir.exists() else []:
            try:
                state = CoordinatorState.from_json(path.read_text())
            except (OSError, ValueError, KeyError, ValidationError) as exc:
                logger.error("cannot resume job record %s: %s", path, exc)
                continue
            if state.status == "running":
                self.coord[state.spec.job_id] = state
                self._spawn(self._resume(state, restart=True), f"resume {state.spec.job_id}")

    def leaving(self) -> None:
        """Graceful stop: tell each job's coordinator we go; a coordinator hands its jobs to its successor.
        The frames leave with the ring's Leaving frames (the daemon drains the transport after this)."""
        transport = self.daemon.transport
        if transport is None:
            return
        succ = self._successor()
        for name, st in self.coord.items():
            if st.status == "running" and succ is not None and succ.id != self.me.id:
                transport.send_nowait(succ.address, JobStateCopy(name, st.to_json(), handover=True))
                logger.info("job %s: handing coordination over to %016x", name, succ.id)
        for name, coordinator in self.coordinator_of.items():
            if coordinator.id != self.me.id and name not in self.coord:
                transport.send_nowait(coordinator.address, JobLeave(name))

    async def close(self) -> None:
        self._closed = True
        for handle in self._round_timers.values():
            handle.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro, name=f"mlfabric-job {name}")
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.error("job task %s failed", name, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    @property
    def agg(self) -> Aggregator[Any]:
        if self._agg is None:
            self._agg = Aggregator(self.me.id, _TensorStrategy(), self.agg_config, is_dead=self.dead.__contains__)
        return self._agg

    # ------------------------------------------------------------------ submit / status (control API)

    def task_allowed(self, task: str) -> bool:
        return task in self.daemon.settings.tasks

    async def submit(self, spec: JobSpec) -> dict[str, Any]:
        if not self.task_allowed(spec.task):
            raise ConfigError(f"task {spec.task!r} is not in this node's allowed tasks "
                              f"({', '.join(self.daemon.settings.tasks)}); see the 'tasks' setting")
        if spec.rounds is None:
            from mlfabric.learn.tasks import resolve_task

            task = await asyncio.to_thread(resolve_task, spec.task)
            spec = spec.model_copy(update={"rounds": int(task.default_rounds)})
        key = job_key(spec.job_id)
        done = await self.daemon.driver.lookup(key)  # type: ignore[union-attr]
        owner = done.node
        if owner is None:
            raise ConfigError("could not find the job's coordinator on the ring (lookup failed); try again")
        msg = JobSubmit(spec.model_dump_json())
        if owner.id == self.me.id:
            self._on_submit(self.me, msg)
        else:
            self.daemon.transport.send_nowait(owner.address, msg)  # type: ignore[union-attr]
        return {"job": spec.job_id, "coordinator": owner.to_json()}

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        jobs = {}
        names = set(self.coord) | set(self.jobs) | set(self.replicas)
        for name in sorted(names):
            if job_id is not None and name != job_id:
                continue
            out: dict[str, Any] = {"job": name}
            if name in self.coord:
                st = self.coord[name]
                out.update({"role": "coordinator", "status": st.status, "spec": st.spec.model_dump(),
                            "round": st.next_round, "members": len(st.members),
                            "member_ids": [f"{m:016x}" for m in sorted(st.members)],
                            "history": st.history, "failures": st.failures})
            elif name in self.replicas:
                st = CoordinatorState.from_json(self.replicas[name])
                out.update({"role": "replica", "status": st.status, "round": st.next_round,
                            "history": st.history, "failures": st.failures, "spec": st.spec.model_dump()})
            else:
                out["role"] = "member"
            local = self.jobs.get(name)
            if local is not None:
                out["model_version"] = local.version
            rnd = self.rounds.get(name)
            if rnd is not None:
                out["current_round"] = rnd.number
                out["round_members"] = [f"{p.id:016x}" for p in rnd.members]
                out["round_aggregators"] = sorted({f"{a:016x}" for m in rnd.meshes for a in m.aggregators()})
                out["round_roots"] = [f"{m.order[0]:016x}" for m in rnd.meshes]
            jobs[name] = out
        return {"node": f"{self.me.id:016x}", "jobs": jobs}

    # ------------------------------------------------------------------ messages

    def handle(self, src: Peer, msg: Message) -> None:
        if self._closed:
            return
        self.addresses[src.id] = src.address
        if src.id in self.dead:
            self.dead.discard(src.id)  # it talks to us: back (a restart keeps its id)
        try:
            if isinstance(msg, JobSubmit):
                self._on_submit(src, msg)
            elif isinstance(msg, JobAnnounce):
                self._on_announce(src, msg)
            elif isinstance(msg, JobJoin):
                self._on_join(src, msg)
            elif isinstance(msg, RoundStart):
                self._on_round_start(src, msg)
            elif isinstance(msg, JobStateCopy):
                if len(self.replicas) < 64 or msg.job in self.replicas:
                    self.replicas[msg.job] = msg.state
                    self.replica_from[msg.job] = src.id
                    if msg.handover:
                        logger.info("job %s: coordinator %016x is leaving and hands the job over", msg.job, src.id)
                        self._peer_dead(src.id, "left the ring (handover)")
            elif isinstance(msg, JobLeave):
                self._peer_dead(src.id, "left the ring")
            elif isinstance(msg, AggAck):
                self._agg_receive(msg.job, msg.round, msg.shard,
                                  PartialAck((msg.job, msg.round, msg.shard), src.id, msg.seq))
            elif isinstance(msg, AggSecured):
                self._agg_receive(msg.job, msg.round, msg.shard,
                                  Secured((msg.job, msg.round, msg.shard), src.id, msg.seqs))
            elif isinstance(msg, AggPending):
                self._agg_receive(msg.job, msg.round, msg.shard, Pending((msg.job, msg.round, msg.shard), src.id))
            elif isinstance(msg, AggResultRequest):
                self._agg_receive(msg.job, msg.round, msg.shard,
                                  ResultRequest((msg.job, msg.round, msg.shard), src.id))
            elif isinstance(msg, AggAbstain):
                self._agg_receive(msg.job, msg.round, msg.shard, Abstain((msg.job, msg.round, msg.shard), src.id))
            elif isinstance(msg, AggRepair):
                self._agg_receive(msg.job, msg.round, msg.shard,
                                  RepairRequest((msg.job, msg.round, msg.shard), src.id))
        except ValidationError as exc:
            self.counters["bad_messages"] += 1
            first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
            logger.warning("bad %s from %s: %s: %s (%d errors)", type(msg).__name__, src.address,
                           ".".join(str(x) for x in first["loc"]) or "-", first["msg"], exc.error_count())
        except ValueError as exc:
            self.counters["bad_messages"] += 1
            logger.warning("bad %s from %s: %s", type(msg).__name__, src.address, str(exc).splitlines()[0])

    def on_blob(self, src: Peer, name: str, blob: TensorBlob) -> bool:
        """Bulk-lane delivery; True when the blob was a job's."""
        if name not in (PARTIAL_BLOB, FINAL_BLOB) or self._closed:
            return False
        try:
            meta = msgpack.unpackb(blob.meta, raw=False, strict_map_key=True, max_bin_len=MAX_BITMAP,
                                   max_str_len=64, max_array_len=16)
            if not isinstance(meta, list) or len(meta) != 7:
                raise RemoteProtocolError("bad job blob header")
            job, rnd_no, shard, seq, bitmap, weight, flag = meta
            if not (isinstance(job, str) and all(isinstance(v, int) and v >= 0 for v in (rnd_no, shard, seq, weight))
                    and isinstance(bitmap, bytes) and isinstance(flag, bool)):
                raise RemoteProtocolError("bad job blob header fields")
            if blob.dtype != "float32" or len(blob.shape) != 1:
                raise RemoteProtocolError("job blobs are 1-D float32")
            if job not in self.jobs and job not in self.coordinator_of:
                raise RemoteProtocolError(f"blob for job {job!r}, which this node does not take part in")
            # Only now torch (valid header, a job we run): garbage never makes a node import it.
            from mlfabric.learn.tensorio import tensor_from_blob

            tensor = tensor_from_blob(blob)
        except (RemoteProtocolError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
                TypeError) as exc:
            self.counters["bad_blobs"] += 1
            logger.warning("bad job blob from %s: %s", src.address, exc)
            return True
        self.addresses[src.id] = src.address
        key = (job, rnd_no, shard)
        rnd = self.rounds.get(job)
        if rnd is None or rnd.number != rnd_no:
            rnd = self.finishing.get(job)  # a late result (or partial) of the previous round
        if rnd is not None and rnd.number == rnd_no:
            n = len(rnd.members)
        else:
            self._hold(key, (src.id, (name, seq, bitmap, weight, flag, tensor)))  # early: its round comes
            return True
        self._deliver_blob(src.id, key, n, name, seq, bitmap, weight, flag, tensor)
        return True

    def _deliver_blob(self, src: int, key: tuple[str, int, int], n: int, name: str, seq: int, bitmap: bytes,
                      weight: int, flag: bool, tensor: Any) -> None:
        from mlfabric.learn.strategy import Partial as FedPartial

        try:
            contributors = _unbitmap(bitmap, n)
        except RemoteProtocolError as exc:
            self.counters["bad_blobs"] += 1
            logger.warning("bad job blob from %016x: %s", src, exc)
            return
        if name == PARTIAL_BLOB:
            self.counters["partials_received"] += 1
            msg: Any = Partial(key, src, seq, contributors, FedPartial(tensor, weight), repair=flag)
        else:
            self.counters["finals_received"] += 1
            msg = Final(key, src, contributors, tensor if tensor.numel() else None)
        self.agg.receive(self.loop.time(), msg)
        self._pump()

    def _agg_receive(self, job: str, rnd_no: int, shard: int, msg: Any) -> None:
        cur = self.rounds.get(job)
        if self._round_of(job, rnd_no) is None and (cur is None or rnd_no > cur.number):
            # A round we have not started yet (its RoundStart, or our model's loading, is still under
            # way): keep the message for it, like early blobs.
            self._hold((job, rnd_no, shard), (-1, msg))
            return
        self.agg.receive(self.loop.time(), msg)
        self._pump()

    def _hold(self, key: tuple[str, int, int], item: tuple[int, Any]) -> None:
        """Keep something for an instance not started yet, bounded per instance and in instances,
        dropping the oldest (the sender's ack timeout resends what matters)."""
        held = self._stash.setdefault(key, [])
        if len(held) >= MAX_STASH_PER_INSTANCE:
            held.pop(0)
        held.append(item)
        if len(self._stash) > 64:
            self._stash.pop(next(iter(self._stash)))

    def on_unreachable(self, address: str) -> None:
        for node, addr in list(self.addresses.items()):
            if addr == address and node in self._mesh_nodes():
                self._peer_dead(node, "unreachable")

    def _mesh_nodes(self) -> set[int]:
        return {p.id for r in self.rounds.values() for p in r.members}

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PeerDied):
            self._peer_dead(event.peer.id, "failure detector")
        elif isinstance(event, PeerPurged):  # a failure notice or a graceful leave reached us
            self._peer_dead(event.peer.id, "failure notice")

    def _peer_dead(self, node: int, why: str) -> None:
        if node in self.dead or node == self.me.id or self._closed:
            return
        self.dead.add(node)
        for name, st in self.coord.items():
            if node in st.members and st.status == "running":
                st.failures.append({"node": f"{node:016x}", "round": st.next_round, "how": why,
                                    "time_unix": time.time()})
                logger.info("job %s: member %016x is dead (%s); it leaves the next round", name, node, why)
        if self._agg is not None:
            self._agg.peer_dead(self.loop.time(), node)
            self._pump()
        for name, coordinator in list(self.replica_from.items()):
            if coordinator == node and name not in self.coord:
                self._spawn(self._maybe_take_over(name), f"take over {name}")

    # ------------------------------------------------------------------ coordinator

    def _on_submit(self, src: Peer, msg: JobSubmit) -> None:
        spec = JobSpec.model_validate_json(msg.spec)
        if spec.rounds is None or not self.task_allowed(spec.task):
            raise ValueError(f"job {spec.job_id}: task {spec.task!r} not allowed here, or no round count")
        if spec.job_id in self.coord:
            logger.info("job %s already known here; submit ignored", spec.job_id)
            return
        state = CoordinatorState(spec=spec, submitted_unix=time.time(), status="running")
        self.coord[spec.job_id] = state
        logger.info("job %s submitted (task %s, %d rounds): coordinating", spec.job_id, spec.task, spec.rounds)
        self._persist(state)
        self._spawn(self._resume(state), f"start {spec.job_id}")

    async def _resume(self, state: CoordinatorState, *, restart: bool = False) -> None:
        """Gather members (one announce round the ring), then run the next round."""
        driver = self.daemon.driver
        assert driver is not None
        core = self.daemon.core
        assert core is not None
        for _ in range(200):  # a restarted coordinator waits (bounded) until it has joined a ring
            if core.chord.joined:
                break
            await asyncio.sleep(0.1)
        resumed = restart and bool(state.roster)
        if resumed:
            # A restart: the record's addresses may be stale (nodes restart on new ports). Wait, bounded,
            # for the members to say where they are now, through the announce or their own JobJoin.
            expected = set(state.members) - {self.me.id}
            self._confirmed[state.spec.job_id] = set()
        await self._announce(state)
        if state.spec.job_id not in self.coord:
            return
        if resumed:
            limit = self.loop.time() + RESUME_WAIT
            while self.loop.time() < limit and not expected <= self._confirmed[state.spec.job_id]:
                await asyncio.sleep(0.1)
            confirmed = self._confirmed.pop(state.spec.job_id)
            missing = expected - confirmed
            if missing:
                logger.warning("job %s: %d member(s) did not come back within %.0f s; going on without them",
                               state.spec.job_id, len(missing), RESUME_WAIT)
                for node in missing:
                    state.members.pop(node, None)
        if not state.roster:
            state.roster = sorted(state.members)
        self._start_round(state)

    async def _rejoin(self, name: str) -> None:
        """After a restart: tell the job's coordinator we are back (maybe at a new address), a few times,
        since the coordinator may itself be restarting."""
        core, driver = self.daemon.core, self.daemon.driver
        if core is None or driver is None:
            return
        for _ in range(200):
            if core.chord.joined:
                break
            await asyncio.sleep(0.1)
        for attempt in range(4):
            await asyncio.sleep(1.0 + attempt)
            if name in self.rounds or self._closed:
                return
            done = await driver.lookup(job_key(name))
            if done.node is not None and done.node.id != self.me.id:
                self.daemon.transport.send_nowait(done.node.address, JobJoin(name, 0))  # type: ignore[union-attr]

    async def _maybe_take_over(self, name: str) -> None:
        """The coordinator of a job we hold a copy of died: if its key is ours now, go on from the copy."""
        await asyncio.sleep(1.0)  # let the ring repair around the dead node first
        driver = self.daemon.driver
        if driver is None or name in self.coord or name not in self.replicas:
            return
        for _ in range(5):
            done = await driver.lookup(job_key(name))
            if done.node is not None and done.node.id not in self.dead:
                break
            await asyncio.sleep(0.5)
        if done.node is None or done.node.id != self.me.id:
            return
        try:
            state = CoordinatorState.from_json(self.replicas[name])
        except (ValueError, KeyError, ValidationError) as exc:
            logger.error("job %s: cannot take over, bad copy of the record: %s", name, exc)
            return
        if state.status != "running":
            return
        dead = self.replica_from.get(name)
        local = self.jobs.get(name)
        if local is not None and local.version > state.next_round:
            # We finished a round the dead coordinator did not record: record it (evaluated here) and go on.
            loss, acc = await asyncio.to_thread(local.evaluate)
            entry = _history_entry(local.version - 1, self._round_of(name, local.version - 1), loss, acc, 0.0)
            entry["recorded_by"] = "successor"
            state.history.append(entry)
            state.next_round = local.version
        state.members = {i: a for i, a in state.members.items() if i not in self.dead}
        state.failures.append({"node": f"{dead or 0:016x}", "round": state.next_round, "how": "coordinator gone (died or left)",
                               "time_unix": time.time()})
        if name in self.coord:
            return
        self.coord[name] = state
        logger.info("job %s: coordinator %016x is dead; taking over at round %d", name, dead or 0, state.next_round)
        self._persist(state)
        if state.next_round >= state.spec.rounds:
            state.status = "done"
            self._persist(state)
            return
        await self._resume(state, restart=True)

    async def _announce(self, state: CoordinatorState) -> None:
        job = state.spec.job_id
        state.members[self.me.id] = self.me.address
        epoch = random.getrandbits(63)
        self._seen_announce.add((job, epoch))
        back = self._waiting_joins[job] = asyncio.Event()
        succ = self._successor()
        if succ is not None and succ.id != self.me.id:
            self.daemon.transport.send_nowait(succ.address, JobAnnounce(job, self.me, epoch, 1))  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(back.wait(), timeout=5.0)
            except TimeoutError:
                logger.warning("job %s: the announce did not come back round the ring in 5 s; going on with "
                               "%d members", job, len(state.members))
            await asyncio.sleep(0.3)  # joins from the last nodes of the walk are still in flight

    def _successor(self) -> Peer | None:
        core = self.daemon.core
        if core is None or not core.chord.joined:
            return None
        return core.chord.successor

    def _on_announce(self, src: Peer, msg: JobAnnounce) -> None:
        token = (msg.job, msg.epoch)
        if msg.coordinator.id != self.me.id:
            self.dead.discard(msg.coordinator.id)
        if msg.coordinator.id == self.me.id:
            ev = self._waiting_joins.get(msg.job)
            if ev is not None:
                ev.set()
            return
        if token in self._seen_announce:
            return
        self._seen_announce.add(token)
        version = self.jobs[msg.job].version if msg.job in self.jobs else 0
        self.daemon.transport.send_nowait(msg.coordinator.address, JobJoin(msg.job, version))  # type: ignore[union-attr]
        succ = self._successor()
        if succ is not None and msg.hops < 4096:
            self.daemon.transport.send_nowait(  # type: ignore[union-attr]
                succ.address, JobAnnounce(msg.job, msg.coordinator, msg.epoch, msg.hops + 1))

    def _on_join(self, src: Peer, msg: JobJoin) -> None:
        st = self.coord.get(msg.job)
        if st is None or st.status != "running":
            return
        if src.id not in st.members:
            logger.info("job %s: %016x joins (%s)", msg.job, src.id, src.address)
        st.members[src.id] = src.address
        if msg.job in self._confirmed:
            self._confirmed[msg.job].add(src.id)

    def _start_round(self, state: CoordinatorState) -> None:
        if self._closed or state.status != "running":
            return
        job, r = state.spec.job_id, state.next_round
        # Members marked dead get a direct announce: one that is alive after all (a false verdict under
        # load) answers with JobJoin, which clears the mark, and is back in the next round.
        for i in sorted(self.dead & set(state.members)):
            self.daemon.transport.send_nowait(  # type: ignore[union-attr]
                state.members[i], JobAnnounce(job, self.me, random.getrandbits(63), 4096))
        live = sorted((i, a) for i, a in state.members.items() if i not in self.dead)
        if len(live) > MAX_PEER_LIST:
            live = live[:MAX_PEER_LIST]
        members = tuple(Peer(i, a) for i, a in live)
        rng = random.Random(state.spec.seed * 1_000_003 + r)
        m = state.spec.nodes_per_round or len(members)
        trainers = set(rng.sample(range(len(members)), min(m, len(members))))
        msg = RoundStart(job, state.spec.model_dump_json(), r, members, _bitmap(trainers, len(members)),
                         tuple(state.roster))
        logger.info("job %s: round %d starts with %d members", job, r, len(members))
        succ = self._successor()
        if succ is not None and succ.id != self.me.id:  # the copy a successor takes over from if we die
            self.daemon.transport.send_nowait(succ.address, JobStateCopy(job, state.to_json()))  # type: ignore[union-attr]
        for peer in members:
            if peer.id == self.me.id:
                self._on_round_start(self.me, msg)
            else:
                self.daemon.transport.send_nowait(peer.address, msg)  # type: ignore[union-attr]

    def _round_complete(self, name: str, rnd: _Round, job: LocalJob, loss: float, acc: float) -> None:
        st = self.coord.get(name)
        if st is None or st.next_round != rnd.number:
            return
        duration = self.loop.time() - rnd.started
        st.history.append(_history_entry(rnd.number, rnd, loss, acc, duration))
        st.next_round = rnd.number + 1
        if st.next_round >= st.spec.rounds:
            st.status = "done"
            logger.info("job %s done after %d rounds: test accuracy %.4f", name, st.next_round, acc)
        else:
            logger.info("job %s: round %d done in %.2f s: %d updates, test accuracy %.4f", name, rnd.number,
                        duration, st.history[-1]["participants"], acc)
        self._persist(st)
        # Every member keeps a copy of the record: any node answers `job status`, and the coordinator's
        # successor has what it needs to go on if the coordinator dies.
        copy = JobStateCopy(name, st.to_json())
        for peer in rnd.members:
            if peer.id != self.me.id and peer.id not in self.dead:
                self.daemon.transport.send_nowait(peer.address, copy)  # type: ignore[union-attr]
        if st.status == "running":
            # Nodes that joined the ring since the last announce join the job every 10 rounds.
            if st.next_round % 10 == 0:
                self._spawn(self._resume(st), f"re-announce {name}")
            else:
                self._start_round(st)

    def _persist(self, st: CoordinatorState) -> None:
        d = self.dir / st.spec.job_id
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "job.json", st.to_json().encode(), 0o644)

    # ------------------------------------------------------------------ member

    def _on_round_start(self, src: Peer, msg: RoundStart) -> None:
        spec = JobSpec.model_validate_json(msg.spec)
        if spec.job_id != msg.job or self.me.id not in {p.id for p in msg.members}:
            return
        if not self.task_allowed(spec.task):
            # A task is code this node would import and run: only the ones its operator listed.
            if msg.job not in self._refused:
                self._refused.add(msg.job)
                logger.error("job %s: refusing task %r (not in this node's 'tasks' setting)", msg.job, spec.task)
            self.counters["jobs_refused"] += 1
            return
        cur = self.rounds.get(msg.job)
        if cur is not None and cur.number >= msg.round:
            # Started already (a coordinator that took over re-sends the round in progress): the round
            # goes on as it is; its end makes the new coordinator record it and start the next one.
            return
        for p in msg.members:
            self.addresses[p.id] = p.address
        self.coordinator_of[msg.job] = src
        self.replica_from.setdefault(msg.job, src.id)
        self._spawn(self._run_round(spec, msg), f"{msg.job} round {msg.round}")

    async def _run_round(self, spec: JobSpec, msg: RoundStart) -> None:
        name = msg.job
        job = self.jobs.get(name)
        if job is None:
            job = await asyncio.to_thread(LocalJob, spec, tuple(msg.roster), self.me.id, self.dir / name)
            self.jobs[name] = job
        members = msg.members
        n = len(members)
        trainers = _unbitmap(msg.sample, n) if len(msg.sample) == (n + 7) // 8 else frozenset(range(n))
        pos = next(i for i, p in enumerate(members) if p.id == self.me.id)
        prev = self.rounds.get(name)
        if prev is not None and prev.number == msg.round - 1 and job.version < msg.round:
            # The coordinator has every result of the last round; we still miss some (they are on the
            # way, or lost: the aggregator asks the root candidates again). Wait for them, bounded.
            limit = self.loop.time() + self.agg_config.result_timeout + 2 * self.agg_config.repair_timeout
            while job.version < msg.round and self.loop.time() < limit and not self._closed:
                await asyncio.sleep(0.05)
            if self.rounds.get(name) is not prev:
                return  # a later RoundStart overtook us while we waited
        contributor = pos in trainers and job.version == msg.round and job.data is not None
        ids = [p.id for p in members]
        trainer_ids = [members[i].id for i in trainers]
        meshes = [Mesh.build(shard_key(name, s), ids, k=spec.parents, replicas=spec.replicas,
                             salt=msg.round * 1_000_003 + s) for s in range(len(job.plan))]
        # The coordinator counts every member of this round as alive (it re-checks the ones marked dead
        # before each round): withdraw our own verdicts on them, so they get partials and results.
        for p in members:
            self.dead.discard(p.id)
            if self._agg is not None:
                self._agg.peer_alive(p.id)
        # Keep the last round's instances (a slow member may still ask us for its results); forget
        # the one before it.
        old = self.finishing.pop(name, None)
        if old is not None:
            for s in range(len(old.meshes)):
                self.agg.forget((name, old.number, s))
        if prev is not None:
            self.finishing[name] = prev
        rnd = self.rounds[name] = _Round(msg.round, members, meshes, self.loop.time(), contributor)
        now = self.loop.time()
        for s, mesh in enumerate(meshes):
            self.agg.start(now, (name, msg.round, s), mesh, contributor=contributor, expected=trainer_ids)
        for s in range(len(meshes)):
            for src_id, item in self._stash.pop((name, msg.round, s), []):
                if src_id < 0:  # a control message (ack, abstain, ...) that came before the round
                    self.agg.receive(self.loop.time(), item)
                    continue
                blob_name, seq, bitmap, weight, flag, tensor = item
                self._deliver_blob(src_id, (name, msg.round, s), n, blob_name, seq, bitmap, weight, flag, tensor)
        self._pump()
        if not contributor:
            if job.version != msg.round:
                logger.info("job %s round %d: our model is at version %d; relaying only this round", name,
                            msg.round, job.version)
            return
        t0 = self.loop.time()
        samples, loss, parts = await asyncio.to_thread(job.train, msg.round)
        logger.debug("job %s round %d: trained on %d samples in %.3f s (loss %.4f)", name, msg.round, samples,
                     self.loop.time() - t0, loss)
        self.counters["rounds_trained"] += 1
        rnd.train_loss = round(loss, 5)
        if self.rounds.get(name) is not rnd:
            return
        now = self.loop.time()
        for s, part in enumerate(parts):
            self.agg.contribute(now, (name, msg.round, s), part)
        self._pump()

    def _on_result(self, ev: RoundResult[Any]) -> None:
        name, r, s = ev.key
        rnd = self.rounds.get(name)
        if rnd is not None and rnd.number != r:
            rnd = self.finishing.get(name)
        job = self.jobs.get(name)
        if rnd is None or job is None or rnd.number != r or len(rnd.finals) == len(rnd.meshes):
            return
        payload = ev.payload
        if ev.finalised_here:
            from mlfabric.learn.strategy import finalize

            payload = finalize(payload) if payload is not None else None
        if payload is None:
            logger.warning("job %s round %d shard %d finished with no update at all: the shard keeps its value",
                           name, r, s)
        rnd.finals[s] = payload
        mesh = rnd.meshes[s]
        rnd.contributors[s] = frozenset(mesh.order[p] for p in ev.contributors if p < len(mesh.order))
        logger.debug("job %s round %d shard %d: result from %016x with %d updates after %.3f s%s", name, r, s,
                     ev.root, len(ev.contributors), self.loop.time() - rnd.started,
                     " (finalised here)" if ev.finalised_here else "")
        if len(rnd.finals) == len(rnd.meshes):
            self._spawn(self._finish_round(name, rnd, job), f"{name} finish {r}")

    async def _finish_round(self, name: str, rnd: _Round, job: LocalJob) -> None:
        if job.version > rnd.number:
            return  # a later round's results are in already (we caught up through it)
        await asyncio.to_thread(job.apply, rnd.finals, rnd.number + 1)
        took = self.loop.time() - rnd.started
        self.counters["rounds_completed"] += 1
        self.counters["aggregation_seconds_total"] += took
        self.last_aggregation_s = took
        if name in self.coord:
            loss, acc = await asyncio.to_thread(job.evaluate)
            self._round_complete(name, rnd, job, loss, acc)

    # ------------------------------------------------------------------ the aggregator's I/O

    def _pump(self) -> None:
        agg = self._agg
        if agg is None:
            return
        for dest, msg in agg.drain_outbox():
            self._send(dest, msg)
        for ev in agg.drain_events():
            self._on_result(ev)
        at = agg.next_deadline()
        if at != self._timer_at or (at is not None and self._timer is None):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = at
            if at is not None and not self._closed:
                self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        at = self._timer_at
        self._timer = None
        self._timer_at = None
        if self._agg is None or self._closed:
            return
        now = self.loop.time()
        self._agg.handle_timer(max(now, at) if at is not None else now)
        self._pump()

    def _send(self, dest: int, msg: Any) -> None:
        if dest == self.me.id:
            self.loop.call_soon(self._local, msg)
            return
        address = self.addresses.get(dest)
        if address is None:
            logger.warning("no address for %016x; dropping %s", dest, type(msg).__name__)
            return
        transport = self.daemon.transport
        assert transport is not None
        job, r, s = msg.key
        if isinstance(msg, Partial):
            rnd = self._round_of(job, r)
            n = len(rnd.members) if rnd is not None else 0
            meta = msgpack.packb([job, r, s, msg.seq, _bitmap(msg.contributors, n), msg.payload.weight, msg.repair])
            self.counters["partials_sent"] += 1
            self._bulk(dest, address, PARTIAL_BLOB, msg.payload.weighted_sum, meta)
        elif isinstance(msg, Final):
            rnd = self._round_of(job, r)
            n = len(rnd.members) if rnd is not None else 0
            tensor = self._final_tensor(msg)
            meta = msgpack.packb([job, r, s, 0, _bitmap(msg.contributors, n), 0, False])
            self._bulk(dest, address, FINAL_BLOB, tensor, meta)
        elif isinstance(msg, PartialAck):
            transport.send_nowait(address, AggAck(job, r, s, msg.seq))
        elif isinstance(msg, Secured):
            transport.send_nowait(address, AggSecured(job, r, s, msg.seqs))
        elif isinstance(msg, Pending):
            transport.send_nowait(address, AggPending(job, r, s))
        elif isinstance(msg, RepairRequest):
            transport.send_nowait(address, AggRepair(job, r, s))
        elif isinstance(msg, Abstain):
            transport.send_nowait(address, AggAbstain(job, r, s))
        elif isinstance(msg, ResultRequest):
            transport.send_nowait(address, AggResultRequest(job, r, s))

    def _round_of(self, job: str, number: int) -> _Round | None:
        for rnd in (self.rounds.get(job), self.finishing.get(job)):
            if rnd is not None and rnd.number == number:
                return rnd
        return None

    def _final_tensor(self, msg: Final[Any]) -> Any:
        """The averaged shard, computed once per result (the root sends it to every member).
        An empty result (no update reached the root within max_wait) travels as an empty tensor."""
        if msg.payload is None:
            import torch

            return torch.empty(0, dtype=torch.float32)
        if self._final_cache is None or self._final_cache[0] is not msg.payload:
            from mlfabric.learn.strategy import finalize

            self._final_cache = (msg.payload, finalize(msg.payload))
        return self._final_cache[1]

    def _local(self, msg: Any) -> None:
        if self._agg is not None and not self._closed:
            self._agg.receive(self.loop.time(), msg)
            self._pump()

    def _bulk(self, dest: int, address: str, name: str, tensor: Any, meta: bytes) -> None:
        from mlfabric.learn.tensorio import blob_from_tensor

        blob = blob_from_tensor(tensor, meta)
        transport = self.daemon.transport
        assert transport is not None

        async def send() -> None:
            try:
                await transport.bulk.send(address, name, blob, timeout=30.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to deliver means: treat as unreachable
                self.counters["bulk_send_failures"] += 1
                logger.info("bulk send to %016x (%s) failed: %s", dest, address, exc)
                self._peer_dead(dest, f"bulk send failed: {type(exc).__name__}")
            finally:
                _keep = tensor  # noqa: F841 - the blob views the tensor's memory until the send is done

        self._spawn(send(), f"bulk {name} to {address}")


def submit_query_to_spec(query: dict[str, str]) -> JobSpec:
    """The control API's ``/job/submit?...`` query as a validated JobSpec (ConfigError if invalid)."""
    try:
        return JobSpec(**{k: v for k, v in query.items() if v != ""})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"invalid job: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None

