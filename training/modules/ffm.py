"""The field-aware factorization machine's pairwise term (Juan, Zhuang, Chin & Lin 2016, "Field-aware Factorization
Machines for CTR Prediction"):

    phi_FFM = sum_{i<j} <v_{i, f_j}, v_{j, f_i}> x_i x_j

Each feature keeps one latent vector per other field, and a pair uses, on each side, the vector that faces the other
side's field. Here the fields are the F sparse features of a ranker (user, item, age, ...), every feature is its own
field, and a feature's F - 1 vectors are stored side by side in one row of width (F - 1) * D (the layout of
``training.models.ffm``): block k of feature i's row is its vector facing field ``other_fields(i, F)[k]``, the other
fields in feature order with i itself left out (``field_block``). A multi-hot field (genres) arrives sum-pooled, so
its pair with field j is the sum of its ids' pairs with j (x = 1 each); pairs inside one field are not counted.

Legend: B batch size, F fields (features), D latent dimension per field, P = F (F - 1) / 2 field pairs.
"""

from __future__ import annotations

import torch
from torch import nn


def field_block(i: int, j: int) -> int:
    """The block of feature i's row that holds v_{i, f_j}: the other fields in order, i itself left out.

    Raises:
        ValueError: ``i == j`` (a field has no vector facing itself) or a negative index.

    >>> [field_block(2, j) for j in (0, 1, 3, 4)]
    [0, 1, 2, 3]
    >>> field_block(0, 1), field_block(1, 0)
    (0, 0)
    """
    if i == j or i < 0 or j < 0:
        raise ValueError(f"field_block needs two distinct fields >= 0, got i={i}, j={j}")
    return j if j < i else j - 1


class FieldAwareInteraction(nn.Module):
    """Sum over field pairs i < j of <v_{i, f_j}, v_{j, f_i}>, gathered from each field's (F - 1) * D row.

    The P pairs' block indices are fixed at construction (non-persistent buffers: nothing enters the state dict),
    so the forward is two gathers and one product, O(P D) per sample -- FFM has no O(F D) identity like FM's.

    Args:
        num_fields: F >= 2.
        embedding_dim: D, the width of one field-aware vector.

    Raises:
        ValueError: ``num_fields < 2`` or ``embedding_dim < 1``; in ``forward``, input not (B, F, (F - 1) * D).

    Call: ``forward(embeddings: Tensor (B, F, (F - 1) * D)) -> Tensor (B,)``.

    >>> # F = 3, D = 1: row i = [v_{i,f_a}, v_{i,f_b}] for the other fields a < b
    >>> e = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (1, 3, 2)
    >>> FieldAwareInteraction(3, 1)(e)  # v01.v10 + v02.v20 + v12.v21 = 1*3 + 2*5 + 4*6
    tensor([37.])
    """

    def __init__(self, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        if num_fields < 2 or embedding_dim < 1:
            raise ValueError(f"FFM needs at least 2 fields and D >= 1, got F={num_fields}, D={embedding_dim}")
        self.num_fields, self.embedding_dim = num_fields, embedding_dim
        pairs = [(i, j) for i in range(num_fields) for j in range(i + 1, num_fields)]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        self.register_buffer("left_field", as_tensor([i for i, _ in pairs]), persistent=False)  # (P,)
        self.register_buffer("left_block", as_tensor([field_block(i, j) for i, j in pairs]), persistent=False)
        self.register_buffer("right_field", as_tensor([j for _, j in pairs]), persistent=False)
        self.register_buffer("right_block", as_tensor([field_block(j, i) for i, j in pairs]), persistent=False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        f, d = self.num_fields, self.embedding_dim
        if embeddings.dim() != 3 or tuple(embeddings.shape[1:]) != (f, (f - 1) * d):
            raise ValueError(f"FieldAwareInteraction(F={f}, D={d}) takes (B, {f}, {(f - 1) * d}), "
                             f"got {tuple(embeddings.shape)}")
        v = embeddings.view(-1, f, f - 1, d)  # (B, F, F-1, D)
        left = v[:, self.left_field, self.left_block]  # (B, P, D): v_{i, f_j}
        right = v[:, self.right_field, self.right_block]  # (B, P, D): v_{j, f_i}
        return (left * right).sum(dim=(1, 2))  # (B,)
