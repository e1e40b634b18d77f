"""Cut a model's state_dict into shards of bounded size, and name each shard on the ring.

DESIGN.md, "Placement of model shards": shard s of model M has ring key h(M, s); its owner is
successor(key) and is the aggregation root for that shard. Every node must cut the model the same
way without talking to anyone, so the plan is a pure function of the tensors' names and shapes
(never of their values, their device, or dict order): names are taken in sorted order and packed
greedily into shards of at most ``max_bytes`` of float32. A tensor that fits in a shard is never
split; a tensor bigger than a shard is cut by element ranges across several shards.

What is aggregated: floating-point entries only. Integer and bool buffers (BatchNorm's
``num_batches_tracked``, masks, step counters) are left out of the plan on purpose: averaging a
counter is meaningless, and each node keeps its own. ``unsharded_keys`` lists them.

Shards travel as 1-D float32 CPU tensors (``flatten_shard``); ``apply_shard`` casts back to each
entry's own dtype and device. Imports torch; only ``learn/`` may.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Segment",
    "ShardSpec",
    "apply_shard",
    "flatten_shard",
    "plan_fingerprint",
    "plan_shards",
    "shard_key",
    "unsharded_keys",
]

DEFAULT_MAX_BYTES = 1 << 20
_ITEM = 4  # shards are float32


@dataclass(frozen=True, slots=True)
class Segment:
    """Elements [start, stop) of the flattened state_dict entry ``name``."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Shard ``index`` of a plan: its segments, laid end to end in the flat tensor."""

    index: int
    segments: tuple[Segment, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEM


def _is_sharded(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def unsharded_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The entries that ``plan_shards`` leaves out (non-float buffers), sorted."""
    return sorted(k for k, t in state_dict.items() if not _is_sharded(t))


def plan_shards(state_dict: Mapping[str, torch.Tensor], max_bytes: int = DEFAULT_MAX_BYTES) -> list[ShardSpec]:
    """Pack the float entries of ``state_dict`` into shards of at most ``max_bytes`` (as float32).

    Deterministic from names and shapes only. Empty tensors are skipped (nothing to average).
    """
    if type(max_bytes) is not int or max_bytes < _ITEM:
        raise ValueError(f"max_bytes must be an int >= {_ITEM}, got {max_bytes!r}")
    cap = max_bytes // _ITEM
    shards: list[ShardSpec] = []
    current: list[Segment] = []
    used = 0

    def close() -> None:
        nonlocal current, used
        if current:
            shards.append(ShardSpec(index=len(shards), segments=tuple(current)))
        current, used = [], 0

    for name in sorted(state_dict):
        t = state_dict[name]
        if not _is_sharded(t):
            continue
        n = math.prod(t.shape)
        if n == 0:
            continue
        if n <= cap:  # fits in one shard: never split it
            if used + n > cap:
                close()
            current.append(Segment(name, 0, n))
            used += n
            continue
        start = 0  # bigger than a shard: fill what is left of the open shard, then whole shards
        while start < n:
            if used == cap:
                close()
            take = min(cap - used, n - start)
            current.append(Segment(name, start, start + take))
            used += take
            start += take
    close()
    return shards


def plan_fingerprint(specs: list[ShardSpec]) -> str:
    """A short stable digest of a plan, so nodes can check they cut the model the same way."""
    canon = [[s.index, [[g.name, g.start, g.stop] for g in s.segments]] for s in specs]
    return hashlib.blake2b(json.dumps(canon, separators=(",", ":")).encode(), digest_size=16).hexdigest()


def _entries(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    # Module.state_dict() returns detached tensors that share storage with the parameters and
    # buffers, so writing into them writes into the model.
    return target.state_dict() if isinstance(target, torch.nn.Module) else target


def _flat_view(entries: Mapping[str, torch.Tensor], seg: Segment) -> torch.Tensor:
    try:
        t = entries[seg.name]
    except KeyError:
        raise ValueError(f"state_dict has no entry {seg.name!r}") from None
    if not _is_sharded(t):
        raise ValueError(f"entry {seg.name!r} is {t.dtype}, not a float tensor")
    if not 0 <= seg.start < seg.stop <= t.numel():
        raise ValueError(f"segment [{seg.start}, {seg.stop}) is out of range for {seg.name!r} of {t.numel()} elements")
    if not t.is_contiguous():
        raise ValueError(f"entry {seg.name!r} is not contiguous")
    return t.view(-1)[seg.start : seg.stop]


def flatten_shard(state_dict: torch.nn.Module | Mapping[str, torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The shard's values as a new contiguous 1-D float32 CPU tensor (a copy, never a view)."""
    entries = _entries(state_dict)
    out = torch.empty(spec.numel, dtype=torch.float32)
    offset = 0
    with torch.no_grad():
        for seg in spec.segments:
            out[offset : offset + seg.numel].copy_(_flat_view(entries, seg))
            offset += seg.numel
    return out


def apply_shard(target: torch.nn.Module | Mapping[str, torch.Tensor], spec: ShardSpec, flat: torch.Tensor) -> None:
    """Write ``flat`` back into the entries it came from, in place (cast to each entry's dtype/device)."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"shard {spec.index} has {spec.numel} elements, got a tensor of shape {tuple(flat.shape)}")
    entries = _entries(target)
    views = [_flat_view(entries, seg) for seg in spec.segments]  # validate all before writing any
    offset = 0
    with torch.no_grad():
        for seg, view in zip(spec.segments, views, strict=True):
            view.copy_(flat[offset : offset + seg.numel])
            offset += seg.numel


def shard_key(model_id: str, index: int) -> int:
    """The 64-bit ring key of shard ``index`` of model ``model_id`` (blake2b, stable across runs)."""
    if type(index) is not int or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    data = model_id.encode() + b"\x00" + str(index).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"mlfabric.shard").digest(), "big")
