"""Events a NodeCore reports upward: past-tense facts. Sans-IO."""

from __future__ import annotations

from dataclasses import dataclass

from mlfabric.wire.messages import Peer


class Event:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Joined(Event):
    successor: Peer


@dataclass(frozen=True, slots=True)
class SuccessorChanged(Event):
    successor: Peer


@dataclass(frozen=True, slots=True)
class PredecessorChanged(Event):
    predecessor: Peer | None


@dataclass(frozen=True, slots=True)
class PeerUnresponsive(Event):
    """A request to this peer timed out; it was removed from the routing state."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class LookupDone(Event):
    token: int
    key: int
    node: Peer | None  # None when the lookup failed
    hops: int
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.node is not None


@dataclass(frozen=True, slots=True)
class Left(Event):
    """This node finished its graceful leave."""


# failure detection (core/failure.py)


@dataclass(frozen=True, slots=True)
class PeerDied(Event):
    """This node declared ``peer`` dead. ``pred`` is the predecessor of ``peer`` it used for the
    holder estimate (``exact``: known from its own successor list, not guessed)."""

    peer: Peer
    incarnation: int
    pred: Peer | None
    exact: bool


@dataclass(frozen=True, slots=True)
class PeerPurged(Event):
    """A failure notice made this node drop ``peer`` from its routing state."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class Refuted(Event):
    """This node was declared dead and answered with a higher incarnation."""

    incarnation: int


# training jobs (core/jobs.py). ``payload``s are the host's opaque objects (tensors in the daemon,
# exact integer tallies in the simulator); the core only merges them through a Strategy.


@dataclass(frozen=True, slots=True)
class JobSeen(Event):
    """This node takes part in ``job`` from now on (first round notice, submission or restored record).
    ``rank``/``parts``: which part of the task's data it trains on (fixed at its first round)."""

    job: str
    spec: object  # core.jobs.JobSpec
    rank: int
    parts: int


@dataclass(frozen=True, slots=True)
class ModelReceived(Event):
    """The model of ``version`` (the result of round ``version - 1``) arrived: apply and keep it.
    ``payload`` is None for version 0 (every member builds the initial model from the spec's seed)."""

    job: str
    version: int
    payload: object


@dataclass(frozen=True, slots=True)
class TrainRequested(Event):
    """Train round ``round`` from the model of version ``round``; answer with ``JobMachine.trained``
    (or ``train_failed``)."""

    job: str
    round: int


@dataclass(frozen=True, slots=True)
class RoundAggregated(Event):
    """Coordinator only: the sum of round ``round``'s updates (``count`` of them, ``members`` covered).
    Turn it into the next model (and evaluate it), then call ``JobMachine.commit``. ``payload`` is
    None when no update arrived at all (the model stays as it is)."""

    job: str
    round: int
    attempt: int
    payload: object
    count: int
    members: int


@dataclass(frozen=True, slots=True)
class RoundCompleted(Event):
    """Coordinator only: round ``round`` is in the record (``entry``, a dict) and its notice went out."""

    job: str
    round: int
    entry: dict


@dataclass(frozen=True, slots=True)
class RecordChanged(Event):
    """This node's copy of the job record changed: persist ``record`` (core.jobs.JobRecord.to_json())."""

    job: str
    record: dict


@dataclass(frozen=True, slots=True)
class CoordinatorChanged(Event):
    """This node now coordinates ``job`` (``why``: submitted, took over, handed over, resumed)."""

    job: str
    round: int
    attempt: int
    why: str


@dataclass(frozen=True, slots=True)
class JobFinished(Event):
    """The final model of ``job`` (its last version) is here; the job is done."""

    job: str
    version: int


@dataclass(frozen=True, slots=True)
class JobSubmitted(Event):
    """Answer to ``JobMachine.submit``: the coordinator found for the job (None: the lookup failed)."""

    token: int
    job: str
    coordinator: Peer | None


@dataclass(frozen=True, slots=True)
class JobInputRejected(Event):
    """A job message from ``src`` was invalid and dropped (counted too); ``what`` says why, one line."""

    src: Peer
    what: str
