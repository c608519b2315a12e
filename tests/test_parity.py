"""Lambda and kappa agree: the same events, fed through the streaming speed layer (Kafka -> ``pipelines.ingest``
micro-batches -> ``pipelines.speed_layer`` MERGEs) and through the daily batch job (bronze -> ``pipelines.
daily_features``, replaceWhere per day), give the same feature rows, value for value.

The stream arrives in several micro-batches, mostly in time order but with late events (some a week late, so they
land in windows the speed layer had already written), exact duplicates (an at-least-once producer), events at
midnight and same-second ties. The daily path reads a bronze written straight from the event list, not the
stream's bronze, so neither path can lean on the other. (test_pit_join.py checks the daily path itself against a
naive pure-Python oracle, and that a daily re-run leaves identical content.)
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from features.events import Event, format_time
from features.tables import BRONZE_INTERACTIONS, ITEM_WINDOW_STATS, USER_RECENT_ITEMS
from features.views import RECENT_ITEMS

pytestmark = pytest.mark.integration

START = datetime(1998, 3, 1, tzinfo=timezone.utc)
DAYS = 12


def stream_events(seed: int, n: int, first_id: int = 0) -> list[dict]:
    """Events over DAYS days in arrival order: mostly by time, about one in six arriving late (up to 8 days).
    Times fall on midnight, one second around it and same-second ties; every event type; few users and items,
    so windows and histories overlap."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        sec = rng.choice([0, 0, 1, 86399, 43200, rng.randrange(86400)])
        t = START + timedelta(days=rng.randrange(DAYS), seconds=sec)
        events.append({"event_id": f"p{first_id + i:05d}", "user_id": rng.randrange(1, 7),
                       "item_id": rng.randrange(1, 9), "rating": rng.choice([1.0, 3.0, 4.0, 5.0]),
                       "event_time": t, "event_type": rng.choice(["rating", "rating", "view", "click"])})
    arrival = {e["event_id"]: e["event_time"] + (timedelta(days=rng.uniform(1, 8)) if rng.random() < 1 / 6
                                                 else timedelta(0)) for e in events}
    return sorted(events, key=lambda e: (arrival[e["event_id"]], e["event_id"]))


def kafka_message(e: dict) -> tuple[bytes, bytes]:
    ts = int(e["event_time"].timestamp())
    event = Event(e["event_id"], e["user_id"], e["item_id"], e["rating"], format_time(ts), e["event_type"])
    return str(e["user_id"]).encode(), event.to_json()


def write_bronze(spark, lake, events: list[dict]) -> None:
    """bronze.interactions straight from the event list (first copy of each event_id), no Kafka coordinates."""
    from pyspark.sql.types import StructType

    now, seen, rows = datetime.now(timezone.utc), set(), []
    for e in events:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            rows.append((e["event_id"], e["user_id"], e["item_id"], e["rating"], e["event_time"],
                         e["event_time"].date(), None, None, now, e["event_type"])
                        + (None,) * (len(BRONZE_INTERACTIONS.columns) - 10))  # no impression fields
    (spark.createDataFrame(rows, StructType.fromDDL(BRONZE_INTERACTIONS.schema)).write.format("delta")
     .mode("overwrite").partitionBy(*BRONZE_INTERACTIONS.partition_by).save(BRONZE_INTERACTIONS.path(lake)))


def table_rows(spark, spec, lake) -> list[tuple]:
    """Every row of a table, in its contract's column order, sorted."""
    return sorted(tuple(r) for r in spark.read.format("delta").load(spec.path(lake)).select(*spec.columns).collect())


def event_content(spark, lake) -> list[tuple]:
    return sorted(tuple(r) for r in spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake))
                  .select("event_id", "user_id", "item_id", "rating", "event_time", "event_type").collect())


def test_speed_layer_and_daily_job_give_the_same_feature_rows(spark, kafka, cfg, tmp_path):
    from pyspark.sql import functions as F

    from pipelines.daily_features import run_daily
    from pipelines.ingest import run_ingest
    from pipelines.produce import ensure_topic, publish

    events = stream_events(seed=3, n=160)
    sent = events + events[::9]  # every 9th event sent twice, the copies at the end (a later micro-batch)
    stream_cfg = cfg.model_copy(update={
        "data_dir": tmp_path / "stream",
        "kafka": cfg.kafka.model_copy(update={"topic": f"test-parity-{uuid.uuid4().hex[:8]}"}),
    })
    batch_cfg = cfg.model_copy(update={"data_dir": tmp_path / "batch"})

    # Kappa: the topic through the streaming query, 3-4 micro-batches, the speed layer MERGEd in each.
    ensure_topic(kafka, stream_cfg.kafka.topic, stream_cfg.kafka.partitions)
    publish(kafka, stream_cfg.kafka.topic, [kafka_message(e) for e in sent])
    result = run_ingest(spark, stream_cfg, "available-now", max_offsets_per_trigger=60, speed_layer=True)
    assert result["events_bronze"] == len(events) and result["events_quarantined"] == 0
    assert result["duplicates"] == len(events[::9])

    # Lambda: the same events as bronze, the daily job over every day from the first to the last.
    write_bronze(spark, batch_cfg.lake_dir, events)
    first, last = min(e["event_time"] for e in events).date(), max(e["event_time"] for e in events).date()
    run_daily(spark, batch_cfg, first, last)

    assert event_content(spark, stream_cfg.lake_dir) == event_content(spark, batch_cfg.lake_dir)
    for spec in (ITEM_WINDOW_STATS, USER_RECENT_ITEMS):
        speed, daily = table_rows(spark, spec, stream_cfg.lake_dir), table_rows(spark, spec, batch_cfg.lake_dir)
        assert speed == daily, spec.name
    # The data is not degenerate: several micro-batches, events of a day older than one a previous micro-batch
    # already wrote (a micro-batch's rows share ingested_at), CTRs strictly between 0 and 1, full histories.
    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(stream_cfg.lake_dir))
    arrived = bronze.groupBy("ingested_at").agg(F.max("event_date")).collect()
    assert len(arrived) >= 3
    assert bronze.where(" OR ".join(f"(ingested_at > '{at}' AND event_date < '{day}')"
                                    for at, day in arrived)).count() >= 5
    items = table_rows(spark, ITEM_WINDOW_STATS, batch_cfg.lake_dir)
    assert len(items) > DAYS * 4 and any(r[7] is not None and 0 < r[7] < 1 for r in items)
    assert max(r[3] for r in table_rows(spark, USER_RECENT_ITEMS, batch_cfg.lake_dir)) == RECENT_ITEMS
