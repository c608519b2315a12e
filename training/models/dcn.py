"""Deep & Cross Network (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions").

    x_0     = concat(V x, z)                                  the stacked embeddings and dense features, width d
    x_{l+1} = x_0 * (x_l^T w_l) + b_l + x_l                   L cross layers (w_l, b_l: (d,) vectors)
    h       = DNN(x_0)
    logit   = w_logits . concat(x_L, h) + b

The cross network (``training.modules.CrossNetwork``) builds bounded-degree cross terms of x_0's entries with 2d
parameters a layer; the DNN beside it, over the same x_0, the implicit ones; one output unit reads both. There is
no first-order part: the embeddings and the dense features ``z`` (the point-in-time counters of
``features.definitions.DENSE_FEATURES``, when the config names them) enter only through x_0. The paper's vector
form of the cross layer, not DCN-V2's matrix; the paper's batch normalisation in the DNN is left out, as in DeepFM.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    InteractionArch   (B, d) -> (B, d)                 the cross network, d = F*D + F_dense
    DenseArch         (B, d) -> (B, H)                 the DNN's hidden layers
    OverArch          (B, d + H) -> (B,)               the output unit over concat(x_L, h)

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, d = F*D + F_dense, L cross
layers, H last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import MLP, CrossNetwork, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class DCNConfig:
    """Hyper-parameters of DCN.

    Args:
        embedding_dim: D of the field embeddings; a multiple of 4 (FBGEMM's fused kernels).
        cross_layers: L, the cross network's depth.
        hidden: widths of the DNN's hidden layers.
        dropout: dropout after each hidden layer.
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``cross_layers`` < 1, no hidden layer, or
            ``dropout`` outside [0, 1).
    """

    embedding_dim: int = 16
    cross_layers: int = 3
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.cross_layers < 1:
            raise ValueError(f"cross_layers must be >= 1, got {self.cross_layers}")
        if not self.hidden:
            raise ValueError("DCN needs at least one hidden layer in its DNN")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class DCN(nn.Module):
    """DCN over the declared sparse features and, when configured, the dense ones.

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
    >>> DCN(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: DCNConfig = DCNConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        width = len(self.sparse_arch.feature_names) * config.embedding_dim + len(config.dense_features)  # d
        self.interaction_arch = CrossNetwork(width, config.cross_layers)
        self.dense_arch = MLP(width, config.hidden, config.dropout)
        self.over_arch = nn.Linear(width + config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sparse_arch(features).flatten(1)  # (B, F*D)
        if self.config.dense_features:
            dense = check_dense(dense, x0.shape[0], self.config.dense_features)  # (B, F_dense)
            x0 = torch.cat([x0, dense], dim=1)  # (B, d)
        both = torch.cat([self.interaction_arch(x0), self.dense_arch(x0)], dim=1)  # (B, d + H)
        return self.over_arch(both).squeeze(1)  # (B,)


SPEC = register(ModelSpec(
    name="dcn", kind="ranker", task="ctr", config=DCNConfig,
    build=lambda vocab_sizes, config, sparse_device=None: DCN(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for DCN
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Wang et al. 2017, Deep & Cross Network for Ad Click Predictions",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
