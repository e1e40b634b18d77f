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
