"""Bulk lane over real loopback TCP: a 50 MB tensor arrives intact, straight into one preallocated buffer."""

from __future__ import annotations

import asyncio
import logging
import mmap
import random

import pytest

from mlfabric.runtime.transport import TransportError
from mlfabric.wire.blob import MAX_META, TensorBlob

pytestmark = pytest.mark.net
LOOP_FACTORIES = ("uvloop", "asyncio")  # BufferedProtocol paths differ between the two loops

MB = 1 << 20


async def test_50_megabyte_blob_arrives_intact(daemon_factory) -> None:
    a = await daemon_factory(cluster_key="bulk-key")
    b = await daemon_factory(cluster_key="bulk-key")
    payload = random.Random(50).randbytes(50 * MB)
    blob = TensorBlob(dtype="float32", shape=(5, 10 * MB // 4 * 1), data=payload)
    async with asyncio.timeout(30):
        await a.transport.bulk.send(b.address, "layer0.weight", blob)
        src, name, got = await b.transport.bulk.received.get()
    assert (src.id, src.address, name) == (a.node_id, a.address, "layer0.weight")
    assert (got.dtype, got.shape, got.nbytes) == ("float32", blob.shape, 50 * MB)
    # received straight into one preallocated buffer (a populated mapping): the blob is a view of it
    assert isinstance(got.data, memoryview) and not got.data.readonly and isinstance(got.data.obj, mmap.mmap)
    assert got.data == payload
    assert b.transport.counters["bulk_bytes_in"] == 50 * MB and a.transport.counters["bulk_out"] == 1

    # the connection is reused for the next blob, including an empty one
    async with asyncio.timeout(10):
        await a.transport.bulk.send(b.address, "empty", TensorBlob("int64", (0, 3), b""))
        await a.transport.bulk.send(b.address, "small", TensorBlob("uint8", (3,), b"xyz"))
        assert (await b.transport.bulk.received.get())[1:] == ("empty", TensorBlob("int64", (0, 3), b""))
        _, name, small = await b.transport.bulk.received.get()
    assert name == "small" and bytes(small.data) == b"xyz"
    assert a.transport.counters["connections_out"] == 1


async def test_bulk_send_to_a_node_with_another_key_fails(daemon_factory) -> None:
    a = await daemon_factory(cluster_key="one")
    b = await daemon_factory(cluster_key="two")
    with pytest.raises(TransportError, match="handshake"):
        async with asyncio.timeout(10):
            await a.transport.bulk.send(b.address, "w", TensorBlob("uint8", (4,), b"abcd"))
    assert b.transport.bulk.received.empty()


async def test_blob_over_max_bulk_bytes_is_refused(daemon_factory, caplog) -> None:
    a = await daemon_factory()
    b = await daemon_factory(transport={"max_bulk_bytes": 1000})
    caplog.set_level(logging.WARNING, logger="mlfabric.runtime.transport")
    with pytest.raises(TransportError, match="lost"):
        async with asyncio.timeout(10):
            await a.transport.bulk.send(b.address, "big", TensorBlob("uint8", (4096,), bytes(4096)))
    assert b.transport.counters["bad_frames"] == 1
    assert any("exceeds limit 1000" in r.getMessage() for r in caplog.records)
    # the node is fine: a blob within the limit goes through on a new connection
    async with asyncio.timeout(10):
        await a.transport.bulk.send(b.address, "ok", TensorBlob("uint8", (10,), bytes(10)))
        assert (await b.transport.bulk.received.get())[1] == "ok"


async def test_bulk_send_to_nobody_fails_fast(daemon_factory) -> None:
    a = await daemon_factory()
    b = await daemon_factory()
    address = b.address
    await b.stop(leave=False)
    with pytest.raises(TransportError, match="cannot reach"):
        async with asyncio.timeout(5):
            await a.transport.bulk.send(address, "w", TensorBlob("uint8", (1,), b"x"))


async def test_payload_can_land_in_a_buffer_the_receiver_provides(daemon_factory) -> None:
    a = await daemon_factory()
    b = await daemon_factory()
    target = bytearray(4 * 1000)  # e.g. a preallocated tensor's storage
    seen = []

    def allocate(src, name, dtype, shape, nbytes):
        seen.append((src.id, name, dtype, shape, nbytes))
        return target if name == "into-target" else None

    b.transport.bulk.allocate = allocate
    payload = bytes(range(256)) * 15 + bytes(160)
    async with asyncio.timeout(10):
        await a.transport.bulk.send(b.address, "into-target", TensorBlob("float32", (1000,), payload))
        _, _, got = await b.transport.bulk.received.get()
    assert got.data.obj is target and bytes(target) == payload
    assert seen == [(a.node_id, "into-target", "float32", (1000,), 4000)]


async def test_meta_travels_with_the_blob(daemon_factory) -> None:
    a = await daemon_factory()
    b = await daemon_factory()
    target = bytearray(4 * 256)
    b.transport.bulk.allocate = lambda src, name, dtype, shape, nbytes: target if name == "in-place" else None
    meta = bytes(range(256)) * 12  # MAX_META bytes: a contributor bitmap and a weight, say
    payload = random.Random(7).randbytes(4 * 256)
    async with asyncio.timeout(10):
        await a.transport.bulk.send(b.address, "in-place", TensorBlob("float32", (256,), payload, meta=meta))
        await a.transport.bulk.send(b.address, "plain", TensorBlob("uint8", (2,), b"ok"))
        await a.transport.bulk.send(b.address, "meta-only", TensorBlob("int64", (0,), b"", meta=b"\x01"))
        got = [await b.transport.bulk.received.get() for _ in range(3)]
    (_, n0, g0), (_, n1, g1), (_, n2, g2) = got
    assert (n0, g0.meta, g0.data.obj, bytes(target)) == ("in-place", meta, target, payload)
    assert (n1, g1.meta, bytes(g1.data)) == ("plain", b"", b"ok")
    assert (n2, g2.meta, g2.nbytes) == ("meta-only", b"\x01", 0)
    assert a.transport.counters["connections_out"] == 1


@pytest.mark.parametrize("bad_meta", [b"m" * (MAX_META + 1), "not-bytes", 42])
async def test_oversize_or_ill_typed_meta_drops_the_connection(daemon_factory, monkeypatch, caplog, bad_meta) -> None:
    import msgpack

    from mlfabric.runtime import bulk

    a = await daemon_factory()
    b = await daemon_factory()
    caplog.set_level(logging.WARNING, logger="mlfabric.runtime.transport")
    # a buggy or hostile sender: its header's fifth element is not a bounded bytes string
    monkeypatch.setattr(bulk, "pack_header", lambda name, blob: msgpack.packb(
        [name, blob.dtype, list(blob.shape), blob.nbytes, bad_meta], use_bin_type=True))
    with pytest.raises(TransportError, match="lost"):
        async with asyncio.timeout(10):
            await a.transport.bulk.send(b.address, "w", TensorBlob("uint8", (4,), b"abcd"))
    assert b.transport.counters["bad_frames"] == 1
    assert b.transport.bulk.received.empty()
    assert any("tensor header" in r.getMessage() or "meta" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    async with asyncio.timeout(10):  # the node keeps serving on a new connection
        await a.transport.bulk.send(b.address, "ok", TensorBlob("uint8", (1,), b"x", meta=b"m"))
        _, name, got = await b.transport.bulk.received.get()
    assert (name, got.meta) == ("ok", b"m")


async def test_concurrent_sends_to_one_peer_are_pipelined_on_one_connection(daemon_factory) -> None:
    a = await daemon_factory()
    b = await daemon_factory()
    blobs = [TensorBlob("uint8", (1000,), bytes([i]) * 1000, meta=bytes([i])) for i in range(20)]
    async with asyncio.timeout(10):
        await asyncio.gather(*(a.transport.bulk.send(b.address, f"b{i}", blob) for i, blob in enumerate(blobs)))
        got = [await b.transport.bulk.received.get() for _ in blobs]
    # in order and intact, every ACK matched to its own send
    assert [(name, bytes(blob.data), blob.meta) for _, name, blob in got] == [
        (f"b{i}", bytes([i]) * 1000, bytes([i])) for i in range(20)]
    assert a.transport.counters["connections_out"] == 1 and a.transport.counters["bulk_out"] == 20


async def test_a_write_cut_by_a_timeout_aborts_the_connection(daemon_factory) -> None:
    a = await daemon_factory()
    b = await daemon_factory()
    big = TensorBlob("uint8", (256 * MB,), bytes(256 * MB))
    with pytest.raises(TimeoutError):
        await a.transport.bulk.send(b.address, "big", big, timeout=0.02)
    # the half-written blob cannot corrupt the next one: that one goes on a fresh connection
    async with asyncio.timeout(10):
        await a.transport.bulk.send(b.address, "next", TensorBlob("uint8", (3,), b"abc"))
        while True:
            _, name, got = await b.transport.bulk.received.get()
            if name == "next":
                break
    assert bytes(got.data) == b"abc"
    assert a.transport.counters["connections_out"] == 2
