"""DIEN's interest parts (Zhou et al. 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction",
AAAI, section 4): the interest extractor, its auxiliary loss and the interest evolving layer (AUGRU).

    interest extractor   h_t = GRU(e_t, h_{t-1})                                  t = 1..T (T = a row's length)
    auxiliary loss       l_t = -log sigmoid(f(h_t, e_{t+1})) - log(1 - sigmoid(f(h_t, e^_{t+1})))   (eq. 6-7)
                         e^_{t+1}: a sampled item the user did not act on; f: a small MLP over [h_t, e]
    attention            a_t = exp(h_t W e_a) / sum_{j <= T} exp(h_j W e_a)         (eq. 8; e_a the target item)
    AUGRU                u'_t = a_t * u_t,  h'_t = (1 - u'_t) * h'_{t-1} + u'_t * h~_t      (eq. 9-10)

Histories are right-padded (valid steps first, as ``JaggedTensor.to_padded_dense`` gives them, see
``training.modules.SequenceEmbedding``) with a mask (B, L), True on the valid steps. A GRU is causal, so the
states of the valid steps never depend on the padding after them; the padded states are set to 0 and every later
part reads the mask: the auxiliary loss counts valid steps only, the attention gives padding weight 0 and the AUGRU
keeps its state on a padded step, so that the final state h'_T is the state at each row's last valid step.

Legend: B batch size, L padded history length, D embedding dimension, H GRU hidden width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from training.modules.mlp import MLP


class InterestExtractor(nn.Module):
    """DIEN's interest extractor layer: a GRU (``torch.nn.GRU``, one layer, batch first) over the behaviours.

    Args:
        input_size: D.
        hidden_size: H.

    Call: ``forward(history: Tensor (B, L, D), mask: BoolTensor (B, L)) -> states Tensor (B, L, H)``; ``history``
    right-padded, states 0 where ``mask`` is False.

    >>> InterestExtractor(4, 6)(torch.zeros(2, 3, 4), torch.tensor([[True, False, False]] * 2)).shape
    torch.Size([2, 3, 6])
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden_size, batch_first=True)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(history)  # (B, L, H); step t reads steps <= t only: right padding leaves it alone
        return states * mask.unsqueeze(-1)  # (B, L, H), 0 on padding


class AuxiliaryNet(nn.Module):
    """DIEN's auxiliary loss (eq. 6-7): the state h_t of step t should tell the next behaviour e_{t+1} from a
    sampled negative e^_{t+1}. ``f(h, e)`` is an MLP over ``[h, e]`` with one output unit (the authors' released
    code uses such an auxiliary net, 100 -> 50; the paper writes the inner product, which would tie H to D).

        l_t = softplus(-f(h_t, e_{t+1})) + softplus(f(h_t, e^_{t+1}))      (= the two negative log-likelihoods)

    Args:
        hidden_size: H; embedding_dim: D; layers: the MLP's hidden widths (ReLU).

    Raises:
        ValueError: ``layers`` is empty.

    Call: ``forward(states: Tensor (B, L - 1, H), positives: Tensor (B, L - 1, D), negatives: Tensor (B, L - 1, D),
    steps: BoolTensor (B, L - 1)) -> Tensor (B, L - 1)``: ``l_t`` of the pair (h_t, e_{t+1}), 0 where ``steps`` is
    False (a pair is valid when behaviour t + 1 is).

    >>> net = AuxiliaryNet(4, 4, (8,))
    >>> out = net(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.tensor([[True, False]]))
    >>> out.shape, out[0, 1].item()
    (torch.Size([1, 2]), 0.0)
    """

    def __init__(self, hidden_size: int, embedding_dim: int, layers: Sequence[int] = (100, 50)) -> None:
        super().__init__()
        if not layers:
            raise ValueError("the auxiliary net needs at least one hidden layer")
        self.mlp = nn.Sequential(MLP(hidden_size + embedding_dim, layers), nn.Linear(layers[-1], 1))

    def score(self, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``f(h, e)``: (..., H), (..., D) -> (...) logits."""
        x = torch.cat([states, items], dim=-1)  # (..., H + D)
        return self.mlp(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])  # (N, H + D) -> (N, 1) -> (...)

    def forward(self, states: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                steps: torch.Tensor) -> torch.Tensor:
        loss = F.softplus(-self.score(states, positives)) + F.softplus(self.score(states, negatives))  # (B, L - 1)
        return torch.where(steps, loss, torch.zeros_like(loss))


class AUGRUCell(nn.Module):
    """A GRU cell with an attentional update gate (AUGRU, DIEN eq. 9-10). Its parameters are ``torch.nn.GRUCell``'s
    (same names, shapes, gate order r, z, n and initialisation), so a GRUCell's state dict loads into it:

        r   = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z   = sigmoid(W_iz x + b_iz + W_hz h + b_hz)          (PyTorch's keep gate; the paper's u = 1 - z)
        n   = tanh(W_in x + b_in + r * (W_hn h + b_hn))        (the paper's h~)
        u'  = a * (1 - z)
        h'  = (1 - u') * h + u' * n                            = h + a * (GRUCell(x, h) - h)

    With a = 1 it is a GRU step; with a = 0 the state stays h.

    Args:
        input_size: the input width (H of the extractor); hidden_size: H.

    Call: ``forward(x: Tensor (B, In), h: Tensor (B, H), a: Tensor (B,)) -> Tensor (B, H)``; ``step`` takes the
    input projection ``W_i x + b_i`` (B, 3H) instead of ``x``, so that a sequence projects all its steps at once.

    >>> cell = AUGRUCell(3, 2)
    >>> h = torch.randn(4, 2)
    >>> torch.equal(cell(torch.randn(4, 3), h, torch.zeros(4)), h)
    True
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)  # torch.nn.GRUCell's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def step(self, gi: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        i_r, i_z, i_n = gi.chunk(3, dim=1)  # (B, H) each
        h_r, h_z, h_n = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, dim=1)  # (B, H) each
        r = torch.sigmoid(i_r + h_r)
        u = a.unsqueeze(1) * (1.0 - torch.sigmoid(i_z + h_z))  # (B, H): the attentional update gate u'
        n = torch.tanh(i_n + r * h_n)
        return h + u * (n - h)  # (1 - u') * h + u' * n

    def forward(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.step(F.linear(x, self.weight_ih, self.bias_ih), h, a)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the steps where ``mask`` is True, exactly 0 elsewhere; a row without a valid step is all 0.

    >>> masked_softmax(torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]]),
    ...                torch.tensor([[True, True, False], [False, False, False]]))
    tensor([[0.5000, 0.5000, 0.0000],
            [0.0000, 0.0000, 0.0000]])
    """
    low = torch.finfo(scores.dtype).min
    weights = torch.softmax(scores.masked_fill(~mask, low), dim=1)  # (B, L); an empty row: uniform, zeroed below
    return torch.where(mask, weights, torch.zeros_like(weights))


class InterestEvolution(nn.Module):
    """DIEN's interest evolving layer: the attention of each extracted interest h_t to the target item e_a (eq. 8,
    bilinear, softmax over the valid steps) drives an AUGRU over h_1..h_L, looped over the L steps; a padded step
    keeps the state. The output is h'_T, the state at each row's last valid step (0 for an empty history).

    Args:
        hidden_size: H (of the extractor's states and of the AUGRU); embedding_dim: D of the target item.

    Call: ``forward(states: Tensor (B, L, H), mask: BoolTensor (B, L), target: Tensor (B, D)) -> (final Tensor
    (B, H), weights Tensor (B, L))``; ``weights`` sum to 1 over a row's valid steps, 0 on padding.

    >>> final, a = InterestEvolution(4, 8)(torch.randn(2, 3, 4), torch.tensor([[True, True, False]] * 2),
    ...                                    torch.randn(2, 8))
    >>> final.shape, torch.allclose(a.sum(1), torch.ones(2)), a[0, 2].item()
    (torch.Size([2, 4]), True, 0.0)
    """

    def __init__(self, hidden_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(embedding_dim, hidden_size, bias=False)  # W e_a: (B, D) -> (B, H)
        self.augru = AUGRUCell(hidden_size, hidden_size)

    def forward(self, states: torch.Tensor, mask: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.bmm(states, self.attention(target).unsqueeze(2)).squeeze(2)  # (B, L, H) @ (B, H, 1) -> (B, L)
        weights = masked_softmax(scores, mask)  # (B, L)
        gi = F.linear(states, self.augru.weight_ih, self.augru.bias_ih)  # (B, L, 3H): every step's input projection
        h = states.new_zeros(states.shape[0], self.augru.hidden_size)  # (B, H)
        for t in range(states.shape[1]):
            h = torch.where(mask[:, t, None], self.augru.step(gi[:, t], h, weights[:, t]), h)  # (B, H)
        return h, weights
