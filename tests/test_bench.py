"""The model benchmark's peers read exactly our features and split: ``bench/peers.py`` against ``training.data``
and the feature contract, on a small synthetic lake (no peer library needed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import peers
from features.definitions import (DENSE_FEATURES, HISTORY_FEATURE, HISTORY_RATING_FEATURE, MAX_HISTORY,
                                  RATING_CENTER, RATING_LEVELS, SPARSE_FEATURES)
from training.data import read_ctr_shard, synthetic_vocab_sizes

ROWS = {"train": 40, "valid": 7, "test": 9}


def _prior(rng, n: int) -> tuple[pa.Array, pa.Array]:
    """A count column (int32, some 0) and its mean-rating column (double, null where the count is 0)."""
    events = rng.integers(0, 4, n) * rng.integers(0, 40, n)
    rating = np.round(rng.uniform(1, 5, n), 3)
    return pa.array(events.astype(np.int32)), pa.array([None if e == 0 else float(r) for e, r in zip(events, rating)],
                                                      pa.float64())


def _history(rng, n: int, n_items: int) -> tuple[list, list]:
    """``hist_item_idx`` and the aligned ``hist_rating`` of ``n`` rows: lengths 0..MAX_HISTORY (both ends drawn),
    levels 0..5 (0: unknown)."""
    lengths = [0, MAX_HISTORY, *rng.integers(0, MAX_HISTORY + 1, n - 2)]
    items = [rng.integers(1, n_items, k).astype(np.int32).tolist() for k in lengths]
    return items, [rng.integers(0, RATING_LEVELS, k).astype(np.int32).tolist() for k in lengths]


def _lake(root: Path, dense: bool = True, ratings: bool = True) -> Path:
    """A small ``export/`` with ``ROWS`` rows per split and DIN's ``hist_item_idx``; with ``dense`` also the four
    dense feature columns, with ``ratings`` also ``hist_rating`` (and ``rating`` in vocab_sizes.json)."""
    vocab = {**synthetic_vocab_sizes(), **({HISTORY_RATING_FEATURE.vocab: RATING_LEVELS} if ratings else {})}
    rng = np.random.default_rng(1)
    for split, n in ROWS.items():
        user, item = rng.integers(1, vocab["user"], n), rng.integers(1, vocab["item"], n)
        genres = [[int(i % 19) + 1, int(i % 7) + 1][: 1 + int(i % 2)] if i % 5 else [] for i in item]
        (user_events, user_rating), (item_events, item_rating) = _prior(rng, n), _prior(rng, n)
        hist, stars = _history(rng, n, vocab["item"])
        out = root / "export" / "ctr_samples" / f"split={split}"
        out.mkdir(parents=True)
        pq.write_table(pa.table({
            "user_idx": user.astype(np.int32), "item_idx": item.astype(np.int32),
            "age_idx": (user % 8).astype(np.int32), "gender_idx": (user % 3).astype(np.int32),
            "occupation_idx": (user % 22).astype(np.int32), "zip_idx": (user % 12).astype(np.int32),
            "genre_idx": pa.array(genres, pa.list_(pa.int32())),
            "label": rng.integers(0, 2, n).astype(np.int32),
            "hist_item_idx": pa.array(hist, pa.list_(pa.int32())),
            **({"hist_rating": pa.array(stars, pa.list_(pa.int32()))} if ratings else {}),
            **({"user_prior_events": user_events, "user_prior_rating": user_rating,
                "item_prior_events": item_events, "item_prior_rating": item_rating} if dense else {})}),
            out / "part-0.parquet")
    (root / "export" / "vocab_sizes.json").write_text(json.dumps(vocab))
    return root


def test_peer_features_are_the_declared_ones():
    assert (*peers.ONE_HOT, peers.MULTI_HOT) == tuple(f.name for f in SPARSE_FEATURES)
    assert peers.VOCAB == {f.name: f.vocab for f in SPARSE_FEATURES}
    assert [f.name for f in SPARSE_FEATURES if f.multi_hot] == [peers.MULTI_HOT]
    assert peers.DENSE == {f.name: f.kind for f in DENSE_FEATURES}
    assert peers.RATING_CENTER == RATING_CENTER
    assert (peers.HISTORY, peers.MAX_HISTORY) == (HISTORY_FEATURE.name, MAX_HISTORY)
    assert (peers.HISTORY_RATING, peers.RATING_VOCAB) == (HISTORY_RATING_FEATURE.name, HISTORY_RATING_FEATURE.vocab)


def _padded(shard, name: str) -> np.ndarray:
    """The values/offsets of ``name`` in a ``CtrShard`` as (N, MAX_HISTORY), right-padded with 0 (a longer list
    keeps its first MAX_HISTORY, as our DIN's ``to_padded_dense``)."""
    off, val = shard.offsets[name], shard.values[name]
    out = np.zeros((len(shard), MAX_HISTORY), np.int64)
    for r in range(len(shard)):
        row = val[off[r]:off[r + 1]][:MAX_HISTORY]
        out[r, :len(row)] = row
    return out


def test_read_split_matches_the_trainer(tmp_path):
    lake = _lake(tmp_path)
    dense = peers.exported_dense(lake)
    assert dense == tuple(f.name for f in DENSE_FEATURES)
    assert peers.exported_history_ratings(lake)
    for split in ROWS:
        ours = read_ctr_shard(lake, split, dense_features=DENSE_FEATURES)
        theirs = peers.read_split(lake, split, history=True, dense=dense, ratings=True)
        for name in peers.ONE_HOT:
            np.testing.assert_array_equal(theirs[name], ours.ids[name])
        np.testing.assert_array_equal(theirs["label"], ours.label)
        assert theirs["dense"].dtype == np.float32 and theirs["dense"].shape == (ROWS[split], 4)
        np.testing.assert_array_equal(theirs["dense"], ours.dense)
        assert (theirs["dense"][:, [1, 3]] == 0).any()  # the lake has nulls (no earlier event), read as 0
        off, val = ours.offsets["genre_idx"], ours.values["genre_idx"]
        padded = theirs["genre_idx"]  # (N, G), 0 pads
        for r in range(len(ours)):
            np.testing.assert_array_equal(padded[r][padded[r] > 0], val[off[r]:off[r + 1]])
        seq = read_ctr_shard(lake, split, features=(HISTORY_FEATURE, HISTORY_RATING_FEATURE))
        stars = _padded(seq, HISTORY_RATING_FEATURE.name)  # (N, L)
        assert theirs["hist_rating"].shape == (ROWS[split], MAX_HISTORY)
        np.testing.assert_array_equal(theirs["hist_rating"], stars)
        np.testing.assert_array_equal(theirs["hist_item_idx"], _padded(seq, HISTORY_FEATURE.name))
        np.testing.assert_array_equal(theirs["hist_len"], np.diff(seq.offsets[HISTORY_FEATURE.name]))
        assert stars.any() and (theirs["hist_len"] == 0).any()  # not vacuous: stars read, empty histories too
        real = np.arange(MAX_HISTORY) < theirs["hist_len"][:, None]  # (N, L)
        assert (stars[~real] == 0).all() and (stars[real] == 0).any()  # pads are 0; unknown levels are real 0s


def test_read_split_rejects_misaligned_ratings(tmp_path):
    lake = _lake(tmp_path)
    path = lake / "export" / "ctr_samples" / "split=valid" / "part-0.parquet"
    t = pq.read_table(path)
    stars = t.column("hist_rating").to_pylist()
    stars[3] = stars[3] + [5]
    pq.write_table(t.set_column(t.schema.get_field_index("hist_rating"), "hist_rating",
                                pa.array(stars, pa.list_(pa.int32()))), path)
    with pytest.raises(ValueError, match="row 3"):
        peers.read_split(lake, "valid", history=True, ratings=True)


def test_read_split_without_history_ratings(tmp_path):
    """An export without ``hist_rating`` (written before the features stage exported it) gives no ratings, as
    ``training.train`` reads them only when ``training.data.exported_columns`` has the column; one with the column
    but no ``rating`` vocabulary is an error."""
    lake = _lake(tmp_path / "old", ratings=False)
    assert not peers.exported_history_ratings(lake)
    assert "hist_rating" not in peers.read_split(lake, "train", history=True)
    lake = _lake(tmp_path / "new")
    vocab = lake / "export" / "vocab_sizes.json"
    vocab.write_text(json.dumps({k: v for k, v in json.loads(vocab.read_text()).items() if k != "rating"}))
    with pytest.raises(KeyError, match="rating"):
        peers.exported_history_ratings(lake)


def test_read_split_without_dense_columns(tmp_path):
    """An export without the dense columns (bench.models' generated data) gives no dense features, as
    ``training.data.exported_dense_features`` does."""
    lake = _lake(tmp_path, dense=False)
    assert peers.exported_dense(lake) == ()
    assert peers.read_split(lake, "train")["dense"].shape == (ROWS["train"], 0)


def test_recbole_atomic_files_keep_split_order_and_features(tmp_path):
    lake = _lake(tmp_path / "lake")
    dense = peers.exported_dense(lake)
    counts = peers.write_recbole_atomic(lake, tmp_path / "atomic", "x", history=True, dense=dense, ratings=True)
    assert counts == ROWS
    d = tmp_path / "atomic" / "x"
    users = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in (d / "x.user").read_text().splitlines()[1:]}
    items = {ln.split("\t")[0]: ln.split("\t")[1] for ln in (d / "x.item").read_text().splitlines()[1:]}
    for split in ROWS:
        s = peers.read_split(lake, split, dense=dense)
        lines = (d / f"x.{split}.inter").read_text().splitlines()
        assert lines[0].split("\t") == ["user_id:token", "item_id:token", "label:float",
                                        *(f"{f.name}:float" for f in DENSE_FEATURES), "item_id_list:token_seq",
                                        "hist_rating:token_seq"]
        rows = [ln.split("\t") for ln in lines[1:]]
        assert [r[:3] for r in rows] == [
            [str(u), str(i), f"{y:g}"] for u, i, y in zip(s["user_idx"], s["item_idx"], s["label"])]
        written = np.array([[float(v) for v in r[3:-2]] for r in rows]).astype(np.float32)  # as RecBole reads them
        np.testing.assert_array_equal(written, read_ctr_shard(lake, split, dense_features=DENSE_FEATURES).dense)
        seq = read_ctr_shard(lake, split, features=(HISTORY_FEATURE, HISTORY_RATING_FEATURE))
        for name, column in ((HISTORY_FEATURE.name, -2), (HISTORY_RATING_FEATURE.name, -1)):
            off, val = seq.offsets[name], seq.values[name]  # the same positions in both: RecBole pads both alike
            assert [r[column].split() for r in rows] == [
                [str(v) for v in val[off[k]:off[k + 1]]] for k in range(len(rows))]
        for r in range(len(s["label"])):
            assert users[str(s["user_idx"][r])] == [str(s[c][r]) for c in
                                                    ("age_idx", "gender_idx", "occupation_idx", "zip_idx")]
            assert items[str(s["item_idx"][r])] == " ".join(str(g) for g in s["genre_idx"][r] if g)


def _peers_python() -> Path:
    """The peers' interpreter if ``bench.models`` has built their environment (it builds it on first use)."""
    from bench import models

    env = models.CACHE / f"venv-peers-{hashlib.sha256(models.PEERS_LOCK.read_bytes()).hexdigest()[:16]}"
    if not (env / ".complete").exists():
        pytest.skip(f"the peers' environment is not built ({env}; python -m bench.models builds it)")
    return env / "bin" / "python"


def test_deepctr_din_reads_the_rating_sequence(tmp_path):
    """With ``ratings`` the DeepCTR-Torch columns hold the behaviours' stars as a mean-pooled sequence of its own
    ``rating`` table masked by ``hist_len``, outside DIN's ``history_feature_list``, so DeepCTR's DIN pools it into
    its DNN input (D wider, as ours); without, nothing changes. Run in the peers' environment."""
    lake = _lake(tmp_path / "lake")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        from pathlib import Path
        spec = importlib.util.spec_from_file_location("peers", {str(Path(peers.__file__))!r})
        peers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peers)
        from deepctr_torch.models import DIN
        sizes = peers.vocab_sizes(Path({str(lake)!r}))
        out = {{}}
        for ratings in (False, True):
            cols = peers.deepctr_columns(sizes, 2, 8, history=True, ratings=ratings)
            model = DIN(cols, ["item_idx"], dnn_hidden_units=(4,), device="cpu")
            out[str(ratings)] = {{"columns": [[type(c).__name__, c.name, c.vocabulary_size, c.embedding_dim,
                                              getattr(c, "maxlen", None), getattr(c, "combiner", None),
                                              getattr(c, "length_name", None), c.embedding_name] for c in cols],
                                 "pooled": [c.name for c in model.sparse_varlen_feature_columns],
                                 "attended": [c.name for c in model.history_feature_columns],
                                 "dnn_in": model.dnn.linears[0].in_features}}
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(_peers_python()), "-W", "ignore", "-c", script], env=env, capture_output=True,
                         text=True, check=True)
    without, with_ = (json.loads(run.stdout.splitlines()[-1])[k] for k in ("False", "True"))
    assert with_["columns"][:-1] == without["columns"]  # the rating sequence is the only addition
    assert with_["columns"][-1] == ["VarLenSparseFeat", "hist_rating", RATING_LEVELS, 8, MAX_HISTORY, "mean",
                                    "hist_len", "hist_rating"]
    assert "hist_rating" not in [c[1] for c in without["columns"]]
    assert with_["attended"] == without["attended"] == ["hist_item_idx"]
    assert with_["pooled"] == ["genre_idx", "hist_rating"] and without["pooled"] == ["genre_idx"]
    assert with_["dnn_in"] == without["dnn_in"] + 8  # side features + candidate + interest + pooled stars


def test_ingest_delta_commits_reads_rows_and_files_whatever_the_operation(tmp_path):
    """The latency part finds each row's visible time from the commit that added its file: a MERGE counts its
    inserted rows, a write its output rows, a commit without metrics none."""
    from bench import ingest

    log = tmp_path / "t" / "_delta_log"
    log.mkdir(parents=True)
    commits = [
        [{"commitInfo": {"timestamp": 1000, "operation": "CREATE TABLE"}}],
        [{"commitInfo": {"timestamp": 2500, "operation": "MERGE",
                         "operationMetrics": {"numTargetRowsInserted": "7", "numOutputRows": "9"}}},
         {"add": {"path": "event_date=2024-01-01/part-a.parquet"}}],
        [{"commitInfo": {"timestamp": 4000, "operation": "WRITE", "operationMetrics": {"numOutputRows": "5"}}},
         {"add": {"path": "part-b.parquet"}}, {"add": {"path": "event_date=2024-01-02/part-c.parquet"}}],
    ]
    for version, actions in enumerate(commits):
        (log / f"{version:020d}.json").write_text("\n".join(json.dumps(a) for a in actions) + "\n")
    got = [(c["version"], c["time"], c["operation"], c["rows"], c["files"]) for c in ingest.delta_commits(log.parent)]
    assert got == [(0, 1.0, "CREATE TABLE", 0, []), (1, 2.5, "MERGE", 7, ["part-a.parquet"]),
                   (2, 4.0, "WRITE", 5, ["part-b.parquet", "part-c.parquet"])]


def test_ingest_results_render_the_three_sinks_and_keep_other_sizes(tmp_path):
    """Ratios are ours' events/s over each sink's in the same round; a size's record replaces only that size's; the
    pre-issue-18 layout becomes the "earlier" table."""
    from bench import ingest

    path = tmp_path / "ingest.json"
    path.write_text(json.dumps({"1000000": {"events": 1_000_000, "ingest_events_per_s": 3468.0, "wall_s": 288.3,
                                            "p50_s": 132.4, "p95_s": 139.6, "measured_utc": "2026-11-22 01:37",
                                            "commit": "afe8173"}}))
    settings = {"max_offsets": 50_000, "repeats": 2, "warmup": 20_000, "seed": 7, "chunk": 20_000,
                "dedup_delay": "30 days", "plain_partitioned": True, "rocksdb": False}

    def record(n: int, per_s: dict) -> dict:
        runs = [{"sink": sink, "repeat": rep, "wall_s": n / v, "events_per_s": v, "rows_out": n, "batches": 2,
                 "load": [1.0, 1.5], "dropped_by_watermark": 0 if sink == "dedup" else None,
                 **({"steps": {"batches": 2, "messages": n / 2, "validate": 3.0, "write": 1.0}} if sink == "ours"
                    else {})}
                for rep in range(2) for sink, v in zip(ingest.SINKS, per_s[rep])]
        return {"events": n, "fill_s": 10.0, "produce_events_per_s": n / 10, "runs": runs, "load": [1.0, 2.0],
                "settings": settings, "commit": "abc1234", "measured_utc": "2026-12-08 02:00", "machine": "m",
                "command": "python -m bench.ingest"}

    ingest.save_results(path, [record(20_000, {0: (900.0, 3000.0, 1000.0), 1: (800.0, 2000.0, 1000.0)})], None)
    stored = ingest.save_results(path, [record(10_000, {0: (700.0, 1400.0, 1000.0), 1: (700.0, 1400.0, 1000.0)}),
                                        record(20_000, {0: (600.0, 1200.0, 1000.0), 1: (900.0, 900.0, 1000.0)})],
                                 None)
    assert list(stored["throughput"]) == ["10000", "20000"] and list(stored["earlier"]) == ["1000000"]
    assert ingest.ratios(stored["throughput"]["20000"]["runs"]) == {
        (0, "ours"): 1.0, (0, "plain"): 0.5, (0, "dedup"): 0.6, (1, "ours"): 1.0, (1, "plain"): 1.0, (1, "dedup"): 0.9}
    text = ingest.report(ingest.load_results(path))
    assert "| dedup | 2 | 20,000 | 20,000 | 2 | 20.0 | 1,000 | 0.90 |" in text
    assert "ours / dedup: 0.75 (median over 2 round(s)); target >= 0.8: not met." in text  # (0.6 + 0.9) / 2
    assert "ours / dedup: 0.70 (median over 2 round(s)); target >= 0.8: not met." in text  # the 10,000 size
    assert "| round | micro-batches | mean messages per batch | validate s | write s | total s |" in text
    assert "| 1,000,000 | 3,468 | 288.3 | 132.4 | 139.6 | 2026-11-22 01:37, afe8173 |" in text
    assert "Latency under a steady producer rate" not in text
