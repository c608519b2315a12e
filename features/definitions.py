"""Declared features: entities, the sparse (categorical) features and the sequence feature each model reads,
the label rule and the split protocol.

Models build their embedding tables from these declarations (one ``EmbeddingBagConfig`` per table), so a new
feature is added here once and the pipelines, trainer and server all see it.

>>> [f.name for f in SPARSE_FEATURES][:3]
['user_idx', 'item_idx', 'age_idx']
>>> label_of(4.0), label_of(3.5)
(1, 0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entity:
    name: str
    join_key: str


USER = Entity("user", "user_id")
ITEM = Entity("item", "item_id")


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature: the column of ``gold.ctr_samples`` holding its index, and the embedding table it
    looks up. Features that name the same table share it (DIN's history and candidate share ``t_item``).

    Args:
        name: column in ``gold.ctr_samples``; an int, or array<int> when ``multi_hot``.
        table: embedding table name.
        vocab: where the table's size comes from: ``user``/``item`` vocabulary or a ``category_vocab`` feature.
        multi_hot: several indices per sample (genres), pooled by sum.
    """

    name: str
    table: str
    vocab: str
    multi_hot: bool = False

    def __post_init__(self) -> None:
        if not self.table.startswith("t_"):
            raise ValueError(f"feature {self.name!r}: table names start with 't_', got {self.table!r}")


SPARSE_FEATURES: tuple[SparseFeature, ...] = (
    SparseFeature("user_idx", "t_user", "user"),
    SparseFeature("item_idx", "t_item", "item"),
    SparseFeature("age_idx", "t_age", "age_bucket"),
    SparseFeature("gender_idx", "t_gender", "gender"),
    SparseFeature("occupation_idx", "t_occupation", "occupation"),
    SparseFeature("zip_idx", "t_zip", "zip_prefix"),
    SparseFeature("genre_idx", "t_genre", "genre", multi_hot=True),
)

#: The behaviour sequence: items the user rated strictly before the sample's time, most recent last.
HISTORY_FEATURE = SparseFeature("hist_item_idx", "t_item", "item", multi_hot=True)
#: L, the longest history kept per sample (most recent items).
MAX_HISTORY = 50
#: The rating the user gave each behaviour of ``HISTORY_FEATURE`` (same length and order): the stars rounded to
#: a level in 1..5, the row of a small ``t_rating`` table (0: unknown). Point-in-time like the history itself.
HISTORY_RATING_FEATURE = SparseFeature("hist_rating", "t_rating", "rating", multi_hot=True)
#: Rows of ``t_rating``: level 0 (unknown) and the stars 1..5.
RATING_LEVELS = 6


def rating_levels(ratings):
    """The ``t_rating`` row of each rating: the stars rounded half up and clamped to 1..5, 0 when null (NaN) -- the
    rule the features job applies in Spark (``pipelines.features_batch.rating_level``).

    >>> rating_levels([0.5, 2.5, 4.0, 5.0, float("nan")]).tolist()
    [1, 3, 4, 5, 0]
    """
    import numpy as np

    r = np.asarray(ratings, dtype=np.float64)
    level = np.clip(np.floor(r + 0.5), 1, RATING_LEVELS - 1)
    return np.where(np.isnan(r), 0, level).astype(np.int64)



@dataclass(frozen=True)
class DenseFeature:
    """A numeric feature: a column of ``gold.ctr_samples`` computed point-in-time (from the entity's events at Unix
    seconds strictly before the sample's), and how a model reads it (:func:`dense_inputs`).

    Args:
        name: column in ``gold.ctr_samples``; null when the entity has no earlier event.
        kind: ``count`` (events; read as ``log1p(n)``) or ``rating`` (mean stars; read as ``mean - RATING_CENTER``,
            0 when null).
    """

    name: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("count", "rating"):
            raise ValueError(f"dense feature {self.name!r}: kind must be 'count' or 'rating', not {self.kind!r}")


#: The point-in-time counters of the user and the item: how many events each had strictly before the sample's
#: time and their mean rating. Most valid/test users are new (they arrive after the train period), so their rows
#: in the user table are untrained; these tell a model how this user rates and how this item is rated so far.
DENSE_FEATURES: tuple[DenseFeature, ...] = (
    DenseFeature("user_prior_events", "count"),
    DenseFeature("user_prior_rating", "rating"),
    DenseFeature("item_prior_events", "count"),
    DenseFeature("item_prior_rating", "rating"),
)
#: Stars subtracted from a mean rating feature (the middle of the 1-5 scale, near MovieLens' mean of 3.53).
RATING_CENTER = 3.5


def dense_features_named(names) -> tuple[DenseFeature, ...]:
    """The ``DENSE_FEATURES`` called ``names``, in that order (a saved model's config records names).

    Raises:
        KeyError: a name that is not a declared dense feature.

    >>> [f.kind for f in dense_features_named(["item_prior_rating", "user_prior_events"])]
    ['rating', 'count']
    """
    declared = {f.name: f for f in DENSE_FEATURES}
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise KeyError(f"unknown dense feature(s) {unknown}; declared: {list(declared)}")
    return tuple(declared[n] for n in names)


def dense_inputs(columns, features=DENSE_FEATURES):
    """The (N, F_dense) float32 model input of ``features`` from their raw columns.

    Args:
        columns: ``{name: (N,) array-like}``, None or NaN for null (no earlier event).
        features: the dense features, in input order.

    Raises:
        KeyError: a feature's column is missing.

    >>> dense_inputs({"user_prior_events": [0, 3], "user_prior_rating": [None, 4.5],
    ...               "item_prior_events": [1, 0], "item_prior_rating": [2.0, None]}).astype(float).round(3).tolist()
    [[0.0, 0.0, 0.693, -1.5], [1.386, 1.0, 0.0, 0.0]]
    """
    import numpy as np

    out = []
    for f in features:
        x = np.asarray(columns[f.name], dtype=np.float64)  # None -> nan
        x = np.where(np.isnan(x), 0.0, np.log1p(x) if f.kind == "count" else x - RATING_CENTER)
        out.append(x)
    return np.stack(out, axis=1).astype(np.float32) if out else np.zeros((0, 0), np.float32)


#: Categorical side features with a ``category_vocab`` entry, in the order of ``SPARSE_FEATURES``.
CATEGORY_FEATURES = ("age_bucket", "gender", "occupation", "zip_prefix", "genre")
#: Age buckets (years, lower bound inclusive) as published for MovieLens-1M's user file.
AGE_BUCKETS = ((0, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
#: Characters of the zip code kept as the zip prefix feature.
ZIP_PREFIX_LEN = 2

#: Index 0 of every vocabulary is the unknown / padding value.
UNKNOWN_INDEX = 0

#: Default threshold (stars) of the ``rating_at_least`` label rule (``features.source.LabelRule``); each source
#: declares its own rule, which every stage reads from it.
POSITIVE_RATING = 4.0

#: Global time split: events ordered by (event_time, event_id) -- ties keep the original order -- first 80% train,
#: next 10% valid, last 10% test. The protocol of published MovieLens CTR results.
SPLIT_FRACTIONS = (("train", 0.8), ("valid", 0.1), ("test", 0.1))


def label_of(rating: float) -> int:
    """CTR label of a rating: 1 when ``rating >= 4`` stars."""
    return int(rating >= POSITIVE_RATING)


def age_bucket(age: int) -> str:
    """The MovieLens age bucket of an age in years.

    >>> age_bucket(17), age_bucket(18), age_bucket(60)
    ('<18', '18-24', '56+')
    """
    label = AGE_BUCKETS[0][1]
    for lower, name in AGE_BUCKETS:
        if age >= lower:
            label = name
    return label
