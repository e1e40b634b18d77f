"""Contributor sets as spans of the ring: sorted, disjoint half-open intervals. Pure, sans-IO.

A round's aggregation tree partitions the ring (measured as clockwise distance from the round's
root, so the whole ring is ``[0, 2**64)``) into ranges, one per member: a member *claims* its own
range, and a partial aggregate says which ranges it holds. So a contributor set is a handful of
intervals, not a list of members: a full subtree is one interval whatever its size, and the set
grows only with the gaps (members dead, slow or unreached), never with the membership. Two partials
overlap exactly when their spans intersect, which is what keeps every update counted once.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from mlfabric.core.ring import SIZE
from mlfabric.errors import RemoteProtocolError

__all__ = ["Spans", "FULL"]


class Spans:
    """An immutable set of disjoint, non-adjacent intervals ``[lo, hi)`` with ``0 <= lo < hi <= 2**64``."""

    __slots__ = ("_iv", "_los")

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted((lo, hi) for lo, hi in intervals if hi > lo):
            if not 0 <= lo < hi <= SIZE:
                raise ValueError(f"span [{lo}, {hi}) is outside the ring")
            if merged and lo <= merged[-1][1]:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self._iv = tuple(merged)
        self._los = [lo for lo, _ in merged]

    # ---- construction and the wire ------------------------------------------------------------------

    @classmethod
    def of(cls, lo: int, hi: int) -> Spans:
        return cls(((lo, hi),))

    def flat(self) -> tuple[int, ...]:
        """``(lo0, hi0, lo1, hi1, ...)``; ``hi == 2**64`` travels as 0 (it does not fit a u64)."""
        out: list[int] = []
        for lo, hi in self._iv:
            out += (lo, hi if hi < SIZE else 0)
        return tuple(out)

    @classmethod
    def from_flat(cls, flat: tuple[int, ...] | list[int]) -> Spans:
        """The inverse of :meth:`flat`, for a peer's input: sorted, disjoint, in range, or RemoteProtocolError."""
        if len(flat) % 2:
            raise RemoteProtocolError("spans need an even number of bounds")
        pairs = []
        prev = 0  # the bottom of the ring: a negative bound is no more acceptable than an unsorted one
        for i in range(0, len(flat), 2):
            lo, hi = flat[i], flat[i + 1] or SIZE
            if not prev <= lo < hi <= SIZE:
                raise RemoteProtocolError("spans must be sorted, disjoint and non-empty")
            pairs.append((lo, hi))
            prev = hi
        return cls(pairs)

    # ---- set operations ----------------------------------------------------------------------------

    @property
    def intervals(self) -> tuple[tuple[int, int], ...]:
        return self._iv

    def __bool__(self) -> bool:
        return bool(self._iv)

    def __len__(self) -> int:
        """Number of intervals (not of ring points)."""
        return len(self._iv)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spans) and self._iv == other._iv

    def __hash__(self) -> int:
        return hash(self._iv)

    def __repr__(self) -> str:
        return "Spans(" + ", ".join(f"[{lo:x},{hi:x})" for lo, hi in self._iv) + ")"

    def __or__(self, other: Spans) -> Spans:
        if not other._iv:
            return self
        if not self._iv:
            return other
        return Spans(self._iv + other._iv)

    def intersects(self, other: Spans) -> bool:
        a, b = self._iv, other._iv
        i = j = 0
        while i < len(a) and j < len(b):
            if a[i][1] <= b[j][0]:
                i += 1
            elif b[j][1] <= a[i][0]:
                j += 1
            else:
                return True
        return False

    def __contains__(self, point: int) -> bool:
        i = bisect_right(self._los, point) - 1
        return i >= 0 and point < self._iv[i][1]

    def covers(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` lies inside one interval of the set (intervals never touch, so inside the set)."""
        i = bisect_right(self._los, lo) - 1
        return i >= 0 and hi <= self._iv[i][1]

    def gaps(self, lo: int = 0, hi: int = SIZE) -> list[tuple[int, int]]:
        """The parts of ``[lo, hi)`` not in the set, in order."""
        out: list[tuple[int, int]] = []
        at = lo
        for a, b in self._iv:
            if b <= at:
                continue
            if a >= hi:
                break
            if a > at:
                out.append((at, a))
            at = max(at, b)
            if at >= hi:
                break
        if at < hi:
            out.append((at, hi))
        return out


FULL = Spans.of(0, SIZE)
