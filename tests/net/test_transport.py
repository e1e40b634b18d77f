"""Transport behaviour on real sockets: bounded queues, backpressure, unreachable peers, idle timeout, local delivery."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from mlfabric.config import TransportConfig
from mlfabric.runtime.transport import Transport
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.framing import Framer, frame
from mlfabric.wire.handshake import ListenerHandshake
from mlfabric.wire.messages import FindSuccessorReply, Message, Peer, Ping

pytestmark = pytest.mark.net

Inbox = list[tuple[Peer, Message]]


@pytest.fixture
async def make_transport() -> AsyncIterator[Callable[..., object]]:
    made: list[Transport] = []

    async def make(node_id: int, **cfg: object) -> tuple[Transport, Inbox, list[str]]:
        inbox: Inbox = []
        unreachable: list[str] = []
        t = Transport(TransportConfig(**cfg))
        port = await t.bind("127.0.0.1", 0)
        await t.start(Peer(node_id, f"127.0.0.1:{port}"), lambda src, msg: inbox.append((src, msg)),
                      unreachable.append)
        made.append(t)
        return t, inbox, unreachable

    yield make
    for t in made:
        await t.close()


async def test_messages_flow_both_ways_on_one_connection(make_transport, wait_until) -> None:
    a, a_in, _ = await make_transport(1)
    b, b_in, _ = await make_transport(2)
    for seq in range(100):
        a.send_nowait(b.me.address, Ping(seq=seq))
    await wait_until(lambda: len(b_in) == 100, 5.0)
    assert [m.seq for _, m in b_in] == list(range(100))  # in order
    assert {src for src, _ in b_in} == {a.me}
    b.send_nowait(a.me.address, Ping(seq=1000))  # the reply rides the inbound connection
    await wait_until(lambda: len(a_in) == 1, 5.0)
    assert a_in[0] == (Peer(2, b.me.address), Ping(seq=1000))
    assert a.counters["connections_out"] == 1 and b.counters["connections_out"] == 0
    assert a.counters["frames_out"] == 100 and b.counters["frames_in"] == 100


async def test_message_to_own_address_is_delivered_locally(make_transport, wait_until) -> None:
    a, a_in, _ = await make_transport(1)
    a.send_nowait(a.me.address, Ping(seq=5))
    assert a_in == []  # never re-entrant: delivered on the next loop turn
    await wait_until(lambda: a_in == [(a.me, Ping(seq=5))], 5.0)
    assert a.open_connections == 0


async def test_refused_connection_reports_unreachable_and_reconnects_later(make_transport, wait_until) -> None:
    a, _, unreachable = await make_transport(1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    a.send_nowait(address, Ping(seq=1))
    a.send_nowait(address, Ping(seq=2))
    await wait_until(lambda: unreachable == [address], 5.0)
    assert a.counters["connect_failures"] == 1 and a.counters["dropped_frames"] == 2
    b, b_in, _ = await make_transport(2)  # on demand: the next send dials again
    a.send_nowait(b.me.address, Ping(seq=3))
    await wait_until(lambda: len(b_in) == 1, 5.0)


async def test_queue_is_bounded_while_the_handshake_hangs(make_transport, wait_until) -> None:
    a, _, unreachable = await make_transport(1, send_queue_frames=4, connect_timeout=0.3)
    with socket.socket() as silent:  # accepts TCP (backlog) but never answers the Hello
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        for seq in range(10):
            a.send_nowait(address, Ping(seq=seq))
        assert a.counters["dropped_frames"] == 6
        await wait_until(lambda: unreachable == [address], 3)
    assert a.counters["connect_failures"] == 1 and a.counters["dropped_frames"] == 10


async def test_backpressure_pauses_queues_drops_and_resumes(make_transport, wait_until) -> None:
    a, _, _ = await make_transport(1, send_queue_frames=16)
    got: list[Message] = []
    reading = asyncio.Event()
    finished = asyncio.Event()

    async def slow_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hs = ListenerHandshake(Peer(9, address), None, secrets.token_bytes(32))
        assert await reader.readexactly(1) == b"C"
        for _ in range(2):
            size = int.from_bytes(await reader.readexactly(4), "big")
            reply = hs.receive(decode(await reader.readexactly(size)))
            if reply is not None:
                writer.write(frame(encode(reply)))
        await reading.wait()  # stop reading: the sender's socket buffer fills up
        framer = Framer(1 << 20)
        try:
            while data := await reader.read(1 << 16):
                got.extend(decode(f) for f in framer.feed(data))
        finally:
            writer.close()
            finished.set()

    server = await asyncio.start_server(slow_peer, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    peers = tuple(Peer(i, f"10.0.{i // 250}.{i % 250}:7700") for i in range(256))
    big = FindSuccessorReply(req=1, done=False, nodes=peers)  # ~8 KB per frame
    async with server:
        sent = 0
        async with asyncio.timeout(10):
            while a.counters["dropped_frames"] == 0:  # write until paused, queued, then dropped
                a.send_nowait(address, big)
                sent += 1
                if sent % 64 == 0:
                    await asyncio.sleep(0)
        assert a.peers()[0]["queued"] == 16
        reading.set()
        await wait_until(lambda: len(got) == sent - a.counters["dropped_frames"], 10)
        assert a.peers()[0]["queued"] == 0 and a.counters["dropped_frames"] == 1
        assert all(m == big for m in got)
        await a.close()
        async with asyncio.timeout(5):
            await finished.wait()


async def test_idle_connections_are_closed(make_transport, wait_until) -> None:
    a, _, unreachable = await make_transport(1, idle_timeout=0.2)
    b, b_in, _ = await make_transport(2, idle_timeout=0.2)
    a.send_nowait(b.me.address, Ping(seq=1))
    await wait_until(lambda: len(b_in) == 1, 5.0)
    await wait_until(lambda: a.open_connections == 0 and b.open_connections == 0, 3)
    assert a.counters["idle_closed"] + b.counters["idle_closed"] >= 1
    a.send_nowait(b.me.address, Ping(seq=2))  # and it reconnects on demand
    await wait_until(lambda: len(b_in) == 2, 5.0)
