"""Query encoders: how a retriever turns what is known about a user at a point in time into a query vector for ANN
search over its item vectors (cosine, ``serving.ann``).

Every model with an item table answers through one: by default ``RecentItemsMean`` (the mean of the L2-normalised
vectors of the user's most recent items, item2vec's query); a model whose user representation is its own declares
its encoder in its file (``ModelSpec.query_encoder``, e.g. matrix factorisation's user vector). The replay and the
HTTP service call ``encode`` and search the item vectors the model exported (``ModelSpec.item_vectors``), so each
retriever is evaluated and served as what it is.

A model scored by an inner product ``<q, v_i>`` (not a cosine) exports MIPS-transformed item vectors
(``mips_items``): with every item vector of the same norm, cosine order equals inner-product order, so the same
HNSW cosine index serves both (Bachrach et al. 2014, "Speeding up the Xbox recommender system using a Euclidean
transformation for inner-product spaces").

Legend: B queries, L history length, R item rows, D item vector dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class QueryEncoder:
    """The retriever interface: ``encode`` users at a point in time into (B, D) queries.

    Call: ``encode(user_idx (B,) int64, history: B arrays of item_idx, most recent last) -> (queries (B, D)
    float32, has_query (B,) bool)``; a row without a query (no usable history) gets the popularity fallback.
    """

    name = "query"

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


@dataclass
class RecentItemsMean(QueryEncoder):
    """The mean of the L2-normalised item vectors of the user's ``n_recent`` most recent items (those with a row
    in ``vectors``, item 0 excluded).

    Args:
        vectors: (R, D) item vectors, row = item_idx.
        n_recent: items of the history used.

    >>> enc = RecentItemsMean(np.array([[0, 0], [3, 4], [0, 2], [1, 0]], np.float32), n_recent=2)
    >>> q, ok = enc.encode(np.array([7, 8]), [np.array([1, 2, 3]), np.array([0])])
    >>> q.round(3).tolist(), ok.tolist()
    ([[0.5, 0.5], [0.0, 0.0]], [True, False])
    """

    vectors: np.ndarray
    n_recent: int = 5
    name = "mean of recent items"

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = len(self.vectors)
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        unit = np.divide(self.vectors, norms, out=np.zeros_like(self.vectors), where=norms > 0)  # (R, D)
        out = np.zeros((len(history), self.vectors.shape[1]), np.float32)
        ok = np.zeros(len(history), bool)
        for b, h in enumerate(history):
            h = np.asarray(h, np.int64)
            h = h[(h > 0) & (h < rows)][-self.n_recent:]
            if h.size:
                out[b], ok[b] = unit[h].mean(axis=0), True
        return out, ok


def mips_items(vectors: np.ndarray) -> np.ndarray:
    """(R, D) item vectors -> (R, D + 1) of equal norm ``M = max ||v||``, ``[v, sqrt(M^2 - ||v||^2)]``: the cosine
    of ``[q, 0]`` with them orders items as ``<q, v>`` (Bachrach et al. 2014).

    >>> v = mips_items(np.array([[3.0, 4.0], [1.0, 0.0]], np.float32))
    >>> np.linalg.norm(v, axis=1).round(4).tolist()
    [5.0, 5.0]
    """
    sq = (vectors.astype(np.float64) ** 2).sum(axis=1)
    extra = np.sqrt(np.maximum(sq.max(initial=0.0) - sq, 0.0))[:, None]  # (R, 1)
    return np.hstack([vectors, extra]).astype(np.float32)


@dataclass
class UserVector(QueryEncoder):
    """The user's own row of a user table, padded to the MIPS item vectors' width: ``[u, 0]`` (``mips_items``).
    A user beyond the table is read as the OOV row 0.

    Args:
        users: (U, D) user vectors, row = user_idx.
        extra: zero columns appended (the MIPS column).
    """

    users: np.ndarray
    extra: int = 1
    name = "user vector"

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(user_idx, np.int64)
        idx = np.where((idx >= 0) & (idx < len(self.users)), idx, 0)
        q = np.hstack([self.users[idx], np.zeros((len(idx), self.extra), self.users.dtype)])
        return q.astype(np.float32), np.ones(len(idx), bool)


def own_query_encoder(model_folder) -> tuple[QueryEncoder | None, dict]:
    """The query encoder the model saved in ``model_folder`` declares (``ModelSpec.query_encoder``, built from the
    saved state), or None for a model queried by its recent items (``RecentItemsMean`` over the searched vectors);
    and the folder's ``meta.json``, read once.

    Raises:
        ModelOutputError: the folder's files are missing or unusable.
    """
    from training.artifacts import ModelLayout, read_meta
    from training.registry import get_model

    meta = read_meta(model_folder)
    spec = get_model(meta["model"])
    if spec.query_encoder is None:
        return None, meta
    import torch

    state = torch.load(ModelLayout(model_folder).state, map_location="cpu", weights_only=True)
    return spec.query_encoder(state, spec.config_from_dict(meta["model_config"])), meta
