"""One node's part in a training job, the torch side: its model, its data, training, evaluation.

The job machine (core/jobs.py) moves a model as **one flat float32 tensor** (every float entry of the
state_dict, in the order :func:`mlfabric.learn.shards.plan_shards` lays them out with no size cap):
down a round's tree with its notice, and, weighted, up it as FedAvg partials. This module turns
that tensor into a model and back, trains, evaluates and checkpoints. Every call is blocking torch
work: the runtime runs it in a worker thread (runtime/jobs.py), one call at a time per job.

``spec`` is a :class:`mlfabric.core.jobs.JobSpec` (read by attribute only). Imports torch; only
``learn/`` may.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mlfabric.errors import ConfigError
from mlfabric.learn.checkpoint import load_checkpoint, save_checkpoint
from mlfabric.learn.shards import ShardSpec, apply_shard, flatten_shard, plan_shards
from mlfabric.learn.strategy import Partial, contribution, finalize
from mlfabric.learn.tasks import LocalData, derive_seed, resolve_task

__all__ = ["CHECKPOINT", "LocalJob", "read_checkpoint"]

CHECKPOINT = "model.ckpt"
_WHOLE = 1 << 62  # plan_shards' size cap: none, so the plan is one shard holding every float entry


def read_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``directory/model.ckpt``: (tensors, meta {job, version, rank, parts}); CheckpointError if damaged."""
    return load_checkpoint(directory / CHECKPOINT)


class LocalJob:
    """The global model of one job as this node holds it (``version``: rounds applied), its data part
    (``rank % parts`` of ``parts``), and a scratch copy to train and evaluate on."""

    def __init__(self, spec: Any, rank: int, parts: int, directory: Path, threads: int = 1) -> None:
        # One intra-op thread by default: the event loop needs the other cores' time slices, and
        # several daemons share a machine in tests and the demo (Settings.torch_threads).
        torch.set_num_threads(threads)
        self.spec, self.rank, self.parts, self.dir = spec, rank, max(1, parts), directory
        self.task = resolve_task(spec.task)
        self.model = self.task.build_model(spec.seed)
        self.scratch = self.task.build_model(spec.seed)
        plan = plan_shards(self.model.state_dict(), _WHOLE)
        if len(plan) != 1:
            raise ConfigError(f"task {spec.task!r}: its model has no floating-point parameters to train")
        self.plan: ShardSpec = plan[0]
        self.version = 0
        self.data: LocalData = self.task.load_data(rank % self.parts, self.parts, spec.seed)
        self._test: LocalData | None = None
        self.train_loss: dict[int, float] = {}  # round -> our last training loss, for the record

    @classmethod
    def from_checkpoint(cls, spec: Any, directory: Path, threads: int = 1) -> LocalJob:
        """The job as ``directory``'s checkpoint left it: its model, version, rank and data parts
        (CheckpointError when damaged, ValueError when it is another job's)."""
        tensors, meta = read_checkpoint(directory)
        if meta.get("job") != spec.job_id:
            raise ValueError(f"the checkpoint in {directory} is of job {meta.get('job')!r}, not {spec.job_id!r}")
        local = cls(spec, int(meta["rank"]), int(meta["parts"]), directory, threads)
        local.load(tensors, int(meta["version"]))
        return local

    def repartition(self, rank: int, parts: int) -> None:
        """Train on another data part from now on (round 0's rank and part count are estimates; the
        core fixes them from round 1)."""
        self.rank, self.parts = rank, max(1, parts)
        self.data = self.task.load_data(rank % self.parts, self.parts, self.spec.seed)

    @property
    def numel(self) -> int:
        return self.plan.numel

    def flat(self) -> torch.Tensor:
        """The model as one new flat float32 tensor."""
        return flatten_shard(self.model, self.plan)

    def load(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Take a checkpoint's tensors (the ``tensors`` of :func:`read_checkpoint`) as version ``version``."""
        self.model.load_state_dict(tensors)
        self.version = version

    def apply(self, version: int, flat: torch.Tensor) -> None:
        """The model of ``version`` arrived: write it into the model and checkpoint it atomically."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"model of {flat.numel()} values for a model of {self.numel}")
        apply_shard(self.model, self.plan, flat)
        self.version = version
        self.dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.dir / CHECKPOINT, self.model.state_dict(),
                        {"job": self.spec.job_id, "version": version, "rank": self.rank, "parts": self.parts})

    def lr(self, round_: int) -> float:
        """The round's learning rate: the job's (or task's) on a cosine decay to a tenth of it by the
        last round. With non-IID data, clients pull apart at a constant rate and the global model's
        accuracy swings from round to round; the decay lets the last rounds settle."""
        base = self.spec.lr or self.task.default_lr
        total = max(1, (self.spec.rounds or 1) - 1)
        return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(round_, total) / total)))

    def train(self, round_: int) -> Partial:
        """Train a copy of the model on our data; our FedAvg contribution (flat weights x samples)."""
        self.scratch.load_state_dict(self.model.state_dict())
        res = self.task.train_local(self.scratch, self.data, self.spec.local_epochs or self.task.default_local_epochs,
                                    self.lr(round_), self.spec.batch_size or self.task.default_batch_size,
                                    derive_seed(self.spec.seed, round_, self.rank))
        self.train_loss[round_] = res.loss
        for old in [r for r in self.train_loss if r < round_ - 1]:
            del self.train_loss[old]
        return contribution(flatten_shard(self.scratch, self.plan), res.n_samples)

    def next_model(self, round_: int, payload: Partial | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Coordinator: round ``round_``'s sum as the next model (None or weight 0: the model stays as it
        is), and its metrics: test loss and accuracy of that model, and our training loss."""
        flat = finalize(payload) if payload is not None and payload.weight > 0 else self.flat()
        apply_shard(self.scratch, self.plan, flat)
        if self._test is None:
            self._test = self.task.test_data()
        loss, acc = self.task.evaluate(self.scratch, self._test)
        own = self.train_loss.get(round_)
        return flat, {"test_loss": _num(loss), "test_accuracy": _num(acc), "train_loss": _num(own)}


def _num(x: float | None) -> float | None:
    """A metric for the JSON record: rounded, and None where it is not a finite number."""
    return round(float(x), 6) if x is not None and math.isfinite(x) else None
