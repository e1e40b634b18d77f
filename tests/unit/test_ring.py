"""Ring arithmetic on the 64-bit identifier circle (core/ring.py, Chord §4.1): tables, then properties."""

from __future__ import annotations

import hashlib
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlfabric.core.ring import (
    BITS,
    MASK,
    SIZE,
    distance,
    finger_start,
    ideal_routing,
    in_half_open,
    in_open,
    ring_id,
    successor_of,
)

TOP = MASK  # the largest id, 2^64 - 1: the last point before the ring wraps to 0
ids = st.integers(min_value=0, max_value=MASK)


def test_ring_constants() -> None:
    assert (BITS, SIZE, MASK) == (64, 1 << 64, (1 << 64) - 1)


# ------------------------------------------------------------------------------------ intervals

# (x, a, b, x in (a, b), x in (a, b])
INTERVALS = [
    # plain interval, no wrap
    (15, 10, 20, True, True),
    (10, 10, 20, False, False),  # the left end is never inside
    (20, 10, 20, False, True),  # the right end only in the half-open one
    (11, 10, 20, True, True),
    (19, 10, 20, True, True),
    (21, 10, 20, False, False),
    (5, 10, 20, False, False),
    (0, 10, 20, False, False),
    (TOP, 10, 20, False, False),
    # interval that wraps through 0: (TOP - 5, 5)
    (TOP, TOP - 5, 5, True, True),
    (0, TOP - 5, 5, True, True),
    (4, TOP - 5, 5, True, True),
    (5, TOP - 5, 5, False, True),
    (TOP - 5, TOP - 5, 5, False, False),
    (TOP - 6, TOP - 5, 5, False, False),
    (6, TOP - 5, 5, False, False),
    (1 << 63, TOP - 5, 5, False, False),
    # the ends of the id space
    (0, TOP, 0, False, True),  # (TOP, 0) is empty; (TOP, 0] is {0}
    (TOP, TOP, 0, False, False),
    (TOP - 1, 0, TOP, True, True),  # (0, TOP) is all but the two ends
    (TOP, 0, TOP, False, True),
    (0, 0, TOP, False, False),
    (1, 0, TOP, True, True),
    # adjacent ends: (a, a+1) is empty, (a, a+1] is {a+1}
    (11, 10, 11, False, True),
    (10, 10, 11, False, False),
    (12, 10, 11, False, False),
    # a == b: (a, a) is the whole ring but a; (a, a] is the whole ring
    (7, 7, 7, False, True),
    (8, 7, 7, True, True),
    (6, 7, 7, True, True),
    (0, 7, 7, True, True),
    (TOP, 7, 7, True, True),
    (0, 0, 0, False, True),
    (TOP, TOP, TOP, False, True),
    # the far side of the ring from a == b
    ((7 + (1 << 63)) & MASK, 7, 7, True, True),
]


@pytest.mark.parametrize(("x", "a", "b", "open_", "half_open"), INTERVALS)
def test_interval_membership(x: int, a: int, b: int, open_: bool, half_open: bool) -> None:
    assert in_open(x, a, b) is open_
    assert in_half_open(x, a, b) is half_open


# ------------------------------------------------------------------------------------ distance


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (0, 0, 0),
        (5, 5, 0),
        (10, 20, 10),
        (20, 10, SIZE - 10),  # clockwise: all the way round
        (TOP, 0, 1),
        (0, TOP, TOP),
        (TOP - 5, 5, 11),
        (0, 1 << 63, 1 << 63),
        (1 << 63, 0, 1 << 63),
    ],
)
def test_distance_is_clockwise(a: int, b: int, expected: int) -> None:
    assert distance(a, b) == expected


# ------------------------------------------------------------------------------------ fingers


@pytest.mark.parametrize(
    ("n", "i", "expected"),
    [
        (0, 0, 1),
        (0, 10, 1024),
        (0, 63, 1 << 63),
        (100, 0, 101),
        (100, 6, 164),
        (TOP, 0, 0),  # wraps
        (TOP, 1, 1),
        (1 << 63, 63, 0),  # half way round from half way round is 0
        ((1 << 63) + 5, 63, 5),
        (TOP, 63, (1 << 63) - 1),
    ],
)
def test_finger_start(n: int, i: int, expected: int) -> None:
    assert finger_start(n, i) == expected


# ------------------------------------------------------------------------------------ successor_of

RING = [100, 200, 300, 400]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (100, 100),  # a node is its own id's successor
        (101, 200),
        (150, 200),
        (200, 200),
        (399, 400),
        (400, 400),
        (401, 100),  # past the last id: wrap to the first
        (TOP, 100),
        (0, 100),
        (99, 100),
    ],
)
def test_successor_of(key: int, expected: int) -> None:
    assert successor_of(key, RING) == expected


def test_successor_of_single_node_is_always_that_node() -> None:
    assert {successor_of(k, [42]) for k in (0, 41, 42, 43, TOP)} == {42}


# ------------------------------------------------------------------------------------ ideal routing


def test_ideal_routing_of_a_small_ring() -> None:
    pred, succ, fingers = ideal_routing(100, RING)
    assert (pred, succ) == (400, 200)
    assert len(fingers) == BITS
    # starts 101..164 (i = 0..6) -> 200; 228 -> 300; 356 -> 400; 612 and beyond -> wrap to 100 (itself)
    assert fingers[:7] == [200] * 7
    assert fingers[7:9] == [300, 400]
    assert fingers[9:] == [100] * (BITS - 9)


def test_ideal_routing_wraps_at_the_ends() -> None:
    assert ideal_routing(400, RING)[:2] == (300, 100)  # the last node's successor is the first
    assert ideal_routing(100, RING)[:2] == (400, 200)  # the first node's predecessor is the last


def test_ideal_routing_evenly_spaced_ring() -> None:
    ring = [k << 60 for k in range(16)]
    pred, succ, fingers = ideal_routing(8 << 60, ring)
    assert (pred, succ) == (7 << 60, 9 << 60)
    assert fingers[:61] == [9 << 60] * 61
    assert fingers[61:] == [10 << 60, 12 << 60, 0]  # +2, +4, +8 (wraps to 0)


def test_ideal_routing_lone_node_points_at_itself() -> None:
    assert ideal_routing(7, [7]) == (7, 7, [7] * BITS)


def test_ideal_routing_two_nodes() -> None:
    pred, succ, fingers = ideal_routing(0, [0, 1 << 63])
    assert pred == succ == 1 << 63
    assert fingers == [1 << 63] * BITS  # every start in (0, 2^63] ...and 2^63 itself


def test_ideal_routing_rejects_an_id_not_in_the_ring() -> None:
    with pytest.raises(ValueError, match="not one of the ids"):
        ideal_routing(150, RING)
    with pytest.raises(ValueError):
        ideal_routing(500, RING)  # past the end: bisect lands out of range


# ------------------------------------------------------------------------------------ ring_id


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # SHA-256("") = e3b0c442 98fc1c14 ...: the first 8 bytes, big-endian
        ("", 0xE3B0C44298FC1C14),
        (b"", 0xE3B0C44298FC1C14),
        ("mlfabric", 0xE1C35E215AC232E0),
        ("1:0", 0xA6685F3B62D57BFC),  # the simulator's id of node 0 for seed 1
        ("127.0.0.1:7700", 0xCF104A5C7E1553CB),
    ],
)
def test_ring_id_is_a_fixed_known_value(data: str | bytes, expected: int) -> None:
    assert ring_id(data) == expected


def test_ring_id_str_is_its_utf8_bytes() -> None:
    assert ring_id("nœud") == ring_id("nœud".encode())
    assert ring_id("a") != ring_id("b")


@given(st.binary(max_size=64))
def test_ring_id_is_the_sha256_prefix(data: bytes) -> None:
    value = ring_id(data)
    assert 0 <= value <= MASK
    assert value == int(hashlib.sha256(data).hexdigest()[:16], 16)


# ------------------------------------------------------------------------------------ properties


@given(ids, ids, ids)
def test_half_open_is_open_plus_right_end(x: int, a: int, b: int) -> None:
    if a != b:
        assert in_half_open(x, a, b) == (x == b or in_open(x, a, b))
    else:
        assert in_half_open(x, a, b)
        assert in_open(x, a, b) == (x != a)


@given(ids, ids, ids)
def test_two_half_open_arcs_partition_the_ring(x: int, a: int, b: int) -> None:
    """For a != b, (a, b] and (b, a] are disjoint and cover the ring: exactly one holds x."""
    if a == b:
        return
    assert in_half_open(x, a, b) != in_half_open(x, b, a)


@given(ids, ids, ids)
def test_open_arcs_and_ends_partition_the_ring(x: int, a: int, b: int) -> None:
    """For a != b every x is exactly one of: a, b, in (a, b), in (b, a)."""
    if a == b:
        return
    assert [x == a, x == b, in_open(x, a, b), in_open(x, b, a)].count(True) == 1


@given(ids, ids, ids)
def test_intervals_are_rotation_invariant(x: int, a: int, b: int) -> None:
    shift = 0x9E3779B97F4A7C15
    r = lambda v: (v + shift) & MASK  # noqa: E731
    assert in_open(x, a, b) == in_open(r(x), r(a), r(b))
    assert in_half_open(x, a, b) == in_half_open(r(x), r(a), r(b))


@given(ids, ids, ids)
def test_interval_membership_agrees_with_distance(x: int, a: int, b: int) -> None:
    if a == b:
        return
    assert in_open(x, a, b) == (0 < distance(a, x) < distance(a, b))


@given(ids, ids)
def test_distance_there_and_back_is_a_full_turn(a: int, b: int) -> None:
    d = distance(a, b)
    assert 0 <= d <= MASK
    assert (a + d) & MASK == b
    assert d + distance(b, a) == (0 if a == b else SIZE)


@given(ids, st.integers(min_value=0, max_value=BITS - 1))
def test_finger_start_is_at_distance_two_to_the_i(n: int, i: int) -> None:
    assert distance(n, finger_start(n, i)) == 1 << i


@given(st.lists(ids, min_size=1, max_size=40, unique=True), ids)
def test_successor_of_is_the_first_node_at_or_after_key(nodes: list[int], key: int) -> None:
    ring = sorted(nodes)
    succ = successor_of(key, ring)
    assert succ in ring
    # no node lies strictly between key and its successor, clockwise
    assert not any(distance(key, n) < distance(key, succ) for n in ring)


@given(st.lists(ids, min_size=1, max_size=40, unique=True), st.data())
def test_ideal_routing_agrees_with_successor_of(nodes: list[int], data: st.DataObject) -> None:
    ring = sorted(nodes)
    node = data.draw(st.sampled_from(ring))
    pred, succ, fingers = ideal_routing(node, ring)
    i = bisect_left(ring, node)
    assert pred == ring[i - 1]
    assert succ == ring[(i + 1) % len(ring)]
    assert fingers == [successor_of(finger_start(node, b), ring) for b in range(BITS)]
    if len(ring) > 1:
        assert in_open(node, pred, succ)
        assert fingers[0] == succ  # finger 0 starts at node + 1, so it is the successor
