"""DIN (Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction").

    interest = sum_l a(h_l, c) * h_l            (activation unit a, no softmax, padding weighted 0)
    liking   = sum_l a(h_l, c) * r_l            (r_l: the embedded rating of behaviour l, when the config reads them)
    logit    = OverArch(concat(side features, c, interest[, liking][, z]))   (z: dense features, when named)

The user's behaviour sequence ``hist_item_idx`` (items rated strictly before the sample's time, most recent
last; features.definitions.HISTORY_FEATURE) and the candidate ``item_idx`` are looked up unpooled in ONE item
table through TorchRec's ``EmbeddingCollection``. With ``history_ratings`` the stars the user gave each behaviour
(``hist_rating``, HISTORY_RATING_FEATURE) are looked up unpooled in a small ``t_rating`` table and pooled with the
same attention weights: the paper's behaviours carry their side information (shop, category) the same way, and
here the side information that matters is whether the user liked the behaviour (``liking``, (B, D)). The other
sparse features (user, age, gender, occupation, zip, multi-hot genres) are pooled in an ``EmbeddingBagCollection``
exactly as in DeepFM. All collections are sharded by DMP. The OverArch's hidden layers are Linear -> batch norm ->
Dice, the paper's data-adaptive activation (``training.modules.Dice``). The model returns logits (train with
``BCEWithLogitsLoss``).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D), candidate (B, D), history (B, L, D) + mask (B, L) [+ ratings (B, L, D)]
    InteractionArch   TargetAttention: history, mask, candidate -> interest (B, D)
    OverArch          (B, (F + 2 [+ 1]) * D + F_dense) -> (B,)   MLP (Linear, batch norm, Dice) + output unit

Legend: B batch size, F pooled side features, D embedding dimension, L longest history (``MAX_HISTORY``), F_dense
dense features (the point-in-time counters of ``features.definitions.DENSE_FEATURES``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import (HISTORY_FEATURE, HISTORY_RATING_FEATURE, MAX_HISTORY, SPARSE_FEATURES,
                                  SparseFeature)
from features.errors import VocabularyError
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import (MLP, SequenceEmbedding, SparseArch as PooledArch, TargetAttention, check_dense,
                              table_configs)
from training.spec import ModelSpec, TrainDefaults, register

CANDIDATE = "item_idx"
#: the KJT keys DIN reads: the declared sparse features plus the behaviour history.
DIN_FEATURES: tuple[SparseFeature, ...] = (*SPARSE_FEATURES, HISTORY_FEATURE)


@dataclass(frozen=True)
class DINConfig:
    """Hyper-parameters of DIN.

    Args:
        embedding_dim: D for every table; a multiple of 4 (FBGEMM's fused kernels).
        attention_hidden: hidden widths of the activation unit (the paper: 36).
        hidden: widths of the OverArch MLP (the paper: 200, 80).
        dropout: dropout after each OverArch hidden layer (0.4 chosen on valid; docs/tuning.md).
        max_history: L; longer histories keep their first L ids (the export keeps the most recent 50).
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).
        history_ratings: also read ``hist_rating`` (the behaviours' stars) and pool it by the attention weights;
            the trainer turns it off for an export without that column (``adapt``).
        activation: of the OverArch's hidden layers: ``dice`` (the paper's, eq. 9) or ``relu``.
        batch_norm: a batch norm after each OverArch linear layer (as RecBole's DIN; with Dice it also keeps the
            layer's input in the range where Dice's rectifier point moves).
    """

    embedding_dim: int = 16
    attention_hidden: tuple[int, ...] = (36,)
    hidden: tuple[int, ...] = (200, 80)
    dropout: float = 0.4
    max_history: int = MAX_HISTORY
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()
    history_ratings: bool = True
    activation: str = "dice"
    batch_norm: bool = True

    @property
    def features(self) -> tuple[SparseFeature, ...]:
        """The KJT keys this DIN reads, in batch order."""
        return (*DIN_FEATURES, HISTORY_RATING_FEATURE) if self.history_ratings else DIN_FEATURES

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if not self.hidden or not self.attention_hidden:
            raise ValueError("DIN needs at least one OverArch and one activation-unit hidden layer")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")


def _select(features: KeyedJaggedTensor, keys: Sequence[str]) -> KeyedJaggedTensor:
    """The sub-KJT holding only ``keys`` (each collection is given exactly the keys its tables read)."""
    jt = features.to_dict()
    return KeyedJaggedTensor.from_jt_dict({k: jt[k] for k in keys})


class SparseArch(nn.Module):
    """DIN's embeddings: pooled side features + unpooled candidate/history from the shared item table.

    Call: ``forward(features: KJT) -> (side (B, F, D), candidate (B, D), history (B, L, D), mask BoolTensor (B, L),
    ratings (B, L, D) | None)``; ``ratings`` row l embeds the stars of behaviour l (None without ``history_ratings``).
    """

    def __init__(self, vocab_sizes: Mapping[str, int], side: Sequence[SparseFeature], config: DINConfig,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if "item" not in vocab_sizes:
            raise VocabularyError(f"DIN's item table needs vocabulary 'item', absent from {sorted(vocab_sizes)}; "
                                  "re-export vocab_sizes.json with the features job")
        self.pooled = PooledArch(table_configs(side, vocab_sizes, config.embedding_dim, config.init_range), device)
        self.sequence = SequenceEmbedding("t_item", vocab_sizes["item"], config.embedding_dim,
                                          [CANDIDATE, HISTORY_FEATURE.name], config.init_range, device)
        self.ratings = None
        if config.history_ratings:
            r = HISTORY_RATING_FEATURE
            if r.vocab not in vocab_sizes:
                raise VocabularyError(f"DIN's {r.table} table needs vocabulary {r.vocab!r}, absent from "
                                      f"{sorted(vocab_sizes)}; re-export vocab_sizes.json with the features job")
            self.ratings = SequenceEmbedding(r.table, vocab_sizes[r.vocab], config.embedding_dim, [r.name],
                                             config.init_range, device)
        self.max_history = config.max_history

    def forward(self, features: KeyedJaggedTensor):
        side = self.pooled(_select(features, self.pooled.feature_names))  # (B, F, D)
        seq = self.sequence(_select(features, self.sequence.feature_names))  # {key: JaggedTensor}
        candidate = seq[CANDIDATE].values()  # one id per row: (B, D)
        hist = seq[HISTORY_FEATURE.name]
        history = hist.to_padded_dense(desired_length=self.max_history, padding_value=0.0)  # (B, L, D)
        lengths = hist.lengths().clamp(max=self.max_history)  # (B,)
        mask = torch.arange(self.max_history, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        ratings = None
        if self.ratings is not None:
            r = self.ratings(_select(features, self.ratings.feature_names))[HISTORY_RATING_FEATURE.name]
            ratings = r.to_padded_dense(desired_length=self.max_history, padding_value=0.0)  # (B, L, D)
        return side, candidate, history, mask, ratings


class DIN(nn.Module):
    """DIN over the declared side features, the candidate item and the behaviour history.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        side_features: pooled features (default: ``SPARSE_FEATURES`` without ``item_idx``).
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KJT with keys config.features, B rows each, dense: Tensor (B, F_dense) | None =
    None) -> logits Tensor (B,)``; ``forward_with_weights`` also returns the attention weights (B, L).

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> rows = [{"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...          "genre_idx": [1, 2], "hist_item_idx": [3, 4, 5]}] * 2
    >>> config = DINConfig(history_ratings=False)
    >>> DIN(synthetic_vocab_sizes(), config)(kjt_of_rows(rows, config.features)).shape
    torch.Size([2])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: DINConfig = DINConfig(),
                 side_features: Sequence[SparseFeature] = tuple(f for f in SPARSE_FEATURES if f.name != CANDIDATE),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse_arch = SparseArch(vocab_sizes, side_features, config, sparse_device)
        self.interaction_arch = TargetAttention(config.embedding_dim, config.attention_hidden)
        width = ((len(side_features) + 2 + config.history_ratings) * config.embedding_dim
                 + len(config.dense_features))
        mlp = MLP(width, config.hidden, config.dropout, config.activation, config.batch_norm)
        self.over_arch = nn.Sequential(mlp, nn.Linear(config.hidden[-1], 1))

    def forward_with_weights(self, features: KeyedJaggedTensor,
                             dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        side, candidate, history, mask, ratings = self.sparse_arch(features)
        interest, weights = self.interaction_arch(history, mask, candidate)  # (B, D), (B, L)
        parts = [side.flatten(1), candidate, interest]  # (B, (F + 2) * D)
        if ratings is not None:  # the same weights pool the behaviours' stars: (B, 1, L) @ (B, L, D) -> (B, D)
            parts.append(torch.bmm(weights.unsqueeze(1), ratings).squeeze(1))
        if self.config.dense_features:
            parts.append(check_dense(dense, candidate.shape[0], self.config.dense_features))  # (B, F_dense)
        return self.over_arch(torch.cat(parts, dim=1)).squeeze(1), weights  # (B,), (B, L)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_weights(features, dense)[0]


def id_lookups(sparse_arch: SparseArch, features: KeyedJaggedTensor, out: tuple, real: torch.Tensor) -> dict:
    """The user and item rows a forward looked up, for the mini-batch aware L2 (``training.tasks.ctr``): the user,
    the candidate and the first L history ids of each real row (``real`` (B,) bool; padding rows left out).

    Returns:
        ``{table: [(ids (N,), rows (N, D)), ...]}`` for ``t_user`` and ``t_item``.
    """
    side, candidate, history, mask, _ = out  # (B, F, D), (B, D), (B, L, D), (B, L), ratings
    names = sparse_arch.pooled.feature_names
    user, item = features["user_idx"].values()[real], features[CANDIDATE].values()[real]
    hist = features[HISTORY_FEATURE.name]
    slots = hist.offsets()[:-1].unsqueeze(1) + torch.arange(history.shape[1], device=mask.device)  # (B, L)
    looked_up = mask & real.unsqueeze(1)  # (B, L)
    return {"t_user": [(user, side[real, names.index("user_idx")])],
            "t_item": [(item, candidate[real]),
                       (hist.values()[slots[looked_up]], history[looked_up])]}  # first L ids, row-major


def adapt(config: DINConfig, columns: set) -> DINConfig:
    """``config`` for an export with ``columns``: without ``hist_rating`` (written before the features stage
    computed it) the stars are not read."""
    if config.history_ratings and HISTORY_RATING_FEATURE.name not in columns:
        logging.getLogger(__name__).warning("the ctr_samples export has no %s (re-run the features stage): DIN "
                                            "reads the behaviours' items only", HISTORY_RATING_FEATURE.name)
        return dataclasses.replace(config, history_ratings=False)
    return config


SPEC = register(ModelSpec(
    name="din", kind="ranker", task="ctr", config=DINConfig,
    build=lambda vocab_sizes, config, sparse_device=None: DIN(vocab_sizes, config, sparse_device=sparse_device),
    # chosen on valid with the counters, id dropout and the stars (docs/tuning.md, BENCHMARKS.md tuning-din-dice)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.01, lr_dense=1e-3, weight_decay=1e-4,
                        id_dropout=0.9),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Zhou et al. 2018, Deep Interest Network for Click-Through Rate Prediction",
    item_table="sparse_arch.sequence.embedding_collection.embeddings.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": (CANDIDATE, HISTORY_FEATURE.name)},
    # the user only: an OOV candidate would blank the attention's query (docs/tuning.md)
    id_dropout_features=("user_idx",),
    features=lambda config: config.features,
    adapt=adapt,
    id_lookups=id_lookups,
))
