"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction").

    logit = first_order(x) + w_d . z + FM(V x) + DNN(concat(V x, z))

One embedding layer (``SparseArch``) feeds both the FM interaction and the deep part; the first-order weights
are separate 1-dim tables. Dense features ``z`` (the point-in-time counters of
``features.definitions.DENSE_FEATURES``, when the config names them) enter the linear part and the DNN's input,
as in DeepCTR's DeepFM; the FM term is over the sparse embeddings only. The model returns logits; train it with
``BCEWithLogitsLoss`` (the sigmoid is applied once, inside the loss, and by the caller at prediction time).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)            the shared embedding tables (sharded by DMP)
    InteractionArch   (B, F, D) + KJT -> (B,)     first-order + FM second-order term
    DenseArch         (B, F*D + F_dense) -> (B, H) the deep part's hidden layers
    OverArch          (B, H) -> (B,)              the deep part's output unit

Legend: B batch size, F number of sparse features, F_dense dense features, D embedding dimension, H last hidden
width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES, SparseFeature
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import MLP, FactorizationMachine, FirstOrder, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class DeepFMConfig:
    """Hyper-parameters of DeepFM.

    Args:
        embedding_dim: D, shared by FM and the DNN; a multiple of 4 (FBGEMM's fused kernels).
        hidden: widths of the DNN's hidden layers.
        dropout: dropout after each hidden layer (0 chosen on valid; docs/tuning.md).
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

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
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KeyedJaggedTensor with B rows per key, dense: Tensor (B, F_dense) | None = None)
    -> logits Tensor (B,)``; ``dense`` is required when ``config.dense_features`` is not empty.

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
        num_dense = len(config.dense_features)
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        self.dense_arch = MLP(num_features * config.embedding_dim + num_dense, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        logit = self.interaction_arch(features, embeddings)  # (B,)
        x = embeddings.flatten(1)  # (B, F*D)
        if self.dense_linear is not None:
            dense = check_dense(dense, x.shape[0], self.config.dense_features)
            logit = logit + self.dense_linear(dense).squeeze(1)
            x = torch.cat([x, dense], dim=1)  # (B, F*D + F_dense)
        return logit + self.over_arch(self.dense_arch(x)).squeeze(1)  # (B,)


SPEC = register(ModelSpec(
    name="deepfm", kind="ranker", task="ctr", config=DeepFMConfig,
    build=lambda vocab_sizes, config, sparse_device=None: DeepFM(vocab_sizes, config, sparse_device=sparse_device),
    # bench.tune's choice on valid with the counters and id dropout (docs/tuning.md, BENCHMARKS.md tuning-counters)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Guo et al. 2017, DeepFM: A Factorization-Machine based Neural Network for CTR Prediction",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    # the user and the candidate item (a grid on valid preferred both to the user alone; docs/tuning.md)
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
