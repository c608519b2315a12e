"""Matrix factorisation with biases (Koren, Bell & Volinsky 2009, "Matrix Factorization Techniques for Recommender
Systems"; the dot product plus biases of fastai's ``EmbeddingDotBias``):

    logit(u, i) = <p_u, q_i> + b_u + b_i + b

trained on the implicit label (rating >= 4) with the CTR task's binary cross-entropy, L2 on the user and item rows
each batch looks up (the mini-batch aware L2 of ``training.tasks.ctr``, ``mba_lambda``) and AdamW's decay on the
biases. As a retriever its query is the user's own vector: ``<[p_u, 1], [q_i, b_i]>`` orders items as the logit
does (``b_u`` and ``b`` are the same for every item), searched by cosine over MIPS-transformed item vectors
(``training.query.mips_items``). A user without a train sample is read as the OOV row that id dropout trains.

Parts:
    SparseArch        KJT (user_idx, item_idx) -> (B, 2, D)    the user and item tables (sharded by DMP)
    FirstOrder        KJT -> (B,)                              b_u + b_i + b

Legend: B batch size, D embedding dimension, U users, R item rows.
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
from training.modules import FirstOrder, SparseArch, table_configs
from training.query import UserVector, mips_items
from training.registry import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups

#: The two features MF reads: the user and the item.
MF_FEATURES = tuple(f for f in SPARSE_FEATURES if f.name in ("user_idx", "item_idx"))
USER_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
ITEM_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"
ITEM_BIAS = "biases.weights.t_item.weight"


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of matrix factorisation.

    Args:
        embedding_dim: D of the user and item vectors; a multiple of 4 (FBGEMM's fused kernels).
        init_range: vectors start uniform in [-init_range, init_range]; biases at 0.
    """

    embedding_dim: int = 16
    init_range: float = 0.05

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")


class MF(nn.Module):
    """Dot product plus biases over the user and item tables.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Raises:
        VocabularyError: ``user`` or ``item`` missing from ``vocab_sizes``.

    Call: ``forward(features: KJT with keys user_idx, item_idx, B rows each, dense: ignored) -> logits (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> MF(synthetic_vocab_sizes())(kjt_of_rows([{"user_idx": 1, "item_idx": 2}] * 3, MF_FEATURES)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: MFConfig = MFConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(MF_FEATURES, vocab_sizes, config.embedding_dim, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.biases = FirstOrder(tables)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.sparse_arch(features)  # (B, 2, D): user, item
        user, item = emb[:, self.sparse_arch.feature_names.index("user_idx")], \
            emb[:, self.sparse_arch.feature_names.index("item_idx")]  # (B, D) each
        return (user * item).sum(dim=1) + self.biases(features)  # (B,)


def item_vectors(state: dict, config: MFConfig) -> np.ndarray:
    """(R, D + 2): ``[q_i, b_i]`` MIPS-transformed (``training.query.mips_items``), searched by cosine."""
    items = torch.cat([state[ITEM_TABLE], state[ITEM_BIAS]], dim=1).numpy()  # (R, D + 1)
    return mips_items(items)


def query_encoder(state: dict, config: MFConfig) -> UserVector:
    """The user's vector ``[p_u, 1]`` (padded with the MIPS column): the query of ``item_vectors``."""
    users = state[USER_TABLE].numpy()
    return UserVector(np.hstack([users, np.ones((len(users), 1), users.dtype)]), extra=1)


SPEC = register(ModelSpec(
    name="mf", kind="retriever", task="ctr", config=MFConfig,
    build=lambda vocab_sizes, config, sparse_device=None: MF(vocab_sizes, config, sparse_device=sparse_device),
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.05, lr_dense=1e-3, weight_decay=1e-4,
                        mba_lambda=1e-3, id_dropout=0.5),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Koren, Bell & Volinsky 2009, Matrix Factorization Techniques for Recommender Systems",
    item_table=ITEM_TABLE,
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx",),
    features=lambda config: MF_FEATURES,
    id_lookups=pooled_id_lookups,
    item_vectors=item_vectors,
    query_encoder=query_encoder,
))
