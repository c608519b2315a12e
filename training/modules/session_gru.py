"""GRU4Rec's recurrent part and losses (Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural
Networks", ICLR; Hidasi & Karatzoglou 2018, "Recurrent Neural Networks with Top-k Gains for Session-based
Recommendations", CIKM).

    h_t   = GRU(e_t, h_{t-1})                 e_t the embedding of the t-th item of a session, h_0 = 0
    q_t   = W dropout(h_t) + b                the query: its inner product with an item's vector scores the item
    r_tj  = <q_t, e_j>                        scores of the target (j = i+) and of the sampled negatives

Losses over one row's scores, the target ``r_i`` against the negatives ``r_j`` (the other rows' targets of a
session-parallel mini-batch and extra items drawn by popularity, the same for every row; ``mask`` drops a negative
that is the row's own target or a padding row's):

    sampled softmax (cross-entropy)   -log( exp(r_i) / (exp(r_i) + sum_j exp(r_j)) )
    BPR-max (2018, eq. 6 + 9)          -log( sum_j s_j sigmoid(r_i - r_j) ) + lambda * sum_j s_j r_j^2,
                                       s_j = softmax of r_j over the negatives

Legend: B rows (sessions side by side), N negatives per row, L padded history length, D embedding dimension,
H GRU hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

LOSSES = ("softmax", "bpr_max")
#: The one KJT key of a session model: every item id a call looks up, in the order the call documents.
ITEMS = "items"


def items_kjt(ids: torch.Tensor, lengths: torch.Tensor | None = None) -> KeyedJaggedTensor:
    """A KJT of item ids under the key ``items``: ``ids`` (N,), one per row unless ``lengths`` (B,) says how many
    each row holds.

    >>> items_kjt(torch.tensor([3, 4, 5]), torch.tensor([2, 1]))[ITEMS].lengths().tolist()
    [2, 1]
    """
    ids = ids.to(torch.int64)
    lengths = torch.ones_like(ids) if lengths is None else lengths.to(torch.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=[ITEMS], values=ids, lengths=lengths)


def history_kjt(histories: Sequence[np.ndarray], max_history: int, num_items: int) -> KeyedJaggedTensor:
    """One row per history: its last ``max_history`` items of the vocabulary (1 <= id < ``num_items``; the OOV
    row and ids beyond the table dropped first), oldest first.

    >>> kjt = history_kjt([np.array([7, 0, 2, 3]), np.array([], np.int64)], max_history=2, num_items=5)
    >>> kjt.values().tolist(), kjt.lengths().tolist()
    ([2, 3], [2, 0])
    """
    kept = [np.asarray(h, np.int64) for h in histories]
    kept = [h[(h > 0) & (h < num_items)][-max_history:] for h in kept]
    values = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return items_kjt(torch.from_numpy(values), torch.tensor([len(h) for h in kept], dtype=torch.int64))


class SessionGRU(nn.Module):
    """One GRU layer over item embeddings and the output layer that turns its state into a query vector.

    Args:
        input_size: D of the item embeddings read.
        hidden_size: H.
        output_size: D' of the query (the item table's D when the output is scored against the same table).
        dropout: probability of dropping a unit of the state before the output layer (training only).

    Calls:
        ``step(x (B, D), h (B, H)) -> (query (B, D'), h (B, H))``: one item per row (session-parallel training);
        ``run(x (B, L, D), lengths (B,) int64) -> (query (B, D'), h (B, H))``: the state after each row's first
        ``lengths[b]`` steps of a right-padded batch, from h_0 = 0; a row of length 0 keeps h = 0.

    >>> gru = SessionGRU(4, 6, 8)
    >>> q, h = gru.run(torch.randn(2, 3, 4), torch.tensor([3, 0]))
    >>> q.shape, h.shape, bool(h[1].eq(0).all())
    (torch.Size([2, 8]), torch.Size([2, 6]), True)
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, output_size)

    def step(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, h = self.gru(x.unsqueeze(1), h.unsqueeze(0).contiguous())  # (1, B, H)
        h = h.squeeze(0)  # (B, H)
        return self.output(self.dropout(h)), h

    def run(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, hidden = x.shape[0], self.gru.hidden_size
        h = x.new_zeros(b, hidden)  # (B, H)
        rows = torch.nonzero(lengths > 0).squeeze(1)
        if len(rows):
            packed = nn.utils.rnn.pack_padded_sequence(x[rows], lengths[rows].cpu(), batch_first=True,
                                                       enforce_sorted=False)
            _, h_n = self.gru(packed)  # (1, B', H), each row's state after its last valid step
            h = h.index_copy(0, rows, h_n[-1])
        return self.output(self.dropout(h)), h


def sampled_softmax_loss(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target among the target and the row's negatives, weighted mean over rows.

    Args:
        logits: (B, 1 + N): column 0 the target, then the negatives.
        mask: (B, N) bool, False for a negative left out of the row (its own target, a padding row's item).
        weight: (B,) float, 0 for a padding row.

    >>> round(float(sampled_softmax_loss(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool), torch.ones(1))), 4)
    1.0986
    """
    full = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1 + N)
    per_row = -torch.log_softmax(logits.masked_fill(~full, float("-inf")), dim=1)[:, 0]  # (B,)
    return _weighted_mean(per_row, weight)


def bpr_max_loss(logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, reg: float = 1.0) -> torch.Tensor:
    """BPR-max (Hidasi & Karatzoglou 2018) with its score regularisation ``reg`` (lambda), weighted mean over rows;
    a row without a negative contributes 0.

    Args:
        logits: (B, 1 + N): column 0 the target, then the negatives.
        mask: (B, N) bool, False for a negative left out of the row.
        weight: (B,) float, 0 for a padding row.
        reg: lambda >= 0.

    >>> round(float(bpr_max_loss(torch.zeros(1, 3), torch.ones(1, 2, dtype=torch.bool), torch.ones(1), 0.0)), 4)
    0.6931
    """
    target, neg = logits[:, :1], logits[:, 1:]  # (B, 1), (B, N)
    s = torch.softmax(neg.masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)  # (B, N); all-masked row: 0
    ranked = (s * torch.sigmoid(target - neg)).sum(dim=1)  # (B,)
    has = mask.any(dim=1)
    per_row = -torch.log(ranked.clamp_min(1e-24)) + reg * (s * neg.pow(2)).sum(dim=1)  # (B,)
    return _weighted_mean(torch.where(has, per_row, torch.zeros_like(per_row)), weight)


def session_loss(kind: str, logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                 reg: float = 1.0) -> torch.Tensor:
    """``sampled_softmax_loss`` (``kind="softmax"``) or ``bpr_max_loss`` (``kind="bpr_max"``).

    Raises:
        ValueError: another ``kind``.
    """
    if kind == "softmax":
        return sampled_softmax_loss(logits, mask, weight)
    if kind == "bpr_max":
        return bpr_max_loss(logits, mask, weight, reg)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def _weighted_mean(per_row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)
