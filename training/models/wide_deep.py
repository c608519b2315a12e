"""Wide & Deep (Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems").

    logit = wide(x) + deep(x)
    wide(x) = sum_f w_f[x_f] + sum_(a,b) w_ab[x_a, x_b] + w_d . z + b     (single features and their crosses)
    deep(x) = OverArch(DNN(concat(V x, z)))                              (embeddings of the same features)

The wide part memorises: a linear model over the one-hot / multi-hot sparse features (``FirstOrder``) and the
cross-product transformations of the pairs in ``crosses`` (``training.modules.CrossProduct``; by default each user
attribute with the item's genres). The deep part generalises: a DNN over the embeddings of every sparse feature
and the dense features ``z`` (the point-in-time counters, when the config names them). Both are trained jointly
on the one logit, as in the paper; the paper's per-part optimizers (FTRL with L1 for the wide part, AdaGrad for the
deep part) are the platform's here: fused row-wise Adagrad for the embedding tables, AdamW for the rest.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    WideArch          KJT + (B, F_dense) -> (B,)       first order + crosses + dense linear
    DenseArch         (B, F*D + F_dense) -> (B, H)     the deep part's hidden layers
    OverArch          (B, H) -> (B,)                   the deep part's output unit

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
from training.modules import MLP, CrossProduct, FirstOrder, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups

_BY_NAME = {f.name: f for f in SPARSE_FEATURES}


@dataclass(frozen=True)
class WideDeepConfig:
    """Hyper-parameters of Wide & Deep.

    Args:
        embedding_dim: D of the deep part's tables; a multiple of 4 (FBGEMM's fused kernels).
        hidden: widths of the DNN's hidden layers.
        dropout: dropout after each hidden layer.
        init_range: embedding weights start uniform in [-init_range, init_range].
        crosses: the wide part's crossed pairs, ``"a*b"`` of declared sparse feature names.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: a bad size, or a cross of an undeclared feature.
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    init_range: float = 0.02
    crosses: tuple[str, ...] = ("age_idx*genre_idx", "gender_idx*genre_idx", "occupation_idx*genre_idx")
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden:
            raise ValueError("Wide & Deep needs at least one hidden layer")
        for cross in self.crosses:
            names = cross.split("*")
            if len(names) != 2 or not all(n in _BY_NAME for n in names):
                raise ValueError(f"cross {cross!r} must be 'a*b' of declared sparse features {sorted(_BY_NAME)}")


class WideArch(nn.Module):
    """The linear model over the sparse features, their crosses and the dense features.

    Call: ``forward(features: KJT, dense: Tensor (B, F_dense) | None) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder, crosses: CrossProduct, num_dense: int) -> None:
        super().__init__()
        self.first_order, self.crosses = first_order, crosses
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None) -> torch.Tensor:
        logit = self.first_order(features) + self.crosses(features)  # (B,)
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(1)
        return logit


class WideDeep(nn.Module):
    """Wide & Deep over the declared sparse features.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KJT with the keys of SPARSE_FEATURES, B rows each, dense: Tensor (B, F_dense) | None
    = None) -> logits Tensor (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...        "genre_idx": [1, 2]}
    >>> WideDeep(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: WideDeepConfig = WideDeepConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        pairs = [tuple(_BY_NAME[n] for n in cross.split("*")) for cross in config.crosses]
        num_dense = len(config.dense_features)
        self.wide_arch = WideArch(FirstOrder(tables), CrossProduct(pairs, vocab_sizes), num_dense)
        width = len(self.sparse_arch.feature_names) * config.embedding_dim + num_dense
        self.dense_arch = MLP(width, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        x = self.sparse_arch(features).flatten(1)  # (B, F*D)
        if self.config.dense_features:
            dense = check_dense(dense, x.shape[0], self.config.dense_features)  # (B, F_dense)
            x = torch.cat([x, dense], dim=1)  # (B, F*D + F_dense)
        return self.wide_arch(features, dense) + self.over_arch(self.dense_arch(x)).squeeze(1)  # (B,)


SPEC = register(ModelSpec(
    name="wide_deep", kind="ranker", task="ctr", config=WideDeepConfig,
    build=lambda vocab_sizes, config, sparse_device=None: WideDeep(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's values (not tuned for Wide & Deep itself; docs/tuning.md)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Cheng et al. 2016, Wide & Deep Learning for Recommender Systems",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
