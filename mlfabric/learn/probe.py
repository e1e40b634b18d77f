"""``mlfabric.learn.probe:IndexTask``: a task that checks aggregation itself, not learning.

Every node's "trained" model is a vector filled with ``its data part + 1`` (the part is the node's
rank in the job, ``rank % parts``), with FedAvg weight 1, so the round's average times its number
of updates must be exactly the sum of ``part + 1`` over the nodes counted (small integers: exact in
float32). Useful on a new cluster (``mlfabric job submit --task mlfabric.learn.probe:IndexTask``)
and in the tests that kill aggregators.

``mlfabric.learn.probe:SlowIndexTask`` is the same with training that takes ``0.1 s`` per local
epoch, so the job's ``local_epochs`` sets how long a round trains (``--local-epochs 20``: 2 s) and a
test can kill nodes while a round is in progress. The delay is part of the task, named by its spec
string, like everything else a job runs (no environment knob).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mlfabric.learn.tasks import LocalData, TrainResult

__all__ = ["IndexTask", "ProbeModel", "SlowIndexTask"]


class ProbeModel(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(size))


class IndexTask:
    name = "probe"
    default_rounds = 3
    default_local_epochs = 1
    default_lr = 1.0
    default_batch_size = 1

    delay_per_epoch = 0.0  # seconds of "training" per local epoch

    def __init__(self, size: int = 4096) -> None:
        self.size = size

    def build_model(self, seed: int) -> nn.Module:
        return ProbeModel(self.size)

    def load_data(self, node_index: int, num_nodes: int, seed: int) -> LocalData:
        return LocalData(torch.tensor([[float(node_index)]]), torch.tensor([node_index]))

    def test_data(self) -> LocalData:
        return LocalData(torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64))

    def train_local(self, model: nn.Module, data: LocalData, epochs: int, lr: float, batch_size: int,
                    seed: int) -> TrainResult:
        if self.delay_per_epoch > 0:
            time.sleep(self.delay_per_epoch * epochs)
        with torch.no_grad():
            model.value.fill_(float(data.x[0, 0].item()) + 1.0)
        return TrainResult(n_samples=1, loss=0.0)

    def evaluate(self, model: nn.Module, data: LocalData) -> tuple[float, float]:
        """(mean value, 0): the mean tells the test what the average was."""
        return float(model.value.mean().item()), 0.0


class SlowIndexTask(IndexTask):
    """IndexTask whose training takes 0.1 s per local epoch (the job's ``local_epochs``)."""

    name = "probe-slow"
    delay_per_epoch = 0.1
