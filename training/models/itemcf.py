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

from features.definitions import HISTORY_FEATURE, SPARSE_FEATURES
from features.errors import PlatformError
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from features.vocab import OOV_INDEX
from training.modules import SparseArch, table_configs
from training.query import QueryEncoder
from training.spec import ModelSpec, TrainDefaults, register

#: The features the forward reads: the candidate item and the history, both from the item table.
CF_FEATURES = (next(f for f in SPARSE_FEATURES if f.name == "item_idx"), HISTORY_FEATURE)
ITEM_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"


class NeighbourhoodTooLargeError(PlatformError, ValueError):
    """A neighbourhood model's dense item table (R_items x D floats) would exceed its config's ``max_table_floats``."""


def table_dim(n_users: int) -> int:
    """D: the user rows rounded up to a multiple of 4 (the extra columns stay 0).

    >>> table_dim(30), table_dim(944)
    (32, 944)
    """
    return -(-int(n_users) // 4) * 4


def check_table_size(model: str, vocab_sizes: Mapping[str, int], max_table_floats: int) -> tuple[int, int]:
    """(R_items, D) of a neighbourhood model's item table.

    Raises:
        NeighbourhoodTooLargeError: R_items * D > ``max_table_floats`` (the message gives both and the fix).
    """
    rows, dim = int(vocab_sizes["item"]), table_dim(vocab_sizes["user"])
    if rows * dim > max_table_floats:
        raise NeighbourhoodTooLargeError(
            f"model {model}: its item table would be {rows} items x {dim} users = {rows * dim:,} floats "
            f"({rows * dim * 4 / 2**30:.1f} GiB as float32, held several times: the sharded table, the gathered "
            f"state, model.pt, the exported vectors), above max_table_floats={max_table_floats:,}; raise it "
            f"(--option max_table_floats=N) only where the memory is there, or use a factorised retriever")
    return rows, dim


def history_matrix(history: Sequence[np.ndarray], rows: int) -> sparse.csr_matrix:
    """(B, rows) binary: row b marks the distinct items of ``history[b]`` that exist in a table of ``rows`` rows,
    the OOV row 0 excluded (the indicator vector r_u of each user's point-in-time history).

    >>> history_matrix([np.array([3, 0, 3, 9, 1]), np.array([], np.int64)], rows=5).toarray().tolist()
    [[0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    """
    cols = [np.unique(h[(h > OOV_INDEX) & (h < rows)]) for h in (np.asarray(h, np.int64) for h in history)]
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])])
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(indices), np.float64), indices, indptr), shape=(len(history), rows))


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


def item_columns(positives: sparse.spmatrix, shape: tuple[int, int], normalise: bool) -> sparse.csr_matrix:
    """R's columns as the rows of a (R_items, D) sparse float32 matrix, each L2-normalised when ``normalise``
    (an empty column stays 0); D = ``table_dim(U)``.

    Raises:
        ValueError: ``positives`` is not of ``shape`` (U, R_items).

    >>> r = sparse.csr_matrix(np.array([[0, 1, 1], [0, 1, 0]]))
    >>> item_columns(r, (2, 3), normalise=True).toarray().astype(np.float64).round(3).tolist()
    [[0.0, 0.0, 0.0, 0.0], [0.707, 0.707, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    """
    if positives.shape != tuple(shape):
        raise ValueError(f"the positives matrix is {positives.shape}, the model's vocabularies (user, item) "
                         f"{tuple(shape)}: fit it on the export it was built for")
    items = sparse.csr_matrix(positives.T, dtype=np.float64)  # (R_items, U)
    if normalise:
        norms = np.sqrt(np.asarray(items.multiply(items).sum(axis=1)).ravel())  # (R_items,)
        items = sparse.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ items
    items = sparse.csr_matrix(items, dtype=np.float32)
    items.resize((shape[1], table_dim(shape[0])))  # zero columns up to D
    return items


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
