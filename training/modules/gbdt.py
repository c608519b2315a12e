"""Gradient-boosted trees as a feature transform (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads at
Facebook"): a LightGBM booster fitted before the model's gradient training, whose leaves -- one per tree and row --
are the ids a linear model looks up.

Three parts:

- ``TreeInputs``: the (N, C) float32 matrix the trees read from the CTR features, the same from a training shard
  (``training.data.CtrShard``) and from a model's input (a ``KeyedJaggedTensor`` and the dense features), so the
  trees see in serving and in the replay exactly what they were fitted on. Columns, in order: one integer-coded
  column per one-hot sparse feature (declared categorical to LightGBM: ``user_idx``, ``item_idx``, ``age_idx``,
  ...); one 0/1 column per row 1..V-1 of each multi-hot feature's vocabulary (``genre_idx``: "the item has genre
  g"; row 0, unknown/padding, has none); the dense features as the models read them
  (``features.definitions.dense_inputs``). Ids are exact in float32 below 2**24.
- ``BoostedTrees``: the booster, an ``nn.Module`` without parameters whose state is the booster's LightGBM model
  string (``get_extra_state``: a (bytes,) uint8 tensor, empty before the fit), so it travels in the model's state
  dict -- ``model.pt``, the trainer's checkpoints, ``load_model`` -- and is never sharded. It fits on CPU with
  early stopping on a validation set and maps a row to its leaf in each tree, as the row ``t * num_leaves + leaf``
  of a table of ``max_trees * num_leaves`` rows (``leaf_rows``). Before the fit it is the empty ensemble: no tree,
  no leaf.
- ``leaf_table``: that table's ``EmbeddingBagConfig`` (sum pooling over the T leaves of a row), sharded by TorchRec
  like any other table.

Legend: N rows, C tree input columns, T trees of the fitted booster (<= max_trees), L leaves per tree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from features.definitions import SparseFeature, dense_features_named

#: Ids are stored in a float32 matrix; integers are exact below this.
_FLOAT32_EXACT = 2 ** 24


@dataclass(frozen=True)
class TreeInputs:
    """The columns the trees read (see the module docstring).

    Args:
        one_hot: one-hot sparse features, one categorical column each.
        multi_hot: ``(feature, rows)``: a multi-hot feature and its vocabulary's rows; columns for rows 1..rows-1.
        dense: dense feature names (``features.definitions.DENSE_FEATURES``), in the model's input order.

    >>> inputs = TreeInputs(("item_idx",), (("genre_idx", 4),), ())
    >>> inputs.names, inputs.categorical
    (('item_idx', 'genre_idx=1', 'genre_idx=2', 'genre_idx=3'), (0,))
    >>> inputs.matrix({"item_idx": np.array([5, 7])}, {"genre_idx": (np.array([1, 3, 3]), np.array([0, 2, 3]))},
    ...               None).tolist()
    [[5.0, 1.0, 0.0, 1.0], [7.0, 0.0, 0.0, 1.0]]
    """

    one_hot: tuple[str, ...]
    multi_hot: tuple[tuple[str, int], ...]
    dense: tuple[str, ...]

    @classmethod
    def of(cls, features: Sequence[SparseFeature], vocab_sizes: Mapping[str, int],
           dense: Sequence[str] = ()) -> TreeInputs:
        """The columns of ``features`` (declared sparse features) over ``vocab_sizes`` and of the dense features
        ``dense``.

        Raises:
            KeyError: a feature's vocabulary is not in ``vocab_sizes``, or an unknown dense feature.
            ValueError: a vocabulary of 2**24 rows or more (its ids would not be exact in float32).
        """
        dense_features_named(dense)  # an unknown name is a KeyError here, not a missing column later
        big = {f.vocab: vocab_sizes[f.vocab] for f in features if vocab_sizes[f.vocab] >= _FLOAT32_EXACT}
        if big:
            raise ValueError(f"vocabularies {big} have 2**24 rows or more: their ids are not exact as float32 tree "
                             f"inputs")
        return cls(tuple(f.name for f in features if not f.multi_hot),
                   tuple((f.name, int(vocab_sizes[f.vocab])) for f in features if f.multi_hot), tuple(dense))

    @property
    def names(self) -> tuple[str, ...]:
        """The C column names (the booster's feature names)."""
        multi = tuple(f"{name}={g}" for name, rows in self.multi_hot for g in range(1, rows))
        return (*self.one_hot, *multi, *self.dense)

    @property
    def categorical(self) -> tuple[int, ...]:
        """Positions of the categorical (one-hot id) columns."""
        return tuple(range(len(self.one_hot)))

    def matrix(self, ids: Mapping[str, np.ndarray], multi: Mapping[str, tuple[np.ndarray, np.ndarray]],
               dense: np.ndarray | None) -> np.ndarray:
        """The (N, C) float32 tree input.

        Args:
            ids: ``{one-hot feature: (N,) int ids}``.
            multi: ``{multi-hot feature: (values (total ids,), offsets (N + 1,))}``; ids outside 1..rows-1 are
                ignored.
            dense: (N, F_dense) float32 model input of ``self.dense``; None or (N, 0) when there are none.

        Raises:
            KeyError: a feature is missing.
            ValueError: ``dense`` does not have ``len(self.dense)`` columns or N rows.
        """
        n = len(ids[self.one_hot[0]]) if self.one_hot else len(next(iter(multi.values()))[1]) - 1
        cols = [np.asarray(ids[name], np.float32)[:, None] for name in self.one_hot]  # (N, 1) each
        for name, rows in self.multi_hot:
            values, offsets = (np.asarray(a, np.int64) for a in multi[name])
            row_of = np.repeat(np.arange(n), np.diff(offsets))  # the row each id belongs to
            keep = (values > 0) & (values < rows)
            onehot = np.zeros((n, rows), np.float32)
            onehot[row_of[keep], values[keep]] = 1.0  # a repeated id is still 1
            cols.append(onehot[:, 1:])  # (N, rows - 1)
        d = np.zeros((n, 0), np.float32) if dense is None else np.asarray(dense, np.float32)
        if d.shape != (n, len(self.dense)):
            raise ValueError(f"dense input must be ({n}, {len(self.dense)}) for {self.dense}, got {d.shape}")
        cols.append(d)
        return np.concatenate(cols, axis=1)  # (N, C)

    def of_shard(self, shard) -> np.ndarray:
        """The (N, C) tree input of a ``training.data.CtrShard`` (read with these features and dense columns)."""
        return self.matrix(shard.ids, {name: (shard.values[name], shard.offsets[name]) for name, _ in self.multi_hot},
                           shard.dense if self.dense else None)

    def of_kjt(self, features: KeyedJaggedTensor, dense: torch.Tensor | None) -> np.ndarray:
        """The (B, C) tree input of a model's input, on CPU.

        Args:
            features: a KJT with (at least) the keys of ``self.one_hot`` (one id per row) and ``self.multi_hot``.
            dense: (B, F_dense) or None when ``self.dense`` is empty.

        Raises:
            ValueError: a one-hot key without exactly one id per row, or ``dense`` of another shape.
        """
        jagged = features.to_dict()
        ids = {}
        for name in self.one_hot:
            lengths = jagged[name].lengths()
            if not bool((lengths == 1).all()):
                raise ValueError(f"feature {name} is one-hot: every row needs exactly one id, got lengths "
                                 f"{lengths.tolist()[:8]}")
            ids[name] = jagged[name].values().cpu().numpy()
        multi = {name: (jagged[name].values().cpu().numpy(), jagged[name].offsets().cpu().numpy())
                 for name, _ in self.multi_hot}
        d = dense.detach().cpu().numpy() if dense is not None and self.dense else None
        return self.matrix(ids, multi, d)


def leaf_table(name: str, feature: str, max_trees: int, num_leaves: int, width: int,
               init_range: float = 0.0) -> EmbeddingBagConfig:
    """The table of one row per (tree, leaf): ``max_trees * num_leaves`` rows of ``width`` columns, read by
    ``feature`` (T leaf rows per sample, sum-pooled); rows start uniform in [-init_range, init_range].

    >>> t = leaf_table("t_leaf", "leaf", 3, 4, 4)
    >>> t.num_embeddings, t.embedding_dim, t.feature_names
    (12, 4, ['leaf'])
    """

    def init(w: torch.Tensor, r: float = init_range) -> torch.Tensor:
        return nn.init.uniform_(w, -r, r)

    return EmbeddingBagConfig(name=name, embedding_dim=width, num_embeddings=max_trees * num_leaves,
                              feature_names=[feature], pooling=PoolingType.SUM, weight_init_min=-init_range,
                              weight_init_max=init_range, init_fn=init)


class TreesNotCompatibleError(ValueError):
    """A booster that does not fit this model: more trees or leaves than its table has rows for, or other input
    columns than the model's (e.g. a model saved with other dense features)."""


class BoostedTrees(nn.Module):
    """A LightGBM booster (Ke et al. 2017) for binary labels, held as the module's extra state (its model string).

    Args:
        max_trees: the most boosting rounds (trees) fitted; the leaf table has ``max_trees * num_leaves`` rows.
        num_leaves: L, the most leaves per tree.
        columns: the C input column names (``TreeInputs.names``), checked against a loaded booster's.

    Before ``fit`` or a ``set_extra_state`` with a booster it is the empty ensemble (``num_trees`` 0).
    """

    def __init__(self, max_trees: int, num_leaves: int, columns: Sequence[str]) -> None:
        super().__init__()
        self.max_trees, self.num_leaves, self.columns = int(max_trees), int(num_leaves), tuple(columns)
        self.booster = None
        self._model = b""  # the booster's model string as saved; b"" before the fit

    @property
    def num_trees(self) -> int:
        """T, the trees of the fitted booster; 0 before the fit."""
        return 0 if self.booster is None else self.booster.num_trees()

    def fit(self, x: np.ndarray, y: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, *,
            categorical: Sequence[int], learning_rate: float, min_data_in_leaf: int, early_stopping_rounds: int,
            metric: str = "binary_logloss", seed: int = 0, num_threads: int = 1) -> dict:
        """Fit up to ``max_trees`` trees of ``num_leaves`` leaves on (x (N, C), y (N,) 0/1), stopping when the
        validation ``metric`` (``binary_logloss`` or ``auc``) on (x_valid, y_valid) has not improved for
        ``early_stopping_rounds`` rounds, and keep the best round's trees. Deterministic for the same inputs, seed
        and ``num_threads``.

        Returns:
            ``{"trees": T, "best_valid_<metric>": value, "train_rows": N}``.

        Raises:
            ValueError: an empty split, or x / x_valid without C columns.
        """
        import lightgbm as lgb

        if len(y) == 0 or len(y_valid) == 0:
            raise ValueError(f"the trees need train and valid rows, got {len(y)} and {len(y_valid)}")
        for name, m in (("train", x), ("valid", x_valid)):
            if m.ndim != 2 or m.shape[1] != len(self.columns):
                raise ValueError(f"{name} input must be (N, {len(self.columns)}), got {m.shape}")
        params = {"objective": "binary", "metric": metric, "num_leaves": self.num_leaves,
                  "learning_rate": learning_rate, "min_data_in_leaf": min_data_in_leaf, "seed": seed,
                  "num_threads": num_threads, "deterministic": True, "force_col_wise": True, "verbosity": -1}
        names, cats = list(self.columns), list(categorical)
        train = lgb.Dataset(x, y, feature_name=names, categorical_feature=cats, free_raw_data=True)
        valid = lgb.Dataset(x_valid, y_valid, reference=train, feature_name=names, categorical_feature=cats)
        booster = lgb.train(params, train, num_boost_round=self.max_trees, valid_sets=[valid], valid_names=["valid"],
                            callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        self.load_model_string(booster.model_to_string(num_iteration=best).encode())
        score = booster.best_score["valid"][metric]
        return {"trees": self.num_trees, f"best_valid_{metric}": float(score), "train_rows": int(len(y))}

    def load_model_string(self, model: bytes) -> None:
        """Load a booster from its LightGBM model string (b"": the empty ensemble).

        Raises:
            TreesNotCompatibleError: more than ``max_trees`` trees, a tree of more than ``num_leaves`` leaves, or
                other column names than ``columns``.
        """
        import lightgbm as lgb

        if not model:
            self.booster, self._model = None, b""
            return
        booster = lgb.Booster(model_str=model.decode())
        if tuple(booster.feature_name()) != self.columns:
            raise TreesNotCompatibleError(f"the booster reads columns {booster.feature_name()}, this model "
                                          f"{list(self.columns)}: build the model with the config it was fitted for")
        leaves = [t["num_leaves"] for t in booster.dump_model()["tree_info"]]
        if len(leaves) > self.max_trees or max(leaves, default=0) > self.num_leaves:
            raise TreesNotCompatibleError(f"the booster has {len(leaves)} trees of up to {max(leaves, default=0)} "
                                          f"leaves; this model's table holds {self.max_trees} x {self.num_leaves}")
        self.booster, self._model = booster, bytes(model)

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """(N, T) int64: the leaf (0..L-1) each row of x (N, C) falls into in each tree; (N, 0) before the fit.
        On one thread: a batch's leaves take well under a millisecond there, and OpenMP threads beside torch's (in
        a training worker, in serving) cost more than they save."""
        if self.booster is None:
            return np.zeros((len(x), 0), np.int64)
        out = self.booster.predict(x, pred_leaf=True, num_threads=1)
        return np.asarray(out, np.int64).reshape(len(x), self.num_trees)  # (N, T)

    def leaf_rows(self, x: np.ndarray) -> np.ndarray:
        """(N, T) int64: the leaf table's row of each (row, tree): ``t * num_leaves + leaf``."""
        leaves = self.leaves(x)
        return leaves + np.arange(leaves.shape[1], dtype=np.int64) * self.num_leaves

    def leaf_kjt(self, x: np.ndarray, feature: str, device: torch.device | None = None) -> KeyedJaggedTensor:
        """A KJT of key ``feature`` with B = len(x) rows of T ids each (``leaf_rows``), on ``device``."""
        rows = self.leaf_rows(x)  # (B, T)
        lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.int64)
        return KeyedJaggedTensor.from_lengths_sync(keys=[feature], values=torch.from_numpy(rows.reshape(-1)),
                                                   lengths=lengths).to(device or torch.device("cpu"))

    def get_extra_state(self) -> torch.Tensor:
        """The booster's model string as a (bytes,) uint8 tensor (empty before the fit)."""
        return torch.frombuffer(bytearray(self._model), dtype=torch.uint8) if self._model \
            else torch.zeros(0, dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.load_model_string(bytes(state.cpu().numpy().tobytes()))
