"""pipelines.features_batch against naive pure-Python oracles on a slice of the real MovieLens-100K.

One module-scoped fixture runs the job three times on a fresh lake and every Spark test reads those runs:

1. bronze = the ratings of users 1..40 (with crafted ties), run;
2. append the ratings of users 41..50 (new users and items, some rated earlier than old ones' first_seen), run;
3. run again with bronze unchanged, through the stage's command line (``spark-submit`` of the script, as
   ``make demo`` and the DAG run it): idempotence, and the entry point.

Bronze rows are written directly with Spark in the ``bronze.interactions`` schema (event_id = ``ml100k-%06d`` of
the row's index in the ratings file), exactly as the ingest stage writes them; nothing here depends on ingest.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from features.config import ROOT, PlatformConfig
from features.definitions import (CATEGORY_FEATURES, MAX_HISTORY, RATING_LEVELS, UNKNOWN_INDEX, ZIP_PREFIX_LEN,
                                  age_bucket, label_of)
from features.errors import TableNotFoundError
from features.tables import (
    BRONZE_INTERACTIONS,
    CATEGORY_VOCAB,
    CTR_SAMPLES,
    ITEM_FEATURES,
    ITEM_SEQUENCES,
    ITEM_VOCAB,
    USER_FEATURES,
    USER_VOCAB,
    parquet_export,
)
from features.tables import vocab_sizes_path
from pipelines.features_batch import rating_level, split_bounds

FIRST_USERS, ALL_USERS = range(1, 41), range(1, 51)
#: Events around the train/valid boundary of the 50-user slice forced to one timestamp (the tie straddles it).
BOUNDARY_TIE = 9
#: A user whose first events are forced to one second (ties inside one user's history).
TIED_USER, TIED_EVENTS = 7, 6


# ------------------------------------------------------------------------------------------------ bronze helpers


def ratings_slice(ratings: pd.DataFrame) -> pd.DataFrame:
    """Ratings of users 1..50 with their file row index as ``row``, and crafted ties: ``BOUNDARY_TIE`` events
    around the 80% position share one second, and ``TIED_USER``'s first ``TIED_EVENTS`` events share one."""
    df = ratings[ratings["user_id"].isin(ALL_USERS)].copy()
    df["row"] = df.index
    df = df.sort_values(["timestamp", "row"]).reset_index(drop=True)
    train_end = split_bounds(len(df))[0][1]
    tie = slice(train_end - BOUNDARY_TIE // 2 - 1, train_end + BOUNDARY_TIE // 2)  # 9 positions around the cut
    df.loc[df.index[tie], "timestamp"] = df["timestamp"].iloc[tie.start]
    user = df.index[df["user_id"] == TIED_USER][:TIED_EVENTS]
    df.loc[user, "timestamp"] = df.loc[user[0], "timestamp"]
    return df


def bronze_rows(df: pd.DataFrame) -> list[tuple]:
    """Rows in the ``bronze.interactions`` schema, as the ingest stage writes them."""
    now = datetime.now(timezone.utc)
    out = []
    for r in df.itertuples(index=False):
        t = datetime.fromtimestamp(int(r.timestamp), tz=timezone.utc)
        out.append((f"ml100k-{int(r.row):06d}", int(r.user_id), int(r.item_id), float(r.rating), t, t.date(),
                    int(r.user_id) % 3, int(r.row), now, "rating") + (None,) * (len(BRONZE_INTERACTIONS.columns) - 10))
    return out


def write_bronze(spark, lake: Path, df: pd.DataFrame, mode: str) -> None:
    from pyspark.sql.types import StructType

    frame = spark.createDataFrame(bronze_rows(df), StructType.fromDDL(BRONZE_INTERACTIONS.schema))
    frame.write.format("delta").mode(mode).partitionBy(*BRONZE_INTERACTIONS.partition_by).save(
        BRONZE_INTERACTIONS.path(lake))


def fresh_cfg(cfg: PlatformConfig, base: Path) -> PlatformConfig:
    """``cfg`` with data and artifacts under ``base``; raw_dir still reads the real MovieLens files (symlink)."""
    (base / "data" / "raw").mkdir(parents=True)
    (base / "data" / "raw" / "ml-100k").symlink_to(ROOT / "data" / "raw" / "ml-100k")
    return cfg.model_copy(update={"data_dir": base / "data", "artifacts_dir": base / "artifacts"})


# --------------------------------------------------------------------------------------------------- snapshots


def rows(spark, spec, lake, key: str) -> list[dict]:
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(spec.path(lake))
    if "event_time" in df.columns:
        df = df.withColumn("ts", F.unix_seconds("event_time"))
    if "first_seen" in df.columns:
        df = df.withColumn("first_seen", F.unix_seconds("first_seen"))
    return sorted((r.asDict(recursive=True) for r in df.collect()), key=lambda d: tuple(d[k] for k in key.split(",")))


@dataclass
class Run:
    result: dict
    user_vocab: dict[int, tuple[int, int]]  # user_id -> (user_idx, first_seen s)
    item_vocab: dict[int, tuple[int, int]]
    category_vocab: dict[tuple[str, str], int]
    samples: list[dict]  # sorted by event_id


def snapshot(spark, lake: Path, result: dict) -> Run:
    return Run(
        result=result,
        user_vocab={r["user_id"]: (r["user_idx"], r["first_seen"]) for r in rows(spark, USER_VOCAB, lake, "user_id")},
        item_vocab={r["item_id"]: (r["item_idx"], r["first_seen"]) for r in rows(spark, ITEM_VOCAB, lake, "item_id")},
        category_vocab={(r["feature"], r["value"]): r["idx"]
                        for r in rows(spark, CATEGORY_VOCAB, lake, "feature,value")},
        samples=rows(spark, CTR_SAMPLES, lake, "event_id"),
    )


@dataclass
class Job:
    cfg: PlatformConfig
    lake: Path
    events: pd.DataFrame  # the whole slice (runs 2 and 3), row = file row index
    first: Run
    second: Run
    third: Run


@pytest.fixture(scope="module")
def job(spark, cfg, movielens, tmp_path_factory) -> Job:
    from pipelines.features_batch import run_features

    fcfg = fresh_cfg(cfg, tmp_path_factory.mktemp("features"))
    lake = Path(fcfg.lake_dir)
    events = ratings_slice(movielens.ratings)
    old = events[events["user_id"].isin(FIRST_USERS)]
    write_bronze(spark, lake, old, "overwrite")
    first = snapshot(spark, lake, run_features(spark, fcfg))
    write_bronze(spark, lake, events[~events["user_id"].isin(FIRST_USERS)], "append")
    second = snapshot(spark, lake, run_features(spark, fcfg))
    third = snapshot(spark, lake, run_stage_command(fcfg))
    return Job(fcfg, lake, events, first, second, third)


def run_stage_command(cfg: PlatformConfig) -> dict:
    """Run ``pipelines.stages.build_command("features")`` against ``cfg``'s folders; return its stage result."""
    from features.results import read_stage_result
    from pipelines.stages import build_command, stage_env

    env = dict(os.environ, **stage_env(), RECSYS_DATA_DIR=str(cfg.data_dir),
               RECSYS_ARTIFACTS_DIR=str(cfg.artifacts_dir),
               RECSYS_SPARK__SHUFFLE_PARTITIONS=str(cfg.spark.shuffle_partitions))
    proc = subprocess.run(build_command("features"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"features stage failed:\n{proc.stderr[-4000:]}"
    return read_stage_result(cfg, "features")


# ------------------------------------------------------------------------------------------------------ oracles


def naive_vocab(df: pd.DataFrame, id_col: str, start: int = 1) -> dict[int, int]:
    """ids numbered from ``start`` in order of (first event second, id)."""
    first = sorted((int(t), int(i)) for i, t in df.groupby(id_col)["timestamp"].min().items())
    return {i: start + k for k, (_, i) in enumerate(first)}


def naive_order(df: pd.DataFrame) -> list[tuple[int, str]]:
    """(second, event_id) of every event, in the split order."""
    return sorted((int(r.timestamp), f"ml100k-{int(r.row):06d}") for r in df.itertuples(index=False))


# ---------------------------------------------------------------------------------------------------- no Spark


@pytest.mark.integration
def test_rating_level_rounds_half_stars_up_into_1_to_5(spark):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(0.5,), (1.0,), (2.5,), (3.4,), (4.5,), (5.0,), (None,)], "rating double")
    assert [r[0] for r in df.select(rating_level(F.col("rating"))).collect()] == [1, 1, 3, 3, 5, 5, UNKNOWN_INDEX]


@pytest.mark.parametrize("n", [0, 1, 9, 10, 11, 5354, 99_999, 100_000])
def test_split_bounds_are_floor_of_cumulative_fractions(n):
    assert split_bounds(n) == [("train", n * 8 // 10), ("valid", n * 9 // 10), ("test", n)]


# ------------------------------------------------------------------------------------------------------- Spark


@pytest.mark.integration
def test_missing_bronze_names_the_table_and_the_fix(spark, cfg, tmp_path):
    from pipelines.features_batch import run_features

    with pytest.raises(TableNotFoundError, match="bronze.interactions.*run the ingest stage"):
        run_features(spark, fresh_cfg(cfg, tmp_path))


@pytest.mark.integration
def test_tables_have_exactly_the_contract_schemas(job, spark):
    from pyspark.sql.types import StructType

    for spec in (USER_VOCAB, ITEM_VOCAB, USER_FEATURES, ITEM_FEATURES, CATEGORY_VOCAB, CTR_SAMPLES, ITEM_SEQUENCES):
        got = spark.read.format("delta").load(spec.path(job.lake)).schema
        want = StructType.fromDDL(spec.schema)
        assert [(f.name, f.dataType) for f in got.fields] == [(f.name, f.dataType) for f in want.fields], spec.name
    parts = sorted(p.name for p in Path(CTR_SAMPLES.path(job.lake)).iterdir() if p.name.startswith("split="))
    assert parts == ["split=test", "split=train", "split=valid"]


@pytest.mark.integration
def test_history_is_strictly_earlier_items_last_50(job):
    """Every sample's hist_item_idx and hist_rating against a naive loop over the user's events."""
    item_idx = {i: idx for i, (idx, _) in job.second.item_vocab.items()}
    by_user = defaultdict(list)
    for r in job.events.itertuples(index=False):
        by_user[int(r.user_id)].append((int(r.timestamp), f"ml100k-{int(r.row):06d}", item_idx[int(r.item_id)],
                                        int(r.rating)))  # MovieLens-100K's stars are whole: their own level
    expected, expected_rating = {}, {}
    for user_events in by_user.values():
        for ts, eid, _, _ in user_events:
            earlier = sorted(e for e in user_events if e[0] < ts)[-MAX_HISTORY:]
            expected[eid] = [e[2] for e in earlier]
            expected_rating[eid] = [e[3] for e in earlier]
    got = {s["event_id"]: s["hist_item_idx"] for s in job.second.samples}
    assert got == expected
    assert {s["event_id"]: s["hist_rating"] for s in job.second.samples} == expected_rating
    assert {r for h in expected_rating.values() for r in h} == {1, 2, 3, 4, 5}  # every level exercised
    assert all(s["hist_len"] == len(s["hist_item_idx"]) for s in job.second.samples)
    lengths = [len(h) for h in got.values()]
    assert max(lengths) == MAX_HISTORY and min(lengths) == 0  # truncation and empty histories both exercised
    # the crafted same-second events of TIED_USER see none of each other
    user = [s for s in job.second.samples if s["user_id"] == TIED_USER]
    tied = [s for s in user if s["ts"] == min(u["ts"] for u in user)]
    assert len(tied) >= TIED_EVENTS and all(s["hist_len"] == 0 for s in tied)


@pytest.mark.integration
def test_prior_counters_are_strictly_earlier_events(job):
    """user_/item_prior_events and _rating of every sample against a naive loop over the entity's events."""
    for entity, key in (("user", "user_id"), ("item", "item_id")):
        events = defaultdict(list)
        for r in job.events.itertuples(index=False):
            events[int(getattr(r, key))].append((int(r.timestamp), float(r.rating)))
        for s in job.second.samples:
            earlier = [rating for ts, rating in events[s[key]] if ts < s["ts"]]
            assert s[f"{entity}_prior_events"] == len(earlier), (entity, s["event_id"])
            if earlier:
                mean = sum(earlier) / len(earlier)
                assert s[f"{entity}_prior_rating"] == pytest.approx(mean), (entity, s["event_id"])
            else:
                assert s[f"{entity}_prior_rating"] is None, (entity, s["event_id"])
    counts = [s["user_prior_events"] for s in job.second.samples]
    assert min(counts) == 0 and max(counts) > MAX_HISTORY  # first events and long users both exercised
    user = [s for s in job.second.samples if s["user_id"] == TIED_USER]
    tied = [s for s in user if s["ts"] == min(u["ts"] for u in user)]
    assert all(s["user_prior_events"] == 0 for s in tied)  # same-second events do not count each other


@pytest.mark.integration
def test_global_time_split_80_10_10_with_ties_in_event_id_order(job):
    order = naive_order(job.events)
    n = len(order)
    (_, train_end), (_, valid_end), _ = split_bounds(n)
    expected = {eid: "train" if k < train_end else "valid" if k < valid_end else "test"
                for k, (_, eid) in enumerate(order)}
    got = {s["event_id"]: s["split"] for s in job.second.samples}
    assert got == expected
    counts = {name: sum(v == name for v in got.values()) for name in ("train", "valid", "test")}
    assert counts == {"train": train_end, "valid": valid_end - train_end, "test": n - valid_end}
    assert job.second.result["samples"] == counts
    key = {s["event_id"]: (s["ts"], s["event_id"]) for s in job.second.samples}
    by_split = {name: [key[e] for e, v in got.items() if v == name] for name in counts}
    assert max(by_split["train"]) < min(by_split["valid"]) and max(by_split["valid"]) < min(by_split["test"])
    assert max(t for t, _ in by_split["train"]) <= min(t for t, _ in by_split["valid"])
    assert max(t for t, _ in by_split["valid"]) <= min(t for t, _ in by_split["test"])
    # the crafted tie straddles train/valid and is cut in event_id order
    boundary_ts = order[train_end][0]
    tie = sorted((eid, got[eid]) for t, eid in order if t == boundary_ts)
    assert len(tie) >= BOUNDARY_TIE and {"train", "valid"} <= {v for _, v in tie}
    assert [v for _, v in tie] == sorted((v for _, v in tie), key=["train", "valid"].index)


@pytest.mark.integration
def test_labels_ratings_and_side_indices(job, movielens):
    rating = {f"ml100k-{int(r.row):06d}": float(r.rating) for r in job.events.itertuples(index=False)}
    users = movielens.users.set_index("user_id")
    genres = movielens.items.set_index("item_id")["genres"]
    cat = job.second.category_vocab
    positives = defaultdict(int)
    for s in job.second.samples:
        assert s["rating"] == rating[s["event_id"]]
        assert s["label"] == label_of(rating[s["event_id"]])
        positives[s["split"]] += s["label"]
        u = users.loc[s["user_id"]]
        assert (s["age_idx"], s["gender_idx"], s["occupation_idx"], s["zip_idx"]) == (
            cat["age_bucket", age_bucket(int(u["age"]))], cat["gender", u["gender"]],
            cat["occupation", u["occupation"]], cat["zip_prefix", u["zip_code"][:ZIP_PREFIX_LEN]])
        assert s["genre_idx"] == [cat["genre", g] for g in genres[s["item_id"]].split("|")]
        assert s["user_idx"] == job.second.user_vocab[s["user_id"]][0]
        assert s["item_idx"] == job.second.item_vocab[s["item_id"]][0]
    assert job.second.result["positives"] == dict(positives)
    assert sum(positives.values()) == int((job.events["rating"] >= 4).sum())


@pytest.mark.integration
def test_vocabularies_are_append_only_across_runs(job):
    first_events = job.events[job.events["user_id"].isin(FIRST_USERS)]
    # run 1: dense 1..n in (first_seen, id) order
    assert {u: idx for u, (idx, _) in job.first.user_vocab.items()} == naive_vocab(first_events, "user_id")
    assert {i: idx for i, (idx, _) in job.first.item_vocab.items()} == naive_vocab(first_events, "item_id")
    # run 2: old entries unchanged (index and first_seen); new ones continue from max + 1 in (first_seen, id)
    for old, new in ((job.first.user_vocab, job.second.user_vocab), (job.first.item_vocab, job.second.item_vocab)):
        assert {k: new[k] for k in old} == old
    new_events = job.events[~job.events["user_id"].isin(FIRST_USERS)]
    new_users = naive_vocab(new_events, "user_id", start=len(job.first.user_vocab) + 1)
    assert {u: job.second.user_vocab[u][0] for u in new_users} == new_users
    new_items = job.events[~job.events["item_id"].isin(job.first.item_vocab)]
    expect_items = naive_vocab(new_items, "item_id", start=len(job.first.item_vocab) + 1)
    assert len(expect_items) > 0
    assert {i: job.second.item_vocab[i][0] for i in expect_items} == expect_items
    # a new user rated before some old user's first event: still numbered after every old user
    assert new_events["timestamp"].min() < max(fs for _, fs in job.first.user_vocab.values())
    # run 3 changes nothing; index 0 never names a known id
    assert (job.third.user_vocab, job.third.item_vocab) == (job.second.user_vocab, job.second.item_vocab)
    assert job.third.category_vocab == job.second.category_vocab == job.first.category_vocab
    for vocab in (job.second.user_vocab, job.second.item_vocab):
        assert sorted(idx for idx, _ in vocab.values()) == list(range(1, len(vocab) + 1))


@pytest.mark.integration
def test_category_vocab_sorted_values_from_1(job, movielens):
    users = movielens.users
    values = {
        "age_bucket": {age_bucket(int(a)) for a in users["age"]},
        "gender": set(users["gender"]),
        "occupation": set(users["occupation"]),
        "zip_prefix": {z[:ZIP_PREFIX_LEN] for z in users["zip_code"]},
        "genre": {g for gs in movielens.items["genres"] for g in gs.split("|") if g},
    }
    expected = {(f, v): k + 1 for f in CATEGORY_FEATURES for k, v in enumerate(sorted(values[f]))}
    assert job.second.category_vocab == expected
    assert UNKNOWN_INDEX not in job.second.category_vocab.values()


@pytest.mark.integration
def test_vocab_sizes_json_counts_index_0(job, movielens):
    sizes = json.loads(vocab_sizes_path(job.lake).read_text())
    per_feature = defaultdict(int)
    for f, _ in job.second.category_vocab:
        per_feature[f] += 1
    assert sizes == {"user": len(ALL_USERS) + 1, "item": job.events["item_id"].nunique() + 1,
                     **{f: per_feature[f] + 1 for f in CATEGORY_FEATURES}, "rating": RATING_LEVELS}
    assert sizes["genre"] == 19 + 1 and sizes["gender"] == 2 + 1 and sizes["occupation"] == 21 + 1
    assert job.second.result["vocab_sizes"] == sizes
    assert (job.second.result["users"], job.second.result["items"]) == (sizes["user"] - 1, sizes["item"] - 1)


@pytest.mark.integration
def test_item_sequences_are_train_positives_in_time_order(job, spark):
    item_idx = {i: idx for i, (idx, _) in job.second.item_vocab.items()}
    train = {eid for _, eid in naive_order(job.events)[: split_bounds(len(job.events))[0][1]]}
    seqs = defaultdict(list)
    for r in job.events.itertuples(index=False):
        eid = f"ml100k-{int(r.row):06d}"
        if eid in train and r.rating >= 4:
            seqs[int(r.user_id)].append((int(r.timestamp), eid, item_idx[int(r.item_id)]))
    expected = {u: [e[2] for e in sorted(s)] for u, s in seqs.items() if len(s) >= 2}
    got = rows(spark, ITEM_SEQUENCES, job.lake, "user_id")
    assert {r["user_id"]: r["item_idx"] for r in got} == expected
    assert all(r["seq_len"] == len(r["item_idx"]) and r["user_idx"] == job.second.user_vocab[r["user_id"]][0]
               for r in got)
    assert job.second.result["sequences"] == len(expected)


@pytest.mark.integration
def test_rerun_is_idempotent_and_exports_match(job, spark):
    assert job.third.samples == job.second.samples
    assert {k: v for k, v in job.third.result.items() if k != "features_wall_s"} == \
        {k: v for k, v in job.second.result.items() if k != "features_wall_s"}
    exported = spark.read.parquet(parquet_export(CTR_SAMPLES, job.lake))
    assert exported.count() == len(job.second.samples)
    assert sorted(p.name for p in Path(parquet_export(CTR_SAMPLES, job.lake)).glob("split=*")) == \
        ["split=test", "split=train", "split=valid"]
    for spec in (ITEM_SEQUENCES, ITEM_VOCAB, USER_VOCAB):
        delta = spark.read.format("delta").load(spec.path(job.lake))
        plain = spark.read.parquet(parquet_export(spec, job.lake))
        assert sorted(plain.select(*delta.columns).collect()) == sorted(delta.collect()), spec.name
