"""AFM's pair-wise interaction layer and attention-based pooling (Xiao et al. 2017, "Attentional Factorization
Machines: Learning the Weight of Feature Interactions via Attention Networks"):

    pairs:      w_ij = v_i ⊙ v_j                                    for the P field pairs i < j
    attention:  a'_ij = h^T ReLU(W w_ij + b),   a_ij = exp(a'_ij) / sum_{k<l} exp(a'_kl)     (softmax over pairs)
    pooling:    sum_{i<j} a_ij w_ij

W is (t, D), b and h are (t,): a one-hidden-layer attention network shared by every pair, t the attention factor.
FM weighs every pair 1; AFM learns a weight per pair and per sample. The model projects the pooled vector with its
own p (``training.models.afm``, which also applies the dropout). A multi-hot field arrives sum-pooled
(``SparseArch``); a sample without ids in a field has a zero vector there, whose pairs are zero but still take a
share of the softmax.

Pairs are in row-major order of the upper triangle: (0, 1), (0, 2), ..., (0, F-1), (1, 2), ... (``pair_indices``).

Legend: B batch size, F fields (features), D embedding dimension, P = F (F - 1) / 2 pairs, t attention factor.
"""

from __future__ import annotations

import torch
from torch import nn


def pair_indices(num_fields: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (P,), right (P,)): the fields i < j of every pair, in row-major order of the upper triangle.

    >>> [tuple(t.tolist()) for t in pair_indices(4)]
    [(0, 0, 0, 1, 1, 2), (1, 2, 3, 2, 3, 3)]
    """
    left, right = torch.triu_indices(num_fields, num_fields, offset=1, device=device)
    return left, right


def pairwise_products(embeddings: torch.Tensor) -> torch.Tensor:
    """The pair-wise interaction layer: v_i ⊙ v_j for every pair i < j.

    Call: ``pairwise_products(embeddings: Tensor (B, F, D)) -> Tensor (B, P, D)``.

    >>> pairwise_products(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])).tolist()
    [[[3.0, 8.0], [5.0, 12.0], [15.0, 24.0]]]
    """
    left, right = pair_indices(embeddings.shape[1], embeddings.device)
    return embeddings[:, left] * embeddings[:, right]  # (B, P, D)


class AttentionalPooling(nn.Module):
    """The attention-weighted sum of the pair-wise products.

    Args:
        embedding_dim: D.
        attention_factor: t, the attention network's hidden width.

    Raises:
        ValueError: ``embedding_dim`` or ``attention_factor`` < 1; in ``forward``, input not (B, F, D) with F >= 2.

    Call: ``forward(embeddings: Tensor (B, F, D)) -> (pooled Tensor (B, D), weights Tensor (B, P))``; each row of
    ``weights`` sums to 1.

    >>> pool = AttentionalPooling(2, attention_factor=3)
    >>> with torch.no_grad():
    ...     _ = pool.score.weight.zero_()  # h = 0: every pair scores 0, the softmax is uniform
    >>> pooled, weights = pool(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]))
    >>> weights  # 3 pairs
    tensor([[0.3333, 0.3333, 0.3333]], grad_fn=<SoftmaxBackward0>)
    >>> pooled  # the mean of (3, 8), (5, 12), (15, 24)
    tensor([[ 7.6667, 14.6667]], grad_fn=<SumBackward1>)
    """

    def __init__(self, embedding_dim: int, attention_factor: int) -> None:
        super().__init__()
        if embedding_dim < 1 or attention_factor < 1:
            raise ValueError(f"AttentionalPooling needs D >= 1 and an attention factor >= 1, got D={embedding_dim}, "
                             f"t={attention_factor}")
        self.embedding_dim = embedding_dim
        self.attention = nn.Linear(embedding_dim, attention_factor)  # W (t, D), b (t,)
        self.score = nn.Linear(attention_factor, 1, bias=False)  # h (t,)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if embeddings.dim() != 3 or embeddings.shape[1] < 2 or embeddings.shape[2] != self.embedding_dim:
            raise ValueError(f"AttentionalPooling(D={self.embedding_dim}) takes (B, F >= 2, {self.embedding_dim}), "
                             f"got {tuple(embeddings.shape)}")
        products = pairwise_products(embeddings)  # (B, P, D)
        scores = self.score(torch.relu(self.attention(products))).squeeze(2)  # (B, P)
        weights = torch.softmax(scores, dim=1)  # (B, P)
        pooled = (weights.unsqueeze(2) * products).sum(dim=1)  # (B, D)
        return pooled, weights
