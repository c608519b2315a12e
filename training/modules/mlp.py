"""Multi-layer perceptron used for DenseArch and OverArch.

Legend: B batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout per hidden layer.

    Args:
        in_features: width of the input.
        layer_sizes: width of each layer; the output has ``layer_sizes[-1]`` columns.
        dropout: drop probability after each activation (0 disables).

    Raises:
        ValueError: ``layer_sizes`` is empty or ``dropout`` is outside [0, 1).

    Call: ``forward(x: Tensor (B, in_features)) -> Tensor (B, layer_sizes[-1])``.

    >>> MLP(8, [16, 4])(torch.zeros(2, 8)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("MLP needs at least one layer size")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        for width in layer_sizes:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
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
