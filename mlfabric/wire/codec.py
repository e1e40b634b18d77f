"""msgpack codec: ``[version, type_id, [fields...]]``. Never pickles; every field is validated.

Decoding is bounded (msgpack's own size limits are set from the frame limit) and any malformed
input raises :class:`RemoteProtocolError`, never anything else.
Must not import asyncio, socket, time, threading or torch.
"""

from __future__ import annotations

import msgpack

from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.messages import PROTOCOL_VERSION, Message, message_class

MAX_MESSAGE = 1 << 20  # control-lane messages; tensors travel on the bulk lane


def encode(msg: Message) -> bytes:
    body = [kind.dump(getattr(msg, name)) for name, kind in msg.KINDS]
    return msgpack.packb([PROTOCOL_VERSION, msg.TYPE_ID, body], use_bin_type=True)


def decode(buf: bytes, max_len: int = MAX_MESSAGE) -> Message:
    if len(buf) > max_len:
        raise RemoteProtocolError(f"message of {len(buf)} bytes exceeds limit {max_len}")
    try:
        obj = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=65536,
            max_map_len=1024,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, FormatError...)
        raise RemoteProtocolError(f"undecodable msgpack: {type(exc).__name__}: {exc}") from None
    if type(obj) is not list or len(obj) != 3:
        raise RemoteProtocolError("message must be [version, type_id, fields]")
    version, type_id, body = obj
    if type(version) is not int or version < 1:
        raise RemoteProtocolError(f"bad protocol version {version!r}")
    if type(type_id) is not int:
        raise RemoteProtocolError(f"bad message type id {type_id!r}")
    cls = message_class(type_id)
    if type(body) is not list:
        raise RemoteProtocolError(f"{cls.__name__}: fields must be a list")
    kinds = cls.KINDS
    if len(body) < cls.REQUIRED:
        raise RemoteProtocolError(f"{cls.__name__}: {len(body)} fields, needs {cls.REQUIRED}")
    values = {}
    for (name, kind), raw in zip(kinds, body, strict=False):  # extra trailing fields from newer peers are ignored
        try:
            values[name] = kind.load(raw)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{cls.__name__}.{name}: {exc}") from None
    return cls(**values)
