"""Checkpoints: named tensors plus a small JSON metadata dict, written atomically, never pickled.

A node that restarts must find either the old checkpoint or the new one, whole, never a torn mix,
and a corrupt file must be refused with a clear error rather than half-loaded. ``torch.save`` is
pickle (running code from a file), so the format is our own, in the spirit of safetensors:

    magic        8 bytes   b"MLFCKPT1"
    header_len   u64 little-endian, the JSON header's length in bytes (padded with spaces to 8)
    header       UTF-8 JSON: {"meta": {...}, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...],
                 "blake2b": hex digest (16 bytes) of the whole data section}
    data         raw little-endian tensor bytes; offsets relative to the data start, 8-aligned

The reader checks the magic, the header size, every field's type, the dtype against a whitelist,
nbytes == prod(shape) * itemsize, that the ranges lie in the file, are aligned and do not overlap,
that the file ends where the last tensor does (truncated or padded files are refused), and the
data's blake2b digest (so flipped bits in the tensors are caught, not loaded as weights).

Writing: a temp file in the same directory, write, flush, fsync, rename over the target, fsync the
directory (POSIX rename is atomic; the directory fsync makes the rename durable). If anything fails
before the rename, the temp file is removed and the old checkpoint is untouched.
Imports torch; only ``learn/`` may.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlfabric.errors import MlfabricError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

MAGIC = b"MLFCKPT1"
_PREFIX = len(MAGIC) + 8
_ALIGN = 8
_DIGEST = 16
MAX_HEADER_BYTES = 64 << 20
MAX_DIMS = 8

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("mlfabric.learn.checkpoint assumes a little-endian host")


class CheckpointError(MlfabricError):
    """A checkpoint file is missing, truncated, corrupt or not ours."""


def _pad(n: int) -> int:
    return -n % _ALIGN


def _tensor_bytes(t: torch.Tensor) -> bytearray:
    buf = bytearray(t.numel() * t.element_size())
    if buf:
        torch.frombuffer(buf, dtype=torch.uint8).copy_(t.reshape(-1).view(torch.uint8))
    return buf


def save_checkpoint(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (the old file stays whole on failure)."""
    path = Path(path)
    entries: list[dict[str, Any]] = []
    prepared: list[torch.Tensor] = []
    offset = 0
    for name, t in tensors.items():
        if type(name) is not str or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor) or t.dtype not in _NAMES:
            raise ValueError(f"{name!r}: unsupported tensor or dtype {getattr(t, 'dtype', type(t))}")
        if t.dim() > MAX_DIMS:
            raise ValueError(f"{name!r}: more than {MAX_DIMS} dims")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        entries.append(
            {"name": name, "dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": nbytes}
        )
        prepared.append(t)
        offset += nbytes + _pad(nbytes)

    def header_bytes(digest: str) -> bytes:
        head = {"meta": dict(meta), "tensors": entries, "blake2b": digest}
        raw = json.dumps(head, allow_nan=False, separators=(",", ":")).encode()
        return raw + b" " * _pad(len(raw))

    try:
        placeholder = header_bytes("0" * 2 * _DIGEST)  # same length as the real digest
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata is not JSON-able: {exc}") from exc

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(placeholder)) + placeholder)
            digest = hashlib.blake2b(digest_size=_DIGEST)
            for entry, t in zip(entries, prepared, strict=True):
                for chunk in (_tensor_bytes(t), b"\x00" * _pad(entry["nbytes"])):
                    digest.update(chunk)
                    f.write(chunk)
            f.seek(_PREFIX)
            f.write(header_bytes(digest.hexdigest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: ``(tensors, meta)``. Raises CheckpointError on any defect."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = bytearray(f.read())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from exc
    if len(buf) < _PREFIX or bytes(buf[: len(MAGIC)]) != MAGIC:
        raise CheckpointError(f"{path}: not an mlfabric checkpoint (bad magic or too short)")
    (header_len,) = struct.unpack_from("<Q", buf, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or _PREFIX + header_len > len(buf):
        raise CheckpointError(f"{path}: header length {header_len} is out of range (file has {len(buf)} bytes)")
    try:
        header = json.loads(bytes(buf[_PREFIX : _PREFIX + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt header: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"meta", "tensors", "blake2b"}:
        raise CheckpointError(f"{path}: header must be an object with exactly 'meta', 'tensors' and 'blake2b'")
    meta, specs, digest = header["meta"], header["tensors"], header["blake2b"]
    if not isinstance(meta, dict) or not isinstance(specs, list) or not isinstance(digest, str):
        raise CheckpointError(f"{path}: 'meta' must be an object, 'tensors' a list and 'blake2b' a string")

    data_start = _PREFIX + header_len
    data_len = len(buf) - data_start
    tensors: dict[str, torch.Tensor] = {}
    expected_offset = 0
    for i, spec in enumerate(specs):
        name, dtype, shape, offset, nbytes = _check_entry(path, i, spec)
        if name in tensors:
            raise CheckpointError(f"{path}: duplicate tensor name {name!r}")
        if offset != expected_offset:
            raise CheckpointError(f"{path}: tensor {name!r} at offset {offset}, expected {expected_offset}")
        if offset + nbytes > data_len:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = _read_tensor(path, buf, data_start + offset, name, dtype, shape, nbytes)
        expected_offset = offset + nbytes + _pad(nbytes)
    if data_len != expected_offset:
        raise CheckpointError(
            f"{path}: {data_len} data bytes, expected {expected_offset} (truncated or trailing bytes)"
        )
    if hashlib.blake2b(memoryview(buf)[data_start:], digest_size=_DIGEST).hexdigest() != digest:
        raise CheckpointError(f"{path}: data checksum mismatch (the tensor bytes are corrupt)")
    return tensors, meta


def _check_entry(path: Path, i: int, spec: object) -> tuple[str, str, tuple[int, ...], int, int]:
    keys = {"name", "dtype", "shape", "offset", "nbytes"}
    if not isinstance(spec, dict) or set(spec) != keys:
        raise CheckpointError(f"{path}: tensor entry {i} must have exactly {sorted(keys)}")
    name, dtype, shape, offset, nbytes = (spec[k] for k in ("name", "dtype", "shape", "offset", "nbytes"))
    if type(name) is not str or not name:
        raise CheckpointError(f"{path}: tensor entry {i} has a bad name {name!r}")
    if type(dtype) is not str or dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_DIMS or any(type(d) is not int or d < 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if type(offset) is not int or offset < 0 or offset % _ALIGN:
        raise CheckpointError(f"{path}: tensor {name!r} has a bad offset {offset!r}")
    itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    if type(nbytes) is not int or nbytes != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} cannot have {nbytes!r} bytes"
        )
    return name, dtype, tuple(shape), offset, nbytes


def _read_tensor(
    path: Path, buf: bytearray, start: int, name: str, dtype: str, shape: tuple[int, ...], nbytes: int
) -> torch.Tensor:
    torch_dtype = _DTYPES[dtype]
    if nbytes == 0:
        return torch.empty(shape, dtype=torch_dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start).clone()  # own, aligned memory
    if torch_dtype == torch.bool and bool((raw > 1).any()):
        raise CheckpointError(f"{path}: bool tensor {name!r} holds bytes other than 0 and 1")
    return raw.view(torch_dtype).reshape(shape)
