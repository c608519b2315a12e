"""The one point-in-time join: samples + declared feature views (``features.views``) -> a training set.

For each sample (entity keys, timestamp ``t``) and each view, the row of the sample's entity with the greatest
``timestamp_field`` ``ts`` such that ``t - ttl <= ts < t`` (strictly before: a feature known at the sample's own
second is not used); no such row gives nulls. Rows of a view share at most one ``ts`` per key (the views here have
one row per entity and day), so the choice is unique.

Reproducibility: :func:`build_training_set` reads every input at a Delta version (the latest unless given),
writes ``gold.pit_training_set`` and records ``{"sources": {table: version}}`` as the commit's ``userMetadata``;
:func:`rebuild_training_set` reads those versions back with time travel and rebuilds identical content.
"""

from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from pathlib import Path

from features.config import PlatformConfig, load_config
from features.source import LabelRule, load_source
from features.errors import PlatformError, TableNotFoundError
from features.results import write_stage_result
from features.tables import BRONZE_INTERACTIONS, PIT_TRAINING_SET, TableSpec
from features.views import FEATURE_VIEWS, FeatureView
from pipelines.spark import delta_version

STAGE = "pit_training_set"


def read_at(spark, spec: TableSpec, lake_dir: Path, version: int | None):
    """``spec``'s Delta table at ``version`` (None: latest) and that version.

    Raises:
        TableNotFoundError: the table has not been written.
    """
    from delta.tables import DeltaTable

    path = spec.path(lake_dir)
    if not DeltaTable.isDeltaTable(spark, path):
        raise TableNotFoundError(spec.name, path, "the stage that writes it (ingest, daily_features)")
    if version is None:
        version = delta_version(spark, path)[0]
    return spark.read.format("delta").option("versionAsOf", version).load(path), version


def point_in_time_join(samples, view: FeatureView, rows, sample_id: str = "event_id", ts_col: str = "event_time"):
    """Left-join ``view``'s features onto ``samples`` point-in-time.

    Args:
        samples: DataFrame with ``sample_id`` (unique), the view's join keys and ``ts_col`` (timestamp).
        view: the declaration (join keys, timestamp field, ttl, schema).
        rows: the view's source table.

    Returns:
        ``samples`` with the view's schema columns added (null where no row qualifies).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ts = "_fv_ts"
    feats = rows.select(*view.join_keys, F.col(view.source.timestamp_field).alias(ts),
                        *[F.col(f.name).cast(f.dtype) for f in view.schema])
    ttl_s = int(view.ttl.total_seconds())
    keyed = samples.select(sample_id, *view.join_keys, F.col(ts_col).alias("_s_ts"))
    cond = [keyed[k] == feats[k] for k in view.join_keys] + [
        feats[ts] < keyed["_s_ts"],
        feats[ts] >= keyed["_s_ts"] - F.make_dt_interval(F.lit(0), F.lit(0), F.lit(0), F.lit(ttl_s))]
    latest = Window.partitionBy(sample_id).orderBy(F.desc(ts))
    matched = (keyed.join(feats, cond, "inner")
               .select(sample_id, ts, *[f.name for f in view.schema])
               .withColumn("_rank", F.row_number().over(latest)).where("_rank = 1")
               .drop("_rank", ts))
    return samples.join(matched, sample_id, "left")


def samples_from_bronze(bronze, label: LabelRule = LabelRule()):
    """One sample per bronze event: ``event_id, user_id, item_id, event_time, label`` (int 0/1 by ``label``, the
    source's rule, ``features.source.LabelRule``)."""
    return bronze.select("event_id", "user_id", "item_id", "event_time", label.spark_column().alias("label"))


def training_set(spark, lake_dir: Path, versions: dict[str, int] | None = None, label: LabelRule = LabelRule()):
    """The training set DataFrame and the versions it read: ``{table name: Delta version}`` of bronze and every
    view's source (``versions`` pins them; missing ones read the latest)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    versions = dict(versions or {})
    used = {}
    bronze, used[BRONZE_INTERACTIONS.name] = read_at(spark, BRONZE_INTERACTIONS, lake_dir,
                                                     versions.get(BRONZE_INTERACTIONS.name))
    out = samples_from_bronze(bronze, label)
    for view in FEATURE_VIEWS.values():
        spec = view.source.table
        rows, used[spec.name] = read_at(spark, spec, lake_dir, versions.get(spec.name))
        out = point_in_time_join(out, view, rows)
    fields = StructType.fromDDL(PIT_TRAINING_SET.schema).fields
    return out.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in fields]), used


def build_training_set(spark, cfg: PlatformConfig, versions: dict[str, int] | None = None) -> dict:
    """Write ``gold.pit_training_set`` (overwrite) from the inputs at ``versions`` (None: latest).

    Returns:
        ``rows``, ``sources`` ({table: version read}) and ``version`` (the training set's own Delta version).
    """
    df, used = training_set(spark, cfg.lake_dir, versions, load_source(cfg.source, cfg.raw_dir).label)
    path = PIT_TRAINING_SET.path(cfg.lake_dir)
    (df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
     .option("userMetadata", json.dumps({"sources": used}, sort_keys=True)).save(path))
    version = delta_version(spark, path)[0]
    return {"rows": spark.read.format("delta").option("versionAsOf", version).load(path).count(),
            "sources": used, "version": version}


def recorded_sources(spark, cfg: PlatformConfig, version: int) -> dict[str, int]:
    """The input versions that training-set ``version`` recorded.

    Raises:
        PlatformError: that commit has no recorded sources (not written by :func:`build_training_set`).
    """
    from delta.tables import DeltaTable

    path = PIT_TRAINING_SET.path(cfg.lake_dir)
    commit = DeltaTable.forPath(spark, path).history().where(f"version = {version}").first()
    if commit is None or not commit["userMetadata"]:
        raise PlatformError(f"{PIT_TRAINING_SET.name} version {version} at {path} records no source versions; "
                            "build it with pipelines/pit_join.py")
    return json.loads(commit["userMetadata"])["sources"]


def rebuild_training_set(spark, cfg: PlatformConfig, version: int):
    """Training-set ``version`` recomputed from its recorded inputs (Delta time travel), as a DataFrame."""
    return training_set(spark, cfg.lake_dir, recorded_sources(spark, cfg, version),
                        load_source(cfg.source, cfg.raw_dir).label)[0]


def main(argv: list[str] | None = None) -> None:
    from pipelines.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=json.loads, default=None,
                        help='pin input versions, JSON {"bronze.interactions": 3, ...}')
    args = parser.parse_args(argv)
    cfg = load_config()
    spark = get_spark(cfg, app_name="recsys-pit-join")
    result = build_training_set(spark, cfg, args.versions)
    path = write_stage_result(cfg, STAGE, result)
    print(f"pit_training_set: {result['rows']:,} rows from {result['sources']}; result: {path}")
    spark.stop()


if __name__ == "__main__":
    main()
