"""Parts of the neighbourhood retrievers (ItemCF, UserCF): the features they read, the memory cap of their
users-wide item table, the sparse history matrix of a batch of queries, and the columns of the train user x item
matrix as item vectors.

Legend: U users (rows of the user vocabulary), R item rows, D table width (U rounded up to a multiple of 4), B
queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse

from features.definitions import HISTORY_FEATURE, SPARSE_FEATURES
from features.errors import PlatformError
from features.vocab import OOV_INDEX

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
