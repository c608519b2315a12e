"""Multi-layer perceptron used for DenseArch and OverArch.

Legend: B batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Dice(nn.Module):
    """DIN's data-adaptive activation (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate
    Prediction", section 4.3, eq. 9): ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``, E and Var over the mini-batch in training and their
    running averages in evaluation (a ``BatchNorm1d`` without affine parameters), ``alpha`` learned per channel
    (0 at the start). PReLU is the special case whose rectifier point is fixed at 0.

    Args:
        num_features: C, the channels.
        eps: the paper's epsilon (1e-8).

    Call: ``forward(s: Tensor (B, C)) -> Tensor (B, C)``.

    >>> d = Dice(3).eval()
    >>> d(torch.tensor([[2.0, 0.0, -2.0]]))  # running stats 0 / 1 and alpha 0: s * sigmoid(s)
    tensor([[ 1.7616,  0.0000, -0.2384]], grad_fn=<AddBackward0>)
    """

    def __init__(self, num_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.norm(s))  # (B, C)
        return p * s + (1.0 - p) * self.alpha * s


#: The hidden-layer activations an ``MLP`` builds, by name.
ACTIVATIONS = {"relu": lambda width: nn.ReLU(), "dice": Dice}


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> Dropout per hidden layer.

    Args:
        in_features: width of the input.
        layer_sizes: width of each layer; the output has ``layer_sizes[-1]`` columns.
        dropout: drop probability after each activation (0 disables).
        activation: ``relu`` or ``dice`` (:class:`Dice`, the DIN paper's).
        batch_norm: a ``BatchNorm1d`` after each linear layer (Ioffe & Szegedy 2015).

    Raises:
        ValueError: ``layer_sizes`` is empty, ``dropout`` is outside [0, 1) or ``activation`` is unknown.

    Call: ``forward(x: Tensor (B, in_features)) -> Tensor (B, layer_sizes[-1])``.

    >>> MLP(8, [16, 4])(torch.zeros(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0,
                 activation: str = "relu", batch_norm: bool = False) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("MLP needs at least one layer size")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for width in layer_sizes:
            layers.append(nn.Linear(in_features, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(ACTIVATIONS[activation](width))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def check_dense(dense: torch.Tensor | None, batch_size: int, names: tuple[str, ...]) -> torch.Tensor:
    """``dense`` if it is the (B, F_dense) input a model configured with dense features ``names`` needs.

    Raises:
        ValueError: ``dense`` is None or not (``batch_size``, ``len(names)``).
    """
    want = (batch_size, len(names))
    if dense is None or tuple(dense.shape) != want:
        got = None if dense is None else tuple(dense.shape)
        raise ValueError(f"the model reads dense features {list(names)}: pass dense of shape {want}, got {got}")
    return dense
