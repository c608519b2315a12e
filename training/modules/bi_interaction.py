"""NFM's bi-interaction pooling (He & Chua 2017, "Neural Factorization Machines for Sparse Predictive Analytics"):
the pairwise element-wise products of the field embeddings, summed into one vector,

    f_BI(V x) = sum_{i<j} v_i ⊙ v_j = 0.5 * ((sum_i v_i)^2 - sum_i v_i^2)      (squares element-wise)

in O(F D) by the same identity as FM's second-order term (``training.modules.interaction.FactorizationMachine``),
which is this vector summed over D. Kept a (B, D) vector, it is the input of NFM's hidden layers. A multi-hot field
arrives sum-pooled (``SparseArch``), so its pair with another field is the sum of its ids' pairs (x = 1 each).

Legend: B batch size, F fields (features), D embedding dimension.
"""

from __future__ import annotations

import torch
from torch import nn


class BiInteractionPooling(nn.Module):
    """Sum over field pairs i < j of v_i ⊙ v_j, a vector per sample (no parameters).

    Raises:
        ValueError (from ``forward``): input not 3-dimensional (B, F, D).

    Call: ``forward(embeddings: Tensor (B, F, D)) -> Tensor (B, D)``.

    >>> v = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (1, 3, 2)
    >>> BiInteractionPooling()(v)  # (1*3 + 1*5 + 3*5, 2*4 + 2*6 + 4*6)
    tensor([[23., 44.]])
    """

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 3:
            raise ValueError(f"BiInteractionPooling takes (B, F, D), got {tuple(embeddings.shape)}")
        square_of_sum = embeddings.sum(dim=1).pow(2)  # (B, D)
        sum_of_squares = embeddings.pow(2).sum(dim=1)  # (B, D)
        return 0.5 * (square_of_sum - sum_of_squares)  # (B, D)
