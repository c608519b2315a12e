"""Interaction parts: the factorization machine's second-order term (Rendle 2010, "Factorization Machines").

Legend: B batch size, F number of fields, D embedding dimension.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizationMachine(nn.Module):
    """Sum over field pairs i < j of <v_i, v_j>, in O(F D) with Rendle's identity

        sum_{i<j} <v_i, v_j> = 0.5 * sum_d ((sum_i v_id)^2 - sum_i v_id^2).

    Call: ``forward(embeddings: Tensor (B, F, D)) -> Tensor (B,)``.

    >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (1, 3, 2)
    >>> FactorizationMachine()(v)  # 11 + 17 + 39
    tensor([67.])
    """

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        square_of_sum = embeddings.sum(dim=1).pow(2)  # (B, D)
        sum_of_squares = embeddings.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)  # (B,)
