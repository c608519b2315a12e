"""Deep Crossing's residual unit (Shan et al. 2016, "Deep Crossing: Web-Scale Modeling without Manually Crafted
Combinatorial Features", section 4, eq. 1 and figure 3):

    x_out = ReLU(x + W_2 ReLU(W_1 x + b_1) + b_2)        W_1: (H, d), W_2: (d, H)

The ResNet unit (He et al. 2016) with fully connected layers in place of convolutions: two layers map the input to
a residual F(x) of the input's width, which is added back before the last ReLU, so the unit's input and output
are both d wide and units stack. With W_2 = 0 and b_2 = 0 a unit is ReLU(x): it starts close to that when its
inner weights are small.

Legend: B batch size, d input and output width (Deep Crossing: F * D + F_dense), H hidden width.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualUnit(nn.Module):
    """One residual unit: ``ReLU(x + W_2 ReLU(W_1 x + b_1) + b_2)``.

    Args:
        in_features: d, the width of the input and of the output.
        hidden: H, the width of the inner layer.

    Raises:
        ValueError: ``in_features`` or ``hidden`` < 1; in ``forward``, input not (B, d).

    ``inner`` (W_1, b_1) and ``outer`` (W_2, b_2) are ``nn.Linear`` layers with their default initialisation.

    Call: ``forward(x: Tensor (B, d)) -> Tensor (B, d)``.

    >>> unit = ResidualUnit(2, hidden=1)
    >>> with torch.no_grad():
    ...     _ = unit.inner.weight.fill_(1.0); _ = unit.inner.bias.zero_()
    ...     _ = unit.outer.weight.fill_(-0.5); _ = unit.outer.bias.zero_()
    >>> unit(torch.tensor([[3.0, 1.0]]))  # ReLU((3, 1) - 0.5 * ReLU(3 + 1) * (1, 1)) = ReLU((1, -1))
    tensor([[1., 0.]], grad_fn=<ReluBackward0>)
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        if in_features < 1 or hidden < 1:
            raise ValueError(f"ResidualUnit needs d >= 1 and H >= 1, got d={in_features}, H={hidden}")
        self.in_features = in_features
        self.inner = nn.Linear(in_features, hidden)  # W_1 (H, d), b_1 (H,)
        self.outer = nn.Linear(hidden, in_features)  # W_2 (d, H), b_2 (d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"ResidualUnit(d={self.in_features}) takes (B, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        residual = self.outer(torch.relu(self.inner(x)))  # (B, d): F(x)
        return torch.relu(x + residual)  # (B, d)
