"""Stage ``ingest``: Kafka topic -> Delta ``bronze.interactions`` + ``quarantine.interactions`` (Spark Structured
Streaming).

Every message is validated by Spark column expressions that mirror :func:`features.events.parse_event` rule for
rule and in the same order (``VALIDATION_RULES`` below; ``tests/test_ingest.py`` checks that both give the same
reason on the same messages). A message that is exactly the canonical serialisation of its typed parse (what
producers send) and passes the range rules is valid without the rest (:func:`_canonical_and_valid`): the rules and
their second, untyped parse run only for the others. A valid event is MERGEd into bronze on ``event_id`` (inserted
when not already there), so replaying the topic or re-running the stage never duplicates a row. A malformed one is
appended to quarantine, kept whole with its reason code and the Kafka coordinates; nothing malformed stops the
stream.

The MERGE looks for an event's id only in bronze's partitions of the micro-batch's days (``ON t.event_date
BETWEEN lo AND hi AND t.event_id = s.event_id``, Delta's documented insert-only deduplication pattern): its cost
follows the batch's days, not the size of bronze. A replayed, re-produced or reprocessed event carries the same
``event_time``, hence the same ``event_date``, so it is always found. What is not caught: two *different* events
that share an ``event_id`` but fall on different days would both be kept (an id collision of the producer, not a
duplicate delivery; ``tests/test_ingest_kill.py`` checks that every produced id is in bronze exactly once).

Each micro-batch (``foreachBatch``) is idempotent: the bronze MERGE inserts only unseen event_ids, and the
quarantine and batch-log appends carry Delta's ``txnAppId``/``txnVersion`` (the query id from the checkpoint and
the batch id), so a batch replayed after a crash is not appended twice. With the speed layer on (the default of the
continuous trigger), the batch then MERGEs the feature rows its events touch into ``gold.item_window_stats`` and
``gold.user_recent_items`` (``pipelines.speed_layer``: recomputed from bronze, keyed by the batch's own events,
so a replay neither loses nor double counts). ``tests/test_ingest_kill.py`` (``make fault-ingest``) SIGKILLs the
continuous query at random points and checks both.

Run under spark-submit (``pipelines.stages.build_command("ingest")``) or as ``python pipelines/ingest.py``::

    pipelines/ingest.py --trigger available-now            # drain the topic, write the stage result, exit
    pipelines/ingest.py --trigger continuous --interval-s 10   # a micro-batch every 10 s until stopped
    pipelines/ingest.py --reprocess        # kappa: replay the topic into a shadow lake, swap it in (query stopped)

The stage result ``ingest`` is ``{"events_bronze", "events_quarantined", "quarantine_reasons": {reason: n},
"ingest_wall_s"}`` (counts are of the whole tables).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script (spark-submit, python pipelines/ingest.py): import from the repo
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import functools
import json
import logging
import os
import time
from pathlib import Path

from features.config import HelpFormatter, PlatformConfig, describe, load_config_or_exit, settings_help
from features.events import (
    EVENT_SCHEMA_DDL,
    EVENT_TYPES,
    FIELDS,
    IMPRESSION_FIELDS,
    MAX_MESSAGE_BYTES,
    MAX_RATING,
    MIN_EVENT_TIME,
    MIN_RATING,
    OPTIONAL_FIELDS,
)
from features.errors import PlatformError, TableNotFoundError
from features.results import write_stage_result
from features.source import LabelRule, load_source
from features.tables import (
    BRONZE_INTERACTIONS,
    INGEST_BATCHES,
    ITEM_VOCAB,
    QUARANTINE_INTERACTIONS,
    USER_VOCAB,
    TableSpec,
)
from pipelines.speed_layer import SPEED_TABLES, ensure_speed_tables, update_speed_tables

log = logging.getLogger("pipelines.ingest")

STAGE = "ingest"
TRIGGERS = ("available-now", "continuous")

#: Spark JSON options that make the parser as strict as Python's ``json.loads``: no single quotes, no unquoted
#: names or control characters, no leading zeros; NaN/Infinity allowed (json.loads accepts them too).
_JSON_OPTIONS = {"allowSingleQuotes": "false", "allowUnquotedFieldNames": "false",
                 "allowNumericLeadingZeros": "false", "allowNonNumericNumbers": "true",
                 "allowUnquotedControlChars": "false", "allowBackslashEscapingAnyCharacter": "false"}
#: Every field as VARIANT: parsing never fails on a field's type, so ``_corrupt_record`` is set only when the
#: message is not JSON (or not an object), and ``schema_of_variant`` gives each field's JSON type.
_PROBE_DDL = ", ".join(f"{name} variant" for name in (*FIELDS, *OPTIONAL_FIELDS)) + ", _corrupt_record string"
#: The fields whose JSON type a rule checks; ``schema_of_variant`` of each is computed once per message (the rules
#: test most of them two or three times, and building the type's name is the dearest part of the validation).
_TYPE_CHECKED = ("event_id", "user_id", "item_id", "rating", "event_time", "event_type")
#: JSON's whitespace: json.loads accepts only these around the one top-level value.
_JSON_WHITESPACE = " \t\n\r"
#: datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ") as a regex: the groups of CPython's _strptime.TimeRE (one-digit
#: month/day/hour/minute/second accepted, " 1" as a day, seconds up to 61, case-insensitive 'T' and 'Z'),
#: anchored at both ends because strptime rejects unconverted data.
_EVENT_TIME_RE = (r"(?i)\A([0-9]{4})-(1[0-2]|0[1-9]|[1-9])-(3[01]|[12][0-9]|0[1-9]|[1-9]| [1-9])"
                  r"T(2[0-3]|[01][0-9]|[0-9]):([0-5][0-9]|[0-9]):(6[01]|[0-5][0-9]|[0-9])Z\z")


def _validation_rules(known_users: list[int] | None = None, known_items: list[int] | None = None):
    """``[(condition, reason, detail)]`` in the order :func:`features.events.parse_event` checks them; the first
    condition that holds names the message's reason. ``known_users``/``known_items``: a closed vocabulary
    (None: open).

    Expects the columns that :func:`validate` prepares: ``_bytes`` (binary), ``_text`` (string, possibly invalid
    UTF-8), ``_probe`` (struct of variants), ``_typed`` (struct of EVENT_SCHEMA_DDL), ``_event_ts`` (timestamp),
    ``_json_type`` (struct: the JSON type of each field of ``_TYPE_CHECKED``).
    """
    from pyspark.sql import functions as F

    probe, typed = F.col("_probe"), F.col("_typed")

    def json_type(name: str):  # 'STRING', 'BIGINT', 'DECIMAL(p,s)', 'DOUBLE', 'BOOLEAN', 'VOID', 'OBJECT<..>', ...
        return F.col("_json_type")[name]  # schema_of_variant, computed once per message by validate

    def absent(name: str):  # obj.get(name) is None: the key is missing or its value is JSON null
        return probe[name].isNull() | (json_type(name) == "VOID")

    def not_int(name: str):  # not a JSON integer, or one that does not fit the int column (typed parse is null)
        return (json_type(name) != "BIGINT") | typed[name].isNull()

    rating = typed["rating"]
    rating_text = F.when(json_type("rating") == "BIGINT", F.try_variant_get(probe["rating"], "$", "bigint")
                         .cast("string")).otherwise(rating.cast("string"))
    rules = [
        (F.octet_length("_bytes") > MAX_MESSAGE_BYTES, "oversized",
         F.concat(F.octet_length("_bytes").cast("string"), F.lit(" bytes"))),
        (~F.is_valid_utf8("_text"), "bad_encoding", F.lit("the message is not valid UTF-8")),
        (probe.isNull() | probe["_corrupt_record"].isNotNull() | ~_json_object(F.col("_text")),
         "not_json", F.lit("not a JSON object")),
        *[(absent(name), "missing_field", F.lit(name)) for name in FIELDS],
        (json_type("event_id") != "STRING", "wrong_type", F.lit("event_id")),
        (not_int("user_id"), "wrong_type", F.lit("user_id")),
        (not_int("item_id"), "wrong_type", F.lit("item_id")),
        (~(json_type("rating").isin("BIGINT", "DOUBLE") | json_type("rating").startswith("DECIMAL")),
         "wrong_type", F.lit("rating")),
        (~((rating >= MIN_RATING) & (rating <= MAX_RATING)), "rating_out_of_range", rating_text),  # NaN: out
        (json_type("event_time") != "STRING", "wrong_type", F.lit("event_time")),
        (F.col("_event_ts").isNull() | (F.col("_event_ts") < F.lit(MIN_EVENT_TIME.strftime("%Y-%m-%d %H:%M:%S"))
                                        .cast("timestamp")) | (F.col("_event_ts") > F.current_timestamp()),
         "bad_timestamp", typed["event_time"]),
        (~absent("event_type") & (json_type("event_type") != "STRING"), "wrong_type", F.lit("event_type")),
        (~absent("event_type") & ~typed["event_type"].isin(*EVENT_TYPES), "unknown_event_type",
         typed["event_type"]),
        *[(_not_kind(probe[name], typed[name], kind), "wrong_type", F.lit(name))
          for name, kind in IMPRESSION_FIELDS.items()],
    ]
    if known_users is not None:
        rules.append((~typed["user_id"].isin(*known_users), "unknown_id",
                      F.concat(F.lit("user_id "), typed["user_id"].cast("string"))))
    if known_items is not None:
        rules.append((~typed["item_id"].isin(*known_items), "unknown_id",
                      F.concat(F.lit("item_id "), typed["item_id"].cast("string"))))
    return rules


def _not_kind(probe, typed, kind: str):
    """A present (not absent, not JSON null) optional field whose value is not of its ``IMPRESSION_FIELDS`` kind
    (``features.events``). ``probe`` is the field as a variant, ``typed`` as parsed with ``EVENT_SCHEMA_DDL``:
    Spark's JSON parser converts only the matching JSON token (an integer in range for int/bigint, true/false for
    boolean, an array for array<int>) and leaves null (or a null element) elsewhere, so a null ``typed`` value of a
    present field is a wrong type. Cheaper than ``schema_of_variant`` on the 30 fields of every message."""
    from pyspark.sql import functions as F

    present = probe.isNotNull() & ~F.is_variant_null(probe)
    bad = _bad_value(typed, kind)  # [null], [1.5], ["1"], [true] leave a null element of an int32_array
    return present & (typed.isNull() if bad is None else typed.isNull() | bad)


def _bad_value(typed, kind: str):
    """A typed (non-null) optional field whose value its kind does not allow beyond the JSON type: a flag not 0 or
    1, an id list with a null element; None for the kinds with no such rule (bool, int32, int64)."""
    from pyspark.sql import functions as F

    if kind == "flag":
        return ~typed.isin(0, 1)
    if kind == "int32_array":
        return F.size(F.array_compact(typed)) != F.size(typed)  # (codegen'd, unlike a lambda)
    return None


def _json_object(text_col):
    """True where the text is one JSON object as json.loads sees it: ``{`` ... ``}`` with only JSON whitespace
    around (Spark's parser would ignore trailing text). A trim and two character tests: a regex over the whole
    message cost a scan with backtracking on every message."""
    from pyspark.sql import functions as F

    inner = F.btrim(text_col, F.lit(_JSON_WHITESPACE))
    return inner.startswith("{") & inner.endswith("}") & (F.length(inner) >= 2)


def _event_time(text_col):
    """The timestamp (UTC) that strptime would read from ``text_col``, or null where it would raise ValueError
    (no match, or an impossible date/time such as Feb 30 or second 60).

    The canonical form (``2024-01-31T12:00:00Z``, what producers send) is read by one strict ``try_to_timestamp``
    (Spark resolves dates strictly: Feb 30, hour 24 and second 60 are null, as strptime raises); any other text
    goes through the regex of strptime's grammar (one-digit fields, lower-case 't'/'z'), six extractions a
    message, which only unusual producers pay for."""
    from pyspark.sql import functions as F

    canonical = F.translate(text_col, "0123456789", "dddddddddd") == "dddd-dd-ddTdd:dd:ddZ"
    part = lambda i: F.lpad(F.trim(F.regexp_extract(text_col, _EVENT_TIME_RE, i)), 2 if i > 1 else 4, "0")
    normalised = F.concat(part(1), F.lit("-"), part(2), F.lit("-"), part(3), F.lit(" "),
                          part(4), F.lit(":"), part(5), F.lit(":"), part(6))
    return (F.when(canonical, F.try_to_timestamp(text_col, F.lit("yyyy-MM-dd'T'HH:mm:ss'Z'")))
            .when(text_col.rlike(_EVENT_TIME_RE), F.try_to_timestamp(normalised, F.lit("yyyy-MM-dd HH:mm:ss"))))


def _canonical_and_valid(known_users: list[int] | None = None, known_items: list[int] | None = None):
    """True for a message that is exactly the canonical serialisation of its typed parse (``to_json`` of
    ``_typed``: the contract's fields in order, compact, nulls left out, as ``features.events.Event.to_json``
    and the generator write them) and whose values pass every range rule. Such a message is valid: the equality
    proves it is one JSON object whose every field has the contract's JSON type (a string id sent as a number, a
    wrong-typed or null optional field, whitespace, an unknown or repeated key all break it). Anything else,
    valid or not, is judged by the full rules (:func:`_validation_rules`).

    Why: the rules need the second, untyped parse (``_probe``) and some sixty tests per message; this is one
    serialisation and a comparison, and producers send canonical messages."""
    from pyspark.sql import functions as F

    typed, ts = F.col("_typed"), F.col("_event_ts")
    checks = [
        F.octet_length("_bytes") <= MAX_MESSAGE_BYTES,
        F.is_valid_utf8("_text"),
        *[typed[name].isNotNull() for name in FIELDS],
        (typed["rating"] >= MIN_RATING) & (typed["rating"] <= MAX_RATING),  # NaN sorts above every number: out
        ts.isNotNull(),
        ts >= F.lit(MIN_EVENT_TIME.strftime("%Y-%m-%d %H:%M:%S")).cast("timestamp"),
        ts <= F.current_timestamp(),
        typed["event_type"].isNull() | typed["event_type"].isin(*EVENT_TYPES),
        *[typed[name].isNull() | ~bad for name, kind in IMPRESSION_FIELDS.items()
          if (bad := _bad_value(typed[name], kind)) is not None],
        F.to_json(typed) == F.col("_text"),
    ]
    if known_users is not None:
        checks.append(typed["user_id"].isin(*known_users))
    if known_items is not None:
        checks.append(typed["item_id"].isin(*known_items))
    out = checks[0]
    for check in checks[1:]:
        out = out & check
    return F.coalesce(out, F.lit(False))


def _validation_columns(known_users: list[int] | None, known_items: list[int] | None):
    """The Columns of :func:`_prepare` and :func:`validate`, built once per Spark context and vocabulary and then
    reused by every micro-batch: ``(steps, output)``, ``steps`` the ``[(name, Column)]`` added in turn, ``output``
    the final ``select`` list. Building them calls the JVM once per expression node (some thousands: measured 0.8 s,
    a fifth of a 50,000-event batch); an unresolved Column is not tied to a DataFrame, so one build serves all."""
    from pyspark import SparkContext

    as_key = lambda ids: None if ids is None else tuple(ids)
    return _built_columns(id(SparkContext._active_spark_context), as_key(known_users), as_key(known_items))


@functools.lru_cache(maxsize=1)  # a stage validates against one vocabulary
def _built_columns(context_id: int, known_users: tuple[int, ...] | None, known_items: tuple[int, ...] | None):
    """:func:`_validation_columns` for one Spark context (``context_id``, only the cache's key)."""
    return _build_validation_columns(None if known_users is None else list(known_users),
                                     None if known_items is None else list(known_items))


def _build_validation_columns(known_users: list[int] | None, known_items: list[int] | None):
    from pyspark.sql import functions as F

    slow = ~F.col("_canonical")
    steps = [
        ("_bytes", F.coalesce(F.col("value"), F.lit(bytearray()))),
        ("_text", F.col("_bytes").cast("string")),
        ("_typed", F.from_json("_text", EVENT_SCHEMA_DDL, _JSON_OPTIONS)),
        ("_event_ts", _event_time(F.col("_typed.event_time"))),
        ("_canonical", _canonical_and_valid(known_users, known_items)),
        ("_probe", F.when(slow, F.from_json("_text", _PROBE_DDL, {
            **_JSON_OPTIONS, "columnNameOfCorruptRecord": "_corrupt_record"}))),
        ("_json_type", F.when(slow, F.struct(*[F.schema_of_variant(F.col("_probe")[name]).alias(name)
                                               for name in _TYPE_CHECKED]))),
    ]
    verdict = None  # one flat CASE WHEN (first rule that holds wins): a nested one is as deep as the rules are
    for condition, reason, detail in _validation_rules(known_users, known_items):  # many, and overflows the stack
        outcome = F.struct(F.lit(reason).alias("reason"), detail.alias("detail"))  # when Spark serialises it
        verdict = F.when(condition, outcome) if verdict is None else verdict.when(condition, outcome)
    steps.append(("_verdict", F.when(slow, verdict)))  # a canonical message passed every rule already
    output = [
        F.col("partition"), F.col("offset"), F.col("timestamp"),
        F.col("_verdict.reason").alias("reason"), F.col("_verdict.detail").alias("detail"),
        F.make_valid_utf8("_text").alias("raw"),
        F.col("_typed.event_id").alias("event_id"), F.col("_typed.user_id").alias("user_id"),
        F.col("_typed.item_id").alias("item_id"), F.col("_typed.rating").alias("rating"),
        F.col("_event_ts").alias("event_time"),
        F.coalesce(F.col("_typed.event_type"), F.lit(OPTIONAL_FIELDS["event_type"])).alias("event_type"),
        *[F.col(f"_typed.{name}").alias(name) for name in IMPRESSION_FIELDS],
    ]
    return steps, output


def _prepare(messages, known_users: list[int] | None = None, known_items: list[int] | None = None):
    """The columns the rules read (:func:`_validation_rules`), each computed once per message: ``_bytes``,
    ``_text``, ``_typed``, ``_event_ts``, ``_canonical`` (:func:`_canonical_and_valid`) and, only where
    ``_canonical`` is false, ``_probe`` and ``_json_type`` (null elsewhere: the untyped parse is the dear part)."""
    steps, _ = _validation_columns(known_users, known_items)
    for name, column in steps[:-1]:  # all but the verdict
        messages = messages.withColumn(name, column)
    return messages


def validate(messages, known_users: list[int] | None = None, known_items: list[int] | None = None):
    """Validate Kafka messages with the rules of :func:`features.events.parse_event`.

    Args:
        messages: DataFrame with the Kafka source's ``value`` (binary, may be null), ``partition``, ``offset``,
            ``timestamp``.
        known_users, known_items: a closed vocabulary (ids outside it are ``unknown_id``); None: open.

    Returns:
        The input's Kafka columns plus ``reason`` and ``detail`` (null for a valid event; else one of
        ``features.events.REASONS`` and what was wrong), ``raw`` (the value decoded as UTF-8 with U+FFFD for bad
        bytes) and the typed fields ``event_id``, ``user_id``, ``item_id``, ``rating`` (double), ``event_time``
        (timestamp, UTC), ``event_type`` (``rating`` when absent) and an impression's optional fields
        (``IMPRESSION_FIELDS``, null when absent). A null value (tombstone) is read as empty bytes, hence
        ``not_json``.
    """
    steps, output = _validation_columns(known_users, known_items)
    return _prepare(messages, known_users, known_items).withColumn(*steps[-1]).select(*output)


def _ensure_table(spark, spec: TableSpec, path: str) -> None:
    """Create the empty Delta table at ``path`` with exactly ``spec``'s columns unless it exists."""
    from delta.tables import DeltaTable
    from pyspark.sql.types import StructType

    (DeltaTable.createIfNotExists(spark).location(path).addColumns(StructType.fromDDL(spec.schema))
     .partitionedBy(*spec.partition_by).execute())


def _query_id(checkpoint: Path) -> str:
    """The streaming query's id, which Spark keeps in ``<checkpoint>/metadata`` across restarts; a new checkpoint
    gets a new id, so its batch ids (which start again at 0) never collide with an older query's txnVersions."""
    return json.loads((checkpoint / "metadata").read_text())["id"]


def _materialize(df):
    """``(df computed once and cut from its lineage, release)``: Spark's ``localCheckpoint`` (eager), and a function
    that frees its blocks. A plain ``persist()`` is not enough for a MERGE source: Delta's MERGE re-plans its source
    and evaluates the whole validation again (measured: an insert-only MERGE of 50,000 validated events took 60 to
    100 s with a persisted source, 11 s with a checkpointed one)."""
    out = df.localCheckpoint(eager=True)
    rdd = out._jdf.queryExecution().analyzed().rdd()  # the LogicalRDD's RDD, whose blocks hold the rows
    return out, lambda: rdd.unpersist(False)


def _batch_writer(lake_dir: Path, checkpoint: Path, speed_layer: bool = True,
                  known_users: list[int] | None = None, known_items: list[int] | None = None,
                  label: LabelRule = LabelRule()):
    """The foreachBatch function: validate, MERGE valid events into bronze, append rejects to quarantine, with
    ``speed_layer`` MERGE the feature rows the batch's events change (``pipelines.speed_layer``; ``label``, the data
    source's label rule, decides their positives), and log the batch's counts (``quarantine.ingest_batches``).
    Every step is idempotent, so a batch replayed after a crash at any point between them ends in the same tables.

    The batch is read from Kafka, parsed and validated once (:func:`_materialize`); everything after reads that
    copy. One aggregation gives every count the batch needs, and the deduplication within the batch (a sort by
    event_id) runs only when the batch holds an id twice. The batch's log line gives the seconds of each step
    (validate, counts, merge, inserted, quarantine, speed, batch_log), also as the record's ``steps`` ({step:
    seconds}; with ``batch_id`` and ``messages``) for ``bench.ingest``."""
    from delta.tables import DeltaTable
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    bronze_path, quarantine_path = BRONZE_INTERACTIONS.path(lake_dir), QUARANTINE_INTERACTIONS.path(lake_dir)
    bronze_cols, quarantine_cols = BRONZE_INTERACTIONS.columns, QUARANTINE_INTERACTIONS.columns

    def write(batch, batch_id: int) -> None:
        spark = batch.sparkSession
        query_id = _query_id(checkpoint)
        steps: dict[str, float] = {}  # seconds per step, for the batch's log line
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            steps[name] = now - clock[0]
            clock[0] = now

        start = clock[0]
        is_valid = F.col("reason").isNull()
        checked, release_checked = _materialize(
            validate(batch, known_users, known_items).withColumns({
                "raw": F.when(~is_valid, F.col("raw")),  # only quarantine keeps the message's text
                "rating": F.col("rating").cast("float"), "event_date": F.to_date("event_time"),
                "ingested_at": F.current_timestamp(), "kafka_partition": F.col("partition").cast("int"),
                "kafka_offset": F.col("offset").cast("bigint"), "kafka_timestamp": F.col("timestamp")}))
        try:
            lap("validate")
            counts = checked.agg(
                F.count(F.lit(1)).alias("messages"), F.count(F.when(is_valid, 1)).alias("valid"),
                F.count("reason").alias("quarantined"),
                F.count_distinct(F.when(is_valid, F.col("event_id"))).alias("ids"),
                F.min(F.when(is_valid, F.col("event_date"))).alias("lo"),
                F.max(F.when(is_valid, F.col("event_date"))).alias("hi")).first()
            valid = checked.where(is_valid)
            if counts["ids"] < counts["valid"]:  # an id twice in the batch: keep its first by Kafka coordinates
                first = Window.partitionBy("event_id").orderBy("kafka_partition", "kafka_offset")
                valid = valid.withColumn("_n", F.row_number().over(first)).where("_n = 1")
            valid = valid.select(*bronze_cols)
            n_new, lo, hi = counts["ids"], counts["lo"], counts["hi"]
            lap("counts")
            # Insert-only MERGE restricted to the batch's days (Delta's documented insert-only dedup pattern,
            # partition pruning on event_date): a replayed or resent event has the same event_time, so the same
            # day, and is matched; an id reused with an event_time on another day is not (see the docstring).
            if n_new:
                with _merge_source_as_is(spark):
                    merged = (DeltaTable.forPath(spark, bronze_path).alias("t")
                              .merge(valid.alias("s"), f"t.event_date >= DATE'{lo}' AND t.event_date <= DATE'{hi}' "
                                                       "AND t.event_id = s.event_id")
                              .whenNotMatchedInsertAll().execute().first())
            lap("merge")
            # Inserted = the batch's events whose Kafka coordinates are the ones bronze kept: the same figure on a
            # replay after a crash (then the MERGE inserts nothing, the rows being there already). When this MERGE
            # inserted every one of them, that is the figure; otherwise (duplicates of earlier batches, a replay)
            # it is counted from bronze as read after the MERGE (Delta re-caches every cached plan over the target
            # after a MERGE, so nothing reads bronze as it was before).
            bronze = lambda: spark.read.format("delta").load(bronze_path)  # read only where needed (a snapshot update)
            if not n_new or merged["num_inserted_rows"] == n_new:
                inserted = n_new
            else:
                keys = ["event_date", "event_id", "kafka_partition", "kafka_offset"]
                inserted = valid.join(bronze().where(F.col("event_date").between(lo, hi)).select(*keys), keys).count()
            lap("inserted")
            if counts["quarantined"]:  # (an empty append would still cost a Delta commit)
                (checked.where(~is_valid).select(*quarantine_cols)
                 .write.format("delta").mode("append")
                 .option("txnAppId", f"ingest-quarantine-{query_id}").option("txnVersion", batch_id)
                 .save(quarantine_path))
            lap("quarantine")
            speed = (update_speed_tables(spark, lake_dir, bronze(), valid, f"ingest-speed-{query_id}", batch_id,
                                         label)
                     if speed_layer else {})
            lap("speed")
            _log_batch(INGEST_BATCHES.path(lake_dir), f"ingest-batches-{query_id}", batch_id,
                       {"query_id": query_id, "batch_id": batch_id, "messages": counts["messages"],
                        "valid": counts["valid"], "inserted": inserted, "duplicates": counts["valid"] - inserted,
                        "quarantined": counts["quarantined"]})
            lap("batch_log")
            log.info("batch %d: %d messages, %d inserted, %d duplicates, %d quarantined; speed layer %s; "
                     "%.1f s (%s)", batch_id, counts["messages"], inserted, counts["valid"] - inserted,
                     counts["quarantined"], speed or "off", time.perf_counter() - start,
                     ", ".join(f"{k} {v:.1f}" for k, v in steps.items()),
                     extra={"batch_id": batch_id, "messages": counts["messages"], "steps": steps})
        finally:
            release_checked()

    return write


@contextlib.contextmanager
def _merge_source_as_is(spark):
    """Within the block, Delta's MERGE reads its source as it is (``merge.materializeSource=none``) instead of
    copying it first. Delta copies a source that is not a plain Delta scan so that a re-read cannot differ from the
    first read; the batch's source is already a local checkpoint (:func:`_materialize`), fixed rows, so the copy
    would be a second one of the whole batch."""
    key = "spark.databricks.delta.merge.materializeSource"
    before = spark.conf.get(key, None)
    spark.conf.set(key, "none")
    try:
        yield
    finally:
        if before is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, before)


def _log_batch(path: str, app_id: str, batch_id: int, row: dict) -> None:
    """Append the batch's line to ``quarantine.ingest_batches`` unless this batch's line is there already (the
    table's transaction version for ``app_id``, Delta's idempotent-write marker, is ``batch_id`` or later).

    Written with delta-rs, not Spark: one small Parquet file and a commit, without a Spark job (a Spark append of
    this one row cost about a second of every micro-batch). The only writer of this table is this query."""
    from datetime import datetime, timezone

    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable as RsTable, Transaction, write_deltalake

    table = RsTable(path)
    done = table.transaction_version(app_id)
    if done is not None and done >= batch_id:
        return
    schema = pa.schema([("query_id", pa.string()), ("batch_id", pa.int64()), ("messages", pa.int64()),
                        ("valid", pa.int64()), ("inserted", pa.int64()), ("duplicates", pa.int64()),
                        ("quarantined", pa.int64()), ("written_at", pa.timestamp("us", tz="UTC"))])
    data = pa.Table.from_pylist([{**row, "written_at": datetime.now(timezone.utc)}], schema=schema)
    write_deltalake(table, data, mode="append",
                    commit_properties=CommitProperties(app_transactions=[Transaction(app_id, batch_id)]))


def _add_missing_columns(spark, spec: TableSpec, path: str) -> None:
    """Schema evolution of a table written by an older version of this stage: add the contract's new columns
    (nullable; e.g. bronze's ``event_type``) so the MERGE's insert-all matches."""
    from pyspark.sql.types import StructType

    have = set(spark.read.format("delta").load(path).columns)
    for f in StructType.fromDDL(spec.schema).fields:
        if f.name not in have:
            spark.sql(f"ALTER TABLE delta.`{path}` ADD COLUMNS ({f.name} {f.dataType.simpleString()})")


def table_counts(spark, cfg: PlatformConfig) -> dict:
    """Rows in bronze and quarantine, and quarantined rows per reason."""
    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(cfg.lake_dir))
    quarantine = spark.read.format("delta").load(QUARANTINE_INTERACTIONS.path(cfg.lake_dir))
    reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    batches = spark.read.format("delta").load(INGEST_BATCHES.path(cfg.lake_dir))
    duplicates = batches.agg({"duplicates": "sum"}).first()[0] or 0
    return {"events_bronze": bronze.count(), "events_quarantined": sum(reasons.values()),
            "quarantine_reasons": dict(sorted(reasons.items())), "duplicates": int(duplicates)}


def closed_vocabulary(spark, cfg: PlatformConfig) -> tuple[list[int], list[int]]:
    """The user and item ids of ``silver.user_vocab`` / ``silver.item_vocab`` (written by the features stage).

    Raises:
        TableNotFoundError: a vocabulary has not been written yet.
    """
    from delta.tables import DeltaTable

    out = []
    for spec, col in ((USER_VOCAB, "user_id"), (ITEM_VOCAB, "item_id")):
        path = spec.path(cfg.lake_dir)
        if not DeltaTable.isDeltaTable(spark, path):
            raise TableNotFoundError(spec.name, path, "the features stage (pipelines/features_batch.py), or ingest "
                                     "without --closed-vocab")
        out.append(sorted(r[0] for r in spark.read.format("delta").load(path).select(col).collect()))
    return out[0], out[1]


def run_ingest(spark, cfg: PlatformConfig, trigger: str = "available-now", interval_s: float = 10.0,
               max_offsets_per_trigger: int | None = None, speed_layer: bool | None = None,
               closed_vocab: bool = False) -> dict:
    """Stream the topic ``cfg.kafka.topic`` into bronze and quarantine.

    Args:
        spark: a session with Delta and the Kafka source (``pipelines.spark.get_spark``).
        cfg: broker, topic, lake and checkpoint locations.
        trigger: ``available-now`` drains what the topic holds and returns; ``continuous`` runs a micro-batch
            every ``interval_s`` seconds until the query is stopped (Ctrl-C stops it cleanly).
        interval_s: seconds between micro-batches (continuous only).
        max_offsets_per_trigger: cap on messages per micro-batch (None: all that are available).
        speed_layer: also MERGE the speed-layer feature tables in each micro-batch (``pipelines.speed_layer``);
            None: on for ``continuous``, off for ``available-now``.
        closed_vocab: reject ids outside ``silver.user_vocab``/``silver.item_vocab`` as ``unknown_id``.

    Returns:
        ``events_bronze``, ``events_quarantined`` (rows in the tables), ``quarantine_reasons`` ({reason: rows}),
        ``duplicates`` (valid messages whose event_id was already taken, kept once and not quarantined),
        ``ingest_wall_s`` (seconds the query ran).

    Raises:
        ValueError: an unknown trigger.
        TableNotFoundError: ``closed_vocab`` without vocabularies.
        PlatformError: an unfinished reprocess swap's journal names a table that is in neither place
            (:func:`finish_swap`, run first).
        pyspark.errors.StreamingQueryException: the query failed (broker unreachable, lake not writable); the
            checkpoint lets a re-run resume where it stopped.
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, not {trigger!r}")
    bronze_path = BRONZE_INTERACTIONS.path(cfg.lake_dir)
    quarantine_path = QUARANTINE_INTERACTIONS.path(cfg.lake_dir)
    checkpoint = cfg.checkpoint_dir / STAGE
    if finish_swap(cfg):  # a reprocess's swap cut off by a crash: complete it before touching the tables
        spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    _ensure_table(spark, BRONZE_INTERACTIONS, bronze_path)
    _add_missing_columns(spark, BRONZE_INTERACTIONS, bronze_path)
    _ensure_table(spark, QUARANTINE_INTERACTIONS, quarantine_path)
    _ensure_table(spark, INGEST_BATCHES, INGEST_BATCHES.path(cfg.lake_dir))
    if speed_layer is None:
        speed_layer = trigger == "continuous"
    if speed_layer:
        ensure_speed_tables(spark, cfg.lake_dir)
    known_users, known_items = closed_vocabulary(spark, cfg) if closed_vocab else (None, None)

    reader = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", cfg.kafka.bootstrap)
              .option("subscribe", cfg.kafka.topic)
              .option("startingOffsets", "earliest"))
    if max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(max_offsets_per_trigger))
    writer = (reader.load().writeStream.queryName(f"ingest-{cfg.kafka.topic}")
              .foreachBatch(_batch_writer(cfg.lake_dir, checkpoint, speed_layer, known_users, known_items,
                                          load_source(cfg.source, cfg.raw_dir).label))
              .option("checkpointLocation", str(checkpoint)))
    writer = (writer.trigger(availableNow=True) if trigger == "available-now"
              else writer.trigger(processingTime=f"{interval_s} seconds"))
    start = time.perf_counter()
    query = writer.start()
    try:
        query.awaitTermination()
    except KeyboardInterrupt:
        log.info("stopping the ingest query")
        query.stop()
    wall_s = time.perf_counter() - start
    return {**table_counts(spark, cfg), "ingest_wall_s": round(wall_s, 3)}


#: Everything the ingest stage writes; a reprocess rebuilds all of it, with the checkpoint it was written under.
INGEST_OUTPUTS = (BRONZE_INTERACTIONS, QUARANTINE_INTERACTIONS, INGEST_BATCHES, *SPEED_TABLES)


def reprocess(spark, cfg: PlatformConfig, max_offsets_per_trigger: int | None = None) -> dict:
    """Kappa reprocessing (Kreps 2014): replay the topic from its earliest offset through this code into a shadow
    lake (``<data_dir>/shadow/<UTC stamp>``: its own bronze, quarantine, batch log, speed tables and checkpoint),
    then swap it in (:func:`swap_in`) and keep the replaced copy under ``<data_dir>/retired/<UTC stamp>``.

    Use it when the validation rules or the feature definitions change: the result is the lake a fresh ingest of
    the whole topic gives. Stop the live continuous query first (the swap renames its tables and checkpoint);
    restarted, it resumes from the shadow's checkpoint. The topic's retention must cover the whole history
    (``docs/kafka.md``). The replay runs with an open vocabulary (the shadow lake has none).

    Returns:
        The shadow run's ingest figures (:func:`run_ingest`) plus ``shadow_dir`` (where it was built) and
        ``retired`` ({table or ``checkpoint``: where the previous copy went; '' when there was none}).

    Raises:
        pyspark.errors.StreamingQueryException: the replay failed; the live lake is untouched.
        PlatformError: an unfinished swap's journal names a table that is in neither place (:func:`finish_swap`).
    """
    if finish_swap(cfg):  # an earlier reprocess's swap cut off by a crash
        spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() % 10**9:09d}Z"
    shadow = cfg.model_copy(update={"data_dir": cfg.data_dir / "shadow" / stamp})
    result = run_ingest(spark, shadow, "available-now", max_offsets_per_trigger=max_offsets_per_trigger,
                        speed_layer=True)
    retired = swap_in(shadow, cfg, cfg.data_dir / "retired" / stamp)
    # This JVM caches each path's Delta log and snapshot; the paths now hold other tables.
    spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    return {**result, "shadow_dir": str(shadow.data_dir), "retired": retired}


#: The swap journal of a reprocess, under the live ``data_dir``: present only while a swap is under way (or was cut
#: off by a crash; :func:`finish_swap` then completes it).
SWAP_JOURNAL = "ingest-swap.json"


def swap_in(shadow: PlatformConfig, live: PlatformConfig, retired_dir: Path) -> dict[str, str]:
    """Move the live copy of every ingest output (``INGEST_OUTPUTS``) and the ingest checkpoint under
    ``retired_dir``, then move the shadow's into their place: one directory rename each (Delta tables are
    path-relative, so a moved table stays valid).

    Crash-safe by roll-forward: every planned rename is written to a journal (``<live data_dir>/ingest-swap.json``,
    made visible by an atomic ``os.replace``) before the first rename and deleted after the last. A crash in
    between leaves the journal; the next :func:`run_ingest` or :func:`reprocess` on the live lake (or
    :func:`finish_swap` directly) completes the remaining renames, so the end state is always the whole new lake
    in place and the whole old one under ``retired_dir``, never a mix. Not isolated: the renames are one per
    table, so a reader during the swap can see some tables old and some new, and the live ingest query must be
    stopped (it would write to a moved table). Nothing is ever deleted.

    Returns:
        {table name or ``checkpoint``: where its previous copy went ('' when there was none)}.

    Raises:
        PlatformError: a journal of an earlier, unfinished swap is present (run :func:`finish_swap` first).
    """
    journal = live.data_dir / SWAP_JOURNAL
    if journal.exists():
        raise PlatformError(f"{journal}: an earlier swap was cut off; finish it first (pipelines.ingest.finish_swap, "
                            "done by the next run_ingest)")
    pairs = [(spec.name, Path(spec.path(shadow.lake_dir)), Path(spec.path(live.lake_dir)),
              Path(spec.path(retired_dir / "lake"))) for spec in INGEST_OUTPUTS]
    pairs.append(("checkpoint", shadow.checkpoint_dir / STAGE, live.checkpoint_dir / STAGE,
                  retired_dir / "checkpoints" / STAGE))
    moved = {name: str(old) if current.exists() else "" for name, _, current, old in pairs}
    renames = ([(str(current), str(old)) for _, _, current, old in pairs if current.exists()]
               + [(str(new), str(current)) for _, new, current, _ in pairs])
    live.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = journal.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shadow": str(shadow.data_dir), "retired": str(retired_dir), "renames": renames},
                              indent=1))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, journal)  # the journal appears whole or not at all
    _roll_forward(journal)
    log.info("reprocess: %d tables and the checkpoint swapped in from %s; old copies in %s", len(INGEST_OUTPUTS),
             shadow.data_dir, retired_dir)
    return moved


def _roll_forward(journal: Path) -> int:
    """Do the journal's renames that are not done yet, in order, then delete the journal; the number done now.

    A rename's destination is a path nothing else creates while the query is stopped (a fresh ``retired_dir``, or
    a live path that the earlier renames vacated), so a present destination means the rename is done (its source
    may exist again: the live path that a later rename refilled). Renames are done in the planned order, so every
    earlier one is done when a later one is checked.

    Raises:
        PlatformError: neither a rename's source nor its destination exists (moved by hand?).
    """
    plan = json.loads(journal.read_text())
    done = 0
    for src, dst in map(lambda p: (Path(p[0]), Path(p[1])), plan["renames"]):
        if dst.exists():
            continue
        if not src.exists():
            raise PlatformError(f"swap journal {journal}: neither {src} nor {dst} exists; put the table back "
                                "where one of them says and run again")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        done += 1
    journal.unlink()
    return done


def finish_swap(live: PlatformConfig) -> int:
    """Complete a swap (:func:`swap_in`) that a crash cut off, from its journal in ``live.data_dir``; the number
    of renames it still had to do (0, and nothing happens, when there is no journal).

    Raises:
        PlatformError: the journal names a table that is in neither place.
    """
    journal = live.data_dir / SWAP_JOURNAL
    if not journal.exists():
        return 0
    done = _roll_forward(journal)
    log.warning("reprocess: a swap cut off by a crash was completed from %s (%d renames left to do)", journal, done)
    return done


def main(argv: list[str] | None = None) -> None:
    """Command line: arguments first (``--help`` returns before Spark or the broker is touched), then the
    configuration (an error in it: the message on stderr, exit status 2), then :func:`run_ingest` or
    :func:`reprocess`."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, description=describe(__doc__),
        epilog=settings_help({
            "kafka.bootstrap": "broker host:port the stream reads",
            "kafka.topic": "topic the stream reads",
            "data_dir": "lake (<data_dir>/lake) and the query's checkpoint (<data_dir>/checkpoints/ingest)",
            "spark.master": "Spark master when not run by spark-submit (which sets its own)",
            "spark.shuffle_partitions": "shuffle partitions (count)",
            "artifacts_dir": "stage result under <artifacts_dir>/<run_name>/stages/ingest.json",
            "run_name": "name of the run"}))
    parser.add_argument("--trigger", choices=TRIGGERS, default="available-now",
                        help="available-now: drain what the topic holds, write the stage result and exit; "
                             "continuous: a micro-batch every --interval-s seconds until stopped")
    parser.add_argument("--interval-s", type=float, default=10.0,
                        help="seconds between micro-batches (continuous only)")
    parser.add_argument("--max-offsets-per-trigger", type=int, default=None,
                        help="cap on messages per micro-batch (count; default: no cap)")
    parser.add_argument("--speed-layer", action=argparse.BooleanOptionalAction, default=None,
                        help="maintain the speed-layer feature tables (default: on for continuous only)")
    parser.add_argument("--closed-vocab", action="store_true", help="quarantine ids outside the vocabularies")
    parser.add_argument("--reprocess", action="store_true",
                        help="replay the topic from the earliest offset into a shadow lake and swap it in "
                             "(stop the continuous query first)")
    args = parser.parse_args(argv)
    from pipelines.spark import get_spark

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config_or_exit(parser.prog)
    spark = get_spark(cfg, app_name="recsys-ingest")
    if args.reprocess:
        if args.closed_vocab:
            parser.error("--reprocess replays with an open vocabulary; leave out --closed-vocab")
        result = reprocess(spark, cfg, args.max_offsets_per_trigger)
        path = write_stage_result(cfg, "ingest_reprocess", result)
        print(f"reprocess: bronze, quarantine and speed tables rebuilt from the topic ({result['events_bronze']:,} "
              f"events, {result['events_quarantined']:,} quarantined) and swapped in; old copies "
              f"{set(result['retired'].values()) - {''} or 'none'}; result: {path}")
        spark.stop()
        return
    result = run_ingest(spark, cfg, args.trigger, args.interval_s, args.max_offsets_per_trigger,
                        args.speed_layer, args.closed_vocab)
    if args.trigger == "available-now":
        path = write_stage_result(cfg, STAGE, result)
        print(f"ingest: {result['events_bronze']:,} events in bronze, {result['events_quarantined']:,} "
              f"quarantined {result['quarantine_reasons']} in {result['ingest_wall_s']:.1f} s; result: {path}")
    spark.stop()


if __name__ == "__main__":
    main()
