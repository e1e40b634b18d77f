"""learn/strategy.py: FedAvg as contribution / merge / finalize equals the hand-computed weighted mean."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from mlfabric.learn.strategy import Partial, contribution, finalize, merge  # noqa: E402


def test_fedavg_of_known_tensors_is_the_weighted_mean() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, -4.0])
    b = torch.tensor([3.0, 0.0, -1.0, 4.0])
    c = torch.tensor([0.5, 0.5, 0.5, 0.5])
    p = contribution(a, 1)
    merge(p, contribution(b, 3))
    merge(p, contribution(c, 4))
    # (1*a + 3*b + 4*c) / 8, by hand; every value is exact in float32
    expected = torch.tensor([(1 + 9 + 2) / 8, (2 + 0 + 2) / 8, (3 - 3 + 2) / 8, (-4 + 12 + 2) / 8])
    assert p.weight == 8
    assert torch.equal(finalize(p), expected)


def test_contribution_does_not_touch_its_input_and_merge_is_in_place() -> None:
    flat = torch.tensor([1.0, 2.0])
    p = contribution(flat, 5)
    assert torch.equal(flat, torch.tensor([1.0, 2.0]))
    assert torch.equal(p.weighted_sum, torch.tensor([5.0, 10.0]))
    buf = p.weighted_sum
    ptr = buf.data_ptr()
    out = merge(p, contribution(torch.tensor([1.0, 1.0]), 1))
    assert out is p and p.weighted_sum is buf and buf.data_ptr() == ptr
    assert torch.equal(buf, torch.tensor([6.0, 11.0]))


def test_merge_order_and_grouping_do_not_matter(rng: random.Random) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    updates = [(torch.randn(1000, generator=gen), rng.randint(1, 500)) for _ in range(12)]

    def tree(order: list[int], fanin: int) -> torch.Tensor:
        parts = [contribution(updates[i][0], updates[i][1]) for i in order]
        while len(parts) > 1:
            nxt = []
            for j in range(0, len(parts), fanin):
                head = parts[j]
                for other in parts[j + 1 : j + fanin]:
                    merge(head, other)
                nxt.append(head)
            parts = nxt
        return finalize(parts[0])

    ref = torch.stack([x.double() * n for x, n in updates]).sum(0) / sum(n for _, n in updates)
    order = list(range(12))
    for fanin in (2, 3, 12):
        rng.shuffle(order)
        assert torch.allclose(tree(order, fanin).double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_sample_counts_are_refused(n: object) -> None:
    with pytest.raises(ValueError):
        contribution(torch.zeros(3), n)  # type: ignore[arg-type]


def test_shape_dtype_and_weight_errors() -> None:
    with pytest.raises(ValueError):
        contribution(torch.zeros(3, dtype=torch.float64), 1)
    with pytest.raises(ValueError):
        contribution(torch.zeros(2, 2), 1)
    p = contribution(torch.zeros(3), 1)
    with pytest.raises(ValueError):
        merge(p, contribution(torch.zeros(4), 1))
    with pytest.raises(ValueError):
        merge(p, p)
    with pytest.raises(ValueError):
        finalize(Partial(weighted_sum=torch.zeros(3), weight=0))


def test_fedavg_object_merges_copies_and_sizes_like_the_functions() -> None:
    from mlfabric.learn.strategy import FedAvg

    s = FedAvg()
    a = contribution(torch.tensor([1.0, 2.0, 3.0]), 2)
    kept = s.copy(a)
    assert kept.weighted_sum is not a.weighted_sum and kept.weight == 2
    got = s.merge(a, contribution(torch.tensor([3.0, 3.0, 3.0]), 1))
    assert got is a and a.weight == 3 and torch.equal(finalize(a), torch.tensor([5.0, 7.0, 9.0]) / 3)
    assert torch.equal(kept.weighted_sum, torch.tensor([2.0, 4.0, 6.0]))  # the copy did not move
    # partials up the tree, flat models down it: both sized as their float32 bytes
    assert s.nbytes(a) == 12 and s.nbytes(torch.zeros(10)) == 40
