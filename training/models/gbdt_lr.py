"""GBDT+LR (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads at Facebook"): gradient-boosted trees
transform a sample into the leaves it reaches, one per tree, and a logistic regression over those leaves predicts
the click:

    logit = b + sum_{t=1..T} w[t, leaf_t(x)]

x is the sample's CTR features -- the declared sparse ids as categorical columns, the genres as one 0/1 column each,
the point-in-time counters when the config names them (``training.modules.gbdt.TreeInputs``) -- and leaf_t(x) the
leaf of tree t that x falls into. As in the paper, the trees are fitted first and are not back-propagated: LightGBM
(Ke et al. 2017) fits them on the whole train split, early-stopped on the valid split (``tree_metric``), before the
first step (the ``ctr`` task calls ``prefit`` on rank 0 and every rank loads its booster, ``load_prefit``); then
the trainer fits the LR as it fits every ranker, early-stopped on valid AUC.

Where each part lives:
- the trees: ``trees``, a ``BoostedTrees`` module (``training.modules.gbdt``) on CPU, never sharded; its LightGBM
  model string is the module's extra state, so the booster is in the state dict: ``model.pt``, the checkpoints of a
  resumed run and ``load_model`` carry it, and serving and the ranker replay call this forward unchanged. The
  forward computes the leaves on CPU for every batch (``predict(pred_leaf=True)``). A worker restarted after a
  failure refits the same booster (LightGBM's deterministic mode, same data, seed and threads) before it loads its
  checkpoint, whose booster then replaces it.
- the LR's weights: the table ``t_leaf`` of one row per (tree, leaf), ``num_trees * num_leaves`` rows of width 4,
  in a ``SparseArch`` sharded by TorchRec like every model's tables and trained by the trainer's fused row-wise
  Adagrad (``lr_sparse``). Column 0 is the weight, columns 1-3 pad the row to FBGEMM's multiple of 4 and are never
  read (as in ``training.models.logistic_regression``). Rows of trees that early stopping did not grow, and of
  leaves a tree did not use, are never looked up. Every weight and the bias start at 0 (logit 0).

Before the trees are fitted the model is the empty ensemble: no leaf, logit = b.

Parts:
    BoostedTrees  KJT + (B, F_dense) -> (B, T) leaf rows -> KJT ``leaf``     CPU, not sharded
    SparseArch    KJT ``leaf`` -> (B, 1, 4)                                   the leaf weights, sum-pooled (sharded)
    logit         column 0 + b -> (B,)

Legend: B batch size, T trees of the fitted booster (<= num_trees), L leaves per tree (<= num_leaves), F_dense
dense features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import SparseArch, check_dense
from training.modules.gbdt import BoostedTrees, TreeInputs, leaf_table
from training.spec import ModelSpec, TrainDefaults, register

#: Columns of a leaf's row: column 0 is the weight, 1-3 pad the row to FBGEMM's multiple of 4.
WEIGHT_WIDTH = 4
#: The leaf table and the KJT key of the leaves.
LEAF_TABLE, LEAF_FEATURE = "t_leaf", "leaf"
METRICS = ("binary_logloss", "auc")


@dataclass(frozen=True)
class GBDTLRConfig:
    """Hyper-parameters of the trees and of the LR.

    Args:
        num_trees: the most boosting rounds (trees); the leaf table has ``num_trees * num_leaves`` rows.
        num_leaves: the most leaves per tree.
        tree_learning_rate: the boosting's shrinkage (LightGBM's ``learning_rate``; not the trainer's).
        min_data_in_leaf: the fewest train rows in a leaf.
        early_stopping_rounds: rounds without a better validation ``tree_metric`` before the boosting stops.
        tree_metric: ``binary_logloss`` or ``auc`` on the valid split, for the trees' early stopping.
        init_range: leaf weights start uniform in [-init_range, init_range]; 0 (default) at 0.
        dense_features: names of the ``DENSE_FEATURES`` the trees read, in input order (the columns of ``dense``).

    Raises:
        ValueError: a size below 1 (``num_leaves`` below 2), a learning rate not in (0, 1], an unknown metric, or a
            negative ``init_range``.
    """

    num_trees: int = 100
    num_leaves: int = 31
    tree_learning_rate: float = 0.1
    min_data_in_leaf: int = 20
    early_stopping_rounds: int = 10
    tree_metric: str = "binary_logloss"
    init_range: float = 0.0
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_trees < 1 or self.num_leaves < 2 or self.min_data_in_leaf < 1 or self.early_stopping_rounds < 1:
            raise ValueError(f"num_trees, min_data_in_leaf and early_stopping_rounds must be >= 1 and num_leaves "
                             f">= 2, got {self}")
        if not 0 < self.tree_learning_rate <= 1:
            raise ValueError(f"tree_learning_rate must be in (0, 1], got {self.tree_learning_rate}")
        if self.tree_metric not in METRICS:
            raise ValueError(f"tree_metric must be one of {METRICS}, got {self.tree_metric!r}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class GBDTLR(nn.Module):
    """Boosted trees whose leaves are the features of a logistic regression.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        sparse_device: device of the leaf table; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        KeyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): a one-hot feature without one id per row, or ``dense`` missing or not
            (B, len(config.dense_features)).

    Call: ``forward(features: KJT with the keys of SPARSE_FEATURES, B rows each, dense: Tensor (B, F_dense) | None
    = None) -> logits Tensor (B,)`` on ``features``' device; the trees run on CPU.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...        "genre_idx": [1, 2]}
    >>> model = GBDTLR(synthetic_vocab_sizes())
    >>> model.trees.num_trees, model(kjt_of_rows([row] * 2))  # before the fit: no tree, logit = b = 0
    (0, tensor([0., 0.], grad_fn=<AddBackward0>))
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: GBDTLRConfig = GBDTLRConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.inputs = TreeInputs.of(SPARSE_FEATURES, vocab_sizes, config.dense_features)
        self.trees = BoostedTrees(config.num_trees, config.num_leaves, self.inputs.names)
        self.sparse_arch = SparseArch([leaf_table(LEAF_TABLE, LEAF_FEATURE, config.num_trees, config.num_leaves,
                                                  WEIGHT_WIDTH, config.init_range)], device=sparse_device)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.dense_features:
            dense = check_dense(dense, features.stride(), self.config.dense_features)  # (B, F_dense)
        x = self.inputs.of_kjt(features, dense)  # (B, C) on CPU
        leaves = self.trees.leaf_kjt(x, LEAF_FEATURE, features.device())  # T leaf rows per sample
        weights = self.sparse_arch(leaves)  # (B, 1, 4): the sum of the T leaves' rows
        return weights[:, 0, 0] + self.bias  # (B,): columns 1-3 unused

    def prefit(self, train, valid, seed: int = 0) -> tuple[bytes, dict]:
        """Fit the trees on ``train`` with early stopping on ``valid`` (``training.data.CtrShard`` s of the whole
        splits, read with this model's features and dense columns), with LightGBM on as many threads as torch
        uses here. Returns (the booster's model string, for ``load_prefit`` on every rank; the fit's figures)."""
        c = self.config
        figures = self.trees.fit(self.inputs.of_shard(train), train.label, self.inputs.of_shard(valid), valid.label,
                                 categorical=self.inputs.categorical, learning_rate=c.tree_learning_rate,
                                 min_data_in_leaf=c.min_data_in_leaf, early_stopping_rounds=c.early_stopping_rounds,
                                 metric=c.tree_metric, seed=seed, num_threads=torch.get_num_threads())
        return self.trees.get_extra_state().numpy().tobytes(), figures

    def load_prefit(self, model: bytes) -> None:
        """Load the booster ``prefit`` fitted (on rank 0) into this rank's trees."""
        self.trees.load_model_string(model)


SPEC = register(ModelSpec(
    name="gbdt_lr", kind="ranker", task="ctr", config=GBDTLRConfig,
    build=lambda vocab_sizes, config, sparse_device=None: GBDTLR(vocab_sizes, config, sparse_device=sparse_device),
    # the LR's: logistic regression's knobs; no id dropout (the trees, fitted without it, would read the dropped
    # ids as unseen categories)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=2e-2, weight_decay=7e-5),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="He et al. 2014, Practical Lessons from Predicting Clicks on Ads at Facebook",
    item_table=None,
    id_dropout_features=("user_idx", "item_idx"),  # when asked for (--id-dropout): the ids the trees read
    features=lambda config: SPARSE_FEATURES,
))
