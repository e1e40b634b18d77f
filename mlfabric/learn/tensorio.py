"""Tensors <-> bulk-lane blobs without copies: a memoryview over a tensor's memory, a tensor over a buffer.

No numpy needed: the view is made with ctypes over the tensor's storage, so the tensor must stay
alive (and unchanged) until the send completes — the caller keeps a reference.
"""

from __future__ import annotations

import ctypes

import torch

from mlfabric.wire.blob import TensorBlob

__all__ = ["tensor_bytes", "blob_from_tensor", "tensor_from_blob"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
           torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}
_TORCH = {v: k for k, v in _DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous CPU tensor's elements (no copy)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buf = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    return memoryview(buf).cast("B").toreadonly()


def blob_from_tensor(t: torch.Tensor, meta: bytes = b"") -> TensorBlob:
    if t.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {t.dtype}")
    t = t.contiguous()
    return TensorBlob(_DTYPES[t.dtype], tuple(t.shape), tensor_bytes(t), meta)


def tensor_from_blob(blob: TensorBlob) -> torch.Tensor:
    """A tensor over the blob's (writable, received) buffer: no copy."""
    dtype = _TORCH.get(blob.dtype)
    if dtype is None:
        raise ValueError(f"unsupported dtype {blob.dtype}")
    data = blob.data
    if len(data) == 0:
        return torch.empty(blob.shape, dtype=dtype)
    if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
        data = bytearray(data)  # frombuffer wants writable memory
    return torch.frombuffer(data, dtype=dtype).reshape(blob.shape)
