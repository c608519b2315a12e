"""Deep Crossing (Shan et al. 2016, "Deep Crossing: Web-Scale Modeling without Manually Crafted Combinatorial
Features", KDD).

    x_0     = concat(V x, z)                                  stacking: the embeddings and dense features, width d
    x_{l+1} = ReLU(x_l + W_{l,2} ReLU(W_{l,1} x_l + b_{l,1}) + b_{l,2})      L residual units, hidden width H
    logit   = w . x_L + b                                     scoring

The paper's four layers: embedding, stacking, multiple residual units (``training.modules.ResidualUnit``) and
scoring. No hand-made cross features and no first-order part: every combination of features is left to the
residual units over the stacked x_0, which the embeddings and the dense features ``z`` (the point-in-time counters
of ``features.definitions.DENSE_FEATURES``, when the config names them) enter alone. The paper's embedding layer is
``ReLU(W_j x_j + b_j)`` of a field's one-hot input; here it is the plain lookup of every ranker of the platform. The
scoring layer's sigmoid is in the loss (the model returns logits).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    DenseArch         (B, d) -> (B, d)                 the residual units, d = F*D + F_dense
    OverArch          (B, d) -> (B,)                   the scoring layer

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, d = F*D + F_dense, L
residual units, H their hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import ResidualUnit, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class DeepCrossingConfig:
    """Hyper-parameters of Deep Crossing.

    Args:
        embedding_dim: D of the field embeddings; a multiple of 4 (FBGEMM's fused kernels).
        residual_units: L, how many residual units are stacked.
        residual_hidden: H, the width of each residual unit's inner layer (not tuned).
        dropout: dropout after each residual unit.
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``residual_units`` < 1, ``residual_hidden``
            < 1, or ``dropout`` outside [0, 1).
    """

    embedding_dim: int = 16
    residual_units: int = 3
    residual_hidden: int = 128
    dropout: float = 0.0
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.residual_units < 1:
            raise ValueError(f"residual_units must be >= 1, got {self.residual_units}")
        if self.residual_hidden < 1:
            raise ValueError(f"residual_hidden must be >= 1, got {self.residual_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class DeepCrossing(nn.Module):
    """Deep Crossing over the declared sparse features and, when configured, the dense ones.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KJT with the keys of SPARSE_FEATURES, B rows each, dense: Tensor (B, F_dense) | None
    = None) -> logits Tensor (B,)``; ``dense`` is required when ``config.dense_features`` is not empty.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...        "genre_idx": [1, 2]}
    >>> DeepCrossing(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: DeepCrossingConfig = DeepCrossingConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        width = len(self.sparse_arch.feature_names) * config.embedding_dim + len(config.dense_features)  # d
        units: list[nn.Module] = []
        for _ in range(config.residual_units):
            units.append(ResidualUnit(width, config.residual_hidden))
            if config.dropout > 0:
                units.append(nn.Dropout(config.dropout))
        self.dense_arch = nn.Sequential(*units)
        self.over_arch = nn.Linear(width, 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sparse_arch(features).flatten(1)  # (B, F*D)
        if self.config.dense_features:
            dense = check_dense(dense, x0.shape[0], self.config.dense_features)  # (B, F_dense)
            x0 = torch.cat([x0, dense], dim=1)  # (B, d)
        return self.over_arch(self.dense_arch(x0)).squeeze(1)  # (B, d) -> (B,)


SPEC = register(ModelSpec(
    name="deep_crossing", kind="ranker", task="ctr", config=DeepCrossingConfig,
    build=lambda vocab_sizes, config, sparse_device=None: DeepCrossing(vocab_sizes, config,
                                                                       sparse_device=sparse_device),
    # DeepFM's, not tuned for Deep Crossing
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Shan et al. 2016, Deep Crossing: Web-Scale Modeling without Manually Crafted Combinatorial Features",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
