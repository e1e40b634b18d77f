"""The failure detector driven by hand on a virtual clock (core/failure.py through core/node.py): no simulator.

One real ``NodeCore`` (node 8) sits in a ring of 16 evenly spaced ids, ``k << 60``. The other 15 are an
``IdealRing`` (tests/helpers/ideal_ring.py) that answers at once (zero latency) from the ideal ring:
lookups, GetNeighbors, Ping (with the incarnation the test sets), ProbeRequest (alive unless the target
is silent) and FailureNotice (a NoticeAck). A *silent* node answers nothing but is still named by the
others (hearsay lags behind a crash); a *gone* node is also left out of their answers. The test reads
what the core sends, its events, its public counters and routing state (``ChordMachine.holds`` and
``routing_state``), and nothing private. Expected values are written out by hand or come from
``holder_intervals`` / ``ideal_routing``, never from the detector itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from helpers.ideal_ring import BY_ADDRESS, ME, IdealRing, K, P, changed

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.failure import PeerDied, PeerPurged, Refuted, holder_intervals
from mlfabric.core.node import NodeCore
from mlfabric.wire.messages import (
    NOTICE_BACKWARD,
    NOTICE_DIRECT,
    NOTICE_INTERVAL,
    Alive,
    BackpointerCopy,
    FailureNotice,
    GetNeighbors,
    Leaving,
    Message,
    NoticeAck,
    Peer,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResult,
    Register,
)

R = 3
OVERLAY = OverlayConfig(successors=R, lookup_fanout=2)
FAIL = FailureConfig(
    near_interval=1.0,
    probe_timeout=0.5,
    suspicion_timeout=1.0,
    notice_timeout=0.2,
    far_interval=30.0,
    indirect_checks=3,
    stall_threshold=2.0,
    refresh_interval=10.0,
    dead_ttl=60.0,
)


def fail_with(**changes: object) -> FailureConfig:
    return changed(FAIL, **changes)


# node 8's ideal routing entries: predecessor 7, successors 9 10 11, fingers 9 (0..60) 10 12 0
ENTRIES = {P(k) for k in (7, 9, 10, 11, 12, 0)}
# holder_intervals(9K, 8K) by hand: g = 2^60, so spans 0..61 merge into [1, 3K - 1] back from 9K (nodes 7
# and 8 hold 9 as fingers 61 and 0..60), and spans 62 and 63 stay apart (node 5: 5K + 4K, node 1: 1K + 8K)
INTERVALS_OF_9 = {(6 * K + 1, 9 * K - 1), (4 * K + 1, 5 * K), (1, K)}


def converged(failure: FailureConfig = FAIL, seed: str = "test_failure_detector") -> IdealRing[NodeCore]:
    """Node 8 joined through the protocol and holding its ideal routing state (and pred_pred = 6)."""
    core = NodeCore(P(ME), OVERLAY, random.Random(seed), failure=failure)
    ring = IdealRing(core, BY_ADDRESS.values(), R)
    ring.join(P(0).address)
    c = core.chord
    assert (c.predecessor, c.pred_pred, c.successors) == (P(7), P(6), [P(9), P(10), P(11)])
    assert not ring.events_of(PeerDied) and core.detector.counters["suspicions"] == 0
    return ring


def ping_to(k: int) -> Callable[[str, Message], bool]:
    return lambda dst, msg: dst == P(k).address and isinstance(msg, Ping)


def notice(dead: Peer, inc: int = 0, mode: int = NOTICE_DIRECT, seq: int = 0, detector: Peer | None = None,
           replacement: Peer | None = None, predecessor: Peer | None = None, back: int = 0,
           start: int = 0, end: int = 0) -> FailureNotice:
    return FailureNotice(dead=dead, incarnation=inc, detector=detector or P(3), mode=mode, start=start, end=end,
                         back=back, replacement=replacement, seq=seq, predecessor=predecessor)


def kill_9(ring: IdealRing[NodeCore], limit: float = 30.0) -> tuple[float, PeerDied]:
    """Node 9 (our successor) goes silent; run until node 8 declares it dead."""
    ring.silent.add(P(9).address)
    t, ev = ring.run_until_event(PeerDied, ring.now + limit)
    assert isinstance(ev, PeerDied)
    return t, ev


# ------------------------------------------------------------------------------------ probing


def test_harness_converges_and_a_quiet_ring_raises_no_suspicion() -> None:
    ring = converged()
    assert set(ring.machine.chord.routing_state()) == ENTRIES
    t0 = ring.now
    ring.run(t0 + 20)
    counters = ring.machine.detector.counters
    assert counters["probes_sent"] > 0
    assert counters["acks_received"] == counters["probes_sent"]  # zero latency: every probe answered
    assert counters["suspicions"] == counters["deaths_declared"] == 0
    assert not ring.sent_between(t0, ring.now, ProbeRequest)
    assert not ring.sent_between(t0, ring.now, FailureNotice)


def test_stateless_probes_the_successor_each_near_interval_and_far_entries_in_turn() -> None:
    ring = converged()
    t0 = ring.now
    ring.run(t0 + 60)
    pings: dict[str, int] = {}
    for dst, _ in ring.sent_between(t0, ring.now, Ping):
        pings[dst] = pings.get(dst, 0) + 1
    assert abs(pings.pop(P(9).address) - 60 / FAIL.near_interval) <= 1  # near_successors = 1
    # the other entries share far_interval in turn: each about 60 / far_interval = 2 times
    assert set(pings) == {p.address for p in ENTRIES - {P(9)}}
    assert all(1 <= n <= 3 for n in pings.values()), pings


def test_pong_from_the_probed_node_clears_the_check() -> None:
    ring = converged()
    ring.hold = ping_to(9)
    t, _, ping = ring.run_until_sent(ping_to(9), ring.now + 5)
    assert isinstance(ping, Ping)
    ring.run(t + 0.1)
    acks = ring.machine.detector.counters["acks_received"]
    ring.deliver(P(9), Pong(seq=ping.seq, incarnation=0))
    assert ring.machine.detector.counters["acks_received"] == acks + 1
    ring.run(t + FAIL.probe_timeout + 0.01)  # past the probe's deadline, before the next near probe's
    assert ring.machine.detector.counters["suspicions"] == 0
    assert not ring.sent_between(t, ring.now, ProbeRequest)


def test_pong_with_our_seq_from_another_node_neither_clears_nor_spoils_the_check() -> None:
    """A Pong from the wrong address is dropped (h11's remote-error rule); the right one still counts."""
    ring = converged(fail_with(indirect_checks=0))  # no helpers: a spoiled check would kill node 9
    ring.hold = ping_to(9)
    t, _, ping = ring.run_until_sent(ping_to(9), ring.now + 5)
    assert isinstance(ping, Ping)
    ring.run(t + 0.1)
    ring.deliver(P(3), Pong(seq=ping.seq, incarnation=0))
    ring.run(t + 0.2)
    ring.deliver(P(9), Pong(seq=ping.seq, incarnation=0))
    ring.run(t + FAIL.probe_timeout + 0.01)
    assert not ring.events_of(PeerDied), f"node 9 answered its probe at t={t + 0.2:.3f} and was declared dead"
    assert ring.machine.detector.counters["suspicions"] == 0


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_probe_timeout_asks_indirect_checks_helpers_and_probes_again_directly(helpers: int) -> None:
    ring = converged(fail_with(indirect_checks=helpers))
    ring.silent.add(P(9).address)
    t, _, ping = ring.run_until_sent(ping_to(9), ring.now + 5)
    assert isinstance(ping, Ping)
    ring.run(t + FAIL.probe_timeout)
    at_timeout = ring.sent_between(t + FAIL.probe_timeout, t + FAIL.probe_timeout)
    asks = [(d, m) for d, m in at_timeout if isinstance(m, ProbeRequest)]
    assert all(m == ProbeRequest(req=ping.seq, target=P(9)) for _, m in asks)
    asked = [d for d, _ in asks]
    assert len(asked) == len(set(asked)) == helpers
    assert set(asked) <= {p.address for p in ENTRIES - {P(9)}}
    reprobes = [m for d, m in at_timeout if d == P(9).address and isinstance(m, Ping)]
    assert reprobes == ([Ping(seq=ping.seq, incarnation=0)] if helpers else [])
    assert ring.machine.detector.counters["suspicions"] == 1
    # declared when the suspicion runs out (at once when there is nobody to ask)
    died_at, ev = ring.run_until_event(PeerDied, t + 10)
    assert ev == PeerDied(P(9), 0, P(8), True)
    assert died_at == pytest.approx(t + FAIL.probe_timeout + (FAIL.suspicion_timeout if helpers else 0))


def test_routine_probes_in_flight_do_not_leave_a_suspect_without_helpers() -> None:
    """A suspect is declared only after indirect checks, even when its probe times out just after a
    near tick, while every other entry has a routine probe in flight (stabilize probes all of them at
    once). Found by ``run_failure(200, 6, 10, "stabilize", window=15, loss=0.01)``: one lost Ping made
    a false positive, declared with no ProbeRequest and no second direct probe."""
    ring = converged(fail_with(scheme="stabilize"))
    t0, _, _ = ring.run_until_sent(ping_to(10), ring.now + 5)  # a near tick: every entry probed and answered
    # half a near interval later a lookup times out on node 9 and the detector checks it; the Ping is lost
    ring.hold = ping_to(9)
    ring.run(t0 + FAIL.near_interval / 2 + 0.001)
    ring.machine.detector.suspect(P(9), ring.now)
    ring.flush()
    assert [m for d, m in ring.sent_between(ring.now, ring.now, Ping) if d == P(9).address]
    # the next near tick probes every other entry; their Pongs are a round trip (20 ms) away
    ring.hold = lambda dst, msg: isinstance(msg, Ping)
    ring.run(t0 + FAIL.near_interval + 0.001)  # node 9's probe times out meanwhile
    in_flight = [(d, m) for _, d, m in ring.held if isinstance(m, Ping) and d != P(9).address]
    assert {d for d, _ in in_flight} == {p.address for p in ENTRIES - {P(9)}}
    asks = ring.sent_between(t0 + FAIL.near_interval, ring.now, ProbeRequest)
    assert not ring.events_of(PeerDied), f"node 9 declared after one lost Ping, helpers asked: {asks}"
    # node 9 keeps answering everything but Pings here, so the check ends either through helpers or
    # because 9 spoke to us directly while it ran (which also proves it alive)
    assert asks or ring.machine.detector.counters["suspicions"] == 0


def test_probe_result_alive_from_a_helper_clears_the_suspicion() -> None:
    ring = converged()
    ring.silent.add(P(9).address)
    t, _, ping = ring.run_until_sent(ping_to(9), ring.now + 5)
    assert isinstance(ping, Ping)
    ring.run(t + FAIL.probe_timeout + 0.1)
    acks = ring.machine.detector.counters["acks_received"]
    # a "dead" result and a result for another request change nothing
    ring.deliver(P(10), ProbeResult(req=ping.seq, target=P(9), alive=False))
    ring.deliver(P(10), ProbeResult(req=ping.seq + 1000, target=P(9), alive=True))
    assert ring.machine.detector.counters["acks_received"] == acks
    ring.deliver(P(10), ProbeResult(req=ping.seq, target=P(9), alive=True, incarnation=0))
    assert ring.machine.detector.counters["acks_received"] == acks + 1
    deadline = t + FAIL.probe_timeout + FAIL.suspicion_timeout
    ring.run(deadline + 0.01)
    assert not ring.events_of(PeerDied), "node 9 was declared dead although a helper reached it"
    # node 9 stays silent: a later probe round does declare it
    died_at, ev = ring.run_until_event(PeerDied, ring.now + 10)
    assert ev == PeerDied(P(9), 0, P(8), True) and died_at > deadline


def test_helping_a_prober_reports_whether_the_target_answered() -> None:
    ring = converged()
    # the target answers: alive, with its incarnation, at once
    ring.incarnation[P(12).address] = 4
    ring.deliver(P(3), ProbeRequest(req=41, target=P(12)))
    assert (P(3).address, ProbeResult(req=41, target=P(12), alive=True, incarnation=4)) in \
        ring.sent_between(ring.now, ring.now)
    # asked about ourselves: alive at our incarnation
    ring.deliver(P(3), ProbeRequest(req=42, target=P(8)))
    assert ring.sent_between(ring.now, ring.now)[-1] == (P(3).address, ProbeResult(req=42, target=P(8), alive=True))
    # the target is silent: "not reached" once 0.8 * suspicion_timeout has passed, before the asker gives up
    ring.silent.add(P(12).address)
    t = ring.now
    ring.deliver(P(3), ProbeRequest(req=43, target=P(12)))
    ring.run(t + 0.8 * FAIL.suspicion_timeout)
    results = [(d, m) for d, m in ring.sent_between(t, ring.now, ProbeResult) if m.req == 43]
    assert results == [(P(3).address, ProbeResult(req=43, target=P(12), alive=False))]


# ------------------------------------------------------------------------------------ declaring and notices


def test_death_is_reported_removed_from_routing_and_propagated_statelessly() -> None:
    ring = converged()
    ring.hold = lambda dst, msg: isinstance(msg, FailureNotice)  # nobody acks yet
    died_at, ev = kill_9(ring)
    assert ev == PeerDied(P(9), 0, P(8), True)  # pred(9) = 8, known exactly from our successor list
    c = ring.machine.chord
    assert not ring.machine.chord.holds(P(9).id) and ring.machine.detector.is_dead(P(9).id)
    assert c.successors[0] == P(10)
    assert all(f == P(10) for f in c.fingers[:62])  # the fingers that pointed at 9 point at succ(9)
    notices = ring.sent_between(died_at, died_at, FailureNotice)
    by_mode: dict[int, list[tuple[str, FailureNotice]]] = {}
    for d, m in notices:
        assert isinstance(m, FailureNotice)
        assert (m.dead, m.incarnation, m.detector, m.replacement, m.predecessor) == (P(9), 0, P(8), P(10), P(8))
        assert d not in (P(9).address, P(8).address)
        by_mode.setdefault(m.mode, []).append((d, m))
    # DIRECT to succ(9), whose predecessor pointer holds 9
    assert [d for d, _ in by_mode[NOTICE_DIRECT]] == [P(10).address]
    # BACKWARD to 9's other r - 1 predecessors (8 is the first): 7 now, 6 after it (back = r - 2 left)
    [(d, back)] = by_mode[NOTICE_BACKWARD]
    assert d == P(7).address and back.back == R - 2
    # one INTERVAL notice per estimated finger-holder interval
    got = {(m.start, m.end) for _, m in by_mode[NOTICE_INTERVAL]}
    assert got == INTERVALS_OF_9 == set(holder_intervals(P(9).id, P(8).id))
    assert len(by_mode[NOTICE_INTERVAL]) == len(INTERVALS_OF_9)
    # each one awaits its hop's NoticeAck under its own sequence number
    seqs = [m.seq for _, m in notices]
    assert all(seqs) and len(set(seqs)) == len(seqs)


def test_acked_notices_are_not_sent_again() -> None:
    ring = converged()
    died_at, _ = kill_9(ring)
    first = ring.sent_between(died_at, died_at, FailureNotice)
    assert len(first) == 2 + len(INTERVALS_OF_9)
    ring.run(died_at + 5 * FAIL.notice_timeout)
    assert ring.sent_between(died_at + 1e-9, ring.now, FailureNotice) == []


@pytest.mark.parametrize(
    ("hop", "mode", "fallback"),
    [
        (7, NOTICE_BACKWARD, {P(6).address}),  # pred(8) silent: pred(pred(8)), learnt from 7's Notify
        (0, NOTICE_INTERVAL, None),  # the first hop towards an interval: the next closest preceding entry
    ],
)
def test_unacked_notice_goes_to_another_hop_and_the_silent_hop_is_probed(
    hop: int, mode: int, fallback: set[str] | None
) -> None:
    ring = converged()
    dst = P(hop).address
    ring.hold = lambda d, msg: d == dst and isinstance(msg, FailureNotice)
    died_at, _ = kill_9(ring)
    stuck = [m for d, m in ring.sent_between(died_at, died_at, FailureNotice) if d == dst]
    assert stuck and all(isinstance(m, FailureNotice) and m.mode == mode for m in stuck)
    # an ack from the wrong address does not count
    for m in stuck:
        ring.deliver(P(3), NoticeAck(seq=m.seq))
    ring.run(died_at + FAIL.notice_timeout)
    later = [(d, m) for d, m in ring.sent_between(died_at + 1e-9, ring.now, FailureNotice)]
    assert len(later) == len(stuck), later
    for (d, m), old in zip(sorted(later, key=lambda x: x[1].start), sorted(stuck, key=lambda m: m.start),
                           strict=True):
        assert isinstance(m, FailureNotice) and isinstance(old, FailureNotice)
        assert (m.dead, m.mode, m.start, m.end) == (old.dead, old.mode, old.start, old.end)
        assert m.seq != old.seq and m.seq
        assert d not in (dst, P(9).address, P(8).address)
        assert d in {p.address for p in ring.machine.chord.routing_state()} | {P(6).address}
        if fallback is not None:
            assert d in fallback
    # the hop that stayed silent is checked
    assert (dst, Ping) in {(d, type(m)) for d, m in ring.sent_between(died_at + 1e-9, ring.now)}


def test_duplicate_notice_is_acked_but_dropped() -> None:
    ring = converged()
    dead = notice(P(12), mode=NOTICE_DIRECT, replacement=P(13), seq=17, detector=P(11))
    ring.deliver(P(2), dead)
    assert ring.sent_between(ring.now, ring.now, NoticeAck) == [(P(2).address, NoticeAck(seq=17))]
    assert [e for _, e in ring.events_of(PeerPurged)] == [PeerPurged(P(12))]
    assert ring.machine.chord.fingers[62] == P(13)  # finger 62 (8K + 4K) pointed at 12: now at its successor
    counters = dict(ring.machine.detector.counters)
    mark = len(ring.sent)
    ring.deliver(P(4), replace(dead, seq=18))  # the same notice by another path
    assert [(d, m) for _, d, m in ring.sent[mark:]] == [(P(4).address, NoticeAck(seq=18))]
    after = ring.machine.detector.counters
    assert after["notices_duplicate"] == counters["notices_duplicate"] + 1
    assert after["purged_by_notice"] == counters["purged_by_notice"]
    assert len(ring.events_of(PeerPurged)) == 1


def test_notice_about_myself_bumps_my_incarnation_and_sends_alive() -> None:
    ring = converged()
    ring.deliver(P(5), notice(P(8), inc=0, seq=31, detector=P(7)))
    assert ring.machine.detector.incarnation == 1
    assert [e for _, e in ring.events_of(Refuted)] == [Refuted(1)]
    out = ring.sent_between(ring.now, ring.now)
    assert (P(5).address, NoticeAck(seq=31)) in out
    assert {(d, m) for d, m in out if isinstance(m, Alive)} == {(P(5).address, Alive(1)), (P(7).address, Alive(1))}
    assert ring.machine.chord.holds(P(7).id) and not ring.machine.detector.dead_ids()  # nothing else happened
    # my pongs now carry the new incarnation
    ring.deliver(P(4), Ping(seq=99, incarnation=0))
    assert ring.sent_between(ring.now, ring.now)[-1] == (P(4).address, Pong(seq=99, incarnation=1))
    # an older declaration is answered but does not bump again; a newer one does
    ring.deliver(P(5), notice(P(8), inc=0, seq=32, detector=P(7)))
    assert ring.machine.detector.incarnation == 1
    assert (P(5).address, Alive(1)) in ring.sent_between(ring.now, ring.now)
    ring.deliver(P(5), notice(P(8), inc=1, seq=33, detector=P(7)))
    assert ring.machine.detector.incarnation == 2
    assert [e for _, e in ring.events_of(Refuted)] == [Refuted(1), Refuted(2)]


def test_notice_older_than_an_incarnation_seen_in_a_pong_is_ignored() -> None:
    ring = converged()
    ring.incarnation[P(9).address] = 5  # node 9 restarted (or refuted) at incarnation 5
    ring.run_until_sent(ping_to(9), ring.now + 5)  # and answered a probe with it
    ring.deliver(P(3), notice(P(9), inc=4, replacement=P(10), seq=51))
    assert ring.sent_between(ring.now, ring.now, NoticeAck) == [(P(3).address, NoticeAck(seq=51))]
    assert ring.machine.chord.holds(P(9).id) and not ring.machine.detector.is_dead(P(9).id)
    assert not ring.events_of(PeerPurged)
    # a declaration at the incarnation it answered with is current
    ring.deliver(P(3), notice(P(9), inc=5, replacement=P(10), seq=52))
    assert not ring.machine.chord.holds(P(9).id) and ring.machine.detector.is_dead(P(9).id)
    assert [e for _, e in ring.events_of(PeerPurged)] == [PeerPurged(P(9))]


def dead_9_comes_back() -> IdealRing[NodeCore]:
    """Node 9 is declared dead, hearsay keeps naming it for five stabilize rounds, then it comes back and
    pings node 8."""
    ring = converged()
    died_at, _ = kill_9(ring)
    # node 10 still names 9 as its predecessor, and lookups may name it: node 8 must not re-adopt it
    ring.run(died_at + 5 * OVERLAY.stabilize_interval)
    assert not ring.machine.chord.holds(P(9).id), ring.machine.chord.successors
    assert ring.machine.chord.successors == [P(10), P(11), P(12)]
    ring.silent.discard(P(9).address)
    ring.deliver(P(9), Ping(seq=7, incarnation=0))
    return ring


def test_hearsay_does_not_bring_a_dead_node_back_but_direct_contact_does() -> None:
    ring = dead_9_comes_back()
    assert not ring.machine.detector.is_dead(P(9).id)  # the direct message lifted the mark
    # the next stabilize round adopts 9 from node 10's answer and stabilizes with it
    ring.run_until_sent(lambda dst, msg: dst == P(9).address and isinstance(msg, GetNeighbors),
                        ring.now + 2 * OVERLAY.stabilize_interval)
    assert ring.machine.chord.successors[0] == P(9)


def test_a_node_back_from_the_dead_is_not_declared_again_by_an_older_check() -> None:
    ring = dead_9_comes_back()
    back_at = ring.now
    ring.run(back_at + 2 * OVERLAY.stabilize_interval)
    again = [t for t, e in ring.events_of(PeerDied) if t > back_at]
    assert not again, f"node 9 pinged node 8 at t={back_at:.2f} and was declared dead again at {again}"
    assert ring.machine.chord.successors == [P(9), P(10), P(11)]


def test_a_stalled_timer_clears_checks_without_declaring_anyone() -> None:
    ring = converged()
    ring.silent.add(P(9).address)
    t, _, _ = ring.run_until_sent(ping_to(9), ring.now + 5)
    late = t + FAIL.near_interval + FAIL.stall_threshold + 5  # our process slept through every deadline
    ring.now = late
    ring.machine.handle_timer(late)
    ring.flush()
    counters = ring.machine.detector.counters
    assert counters["stalls"] == 1
    assert counters["suspicions"] == counters["deaths_declared"] == 0
    assert not ring.events_of(PeerDied) and ring.machine.chord.holds(P(9).id)
    assert not ring.sent_between(t, late, ProbeRequest)
    # the detector starts over: node 9, still silent, is declared within one fresh round
    died_at, ev = ring.run_until_event(PeerDied, late + 10)
    assert ev == PeerDied(P(9), 0, P(8), True)
    assert died_at <= late + FAIL.near_interval + FAIL.probe_timeout + FAIL.suspicion_timeout


def test_direct_notice_to_the_successor_of_the_dead_adopts_its_predecessor() -> None:
    ring = converged()
    ring.deliver(P(6), notice(P(7), seq=61, detector=P(6), replacement=P(8), predecessor=P(6)))
    assert ring.machine.chord.predecessor == P(6)
    assert [e for _, e in ring.events_of(PeerPurged)] == [PeerPurged(P(7))]
    out = ring.sent_between(ring.now, ring.now)
    assert (P(6).address, NoticeAck(seq=61)) in out
    assert any(d == P(6).address and isinstance(m, Ping) for d, m in out)  # hearsay predecessor: checked at once


# ------------------------------------------------------------------------------------ graceful leave


def test_leaving_successor_is_propagated_like_a_failure_by_its_predecessor() -> None:
    ring = converged()
    ring.gone.add(P(9).address)
    ring.deliver(P(9), Leaving(predecessor=P(8), successors=(P(10), P(11), P(12))))
    counters = ring.machine.detector.counters
    assert counters["departures"] == 1 and counters["deaths_declared"] == 0
    assert not ring.events_of(PeerDied)
    assert ring.machine.detector.is_dead(P(9).id) and not ring.machine.chord.holds(P(9).id)
    assert ring.machine.chord.successors == [P(10), P(11), P(12)]
    notices = [(d, m) for d, m in ring.sent_between(ring.now, ring.now, FailureNotice)]
    modes = sorted((m.mode, d) for d, m in notices if isinstance(m, FailureNotice))
    assert modes[:2] == [(NOTICE_DIRECT, P(10).address), (NOTICE_BACKWARD, P(7).address)]
    assert {(m.start, m.end) for _, m in notices if m.mode == NOTICE_INTERVAL} == INTERVALS_OF_9
    assert len(notices) == 2 + len(INTERVALS_OF_9)


def test_leaving_predecessor_is_marked_but_only_its_own_predecessor_propagates() -> None:
    ring = converged()
    ring.gone.add(P(7).address)
    ring.deliver(P(7), Leaving(predecessor=P(6), successors=(P(8), P(9), P(10))))
    assert ring.machine.detector.counters["departures"] == 1
    assert ring.machine.detector.is_dead(P(7).id)
    assert ring.machine.chord.predecessor == P(6)
    assert not ring.sent_between(ring.now, ring.now, FailureNotice)
    assert (P(6).address, Ping) in {(d, type(m)) for d, m in ring.sent_between(ring.now, ring.now)}


# ------------------------------------------------------------------------------------ stateful and stabilize


def test_stateful_registers_with_every_routing_entry() -> None:
    ring = converged(fail_with(scheme="stateful"))
    ring.run(ring.now + FAIL.near_interval)  # an entry that just appeared is registered at the next near tick
    registered = {d for d, _ in ring.sent_between(0.0, ring.now, Register)}
    assert registered >= {p.address for p in ENTRIES}


def test_stateful_register_creates_a_backpointer_copied_to_both_neighbours() -> None:
    ring = converged(fail_with(scheme="stateful"))
    ring.deliver(P(3), Register())
    t = ring.now
    ring.run(t + FAIL.near_interval)  # the copy goes out at the next near tick
    copies = ring.sent_between(t, ring.now, BackpointerCopy)
    assert sorted(copies) == [(P(7).address, BackpointerCopy(holders=(P(3),))),
                              (P(9).address, BackpointerCopy(holders=(P(3),)))]
    # a refresh of a known backpointer changes nothing: no new copy at the next tick
    ring.deliver(P(3), Register())
    t = ring.now
    ring.run(t + FAIL.near_interval)
    assert not ring.sent_between(t, ring.now, BackpointerCopy)


def test_stateful_death_notifies_the_holders_named_in_the_neighbours_copy() -> None:
    ring = converged(fail_with(scheme="stateful"))
    ring.hold = lambda dst, msg: isinstance(msg, FailureNotice)
    ring.deliver(P(9), BackpointerCopy(holders=(P(1), P(5), P(7), P(8))))
    died_at, ev = kill_9(ring)
    assert ev == PeerDied(P(9), 0, P(8), True)
    notices = ring.sent_between(died_at, died_at, FailureNotice)
    assert sorted(d for d, _ in notices) == sorted(P(k).address for k in (1, 5, 7))  # not to ourselves
    for _, m in notices:
        assert isinstance(m, FailureNotice)
        assert (m.mode, m.dead, m.replacement, m.detector) == (NOTICE_DIRECT, P(9), P(10), P(8))
    seqs = [m.seq for _, m in notices]
    assert all(seqs) and len(set(seqs)) == len(seqs)


def test_stabilize_probes_every_entry_each_near_interval_and_sends_no_notices() -> None:
    ring = converged(fail_with(scheme="stabilize"))
    t0 = ring.now
    ring.run(t0 + 10 * FAIL.near_interval)
    pings: dict[str, int] = {}
    for dst, _ in ring.sent_between(t0, ring.now, Ping):
        pings[dst] = pings.get(dst, 0) + 1
    assert set(pings) == {p.address for p in ENTRIES}
    assert all(abs(n - 10) <= 1 for n in pings.values()), pings
    died_at, ev = kill_9(ring)
    assert ev == PeerDied(P(9), 0, P(8), True) and not ring.machine.chord.holds(P(9).id)
    ring.run(died_at + 5)
    assert not ring.sent_between(0.0, ring.now, FailureNotice)
