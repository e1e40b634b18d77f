"""learn/local.py: one node's part in a job, the torch side (the flat model, checkpoints, training,
the coordinator's averaging and metrics), checked against values computed here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mlfabric.core.jobs import JobSpec  # noqa: E402
from mlfabric.learn import probe  # noqa: E402
from mlfabric.learn.checkpoint import load_checkpoint  # noqa: E402
from mlfabric.learn.local import LocalJob  # noqa: E402
from mlfabric.learn.strategy import Partial  # noqa: E402

PROBE = "mlfabric.learn.probe:IndexTask"


def test_the_flat_model_holds_every_float_parameter_and_applies_back(tmp_path: Path) -> None:
    job = LocalJob(JobSpec(job_id="d", task="digits", rounds=4, seed=3), 1, 4, tmp_path / "d")
    params = dict(job.model.named_parameters())
    assert job.numel == sum(p.numel() for p in params.values())
    flat = job.flat()
    assert torch.equal(flat, torch.cat([params[k].detach().reshape(-1) for k in sorted(params)]))  # names sorted
    new = torch.arange(job.numel, dtype=torch.float32)
    job.apply(2, new)
    assert job.version == 2 and torch.equal(job.flat(), new)
    tensors, meta = load_checkpoint(tmp_path / "d" / "model.ckpt")
    assert meta == {"job": "d", "version": 2, "rank": 1, "parts": 4}
    back = LocalJob.from_checkpoint(JobSpec(job_id="d", task="digits", rounds=4, seed=3), tmp_path / "d")
    assert (back.version, back.rank, back.parts) == (2, 1, 4) and torch.equal(back.flat(), new)
    with pytest.raises(ValueError, match="of job 'd', not 'e'"):
        LocalJob.from_checkpoint(JobSpec(job_id="e", task="digits", rounds=4), tmp_path / "d")
    with pytest.raises(ValueError, match="model of 3 values"):
        job.apply(3, torch.zeros(3))
    assert job.version == 2


def test_two_nodes_build_the_same_model_from_the_seed(tmp_path: Path) -> None:
    spec = JobSpec(job_id="d", task="digits", rounds=4, seed=11)
    a, b = LocalJob(spec, 0, 2, tmp_path / "a"), LocalJob(spec, 1, 2, tmp_path / "b")
    assert torch.equal(a.flat(), b.flat())
    assert len(a.data) > 0 and len(b.data) > 0 and not torch.equal(a.data.y[:5], b.data.y[:5])


def test_probe_training_is_the_data_part_plus_one_with_weight_one(tmp_path: Path) -> None:
    for rank, parts, want in ((0, 4, 1.0), (3, 4, 4.0), (6, 4, 3.0)):  # a joiner's rank wraps onto the parts
        job = LocalJob(JobSpec(job_id="p", task=PROBE, rounds=2), rank, parts, tmp_path / f"p{rank}")
        part = job.train(0)
        assert part.weight == 1 and bool((part.weighted_sum == want).all())
        assert torch.equal(job.flat(), torch.zeros(job.numel))  # training works on a copy


def test_slow_probe_sleeps_a_tenth_of_a_second_per_local_epoch(monkeypatch, tmp_path: Path) -> None:
    slept: list[float] = []
    monkeypatch.setattr(probe.time, "sleep", slept.append)
    job = LocalJob(JobSpec(job_id="s", task="mlfabric.learn.probe:SlowIndexTask", rounds=2, local_epochs=20), 2,
                   4, tmp_path)
    assert job.train(0).weight == 1
    assert slept == [pytest.approx(2.0)]
    LocalJob(JobSpec(job_id="f", task=PROBE, rounds=2, local_epochs=20), 0, 1, tmp_path).train(0)
    assert slept == [pytest.approx(2.0)]  # the plain probe does not sleep


def test_next_model_is_the_weighted_mean_and_none_keeps_the_model(tmp_path: Path) -> None:
    job = LocalJob(JobSpec(job_id="p", task=PROBE, rounds=2), 0, 2, tmp_path)
    n = job.numel
    total = Partial(torch.full((n,), 1.0) * 1 + torch.full((n,), 2.0) * 3, 4)  # (1 * 1 + 2 * 3) / 4
    flat, metrics = job.next_model(0, total)
    assert torch.equal(flat, torch.full((n,), 7.0 / 4))
    assert metrics == {"test_loss": 1.75, "test_accuracy": 0.0, "train_loss": None}  # probe: loss = mean value
    assert torch.equal(job.flat(), torch.zeros(n))  # the model changes when the committed one arrives
    job.apply(1, torch.full((n,), 5.0))
    job.train(1)
    flat, metrics = job.next_model(1, None)  # no update arrived: the model as it is
    assert torch.equal(flat, torch.full((n,), 5.0)) and metrics["train_loss"] == 0.0
    flat, _ = job.next_model(1, Partial(torch.zeros(n), 0))
    assert torch.equal(flat, torch.full((n,), 5.0))


def test_learning_rate_decays_on_a_cosine_to_a_tenth(tmp_path: Path) -> None:
    job = LocalJob(JobSpec(job_id="p", task=PROBE, rounds=5, lr=0.2), 0, 1, tmp_path)
    assert job.lr(0) == pytest.approx(0.2) and job.lr(4) == pytest.approx(0.02) and job.lr(9) == pytest.approx(0.02)
    assert job.lr(2) == pytest.approx(0.2 * (0.1 + 0.45 * (1 + math.cos(math.pi / 2))))


def test_repartition_moves_the_data_part_and_keeps_the_model(tmp_path: Path) -> None:
    job = LocalJob(JobSpec(job_id="p", task=PROBE, rounds=3), 5, 16, tmp_path)  # round 0's estimate
    job.apply(1, torch.full((job.numel,), 2.0))
    job.repartition(5, 4)  # exact from round 1: 4 parts
    assert (job.rank, job.parts) == (5, 4) and bool((job.train(1).weighted_sum == 2.0).all())  # part 1, + 1
    assert torch.equal(job.flat(), torch.full((job.numel,), 2.0))
    job.apply(2, torch.full((job.numel,), 3.0))
    assert load_checkpoint(tmp_path / "model.ckpt")[1] == {"job": "p", "version": 2, "rank": 5, "parts": 4}
