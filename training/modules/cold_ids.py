"""Ids the training split never saw: one trained out-of-vocabulary row for all of them, learnt by id dropout.

The vocabularies give every id ever seen its own row (``features.vocab``), so a user who first rates after the
split's train period has a row, but a row that training never touched: it still holds its random initial
values. On MovieLens-100K's global time split that is most of the evaluation: about 85% of the valid and test
samples belong to users with no train sample (the users join over time), and their random rows add noise to
the FM interaction and to the DNN's input.

Two parts, as production systems treat ids below a frequency threshold (e.g. Monolith's feature admission,
Liu et al. 2022; ``min_count`` in ``features.vocab``):

- **Id dropout** (training): each train sample's user id and candidate item id is replaced by the OOV row
  (``features.vocab.OOV_INDEX``) independently with probability ``p`` (:func:`drop_ids`), so the OOV row learns
  what an unknown id looks like on average, and the side features (age, gender, occupation, zip, genres; DIN's
  behaviour sequence) learn to carry the signal without the id.
- **Cold remap** (evaluation and export): a row with no train sample (count 0) is read as the OOV row
  (:func:`cold_remap` on the inputs during training's evaluation; :func:`fill_cold_rows` on the saved state,
  so that every later reader, the serving ranker included, gets the same answer with no remap of its own).

Legend: V rows of a table, N ids, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from features.vocab import OOV_INDEX


def cold_remap(counts: np.ndarray) -> np.ndarray:
    """The row each id is read from: itself when it has train samples, else ``OOV_INDEX``.

    Args:
        counts: (V,) train samples per id (``training.modules.regularization.sample_counts``).

    Returns:
        (V,) int64.

    >>> cold_remap(np.array([0, 3, 0, 1])).tolist()
    [0, 1, 0, 3]
    """
    ids = np.arange(len(counts), dtype=np.int64)
    return np.where(np.asarray(counts) > 0, ids, OOV_INDEX).astype(np.int64)


def drop_ids(ids: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """``ids`` with each one replaced by ``OOV_INDEX`` with probability ``p`` (a copy; ``p`` 0 returns ``ids``).

    Args:
        ids: (N,) int64.
        p: in [0, 1).

    Raises:
        ValueError: ``p`` outside [0, 1).

    >>> drop_ids(np.arange(1, 6), 0.0, np.random.default_rng(0)).tolist()
    [1, 2, 3, 4, 5]
    >>> int((drop_ids(np.arange(1, 10001), 0.3, np.random.default_rng(0)) == 0).sum())  # about 3,000
    3008
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"id dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return ids
    return np.where(rng.random(len(ids)) < p, OOV_INDEX, ids).astype(np.int64)


def fill_cold_rows(state: Mapping[str, torch.Tensor], counts: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Copy each table's OOV row into its cold rows (count 0), in place, in every weight of ``state`` that belongs
    to the table: ``*.<table>.weight`` (the embedding and, in DeepFM, the first-order weight).

    After it, looking up a cold id gives exactly what :func:`cold_remap` gives at evaluation.

    Args:
        state: a full (unsharded) state dict, e.g. ``training.distributed.gather_full_state_dict``'s.
        counts: ``{table: (V,) train samples per id}``.

    Returns:
        ``{table: cold rows filled}`` (the OOV row itself not counted).

    Raises:
        ValueError: a table of ``counts`` has no weight in ``state``, or a weight's rows differ from V.
    """
    filled = {}
    for table, n in counts.items():
        keys = [k for k in state if k.endswith(f".{table}.weight")]
        if not keys:
            raise ValueError(f"no weight of table {table!r} in the state dict")
        cold = torch.from_numpy(np.flatnonzero(np.asarray(n) == 0))
        cold = cold[cold != OOV_INDEX]
        for k in keys:
            w = state[k]
            if w.shape[0] != len(n):
                raise ValueError(f"{k} has {w.shape[0]} rows, the counts {len(n)}")
            w[cold] = w[OOV_INDEX].clone()
        filled[table] = int(len(cold))
    return filled
