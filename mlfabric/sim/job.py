"""``mlfabric sim job``: whole training jobs on the deterministic simulator, with exact payloads.

N real :class:`~mlfabric.core.node.NodeCore` objects, each with the job machine of core/jobs.py,
run on :class:`~mlfabric.sim.network.SimNetwork`; this module is only the *host* side of that
machine, the part the asyncio runtime plays on real servers:

- ``TrainRequested``: after a virtual training time (log-normal, median 1 s, sigma 0.3; a
  ``stragglers`` fraction of the trainings of a round take 4 times as long) the host calls
  ``node.jobs.trained(job, round, Counter({node id: 1}), now)``;
- ``RoundAggregated`` (coordinator): ``node.jobs.commit(job, round, attempt, payload, {}, now)`` at
  once; the committed tally is the next "model" and travels down the tree like a real one (charged
  ``model_bytes`` on every link, as is every partial).

An update is the tally ``{node id: 1}`` and merging adds tallies, so a round's result says exactly
whose updates it holds and how often. The accounting per committed round:

- ``expected``: trainers whose update was handed to their node for that round before the round
  committed and that were alive at the commit, plus dead ones whose update made it in;
- ``counted``: updates in the result (the sum of the tally);
- ``lost``: trained, alive at the commit, not in the result;
- ``duplicated``: the sum of (count - 1) over ids counted more than once;
- ``dead_included``: in the result, dead (crashed or left) at the commit: allowed, reported;
- ``unexpected``: in the result without having trained for that round (never allowed).

The ring is made either ``ideal`` (routing installed with :meth:`NodeCore.install` from the true
sorted ids, the default above 2,000 nodes) or through the real join protocol (``protocol``, as
``sim ring`` does it) before the job is submitted. Scenarios: aggregators killed mid-round (nodes
with children in that round's tree, crashed at a random moment after they forwarded the round's
notice and before they could send their partial: before their own training ends), the coordinator
crashed right after it opened a round, churn (joins through the join protocol and graceful leaves
during the job), trainer sampling, and a whole-cluster restart (``JobSim.restart_all``: new cores
with the same ids and addresses restore what the old ones' events said). Message and byte counts
cover the job protocol only (core.jobs.JOB_MESSAGES and payload-carrying items), not the overlay.
"""

from __future__ import annotations

import bisect
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlfabric.config import FailureConfig, JobsConfig, OverlayConfig
from mlfabric.core.aggregate import WithPayload
from mlfabric.core.events import (
    CoordinatorChanged,
    Event,
    JobFinished,
    JobSeen,
    Joined,
    ModelReceived,
    RecordChanged,
    RoundAggregated,
    RoundCompleted,
    TrainRequested,
)
from mlfabric.core.jobs import JOB_MESSAGES, JobSpec
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, MASK, ring_id
from mlfabric.sim.ring import RingSim
from mlfabric.wire.codec import encode
from mlfabric.wire.messages import ALL_TRAIN, JobPartial, JobRound, Peer

__all__ = ["JobRun", "JobSim", "Tally", "run_job"]

Progress = Callable[[str, float], None]
JOB = "sim"
IDEAL_ABOVE = 2000  # ring "auto": ideal routing above this many nodes, the join protocol up to it


class Tally:
    """Exact payloads: a Counter {node id: updates}; merging adds (a new Counter: a payload object is
    shared between nodes in the simulator, so nothing may change one in place); every payload is
    charged ``model_bytes`` on the wire, the size of the model it stands for."""

    def __init__(self, model_bytes: int = 1 << 20) -> None:
        self.model_bytes = model_bytes

    def merge(self, into: Counter[int], other: Counter[int]) -> Counter[int]:
        out = Counter(into)
        out.update(other)
        return out

    def copy(self, payload: Counter[int]) -> Counter[int]:
        return Counter(payload)

    def nbytes(self, payload: Counter[int]) -> int:
        return self.model_bytes


@dataclass
class JobRun:
    """One ``sim job`` experiment."""

    nodes: int
    rounds: int = 10
    seed: int = 1
    ring: str = "auto"  # auto | ideal | protocol
    kill_aggregators: int = 0
    kill_round: int | str = 1  # a round, or "spread" (evenly over the rounds)
    kill_coordinator: int | None = None  # crash the coordinator right after it opens this round
    churn: float = 0.0  # churn events per virtual second during the job (half joins, half leaves)
    nodes_per_round: int = 0
    stragglers: float = 0.0
    model_bytes: int = 1 << 20
    train_median: float = 1.0
    train_sigma: float = 0.3
    straggler_factor: float = 4.0
    latency: tuple[float, float] = (0.001, 0.020)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    warmup: float = 1.0  # virtual seconds between the ring being ready and the submission
    limit: float | None = None  # virtual seconds the job may take (default: generous, from the config)
    kill_decide_after: float = 0.3  # after a round opens, when its victims are chosen among the forwarders

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.rounds < 1:
            raise ValueError("need at least 1 node and 1 round")
        if self.ring not in ("auto", "ideal", "protocol"):
            raise ValueError(f"unknown ring {self.ring!r} (auto, ideal or protocol)")
        if not 0 <= self.kill_aggregators < self.nodes:
            raise ValueError("kill_aggregators must be in [0, nodes)")
        if isinstance(self.kill_round, str) and self.kill_round != "spread":
            raise ValueError("kill_round is a round number or 'spread'")
        if self.kill_coordinator is not None and not 0 <= self.kill_coordinator < self.rounds:
            raise ValueError("kill_coordinator must be a round of the job")
        if self.nodes_per_round >= ALL_TRAIN:
            raise ValueError(f"nodes_per_round must be below {ALL_TRAIN}")
        if self.churn < 0 or not 0 <= self.stragglers <= 1 or self.nodes_per_round < 0:
            raise ValueError("churn, stragglers and nodes_per_round must not be negative (stragglers at most 1)")

    @property
    def ring_kind(self) -> str:
        if self.ring == "auto":
            return "ideal" if self.nodes > IDEAL_ABOVE else "protocol"
        return self.ring

    def kill_plan(self) -> dict[int, int]:
        """Round -> victims in it."""
        if not self.kill_aggregators:
            return {}
        if self.kill_round == "spread":
            per, extra = divmod(self.kill_aggregators, self.rounds)
            return {r: per + (1 if r < extra else 0) for r in range(self.rounds) if per + (1 if r < extra else 0)}
        return {min(int(self.kill_round), self.rounds - 1): self.kill_aggregators}


@dataclass
class _Host:
    """What a node's host persisted from its events (what a restart restores)."""

    record: dict[str, Any] | None = None
    version: int = 0
    model: Any = None
    rank: int | None = None


@dataclass
class _Commit:
    round: int
    attempt: int
    at: float
    address: str
    payload: Counter[int] | None
    acct: dict[str, Any]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class JobSim:
    """A job on a simulated ring; see the module docstring. ``run()`` does everything; the steps
    (``build``, ``submit``, ``run_until``, ``restart_all``, ``finish``, ``report``) are there for tests."""

    def __init__(self, run: JobRun) -> None:
        self.run_cfg = run
        self.strategy = Tally(run.model_bytes)
        self.spec = JobSpec(job_id=JOB, task="sim", rounds=run.rounds, nodes_per_round=run.nodes_per_round,
                            seed=run.seed)
        self._incarnation = 0
        self.ring = RingSim(run.nodes, run.seed, run.overlay, failure=run.failure, latency=run.latency,
                            make_core=self._make_core)
        self.net = self.ring.net
        self.net.on_event = self._on_event
        self.net.on_send = self._on_send
        self._train_rng = random.Random(f"job-train:{run.seed}")
        self._kill_rng = random.Random(f"job-kill:{run.seed}")
        self._churn_rng = random.Random(f"job-churn:{run.seed}")
        self.index = {p.address: i for i, p in enumerate(self.ring.peers)}
        self.host: dict[str, _Host] = {}
        self.gone: dict[str, float] = {}  # crashed or left, and when
        self.left: set[str] = set()
        self.coordinator: str | None = None
        self.coordinator_events: list[dict[str, Any]] = []
        self.commits: dict[int, _Commit] = {}
        self.double_commits: list[tuple[int, int, str]] = []
        self.trained_by: dict[int, dict[int, tuple[str, float]]] = {}  # round -> id -> (address, when)
        self._aggregated: dict[tuple[str, int, int], Any] = {}
        self.train_end: dict[tuple[str, int], float] = {}
        self.forwarded: dict[int, dict[str, float]] = {}  # round -> forwarder -> when
        self.partial_sent: set[tuple[str, int]] = set()
        self.job_msgs: Counter[tuple[str, int]] = Counter()
        self.job_bytes: Counter[str] = Counter()
        self.victims: dict[str, tuple[int, float]] = {}  # aggregator -> (round, when killed)
        self.kill_precondition_failures = 0
        self._kill_plan = run.kill_plan()
        self._kill_decided: set[int] = set()
        self.coordinator_crash: tuple[str, float] | None = None
        self.coordinator_takeover_s: float | None = None
        self.joiners: dict[str, dict[str, Any]] = {}
        self.leaves = 0
        self.finished: set[str] = set()
        self.submitted_at: float | None = None
        self.restarts = 0
        self._next_index = run.nodes
        self._done = False

    # ------------------------------------------------------------------ nodes

    def _make_core(self, peer: Peer, i: int) -> NodeCore:
        r = self.run_cfg
        salt = f":{self._incarnation}" if self._incarnation else ""
        return NodeCore(peer, r.overlay, random.Random(f"{r.seed}:{i}{salt}"), failure=r.failure, jobs=r.jobs,
                        strategy=self.strategy)

    def alive(self, address: str) -> bool:
        return address not in self.net.crashed and address in self.net.nodes

    def live_addresses(self) -> list[str]:
        return [a for a in self.net.nodes if a not in self.net.crashed]

    def _install_ideal(self, addresses: list[str], now: float) -> None:
        peers = sorted((self.net.nodes[a].me for a in addresses), key=lambda p: p.id)
        ids = [p.id for p in peers]
        n = len(peers)
        r = self.run_cfg.overlay.successors
        for i, p in enumerate(peers):
            succs = [peers[(i + k) % n] for k in range(1, min(r, n - 1) + 1)]
            fingers = [peers[bisect.bisect_left(ids, (p.id + (1 << b)) & MASK) % n] for b in range(BITS)]
            pred = peers[i - 1] if n > 1 else None
            self.net.nodes[p.address].install(pred, succs, fingers if n > 1 else [], now)
        for p in peers:
            self.net.pump(p.address)

    def build(self, progress: Progress | None = None) -> None:
        """Make the ring (ideal or through the join protocol), ready for the job."""
        if self.run_cfg.ring_kind == "ideal":
            self._install_ideal(list(self.net.nodes), self.net.now)
            if progress:
                progress("ring (ideal)", 1.0)
            return
        ring = self.ring
        ring.schedule_joins(max(5.0, ring.n / 200))
        steps = 10
        for k in range(1, steps + 1):
            self.net.run_until(ring.last_join_at * k / steps)
            if progress:
                progress("ring joins", k / steps)
        at = ring.run_until_converged(check_every=ring.cfg.stabilize_interval, limit=600.0)
        if at is None:
            raise RuntimeError(f"the ring of {ring.n} nodes did not converge (seed {self.run_cfg.seed})")

    def submit(self, at: float | None = None) -> None:
        t = self.net.now + self.run_cfg.warmup if at is None else at
        first = self.ring.peers[0].address

        def go() -> None:
            self.submitted_at = self.net.now
            self.net.nodes[first].jobs.submit(self.spec, self.net.now)
            self.net.pump(first)
            if self.run_cfg.churn > 0:
                self._schedule_churn()

        self.net.call_at(t, go)

    # ------------------------------------------------------------------ the host

    @property
    def current_round(self) -> int:
        return len(self.commits)

    def _on_event(self, address: str, ev: Event) -> None:
        host = self.host.get(address)
        if host is None:
            host = self.host[address] = _Host()
        if isinstance(ev, TrainRequested):
            self._train(address, ev)
        elif isinstance(ev, RoundAggregated):
            self._aggregated[(address, ev.round, ev.attempt)] = ev.payload
            core = self.net.nodes[address]
            self.net.call_at(self.net.now, lambda: self._commit(address, core, ev))
        elif isinstance(ev, RoundCompleted):
            self._committed(address, ev)
        elif isinstance(ev, ModelReceived):
            host.version, host.model = ev.version, ev.payload
        elif isinstance(ev, RecordChanged):
            host.record = ev.record
        elif isinstance(ev, JobSeen):
            host.rank = ev.rank
        elif isinstance(ev, CoordinatorChanged):
            self.coordinator = address
            self.coordinator_events.append({"at": round(self.net.now, 4), "node": address, "round": ev.round,
                                            "attempt": ev.attempt, "why": ev.why})
            if self.coordinator_crash is not None and self.coordinator_takeover_s is None \
                    and address != self.coordinator_crash[0]:
                self.coordinator_takeover_s = self.net.now - self.coordinator_crash[1]
        elif isinstance(ev, JobFinished):
            self.finished.add(address)
        elif isinstance(ev, Joined) and address in self.joiners and self.joiners[address]["joined"] is None:
            self.joiners[address]["joined"] = self.net.now
            self.joiners[address]["round"] = self.current_round

    def _train(self, address: str, ev: TrainRequested) -> None:
        r = self.run_cfg
        rng = self._train_rng
        delay = r.train_median * math.exp(rng.gauss(0.0, r.train_sigma))
        if r.stragglers and rng.random() < r.stragglers:
            delay *= r.straggler_factor
        core = self.net.nodes[address]
        end = self.net.now + delay
        self.train_end[(address, ev.round)] = end

        def done() -> None:
            if self.net.nodes.get(address) is not core or not self.alive(address):
                return  # crashed, left or restarted while training
            self.trained_by.setdefault(ev.round, {})[core.me.id] = (address, self.net.now)
            core.jobs.trained(ev.job, ev.round, Counter({core.me.id: 1}), self.net.now)
            self.net.pump(address)

        self.net.call_at(end, done)

    def _commit(self, address: str, core: NodeCore, ev: RoundAggregated) -> None:
        if self.net.nodes.get(address) is not core or not self.alive(address):
            return
        core.jobs.commit(ev.job, ev.round, ev.attempt, ev.payload, {}, self.net.now)
        self.net.pump(address)

    def _committed(self, address: str, ev: RoundCompleted) -> None:
        attempt = int(ev.entry["attempt"])
        payload = self._aggregated.pop((address, ev.round, attempt), None)
        if ev.round in self.commits:
            self.double_commits.append((ev.round, attempt, address))
            return
        self.commits[ev.round] = _Commit(ev.round, attempt, self.net.now, address, payload,
                                         self._account(ev.round, payload))
        if len(self.commits) >= self.run_cfg.rounds:
            self._done = True

    def _account(self, round_: int, payload: Counter[int] | None) -> dict[str, Any]:
        result: Counter[int] = payload or Counter()
        trained = self.trained_by.get(round_, {})
        alive_trainers = {i for i, (a, _) in trained.items() if self.alive(a)}
        addr_of = {c.me.id: a for a, c in self.net.nodes.items()}
        in_result = set(result)
        dead_included = {i for i in in_result if not self.alive(addr_of.get(i, ""))}
        return {
            "round": round_,
            "expected": len(alive_trainers) + len(dead_included),
            "counted": sum(result.values()),
            "lost": len(alive_trainers - in_result),
            "duplicated": sum(c - 1 for c in result.values() if c > 1),
            "dead_included": len(dead_included),
            "unexpected": len(in_result - set(trained)),
            "alive": sum(1 for a in self.net.nodes if self.alive(a)),
            "lost_ids": sorted(alive_trainers - in_result)[:10],
        }

    # ------------------------------------------------------------------ message accounting and kills

    def _on_send(self, src: str, dst: str, msg: object) -> None:
        if isinstance(msg, WithPayload):
            header, nbytes = msg.msg, msg.nbytes
        elif isinstance(msg, JOB_MESSAGES):
            header, nbytes = msg, 0
        else:
            return
        r = getattr(header, "round", None)
        if r is None:
            r = self.current_round
        self.job_msgs[(src, r)] += 1
        self.job_bytes[src] += len(encode(header)) + nbytes
        if isinstance(header, JobPartial):
            self.partial_sent.add((src, r))
        elif isinstance(header, JobRound) and not (header.repair or header.catchup or header.final):
            if header.root.address != src:
                self.forwarded.setdefault(r, {}).setdefault(src, self.net.now)
                return
            # the root opens round r
            kc = self.run_cfg.kill_coordinator
            if kc is not None and r == kc and self.coordinator_crash is None:
                self.coordinator_crash = (src, self.net.now)
                self.net.call_at(self.net.now, lambda: self._crash(src))
            if r in self._kill_plan and r not in self._kill_decided:
                self._kill_decided.add(r)
                self.net.call_at(self.net.now + self.run_cfg.kill_decide_after, lambda: self._choose_victims(r))

    def _crash(self, address: str) -> None:
        if self.alive(address):
            self.gone[address] = self.net.now
            self.net.crash(address)

    def _choose_victims(self, round_: int) -> None:
        now = self.net.now
        cands = sorted(a for a in self.forwarded.get(round_, {})
                       if self.alive(a) and a != self.coordinator and a not in self.victims
                       and self.train_end.get((a, round_), 0.0) > now and (a, round_) not in self.partial_sent)
        k = min(self._kill_plan[round_], len(cands))
        for a in self._kill_rng.sample(cands, k):
            at = self._kill_rng.uniform(now, self.train_end[(a, round_)])
            self.victims[a] = (round_, at)
            self.net.call_at(at, lambda a=a: self._kill(a, round_))

    def _kill(self, address: str, round_: int) -> None:
        # the scenario's precondition: it forwarded the notice and has not sent its partial yet
        if address not in self.forwarded.get(round_, {}) or (address, round_) in self.partial_sent:
            self.kill_precondition_failures += 1
        self._crash(address)

    # ------------------------------------------------------------------ churn

    def _schedule_churn(self) -> None:
        self.net.call_at(self.net.now + self._churn_rng.expovariate(self.run_cfg.churn), self._churn_step)

    def _churn_step(self) -> None:
        if self._done:
            return
        rng = self._churn_rng
        live = [a for a in self.live_addresses() if self.net.nodes[a].chord.joined]
        if rng.random() < 0.5:
            i = self._next_index
            self._next_index += 1
            nid = ring_id(f"{self.run_cfg.seed}:{i}")
            while any(c.me.id == nid for c in self.net.nodes.values()):
                nid = (nid + 1) & MASK
            peer = self.ring._add_node(i, nid)
            self.index[peer.address] = i
            self.joiners[peer.address] = {"started": self.net.now, "joined": None, "round": None}
            self.ring._bootstrap(peer.address, [live[rng.randrange(len(live))]])
        elif len(live) > 2:
            addr = live[rng.randrange(len(live))]
            self.leaves += 1
            self.left.add(addr)
            self.gone[addr] = self.net.now
            self.net.nodes[addr].leave(self.net.now)
            self.net.pump(addr)
            self.net.crash(addr)  # gone: its Leaving and JobHandover messages are already out
        self._schedule_churn()

    # ------------------------------------------------------------------ restart

    def restart_all(self, gap: float = 1.0) -> None:
        """Stop every live node, wait ``gap`` (in-flight messages die with the old processes), and start
        new cores with the same ids and addresses that restore what their hosts persisted."""
        live = self.live_addresses()
        saved = {a: self.host.get(a, _Host()) for a in live}
        for a in live:
            self.net.crash(a)
        self.net.run_until(self.net.now + gap)
        # updates of rounds not committed yet died with the old processes
        for r in [r for r in self.trained_by if r not in self.commits]:
            del self.trained_by[r]
        self._incarnation += 1
        self.restarts += 1
        now = self.net.now
        for a in live:
            old = self.net.nodes[a]
            core = self._make_core(old.me, self.index[a])
            self.net.add(core)
            self.net.crashed.discard(a)
            h = saved[a]
            self.host[a] = _Host(h.record, h.version, h.model, h.rank)
            if h.record is not None:
                core.jobs.restore(h.record, h.version, h.model, h.rank, now)
        if self.run_cfg.ring_kind == "ideal":
            self._install_ideal(live, now)
        else:
            first, rest = live[0], live[1:]
            self.ring._bootstrap(first, [])
            window = max(2.0, len(live) / 200)
            for k, a in enumerate(rest):
                self.net.call_at(now + window * (k + 1) / len(rest), lambda a=a: self.ring._bootstrap(a, [first]))

    # ------------------------------------------------------------------ running

    def run_until(self, commits: int, progress: Progress | None = None, limit: float | None = None) -> bool:
        """Run until ``commits`` rounds are committed (False at the virtual time limit)."""
        r = self.run_cfg
        c = r.jobs
        if limit is None:
            limit = r.limit if r.limit is not None else 60.0 + r.rounds * (c.max_wait / 2 + 30.0)
        start = self.net.now
        step = 0.5
        while len(self.commits) < commits:
            if self.net.now - start >= limit:
                return False
            self.net.run_until(self.net.now + step)
            if progress:
                progress("job rounds", len(self.commits) / max(1, r.rounds))
        return True

    def finish(self, timeout: float = 10.0) -> None:
        """After the last commit: let the final model reach the members (up to ``timeout``)."""
        end = self.net.now + timeout
        want = self.run_cfg.rounds
        while self.net.now < end:
            self.net.run_until(self.net.now + 0.5)
            if all(self.host.get(a, _Host()).version >= want for a in self.live_addresses()
                   if self.net.nodes[a].chord.joined):
                break

    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        t_wall = time.perf_counter()
        self.build(progress)
        self.submit()
        self.run_until(self.run_cfg.rounds, progress)
        if len(self.commits) >= self.run_cfg.rounds:
            self.finish()
        return self.report(time.perf_counter() - t_wall)

    # ------------------------------------------------------------------ results

    def coordinator_record(self) -> dict[str, Any] | None:
        if self.coordinator is None:
            return None
        return self.host.get(self.coordinator, _Host()).record

    def joiner_report(self) -> dict[str, int]:
        """Joiners: a node that joined while round r was open must train in a later round. It is held
        to it when it stayed to the end and a round opened ``settle`` after it joined (its neighbours
        must know it before a tree includes it: a few stabilize rounds)."""
        settle = 3 * self.run_cfg.overlay.stabilize_interval
        opened = {0: self.submitted_at or 0.0, **{r + 1: c.at for r, c in self.commits.items()}}
        counted: dict[int, set[int]] = {r: set(c.payload or ()) for r, c in self.commits.items()}
        joined = eligible = trained = 0
        for a, j in self.joiners.items():
            if j["joined"] is None:
                continue
            joined += 1
            if not self.alive(a):
                continue
            jr = j["round"]
            later = [r for r in counted if r > jr and opened.get(r, math.inf) >= j["joined"] + settle]
            if not later:
                continue
            eligible += 1
            nid = self.net.nodes[a].me.id
            if any(nid in counted[r] for r in counted if r > jr):
                trained += 1
        return {"joiners": joined, "joiners_eligible": eligible, "joiners_trained": trained}

    def report(self, wall: float = 0.0) -> dict[str, Any]:
        r = self.run_cfg
        acct = [self.commits[k].acct for k in sorted(self.commits)]
        rounds = sorted(self.commits)
        times = []  # from the commit that opened a round (the submission for round 0) to its own commit
        for k in rounds:
            start = self.submitted_at if k == 0 else (self.commits[k - 1].at if k - 1 in self.commits else None)
            if start is not None:
                times.append(self.commits[k].at - start)
        per_node = [v for (a, k), v in self.job_msgs.items() if k < r.rounds]
        stayed = [a for a in self.ring.peers[: r.nodes] if self.alive(a.address)]
        bytes_out = [self.job_bytes[p.address] for p in stayed]
        med_bytes = _median([float(b) for b in bytes_out])
        coord_msgs = [self.job_msgs[(self.commits[k].address, k)] for k in rounds]
        record = self.coordinator_record()
        sum_ = lambda key: sum(a[key] for a in acct)  # noqa: E731
        out: dict[str, Any] = {
            "nodes": r.nodes,
            "rounds": r.rounds,
            "seed": r.seed,
            "ring": r.ring_kind,
            "nodes_per_round": r.nodes_per_round,
            "stragglers": r.stragglers,
            "model_bytes": r.model_bytes,
            "rounds_completed": len(self.commits),
            "contributions_expected": sum_("expected"),
            "contributions_counted": sum_("counted"),
            "lost": sum_("lost"),
            "duplicated": sum_("duplicated"),
            "dead_included": sum_("dead_included"),
            "unexpected": sum_("unexpected"),
            "double_commits": len(self.double_commits),
            "round_time_median_s": _round(_median(times)),
            "round_time_max_s": _round(max(times) if times else None),
            "msgs_per_node_round_median": _median([float(v) for v in per_node]),
            "msgs_per_node_round_max": max(per_node) if per_node else None,
            "coordinator_msgs_per_round_max": max(coord_msgs) if coord_msgs else None,
            "bytes_out_median": med_bytes,
            "bytes_out_max": max(bytes_out) if bytes_out else None,
            "bytes_out_max_over_median": _round(max(bytes_out) / med_bytes) if med_bytes else None,
            "killed_aggregators": sum(1 for a in self.victims if a in self.gone),
            "kill_precondition_failures": self.kill_precondition_failures,
            "coordinator_killed": self.coordinator_crash is not None,
            "coordinator_takeover_s": _round(self.coordinator_takeover_s),
            "coordinator_changes": [e for e in self.coordinator_events if e["why"] != "submitted"],
            "rounds_recorded": [e["round"] for e in record["history"]] if record else [],
            "record_status": record["status"] if record else None,
            "churn": r.churn,
            "leaves": self.leaves,
            **self.joiner_report(),
            "restarts": self.restarts,
            "final_model_nodes": sum(1 for a in self.live_addresses()
                                     if self.host.get(a, _Host()).version >= r.rounds),
            "live_nodes": len(self.live_addresses()),
            "per_round": [{k: v for k, v in a.items() if k != "lost_ids" or v} for a in acct],
            "virtual_s": _round(self.net.now),
            "messages": self.net.messages,
            "wall_s": round(wall, 2),
        }
        return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def run_job(run: JobRun, progress: Progress | None = None) -> dict[str, Any]:
    """The ``sim job`` experiment; returns the JSON-ready result."""
    return JobSim(run).run(progress)
