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

    The first layer is computed without building the (B, L, 4D) concatenation: with its weight split as
    ``[W_h, W_c, W_d, W_p]`` (A, D) each, ``W [h, c, h - c, h * c] + b = M_c h + (W_c - W_d) c + b`` where
    ``M_c = W_h + W_d + W_p diag(c)`` (A, D) depends on the candidate only. So each sample builds ``M_c`` once and
    its L behaviours take one batched matmul: B * L * D * A multiply-adds instead of B * L * 4D * A, the same
    parameters (``mlp[0]`` is still ``Linear(4D, A)``) and the same function up to float rounding.

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
        first = self.mlp[0]
        w_h, w_c, w_d, w_p = first.weight.chunk(4, dim=1)  # (A, D) each: for h, c, h - c, h * c
        m = (w_h + w_d).unsqueeze(0) + w_p.unsqueeze(0) * candidate.unsqueeze(1)  # (B, A, D)
        per_sample = torch.addmm(first.bias, candidate, (w_c - w_d).t())  # (B, A)
        x = torch.baddbmm(per_sample.unsqueeze(1), history, m.transpose(1, 2))  # (B, L, A)
        b, l, a = x.shape
        return self.mlp[1:](x.reshape(b * l, a)).reshape(b, l)  # (B*L, A) -> (B*L, 1) -> (B, L); PReLU per channel


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
