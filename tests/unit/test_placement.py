"""Shard placement and the skip mesh: pure functions, checked against brute force."""

from __future__ import annotations

import random

import pytest

from mlfabric.core.placement import Mesh, height_of, mesh_order, owners, shard_key
from mlfabric.core.ring import MASK, successor_of


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted({rng.getrandbits(64) for _ in range(n)})


def test_shard_key_is_stable_and_spread() -> None:
    assert shard_key("m", 0) == shard_key("m", 0)
    keys = {shard_key("m", i) for i in range(1000)}
    assert len(keys) == 1000
    assert shard_key("m", 1) != shard_key("n", 1)


@pytest.mark.parametrize("seed", range(5))
def test_owner_is_the_ring_successor_and_replicas_follow(seed: int) -> None:
    ids = _ids(50, seed)
    rng = random.Random(seed)
    for _ in range(100):
        key = rng.getrandbits(64)
        own = owners(key, ids, 3)
        assert own[0] == successor_of(key, ids)
        i = ids.index(own[0])
        assert list(own) == [ids[(i + j) % len(ids)] for j in range(3)]
        order = mesh_order(key, ids)
        assert [(m - key) & MASK for m in order] == sorted((m - key) & MASK for m in ids)


def test_owner_moves_to_the_next_successor_when_it_leaves() -> None:
    ids = _ids(20, 3)
    key = shard_key("model", 7)
    first, second = owners(key, ids, 2)
    rest = [m for m in ids if m != first]
    assert owners(key, rest, 1) == (second,)


def test_heights_are_geometric() -> None:
    hs = [height_of(i, 42, 64) for i in range(20000)]
    for level in range(1, 5):
        frac = sum(h >= level for h in hs) / len(hs)
        assert abs(frac - 2 ** -level) < 0.02, (level, frac)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 100, 1000])
def test_mesh_links_point_towards_the_root(k: int, n: int) -> None:
    ids = _ids(n, n + k)
    mesh = Mesh.build(shard_key("m", 0), ids, k=k, replicas=2, salt=9)
    assert mesh.order[0] == successor_of(mesh.key, ids)
    assert mesh.parents[0] == ()
    for p in range(1, len(mesh)):
        ups = mesh.parents[p]
        assert 1 <= len(ups) <= k
        assert len(set(ups)) == len(ups)
        assert all(q < p for q in ups), "a parent is always closer to the root"
        higher = [q for q in range(p) if mesh.heights[q] > mesh.heights[p]]
        assert ups[0] == max(higher), "the primary is the nearest preceding member above p's height"
        assert len(ups) == min(k, p), "every member gets k parents when k members precede it"
        assert p in mesh.children[ups[0]]
        assert all(p in mesh.linked[q] for q in ups)
    if n >= 100:
        assert mesh.depth() <= 3 * n.bit_length()  # balanced: logarithmic depth, not a chain


def test_mesh_is_deterministic_and_salt_moves_the_aggregators() -> None:
    ids = _ids(300, 1)
    a = Mesh.build(5, ids, k=2, salt=1)
    b = Mesh.build(5, list(reversed(ids)), k=2, salt=1)
    c = Mesh.build(5, ids, k=2, salt=2)
    assert a.parents == b.parents and a.order == b.order
    assert set(a.aggregators()) != set(c.aggregators())


def test_mesh_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Mesh.build(0, [], k=2)
    with pytest.raises(ValueError):
        Mesh.build(0, [1, 2], k=0)
