"""DIN's target attention (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction", §4.3).

Each behaviour in the user's history gets a weight from the *activation unit*, a small MLP over
``[history item, candidate, history item - candidate, history item * candidate]``; the user's interest in the
candidate is the weighted sum of the behaviour embeddings. As in the paper the weights are NOT normalised by a
softmax ("the normalization with softmax is abandoned ... to reserve the intensity of user interests"), and
padded positions get weight exactly 0, so padding changes nothing.

Legend: B batch size, L padded history length, D embedding dimension, A hidden width of the activation unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ActivationUnit(nn.Module):
    """One weight per (behaviour, candidate) pair: ``MLP([h, c, h - c, h * c]) -> 1``, PReLU activations as in
    the paper's Figure 2 (its Dice is a data-adaptive PReLU).

    Args:
        embedding_dim: D.
        hidden: widths A of the unit's hidden layers.

    Raises:
        ValueError: ``hidden`` is empty.

    Call: ``forward(history: Tensor (B, L, D), candidate: Tensor (B, D)) -> Tensor (B, L)`` (unmasked weights).

    >>> ActivationUnit(4, (8,))(torch.zeros(2, 3, 4), torch.zeros(2, 4)).shape
    torch.Size([2, 3])
    """

    def __init__(self, embedding_dim: int, hidden: Sequence[int] = (36,)) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("the activation unit needs at least one hidden layer")
        layers: list[nn.Module] = []
        width = 4 * embedding_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, history: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        cand = candidate.unsqueeze(1).expand_as(history)  # (B, L, D)
        x = torch.cat([history, cand, history - cand, history * cand], dim=-1)  # (B, L, 4D)
        b, l, w = x.shape
        return self.mlp(x.reshape(b * l, w)).reshape(b, l)  # (B*L, 4D) -> (B*L, 1) -> (B, L); PReLU per channel


class TargetAttention(nn.Module):
    """DIN's InteractionArch: the candidate-specific interest vector ``sum_l mask_l * a(h_l, c) * h_l``.

    Call: ``forward(history: Tensor (B, L, D), mask: BoolTensor (B, L), candidate: Tensor (B, D))
    -> (interest Tensor (B, D), weights Tensor (B, L))``; weights are 0 where ``mask`` is False.

    >>> att = TargetAttention(4, (8,))
    >>> interest, w = att(torch.ones(1, 3, 4), torch.tensor([[True, True, False]]), torch.ones(1, 4))
    >>> interest.shape, float(w[0, 2])
    (torch.Size([1, 4]), 0.0)
    """

    def __init__(self, embedding_dim: int, hidden: Sequence[int] = (36,)) -> None:
        super().__init__()
        self.activation_unit = ActivationUnit(embedding_dim, hidden)

    def forward(self, history: torch.Tensor, mask: torch.Tensor,
                candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.activation_unit(history, candidate)  # (B, L)
        weights = torch.where(mask, scores, torch.zeros_like(scores))  # (B, L), exactly 0 on padding
        interest = torch.bmm(weights.unsqueeze(1), history).squeeze(1)  # (B, 1, L) @ (B, L, D) -> (B, D)
        return interest, weights
