"""Training jobs as a sans-IO machine: submission, the round schedule, trainer sampling, the record,
takeover, resume. It owns the round's :class:`~mlfabric.core.aggregate.TreeAggregator`.

Membership is the ring. Nothing lists the members: a round reaches every node through a
**ring-range tree** built from each node's own Chord routing entries (El-Ansary et al.'s Chord
broadcast, with a bounded fan-out). The coordinator (the node that owns the job's ring key when it
is submitted) is responsible for the whole ring; a node responsible for the range from itself to
``hi`` keeps the part up to its successor (only itself) and splits the rest among ``tree_fanout``
children: its successor and the routing entries nearest the range's quantiles. Each child gets
``JobRound`` with its sub-range and the path of its ancestors, and does the same. So every node
gets one notice per round, sends at most ``tree_fanout``, and the tree is O(log N) deep; a node that
joined the ring since the last round is in the next round's tree as soon as its neighbours know it,
and one that left or died is not.

A round's notice carries the previous round's result (the model of version ``round``) and its
history entry, so results, the start of the next round and the record travel down the same tree,
and a joiner trains from the first notice it gets. Updates come back up the same tree as partial
aggregates with :class:`~mlfabric.core.spans.Spans` of the ranges they hold (see
core/aggregate.py); the coordinator, the root, turns the sum into the next model (an effect: the
host averages and evaluates, then calls :meth:`JobMachine.commit`), records the round and opens the
next one. Training is an effect too: the machine emits :class:`TrainRequested` and is told
:meth:`JobMachine.trained`.

Coordinator loss. The root sends the notice that commits a round to its first child (its
successor) first and to the others only once that child has acknowledged it, so any node that holds
round ``r``'s result implies the coordinator's heir holds it too. When the coordinator dies or
leaves, its heir (or, failing that, the new owner of the job key) takes over from its own copy of the
record with a higher *attempt* and re-opens the round it has the model for; members keep their own
update of a round until that round's result arrives, so a re-opened round costs no retraining, and
partials of an older attempt are ignored (exactly once per attempt, one attempt recorded per round).
A graceful leave hands the job to the successor (``JobHandover``). After a whole-cluster restart,
each node restores its record; the owner of the job key resumes once it has been joined for
``resume_settle`` seconds without hearing from a coordinator.

Every random choice (trainer sampling) comes from the injected RNG; only durations go on the wire.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import json
import math
import random
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlfabric.config import JobsConfig
from mlfabric.core.aggregate import InstanceKey, RootResult, Strategy, TreeAggregator, WithPayload
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import (
    CoordinatorChanged,
    Event,
    JobFinished,
    JobInputRejected,
    JobSeen,
    JobSubmitted,
    Joined,
    LookupDone,
    ModelReceived,
    PeerDied,
    PeerPurged,
    PredecessorChanged,
    RecordChanged,
    RoundAggregated,
    RoundCompleted,
    TrainRequested,
)
from mlfabric.core.ring import MASK, SIZE, distance, in_half_open, ring_id
from mlfabric.core.spans import Spans
from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.messages import (
    ALL_TRAIN,
    MAX_PATH,
    JobAck,
    JobHandover,
    JobPartial,
    JobPending,
    JobResultRequest,
    JobRound,
    JobRoundAck,
    JobSubmit,
    Message,
    Peer,
)

__all__ = ["JOB_MESSAGES", "JobMachine", "JobRecord", "JobSpec", "job_key"]

JOB_MESSAGES = (JobSubmit, JobRound, JobPartial, JobAck, JobRoundAck, JobPending, JobResultRequest, JobHandover)
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
    nodes_per_round: int = Field(0, ge=0, le=ALL_TRAIN - 1, description="trainers sampled per round; 0: every member")
    seed: int = Field(0, ge=0, le=(1 << 63) - 1)


def job_key(job_id: str) -> int:
    return ring_id(f"job:{job_id}")


@dataclass
class JobRecord:
    """The coordinator's record of a job; every member keeps a copy (entries arrive with the notices)."""

    spec: JobSpec
    status: str = "running"  # running | done
    attempt: int = 0
    parts: int = 0  # data partitions, fixed at round 0
    coordinator: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # coordinator changes, with round and attempt

    @property
    def next_round(self) -> int:
        return len(self.history)

    def add_entry(self, entry: dict[str, Any]) -> bool:
        """Put round ``entry["round"]`` in the history (False: known already). A member that missed the
        notices of some rounds keeps a placeholder ``{"round": k, "missed": True}`` for each, filled if
        the entry comes later; the coordinator's own record and its heir's have no placeholders."""
        r = entry.get("round")
        if type(r) is not int or r < 0:
            raise ValueError("a history entry needs a non-negative integer round")
        if r < len(self.history):
            if not self.history[r].get("missed"):
                return False
            self.history[r] = entry
            return True
        if r - len(self.history) > 100_000:
            raise ValueError(f"history entry for round {r} is far beyond the record ({len(self.history)} rounds)")
        while len(self.history) < r:
            self.history.append({"round": len(self.history), "missed": True})
        self.history.append(entry)
        return True

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(), "status": self.status, "attempt": self.attempt, "parts": self.parts,
                "coordinator": f"{self.coordinator:016x}", "history": self.history, "events": self.events}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobRecord:
        """A stored record (ValueError, KeyError or ValidationError when it is not one)."""
        return cls(spec=JobSpec(**raw["spec"]), status=str(raw["status"]), attempt=int(raw["attempt"]),
                   parts=int(raw["parts"]), coordinator=int(str(raw["coordinator"]), 16),
                   history=[dict(e) for e in raw["history"]], events=[dict(e) for e in raw.get("events", [])])


@dataclass
class _Job:
    spec: JobSpec
    record: JobRecord
    allowed: bool  # the task is in this node's allowlist (otherwise: relay only, never train)
    version: int = 0  # the model version this node holds
    model: Any = None  # its payload (None for version 0)
    rank: int | None = None
    rank_provisional: bool = False  # assigned in round 0, from size estimates
    parts: int = 0
    root: Peer | None = None  # the coordinator of the latest notice
    heir: bool = False  # we are the coordinator's first child: we take over if it goes
    coordinating: bool = False
    round: int = -1  # the round and attempt of the latest notice
    attempt: int = -1
    own: dict[int, tuple[Any, int]] = field(default_factory=dict)  # round -> (update, count) kept for repair
    training: int | None = None
    trainer: bool = False
    opened_at: float = 0.0
    pull_at: float | None = None
    pull_step: int = 0
    path: tuple[Peer, ...] = ()
    children: list[tuple[Peer, int]] = field(default_factory=list)  # (child, its range's hi) this round
    hi: int = 0
    last_notice: JobRound | None = None
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # child id -> (its hi, members) last round
    pending_fanout: tuple[JobRound, Any, list[tuple[Peer, JobRound]], Peer, float] | None = None
    unacked: dict[int, tuple[JobRound, Any, float]] = field(default_factory=dict)  # child id -> notice
    restored_at: float | None = None
    resume_since: float | None = None
    takeover_at: float | None = None
    rounds_trained: int = 0


class JobMachine:
    """All the jobs of one node, composed in :class:`~mlfabric.core.node.NodeCore`.

    Ports: ``chord`` (routing entries, lookups, ownership), ``is_dead`` (the failure detector's
    verdicts), ``send(address, message)`` (the node's one outbox), ``strategy`` (payload arithmetic),
    ``tasks`` (the allowlist of tasks this node may run; None: any).
    """

    def __init__(self, me: Peer, cfg: JobsConfig, chord: ChordMachine, rng: random.Random,
                 strategy: Strategy[Any], *, send: Callable[[str, Message | WithPayload], None],
                 is_dead: Callable[[int], bool], tasks: Iterable[str] | None = None) -> None:
        self.me = me
        self.cfg = cfg
        self.chord = chord
        self.rng = rng
        self.strategy = strategy
        self._out = send
        self._is_dead = is_dead
        self.tasks = None if tasks is None else frozenset(tasks)
        self.jobs: dict[str, _Job] = {}
        self.events: deque[Event] = deque()
        self._lookups: dict[int, Callable[[LookupDone, float], None]] = {}
        self._joined_at: float | None = None
        self.agg: TreeAggregator[Any] = TreeAggregator(me, strategy, cfg, send=self._send, is_dead=self._dead,
                                                       repair=self._repair, finished=self._root_finished)
        self._now = 0.0
        self._committing: dict[tuple[str, int, int], RootResult[Any]] = {}
        self._timers: list[tuple[float, Callable[[float], None]]] = []  # short retries
        self.last_error: str | None = None
        self.counters = {"job_messages_in": 0, "job_messages_out": 0, "bad_messages": 0, "jobs_refused": 0,
                         "rounds_completed": 0, "rounds_trained": 0, "takeovers": 0, "notices_resent": 0,
                         "redelegations": 0, "result_requests": 0, "stale_messages": 0}

    # ---- host interface ------------------------------------------------------------------------

    def submit(self, spec: JobSpec, now: float) -> int:
        """Send ``spec`` to the coordinator (the owner of the job key); a JobSubmitted event follows."""
        def done(ev: LookupDone, t: float) -> None:
            self.events.append(JobSubmitted(ev.token, spec.job_id, ev.node))
            if ev.node is None:
                return
            if ev.node.id == self.me.id:
                self._on_submit(spec, t)
            else:
                self._send(ev.node, JobSubmit(spec.model_dump_json()))

        return self._lookup(job_key(spec.job_id), now, done)

    def trained(self, job: str, round_: int, payload: Any, now: float, count: int = 1) -> None:
        """The update this node trained for ``round_`` (``count`` updates in it: 1)."""
        self._now = now
        st = self.jobs.get(job)
        if st is None or st.training != round_:
            return
        st.training = None
        st.rounds_trained += 1
        self.counters["rounds_trained"] += 1
        if round_ < st.round or (st.round == round_ and st.version != round_):
            return  # the round moved on while we trained: too late
        st.own[round_] = (payload, count)
        for key in self.agg.instances(job, round_):
            self.agg.contribute(now, key, payload, count)

    def train_failed(self, job: str, round_: int, now: float) -> None:
        """Local training failed: cover our range with nothing this round."""
        st = self.jobs.get(job)
        if st is None or st.training != round_:
            return
        st.training = None
        st.own[round_] = (None, 0)
        for key in self.agg.instances(job, round_):
            self.agg.contribute(now, key, None, 0)

    def commit(self, job: str, round_: int, attempt: int, model: Any, metrics: dict[str, Any], now: float) -> None:
        """Coordinator: the next model made from RoundAggregated (``model`` None: unchanged), with the
        host's metrics (test loss and accuracy, say). Records the round and opens the next one."""
        self._now = now
        st = self.jobs.get(job)
        pend = self._committing.pop((job, round_, attempt), None)
        if st is None or not st.coordinating or pend is None or st.attempt != attempt or st.round != round_:
            return
        res: RootResult[Any] = pend
        entry: dict[str, Any] = {
            "round": round_, "attempt": attempt, "updates": res.count, "members": res.members,
            "missing_ranges": len((res.spans | res.empty).gaps()), "empty_ranges": len(res.empty),
            "repair_requests": res.repair_requests, "dropped_overlaps": res.dropped,
            "seconds": round(now - st.opened_at, 4), "recorded_by": f"{self.me.id:016x}"}
        entry.update({k: v for k, v in metrics.items() if k not in entry})
        wire_entry = json.dumps(entry, separators=(",", ":"))
        if len(wire_entry) > 2048:
            raise ValueError(f"the history entry of round {round_} is {len(wire_entry)} bytes; at most 2048 "
                             "(metrics too large)")
        full = dict(entry)
        if len(res.spans) <= self.cfg.record_spans_max:
            full["spans"] = [[f"{lo:016x}", f"{hi & MASK:016x}"] for lo, hi in res.spans.intervals]
        else:
            full["spans"] = f"{len(res.spans)} intervals (more than record_spans_max)"
        st.record.add_entry(full)
        if round_ == 0 and res.members > 0:
            st.record.parts = res.members  # counted, not estimated: the data partition from round 1 on
        self.counters["rounds_completed"] += 1
        self.events.append(RoundCompleted(job, round_, full))
        version = round_ + 1
        if model is not None or version > 0:
            st.model = model if model is not None else st.model
        st.version = version
        st.own.pop(round_, None)
        final = version >= (st.spec.rounds or 1)
        if final:
            st.record.status = "done"
        self._record_changed(st)  # the record first: a host persisting in order never has a model ahead of it
        self.events.append(ModelReceived(job, version, st.model))
        self._open_as_root(st, version, attempt, now, entry=wire_entry, final=final)
        if final:
            self.events.append(JobFinished(job, version))

    def restore(self, record: dict[str, Any], version: int, model: Any, rank: int | None, now: float) -> None:
        """After a restart: this node's stored copy of a job's record and the model it holds."""
        rec = JobRecord.from_json(record)
        st = self._job(rec.spec, now, rec)
        st.version, st.model, st.rank, st.parts = version, model, rank, rec.parts
        st.round, st.attempt = version - 1, rec.attempt
        st.restored_at = now

    def leave(self, now: float) -> None:
        """Graceful stop: hand the jobs we coordinate to our successor."""
        succ = self.chord.successor
        for st in self.jobs.values():
            if st.coordinating and st.record.status == "running" and succ.id != self.me.id:
                self._send(succ, JobHandover(st.spec.job_id, st.attempt))
                st.coordinating = False

    def status(self) -> dict[str, Any]:
        out = {}
        for name, st in sorted(self.jobs.items()):
            key = next(iter(self.agg.instances(name, st.round)), None)
            out[name] = {
                "job": name, "role": "coordinator" if st.coordinating else "member",
                "status": st.record.status, "round": st.round, "attempt": st.attempt,
                "model_version": st.version, "rank": st.rank, "parts": st.parts, "allowed": st.allowed,
                "coordinator": st.root.to_json() if st.root else None, "trainer": st.trainer,
                "rounds_trained": st.rounds_trained, "spec": st.spec.model_dump(),
                "history": st.record.history, "events": st.record.events,
                "tree": {"path": [p.to_json() for p in st.path], "children": [c.to_json() for c, _ in st.children],
                         "instance": self.agg.view(key) if key is not None else None},
            }
        return out

    # ---- inputs ------------------------------------------------------------------------------------

    def receive(self, src: Peer, msg: Message | WithPayload, now: float) -> None:
        self._now = now
        payload = None
        if isinstance(msg, WithPayload):
            msg, payload = msg.msg, msg.payload
        self.counters["job_messages_in"] += 1
        try:
            match msg:
                case JobSubmit():
                    self._on_submit(JobSpec.model_validate_json(msg.spec), now)
                case JobRound():
                    self._on_round(src, msg, payload, now)
                case JobPartial() | JobAck() | JobPending():
                    self.agg.receive(now, src, msg, payload)
                case JobRoundAck():
                    self._on_round_ack(src, msg, now)
                case JobResultRequest():
                    self._on_result_request(src, msg)
                case JobHandover():
                    st = self.jobs.get(msg.job)
                    if st is not None and not st.coordinating and st.record.status == "running":
                        self._take_over(st, now, "handed over", min_attempt=msg.attempt + 1)
        except (ValidationError, RemoteProtocolError, ValueError) as exc:
            self.counters["bad_messages"] += 1
            self.last_error = f"bad {type(msg).__name__} from {src.address}: {(str(exc).splitlines() or ['?'])[0]}"
            self.events.append(JobInputRejected(src, self.last_error))

    def on_event(self, ev: Event, now: float) -> bool:
        """An event of the other machines; True when it was ours (a lookup we started) and is consumed."""
        self._now = now
        match ev:
            case LookupDone() if ev.token in self._lookups:
                self._lookups.pop(ev.token)(ev, now)
                return True
            case PeerDied() | PeerPurged():
                self.peer_gone(ev.peer.id, now)
                if isinstance(ev, PeerDied) and ev.exact and ev.pred is not None and ev.pred.id == self.me.id:
                    self._report_empty_successor(ev.peer.id, now)
            case PredecessorChanged():
                self._schedule_takeover_checks(now)
            case Joined():
                self._joined_at = now
        return False

    def peer_gone(self, node: int, now: float) -> None:
        """``node`` died or left: fail over what waits on it, re-delegate its range, maybe take over."""
        self.agg.peer_dead(now, node)
        for st in self.jobs.values():
            if st.root is not None and any(c.id == node for c, _ in st.children):
                self._close_dead_child(st, node, now)
            un = st.unacked.pop(node, None)
            if un is not None:
                self._redelegate(st, node, un, now)
            if st.pending_fanout is not None and st.pending_fanout[3].id == node:
                self._release_fanout(st, now)
            if st.root is not None and st.root.id == node and not st.coordinating:
                st.takeover_at = now + self.cfg.takeover_delay
            if st.pull_at is not None and st.path and st.path[-1].id == node:
                st.pull_at = now  # our parent is gone: ask the next ancestor for the result now

    def handle_timer(self, now: float) -> None:
        self._now = now
        self.agg.handle_timer(now)
        if self._timers:
            due = [fn for at, fn in self._timers if at <= now]
            self._timers = [(at, fn) for at, fn in self._timers if at > now]
            for fn in due:
                fn(now)
        for st in list(self.jobs.values()):
            if st.pending_fanout is not None and now >= st.pending_fanout[4]:
                self._release_fanout(st, now)
            for child, (notice, payload, at) in list(st.unacked.items()):
                if now >= at + self.cfg.ack_timeout:
                    self.counters["notices_resent"] += 1
                    st.unacked[child] = (notice, payload, now)
                    peer = next((c for c, _ in st.children if c.id == child), None)
                    if peer is not None:
                        self._send_notice(peer, notice, payload)
            if st.pull_at is not None and now >= st.pull_at:
                self._pull(st, now)
            if st.takeover_at is not None and now >= st.takeover_at:
                st.takeover_at = None
                self._check_takeover(st, now)
            if (st.restored_at is not None and self.chord.joined and self._joined_at is not None
                    and now >= max(st.restored_at, self._joined_at) + self.cfg.resume_settle):
                self._maybe_resume(st, now)

    def next_deadline(self) -> float | None:
        times = [self.agg.next_deadline(), *(at for at, _ in self._timers)]
        for st in self.jobs.values():
            if st.pending_fanout is not None:
                times.append(st.pending_fanout[4])
            times += [at + self.cfg.ack_timeout for _, _, at in st.unacked.values()]
            times += [st.pull_at, st.takeover_at]
            if st.restored_at is not None and self._joined_at is not None:
                times.append(max(st.restored_at, self._joined_at) + self.cfg.resume_settle)
        best = min((t for t in times if t is not None), default=None)
        return best

    # ---- plumbing ------------------------------------------------------------------------------------

    def _send(self, peer: Peer, msg: Message | WithPayload) -> None:
        self.counters["job_messages_out"] += 1
        self._out(peer.address, msg)

    def _dead(self, node: int) -> bool:
        return self._is_dead(node)

    def _later(self, at: float, fn: Callable[[float], None]) -> None:
        self._timers.append((at, fn))

    def _lookup(self, key: int, now: float, done: Callable[[LookupDone, float], None]) -> int:
        token = self.chord.lookup(key, now)
        self._lookups[token] = done
        return token

    def _owns(self, key: int) -> bool:
        pred = self.chord.predecessor
        if pred is None:
            return not self.chord.successors  # alone on the ring
        return in_half_open(key, pred.id, self.me.id)

    def _job(self, spec: JobSpec, now: float, record: JobRecord | None = None) -> _Job:
        st = self.jobs.get(spec.job_id)
        if st is None:
            allowed = self.tasks is None or spec.task in self.tasks
            if not allowed:
                self.counters["jobs_refused"] += 1
            st = self.jobs[spec.job_id] = _Job(spec, record or JobRecord(spec), allowed)
        return st

    def _record_changed(self, st: _Job) -> None:
        self.events.append(RecordChanged(st.spec.job_id, st.record.to_json()))

    # ---- coordinator ---------------------------------------------------------------------------------

    def _on_submit(self, spec: JobSpec, now: float) -> None:
        if spec.rounds is None:
            raise ValueError(f"job {spec.job_id}: no round count (the submitting node fills in the task's)")
        if spec.job_id in self.jobs:
            return  # known already: a second submit changes nothing
        st = self._job(spec, now)
        if not st.allowed:
            del self.jobs[spec.job_id]
            raise ValueError(f"job {spec.job_id}: task {spec.task!r} is not in this node's allowed tasks")
        st.record.coordinator = self.me.id
        st.coordinating = True
        st.record.events.append({"event": "submitted", "round": 0, "attempt": 0, "node": f"{self.me.id:016x}"})
        self.events.append(CoordinatorChanged(spec.job_id, 0, 0, "submitted"))
        self._record_changed(st)
        self._open_as_root(st, 0, 0, now)

    def _maybe_resume(self, st: _Job, now: float) -> None:
        """After a restart, the owner of the job key resumes the job once the ring around it has formed:
        it knows as many successors as the last round's members allow (a node that started first and is
        alone would otherwise resume by itself). Bounded: after ``10 * resume_settle`` it resumes anyway."""
        assert st.restored_at is not None
        if st.coordinating or st.record.status != "running" or st.round >= st.version:
            st.restored_at = None  # a coordinator's notice reached us meanwhile: nothing to resume
            return
        if not self._owns(job_key(st.spec.job_id)):
            # the ring may still change; the owner resumes. We look again in half a settle period (our
            # timer must move on: left in the past it fired at once, forever)
            st.restored_at = now - self.cfg.resume_settle / 2
            return
        last = st.record.history[-1].get("members", 0) if st.record.history else 0
        want = min(self.chord.cfg.successors, max(0, int(last) - 1)) if isinstance(last, int) else 0
        if st.resume_since is None:
            st.resume_since = now
        if len(self.chord.successors) < want and now - st.resume_since < 10 * self.cfg.resume_settle:
            st.restored_at = now - self.cfg.resume_settle / 2  # not yet: look again in half a settle period
            return
        st.restored_at = None
        self._take_over(st, now, "resumed after restart", min_attempt=st.record.attempt + 1)

    def _check_takeover(self, st: _Job, now: float) -> None:
        if st.coordinating or st.record.status != "running" or st.root is None:
            return
        if not self._is_dead(st.root.id):
            return  # it is back (or the verdict was withdrawn)
        if st.heir or self._owns(job_key(st.spec.job_id)):
            self._take_over(st, now, f"coordinator {st.root.id:016x} gone", min_attempt=st.attempt + 1)
        else:
            st.takeover_at = now + self.cfg.takeover_delay  # the ring is still repairing: look again

    def _schedule_takeover_checks(self, now: float) -> None:
        for st in self.jobs.values():
            if (not st.coordinating and st.root is not None and st.record.status == "running"
                    and self._is_dead(st.root.id) and st.takeover_at is None):
                st.takeover_at = now

    def _take_over(self, st: _Job, now: float, why: str, min_attempt: int) -> None:
        attempt = max(min_attempt, st.attempt + 1, st.record.attempt + 1)
        st.coordinating = True
        st.record.coordinator = self.me.id
        st.record.attempt = attempt
        round_ = st.version
        st.record.events.append({"event": why, "round": round_, "attempt": attempt, "node": f"{self.me.id:016x}"})
        self.counters["takeovers"] += 1
        self.events.append(CoordinatorChanged(st.spec.job_id, round_, attempt, why))
        self._record_changed(st)
        entry = ""
        if round_ > 0 and st.record.history and st.record.history[-1].get("round") == round_ - 1:
            entry = json.dumps({k: v for k, v in st.record.history[-1].items() if k != "spans"},
                               separators=(",", ":"))
        final = round_ >= (st.spec.rounds or 1)
        self._open_as_root(st, round_, attempt, now, entry=entry, final=final)

    def _open_as_root(self, st: _Job, round_: int, attempt: int, now: float, entry: str = "",
                      final: bool = False) -> None:
        if st.record.parts == 0:
            st.record.parts = 1 + sum(self._estimate(0, lo, hi) for _, lo, hi in self._split(0, SIZE))
        st.record.attempt = attempt
        quota = st.spec.nodes_per_round or ALL_TRAIN
        notice = JobRound(st.spec.job_id, st.spec.model_dump_json(), round_, attempt, self.me, 0, (), quota,
                          0, st.record.parts, entry, with_model=round_ > 0 and st.model is not None, final=final)
        self._apply_notice(st, self.me, notice, st.model if notice.with_model else None, now, commit_first=True)

    def _root_finished(self, res: RootResult[Any]) -> None:
        job, round_, attempt, _ = res.key
        st = self.jobs.get(job)
        if st is None or not st.coordinating or (st.round, st.attempt) != (round_, attempt):
            return
        self._committing[(job, round_, attempt)] = res
        self.events.append(RoundAggregated(job, round_, attempt, res.payload, res.count, res.members))

    def _repair(self, key: InstanceKey, gaps: list[tuple[int, int]], now: float) -> None:
        """Root: for each gap, find its first live member on the ring and ask it to re-cover the gap."""
        job, round_, attempt, _ = key
        st = self.jobs.get(job)
        if st is None:
            return
        for lo, hi in gaps:
            self._find_gap_member(key, lo, hi, now, skips=0)

    def _find_gap_member(self, key: InstanceKey, lo: int, hi: int, now: float, skips: int) -> None:
        """Look up the first live node at or after distance ``lo`` (from us, the root); ask it to re-cover
        ``[its distance, hi)``; the part before it holds no live node. A node the detector has declared
        dead is stepped over (at most 8 in a row per gap and repair round)."""
        job, round_, attempt, _ = key

        def found(ev: LookupDone, t: float) -> None:
            cur = self.jobs.get(job)
            if cur is None or (cur.round, cur.attempt) != (round_, attempt) or ev.node is None:
                return
            d = distance(self.me.id, ev.node.id)
            if ev.node.id == self.me.id or not lo <= d < hi:
                self.agg.gap_empty(t, key, lo, hi)  # the first live node after the gap's start is past it
                return
            if d > lo:
                self.agg.gap_empty(t, key, lo, d)  # nobody lives between the gap's start and this node
            if self._is_dead(ev.node.id):
                self.agg.gap_empty(t, key, d, d + 1)
                if skips < 8 and d + 1 < hi:
                    self._find_gap_member(key, d + 1, hi, t, skips + 1)
                return
            notice = JobRound(job, cur.spec.model_dump_json(), round_, attempt, self.me, hi & MASK, (self.me,),
                              ALL_TRAIN if not cur.spec.nodes_per_round else 0, 0, cur.parts, repair=True)
            self._send(ev.node, notice)

        self._lookup((self.me.id + lo) & MASK, now, found)

    # ---- members -------------------------------------------------------------------------------------

    def _on_round(self, src: Peer, msg: JobRound, payload: Any, now: float) -> None:
        spec = JobSpec.model_validate_json(msg.spec)
        if spec.job_id != msg.job or spec.rounds is None:
            raise RemoteProtocolError("job round notice: the spec does not match the job")
        if msg.with_model and payload is None:
            raise RemoteProtocolError("job round notice says it carries a model, and has none")
        if not msg.catchup and not msg.final:
            # Checked before anything is applied: a bad notice must not take the place of the good one.
            if (msg.hi or SIZE) <= distance(msg.root.id, self.me.id):
                raise RemoteProtocolError("job round notice: an empty range")
            if len(msg.path) >= MAX_PATH:
                raise RemoteProtocolError(f"job round notice: path longer than {MAX_PATH - 1}")
        if not msg.catchup:
            self._send(src, JobRoundAck(msg.job, msg.round, msg.attempt))
        st = self._job(spec, now)
        self._apply_notice(st, src, msg, payload, now)

    def _apply_notice(self, st: _Job, src: Peer, msg: JobRound, payload: Any, now: float,
                      commit_first: bool = False) -> None:
        job = st.spec.job_id
        newer = (msg.attempt, msg.round) > (st.attempt, st.round)
        if msg.repair:
            if (msg.attempt, msg.round) == (st.attempt, st.round):
                self._open_range(st, msg, now, repair=True)
            else:
                self.counters["stale_messages"] += 1
            return
        if not newer and not (msg.catchup and msg.round > st.version):
            self.counters["stale_messages"] += 1
            return
        if st.rank is None or (st.rank_provisional and msg.round >= 1 and not msg.catchup):
            # Round 0's ranks and part count come from estimates of the subtree sizes; from round 1 on
            # they come from the sizes counted in round 0, and a node's part stays fixed from then on.
            if (st.rank, st.parts) != (msg.rank, msg.parts):
                st.rank, st.parts = msg.rank, msg.parts
                self.events.append(JobSeen(job, st.spec, msg.rank, msg.parts))
            st.rank_provisional = msg.round == 0 or msg.catchup
        if msg.entry:
            entry = json.loads(msg.entry)
            if not isinstance(entry, dict):
                raise RemoteProtocolError("job round notice: the history entry is not an object")
            if st.record.add_entry(entry):
                self._record_changed(st)
        if msg.with_model and msg.round > st.version and st.allowed:
            st.model, st.version = payload, msg.round
            self.events.append(ModelReceived(job, msg.round, payload))
        if msg.final:
            if st.record.status != "done":
                st.record.status = "done"
                self._record_changed(st)
                self.events.append(JobFinished(job, msg.round))
        if msg.catchup:
            if st.pull_at is not None and st.version >= st.round + 1:
                st.pull_at = None
            return
        # A newer round or attempt: what we kept for older rounds goes, the new tree forms.
        if st.round >= 0 and st.children:
            # What each child's subtree held last round: the size estimate for the next split.
            got = self.agg.members_from((job, st.round, st.attempt, distance(st.root.id, self.me.id))) \
                if st.root is not None else {}
            st.sizes = {c.id: (h, got[c.id]) for c, h in st.children if c.id in got}
        if msg.root.id != self.me.id and st.coordinating:
            st.coordinating = False  # someone with a newer attempt coordinates now
        st.round, st.attempt, st.root = msg.round, msg.attempt, msg.root
        st.record.attempt = max(st.record.attempt, msg.attempt)
        st.record.coordinator = msg.root.id
        st.heir = len(msg.path) == 1 and msg.rank == 1
        for r in [r for r in st.own if r < msg.round]:
            del st.own[r]
        self.agg.forget(job, (msg.attempt, msg.round))
        st.pull_at, st.pull_step, st.takeover_at = None, 0, None
        st.unacked.clear()
        st.pending_fanout = None
        st.opened_at = now
        st.last_notice = msg
        if msg.final:
            self._forward(st, msg, payload, now, commit_first)
            return
        self._open_range(st, msg, now, repair=False, payload=payload, commit_first=commit_first)

    def _split(self, lo: int, hi: int) -> list[tuple[Peer, int, int]]:
        """This node's children for the range ``[lo, hi)`` (distances from the root; ``lo`` is ours):
        ``(child, its lo, its hi)``, the successor first, then the routing entries nearest the range's
        quantiles (``tree_fanout`` in all)."""
        span = (hi or SIZE) - lo
        dists, peers = self.chord.routing_entries()
        n = bisect_left(dists, span)
        cands = [(dists[i], peers[i]) for i in range(n) if not self._is_dead(peers[i].id)]
        if not cands:
            return []
        cd = [d for d, _ in cands]
        chosen = [0]
        for j in range(1, self.cfg.tree_fanout):
            target = span * j // self.cfg.tree_fanout
            i = bisect_left(cd, target)
            if i >= len(cd) or (i > 0 and target - cd[i - 1] < cd[i] - target):
                i -= 1
            if i > chosen[-1]:
                chosen.append(i)
        out = []
        for k, i in enumerate(chosen):
            c_lo = lo + cd[i]
            c_hi = lo + cd[chosen[k + 1]] if k + 1 < len(chosen) else (hi or SIZE)
            out.append((cands[i][1], c_lo, c_hi))
        return out

    def _estimate(self, root_lo: int, a: int, b: int) -> int:
        """About how many members live in ``[a, b)`` (distances from the root; ``root_lo`` is ours).

        The routing entries in the range are counted; so is what is known to hold nobody: everything up
        to the last successor (the list is contiguous) and, for each finger i, the stretch from
        ``me + 2**i`` to the finger (it is the first node there). Only the rest is estimated, from the
        successor list's density. Exact on small rings, where the entries know every node."""
        succ = self.chord.successors
        if not succ:
            return 0
        me = self.me.id
        lo_d, hi_d = a - root_lo, b - root_lo
        dists, _ = self.chord.routing_entries()
        known = bisect_left(dists, hi_d) - bisect_left(dists, lo_d)
        sd = sorted(distance(me, s.id) for s in succ)
        if len(succ) < self.chord.cfg.successors or sd[-1] >= hi_d - 1:
            return known  # the successor list covers the range
        empty = [(0, sd[-1] + 1)]
        pred = self.chord.predecessor
        if pred is not None and pred.id != me:
            pd = distance(me, pred.id)
            empty.append((pd, SIZE))  # from our predecessor on to us there is nobody else
            if lo_d <= pd < hi_d and not self.chord.holds_entry(pred.id):
                known += 1
        for i, f in enumerate(self.chord.fingers):
            if f is not None and distance(me, f.id) > (1 << i):
                empty.append((1 << i, distance(me, f.id)))
        unknown = sum(h - lo for lo, h in Spans(empty).gaps(lo_d, hi_d))
        # Mean spacing: the successor list is len(sd) spacings; each finger's stretch from its start to
        # the finger is one more (the distance from a point to the next node has the same mean).
        stretches = [h - lo for lo, h in empty[1:] if h < SIZE]
        density = (len(sd) + len(stretches)) / max(1, sd[-1] + sum(stretches))
        return known + round(unknown * density)

    def _open_range(self, st: _Job, msg: JobRound, now: float, *, repair: bool, payload: Any = None,
                    commit_first: bool = False) -> None:
        job = st.spec.job_id
        root_id = msg.root.id
        lo = distance(root_id, self.me.id)
        hi = msg.hi or SIZE
        if hi <= lo:
            raise RemoteProtocolError("job round notice: an empty range")
        if len(msg.path) >= MAX_PATH:
            raise RemoteProtocolError(f"job round notice: path longer than {MAX_PATH} (the tree cannot be that deep)")
        kids = self._split(lo, hi)
        sizes = [known[1] if (known := st.sizes.get(c.id)) is not None and known[0] == c_hi
                 else self._estimate(lo, c_lo, c_hi) for c, c_lo, c_hi in kids]
        # Who trains: the range's quota apportioned over ourselves and the children's estimated sizes.
        if msg.quota == ALL_TRAIN:
            quotas, me_trains = [ALL_TRAIN] * len(kids), True
        else:
            shares = _apportion(msg.quota, [1] + sizes, self.rng)
            me_trains, quotas = shares[0] > 0, shares[1:]
        path = (*msg.path, self.me) if root_id != self.me.id else (self.me,)
        rank = msg.rank + 1
        notices: list[tuple[Peer, JobRound]] = []
        for (child, _, c_hi), q, size in zip(kids, quotas, sizes, strict=True):
            notices.append((child, JobRound(job, msg.spec, msg.round, msg.attempt, msg.root, c_hi & MASK, path, q,
                                            rank, msg.parts, msg.entry, with_model=msg.with_model and not repair,
                                            repair=repair)))
            rank += size
        own_hi = kids[0][1] if kids else hi
        key = (job, msg.round, msg.attempt, lo)
        levels = max(1, math.ceil(math.log2(1 + sum(sizes)))) if kids else 0
        if repair and self.agg.has(key):
            # We took part in this round already: what we sent up may sit at a parent that died after
            # acknowledging it. It goes again, straight to the root; the repair goes on only into the
            # parts of the gap we hold nothing of.
            held = self.agg.counted(key)
            self._fan_out(st, [n for n, (_, c_lo, c_hi) in zip(notices, kids, strict=True)
                               if not held.covers(c_lo, c_hi)], payload, now, False)
            self.agg.repair_request(now, key)
            return
        self.agg.open(now, key, msg.root, hi & MASK, own_hi & MASK, () if root_id == self.me.id else msg.path,
                      levels)
        if not repair:
            st.path = msg.path
            st.children = [(c, c_hi) for c, _, c_hi in kids]
            st.hi = hi
        for child, notice in notices:
            if not repair:
                st.unacked[child.id] = (notice, payload if notice.with_model else None, now)
        self._fan_out(st, notices, payload, now, commit_first and not repair and msg.with_model)
        # Our own part.
        can_train = st.allowed and st.version == msg.round and me_trains and not repair
        if repair:
            kept = st.own.get(msg.round)
            if kept is not None:
                self.agg.contribute(now, key, kept[0], kept[1])
            elif st.training == msg.round:
                self.agg.pending(key)
            else:
                self.agg.contribute(now, key, None, 0)
            return
        st.trainer = can_train
        kept = st.own.get(msg.round)
        if kept is not None and can_train:
            self.agg.contribute(now, key, kept[0], kept[1])  # trained in an earlier attempt: no retraining
        elif can_train:
            if st.training != msg.round:
                st.training = msg.round
                self.events.append(TrainRequested(job, msg.round))
        else:
            self.agg.contribute(now, key, None, 0)
        if root_id != self.me.id:
            st.pull_at = now + self.cfg.result_timeout + self.cfg.max_wait

    def _forward(self, st: _Job, msg: JobRound, payload: Any, now: float, commit_first: bool) -> None:
        """The final notice goes down the tree like any other, without an instance."""
        root_id = msg.root.id
        lo = distance(root_id, self.me.id)
        kids = self._split(lo, msg.hi or SIZE)
        path = (*msg.path, self.me) if root_id != self.me.id else (self.me,)
        notices = [(c, JobRound(msg.job, msg.spec, msg.round, msg.attempt, msg.root, c_hi & MASK, path, msg.quota,
                                msg.rank + 1, msg.parts, msg.entry, with_model=msg.with_model, final=True))
                   for c, _, c_hi in kids]
        st.children = [(c, c_hi) for c, _, c_hi in kids]
        for child, notice in notices:
            st.unacked[child.id] = (notice, payload if notice.with_model else None, now)
        self._fan_out(st, notices, payload, now, commit_first and msg.with_model)

    def _fan_out(self, st: _Job, notices: list[tuple[Peer, JobRound]], payload: Any, now: float,
                 commit_first: bool) -> None:
        if not notices:
            return
        if commit_first and len(notices) > 1:
            # The heir first: any holder of this result implies the heir holds it (see the module doc).
            first, rest = notices[0], notices[1:]
            self._send_notice(first[0], first[1], payload)
            st.pending_fanout = (first[1], payload, rest, first[0], now + self.cfg.ack_timeout)
            return
        for child, notice in notices:
            self._send_notice(child, notice, payload)

    def _release_fanout(self, st: _Job, now: float) -> None:
        pend, st.pending_fanout = st.pending_fanout, None
        if pend is not None:
            _, payload, rest, _, _ = pend
            for child, notice in rest:
                self._send_notice(child, notice, payload)

    def _send_notice(self, child: Peer, notice: JobRound, payload: Any) -> None:
        if notice.with_model:
            self._send(child, WithPayload(notice, payload, self.strategy.nbytes(payload) if payload is not None else 0))
        else:
            self._send(child, notice)

    def _on_round_ack(self, src: Peer, msg: JobRoundAck, now: float) -> None:
        st = self.jobs.get(msg.job)
        if st is None or (msg.attempt, msg.round) != (st.attempt, st.round):
            return
        st.unacked.pop(src.id, None)
        if st.pending_fanout is not None and st.pending_fanout[3].id == src.id:
            self._release_fanout(st, now)

    def _report_empty_successor(self, dead: int, now: float) -> None:
        """We detected our successor's death and know the next live node exactly: the dead node's own range
        holds nobody alive. Tell each open round's root directly (one small message per death), since
        the dead node's parent may be dead too and nobody else could close that gap before the root's
        repair."""
        nxt = self.chord.successor
        if nxt.id in (dead, self.me.id):
            return
        for st in self.jobs.values():
            if st.root is None or st.record.status != "running" or st.round < 0:
                continue
            root_id = st.root.id
            lo, hi = distance(root_id, dead), distance(root_id, nxt.id)
            if not 0 < lo < hi:
                continue
            key = (st.spec.job_id, st.round, st.attempt, 0)
            if st.coordinating:
                self.agg.gap_empty(now, key, lo, hi)
            elif not self._is_dead(root_id):
                self._send(st.root, JobPartial(st.spec.job_id, st.round, st.attempt, 0, Spans.of(lo, hi).flat(), 0, 0))

    def _close_dead_child(self, st: _Job, dead: int, now: float, tries: int = 0) -> None:
        """A child of ours died this round: the range from it to the next live node holds nobody alive
        (its own part); cover it with nothing so we need not wait out our deadline for it (its children
        send their partials to us, their next ancestor)."""
        if st.root is None or not any(c.id == dead for c, _ in st.children):
            return
        root_id, job, round_, attempt = st.root.id, st.spec.job_id, st.round, st.attempt
        key = (job, round_, attempt, distance(root_id, self.me.id))
        child_hi = next(h for c, h in st.children if c.id == dead)
        d_dead = distance(root_id, dead)

        def found(ev: LookupDone, t: float) -> None:
            cur = self.jobs.get(job)
            if cur is None or (cur.round, cur.attempt) != (round_, attempt) or ev.node is None:
                return
            if ev.node.id == dead or self._is_dead(ev.node.id):
                if tries < 4:  # the ring has not dropped it yet: look again shortly
                    self._later(t + self.cfg.takeover_delay / 2, lambda t2: self._close_dead_child(st, dead, t2, tries + 1))
                return
            d_next = distance(root_id, ev.node.id)
            end = child_hi if ev.node.id == root_id or not d_dead < d_next < child_hi else d_next
            self.agg.add_empty(t, key, d_dead, end)

        self._lookup((dead + 1) & MASK, now, found)

    def _redelegate(self, st: _Job, dead: int, unacked: tuple[JobRound, Any, float], now: float) -> None:
        """A child died before it acknowledged its notice: give its range to the next routing entry in it."""
        notice, payload, _ = unacked
        root_id = notice.root.id
        lo = distance(root_id, self.me.id)
        d_dead = next((distance(root_id, c.id) for c, _ in st.children if c.id == dead), None)
        hi = notice.hi or SIZE
        if d_dead is None:
            return
        dists, peers = self.chord.routing_entries()
        for d, p in zip(dists, peers, strict=True):
            pd = lo + d
            if d_dead < pd < hi and p.id != dead and not self._is_dead(p.id):
                self.counters["redelegations"] += 1
                new = JobRound(notice.job, notice.spec, notice.round, notice.attempt, notice.root, notice.hi,
                               notice.path, notice.quota, notice.rank, notice.parts, notice.entry,
                               with_model=notice.with_model, final=notice.final, repair=notice.repair)
                st.children = [(c, h) for c, h in st.children if c.id != dead] + [(p, hi)]
                st.unacked[p.id] = (new, payload, now)
                self._send_notice(p, new, payload)
                return
            if pd >= hi:
                break

    def _pull(self, st: _Job, now: float) -> None:
        """We have waited long for the next notice: ask our ancestors, nearest first, one per timeout."""
        ups = [p for p in reversed(st.path) if not self._is_dead(p.id)]
        if not ups:
            st.pull_at = None
            return
        target = ups[min(st.pull_step, len(ups) - 1)]
        st.pull_step += 1
        self.counters["result_requests"] += 1
        self._send(target, JobResultRequest(st.spec.job_id, st.round + 1))
        st.pull_at = now + self.cfg.result_timeout

    def _on_result_request(self, src: Peer, msg: JobResultRequest) -> None:
        st = self.jobs.get(msg.job)
        if st is None or st.last_notice is None or st.version < msg.round:
            return
        n = st.last_notice
        entry = ""
        if st.record.history and st.record.history[-1].get("round") == st.version - 1:
            entry = json.dumps({k: v for k, v in st.record.history[-1].items() if k != "spans"},
                               separators=(",", ":"))
        reply = JobRound(n.job, n.spec, st.version, st.attempt, n.root, 0, (), 0, 0, st.parts, entry,
                         with_model=st.version > 0 and st.model is not None, final=st.record.status == "done",
                         catchup=True)
        self._send_notice(src, reply, st.model if reply.with_model else None)


def _apportion(quota: int, weights: list[int], rng: random.Random) -> list[int]:
    """``quota`` split over ``weights`` in proportion (largest remainder, ties by the RNG); the first
    share, this node's own, is at most 1."""
    total = sum(weights)
    if total <= 0 or quota <= 0:
        return [0] * len(weights)
    raw = [quota * w / total for w in weights]
    shares = [int(x) for x in raw]
    shares[0] = min(shares[0], 1)
    left = quota - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(raw[i] - int(raw[i])), rng.random()))
    for i in order:
        if left <= 0:
            break
        if i == 0 and shares[0] >= 1:
            continue
        if weights[i] <= 0:
            continue
        shares[i] += 1
        left -= 1
    # What our own share could not take (it holds one at most) goes to the children in proportion: a
    # quota above the estimated sizes must not leak (the estimates may be low; a subtree caps itself).
    kids = [i for i in range(1, len(weights)) if weights[i] > 0]
    if left > 0 and kids:
        wk = sum(weights[i] for i in kids)
        add = [left * weights[i] // wk for i in kids]
        for i, a in zip(kids, add, strict=True):
            shares[i] += a
        left -= sum(add)
        for i in sorted(kids, key=lambda i: -weights[i])[:left]:
            shares[i] += 1
    return shares
