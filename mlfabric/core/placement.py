"""Where a model shard lives on the ring, and the skip mesh that aggregates it. Pure functions, sans-IO.

Placement (DESIGN.md, "Placement of model shards"): shard ``s`` of model ``M`` has ring key
``shard_key(M, s)``; its owner is ``successor(key)`` and the next ``r - 1`` successors hold replicas.
Every node that knows the same member list computes the same owners, so ownership moves by itself
when members join, leave or die, and a shard is never lost while one of its ``r`` holders lives.

The skip mesh (DESIGN.md, "Skip-mesh aggregation"; Suzuki & Mizutani 2021): members are ordered by
clockwise ring distance from the shard's key, so the owner is position 0 (the root) and its replicas
follow at positions ``1 .. r-1``. Every member gets a height from a hash, with P(h >= l) = 2^-l, as
in a skip list; the root and the replicas get the top height. A member of height ``h`` links to the
``k`` nearest members *before it* (closer to the root) whose height is above ``h``: the first is its
primary parent, the others are where it fails over. Only the root gets the top height (giving it to
the replicas too would make the first replica the parent of everything below it). When the root
dies, its first live replica acts as root: partials that find no live parent go there. Near the
root, where fewer than ``k`` members before ``p`` stand higher, the missing parents are the nearest
members before ``p`` (still closer to the root, so the links never form a cycle).

With k = 1 this is a plain balanced tree (every level halves the population), the baseline that
loses a whole subtree with one aggregator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mlfabric.core.ring import MASK

__all__ = ["Mesh", "shard_key", "owners", "mesh_order", "height_of"]


def shard_key(model_id: str, index: int) -> int:
    """The 64-bit ring key of shard ``index`` of ``model_id`` (BLAKE2b, stable across runs and hosts)."""
    digest = hashlib.blake2b(f"{model_id}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def mesh_order(key: int, members: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Members sorted by clockwise distance from ``key``: the owner (successor of key) first."""
    return tuple(sorted(set(members), key=lambda m: (m - key) & MASK))


def owners(key: int, members: list[int] | tuple[int, ...], replicas: int) -> tuple[int, ...]:
    """The owner of ``key`` and its ``replicas - 1`` replica holders, in order."""
    return mesh_order(key, members)[: max(1, replicas)]


def height_of(node: int, salt: int, top: int) -> int:
    """A node's skip-list height for one mesh: leading one-bits of a hash, so P(h >= l) = 2^-l.

    ``salt`` changes the heights from one mesh to the next (per shard and round), which spreads the
    aggregation work: no node is a high aggregator in every tree.
    """
    digest = hashlib.blake2b(node.to_bytes(8, "big") + salt.to_bytes(8, "big"), digest_size=8).digest()
    value = int.from_bytes(digest, "big")
    ones = 64 - (value ^ MASK).bit_length()  # count of leading one-bits
    return min(ones, top - 1)


@dataclass(frozen=True)
class Mesh:
    """The skip mesh of one shard over one member list. Every member computes the same one.

    Positions index ``order``; ``parents[p]`` are the positions of p's parents, primary first;
    ``children[p]`` the positions whose *primary* parent is p.
    """

    key: int
    order: tuple[int, ...]
    k: int
    replicas: int
    salt: int
    heights: tuple[int, ...] = field(repr=False)
    parents: tuple[tuple[int, ...], ...] = field(repr=False)
    children: tuple[tuple[int, ...], ...] = field(repr=False)
    linked: tuple[tuple[int, ...], ...] = field(repr=False)  # positions that have p among their parents
    index: dict[int, int] = field(repr=False)

    @classmethod
    def build(cls, key: int, members: list[int] | tuple[int, ...], *, k: int = 2, replicas: int = 2,
              salt: int = 0) -> Mesh:
        if k < 1:
            raise ValueError("a mesh needs at least one parent per node")
        order = mesh_order(key, members)
        if not order:
            raise ValueError("a mesh needs at least one member")
        n = len(order)
        replicas = max(1, min(replicas, n))
        top = max(2, n.bit_length() + 1)
        heights = [top if p == 0 else height_of(node, salt, top) for p, node in enumerate(order)]
        # recent[l]: the last k positions seen with height >= l, most recent last.
        recent: list[list[int]] = [[] for _ in range(top + 1)]
        parents: list[tuple[int, ...]] = []
        children: list[list[int]] = [[] for _ in range(n)]
        linked: list[list[int]] = [[] for _ in range(n)]
        for p in range(n):
            h = heights[p]
            level = min(h + 1, top)
            ups = list(reversed(recent[level]))
            if len(ups) < k:  # near the root few members stand higher: fill with the nearest before p
                ups += [q for q in reversed(recent[0]) if q not in ups][: k - len(ups)]
            ups = tuple(ups)
            parents.append(ups)
            if ups:
                children[ups[0]].append(p)
            for q in ups:
                linked[q].append(p)
            for lv in range(h + 1):
                bucket = recent[lv]
                bucket.append(p)
                if len(bucket) > k:
                    del bucket[0]
        return cls(key=key, order=order, k=k, replicas=replicas, salt=salt, heights=tuple(heights),
                   parents=tuple(parents), children=tuple(tuple(c) for c in children),
                   linked=tuple(tuple(c) for c in linked),
                   index={node: p for p, node in enumerate(order)})

    def __len__(self) -> int:
        return len(self.order)

    def depth(self) -> int:
        """Longest primary-parent chain from any member to the root (hops)."""
        depth = [0] * len(self.order)
        for p in range(1, len(self.order)):
            depth[p] = depth[self.parents[p][0]] + 1
        return max(depth)

    def aggregators(self) -> list[int]:
        """Node ids that have at least one primary child (the inner nodes of the tree)."""
        return [self.order[p] for p, c in enumerate(self.children) if c]
