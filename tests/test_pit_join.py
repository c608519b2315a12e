"""Point-in-time correctness on small hand-built data (Spark and Delta, no broker):

- the daily feature path (pipelines.daily_features) gives the values of a naive pure-Python reading of the
  definitions in features/views.py;
- the point-in-time join (pipelines.pit_join) gives what a naive oracle gives: per sample and view, the row with
  the latest timestamp strictly before the sample's and within the view's ttl;
- leakage: changing or adding events after a sample's time never changes that sample's features or history;
- a training set records its input versions and is rebuilt from them (time travel) to identical content;
- a daily re-run replaces exactly its day and leaves identical content.
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone

import pytest

from features.source import LabelRule
from features.tables import BRONZE_INTERACTIONS, ITEM_WINDOW_STATS, PIT_TRAINING_SET, USER_RECENT_ITEMS
from features.views import ITEM_STATS, RECENT_ITEMS, USER_HISTORY, WINDOWS_DAYS

START = datetime(1998, 1, 1, tzinfo=timezone.utc)
DAYS = 40
CUT = START + timedelta(days=20, hours=13)  # events after this are changed or added in the leakage test


def make_events(seed: int, n: int, first_id: int = 0, after: datetime | None = None) -> list[dict]:
    """Events over DAYS days, with times on midnight and one second around it (the boundaries of the daily rows
    and of the ttl), same-second ties, every event type; after ``after`` when given."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        day = rng.randrange(DAYS)
        sec = rng.choice([0, 0, 1, 86399, 43200, rng.randrange(86400)])
        t = START + timedelta(days=day, seconds=sec)
        if after is not None and t <= after:
            t = after + timedelta(seconds=rng.choice([1, 3600, 86400 * rng.randrange(1, 15)]))
        out.append({"event_id": f"e{first_id + i:05d}", "user_id": rng.randrange(1, 6),
                    "item_id": rng.randrange(1, 8), "rating": rng.choice([1.0, 3.0, 4.0, 5.0]),
                    "event_time": t, "event_type": rng.choice(["rating", "rating", "view", "click"])})
    return out


BASE_EVENTS = make_events(seed=11, n=150)


# ------------------------------------------------------------------------------------------------ naive oracles


def oracle_item_stats(events: list[dict], day: date, label: LabelRule = LabelRule()) -> dict[int, tuple]:
    out = {}
    for item in sorted({e["item_id"] for e in events}):
        row = []
        for w in WINDOWS_DAYS:
            inside = [e for e in events if e["item_id"] == item
                      and day - timedelta(days=w - 1) <= e["event_time"].date() <= day]
            pos = sum(label.positive(e["event_type"], e["rating"]) for e in inside)
            row += [len(inside), pos, pos / len(inside) if inside else None]
        if row[3 * WINDOWS_DAYS.index(max(WINDOWS_DAYS))]:  # an event in the longest window
            out[item] = tuple(row)
    return out


def oracle_user_recent(events: list[dict], user: int, day: date) -> list[int]:
    mine = sorted((e["event_time"], e["event_id"], e["item_id"]) for e in events
                  if e["user_id"] == user and e["event_time"].date() <= day)
    return [item for _, _, item in mine[-RECENT_ITEMS:]]


def oracle_feature_rows(events: list[dict]) -> tuple[dict, dict]:
    """{(item, day): stats}, {(user, day): recent items} for every day of the data (plus a week after)."""
    last = max(e["event_time"].date() for e in events)
    items, users = {}, {}
    day = min(e["event_time"].date() for e in events)
    while day <= last:
        for item, stats in oracle_item_stats(events, day).items():
            items[(item, day)] = stats
        for user in sorted({e["user_id"] for e in events if e["event_time"].date() == day}):
            users[(user, day)] = oracle_user_recent(events, user, day)
        day += timedelta(days=1)
    return items, users


def known_from(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(days=1)


def oracle_pit(events: list[dict]) -> dict[str, tuple]:
    """event_id -> (label, item stats..., recent_items, recent_len) by scanning every feature row per sample."""
    items, users = oracle_feature_rows(events)
    out = {}
    for e in events:
        t = e["event_time"]
        feats = []
        for rows, key, view, width in ((items, e["item_id"], ITEM_STATS, 6), (users, e["user_id"], USER_HISTORY, 1)):
            best = None
            for (k, day), value in rows.items():
                ts = known_from(day)
                if k == key and t - view.ttl <= ts < t and (best is None or ts > best[0]):
                    best = (ts, value)
            if view is USER_HISTORY:
                feats += [best[1], len(best[1])] if best else [None, None]
            else:
                feats += list(best[1]) if best else [None] * width
        out[e["event_id"]] = (int(LabelRule().positive(e["event_type"], e["rating"])), *feats)
    return out


# ------------------------------------------------------------------------------------------------ Spark helpers


def write_bronze(spark, lake, events: list[dict]) -> None:
    from pyspark.sql.types import StructType

    now = datetime.now(timezone.utc)
    rows = [(e["event_id"], e["user_id"], e["item_id"], e["rating"], e["event_time"], e["event_time"].date(),
             0, i, now, e["event_type"]) + (None,) * (len(BRONZE_INTERACTIONS.columns) - 10)
            for i, e in enumerate(events)]
    (spark.createDataFrame(rows, StructType.fromDDL(BRONZE_INTERACTIONS.schema)).write.format("delta")
     .mode("overwrite").partitionBy(*BRONZE_INTERACTIONS.partition_by).save(BRONZE_INTERACTIONS.path(lake)))


def table_rows(spark, spec, lake, version: int | None = None) -> list[tuple]:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return sorted(tuple(r) for r in reader.load(spec.path(lake)).collect())


def spark_pit(df) -> dict[str, tuple]:
    cols = [c for c in PIT_TRAINING_SET.columns if c not in ("event_id", "user_id", "item_id", "event_time")]
    return {r["event_id"]: tuple(r[c] for c in cols) for r in df.collect()}


def approx(rows: dict) -> dict:
    return {k: tuple(round(v, 9) if isinstance(v, float) else v for v in row) for k, row in rows.items()}


def all_days(events):
    return min(e["event_time"].date() for e in events), max(e["event_time"].date() for e in events)


@pytest.fixture(scope="module")
def built(spark, cfg, tmp_path_factory):
    """A lake with the base events, both views backfilled by the daily path and one training set (version v1)."""
    from pipelines.daily_features import run_daily
    from pipelines.pit_join import build_training_set

    lake_cfg = cfg.model_copy(update={"data_dir": tmp_path_factory.mktemp("pit") / "data"})
    write_bronze(spark, lake_cfg.lake_dir, BASE_EVENTS)
    run_daily(spark, lake_cfg, *all_days(BASE_EVENTS))
    first = build_training_set(spark, lake_cfg)
    return lake_cfg, first


def test_daily_features_match_the_definitions(spark, built):
    lake_cfg, _ = built
    items, users = oracle_feature_rows(BASE_EVENTS)
    got_items = {(r[0], r[1]): tuple(r[2:8]) for r in table_rows(spark, ITEM_WINDOW_STATS, lake_cfg.lake_dir)}
    got_users = {(r[0], r[1]): list(r[2]) for r in table_rows(spark, USER_RECENT_ITEMS, lake_cfg.lake_dir)}
    assert approx(got_items) == approx(items)
    assert got_users == users
    for r in table_rows(spark, ITEM_WINDOW_STATS, lake_cfg.lake_dir):  # known from the next midnight
        assert r[-1] == datetime(r[1].year, r[1].month, r[1].day) + timedelta(days=1)


def test_a_source_rule_other_than_four_stars_decides_the_features_positives_and_the_labels(spark, built):
    """A source whose label rule is ``rating >= 3``: the daily item stats count 3-star ratings as positives and the
    point-in-time samples label them 1, as the oracle does with the same rule (the default rule's rows differ)."""
    from pipelines.daily_features import feature_rows
    from pipelines.pit_join import samples_from_bronze

    lake_cfg, _ = built
    three = LabelRule(threshold=3)
    assert any(e["event_type"] == "rating" and 3 <= e["rating"] < 4 for e in BASE_EVENTS)
    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake_cfg.lake_dir))
    first, last = all_days(BASE_EVENTS)
    items, _ = feature_rows(bronze, first, last, three)
    got = {(r["item_id"], r["event_date"]): tuple(r)[2:8] for r in items.collect()}
    want, day = {}, first
    while day <= last:
        want.update({(item, day): stats for item, stats in oracle_item_stats(BASE_EVENTS, day, three).items()})
        day += timedelta(days=1)
    assert approx(got) == approx(want)
    assert approx(want) != approx(oracle_feature_rows(BASE_EVENTS)[0])
    labels = {r["event_id"]: r["label"] for r in samples_from_bronze(bronze, three).collect()}
    assert labels == {e["event_id"]: int(three.positive(e["event_type"], e["rating"])) for e in BASE_EVENTS}


def test_point_in_time_join_matches_the_oracle(spark, built):
    lake_cfg, first = built
    got = spark_pit(spark.read.format("delta").option("versionAsOf", first["version"])
                    .load(PIT_TRAINING_SET.path(lake_cfg.lake_dir)))
    want = oracle_pit(BASE_EVENTS)
    assert approx(got) == approx(want)
    # The data exercises every case: no row yet, rows outside the ttl, a feature row known at the sample's own
    # second (midnight) that must not be used.
    assert any(v[2] is None for v in want.values()) and any(v[2] is not None for v in want.values())
    midnight = [e for e in BASE_EVENTS if e["event_time"].hour == e["event_time"].minute == 0
                and e["event_time"].second == 0]
    assert midnight
    assert first["rows"] == len(BASE_EVENTS)
    assert set(first["sources"]) == {BRONZE_INTERACTIONS.name, ITEM_WINDOW_STATS.name, USER_RECENT_ITEMS.name}


def test_later_events_never_change_earlier_samples_and_rebuild_is_identical(spark, built):
    from pipelines.daily_features import run_daily
    from pipelines.pit_join import build_training_set, rebuild_training_set

    lake_cfg, first = built
    lake = lake_cfg.lake_dir
    table = PIT_TRAINING_SET.path(lake)
    before = spark_pit(spark.read.format("delta").option("versionAsOf", first["version"]).load(table))
    v1_rows = table_rows(spark, PIT_TRAINING_SET, lake, first["version"])
    # Change every event after CUT (another item, rating and type) and add new ones after CUT.
    changed = [dict(e, item_id=e["item_id"] % 7 + 1, rating=6.0 - e["rating"], event_type="click")
               if e["event_time"] > CUT else e for e in BASE_EVENTS]
    added = make_events(seed=12, n=60, first_id=50_000, after=CUT)
    events = changed + added
    write_bronze(spark, lake, events)
    run_daily(spark, lake_cfg, *all_days(events))
    second = build_training_set(spark, lake_cfg)
    after = spark_pit(spark.read.format("delta").load(table))

    early = [e["event_id"] for e in BASE_EVENTS if e["event_time"] <= CUT]
    late = [e["event_id"] for e in BASE_EVENTS if e["event_time"] > CUT]
    assert early and late
    assert {k: before[k] for k in early} == {k: after[k] for k in early}
    assert approx(after) == approx(oracle_pit(events))  # and the new set is itself right
    assert any(before[k] != after[k] for k in late)  # the change was visible where it should be

    # Version 1 records its inputs; rebuilding from them (time travel) gives identical content.
    assert second["sources"] != first["sources"]
    rebuilt = sorted(tuple(r) for r in rebuild_training_set(spark, lake_cfg, first["version"]).collect())
    assert rebuilt == v1_rows


def test_daily_rerun_replaces_exactly_its_day(spark, built):
    from pipelines.daily_features import run_daily

    lake_cfg, _ = built
    lake = lake_cfg.lake_dir
    day = START.date() + timedelta(days=9)
    before = {spec.name: table_rows(spark, spec, lake) for spec in (ITEM_WINDOW_STATS, USER_RECENT_ITEMS)}
    once = run_daily(spark, lake_cfg, day)
    twice = run_daily(spark, lake_cfg, day)
    after = {spec.name: table_rows(spark, spec, lake) for spec in (ITEM_WINDOW_STATS, USER_RECENT_ITEMS)}
    assert after == before
    assert (once["item_rows"], once["user_rows"]) == (twice["item_rows"], twice["user_rows"]) != (0, 0)
    assert once["item_rows"] == sum(1 for r in before[ITEM_WINDOW_STATS.name] if r[1] == day)
    for name in before:
        assert twice["versions"][name] == once["versions"][name] + 1
