"""Factorization machine (Rendle 2010, "Factorization Machines", eq. 1):

    logit = b + sum_f w_f[x_f] + w_d . z + sum_{i<j} <v_i, v_j>

over the declared sparse features (one field each, ``features.definitions.SPARSE_FEATURES``): a bias, a weight per
id (``FirstOrder``; a multi-hot field sums its ids' weights) and the pairwise interactions of the fields' latent
vectors ``v`` (``FactorizationMachine``, Rendle's O(F D) identity). A multi-hot field (genres) is one sum-pooled
vector, so its pair with another field is the sum of its ids' pairs (x = 1 each); pairs of two ids of one field
are not counted. The dense features ``z`` (the point-in-time counters of ``features.definitions.DENSE_FEATURES``,
when the config names them) enter linearly only, as in DeepFM; the paper's FM would also give each real-valued
input a latent vector. It is DeepFM without the DNN: the second-order term is the only interaction. The linear part
starts at 0 (bias, first-order weights, dense term) and is dense: ``FirstOrder``'s 1-dim tables are replicated by
DMP and trained by AdamW with the dense term (``lr_dense``); the latent vectors by the fused row-wise Adagrad.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)               the embedding tables (sharded by DMP)
    InteractionArch   (B, F, D) + KJT -> (B,)        bias + first order + FM second-order term
    DenseArch         (B, F_dense) -> (B,)           the linear term on the dense features (absent without them)

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import FactorizationMachine, FirstOrder, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class FMConfig:
    """Hyper-parameters of the factorization machine.

    Args:
        embedding_dim: D of the latent vectors; a multiple of 4 (FBGEMM's fused kernels).
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
    """The FM itself on the sparse fields: bias + first-order weights + second-order pairwise interactions.

    Call: ``forward(features: KJT, embeddings: Tensor (B, F, D)) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder) -> None:
        super().__init__()
        self.first_order = first_order
        self.fm = FactorizationMachine()

    def forward(self, features: KeyedJaggedTensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.first_order(features) + self.fm(embeddings)  # (B,)


class FM(nn.Module):
    """A factorization machine over the declared sparse features, plus a linear term on the dense ones.

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
    >>> FM(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: FMConfig = FMConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.interaction_arch = InteractionArch(FirstOrder(tables))
        num_dense = len(config.dense_features)
        self.dense_arch = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        if self.dense_arch is not None:
            nn.init.zeros_(self.dense_arch.weight)  # the linear part starts at 0, like the first-order weights

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        logit = self.interaction_arch(features, embeddings)  # (B,)
        if self.dense_arch is not None:
            dense = check_dense(dense, embeddings.shape[0], self.config.dense_features)  # (B, F_dense)
            logit = logit + self.dense_arch(dense).squeeze(1)
        return logit  # (B,)


SPEC = register(ModelSpec(
    name="fm", kind="ranker", task="ctr", config=FMConfig,
    build=lambda vocab_sizes, config, sparse_device=None: FM(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for FM, except lr_dense: at DeepFM's 1.53e-3 the linear part (bias, first order, dense
    # term) was still rising after 12 epochs (valid AUC 0.680); 1e-2 chosen on valid from {1.53e-3, 1e-2, 2e-2}
    # (docs/tuning.md)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1e-2, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Rendle 2010, Factorization Machines",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
