"""Ring arithmetic on the 64-bit identifier circle (Chord §4.1). Pure functions, sans-IO."""

from __future__ import annotations

import hashlib
from bisect import bisect_left

BITS = 64
SIZE = 1 << BITS
MASK = SIZE - 1


def ring_id(data: bytes | str) -> int:
    """A 64-bit identifier: the first 8 bytes of SHA-256, big-endian (stable across runs)."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def distance(a: int, b: int) -> int:
    """Clockwise distance from a to b."""
    return (b - a) & MASK


def in_open(x: int, a: int, b: int) -> bool:
    """x in (a, b) clockwise. With a == b this is the whole ring except a."""
    return 0 < ((x - a) & MASK) < ((b - a) & MASK) or (a == b and x != a)


def in_half_open(x: int, a: int, b: int) -> bool:
    """x in (a, b] clockwise. With a == b this is the whole ring."""
    return a == b or 0 < ((x - a) & MASK) <= ((b - a) & MASK)


def finger_start(n: int, i: int) -> int:
    """Start of finger i of node n: n + 2^i (mod 2^64)."""
    return (n + (1 << i)) & MASK


def successor_of(key: int, sorted_ids: list[int]) -> int:
    """The true successor of key among sorted_ids (used by simulators and checks, not by nodes)."""
    i = bisect_left(sorted_ids, key)
    return sorted_ids[i % len(sorted_ids)]


def ideal_routing(node: int, sorted_ids: list[int]) -> tuple[int, int, list[int]]:
    """(predecessor, successor, fingers) that ``node`` holds in a converged ring of ``sorted_ids``.

    Used to check convergence, both in the simulator and against real daemons' status JSON.
    """
    n = len(sorted_ids)
    i = bisect_left(sorted_ids, node)
    if i >= n or sorted_ids[i] != node:
        raise ValueError(f"{node} is not one of the ids")
    pred = sorted_ids[i - 1]
    succ = sorted_ids[(i + 1) % n]
    fingers = []
    for b in range(BITS):
        j = bisect_left(sorted_ids, (node + (1 << b)) & MASK)
        fingers.append(sorted_ids[j % n])
    return pred, succ, fingers
