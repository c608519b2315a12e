"""DCN's cross network (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions"):

    x_{l+1} = x_0 * (x_l^T w_l) + b_l + x_l          l = 0, ..., L - 1

w_l and b_l are (d,) vectors, so x_l^T w_l is one scalar per sample and a layer adds 2d parameters; the entries
of x_l are polynomials in x_0's entries of degree up to l + 1 (every cross term, with weights that the few
parameters share), the residual x_l carrying the lower degrees forward. This is the paper's vector form (DCN-V2's
matrix W_l is another model). Not to be confused with Wide & Deep's cross-product transformations of ids
(``training.modules.cross.CrossProduct``).

Legend: B batch size, d input width (DCN: F * D + F_dense), L layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class CrossNetwork(nn.Module):
    """L cross layers over one input x_0.

    Args:
        in_features: d.
        num_layers: L >= 1.

    Raises:
        ValueError: ``in_features`` or ``num_layers`` < 1; in ``forward``, input not (B, d).

    The weights start uniform in [-1/sqrt(d), 1/sqrt(d)] (as ``nn.Linear(d, 1)``'s), the biases at 0.

    Call: ``forward(x0: Tensor (B, d)) -> Tensor (B, d)``: x_L.

    >>> cross = CrossNetwork(2, num_layers=1)
    >>> with torch.no_grad():
    ...     _ = cross.weight.copy_(torch.tensor([[1.0, -1.0]])); _ = cross.bias.fill_(0.5)
    >>> cross(torch.tensor([[3.0, 1.0]]))  # x0 * (3 - 1) + 0.5 + x0
    tensor([[9.5000, 3.5000]], grad_fn=<AddBackward0>)
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        if in_features < 1 or num_layers < 1:
            raise ValueError(f"CrossNetwork needs d >= 1 and at least one layer, got d={in_features}, "
                             f"L={num_layers}")
        self.in_features = in_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_layers, in_features).uniform_(-bound, bound))  # (L, d): w_l
        self.bias = nn.Parameter(torch.zeros(num_layers, in_features))  # (L, d): b_l

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        if x0.dim() != 2 or x0.shape[1] != self.in_features:
            raise ValueError(f"CrossNetwork(d={self.in_features}) takes (B, {self.in_features}), "
                             f"got {tuple(x0.shape)}")
        x = x0
        for w, b in zip(self.weight, self.bias):
            x = x0 * (x @ w).unsqueeze(1) + b + x  # (B, d): (x @ w) is x_l^T w_l, (B,)
        return x
