"""User-based collaborative filtering (Resnick, Iacovou, Suchak, Bergstrom & Riedl 1994, "GroupLens: an open
architecture for collaborative filtering of netnews"), cosine neighbourhood over every train user, no truncation:

    score(u, j) = sum over v of cos(u, v) * R[v, j],    cos(u, v) = <r_u, R[v]> / (|r_u| |R[v]|)

with R the binary (U, R_items) matrix of the train split's positive interactions (label 1: rating >= 4; a pair
rated twice counts once; the OOV user and item rows 0 left out) and r_u the binary row of the distinct items of
the user's point-in-time history (what the query encoder is given: the replay's ``hist_item_idx``, at most
``features.definitions.MAX_HISTORY`` items rated strictly before the case; serving's profile) -- not the user's train
row, so a user who arrived after the train period is scored from what they did so far. A train user is its own
neighbour (cos(u, u) R[u, j] only raises items of u's own train row, which the replay and the service exclude as
seen). Fitted in closed form by the ``closed_form`` task (``training.tasks.closed_form``).

As a retriever it is EXACT through the platform's cosine index: the query is ``s_u = R_hat r_hat_u`` (U-dim, the
cosine of r_u with every train user's row; ``SimilarUsers``) and the item vectors are the columns of R,
unnormalised (``R[:, j]``, U-dim), so ``<s_u, R[:, j]> = score(u, j)``: an inner product, so the exported vectors are
MIPS-transformed (``training.query.mips_items``, as MF's) and the cosine HNSW index returns the inner-product order.
An item without a train positive has the vector ``[0, M]``: inner product 0 with every ``[s_u, 0]`` = its score.
A history that shares no item with any train user gives no query: the replay and the service fall back to
popularity.

The model holds R's columns as its item table (``t_item``) and ``1 / |R[v]|`` as the buffer ``user_scale`` (D,),
so that the forward, the query encoder and the exported vectors all read the saved state alone.

Memory: the item table is dense, (R_items, D) float32 with D = U rounded up to a multiple of 4 -- O(U * R_items)
floats in the sharded table, the gathered state, ``model.pt`` and the exported vectors (D + 1 wide after MIPS).
``max_table_floats`` caps it: above the cap the build raises ``NeighbourhoodTooLargeError`` before any table is
allocated. The fit (scipy.sparse) and the query encoder hold O(nnz); a query costs O(sum of its items' positives).

Parts:
    SparseArch   KJT (item_idx, hist_item_idx) -> (B, 2, D)    the item table, both features sum-pooled

Legend: B batch size, U user rows (OOV row 0 included), R_items item rows (OOV row 0 included), D item vector dim
(U rounded up to a multiple of 4), nnz the train positives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from torch import nn
from torchrec import KeyedJaggedTensor

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules.neighbourhood import (CF_FEATURES, ITEM_TABLE, NeighbourhoodTooLargeError, check_table_size,
                                           history_matrix, item_columns)
from training.modules import SparseArch, table_configs
from training.query import QueryEncoder, mips_items
from training.spec import ModelSpec, TrainDefaults, register

USER_SCALE = "user_scale"

__all__ = ["NeighbourhoodTooLargeError", "SimilarUsers", "UserCF", "UserCFConfig", "USER_SCALE"]


@dataclass(frozen=True)
class UserCFConfig:
    """User-based CF has no hyper-parameter without neighbour truncation; the config holds its memory cap.

    Args:
        max_table_floats: the largest item table (R_items x D floats) the model builds; >= 1.

    Raises:
        ValueError: ``max_table_floats`` < 1.
    """

    max_table_floats: int = 100_000_000  # 400 MB as float32

    def __post_init__(self) -> None:
        if self.max_table_floats < 1:
            raise ValueError(f"max_table_floats must be >= 1, got {self.max_table_floats}")


class UserCF(nn.Module):
    """R's columns as the item table, ``1 / |R[v]|`` per user, and the UserCF score of candidates given a history.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: the memory cap.
        sparse_device: device of the table; ``meta`` before sharding with DMP (``user_scale`` is a plain buffer,
            replicated by DMP).

    Raises:
        NeighbourhoodTooLargeError: the table would exceed ``config.max_table_floats``.

    Call: ``forward(features: KJT with keys item_idx (one id per row) and hist_item_idx (the history's distinct
    items), B rows each, dense: ignored) -> scores (B,)``: ``<s_u, R[:, item]>`` with
    ``s_u = (R r_u) * user_scale / sqrt(|history|)``.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: UserCFConfig = UserCFConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = int(vocab_sizes["user"]), int(vocab_sizes["item"])
        _, dim = check_table_size("usercf", vocab_sizes, config.max_table_floats)
        self.sparse_arch = SparseArch(table_configs(CF_FEATURES, vocab_sizes, dim, init_range=0.0),
                                      device=sparse_device)
        self.register_buffer(USER_SCALE, torch.zeros(dim))  # (D,) 1 / |R[v]|, 0 for a user without a positive

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.sparse_arch(features)  # (B, 2, D): R[:, item], R r_u (the sum of the history's columns)
        n = features["hist_item_idx"].lengths().clamp_min(1).to(emb.dtype)  # (B,) |r_u|^2
        similarity = emb[:, 1] * self.user_scale / n.sqrt()[:, None]  # (B, D) s_u
        return (similarity * emb[:, 0]).sum(dim=1)  # (B,)

    def closed_form(self, positives: sparse.csr_matrix) -> dict:
        """The fitted state from R, the (U, R_items) binary matrix of train positives
        (``training.tasks.closed_form.positives_matrix``): ``{ITEM_TABLE: (R_items, D) scipy.sparse float32 (R's
        columns), USER_SCALE: (D,) float32}``. O(nnz + D) memory.

        Raises:
            ValueError: ``positives`` is not (U, R_items) for this model's vocabularies.
        """
        items = item_columns(positives, (self.n_users, self.n_items), normalise=False)  # (R_items, D)
        norms = np.sqrt(np.asarray(items.sum(axis=0)).ravel())  # (D,) |R[v]|: binary rows, so sqrt(count)
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
        return {ITEM_TABLE: items, USER_SCALE: scale}


@dataclass
class SimilarUsers(QueryEncoder):
    """UserCF's query ``[s_u, 0]``: ``s_u[v] = cos(r_u, R[v]) = (R r_u)[v] / (|r_u| |R[v]|)`` from the distinct items
    of the user's point-in-time history (r_u binary; the user id is not read), padded with the MIPS column.

    Args:
        items: (R_items, D) R's columns as rows (scipy.sparse, O(nnz) memory, or dense).
        user_scale: (D,) ``1 / |R[v]|`` (0 for a user without a positive).
        extra: zero columns appended (the MIPS column).

    >>> enc = SimilarUsers(np.array([[0, 0], [1, 1], [1, 0]], np.float32), np.array([0.5 ** 0.5, 1.0]))
    >>> q, ok = enc.encode(np.array([1, 2]), [np.array([2]), np.array([0])])
    >>> q.astype(np.float64).round(3).tolist(), ok.tolist()
    ([[0.707, 0.0, 0.0], [0.0, 0.0, 0.0]], [True, False])
    """

    items: sparse.spmatrix | np.ndarray
    user_scale: np.ndarray
    extra: int = 1
    name = "cosine with every train user"

    def __post_init__(self) -> None:
        self.items = sparse.csr_matrix(self.items, dtype=np.float64)
        self.user_scale = np.asarray(self.user_scale, np.float64)

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        h = history_matrix(history, self.items.shape[0])  # (B, R_items) r_u
        norm = np.sqrt(np.asarray(h.sum(axis=1)).ravel())  # (B,) |r_u|
        overlap = (h @ self.items).toarray()  # (B, D) R r_u
        s = overlap * self.user_scale / np.maximum(norm, 1.0)[:, None]  # (B, D)
        q = np.hstack([s, np.zeros((len(s), self.extra))]).astype(np.float32)
        return q, np.abs(s).sum(axis=1) > 0


def item_vectors(state: dict, config: UserCFConfig) -> np.ndarray:
    """(R_items, D + 1): R's columns MIPS-transformed (``training.query.mips_items``), searched by cosine."""
    return mips_items(state[ITEM_TABLE].numpy())


def query_encoder(state: dict, config: UserCFConfig) -> SimilarUsers:
    """``SimilarUsers`` over the saved item table (kept scipy-sparse: O(nnz)) and ``user_scale``."""
    return SimilarUsers(sparse.csr_matrix(state[ITEM_TABLE].numpy()), state[USER_SCALE].numpy(), extra=1)


SPEC = register(ModelSpec(
    name="usercf", kind="retriever", task="closed_form", config=UserCFConfig,
    build=lambda vocab_sizes, config, sparse_device=None: UserCF(vocab_sizes, config, sparse_device=sparse_device),
    train=TrainDefaults(epochs=1, batch_size=1, lr_sparse=0.0),  # one epoch of no step: the fit is closed form
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Resnick, Iacovou, Suchak, Bergstrom & Riedl 1994, GroupLens: an open architecture for collaborative "
          "filtering of netnews",
    item_table=ITEM_TABLE,
    item_vectors=item_vectors,
    query_encoder=query_encoder,
))
