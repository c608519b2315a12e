"""Versioned item embeddings in Delta: ``gold.item_embeddings`` (``features.tables.ITEM_EMBEDDINGS``), partitioned
by model, one row per (model, model_version, item).

Each version records where it came from: ``training_versions``, the Delta version of every table the model was
trained on (its registered ``ModelSpec.tables``: ``gold.ctr_samples`` for a ranker, ``gold.item_sequences`` for
the skip-gram models, ``silver.item_vocab`` for all). The trainer records them in the model's ``meta.json``, as the
features stage wrote them beside the Parquet exports it read (``training.data.read_training_versions``); only for a
model trained before that record existed are they inferred from the tables' Delta history (the newest version committed
at or before the model's ``created_utc``; logged, and reported as ``"inferred"``). ``metrics`` are the figures of
the model's training stage result. Writing a version replaces that version only (``replaceWhere`` on model and
model_version), so re-running the export is idempotent.

``serving.export --registry`` (the stage default) calls ``write_version`` for every exported model; the
Parquet files and the HNSW index of the newest export are still written under the run dir.

Serving a chosen version (``python -m serving.app --embedding-version V``, ``POST /admin/reload?version=V``, or the
version the publish gate points at): ``materialize`` reads that version from the table (pinned at the table's
Delta version of the moment), builds its HNSW index, measures its recall@10 against exact search, and saves both
with every parameter (efSearch included) under ``<artifacts_dir>/serving/versions/<model>/<model_version>/``
(``items.parquet``, ``index.faiss``, ``index.json``); a later load with the same parameters reads these files.

Writing needs Spark (the export stage's session); reading does not: ``read_version`` and ``materialize`` read the
table with delta-rs (the ``deltalake`` package: Rust, no JVM), so the HTTP service never imports pyspark. delta-rs
reads what delta-spark 4.0 writes, deletion vectors included (reader protocol 3).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from features.config import PlatformConfig
from features.errors import PlatformError, TableNotFoundError
from features.results import read_stage_result
from features.tables import ITEM_EMBEDDINGS, TableSpec
from serving.embeddings import INDEX_FILE, ExportedItems
from serving.index_files import write_index

log = logging.getLogger(__name__)

#: What a model version may look like (it becomes a directory name): letters, digits, ``._+-``.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class VersionNotFoundError(PlatformError):
    """The registry (``gold.item_embeddings``) does not exist or holds no such model version."""


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
    (logged) for a model that is not registered (any more)."""
    from training.registry import UnknownModelError, get_model

    try:
        tables = get_model(model).tables
    except UnknownModelError:
        log.warning("model %r is not registered: its training tables are unknown", model)
        return {}
    return {t.name: table_version_at(spark, cfg, t, created) for t in tables}


def provenance(spark, cfg: PlatformConfig, model: str, meta: dict, created: datetime | None
               ) -> tuple[dict[str, int], str]:
    """The training tables' Delta versions of a model and where they come from: ``(meta["training_versions"],
    "recorded")`` when the trainer recorded them, else ``(training_versions(...), "inferred")`` (logged)."""
    recorded = meta.get("training_versions")
    if recorded:
        return {str(k): int(v) for k, v in recorded.items()}, "recorded"
    log.warning("%s %s: meta.json records no training_versions (trained before the trainer recorded them); "
                "inferring them from the Delta history at %s", model, meta.get("model_version"), created)
    return training_versions(spark, cfg, model, created), "inferred"


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


def read_version(cfg: PlatformConfig, model: str, model_version: str | None = None, as_of: int | None = None):
    """A pandas frame of one version of ``model`` (``None``: the newest by ``created_at``), ordered by item_idx, with
    the columns of ``ITEM_EMBEDDINGS`` (``embedding``: one (D,) float32 array per row). Read with delta-rs: no Spark.

    Args:
        as_of: the table's Delta version to read (time travel); ``None``: its newest.

    Raises:
        TableNotFoundError: ``gold.item_embeddings`` is not a Delta table under the lake.
        VersionNotFoundError: the table holds no (such) version of ``model``.
    """
    from deltalake import DeltaTable

    path = ITEM_EMBEDDINGS.path(cfg.lake_dir)
    if not DeltaTable.is_deltatable(path):
        raise TableNotFoundError(ITEM_EMBEDDINGS.name, path, "`python -m serving.export` (registry on)")
    return _read_rows(DeltaTable(path, version=as_of), path, model, model_version).to_pandas()


def _sql_str(value: str) -> str:
    """``value`` as a quoted SQL string literal (``'`` doubled), for a delta-rs scan predicate."""
    return "'" + value.replace("'", "''") + "'"


def _read_rows(dt, path: str, model: str, model_version: str | None):
    """One version of ``model`` from the registry ``dt`` (a ``deltalake.DeltaTable`` of ``path``, pinned at some Delta
    version) as a pyarrow table ordered by item_idx; ``None``: the newest by ``created_at``.

    ``DeltaTable.scan`` runs delta-rs' own engine (DataFusion), which applies deletion vectors; with the predicate on
    the partition column ``model`` it skips the other models' files.

    Raises:
        VersionNotFoundError: ``dt`` holds no (such) version of ``model``.
    """
    import pyarrow as pa

    schema = pa.schema(dt.schema().to_arrow())   # the table's own types: the scan gives strings as string_view

    def scan(columns: list[str], predicate: str) -> pa.Table:
        rows = pa.table(dt.scan(columns=columns, predicate=predicate))
        return rows.cast(pa.schema([schema.field(c) for c in columns]))

    where = f"model = {_sql_str(model)}"
    if model_version is None:
        seen = scan(["model_version", "created_at"], where)
        if seen.num_rows == 0:
            raise VersionNotFoundError(f"{ITEM_EMBEDDINGS.name} has no version of {model!r}; export it first")
        model_version = seen.sort_by([("created_at", "descending")]).column("model_version")[0].as_py()
    rows = scan(list(ITEM_EMBEDDINGS.columns), f"{where} AND model_version = {_sql_str(model_version)}")
    if rows.num_rows == 0:
        raise VersionNotFoundError(f"{ITEM_EMBEDDINGS.name} has no {model!r} version {model_version!r}; list them "
                                   f"with `SELECT DISTINCT model_version FROM delta.`{path}``")
    return rows.sort_by("item_idx")


# ----------------------------------------------------------------------------------------------- serving a version
def check_version(model_version: str) -> str:
    """``model_version`` if it is a valid version name (it becomes a directory name).

    >>> check_version("item2vec-20261121T185130Z")
    'item2vec-20261121T185130Z'

    Raises:
        ValueError: it does not match ``VERSION_PATTERN`` (``..``, slashes, empty).
    """
    if not re.fullmatch(VERSION_PATTERN, model_version):
        raise ValueError(f"model version {model_version!r} does not match {VERSION_PATTERN}")
    return model_version


def version_dir(cfg: PlatformConfig, model: str, model_version: str) -> Path:
    """Where ``materialize`` keeps a registry version's items and index.

    Raises:
        ValueError: ``model_version`` is not a valid version name (``check_version``).
    """
    return Path(cfg.artifacts_dir) / "serving" / "versions" / model / check_version(model_version)


def registry_exists(cfg: PlatformConfig) -> bool:
    """Whether ``gold.item_embeddings`` has been written (a file check; no Spark)."""
    return (Path(ITEM_EMBEDDINGS.path(cfg.lake_dir)) / "_delta_log").is_dir()


def materialize(cfg: PlatformConfig, model: str, model_version: str, params) -> Path:
    """Items and HNSW index of one registry version, built once and kept under ``version_dir`` (see the module
    docstring); returns that directory.

    The files are reused when their ``index.json`` holds this version and the same HNSW parameters; otherwise the
    version is read from ``gold.item_embeddings`` with delta-rs (no Spark; pinned at the table's current Delta
    version, recorded as ``registry_table_version``) and the index is built and its recall@10 measured
    (``serving.index_files.write_index``).

    Args:
        params: ``serving.ann.HnswParams`` to build and search with.

    Raises:
        VersionNotFoundError: the registry does not exist or lacks the version.
        ValueError: ``model_version`` is not a valid version name.
    """
    from dataclasses import asdict

    out = version_dir(cfg, model, model_version)
    index_json = out / Path(INDEX_FILE).with_suffix(".json")
    if index_json.exists():
        saved = json.loads(index_json.read_text())
        if saved.get("model_version") == model_version and all(saved.get(k) == v for k, v in asdict(params).items()):
            return out
    if not registry_exists(cfg):
        raise VersionNotFoundError(f"no registry at {ITEM_EMBEDDINGS.path(cfg.lake_dir)}: run `python -m "
                                   f"serving.export` with the registry on before serving {model} {model_version!r}")
    from deltalake import DeltaTable

    path = ITEM_EMBEDDINGS.path(cfg.lake_dir)
    dt = DeltaTable(path)                                     # pinned: every read below sees this Delta version
    table_version = dt.version()
    rows = _read_rows(dt, path, model, model_version).to_pandas()
    items = ExportedItems(item_idx=rows["item_idx"].to_numpy(np.int64), item_id=rows["item_id"].to_numpy(np.int64),
                         vectors=np.stack(rows["embedding"].to_numpy()).astype(np.float32),  # (N, D)
                         unmapped_rows=0, items_without_row=0)
    write_index(items, model_version, params, out, {
        "registry_table": ITEM_EMBEDDINGS.name, "registry_table_version": int(table_version),
        "training_versions": json.loads(rows["training_versions"].iloc[0]),
        "model_metrics": json.loads(rows["metrics"].iloc[0])})
    log.info("materialized %s %s from %s@%d into %s", model, model_version, ITEM_EMBEDDINGS.name, table_version, out)
    return out


def model_created(meta: dict) -> datetime | None:
    """``created_utc`` of a model's ``meta.json`` as an aware UTC datetime, ``None`` if absent."""
    s = meta.get("created_utc")
    return datetime.fromisoformat(s).astimezone(timezone.utc) if s else None
