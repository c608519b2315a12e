"""serving.registry against real Spark + Delta: the export writes each model version to gold.item_embeddings with
its embeddings (equal to the trained table's rows), the Delta versions of its training tables at the model's
creation time, and its stage metrics; re-exporting a version replaces it, a new version is added beside it. The
read path (``read_version``, ``materialize``) uses delta-rs and returns the rows Spark reads, without pyspark."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import PlatformConfig
from features.results import write_stage_result
from features.tables import CTR_SAMPLES, ITEM_EMBEDDINGS, ITEM_VOCAB, TABLES
from serving.ann import HnswParams
from serving.export import run_export
from serving.registry import read_version

pytestmark = pytest.mark.integration


def _write_model(cfg: PlatformConfig, table: np.ndarray, version: str, created: datetime) -> None:
    d = cfg.run_dir / "models" / "deepfm"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "item_embeddings.npy", table)
    (d / "meta.json").write_text(json.dumps({"model_version": version, "created_utc": created.isoformat(),
                                             "metrics": {"test_auc": 0.5}}))


def test_export_writes_versioned_embeddings_with_lineage(spark, tmp_path):
    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    assert TABLES["gold.item_embeddings"] is ITEM_EMBEDDINGS and ITEM_EMBEDDINGS.partition_by == ("model",)
    # item vocabulary: Delta (version 0) and its Parquet export; ctr_samples: versions 0 and 1 before the model
    vocab = spark.createDataFrame([(10, 1), (20, 2), (30, 3)], "item_id int, item_idx int")
    vocab.write.format("delta").save(ITEM_VOCAB.path(cfg.lake_dir))
    exp = cfg.lake_dir / "export" / "item_vocab"
    exp.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array([10, 20, 30], pa.int32()),
                             "item_idx": pa.array([1, 2, 3], pa.int32())}), exp / "part-0.parquet")
    for n in (3, 5):
        spark.range(n).write.format("delta").mode("overwrite").save(CTR_SAMPLES.path(cfg.lake_dir))
    time.sleep(1.5)
    created = datetime.now(timezone.utc)
    time.sleep(1.5)
    spark.range(7).write.format("delta").mode("overwrite").save(CTR_SAMPLES.path(cfg.lake_dir))  # version 2: later

    table = np.arange(16, dtype=np.float32).reshape(4, 4) / 7
    _write_model(cfg, table, "dfm-1", created)
    write_stage_result(cfg, "train_deepfm", {"test_auc": 0.71, "valid_auc": 0.69, "epochs": 3,
                                             "sharding_plan": {"t_item": "table_wise@rank0"}})
    params = HnswParams(m=4, ef_construction=16, ef_search=8)
    result = run_export(cfg, params, models=("deepfm",), spark=spark)
    assert result["models"]["deepfm"]["registry"] == {      # meta.json records none: inferred from the history
        "table": "gold.item_embeddings", "rows": 3, "training_versions_source": "inferred",
        "training_versions": {"gold.ctr_samples": 1, "silver.item_vocab": 0}}

    got = read_version(cfg, "deepfm", "dfm-1")
    assert got["item_id"].tolist() == [10, 20, 30] and got["item_idx"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), table[1:], rtol=0, atol=0)
    assert json.loads(got["training_versions"][0]) == {"gold.ctr_samples": 1, "silver.item_vocab": 0}
    assert json.loads(got["metrics"][0]) == {"test_auc": 0.71, "valid_auc": 0.69, "epochs": 3}
    assert set(got["model"]) == {"deepfm"} and set(got["model_version"]) == {"dfm-1"}

    # the same version again replaces it; a newer version is added beside it and is the newest
    run_export(cfg, params, models=("deepfm",), spark=spark)
    _write_model(cfg, table * 2, "dfm-2", datetime.now(timezone.utc))
    run_export(cfg, params, models=("deepfm",), spark=spark)
    all_rows = spark.read.format("delta").load(ITEM_EMBEDDINGS.path(cfg.lake_dir))
    counts = {r["model_version"]: r["count"] for r in all_rows.groupBy("model_version").count().collect()}
    assert counts == {"dfm-1": 3, "dfm-2": 3}
    newest = read_version(cfg, "deepfm")
    assert set(newest["model_version"]) == {"dfm-2"}
    assert json.loads(newest["training_versions"][0]) == {"gold.ctr_samples": 2, "silver.item_vocab": 0}
    np.testing.assert_allclose(np.stack(newest["embedding"].to_numpy()), table[1:] * 2)


def test_registry_row_carries_the_delta_versions_the_training_set_was_read_at(spark, tmp_path):
    """Provenance end to end: the features stage's export records the Delta version it copied of each table; the
    trainer's data side reads those and the trainer writes them into meta.json; the export writes them to the
    registry row (``recorded``). A commit after the export (version 2) must not leak in, though inferring from the
    Delta history at the model's creation time would have picked it."""
    from dataclasses import asdict

    import torch

    from features.tables import ITEM_SEQUENCES, USER_VOCAB
    from pipelines.features_batch import write_exports
    from training.data import read_training_versions
    from training.artifacts import save_model
    from training.registry import get_model
    from training.trainer import TrainOptions

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    lake = cfg.lake_dir
    spark.createDataFrame([(10, 1), (20, 2), (30, 3)], "item_id int, item_idx int") \
        .write.format("delta").save(ITEM_VOCAB.path(lake))                                     # version 0
    spark.createDataFrame([(7, 1)], "user_id int, user_idx int").write.format("delta").save(USER_VOCAB.path(lake))
    spark.createDataFrame([("e1", "train")], "event_id string, split string").write.format("delta") \
        .partitionBy("split").save(CTR_SAMPLES.path(lake))
    for seqs in ([[1, 2]], [[1, 2, 3]]):                                                       # versions 0, 1
        spark.createDataFrame([(1, s) for s in seqs], "user_idx int, item_idx array<int>") \
            .write.format("delta").mode("overwrite").save(ITEM_SEQUENCES.path(lake))
    exported = write_exports(spark, lake)
    assert exported == {"gold.ctr_samples": 0, "gold.item_sequences": 1, "silver.item_vocab": 0,
                        "silver.user_vocab": 0}
    spark.createDataFrame([(1, [3, 2, 1])], "user_idx int, item_idx array<int>") \
        .write.format("delta").mode("overwrite").save(ITEM_SEQUENCES.path(lake))               # version 2, later

    spec = get_model("item2vec")
    read = read_training_versions(lake, spec.tables)
    assert read == {"gold.item_sequences": 1, "silver.item_vocab": 0}
    table = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 5
    opts = TrainOptions(model="item2vec")
    save_model(cfg.run_dir / "models" / "item2vec", spec, spec.default_config(), {spec.item_table: table},
               model_version="i2v-7", options=asdict(opts), vocab_sizes={}, sharding_plan={}, metrics={},
               training_versions=read)
    meta = json.loads((cfg.run_dir / "models" / "item2vec" / "meta.json").read_text())
    assert meta["training_versions"] == read and meta["options"] == asdict(opts)

    result = run_export(cfg, HnswParams(m=4, ef_construction=16, ef_search=8), models=("item2vec",), spark=spark)
    assert result["models"]["item2vec"]["registry"]["training_versions_source"] == "recorded"
    row = read_version(cfg, "item2vec", "i2v-7")
    assert json.loads(row["training_versions"][0]) == {"gold.item_sequences": 1, "silver.item_vocab": 0}
    np.testing.assert_allclose(np.stack(row["embedding"].to_numpy()), table.numpy()[1:])


def test_serving_reads_the_registry_with_delta_rs_and_never_imports_pyspark(spark, tmp_path):
    """The read path (``read_version``, and ``materialize`` through the service's ``retrieval_dir``) in a fresh
    interpreter returns, for every version asked (by name, the newest, and by Delta version), exactly the rows that
    Spark reads, on a table whose newest commits need reader protocol 3 with deletion vectors (delta-spark 4.0 with
    them enabled, then a DELETE); afterwards no module of pyspark or py4j is loaded. A missing version is the same
    ``VersionNotFoundError`` as before."""
    import subprocess
    import sys
    import textwrap

    from deltalake import DeltaTable

    from features.config import ROOT

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    exp = cfg.lake_dir / "export" / "item_vocab"
    exp.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": pa.array([10, 20, 30], pa.int32()),
                             "item_idx": pa.array([1, 2, 3], pa.int32())}), exp / "part-0.parquet")
    table = np.arange(16, dtype=np.float32).reshape(4, 4) / 7
    params = HnswParams(m=4, ef_construction=16, ef_search=8)
    recorded = {"gold.ctr_samples": 1, "silver.item_vocab": 0}
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for version, scale, created in (("dfm-1", 1, t0), ("dfm-2", 2, t0.replace(day=2)), ("dfm-1", 3, t0)):
        _write_model(cfg, table * scale, version, created)          # Delta versions 0, 1 and 2 (dfm-1 replaced)
        meta = cfg.run_dir / "models" / "deepfm" / "meta.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "training_versions": recorded}))
        run_export(cfg, params, models=("deepfm",), spark=spark)
    path = ITEM_EMBEDDINGS.path(cfg.lake_dir)
    spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")  # 3
    spark.sql(f"DELETE FROM delta.`{path}` WHERE model_version = 'dfm-2' AND item_idx = 2")              # 4
    protocol = DeltaTable(path).protocol()
    assert (protocol.min_reader_version, "deletionVectors" in protocol.reader_features) == (3, True)
    assert DeltaTable(path).deletion_vectors().read_all().num_rows > 0   # the DELETE wrote one, no file rewrite

    def by_spark(model_version: str, as_of: int) -> list:
        df = spark.read.format("delta").option("versionAsOf", as_of).load(path)
        rows = df.where(f"model = 'deepfm' AND model_version = '{model_version}'").orderBy("item_idx").collect()
        return [[r["item_id"], r["item_idx"], list(r["embedding"]), r["model_version"], r["training_versions"],
                 r["metrics"]] for r in rows]

    asked = [("dfm-1", None), ("dfm-2", None), (None, None), ("dfm-1", 0), ("dfm-2", 3)]
    script = textwrap.dedent(f"""
        import json, sys
        from features.config import PlatformConfig
        from serving.ann import HnswParams
        from serving.bundle import BundleSpec, retrieval_dir
        from serving.registry import VersionNotFoundError, read_version
        import serving.app
        cfg = PlatformConfig(data_dir={str(cfg.data_dir)!r}, artifacts_dir={str(cfg.artifacts_dir)!r})
        rows = []
        for version, as_of in {asked!r}:
            f = read_version(cfg, "deepfm", version, as_of=as_of)
            rows.append([[int(r.item_id), int(r.item_idx), r.embedding.tolist(), r.model_version,
                          r.training_versions, r.metrics] for r in f.itertuples()])
        spec = BundleSpec(retrieval_model="deepfm", source="registry", version="dfm-2",
                          hnsw=HnswParams(m=4, ef_construction=16, ef_search=8))
        built = str(retrieval_dir(cfg, spec))
        try:
            read_version(cfg, "deepfm", "dfm-9")
            missing = None
        except VersionNotFoundError as e:
            missing = str(e)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pyspark", "py4j", "delta"))
        print(json.dumps({{"rows": rows, "built": built, "missing": missing, "loaded": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    expected = [by_spark("dfm-1", 4), by_spark("dfm-2", 4), by_spark("dfm-2", 4), by_spark("dfm-1", 0),
                by_spark("dfm-2", 3)]
    assert result["rows"] == expected
    # and the values themselves: dfm-1 replaced by the third export, dfm-2 without the deleted item_idx 2
    assert [r[:3] for r in expected[0]] == [[i, i // 10, (table[i // 10] * 3).tolist()] for i in (10, 20, 30)]
    assert [r[1] for r in expected[1]] == [1, 3] and [r[1] for r in expected[4]] == [1, 2, 3]
    np.testing.assert_array_equal(np.array([r[2] for r in expected[3]], np.float32), table[1:])
    saved = json.loads((tmp_path / "artifacts" / "serving" / "versions" / "deepfm" / "dfm-2" / "index.json")
                       .read_text())
    assert result["built"] == str(tmp_path / "artifacts" / "serving" / "versions" / "deepfm" / "dfm-2")
    assert (saved["registry_table_version"], saved["ntotal"], saved["training_versions"]) == (4, 2, recorded)
    assert result["missing"] == (f"gold.item_embeddings has no 'deepfm' version 'dfm-9'; list them with "
                                 f"`SELECT DISTINCT model_version FROM delta.`{path}``")
