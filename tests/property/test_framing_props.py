"""Framing properties: any chunking of any frame sequence gives the same frames back; garbage raises
only RemoteProtocolError."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.framing import Framer, frame

payloads = st.lists(st.binary(max_size=300), max_size=12)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(payloads, st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_gives_back_the_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(p) for p in frames)
    framer = Framer(max_frame=max((len(p) for p in frames), default=1) or 1)
    out: list[bytes] = []
    for chunk in _chunks(stream, cuts):
        out += framer.feed(chunk)
    assert out == frames
    assert framer.buffered == 0


@given(payloads.filter(bool), st.integers(min_value=1), st.lists(st.integers(min_value=0), max_size=10))
def test_cut_stream_returns_the_complete_frames_and_keeps_the_rest(
    frames: list[bytes], short: int, cuts: list[int]
) -> None:
    stream = b"".join(frame(p) for p in frames)
    last = len(frame(frames[-1]))
    short = short % last + 1  # drop 1..len(last frame) bytes: the last frame is incomplete
    framer = Framer(max_frame=1024)
    out: list[bytes] = []
    for chunk in _chunks(stream[:-short], cuts):
        out += framer.feed(chunk)
    assert out == frames[:-1]
    assert framer.buffered == last - short


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 1 << 16))
def test_garbage_raises_only_remote_protocol_error(chunks: list[bytes], limit: int) -> None:
    framer = Framer(max_frame=limit)
    try:
        for chunk in chunks:
            for payload in framer.feed(chunk):
                assert len(payload) <= limit
    except RemoteProtocolError:
        pass
