"""Kappa speed layer: inside the ingest query's micro-batch, after the new events are MERGEd into bronze, bring
the declared feature views (``features.views``) up to date for exactly the keys those events touch, with Delta
MERGE.

Each feature is computed by the same Spark code as the daily batch (``pipelines.daily_features``), applied to:

- ``gold.item_window_stats``: every day from the earliest new event's day to the latest day in bronze (a new event
  on day d enters the windows of days d..d+6, and a later latest day opens new windows); rows of those days that
  no longer have an event in their window are deleted (``whenNotMatchedBySource``).
- ``gold.user_recent_items``: for each user with a new event, every day with an event from that user's earliest
  new day on.

The MERGEs are deterministic functions of bronze, so a replayed micro-batch rewrites the same values; they also
carry Delta's ``txnAppId``/``txnVersion`` (query id, batch id) through the session settings, so a replay after a
crash is skipped by Delta. ``reprocess`` (``pipelines/ingest.py --reprocess``) rebuilds the tables from the topic's
earliest offset in a shadow lake and swaps them in.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from features.config import PlatformConfig
from features.tables import ITEM_WINDOW_STATS, USER_RECENT_ITEMS
from features.views import WINDOWS_DAYS
from pipelines.daily_features import days_between, ensure_table, item_window_stats, user_recent_items

log = logging.getLogger("pipelines.speed_layer")

SPEED_TABLES = (ITEM_WINDOW_STATS, USER_RECENT_ITEMS)


@contextmanager
def delta_txn(spark, app_id: str, version: int):
    """Delta's idempotent-write settings for the DML inside the block (a (app_id, version) already committed to
    a table is skipped there)."""
    spark.conf.set("spark.databricks.delta.write.txnAppId", app_id)
    spark.conf.set("spark.databricks.delta.write.txnVersion", str(version))
    try:
        yield
    finally:
        spark.conf.unset("spark.databricks.delta.write.txnAppId")
        spark.conf.unset("spark.databricks.delta.write.txnVersion")


def update_speed_tables(spark, lake_dir: Path, bronze, new_events, app_id: str, batch_id: int) -> dict:
    """MERGE the feature rows that ``new_events`` change into the speed tables.

    Args:
        bronze: the bronze table after this batch's MERGE.
        new_events: this batch's valid, deduplicated events (bronze columns).
        app_id, batch_id: the idempotency key of this micro-batch.

    Returns:
        ``{"item_days": n, "users": n}``: the extent of the update (0 when the batch had no valid event).
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    for spec in SPEED_TABLES:
        ensure_table(spark, spec, spec.path(lake_dir))
    first_new = new_events.agg(F.min("event_date")).first()[0]
    if first_new is None:
        return {"item_days": 0, "users": 0}
    last = bronze.agg(F.max("event_date")).first()[0]
    days = days_between(first_new, last)
    lo, hi = days[0].isoformat(), days[-1].isoformat()
    window = bronze.where(F.col("event_date").between(F.date_sub(F.lit(lo).cast("date"), max(WINDOWS_DAYS) - 1),
                                                      F.lit(hi).cast("date")))
    items = item_window_stats(window, spark.createDataFrame([(d,) for d in days], "event_date date"))

    users_from = new_events.groupBy("user_id").agg(F.min("event_date").alias("_from"))
    user_events = bronze.join(users_from, "user_id")
    targets = (user_events.where(F.col("event_date") >= F.col("_from")).select("user_id", "event_date").distinct())
    users = user_recent_items(user_events.drop("_from"), targets)

    with delta_txn(spark, app_id, batch_id):
        (DeltaTable.forPath(spark, ITEM_WINDOW_STATS.path(lake_dir)).alias("t")
         .merge(items.alias("s"), "t.item_id = s.item_id AND t.event_date = s.event_date")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll()
         .whenNotMatchedBySourceDelete(f"t.event_date >= DATE'{lo}' AND t.event_date <= DATE'{hi}'")
         .execute())
        (DeltaTable.forPath(spark, USER_RECENT_ITEMS.path(lake_dir)).alias("t")
         .merge(users.alias("s"), "t.user_id = s.user_id AND t.event_date = s.event_date")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll()
         .execute())
    return {"item_days": len(days), "users": users_from.count()}


def swap_in(shadow_lake: Path, lake_dir: Path) -> dict[str, str]:
    """Replace each speed table of ``lake_dir`` by its rebuilt copy in ``shadow_lake``; the old one is kept under
    ``<lake>/retired/<unix seconds>/``. A directory rename per table: stop the live ingest query first.

    Returns:
        {table: where its previous version went ('' when there was none)}.
    """
    retired = Path(lake_dir) / "retired" / str(int(time.time()))
    moved = {}
    for spec in SPEED_TABLES:
        live, shadow = Path(spec.path(lake_dir)), Path(spec.path(shadow_lake))
        moved[spec.name] = ""
        if live.exists():
            target = retired / spec.name
            target.parent.mkdir(parents=True, exist_ok=True)
            live.rename(target)
            moved[spec.name] = str(target)
        live.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(shadow), str(live))
    return moved
