"""TensorBlob: a tensor as dtype name, shape and raw little-endian bytes. No torch here, no pickle.

``learn/tensors.py`` converts to and from torch; this module only validates the description so a
peer cannot make us allocate or reinterpret more than it sent.
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


@dataclass(frozen=True, slots=True)
class TensorBlob:
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        validate_header(self.dtype, self.shape, len(self.data))

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


def pack_header(name: str, blob: TensorBlob) -> bytes:
    """The small msgpack header sent before a blob's raw bytes on the bulk lane."""
    return msgpack.packb([name, blob.dtype, list(blob.shape), blob.nbytes], use_bin_type=True)


def unpack_header(buf: bytes, max_bytes: int) -> tuple[str, str, tuple[int, ...], int]:
    """Validate a bulk header: name, dtype, shape, byte count (bounded by ``max_bytes``)."""
    try:
        obj = msgpack.unpackb(buf, raw=False, max_bin_len=0, max_str_len=MAX_NAME, max_array_len=16)
    except Exception as exc:
        raise RemoteProtocolError(f"undecodable tensor header: {exc}") from None
    if type(obj) is not list or len(obj) != 4:
        raise RemoteProtocolError("tensor header must be [name, dtype, shape, nbytes]")
    name, dtype, shape, nbytes = obj
    if type(name) is not str:
        raise RemoteProtocolError("tensor name must be a string")
    if type(nbytes) is not int or not 0 <= nbytes <= max_bytes:
        raise RemoteProtocolError(f"tensor of {nbytes!r} bytes exceeds limit {max_bytes}")
    dtype, dims = validate_header(dtype, shape, nbytes)
    return name, dtype, dims, nbytes
