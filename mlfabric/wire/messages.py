"""Protocol messages: frozen dataclasses with append-only numeric ids and per-field wire kinds.

Every field declares a *kind* (see ``U64``, ``Str`` ...) that both dumps it to plain msgpack values
and validates what a peer sent (type, range, size). A message decoded from the wire has passed
every check, so the core never sees a malformed value. Ids are part of the protocol: append new
ones, never reuse or renumber; new fields are appended with defaults so older peers keep working.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from mlfabric.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1
MAX_ADDRESS_LEN = 270  # host (up to 255) + ":" + port, with room for IPv6 brackets
MAX_PEER_LIST = 256


# ---------------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """A node on the ring: its 64-bit id and the ``host:port`` it listens on."""

    id: int
    address: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address}


# ---------------------------------------------------------------------------------------------
# Field kinds: dump to msgpack-native values, load with validation
# ---------------------------------------------------------------------------------------------


def _bad(what: str, raw: object) -> RemoteProtocolError:
    shown = repr(raw)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return RemoteProtocolError(f"{what}: got {shown}")


class Kind:
    def dump(self, value: Any) -> Any:
        return value

    def load(self, raw: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class _Int(Kind):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def load(self, raw: Any) -> int:
        if type(raw) is not int or not self.lo <= raw <= self.hi:
            raise _bad(f"expected integer in [{self.lo}, {self.hi}]", raw)
        return raw


class _Bool(Kind):
    def load(self, raw: Any) -> bool:
        if type(raw) is not bool:
            raise _bad("expected boolean", raw)
        return raw


class _Float(Kind):
    """A duration or a measurement: finite, within bounds. Ints are accepted (msgpack may pack 1.0 as 1)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def dump(self, value: Any) -> float:
        return float(value)

    def load(self, raw: Any) -> float:
        if type(raw) not in (float, int) or not math.isfinite(raw) or not self.lo <= raw <= self.hi:
            raise _bad(f"expected finite number in [{self.lo}, {self.hi}]", raw)
        return float(raw)


class Str(Kind):
    def __init__(self, max_len: int) -> None:
        self.max_len = max_len

    def load(self, raw: Any) -> str:
        if type(raw) is not str or len(raw) > self.max_len:
            raise _bad(f"expected string of at most {self.max_len} characters", raw)
        return raw


class Bytes(Kind):
    def __init__(self, max_len: int, exact: int | None = None) -> None:
        self.max_len, self.exact = max_len, exact

    def load(self, raw: Any) -> bytes:
        if type(raw) is not bytes or len(raw) > self.max_len:
            raise _bad(f"expected bytes of at most {self.max_len}", raw)
        if self.exact is not None and len(raw) != self.exact:
            raise _bad(f"expected exactly {self.exact} bytes", raw)
        return raw


class _Address(Str):
    def __init__(self) -> None:
        super().__init__(MAX_ADDRESS_LEN)

    def load(self, raw: Any) -> str:
        text = super().load(raw)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise _bad("expected address host:port", raw)
        return text


class _PeerKind(Kind):
    def dump(self, value: Peer) -> list[Any]:
        return [value.id, value.address]

    def load(self, raw: Any) -> Peer:
        if type(raw) is not list or len(raw) != 2:
            raise _bad("expected peer [id, address]", raw)
        return Peer(U64.load(raw[0]), ADDRESS.load(raw[1]))


class Optional(Kind):
    def __init__(self, inner: Kind) -> None:
        self.inner = inner

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)

    def load(self, raw: Any) -> Any:
        return None if raw is None else self.inner.load(raw)


class ListOf(Kind):
    def __init__(self, inner: Kind, max_len: int) -> None:
        self.inner, self.max_len = inner, max_len

    def dump(self, value: Any) -> list[Any]:
        return [self.inner.dump(v) for v in value]

    def load(self, raw: Any) -> tuple[Any, ...]:
        if type(raw) is not list or len(raw) > self.max_len:
            raise _bad(f"expected list of at most {self.max_len} items", raw)
        return tuple(self.inner.load(v) for v in raw)


U64 = _Int(0, (1 << 64) - 1)
U32 = _Int(0, (1 << 32) - 1)
SMALL = _Int(0, 1 << 16)
BOOL = _Bool()
DURATION = _Float(0.0, 1e6)
ADDRESS = _Address()
PEER = _PeerKind()
PEERS = ListOf(PEER, MAX_PEER_LIST)
OPT_PEER = Optional(PEER)


def f(kind: Kind, default: Any = MISSING) -> Any:
    """Declare a message field with its wire kind (and a default for fields appended later)."""
    if default is MISSING:
        return field(metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


class Message:
    """Base of all messages. ``TYPE_ID`` is set by :func:`wire`."""

    __slots__ = ()
    TYPE_ID: ClassVar[int] = -1
    KINDS: ClassVar[tuple[tuple[str, Kind], ...]] = ()
    REQUIRED: ClassVar[int] = 0


_BY_ID: dict[int, type[Message]] = {}


def wire(type_id: int):
    """Register a message class under ``type_id``. Ids are protocol: append, never reuse."""

    def register(cls: type[Message]) -> type[Message]:
        if type_id in _BY_ID:
            raise LocalProtocolError(f"type id {type_id} already used by {_BY_ID[type_id].__name__}")
        cls.TYPE_ID = type_id
        kinds = []
        required = 0
        for fl in fields(cls):  # type: ignore[arg-type]
            if "kind" not in fl.metadata:
                raise LocalProtocolError(f"{cls.__name__}.{fl.name} has no wire kind")
            kinds.append((fl.name, fl.metadata["kind"]))
            if fl.default is MISSING and fl.default_factory is MISSING:
                required += 1
        cls.KINDS = tuple(kinds)
        cls.REQUIRED = required
        _BY_ID[type_id] = cls
        return cls

    return register


def message_class(type_id: int) -> type[Message]:
    try:
        return _BY_ID[type_id]
    except KeyError:
        raise RemoteProtocolError(f"unknown message type id {type_id!r}") from None


def registered() -> dict[int, type[Message]]:
    return dict(_BY_ID)


# ---------------------------------------------------------------------------------------------
# Connection handshake (runtime/transport.py drives it through wire/handshake.py)
# ---------------------------------------------------------------------------------------------

NONCE_LEN = 32
MAC_LEN = 32


@wire(1)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame from the dialling side: who I am, and a fresh nonce to challenge the listener."""

    node: Peer = f(PEER)
    nonce: bytes = f(Bytes(NONCE_LEN, exact=NONCE_LEN))
    version: int = f(SMALL, PROTOCOL_VERSION)


@wire(2)
@dataclass(frozen=True, slots=True)
class HelloAck(Message):
    """The listener's answer: who it is, its own nonce, and its proof of the cluster key (or empty)."""

    node: Peer = f(PEER)
    nonce: bytes = f(Bytes(NONCE_LEN, exact=NONCE_LEN))
    proof: bytes = f(Bytes(MAC_LEN))
    version: int = f(SMALL, PROTOCOL_VERSION)


@wire(3)
@dataclass(frozen=True, slots=True)
class AuthProof(Message):
    """The dialler's proof of the cluster key, answering the listener's nonce."""

    proof: bytes = f(Bytes(MAC_LEN))


# ---------------------------------------------------------------------------------------------
# Overlay (Chord)
# ---------------------------------------------------------------------------------------------


@wire(10)
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """A liveness probe; ``incarnation`` is the sender's (appended in protocol 1.1, default 0)."""

    seq: int = f(U64)
    incarnation: int = f(U64, 0)


@wire(11)
@dataclass(frozen=True, slots=True)
class Pong(Message):
    seq: int = f(U64)
    incarnation: int = f(U64, 0)


@wire(12)
@dataclass(frozen=True, slots=True)
class FindSuccessor(Message):
    """One step of an iterative lookup (Chord §4.3): who is successor(key), or who is closer?"""

    req: int = f(U64)
    key: int = f(U64)


@wire(13)
@dataclass(frozen=True, slots=True)
class FindSuccessorReply(Message):
    """``done``: ``nodes[0]`` is successor(key), followed by its successors. Otherwise ``nodes``
    are the closest preceding nodes the responder knows, best first."""

    req: int = f(U64)
    done: bool = f(BOOL)
    nodes: tuple[Peer, ...] = f(PEERS)


@wire(14)
@dataclass(frozen=True, slots=True)
class GetNeighbors(Message):
    req: int = f(U64)


@wire(15)
@dataclass(frozen=True, slots=True)
class Neighbors(Message):
    req: int = f(U64)
    predecessor: Peer | None = f(OPT_PEER)
    successors: tuple[Peer, ...] = f(PEERS)


@wire(16)
@dataclass(frozen=True, slots=True)
class Notify(Message):
    """The sender believes it may be the receiver's predecessor (Chord §4.3). It also tells its own
    predecessor, so the receiver knows pred(pred) and can estimate exactly if the sender dies."""

    predecessor: Peer | None = f(OPT_PEER, None)


@wire(17)
@dataclass(frozen=True, slots=True)
class Leaving(Message):
    """Graceful leave: the sender hands over its predecessor and successor list."""

    predecessor: Peer | None = f(OPT_PEER)
    successors: tuple[Peer, ...] = f(PEERS)


@wire(18)
@dataclass(frozen=True, slots=True)
class SuccessorHint(Message):
    """"A node between you and your successor exists": sent by a node whose predecessor changed (to the
    old predecessor) or that was notified by a node that is not its predecessor (to that node). The
    receiver verifies the candidate by stabilizing with it; a hint is never trusted blindly."""

    candidate: Peer = f(PEER)


# ---------------------------------------------------------------------------------------------
# Failure detection and propagation (core/failure.py)
# ---------------------------------------------------------------------------------------------


@wire(19)
@dataclass(frozen=True, slots=True)
class ProbeRequest(Message):
    """SWIM ping-req: probe ``target`` for me and tell me whether it answered."""

    req: int = f(U64)
    target: Peer = f(PEER)


@wire(20)
@dataclass(frozen=True, slots=True)
class ProbeResult(Message):
    req: int = f(U64)
    target: Peer = f(PEER)
    alive: bool = f(BOOL)
    incarnation: int = f(U64, 0)


@wire(21)
@dataclass(frozen=True, slots=True)
class FailureNotice(Message):
    """``dead`` (at ``incarnation``) was declared dead by ``detector``.

    ``mode`` DIRECT: no forwarding (stateful scheme, or a single target). BACKWARD: the receiver
    forwards it to its predecessor while ``back`` > 0 (the dead node's successor-list holders).
    INTERVAL: routed towards ``start`` (``back`` = 0), then walks successors while they lie in
    [start, end] (``back`` = 1; one estimated finger-holder interval). ``replacement`` is the dead node's successor when known.
    """

    dead: Peer = f(PEER)
    incarnation: int = f(U64)
    detector: Peer = f(PEER)
    mode: int = f(_Int(0, 2))
    start: int = f(U64)
    end: int = f(U64)
    back: int = f(SMALL)
    replacement: Peer | None = f(OPT_PEER)
    hops: int = f(SMALL, 0)
    seq: int = f(U64, 0)  # non-zero: the next hop answers NoticeAck(seq), else the sender tries another
    predecessor: Peer | None = f(OPT_PEER, None)  # pred(dead) as the detector knows it exactly


NOTICE_DIRECT, NOTICE_BACKWARD, NOTICE_INTERVAL = 0, 1, 2


@wire(25)
@dataclass(frozen=True, slots=True)
class NoticeAck(Message):
    """Hop-by-hop acknowledgement of a forwarded FailureNotice (a dead hop is routed around)."""

    seq: int = f(U64)


@wire(22)
@dataclass(frozen=True, slots=True)
class Alive(Message):
    """Refutation: the sender is alive at ``incarnation`` (higher than any death declared for it)."""

    incarnation: int = f(U64)


@wire(23)
@dataclass(frozen=True, slots=True)
class Register(Message):
    """Stateful baseline: the sender holds the receiver in its routing table (a backpointer)."""


@wire(24)
@dataclass(frozen=True, slots=True)
class BackpointerCopy(Message):
    """Stateful baseline: the sender's backpointer set, kept by its neighbours for when it dies."""

    holders: tuple[Peer, ...] = f(PEERS)


# ---------------------------------------------------------------------------------------------
# Training jobs (core/jobs.py, core/aggregate.py), used directly by the core. A message that carries a
# payload (a partial aggregate, a model) travels on the bulk lane: the message, encoded as usual, is the
# blob's meta header and the tensor its body; the others go on the control lane.
# ---------------------------------------------------------------------------------------------

JOB_ID = Str(64)
JOB_SPEC = Str(4096)  # a JobSpec as JSON; validated again by pydantic on receipt
JOB_ENTRY = Str(2048)  # one round's history entry as JSON (summary: counts, metrics, duration)
MAX_PATH = 64  # tree depth bound: every level at least halves a range of the 64-bit ring
MAX_SPANS = 2048  # intervals per contributor set; an aggregator splits a partial before it would grow past it
ALL_TRAIN = (1 << 32) - 1  # JobRound.quota: every member of the range trains
SPANS = ListOf(U64, 2 * MAX_SPANS)


@wire(60)
@dataclass(frozen=True, slots=True)
class JobSubmit(Message):
    """A job for the coordinator: the owner of the job's ring key."""

    spec: str = f(JOB_SPEC)


# 61-71: retired (job protocol 1: ring-walk announce, member lists, per-shard meshes). Never reuse.


@wire(72)
@dataclass(frozen=True, slots=True)
class JobRound(Message):
    """Down a round's ring-range tree: round ``round`` (attempt ``attempt``) of ``job`` is open, and the
    receiver is responsible for the ring range from itself to ``hi`` (clockwise distance from ``root``;
    0 means the whole way round). ``path``: the receiver's ancestors, root first (where its partial
    goes, failing over upward). It carries the model of version ``round`` as its bulk payload when
    ``with_model`` (the result of round ``round - 1``, with that round's history ``entry``), so
    a member that joined since the last round trains from this one. ``final``: the job is done and
    the payload is the final model. ``repair``: the root re-covers a gap (nothing to train anew;
    members send what they kept). ``catchup``: an answer to JobResultRequest, no range duty.
    ``rank``/``parts``: the receiver's place in distance order from the root and the job's data
    partition count (which part of the task's data the member trains on)."""

    job: str = f(JOB_ID)
    spec: str = f(JOB_SPEC)
    round: int = f(U32)
    attempt: int = f(U32)
    root: Peer = f(PEER)
    hi: int = f(U64)
    path: tuple[Peer, ...] = f(ListOf(PEER, MAX_PATH))
    quota: int = f(U32)
    rank: int = f(U32)
    parts: int = f(U32)
    entry: str = f(JOB_ENTRY, "")
    with_model: bool = f(BOOL, False)
    final: bool = f(BOOL, False)
    repair: bool = f(BOOL, False)
    catchup: bool = f(BOOL, False)


@wire(73)
@dataclass(frozen=True, slots=True)
class JobPartial(Message):
    """Up the tree (bulk payload): the merged updates of the members whose ranges are ``spans``;
    ``count`` updates in it, ``members`` members covered (trainers or not); ``weight`` is the
    payload's FedAvg weight (filled by the host). ``repair``: sent straight to the root on request."""

    job: str = f(JOB_ID)
    round: int = f(U32)
    attempt: int = f(U32)
    seq: int = f(U64)
    spans: tuple[int, ...] = f(SPANS)
    count: int = f(U64)
    members: int = f(U64)
    weight: int = f(U64, 0)
    repair: bool = f(BOOL, False)


@wire(74)
@dataclass(frozen=True, slots=True)
class JobAck(Message):
    """A JobPartial arrived (whatever the receiver does with it): stop resending it."""

    job: str = f(JOB_ID)
    round: int = f(U32)
    attempt: int = f(U32)
    seq: int = f(U64)


@wire(75)
@dataclass(frozen=True, slots=True)
class JobRoundAck(Message):
    """A JobRound arrived."""

    job: str = f(JOB_ID)
    round: int = f(U32)
    attempt: int = f(U32)


@wire(76)
@dataclass(frozen=True, slots=True)
class JobPending(Message):
    """Answer to a repair JobRound from a member still training: alive, its update follows."""

    job: str = f(JOB_ID)
    round: int = f(U32)
    attempt: int = f(U32)


@wire(77)
@dataclass(frozen=True, slots=True)
class JobResultRequest(Message):
    """The sender waits for round ``round``'s notice (and the model it carries): whoever has it sends it."""

    job: str = f(JOB_ID)
    round: int = f(U32)


@wire(78)
@dataclass(frozen=True, slots=True)
class JobHandover(Message):
    """The coordinator leaves the ring: the receiver (its successor, the next owner of the job key)
    coordinates from now on, from its own copy of the record, with an attempt above ``attempt``."""

    job: str = f(JOB_ID)
    attempt: int = f(U32)
