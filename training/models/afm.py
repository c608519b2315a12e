"""Attentional Factorization Machine (Xiao et al. 2017, "Attentional Factorization Machines: Learning the Weight
of Feature Interactions via Attention Networks").

    logit = b + sum_f w_f[x_f] + w_d . z + p^T sum_{i<j} a_ij (v_i ⊙ v_j)
    a_ij  = softmax over the pairs (i<j) of h^T ReLU(W (v_i ⊙ v_j) + b_att)

FM weighs every pair of field embeddings 1; AFM keeps each pair's element-wise product, weighs it by an attention
network shared by the pairs (``training.modules.AttentionalPooling``: W (t, D), b_att and h (t,), t the attention
factor) and projects the weighted sum with p (D,). The pairs are those of the F pooled sparse features (a multi-hot
field, genres, is one sum-pooled vector). p starts at ones, as in the authors' released code, so that AFM starts as
an FM whose pairs are averaged by the attention weights; dropout (``dropout``) is on the pooled vector, where that
code applies it (the paper describes it on the pair-wise interaction layer). Not done here: initialising the
embeddings from a trained FM, as the paper's experiments did. The dense features ``z`` (the point-in-time counters of
``features.definitions.DENSE_FEATURES``, when the config names them) enter linearly only, as in FM. The paper's
L2 on W is AdamW's weight decay on every dense parameter here.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    LinearArch        KJT + (B, F_dense) -> (B,)       b + first order + dense linear term
    InteractionArch   (B, F, D) -> (B, D), (B, P)      pair-wise products, attention-based pooling (and its weights)
    OverArch          (B, D) -> (B,)                   dropout, then p: the projection of the pooled vector (no bias)

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, P = F (F - 1) / 2 pairs,
t attention factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import AttentionalPooling, FirstOrder, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class AFMConfig:
    """Hyper-parameters of AFM.

    Args:
        embedding_dim: D of the field embeddings; a multiple of 4 (FBGEMM's fused kernels).
        attention_factor: t, the attention network's hidden width.
        dropout: dropout on the attention-pooled vector in training (the paper's regulariser; not tuned here).
        init_range: embedding weights start uniform in [-init_range, init_range]; first-order weights at 0.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``attention_factor`` < 1, or ``dropout``
            outside [0, 1).
    """

    embedding_dim: int = 16
    attention_factor: int = 16
    dropout: float = 0.2
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.attention_factor < 1:
            raise ValueError(f"attention_factor must be >= 1, got {self.attention_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


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


class AFM(nn.Module):
    """AFM over the declared sparse features, plus a linear term on the dense ones.

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
    >>> AFM(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: AFMConfig = AFMConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.linear_arch = LinearArch(FirstOrder(tables), len(config.dense_features))
        self.interaction_arch = AttentionalPooling(config.embedding_dim, config.attention_factor)
        self.over_arch = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.embedding_dim, 1, bias=False))
        nn.init.ones_(self.over_arch[1].weight)  # p = 1: the released code's start

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        if self.config.dense_features:
            dense = check_dense(dense, embeddings.shape[0], self.config.dense_features)  # (B, F_dense)
        pooled, _ = self.interaction_arch(embeddings)  # (B, D), weights (B, P)
        return self.linear_arch(features, dense) + self.over_arch(pooled).squeeze(1)  # (B,)


SPEC = register(ModelSpec(
    name="afm", kind="ranker", task="ctr", config=AFMConfig,
    build=lambda vocab_sizes, config, sparse_device=None: AFM(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for AFM
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Xiao et al. 2017, Attentional Factorization Machines: Learning the Weight of Feature Interactions via "
          "Attention Networks",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
