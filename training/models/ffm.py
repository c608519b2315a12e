"""Field-aware factorization machine (Juan, Zhuang, Chin & Lin 2016, "Field-aware Factorization Machines for CTR
Prediction"):

    logit = b + sum_f w_f[x_f] + w_d . z + sum_{i<j} <v_{i, f_j}, v_{j, f_i}>

Every declared sparse feature (``features.definitions.SPARSE_FEATURES``) is its own field, and each of its ids has
one latent vector per other field: a pair (i, j) multiplies i's vector facing j's field with j's vector facing i's
(``training.modules.FieldAwareInteraction``). The paper writes phi_FFM as this pairwise term alone (linear and bias
terms left out for simplicity); here the bias, the first-order weights (``FirstOrder``) and a linear term on the
dense features ``z`` (the point-in-time counters, when the config names them) are added as in Rendle's FM
(``training.models.fm``), so the two differ only in the interaction (the linear part starts at 0 and is trained by
AdamW, ``lr_dense``; the field-aware vectors by the fused row-wise Adagrad). A multi-hot field (genres) is
sum-pooled: its pair with field j is the sum of its ids' pairs with j (x = 1 each); pairs inside one field are not
counted. The paper's instance-wise normalisation is not applied: every id has x = 1.

Layout: one table per feature, of width (F - 1) * D, keeping the declared table names (``t_user``, ``t_item``,
...): block k of a row is the id's vector facing the k-th other field in feature order
(``training.modules.field_block``). One table per (feature, other field) would give F (F - 1) = 42 tables of width
D instead; the wide rows keep the 7 declared tables, so the planner shards them like every other ranker's tables,
one lookup per feature fetches all of an id's vectors, and id dropout, the cold-row fill and the mini-batch aware
L2 (all keyed by ``t_user`` / ``t_item``) apply to the whole row unchanged. The cost: a width (F - 1) * D that
grows with the number of fields (96 floats per id at F = 7, D = 16).

The exported item vectors (``item_vectors``) are the item's block facing the user field, v_{item, f_user}: the side
of the user-item pair <v_{user, f_item}, v_{item, f_user}> that belongs to the item, (R, D).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, (F-1)*D)            the field-aware tables (sharded by DMP)
    InteractionArch   (B, F, (F-1)*D) + KJT -> (B,)     bias + first order + field-aware pairwise term
    DenseArch         (B, F_dense) -> (B,)              the linear term on the dense features (absent without them)

Legend: B batch size, F sparse features (fields), F_dense dense features, D latent dimension per field, R item rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import FieldAwareInteraction, FirstOrder, SparseArch, check_dense, field_block, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups

#: The fields, in the order of the tables' blocks: the declared sparse features.
FIELDS = tuple(f.name for f in SPARSE_FEATURES)
ITEM_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"


@dataclass(frozen=True)
class FFMConfig:
    """Hyper-parameters of the field-aware factorization machine.

    Args:
        embedding_dim: D of each field-aware vector; a multiple of 4 (so the (F - 1) * D rows suit FBGEMM's fused
            kernels).
        init_range: latent vectors start uniform in [-init_range, init_range]; first-order weights at 0.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, or ``init_range`` negative.
    """

    embedding_dim: int = 16
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class InteractionArch(nn.Module):
    """Bias + first-order weights + the field-aware pairwise term.

    Call: ``forward(features: KJT, embeddings: Tensor (B, F, (F-1)*D)) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder, num_fields: int, embedding_dim: int) -> None:
        super().__init__()
        self.first_order = first_order
        self.ffm = FieldAwareInteraction(num_fields, embedding_dim)

    def forward(self, features: KeyedJaggedTensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.first_order(features) + self.ffm(embeddings)  # (B,)


class FFM(nn.Module):
    """A field-aware factorization machine over the declared sparse features, plus a linear term on the dense ones.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError: two declared features share a table (a field needs rows of its own); from ``forward``,
            ``dense`` missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KJT with the keys of SPARSE_FEATURES, B rows each, dense: Tensor (B, F_dense) | None
    = None) -> logits Tensor (B,)``; ``dense`` is required when ``config.dense_features`` is not empty.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...        "genre_idx": [1, 2]}
    >>> model = FFM(synthetic_vocab_sizes())
    >>> model(kjt_of_rows([row] * 3)).shape, model.sparse_arch(kjt_of_rows([row])).shape  # (F-1)*D = 6*16
    (torch.Size([3]), torch.Size([1, 7, 96]))
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: FFMConfig = FFMConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        num_fields = len(FIELDS)
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, (num_fields - 1) * config.embedding_dim,
                               config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        if tuple(self.sparse_arch.feature_names) != FIELDS:
            raise ValueError(f"FFM needs one table per field; the declared features {list(FIELDS)} share tables "
                             f"({[t.name for t in tables]})")
        self.interaction_arch = InteractionArch(FirstOrder(tables), num_fields, config.embedding_dim)
        num_dense = len(config.dense_features)
        self.dense_arch = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        if self.dense_arch is not None:
            nn.init.zeros_(self.dense_arch.weight)  # the linear part starts at 0, like the first-order weights

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, (F-1)*D)
        logit = self.interaction_arch(features, embeddings)  # (B,)
        if self.dense_arch is not None:
            dense = check_dense(dense, embeddings.shape[0], self.config.dense_features)  # (B, F_dense)
            logit = logit + self.dense_arch(dense).squeeze(1)
        return logit  # (B,)


def item_vectors(state: dict, config: FFMConfig) -> np.ndarray:
    """(R, D): each item's vector facing the user field, v_{item, f_user}, the block of its (F - 1) * D row."""
    k = field_block(FIELDS.index("item_idx"), FIELDS.index("user_idx"))
    d = config.embedding_dim
    return state[ITEM_TABLE][:, k * d:(k + 1) * d].numpy()  # (R, D)


SPEC = register(ModelSpec(
    name="ffm", kind="ranker", task="ctr", config=FFMConfig,
    build=lambda vocab_sizes, config, sparse_device=None: FFM(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for FFM, except lr_dense: at DeepFM's 1.53e-3 the linear part (bias, first order, dense
    # term) lagged the pairwise term (valid AUC 0.648); 2e-2 chosen on valid from {1.53e-3, 1e-2, 2e-2}
    # (docs/tuning.md)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=2e-2, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Juan et al. 2016, Field-aware Factorization Machines for CTR Prediction",
    item_table=ITEM_TABLE,
    item_vectors=item_vectors,
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,  # the whole (F-1)*D row of each user / item id looked up
))
