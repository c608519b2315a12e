"""Matrix factorisation with biases (Koren, Bell & Volinsky 2009, "Matrix Factorization Techniques for Recommender
Systems"; the dot product plus biases of fastai's ``EmbeddingDotBias``):

    logit(u, i) = <p_u, q_i> + b_u + b_i + b

trained on the implicit label (rating >= 4) with the CTR task's binary cross-entropy (``loss="bce"``), or with BPR
(``loss="bpr"``; Rendle et al. 2009, "BPR: Bayesian Personalized Ranking from Implicit Feedback") on the batch's
positive rows, each against ``negatives`` items j drawn uniformly from the item rows other than the OOV row and the
positive item i itself (``BPRLoss``):

    loss = -mean over (u, i, j) of log sigmoid(x_ui - x_uj),   x_ui - x_uj = <p_u, q_i - q_j> + b_i - b_j

(``b_u`` and ``b`` cancel); L2 on the user and item rows each batch looks up (the mini-batch aware L2 of
``training.tasks.ctr``, ``mba_lambda``; with BPR the sampled negatives' rows too) and AdamW's decay on the biases.
Either way the valid split is scored by the logit (AUC, early stopping). As a retriever its query is the user's own
vector: ``<[p_u, 1], [q_i, b_i]>`` orders items as the logit does (``b_u`` and ``b`` are the same for every item),
searched by cosine over MIPS-transformed item vectors (``training.query.mips_items``). A user without a train
sample is read as the OOV row that id dropout trains.

Parts:
    SparseArch        KJT (user_idx, item_idx) -> (B, 2, D)    the user and item tables (sharded by DMP)
    FirstOrder        KJT -> (B,)                              b_u + b_i + b

Legend: B batch size, K negatives per positive, D embedding dimension, U users, R item rows (OOV row 0 included).
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
from features.vocab import OOV_INDEX
from training.modules import FirstOrder, SparseArch, table_configs
from training.query import UserVector, mips_items
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups

#: The two features MF reads: the user and the item.
MF_FEATURES = tuple(f for f in SPARSE_FEATURES if f.name in ("user_idx", "item_idx"))
USER_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_user.weight"
ITEM_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight"
ITEM_BIAS = "biases.weights.t_item.weight"
#: The data losses of ``MFConfig.loss``: the CTR task's binary cross-entropy, or BPR (``BPRLoss``).
LOSSES = ("bce", "bpr")


@dataclass(frozen=True)
class MFConfig:
    """Hyper-parameters of matrix factorisation.

    Args:
        embedding_dim: D of the user and item vectors; a multiple of 4 (FBGEMM's fused kernels).
        init_range: vectors start uniform in [-init_range, init_range]; biases at 0.
        loss: ``bce`` (the CTR task's weighted binary cross-entropy on every row) or ``bpr`` (``BPRLoss`` on the
            label-1 rows).
        negatives: K, items sampled per positive row with ``loss="bpr"``; >= 1.

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``loss`` not one of ``LOSSES``, or
            ``negatives`` < 1.
    """

    embedding_dim: int = 16
    init_range: float = 0.05
    loss: str = "bce"
    negatives: int = 1

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")


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


class BPRLoss:
    """Bayesian Personalized Ranking (Rendle et al. 2009) on one CTR batch: each positive row (label 1, weight > 0)
    (u, i) against K items j drawn uniformly from the item rows other than the OOV row and i (never i itself: drawn
    among the others, not resampled), ``-log sigmoid(x_ui - x_uj)`` averaged over the K negatives, then the
    weighted mean over the positive rows. Label-0 rows and padding take no part; a batch without a positive row
    gives a loss of 0 that still back-propagates (zero gradients), so that every rank runs its backward.

    Args:
        n_items: R, rows of the item vocabulary (OOV row 0 included); at least two items besides the OOV row.
        negatives: K >= 1.

    Raises:
        ValueError: fewer than two items, or ``negatives`` < 1.

    Call: ``__call__(model, batch: CtrBatch with B rows of one user and one item id each, generator) ->
    (loss scalar, rows (B * (1 + K),) bool)``: one forward of ``model`` on the B rows then the B * K negative rows
    (negative k of row b at row B + k * B + b); ``rows`` marks those of positive rows (the mini-batch aware L2
    counts their users, positive and negative items).
    """

    def __init__(self, n_items: int, negatives: int = 1) -> None:
        if n_items - (OOV_INDEX + 1) < 2:
            raise ValueError(f"BPR samples a negative item other than the positive: needs at least 2 items besides "
                             f"the OOV row, the item vocabulary has {n_items} rows")
        if negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {negatives}")
        self.n_items, self.negatives = n_items, negatives

    def sample(self, items: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K) negatives for the positive ``items`` (B,): uniform over the item rows after the OOV row, the
        positive excepted (drawn among the others, then shifted past it)."""
        positive = items[:, None]  # (B, 1)
        real = positive > OOV_INDEX  # an OOV positive excludes nothing
        others = self.n_items - (OOV_INDEX + 1) - real.long()  # (B, 1) items a negative may be
        draw = torch.randint(0, 2 ** 62, (len(items), self.negatives), generator=generator, device=items.device)
        j = OOV_INDEX + 1 + draw % others  # (B, K) in [first item, first item + others)
        return j + (real & (j >= positive)).long()  # (B, K), never the positive

    def __call__(self, model, batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = len(batch.label), self.negatives
        users, items = batch.features["user_idx"].values(), batch.features["item_idx"].values()  # (B,) each
        negatives = self.sample(items, generator)  # (B, K)
        values = torch.cat([users.repeat(1 + k), items, negatives.t().reshape(-1)])  # (2 * B * (1 + K),)
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_idx", "item_idx"], values=values,
            lengths=torch.ones(2 * b * (1 + k), dtype=torch.int64, device=values.device))
        dense = None if batch.dense is None else batch.dense.repeat(1 + k, 1)  # (B * (1 + K), F_dense)
        logits = model(features, dense)  # (B * (1 + K),)
        diff = logits[:b] - logits[b:].view(k, b)  # (K, B): x_ui - x_uj
        weight = batch.weight * (batch.label > 0.5)  # (B,): 0 for label-0 and padding rows
        per_row = -torch.nn.functional.logsigmoid(diff).mean(dim=0)  # (B,)
        loss = (per_row * weight).sum() / weight.sum().clamp_min(1.0)
        return loss, (weight > 0).repeat(1 + k)


def ctr_loss(config: MFConfig, vocab_sizes: Mapping[str, int]) -> BPRLoss | None:
    """MF's data loss for the CTR task (``ModelSpec.ctr_loss``): ``BPRLoss`` with ``loss="bpr"``, else None (the
    task's binary cross-entropy)."""
    return BPRLoss(vocab_sizes["item"], config.negatives) if config.loss == "bpr" else None


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
    ctr_loss=ctr_loss,
))
