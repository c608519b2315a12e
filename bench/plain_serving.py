"""The baseline of ``bench.serving_load``: a plain FastAPI app doing ``/similar-items``'s work and nothing else.

    python -m bench.plain_serving --dir artifacts/demo/embeddings/<model> [--port 28081]

It loads the same exported embeddings and the same HNSW index file as the service (``serving.ann.ItemIndex``,
efSearch as saved) and answers ``GET /similar-items?item_id=&k=`` with the ``k`` nearest items (itself excluded)
as JSON: no bundle, no metrics, no fallback, no response model. An unknown id gets a 404. Served by uvicorn with
the same settings as ``serving.app`` (one process, loopback, warning log level), so the gap the benchmark reports
is what the service adds to the same ANN lookup on the same stack.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI, HTTPException

from serving.ann import ItemIndex
from serving.embeddings import INDEX_FILE, PARQUET_FILE, read_exported


def create_plain_app(embeddings: Path) -> FastAPI:
    """The plain app over ``embeddings`` (a folder written by ``serving.export``: its Parquet file and index).

    Raises:
        IndexFileError: the index file or its parameters are missing.
        OSError: the Parquet file is missing.
    """
    index = ItemIndex.load(embeddings / INDEX_FILE)
    table, vectors = read_exported(embeddings / PARQUET_FILE)
    item_ids = table.column("item_id").to_pylist()
    item_idx = table.column("item_idx").to_pylist()
    row_of_id = {i: r for r, i in enumerate(item_ids)}
    id_of_idx = dict(zip(item_idx, item_ids))
    app = FastAPI()

    @app.get("/similar-items")
    async def similar_items(item_id: int, k: int = 10) -> dict:
        row = row_of_id.get(item_id)
        if row is None:
            raise HTTPException(404, "unknown item_id")
        scores, idx = index.search(vectors[row:row + 1], k + 1)
        own = item_idx[row]
        items = [{"item_id": id_of_idx[i], "score": float(s)}
                 for s, i in zip(scores[0].tolist(), idx[0].tolist()) if i >= 0 and i != own]
        return {"item_id": item_id, "items": items[:k]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "items": index.ntotal}

    return app


def main(argv: list[str] | None = None) -> int:
    import faiss
    import uvicorn

    p = argparse.ArgumentParser(description="plain FastAPI /similar-items over an export (bench.serving_load's "
                                            "baseline)")
    p.add_argument("--dir", type=Path, required=True, help="an export folder (artifacts/<run>/embeddings/<model>)")
    p.add_argument("--port", type=int, default=28081)
    p.add_argument("--threads", type=int, default=1, help="faiss threads")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    uvicorn.run(create_plain_app(args.dir), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
