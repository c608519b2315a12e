"""DIEN (Zhou et al. 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction", AAAI).

    h_t   = GRU(e_t, h_{t-1})                                    interest extractor over the behaviours e_1..e_T
    a_t   = softmax_{t <= T}(h_t W e_a)                          attention to the candidate item e_a (eq. 8)
    h'_t  = AUGRU(h_t, h'_{t-1}; a_t)                            interest evolving layer: u'_t = a_t * u_t (eq. 9-10)
    logit = OverArch(concat(side features, e_a, h'_T[, z]))      (z: dense features, when named)
    loss  = BCE(logit, y) + aux_weight * L_aux,   L_aux = mean over valid steps t < T of
            -log sigmoid(f(h_t, e_{t+1})) - log(1 - sigmoid(f(h_t, e^_{t+1})))           (eq. 6-7, ``DienLoss``)

The behaviour sequence ``hist_item_idx`` (items rated strictly before the sample's time, most recent last;
features.definitions.HISTORY_FEATURE) and the candidate ``item_idx`` are looked up unpooled in ONE item table, as
in DIN (training/models/din.py), through TorchRec's ``EmbeddingCollection``; the histories come right-padded to L
(valid steps first) with a mask. The other sparse features (user, age, gender, occupation, zip, multi-hot genres)
are pooled in an ``EmbeddingBagCollection``. The auxiliary loss's negatives e^_{t+1} are items drawn uniformly from
the vocabulary (not the behaviour itself) by ``DienLoss``, and looked up by the same forward through a third key of
the item table, ``NEGATIVE`` (empty outside training), so that a batch runs the model (and the sharded lookup, a
collective) once. f is a small MLP (the authors' released code; ``training.modules.AuxiliaryNet``). The parts are
``training.modules.interest``'s. DIEN reads the behaviours' items only, not their stars (``hist_rating``).

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, D), candidate (B, D), history (B, L, D) + mask (B, L) [+ negatives (B, L-1, D)]
    InteractionArch   InterestExtractor (GRU) -> states (B, L, H); InterestEvolution (attention + AUGRU) -> (B, H)
    OverArch          (B, (F + 1) * D + H + F_dense) -> (B,)   MLP (Linear, batch norm, Dice) + output unit

Legend: B batch size, F pooled side features, D embedding dimension, H GRU hidden width, L longest history
(``MAX_HISTORY``), F_dense dense features, N ids of a jagged feature, R item rows (OOV row 0 included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import JaggedTensor, KeyedJaggedTensor

from features.definitions import HISTORY_FEATURE, MAX_HISTORY, SPARSE_FEATURES, SparseFeature
from features.errors import VocabularyError
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from features.vocab import OOV_INDEX
from training.modules import (MLP, AuxiliaryNet, InterestEvolution, InterestExtractor, SequenceEmbedding,
                              SparseArch as PooledArch, check_dense, table_configs)
from training.modules.mlp import ACTIVATIONS
from training.spec import ModelSpec, TrainDefaults, register

CANDIDATE = "item_idx"
#: the item table's key for the auxiliary loss's negatives: one per step t (the pair h_t, e_{t+1}), row-major, a row
#: holding max(min(length, L) - 1, 0); filled by ``DienLoss``, empty otherwise. Not a column of the samples.
NEGATIVE = "hist_negative_idx"
#: the KJT keys DIEN reads: the declared sparse features plus the behaviour history.
DIEN_FEATURES: tuple[SparseFeature, ...] = (*SPARSE_FEATURES, HISTORY_FEATURE)


@dataclass(frozen=True)
class DIENConfig:
    """Hyper-parameters of DIEN.

    Args:
        embedding_dim: D for every table; a multiple of 4 (FBGEMM's fused kernels).
        gru_hidden: H of the extractor's GRU and of the AUGRU; None: D.
        aux_weight: the auxiliary loss's weight (the paper's alpha, 1.0); 0 turns it off (no auxiliary net).
        aux_hidden: hidden widths of the auxiliary net f (the authors' code: 100, 50).
        hidden: widths of the OverArch MLP (the paper: 200, 80).
        dropout: dropout after each OverArch hidden layer (DIN's 0.4).
        max_history: L; longer histories keep their first L ids (the export keeps the most recent 50).
        init_range: embedding weights start uniform in [-init_range, init_range].
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).
        activation: of the OverArch's hidden layers: ``dice`` (DIN's) or ``relu``.
        batch_norm: a batch norm after each OverArch linear layer.

    Raises:
        ValueError: ``embedding_dim`` not a positive multiple of 4, ``gru_hidden`` < 1, ``aux_weight`` negative or
            not finite, an empty ``hidden`` (or ``aux_hidden`` with the auxiliary loss on), ``max_history`` < 1 (< 2
            with the auxiliary loss on: it needs a next behaviour), ``dropout`` outside [0, 1) or an unknown
            ``activation``.
    """

    embedding_dim: int = 16
    gru_hidden: int | None = None
    aux_weight: float = 1.0
    aux_hidden: tuple[int, ...] = (100, 50)
    hidden: tuple[int, ...] = (200, 80)
    dropout: float = 0.4
    max_history: int = MAX_HISTORY
    init_range: float = 0.02
    dense_features: tuple[str, ...] = ()
    activation: str = "dice"
    batch_norm: bool = True

    @property
    def hidden_size(self) -> int:
        """H: ``gru_hidden``, or D when unset."""
        return self.embedding_dim if self.gru_hidden is None else self.gru_hidden

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.gru_hidden is not None and self.gru_hidden < 1:
            raise ValueError(f"gru_hidden must be >= 1 (or None: embedding_dim), got {self.gru_hidden}")
        if not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"aux_weight must be a finite number >= 0 (0: no auxiliary loss), got {self.aux_weight}")
        if not self.hidden or (self.aux_weight > 0 and not self.aux_hidden):
            raise ValueError("DIEN needs at least one OverArch and one auxiliary-net hidden layer")
        if self.max_history < 1 + (self.aux_weight > 0):
            raise ValueError(f"max_history must be >= 1 (>= 2 with the auxiliary loss, which predicts the next "
                             f"behaviour), got {self.max_history}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


class Lookups(NamedTuple):
    """What DIEN's SparseArch returns. ``negatives`` (B, L - 1, D), ``negative_ids`` (the ids, jagged) and
    ``negative_rows`` (N, D) (their rows, row-major) are None unless the forward was given negatives."""

    side: torch.Tensor  # (B, F, D)
    candidate: torch.Tensor  # (B, D)
    history: torch.Tensor  # (B, L, D), right-padded with 0
    mask: torch.Tensor  # (B, L) bool
    negatives: torch.Tensor | None = None  # (B, L - 1, D): row t the negative of the pair (h_t, e_{t+1})
    negative_ids: JaggedTensor | None = None
    negative_rows: torch.Tensor | None = None  # (N, D)


class SparseArch(nn.Module):
    """DIEN's embeddings: pooled side features + unpooled candidate, history and negatives from the one item table.

    Call: ``forward(features: KJT, negatives: JaggedTensor of B rows | None) -> Lookups``.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], side: Sequence[SparseFeature], config: DIENConfig,
                 device: torch.device | None = None) -> None:
        super().__init__()
        if "item" not in vocab_sizes:
            raise VocabularyError(f"DIEN's item table needs vocabulary 'item', absent from {sorted(vocab_sizes)}; "
                                  "re-export vocab_sizes.json with the features job")
        self.pooled = PooledArch(table_configs(side, vocab_sizes, config.embedding_dim, config.init_range), device)
        self.sequence = SequenceEmbedding("t_item", vocab_sizes["item"], config.embedding_dim,
                                          [CANDIDATE, HISTORY_FEATURE.name, NEGATIVE], config.init_range, device)
        self.max_history = config.max_history

    def forward(self, features: KeyedJaggedTensor, negatives: JaggedTensor | None = None) -> Lookups:
        jt = features.to_dict()
        side = self.pooled(KeyedJaggedTensor.from_jt_dict({k: jt[k] for k in self.pooled.feature_names}))  # (B,F,D)
        b, device = jt[CANDIDATE].lengths().numel(), features.values().device
        given = negatives if negatives is not None else JaggedTensor(  # the same keys in every call (sharded input)
            values=torch.empty(0, dtype=features.values().dtype, device=device),
            lengths=torch.zeros(b, dtype=torch.int64, device=device))
        seq = self.sequence(KeyedJaggedTensor.from_jt_dict({CANDIDATE: jt[CANDIDATE],
                                                            HISTORY_FEATURE.name: jt[HISTORY_FEATURE.name],
                                                            NEGATIVE: given}))  # {key: JaggedTensor}
        candidate = seq[CANDIDATE].values()  # one id per row: (B, D)
        hist = seq[HISTORY_FEATURE.name]
        history = hist.to_padded_dense(desired_length=self.max_history, padding_value=0.0)  # (B, L, D)
        lengths = hist.lengths().clamp(max=self.max_history)  # (B,)
        mask = torch.arange(self.max_history, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
        if negatives is None:
            return Lookups(side, candidate, history, mask)
        neg = seq[NEGATIVE]
        padded = neg.to_padded_dense(desired_length=self.max_history - 1, padding_value=0.0)  # (B, L - 1, D)
        return Lookups(side, candidate, history, mask, padded, negatives, neg.values())


class DIEN(nn.Module):
    """DIEN over the declared side features, the candidate item and the behaviour history.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        side_features: pooled features (default: ``SPARSE_FEATURES`` without ``item_idx``).
        sparse_device: device of the embedding tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)); negatives
            given to a model without the auxiliary loss (``aux_weight`` 0), or not one per step.

    Call: ``forward(features: KJT with keys DIEN_FEATURES, B rows each, dense: Tensor (B, F_dense) | None = None)
    -> logits Tensor (B,)``; with ``negatives`` (a JaggedTensor of B rows, ``DienLoss.sample``), the training
    forward ``forward_with_aux``'s ``(logits (B,), aux (B, L - 1), steps (B, L - 1) bool)``: ``aux`` the auxiliary
    loss l_t of each pair (h_t, e_{t+1}), 0 where ``steps`` (behaviour t + 1 is real) is False. One ``forward``
    takes both, so that a DistributedModelParallel (whose forward is its module's) runs either.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> rows = [{"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...          "genre_idx": [1, 2], "hist_item_idx": [3, 4, 5]}] * 2
    >>> DIEN(synthetic_vocab_sizes())(kjt_of_rows(rows, DIEN_FEATURES)).shape
    torch.Size([2])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: DIENConfig = DIENConfig(),
                 side_features: Sequence[SparseFeature] = tuple(f for f in SPARSE_FEATURES if f.name != CANDIDATE),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        d, h = config.embedding_dim, config.hidden_size
        self.sparse_arch = SparseArch(vocab_sizes, side_features, config, sparse_device)
        self.extractor = InterestExtractor(d, h)
        self.evolution = InterestEvolution(h, d)
        self.auxiliary = AuxiliaryNet(h, d, config.aux_hidden) if config.aux_weight > 0 else None
        width = (len(side_features) + 1) * d + h + len(config.dense_features)
        mlp = MLP(width, config.hidden, config.dropout, config.activation, config.batch_norm)
        self.over_arch = nn.Sequential(mlp, nn.Linear(config.hidden[-1], 1))

    def _logits(self, s: Lookups, dense: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.extractor(s.history, s.mask)  # (B, L, H), 0 on padding
        final, _ = self.evolution(states, s.mask, s.candidate)  # (B, H): h'_T
        parts = [s.side.flatten(1), s.candidate, final]  # (B, (F + 1) * D + H)
        if self.config.dense_features:
            parts.append(check_dense(dense, s.candidate.shape[0], self.config.dense_features))  # (B, F_dense)
        return self.over_arch(torch.cat(parts, dim=1)).squeeze(1), states  # (B,), (B, L, H)

    def forward_with_aux(self, features: KeyedJaggedTensor, dense: torch.Tensor | None,
                         negatives: JaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.auxiliary is None:
            raise ValueError("this DIEN has no auxiliary net (aux_weight 0): call it without negatives")
        s = self.sparse_arch(features, negatives)
        steps = s.mask[:, 1:]  # (B, L - 1): the pair (h_t, e_{t+1}) is real when behaviour t + 1 is
        if not torch.equal(negatives.lengths(), steps.sum(dim=1)):
            raise ValueError("DIEN takes one negative per step t < min(length, L) - 1 of each history "
                             "(DienLoss.sample draws them)")
        logits, states = self._logits(s, dense)
        aux = self.auxiliary(states[:, :-1], s.history[:, 1:], s.negatives, steps)  # (B, L - 1)
        return logits, aux, steps

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None,
                negatives: JaggedTensor | None = None):
        if negatives is not None:
            return self.forward_with_aux(features, dense, negatives)
        return self._logits(self.sparse_arch(features), dense)[0]


class DienLoss:
    """DIEN's training loss on one CTR batch (``ModelSpec.ctr_loss``): the CTR task's weighted BCE over the real
    rows plus ``aux_weight`` times the auxiliary loss, the mean of l_t (``training.modules.AuxiliaryNet``) over the
    valid steps of the real rows (``weight`` > 0), each against a negative item drawn uniformly from the item rows
    other than the OOV row and the behaviour e_{t+1} itself (drawn among the others, not resampled). One forward of
    the model on the batch's B rows; a batch without a valid step adds 0 (its backward still runs).

        loss = sum_b w_b BCE(logit_b, y_b) / max(sum_b w_b, 1) + aux_weight * sum_{b real, t valid} l_bt / max(#, 1)

    Args:
        n_items: R, rows of the item vocabulary; at least two items besides the OOV row.
        max_history: L of the model's config.
        aux_weight: the auxiliary loss's weight, > 0 (with 0 the model declares no ``ctr_loss``).

    Raises:
        ValueError: fewer than two items, ``max_history`` < 2 or ``aux_weight`` <= 0.

    Call: ``__call__(model, batch: CtrBatch with B rows, generator) -> (loss scalar, rows (B,) bool: the real
    rows)``.
    """

    def __init__(self, n_items: int, max_history: int, aux_weight: float = 1.0) -> None:
        if n_items - (OOV_INDEX + 1) < 2:
            raise ValueError(f"DIEN's auxiliary loss samples a negative other than the next behaviour: needs at "
                             f"least 2 items besides the OOV row, the item vocabulary has {n_items} rows")
        if max_history < 2 or not aux_weight > 0:
            raise ValueError(f"the auxiliary loss needs max_history >= 2 and aux_weight > 0, got {max_history}, "
                             f"{aux_weight}")
        self.n_items, self.max_history, self.aux_weight = n_items, max_history, aux_weight

    def sample(self, history: JaggedTensor, generator: torch.Generator | None = None) -> JaggedTensor:
        """One negative per step of ``history`` (the ids of B rows): row b holds ``max(min(length_b, L) - 1, 0)``
        items, negative t excluding behaviour t + 1 (0-based), uniform over the other items after the OOV row."""
        steps_max = self.max_history - 1
        values = history.values()
        padded = torch.cat([values, values.new_zeros(1)])  # a sentinel: no index falls outside
        ahead = torch.arange(1, steps_max + 1, device=values.device)  # (L - 1,)
        slots = (history.offsets()[:-1].unsqueeze(1) + ahead).clamp(max=len(values))  # (B, L - 1)
        steps = ahead.unsqueeze(0) < history.lengths().clamp(max=self.max_history).unsqueeze(1)  # (B, L - 1)
        positive = padded[slots]  # (B, L - 1): e_{t+1}'s id where ``steps``
        real = positive > OOV_INDEX  # an OOV behaviour excludes nothing
        others = self.n_items - (OOV_INDEX + 1) - real.long()  # (B, L - 1) items a negative may be
        draw = torch.randint(0, 2 ** 62, positive.shape, generator=generator, device=values.device)
        j = OOV_INDEX + 1 + draw % others  # (B, L - 1)
        j = j + (real & (j >= positive)).long()  # never the positive
        return JaggedTensor(values=j[steps].to(values.dtype), lengths=steps.sum(dim=1))  # row-major, as the history

    def __call__(self, model, batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        negatives = self.sample(batch.features[HISTORY_FEATURE.name], generator)
        logits, aux, steps = model(batch.features, batch.dense, negatives)  # (B,), (B, L - 1), (B, L - 1)
        bce = (F.binary_cross_entropy_with_logits(logits, batch.label, reduction="none") * batch.weight).sum() \
            / batch.weight.sum().clamp_min(1.0)
        rows = batch.weight > 0
        counted = steps & rows.unsqueeze(1)  # (B, L - 1)
        aux_mean = torch.where(counted, aux, torch.zeros_like(aux)).sum() / counted.sum().clamp_min(1)
        return bce + self.aux_weight * aux_mean, rows


def id_lookups(sparse_arch: SparseArch, features: KeyedJaggedTensor, out: Lookups, real: torch.Tensor) -> dict:
    """The user and item rows a forward looked up, for the mini-batch aware L2 (``training.tasks.ctr``): the user,
    the candidate, the first L history ids and the sampled negatives of each real row (``real`` (B,) bool).

    Returns:
        ``{table: [(ids (N,), rows (N, D)), ...]}`` for ``t_user`` and ``t_item``.
    """
    names = sparse_arch.pooled.feature_names
    user, item = features["user_idx"].values()[real], features[CANDIDATE].values()[real]
    hist = features[HISTORY_FEATURE.name]
    slots = hist.offsets()[:-1].unsqueeze(1) + torch.arange(out.history.shape[1], device=out.mask.device)  # (B, L)
    looked_up = out.mask & real.unsqueeze(1)  # (B, L)
    items = [(item, out.candidate[real]), (hist.values()[slots[looked_up]], out.history[looked_up])]
    if out.negative_ids is not None:
        keep = torch.repeat_interleave(real, out.negative_ids.lengths())  # (N,): the negatives of real rows
        items.append((out.negative_ids.values()[keep], out.negative_rows[keep]))
    return {"t_user": [(user, out.side[real, names.index("user_idx")])], "t_item": items}


SPEC = register(ModelSpec(
    name="dien", kind="ranker", task="ctr", config=DIENConfig,
    build=lambda vocab_sizes, config, sparse_device=None: DIEN(vocab_sizes, config, sparse_device=sparse_device),
    # DIN's, not tuned for DIEN
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.01, lr_dense=1e-3, weight_decay=1e-4,
                        id_dropout=0.9),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Zhou et al. 2019, Deep Interest Evolution Network for Click-Through Rate Prediction",
    item_table="sparse_arch.sequence.embedding_collection.embeddings.t_item.weight",
    id_tables={"t_user": ("user_idx",), "t_item": (CANDIDATE, HISTORY_FEATURE.name)},
    # the user only: an OOV candidate would blank the attention's query (as DIN)
    id_dropout_features=("user_idx",),
    features=lambda config: DIEN_FEATURES,
    id_lookups=id_lookups,
    ctr_loss=lambda config, vocab_sizes: (DienLoss(vocab_sizes["item"], config.max_history, config.aux_weight)
                                          if config.aux_weight > 0 else None),
))
