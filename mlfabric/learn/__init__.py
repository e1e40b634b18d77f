"""The torch side of mlfabric: tasks, FedAvg, model shards, checkpoints and plots.

- ``tasks``: the ``Task`` protocol (model + data split + local training + evaluation) and
  ``resolve_task(spec)``;
- ``digits``: the built-in task, a small CNN on the 8x8 handwritten digits shipped in ``data/``;
- ``strategy``: FedAvg as contribution / merge / finalize on one flat float32 shard;
- ``shards``: cutting a state_dict into bounded shards and the shards' ring keys;
- ``checkpoint``: atomic, pickle-free checkpoints of named tensors + JSON metadata;
- ``plot``: accuracy-per-round figures (matplotlib, imported lazily).

This package is the only place that imports torch, and importing ``mlfabric.learn`` itself imports
nothing heavy: the runtime imports the submodules lazily, only where a node trains or aggregates.
"""
