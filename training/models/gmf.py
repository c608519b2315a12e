"""Generalized Matrix Factorization, the GMF part of Neural Collaborative Filtering (He et al. 2017, "Neural
Collaborative Filtering", WWW, section 3.2):

    logit(u, i) = h^T (p_u * q_i) + b

MF with a learned weight per latent dimension (``h`` all ones and ``b`` = 0 is MF without biases). Trained as the
paper does, pointwise with binary cross-entropy on the implicit label (rating >= 4) of ``gold.ctr_samples``, by the
CTR task; its negatives are the task's rows (events rated below 4), not sampled unobserved items. As a retriever
its query is the user's vector weighted by ``h``: ``<p_u * h, q_i>`` orders items as the logit does (``b`` is the
same for every item), searched by cosine over MIPS-transformed item vectors (``training.query.mips_items``). A
user without a train sample is read as the OOV row that id dropout trains. Its trained tables initialise NeuMF's
GMF tower (``training.models.neumf``), under the same state-dict keys (``sparse_arch.gmf``).

Parts:
    NCFSparseArch     KJT (user_idx, item_idx) -> (B, D) x 2   the GMF tower's user and item tables (sharded by DMP)
    gmf_product       (B, D) x 2 -> (B, D)                     p_u * q_i
    predict           (B, D) -> (B,)                           h and b

Legend: B batch size, D embedding dimension (the paper's predictive factors), U users, R item rows (OOV row 0
included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules.ncf import GMF_ITEM_TABLE, GMF_USER_TABLE, NCF_FEATURES, NCFSparseArch, gmf_product
from training.query import UserVector, mips_items
from training.spec import ModelSpec, TrainDefaults, register

PREDICT_WEIGHT = "predict.weight"  # h, (1, D)


@dataclass(frozen=True)
class GMFConfig:
    """Hyper-parameters of GMF.

    Args:
        embedding_dim: D of the user and item vectors; a multiple of 4 (FBGEMM's fused kernels); NeuMF's
            ``gmf_dim`` when it starts from this model (the paper's 8 predictive factors).
        init_range: vectors start uniform in [-init_range, init_range].

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, or ``init_range`` negative.
    """

    embedding_dim: int = 8
    init_range: float = 0.05

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class GMF(nn.Module):
    """GMF's logit over the user and item tables.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Raises:
        VocabularyError: ``user`` or ``item`` missing from ``vocab_sizes``.

    Call: ``forward(features: KJT with keys user_idx, item_idx, B rows each, dense: ignored) -> logits (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> GMF(synthetic_vocab_sizes())(kjt_of_rows([{"user_idx": 1, "item_idx": 2}] * 3, NCF_FEATURES)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: GMFConfig = GMFConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse_arch = NCFSparseArch(vocab_sizes, gmf_dim=config.embedding_dim, init_range=config.init_range,
                                         sparse_device=sparse_device)
        self.predict = nn.Linear(config.embedding_dim, 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        (user, item), _ = self.sparse_arch(features)  # (B, D) each
        return self.predict(gmf_product(user, item)).squeeze(1)  # (B, D) -> (B,)


def item_vectors(state: dict, config: GMFConfig) -> np.ndarray:
    """(R, D + 1): the item vectors ``q_i`` MIPS-transformed (``training.query.mips_items``), searched by cosine."""
    return mips_items(state[GMF_ITEM_TABLE].numpy())


def query_encoder(state: dict, config: GMFConfig) -> UserVector:
    """The user's vector weighted by the prediction layer, ``p_u * h`` (padded with the MIPS column): the query of
    ``item_vectors``."""
    return UserVector((state[GMF_USER_TABLE] * state[PREDICT_WEIGHT]).numpy(), extra=1)  # (U, D)


SPEC = register(ModelSpec(
    name="gmf", kind="retriever", task="ctr", config=GMFConfig,
    build=lambda vocab_sizes, config, sparse_device=None: GMF(vocab_sizes, config, sparse_device=sparse_device),
    # MF's, not tuned for GMF; no mini-batch aware L2 (the paper has none; id_lookups reads one SparseArch)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.05, lr_dense=1e-3, weight_decay=1e-4,
                        id_dropout=0.5),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="He et al. 2017, Neural Collaborative Filtering",
    item_table=GMF_ITEM_TABLE,
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx",),
    features=lambda config: NCF_FEATURES,
    item_vectors=item_vectors,
    query_encoder=query_encoder,
))
