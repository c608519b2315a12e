"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction").

    logit = first_order(x) + FM(V x) + DNN(concat(V x))

One embedding layer (``SparseArch``) feeds both the FM interaction and the deep part; the first-order weights
are separate 1-dim tables. The model returns logits; train it with ``BCEWithLogitsLoss`` (the sigmoid is applied
once, inside the loss, and by the caller at prediction time).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)            the shared embedding tables (sharded by DMP)
    InteractionArch   (B, F, D) + KJT -> (B,)     first-order + FM second-order term
    DenseArch         (B, F*D) -> (B, H)          the deep part's hidden layers
    OverArch          (B, H) -> (B,)              the deep part's output unit

Legend: B batch size, F number of features, D embedding dimension, H last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES, SparseFeature
from training.modules import MLP, FactorizationMachine, FirstOrder, SparseArch, table_configs


@dataclass(frozen=True)
class DeepFMConfig:
    """Hyper-parameters of DeepFM.

    Args:
        embedding_dim: D, shared by FM and the DNN; a multiple of 4 (FBGEMM's fused kernels).
        hidden: widths of the DNN's hidden layers.
        dropout: dropout after each hidden layer.
        init_range: embedding weights start uniform in [-init_range, init_range].
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.2
    init_range: float = 0.02

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden:
            raise ValueError("DeepFM needs at least one hidden layer")


class InteractionArch(nn.Module):
    """FM part: first-order weights + second-order pairwise interactions of the shared embeddings.

    Call: ``forward(features: KJT, embeddings: Tensor (B, F, D)) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder) -> None:
        super().__init__()
        self.first_order = first_order
        self.fm = FactorizationMachine()

    def forward(self, features: KeyedJaggedTensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.first_order(features) + self.fm(embeddings)  # (B,)


class DeepFM(nn.Module):
    """DeepFM over the declared sparse features.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        features: the sparse features read, one KJT key each (default: ``SPARSE_FEATURES``).
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.

    Call: ``forward(features: KeyedJaggedTensor with B rows per key) -> logits Tensor (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> model = DeepFM(synthetic_vocab_sizes())
    >>> rows = [{"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...          "genre_idx": [1, 2]}] * 3
    >>> model(kjt_of_rows(rows)).shape
    torch.Size([3])
    """

    def __init__(
        self,
        vocab_sizes: Mapping[str, int],
        config: DeepFMConfig = DeepFMConfig(),
        features: Sequence[SparseFeature] = SPARSE_FEATURES,
        sparse_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(features, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        num_features = len(self.sparse_arch.feature_names)
        self.interaction_arch = InteractionArch(FirstOrder(tables))
        self.dense_arch = MLP(num_features * config.embedding_dim, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        fm_logit = self.interaction_arch(features, embeddings)  # (B,)
        hidden = self.dense_arch(embeddings.flatten(1))  # (B, F*D) -> (B, H)
        return fm_logit + self.over_arch(hidden).squeeze(1)  # (B,)
