"""``mlfabric.learn.probe:IndexTask``: a task that checks aggregation itself, not learning.

Every node's "trained" model is a vector filled with ``its roster index + 1``, with FedAvg weight 1,
so the average the job produces for each shard times that shard's number of contributors must be
exactly the sum of ``index + 1`` over those contributors (small integers: exact in float32).
Useful on a new cluster (``mlfabric job submit --task mlfabric.learn.probe:IndexTask``) and in the
tests that kill aggregators. ``MLFABRIC_PROBE_DELAY`` (seconds) makes training take that long, so a
test can kill a node while a round is in progress.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from mlfabric.learn.tasks import LocalData, TrainResult

__all__ = ["IndexTask", "ProbeModel"]


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
        delay = float(os.environ.get("MLFABRIC_PROBE_DELAY", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        with torch.no_grad():
            model.value.fill_(float(data.x[0, 0].item()) + 1.0)
        return TrainResult(n_samples=1, loss=0.0)

    def evaluate(self, model: nn.Module, data: LocalData) -> tuple[float, float]:
        """(mean value, 0): the mean tells the test what the average was."""
        return float(model.value.mean().item()), 0.0
