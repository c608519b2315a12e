"""Per-model training defaults: the values a ``TrainOptions`` field takes when it is left unset (0 or None).

Chosen on the validation split only (never on test) by ``bench.tune`` (``make tune``): a seeded random search,
the best trials re-run at seeds 0, 1, 2 and the highest MEAN valid AUC chosen; see BENCHMARKS.md "tuning" and
docs/tuning.md. On ML-100K's time split the knobs searched (tables' Adagrad lr, dense AdamW lr and weight decay,
dropout, batch size, warm-up, final lr factor) move the valid AUC by less than the seed spread except the tables'
lr (above ~0.05 the user/item rows overfit within 1-2 epochs).
"""

from __future__ import annotations

# mba_lambda (the DIN paper's mini-batch aware L2 on the user/item rows) stays 0 = off: bench.tune's grid (commit
# 2417c37) gave DeepFM a mean valid AUC over seeds 0-2 of 0.6957 +- 0.0012 at 1e-3 and 0.6961 +- 0.0017 at 1e-2
# against 0.6956 +- 0.0012 at 0 (inside the spread), lower from 0.1 up (0.6905 at seed 0; 0.6782 at 1); DIN
# (grid finished at commit cdf6c9d) 0.6927 +- 0.0022 / 0.6934 +- 0.0027 at 1e-3 / 1e-2 against 0.6914 +- 0.0019,
# with a lower test AUC at 1e-2 (0.7140 +- 0.0033 vs 0.7147 +- 0.0006). See docs/tuning.md.
# recency_half_life_days (time-decayed sample weights) stays 0 = off: its grid (commit 1c8e2a8) lowered the mean
# valid AUC over seeds 0-2 at every value (DeepFM 0.6901 / 0.6936 at half-lives 60 / 120 days against 0.6956; DIN
# 0.6860 / 0.6892 against 0.6914). id_dropout (ids read as the OOV row in training, cold ids as it in evaluation;
# which ids per model: training.data.ID_DROPOUT_FEATURES) lowered it too while the models had only ids and side
# features (0c3f489: DeepFM 0.6945 at 0.1, DIN 0.6905), but with the point-in-time counters as dense inputs it is
# the largest gain measured here: a model can learn to read a user from the counters only if it is trained without
# the user's id, and 85% of valid/test users have none trained. Grids of session 5 (BENCHMARKS.md
# tuning-counters, docs/tuning.md), mean valid AUC over seeds 0-2: DeepFM 0.7067 +- 0.0081 at 0, 0.7294 at 0.9,
# 0.7313 +- 0.0028 at 0.99 (test 0.7365 +- 0.0035); DIN 0.7144 +- 0.0019 at 0, 0.7283 +- 0.0025 at 0.9 (user only;
# test 0.7386 +- 0.0006).
MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    # bench.tune trial t10 (search seed 2026): mean valid AUC 0.6952 +- 0.0012 over seeds 0-2 against 0.6947 +-
    # 0.0009 for the previous defaults (lr_sparse 0.02, lr_dense 1e-3, weight_decay 1e-4, dropout 0.2) -- a gain
    # inside the seed spread. t10 also had warmup_frac 0.1 (TrainOptions' own default, 0.05, is not read from here).
    # session 5, at id_dropout 0.99 with the counters: lr_sparse 0.008 gave a mean valid AUC of 0.7320 +- 0.0014
    # against 0.7313 +- 0.0028 at 0.0169 (0.7285 +- 0.0041 at 0.03), test 0.7378 +- 0.0014.
    "deepfm": {"epochs": 12, "batch_size": 2048, "embedding_dim": 16, "lr_sparse": 0.008, "lr_dense": 1.53e-3,
               "weight_decay": 7e-5, "dropout": 0.0, "mba_lambda": 0.0,
               "id_dropout": 0.99, "recency_half_life_days": 0.0},
    # bench.tune kept these: mean valid AUC 0.6914 +- 0.0018 over seeds 0-2; no trial's mean was higher (the two
    # re-run, lr_sparse 0.089 and 0.054, gave 0.6914 and 0.6905).
    # session 5, at id_dropout 0.9 with the counters: lr_sparse 0.01 gave a mean valid AUC of 0.7321 +- 0.0007 against
    # 0.7283 +- 0.0025 at 0.02 (0.7232 at 0.04; OverArch dropout 0 / 0.1: 0.7277 / 0.7280), test 0.7415 +- 0.0016.
    # session 6, reading the behaviours' stars (history_ratings): 0.7426 +- 0.0016 (test 0.7598 +- 0.0022); the grid
    # around it was flat (lr_sparse 0.005: 0.7427, id_dropout 0.99: 0.7427; 0.7395-0.7398 at seed 0 for lr_sparse
    # 0.02 or id_dropout 0.7), so these stay (BENCHMARKS.md tuning-history-ratings). With the OverArch's batch norm
    # + Dice: 0.7444 +- 0.0002 at dropout 0.2 (test 0.7645 +- 0.0003); dropout 0.4 gave 0.7452 +- 0.0006 (test
    # 0.7641 +- 0.0005, logloss 0.5789 against 0.5846) and is chosen; lr_dense 3e-4 / 5e-4 were lower at seed 0
    # (0.7424 / 0.7434; BENCHMARKS.md tuning-din-dice).
    "din": {"epochs": 12, "batch_size": 2048, "embedding_dim": 16, "lr_sparse": 0.01, "lr_dense": 1e-3,
            "weight_decay": 1e-4, "dropout": 0.4, "mba_lambda": 0.0, "id_dropout": 0.9,
            "recency_half_life_days": 0.0},
    "item2vec": {"epochs": 8, "batch_size": 4096, "embedding_dim": 32, "lr_sparse": 0.2, "lr_dense": 1e-3,
                 "weight_decay": 1e-4, "dropout": 0.0},
}
