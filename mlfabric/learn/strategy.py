"""FedAvg on one shard: weighted sums with sample counts (McMahan et al. 2017, Algorithm 1).

The skip-mesh aggregation (DESIGN.md, "Skip-mesh aggregation") merges partial aggregates on the way
up the tree: each node adds its own contribution to its children's partials and passes one partial
to its parent, and the shard's root divides once at the end. FedAvg is associative in that form:

    contribution(x_i, n_i) = (n_i * x_i, n_i)
    merge((s, w), (s', w')) = (s + s', w + w')
    finalize((s, w)) = s / w = sum_i n_i x_i / sum_i n_i

so the order and grouping of merges do not change the result (up to float32 rounding).
:class:`FedAvg` is that arithmetic as the job machine's payload strategy
(:class:`mlfabric.core.aggregate.Strategy`): partials up the tree, flat model tensors down it.

The strategy is pure arithmetic on flat 1-D float32 CPU tensors (one shard, see ``shards.py``):
no I/O, no clock. Which contributors a partial holds, and never counting one twice, is the
aggregation machine's job, not this module's. Imports torch; only ``learn/`` may.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FedAvg", "Partial", "contribution", "finalize", "merge"]


@dataclass(slots=True)
class Partial:
    """A partial FedAvg aggregate of one shard: sum of n_i * x_i, and sum of n_i."""

    weighted_sum: torch.Tensor
    weight: int

    @property
    def numel(self) -> int:
        return self.weighted_sum.numel()


def _check_flat(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.float32 or t.dim() != 1 or t.device.type != "cpu":
        raise ValueError(f"{what} must be a 1-D float32 CPU tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")


def contribution(flat: torch.Tensor, n_samples: int) -> Partial:
    """One node's update as a partial: a new tensor flat * n_samples (``flat`` is not modified)."""
    _check_flat(flat, "flat")
    if type(n_samples) is not int or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    return Partial(weighted_sum=flat * float(n_samples), weight=n_samples)


def merge(into: Partial, other: Partial) -> Partial:
    """Add ``other`` into ``into`` in place (no new tensor) and return ``into``."""
    if into.weighted_sum.shape != other.weighted_sum.shape:
        raise ValueError(f"cannot merge partials of {into.numel} and {other.numel} elements")
    _check_flat(into.weighted_sum, "into.weighted_sum")
    _check_flat(other.weighted_sum, "other.weighted_sum")
    if into.weighted_sum is other.weighted_sum:
        raise ValueError("cannot merge a partial with itself")
    into.weighted_sum.add_(other.weighted_sum)
    into.weight += other.weight
    return into


def finalize(p: Partial) -> torch.Tensor:
    """The weighted mean sum / weight, as a new 1-D float32 tensor."""
    _check_flat(p.weighted_sum, "weighted_sum")
    if p.weight <= 0:
        raise ValueError(f"cannot finalize a partial of weight {p.weight}")
    return p.weighted_sum / float(p.weight)


@dataclass(frozen=True, slots=True)
class FedAvg:
    """FedAvg as the job machine's strategy (``core.aggregate.Strategy[Partial]``). ``nbytes`` also
    sizes the flat model tensors that travel down a round's tree with its notice."""

    def merge(self, into: Partial, other: Partial) -> Partial:
        return merge(into, other)

    def copy(self, payload: Partial) -> Partial:
        return Partial(payload.weighted_sum.clone(), payload.weight)

    def nbytes(self, payload: Partial | torch.Tensor) -> int:
        t = payload.weighted_sum if isinstance(payload, Partial) else payload
        return t.numel() * t.element_size()
