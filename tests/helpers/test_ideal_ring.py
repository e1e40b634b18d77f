"""The stand-in ring of the unit tests (tests/helpers/ideal_ring.py) judged on its own: its answers on a
hand-built ring (expected values written out by hand, and checked against ``core.ring.ideal_routing``),
and its ``converged()`` failing on each kind of wrong pointer. A judge that passed everything would let
test_chord.py and test_failure_detector.py pass with a broken machine.
"""

from __future__ import annotations

import random

import pytest

from helpers.ideal_ring import ALL, ME, IdealRing, P, ideal_state
from mlfabric.config import OverlayConfig
from mlfabric.core.chord import ChordMachine
from mlfabric.core.ring import MASK, ideal_routing
from mlfabric.runtime.cluster import ideal_ring
from mlfabric.wire.messages import (
    NOTICE_DIRECT,
    FailureNotice,
    FindSuccessor,
    FindSuccessorReply,
    GetNeighbors,
    Message,
    Neighbors,
    NoticeAck,
    Notify,
    Peer,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResult,
)

# a hand-built, uneven ring that wraps: c is the node under test
A, B, C, D, E = (Peer(10, "a"), Peer(20, "b"), Peer(30, "c"), Peer(1000, "d"), Peer(MASK - 4, "e"))
OTHERS = [A, B, D, E]


class Scripted:
    """A machine that sends what the test queues and records what it receives (only to test the ring)."""

    def __init__(self, me: Peer) -> None:
        self.me = me
        self.outbox: list[tuple[str, Message]] = []
        self.received: list[tuple[Peer, Message]] = []

    def drain_outbox(self) -> list[tuple[str, Message]]:
        out, self.outbox = self.outbox, []
        return out

    def receive(self, src: Peer, msg: Message, now: float) -> None:
        self.received.append((src, msg))

    def next_event(self) -> None:
        return None


def ask(ring: IdealRing, dst: Peer, msg: Message) -> list[tuple[Peer, Message]]:
    """Send ``msg`` to ``dst`` through the ring; the answers (sender, message) that came back."""
    machine: Scripted = ring.machine
    mark = len(machine.received)
    machine.outbox.append((dst.address, msg))
    ring.flush()
    return machine.received[mark:]


def scripted_ring() -> IdealRing:
    return IdealRing(Scripted(C), [*OTHERS, C], r=3)


# ---------------------------------------------------------------------------- answers


def test_find_successor_is_answered_with_the_true_successor_and_the_nodes_after_it() -> None:
    ring = scripted_ring()
    # before c notifies, the ring does not know it: the join lookup of 30 gets d, not c itself
    assert ask(ring, A, FindSuccessor(req=1, key=30)) == [(A, FindSuccessorReply(req=1, done=True, nodes=(D, E, A)))]
    assert ask(ring, A, FindSuccessor(req=2, key=21)) == [(A, FindSuccessorReply(req=2, done=True, nodes=(D, E, A)))]
    assert ask(ring, B, FindSuccessor(req=3, key=E.id)) == [(B, FindSuccessorReply(req=3, done=True, nodes=(E, A, B)))]
    # past the last id the answer wraps through 0
    assert ask(ring, B, FindSuccessor(req=4, key=MASK)) == [(B, FindSuccessorReply(req=4, done=True, nodes=(A, B, D)))]
    assert ask(ring, B, FindSuccessor(req=5, key=0)) == [(B, FindSuccessorReply(req=5, done=True, nodes=(A, B, D)))]
    ask(ring, D, Notify())  # now it does
    assert ask(ring, A, FindSuccessor(req=6, key=21)) == [(A, FindSuccessorReply(req=6, done=True, nodes=(C, D, E)))]


def test_get_neighbors_is_answered_with_the_asked_nodes_true_neighbours() -> None:
    ring = scripted_ring()
    assert ask(ring, D, GetNeighbors(req=7)) == [(D, Neighbors(req=7, predecessor=B, successors=(E, A, B)))]
    assert ask(ring, A, GetNeighbors(req=8)) == [(A, Neighbors(req=8, predecessor=E, successors=(B, D, E)))]
    ask(ring, D, Notify())
    assert ask(ring, D, GetNeighbors(req=9)) == [(D, Neighbors(req=9, predecessor=C, successors=(E, A, B)))]
    assert ask(ring, B, GetNeighbors(req=10)) == [(B, Neighbors(req=10, predecessor=A, successors=(C, D, E)))]


def test_answers_agree_with_ideal_routing_for_every_node() -> None:
    ring = scripted_ring()
    ask(ring, D, Notify())
    ids = sorted(p.id for p in [*OTHERS, C])
    for p in [*OTHERS, C]:
        pred, succ, _ = ideal_routing(p.id, ids)
        assert (ring.predecessor(p).id, ring.successors((p.id + 1) & MASK)[0].id) == (pred, succ)


def test_ping_probe_and_notice_answers() -> None:
    ring = scripted_ring()
    ring.incarnation[B.address] = 4
    ring.incarnation[D.address] = 2
    assert ask(ring, B, Ping(seq=11)) == [(B, Pong(seq=11, incarnation=4))]
    assert ask(ring, A, Ping(seq=12)) == [(A, Pong(seq=12, incarnation=0))]
    assert ask(ring, A, ProbeRequest(req=13, target=D)) == [(A, ProbeResult(req=13, target=D, alive=True, incarnation=2))]
    notice = FailureNotice(dead=D, incarnation=0, detector=C, mode=NOTICE_DIRECT, start=0, end=0, back=0, replacement=E,
                           seq=14, predecessor=B)
    assert ask(ring, A, notice) == [(A, NoticeAck(seq=14))]
    assert ask(ring, A, FailureNotice(dead=D, incarnation=0, detector=C, mode=NOTICE_DIRECT, start=0, end=0, back=0,
                                      replacement=E, seq=0, predecessor=B)) == []  # no seq: no ack awaited
    ring.silent.add(D.address)
    assert ask(ring, A, ProbeRequest(req=15, target=D)) == []  # the helper cannot reach it either


def test_notify_is_answered_by_the_live_predecessor_with_its_predecessor() -> None:
    ring = scripted_ring()
    assert not ring.knows_me
    assert ask(ring, D, Notify(predecessor=B)) == [(B, Notify(predecessor=A))]
    assert ring.knows_me
    ring.silent.add(B.address)  # crashed: the next live node back stabilizes with c, naming b still
    assert ask(ring, D, Notify()) == [(A, Notify(predecessor=E))]
    ring.notify_back = False
    assert ask(ring, D, Notify()) == []


def test_silent_nodes_answer_nothing_but_are_named_gone_nodes_are_not_named() -> None:
    ring = scripted_ring()
    ring.silent.add(D.address)
    assert ask(ring, D, Ping(seq=1)) == [] and ask(ring, D, GetNeighbors(req=2)) == []
    assert ask(ring, A, FindSuccessor(req=3, key=21)) == [(A, FindSuccessorReply(req=3, done=True, nodes=(D, E, A)))]
    ring.gone.add(D.address)
    assert ask(ring, A, FindSuccessor(req=4, key=21)) == [(A, FindSuccessorReply(req=4, done=True, nodes=(E, A, B)))]
    assert ask(ring, E, GetNeighbors(req=5)) == [(E, Neighbors(req=5, predecessor=B, successors=(A, B)))]
    # nobody at an unknown address, and held messages are kept for the test instead of answered
    assert ask(ring, Peer(7, "x"), Ping(seq=6)) == []
    ring.hold = lambda dst, msg: isinstance(msg, Ping)
    assert ask(ring, A, Ping(seq=7)) == []
    assert [(d, m) for _, d, m in ring.held] == [("a", Ping(seq=7))]
    assert [(d, m) for _, d, m in ring.sent][-2:] == [("x", Ping(seq=6)), ("a", Ping(seq=7))]


# ---------------------------------------------------------------------------- the judge

CFG = OverlayConfig(successors=3, lookup_fanout=2)
HAND_FINGERS = [P(9)] * 61 + [P(10), P(12), P(0)]  # node 8's fingers, worked out by hand


def test_ideal_state_matches_the_hand_worked_state() -> None:
    want = ideal_state(P(ME), [P(k) for k in ALL], 3)
    assert (want.predecessor, want.pred_pred, want.successors) == (P(7), P(6), [P(9), P(10), P(11)])
    assert want.fingers == HAND_FINGERS
    two = ideal_state(P(8), [P(3)], 3)
    assert (two.predecessor, two.pred_pred, two.successors, set(two.fingers)) == (P(3), P(8), [P(3)], {P(3)})


@pytest.mark.parametrize("n", [2, 3, 17])
def test_ideal_state_agrees_with_the_real_process_judge(n: int, rng: random.Random) -> None:
    peers = [Peer(rng.getrandbits(64), f"p{i}") for i in range(n)]
    judge = ideal_ring([p.id for p in peers], 3)
    for me in peers:
        got = ideal_state(me, peers, 3)
        assert judge[me.id] == {"predecessor": got.predecessor.id, "successors": [s.id for s in got.successors],
                                "fingers": [f.id for f in got.fingers]}


def installed(**wrong: object) -> tuple[ChordMachine, IdealRing]:
    """Node 8 holding its hand-worked ideal state (through the public ``install``), with ``wrong``'s
    pointers changed."""
    m = ChordMachine(P(ME), CFG, random.Random(1))
    m.install(P(7), [P(9), P(10), P(11)], list(HAND_FINGERS), 0.0)
    m.pred_pred = P(6)
    for field, value in wrong.items():
        setattr(m, field, value)
    return m, IdealRing(m, [P(k) for k in ALL], CFG.successors)


def test_converged_accepts_the_ideal_state() -> None:
    _, ring = installed()
    assert ring.problems() == [] and ring.converged()


@pytest.mark.parametrize(
    ("wrong", "problem"),
    [
        ({"successors": [P(10), P(11), P(12)]}, "successors"),  # skips node 9
        ({"successors": [P(9), P(11), P(12)]}, "successors"),  # a later entry wrong
        ({"successors": [P(9), P(10)]}, "successors"),  # too short
        ({"predecessor": P(6)}, "predecessor"),
        ({"predecessor": None}, "predecessor"),
        ({"pred_pred": P(5)}, "pred_pred"),
        ({"fingers": HAND_FINGERS[:62] + [P(13), P(0)]}, "finger 62"),
        ({"fingers": [P(10)] + HAND_FINGERS[1:]}, "finger 0"),
        ({"fingers": HAND_FINGERS[:63] + [None]}, "finger 63"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_converged_fails_on_one_wrong_pointer(wrong: dict[str, object], problem: str) -> None:
    _, ring = installed(**wrong)
    assert not ring.converged()
    [line] = ring.problems()
    assert line.startswith(problem + " "), line


def test_the_truth_follows_the_rings_membership() -> None:
    m, ring = installed()
    ring.gone.add(P(9).address)  # nobody names node 9 any more: holding it is wrong now
    assert not ring.converged()
    assert {line.split(" ")[0] for line in ring.problems()} == {"successors", "finger"}
    m.install(P(7), [P(10), P(11), P(12)], [P(10)] * 62 + [P(12), P(0)], 0.0)
    assert ring.converged()


def test_join_reaches_the_ideal_state_or_says_why_not() -> None:
    m = ChordMachine(P(ME), CFG, random.Random(2))
    ring = IdealRing(m, [P(k) for k in ALL], CFG.successors)
    ring.join(P(0).address)
    assert ring.converged() and ring.knows_me and ring.now < 20
    # against a ring that never answers the machine cannot converge, and join says so
    m = ChordMachine(P(ME), CFG, random.Random(3))
    ring = IdealRing(m, [P(k) for k in ALL], CFG.successors)
    ring.silent |= {P(k).address for k in ALL}
    with pytest.raises(AssertionError, match="did not reach its ideal state"):
        ring.join(P(0).address, limit=5.0)
