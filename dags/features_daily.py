"""``features_daily``: the batch features of one day, ``spark-submit pipelines/daily_features.py --date {{ ds }}``,
through the Spark provider's SparkSubmitOperator. The job replaces exactly that day in Delta, so a run (or a
backfill) of a day is idempotent for its data_interval_start; runs never overlap (max_active_runs=1, one lake).

Spark is reached through the connection ``spark_default``: ``AIRFLOW_CONN_SPARK_DEFAULT`` (set here to local[2]
when the worker has none, recsys_flows.DEFAULT_SPARK_CONN). ``DAG_SPARK_PROFILE`` (local | standalone |
kubernetes) picks the properties file infra/spark/<profile>.conf. Backfill a range with::

    airflow backfill create --dag-id features_daily --from-date 2024-01-01 --to-date 2024-01-03 --max-active-runs 1

(a backfill's own run limit defaults to 10, not the DAG's max_active_runs).

A successful run updates the asset ``recsys.gold_features``, which schedules the ``train`` DAG.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Asset

DAGS_DIR = str(Path(__file__).resolve().parent)
if DAGS_DIR not in sys.path:
    sys.path.insert(0, DAGS_DIR)

import recsys_flows as rf  # noqa: E402

os.environ.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", rf.DEFAULT_SPARK_CONN)
PROFILE = rf.spark_profile()
START = datetime.fromisoformat(os.environ.get("DAG_FEATURES_DAILY_START", "2024-01-01")).replace(tzinfo=timezone.utc)
GOLD_FEATURES = Asset(name=rf.GOLD_FEATURES_ASSET, uri=rf.GOLD_FEATURES_URI)

with DAG(
    dag_id="features_daily",
    description="One day of batch features (spark-submit pipelines/daily_features.py --date ds) into Delta",
    doc_md=__doc__,
    schedule="@daily",
    start_date=START,
    catchup=True,
    max_active_runs=1,
    tags=["recsys", "features"],
    user_defined_macros={"recsys_spark_jars": rf.spark_jars},
    default_args={"on_failure_callback": rf.log_partition_failure, "on_retry_callback": rf.log_partition_failure,
                  "retries": 2, "retry_delay": timedelta(minutes=2)},
) as dag:
    SparkSubmitOperator(
        task_id="daily_features",
        conn_id="spark_default",
        application=str(rf.REPO / os.environ.get("DAG_DAILY_FEATURES_APP", rf.DAILY_FEATURES_APP)),
        application_args=rf.spark_application_args("{{ ds }}"),
        properties_file=rf.spark_properties_file(PROFILE),
        jars=f"{{{{ recsys_spark_jars({PROFILE!r}) }}}}" if PROFILE == "local" else None,
        env_vars=rf.spark_env_vars(PROFILE),
        driver_memory="2g",
        name="recsys-daily-features-{{ ds }}",
        outlets=[GOLD_FEATURES],
        execution_timeout=timedelta(minutes=60),
    )
