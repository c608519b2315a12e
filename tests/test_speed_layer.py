"""The speed layer's exactly-once under replay, and kappa reprocessing (real Spark, Delta and, for reprocessing,
the real broker):

- a micro-batch that crashed between the bronze MERGE and the speed-layer MERGE, replayed (as Spark replays it
  from the checkpoint's offsets), leaves the speed tables equal to a batch recomputation over bronze: its events
  are neither lost (they are already in bronze when it runs again) nor counted twice; replaying it once more
  changes nothing (Delta skips the committed txnVersion);
- ``pipelines.ingest.reprocess`` replays the topic from the earliest offset into a shadow lake and swaps it in:
  bronze, quarantine and the speed tables are what a fresh ingest gives, the old copies are kept, and the live
  stream resumes from the shadow's checkpoint without appending anything twice.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from test_parity import kafka_message, stream_events, table_rows

from features.tables import BRONZE_INTERACTIONS, INGEST_BATCHES, ITEM_WINDOW_STATS, QUARANTINE_INTERACTIONS, \
    USER_RECENT_ITEMS

pytestmark = pytest.mark.integration

SPEED = (ITEM_WINDOW_STATS, USER_RECENT_ITEMS)


class Crash(RuntimeError):
    """Stands for the process dying at this point."""


def batch_rows(spark, lake) -> list[tuple]:
    from pipelines.daily_features import feature_rows

    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake))
    dates = bronze.agg({"event_date": "min"}).first()[0], bronze.agg({"event_date": "max"}).first()[0]
    return [sorted(tuple(r) for r in df.select(*spec.columns).collect())
            for spec, df in zip(SPEED, feature_rows(bronze, *dates))]


def kafka_frame(spark, messages: list[tuple[bytes, bytes]], first_offset: int):
    """What the Kafka source hands foreachBatch: value, partition, offset, timestamp (one partition)."""
    return spark.createDataFrame([(value, 0, first_offset + i, datetime(2024, 1, 1))
                                  for i, (_, value) in enumerate(messages)],
                                 "value binary, partition int, offset bigint, timestamp timestamp")


def versions(lake) -> dict[str, int]:
    return {spec.name: len(list((Path(spec.path(lake)) / "_delta_log").glob("*.json"))) for spec in SPEED}


def test_batch_replayed_after_crash_before_speed_merge_is_neither_lost_nor_double_counted(spark, tmp_path,
                                                                                          monkeypatch):
    from pipelines import ingest

    lake, checkpoint = tmp_path / "lake", tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "metadata").write_text(json.dumps({"id": "query-1"}))
    for spec in (BRONZE_INTERACTIONS, QUARANTINE_INTERACTIONS, INGEST_BATCHES):
        ingest._ensure_table(spark, spec, spec.path(lake))
    ingest.ensure_speed_tables(spark, lake)
    messages = [kafka_message(e) for e in stream_events(seed=8, n=90)]
    first, second = messages[:50], messages[50:] + messages[10:12]  # the second repeats two earlier events
    write = ingest._batch_writer(lake, checkpoint)
    write(kafka_frame(spark, first, 0), 0)

    def crash(*args, **kwargs):
        raise Crash("killed after the bronze MERGE")

    with monkeypatch.context() as m:
        m.setattr(ingest, "update_speed_tables", crash)
        with pytest.raises(Crash):
            write(kafka_frame(spark, second, 50), 1)
    assert spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake)).count() == 90  # the MERGE went in
    assert batch_rows(spark, lake) != [table_rows(spark, spec, lake) for spec in SPEED]  # speed layer behind

    write(kafka_frame(spark, second, 50), 1)  # the replay
    assert [table_rows(spark, spec, lake) for spec in SPEED] == batch_rows(spark, lake)
    log = {r["batch_id"]: (r["messages"], r["inserted"], r["duplicates"])
           for r in spark.read.format("delta").load(INGEST_BATCHES.path(lake)).collect()}
    assert log == {0: (50, 50, 0), 1: (42, 40, 2)}  # the replay still knows which rows it inserted

    before, rows = versions(lake), [table_rows(spark, spec, lake) for spec in SPEED]
    write(kafka_frame(spark, second, 50), 1)  # replayed again after its speed-layer MERGE committed
    assert versions(lake) == before  # Delta skipped the committed (txnAppId, txnVersion)
    assert [table_rows(spark, spec, lake) for spec in SPEED] == rows


def test_reprocess_replays_the_topic_into_a_shadow_lake_and_swaps_it_in(spark, kafka, cfg, tmp_path):
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from pipelines.ingest import reprocess, run_ingest
    from pipelines.produce import ensure_topic, publish

    lake_cfg = cfg.model_copy(update={
        "data_dir": tmp_path / "data",
        "kafka": cfg.kafka.model_copy(update={"topic": f"test-reprocess-{uuid.uuid4().hex[:8]}"}),
    })
    lake = lake_cfg.lake_dir
    messages = [kafka_message(e) for e in stream_events(seed=9, n=80)]
    ensure_topic(kafka, lake_cfg.kafka.topic, lake_cfg.kafka.partitions)
    publish(kafka, lake_cfg.kafka.topic, messages[:60] + [(b"k", b"{not json")])
    run_ingest(spark, lake_cfg, "available-now", speed_layer=True)
    # The live speed table goes stale (as after a change of a feature's definition): reprocessing must rebuild it.
    DeltaTable.forPath(spark, ITEM_WINDOW_STATS.path(lake)).update(set={"events_7d": F.lit(0)})
    stale = table_rows(spark, ITEM_WINDOW_STATS, lake)

    result = reprocess(spark, lake_cfg, max_offsets_per_trigger=30)

    assert (result["events_bronze"], result["events_quarantined"]) == (60, 1)
    assert [table_rows(spark, spec, lake) for spec in SPEED] == batch_rows(spark, lake)
    retired = Path(result["retired"][ITEM_WINDOW_STATS.name])
    assert retired.parent.parent.parent.parent == lake_cfg.data_dir / "retired"
    assert sorted(tuple(r) for r in spark.read.format("delta").load(str(retired)).collect()) == stale
    assert set(result["retired"]) == {BRONZE_INTERACTIONS.name, QUARANTINE_INTERACTIONS.name, INGEST_BATCHES.name,
                                      ITEM_WINDOW_STATS.name, USER_RECENT_ITEMS.name, "checkpoint"}
    assert not any(Path(result["shadow_dir"]).rglob("_delta_log"))  # everything moved out of the shadow

    # The stream resumes from the swapped-in checkpoint: new events once each, the old reject not appended again.
    publish(kafka, lake_cfg.kafka.topic, messages[60:])
    after = run_ingest(spark, lake_cfg, "available-now", speed_layer=True)
    ids = [r[0] for r in spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake)).select("event_id").collect()]
    assert sorted(ids) == sorted({json.loads(v)["event_id"] for _, v in messages})
    assert (after["events_bronze"], after["events_quarantined"]) == (80, 1)
    assert [table_rows(spark, spec, lake) for spec in SPEED] == batch_rows(spark, lake)
