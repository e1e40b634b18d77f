"""Codec properties: generated messages round-trip; nothing a peer can send raises anything but
RemoteProtocolError, and what does decode is a fully valid message."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import example, given
from hypothesis import strategies as st
from wire_strategies import messages, msgpack_values

from mlfabric.errors import RemoteProtocolError
from mlfabric.wire import messages as m
from mlfabric.wire.blob import unpack_header
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.handshake import ListenerHandshake

TYPE_IDS = sorted(m.registered())


def _decode_or_reject(buf: bytes) -> m.Message | None:
    try:
        msg = decode(buf)
    except RemoteProtocolError:
        return None
    assert isinstance(msg, m.Message)
    assert decode(encode(msg)) == msg  # anything accepted is valid enough to re-encode
    return msg


@given(messages())
def test_round_trip(msg: m.Message) -> None:
    buf = encode(msg)
    assert decode(buf) == msg
    assert encode(decode(buf)) == buf


@given(st.binary(max_size=256))
@example(b"")
@example(b"\x93\x01\x0a\x91")
def test_random_bytes_raise_only_remote_protocol_error(buf: bytes) -> None:
    _decode_or_reject(buf)


@given(msgpack_values)
def test_random_msgpack_raises_only_remote_protocol_error(obj: Any) -> None:
    _decode_or_reject(msgpack.packb(obj, use_bin_type=True))


@given(st.sampled_from(TYPE_IDS), st.lists(msgpack_values, max_size=6), st.integers(1, 3))
def test_random_bodies_raise_only_remote_protocol_error(type_id: int, body: list[Any], version: int) -> None:
    _decode_or_reject(msgpack.packb([version, type_id, body], use_bin_type=True))


@given(messages(), st.data())
def test_mutated_messages_raise_only_remote_protocol_error(msg: m.Message, data: st.DataObject) -> None:
    buf = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    _decode_or_reject(bytes(buf))


@given(messages(), st.data())
def test_truncated_or_extended_messages_raise_only_remote_protocol_error(msg: m.Message, data: st.DataObject) -> None:
    buf = encode(msg)
    cut = data.draw(st.integers(0, len(buf) - 1))
    tail = data.draw(st.binary(min_size=1, max_size=8))
    for variant in (buf[:cut], buf + tail):
        assert _decode_or_reject(variant) is None


@given(st.binary(max_size=128))
def test_blob_header_garbage_raises_only_remote_protocol_error(buf: bytes) -> None:
    try:
        unpack_header(buf, 1 << 30)
    except RemoteProtocolError:
        pass


@given(st.lists(messages(), min_size=1, max_size=4))
def test_listener_handshake_raises_only_remote_protocol_error(sequence: list[m.Message]) -> None:
    lis = ListenerHandshake(m.Peer(1, "127.0.0.1:1"), b"key", b"\x07" * m.NONCE_LEN)
    try:
        for msg in sequence:
            lis.receive(msg)
    except RemoteProtocolError:
        assert not lis.done
