"""What a training task is given on one rank (``TaskContext``). It is a module of its own so that the tasks
(training.tasks.ctr, training.tasks.skipgram) import it from a module that imports none of them: the package's
``task_class`` imports the tasks, and a task importing the package back would be an import circle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TaskContext:
    """What a task is given on one rank.

    Args:
        spec: the model's ``training.registry.ModelSpec``.
        config: the model's resolved config.
        opts: the run's ``training.trainer.TrainOptions``.
        lake_dir: the lake whose Parquet exports are read.
        vocab: rows per vocabulary (``vocab_sizes.json``).
        rank, world_size: this worker's rank and the number of workers.
        device: this rank's torch device.
        local_batch_size: rows (or pairs) per step on this rank.
    """

    spec: Any
    config: Any
    opts: Any
    lake_dir: str
    vocab: dict
    rank: int
    world_size: int
    device: Any
    local_batch_size: int

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[train rank0] {msg}", flush=True)
