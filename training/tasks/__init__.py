"""Training tasks: what one kind of model is trained on, and how its loss and evaluation are computed.

The trainer (``training.trainer``) runs one loop for every model -- resume, checkpoints through
``ray.train.report``, early stopping, the dense learning-rate schedule, progress and the stage result -- over a
small task protocol (RecBole gives each kind of model one interface in the same spirit):

- ``Task(ctx)`` (``ctx`` a ``TaskContext``, training.tasks.context) reads this rank's data (no torch random
  numbers are drawn: the trainer seeds torch after it);
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
SGNS pairs from item sequences), ``closed_form`` (``training.tasks.closed_form``: a fit without gradient from the
whole train split's positives, in ``bind``; ``steps_per_epoch`` 0, so the loop runs epochs of no step),
``autoencoder`` (``training.tasks.autoencoder``: mini-batches of items, each its partially observed vector over the
train split's users, early stopping on HR@10 of valid positives), ``sequence`` (``training.tasks.sequence``:
session-parallel next-item steps over the train split's sessions, early stopping on recall@20 of the next valid
item).
"""

from __future__ import annotations

from training.tasks.context import TaskContext

__all__ = ["TaskContext", "task_class"]


def task_class(name: str):
    """The task class called ``name``.

    Raises:
        KeyError: no such task.
    """
    from training.tasks.autoencoder import AutoencoderTask
    from training.tasks.closed_form import ClosedFormTask
    from training.tasks.ctr import CtrTask
    from training.tasks.sequence import SequenceTask
    from training.tasks.skipgram import SkipGramTask

    tasks = {t.name: t for t in (CtrTask, SkipGramTask, ClosedFormTask, AutoencoderTask, SequenceTask)}
    if name not in tasks:
        raise KeyError(f"unknown training task {name!r}; one of {sorted(tasks)}")
    return tasks[name]
