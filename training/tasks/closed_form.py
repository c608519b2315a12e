"""The closed-form task: a model fitted in one pass over the train split's positive interactions, with no gradient
(the neighbourhood retrievers: ItemCF, Sarwar et al. 2001; UserCF, Resnick et al. 1994).

A closed-form fit needs the whole train split, not a shard: every rank reads all of
``export/ctr_samples/split=train`` (``training.data.read_ctr_shard`` as rank 0 of 1, the ``user_idx``, ``item_idx``
and ``label`` columns only), as the skip-gram task reads every sequence on every rank, so no collective is needed
and every rank holds the same R. R is the binary (U, R_items) matrix of the label-1 rows (rating >= 4), scipy.sparse
(``positives_matrix``). In ``bind`` the sharded model's own ``closed_form(R)`` gives its state as
``{state-dict key: scipy.sparse or dense array}`` and every rank copies into its local shards only their rows and
columns (densified one shard at a time), into a replicated buffer the whole of it.

The trainer's loop runs unchanged around it: ``steps_per_epoch`` is 0, so an epoch is no step, no backward and no
optimizer update; there is no ``monitor``, so the epoch's state (the fitted one) is saved. The stage result gives
the figures of the fit: ``train_rows`` (rows of the train split read), ``positives`` (nnz of R), ``users`` and
``items`` with a positive, and ``fit_s`` (seconds to build R and fit, on rank 0).

Legend: N train rows, nnz positives, U user rows, R_items item rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from scipy import sparse

from features.definitions import SPARSE_FEATURES
from features.vocab import OOV_INDEX
from training.distributed.sharding import copy_full_into
from training.tasks.context import TaskContext

#: The columns a closed-form fit reads (the label comes with every CTR shard).
USER_ITEM = tuple(f for f in SPARSE_FEATURES if f.name in ("user_idx", "item_idx"))


def positives_matrix(user_idx: np.ndarray, item_idx: np.ndarray, label: np.ndarray, n_users: int,
                     n_items: int) -> sparse.csr_matrix:
    """R: (n_users, n_items) float32 CSR, 1 where the user has a label-1 row for the item (a pair with several
    positive rows counts once); the OOV user and item rows stay empty, as do ids outside the vocabularies.

    >>> positives_matrix(np.array([1, 1, 2, 0, 2]), np.array([2, 2, 1, 1, 3]), np.array([1, 1, 1, 1, 0]), 3, 4
    ...                  ).toarray().tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    """
    u, i = np.asarray(user_idx, np.int64), np.asarray(item_idx, np.int64)
    keep = (np.asarray(label) > 0.5) & (u > OOV_INDEX) & (u < n_users) & (i > OOV_INDEX) & (i < n_items)
    r = sparse.coo_matrix((np.ones(int(keep.sum()), np.float32), (u[keep], i[keep])), shape=(n_users, n_items))
    r = r.tocsr()
    r.data[:] = 1.0  # duplicates were summed
    return r


def load_fitted(model, fitted: Mapping[str, object]) -> None:
    """Copy ``fitted`` (``{state-dict key: (rows, cols) scipy.sparse or array}``) into ``model``'s state in place:
    a sharded table (DistributedModelParallel) gets the rows and columns of its local shards, densified one shard
    at a time; an unsharded tensor or buffer the whole value.

    Raises:
        KeyError: a key the model's state lacks.
        ValueError: a value of another shape than the model's tensor.
    """
    state = model.state_dict()
    missing = sorted(set(fitted) - set(state))
    if missing:
        raise KeyError(f"the closed-form fit gives {missing}, which the model's state lacks; its keys: {sorted(state)}")
    for key, value in fitted.items():
        dst = state[key]
        if tuple(value.shape) != tuple(dst.size()):
            raise ValueError(f"{key}: the fit gives {tuple(value.shape)}, the model holds {tuple(dst.size())}")
        copy_full_into(dst, value, lambda block: torch.from_numpy(_dense(block)))  # densified a shard at a time


def _dense(value) -> np.ndarray:
    return np.asarray(value.toarray() if sparse.issparse(value) else value, np.float32)


class ClosedFormTask:
    """A model with ``closed_form(R) -> {state-dict key: value}`` fitted from the whole train split's positives
    (see the module docstring); no step, no gradient, no validation."""

    name = "closed_form"
    monitor = None
    levers = ()
    result_keys = ("train_rows", "positives", "users", "items", "fit_s")
    steps_per_epoch = 0

    def __init__(self, ctx: TaskContext) -> None:
        from training.data import read_ctr_shard

        self.ctx = ctx
        t0 = time.perf_counter()
        train = read_ctr_shard(ctx.lake_dir, "train", rank=0, world_size=1, features=USER_ITEM)  # the whole split
        self.positives = positives_matrix(train.ids["user_idx"], train.ids["item_idx"], train.label,
                                          ctx.vocab["user"], ctx.vocab["item"])  # (U, R_items)
        self.figures = {"train_rows": len(train), "positives": int(self.positives.nnz),
                        "users": int((np.diff(self.positives.indptr) > 0).sum()),
                        "items": int((np.bincount(self.positives.indices, minlength=ctx.vocab["item"]) > 0).sum())}
        self._read_s = time.perf_counter() - t0

    def bind(self, dmp) -> None:
        """Fit: the model's ``closed_form(R)`` copied into this rank's shards."""
        from torchrec.distributed.model_parallel import get_unwrapped_module

        t0 = time.perf_counter()
        module = get_unwrapped_module(dmp)
        if not hasattr(module, "closed_form"):
            raise TypeError(f"model {self.ctx.spec.name} is trained by the closed_form task but its module "
                            f"{type(module).__name__} has no closed_form(positives) method")
        load_fitted(dmp, module.closed_form(self.positives))
        self.figures["fit_s"] = round(self._read_s + time.perf_counter() - t0, 3)
        self.ctx.log(f"closed-form fit: {self.figures}")

    def batches(self, epoch: int) -> Iterator:
        return iter(())

    def loss(self, dmp, batch) -> torch.Tensor:
        raise NotImplementedError("the closed_form task takes no step")

    def end_epoch(self, epoch: int, train_s: float) -> dict:
        return dict(self.figures)

    def evaluate(self, dmp, split: str) -> dict:
        raise NotImplementedError("the closed_form task has no validation split")

    def summary(self) -> dict:
        return dict(self.figures)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def finish(self, state: dict) -> dict:
        return {}
