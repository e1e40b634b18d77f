"""wire/codec.py + wire/messages.py: every registered message round-trips; every malformed input is the
peer's fault (RemoteProtocolError) and nothing else.

Samples are derived from each field's wire kind, so a message added later is covered without editing
this file; a new *kind* must be taught to ``valid_values`` / ``invalid_raw`` below.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest

from mlfabric.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from mlfabric.wire import messages as m
from mlfabric.wire.codec import MAX_MESSAGE, decode, encode

# --------------------------------------------------------------------------------------------------
# Kind-driven samples
# --------------------------------------------------------------------------------------------------

LONGEST_ADDRESS = "h" * (m.MAX_ADDRESS_LEN - len(":65535")) + ":65535"


def valid_values(kind: m.Kind) -> list[Any]:
    """Python values a field of this kind may hold, edges included."""
    match kind:
        case m._Address():
            return ["127.0.0.1:7700", "[::1]:65535", "node-7.example.org:1", LONGEST_ADDRESS]
        case m._PeerKind():
            return [m.Peer(0, "127.0.0.1:1"), m.Peer((1 << 64) - 1, LONGEST_ADDRESS), m.Peer(12345, "[::1]:7700")]
        case m._Int():
            return [kind.lo, kind.hi, (kind.lo + kind.hi) // 2]
        case m._Bool():
            return [True, False]
        case m._Float():
            return [kind.lo, kind.hi, 0.25]
        case m.Bytes(exact=int() as n):
            return [bytes(n), bytes(range(n)) if n <= 256 else b"\xff" * n]
        case m.Bytes():
            return [b"", b"\x00\xff", b"\xab" * kind.max_len]
        case m.Str():
            return ["", "ünïcode ✓", "s" * kind.max_len]
        case m.Optional():
            return [None, *valid_values(kind.inner)]
        case m.ListOf():
            inner = valid_values(kind.inner)
            return [(), (inner[0],), tuple(inner[i % len(inner)] for i in range(kind.max_len))]
    raise AssertionError(f"teach valid_values about {type(kind).__name__}")


def _packable(values: list[Any]) -> list[Any]:
    out = []
    for v in values:
        try:
            msgpack.packb(v, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            continue
        out.append(v)
    return out


def invalid_raw(kind: m.Kind) -> list[Any]:
    """Wire-level (already dumped) values that a field of this kind must reject."""
    match kind:
        case m._Address():
            return [
                *invalid_raw(m.Str(m.MAX_ADDRESS_LEN)),
                "no-port",
                ":7700",
                "host:",
                "host:0",
                "host:65536",
                "host:-1",
                "host:7o0",
                "host: 80",
                "host:²",
                "host:١٢",
                "h" * m.MAX_ADDRESS_LEN + ":1",
            ]
        case m._PeerKind():
            return [
                None,
                "1@127.0.0.1:1",
                [],
                [1],
                [1, "127.0.0.1:1", "extra"],
                {"id": 1, "address": "127.0.0.1:1"},
                [-1, "127.0.0.1:1"],
                ["1", "127.0.0.1:1"],
                *([1, bad] for bad in invalid_raw(m.ADDRESS)),
            ]
        case m._Int():
            return _packable([kind.lo - 1, kind.hi + 1, True, 1.0, "1", None, [1], b"\x01"])
        case m._Bool():
            return [0, 1, "true", None, b"\x01"]
        case m._Float():
            return [kind.lo - 1, kind.hi * 2 + 1, math.nan, math.inf, -math.inf, True, "1.0", None]
        case m.Bytes(exact=int() as n):
            return ["x" * n, None, 1, bytes(n - 1), bytes(n + 1), bytes(kind.max_len + 1)]
        case m.Bytes():
            return ["text", None, 1, [1], bytes(kind.max_len + 1)]
        case m.Str():
            return [b"bytes", None, 1, ["s"], "s" * (kind.max_len + 1)]
        case m.Optional():
            return [v for v in invalid_raw(kind.inner) if v is not None]
        case m.ListOf():
            good = kind.inner.dump(valid_values(kind.inner)[0])
            return [
                None,
                "not a list",
                {"a": 1},
                [invalid_raw(kind.inner)[0]],
                [good, invalid_raw(kind.inner)[-1]],
                [good] * (kind.max_len + 1),
            ]
    raise AssertionError(f"teach invalid_raw about {type(kind).__name__}")


def sample_messages(cls: type[m.Message]) -> list[m.Message]:
    """Instances of cls using each field's edge values (variant i takes value i of every field)."""
    columns = [valid_values(kind) for _, kind in cls.KINDS]
    count = max((len(c) for c in columns), default=1)
    return [
        cls(**{name: col[i % len(col)] for (name, _), col in zip(cls.KINDS, columns, strict=True)})
        for i in range(count)
    ]


def raw_body(msg: m.Message) -> list[Any]:
    return [kind.dump(getattr(msg, name)) for name, kind in msg.KINDS]


def pack(*obj: Any) -> bytes:
    return msgpack.packb(list(obj) if len(obj) != 1 else obj[0], use_bin_type=True)


REGISTERED = sorted(m.registered().items())
MESSAGES = [msg for _, cls in REGISTERED for msg in sample_messages(cls)]
ONE_OF_EACH = [sample_messages(cls)[0] for _, cls in REGISTERED]
FIELDS = [(cls, i, name, kind) for _, cls in REGISTERED for i, (name, kind) in enumerate(cls.KINDS)]
BAD_FIELDS = [
    pytest.param(cls, i, bad, id=f"{cls.__name__}.{name}-{j}")
    for cls, i, name, kind in FIELDS
    for j, bad in enumerate(invalid_raw(kind))
]


def _msg_id(msg: m.Message) -> str:
    return type(msg).__name__


def expect_remote_error(buf: bytes, match: str | None = None, **kw: Any) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(buf, **kw)
    return info.value


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_registry_is_consistent() -> None:
    assert REGISTERED, "no message classes registered"
    for type_id, cls in REGISTERED:
        assert cls.TYPE_ID == type_id
        assert m.message_class(type_id) is cls
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"
        assert cls.REQUIRED <= len(cls.KINDS)
        assert [f.name for f in dataclasses.fields(cls)] == [name for name, _ in cls.KINDS]


def test_handshake_and_overlay_ids_are_stable() -> None:
    """Ids are protocol: these were published in the first version and must never move."""
    expected = {
        1: "Hello", 2: "HelloAck", 3: "AuthProof",
        10: "Ping", 11: "Pong", 12: "FindSuccessor", 13: "FindSuccessorReply",
        14: "GetNeighbors", 15: "Neighbors", 16: "Notify", 17: "Leaving",
    }  # fmt: skip
    registered = m.registered()
    assert {i: registered[i].__name__ for i in expected if i in registered} == expected


def test_duplicate_type_id_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="already used"):

        @m.wire(1)
        @dataclasses.dataclass(frozen=True, slots=True)
        class Impostor(m.Message):
            x: int = m.f(m.U64)

    assert m.registered()[1] is m.Hello


def test_field_without_kind_is_refused() -> None:
    unused = max(m.registered()) + 1000
    with pytest.raises(LocalProtocolError, match="no wire kind"):

        @m.wire(unused)
        @dataclasses.dataclass(frozen=True, slots=True)
        class Sloppy(m.Message):
            x: int = 0

    assert unused not in m.registered()


def test_unknown_type_id_lookup() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        m.message_class(65535)


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", MESSAGES, ids=_msg_id)
def test_round_trip(msg: m.Message) -> None:
    buf = encode(msg)
    back = decode(buf)
    assert type(back) is type(msg)
    assert back == msg
    assert encode(back) == buf  # deterministic


@pytest.mark.parametrize("msg", ONE_OF_EACH, ids=_msg_id)
def test_encoding_layout(msg: m.Message) -> None:
    assert msgpack.unpackb(encode(msg)) == [m.PROTOCOL_VERSION, msg.TYPE_ID, raw_body(msg)]


def test_representative_messages_round_trip() -> None:
    a, b, c = m.Peer(1, "10.0.0.1:7700"), m.Peer(1 << 63, "[fe80::1]:7700"), m.Peer(7, "node-c:9000")
    messages = [
        m.Hello(node=a, nonce=b"n" * 32),
        m.HelloAck(node=b, nonce=b"m" * 32, proof=b"p" * 32),
        m.AuthProof(proof=b""),
        m.Ping(seq=1),
        m.Pong(seq=(1 << 64) - 1),
        m.FindSuccessor(req=9, key=0xDEADBEEF),
        m.FindSuccessorReply(req=9, done=True, nodes=(a, b, c)),
        m.GetNeighbors(req=3),
        m.Neighbors(req=3, predecessor=None, successors=(b, c)),
        m.Neighbors(req=4, predecessor=a, successors=()),
        m.Notify(),
        m.Leaving(predecessor=a, successors=(b,)),
    ]
    for msg in messages:
        assert decode(encode(msg)) == msg


def test_lists_decode_as_tuples() -> None:
    msg = decode(encode(m.FindSuccessorReply(req=1, done=False, nodes=[m.Peer(1, "h:1")])))  # type: ignore[arg-type]
    assert msg.nodes == (m.Peer(1, "h:1"),)
    assert isinstance(msg.nodes, tuple)


def test_integral_float_on_the_wire_is_accepted_as_float() -> None:
    assert m.DURATION.load(1) == 1.0
    assert type(m.DURATION.load(1)) is float


def test_decode_accepts_bytearray_and_memoryview() -> None:
    buf = encode(m.Ping(seq=5))
    assert decode(bytearray(buf)) == decode(memoryview(buf)) == m.Ping(seq=5)


# --------------------------------------------------------------------------------------------------
# Forward compatibility: trailing fields tolerated, defaults filled, required fields enforced
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", ONE_OF_EACH, ids=_msg_id)
def test_extra_trailing_fields_are_ignored(msg: m.Message) -> None:
    body = raw_body(msg) + [1, "from a newer peer", [None, {"k": b"v"}]]
    assert decode(pack(m.PROTOCOL_VERSION, msg.TYPE_ID, body)) == msg


def test_newer_protocol_version_is_accepted() -> None:
    assert decode(pack(m.PROTOCOL_VERSION + 1, m.Ping.TYPE_ID, [7])) == m.Ping(seq=7)


def test_omitted_defaulted_field_takes_its_default() -> None:
    hello = m.Hello(node=m.Peer(1, "h:1"), nonce=bytes(32))
    body = raw_body(hello)[: m.Hello.REQUIRED]
    assert decode(pack(1, m.Hello.TYPE_ID, body)).version == m.PROTOCOL_VERSION


@pytest.mark.parametrize("cls", [cls for _, cls in REGISTERED if cls.REQUIRED], ids=lambda c: c.__name__)
def test_missing_required_field_is_rejected(cls: type[m.Message]) -> None:
    body = raw_body(sample_messages(cls)[0])
    for keep in range(cls.REQUIRED):
        expect_remote_error(pack(1, cls.TYPE_ID, body[:keep]), match=cls.__name__)


# --------------------------------------------------------------------------------------------------
# Invalid fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "index", "bad"), BAD_FIELDS)
def test_invalid_field_is_rejected(cls: type[m.Message], index: int, bad: Any) -> None:
    body = raw_body(sample_messages(cls)[0])
    body[index] = bad
    err = expect_remote_error(pack(1, cls.TYPE_ID, body))
    assert f"{cls.__name__}.{cls.KINDS[index][0]}" in str(err)
    assert "\n" not in str(err)


def test_error_messages_stay_short() -> None:
    body = raw_body(m.Ping(seq=1))
    body[0] = "x" * 10_000
    err = expect_remote_error(pack(1, m.Ping.TYPE_ID, body))
    assert len(str(err)) < 200


def test_peer_list_at_limit_and_over() -> None:
    peers = [[i, f"h:{i + 1}"] for i in range(m.MAX_PEER_LIST)]
    assert len(decode(pack(1, m.Neighbors.TYPE_ID, [1, None, peers])).successors) == m.MAX_PEER_LIST
    expect_remote_error(pack(1, m.Neighbors.TYPE_ID, [1, None, [*peers, [0, "h:1"]]]), match="successors")


# --------------------------------------------------------------------------------------------------
# Invalid envelopes and bytes
# --------------------------------------------------------------------------------------------------

GOOD = encode(m.FindSuccessorReply(req=1, done=True, nodes=(m.Peer(1, "127.0.0.1:7700"),)))


@pytest.mark.parametrize(
    "buf",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(pack(1), id="int"),
        pytest.param(pack("hello"), id="str"),
        pytest.param(pack(b"bin"), id="bin"),
        pytest.param(pack(None), id="nil"),
        pytest.param(pack({"v": 1, "t": 10}), id="map"),
        pytest.param(pack([]), id="empty-list"),
        pytest.param(pack([1, 10]), id="two-items"),
        pytest.param(pack([1, 10, [1], "extra"]), id="four-items"),
    ],
)
def test_non_message_is_rejected(buf: bytes) -> None:
    expect_remote_error(buf)


@pytest.mark.parametrize("version", [0, -1, "1", None, 1.0, True, [1]])
def test_bad_version_is_rejected(version: Any) -> None:
    expect_remote_error(pack(version, m.Ping.TYPE_ID, [1]), match="version")


@pytest.mark.parametrize("type_id", [0, 9, 9999, -1, 1 << 40, (1 << 64) - 1])
def test_unknown_type_id_is_rejected(type_id: int) -> None:
    if type_id in m.registered():
        pytest.skip(f"{type_id} has since been registered")
    expect_remote_error(pack(1, type_id, []), match="unknown message type")


@pytest.mark.parametrize("type_id", ["10", None, True, 10.0, [10], b"\x0a"])
def test_non_integer_type_id_is_rejected(type_id: Any) -> None:
    expect_remote_error(pack(1, type_id, [1]), match="type id")


@pytest.mark.parametrize("body", [None, 1, "1", b"\x01", {"seq": 1}])
def test_non_list_body_is_rejected(body: Any) -> None:
    expect_remote_error(pack(1, m.Ping.TYPE_ID, body), match="Ping")


@pytest.mark.parametrize("msg", ONE_OF_EACH, ids=_msg_id)
def test_every_truncation_is_rejected(msg: m.Message) -> None:
    buf = encode(msg)
    for cut in range(len(buf)):
        expect_remote_error(buf[:cut])


def test_trailing_bytes_after_the_message_are_rejected() -> None:
    expect_remote_error(GOOD + b"\x00")
    expect_remote_error(GOOD + GOOD)


def test_oversized_message_is_rejected_before_parsing() -> None:
    expect_remote_error(b"\x00" * (MAX_MESSAGE + 1), match="exceeds")
    expect_remote_error(GOOD, match="exceeds", max_len=len(GOOD) - 1)
    assert decode(GOOD, max_len=len(GOOD)) == decode(GOOD)


@pytest.mark.parametrize(
    "buf",
    [
        pytest.param(b"\x93\x01\x0a\xdd\xff\xff\xff\xff", id="array-claims-4G-items"),
        pytest.param(b"\x93\x01\x0a\x91\xdb\xff\xff\xff\xff", id="str-claims-4G-bytes"),
        pytest.param(b"\x93\x01\x0a\x91\xc6\xff\xff\xff\xff", id="bin-claims-4G-bytes"),
        pytest.param(b"\x93\x01\x0a\x91\xdf\xff\xff\xff\xff", id="map-claims-4G-entries"),
        pytest.param(b"\x93\x01\x0a\x91\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\x93\x01\x0a\x91\xd4\x01\x00", id="ext-type"),
        pytest.param(b"\x93\x01\x0a\x91\xd6\xff\x00\x00\x00\x00", id="timestamp-ext"),
        pytest.param(b"\x93\x01\x0a\x91\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\x93\x01\x0a\x91\x81\x91\x01\x02", id="list-map-key"),
        pytest.param(b"\x93\x01\x0a" + b"\x91" * 100_000, id="deep-nesting"),
        pytest.param(b"\x93\x01\x0a\x91\xcb" + b"\x7f\xf8" + bytes(6), id="nan-for-int"),
    ],
)
def test_hostile_msgpack_is_rejected(buf: bytes) -> None:
    expect_remote_error(buf)


def test_remote_error_is_a_protocol_error_not_a_local_one() -> None:
    err = expect_remote_error(b"")
    assert isinstance(err, ProtocolError)
    assert not isinstance(err, LocalProtocolError)
