"""wire/framing.py: 4-byte big-endian length prefix; any chunking in, whole frames out."""

from __future__ import annotations

import pytest

from mlfabric.errors import LocalProtocolError, RemoteProtocolError
from mlfabric.wire.framing import HEADER, MAX_FRAME_LIMIT, Framer, frame


def test_frame_layout() -> None:
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"x" * 258)[:HEADER] == b"\x00\x00\x01\x02"


def test_whole_frames_in_one_feed() -> None:
    f = Framer(max_frame=1024)
    assert f.feed(frame(b"one") + frame(b"") + frame(b"three")) == [b"one", b"", b"three"]
    assert f.buffered == 0


def test_byte_at_a_time() -> None:
    payloads = [b"alpha", b"", b"\x00" * 300, b"omega"]
    stream = b"".join(frame(p) for p in payloads)
    f = Framer(max_frame=1024)
    out: list[bytes] = []
    for i in range(len(stream)):
        out += f.feed(stream[i : i + 1])
    assert out == payloads
    assert f.buffered == 0


@pytest.mark.parametrize("cut", range(1, 12))
def test_split_anywhere(cut: int) -> None:
    stream = frame(b"hello") + frame(b"world")
    f = Framer(max_frame=64)
    assert f.feed(stream[:cut]) + f.feed(stream[cut:]) == [b"hello", b"world"]


def test_partial_frame_stays_buffered() -> None:
    f = Framer(max_frame=64)
    assert f.feed(frame(b"done") + frame(b"pending")[:6]) == [b"done"]
    assert f.buffered == 6
    assert f.feed(b"") == []
    assert f.feed(frame(b"pending")[6:]) == [b"pending"]
    assert f.buffered == 0


def test_partial_header_stays_buffered() -> None:
    f = Framer(max_frame=64)
    assert f.feed(b"\x00\x00") == []
    assert f.buffered == 2
    assert f.feed(b"\x00\x01z") == [b"z"]


def test_accepts_bytearray_and_memoryview() -> None:
    f = Framer(max_frame=64)
    data = frame(b"abc") + frame(b"de")
    assert f.feed(bytearray(data[:5])) + f.feed(memoryview(data)[5:]) == [b"abc", b"de"]


def test_returned_frames_are_independent_bytes() -> None:
    f = Framer(max_frame=64)
    (first,) = f.feed(frame(b"abc"))
    f.feed(frame(b"xyz"))
    assert first == b"abc"
    assert type(first) is bytes


def test_frame_at_the_limit_is_accepted() -> None:
    f = Framer(max_frame=100)
    assert f.feed(frame(b"x" * 100)) == [b"x" * 100]


def test_oversized_frame_is_rejected_from_the_header_alone() -> None:
    f = Framer(max_frame=100)
    with pytest.raises(RemoteProtocolError, match="101 bytes exceeds limit 100"):
        f.feed((101).to_bytes(HEADER, "big"))


def test_huge_length_is_rejected_without_buffering_the_payload() -> None:
    f = Framer(max_frame=1 << 20)
    with pytest.raises(RemoteProtocolError):
        f.feed(b"\xff\xff\xff\xff" + b"x" * 10)


def test_oversized_frame_after_good_ones() -> None:
    f = Framer(max_frame=8)
    with pytest.raises(RemoteProtocolError):
        f.feed(frame(b"ok") + (9).to_bytes(HEADER, "big"))


@pytest.mark.parametrize("bad", [0, -1, MAX_FRAME_LIMIT + 1])
def test_bad_limit_is_our_bug(bad: int) -> None:
    with pytest.raises(LocalProtocolError):
        Framer(max_frame=bad)


def test_largest_limit_is_allowed() -> None:
    Framer(max_frame=MAX_FRAME_LIMIT)


def test_payload_too_large_to_frame_is_our_bug() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return MAX_FRAME_LIMIT + 1

    with pytest.raises(LocalProtocolError):
        frame(Huge())
