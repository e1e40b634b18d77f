"""The Chord machine driven by hand on a virtual clock (core/chord.py, core/node.py): no simulator.

Most tests put one real ``ChordMachine`` (node 8) into a ring of 16 evenly spaced ids, ``k << 60``.
The rest of the ring is an ``IdealRing`` (tests/helpers/ideal_ring.py), the oracle, that answers the
machine's requests at once from the ideal ring (zero latency), or not at all for the addresses in
``oracle.gone`` (which nobody names any more either); so the machine reaches its ideal state through
its own protocol, and nothing private is touched. Each test then feeds single messages and timer ticks
and checks what comes out. Expected values come from ``core/ring.py``'s ``ideal_routing`` or are
written out by hand, never from the machine itself.
"""

from __future__ import annotations

import random

import pytest
from helpers.ideal_ring import ALL, BY_ADDRESS, ME, IdealRing, K, P, changed

from mlfabric.config import OverlayConfig
from mlfabric.core.chord import ChordMachine
from mlfabric.core.events import (
    Event,
    Joined,
    Left,
    LookupDone,
    PeerUnresponsive,
    PredecessorChanged,
    SuccessorChanged,
)
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, distance, ideal_routing, in_open
from mlfabric.wire.messages import (
    FindSuccessor,
    FindSuccessorReply,
    GetNeighbors,
    Leaving,
    Message,
    Neighbors,
    Notify,
    Peer,
    Ping,
    Pong,
    SuccessorHint,
)

R = 3  # successor list length in these tests
FANOUT = 2
CFG = OverlayConfig(successors=R, lookup_fanout=FANOUT)


def cfg_with(**changes: object) -> OverlayConfig:
    return changed(CFG, **changes)


def step(
    oracle: IdealRing[ChordMachine], until: float, log: list[tuple[float, object]] | None = None
) -> tuple[list[Event], list[tuple[str, Message]]]:
    """Fire the machine's timers up to ``until`` (virtual time), the oracle answering; what happened.
    ``log`` collects (time, event) and (time, (address, message)) in order."""
    e0, s0 = len(oracle.events), len(oracle.sent)
    oracle.run(until)
    events, sent = oracle.events[e0:], oracle.sent[s0:]
    if log is not None:
        log += sorted([(t, e) for t, e in events] + [(t, (d, m)) for t, d, m in sent], key=lambda x: x[0])
    return [e for _, e in events], [(d, m) for _, d, m in sent]


def drain_events(m: ChordMachine | NodeCore) -> list[Event]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def ideal(me: Peer, ks: list[int]) -> tuple[Peer, Peer, list[Peer]]:
    ring = sorted(P(k).id for k in ks)
    by_id = {P(k).id: P(k) for k in ks}
    pred, succ, fingers = ideal_routing(me.id, ring)
    return by_id[pred], by_id[succ], [by_id[f] for f in fingers]


def converged(
    ks: list[int] = ALL, me: int = ME, cfg: OverlayConfig = CFG
) -> tuple[ChordMachine, IdealRing[ChordMachine], float]:
    """Node ``me`` joined through the protocol and holding its ideal state; returns (machine, oracle, now)."""
    m = ChordMachine(P(me), cfg, random.Random(f"test_chord:{me}"))
    oracle = IdealRing(m, [P(k) for k in ks], cfg.successors)
    oracle.join(P(next(k for k in ks if k != me)).address)
    drain_events(m)
    return m, oracle, oracle.now


def only(sent: list[tuple[str, Message]], kind: type[Message]) -> list[tuple[str, Message]]:
    return [(dst, msg) for dst, msg in sent if isinstance(msg, kind)]


def test_helper_reaches_the_ideal_state() -> None:
    m, _, now = converged()
    pred, succ, fingers = ideal(P(ME), ALL)
    assert (pred, succ, m.fingers) == (P(7), P(9), fingers)
    assert (m.predecessor, m.successor, m.successors) == (P(7), P(9), [P(9), P(10), P(11)])
    assert m.fingers[:61] == [P(9)] * 61 and m.fingers[61:] == [P(10), P(12), P(0)]
    assert m.joined and now < 20


# ------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("seeds", [[], ["n8:7700"]], ids=["no-seeds", "only-itself"])
def test_lone_node_bootstraps_and_answers_lookups_with_itself(seeds: list[str]) -> None:
    core = NodeCore(P(8), CFG, random.Random(1))
    core.bootstrap(seeds, 0.0)
    assert drain_events(core) == [Joined(P(8))]
    assert core.chord.joined and core.chord.successor == P(8)

    for key in (0, P(8).id, P(8).id + 1, P(3).id, (1 << 64) - 1):
        token = core.lookup(key, 0.25)
        assert drain_events(core) == [LookupDone(token, key, P(8), hops=0, elapsed=0.0)]
    assert core.drain_outbox() == []  # nobody to ask

    # another node asking it gets the lone node as the successor of every key
    core.receive(P(3), FindSuccessor(req=5, key=P(2).id), 0.3)
    assert core.drain_outbox() == [("n3:7700", FindSuccessorReply(req=5, done=True, nodes=(P(8),)))]

    # its timers run, its fingers all point at itself, and it still sends nothing
    t = 0.3
    while (at := core.next_deadline()) is not None and at < 10.0:
        t = at
        core.handle_timer(t)
    assert t > 5.0
    assert core.chord.fingers == [P(8)] * BITS
    assert core.drain_outbox() == []


def test_join_asks_seeds_in_order_then_retries_after_join_retry_interval() -> None:
    cfg = cfg_with(rpc_timeout=0.5, join_retry_interval=2.0)
    m = ChordMachine(P(8), cfg, random.Random(2))
    m.bootstrap(["a:1", "b:2"], 0.0)
    assert m.drain_outbox() == [("a:1", FindSuccessor(req=1, key=P(8).id))]
    assert m.next_deadline() == 0.5
    m.handle_timer(0.5)  # a timed out: try b
    assert m.drain_outbox() == [("b:2", FindSuccessor(req=2, key=P(8).id))]
    m.handle_timer(1.0)  # b too: wait join_retry_interval, then start over with a
    assert m.drain_outbox() == [] and not m.joined
    assert m.next_deadline() == 3.0
    m.handle_timer(3.0)
    [(dst, msg)] = m.drain_outbox()
    assert dst == "a:1" and isinstance(msg, FindSuccessor)
    # a answers this time: joined, with a's answer as the successor list
    m.receive(Peer(1, "a:1"), FindSuccessorReply(req=msg.req, done=True, nodes=(P(9), P(10))), 3.1)
    assert m.joined and m.successors == [P(9), P(10)]
    assert Joined(P(9)) in drain_events(m)
    assert m.next_deadline() == 3.1  # stabilize at once: learn the successor's list and notify it


# ------------------------------------------------------------------------------------ serving lookups


@pytest.fixture(scope="module")
def node8() -> ChordMachine:
    """Node 8, converged in the full ring. Serving a FindSuccessor changes nothing but counters."""
    return converged()[0]


def serve(m: ChordMachine, key: int, req: int = 77) -> FindSuccessorReply:
    src = P(3)
    m.receive(src, FindSuccessor(req=req, key=key), 100.0)
    [(dst, reply)] = m.drain_outbox()
    assert dst == src.address and isinstance(reply, FindSuccessorReply) and reply.req == req
    return reply



@pytest.mark.parametrize(
    ("key", "done", "nodes"),
    [
        # key in (pred, me]: me, then my successors (r in all)
        (7 * K + 1, True, (8, 9, 10)),
        (8 * K, True, (8, 9, 10)),
        # key in (me, succ]: my successor list
        (8 * K + 1, True, (9, 10, 11)),
        (9 * K, True, (9, 10, 11)),
        # key before a later entry of the list, (s_k-1, s_k]: that entry and the rest of the list
        # (the list holds consecutive nodes, Chord §5.2)
        (9 * K + 1, True, (10, 11)),
        (10 * K, True, (10, 11)),
        (10 * K + 1, True, (11,)),
        (11 * K, True, (11,)),
        # otherwise: known nodes in (me, key), closest to the key first, at most lookup_fanout
        (11 * K + 1, False, (11, 10)),
        (12 * K, False, (11, 10)),  # the key itself is not "preceding"
        (12 * K + 5, False, (12, 11)),
        (3 * K, False, (0, 12)),  # wraps through 0; finger 63 = node 0
        (7 * K, False, (0, 12)),  # at the predecessor itself: it is not known as a finger
    ],
)
def test_find_successor_is_served_in_the_three_cases(
    node8: ChordMachine, key: int, done: bool, nodes: tuple[int, ...]
) -> None:
    assert serve(node8, key) == FindSuccessorReply(req=77, done=done, nodes=tuple(P(k) for k in nodes))


def test_find_successor_matches_brute_force(node8: ChordMachine, rng: random.Random) -> None:
    pred, _, fingers = ideal(P(ME), ALL)
    me, succs = P(ME), [P(9), P(10), P(11)]
    known = {*fingers, *succs}  # fingers and the successor list
    keys = [rng.getrandbits(64) for _ in range(300)] + [P(k).id + d for k in ALL for d in (-1, 0, 1)]
    for key in keys:
        key &= (1 << 64) - 1
        reply = serve(node8, key)
        if in_open(key, pred.id, me.id) or key == me.id:
            want = FindSuccessorReply(req=77, done=True, nodes=(me, *succs[: R - 1]))
        elif in_open(key, me.id, succs[-1].id) or key == succs[-1].id:
            first = next(i for i, s in enumerate(succs) if distance(me.id, key) <= distance(me.id, s.id))
            want = FindSuccessorReply(req=77, done=True, nodes=tuple(succs[first:]))
        else:
            closest = sorted((p for p in known if in_open(p.id, me.id, key)), key=lambda p: distance(p.id, key))
            want = FindSuccessorReply(req=77, done=False, nodes=tuple(closest[:FANOUT]))
        assert reply == want, hex(key)


@pytest.mark.parametrize("fanout", [1, 4])
def test_find_successor_returns_at_most_lookup_fanout_nodes(fanout: int) -> None:
    m, _, _ = converged(cfg=cfg_with(lookup_fanout=fanout))
    assert serve(m, 3 * K).nodes == (P(0), P(12), P(11), P(10))[:fanout]


def test_find_successor_before_joining_says_nothing() -> None:
    m = ChordMachine(P(8), CFG, random.Random(3))
    m.bootstrap(["n0:7700"], 0.0)
    m.drain_outbox()
    assert serve(m, 3 * K) == FindSuccessorReply(req=77, done=False, nodes=())


# ------------------------------------------------------------------------------------ replies


def start_far_lookup(m: ChordMachine, now: float, key: int = 3 * K + 1) -> tuple[int, str, int]:
    """A user lookup that must leave the node; returns (token, first hop's address, its req)."""
    token = m.lookup(key, now)
    [(dst, msg)] = m.drain_outbox()
    assert isinstance(msg, FindSuccessor) and msg.key == key
    return token, dst, msg.req


def test_reply_from_the_wrong_address_or_for_an_unknown_req_is_ignored() -> None:
    m, _, now = converged()
    token, dst, req = start_far_lookup(m, now)
    assert dst == "n0:7700"  # finger 63 is the closest preceding node of 3.x
    deadline = m.next_deadline()
    answer = FindSuccessorReply(req=req, done=True, nodes=(P(4), P(5)))

    m.receive(P(12), answer, now)  # right req, wrong sender
    m.receive(P(0), FindSuccessorReply(req=req + 1000, done=True, nodes=(P(13),)), now)  # unknown req
    m.receive(P(0), Neighbors(req=req + 1000, predecessor=P(13), successors=(P(13),)), now)
    m.receive(P(0), Pong(seq=req + 1000), now)
    assert drain_events(m) == [] and m.drain_outbox() == []
    assert m.next_deadline() == deadline  # still waiting for node 0

    m.receive(P(0), answer, now + 0.1)
    assert drain_events(m) == [LookupDone(token, 3 * K + 1, P(4), hops=1, elapsed=pytest.approx(0.1))]
    m.receive(P(0), answer, now + 0.2)  # a duplicate of a reply already used
    assert drain_events(m) == [] and m.drain_outbox() == []


def test_late_reply_after_the_timeout_is_ignored() -> None:
    m, oracle, now = converged()
    oracle.gone.add("n0:7700")
    token, _, req = start_far_lookup(m, now)
    m.handle_timer(now + CFG.rpc_timeout)
    oracle.answer(now + CFG.rpc_timeout)  # the next candidate answers
    [done] = [e for e in drain_events(m) if isinstance(e, LookupDone)]
    assert done.node == P(4)
    m.receive(P(0), FindSuccessorReply(req=req, done=True, nodes=(P(13),)), now + 1.5)
    assert drain_events(m) == [] and m.drain_outbox() == []


def test_reply_of_the_wrong_kind_is_dropped_not_raised() -> None:
    """A peer that answers a FindSuccessor with a Pong (or a Neighbors) carrying the same req is the peer's
    fault (RemoteProtocolError territory, STYLE.md Example 3): the machine drops it and goes on, as if it had
    never arrived. (Until d776bf6 ``on_reply`` asserted the type, so an AssertionError escaped.)"""
    m, _, now = converged()
    token, dst, req = start_far_lookup(m, now)
    m.receive(BY_ADDRESS[dst], Pong(seq=req), now)
    m.receive(BY_ADDRESS[dst], Neighbors(req=req, predecessor=None, successors=()), now)
    assert m.drain_outbox() == [] and drain_events(m) == []
    # the request is still pending: the real answer completes the lookup
    m.receive(BY_ADDRESS[dst], FindSuccessorReply(req=req, done=True, nodes=(P(4), P(5))), now + 0.1)
    assert drain_events(m) == [LookupDone(token, 3 * K + 1, P(4), hops=1, elapsed=pytest.approx(0.1))]


# ------------------------------------------------------------------------------------ failures


def test_successor_timeout_reports_the_peer_and_removes_it_everywhere() -> None:
    m, oracle, now = converged()
    oracle.gone.add("n9:7700")
    crash_at = now
    log: list[tuple[float, object]] = []
    events, sent = step(oracle, now + CFG.stabilize_interval + CFG.rpc_timeout, log)
    assert [e for e in events if isinstance(e, PeerUnresponsive)] == [PeerUnresponsive(P(9))]
    assert SuccessorChanged(P(10)) in events
    assert P(9) not in m.successors and P(9) not in m.fingers and m.successor == P(10)
    # the first unanswered request to node 9 (stabilize's, or a finger lookup's) is the detection ...
    to9 = [t for t, o in log if isinstance(o, tuple) and o[0] == "n9:7700"]
    [detected_at] = [t for t, o in log if o == PeerUnresponsive(P(9))]
    assert detected_at == pytest.approx(to9[0] + CFG.rpc_timeout)
    # ... and stabilize moves on to node 10 no later than its own request to node 9 times out
    [asked_9] = [t for t, o in log if isinstance(o, tuple) and o[0] == "n9:7700" and isinstance(o[1], GetNeighbors)]
    asked_10 = [t for t, o in log if isinstance(o, tuple) and o[0] == "n10:7700" and isinstance(o[1], GetNeighbors)]
    assert asked_10 and asked_10[0] <= asked_9 + CFG.rpc_timeout
    # and then the node settles on the ideal state of the ring without node 9
    t = crash_at
    while not oracle.converged():  # the truth: the ring without node 9, which is gone
        t += 0.5
        assert t < crash_at + 30, oracle.problems()
        step(oracle, t)


def test_predecessor_ping_timeout_clears_the_predecessor() -> None:
    m, oracle, now = converged()
    oracle.gone.add("n7:7700")
    oracle.notify_back = False  # node 6 has not stabilized yet: the test plays its Notify below
    events, sent = step(oracle, now + CFG.check_predecessor_interval + CFG.rpc_timeout)
    assert [dst for dst, _ in only(sent, Ping)] == ["n7:7700"]
    assert PeerUnresponsive(P(7)) in events and PredecessorChanged(None) in events
    assert m.predecessor is None
    # node 6 notifies next (the oracle's stand-in for its stabilize): it becomes the predecessor
    m.receive(P(6), Notify(), now + 2.5)
    assert m.predecessor == P(6)


def test_unreachable_fails_pending_requests_at_once() -> None:
    m, _, now = converged()
    token, dst, req = start_far_lookup(m, now)
    m.unreachable("n13:7700", now)  # nothing pending there: nothing happens
    assert m.drain_outbox() == [] and drain_events(m) == []

    m.unreachable(dst, now + 0.01)  # long before the rpc_timeout
    assert drain_events(m) == [PeerUnresponsive(P(0))]
    assert P(0) not in m.fingers
    [(dst2, msg)] = m.drain_outbox()
    assert dst2 == "n12:7700" and msg == FindSuccessor(req=msg.req, key=3 * K + 1)  # the next candidate
    # node 0's request is over (its timeout never reports it again); node 12's falls due one rpc_timeout
    # after it was sent, and the lookup moves on to the candidate after it
    m.handle_timer(now + 0.01 + CFG.rpc_timeout)
    assert [e for e in drain_events(m) if isinstance(e, PeerUnresponsive)] == [PeerUnresponsive(P(12))]
    asked = [d for d, q in m.drain_outbox() if isinstance(q, FindSuccessor) and q.key == 3 * K + 1]
    assert asked == ["n11:7700"]


# ------------------------------------------------------------------------------------ notify / hints


def test_notify_from_a_closer_node_replaces_the_predecessor_and_hints_the_old_one() -> None:
    m, _, now = converged([k for k in ALL if k != 7])
    assert m.predecessor == P(6)
    m.receive(P(7), Notify(), now)
    assert m.predecessor == P(7)
    assert drain_events(m) == [PredecessorChanged(P(7))]
    assert m.drain_outbox() == [("n6:7700", SuccessorHint(candidate=P(7)))]


def test_notify_from_a_node_that_skips_our_predecessor_hints_it() -> None:
    m, _, now = converged()
    m.receive(P(5), Notify(), now)  # 5 thinks it precedes 8, but 7 is closer
    assert m.predecessor == P(7)
    assert drain_events(m) == []
    assert m.drain_outbox() == [("n5:7700", SuccessorHint(candidate=P(7)))]


def test_notify_from_the_current_predecessor_changes_nothing() -> None:
    m, _, now = converged()
    m.receive(P(7), Notify(), now)
    assert m.predecessor == P(7) and drain_events(m) == [] and m.drain_outbox() == []


def test_notify_without_a_predecessor_adopts_the_notifier_without_hints() -> None:
    m, oracle, now = converged()
    oracle.gone.add("n7:7700")
    oracle.notify_back = False  # node 6 has not stabilized yet: node 3's Notify below comes first
    step(oracle, now + CFG.check_predecessor_interval + CFG.rpc_timeout)
    assert m.predecessor is None
    m.receive(P(3), Notify(), now + 3)  # any node will do while we have none
    assert m.predecessor == P(3)
    assert drain_events(m) == [PredecessorChanged(P(3))] and m.drain_outbox() == []


def test_notify_to_a_lone_node_makes_the_notifier_predecessor_and_successor() -> None:
    m = ChordMachine(P(8), CFG, random.Random(4))
    m.bootstrap([], 0.0)
    drain_events(m)
    m.receive(P(3), Notify(), 0.1)
    assert (m.predecessor, m.successors) == (P(3), [P(3)])
    assert drain_events(m) == [PredecessorChanged(P(3)), SuccessorChanged(P(3))]


def test_notify_before_joining_is_ignored() -> None:
    m = ChordMachine(P(8), CFG, random.Random(5))
    m.bootstrap(["n0:7700"], 0.0)
    m.drain_outbox()
    m.receive(P(7), Notify(), 0.1)
    assert m.predecessor is None and drain_events(m) == [] and m.drain_outbox() == []


def test_successor_hint_inside_my_arc_is_adopted_and_checked_at_once() -> None:
    m, oracle, now = converged([k for k in ALL if k != 9])
    assert m.successor == P(10)
    m.receive(P(3), SuccessorHint(candidate=P(9)), now)
    assert m.successors[:2] == [P(9), P(10)]
    assert drain_events(m) == [SuccessorChanged(P(9))]
    assert m.next_deadline() == now  # verify the candidate straight away
    m.handle_timer(now)
    assert only(m.drain_outbox(), GetNeighbors)[0][0] == "n9:7700"


@pytest.mark.parametrize("cand", [11, 10, 8, 7, 0], ids=lambda k: f"node{k}")
def test_successor_hint_outside_my_arc_is_ignored(cand: int) -> None:
    m, _, now = converged([k for k in ALL if k != 9])
    before, deadline = list(m.successors), m.next_deadline()
    m.receive(P(3), SuccessorHint(candidate=P(cand)), now)
    assert m.successors == before and drain_events(m) == [] and m.drain_outbox() == []
    assert m.next_deadline() == deadline  # no extra stabilize either


# ------------------------------------------------------------------------------------ graceful leave


def test_leaving_successor_hands_over_its_successor_list() -> None:
    m, _, now = converged()
    m.receive(P(9), Leaving(predecessor=P(8), successors=(P(10), P(11), P(12))), now)
    assert m.successors == [P(10), P(11), P(12)]
    assert drain_events(m) == [SuccessorChanged(P(10))]
    assert P(9) not in m.fingers and m.fingers[0] == P(10)
    assert m.predecessor == P(7)


def test_leaving_predecessor_hands_over_its_predecessor() -> None:
    m, _, now = converged()
    m.receive(P(7), Leaving(predecessor=P(6), successors=(P(8), P(9), P(10))), now)
    assert m.predecessor == P(6)
    assert drain_events(m) == [PredecessorChanged(P(6))]
    assert m.successors == [P(9), P(10), P(11)]


def test_leave_tells_both_neighbours_and_goes_quiet() -> None:
    m, _, now = converged()
    token, _, _ = start_far_lookup(m, now)  # in flight when we leave
    m.leave(now + 0.1)
    bye = Leaving(predecessor=P(7), successors=(P(9), P(10), P(11)))
    assert sorted(m.drain_outbox()) == [("n7:7700", bye), ("n9:7700", bye)]
    assert drain_events(m) == [LookupDone(token, 3 * K + 1, None, hops=0, elapsed=pytest.approx(0.1)), Left()]
    assert m.next_deadline() is None
    m.receive(P(3), FindSuccessor(req=1, key=3 * K), now + 0.2)  # gone: answers nothing
    m.leave(now + 0.3)  # a second leave is a no-op
    assert m.drain_outbox() == [] and drain_events(m) == []


def test_leave_of_a_two_node_ring_sends_one_message() -> None:
    m, _, now = converged([3, 8])
    assert m.predecessor == m.successor == P(3)
    m.leave(now)
    assert m.drain_outbox() == [("n3:7700", Leaving(predecessor=P(3), successors=(P(3),)))]
    # and the survivor, receiving it, is alone again
    other, _, t = converged([3, 8], me=3)
    other.receive(P(8), Leaving(predecessor=P(3), successors=(P(3),)), t)
    assert other.successors == [] and other.predecessor is None and other.successor == P(3)


# ------------------------------------------------------------------------------------ timers


def test_next_deadline_before_bootstrap_is_none() -> None:
    assert ChordMachine(P(8), CFG, random.Random(6)).next_deadline() is None


@pytest.mark.parametrize("pending_first", [True, False])
def test_next_deadline_is_the_earliest_of_timers_and_pending_requests(pending_first: bool) -> None:
    cfg = cfg_with(stabilize_interval=5.0, fix_fingers_interval=5.0, check_predecessor_interval=5.0, rpc_timeout=0.4)
    m, oracle, now = converged(cfg=cfg)
    timers_at = m.next_deadline()  # nothing pending now: this is the earliest periodic timer
    assert timers_at is not None and timers_at > now
    # ask a question 0.6 s before the timer (the answer is due 0.2 s before it) or 0.2 s before it,
    # then another one a little later
    t = timers_at - (0.6 if pending_first else 0.2)
    assert t >= now
    start_far_lookup(m, t)
    start_far_lookup(m, t + 0.05, key=5 * K)
    assert m.next_deadline() == pytest.approx(min(timers_at, t + cfg.rpc_timeout))
    assert (m.next_deadline() < timers_at) is pending_first
    # nothing happens before the deadline; at it, the due thing happens
    at = m.next_deadline()
    m.handle_timer(at - 1e-6)
    assert m.drain_outbox() == [] and drain_events(m) == []
    m.handle_timer(at)
    out, events = m.drain_outbox(), drain_events(m)
    if pending_first:
        # the first lookup's question to node 0 timed out: node 0 is reported and the next candidate asked;
        # no periodic timer was due
        assert events == [PeerUnresponsive(P(0))]
        assert out == [("n12:7700", FindSuccessor(req=out[0][1].req, key=3 * K + 1))]
    else:
        # a periodic timer: stabilize asks the successor, check_predecessor pings the predecessor, or
        # fix_fingers looks up a finger start me + 2^i; nothing timed out
        assert events == [] and out

        def periodic(dst: str, msg: Message) -> bool:
            if isinstance(msg, FindSuccessor):
                d = distance(P(ME).id, msg.key)
                return d & (d - 1) == 0
            return (dst, type(msg)) in {("n9:7700", GetNeighbors), ("n7:7700", Ping)}

        assert all(periodic(dst, msg) for dst, msg in out), out
        # the lookups are still pending: the first one's question falls due next, and is reported then
        m.handle_timer(t + cfg.rpc_timeout)
        assert PeerUnresponsive(P(0)) in drain_events(m)


# ------------------------------------------------------------------------------------ iterative lookups


def test_lookup_skips_a_dead_hop_and_counts_hops() -> None:
    m, oracle, now = converged()
    key = 3 * K + 1
    oracle.gone.add("n0:7700")
    oracle.hold = lambda dst, msg: isinstance(msg, FindSuccessor) and msg.key == key  # this test answers
    token = m.lookup(key, now)
    oracle.answer(now)
    assert [dst for _, dst, _ in oracle.held] == ["n0:7700"]  # the closest preceding node: finger 63

    t1 = now + CFG.rpc_timeout
    events, _ = step(oracle, t1)  # node 0 never answers
    assert events.count(PeerUnresponsive(P(0))) == 1
    assert [dst for _, dst, _ in oracle.held[1:]] == ["n12:7700"]  # the second-best candidate
    m.receive(P(12), FindSuccessorReply(req=oracle.held[-1][2].req, done=False, nodes=(P(3), P(2))), t1 + 0.01)
    oracle.answer(t1 + 0.01)
    assert [dst for _, dst, _ in oracle.held[2:]] == ["n3:7700"]  # the responder's best node goes first
    m.receive(P(3), FindSuccessorReply(req=oracle.held[-1][2].req, done=True, nodes=(P(4), P(5), P(6))), t1 + 0.02)
    assert [e for e in drain_events(m) if isinstance(e, LookupDone)] == [
        LookupDone(token, key, P(4), hops=2, elapsed=pytest.approx(1.02))
    ]
    assert m.counters["lookups_ok"] == 1 and m.counters["rpc_timeouts"] >= 1


def test_lookup_answered_locally_takes_no_hops() -> None:
    m, _, now = converged()
    for key, node in [(8 * K + 5, P(9)), (8 * K, P(8)), (7 * K + 1, P(8))]:
        token = m.lookup(key, now)
        assert drain_events(m) == [LookupDone(token, key, node, hops=0, elapsed=0.0)]
    assert m.drain_outbox() == []


def test_lookup_fails_after_max_lookup_hops() -> None:
    cfg = cfg_with(max_lookup_hops=3)
    m, _, now = converged(cfg=cfg)
    token, dst, req = start_far_lookup(m, now, key=7 * K)
    # every hop points at a node closer to the key that nobody has tried yet, never finishing
    closer = iter([P(1), P(2), P(3), P(4)])
    for hop in range(3):
        m.receive(BY_ADDRESS[dst], FindSuccessorReply(req=req, done=False, nodes=(next(closer),)), now + hop)
        out = m.drain_outbox()
        if hop < 2:
            [(dst, msg)] = out
            req = msg.req
    assert out == []  # no fourth question
    assert drain_events(m) == [LookupDone(token, 7 * K, None, hops=3, elapsed=pytest.approx(2.0))]
    assert m.counters["lookups_failed"] == 1


def test_lookup_with_every_other_node_dead_never_names_a_dead_node() -> None:
    m, oracle, now = converged()
    oracle.gone |= set(BY_ADDRESS) - {"n8:7700"}
    token = m.lookup(3 * K + 1, now)
    events, _ = step(oracle, now + 30 * CFG.rpc_timeout)
    [done] = [e for e in events if isinstance(e, LookupDone)]
    # it fails, or (once it has given up on everyone else) answers itself: right for a ring of one
    assert done.token == token and done.node in (None, P(8)) and done.hops == 0


def test_a_silent_hop_is_asked_once_more_but_not_twice() -> None:
    """One lost message must not exclude the node a lookup needs; a second silence does."""
    m, oracle, now = converged()
    key = 3 * K + 1
    oracle.hold = lambda dst, msg: isinstance(msg, FindSuccessor) and msg.key == key  # never answered here
    m.lookup(key, now)
    oracle.answer(now)
    t = now
    for _ in range(2):  # node 0, then node 12, time out
        t += CFG.rpc_timeout
        step(oracle, t)
    assert [dst for _, dst, _ in oracle.held] == ["n0:7700", "n12:7700", "n11:7700"]
    # node 11 answers and suggests node 0 again: it was silent once, so it is asked again
    m.receive(P(11), FindSuccessorReply(req=oracle.held[-1][2].req, done=False, nodes=(P(0),)), t)
    oracle.answer(t)
    assert oracle.held[-1][1] == "n0:7700"
    t += CFG.rpc_timeout
    step(oracle, t)  # silent again
    _, asked, question = oracle.held[-1]
    assert asked != "n0:7700"
    m.receive(BY_ADDRESS[asked], FindSuccessorReply(req=question.req, done=False, nodes=(P(0),)), t)
    oracle.answer(t)
    assert oracle.held[-1][1] != "n0:7700"  # not a third time


def test_stale_notify_from_a_node_that_left_does_not_undo_its_handover() -> None:
    """A Notify the predecessor sent just before leaving can arrive after its Leaving (the simulator's
    links reorder; TCP can too when a connection is re-dialled). The handover must stand.

    Found by tests/sim/test_ring_sim.py (graceful leave, seed 2; fixed in d776bf6): node 8 took the
    stale Notify, made the departed node its predecessor again and hinted it to node 6, which
    re-adopted it as successor; the ring then waited ~2 s for a timeout instead of one latency."""
    m, _, now = converged()
    m.receive(P(7), Leaving(predecessor=P(6), successors=(P(8), P(9), P(10))), now)
    assert m.predecessor == P(6)
    m.drain_outbox()
    m.receive(P(7), Notify(), now + 0.01)  # sent before the Leaving, delivered after it
    assert m.predecessor == P(6)
    assert ("n6:7700", SuccessorHint(candidate=P(7))) not in m.drain_outbox()
