"""wire/blob.py: tensor descriptions are validated so a peer cannot make us allocate or reinterpret
more than it sent. No torch in wire/; torch appears here only to cross-check the item sizes."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.blob import (
    ITEMSIZE,
    MAX_DIMS,
    MAX_META,
    MAX_NAME,
    TensorBlob,
    expected_nbytes,
    pack_header,
    unpack_header,
    validate_header,
)

LIMIT = 1 << 30


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (1, 1, 1, 1, 1, 1, 1, 4), (4, 0, 5)])
def test_valid_blob_round_trips_its_header(dtype: str, shape: tuple[int, ...]) -> None:
    nbytes = ITEMSIZE[dtype] * math.prod(shape)
    blob = TensorBlob(dtype=dtype, shape=shape, data=bytes(nbytes))
    assert blob.nbytes == nbytes == expected_nbytes(dtype, shape)
    assert unpack_header(pack_header("layer.weight", blob), LIMIT) == ("layer.weight", dtype, shape, nbytes, b"")


def test_blob_accepts_a_memoryview_without_copying() -> None:
    raw = bytearray(16)
    blob = TensorBlob(dtype="float32", shape=(4,), data=memoryview(raw))
    raw[0] = 7
    assert blob.data[0] == 7


def test_scalar_takes_one_item() -> None:
    assert expected_nbytes("float64", ()) == 8


def test_item_sizes_match_torch() -> None:
    torch = pytest.importorskip("torch")
    for name, size in ITEMSIZE.items():
        assert getattr(torch, name).itemsize == size, name


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "match"),
    [
        ("float128", (1,), 16, "dtype"),
        ("complex64", (1,), 8, "dtype"),
        (b"float32", (1,), 4, "dtype"),
        (None, (1,), 4, "dtype"),
        ("float32", "4", 16, "shape"),
        ("float32", None, 16, "shape"),
        ("float32", {"0": 4}, 16, "shape"),
        ("float32", (1,) * (MAX_DIMS + 1), 4, "shape"),
        ("float32", (-1,), 0, "shape"),
        ("float32", (2.0,), 8, "shape"),
        ("float32", (True,), 4, "shape"),
        ("float32", ("2",), 8, "shape"),
        ("float32", ((1 << 40) + 1,), 4 * ((1 << 40) + 1), "shape"),
        ("float32", (4,), 15, "needs 16 bytes, got 15"),
        ("float32", (4,), 17, "needs 16 bytes"),
        ("int8", (0,), 1, "needs 0 bytes"),
    ],
)
def test_invalid_description_is_rejected(dtype: Any, shape: Any, nbytes: int, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        validate_header(dtype, shape, nbytes)


def test_mismatched_blob_cannot_be_built() -> None:
    with pytest.raises(RemoteProtocolError):
        TensorBlob(dtype="float32", shape=(2, 2), data=bytes(15))


def test_shape_list_is_normalised_to_tuple() -> None:
    assert validate_header("int64", [2, 2], 32) == ("int64", (2, 2))


def _header(*fields: Any) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


@pytest.mark.parametrize(
    "buf",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(_header("w", "float32", [1]), id="three-fields"),
        pytest.param(_header("w", "float32", [1], 4, "extra"), id="meta-is-str"),
        pytest.param(_header("w", "float32", [1], 4, 7), id="meta-is-int"),
        pytest.param(_header("w", "float32", [1], 4, None), id="meta-is-nil"),
        pytest.param(_header("w", "float32", [1], 4, [b"x"]), id="meta-is-list"),
        pytest.param(_header("w", "float32", [1], 4, b"m" * (MAX_META + 1)), id="meta-too-long"),
        pytest.param(_header("w", "float32", [1], 4, b"", b""), id="six-fields"),
        pytest.param(_header("w", "float32", [b"\x01"], 4, b""), id="bin-in-shape-with-meta"),
        pytest.param(msgpack.packb({"name": "w"}), id="map"),
        pytest.param(msgpack.packb("w"), id="string"),
        pytest.param(_header(1, "float32", [1], 4), id="name-not-str"),
        pytest.param(_header(b"w", "float32", [1], 4), id="name-is-bin"),
        pytest.param(_header("w" * (MAX_NAME + 1), "float32", [1], 4), id="name-too-long"),
        pytest.param(_header("w", "float32", [1], -4), id="negative-nbytes"),
        pytest.param(_header("w", "float32", [1], "4"), id="nbytes-not-int"),
        pytest.param(_header("w", "float32", [1], 4.0), id="nbytes-float"),
        pytest.param(_header("w", "float32", [1], True), id="nbytes-bool"),
        pytest.param(_header("w", "float32", [LIMIT], LIMIT * 4), id="over-limit"),
        pytest.param(_header("w", "qint8", [1], 1), id="bad-dtype"),
        pytest.param(_header("w", "float32", [2], 4), id="size-mismatch"),
        pytest.param(_header("w", "float32", [1] * 17, 4), id="too-many-dims"),
        pytest.param(_header("w", "float32", [1], 4)[:-1], id="truncated"),
        pytest.param(_header("w", "float32", [1], 4) + b"\x00", id="trailing-bytes"),
        pytest.param(b"\x94\xa1w\xa7float32\x91\xc4\x01\x00\x04", id="bin-in-shape"),
    ],
)
def test_invalid_header_is_rejected(buf: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        unpack_header(buf, LIMIT)


def test_header_at_the_byte_limit() -> None:
    blob = TensorBlob(dtype="uint8", shape=(64,), data=bytes(64))
    assert unpack_header(pack_header("x", blob), max_bytes=64)[3] == 64
    with pytest.raises(RemoteProtocolError, match="exceeds limit 63"):
        unpack_header(pack_header("x", blob), max_bytes=63)


def test_longest_name_is_accepted() -> None:
    blob = TensorBlob(dtype="uint8", shape=(1,), data=b"\x00")
    assert unpack_header(pack_header("n" * MAX_NAME, blob), LIMIT)[0] == "n" * MAX_NAME


@pytest.mark.parametrize("meta", [b"", b"\x00", bytes(range(256)), b"w" * MAX_META])
def test_meta_round_trips_in_the_header(meta: bytes) -> None:
    blob = TensorBlob(dtype="float32", shape=(2,), data=bytes(8), meta=meta)
    assert unpack_header(pack_header("agg/0", blob), LIMIT) == ("agg/0", "float32", (2,), 8, meta)


def test_header_without_meta_keeps_the_four_field_layout() -> None:
    # an older peer sends (and expects) four fields; an empty meta is left out so both ways still work
    blob = TensorBlob(dtype="uint8", shape=(1,), data=b"\x00")
    assert msgpack.unpackb(pack_header("x", blob)) == ["x", "uint8", [1], 1]
    assert unpack_header(_header("x", "uint8", [1], 1), LIMIT)[4] == b""


def test_longest_name_with_longest_meta_fits_the_bulk_header_limit() -> None:
    from mlfabric.runtime.bulk import MAX_HEADER

    # the largest valid header (built by hand: no data could back this shape)
    buf = _header("n" * MAX_NAME, "bfloat16", [1 << 40] * MAX_DIMS, 1 << 62, b"m" * MAX_META)
    assert len(buf) <= MAX_HEADER


@pytest.mark.parametrize(("meta", "match"), [(b"m" * (MAX_META + 1), "exceeds limit"), ("text", "must be bytes"),
                                             (bytearray(b"x"), "must be bytes"), (None, "must be bytes")])
def test_blob_with_bad_meta_cannot_be_built(meta: Any, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        TensorBlob(dtype="uint8", shape=(1,), data=b"\x00", meta=meta)
