"""The stateless holder estimate (core/failure.py: ``holder_intervals``, ``in_interval``): tables, then
random rings checked against ``core/ring.ideal_routing``.

On a consistent ring with p = pred(f), node y holds f as finger i exactly when y + 2^i lies in (p, f]
(Mizutani 2021; Chord §4.1), so the nodes inside ``holder_intervals(f, p)`` must be exactly the nodes
with some ideal finger equal to f: recall 1 (and, on a consistent ring, precision 1 as well). The
number of intervals follows from the gap g = f - p: spans i and i + 1 overlap exactly when 2^i <= g,
so the spans 0 .. floor(log2 g) + 1 merge into one and the rest stay apart, which gives
``max(1, 64 - g.bit_length())`` intervals, that is about log2(2^64 / g) ~ log2 N for a typical gap.
Random rings print their seed in every message; rerun one with ``random.Random(seed)``.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlfabric.core.failure import holder_intervals, in_interval
from mlfabric.core.ring import BITS, MASK, SIZE, distance, ideal_routing

TOP = MASK  # 2^64 - 1, the last id before the ring wraps to 0


def expected_count(f: int, p: int) -> int:
    """Intervals for gap g = f - p (g = 2^64 when p == f): see the module docstring."""
    g = distance(p, f) or SIZE
    return max(1, BITS - g.bit_length())


def holders(f: int, ring: list[int], tables: dict[int, list[int]] | None = None) -> set[int]:
    """Ring nodes y != f whose ideal finger i equals f for some i (brute force from ideal_routing)."""
    out = set()
    for y in ring:
        if y == f:
            continue
        fingers = tables[y] if tables is not None else ideal_routing(y, ring)[2]
        if f in fingers:
            out.add(y)
    return out


def covered(intervals: list[tuple[int, int]], ring: list[int]) -> set[int]:
    return {y for y in ring if any(in_interval(y, s, e) for s, e in intervals)}


def check_structure(f: int, p: int, intervals: list[tuple[int, int]], what: str) -> None:
    """Disjoint, f outside all of them, the count given by the gap, never more than 64."""
    assert 1 <= len(intervals) <= BITS, what
    assert len(intervals) == expected_count(f, p), what
    # as backward distances from f every interval is [lo, hi] with 1 <= lo <= hi <= 2^64 - 1; they are
    # disjoint when sorted by lo each starts after the previous one ends
    spans = sorted((distance(e, f), distance(s, f)) for s, e in intervals)
    for lo, hi in spans:
        assert 1 <= lo <= hi <= MASK, f"{what}: interval {lo}..{hi} back from f contains f"
    for (_, hi), (lo, _) in zip(spans, spans[1:], strict=False):
        assert lo > hi, f"{what}: intervals overlap ({hi} >= {lo} back from f)"
    assert not any(in_interval(f, s, e) for s, e in intervals), what


def pred_of(f: int, ring: list[int]) -> int:
    return ring[bisect_left(ring, f) - 1]


# ------------------------------------------------------------------------------------ in_interval

# (x, start, end, x in [start, end] clockwise)
IN_INTERVAL = [
    (10, 10, 20, True),  # both ends are inside
    (20, 10, 20, True),
    (15, 10, 20, True),
    (9, 10, 20, False),
    (21, 10, 20, False),
    (5, 5, 5, True),  # start == end: the single point
    (6, 5, 5, False),
    (4, 5, 5, False),
    (TOP, TOP, TOP, True),
    (0, TOP, 0, True),  # wraps through 0: [TOP, 0] = {TOP, 0}
    (TOP, TOP, 0, True),
    (1, TOP, 0, False),
    (TOP - 1, TOP, 0, False),
    (0, TOP - 2, 2, True),
    (3, TOP - 2, 2, False),
    (1 << 63, TOP - 2, 2, False),
    (7, 8, 7, True),  # [8, 7] is the whole ring
    (8, 8, 7, True),
    (0, 1, 0, True),
    (TOP, 0, TOP, True),
    (0, 1, TOP, False),  # [1, TOP] is all but 0
]


@pytest.mark.parametrize(("x", "start", "end", "inside"), IN_INTERVAL)
def test_in_interval_table(x: int, start: int, end: int, inside: bool) -> None:
    assert in_interval(x, start, end) is inside


@given(st.integers(0, MASK), st.integers(0, MASK), st.integers(0, MASK))
def test_in_interval_is_clockwise_distance(x: int, start: int, end: int) -> None:
    inside = in_interval(x, start, end)
    assert inside == (distance(start, x) <= distance(start, end))
    # exactly one of [start, end] and its complement (end, start) holds x, unless [start, end] is everything
    if distance(start, end) < MASK:
        assert inside != in_interval(x, (end + 1) & MASK, (start - 1) & MASK)


# ------------------------------------------------------------------------------------ holder_intervals, tables

# the spans with gap 1 (p == f - 1): backward distances [1, 2], then each 2^i alone for i = 2 .. 63
GAP1 = [(1, 2)] + [(1 << i, 1 << i) for i in range(2, BITS)]


def from_back(f: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi] backward from f as clockwise [start, end] ids."""
    return [((f - hi) & MASK, (f - lo) & MASK) for lo, hi in spans]


@pytest.mark.parametrize(
    ("f", "p", "want"),
    [
        # alone (p == f): one interval, every id but f
        (5, 5, [(6, 4)]),
        (0, 0, [(1, TOP)]),
        # two nodes half a ring apart: g = 2^63, all 64 spans merge into every id but f
        (0, 1 << 63, [(1, TOP)]),
        (1 << 63, 0, [((1 << 63) + 1, (1 << 63) - 1)]),
        # p == f - 1: 63 intervals, the first two ids then single ids f - 2^i
        (1000, 999, from_back(1000, GAP1)),
        # wraparound at 0: f = 0, p = TOP; the first interval is [TOP - 1, TOP]
        (0, TOP, [(TOP - 1, TOP)] + [((-(1 << i)) & MASK, (-(1 << i)) & MASK) for i in range(2, BITS)]),
        # f = 1, p = 0: the first interval wraps through 0: [TOP, 0]
        (1, 0, [(TOP, 0)] + [((1 - (1 << i)) & MASK, (1 - (1 << i)) & MASK) for i in range(2, BITS)]),
        # f = TOP, p = TOP - 1: the last single id is TOP - 2^63 = 2^63 - 1
        (TOP, TOP - 1, from_back(TOP, GAP1)),
        # g = 2^10: spans 0..11 merge into [1, 3 * 2^10 - 1], then [2^i, 2^i + 2^10 - 1] for i = 12 .. 63
        (1 << 10, 0, from_back(1 << 10, [(1, 3 * (1 << 10) - 1)] + [(1 << i, (1 << i) + (1 << 10) - 1)
                                                                     for i in range(12, BITS)])),
        # g = 2^62 + 1 (p a quarter ring behind f): 2^62 <= g, so even span 63 merges: one interval
        (0, (3 << 62) - 1, from_back(0, [(1, (1 << 63) + (1 << 62))])),
        # g = 2^62 - 1: span 63, [2^63, 2^63 + 2^62 - 2], stays apart from [1, 2^63 - 2]
        (0, (3 << 62) + 1, from_back(0, [(1, (1 << 63) - 2), (1 << 63, (1 << 63) + (1 << 62) - 2)])),
    ],
    ids=["alone", "alone-at-0", "two-halves", "two-halves-rev", "gap1", "gap1-f0", "gap1-f1", "gap1-top",
         "gap-2^10", "gap-quarter", "gap-quarter-less-1"],
)
def test_holder_intervals_table(f: int, p: int, want: list[tuple[int, int]]) -> None:
    got = holder_intervals(f, p)
    assert got == want
    check_structure(f, p, got, f"f={f} p={p}")


@pytest.mark.parametrize(
    ("ring", "f", "want_holders"),
    [
        ([0, 1], 1, {0}),  # node 0: only finger 0 (0 + 1) is node 1; every other finger wraps to 0 itself
        ([0, 1], 0, {1}),  # node 1: every finger 1 + 2^i (i >= 1) wraps to node 0
        ([0, 1 << 63], 0, {1 << 63}),
        ([TOP - 1, TOP], TOP, {TOP - 1}),
        ([0, TOP], 0, {TOP}),  # TOP + 1 wraps to 0
        ([0, 5, TOP], 5, {0, TOP}),  # TOP's fingers 2..6 ahead are 1, 3, 7 ... -> 1 and 3 give node 5
        ([10, 20, 30], 20, {10}),  # 30 + 2^i jumps the whole ring past 20 only for i = 64, which does not exist
    ],
)
def test_tiny_rings_match_brute_force(ring: list[int], f: int, want_holders: set[int]) -> None:
    ring = sorted(ring)
    intervals = holder_intervals(f, pred_of(f, ring))
    assert holders(f, ring) == want_holders
    assert covered(intervals, ring) - {f} == want_holders
    check_structure(f, pred_of(f, ring), intervals, f"ring={ring} f={f}")


# ------------------------------------------------------------------------------------ holder_intervals, random rings


def check_ring(ring: list[int], fs: list[int], what: str) -> None:
    """For each f: the ring nodes in holder_intervals(f, pred(f)) are exactly f's finger holders."""
    tables = {y: ideal_routing(y, ring)[2] for y in ring}
    for f in fs:
        p = pred_of(f, ring)
        intervals = holder_intervals(f, p)
        where = f"{what} f={f:#x} p={p:#x}"
        check_structure(f, p, intervals, where)
        true = holders(f, ring, tables)
        got = covered(intervals, ring)
        missed = true - got
        assert not missed, f"{where}: holders outside every interval: {sorted(map(hex, missed))}"
        extra = got - true
        assert not extra, f"{where}: interval nodes that do not hold f: {sorted(map(hex, extra))}"


@pytest.mark.parametrize("n", [2, 3, 4, 7, 16, 100, 500, 2000])
@pytest.mark.parametrize("seed", [1, 2])
def test_recall_is_one_on_random_rings(n: int, seed: int) -> None:
    rng = random.Random(f"estimate:{n}:{seed}")
    ring = sorted({rng.getrandbits(BITS) for _ in range(n)})
    fs = ring if n <= 16 else rng.sample(ring, 12)
    check_ring(ring, fs, f"seed=estimate:{n}:{seed} N={len(ring)}")


def clustered_ids() -> st.SearchStrategy[int]:
    """Ids that crowd the ends of the id space and powers of two, where off-by-ones live."""
    near = st.integers(0, 64)
    return st.one_of(
        st.integers(0, MASK),
        near,
        near.map(lambda d: MASK - d),
        st.tuples(st.integers(0, BITS - 1), st.integers(-2, 2)).map(lambda t: ((1 << t[0]) + t[1]) & MASK),
    )


@given(st.lists(clustered_ids(), min_size=2, max_size=40, unique=True), st.data())
def test_recall_is_one_on_adversarial_rings(ids: list[int], data: st.DataObject) -> None:
    ring = sorted(ids)
    f = data.draw(st.sampled_from(ring), label="f")
    check_ring(ring, [f], f"ring={[hex(x) for x in ring]}")


@given(st.integers(0, MASK), st.integers(0, MASK))
def test_intervals_are_disjoint_and_avoid_f_for_any_pair(f: int, p: int) -> None:
    check_structure(f, p, holder_intervals(f, p), f"f={f:#x} p={p:#x}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_interval_count_is_about_log2_n_at_2000_nodes(seed: int) -> None:
    """The gap g = f - p on a ring of N random ids is about Exp(1) * 2^64 / N, so the count
    64 - bit_length(g) is log2 N - 1 - log2 Exp(1) + (the fractional part lost by bit_length), with mean
    log2 N - 1 + 0.83 (Euler's gamma / ln 2) + 0.5 ~ log2 N + 0.33: the mean over all N nodes (standard
    error 1.85 / sqrt(2000) ~ 0.04) must stay below log2 N + 1. One f in a hundred may have a gap below
    2^-9 of the mean (probability ~ 2^-9 each), which adds 9: the 99th percentile stays below log2 N + 10."""
    n = 2000
    rng = random.Random(f"count:{seed}")
    ring = sorted({rng.getrandbits(BITS) for _ in range(n)})
    counts = sorted(len(holder_intervals(f, ring[k - 1])) for k, f in enumerate(ring))
    log_n = math.log2(len(ring))
    mean = sum(counts) / len(counts)
    p99 = counts[math.ceil(0.99 * len(counts)) - 1]
    assert mean <= log_n + 1, f"seed=count:{seed}: mean {mean:.2f} intervals, log2 N = {log_n:.2f}"
    assert p99 <= log_n + 10, f"seed=count:{seed}: p99 {p99} intervals, log2 N = {log_n:.2f}"
    assert counts[-1] <= BITS
