"""Every table of the lake: name, medallion layer, location, partitioning and schema.

Schemas are Spark DDL strings so that this module needs no Spark; ``pipelines`` turns them into ``StructType``
with ``StructType.fromDDL`` and writes exactly these columns. Locations are relative to the lake root
(``PlatformConfig.lake_dir``); Parquet exports for readers that cannot read Delta (Ray Data's Parquet reader, the
ANN builder) live under ``export/``.

>>> BRONZE_INTERACTIONS.path("/lake")
'/lake/bronze/interactions'
>>> TABLES["gold.ctr_samples"].partition_by
('split',)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from features.events import IMPRESSION_DDL

LAYERS = ("bronze", "silver", "gold", "quarantine", "export")


@dataclass(frozen=True)
class TableSpec:
    """One table of the lake.

    Args:
        name: ``<layer>.<table>``, e.g. ``bronze.interactions``.
        schema: Spark DDL of the columns, in order.
        partition_by: partition columns (a subset of the schema).
        fmt: ``delta`` or ``parquet``.
        doc: what one row is.
    """

    name: str
    schema: str
    partition_by: tuple[str, ...] = ()
    fmt: str = "delta"
    doc: str = ""
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        layer, _, table = self.name.partition(".")
        if layer not in LAYERS or not table:
            raise ValueError(f"table name {self.name!r} must be '<layer>.<table>' with layer in {LAYERS}")
        if self.fmt not in ("delta", "parquet"):
            raise ValueError(f"table {self.name!r}: fmt must be 'delta' or 'parquet', not {self.fmt!r}")
        cols = tuple(part.strip().split()[0].strip("`") for part in _split_top_level(self.schema))
        missing = set(self.partition_by) - set(cols)
        if missing:
            raise ValueError(f"table {self.name!r}: partition columns {sorted(missing)} are not in its schema")
        object.__setattr__(self, "columns", cols)

    def path(self, lake_dir: str | Path) -> str:
        layer, _, table = self.name.partition(".")
        return str(Path(lake_dir) / layer / table)


def _split_top_level(ddl: str) -> list[str]:
    """Split a DDL column list on the commas that are not inside ``<...>`` (array<int>, struct<...>)."""
    parts, depth, cur = [], 0, []
    for ch in ddl:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p for p in parts if p.strip()]


BRONZE_INTERACTIONS = TableSpec(
    "bronze.interactions",
    "event_id string, user_id int, item_id int, rating float, event_time timestamp, event_date date, "
    "kafka_partition int, kafka_offset bigint, ingested_at timestamp, event_type string, " + IMPRESSION_DDL,
    partition_by=("event_date",),
    doc="One valid interaction event as it arrived on the Kafka topic, deduplicated on event_id; an impression's "
        "optional fields (click, is_random, session_id, candidates, c01..c26) are null for other events.",
)

QUARANTINE_INTERACTIONS = TableSpec(
    "quarantine.interactions",
    "raw string, reason string, detail string, kafka_partition int, kafka_offset bigint, "
    "kafka_timestamp timestamp, ingested_at timestamp",
    doc="One rejected Kafka message, kept whole with the reason code and a readable detail.",
)

USER_VOCAB = TableSpec(
    "silver.user_vocab", "user_id int, user_idx int, first_seen timestamp",
    doc="Stable user id -> embedding row. Index 0 is reserved for unknown users; indices are append-only.",
)
ITEM_VOCAB = TableSpec(
    "silver.item_vocab", "item_id int, item_idx int, first_seen timestamp",
    doc="Stable item id -> embedding row. Index 0 is reserved for unknown items; indices are append-only.",
)
USER_FEATURES = TableSpec(
    "silver.user_features",
    "user_id int, age int, age_bucket string, gender string, occupation string, zip_prefix string",
    doc="Side features of a user from the data source's user table (features.source).",
)
ITEM_FEATURES = TableSpec(
    "silver.item_features", "item_id int, title string, year int, genres array<string>",
    doc="Side features of an item from the data source's item table (features.source).",
)
CATEGORY_VOCAB = TableSpec(
    "silver.category_vocab", "feature string, value string, idx int",
    doc="Index of each categorical side-feature value (age_bucket, gender, occupation, zip_prefix, genre); 0 = unknown.",
)
CTR_SAMPLES = TableSpec(
    "gold.ctr_samples",
    "event_id string, user_id int, item_id int, rating float, label int, event_time timestamp, split string, "
    "user_idx int, item_idx int, age_idx int, gender_idx int, occupation_idx int, zip_idx int, "
    "genre_idx array<int>, hist_item_idx array<int>, hist_rating array<int>, hist_len int, "
    "user_prior_events int, user_prior_rating double, item_prior_events int, item_prior_rating double",
    partition_by=("split",),
    doc="One labelled sample (label = rating >= 4) with the user's behaviour history (items and their stars) and "
        "the user's and item's event counts and mean ratings, all from events strictly before event_time (null "
        "mean: no such event).",
)
ITEM_SEQUENCES = TableSpec(
    "gold.item_sequences", "user_id int, user_idx int, item_idx array<int>, seq_len int",
    doc="A user's positively rated items of the train period in time order: item2vec's sentences.",
)

INGEST_BATCHES = TableSpec(
    "quarantine.ingest_batches",
    "query_id string, batch_id bigint, messages bigint, valid bigint, inserted bigint, duplicates bigint, "
    "quarantined bigint, written_at timestamp",
    doc="One ingest micro-batch: messages read, valid, inserted into bronze, duplicates of an event_id already "
        "seen (kept once, not quarantined) and quarantined; appended idempotently (txnAppId/txnVersion).",
)
ITEM_WINDOW_STATS = TableSpec(
    "gold.item_window_stats",
    "item_id int, event_date date, events_1d bigint, positives_1d bigint, ctr_1d double, "
    "events_7d bigint, positives_7d bigint, ctr_7d double, feature_ts timestamp",
    partition_by=("event_date",),
    doc="An item's event counts and CTR over the 1 and 7 days of event time ending with event_date; known from "
        "feature_ts = event_date + 1 day (00:00 UTC). One row per item with an event in the 7-day window.",
)
USER_RECENT_ITEMS = TableSpec(
    "gold.user_recent_items",
    "user_id int, event_date date, recent_items array<int>, recent_len int, feature_ts timestamp",
    partition_by=("event_date",),
    doc="A user's last items (item_id, oldest first) of every event up to the end of event_date; one row per "
        "user and day with an event; known from feature_ts = event_date + 1 day (00:00 UTC).",
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    BRONZE_INTERACTIONS, QUARANTINE_INTERACTIONS, USER_VOCAB, ITEM_VOCAB, USER_FEATURES, ITEM_FEATURES,
    CATEGORY_VOCAB, CTR_SAMPLES, ITEM_SEQUENCES, INGEST_BATCHES, ITEM_WINDOW_STATS, USER_RECENT_ITEMS,
)}


def vocab_sizes_path(lake_dir: str | Path) -> Path:
    """Where the features job records each vocabulary's row count (index 0 included), as JSON
    ``{"user": 944, "item": 1683, "age_bucket": ..., ...}``; the trainer sizes its embedding tables from it.

    >>> str(vocab_sizes_path("/lake"))
    '/lake/export/vocab_sizes.json'
    """
    return Path(lake_dir) / "export" / "vocab_sizes.json"


def export_versions_path(lake_dir: str | Path) -> Path:
    """Where the features job records the Delta version each Parquet export was copied from, as JSON
    ``{"gold.ctr_samples": 7, "silver.item_vocab": 3, ...}``; the trainer records the versions of the tables it
    read from it (the provenance of a model and of its ``gold.item_embeddings`` rows).

    >>> str(export_versions_path("/lake"))
    '/lake/export/delta_versions.json'
    """
    return Path(lake_dir) / "export" / "delta_versions.json"


def parquet_export(table: TableSpec, lake_dir: str | Path) -> str:
    """Where the Parquet copy of a Delta table lives, for readers that need plain Parquet. A table partitioned
    in Delta is partitioned the same way here (hive layout, ``split=train/``): its partition columns live in the
    directory names only, so a reader must read with hive partitioning to get them back.

    >>> parquet_export(CTR_SAMPLES, "/lake")
    '/lake/export/ctr_samples'
    """
    return str(Path(lake_dir) / "export" / table.name.partition(".")[2])


PIT_TRAINING_SET = TableSpec(
    "gold.pit_training_set",
    "event_id string, user_id int, item_id int, event_time timestamp, label int, "
    "events_1d bigint, positives_1d bigint, ctr_1d double, events_7d bigint, positives_7d bigint, ctr_7d double, "
    "recent_items array<int>, recent_len int",
    doc="One bronze event as a labelled sample with every declared feature view joined point-in-time (the latest "
        "row strictly before event_time, within the view's ttl). Each write's Delta commit records, as "
        "userMetadata, the versions of the tables it was built from (pipelines.pit_join).",
)
TABLES[PIT_TRAINING_SET.name] = PIT_TRAINING_SET


#: Versioned item embeddings, one row per (model, model_version, item); written by ``serving.export`` through
#: ``serving.registry``. ``training_versions`` is JSON ``{"gold.ctr_samples": 3, ...}``: the Delta version of
#: each training table at the model's creation time; ``metrics`` is JSON of the model's stage result figures.
ITEM_EMBEDDINGS = TableSpec(
    "gold.item_embeddings",
    "item_id int, item_idx int, embedding array<float>, model string, model_version string, "
    "training_versions string, metrics string, created_at timestamp",
    partition_by=("model",),
    doc="One item's embedding in one model version, with the Delta versions of the tables it was trained on.",
)
TABLES[ITEM_EMBEDDINGS.name] = ITEM_EMBEDDINGS
