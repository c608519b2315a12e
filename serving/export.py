"""Stage ``export`` (``python -m serving.export``): for each trained model, write its item embeddings to Parquet,
build an HNSW index over them (cosine = inner product on L2-normalised vectors) and measure the index's recall@10
against exact search with every item as a query.

Per model, under ``<run_dir>/embeddings/<model>/``: ``items.parquet`` (see serving.embeddings), ``index.faiss``
and ``index.json`` (M, efConstruction, efSearch, dim, ntotal, ``recall@10``, ``model_version``).

With a Spark session (the stage command's default; ``--no-registry`` turns it off) each exported version is
also written to the Delta table ``gold.item_embeddings`` with its training tables' Delta versions (as the trainer
recorded them in ``meta.json``) and its training metrics (``serving.registry``). The files are written by
``serving.index_files.write_index``, which also builds the index of a registry version the service is asked to serve
(``serving.registry.materialize``).

Stage result (``<run_dir>/stages/export.json``)::

    {"models": {m: {"rows", "dim", "path", "index_path", "recall@10", "model_version", ...}},
     "export_wall_s"}

``rows`` is the number of exported items (row 0 and unmapped rows excluded); ``export_wall_s`` is seconds.
"""

from __future__ import annotations

import argparse
import logging
import time

import faiss

from features.config import PlatformConfig, load_config
from features.errors import PlatformError
from features.results import write_stage_result
from serving.ann import HnswParams
from serving.embeddings import embedding_models, embeddings_dir, load_model_embeddings, map_rows, read_item_vocab
from serving.index_files import RECALL_K, write_index

log = logging.getLogger("serving.export")


def export_model(cfg: PlatformConfig, model: str, vocab: tuple, params: HnswParams, spark=None) -> dict | None:
    """Export one model; ``None`` when it has no outputs.

    Args:
        vocab: ``(item_idx, item_id)`` from ``read_item_vocab``.
        spark: a Spark session with Delta: also write the version to ``gold.item_embeddings``.

    Raises:
        PlatformError: the model's table maps to no vocabulary item at all (vocabulary mismatch).
    """
    emb = load_model_embeddings(cfg, model)
    if emb is None:
        return None
    items = map_rows(emb, *vocab)
    if items.item_idx.size == 0:
        raise PlatformError(f"model {model!r}: none of its {emb.table.shape[0] - 1} embedding rows has an "
                            f"item_vocab entry; it was trained on another vocabulary, retrain it")
    out = embeddings_dir(cfg, model)
    written = write_index(items, emb.model_version, params, out)
    registry = _register(cfg, model, items, emb.model_version, spark) if spark is not None else None
    log.info("model %s: %d items x %d dims -> %s; HNSW(M=%d, efC=%d, efS=%d) recall@%d = %.4f",
             model, items.item_idx.size, items.vectors.shape[1], out, params.m, params.ef_construction,
             params.ef_search, RECALL_K, written[f"recall@{RECALL_K}"])
    return {"rows": int(items.item_idx.size), "dim": int(items.vectors.shape[1]), **written,
            "model_version": emb.model_version,
            "unmapped_rows": items.unmapped_rows, "items_without_row": items.items_without_row,
            "hnsw": {"M": params.m, "efConstruction": params.ef_construction, "efSearch": params.ef_search},
            **({"registry": registry} if registry else {})}


def _register(cfg: PlatformConfig, model: str, items, model_version: str, spark) -> dict:
    """Write the version to ``gold.item_embeddings``; returns what the stage result records of it."""
    from datetime import datetime, timezone

    from features.tables import ITEM_EMBEDDINGS
    from serving import registry
    from serving.embeddings import model_dir
    from training.artifacts import read_meta

    meta = read_meta(model_dir(cfg, model))
    created = registry.model_created(meta) or datetime.now(timezone.utc)
    versions, source = registry.provenance(spark, cfg, model, meta, created)
    metrics = registry.stage_metrics(cfg, model) or dict(meta.get("metrics", {}))
    rows = registry.write_version(spark, cfg, model, items, model_version, created, versions, metrics)
    return {"table": ITEM_EMBEDDINGS.name, "rows": rows, "training_versions": versions,
            "training_versions_source": source}


def run_export(cfg: PlatformConfig, params: HnswParams = HnswParams(), models: tuple[str, ...] | None = None,
               spark=None) -> dict:
    """Export every model of ``models`` that has outputs and write the stage result; with ``spark``, also write
    each version to ``gold.item_embeddings``.

    Raises:
        TableNotFoundError: the item vocabulary export is missing.
        PlatformError: no model has outputs (run the training stages first).
    """
    t0 = time.perf_counter()
    models = models if models is not None else embedding_models()  # default: every model with an item table
    vocab = read_item_vocab(cfg)
    results = {}
    for m in models:
        r = export_model(cfg, m, vocab, params, spark)
        if r is not None:
            results[m] = r
    if not results:
        raise PlatformError(f"no model among {list(models)} has item embeddings under {cfg.run_dir / 'models'}; "
                            f"run the train_deepfm / train_item2vec stages first")
    result = {"models": results, "export_wall_s": time.perf_counter() - t0}
    write_stage_result(cfg, "export", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to export (default: every registered model with an item table)")
    p.add_argument("--hnsw-m", type=int, default=HnswParams.m)
    p.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    p.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    p.add_argument("--no-registry", action="store_true", help="skip the Delta table gold.item_embeddings")
    args = p.parse_args(argv)
    unknown = sorted(set(args.models or ()) - set(embedding_models()))
    if unknown:  # checked after parsing: the registry imports every model (torch), which --help must not wait for
        p.error(f"argument --models: {', '.join(unknown)} not a model with item embeddings; choose from "
                f"{', '.join(embedding_models())}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faiss.omp_set_num_threads(args.threads)
    cfg = load_config()
    spark = None
    if not args.no_registry:
        from pipelines.spark import get_spark  # the one place a Spark session is built

        spark = get_spark(cfg, app_name="export")
    result = run_export(cfg, HnswParams(args.hnsw_m, args.ef_construction, args.ef_search),
                        tuple(args.models or embedding_models()), spark)
    log.info("export: %s", {m: r[f"recall@{RECALL_K}"] for m, r in result["models"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
