"""Spans (core/spans.py): table tests, and properties against a brute-force model (a set of points) on
small integer ranges of the ring; from_flat, the wire's way in, rejects what a peer must not send."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mlfabric.core.ring import SIZE
from mlfabric.core.spans import FULL, Spans
from mlfabric.errors import RemoteProtocolError

TOP = 48  # the model's ring: points 0 .. TOP - 1


def points(s: Spans) -> set[int]:
    return {x for lo, hi in s.intervals for x in range(lo, hi)}


def runs(pts: set[int], lo: int = 0, hi: int = TOP) -> list[tuple[int, int]]:
    """The maximal intervals of ``pts`` within [lo, hi)."""
    out: list[tuple[int, int]] = []
    for x in range(lo, hi):
        if x in pts:
            if out and out[-1][1] == x:
                out[-1] = (out[-1][0], x + 1)
            else:
                out.append((x, x + 1))
    return out


intervals = st.lists(st.tuples(st.integers(0, TOP), st.integers(0, TOP)).map(lambda t: (min(t), max(t))),
                     max_size=8)
spans = intervals.map(Spans)


# ------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize(("given_", "want"), [
    ([], ()),
    ([(3, 3)], ()),  # empty intervals vanish
    ([(5, 9), (1, 3)], ((1, 3), (5, 9))),  # sorted
    ([(1, 4), (4, 6)], ((1, 6),)),  # adjacent ones join
    ([(1, 5), (2, 3)], ((1, 5),)),  # nested
    ([(1, 5), (3, 8), (10, 12)], ((1, 8), (10, 12))),  # overlapping
    ([(0, SIZE)], ((0, SIZE),)),
])
def test_construction_normalises(given_: list[tuple[int, int]], want: tuple[tuple[int, int], ...]) -> None:
    assert Spans(given_).intervals == want


@pytest.mark.parametrize("bad", [[(-1, 3)], [(2, SIZE + 1)]])
def test_construction_rejects_what_is_off_the_ring(bad: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError, match="outside the ring"):
        Spans(bad)


def test_flat_sends_the_top_of_the_ring_as_zero_and_back() -> None:
    s = Spans([(5, 10), (SIZE - 4, SIZE)])
    assert s.flat() == (5, 10, SIZE - 4, 0)
    assert Spans.from_flat(s.flat()) == s
    assert FULL.flat() == (0, 0) and Spans.from_flat((0, 0)) == FULL
    assert Spans.from_flat(()) == Spans() and not Spans()


@pytest.mark.parametrize("flat", [
    (1, 2, 3),  # odd
    (5, 3),  # hi below lo
    (4, 4),  # empty
    (5, 9, 1, 3),  # unsorted
    (1, 5, 4, 8),  # overlapping
    (1, 0, 2, 3),  # anything after the top of the ring
    (-1, 3),  # below the ring (cannot come off the wire, must not get through either)
    (0, SIZE + 1),
])
def test_from_flat_rejects_bad_input(flat: tuple[int, ...]) -> None:
    with pytest.raises(RemoteProtocolError):
        Spans.from_flat(flat)


def test_from_flat_joins_adjacent_pairs() -> None:
    assert Spans.from_flat((1, 3, 3, 5)).intervals == ((1, 5),)


@pytest.mark.parametrize(("s", "lo", "hi", "want"), [
    (Spans(), 0, SIZE, [(0, SIZE)]),
    (FULL, 0, SIZE, []),
    (Spans([(2, 4), (6, 8)]), 0, 10, [(0, 2), (4, 6), (8, 10)]),
    (Spans([(2, 4), (6, 8)]), 3, 7, [(4, 6)]),
    (Spans([(2, 4)]), 2, 4, []),
    (Spans([(10, SIZE)]), 0, SIZE, [(0, 10)]),
])
def test_gaps(s: Spans, lo: int, hi: int, want: list[tuple[int, int]]) -> None:
    assert s.gaps(lo, hi) == want


@pytest.mark.parametrize(("s", "lo", "hi", "want"), [
    (Spans([(2, 8)]), 2, 8, True),
    (Spans([(2, 8)]), 3, 5, True),
    (Spans([(2, 8)]), 1, 5, False),
    (Spans([(2, 8)]), 5, 9, False),
    (Spans([(2, 4), (5, 8)]), 3, 6, False),  # a hole at 4
    (FULL, 0, SIZE, True),
    (Spans(), 0, 1, False),
])
def test_covers(s: Spans, lo: int, hi: int, want: bool) -> None:
    assert s.covers(lo, hi) is want


def test_set_operations_by_hand() -> None:
    a, b = Spans([(1, 3), (7, 9)]), Spans([(3, 5)])
    assert (a | b).intervals == ((1, 5), (7, 9))
    assert not a.intersects(b)  # [1, 3) and [3, 5) touch, they do not overlap
    assert a.intersects(Spans([(8, 20)])) and Spans([(8, 20)]).intersects(a)
    assert 1 in a and 2 in a and 3 not in a and 9 not in a and 0 not in a
    assert len(a) == 2 and len(FULL) == 1
    assert a == Spans([(7, 9), (1, 2), (2, 3)]) and hash(a) == hash(Spans([(7, 9), (1, 3)]))
    assert a != (1, 3, 7, 9)
    assert repr(b) == "Spans([3,5))"


# ------------------------------------------------------------------------------------------- properties


@given(intervals)
def test_normal_form_holds_the_same_points(ivs: list[tuple[int, int]]) -> None:
    s = Spans(ivs)
    want = {x for lo, hi in ivs for x in range(lo, hi)}
    assert points(s) == want
    assert list(s.intervals) == runs(want)  # sorted, disjoint, never touching, nothing empty
    assert len(s) == len(runs(want)) and bool(s) == bool(want)


@given(spans, spans)
def test_union_and_intersects_match_the_model(a: Spans, b: Spans) -> None:
    assert points(a | b) == points(a) | points(b)
    assert a.intersects(b) == bool(points(a) & points(b)) == b.intersects(a)
    assert (a == b) == (points(a) == points(b))
    if a == b:
        assert hash(a) == hash(b)


@given(spans, st.integers(-2, TOP + 2))
def test_contains_matches_the_model(s: Spans, x: int) -> None:
    assert (x in s) == (x in points(s))


@given(spans, st.integers(0, TOP), st.integers(0, TOP))
def test_covers_and_gaps_match_the_model(s: Spans, x: int, y: int) -> None:
    lo, hi = min(x, y), max(x, y)
    pts = points(s)
    if lo < hi:
        assert s.covers(lo, hi) == (set(range(lo, hi)) <= pts)
    assert s.gaps(lo, hi) == runs(set(range(lo, hi)) - pts, lo, hi)


@given(spans)
def test_gaps_and_spans_partition_the_ring(s: Spans) -> None:
    assert s | Spans(s.gaps()) == FULL
    assert not s.intersects(Spans(s.gaps()))


@given(spans)
def test_flat_round_trip(s: Spans) -> None:
    flat = s.flat()
    assert len(flat) == 2 * len(s)
    assert Spans.from_flat(flat) == s
    assert Spans.from_flat(list(flat)) == s


@given(intervals)
def test_from_flat_accepts_exactly_the_sorted_disjoint_nonempty_lists(ivs: list[tuple[int, int]]) -> None:
    assume(all(hi != 0 for _, hi in ivs))  # 0 as a top bound means the top of the ring (tested above)
    flat = tuple(x for iv in ivs for x in iv)
    ok = all(lo < hi for lo, hi in ivs) and all(ivs[i][1] <= ivs[i + 1][0] for i in range(len(ivs) - 1))
    if ok:
        assert points(Spans.from_flat(flat)) == points(Spans(ivs))
    else:
        with pytest.raises(RemoteProtocolError):
            Spans.from_flat(flat)
