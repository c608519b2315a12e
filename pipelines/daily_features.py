"""Lambda batch path: recompute the declared feature views (``features.views``) for one day of event time from
``bronze.interactions`` and replace exactly that day's partition (Delta ``replaceWhere``), so a re-run leaves the
same content.

The Spark code that defines each feature (:func:`item_window_stats`, :func:`user_recent_items`) is shared with the
speed layer (``pipelines.speed_layer``), which applies it to the keys a micro-batch touched; ``tests/test_parity.py``
checks both paths give the same values on the same events.

Run one day, or backfill a range (spark-submit-able)::

    pipelines/daily_features.py --date 1998-03-01
    pipelines/daily_features.py --date 1997-09-20 --until 1998-04-22

A late event for an earlier day changes that day's rows and the later rows whose windows include it; re-run the
job for each of those days (the speed layer updates them as the event arrives).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script (spark-submit): import from the repo
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import logging
from datetime import date, timedelta

from features.config import HelpFormatter, PlatformConfig, describe, load_config_or_exit, settings_help
from features.errors import TableNotFoundError
from features.results import write_stage_result
from features.source import LabelRule, load_source
from features.tables import BRONZE_INTERACTIONS, ITEM_WINDOW_STATS, USER_RECENT_ITEMS, TableSpec
from features.views import RECENT_ITEMS, WINDOWS_DAYS
from pipelines.spark import delta_version

log = logging.getLogger("pipelines.daily_features")

STAGE = "daily_features"


def _known_from(day_col):
    """The time a day's row is known: the next day, 00:00 UTC."""
    from pyspark.sql import functions as F

    return F.date_add(day_col, 1).cast("timestamp")


def item_window_stats(events, days, label: LabelRule = LabelRule()):
    """``gold.item_window_stats`` rows for the target days.

    Args:
        events: bronze rows (at least ``item_id``, ``event_date``, ``event_type``, ``rating``) covering the 7 days
            up to each target day.
        days: DataFrame with one column ``event_date`` (date): the days D to compute.
        label: the source's rule for a positive (``features.source.LabelRule``; the configured source's
            ``label``); the default is the schema's default rule.

    Returns:
        One row per (item, D) with an event in [D - 6, D], in ``ITEM_WINDOW_STATS``'s columns.
    """
    from pyspark.sql import functions as F

    longest = max(WINDOWS_DAYS)
    positive = label.spark_column().cast("bigint")
    exploded = (events.select("item_id", F.col("event_date").alias("_day"), positive.alias("_pos"))
                .withColumn("_age", F.explode(F.sequence(F.lit(0), F.lit(longest - 1))))  # days since the event
                .withColumn("event_date", F.date_add("_day", F.col("_age")))
                .join(F.broadcast(days.select("event_date").distinct()), "event_date"))
    aggs = []
    for w in WINDOWS_DAYS:
        inside = F.col("_age") < w
        aggs += [F.sum(inside.cast("bigint")).alias(f"events_{w}d"),
                 F.sum(F.when(inside, F.col("_pos")).otherwise(0)).alias(f"positives_{w}d")]
    out = exploded.groupBy("item_id", "event_date").agg(*aggs)
    for w in WINDOWS_DAYS:
        out = out.withColumn(f"ctr_{w}d", F.when(F.col(f"events_{w}d") > 0,
                                                 F.col(f"positives_{w}d") / F.col(f"events_{w}d")))
    return conform(out.withColumn("feature_ts", _known_from(F.col("event_date"))), ITEM_WINDOW_STATS)


def user_recent_items(events, targets):
    """``gold.user_recent_items`` rows for the target (user, day) pairs.

    Args:
        events: bronze rows (``user_id``, ``item_id``, ``event_time``, ``event_id``, ``event_date``) holding every
            event of the target users up to each target day.
        targets: DataFrame ``(user_id, event_date)``: the rows to compute.

    Returns:
        One row per target: the last ``RECENT_ITEMS`` item ids up to the end of the day, oldest first.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t = targets.select("user_id", F.col("event_date").alias("_target")).distinct()
    e = events.select("user_id", "item_id", "event_time", "event_id", F.col("event_date").alias("_day"))
    last = Window.partitionBy("user_id", "_target").orderBy(F.desc("event_time"), F.desc("event_id"))
    recent = (e.join(t, "user_id").where(F.col("_day") <= F.col("_target"))
              .withColumn("_rank", F.row_number().over(last)).where(F.col("_rank") <= RECENT_ITEMS)
              .groupBy("user_id", "_target")
              .agg(F.array_sort(F.collect_list(F.struct("event_time", "event_id", "item_id"))).alias("_seq")))
    out = (recent.select("user_id", F.col("_target").alias("event_date"),
                         F.col("_seq.item_id").alias("recent_items"))
           .withColumn("recent_len", F.size("recent_items"))
           .withColumn("feature_ts", _known_from(F.col("event_date"))))
    return conform(out, USER_RECENT_ITEMS)


def conform(df, spec: TableSpec):
    """``df`` with exactly ``spec``'s columns, cast to its types, in order."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in StructType.fromDDL(spec.schema).fields])


def ensure_table(spark, spec: TableSpec, path: str) -> None:
    """Create the empty Delta table at ``path`` with exactly ``spec``'s columns unless it exists."""
    from delta.tables import DeltaTable
    from pyspark.sql.types import StructType

    (DeltaTable.createIfNotExists(spark).location(path).addColumns(StructType.fromDDL(spec.schema))
     .partitionedBy(*spec.partition_by).execute())


def feature_rows(bronze, day: date, last: date, label: LabelRule = LabelRule()):
    """Both views' rows for the days ``day``..``last`` (inclusive), computed from ``bronze``: what the daily job
    writes, and the batch recomputation the speed layer is checked against.

    Returns:
        ``(items, users)``: DataFrames with ``ITEM_WINDOW_STATS``'s and ``USER_RECENT_ITEMS``'s columns; an item
        row for every day and item with an event in that day's 7-day window, a user row for every day and user
        with an event that day.
    """
    from pyspark.sql import functions as F

    spark = bronze.sparkSession
    lo, hi = F.lit(day.isoformat()).cast("date"), F.lit(last.isoformat()).cast("date")
    days = spark.createDataFrame([(d,) for d in days_between(day, last)], "event_date date")
    window = bronze.where(F.col("event_date").between(F.date_sub(lo, max(WINDOWS_DAYS) - 1), hi))
    targets = bronze.where(F.col("event_date").between(lo, hi)).select("user_id", "event_date").distinct()
    return item_window_stats(window, days, label), user_recent_items(bronze.where(F.col("event_date") <= hi), targets)


def run_daily(spark, cfg: PlatformConfig, day: date, last: date | None = None) -> dict:
    """Recompute both feature views for ``day`` (or every day from ``day`` to ``last``, a backfill) from bronze and
    replace exactly those days' partitions of each table.

    Returns:
        ``date`` (and ``last``), ``item_rows``, ``user_rows`` (rows written) and ``versions`` ({table: Delta version
        after the write}).

    Raises:
        TableNotFoundError: bronze has not been written (run the ingest stage).
        SourceError: the configured source file (``cfg.source``, which gives the label rule) is missing or wrong.
        ValueError: ``last`` before ``day``.
    """
    from delta.tables import DeltaTable

    last = last or day
    if last < day:
        raise ValueError(f"last day {last} is before the first {day}")
    lake = cfg.lake_dir
    bronze_path = BRONZE_INTERACTIONS.path(lake)
    if not DeltaTable.isDeltaTable(spark, bronze_path):
        raise TableNotFoundError(BRONZE_INTERACTIONS.name, bronze_path, "the ingest stage (pipelines/ingest.py)")
    label = load_source(cfg.source, cfg.raw_dir).label  # positives as the CTR label counts them
    items, users = feature_rows(spark.read.format("delta").load(bronze_path), day, last, label)
    result = {"date": day.isoformat(), "last": last.isoformat(), "versions": {}}
    # (not BETWEEN: Delta 4.0's partition pruning of replaceWhere fails on it with an unresolved-attribute error)
    where = f"event_date >= '{day.isoformat()}' AND event_date <= '{last.isoformat()}'"
    for spec, rows, key in ((ITEM_WINDOW_STATS, items, "item_rows"), (USER_RECENT_ITEMS, users, "user_rows")):
        path = spec.path(lake)
        ensure_table(spark, spec, path)
        rows.write.format("delta").mode("overwrite").option("replaceWhere", where).save(path)
        version = delta_version(spark, path)[0]
        written = spark.read.format("delta").option("versionAsOf", version).load(path).where(where).count()
        result[key] = written
        result["versions"][spec.name] = version
    return result


def main(argv: list[str] | None = None) -> None:
    """Command line: arguments first (``--help`` returns before Spark starts), then the configuration (an error in
    it: the message on stderr, exit status 2), then :func:`run_daily`."""
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, description=describe(__doc__),
        epilog=settings_help({
            "data_dir": "lake (<data_dir>/lake): bronze read, the feature views' day partitions replaced",
            "spark.master": "Spark master when not run by spark-submit (which sets its own)",
            "spark.shuffle_partitions": "shuffle partitions (count)",
            "artifacts_dir": "stage result under <artifacts_dir>/<run_name>/stages/daily_features.json",
            "run_name": "name of the run"}))
    parser.add_argument("--date", required=True, type=date.fromisoformat, default=argparse.SUPPRESS,
                        help="the day to recompute: YYYY-MM-DD, UTC event date (required)")
    parser.add_argument("--until", type=date.fromisoformat, default=None,
                        help="backfill every day from --date to this one (YYYY-MM-DD, inclusive; default: --date "
                             "only)")
    args = parser.parse_args(argv)
    from pipelines.spark import get_spark

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config_or_exit(parser.prog)
    spark = get_spark(cfg, app_name="recsys-daily-features")
    result = run_daily(spark, cfg, args.date, args.until)
    path = write_stage_result(cfg, STAGE, result)
    print(f"daily_features {result['date']}: {result['item_rows']} item rows, {result['user_rows']} user rows; "
          f"versions {result['versions']}; result: {path}")
    spark.stop()


def days_between(first: date, last: date) -> list[date]:
    """Every day from ``first`` to ``last`` inclusive.

    >>> days_between(date(1998, 1, 30), date(1998, 2, 1))
    [datetime.date(1998, 1, 30), datetime.date(1998, 1, 31), datetime.date(1998, 2, 1)]
    """
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


if __name__ == "__main__":
    main()
