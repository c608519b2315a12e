"""A minimal HTTP service over one model's exported index: ``GET /health`` and ``GET /similar-items``.

Run: ``RECSYS_... python -m uvicorn serving.app:app`` (model from ``RECSYS_SERVING_MODEL``, default item2vec) or
build one in code with ``create_app(cfg, model)``. The index and the item id <-> item_idx mapping are read once at
start-up from ``<run_dir>/embeddings/<model>/`` (written by ``python -m serving.export``).
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, HTTPException, Query

from features.config import PlatformConfig, load_config
from serving.ann import ItemIndex
from serving.embeddings import INDEX_FILE, PARQUET_FILE, embeddings_dir, read_exported


def create_app(cfg: PlatformConfig, model: str = "item2vec") -> FastAPI:
    """Raises:
        IndexFileError: the model has not been exported.
    """
    d = embeddings_dir(cfg, model)
    index = ItemIndex.load(d / INDEX_FILE)
    table, vectors = read_exported(d / PARQUET_FILE)
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    item_idx = table.column("item_idx").to_numpy().astype(np.int64)
    version = table.column("model_version")[0].as_py() if table.num_rows else ""
    row_of_id = {int(i): r for r, i in enumerate(item_ids)}
    id_of_idx = dict(zip(item_idx.tolist(), item_ids.tolist()))

    app = FastAPI(title=f"similar items ({model})")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model, "model_version": version, "items": index.ntotal,
                "ef_search": index.ef_search}

    @app.get("/similar-items")
    def similar_items(item_id: int, k: int = Query(10, ge=1, le=100)) -> dict:
        """The ``k`` items most similar (cosine) to ``item_id``, the item itself excluded; 404 if unknown."""
        row = row_of_id.get(item_id)
        if row is None:
            raise HTTPException(404, f"item_id {item_id} is not in model {model!r} (version {version})")
        scores, idx = index.search(vectors[row:row + 1], min(k + 1, index.ntotal))
        out = [{"item_id": id_of_idx[int(i)], "score": float(s)} for s, i in zip(scores[0], idx[0])
               if i >= 0 and int(i) != int(item_idx[row])][:k]
        return {"item_id": item_id, "model_version": version, "items": out}

    return app


def __getattr__(name: str):  # ``uvicorn serving.app:app`` builds the app on first access, not at import
    if name == "app":
        return create_app(load_config(), os.environ.get("RECSYS_SERVING_MODEL", "item2vec"))
    raise AttributeError(name)
