"""Resume after a worker failure: SIGKILL one Ray Train worker in the middle of an epoch; Ray restarts the worker
group (FailureConfig(max_failures=1)), every worker loads ray.train.get_checkpoint() (its DCP table shards and
fused Adagrad state, the dense optimizer, epoch, early-stopping state and RNG) and continues with the next epoch.
The result must match an uninterrupted run with the same seed (DeepFM: test AUC within 0.002; item2vec: the same
item embeddings and final loss).

Run with ``make fault-train`` (marked slow: not part of the default suite)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from features.config import PlatformConfig

pytestmark = [pytest.mark.fault, pytest.mark.slow, pytest.mark.integration]

ROWS = {"train": 20000, "valid": 3000, "test": 3000}
EPOCHS = 3


def _kill_mid_epoch(progress: Path, runs: Path, before: set, epoch: int, min_step: int,
                    timeout_s: float = 540.0) -> dict:
    """Wait until Ray's controller has registered a checkpoint of the new run (its
    ``checkpoint_manager_snapshot.json`` under ``runs``, a run folder not in ``before``) and rank 1 reports
    ``epoch`` (0-based) at step >= ``min_step``; then SIGKILL rank 1's process (the pid the worker wrote)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not [r for r in runs.glob("*/checkpoint_manager_snapshot.json") if r.parent.name not in before]:
            time.sleep(0.05)
            continue
        try:
            e, s = map(int, (progress / "rank1.progress").read_text().split())
        except (FileNotFoundError, ValueError):
            e, s = -1, -1
        if e > epoch or (e == epoch and s >= min_step):
            pid = int((progress / "rank1.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            return {"pid": pid, "epoch": e, "step": s}
        time.sleep(0.02)
    raise TimeoutError(f"rank 1 never reached epoch {epoch} step {min_step} (progress in {progress})")


def _flip_labels(lake: Path, share: float, seed: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.tables import CTR_SAMPLES, parquet_export

    rng = np.random.default_rng(seed)
    for part in Path(parquet_export(CTR_SAMPLES, lake)).glob("split=*/*.parquet"):
        t = pq.read_table(part)
        label = t.column("label").to_numpy()
        flipped = np.where(rng.random(len(label)) < share, 1 - label, label).astype(np.int32)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.array(flipped)), part)


def test_killed_worker_resumes_from_checkpoint(ray_cluster, cfg, tmp_path):
    from test_train_ray import write_synthetic_lake

    from training.train import TrainOptions, train

    def run(name: str, progress: str = "") -> dict:
        local = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / name, train=cfg.train)
        # id dropout 0.3, not the MovieLens default: this lake's label is a function of the ids alone, and the
        # resumed run must redraw the same dropped ids as the clean one
        opts = TrainOptions(model="deepfm", epochs=EPOCHS, batch_size=256, patience=EPOCHS, seed=7,
                            lr_sparse=0.05, id_dropout=0.3, progress_dir=progress)
        return train(local, opts)

    lake = PlatformConfig(data_dir=tmp_path / "data").lake_dir
    write_synthetic_lake(lake, ROWS, seed=3)
    _flip_labels(lake, share=0.25, seed=4)  # noisy labels, so that the test AUC is not saturated at 1
    clean = run("clean")
    assert clean["resumed_from_epoch"] == 0 and clean["epochs"] == EPOCHS

    progress, runs = tmp_path / "progress", tmp_path / "data" / "checkpoints"
    before = {p.name for p in runs.iterdir()}
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(run("killed", str(progress))))
    runner.start()
    killed = _kill_mid_epoch(progress, runs, before, epoch=1, min_step=10)
    runner.join(timeout=600)
    assert not runner.is_alive(), "training did not finish after the kill"
    print(f"killed rank 1 (pid {killed['pid']}) at epoch {killed['epoch'] + 1} step {killed['step']}; "
          f"clean test AUC {clean['test_auc']:.5f} logloss {clean['test_logloss']:.5f}, resumed "
          f"{out['test_auc']:.5f} logloss {out['test_logloss']:.5f} "
          f"(resumed from epoch {out['resumed_from_epoch']})")
    assert out["resumed_from_epoch"] >= 1, "the restarted workers did not load the checkpoint"
    assert out["epochs"] == EPOCHS
    assert 0.6 < clean["test_auc"] < 0.99
    assert abs(out["test_auc"] - clean["test_auc"]) <= 0.002
    assert abs(out["test_logloss"] - clean["test_logloss"]) <= 0.002
    assert out["best_epoch"] == clean["best_epoch"]


def _write_long_sequences(lake: Path, users: int, seed: int) -> None:
    """Replace the synthetic lake's item sequences with ``users`` longer ones (10-30 items of the 40), so that an
    item2vec epoch has enough steps to be killed in the middle of."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.tables import ITEM_SEQUENCES, parquet_export

    rng = np.random.default_rng(seed)
    # items of one user come from one of 4 "tastes", so that the embeddings have structure to learn
    seqs = [(rng.integers(0, 10, rng.integers(10, 31)) + 10 * (u % 4)).clip(1).tolist() for u in range(users)]
    out = Path(parquet_export(ITEM_SEQUENCES, lake))
    for old in out.glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.table({"user_id": np.arange(1, users + 1, dtype=np.int32),
                             "user_idx": np.arange(1, users + 1, dtype=np.int32),
                             "item_idx": pa.array(seqs, pa.list_(pa.int32())),
                             "seq_len": np.array([len(s) for s in seqs], np.int32)}), out / "part-0.parquet")


def test_killed_item2vec_worker_resumes_from_checkpoint(ray_cluster, cfg, tmp_path):
    """item2vec: same kill mid-epoch; the resumed run's item embeddings and final SGNS loss equal the uninterrupted
    run's (its pairs and negatives are seeded per epoch, its tables and Adagrad state come back from DCP)."""
    import numpy as np
    from test_train_ray import write_synthetic_lake

    from training.train import TrainOptions, train

    def run(name: str, progress: str = "") -> tuple[dict, np.ndarray]:
        local = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / name, train=cfg.train)
        opts = TrainOptions(model="item2vec", epochs=EPOCHS, batch_size=256, embedding_dim=8, seed=7,
                            model_options={"subsample": 0.05}, progress_dir=progress)
        out = train(local, opts)
        return out, np.load(local.run_dir / "models" / "item2vec" / "item_embeddings.npy")

    lake = PlatformConfig(data_dir=tmp_path / "data").lake_dir
    write_synthetic_lake(lake, {"train": 50, "valid": 20, "test": 20}, seed=3)
    _write_long_sequences(lake, users=1500, seed=5)
    clean, clean_emb = run("clean")
    assert clean["resumed_from_epoch"] == 0 and clean["epochs"] == EPOCHS
    assert clean["final_loss"] < 0.9 * 6 * np.log(2)  # below the loss of the zero-initialised output table

    progress, runs = tmp_path / "progress", tmp_path / "data" / "checkpoints"
    before = {p.name for p in runs.iterdir()}
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(zip(("result", "emb"), run("killed", str(progress)))))
    runner.start()
    killed = _kill_mid_epoch(progress, runs, before, epoch=1, min_step=10)
    runner.join(timeout=600)
    assert not runner.is_alive(), "training did not finish after the kill"
    resumed = out["result"]
    print(f"item2vec: killed rank 1 (pid {killed['pid']}) at epoch {killed['epoch'] + 1} step {killed['step']}; "
          f"clean final loss {clean['final_loss']:.6f}, resumed {resumed['final_loss']:.6f} "
          f"(resumed from epoch {resumed['resumed_from_epoch']})")
    assert resumed["resumed_from_epoch"] >= 1, "the restarted workers did not load the checkpoint"
    assert resumed["epochs"] == EPOCHS
    assert abs(resumed["final_loss"] - clean["final_loss"]) <= 1e-5
    np.testing.assert_allclose(out["emb"], clean_emb, rtol=1e-5, atol=1e-6)
