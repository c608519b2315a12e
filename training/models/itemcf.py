"""Item-based collaborative filtering (Sarwar, Karypis, Konstan & Riedl 2001, "Item-based collaborative filtering
recommendation algorithms"), cosine neighbourhood without neighbour truncation:

    score(u, j) = sum over i in H(u) of cos(i, j),    cos(i, j) = <R[:, i], R[:, j]> / (|R[:, i]| |R[:, j]|)

with R the binary (U, R_items) matrix of the train split's positive interactions (label 1: rating >= 4; a pair
rated twice counts once; the OOV user and item rows 0 are left out) and H(u) the distinct items of the user's
point-in-time history (what the query encoder is given: the replay's ``hist_item_idx``, items rated strictly before
the case, at most ``features.definitions.MAX_HISTORY``; serving's profile). Fitted in closed form by the
``closed_form`` task (``training.tasks.closed_form``): nothing is learnt by gradient.

As a retriever it is EXACT through the platform's cosine index: the item vectors are the L2-normalised columns of R
(``v_j = R[:, j] / |R[:, j]|``, U-dim) and the query is their SUM over H(u) (``HistorySum``; the mean would rank
the same), so ``<q_u, v_j> = score(u, j)``; every item with a train positive has ``|v_j| = 1``, hence the cosine
the HNSW index computes orders items as ``score``. An item without a train positive has the zero vector: the index
keeps it zero (``serving.ann.l2_normalise``), its inner product with every query is 0 = its ItemCF score, so it
ties with the other items no history item co-occurs with, below every item that does. A history none of whose
items has a train positive gives no query: the replay and the service fall back to popularity.

Memory: the item table is dense, (R_items, D) float32 with D = U rounded up to a multiple of 4 (zero columns; FBGEMM's
fused kernels) -- O(U * R_items) floats in the sharded table, the gathered state, ``model.pt`` and the exported
vectors (ML-100K: 1683 x 944 = 1.6M floats, 6.4 MB; ML-1M: 3707 x 6044 = 22M, 90 MB). ``max_table_floats`` caps
it: a vocabulary above the cap raises ``NeighbourhoodTooLargeError`` when the model is built, before any table is
allocated. The fit itself (scipy.sparse) and the query encoder hold O(nnz) (R's positives), not O(U * R_items).

Parts:
    SparseArch   KJT (item_idx, hist_item_idx) -> (B, 2, D)    the item table, both features sum-pooled

Legend: B batch size, U user rows (OOV row 0 included), R_items item rows (OOV row 0 included), D item vector dim
(U rounded up to a multiple of 4), L history length, nnz the train positives.
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
from training.modules import SparseArch, table_configs
from training.modules.neighbourhood import (CF_FEATURES, ITEM_TABLE, check_table_size, history_matrix,
                                           item_columns)
from training.query import QueryEncoder
from training.spec import ModelSpec, TrainDefaults, register


@dataclass(frozen=True)
class ItemCFConfig:
    """Item-based CF has no hyper-parameter without neighbour truncation; the config holds its memory cap.

    Args:
        max_table_floats: the largest item table (R_items x D floats) the model builds; >= 1.

    Raises:
        ValueError: ``max_table_floats`` < 1.
    """

    max_table_floats: int = 100_000_000  # 400 MB as float32

    def __post_init__(self) -> None:
        if self.max_table_floats < 1:
            raise ValueError(f"max_table_floats must be >= 1, got {self.max_table_floats}")


class ItemCF(nn.Module):
    """The item table of L2-normalised columns of R, and the ItemCF score of candidates given a history.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: the memory cap.
        sparse_device: device of the table; ``meta`` before sharding with DMP.

    Raises:
        NeighbourhoodTooLargeError: the table would exceed ``config.max_table_floats``.

    Call: ``forward(features: KJT with keys item_idx (one id per row) and hist_item_idx (the history's distinct
    items), B rows each, dense: ignored) -> scores (B,)``: ``sum over i in history of cos(i, item)``.

    >>> from training.data import synthetic_vocab_sizes
    >>> ItemCF(synthetic_vocab_sizes()).state_dict()[ITEM_TABLE].shape  # (R_items, D), zero until fitted
    torch.Size([40, 32])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: ItemCFConfig = ItemCFConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = int(vocab_sizes["user"]), int(vocab_sizes["item"])
        _, dim = check_table_size("itemcf", vocab_sizes, config.max_table_floats)
        self.sparse_arch = SparseArch(table_configs(CF_FEATURES, vocab_sizes, dim, init_range=0.0),
                                      device=sparse_device)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.sparse_arch(features)  # (B, 2, D): the item's vector, the sum of the history's vectors
        return (emb[:, 0] * emb[:, 1]).sum(dim=1)  # (B,)

    def closed_form(self, positives: sparse.csr_matrix) -> dict:
        """The fitted table from R, the (U, R_items) binary matrix of train positives
        (``training.tasks.closed_form.positives_matrix``): ``{ITEM_TABLE: (R_items, D) scipy.sparse float32}``,
        row j = ``R[:, j] / |R[:, j]|`` (0 for an item without a positive). O(nnz) memory.

        Raises:
            ValueError: ``positives`` is not (U, R_items) for this model's vocabularies.
        """
        return {ITEM_TABLE: item_columns(positives, (self.n_users, self.n_items), normalise=True)}


@dataclass
class HistorySum(QueryEncoder):
    """ItemCF's query: the SUM of the item vectors of ALL the distinct items of the user's point-in-time history
    (not only the recent ones: ``training.query.RecentItemsMean`` with ``n_recent`` >= L would rank the same for a
    history without repeats, but counts a repeated item twice and answers a zero query for a history of items
    without a train positive, which this encoder leaves to the popularity fallback). The user id is not read.

    Args:
        vectors: (R_items, D) item vectors, scipy.sparse (O(nnz) memory) or dense.

    >>> enc = HistorySum(sparse.csr_matrix(np.array([[0, 0], [1, 0], [0, 1], [0, 0]], np.float32)))
    >>> q, ok = enc.encode(np.array([7, 8]), [np.array([1, 2, 2]), np.array([3, 0])])
    >>> q.tolist(), ok.tolist()
    ([[1.0, 1.0], [0.0, 0.0]], [True, False])
    """

    vectors: sparse.spmatrix | np.ndarray
    name = "sum of the history's items"

    def __post_init__(self) -> None:
        self.vectors = sparse.csr_matrix(self.vectors, dtype=np.float64)

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        h = history_matrix(history, self.vectors.shape[0])  # (B, R_items)
        out = (h @ self.vectors).toarray().astype(np.float32)  # (B, D)
        return out, np.abs(out).sum(axis=1) > 0


def query_encoder(state: dict, config: ItemCFConfig) -> HistorySum:
    """``HistorySum`` over the saved item table (kept scipy-sparse: O(nnz))."""
    return HistorySum(sparse.csr_matrix(state[ITEM_TABLE].numpy()))


SPEC = register(ModelSpec(
    name="itemcf", kind="retriever", task="closed_form", config=ItemCFConfig,
    build=lambda vocab_sizes, config, sparse_device=None: ItemCF(vocab_sizes, config, sparse_device=sparse_device),
    train=TrainDefaults(epochs=1, batch_size=1, lr_sparse=0.0),  # one epoch of no step: the fit is closed form
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Sarwar, Karypis, Konstan & Riedl 2001, Item-based collaborative filtering recommendation algorithms",
    item_table=ITEM_TABLE,
    query_encoder=query_encoder,
))
