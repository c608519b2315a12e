"""The MLP of Neural Collaborative Filtering (He et al. 2017, "Neural Collaborative Filtering", WWW, section 3.3):

    z_1   = [p_u, q_i]                                  (B, 2 D)
    z_l   = ReLU(W_l z_{l-1} + b_l),  l = 1 .. L        the tower, widths ``hidden`` (the paper halves each)
    logit = h^T z_L + b

Trained as the paper does, pointwise with binary cross-entropy on the implicit label (rating >= 4) of
``gold.ctr_samples``, by the CTR task; its negatives are the task's rows (events rated below 4). Its score is not
an inner product of a user and an item vector, so it cannot be searched by ANN: it is a ranker, scoring each
candidate of a retriever (serving's ``--ranker``, the ranker replay). Its item table is exported like other
rankers' (the mean-of-recent-items retrieval). Its trained tables and tower initialise NeuMF's MLP tower
(``training.models.neumf``), under the same state-dict keys (``sparse_arch.mlp``, ``mlp``).

Parts:
    NCFSparseArch     KJT (user_idx, item_idx) -> (B, D) x 2   the MLP tower's user and item tables (sharded by DMP)
    MLPTower (mlp)    (B, D) x 2 -> (B, H)                     the ReLU layers over [p_u, q_i]
    predict           (B, H) -> (B,)                           h and b

Legend: B batch size, D embedding dimension, H the tower's last width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules.ncf import MLP_ITEM_TABLE, NCF_FEATURES, MLPTower, NCFSparseArch
from training.spec import ModelSpec, TrainDefaults, register


@dataclass(frozen=True)
class NCFMLPConfig:
    """Hyper-parameters of NCF's MLP.

    Args:
        embedding_dim: D of the user and item vectors; a multiple of 4 (FBGEMM's fused kernels); NeuMF's
            ``mlp_dim`` when it starts from this model (the paper's tower [64, 32, 16, 8]: D = 32).
        hidden: the tower's widths after its input; NeuMF's ``hidden`` when it starts from this model.
        dropout: dropout after each layer (the paper has none).
        init_range: vectors start uniform in [-init_range, init_range].

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, no layer, ``dropout`` outside [0, 1) or
            ``init_range`` negative.
    """

    embedding_dim: int = 32
    hidden: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    init_range: float = 0.05

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden:
            raise ValueError("the MLP tower needs at least one layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class NCFMLP(nn.Module):
    """NCF's MLP logit over the user and item tables.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Raises:
        VocabularyError: ``user`` or ``item`` missing from ``vocab_sizes``.

    Call: ``forward(features: KJT with keys user_idx, item_idx, B rows each, dense: ignored) -> logits (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> NCFMLP(synthetic_vocab_sizes())(kjt_of_rows([{"user_idx": 1, "item_idx": 2}] * 3, NCF_FEATURES)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: NCFMLPConfig = NCFMLPConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse_arch = NCFSparseArch(vocab_sizes, mlp_dim=config.embedding_dim, init_range=config.init_range,
                                         sparse_device=sparse_device)
        self.mlp = MLPTower(config.embedding_dim, config.hidden, config.dropout)
        self.predict = nn.Linear(config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        _, (user, item) = self.sparse_arch(features)  # (B, D) each
        return self.predict(self.mlp(user, item)).squeeze(1)  # (B, H) -> (B,)


SPEC = register(ModelSpec(
    name="ncf_mlp", kind="ranker", task="ctr", config=NCFMLPConfig,
    build=lambda vocab_sizes, config, sparse_device=None: NCFMLP(vocab_sizes, config, sparse_device=sparse_device),
    # MF's, not tuned; no mini-batch aware L2 (the paper has none; id_lookups reads one SparseArch)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.05, lr_dense=1e-3, weight_decay=1e-4,
                        id_dropout=0.5),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="He et al. 2017, Neural Collaborative Filtering",
    item_table=MLP_ITEM_TABLE,
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx",),
    features=lambda config: NCF_FEATURES,
))
