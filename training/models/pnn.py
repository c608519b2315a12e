"""Product-based Neural Network (Qu et al. 2016, "Product-based Neural Networks for User Response Prediction").

    z     = concat(f_1, ..., f_F, x_dense)                            the linear signals, width d_z = F*D + F_dense
    p     = (<f_i, f_j>)_{i<j}                                         inner (IPNN), (B, P)
          = f_sigma f_sigma^T flattened, f_sigma = sum_i f_i           outer (OPNN), (B, D*D)
          = concat of both                                             both (PNN*), (B, P + D*D)
    l_1   = relu(l_z + l_p + b_1) = relu(W_z z + W_p p + b_1)          the product layer, width H_1
    l_k   = relu(W_k l_{k-1} + b_k)                                    k = 2, ..., K
    logit = w . l_K + b

The field embeddings f_i meet in the product layer (``training.modules.ProductLayer``, ``--option product=``):
IPNN their pairwise inner products, OPNN the paper's sum-pooled outer product, so OPNN costs O(D^2) a sample and
not O(F^2 D^2). The paper's l_z + l_p + b_1 is one linear map of concat(z, p), with weights [W_z | W_p]: here it is
the first layer of the DNN (``training.modules.MLP``) over concat(z, p), of width ``hidden[0]``, the same function
with the same parameters, as the authors' released code computes it. W_p is a full matrix: the paper's rank-one
decomposition W_p^n = theta^n theta^n^T for IPNN saves little at P = F (F - 1) / 2 pairs and is left out, and so is
the diagonal <f_i, f_i> of the paper's symmetric inner-product matrix (each pair once, as in FM). The dense
features x_dense (the point-in-time counters of ``features.definitions.DENSE_FEATURES``, when the config names them)
join the linear signals z, as DCN's join x_0; they take no part in the products. No separate first-order part:
z is PNN's linear signal.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D)                 the embedding tables (sharded by DMP)
    InteractionArch   (B, F, D) -> (B, W_p)            the quadratic signals p (no parameters)
    DenseArch         (B, d_z + W_p) -> (B, H)         l_1 = relu(W_z z + W_p p + b_1), then the hidden layers
    OverArch          (B, H) -> (B,)                   the output unit over l_K

Legend: B batch size, F sparse features, F_dense dense features, D embedding dimension, d_z = F*D + F_dense,
P = F (F - 1) / 2 field pairs, W_p = P, D*D or P + D*D (by ``product``), H_1 first and H last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import MLP, ProductLayer, SparseArch, check_dense, table_configs
from training.modules.product import PRODUCTS
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups


@dataclass(frozen=True)
class PNNConfig:
    """Hyper-parameters of PNN.

    Args:
        embedding_dim: D of the field embeddings; a multiple of 4 (FBGEMM's fused kernels).
        product: the product layer's quadratic signals: ``inner`` (IPNN, F (F - 1) / 2 inner products),
            ``outer`` (OPNN, the sum-pooled outer product, D*D values) or ``both`` (PNN*, the two side by side).
        hidden: widths of the DNN's layers; ``hidden[0]`` is the product layer l_1's width.
        dropout: dropout after each hidden layer.
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``product`` not inner, outer or both, no hidden
            layer, or ``dropout`` outside [0, 1).
    """

    embedding_dim: int = 16
    product: str = "inner"
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.product not in PRODUCTS:
            raise ValueError(f"product must be one of {list(PRODUCTS)} (IPNN, OPNN, PNN*), got {self.product!r}")
        if not self.hidden:
            raise ValueError("PNN needs at least one hidden layer: the first is its product layer l_1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PNN(nn.Module):
    """PNN over the declared sparse features and, when configured, the dense ones.

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
    >>> PNN(synthetic_vocab_sizes(), PNNConfig(product="both"))(kjt_of_rows([row] * 3)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: PNNConfig = PNNConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        num_fields = len(self.sparse_arch.feature_names)
        self.interaction_arch = ProductLayer(num_fields, config.embedding_dim, config.product)
        width_z = num_fields * config.embedding_dim + len(config.dense_features)  # d_z
        self.dense_arch = MLP(width_z + self.interaction_arch.out_features, config.hidden, config.dropout)
        self.over_arch = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.sparse_arch(features)  # (B, F, D)
        z = embeddings.flatten(1)  # (B, F*D)
        if self.config.dense_features:
            dense = check_dense(dense, z.shape[0], self.config.dense_features)  # (B, F_dense)
            z = torch.cat([z, dense], dim=1)  # (B, d_z)
        p = self.interaction_arch(embeddings)  # (B, W_p)
        hidden = self.dense_arch(torch.cat([z, p], dim=1))  # (B, H): its first layer is relu(W_z z + W_p p + b_1)
        return self.over_arch(hidden).squeeze(1)  # (B,)


SPEC = register(ModelSpec(
    name="pnn", kind="ranker", task="ctr", config=PNNConfig,
    build=lambda vocab_sizes, config, sparse_device=None: PNN(vocab_sizes, config, sparse_device=sparse_device),
    # DeepFM's, not tuned for PNN
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=1.53e-3, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Qu et al. 2016, Product-based Neural Networks for User Response Prediction",
    item_table="sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,
))
