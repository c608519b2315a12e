"""Kappa speed layer: inside the ingest query's micro-batch, after the batch's events are MERGEd into bronze,
bring the declared feature views (``features.views``) up to date for exactly the keys those events touch, with
Delta MERGE.

Each feature is computed by the same Spark code as the daily batch (``pipelines.daily_features``), applied to:

- ``gold.item_window_stats``: every day from the batch's earliest event day to the latest day in bronze (an event
  on day d enters the windows of days d..d+6, and a later latest day opens new windows); rows of those days that
  no longer have an event in their window are deleted (``whenNotMatchedBySource``).
- ``gold.user_recent_items``: for each user with an event in the batch, every day with an event from that user's
  earliest day in the batch on.

Exactly once under crashes and replays. The keys come from the micro-batch's own valid, deduplicated events (not
from "the events bronze did not have yet"), and the values are recomputed from bronze, which already holds them.
So the update is a deterministic function of (bronze, batch): a micro-batch replayed after a crash between the
bronze MERGE and the speed-layer MERGE finds its events in bronze and still writes their features (nothing is
lost), and one replayed after the speed-layer MERGE rewrites the same values (nothing is counted twice; a count
is recomputed, never incremented). The MERGEs also carry Delta's ``txnAppId``/``txnVersion`` (query id, batch id)
through the session settings, so Delta skips a replay whose MERGE already committed.

Reprocessing (kappa, Kreps 2014): ``pipelines/ingest.py --reprocess`` replays the topic from its earliest offset
into a shadow lake with this same code and swaps the result in (``pipelines.ingest.reprocess``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from features.source import LabelRule
from features.tables import ITEM_WINDOW_STATS, USER_RECENT_ITEMS
from features.views import WINDOWS_DAYS
from pipelines.daily_features import days_between, ensure_table, item_window_stats, user_recent_items

log = logging.getLogger("pipelines.speed_layer")

SPEED_TABLES = (ITEM_WINDOW_STATS, USER_RECENT_ITEMS)


@contextmanager
def delta_txn(spark, app_id: str, version: int):
    """Delta's idempotent-write settings for the DML inside the block: a table that already recorded ``version``
    (or a later one) for ``app_id`` skips the write (Delta's SetTransaction action; SQL conf since Delta 2.3)."""
    spark.conf.set("spark.databricks.delta.write.txnAppId", app_id)
    spark.conf.set("spark.databricks.delta.write.txnVersion", str(version))
    try:
        yield
    finally:
        spark.conf.unset("spark.databricks.delta.write.txnAppId")
        spark.conf.unset("spark.databricks.delta.write.txnVersion")


def ensure_speed_tables(spark, lake_dir: Path) -> None:
    """Create the empty speed-layer tables of ``lake_dir`` unless they exist."""
    for spec in SPEED_TABLES:
        ensure_table(spark, spec, spec.path(lake_dir))


def update_speed_tables(spark, lake_dir: Path, bronze, batch_events, app_id: str, batch_id: int,
                        label: LabelRule = LabelRule()) -> dict:
    """MERGE the feature rows that ``batch_events`` touch, recomputed from ``bronze``, into the speed tables.

    Args:
        lake_dir: the lake whose ``gold.item_window_stats`` / ``gold.user_recent_items`` are updated (created
            by :func:`ensure_speed_tables`).
        bronze: the bronze table read after this batch's MERGE (so it holds every event of the batch).
        batch_events: this micro-batch's valid events, deduplicated on event_id (bronze columns), whether or not
            bronze held them before this batch: a replayed batch must touch the same keys as the original.
        app_id, batch_id: the idempotency key of this micro-batch (Delta txnAppId / txnVersion).
        label: the source's rule for a positive (the configured source's ``label``), as the daily job uses it;
            the default is the schema's default rule.

    Returns:
        ``{"item_days": n, "users": n}``: days of item rows and users recomputed (0, 0 for a batch with no valid
        event).
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    first, n_users = batch_events.agg(F.min("event_date"), F.count_distinct("user_id")).first()
    if first is None:
        return {"item_days": 0, "users": 0}
    last = bronze.agg(F.max("event_date")).first()[0]
    days = days_between(first, last)
    lo, hi = days[0].isoformat(), days[-1].isoformat()
    window = bronze.where(F.col("event_date").between(F.date_sub(F.lit(lo).cast("date"), max(WINDOWS_DAYS) - 1),
                                                      F.lit(hi).cast("date")))
    items = item_window_stats(window, spark.createDataFrame([(d,) for d in days], "event_date date"), label)

    users_from = batch_events.groupBy("user_id").agg(F.min("event_date").alias("_from"))
    user_events = bronze.join(F.broadcast(users_from), "user_id")
    targets = user_events.where(F.col("event_date") >= F.col("_from")).select("user_id", "event_date").distinct()
    users = user_recent_items(user_events.drop("_from"), targets)

    touched = f"t.event_date >= DATE'{lo}' AND t.event_date <= DATE'{hi}'"  # prunes the target's partitions
    with delta_txn(spark, app_id, batch_id):
        (DeltaTable.forPath(spark, ITEM_WINDOW_STATS.path(lake_dir)).alias("t")
         .merge(items.alias("s"), f"{touched} AND t.item_id = s.item_id AND t.event_date = s.event_date")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll()
         .whenNotMatchedBySourceDelete(touched)
         .execute())
        (DeltaTable.forPath(spark, USER_RECENT_ITEMS.path(lake_dir)).alias("t")
         .merge(users.alias("s"), f"{touched} AND t.user_id = s.user_id AND t.event_date = s.event_date")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll()
         .execute())
    return {"item_days": len(days), "users": n_users}
