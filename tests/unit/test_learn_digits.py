"""learn/digits.py: the shipped data, the seeded non-IID split, and proof that the task learns.

The learning test is an in-process federation: 8 clients on the Dirichlet(0.5) split, each round
every client trains from the global model, each client's state_dict is cut into shards
(``shards.py``), every shard is FedAvg'd (``strategy.py``) and written back into the global model.
With the task's default hyper-parameters it must reach >= 95% test accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from mlfabric.learn.digits import DigitsTask, load_digits_raw  # noqa: E402
from mlfabric.learn.shards import apply_shard, flatten_shard, plan_shards  # noqa: E402
from mlfabric.learn.strategy import Partial, contribution, finalize, merge  # noqa: E402
from mlfabric.learn.tasks import derive_seed  # noqa: E402

NODES = 8


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one core, as a node sharing its machine would (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_data_ships_in_the_package() -> None:
    pixels, labels = load_digits_raw()
    assert pixels.shape == (1797, 8, 8) and pixels.dtype == torch.uint8
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert int(pixels.max()) == 16 and int(pixels.min()) == 0
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_test_set_is_fixed_stratified_and_disjoint_from_train() -> None:
    task = DigitsTask()
    train, test = task.train_indices(), task.test_indices()
    assert set(train).isdisjoint(test) and len(train) + len(test) == 1797
    assert DigitsTask().test_indices() == test  # fixed (split_seed), whatever the run seed
    _, labels = load_digits_raw()
    per_class = torch.bincount(labels[list(test)], minlength=10)
    assert all(17 <= int(c) <= 37 for c in per_class)  # ~20% of each class (about 36)
    data = task.test_data()
    assert data.x.shape == (len(test), 1, 8, 8) and data.x.dtype == torch.float32
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) == 1.0  # pixels / 16


@pytest.mark.parametrize("num_nodes", [1, 3, 8, 50, 1438])
def test_every_train_sample_is_used_exactly_once(num_nodes: int) -> None:
    task = DigitsTask()
    parts = task.split_indices(num_nodes, seed=4)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(task.train_indices())
    assert min(len(p) for p in parts) >= min(task.min_samples, len(task.train_indices()) // num_nodes)
    total = sum(len(task.load_data(k, num_nodes, seed=4)) for k in range(min(num_nodes, 60)))
    assert total == sum(len(p) for p in parts[:60])


def test_too_many_nodes_or_bad_index_is_refused() -> None:
    task = DigitsTask()
    with pytest.raises(ValueError):
        task.split_indices(1439, seed=0)
    with pytest.raises(ValueError):
        task.load_data(8, 8, seed=0)
    with pytest.raises(ValueError):
        task.load_data(-1, 8, seed=0)


def _label_skew(task: DigitsTask, seed: int) -> float:
    """Mean total-variation distance between each node's label histogram and the train set's."""
    _, labels = load_digits_raw()
    overall = torch.bincount(labels[list(task.train_indices())], minlength=10).double()
    overall /= overall.sum()
    tvs = []
    for part in task.split_indices(NODES, seed):
        hist = torch.bincount(labels[list(part)], minlength=10).double()
        tvs.append(0.5 * float((hist / hist.sum() - overall).abs().sum()))
    return sum(tvs) / len(tvs)


def test_split_is_skewed_and_deterministic_for_a_seed() -> None:
    task = DigitsTask()
    assert task.split_indices(NODES, 5) == DigitsTask().split_indices(NODES, 5)
    assert task.split_indices(NODES, 5) != task.split_indices(NODES, 6)
    a = task.load_data(2, NODES, seed=5)
    b = DigitsTask().load_data(2, NODES, seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    for seed in range(4):
        skewed = _label_skew(task, seed)  # Dirichlet(0.5): ~0.4
        near_iid = _label_skew(DigitsTask(alpha=1000.0), seed)  # ~0.015
        assert skewed > 0.3 and near_iid < 0.05, (seed, skewed, near_iid)


def federate(task: DigitsTask, seed: int, rounds: int, max_bytes: int = 16 << 10) -> list[float]:
    """Test accuracy after each round of an in-process FedAvg over sharded state_dicts."""
    global_model = task.build_model(seed)
    plan = plan_shards(global_model.state_dict(), max_bytes)
    datas = [task.load_data(k, NODES, seed) for k in range(NODES)]
    test = task.test_data()
    local = task.build_model(seed)
    accuracy = []
    for r in range(rounds):
        partials: list[Partial | None] = [None] * len(plan)
        for k, data in enumerate(datas):
            local.load_state_dict(global_model.state_dict())
            result = task.train_local(
                local,
                data,
                task.default_local_epochs,
                task.default_lr,
                task.default_batch_size,
                seed=derive_seed(seed, r, k),
            )
            for spec in plan:
                update = contribution(flatten_shard(local, spec), result.n_samples)
                acc = partials[spec.index]
                partials[spec.index] = update if acc is None else merge(acc, update)
        for spec in plan:
            part = partials[spec.index]
            assert part is not None and part.weight == sum(len(d) for d in datas)
            apply_shard(global_model, spec, finalize(part))
        accuracy.append(task.evaluate(global_model, test)[1])
    return accuracy


def test_federated_digits_reaches_95_percent(one_thread: None) -> None:
    task = DigitsTask(device="cpu")
    assert len(plan_shards(task.build_model(0).state_dict(), 16 << 10)) > 1  # several shards, one split tensor
    started = time.process_time()  # CPU time: the wall clock depends on what else shares the machine
    accuracy = federate(task, seed=0, rounds=task.default_rounds)
    cpu_seconds = time.process_time() - started
    assert accuracy[-1] >= 0.95, accuracy
    assert cpu_seconds < 60, cpu_seconds  # about 4 s on one core of the development machine


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_federated_digits_reaches_95_percent_for_other_seeds(one_thread: None, seed: int) -> None:
    task = DigitsTask(device="cpu")
    accuracy = federate(task, seed=seed, rounds=task.default_rounds)
    assert accuracy[-1] >= 0.95, accuracy
