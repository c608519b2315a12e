"""The files of one exported item-embedding version: ``items.parquet`` (serving.embeddings), ``index.faiss`` and
``index.json`` (serving.ann.ItemIndex), written together by ``write_index``.

Two writers use it: the export stage (``serving.export``, one version per model under
``<run_dir>/embeddings/<model>/``) and the registry (``serving.registry.materialize``, a version read from
``gold.item_embeddings`` under ``<artifacts_dir>/serving/versions/<model>/<model_version>/``). It imports neither,
so the two do not import each other in both directions.

Legend: N exported items, D embedding dim.
"""

from __future__ import annotations

import time
from pathlib import Path

from serving.ann import HnswParams, ItemIndex, measure_recall
from serving.embeddings import INDEX_FILE, to_arrow, write_parquet

#: The cut-off of the recall figure measured for every index written (``recall@10``).
RECALL_K = 10


def write_index(items, model_version: str, params: HnswParams, out: Path, extra: dict | None = None) -> dict:
    """Write ``items.parquet``, build the HNSW index, measure its recall@10 against exact search (every item a
    query) and save the index with its parameters, the recall and ``extra`` in ``index.json`` (``ItemIndex.save``).
    The Parquet file is written first and the index last, so a reader that finds the index finds its items.

    Args:
        items: ``serving.embeddings.ExportedItems`` ((N,) ids and idx, (N, D) vectors).
        model_version: recorded in the Parquet rows and in ``index.json``.
        params: the HNSW parameters to build and search with.
        out: the directory (created).
        extra: more entries for ``index.json``.

    Returns:
        ``path``, ``index_path``, ``recall@10`` and ``index_build_s`` (seconds).
    """
    parquet_path = write_parquet(to_arrow(items, model_version), out)
    t0 = time.perf_counter()
    index = ItemIndex.build(items.vectors, items.item_idx, params)
    build_s = time.perf_counter() - t0
    recall = measure_recall(index, items.vectors, items.item_idx, k=RECALL_K)
    index.extra.update({f"recall@{RECALL_K}": recall, "recall_queries": int(items.item_idx.size),
                        "model_version": model_version, "build_s": build_s, **(extra or {})})
    index_path = out / INDEX_FILE
    index.save(index_path)
    return {"path": str(parquet_path), "index_path": str(index_path), f"recall@{RECALL_K}": recall,
            "index_build_s": build_s}
