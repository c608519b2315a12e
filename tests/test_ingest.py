"""pipelines.ingest against the real broker, Spark and Delta: valid events land in bronze once each, every
malformed message lands in quarantine with parse_event's reason, and a replay or re-run adds nothing twice.

Also checks that the Spark validation (pipelines.ingest.validate) and features.events.parse_event give the same
reason and detail on the same messages (the shared list lives in tests/test_events.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from datetime import datetime, timezone

import pytest
from test_events import MALFORMED, VALID, event_json

from features.errors import EventError
from features.events import parse_event
from features.config import PlatformConfig
from features.tables import BRONZE_INTERACTIONS, QUARANTINE_INTERACTIONS
from pipelines.ingest import INGEST_OUTPUTS, SWAP_JOURNAL, finish_swap, run_ingest, swap_in, validate
from pipelines.produce import ensure_topic, publish, source_events

integration = pytest.mark.integration  # every test here but the swap's crash test (plain directories) needs them

ISO = "yyyy-MM-dd'T'HH:mm:ss'Z'"


def python_verdict(raw: bytes | None) -> tuple[str | None, str | None]:
    """(reason, detail) from parse_event, (None, None) for a valid event; a null value is read as b''."""
    try:
        parse_event(raw or b"")
    except EventError as e:
        return e.reason, e.detail
    return None, None


def spark_verdicts(spark, raws: list[bytes | None]) -> list[tuple[str | None, str | None]]:
    messages = spark.createDataFrame(
        [(raw, 0, i, datetime(2024, 1, 1)) for i, raw in enumerate(raws)],
        "value binary, partition int, offset bigint, timestamp timestamp")
    rows = validate(messages).orderBy("offset").select("reason", "detail").collect()
    return [(r["reason"], r["detail"]) for r in rows]


@pytest.fixture
def lake_cfg(cfg, tmp_path):
    """The session cfg with a fresh lake, checkpoint, run folder and topic."""
    return cfg.model_copy(update={
        "data_dir": tmp_path / "data", "artifacts_dir": tmp_path / "artifacts",
        "kafka": cfg.kafka.model_copy(update={"topic": f"test-ingest-{uuid.uuid4().hex[:8]}"}),
    })


@integration
def test_spark_validation_agrees_with_parse_event(spark):
    raws = [raw for raw, _, _ in MALFORMED] + [raw for raw, _ in VALID] + [None]
    expected = [python_verdict(raw) for raw in raws]
    found = spark_verdicts(spark, raws)
    # The reasons must agree everywhere; the detail too, except where Python's is its own decoder's message.
    assert [r for r, _ in found] == [r for r, _ in expected]
    for raw, (reason, detail), (want_reason, want_detail) in zip(raws, found, expected):
        if reason not in ("bad_encoding", "not_json"):
            assert detail == want_detail, raw


@integration
def test_canonical_messages_take_the_fast_test_and_no_other_message_does(spark):
    """What producers send (Event.to_json, the generator's impressions) is judged by the one-comparison test of
    pipelines.ingest._canonical_and_valid; a valid message in any other form, and every malformed one, goes
    through the full rules (whose verdicts the test above compares with parse_event)."""
    from pipelines.generator import GeneratorConfig, generate, kafka_messages
    from pipelines.ingest import _prepare

    chunk = next(generate(GeneratorConfig(n_events=200, seed=3, n_users=50, n_items=40, chunk_size=200)))
    impressions = [value for _, value in kafka_messages(chunk)]
    ratings = [parse_event(raw).to_json() for raw, event in VALID if parse_event(raw).to_json() == raw]
    assert ratings and any(b'"candidates"' in raw for raw in impressions)
    others = [raw for raw, _ in VALID if raw not in ratings] + [raw for raw, _, _ in MALFORMED]
    raws = impressions + ratings + others
    frame = spark.createDataFrame([(raw, 0, i, datetime(2024, 1, 1)) for i, raw in enumerate(raws)],
                                  "value binary, partition int, offset bigint, timestamp timestamp")
    fast = [r["_canonical"] for r in _prepare(frame).orderBy("offset").select("_canonical").collect()]
    assert fast == [True] * (len(impressions) + len(ratings)) + [False] * len(others)


@integration
def test_spark_reads_valid_fields_as_parse_event_does(spark):
    messages = spark.createDataFrame([(raw, 0, i, datetime(2024, 1, 1)) for i, (raw, _) in enumerate(VALID)],
                                     "value binary, partition int, offset bigint, timestamp timestamp")
    from pyspark.sql import functions as F

    rows = (validate(messages).orderBy("offset")
            .select("event_id", "user_id", "item_id", "rating", F.date_format("event_time", ISO).alias("t"))
            .collect())
    for row, (_, event) in zip(rows, VALID):
        ts = datetime.strptime(event.event_time, "%Y-%m-%dT%H:%M:%SZ").strftime("%Y-%m-%dT%H:%M:%SZ")
        assert (row.event_id, row.user_id, row.item_id, row.rating, row.t) == \
            (event.event_id, event.user_id, event.item_id, event.rating, ts)


@integration
def test_out_of_int32_ids_agree(spark):
    raws = [event_json(user_id=2**31), event_json(item_id=-(2**31) - 1)]
    assert spark_verdicts(spark, raws) == [python_verdict(raw) for raw in raws]


def bronze_rows(spark, cfg) -> dict[str, tuple]:
    """event_id -> (user_id, item_id, rating, event_time ISO, event_date ISO); fails on a duplicate event_id."""
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(cfg.lake_dir))
    rows = df.select("event_id", "user_id", "item_id", "rating", F.date_format("event_time", ISO),
                     F.date_format("event_date", "yyyy-MM-dd")).collect()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "bronze holds a duplicate event_id"
    return {r[0]: tuple(r[1:]) for r in rows}


def expected_bronze(raws: list[bytes]) -> dict[str, tuple]:
    out = {}
    for raw in raws:
        e = parse_event(raw)
        out.setdefault(e.event_id, (e.user_id, e.item_id, e.rating, e.event_time, e.event_time[:10]))
    return out


def quarantine_rows(spark, cfg) -> list[tuple[str, str]]:
    df = spark.read.format("delta").load(QUARANTINE_INTERACTIONS.path(cfg.lake_dir))
    assert df.where("kafka_partition is null or kafka_offset is null or kafka_timestamp is null "
                    "or ingested_at is null").count() == 0
    return sorted((r.raw, r.reason) for r in df.select("raw", "reason").collect())


@integration
def test_stream_to_bronze_and_quarantine_then_rerun(spark, kafka, lake_cfg, ml_events):
    from delta.tables import DeltaTable

    events = list(source_events(ml_events.head(40)))
    first, later = events[:30], events[30:]
    malformed = [(b"k", raw) for raw, _, _ in MALFORMED] + [(b"k", None)]  # None: a tombstone
    assert ensure_topic(kafka, lake_cfg.kafka.topic, lake_cfg.kafka.partitions) == lake_cfg.kafka.partitions
    # Valid events interleaved with every kind of malformed message, and one event sent twice.
    publish(kafka, lake_cfg.kafka.topic, first[:15] + malformed + first[15:] + first[:1])

    result = run_ingest(spark, lake_cfg)

    want_bronze = expected_bronze([v for _, v in first])
    want_quarantine = sorted(((raw or b"").decode("utf-8", "replace"), reason)
                             for (_, raw), reason in zip(malformed, [r for _, r, _ in MALFORMED] + ["not_json"]))
    assert bronze_rows(spark, lake_cfg) == want_bronze
    assert quarantine_rows(spark, lake_cfg) == want_quarantine
    reasons: dict[str, int] = {}
    for _, reason in want_quarantine:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert result["events_bronze"] == 30
    assert result["events_quarantined"] == len(malformed)
    assert result["quarantine_reasons"] == reasons
    table = DeltaTable.forPath(spark, BRONZE_INTERACTIONS.path(lake_cfg.lake_dir))
    assert table.detail().select("partitionColumns").first()[0] == ["event_date"]
    assert tuple(table.toDF().columns) == BRONZE_INTERACTIONS.columns
    offsets = table.toDF().select("kafka_partition", "kafka_offset").distinct().count()
    assert offsets == 30  # each row keeps the Kafka coordinates of the one message it came from

    # Bad input did not stop the stream: a replayed event, new events and one more bad message are taken in.
    publish(kafka, lake_cfg.kafka.topic, first[3:4] + later + [(b"k", b"{oops")])
    again = run_ingest(spark, lake_cfg)

    assert bronze_rows(spark, lake_cfg) == {**want_bronze, **expected_bronze([v for _, v in later])}
    assert quarantine_rows(spark, lake_cfg) == sorted(want_quarantine + [("{oops", "not_json")])
    assert (again["events_bronze"], again["events_quarantined"]) == (40, len(malformed) + 1)


@integration
def test_rerun_with_nothing_new_changes_nothing(spark, kafka, lake_cfg, ml_events):
    ensure_topic(kafka, lake_cfg.kafka.topic, 1)
    publish(kafka, lake_cfg.kafka.topic, list(source_events(ml_events.head(5))) + [(b"k", b"[]")])
    first = run_ingest(spark, lake_cfg)
    second = run_ingest(spark, lake_cfg)
    assert {k: first[k] for k in ("events_bronze", "events_quarantined", "quarantine_reasons")} == \
        {k: second[k] for k in ("events_bronze", "events_quarantined", "quarantine_reasons")} == \
        {"events_bronze": 5, "events_quarantined": 1, "quarantine_reasons": {"not_json": 1}}


class Crash(RuntimeError):
    """Stands for the process dying at this point."""


def _lake_dirs(cfg: PlatformConfig) -> list[Path]:
    return [Path(spec.path(cfg.lake_dir)) for spec in INGEST_OUTPUTS] + [cfg.checkpoint_dir / "ingest"]


def _fill(cfg: PlatformConfig, tag: str) -> None:
    """Every ingest output and the checkpoint as a directory holding one file that names its copy."""
    for d in _lake_dirs(cfg):
        d.mkdir(parents=True)
        (d / "copy").write_text(tag)


def _copies(dirs: list[Path]) -> list[str | None]:
    return [(d / "copy").read_text() if (d / "copy").exists() else None for d in dirs]


def test_swap_cut_off_after_any_rename_is_completed_by_the_next_start(tmp_path, monkeypatch):
    """A reprocess's swap (pipelines.ingest.swap_in) killed after k of its renames, for every k (and after the
    last one, before the journal is deleted), ends after finish_swap (what run_ingest and reprocess call first)
    with the whole new lake live and the whole old one retired; nothing is lost or left in the shadow."""
    n_renames = 2 * len(_lake_dirs(PlatformConfig(data_dir=tmp_path)))
    for k in range(n_renames + 1):
        root = tmp_path / str(k)
        live, shadow = PlatformConfig(data_dir=root / "live"), PlatformConfig(data_dir=root / "live" / "shadow" / "s")
        retired = root / "live" / "retired" / "s"
        _fill(live, "old")
        _fill(shadow, "new")
        calls = []
        real_rename, real_unlink = Path.rename, Path.unlink

        def rename(self, target, calls=calls):
            if len(calls) == k:
                raise Crash(f"killed before rename {k + 1}")
            calls.append(self)
            return real_rename(self, target)

        def unlink(self, *args, **kwargs):  # after the last rename: killed before the journal is deleted
            if self.name == SWAP_JOURNAL:
                raise Crash("killed before deleting the journal")
            return real_unlink(self, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(Path, "rename", rename)
            m.setattr(Path, "unlink", unlink)
            with pytest.raises(Crash):
                swap_in(shadow, live, retired)
        assert (live.data_dir / SWAP_JOURNAL).exists()

        assert finish_swap(live) == n_renames - k
        assert _copies(_lake_dirs(live)) == ["new"] * len(_lake_dirs(live)), k
        retired_dirs = _lake_dirs(PlatformConfig(data_dir=retired))
        assert _copies(retired_dirs) == ["old"] * len(retired_dirs), k
        assert not any(d.exists() for d in _lake_dirs(shadow)), k
        assert not (live.data_dir / SWAP_JOURNAL).exists()
        assert finish_swap(live) == 0  # nothing left to do


def test_swap_refuses_to_start_over_an_unfinished_one(tmp_path):
    from features.errors import PlatformError

    live, shadow = PlatformConfig(data_dir=tmp_path / "live"), PlatformConfig(data_dir=tmp_path / "shadow")
    _fill(live, "old")
    _fill(shadow, "new")
    (live.data_dir / SWAP_JOURNAL).write_text('{"renames": []}')
    with pytest.raises(PlatformError, match="cut off"):
        swap_in(shadow, live, tmp_path / "retired")
    assert _copies(_lake_dirs(live)) == ["old"] * len(_lake_dirs(live))
