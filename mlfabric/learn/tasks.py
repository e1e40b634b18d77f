"""Tasks: what a node trains. A model, the node's share of the data, a train step and an evaluation.

The daemon knows a task only by its spec string (``"digits"``, or ``"package.module:attr"`` for a
user's own) and talks to it only through the ``Task`` protocol below, so the aggregation machinery
never depends on a particular model. Everything a task does is seeded by an argument: two nodes
given the same seed build bit-identical models, and a node's data split is a function of
(node_index, num_nodes, seed) alone, so no coordinator hands out data.

Training runs in a worker thread (``asyncio.to_thread``), so tasks touch no global state: no
``torch.manual_seed`` (seeded ``torch.Generator`` objects instead), no ``torch.set_num_threads``
(the caller's choice). Computation runs on CUDA when available; tensors handed back are on the CPU.
Imports torch; only ``learn/`` may, and the runtime imports ``learn`` lazily.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mlfabric.errors import ConfigError

__all__ = [
    "ClassificationTask",
    "LocalData",
    "Task",
    "TrainResult",
    "default_device",
    "derive_seed",
    "resolve_task",
]


@dataclass(frozen=True, slots=True)
class LocalData:
    """A labelled data set on the CPU: inputs ``x`` (N, ...) and integer class labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows, y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What local training reports: its FedAvg weight and the mean training loss of the last epoch."""

    n_samples: int
    loss: float


@runtime_checkable
class Task(Protocol):
    """What the daemon needs from a task. ``default_*`` are the hyper-parameters it runs with."""

    name: str
    default_rounds: int
    default_local_epochs: int
    default_lr: float
    default_batch_size: int

    def build_model(self, seed: int) -> nn.Module: ...

    def load_data(self, node_index: int, num_nodes: int, seed: int) -> LocalData: ...

    def test_data(self) -> LocalData: ...

    def train_local(
        self, model: nn.Module, data: LocalData, epochs: int, lr: float, batch_size: int, seed: int
    ) -> TrainResult: ...

    def evaluate(self, model: nn.Module, data: LocalData) -> tuple[float, float]: ...


def default_device() -> torch.device:
    """CUDA when this process sees a GPU, the CPU otherwise."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts (run seed, round, node...): stable across runs, unlike hash()."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"mlfabric.seed").digest(), "big") >> 1


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


class ClassificationTask(ABC):
    """Base for classification tasks: minibatch SGD with momentum on cross-entropy, and accuracy.

    Subclasses provide the model and the data; ``train_local`` and ``evaluate`` are shared.
    """

    name: str = "classification"
    default_rounds: int = 10
    default_local_epochs: int = 1
    default_lr: float = 0.05
    default_batch_size: int = 32
    momentum: float = 0.9
    eval_batch_size: int = 1024

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module: ...

    @abstractmethod
    def load_data(self, node_index: int, num_nodes: int, seed: int) -> LocalData: ...

    @abstractmethod
    def test_data(self) -> LocalData: ...

    def train_local(
        self, model: nn.Module, data: LocalData, epochs: int, lr: float, batch_size: int, seed: int
    ) -> TrainResult:
        """Train ``model`` in place on ``data``; the model ends on the device it started on."""
        if epochs < 0 or batch_size <= 0 or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"bad hyper-parameters epochs={epochs} lr={lr} batch_size={batch_size}")
        n = len(data)
        if n == 0 or epochs == 0:
            return TrainResult(n_samples=n, loss=float("nan"))
        home = _model_device(model)
        model.to(self.device)
        model.train()
        x, y = data.x.to(self.device), data.y.to(self.device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.momentum)
        loss_fn = nn.CrossEntropyLoss()
        last = float("nan")
        try:
            for _ in range(epochs):
                order = torch.randperm(n, generator=gen).to(self.device)
                total = torch.zeros((), device=self.device)
                for i in range(0, n, batch_size):
                    idx = order[i : i + batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x[idx]), y[idx])
                    loss.backward()
                    opt.step()
                    total += loss.detach() * idx.numel()
                last = float(total) / n
        finally:
            model.to(home)
        return TrainResult(n_samples=n, loss=last)

    def evaluate(self, model: nn.Module, data: LocalData) -> tuple[float, float]:
        """(mean cross-entropy, accuracy in [0, 1]) of ``model`` on ``data``."""
        n = len(data)
        if n == 0:
            return float("nan"), float("nan")
        home = _model_device(model)
        was_training = model.training
        model.to(self.device)
        model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        try:
            with torch.inference_mode():
                for i in range(0, n, self.eval_batch_size):
                    xb = data.x[i : i + self.eval_batch_size].to(self.device)
                    yb = data.y[i : i + self.eval_batch_size].to(self.device)
                    logits = model(xb)
                    loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
                    correct += (logits.argmax(dim=1) == yb).sum()
        finally:
            model.train(was_training)
            model.to(home)
        return float(loss_sum) / n, int(correct) / n


# Built-in task names and the specs they stand for. Named by string, not imported: learn/digits.py
# imports this module (ClassificationTask), so an import here would close a cycle.
_BUILTIN: dict[str, str] = {"digits": "mlfabric.learn.digits:DigitsTask"}


def resolve_task(spec: str) -> Task:
    """The task named by ``spec``: a built-in name (``"digits"``) or ``"package.module:attr"``.

    ``attr`` may be a Task instance, or a class / factory that returns one when called with no
    arguments. Anything else raises ConfigError with the reason. A built-in name resolves through
    the same path as the spec it stands for.
    """
    spec = _BUILTIN.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        builtins = ", ".join(repr(b) for b in _BUILTIN)
        raise ConfigError(f"task {spec!r}: expected a built-in task ({builtins}) or 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise ConfigError(f"task {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"task {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type) or not isinstance(obj, Task):  # a class passes the protocol check: instantiate it
        if not callable(obj):
            raise ConfigError(f"task {spec!r}: {attr!r} is neither a Task nor callable")
        try:
            obj = obj()
        except Exception as exc:
            raise ConfigError(f"task {spec!r}: calling {attr!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Task):
        raise ConfigError(f"task {spec!r}: {attr!r} does not provide the Task interface (name, build_model, ...)")
    return obj
