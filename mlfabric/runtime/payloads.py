"""Job payloads in the daemon: the strategy that combines them, and their bulk-lane blobs.

:class:`LazyFedAvg` is NodeCore's strategy: learn.strategy.FedAvg, imported with the first payload.
Each outbox item that carries a payload travels as one blob named ``job``.

The blob's meta is the wire-encoded header message (``wire.codec``: the same validation as every
control-lane message), its body the flat float32 tensor, as zero-copy views (learn/tensorio.py):

- ``JobPartial`` (up a round's tree): the body is the FedAvg partial's weighted sum; the header's
  ``weight`` carries the partial's weight;
- ``JobRound`` with ``with_model`` (down the tree): the body is the model of version ``round``.

An inbound blob is checked in full before torch is touched (so garbage never makes a node import
it): the header decodes, is one of those two, the tensor is flat float32, a partial belongs to a job
this node knows and has a positive weight, and the length matches the job's model where this node
knows it. Anything else raises :class:`~mlfabric.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mlfabric.core.aggregate import WithPayload
from mlfabric.errors import RemoteProtocolError
from mlfabric.wire.blob import TensorBlob
from mlfabric.wire.codec import decode, encode
from mlfabric.wire.messages import JobPartial, JobRound

__all__ = ["BLOB", "LazyFedAvg", "blob_of", "item_of"]

BLOB = "job"


class LazyFedAvg:
    """:class:`mlfabric.learn.strategy.FedAvg`, imported with the first payload it sees, so a node
    that never trains never imports torch. NodeCore's strategy in the daemon."""

    def __init__(self) -> None:
        self._impl: Any = None

    def _fedavg(self) -> Any:
        if self._impl is None:
            from mlfabric.learn.strategy import FedAvg

            self._impl = FedAvg()
        return self._impl

    def merge(self, into: Any, other: Any) -> Any:
        return self._fedavg().merge(into, other)

    def copy(self, payload: Any) -> Any:
        return self._fedavg().copy(payload)

    def nbytes(self, payload: Any) -> int:
        return int(self._fedavg().nbytes(payload))


def blob_of(item: WithPayload) -> tuple[TensorBlob, Any]:
    """The blob for an outbox item, and the tensor it views (keep it alive until the send is done)."""
    from mlfabric.learn.tensorio import blob_from_tensor

    msg, payload = item.msg, item.payload
    if isinstance(msg, JobPartial):
        msg, tensor = dataclasses.replace(msg, weight=payload.weight), payload.weighted_sum
    else:
        tensor = payload
    return blob_from_tensor(tensor, encode(msg)), tensor


def item_of(blob: TensorBlob, knows: Callable[[str], bool], numel: Callable[[str], int | None]) -> WithPayload:
    """The core's input for a received blob. ``knows(job)``: this node takes part in ``job``;
    ``numel(job)``: the length of its model here (None: not known yet)."""
    msg = decode(bytes(blob.meta))
    if not (isinstance(msg, JobPartial) or (isinstance(msg, JobRound) and msg.with_model)):
        raise RemoteProtocolError(f"a job blob carries {type(msg).__name__}, not a JobPartial or a JobRound "
                                  "with its model")
    if blob.dtype != "float32" or len(blob.shape) != 1:
        raise RemoteProtocolError(f"a job blob is a flat float32 tensor, not {blob.dtype}{list(blob.shape)}")
    if isinstance(msg, JobPartial):
        if not knows(msg.job):
            raise RemoteProtocolError(f"a partial of job {msg.job!r}, which this node does not take part in")
        if msg.weight < 1 or msg.count < 1:
            raise RemoteProtocolError(f"a partial with a payload has weight {msg.weight}, count {msg.count}")
    want = numel(msg.job)
    if want is not None and blob.shape[0] != want:
        raise RemoteProtocolError(f"a model of {blob.shape[0]} values for job {msg.job!r}, whose model has {want}")
    from mlfabric.learn.tensorio import tensor_from_blob  # torch only now: the header is valid

    tensor = tensor_from_blob(blob)
    if isinstance(msg, JobPartial):
        from mlfabric.learn.strategy import Partial

        return WithPayload(msg, Partial(tensor, msg.weight), blob.nbytes)
    return WithPayload(msg, tensor, blob.nbytes)
