"""Logistic regression over one-hot / multi-hot categorical features, the CTR baseline of the lineage (McMahan et
al. 2013, "Ad Click Prediction: a View from the Trenches"; Richardson, Dominowska & Ragno 2007, "Predicting Clicks:
Estimating the Click-Through Rate for New Ads"):

    logit = b + sum_f sum_{id in x_f} w_f[id] + w_d . z

one weight per id of every declared sparse feature (``features.definitions.SPARSE_FEATURES``; a multi-hot field,
the genres, sums its ids' weights), a bias and a linear term on the dense features ``z`` (the point-in-time counters
of ``features.definitions.DENSE_FEATURES``, when the config names them). No interaction: it is the first-order part
that FM, FFM, DeepFM and Wide & Deep all start from.

Where the per-id weights live: in the model's ``SparseArch``, an ``EmbeddingBagCollection`` of the declared tables
(``t_user``, ``t_item``, ...), each of width ``WEIGHT_WIDTH`` = 4 -- column 0 is the weight ``w_f[id]``, columns 1-3
are unused padding (never read by the forward, so they get no gradient and stay at their initial 0). Width 4 because
FBGEMM's fused kernels, which TorchRec uses for every sharded table, need widths divisible by 4; a 1-dim
``FirstOrder`` (plain ``nn.EmbeddingBag``) would instead be replicated by DMP and trained by AdamW with the dense
parameters. Keeping the weights in sharded tables trains them as the platform trains ids -- the trainer's fused
row-wise Adagrad on ``model.sparse_arch`` (``lr_sparse``), sum pooling in the kernel, the planner's placement -- and
keeps id dropout, the cold-row fill and the mini-batch aware L2 (keyed by ``t_user`` / ``t_item``) working
unchanged. The price: 4x the memory of the weights (16 bytes per id instead of 4: 45 KB for MovieLens-100K's 2,792
ids), and a row-wise Adagrad whose per-row accumulator is the mean of the squared gradient over the 4 columns, i.e.
a quarter of column 0's: the weight's effective Adagrad step is 2x ``lr_sparse`` (tests/test_logistic_regression.py
checks the first step). Every weight starts at 0, the dense term's too (``init_range`` 0; logit 0, p = 0.5): the
log-loss of a linear model is convex and needs no symmetry breaking, and a random dense term would start the
counters -- most of the signal on this data -- pointing the wrong way. McMahan et al.'s FTRL-Proximal with L1 is the
platform's fused row-wise Adagrad (tables) and AdamW (bias, dense term) here.

Parts, named as in TorchRec's rankers:
    SparseArch        KJT -> (B, F, 4)                     the per-id weights, column 0 (sharded by DMP)
    OverArch          (B, F, 4) + (B, F_dense) -> (B,)     sum of the weights + w_d . z + b

There is no item embedding to export (``item_table`` None): an item's "vector" is one number.

Legend: B batch size, F sparse features, F_dense dense features.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import SparseArch, check_dense, table_configs
from training.spec import ModelSpec, TrainDefaults, register
from training.tasks.ctr import pooled_id_lookups

#: Columns of each weight table: column 0 is the id's weight, 1-3 pad the row to FBGEMM's multiple of 4.
WEIGHT_WIDTH = 4


@dataclass(frozen=True)
class LogisticRegressionConfig:
    """Hyper-parameters of logistic regression (no embedding dimension: it has no latent vectors).

    Args:
        init_range: per-id weights (and the unused columns) start uniform in [-init_range, init_range]; 0 (the
            default) starts them at 0. The bias and the dense term start at 0 whatever it is.
        dense_features: names of the ``DENSE_FEATURES`` read, in input order (the columns of ``dense``).

    Raises:
        ValueError: ``init_range`` negative.
    """

    init_range: float = 0.0
    dense_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")


class OverArch(nn.Module):
    """The linear model: the sum of the features' per-id weights (column 0 of each pooled row), a linear term on
    the dense features and a bias.

    Args:
        num_dense: F_dense; 0 for no dense term.

    Call: ``forward(weights: Tensor (B, F, 4), dense: Tensor (B, F_dense) | None) -> Tensor (B,)``.

    >>> arch = OverArch(0)
    >>> arch(torch.tensor([[[0.5, 9.0, 9.0, 9.0], [-2.0, 9.0, 9.0, 9.0]]]), None)  # 0.5 - 2 + bias 0
    tensor([-1.5000], grad_fn=<AddBackward0>)
    """

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        if self.dense_linear is not None:
            nn.init.zeros_(self.dense_linear.weight)  # the whole linear model starts at 0 (logit 0, p = 0.5)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, weights: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
        logit = weights[:, :, 0].sum(dim=1) + self.bias  # (B,): columns 1-3 unused
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense).squeeze(1)
        return logit


class LogisticRegression(nn.Module):
    """Logistic regression over the declared sparse features and, optionally, the dense ones.

    Args:
        vocab_sizes: rows per vocabulary (``vocab_sizes.json``), keyed by ``SparseFeature.vocab``.
        config: hyper-parameters.
        sparse_device: device of the weight tables; ``torch.device("meta")`` before sharding with DMP.

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``.
        ValueError (from ``forward``): ``dense`` is missing or not (B, len(config.dense_features)).

    Call: ``forward(features: KJT with the keys of SPARSE_FEATURES, B rows each, dense: Tensor (B, F_dense) | None
    = None) -> logits Tensor (B,)``; ``dense`` is required when ``config.dense_features`` is not empty.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> row = {"user_idx": 1, "item_idx": 2, "age_idx": 1, "gender_idx": 1, "occupation_idx": 3, "zip_idx": 4,
    ...        "genre_idx": [1, 2]}
    >>> LogisticRegression(synthetic_vocab_sizes())(kjt_of_rows([row] * 3))  # every weight starts at 0
    tensor([0., 0., 0.], grad_fn=<AddBackward0>)
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: LogisticRegressionConfig = LogisticRegressionConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        tables = table_configs(SPARSE_FEATURES, vocab_sizes, WEIGHT_WIDTH, config.init_range)
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.over_arch = OverArch(len(config.dense_features))

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.sparse_arch(features)  # (B, F, 4)
        if self.config.dense_features:
            dense = check_dense(dense, weights.shape[0], self.config.dense_features)  # (B, F_dense)
        return self.over_arch(weights, dense)  # (B,)


SPEC = register(ModelSpec(
    name="logistic_regression", kind="ranker", task="ctr", config=LogisticRegressionConfig,
    build=lambda vocab_sizes, config, sparse_device=None: LogisticRegression(vocab_sizes, config,
                                                                             sparse_device=sparse_device),
    # DeepFM's, not tuned for logistic regression, except lr_dense: at DeepFM's 1.53e-3 the bias and the dense
    # term were still rising after 12 epochs (valid AUC 0.681); 2e-2 chosen on valid from a small grid of
    # (lr_sparse, lr_dense) (docs/tuning.md)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.008, lr_dense=2e-2, weight_decay=7e-5,
                        id_dropout=0.99),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="McMahan et al. 2013, Ad Click Prediction: a View from the Trenches",
    item_table=None,
    # the user's and the item's weights live in the sharded t_user / t_item: id dropout trains their OOV rows
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx", "item_idx"),
    features=lambda config: SPARSE_FEATURES,
    id_lookups=pooled_id_lookups,  # (N, 4) rows: the weight and its 3 zero columns
))
