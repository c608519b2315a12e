"""Quarantine on the real broker: one availableNow ingest of good events mixed with at least one message of every
reject kind, on a closed vocabulary.

Checks, against a hand-written list of what each message is:

- the stream does not stop: good events produced after every bad one are in bronze, and a second run takes in a
  new event;
- every good event is in bronze exactly once, with the values it was produced with (a generated impression keeps
  its click, random-slice flag, session, candidates and 26 categorical fields: Kafka -> bronze loses nothing);
- a duplicate ``event_id`` is kept once and counted as a duplicate, never quarantined;
- every bad message is in ``quarantine.interactions`` whole, with the expected reason (and parse_event gives the
  same reason: Python and Spark agree);
- the counts the stage reports per reason (``quarantine_reasons``), the duplicates and the micro-batch log
  (``quarantine.ingest_batches``) equal the expected counts.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

from features.errors import EventError
from features.events import IMPRESSION_FIELDS, MAX_MESSAGE_BYTES, parse_event
from features.tables import BRONZE_INTERACTIONS, INGEST_BATCHES, ITEM_VOCAB, QUARANTINE_INTERACTIONS, USER_VOCAB
from pipelines.generator import CAT_COLUMNS, GeneratorConfig, generate, kafka_messages
from pipelines.ingest import run_ingest
from pipelines.produce import ensure_topic, publish

pytestmark = pytest.mark.integration

#: The closed vocabulary: users 1..N_USERS, items 1..N_ITEMS (the generator draws its ids from the same ranges).
N_USERS, N_ITEMS = 40, 60


def message(**fields) -> bytes:
    """A valid rating event with ``fields`` replaced (a value of ``...`` removes the field)."""
    obj = {"event_id": "ok", "user_id": 1, "item_id": 2, "rating": 4.0, "event_time": "2024-03-01T12:00:00Z",
           **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}, separators=(",", ":")).encode()


#: (message, reason): every reject kind the issue names, some more than once.
BAD: list[tuple[bytes, str]] = [
    (b"this is not json", "not_json"),
    (b"[1, 2, 3]", "not_json"),
    (message(event_id="b-missing", item_id=...), "missing_field"),
    (message(event_id="b-null", rating=None), "missing_field"),
    (message(event_id="b-type-user", user_id="7"), "wrong_type"),
    (message(event_id="b-type-click", click=3), "wrong_type"),  # an impression field of the wrong type
    (message(event_id="b-negative-ts", event_time="1969-12-31T23:59:59Z"), "bad_timestamp"),  # Unix time < 0
    (message(event_id="b-future-ts", event_time="2999-01-01T00:00:00Z"), "bad_timestamp"),
    (message(event_id="b-type-event", event_type="purchase"), "unknown_event_type"),
    (message(event_id="b-big", pad="x" * MAX_MESSAGE_BYTES), "oversized"),
    (message(event_id="b-user", user_id=N_USERS + 1), "unknown_id"),
    (message(event_id="b-item", item_id=10_000), "unknown_id"),
    (message(event_id="b-rating", rating=7.5), "rating_out_of_range"),
    (message(event_id="b-rating-0", rating=0), "rating_out_of_range"),
    (b'{"event_id":"b-enc-\xff\xfe","user_id":1,"item_id":2,"rating":4.0,"event_time":"2024-03-01T12:00:00Z"}',
     "bad_encoding"),
]


@pytest.fixture
def lake_cfg(cfg, tmp_path):
    return cfg.model_copy(update={
        "data_dir": tmp_path / "data", "artifacts_dir": tmp_path / "artifacts",
        "kafka": cfg.kafka.model_copy(update={"topic": f"test-quarantine-{uuid.uuid4().hex[:8]}"}),
    })


def write_closed_vocabulary(spark, lake) -> None:
    """silver.user_vocab / silver.item_vocab holding ids 1..N (the index is the id; only the ids matter here)."""
    from pyspark.sql.types import StructType

    for spec, n in ((USER_VOCAB, N_USERS), (ITEM_VOCAB, N_ITEMS)):
        rows = [tuple({spec.columns[0]: i, spec.columns[1]: i}.get(c) for c in spec.columns) for i in range(1, n + 1)]
        spark.createDataFrame(rows, StructType.fromDDL(spec.schema)).write.format("delta").save(spec.path(lake))


def test_every_reject_kind_is_quarantined_with_its_reason_and_counted(spark, kafka, lake_cfg):
    from pyspark.sql import functions as F

    write_closed_vocabulary(spark, lake_cfg.lake_dir)
    gen = GeneratorConfig(n_events=30, seed=5, n_users=N_USERS, n_items=N_ITEMS, random_fraction=0.3)
    chunk = next(generate(gen))
    impressions = list(kafka_messages(chunk))
    ratings = [(b"1", message(event_id=f"r{i}", user_id=1 + i, item_id=2 + i, rating=float(1 + i % 5)))
               for i in range(10)]
    duplicates = [ratings[0], impressions[3]]  # resent with the same key: same partition, later offset
    bad = [(b"k", raw) for raw, _ in BAD]
    # good and bad interleaved, good events after every bad one
    messages = ratings[:5] + bad[:8] + impressions[:15] + duplicates + bad[8:] + ratings[5:] + impressions[15:]
    for raw, reason in BAD:  # the hand-written reasons are parse_event's on the same closed vocabulary
        with pytest.raises(EventError) as info:
            parse_event(raw, known_users=range(1, N_USERS + 1), known_items=range(1, N_ITEMS + 1))
        assert info.value.reason == reason, raw

    ensure_topic(kafka, lake_cfg.kafka.topic, lake_cfg.kafka.partitions)
    publish(kafka, lake_cfg.kafka.topic, messages)
    result = run_ingest(spark, lake_cfg, closed_vocab=True)

    # bronze: every good event exactly once, with its values
    good = {parse_event(v).event_id: parse_event(v) for _, v in ratings + impressions}
    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake_cfg.lake_dir))
    rows = bronze.select("event_id", "user_id", "item_id", "rating", F.date_format("event_time", "yyyy-MM-dd'T'HH:mm:ss'Z'")
                         .alias("t"), *IMPRESSION_FIELDS).collect()
    assert sorted(r.event_id for r in rows) == sorted(good)
    for r in rows:
        e = good[r.event_id]
        assert (r.user_id, r.item_id, r.rating, r.t) == (e.user_id, e.item_id, e.rating, e.event_time)
        assert (r.click, r.is_random, r.session_id) == (e.click, e.is_random, e.session_id)
        assert (None if r.candidates is None else tuple(r.candidates)) == e.candidates
        assert {c: r[c] for c in CAT_COLUMNS if r[c] is not None} == e.cats
    # the impressions' fields in bronze are the generator's own arrays
    by_id = {r.event_id: r for r in rows}
    for i, eid in enumerate(chunk["event_id"].tolist()):
        r = by_id[eid]
        assert (r.click, r.is_random, r.session_id, r.c01, r.c17, r.c26) == (
            chunk["click"][i], chunk["is_random"][i], chunk["session_id"][i], chunk["c01"][i], chunk["c17"][i],
            chunk["c26"][i])

    # quarantine: every bad message whole, with its reason; the duplicates are not there
    quarantine = spark.read.format("delta").load(QUARANTINE_INTERACTIONS.path(lake_cfg.lake_dir))
    found = sorted((r.raw, r.reason) for r in quarantine.select("raw", "reason").collect())
    assert found == sorted((raw.decode("utf-8", "replace"), reason) for raw, reason in BAD)
    assert quarantine.where("kafka_offset is null or detail is null").count() == 0

    # the reported counts
    expected = Counter(reason for _, reason in BAD)
    assert result["quarantine_reasons"] == dict(expected)
    assert result["events_quarantined"] == len(BAD)
    assert result["events_bronze"] == len(good)
    assert result["duplicates"] == len(duplicates)
    log = spark.read.format("delta").load(INGEST_BATCHES.path(lake_cfg.lake_dir)).agg(
        F.sum("messages"), F.sum("valid"), F.sum("inserted"), F.sum("duplicates"), F.sum("quarantined")).first()
    assert tuple(log) == (len(messages), len(good) + len(duplicates), len(good), len(duplicates), len(BAD))

    # the stream goes on: one more event after all of that is taken in, nothing is counted twice
    publish(kafka, lake_cfg.kafka.topic, [(b"2", message(event_id="after", user_id=2))])
    again = run_ingest(spark, lake_cfg, closed_vocab=True)
    assert (again["events_bronze"], again["events_quarantined"], again["quarantine_reasons"]) == \
        (len(good) + 1, len(BAD), dict(expected))
