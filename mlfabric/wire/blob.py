"""TensorBlob: a tensor as dtype name, shape and raw little-endian bytes. No torch here, no pickle.

``learn/tensors.py`` converts to and from torch; this module only validates the description so a
peer cannot make us allocate or reinterpret more than it sent.

A blob may carry ``meta``: at most :data:`MAX_META` opaque bytes that travel in the bulk header next
to the description (a partial aggregate's contributor bitmap and weight, say). The header is the
msgpack list ``[name, dtype, shape, nbytes, meta]``; the fifth element is left out when ``meta`` is
empty, so a peer that predates it still reads those headers, and a four-element header decodes with
``meta=b""``.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack

from mlfabric.errors import RemoteProtocolError

ITEMSIZE = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
MAX_DIMS = 8
MAX_NAME = 256
MAX_META = 60 << 10  # a job message header (spans, path, spec) fits; the bulk header adds at most ~1 KiB


@dataclass(frozen=True, slots=True)
class TensorBlob:
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    meta: bytes = b""

    def __post_init__(self) -> None:
        validate_header(self.dtype, self.shape, len(self.data))
        validate_meta(self.meta)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return ITEMSIZE[dtype] * math.prod(shape)


def validate_header(dtype: object, shape: object, nbytes: int) -> tuple[str, tuple[int, ...]]:
    if type(dtype) is not str or dtype not in ITEMSIZE:
        raise RemoteProtocolError(f"unsupported tensor dtype {dtype!r}")
    if type(shape) not in (list, tuple) or len(shape) > MAX_DIMS:
        raise RemoteProtocolError(f"tensor shape must be a list of at most {MAX_DIMS} dims")
    dims = tuple(shape)
    if any(type(d) is not int or d < 0 or d > (1 << 40) for d in dims):
        raise RemoteProtocolError(f"bad tensor shape {dims!r}")
    want = expected_nbytes(dtype, dims)
    if want != nbytes:
        raise RemoteProtocolError(f"tensor {dtype}{list(dims)} needs {want} bytes, got {nbytes}")
    return dtype, dims


def validate_meta(meta: object) -> bytes:
    if type(meta) is not bytes:
        raise RemoteProtocolError(f"tensor meta must be bytes, not {type(meta).__name__}")
    if len(meta) > MAX_META:
        raise RemoteProtocolError(f"tensor meta of {len(meta)} bytes exceeds limit {MAX_META}")
    return meta


def pack_header(name: str, blob: TensorBlob) -> bytes:
    """The small msgpack header sent before a blob's raw bytes on the bulk lane."""
    fields: list[object] = [name, blob.dtype, list(blob.shape), blob.nbytes]
    if blob.meta:
        fields.append(blob.meta)
    return msgpack.packb(fields, use_bin_type=True)


def unpack_header(buf: bytes, max_bytes: int) -> tuple[str, str, tuple[int, ...], int, bytes]:
    """Validate a bulk header: name, dtype, shape, byte count (bounded by ``max_bytes``), meta."""
    try:
        obj = msgpack.unpackb(buf, raw=False, max_bin_len=MAX_META, max_str_len=MAX_NAME, max_array_len=16)
    except Exception as exc:
        raise RemoteProtocolError(f"undecodable tensor header: {exc}") from None
    if type(obj) is not list or len(obj) not in (4, 5):
        raise RemoteProtocolError("tensor header must be [name, dtype, shape, nbytes] or [..., meta]")
    name, dtype, shape, nbytes = obj[:4]
    meta = validate_meta(obj[4]) if len(obj) == 5 else b""
    if type(name) is not str:
        raise RemoteProtocolError("tensor name must be a string")
    if type(nbytes) is not int or not 0 <= nbytes <= max_bytes:
        raise RemoteProtocolError(f"tensor of {nbytes!r} bytes exceeds limit {max_bytes}")
    dtype, dims = validate_header(dtype, shape, nbytes)
    return name, dtype, dims, nbytes, meta
