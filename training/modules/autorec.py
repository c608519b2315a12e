"""Parts of the item-based autoencoder retriever (I-AutoRec; Sedhain, Menon, Sanner & Xie 2015, "AutoRec:
Autoencoders Meet Collaborative Filtering"): the partially observed item x user matrix of a split, the masked
reconstruction error, and the ridge fold-in of a user who has no trained decoder row.

Legend: R item rows, U user rows (OOV rows 0 included), B items per batch, H hidden units, L history length,
C queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import sparse

from features.vocab import OOV_INDEX


def observed_matrix(user_idx: np.ndarray, item_idx: np.ndarray, target: np.ndarray, n_users: int,
                    n_items: int) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """The (R, U) item x user matrices of one split: ``values`` holds the target of every observed (item, user)
    pair (the mean when a user rated an item more than once), ``mask`` a 1 where the pair is observed -- kept apart,
    since an observed target of 0 (a label-0 row) is not an unobserved entry. The OOV rows 0 and ids outside the
    vocabularies are left out.

    >>> v, m = observed_matrix(np.array([1, 1, 2, 0]), np.array([2, 2, 1, 1]), np.array([1.0, 0.0, 0.0, 1.0]), 3, 3)
    >>> v.toarray().tolist(), m.toarray().tolist()
    ([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    """
    u, i = np.asarray(user_idx, np.int64), np.asarray(item_idx, np.int64)
    keep = (u > OOV_INDEX) & (u < n_users) & (i > OOV_INDEX) & (i < n_items)
    pairs, which = np.unique(i[keep] * n_users + u[keep], return_inverse=True)  # sorted by (item, user)
    mean = np.bincount(which, np.asarray(target, np.float64)[keep], len(pairs)) / np.bincount(which, None, len(pairs))
    rows, cols = pairs // n_users, pairs % n_users
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_items))])
    values = sparse.csr_matrix((mean.astype(np.float32), cols, indptr), shape=(n_items, n_users))
    mask = sparse.csr_matrix((np.ones(len(pairs), np.float32), cols, indptr), shape=(n_items, n_users))
    return values, mask


def masked_sse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               unobserved_weight: float = 0.0) -> torch.Tensor:
    """Each item's squared reconstruction error, the paper's ``|| (r_i - h(r_i; theta)) * m_i ||^2`` over its
    observed users only when ``unobserved_weight`` is 0 (an unobserved entry contributes nothing, whatever is
    reconstructed there); with ``unobserved_weight`` w > 0 every unobserved entry also counts, with weight w, as
    a target of 0 (the entry's target is 0 where unobserved).

    Args:
        reconstruction, target, mask: (B, U); ``mask`` 1 on observed entries, 0 elsewhere.
        unobserved_weight: w in [0, 1].

    Returns:
        (B,) weighted sums of squared errors.

    >>> masked_sse(torch.tensor([[0.5, 9.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])).tolist()
    [0.25]
    >>> masked_sse(torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 0.5).tolist()
    [2.25]
    """
    weight = mask if unobserved_weight == 0 else mask + unobserved_weight * (1.0 - mask)  # (B, U)
    return ((reconstruction - target) ** 2 * weight).sum(dim=1)


class RidgeFoldIn:
    """Decoder rows for users the model has no row for, fitted to their history as training fits a row:

        v = argmin sum over i in H(u) of (1 - <v, x_i>)^2 + w * sum over coded i not in H(u) of <v, x_i>^2
            + penalty * |v|^2

    with ``x_i`` item i's row of ``codes``, H(u) the distinct items of the history that have a code (a row not all
    zero) and w the unobserved entries' weight. The normal equations ``(M + (1 - w) X_H^T X_H) v = X_H^T 1``, with
    ``M = w X^T X + penalty I`` inverted once, are solved per user in the L x L space of the history by Woodbury's
    identity (L <= the history length, not H').

    Args:
        codes: (R, H') item codes (e.g. the hidden code with a trailing 1 for the decoder bias).
        penalty: > 0, the ridge weight.
        unobserved_weight: w in [0, 1].

    Raises:
        ValueError: ``penalty`` <= 0 or w outside [0, 1].

    Call: ``__call__(history: C arrays of item_idx) -> ((C, H') float32 rows, (C,) bool: the history had an item
    with a code; a row without one is 0)``.

    >>> fold = RidgeFoldIn(np.array([[0, 0], [1, 0], [0, 2]], np.float32), penalty=1.0)
    >>> v, ok = fold([np.array([1]), np.array([0])])
    >>> v.round(3).tolist(), ok.tolist()
    ([[0.5, 0.0], [0.0, 0.0]], [True, False])
    """

    def __init__(self, codes: np.ndarray, penalty: float, unobserved_weight: float = 0.0) -> None:
        if penalty <= 0 or not 0 <= unobserved_weight <= 1:
            raise ValueError(f"the fold-in needs penalty > 0 and unobserved_weight in [0, 1], got {penalty}, "
                             f"{unobserved_weight}")
        self.codes = np.asarray(codes, np.float64)
        self.coded = np.abs(self.codes).sum(axis=1) > 0  # (R,)
        self.w = float(unobserved_weight)
        m = self.w * self.codes.T @ self.codes + penalty * np.eye(self.codes.shape[1])  # (H', H')
        self.m_inv = np.linalg.inv(m)

    def __call__(self, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros((len(history), self.codes.shape[1]), np.float32)
        ok = np.zeros(len(history), bool)
        for c, h in enumerate(history):
            h = np.unique(np.asarray(h, np.int64))
            h = h[(h >= 0) & (h < len(self.codes))]
            h = h[self.coded[h]]
            if not h.size:
                continue
            x = self.codes[h]  # (L, H')
            mx = self.m_inv @ x.T  # (H', L)
            v = mx.sum(axis=1)  # M^-1 X_H^T 1
            if self.w < 1:  # Woodbury: (M + (1 - w) X^T X)^-1 = M^-1 - M^-1 X^T (I / (1 - w) + X M^-1 X^T)^-1 X M^-1
                s = np.eye(len(h)) / (1 - self.w) + x @ mx  # (L, L)
                v = v - mx @ np.linalg.solve(s, x @ v)
            out[c], ok[c] = v, True
        return out, ok
