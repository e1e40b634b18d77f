"""The bad-input battery, against a real running node (in-process daemon on real TCP).

For each kind of garbage: the connection is closed, a counter visible in /status goes up, one clear
warning names the peer's address and the reason, and the node still answers lookups afterwards (also
while a hanging connection is still open).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
from collections.abc import Awaitable, Callable

import msgpack
import pytest

from mlfabric.core.ring import ring_id, successor_of
from mlfabric.runtime.control import get_json
from mlfabric.runtime.daemon import Daemon
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.framing import frame
from mlfabric.wire.messages import AuthProof, FindSuccessor, Hello, HelloAck, Peer, Ping

pytestmark = pytest.mark.net

KEY = "battery-cluster-key"
ME = Peer(ring_id("attacker"), "127.0.0.254:9")
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(address: str) -> Conn:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    return await reader.readexactly(size)


async def hello(address: str) -> tuple[Conn, bytes, HelloAck]:
    """Open a control connection and send Hello; returns the listener's HelloAck."""
    reader, writer = await connect(address)
    nonce = secrets.token_bytes(32)
    writer.write(b"C" + frame(encode(Hello(node=ME, nonce=nonce))))
    ack = decode(await read_frame(reader))
    assert isinstance(ack, HelloAck)
    return (reader, writer), nonce, ack


def proof(key: str, ack: HelloAck, nonce: bytes) -> bytes:
    return hmac.new(key.encode(), b"D" + ack.nonce + nonce, hashlib.sha256).digest()


async def authenticated(address: str) -> Conn:
    (reader, writer), nonce, ack = await hello(address)
    writer.write(frame(encode(AuthProof(proof=proof(KEY, ack, nonce)))))
    # prove the connection is open for business: a real request gets a real answer
    writer.write(frame(encode(Ping(seq=7))))
    assert decode(await read_frame(reader)) is not None
    return reader, writer


# ---------------------------------------------------------------------- the attacks


async def random_bytes(address: str) -> Conn:
    reader, writer = await connect(address)
    writer.write(random.Random(1).randbytes(4096))
    return reader, writer


async def random_bytes_after_handshake(address: str) -> Conn:
    reader, writer = await authenticated(address)
    writer.write(random.Random(2).randbytes(4096))
    return reader, writer


async def length_over_limit(address: str) -> Conn:
    reader, writer = await authenticated(address)
    writer.write((2**32 - 1).to_bytes(4, "big") + b"x" * 16)
    return reader, writer


async def length_over_limit_in_handshake(address: str) -> Conn:
    reader, writer = await connect(address)
    writer.write(b"C" + (1 << 20).to_bytes(4, "big"))
    return reader, writer


async def wrong_field_types(address: str) -> Conn:
    reader, writer = await authenticated(address)
    body = msgpack.packb([1, FindSuccessor.TYPE_ID, ["not-a-number", -5]], use_bin_type=True)
    writer.write(frame(body))
    return reader, writer


async def unknown_message_id(address: str) -> Conn:
    reader, writer = await authenticated(address)
    writer.write(frame(msgpack.packb([1, 60000, []], use_bin_type=True)))
    return reader, writer


async def wrong_cluster_key(address: str) -> Conn:
    (reader, writer), nonce, ack = await hello(address)
    writer.write(frame(encode(AuthProof(proof=proof("not-the-key", ack, nonce)))))
    return reader, writer


async def message_before_auth(address: str) -> Conn:
    (reader, writer), _, _ = await hello(address)
    writer.write(frame(encode(Ping(seq=1))))
    return reader, writer


async def bulk_lane_wrong_key(address: str) -> Conn:
    reader, writer = await connect(address)
    nonce = secrets.token_bytes(32)
    writer.write(b"B" + frame(encode(Hello(node=ME, nonce=nonce))))
    ack = decode(await read_frame(reader))
    assert isinstance(ack, HelloAck)
    writer.write(frame(encode(AuthProof(proof=proof("not-the-key", ack, nonce)))))
    return reader, writer


Attack = Callable[[str], Awaitable[Conn]]
CASES: list[tuple[Attack, str, str]] = [
    (random_bytes, "bad_frames", "unknown lane byte"),
    (random_bytes_after_handshake, "bad_frames", ""),
    (length_over_limit, "bad_frames", "exceeds limit"),
    (length_over_limit_in_handshake, "bad_frames", "handshake frame of 1048576 bytes exceeds limit"),
    (wrong_field_types, "bad_frames", "FindSuccessor.req"),
    (unknown_message_id, "bad_frames", "unknown message type id 60000"),
    (wrong_cluster_key, "auth_failures", "wrong cluster key"),
    (message_before_auth, "auth_failures", "expected AuthProof"),
    (bulk_lane_wrong_key, "auth_failures", "wrong cluster key"),
]


# ---------------------------------------------------------------------- the checks


@pytest.fixture
async def keyed_pair(daemon_factory, wait_until) -> tuple[Daemon, Daemon]:
    a = await daemon_factory(cluster_key=KEY)
    b = await daemon_factory(seeds=[a.address], cluster_key=KEY)
    await wait_until(lambda: a.core.chord.predecessor is not None and b.core.chord.predecessor is not None,
                     timeout=5, what="two-node ring")
    return a, b


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


async def still_serves(a: Daemon, b: Daemon) -> None:
    ring = sorted([a.node_id, b.node_id])
    for key in (1, a.node_id, b.node_id + 1, 2**63 + 12345):
        code, body = await get_json(a.control_address, f"/lookup?key={key}", timeout=3)
        assert code == 200 and body["node"]["id"] == successor_of(key, ring)
        done = await b.driver.lookup(key, timeout=3)
        assert done.node is not None and done.node.id == successor_of(key, ring)


async def counters(a: Daemon) -> dict[str, int]:
    code, body = await get_json(a.control_address, "/status")
    assert code == 200
    return body["transport"]


@pytest.mark.parametrize(("attack", "counter", "reason"), CASES, ids=[c[0].__name__ for c in CASES])
async def test_garbage_closes_the_connection_and_is_counted(keyed_pair, caplog, attack, counter, reason) -> None:
    a, b = keyed_pair
    before = await counters(a)
    caplog.set_level(logging.WARNING, logger="mlfabric.runtime.transport")
    reader, writer = await attack(a.address)
    local = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
    try:
        assert await closed_by_peer(reader, timeout=3)
    finally:
        writer.close()
    after = await counters(a)
    assert after[counter] == before[counter] + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "mlfabric.runtime.transport"]
    matching = [line for line in lines if local in line and reason in line]
    assert len(matching) == 1, lines
    await still_serves(a, b)


async def test_hanging_partial_frame_is_closed_by_the_handshake_timeout(keyed_pair, caplog) -> None:
    a, b = keyed_pair
    caplog.set_level(logging.WARNING, logger="mlfabric.runtime.transport")
    before = await counters(a)
    loop = asyncio.get_running_loop()
    reader, writer = await connect(a.address)
    writer.write(b"C" + (200).to_bytes(4, "big") + b"only a part")  # and then nothing more
    t0 = loop.time()
    try:
        await still_serves(a, b)  # meanwhile the node serves everyone else
        timeout = a.settings.transport.handshake_timeout
        assert await closed_by_peer(reader, timeout=timeout + 2)
        assert timeout - 0.05 <= loop.time() - t0 <= timeout + 1.5
    finally:
        writer.close()
    after = await counters(a)
    assert after["handshake_timeouts"] == before["handshake_timeouts"] + 1
    local = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
    assert any(local in r.getMessage() and "no handshake within" in r.getMessage() for r in caplog.records)
    await still_serves(a, b)


async def test_a_node_with_another_key_cannot_join(daemon_factory, keyed_pair, wait_until) -> None:
    a, _ = keyed_pair
    stranger = await daemon_factory(seeds=[a.address], cluster_key="another-key")
    # the stranger (dialler) sees that the listener's proof is wrong and gives up; it never joins
    await wait_until(lambda: stranger.transport.counters["auth_failures"] >= 1, timeout=5, what="auth failure")
    assert not stranger.core.chord.joined
    assert all(p["address"] != stranger.address for p in (await get_json(a.control_address, "/status"))[1]["peers"])


async def test_connections_over_max_connections_are_rejected(daemon_factory, caplog) -> None:
    a = await daemon_factory(transport={"max_connections": 2})
    caplog.set_level(logging.WARNING, logger="mlfabric.runtime.transport")
    conns = [await connect(a.address) for _ in range(3)]
    try:
        assert await closed_by_peer(conns[2][0], timeout=3)  # the third one is turned away
        assert a.transport.counters["rejected_connections"] == 1
        assert any("max_connections" in r.getMessage() for r in caplog.records)
    finally:
        for _, writer in conns:
            writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x00\xff garbage \r\n\r\n", 400),
        (b"GET /status\r\n\r\n", 400),
        (b"POST /status HTTP/1.1\r\n\r\n", 405),
        (b"GET /" + b"a" * 10000, 413),
    ],
    ids=["binary", "no-version", "post", "oversized"],
)
async def test_control_endpoint_rejects_garbage(daemon_factory, request_bytes: bytes, status: int) -> None:
    a = await daemon_factory()
    reader, writer = await connect(a.control_address)
    try:
        writer.write(request_bytes)
        async with asyncio.timeout(3):
            answer = await reader.read()  # the server answers and closes
    finally:
        writer.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in answer
    assert (await get_json(a.control_address, "/status"))[0] == 200
