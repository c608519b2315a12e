"""Time-decayed sample weights (training.data.recency_weights): the half-life holds, the weights average 1, the
train shard carries its event times, and ctr_batches multiplies the padding mask by them row for row."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_train_ray import write_synthetic_lake
from training.data import ctr_batches, read_ctr_shard, recency_weights
from training.trainer import TrainOptions

DAY = 86400.0


def test_recency_weights_halve_every_half_life_and_average_one():
    t = np.array([0.0, 30 * DAY, 60 * DAY, 60 * DAY])
    w = recency_weights(t, 30 * DAY, now=60 * DAY)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx(2.0) and w[2] / w[1] == pytest.approx(2.0) and w[2] == w[3]
    with pytest.raises(ValueError, match="half-life"):
        recency_weights(t, 0.0, now=60 * DAY)


def test_batches_carry_the_weights_of_their_rows(tmp_path):
    write_synthetic_lake(tmp_path, {"train": 50})
    shard = read_ctr_shard(tmp_path, "train")
    assert shard.time.shape == (50,) and np.all(np.diff(shard.time) == 1.0)  # the lake's events are 1 s apart
    w = recency_weights(shard.time, 10.0, shard.time.max())
    plain = list(ctr_batches(shard, 16, 4, shuffle=True, seed=3))  # 64 slots: 14 padding rows
    weighted = list(ctr_batches(shard, 16, 4, shuffle=True, seed=3, sample_weight=w))
    order = np.random.default_rng(3).permutation(50)
    index = np.resize(order, 64)
    got = np.concatenate([b.weight.numpy() for b in weighted])
    np.testing.assert_allclose(got[:50], w[index[:50]])
    assert np.all(got[50:] == 0)  # padding stays 0
    for a, b in zip(plain, weighted):  # the same rows, only the weights differ
        assert (a.label == b.label).all() and (a.features.values() == b.features.values()).all()


def test_an_export_without_event_time_reads_without_times(tmp_path):
    write_synthetic_lake(tmp_path, {"train": 20})
    part = next(tmp_path.glob("export/ctr_samples/split=train/*.parquet"))
    pq.write_table(pq.read_table(part).drop_columns(["event_time"]), part)
    shard = read_ctr_shard(tmp_path, "train")
    assert shard.time is None and len(shard) == 20


def test_train_options_check_recency_half_life():
    assert TrainOptions(model="din").recency_half_life_days == 0.0
    assert TrainOptions(model="deepfm", recency_half_life_days=30).recency_half_life_days == 30
    for bad in ({"model": "deepfm", "recency_half_life_days": -1.0},
                {"model": "item2vec", "recency_half_life_days": 10.0}):
        with pytest.raises(ValueError, match="recency_half_life_days"):
            TrainOptions(**bad)
