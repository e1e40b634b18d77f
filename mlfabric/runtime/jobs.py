"""Training jobs on a daemon: the host of the core's job machine (core/jobs.py). No protocol here.

The protocol (membership, rounds, sampling, the record, takeover, resume) is the sans-IO
:class:`~mlfabric.core.jobs.JobMachine` in the node's ``NodeCore``, driven by the node's one driver
and timer. This host does what the machine asks for and cannot do itself:

- torch in worker threads (:class:`mlfabric.learn.local.LocalJob`), the core's job events in order,
  one sequential queue per job (a model is applied before the round that starts from it trains):
  ``JobSeen`` builds the model and the data part (a later one moves the part), ``ModelReceived``
  checkpoints the model, ``TrainRequested`` trains and answers ``trained``/``train_failed``, ``RoundAggregated``
  (coordinator) averages, evaluates and answers ``commit``;
- persistence: ``RecordChanged`` is written at once to ``data_dir/jobs/<job>/job.json`` (a coalescing
  writer), a model is checkpointed only after the records before it (a crash never leaves a model
  newer than its record), a graceful stop writes what is pending, and at start every stored job
  goes back to the core (``restore``) with its checkpointed model;
- bulk-lane I/O (runtime/payloads.py); a failed send is counted and logged, never taken for a
  death (the core resends on its ack timeout);
- the ``/jobs`` view and ``/job/submit``.

Ports, not the daemon: the job machine, ``call`` (an input to the core with the loop clock, then
one flush), ``deliver`` (a message for the core), ``send_blob`` (the bulk lane), the data dir and
settings values. torch is imported only when a node takes part in a job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlfabric.core.aggregate import WithPayload
from mlfabric.core.events import (
    CoordinatorChanged,
    Event,
    JobFinished,
    JobInputRejected,
    JobSeen,
    JobSubmitted,
    ModelReceived,
    RecordChanged,
    RoundAggregated,
    RoundCompleted,
    TrainRequested,
)
from mlfabric.core.jobs import JobMachine, JobRecord, JobSpec
from mlfabric.errors import ConfigError, RemoteProtocolError
from mlfabric.runtime.files import write_atomic
from mlfabric.runtime.payloads import BLOB, blob_of, item_of
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.messages import Peer

__all__ = ["JobHost", "submit_query_to_spec"]

logger = logging.getLogger("mlfabric.jobs")

RECORD = "job.json"
_QUEUED = (JobSeen, ModelReceived, TrainRequested, RoundAggregated)
_CLOSE_WAIT = 5.0  # seconds a graceful stop waits for the models and records being written

Call = Callable[[Callable[[float], Any]], Any]


@dataclasses.dataclass
class _Hosted:
    """What this node hosts for one job: its event queue and worker, and its LocalJob once built."""

    worker: asyncio.Task[None] | None = None
    queue: asyncio.Queue[Event | None] = dataclasses.field(default_factory=asyncio.Queue)
    record: dict[str, Any] | None = None  # the latest record not written yet
    writer: asyncio.Task[None] | None = None
    local: Any = None  # learn.local.LocalJob
    applied_at: float | None = None  # loop time the latest model arrived (round time, as seen here)
    counters: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "trainings": 0, "train_failures": 0, "models_applied": 0, "commits": 0, "last_round_s": 0.0})


class JobHost:
    def __init__(self, jobs: JobMachine, *, call: Call, deliver: Callable[[Peer, WithPayload], None],
                 send_blob: Callable[[str, str, TensorBlob, float], Awaitable[None]], data_dir: Path,
                 tasks: Iterable[str], torch_threads: int = 1, send_timeout: float = 15.0) -> None:
        self.jobs, self._call, self._deliver, self._send_blob = jobs, call, deliver, send_blob
        self.dir = Path(data_dir) / "jobs"
        self.tasks = frozenset(tasks)
        self.torch_threads, self.send_timeout = torch_threads, send_timeout
        self.loop = asyncio.get_running_loop()
        self.hosted: dict[str, _Hosted] = {}
        self._sends: set[asyncio.Task[None]] = set()
        self._submitted: dict[int, JobSubmitted] = {}
        self._waiting: dict[int, asyncio.Future[JobSubmitted]] = {}
        self.closing = False
        self.counters: dict[str, float] = {"blobs_sent": 0, "blobs_received": 0, "bad_blobs": 0,
                                           "bulk_send_failures": 0, "aggregation_seconds_total": 0.0}

    # ---- lifecycle -------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Hand every stored job back to the core: ``jobs/<job>/job.json`` and, where there is one,
        the checkpointed model (its version, rank and data parts). Before the node joins."""
        for path in sorted(self.dir.glob(f"*/{RECORD}")) if self.dir.is_dir() else []:
            try:
                raw = json.loads(path.read_text())
                record = JobRecord.from_json(raw)
            except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
                logger.error("job record %s unusable, not resumed: %s", path, exc)
                continue
            name = record.spec.job_id
            if path.parent.name != name:
                logger.error("job record %s names job %s; not resumed", path, name)
                continue
            h = self._hosted(name)
            version, flat, rank = 0, None, None
            if (path.parent / "model.ckpt").exists() and record.spec.task in self.tasks:
                from mlfabric.learn.local import LocalJob

                try:
                    h.local = await asyncio.to_thread(LocalJob.from_checkpoint, record.spec, path.parent,
                                                      self.torch_threads)
                    version, rank = h.local.version, h.local.rank
                    flat = await asyncio.to_thread(h.local.flat) if version > 0 else None
                except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: resume without the model
                    logger.error("job %s: checkpoint unusable (%s); resuming from the record alone", name, exc)
            self._call(lambda now, r=raw, v=version, f=flat, k=rank: self.jobs.restore(r, v, f, k, now))
            logger.info("job %s: restored (%s, %d rounds recorded, model version %d)", name, record.status,
                        record.next_round, version)

    async def close(self) -> None:
        """Stop: no more training or aggregating; the models and records that arrived are written
        (bounded wait), then everything is cancelled."""
        self.closing = True
        for h in self.hosted.values():
            h.queue.put_nowait(None)
        pending = [t for h in self.hosted.values() for t in (h.worker, h.writer) if t is not None]
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_WAIT)
        tasks = pending + list(self._sends)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- the core's events -----------------------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        """Driver listener: job events, in the core's order."""
        match ev:
            case JobSubmitted():
                fut = self._waiting.pop(ev.token, None)
                if fut is not None and not fut.done():
                    fut.set_result(ev)
                else:
                    self._submitted[ev.token] = ev
                    while len(self._submitted) > 64:
                        del self._submitted[next(iter(self._submitted))]
            case RoundCompleted():
                logger.info("job %s: round %d recorded: %d updates of %d members in %.2f s", ev.job, ev.round,
                            ev.entry.get("updates", 0), ev.entry.get("members", 0), ev.entry.get("seconds", 0.0))
            case CoordinatorChanged():
                logger.info("job %s: coordinating from round %d, attempt %d (%s)", ev.job, ev.round, ev.attempt,
                            ev.why)
            case JobFinished():
                logger.info("job %s: done (model version %d)", ev.job, ev.version)
            case JobInputRejected():
                logger.warning("bad job message from %s: %s", ev.src.address, ev.what)
            case RecordChanged():
                h = self._hosted(ev.job)
                h.record = ev.record
                if h.writer is None or h.writer.done():
                    h.writer = self.loop.create_task(self._write_records(ev.job, h), name=f"mlfabric-job-record {ev.job}")
            case _ if isinstance(ev, _QUEUED):
                self._hosted(ev.job).queue.put_nowait(ev)  # type: ignore[attr-defined]

    async def _write_records(self, job: str, h: _Hosted) -> None:
        """Write the latest record until none is pending (records that came meanwhile coalesce)."""
        while h.record is not None:
            record, h.record = h.record, None
            try:
                data = json.dumps(record, separators=(",", ":")).encode()
                await asyncio.to_thread(_write_record, self.dir / job, data)
            except Exception:
                logger.exception("job %s: cannot write its record", job)

    def _hosted(self, job: str) -> _Hosted:
        h = self.hosted.get(job)
        if h is None:
            h = _Hosted()
            h.worker = self.loop.create_task(self._work(job, h), name=f"mlfabric-job {job}")
            self.hosted[job] = h
        return h

    async def _work(self, job: str, h: _Hosted) -> None:
        while (ev := await h.queue.get()) is not None:
            if self.closing and isinstance(ev, TrainRequested | RoundAggregated):
                continue  # stopping: what was received is kept, nothing new is made
            try:
                await self._handle(job, h, ev)
            except Exception:
                logger.exception("job %s: handling %s failed", job, type(ev).__name__)

    async def _handle(self, job: str, h: _Hosted, ev: Event) -> None:
        match ev:
            case JobSeen(rank=rank, parts=parts) if h.local is not None:
                if (rank, parts) != (h.local.rank, h.local.parts):  # round 0's estimate, now exact
                    await asyncio.to_thread(h.local.repartition, rank, parts)
                    logger.info("job %s: data part now rank %d of %d parts", job, rank, parts)
            case JobSeen(spec=spec, rank=rank, parts=parts):
                if getattr(spec, "task", None) not in self.tasks:
                    logger.error("job %s: refusing task %r (not in this node's 'tasks' setting); relaying only",
                                 job, getattr(spec, "task", None))
                    return
                from mlfabric.learn.local import LocalJob

                h.local = await asyncio.to_thread(LocalJob, spec, rank, parts, self.dir / job, self.torch_threads)
                logger.info("job %s: taking part with rank %d of %d data parts", job, rank, parts)
            case ModelReceived(version=version, payload=flat) if h.local is not None and flat is not None:
                if h.writer is not None:
                    await asyncio.shield(h.writer)  # the record that came with (or before) this model first
                if version > h.local.version:
                    await asyncio.to_thread(h.local.apply, version, flat)
                    h.counters["models_applied"] += 1
                    now = self.loop.time()
                    if h.applied_at is not None:
                        h.counters["last_round_s"] = round(now - h.applied_at, 4)
                        self.counters["aggregation_seconds_total"] += now - h.applied_at
                    h.applied_at = now
            case TrainRequested(round=round_):
                if h.local is None:
                    self._call(lambda now: self.jobs.train_failed(job, round_, now))
                    return
                try:
                    part = await asyncio.to_thread(h.local.train, round_)
                except Exception as exc:  # noqa: BLE001 - the task's own code: report, the round goes on
                    h.counters["train_failures"] += 1
                    logger.error("job %s round %d: training failed: %s: %s", job, round_, type(exc).__name__, exc)
                    self._call(lambda now: self.jobs.train_failed(job, round_, now))
                    return
                h.counters["trainings"] += 1
                logger.debug("job %s round %d: trained (weight %d)", job, round_, part.weight)
                self._call(lambda now: self.jobs.trained(job, round_, part, now))
            case RoundAggregated(round=round_, attempt=attempt, payload=payload):
                if h.local is not None:
                    flat, metrics = await asyncio.to_thread(h.local.next_model, round_, payload)
                else:  # coordinating a job we do not train (took it over): average only
                    from mlfabric.learn.strategy import finalize

                    flat, metrics = (await asyncio.to_thread(finalize, payload) if payload else None), {}
                h.counters["commits"] += 1
                self._call(lambda now: self.jobs.commit(job, round_, attempt, flat, metrics, now))

    # ---- bulk lane -------------------------------------------------------------------------------

    def send_payload(self, address: str, item: WithPayload) -> None:
        """Driver port: one outbox item with a payload as one ``job`` blob (zero-copy body)."""
        blob, tensor = blob_of(item)

        async def send() -> None:
            try:
                await self._send_blob(address, BLOB, blob, self.send_timeout)
                self.counters["blobs_sent"] += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: counted; the core resends on its ack timeout
                self.counters["bulk_send_failures"] += 1
                logger.info("job blob (%s) to %s not sent: %s: %s", type(item.msg).__name__, address,
                            type(exc).__name__, exc)
            finally:
                _keep = tensor  # noqa: F841 - the blob views the tensor's memory until the send is done

        task = self.loop.create_task(send(), name=f"mlfabric-job-blob {address}")
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def on_blob(self, src: Peer, name: str, blob: TensorBlob) -> bool:
        """Bulk-lane delivery; True when the blob was a job's (handed to the core, or counted as bad)."""
        if name != BLOB:
            return False
        try:
            item = item_of(blob, self.jobs.jobs.__contains__, self._numel)
        except RemoteProtocolError as exc:
            self.counters["bad_blobs"] += 1
            logger.warning("bad job blob from %s: %s", src.address, exc)
            return True
        self.counters["blobs_received"] += 1
        self._deliver(src, item)
        return True

    def _numel(self, job: str) -> int | None:
        h = self.hosted.get(job)
        return h.local.numel if h is not None and h.local is not None else None

    # ---- control API -----------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, timeout: float = 30.0) -> dict[str, Any]:
        if spec.task not in self.tasks:
            raise ConfigError(f"task {spec.task!r} is not in this node's allowed tasks ({', '.join(sorted(self.tasks))})"
                              "; see the 'tasks' setting")
        if spec.rounds is None:
            from mlfabric.learn.tasks import resolve_task

            task = await asyncio.to_thread(resolve_task, spec.task)
            spec = JobSpec(**{**spec.model_dump(), "rounds": int(task.default_rounds)})
        token = self._call(lambda now: self.jobs.submit(spec, now))
        ev = self._submitted.pop(token, None)
        if ev is None:
            fut = self._waiting[token] = self.loop.create_future()
            try:
                ev = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise ConfigError("the lookup of the job's coordinator did not finish; try again") from None
            finally:
                self._waiting.pop(token, None)
        if ev.coordinator is None:
            raise ConfigError("could not find the job's coordinator on the ring (lookup failed); try again")
        return {"job": spec.job_id, "rounds": spec.rounds, "coordinator": ev.coordinator.to_json()}

    def status(self, job: str | None = None) -> dict[str, Any]:
        """The core's view of each job plus this host's: the model version it holds and its counters."""
        out = {}
        for name, view in self.jobs.status().items():
            if job is not None and name != job:
                continue
            h = self.hosted.get(name)
            local = h.local if h is not None else None
            view["host"] = {"model_version": local.version if local is not None else 0,
                            "rank": local.rank if local is not None else None,
                            "parts": local.parts if local is not None else None,
                            "training": local is not None, **(h.counters if h is not None else {})}
            out[name] = view
        return {"node": f"{self.jobs.me.id:016x}", "jobs": out}


def _write_record(directory: Path, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / RECORD, data, 0o644)


def submit_query_to_spec(query: dict[str, str]) -> JobSpec:
    """The control API's ``/job/submit?...`` query as a validated JobSpec (ConfigError if invalid)."""
    try:
        return JobSpec(**{k: v for k, v in query.items() if v != ""})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"invalid job: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
