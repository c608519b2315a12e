"""The one place a Spark session is built: local mode by default, the Delta Lake extension and the Kafka source
from the jars that ``make jars`` put in ``.jars/spark`` (nothing is resolved at run time), UTC everywhere.

Under ``spark-submit`` against a cluster (``infra/spark``), the master and packages come from the submit command
and this builder only adds what is missing.
"""

from __future__ import annotations

import glob
import os

from features.config import ROOT, PlatformConfig
from features.errors import PlatformError


def spark_jars() -> list[str]:
    """The extra jars (Delta, Kafka source) resolved by ``make jars``.

    Raises:
        PlatformError: the jar folder is empty; run ``make jars``.
    """
    jars = sorted(glob.glob(str(ROOT / ".jars" / "spark" / "*.jar")))
    if not jars:
        raise PlatformError(f"no jars in {ROOT / '.jars' / 'spark'}; run 'make jars' first")
    return jars


def get_spark(cfg: PlatformConfig | None = None, app_name: str = "recsys-platform"):
    """Return the active session, or build a local one with Delta and the Kafka source.

    Raises:
        PlatformError: the jars are missing.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    cfg = cfg or PlatformConfig()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.driver.extraJavaOptions", "-Dderby.system.home=/tmp/derby -Duser.timezone=UTC")
    )
    # spark-submit starts the JVM first and hands its gateway port to Python: then master and jars are its own.
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        builder = (builder.master(cfg.spark.master)
                   .config("spark.driver.memory", cfg.spark.driver_memory)
                   .config("spark.jars", ",".join(spark_jars())))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def delta_version(spark, path: str) -> tuple[int, str | None]:
    """The newest version of the Delta table at ``path`` and its commit's ``userMetadata`` (None when unset)."""
    from delta.tables import DeltaTable

    row = DeltaTable.forPath(spark, path).history(1).select("version", "userMetadata").first()
    return int(row["version"]), row["userMetadata"]
