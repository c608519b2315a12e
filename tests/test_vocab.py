"""Id vocabularies (features.vocab, pipelines.features_batch): append-only across days, minimum count -> OOV or a
hashed bucket, hashing deterministic, in range and equal to Spark's, Delta versions with time travel, and the
training set's record of the vocabulary versions it was indexed with.

Expected indices are worked out by hand from the events below, not by the code under test.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from features.errors import VocabularyError
from features.vocab import OOV_INDEX, VocabSpec, hashed_index, lookup, spark_hash_int
from features.tables import BRONZE_INTERACTIONS, CTR_SAMPLES, USER_VOCAB

DAY1 = datetime(2024, 1, 1, tzinfo=timezone.utc)
DAY2 = DAY1 + timedelta(days=1)


def test_hashing_is_deterministic_in_range_and_spreads():
    spec = VocabSpec("user", "user_id", "user_idx", hash_buckets=16)
    ids = list(range(-5_000, 5_000)) + [2**31 - 1, -(2**31)]
    buckets = [hashed_index(spec, i) for i in ids]
    assert buckets == [hashed_index(spec, i) for i in ids]
    assert min(buckets) == 1 and max(buckets) == 16
    counts = Counter(buckets)
    assert min(counts.values()) > len(ids) / 16 * 0.8  # each bucket within 20% of the mean: no degenerate hash
    assert hashed_index(VocabSpec("u", "user_id", "user_idx"), 7) == OOV_INDEX  # no buckets: everything is OOV
    assert lookup(spec, {7: 20}, 7) == 20 and lookup(spec, {7: 20}, None) == OOV_INDEX
    with pytest.raises(ValueError):
        spark_hash_int(2**31)
    with pytest.raises(ValueError):
        VocabSpec("u", "user_id", "user_idx", min_count=0)


@pytest.mark.integration
def test_python_hash_is_sparks_hash(spark):
    from pyspark.sql import functions as F

    ids = [0, 1, -1, 7, -7, 196, 943, 10**6, 2**31 - 1, -(2**31)]
    rows = spark.createDataFrame([(i,) for i in ids], "id int").select("id", F.hash("id").alias("h")).collect()
    assert {r.id: r.h for r in rows} == {i: spark_hash_int(i) for i in ids}
    assert spark_hash_int(1) == -559580957  # Spark's documented `SELECT hash(1)`


def events_frame(spark, events: list[tuple[str, int, datetime]]):
    return spark.createDataFrame(events, "event_id string, user_id int, event_time timestamp")


@pytest.mark.integration
def test_vocabulary_across_two_days_min_count_hashing_and_time_travel(spark, tmp_path):
    from pipelines.features_batch import index_column, update_id_vocab

    lake = tmp_path / "lake"
    spec = VocabSpec("user", "user_id", "user_idx", min_count=2, hash_buckets=4)  # rows 1..4 hashed, ids from 5
    h = lambda t: DAY1 + timedelta(hours=t)
    # day 1: user 30 twice (first at 1h), user 10 three times (first at 2h), user 20 once -> 30:5, 10:6; 20 is rare
    day1 = [("a", 10, h(2)), ("b", 10, h(3)), ("c", 10, h(4)), ("d", 20, h(5)), ("e", 30, h(1)), ("f", 30, h(6))]
    # day 2 (bronze holds both days): user 20 reaches 2 events -> 7 (first seen on day 1), user 40 twice -> 8,
    # user 50 once stays out; 10 and 30 keep their indices
    day2 = day1 + [("g", 40, DAY2), ("h", 20, DAY2 + timedelta(hours=1)), ("i", 40, DAY2 + timedelta(hours=2)),
                   ("j", 50, DAY2 + timedelta(hours=3))]

    vocab1, v1 = update_id_vocab(spark, events_frame(spark, day1), USER_VOCAB, lake, spec)
    first = {r.user_id: r.user_idx for r in vocab1.collect()}
    assert first == {30: 5, 10: 6}
    vocab2, v2 = update_id_vocab(spark, events_frame(spark, day2), USER_VOCAB, lake, spec)
    second = {r.user_id: r.user_idx for r in vocab2.collect()}
    assert second == {30: 5, 10: 6, 20: 7, 40: 8}
    assert v2 == v1 + 1  # one Delta commit per update

    # a run with no new qualifying id adds no version; the vocabulary is the same
    vocab3, v3 = update_id_vocab(spark, events_frame(spark, day2), USER_VOCAB, lake, spec)
    assert v3 == v2 and {r.user_id: r.user_idx for r in vocab3.collect()} == second

    # time travel: the version of day 1 gives day 1's mapping back
    path = USER_VOCAB.path(lake)
    at_v1 = spark.read.format("delta").option("versionAsOf", v1).load(path)
    assert {r.user_id: r.user_idx for r in at_v1.collect()} == first

    # indexing: own index, else the hashed bucket (Python reference = Spark), else OOV for a null id
    samples = spark.createDataFrame([(10,), (20,), (50,), (99,), (None,)], "user_id int")
    got = {r.user_id: r.user_idx for r in index_column(vocab1, samples, spec).collect()}
    assert got == {10: 6, 20: hashed_index(spec, 20), 50: hashed_index(spec, 50), 99: hashed_index(spec, 99),
                   None: OOV_INDEX}
    assert all(1 <= got[i] <= 4 for i in (20, 50, 99))
    got2 = {r.user_id: r.user_idx for r in index_column(vocab2, samples, spec).collect()}
    assert got2[20] == 7 and got2[10] == 6
    no_hash = VocabSpec("user", "user_id", "user_idx", min_count=2)
    assert {r.user_id: r.user_idx for r in index_column(vocab1, samples, no_hash).collect()}[50] == OOV_INDEX

    # the bucket layout is recorded with each version; growing with another one would move every index
    with pytest.raises(VocabularyError, match="hash_buckets=4"):
        update_id_vocab(spark, events_frame(spark, day2), USER_VOCAB, lake,
                        VocabSpec("user", "user_id", "user_idx", min_count=2, hash_buckets=8))


@pytest.mark.integration
def test_training_set_records_the_vocabulary_versions_it_used(spark, cfg, movielens, tmp_path):
    """run_features on two days of bronze: the samples' commit names the vocabulary versions, and the vocabularies
    read at those versions index the samples exactly as written."""
    import json

    from delta.tables import DeltaTable

    from pipelines.features_batch import run_features
    from test_features_batch import fresh_cfg, write_bronze

    job_cfg = fresh_cfg(cfg, tmp_path / "job")
    ratings = movielens.ratings.reset_index(drop=True).reset_index().rename(columns={"index": "row"})
    ratings = ratings.sort_values("timestamp", kind="stable").head(400)
    write_bronze(spark, job_cfg.lake_dir, ratings.head(200), "overwrite")
    first = run_features(spark, job_cfg)
    write_bronze(spark, job_cfg.lake_dir, ratings.tail(200), "append")
    second = run_features(spark, job_cfg)

    versions = second["vocab_versions"]
    assert versions["silver.user_vocab"] >= first["vocab_versions"]["silver.user_vocab"]
    samples_path = CTR_SAMPLES.path(job_cfg.lake_dir)
    commit = DeltaTable.forPath(spark, samples_path).history(1).first()
    assert json.loads(commit["userMetadata"]) == {"vocab_versions": versions}

    user_vocab = spark.read.format("delta").option("versionAsOf", versions["silver.user_vocab"]).load(
        USER_VOCAB.path(job_cfg.lake_dir))
    mapping = {r.user_id: r.user_idx for r in user_vocab.collect()}
    written = {(r.user_id, r.user_idx) for r in spark.read.format("delta").load(samples_path).collect()}
    assert written == {(u, mapping[u]) for u in set(ratings["user_id"].tolist())}
    # and day 1's vocabulary (its recorded version) is a prefix of day 2's: append-only
    day1 = spark.read.format("delta").option("versionAsOf", first["vocab_versions"]["silver.user_vocab"]).load(
        USER_VOCAB.path(job_cfg.lake_dir))
    assert all(mapping[r.user_id] == r.user_idx for r in day1.collect())
    assert len(mapping) == second["users"] == len(set(ratings["user_id"].tolist()))
