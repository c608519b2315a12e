"""serving: the embedding export (ids, row 0, schema) and the HNSW index (recall against exact search, parameters
restored on load). The ranking metrics' hand-computed cases are in tests/test_metrics.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import PlatformConfig
from features.errors import PlatformError, TableNotFoundError
from features.results import read_stage_result
from serving.ann import HnswParams, IndexFileError, ItemIndex, exact_search, measure_recall, recall_at_k
from serving.embeddings import map_rows, ModelEmbeddings, read_exported
from serving.export import run_export


# ---------------------------------------------------------------------------------------------------- export
def _cfg(tmp_path: Path) -> PlatformConfig:
    return PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")


def write_vocab(cfg: PlatformConfig, item_idx: list[int], item_id: list[int]) -> None:
    d = cfg.lake_dir / "export" / "item_vocab"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array(item_id, pa.int32()), "item_idx": pa.array(item_idx, pa.int32()),
                             "first_seen": pa.array([0] * len(item_id), pa.timestamp("us", tz="UTC"))}),
                   d / "part-00000.parquet")


def write_model(cfg: PlatformConfig, model: str, table: np.ndarray, version: str) -> None:
    d = cfg.run_dir / "models" / model
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "item_embeddings.npy", table.astype(np.float32))
    (d / "meta.json").write_text(json.dumps({"model_version": version, "epochs": 1}))


def test_map_rows_skips_row_zero_and_counts_mismatches():
    emb = ModelEmbeddings("m", np.arange(10, dtype=np.float32).reshape(5, 2), "v")
    # row 4 has no vocab entry (unmapped); vocab idx 6 is beyond the 5-row table (item without row)
    out = map_rows(emb, vocab_idx=np.array([1, 2, 3, 6]), vocab_id=np.array([11, 22, 33, 66]))
    assert out.item_idx.tolist() == [1, 2, 3]
    assert out.item_id.tolist() == [11, 22, 33]
    np.testing.assert_array_equal(out.vectors, emb.table[1:4])
    assert (out.unmapped_rows, out.items_without_row) == (1, 1)


def test_export_writes_parquet_index_and_stage_result(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 3)).astype(np.float32)               # rows 0..4, row 0 = padding
    table[0] = 99.0                                                  # must never be exported
    write_vocab(cfg, item_idx=[3, 1, 4, 2, 9], item_id=[307, 101, 42, 205, 900])   # 9: beyond the table
    write_model(cfg, "deepfm", table, "deepfm-v7")                   # item2vec absent: skipped with a log line

    with caplog.at_level("WARNING"):
        result = run_export(cfg, HnswParams(m=8, ef_construction=40, ef_search=17))
    assert "item2vec" in caplog.text and "skipping" in caplog.text
    assert set(result["models"]) == {"deepfm"}
    r = result["models"]["deepfm"]
    assert (r["rows"], r["dim"], r["model_version"]) == (4, 3, "deepfm-v7")
    assert r["recall@10"] == 1.0                                     # 4 items: k capped at 4, HNSW exact
    assert r["items_without_row"] == 1 and r["unmapped_rows"] == 0
    assert read_stage_result(cfg, "export") == json.loads(json.dumps(result))

    t, vectors = read_exported(r["path"])
    assert t.column_names == ["item_id", "item_idx", "embedding", "model_version"]
    assert t.schema.field("embedding").type == pa.list_(pa.float32())
    assert t.column("item_id").to_pylist() == [101, 205, 307, 42]   # mapped through the vocab, in item_idx order
    assert t.column("item_idx").to_pylist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(vectors, table[1:])
    assert set(t.column("model_version").to_pylist()) == {"deepfm-v7"}

    meta = json.loads(Path(r["index_path"]).with_suffix(".json").read_text())
    assert (meta["m"], meta["ef_construction"], meta["ef_search"]) == (8, 40, 17)
    assert meta["recall@10"] == 1.0 and meta["model_version"] == "deepfm-v7" and meta["ntotal"] == 4
    assert sorted(ItemIndex.load(r["index_path"]).ids().tolist()) == [1, 2, 3, 4]


def test_export_errors_name_the_fix(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(TableNotFoundError, match="item_vocab"):
        run_export(cfg)
    write_vocab(cfg, [1], [10])
    with pytest.raises(PlatformError, match="train_deepfm"):
        run_export(cfg)                                              # no model at all


# ---------------------------------------------------------------------------------------------------- ANN
def test_recall_at_k_hand_case():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), np.array([[3, 2, 9], [4, 6, -1]])) == pytest.approx(
        (2 / 3 + 1 / 2) / 2)


def test_exact_search_is_cosine():
    v = np.array([[10.0, 0.0], [1.0, 1.0], [0.0, 0.1]], dtype=np.float32)  # norms differ: cosine, not dot
    assert exact_search(v, np.array([7, 8, 9]), np.array([[1.0, 0.9]]), k=3).tolist() == [[8, 7, 9]]


def test_hnsw_recall_and_saved_ef_search_restored(tmp_path):
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(400, 16)).astype(np.float32)
    ids = np.arange(1, 401) * 3                                          # ids are not row positions
    params = HnswParams(m=16, ef_construction=200, ef_search=77)
    index = ItemIndex.build(vecs, ids, params)
    assert index.ef_search == 77
    recall = measure_recall(index, vecs, ids, k=10)
    assert recall >= 0.99
    index.extra["recall@10"] = recall
    meta_path = index.save(tmp_path / "index.faiss")

    loaded = ItemIndex.load(tmp_path / "index.faiss")
    assert loaded.ef_search == 77 and loaded.params == params
    assert loaded.extra["recall@10"] == recall
    np.testing.assert_array_equal(loaded.search(vecs[:20], 10)[1], index.search(vecs[:20], 10)[1])

    meta = json.loads(meta_path.read_text())
    meta["ef_search"] = 300                                              # the JSON, not faiss' file, decides
    meta_path.write_text(json.dumps(meta))
    assert ItemIndex.load(tmp_path / "index.faiss").ef_search == 300
    meta["ntotal"] = 5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="ntotal"):
        ItemIndex.load(tmp_path / "index.faiss")


def test_hnsw_params_validated():
    with pytest.raises(ValueError):
        HnswParams(m=1)
    with pytest.raises(ValueError):
        HnswParams(ef_search=0)

