"""Versioned item embeddings in Delta: ``gold.item_embeddings`` (``features.tables.ITEM_EMBEDDINGS``), partitioned
by model, one row per (model, model_version, item).

Each version records where it came from: ``training_versions``, the Delta version of every table the model was
trained on (``gold.ctr_samples`` for DeepFM, ``gold.item_sequences`` for item2vec, ``silver.item_vocab`` for both),
taken from the tables' Delta history as the newest version committed at or before the model's ``created_utc``
(``meta.json``); and ``metrics``, the figures of the model's training stage result. Writing a version replaces
that version only (``replaceWhere`` on model and model_version), so re-running the export is idempotent.

``serving.export --registry`` (the stage default) calls ``write_version`` for every exported model; the
Parquet files and the HNSW index are still written (the service reads those).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import numpy as np

from features.config import PlatformConfig
from features.errors import PlatformError, TableNotFoundError
from features.results import read_stage_result
from features.tables import CTR_SAMPLES, ITEM_EMBEDDINGS, ITEM_SEQUENCES, ITEM_VOCAB, TableSpec
from serving.embeddings import ExportedItems

log = logging.getLogger(__name__)

#: Tables each model is trained on.
TRAINING_TABLES: dict[str, tuple[TableSpec, ...]] = {
    "deepfm": (CTR_SAMPLES, ITEM_VOCAB),
    "din": (CTR_SAMPLES, ITEM_VOCAB),
    "item2vec": (ITEM_SEQUENCES, ITEM_VOCAB),
}


def table_version_at(spark, cfg: PlatformConfig, table: TableSpec, at: datetime | None) -> int:
    """The newest Delta version of ``table`` committed at or before ``at`` (UTC; ``None``: the newest).

    Raises:
        TableNotFoundError: ``table`` is not a Delta table under the lake.
    """
    from delta.tables import DeltaTable

    path = table.path(cfg.lake_dir)
    if not DeltaTable.isDeltaTable(spark, path):
        raise TableNotFoundError(table.name, path, "the features stage (pipelines/features_batch.py)")
    hist = [(int(r["version"]), r["timestamp"]) for r in
            DeltaTable.forPath(spark, path).history().select("version", "timestamp").collect()]
    if at is not None:  # Spark returns session-time-zone (UTC) naive timestamps
        before = [v for v, ts in hist if ts.replace(tzinfo=timezone.utc) <= at]
        if before:
            return max(before)
        log.warning("%s has no version before %s; recording its newest", table.name, at.isoformat())
    return max(v for v, _ in hist)


def training_versions(spark, cfg: PlatformConfig, model: str, created: datetime | None) -> dict[str, int]:
    """``{table name: Delta version}`` for every table ``model`` trains on (see ``table_version_at``); empty
    (logged) for a model ``TRAINING_TABLES`` does not list yet."""
    if model not in TRAINING_TABLES:
        log.warning("no training tables declared for %r in serving.registry.TRAINING_TABLES; add them", model)
        return {}
    return {t.name: table_version_at(spark, cfg, t, created) for t in TRAINING_TABLES[model]}


def stage_metrics(cfg: PlatformConfig, model: str) -> dict:
    """The numeric figures of the model's training stage result (``train_<model>``); empty if it has none."""
    try:
        result = read_stage_result(cfg, f"train_{model}")
    except PlatformError:
        return {}
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_version(spark, cfg: PlatformConfig, model: str, items: ExportedItems, model_version: str,
                  created: datetime, versions: dict[str, int], metrics: dict) -> int:
    """Write one model version to ``gold.item_embeddings`` (replacing that version if present).

    Args:
        items: the exported items ((N,) ids and idx, (N, D) vectors as trained).
        created: the model's creation time (UTC).

    Returns:
        N, the rows written.
    """
    import pandas as pd
    from pyspark.sql import types as T

    pdf = pd.DataFrame({
        "item_id": items.item_id.astype(np.int32), "item_idx": items.item_idx.astype(np.int32),
        "embedding": [row.astype(np.float32).tolist() for row in items.vectors],
        "model": model, "model_version": model_version,
        "training_versions": json.dumps(versions, sort_keys=True),
        "metrics": json.dumps(metrics, sort_keys=True, default=float),
        "created_at": pd.Timestamp(created.astimezone(timezone.utc).replace(tzinfo=None)),
    })
    df = spark.createDataFrame(pdf, schema=T.StructType.fromDDL(ITEM_EMBEDDINGS.schema))
    quoted = model_version.replace("'", "''")
    (df.write.format("delta").mode("overwrite").partitionBy(*ITEM_EMBEDDINGS.partition_by)
     .option("replaceWhere", f"model = '{model}' AND model_version = '{quoted}'")
     .save(ITEM_EMBEDDINGS.path(cfg.lake_dir)))
    log.info("%s: %s version %s, %d items, trained on %s", ITEM_EMBEDDINGS.name, model, model_version,
             len(pdf), versions)
    return len(pdf)


def read_version(spark, cfg: PlatformConfig, model: str, model_version: str | None = None):
    """A pandas frame of one version of ``model`` (``None``: the newest by ``created_at``), ordered by item_idx.

    Raises:
        TableNotFoundError: nothing has been written yet.
        PlatformError: the model or version is not in the table.
    """
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    path = ITEM_EMBEDDINGS.path(cfg.lake_dir)
    if not DeltaTable.isDeltaTable(spark, path):
        raise TableNotFoundError(ITEM_EMBEDDINGS.name, path, "`python -m serving.export` (registry on)")
    df = spark.read.format("delta").load(path).where(F.col("model") == model)
    if model_version is None:
        newest = df.orderBy(F.col("created_at").desc()).select("model_version").limit(1).collect()
        if not newest:
            raise PlatformError(f"{ITEM_EMBEDDINGS.name} has no version of {model!r}; export it first")
        model_version = newest[0]["model_version"]
    out = df.where(F.col("model_version") == model_version).orderBy("item_idx").toPandas()
    if out.empty:
        raise PlatformError(f"{ITEM_EMBEDDINGS.name} has no {model!r} version {model_version!r}")
    return out


def model_created(meta: dict) -> datetime | None:
    """``created_utc`` of a model's ``meta.json`` as an aware UTC datetime, ``None`` if absent."""
    s = meta.get("created_utc")
    return datetime.fromisoformat(s).astimezone(timezone.utc) if s else None
