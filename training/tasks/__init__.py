"""Training tasks: what one kind of model is trained on, and how its loss and evaluation are computed.

The trainer (``training.trainer``) runs one loop for every model -- resume, checkpoints through
``ray.train.report``, early stopping, the dense learning-rate schedule, progress and the stage result -- over a
small task protocol (RecBole gives each kind of model one interface in the same spirit):

- ``Task(ctx)`` reads this rank's data (no torch random numbers are drawn: the trainer seeds torch after it);
- ``bind(dmp)`` after the model is sharded;
- ``steps_per_epoch`` and ``batches(epoch)``: exactly that many batches on every rank (the sharded lookup is a
  collective), already on ``ctx.device``;
- ``loss(dmp, batch)``: the scalar objective to back-propagate; the task keeps its own running figures;
- ``end_epoch(epoch, train_s)``: the epoch's figures (may be collective);
- ``evaluate(dmp, split)``: metrics of ``split`` when ``monitor`` names one (early stopping maximises it);
- ``summary()``: the figures a task without ``monitor`` reports for its final state;
- ``state_dict()`` / ``load_state_dict()``: what a resumed run needs beyond the trainer's own state;
- ``finish(state)``: on rank 0, the saved model's state fixed up in place (e.g. cold rows), extra figures returned.

Tasks: ``ctr`` (``training.tasks.ctr``: rankers on ``gold.ctr_samples``), ``skipgram`` (``training.tasks.skipgram``:
SGNS pairs from item sequences).
"""

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


def task_class(name: str):
    """The task class called ``name``.

    Raises:
        KeyError: no such task.
    """
    from training.tasks.ctr import CtrTask
    from training.tasks.skipgram import SkipGramTask

    tasks = {t.name: t for t in (CtrTask, SkipGramTask)}
    if name not in tasks:
        raise KeyError(f"unknown training task {name!r}; one of {sorted(tasks)}")
    return tasks[name]
