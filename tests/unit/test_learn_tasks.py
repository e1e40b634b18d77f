"""learn/tasks.py: resolve_task, seeded model init, local training and evaluation (on the CPU here)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlfabric.errors import ConfigError  # noqa: E402
from mlfabric.learn.digits import DigitsTask  # noqa: E402
from mlfabric.learn.tasks import LocalData, Task, TrainResult, default_device, derive_seed, resolve_task  # noqa: E402


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_resolves_to_a_task_with_defaults() -> None:
    task = resolve_task("digits")
    assert isinstance(task, Task) and isinstance(task, DigitsTask)
    assert task.name == "digits"
    assert task.default_rounds > 0 and task.default_local_epochs > 0
    assert task.default_lr > 0 and task.default_batch_size > 0


def test_module_attr_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tasks_for_test.py").write_text(
        "from mlfabric.learn.digits import DigitsTask\n"
        "INSTANCE = DigitsTask(alpha=2.0)\n"
        "def factory():\n    return DigitsTask(alpha=3.0)\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n"
        "NOT_A_TASK = 42\n"
        "def wrong():\n    return object()\n"
    )
    (tmp_path / "my_broken_module_for_test.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert resolve_task("my_tasks_for_test:INSTANCE").alpha == 2.0  # type: ignore[attr-defined]
        assert resolve_task("my_tasks_for_test:factory").alpha == 3.0  # type: ignore[attr-defined]
        assert isinstance(resolve_task("mlfabric.learn.digits:DigitsTask"), DigitsTask)  # a class is instantiated
        for spec, why in [
            ("", "expected"),
            ("mnist", "expected"),
            ("my_tasks_for_test:", "expected"),
            (":INSTANCE", "expected"),
            ("no_such_module_anywhere:Task", "cannot import"),
            ("my_broken_module_for_test:Task", "boom at import"),
            ("my_tasks_for_test:Missing", "no attribute"),
            ("my_tasks_for_test:NOT_A_TASK", "neither"),
            ("my_tasks_for_test:broken", "no GPU here"),
            ("my_tasks_for_test:wrong", "Task interface"),
        ]:
            with pytest.raises(ConfigError, match=why):
                resolve_task(spec)
    finally:
        sys.modules.pop("my_tasks_for_test", None)
        sys.modules.pop("my_broken_module_for_test", None)


def test_build_model_is_a_function_of_the_seed_and_leaves_the_global_rng_alone() -> None:
    task = DigitsTask(device="cpu")
    state = torch.random.get_rng_state()
    a, b, c = task.build_model(7), task.build_model(7), task.build_model(8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in a.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in a.parameters())


def _tiny(task: DigitsTask) -> LocalData:
    return task.load_data(0, 8, seed=1)


def test_train_local_is_deterministic_learns_and_stays_on_the_cpu() -> None:
    task = DigitsTask(device="cpu")
    data = _tiny(task)
    m1, m2 = task.build_model(3), task.build_model(3)
    loss_before, _ = task.evaluate(m1, data)
    r1 = task.train_local(m1, data, epochs=2, lr=0.05, batch_size=16, seed=11)
    r2 = task.train_local(m2, data, epochs=2, lr=0.05, batch_size=16, seed=11)
    assert r1 == r2 and isinstance(r1, TrainResult) and r1.n_samples == len(data)
    assert _same_weights(m1, m2)
    loss_after, acc_after = task.evaluate(m1, data)
    assert loss_after < loss_before and 0.0 <= acc_after <= 1.0
    assert all(p.device.type == "cpu" for p in m1.parameters())
    m3 = task.build_model(3)
    task.train_local(m3, data, epochs=2, lr=0.05, batch_size=16, seed=12)
    assert not _same_weights(m1, m3)  # the seed drives the shuffling


def test_training_in_threads_matches_training_in_the_caller() -> None:
    task = DigitsTask(device="cpu")
    datas = [task.load_data(k, 4, seed=2) for k in range(4)]
    serial = [task.build_model(1) for _ in datas]
    for k, m in enumerate(serial):
        task.train_local(m, datas[k], 1, 0.05, 16, seed=k)
    threaded = [task.build_model(1) for _ in datas]
    workers = [
        threading.Thread(target=task.train_local, args=(m, datas[k], 1, 0.05, 16, k)) for k, m in enumerate(threaded)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert all(_same_weights(a, b) for a, b in zip(serial, threaded, strict=True))


def test_evaluate_counts_correct_predictions() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.int64), 10).float()

    task = DigitsTask(device="cpu")
    data = LocalData(x=torch.zeros(4, 1, 8, 8), y=torch.tensor([0, 0, 3, 0]))
    loss, acc = task.evaluate(Fixed(), data)
    assert acc == 0.75 and loss > 0


def test_bad_hyper_parameters_and_empty_data() -> None:
    task = DigitsTask(device="cpu")
    model, data = task.build_model(0), _tiny(task)
    for kwargs in ({"epochs": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"batch_size": 0}):
        args = {"epochs": 1, "lr": 0.1, "batch_size": 8, "seed": 0} | kwargs
        with pytest.raises(ValueError):
            task.train_local(model, data, **args)
    empty = LocalData(x=torch.zeros(0, 1, 8, 8), y=torch.zeros(0, dtype=torch.int64))
    assert task.train_local(model, empty, 1, 0.1, 8, 0).n_samples == 0
    with pytest.raises(ValueError):
        LocalData(x=torch.zeros(3, 1, 8, 8), y=torch.zeros(2, dtype=torch.int64))


def test_default_device_and_derive_seed() -> None:
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert derive_seed(1, 2, "node-3") == derive_seed(1, 2, "node-3")
    assert derive_seed(1, 2) != derive_seed(2, 1) != derive_seed(12)
    assert 0 <= derive_seed("x") < 1 << 63
