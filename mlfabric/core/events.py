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
