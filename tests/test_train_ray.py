"""Ray Train end to end on a small synthetic lake: 2 TorchTrainer workers (gloo, CPU) train sharded DeepFM for
one epoch, report a checkpoint holding both ranks' shards, and rank 0 writes the unsharded artifacts; with id
dropout, the saved tables read every id without a train sample as the OOV row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from features.config import PlatformConfig
from features.definitions import DENSE_FEATURES
from features.results import read_stage_result
from features.tables import CTR_SAMPLES, ITEM_SEQUENCES, parquet_export
from training.data import synthetic_vocab_sizes

pytestmark = pytest.mark.integration


def write_synthetic_lake(lake: Path, rows: dict[str, int], seed: int = 0) -> dict[str, int]:
    """CTR samples (label depends on user and item parity, learnable) and item sequences in the export schema."""
    vocab = synthetic_vocab_sizes()
    rng = np.random.default_rng(seed)
    for split, n in rows.items():
        user, item = rng.integers(1, vocab["user"], n), rng.integers(1, vocab["item"], n)
        hist = [rng.integers(1, vocab["item"], rng.integers(0, 6)).tolist() for _ in range(n)]
        table = pa.table({
            "event_id": [f"{split}-{i}" for i in range(n)], "user_id": user.astype(np.int32),
            "item_id": item.astype(np.int32), "rating": rng.integers(1, 6, n).astype(np.float32),
            "label": ((user + item) % 2).astype(np.int32),
            "event_time": pa.array(np.arange(n) * 1_000_000, pa.timestamp("us")),
            "user_idx": user.astype(np.int32), "item_idx": item.astype(np.int32),
            "age_idx": (user % vocab["age_bucket"]).astype(np.int32), "gender_idx": (user % 3).astype(np.int32),
            "occupation_idx": (user % vocab["occupation"]).astype(np.int32),
            "zip_idx": (user % vocab["zip_prefix"]).astype(np.int32),
            "genre_idx": pa.array([[int(i % 19) + 1, int(i % 7) + 1] for i in item], pa.list_(pa.int32())),
            "hist_item_idx": pa.array(hist, pa.list_(pa.int32())),
            "hist_len": np.array([len(h) for h in hist], np.int32),
            # point-in-time counters (features.definitions.DENSE_FEATURES); a mean is null without earlier events
            **{f"{e}_prior_events": pa.array(rng.integers(0, 30, n), pa.int32()) for e in ("user", "item")},
            **{f"{e}_prior_rating": pa.array([None if i % 5 == 0 else float(x) for i, x in
                                              enumerate(rng.uniform(1, 5, n))], pa.float64())
               for e in ("user", "item")},
        })
        out = Path(parquet_export(CTR_SAMPLES, lake)) / f"split={split}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "part-0.parquet")
    seqs = [rng.integers(1, vocab["item"], rng.integers(2, 12)).tolist() for _ in range(vocab["user"] - 1)]
    seq_dir = Path(parquet_export(ITEM_SEQUENCES, lake))
    seq_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": np.arange(1, len(seqs) + 1, dtype=np.int32),
                             "user_idx": np.arange(1, len(seqs) + 1, dtype=np.int32),
                             "item_idx": pa.array(seqs, pa.list_(pa.int32())),
                             "seq_len": np.array([len(s) for s in seqs], np.int32)}), seq_dir / "part-0.parquet")
    (lake / "export" / "vocab_sizes.json").write_text(json.dumps(vocab))
    return vocab


def test_torchtrainer_trains_sharded_deepfm(ray_cluster, cfg, tmp_path):
    from training.models import DeepFM, DeepFMConfig
    from training.artifacts import load_model
    from training.train import TrainOptions, train

    # a lake of its own, so that other tests' exports in the session lake are never touched
    local = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", train=cfg.train)
    vocab = write_synthetic_lake(local.lake_dir, {"train": 600, "valid": 150, "test": 150})
    train_file = Path(parquet_export(CTR_SAMPLES, local.lake_dir)) / "split=train" / "part-0.parquet"
    rows = pq.read_table(train_file)
    rows = rows.filter(pc.and_(pc.less(rows["user_idx"], 20), pc.less(rows["item_idx"], 30)))
    pq.write_table(rows, train_file)  # users 20.. and items 30.. only in valid/test: cold rows
    cold_users = sorted(set(range(1, vocab["user"])) - set(rows["user_idx"].to_pylist()))
    cold_items = sorted(set(range(1, vocab["item"])) - set(rows["item_idx"].to_pylist()))

    # id dropout and time-decayed sample weights (their half-life counted from the last train event over both ranks)
    result = train(local, TrainOptions(model="deepfm", epochs=1, batch_size=128, id_dropout=0.2,
                                       recency_half_life_days=1e-3))

    assert result["epochs"] == 1 and 0.0 <= result["test_auc"] <= 1.0
    assert result == read_stage_result(local, "train_deepfm")
    assert {p.split("@rank")[1] for p in result["sharding_plan"].values()} == {"0", "1"}
    # one checkpoint, written by both ranks (torch.distributed.checkpoint: one data file per rank + metadata)
    ckpt = Path(result["checkpoint"])
    assert ckpt.is_relative_to(local.checkpoint_dir)
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == 2
    model_dir = local.run_dir / "models" / "deepfm"
    emb = np.load(model_dir / "item_embeddings.npy")
    assert emb.shape == (vocab["item"], 16) and emb.dtype == np.float32
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["model_version"] == result["model_version"] and meta["vocab_sizes"] == vocab
    assert meta["model_config"]["dense_features"] == [f.name for f in DENSE_FEATURES]  # the export has them
    # the unsharded model loads the gathered state dict, and its item table is the exported one
    model = DeepFM(vocab, DeepFMConfig(**{k: (tuple(v) if k in ("hidden", "dense_features") else v)
                                          for k, v in meta["model_config"].items()}))
    model.load_state_dict(torch.load(model_dir / "model.pt"))
    loaded = load_model(model_dir)  # the one loader every stage uses gives the same weights
    assert loaded.spec.name == "deepfm" and loaded.config == model.config
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in model.state_dict().items())
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["t_item"].weight.detach().numpy()
    np.testing.assert_array_equal(table, emb)
    # id dropout: every cold row of the saved tables (embedding and first order) is the trained OOV row
    assert result["training"]["id_dropout"] == 0.2 and result["training"]["recency_half_life_days"] == 1e-3
    assert meta["metrics"]["cold_rows_as_oov"] == {"t_user": len(cold_users), "t_item": len(cold_items)}
    assert len(cold_users) >= 10 and len(cold_items) >= 10
    state = torch.load(model_dir / "model.pt")
    for table_name, cold in (("t_user", cold_users), ("t_item", cold_items)):
        for key in [k for k in state if k.endswith(f".{table_name}.weight")]:
            w = state[key]
            assert torch.equal(w[cold], w[0].expand(len(cold), -1)), key
            assert not torch.equal(w[1], w[0]) or "first_order" in key, key
