"""The built-in task: a small CNN on scikit-learn's handwritten digits (8x8, 1,797 images, 10 classes).

Small enough to train in seconds on one CPU core, yet a real learning problem, so federated runs
on a laptop (and their failure experiments) show accuracy that moves. The images ship inside the
package (``data/digits.bin.gz``, made by ``benchmarks/make_digits_data.py``): no download and no
scikit-learn at run time; loading needs only gzip and torch.

Splits, all seeded and computed identically by every node with no coordinator:
- a fixed test set held out per class (``test_fraction`` of each class, seeded by ``split_seed``);
- the rest split non-IID across ``num_nodes`` nodes: for each class, node shares drawn from
  Dirichlet(alpha) (Hsu et al. 2019, "Measuring the effects of non-identical data distribution"),
  then topped up so every node has at least ``min_samples``. Each train sample goes to exactly one
  node.

Pixels (0..16) are scaled to [0, 1]. Imports torch; only ``learn/`` may.
"""

from __future__ import annotations

import gzip
import math
import random
import struct
from functools import cache
from importlib import resources

import torch
from torch import nn

from mlfabric.learn.tasks import ClassificationTask, LocalData

__all__ = ["DigitsCNN", "DigitsTask", "load_digits_raw"]

MAGIC = b"MLFDIG01"
NUM_CLASSES = 10


@cache
def load_digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as uint8 (N, 8, 8) with values 0..16, and labels as int64 (N,).

    Cached and shared by every caller in the process: treat the tensors as read-only.
    """
    raw = gzip.decompress(resources.files("mlfabric.learn").joinpath("data/digits.bin.gz").read_bytes())
    head = len(MAGIC) + struct.calcsize("<IBB")
    if len(raw) < head or raw[: len(MAGIC)] != MAGIC:
        raise RuntimeError("digits data file is corrupt (bad magic)")
    n, rows, cols = struct.unpack_from("<IBB", raw, len(MAGIC))
    if len(raw) != head + n * rows * cols + n:
        raise RuntimeError("digits data file is corrupt (bad length)")
    buf = bytearray(raw[head:])
    pixels = torch.frombuffer(buf, dtype=torch.uint8, count=n * rows * cols).reshape(n, rows, cols).clone()
    labels = torch.frombuffer(buf, dtype=torch.uint8, offset=n * rows * cols, count=n).to(torch.int64)
    if int(pixels.max()) > 16 or int(labels.max()) >= NUM_CLASSES:
        raise RuntimeError("digits data file is corrupt (values out of range)")
    return pixels, labels


class DigitsCNN(nn.Module):
    """conv(1->16) ReLU, conv(16->32) ReLU, maxpool 2, fc(512->64) ReLU, fc(64->10). 38k parameters, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _init_(module: nn.Module, gen: torch.Generator) -> None:
    """PyTorch's default init for Conv/Linear (kaiming uniform, a=sqrt(5)), drawn from ``gen``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(m.bias, -bound, bound, generator=gen)


@cache
def _train_test_indices(split_seed: int, test_fraction: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(train, test) indices: ``test_fraction`` of every class held out, chosen by ``split_seed``."""
    _, labels = load_digits_raw()
    gen = torch.Generator().manual_seed(split_seed)
    train: list[int] = []
    test: list[int] = []
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)].tolist()
        k = round(test_fraction * len(members))
        test += members[:k]
        train += members[k:]
    return tuple(sorted(train)), tuple(sorted(test))


@cache
def _partition(
    split_seed: int, test_fraction: float, num_nodes: int, seed: int, alpha: float, min_samples: int
) -> tuple[tuple[int, ...], ...]:
    train, _ = _train_test_indices(split_seed, test_fraction)
    if num_nodes > len(train):
        raise ValueError(f"cannot split {len(train)} training samples across {num_nodes} nodes")
    _, labels = load_digits_raw()
    rng = random.Random(f"digits-dirichlet:{seed}:{num_nodes}:{alpha!r}")
    nodes: list[list[int]] = [[] for _ in range(num_nodes)]
    for c in range(NUM_CLASSES):
        members = [i for i in train if int(labels[i]) == c]
        rng.shuffle(members)
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(num_nodes)]  # Dirichlet via normalised gammas
        total = sum(draws)
        shares = [d / total for d in draws] if total > 0 else [1 / num_nodes] * num_nodes
        prev, cum = 0, 0.0
        for k in range(num_nodes):
            cum += shares[k]
            cut = len(members) if k == num_nodes - 1 else min(len(members), round(cum * len(members)))
            nodes[k] += members[prev:cut]
            prev = max(prev, cut)
    # Top up nodes below the floor from the largest node, taking its most common class first
    # (that keeps the skew of the others): deterministic, and never more than floor * num_nodes moves.
    floor = min(min_samples, len(train) // num_nodes)
    while (short := next((k for k in range(num_nodes) if len(nodes[k]) < floor), None)) is not None:
        donor = max(range(num_nodes), key=lambda k: (len(nodes[k]), -k))
        counts = [0] * NUM_CLASSES
        for i in nodes[donor]:
            counts[int(labels[i])] += 1
        common = max(range(NUM_CLASSES), key=lambda c: (counts[c], -c))
        pos = max(j for j, i in enumerate(nodes[donor]) if int(labels[i]) == common)
        nodes[short].append(nodes[donor].pop(pos))
    return tuple(tuple(sorted(n)) for n in nodes)


class DigitsTask(ClassificationTask):
    """scikit-learn's 8x8 digits, non-IID across nodes; the defaults reach >= 95% with 8 nodes."""

    name = "digits"
    default_rounds = 15
    default_local_epochs = 2
    default_lr = 0.05
    default_batch_size = 16

    def __init__(
        self,
        alpha: float = 0.5,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        min_samples: int = 8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        if not alpha > 0 or not 0 < test_fraction < 1 or min_samples < 1:
            raise ValueError(f"bad digits split alpha={alpha} test_fraction={test_fraction} min_samples={min_samples}")
        self.alpha = float(alpha)
        self.test_fraction = float(test_fraction)
        self.split_seed = split_seed
        self.min_samples = min_samples

    def build_model(self, seed: int) -> nn.Module:
        """A DigitsCNN whose weights depend on ``seed`` only (global RNG untouched)."""
        with torch.device("meta"):
            model = DigitsCNN()
        model.to_empty(device="cpu")
        _init_(model, torch.Generator().manual_seed(seed))
        return model

    def split_indices(self, num_nodes: int, seed: int) -> tuple[tuple[int, ...], ...]:
        """Indices into the full data set of each node's train samples (disjoint, covering the train set)."""
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        return _partition(self.split_seed, self.test_fraction, num_nodes, seed, self.alpha, self.min_samples)

    def train_indices(self) -> tuple[int, ...]:
        return _train_test_indices(self.split_seed, self.test_fraction)[0]

    def test_indices(self) -> tuple[int, ...]:
        return _train_test_indices(self.split_seed, self.test_fraction)[1]

    def load_data(self, node_index: int, num_nodes: int, seed: int) -> LocalData:
        if not 0 <= node_index < num_nodes:
            raise ValueError(f"node_index {node_index} is not in [0, {num_nodes})")
        return self._subset(self.split_indices(num_nodes, seed)[node_index])

    def test_data(self) -> LocalData:
        return self._subset(self.test_indices())

    @staticmethod
    def _subset(indices: tuple[int, ...]) -> LocalData:
        pixels, labels = load_digits_raw()
        idx = torch.tensor(indices, dtype=torch.int64)
        x = pixels.index_select(0, idx).to(torch.float32).div_(16.0).unsqueeze(1)
        return LocalData(x=x, y=labels.index_select(0, idx))
