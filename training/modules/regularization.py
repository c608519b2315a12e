"""Mini-batch aware regularisation of the id embeddings (Zhou et al. 2018, "Deep Interest Network for
Click-Through Rate Prediction", section 4.2).

An L2 penalty on a whole table costs a pass over all its rows per step, and the rows that do not occur in a batch
get no data gradient, so a plain L2 would shrink them for nothing. The paper penalises only the rows that occur in
the mini-batch, each scaled by the inverse of its frequency in the training set:

    penalty_m = lambda / 2 * sum_j alpha_mj * ||w_j||^2 / n_j
    w_j <- w_j - eta * ((1 / |B_m|) * sum_(x,y) in B_m d loss / d w_j + lambda * alpha_mj / n_j * w_j)

``alpha_mj`` is 1 when id ``j`` occurs in mini-batch ``m`` (however many times) and 0 otherwise; ``n_j`` is the
number of training samples in which ``j`` occurs. The 1/2 makes the penalty's gradient the paper's update term,
``lambda * w_j / n_j``, exactly.

The penalty is computed from the rows the model has just looked up (not from the table), so that with
optimizer-in-backward tables (TorchRec's fused row-wise Adagrad) its gradient reaches the fused kernel together
with the data gradient, through the same lookup; every row is counted once per batch by keeping only its first
occurrence among the lookups.

Legend: N rows looked up (one per id occurrence), D embedding dimension, V rows of a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def sample_counts(num_embeddings: int, one_hot: Sequence[np.ndarray] = (),
                  multi_hot: Sequence[tuple[np.ndarray, np.ndarray, int]] = ()) -> np.ndarray:
    """``n_j``: the number of samples in which id ``j`` occurs in any of the features that read one table, each
    sample counted once per id.

    Args:
        num_embeddings: V.
        one_hot: (N,) int arrays, one per one-hot feature reading the table, row i = sample i.
        multi_hot: ``(values (total,), offsets (N + 1,), max_len)`` per multi-hot feature; only the first
            ``max_len`` ids of a sample count (what the model looks up, e.g. DIN's ``max_history``).

    Returns:
        (V,) int64 counts.

    Raises:
        ValueError: the features disagree on the number of samples, or an id is outside [0, V).

    >>> sample_counts(5, [np.array([1, 1, 2])], [(np.array([1, 3, 3, 4]), np.array([0, 2, 2, 4]), 1)]).tolist()
    [0, 2, 1, 1, 0]
    """
    rows, ids = [], []
    sizes = {len(a) for a in one_hot} | {len(off) - 1 for _, off, _ in multi_hot}
    if len(sizes) > 1:
        raise ValueError(f"the features of one table cover different numbers of samples: {sorted(sizes)}")
    for a in one_hot:
        rows.append(np.arange(len(a), dtype=np.int64))
        ids.append(np.asarray(a, dtype=np.int64))
    for values, offsets, max_len in multi_hot:
        lengths = np.diff(offsets)
        row = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # (total,)
        position = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)  # place of each id in its sample
        keep = position < max_len
        rows.append(row[keep])
        ids.append(np.asarray(values, dtype=np.int64)[keep])
    if not ids:
        return np.zeros(num_embeddings, np.int64)
    row, idx = np.concatenate(rows), np.concatenate(ids)
    if len(idx) and (idx.min() < 0 or idx.max() >= num_embeddings):
        raise ValueError(f"ids must lie in [0, {num_embeddings}), got [{idx.min()}, {idx.max()}]")
    pairs = np.unique(row * num_embeddings + idx)  # one (sample, id) pair per sample
    return np.bincount(pairs % num_embeddings, minlength=num_embeddings).astype(np.int64)


class MiniBatchAwareL2(torch.nn.Module):
    """The mini-batch aware L2 penalty of a few tables (Zhou et al. 2018, section 4.2).

    Args:
        counts: ``{table: (V,) n_j}`` over the training set (``sample_counts``); ids with ``n_j = 0`` are treated
            as ``n_j = 1``.
        lam: lambda, >= 0.

    Raises:
        ValueError: ``lam`` < 0.

    Call: ``forward(lookups: {table: [(ids (N,) int64, rows (N, D) float), ...]}) -> scalar Tensor``: the rows
    the model looked up for those ids (several features may read one table, e.g. DIN's candidate and history);
    ``lam / 2 * sum over the distinct ids j of the batch of ||w_j||^2 / n_j``, each id once however often it
    occurs.

    >>> reg = MiniBatchAwareL2({"t": torch.tensor([0, 2, 4])}, lam=1.0)
    >>> w = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)  # rows 1 and 2 of table "t"
    >>> rows = w[[0, 1, 0]]  # id 1 occurs twice in the batch, id 2 once
    >>> p = reg({"t": [(torch.tensor([1, 2, 1]), rows)]})
    >>> p.item(), w.grad is None
    (1.0, True)
    >>> p.backward(); w.grad.tolist()  # lambda * w_j / n_j, once per id
    [[0.5, 0.5], [0.5, 0.0]]
    """

    def __init__(self, counts: Mapping[str, torch.Tensor], lam: float) -> None:
        super().__init__()
        if lam < 0:
            raise ValueError(f"the regularisation strength lambda must be >= 0, got {lam}")
        self.lam = float(lam)
        self.tables = list(counts)
        for table, n in counts.items():  # buffers: they move with .to(device)
            self.register_buffer(f"inv_count_{table}", 1.0 / torch.as_tensor(n, dtype=torch.float32).clamp_min(1.0),
                                 persistent=False)

    def forward(self, lookups: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        total = None
        for table, parts in lookups.items():
            ids = torch.cat([i.reshape(-1) for i, _ in parts])  # (N,)
            rows = torch.cat([r.reshape(len(i.reshape(-1)), -1) for i, r in parts])  # (N, D)
            distinct, inverse = torch.unique(ids, return_inverse=True)  # (U,), (N,)
            position = torch.arange(len(ids), device=ids.device)
            first = torch.full_like(distinct, len(ids)).scatter_reduce(0, inverse, position, "amin")  # (U,)
            inv_n = getattr(self, f"inv_count_{table}")[distinct]  # (U,)
            term = (rows[first].pow(2).sum(dim=1) * inv_n).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no lookups given to the mini-batch aware penalty")
        return 0.5 * self.lam * total
