"""Factorisation-machine supported Neural Network (Zhang, Du & Wang 2016, "Deep Learning over Multi-field Categorical
Data: A Case Study on User Response Prediction", ECIR, section 3.1):

    z_i   = (w_i[x_i], v_i[x_i])                              field i's first-order weight and latent vector
    z     = concat(z_1, ..., z_F, x_dense)                    width d = F (D + 1) + F_dense
    logit = w_out . DNN(z) + b

A DNN over the concatenated field embeddings whose embedding layer starts from a trained FM
(``training.models.fm``): its spec's ``init_from`` names FM, so the trainer copies the FM's saved tables of the same
state-dict key and shape into FNN's before training (``training.trainer.init_tables``; not on a resume) -- the
latent vectors ``v`` (``sparse_arch``, the same tables, vocabularies and D) and the first-order weights ``w``
(``interaction_arch.first_order``, under FM's names). Then the whole network is trained, the tables included (the
paper's fine-tuning by back-propagation). Kept from the paper's z: each field's w_i next to v_i. Left out: its
global bias w_0, a constant input to the first hidden layer that that layer's bias absorbs (FM's bias is not
copied); its tanh (the platform's MLP is ReLU, which Qu et al. 2016, the same group, found better) and its
RBM/DAE pre-training of the hidden layers (they start from their default init). The dense features (the
point-in-time counters of ``features.definitions.DENSE_FEATURES``, when the config names them) join z as in DCN;
FM's linear term on them is not copied. ``init_from_fm=False`` starts from random tables (uniform in
[-init_range, init_range], first-order weights 0): the comparison that shows what the FM start is worth.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the latent vectors v (sharded by DMP)
    InteractionArch   KJT + (B, F, D) -> (B, F (D+1))  z: each field's w_i beside its v_i (w: dense, replicated)
    DenseArch         (B, d) -> (B, H)                 the DNN's hidden layers, d = F (D+1) + F_dense
    OverArch          (B, H) -> (B,)                   the output unit

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, H last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.models.fm import SPEC as FM_SPEC
from training.modules import MLP, SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class FNNConfig:
    """Hyper-parameters of FNN.

    Args:
        embedding_dim: D of the latent vectors; a multiple of 4 (FBGEMM's fused kernels); the FM's D when
            ``init_from_fm``.
        hidden: widths of the DNN's hidden layers (DCN's, not tuned; the paper has three, tanh).
        dropout: dropout after each hidden layer.
        init_range: latent vectors start uniform in [-init_range, init_range] (before the FM's are copied, or for
            good without ``init_from_fm``); first-order weights at 0.
        init_from_fm: start the tables from the FM trained into the same run folder (the paper's FNN); False:
            from random tables.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, no hidden layer, ``dropout`` outside [0, 1) or
            ``init_range`` negative.
    """

    embedding_dim: int = 16
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    init_range: float = 0.02
    init_from_fm: bool = True
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden:
            raise ValueError("FNN needs at least one hidden layer in its DNN")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class FieldWeights(nn.Module):
    """The first-order weight w_i[x_i] of every feature, one column each (FM's ``FirstOrder`` without the sum and
    the bias; its tables under the same names, ``weights.<table>.weight`` (V, 1), so FM's copy into them). Tiny,
    so plain ``nn.EmbeddingBag`` modules that DMP replicates; a multi-hot feature sums its ids' weights.

    Call: ``forward(features: KeyedJaggedTensor) -> Tensor (B, F)``, features in the tables' order.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.weights = nn.ModuleDict({
            t.name: nn.EmbeddingBag(t.num_embeddings, 1, mode="sum", include_last_offset=True) for t in tables
        })
        for bag in self.weights.values():
            nn.init.zeros_(bag.weight)
        self.table_of = {name: t.name for t in tables for name in t.feature_names}

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        jagged = features.to_dict()
        return torch.cat([self.weights[table](jagged[name].values(), jagged[name].offsets())  # (B, 1)
                          for name, table in self.table_of.items()], dim=1)  # (B, F)


class InteractionArch(nn.Module):
    """The paper's dense real layer z without w_0: each field's (w_i, v_i) side by side, flattened. FNN has no
    explicit interaction: the DNN over z learns it.

    Call: ``forward(features: KJT, embeddings: Tensor (B, F, D)) -> Tensor (B, F (D + 1))``.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.first_order = FieldWeights(tables)

    def forward(self, features: KeyedJaggedTensor, embeddings: torch.Tensor) -> torch.Tensor:
        w = self.first_order(features).unsqueeze(2)  # (B, F, 1)
        return torch.cat([w, embeddings], dim=2).flatten(1)  # (B, F, D + 1) -> (B, F (D + 1))


class FNN(nn.Module):
    """FNN over the declared sparse features and, when configured, the dense ones.

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
    >>> FNN(synthetic_vocab_sizes())(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: FNNConfig = FNNConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.interaction_arch = InteractionArch(tables)
        width = len(self.sparse_arch.feature_names) * (config.embedding_dim + 1) + len(config.dense_features)  # d
        self.dense_arch = MLP(width, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        z = self.interaction_arch(features, embeddings)  # (B, F (D + 1))
        if self.config.dense_features:
            dense = check_dense(dense, z.shape[0], self.config.dense_features)  # (B, F_dense)
            z = torch.cat([z, dense], dim=1)  # (B, d)
        return self.over_arch(self.dense_arch(z)).squeeze(1)  # (B, H) -> (B,)


SPEC = register(ModelSpec(
    name="fnn", kind="ranker", task="ctr", config=FNNConfig,
    build=lambda vocab_sizes, config, sparse_device=None: FNN(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for FNN
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Zhang, Du & Wang 2016, Deep Learning over Multi-field Categorical Data: A Case Study on User Response "
          "Prediction",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
    init_from=lambda config: FM_SPEC.name if config.init_from_fm else None,  # its tables start from the FM's
))
