"""Batch features: ``bronze.interactions`` + the data source's user/item tables -> silver vocabularies and side
features -> gold CTR samples and item2vec sequences, with Parquet copies for Ray Data.

Data flow (every table is described in ``features.tables``)::

    bronze.interactions ----+--> silver.user_vocab, silver.item_vocab    (append-only merge)
    source users/items -----+--> silver.user_features, silver.item_features (overwrite)
                                 silver.category_vocab                  (append-only merge)
                            +--> gold.ctr_samples (partitioned by split) --> gold.item_sequences
                            +--> export/: Parquet copies + vocab_sizes.json

Semantics (declared in ``features.definitions``):

- Vocabularies map a stable id (or a categorical value) to an embedding row starting at 1; row 0
  (``UNKNOWN_INDEX``) is the unknown/padding value. They are append-only: ids already in the table keep their
  index and new ids get ``max + 1`` onwards, ordered by ``(first_seen, id)`` (category values: by value within
  each feature). A re-run never renumbers, so a checkpoint's embedding rows stay valid. The id vocabularies
  follow a ``features.vocab.VocabSpec``: a minimum count (rarer ids are out of vocabulary), optional hashed
  buckets for out-of-vocabulary ids (rows 1..H, the vocabulary after them), one Delta commit per update; the
  versions used are recorded in ``gold.ctr_samples``' commit and the stage result.
- Split: all events ordered by ``(event_time, event_id)``; the first 80% are ``train``, the next 10% ``valid``, the
  rest ``test`` (``SPLIT_FRACTIONS``; boundaries are exact integer fractions of the count, :func:`split_bounds`).
  ``event_id`` encodes the original row index, so ties in time keep the file's order.
- History (point-in-time, as DIN's behaviour sequence, Zhou et al. 2018): ``hist_item_idx`` holds the
  ``item_idx`` of every item the same user rated at a Unix second strictly before the sample's (same-second
  events excluded), ordered by ``(event_time, event_id)``, most recent last, truncated to the last
  ``MAX_HISTORY``. Computed with a window ``rangeBetween(unboundedPreceding, -1)`` over Unix seconds.
  ``hist_rating`` holds, aligned with it, the stars the user gave each of those items, rounded to a level in
  1..5 (``HISTORY_RATING_FEATURE``; a row of the small ``rating`` vocabulary of ``RATING_LEVELS``).
- Item sequences (item2vec's sentences, Barkan & Koenigstein 2016): per user, the ``item_idx`` of the positively
  rated train-split samples in time order; users with fewer than 2 such items are dropped.

Every table except the vocabularies is overwritten, so a re-run over the same bronze is idempotent.

Run as ``spark-submit ... pipelines/features_batch.py`` (``pipelines.stages.build_command("features")``), which
reads the configuration from ``RECSYS_*`` and writes the stage result ``features``; or call :func:`run_features`.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script (spark-submit, python pipelines/features_batch.py): repo imports
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import logging
import time
from fractions import Fraction
from itertools import chain
from pathlib import Path

import pandas as pd
from delta.tables import DeltaTable
from pyspark.sql import Window
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from features.config import HelpFormatter, PlatformConfig, describe, load_config_or_exit, settings_help
from features.definitions import (
    CATEGORY_FEATURES,
    HISTORY_RATING_FEATURE,
    MAX_HISTORY,
    RATING_LEVELS,
    SPLIT_FRACTIONS,
    UNKNOWN_INDEX,
    ZIP_PREFIX_LEN,
    age_bucket,
)
from features.errors import PlatformError, TableNotFoundError
from features.vocab import ITEM_VOCAB_SPEC, OOV_INDEX, USER_VOCAB_SPEC, VocabSpec, check_layout, commit_metadata
from features.results import write_stage_result
from features.tables import (
    BRONZE_INTERACTIONS,
    CATEGORY_VOCAB,
    CTR_SAMPLES,
    ITEM_FEATURES,
    ITEM_SEQUENCES,
    ITEM_VOCAB,
    USER_FEATURES,
    USER_VOCAB,
    TableSpec,
    export_versions_path,
    parquet_export,
    vocab_sizes_path,
)
from features.source import LabelRule, Source, SourceError, load_source
from pipelines.spark import delta_version, get_spark

log = logging.getLogger(__name__)

STAGE = "features"
#: Tables copied to plain Parquet under ``<lake>/export/`` for Ray Data and the ANN builder.
PARQUET_EXPORTS = (CTR_SAMPLES, ITEM_SEQUENCES, ITEM_VOCAB, USER_VOCAB)
#: Embedding-table names in ``vocab_sizes.json``: the id vocabularies, then every ``category_vocab`` feature.
VOCAB_SIZE_KEYS = ("user", "item", *CATEGORY_FEATURES, HISTORY_RATING_FEATURE.vocab)


def split_bounds(n: int) -> list[tuple[str, int]]:
    """Cumulative end position (1-based, inclusive) of each split over ``n`` events ordered by time.

    Exact integer arithmetic on the fractions of ``SPLIT_FRACTIONS`` (``floor(n * cumulative fraction)``), so
    MovieLens-100K splits into exactly 80,000 / 10,000 / 10,000 events.

    >>> split_bounds(100_000)
    [('train', 80000), ('valid', 90000), ('test', 100000)]
    >>> split_bounds(7)
    [('train', 5), ('valid', 6), ('test', 7)]

    Raises:
        ValueError: the fractions do not sum to 1.
    """
    bounds, cum = [], Fraction(0)
    for name, frac in SPLIT_FRACTIONS:
        cum += Fraction(frac).limit_denominator(10**6)
        bounds.append((name, n * cum.numerator // cum.denominator))
    if cum != 1:
        raise ValueError(f"SPLIT_FRACTIONS sum to {cum}, not 1; fix features.definitions.SPLIT_FRACTIONS")
    return bounds


# ---------------------------------------------------------------------------------------------------- table I/O


def spark_schema(spec: TableSpec):
    """The contract's DDL as a ``StructType`` (needs an active Spark session)."""
    return StructType.fromDDL(spec.schema)


def conform(df, spec: TableSpec):
    """Select and cast ``df``'s columns to exactly ``spec``'s schema, in order.

    Raises:
        PlatformError: a contract column is missing from ``df`` (a bug in this job).
    """
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise PlatformError(f"table {spec.name!r}: the job produced no column(s) {missing}; "
                            f"fix pipelines/features_batch.py to match features/tables.py")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in spark_schema(spec).fields])


def is_delta(spark, path: str) -> bool:
    return Path(path).exists() and DeltaTable.isDeltaTable(spark, path)


def read_delta(spark, spec: TableSpec, lake_dir: Path, producer: str = "pipelines/features_batch.py"):
    """Raises:
        TableNotFoundError: no Delta table at ``spec.path(lake_dir)``.
    """
    path = spec.path(lake_dir)
    if not is_delta(spark, path):
        raise TableNotFoundError(spec.name, path, producer)
    return spark.read.format("delta").load(path)


def read_or_empty(spark, spec: TableSpec, lake_dir: Path):
    """The Delta table, or an empty frame of its schema when it has never been written."""
    path = spec.path(lake_dir)
    if is_delta(spark, path):
        return spark.read.format("delta").load(path)
    return spark.createDataFrame([], spark_schema(spec))


def write_delta(df, spec: TableSpec, lake_dir: Path, mode: str = "overwrite", user_metadata: str | None = None) -> str:
    """Write ``df`` (conformed to ``spec``) as Delta at ``spec.path(lake_dir)``; ``overwrite`` replaces the whole
    table (idempotent re-run), ``append`` adds rows (vocabulary growth); ``user_metadata`` is stored with the
    commit (``DESCRIBE HISTORY``'s ``userMetadata``)."""
    path = spec.path(lake_dir)
    writer = conform(df, spec).write.format("delta").mode(mode)
    if user_metadata is not None:
        writer = writer.option("userMetadata", user_metadata)
    if mode == "overwrite":
        writer = writer.option("overwriteSchema", "true")
    if spec.partition_by:
        writer = writer.partitionBy(*spec.partition_by)
    writer.save(path)
    return path


def export_parquet(spark, spec: TableSpec, lake_dir: Path) -> tuple[str, int]:
    """Copy the Delta table, pinned at its newest version, to plain Parquet at ``parquet_export(spec, lake_dir)``
    (overwrite), same partitioning; returns the path and the Delta version copied."""
    from pipelines.pit_join import read_at

    path = parquet_export(spec, lake_dir)
    rows, version = read_at(spark, spec, lake_dir, None)
    writer = rows.write.mode("overwrite")
    if spec.partition_by:
        writer = writer.partitionBy(*spec.partition_by)
    writer.parquet(path)
    return path, int(version)


def write_exports(spark, lake_dir: Path) -> dict[str, int]:
    """Export every table of ``PARQUET_EXPORTS`` and record the Delta version each copy was taken from in
    ``export_versions_path(lake_dir)`` (the trainer records these as its model's provenance); returns them."""
    exported = {spec.name: export_parquet(spark, spec, lake_dir)[1] for spec in PARQUET_EXPORTS}
    path = export_versions_path(lake_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(exported, indent=2, sort_keys=True))
    tmp.replace(path)
    return exported


# ------------------------------------------------------------------------------------------------- vocabularies


def new_vocab_rows(candidates, existing, id_col: str, idx_col: str, first_index: int = UNKNOWN_INDEX + 1):
    """Rows to append to an id vocabulary: the ``candidates`` whose id is not in ``existing``, numbered from
    ``max(existing idx) + 1`` (``first_index`` when empty) in order of ``(first_seen, id)``.

    Args:
        candidates: one row per id: ``id_col``, ``first_seen`` (timestamp of its earliest event).
        existing: the vocabulary table as stored (may be empty).
        id_col: ``user_id`` / ``item_id``.
        idx_col: ``user_idx`` / ``item_idx``.
        first_index: the index of a new vocabulary's first id (``VocabSpec.first_index``: after the OOV row and
            the hashed buckets).

    Returns:
        The new rows, ``id_col, idx_col, first_seen``; indices >= ``first_index``, never ``UNKNOWN_INDEX``.
    """
    fresh = candidates.join(existing.select(id_col), id_col, "left_anti")
    base = existing.agg(F.coalesce(F.max(idx_col), F.lit(first_index - 1)).alias("_base"))  # one row
    order = Window.orderBy("first_seen", id_col)  # one partition: only the new ids of this run
    return (fresh.crossJoin(base)
            .withColumn(idx_col, (F.col("_base") + F.row_number().over(order)).cast("int"))
            .drop("_base"))


def update_id_vocab(spark, events, table: TableSpec, lake_dir: Path, vocab: VocabSpec):
    """Append to the vocabulary ``table`` the ids of ``events`` (all of bronze) that have at least
    ``vocab.min_count`` events and no index yet (first_seen = their earliest event_time). One Delta commit when
    there are such ids (``userMetadata`` = the spec), none otherwise.

    Returns:
        ``(vocabulary, version)``: the whole vocabulary at the Delta version written (or found), and that version;
        a training set indexed with it records the version (``versionAsOf`` gives the same mapping back).

    Raises:
        VocabularyError: the table was built with another ``hash_buckets`` (its indices would move).
    """
    path = table.path(lake_dir)
    existing = read_or_empty(spark, table, lake_dir)
    if is_delta(spark, path):
        check_layout(vocab, delta_version(spark, path)[1], table.name)
    seen = (events.groupBy(vocab.id_col).agg(F.min("event_time").alias("first_seen"), F.count("*").alias("_n"))
            .where(F.col("_n") >= vocab.min_count).drop("_n"))
    fresh = new_vocab_rows(seen, existing, vocab.id_col, vocab.idx_col, vocab.first_index).persist()
    if fresh.count() or not is_delta(spark, path):
        write_delta(fresh, table, lake_dir, mode="append", user_metadata=commit_metadata(vocab))
    fresh.unpersist()
    version = delta_version(spark, path)[0]
    return spark.read.format("delta").option("versionAsOf", version).load(path), version


def index_column(vocabulary, frame, vocab: VocabSpec):
    """``frame`` with ``vocab.idx_col``: the id's index in ``vocabulary``, else its hashed bucket
    (``1 + pmod(hash(id), hash_buckets)``, Spark's Murmur3 as ``features.vocab.hashed_index``), else
    ``OOV_INDEX`` (no buckets, or a null id)."""
    found = frame.join(vocabulary.select(vocab.id_col, vocab.idx_col), vocab.id_col, "left")
    fallback = (F.lit(OOV_INDEX + 1) + F.pmod(F.hash(F.col(vocab.id_col).cast("int")), F.lit(vocab.hash_buckets))
                if vocab.hash_buckets else F.lit(OOV_INDEX))
    return found.withColumn(vocab.idx_col, F.coalesce(F.col(vocab.idx_col), F.when(F.col(vocab.id_col).isNotNull(),
                                                                                     fallback), F.lit(OOV_INDEX))
                            .cast("int"))


def new_category_rows(values: dict[str, set[str]], existing: dict[tuple[str, str], int]) -> list[tuple[str, str, int]]:
    """Rows to append to ``silver.category_vocab``: the values not yet indexed, numbered per feature from
    ``max(existing idx of that feature) + 1`` (1 for a new feature) in sorted order.

    Args:
        values: feature -> the values seen in the side files.
        existing: ``(feature, value) -> idx`` as stored.

    >>> new_category_rows({"gender": {"M", "F", "X"}}, {("gender", "M"): 1})
    [('gender', 'F', 2), ('gender', 'X', 3)]
    """
    rows = []
    for feature in sorted(values):
        base = max((i for (f, _), i in existing.items() if f == feature), default=UNKNOWN_INDEX)
        fresh = sorted(v for v in values[feature] if (feature, v) not in existing)
        rows += [(feature, v, base + k) for k, v in enumerate(fresh, start=1)]
    return rows


def update_category_vocab(spark, values: dict[str, set[str]], lake_dir: Path) -> dict[tuple[str, str], int]:
    """Append the new categorical values to ``silver.category_vocab`` (append-only; the table is small, hundreds
    of values, so it is merged on the driver) and return the whole vocabulary ``(feature, value) -> idx``."""
    existing = {(r["feature"], r["value"]): r["idx"] for r in read_or_empty(spark, CATEGORY_VOCAB, lake_dir).collect()}
    fresh = new_category_rows(values, existing)
    if fresh or not is_delta(spark, CATEGORY_VOCAB.path(lake_dir)):
        write_delta(spark.createDataFrame(fresh, spark_schema(CATEGORY_VOCAB)), CATEGORY_VOCAB, lake_dir, "append")
    return {**existing, **{(f, v): i for f, v, i in fresh}}


# ----------------------------------------------------------------------------------------------- side features


def user_feature_rows(users: pd.DataFrame) -> list[tuple]:
    """``silver.user_features`` rows from the source's user table (``features.source.Source.read_users``): age
    (years) -> ``age_bucket``, zip code -> its first ``ZIP_PREFIX_LEN`` characters; a missing value stays null (its
    index is ``UNKNOWN_INDEX``).

    >>> user_feature_rows(pd.DataFrame({"user_id": [1, 2], "age": [24, None], "gender": ["M", None],
    ...                                 "occupation": ["technician", None], "zip_code": ["85711", None]}))
    [(1, 24, '18-24', 'M', 'technician', '85'), (2, None, None, None, None, None)]
    """
    value = lambda v: None if v is None or pd.isna(v) else v
    rows = []
    for r in users.itertuples(index=False):
        age = value(r.age)
        rows.append((int(r.user_id), None if age is None else int(age), None if age is None else age_bucket(int(age)),
                     None if value(r.gender) is None else str(r.gender),
                     None if value(r.occupation) is None else str(r.occupation),
                     None if value(r.zip_code) is None else str(r.zip_code)[:ZIP_PREFIX_LEN]))
    return rows


def item_feature_rows(items: pd.DataFrame) -> list[tuple]:
    """``silver.item_features`` rows from the source's item table (``features.source.Source.read_items``): genres
    '|'-separated -> list (empty when none).

    >>> item_feature_rows(pd.DataFrame({"item_id": [1], "title": ["Toy Story"], "year": [1995],
    ...                                 "genres": ["Animation|Comedy"]}))
    [(1, 'Toy Story', 1995, ['Animation', 'Comedy'])]
    """
    return [(int(r.item_id), str(r.title), None if pd.isna(r.year) else int(r.year),
             [g for g in str(r.genres).split("|") if g])
            for r in items.itertuples(index=False)]


def category_values(user_rows: list[tuple], item_rows: list[tuple]) -> dict[str, set[str]]:
    """Values of each ``CATEGORY_FEATURES`` feature in the side-feature rows (nulls left out: they map to 0)."""
    cols = {c: USER_FEATURES.columns.index(c) for c in CATEGORY_FEATURES if c in USER_FEATURES.columns}
    values = {f: {r[i] for r in user_rows if r[i] is not None} for f, i in cols.items()}
    genres = ITEM_FEATURES.columns.index("genres")
    values["genre"] = {g for r in item_rows for g in r[genres]}
    return values


def _lookup(mapping: dict[str, int]):
    """A literal map column ``value -> idx`` (categorical cardinalities are small: hundreds of values)."""
    if not mapping:
        return F.create_map().cast("map<string,int>")
    return F.create_map(*chain.from_iterable((F.lit(k), F.lit(v)) for k, v in sorted(mapping.items())))


def side_indices(user_features, item_features, category_vocab: dict[tuple[str, str], int]):
    """Per-user ``age_idx, gender_idx, occupation_idx, zip_idx`` and per-item ``genre_idx`` (array, in the item
    file's genre order); a value missing from the vocabulary maps to ``UNKNOWN_INDEX``."""
    maps: dict[str, dict[str, int]] = {f: {} for f in CATEGORY_FEATURES}
    for (feature, value), i in category_vocab.items():
        maps.setdefault(feature, {})[value] = i
    idx = lambda feature, value: F.coalesce(F.try_element_at(_lookup(maps[feature]), value), F.lit(UNKNOWN_INDEX))
    users = user_features.select(
        "user_id",
        idx("age_bucket", F.col("age_bucket")).alias("age_idx"),
        idx("gender", F.col("gender")).alias("gender_idx"),
        idx("occupation", F.col("occupation")).alias("occupation_idx"),
        idx("zip_prefix", F.col("zip_prefix")).alias("zip_idx"),
    )
    items = item_features.select("item_id", F.transform("genres", lambda g: idx("genre", g)).alias("genre_idx"))
    return users, items


# ----------------------------------------------------------------------------------------------- gold samples


def with_split(events, n: int):
    """Add ``split`` by the global time split over ``n`` events ordered by ``(event_time, event_id)``."""
    pos = F.col("_pos")
    split = None
    for name, end in split_bounds(n):
        split = F.when(pos <= end, F.lit(name)) if split is None else split.when(pos <= end, F.lit(name))
    return (events.withColumn("_pos", F.row_number().over(Window.orderBy("event_time", "event_id")))  # 1-based
            .withColumn("split", split).drop("_pos"))


def rating_level(rating):
    """The row of ``t_rating`` for a rating column: the stars rounded half up and clamped to 1..5 (MovieLens'
    half stars 0.5..5 included; ``RATING_LEVELS`` rows with 0 unknown), 0 when null."""
    level = F.least(F.greatest(F.round(rating).cast("int"), F.lit(1)), F.lit(RATING_LEVELS - 1))
    return F.when(rating.isNull(), F.lit(UNKNOWN_INDEX)).otherwise(level)  # greatest() would skip the null


def with_history(samples, max_history: int = MAX_HISTORY):
    """Add ``hist_item_idx`` (array<int>, length <= L = ``max_history``), ``hist_rating`` (array<int>, aligned
    with it: :func:`rating_level` of each of those events) and ``hist_len``: the item_idx of the user's events at
    Unix seconds strictly before the sample's, sorted by ``(event_time, event_id)``, the last L.
    """
    before = (Window.partitionBy("user_id").orderBy(F.col("_ts_s"))
              .rangeBetween(Window.unboundedPreceding, -1))  # frame: ts <= sample ts - 1 s
    behaviour = F.struct("event_time", "event_id", "item_idx", rating_level(F.col("rating")).alias("level"))
    earlier = F.array_sort(F.collect_list(behaviour).over(before))  # (H,)
    last = F.slice(earlier, F.greatest(F.size(earlier) - max_history + 1, F.lit(1)), max_history)  # (min(H, L),)
    return (samples.withColumn("_ts_s", F.unix_seconds("event_time"))
            .withColumn("hist_item_idx", F.transform(last, lambda e: e["item_idx"]))
            .withColumn("hist_rating", F.transform(last, lambda e: e["level"]))
            .withColumn("hist_len", F.size("hist_item_idx"))
            .drop("_ts_s"))


def with_prior_stats(samples):
    """Add the point-in-time counters of ``DENSE_FEATURES``: per user and per item, the number of events at Unix
    seconds strictly before the sample's (``<entity>_prior_events``) and their mean rating
    (``<entity>_prior_rating``, null when there is none). The same frame as :func:`with_history`, so a counter
    never includes the sample itself or anything of its own second."""
    samples = samples.withColumn("_ts_s", F.unix_seconds("event_time"))
    for entity, key in (("user", "user_id"), ("item", "item_id")):
        before = Window.partitionBy(key).orderBy(F.col("_ts_s")).rangeBetween(Window.unboundedPreceding, -1)
        samples = (samples.withColumn(f"{entity}_prior_events", F.count("rating").over(before).cast("int"))
                   .withColumn(f"{entity}_prior_rating", F.avg("rating").over(before)))
    return samples.drop("_ts_s")


def build_samples(events, user_vocab, item_vocab, user_side, item_side, n: int,
                  user_spec: VocabSpec = USER_VOCAB_SPEC, item_spec: VocabSpec = ITEM_VOCAB_SPEC,
                  label: LabelRule = LabelRule()):
    """``gold.ctr_samples`` rows: one per bronze event, labelled by the source's rule (``label``; default rating >=
    4), split, indexed (``index_column``: own index, hashed bucket or OOV), with its history and its point-in-time
    counters."""
    labelled = with_split(events, n).withColumn("label", label.spark_column())
    samples = (index_column(item_vocab, index_column(user_vocab, labelled, user_spec), item_spec)
               .join(F.broadcast(user_side), "user_id", "left")
               .join(F.broadcast(item_side), "item_id", "left"))
    for c in ("user_idx", "item_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx"):
        samples = samples.withColumn(c, F.coalesce(F.col(c), F.lit(UNKNOWN_INDEX)))
    samples = samples.withColumn("genre_idx", F.coalesce(F.col("genre_idx"), F.array().cast("array<int>")))
    return with_prior_stats(with_history(samples))


def build_item_sequences(samples):
    """``gold.item_sequences``: per user, item_idx of the train split's positives ordered by
    ``(event_time, event_id)``; users with ``seq_len < 2`` dropped (no skip-gram pair)."""
    positives = samples.where((F.col("split") == "train") & (F.col("label") == 1))
    seq = F.array_sort(F.collect_list(F.struct("event_time", "event_id", "item_idx")))
    return (positives.groupBy("user_id", "user_idx")
            .agg(F.transform(seq, lambda e: e["item_idx"]).alias("item_idx"))
            .withColumn("seq_len", F.size("item_idx"))
            .where(F.col("seq_len") >= 2))


def vocab_sizes(user_vocab, item_vocab, category_vocab: dict[tuple[str, str], int],
                user_spec: VocabSpec = USER_VOCAB_SPEC, item_spec: VocabSpec = ITEM_VOCAB_SPEC) -> dict[str, int]:
    """Rows of each embedding table (max index + 1, so index 0 and the hashed buckets included), keyed as
    ``VOCAB_SIZE_KEYS``."""
    ids = (user_vocab.agg(F.max("user_idx")).crossJoin(item_vocab.agg(F.max("item_idx"))).first())
    sizes = {"user": max(ids[0] or UNKNOWN_INDEX, user_spec.first_index - 1),
             "item": max(ids[1] or UNKNOWN_INDEX, item_spec.first_index - 1)}
    for f in CATEGORY_FEATURES:
        sizes[f] = max((i for (feature, _), i in category_vocab.items() if feature == f), default=UNKNOWN_INDEX)
    sizes[HISTORY_RATING_FEATURE.vocab] = RATING_LEVELS - 1
    return {k: int(v) + 1 for k, v in sizes.items()}


# ------------------------------------------------------------------------------------------------------- job


def run_features(spark, cfg: PlatformConfig, user_vocab_spec: VocabSpec = USER_VOCAB_SPEC,
                 item_vocab_spec: VocabSpec = ITEM_VOCAB_SPEC, source: Source | None = None) -> dict:
    """Build every silver and gold table from bronze and the source's side tables; see the module docstring.

    Args:
        source: the data source (its label rule and user/item tables); default ``cfg.source``.
        user_vocab_spec, item_vocab_spec: min count and hashed buckets of the id vocabularies
            (``features.vocab``; the defaults keep every id and map unknown ones to row 0).

    Returns:
        The stage result: ``source`` (its name), ``label_rule`` (as words), ``samples`` and ``positives`` (events
        per split), ``users``/``items`` (vocabulary
        entries), ``sequences`` (rows of ``gold.item_sequences``), ``unknown_side_features`` (events whose user
        or item is absent from the source's side tables: their side indices are ``UNKNOWN_INDEX``),
        ``vocab_sizes``, ``vocab_versions`` ({table: Delta version} of the vocabularies ``gold.ctr_samples`` was
        indexed with; also the ``userMetadata`` of its commit) and ``features_wall_s`` (seconds).

    Raises:
        TableNotFoundError: ``bronze.interactions`` has not been written (run the ingest stage).
        PlatformError: bronze is empty, or holds an event_id more than once (bronze is deduplicated by ingest).
        SourceError: the source file or its side tables are missing or wrong (run ``make data``).
        VocabularyError: a vocabulary was built with other ``hash_buckets``.
    """
    t0 = time.perf_counter()
    lake = Path(cfg.lake_dir)
    bronze_path = BRONZE_INTERACTIONS.path(lake)
    events = read_delta(spark, BRONZE_INTERACTIONS, lake, producer="the ingest stage (pipelines/ingest.py)")
    events = events.select("event_id", "user_id", "item_id", "rating", "event_time", "event_type", "click").cache()
    n, n_ids = events.agg(F.count("*"), F.countDistinct("event_id")).first()
    if n == 0:
        raise PlatformError(f"table 'bronze.interactions' at {bronze_path} is empty; run the ingest stage first")
    if n != n_ids:
        raise PlatformError(f"table 'bronze.interactions' at {bronze_path} holds {n - n_ids} duplicate event_id "
                            f"rows; bronze must be deduplicated on event_id by the ingest stage")
    source = source or load_source(cfg.source, cfg.raw_dir)

    # silver: side features (overwrite), vocabularies (append-only)
    user_rows, item_rows = user_feature_rows(source.read_users()), item_feature_rows(source.read_items())
    write_delta(spark.createDataFrame(user_rows, spark_schema(USER_FEATURES)), USER_FEATURES, lake)
    write_delta(spark.createDataFrame(item_rows, spark_schema(ITEM_FEATURES)), ITEM_FEATURES, lake)
    user_features = read_delta(spark, USER_FEATURES, lake)
    item_features = read_delta(spark, ITEM_FEATURES, lake)
    user_vocab, user_version = update_id_vocab(spark, events, USER_VOCAB, lake, user_vocab_spec)
    item_vocab, item_version = update_id_vocab(spark, events, ITEM_VOCAB, lake, item_vocab_spec)
    category_vocab = update_category_vocab(spark, category_values(user_rows, item_rows), lake)
    user_side, item_side = side_indices(user_features, item_features, category_vocab)
    vocab_versions = {USER_VOCAB.name: user_version, ITEM_VOCAB.name: item_version,
                      CATEGORY_VOCAB.name: delta_version(spark, CATEGORY_VOCAB.path(lake))[0]}

    # gold: samples, then sequences read back from the written samples
    write_delta(build_samples(events, user_vocab, item_vocab, user_side, item_side, n, user_vocab_spec,
                              item_vocab_spec, source.label), CTR_SAMPLES, lake,
                user_metadata=json.dumps({"vocab_versions": vocab_versions}, sort_keys=True))
    known = (events.join(user_features.select("user_id", F.lit(1).alias("_u")), "user_id", "left")
             .join(item_features.select("item_id", F.lit(1).alias("_i")), "item_id", "left")
             .agg(F.count("_u"), F.count("_i")).first())
    unknown = {"user": n - known[0], "item": n - known[1]}
    events.unpersist()
    samples = read_delta(spark, CTR_SAMPLES, lake)
    write_delta(build_item_sequences(samples), ITEM_SEQUENCES, lake)

    # exports
    write_exports(spark, lake)
    sizes = vocab_sizes(user_vocab, item_vocab, category_vocab, user_vocab_spec, item_vocab_spec)
    path = vocab_sizes_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sizes, indent=2))
    tmp.replace(path)

    per_split = {r["split"]: r for r in samples.groupBy("split").agg(
        F.count("*").alias("n"), F.sum("label").alias("pos")).collect()}
    names = [name for name, _ in SPLIT_FRACTIONS]
    get = lambda name, col: int(per_split[name][col]) if name in per_split else 0
    return {
        "source": source.name,
        "label_rule": source.label.describe(),
        "samples": {s: get(s, "n") for s in names},
        "positives": {s: get(s, "pos") for s in names},
        "users": user_vocab.count(),
        "items": item_vocab.count(),
        "sequences": read_delta(spark, ITEM_SEQUENCES, lake).count(),
        "unknown_side_features": unknown,
        "vocab_sizes": sizes,
        "vocab_versions": vocab_versions,
        "features_wall_s": round(time.perf_counter() - t0, 3),
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``features`` stage: arguments first (``--help`` returns before Spark starts), then the
    configuration from ``RECSYS_*`` (an error in it: the message on stderr, exit status 2), result to the run's
    stage dir."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, description=describe(__doc__),
        epilog=settings_help({
            "data_dir": "lake (<data_dir>/lake) read and written",
            "source": "the data source's YAML file: its label rule and user/item tables (features/sources/)",
            "raw_dir": "folder that {raw_dir} in the source's paths names (make data)",
            "spark.master": "Spark master when not run by spark-submit (which sets its own)",
            "spark.shuffle_partitions": "shuffle partitions (count)",
            "artifacts_dir": "stage result under <artifacts_dir>/<run_name>/stages/features.json",
            "run_name": "name of the run"}))
    # The daily DAG may run this job in place of pipelines/daily_features.py (DAG_DAILY_FEATURES_APP): it passes
    # the day, which this stage does not need, since it rebuilds every day (idempotent as well).
    parser.add_argument("--date", default=None, help="accepted and ignored (YYYY-MM-DD): every day is rebuilt")
    parser.add_argument("--until", default=None, help="accepted and ignored (YYYY-MM-DD): every day is rebuilt")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config_or_exit(parser.prog)
    try:
        source = load_source(cfg.source, cfg.raw_dir)
    except SourceError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    spark = get_spark(cfg, app_name="recsys-features")
    try:
        result = run_features(spark, cfg, source=source)
        path = write_stage_result(cfg, STAGE, result)
        log.info("features: %s samples %s, positives %s, %.1f s; result in %s", cfg.lake_dir, result["samples"],
                 result["positives"], result["features_wall_s"], path)
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
