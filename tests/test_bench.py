"""The model benchmark's peers read exactly our features and split: ``bench/peers.py`` against ``training.data``
and the feature contract, on a small synthetic lake (no peer library needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import peers
from features.definitions import DENSE_FEATURES, RATING_CENTER, SPARSE_FEATURES
from training.data import read_ctr_shard, synthetic_vocab_sizes

ROWS = {"train": 40, "valid": 7, "test": 9}


def _prior(rng, n: int) -> tuple[pa.Array, pa.Array]:
    """A count column (int32, some 0) and its mean-rating column (double, null where the count is 0)."""
    events = rng.integers(0, 4, n) * rng.integers(0, 40, n)
    rating = np.round(rng.uniform(1, 5, n), 3)
    return pa.array(events.astype(np.int32)), pa.array([None if e == 0 else float(r) for e, r in zip(events, rating)],
                                                      pa.float64())


def _lake(root: Path, dense: bool = True) -> Path:
    """A small ``export/`` with ``ROWS`` rows per split; with ``dense`` also the four dense feature columns."""
    vocab = synthetic_vocab_sizes()
    rng = np.random.default_rng(1)
    for split, n in ROWS.items():
        user, item = rng.integers(1, vocab["user"], n), rng.integers(1, vocab["item"], n)
        genres = [[int(i % 19) + 1, int(i % 7) + 1][: 1 + int(i % 2)] if i % 5 else [] for i in item]
        (user_events, user_rating), (item_events, item_rating) = _prior(rng, n), _prior(rng, n)
        out = root / "export" / "ctr_samples" / f"split={split}"
        out.mkdir(parents=True)
        pq.write_table(pa.table({
            "user_idx": user.astype(np.int32), "item_idx": item.astype(np.int32),
            "age_idx": (user % 8).astype(np.int32), "gender_idx": (user % 3).astype(np.int32),
            "occupation_idx": (user % 22).astype(np.int32), "zip_idx": (user % 12).astype(np.int32),
            "genre_idx": pa.array(genres, pa.list_(pa.int32())),
            "label": rng.integers(0, 2, n).astype(np.int32),
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


def test_read_split_matches_the_trainer(tmp_path):
    lake = _lake(tmp_path)
    dense = peers.exported_dense(lake)
    assert dense == tuple(f.name for f in DENSE_FEATURES)
    for split in ROWS:
        ours = read_ctr_shard(lake, split, dense_features=DENSE_FEATURES)
        theirs = peers.read_split(lake, split, dense=dense)
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


def test_read_split_without_dense_columns(tmp_path):
    """An export without the dense columns (bench.models' generated data) gives no dense features, as
    ``training.data.exported_dense_features`` does."""
    lake = _lake(tmp_path, dense=False)
    assert peers.exported_dense(lake) == ()
    assert peers.read_split(lake, "train")["dense"].shape == (ROWS["train"], 0)


def test_recbole_atomic_files_keep_split_order_and_features(tmp_path):
    lake = _lake(tmp_path / "lake")
    dense = peers.exported_dense(lake)
    counts = peers.write_recbole_atomic(lake, tmp_path / "atomic", "x", dense=dense)
    assert counts == ROWS
    d = tmp_path / "atomic" / "x"
    users = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in (d / "x.user").read_text().splitlines()[1:]}
    items = {ln.split("\t")[0]: ln.split("\t")[1] for ln in (d / "x.item").read_text().splitlines()[1:]}
    for split in ROWS:
        s = peers.read_split(lake, split, dense=dense)
        lines = (d / f"x.{split}.inter").read_text().splitlines()
        assert lines[0].split("\t") == ["user_id:token", "item_id:token", "label:float",
                                        *(f"{f.name}:float" for f in DENSE_FEATURES)]
        rows = [ln.split("\t") for ln in lines[1:]]
        assert [r[:3] for r in rows] == [
            [str(u), str(i), f"{y:g}"] for u, i, y in zip(s["user_idx"], s["item_idx"], s["label"])]
        written = np.array([[float(v) for v in r[3:]] for r in rows]).astype(np.float32)  # as RecBole reads them
        np.testing.assert_array_equal(written, read_ctr_shard(lake, split, dense_features=DENSE_FEATURES).dense)
        for r in range(len(s["label"])):
            assert users[str(s["user_idx"][r])] == [str(s[c][r]) for c in
                                                    ("age_idx", "gender_idx", "occupation_idx", "zip_idx")]
            assert items[str(s["item_idx"][r])] == " ".join(str(g) for g in s["genre_idx"][r] if g)


def test_ingest_results_keep_every_measured_size(tmp_path):
    """A run that measures one size re-renders the section with the sizes stored by earlier runs, replaces only
    its own size's row, and marks a planned size without a row as not measured."""
    import argparse

    from bench import ingest

    args = argparse.Namespace(interval_s=1.0, max_offsets=50_000, rate=0.0, chunk=20_000, warmup=20_000, seed=7,
                              planned="1000000,10000000")
    row = lambda n, rate: {"events": n, "bronze_rows": n, "produce_events_per_s": 6000.0, "ingest_events_per_s": rate,
                           "wall_s": n / rate, "p50_s": 1.0, "p95_s": 2.0, "merges": 3, "load": (1.0, 2.0),
                           "steps": {}}
    path = tmp_path / "ingest.json"
    ingest.save_result(path, row(1_000_000, 3000.0), args)
    text = ingest.report(ingest.save_result(path, row(1_000_000, 3500.0), args), args)
    assert "| 1,000,000 | 1,000,000 | 6,000 | 3,500 |" in text and "| 3,000 |" not in text
    assert "**10,000,000 events: not measured yet.**" in text
    bigger_batches = argparse.Namespace(**dict(vars(args), max_offsets=100_000))
    stored = ingest.save_result(path, row(10_000_000, 3200.0), bigger_batches)
    text = ingest.report(stored, args)
    assert [r["events"] for r in stored] == [1_000_000, 10_000_000] and "not measured yet" not in text
    assert "Rows measured with other settings: 10,000,000" in text
