"""Neural Factorization Machine (He & Chua 2017, "Neural Factorization Machines for Sparse Predictive Analytics").

    logit = b + sum_f w_f[x_f] + w_d . z + h^T DNN(concat(dropout(f_BI(V x)), z))
    f_BI(V x) = sum_{i<j} v_i ⊙ v_j = 0.5 * ((sum_i v_i)^2 - sum_i v_i^2)          a (B, D) vector

FM sums the pairwise products of the field embeddings into one number; NFM keeps them as a D-vector (the
bi-interaction pooling, ``training.modules.BiInteractionPooling``) and lets hidden layers model the higher-order
interactions on top. With no hidden layer and h = 1 it is FM. Dropout on the bi-interaction
vector is the paper's regulariser (``bi_dropout``). The dense features ``z`` (the point-in-time
counters of ``features.definitions.DENSE_FEATURES``, when the config names them) enter the linear part and the
DNN's input beside the bi-interaction vector, as DeepFM's do. Left out from the paper: batch normalisation of the
bi-interaction and hidden layers, and initialising the embeddings from a trained FM.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    LinearArch        KJT + (B, F_dense) -> (B,)       b + first order + dense linear term
    InteractionArch   (B, F, D) -> (B, D)              bi-interaction pooling, then dropout
    DenseArch         (B, D + F_dense) -> (B, H)       the hidden layers
    OverArch          (B, H) -> (B,)                   h, the prediction weights (no bias: b is the linear part's)

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, H last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import MLP, BiInteractionPooling, FirstOrder, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class NFMConfig:
    """Hyper-parameters of NFM.

    Args:
        embedding_dim: D of the field embeddings and of the bi-interaction vector; a multiple of 4 (FBGEMM's fused
            kernels).
        hidden: widths of the hidden layers over the bi-interaction vector (the paper's best had one).
        dropout: dropout after each hidden layer.
        bi_dropout: dropout on the bi-interaction vector in training (the paper's regulariser; not tuned here).
        init_range: embedding weights start uniform in [-init_range, init_range]; first-order weights at 0.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, no hidden layer, or a dropout outside [0, 1).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    bi_dropout: float = 0.2
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden:
            raise ValueError("NFM needs at least one hidden layer (without one it is a factorization machine)")
        for name in ("dropout", "bi_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


class LinearArch(nn.Module):
    """The linear part: bias + first-order weights of the sparse ids + a weight per dense feature.

    Call: ``forward(features: KJT, dense: Tensor (B, F_dense) | None) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder, num_dense: int) -> None:
        super().__init__()
        self.first_order = first_order
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None) -> torch.Tensor:
        logit = self.first_order(features)  # (B,)
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(1)
        return logit


class InteractionArch(nn.Module):
    """The bi-interaction pooling of the field embeddings, then dropout (the paper's bi-interaction layer).

    Call: ``forward(embeddings: Tensor (B, F, D)) -> Tensor (B, D)``.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.bi_interaction = BiInteractionPooling()
        self.dropout = nn.Dropout(dropout)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.bi_interaction(embeddings))  # (B, D)


class NFM(nn.Module):
    """NFM over the declared sparse features.

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
    >>> NFM(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: NFMConfig = NFMConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        num_dense = len(config.dense_features)
        self.linear_arch = LinearArch(FirstOrder(tables), num_dense)
        self.interaction_arch = InteractionArch(config.bi_dropout)
        self.dense_arch = MLP(config.embedding_dim + num_dense, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1, bias=False)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        x = self.interaction_arch(embeddings)  # (B, D)
        if self.config.dense_features:
            dense = check_dense(dense, x.shape[0], self.config.dense_features)  # (B, F_dense)
            x = torch.cat([x, dense], dim=1)  # (B, D + F_dense)
        deep = self.over_arch(self.dense_arch(x)).squeeze(1)  # (B,)
        return self.linear_arch(features, dense) + deep  # (B,)


SPEC = register(ModelSpec(
    name="nfm", kind="ranker", task="ctr", config=NFMConfig,
    build=lambda vocab_sizes, config, sparse_device=None: NFM(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for NFM
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="He & Chua 2017, Neural Factorization Machines for Sparse Predictive Analytics",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
