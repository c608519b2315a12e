"""``train``: runs when ``recsys.gold_features`` is updated (features_daily). Builds the point-in-time training set
(``spark-submit pipelines/features_batch.py``: gold.ctr_samples with each user's history strictly before the
sample), trains DeepFM, DIN and item2vec, and exports their item embeddings (asset ``recsys.embeddings``, which
schedules evaluate_and_publish).

Training is a Ray job: with ``DAG_RAY_JOBS_ADDRESS`` set (a Ray cluster's dashboard, e.g.
``http://ray-head:8265``; infra/ray/) each model is ``ray job submit --address ... -- python -m training.train
--model <m>`` through the Ray Jobs API, every ``RECSYS_*`` variable passed as the job's env_vars. Without it the
same entry point runs here and starts a local Ray cluster in-process (the Jobs API needs ``ray[default]`` with the
dashboard, which the cluster images have and the project's .venv does not). See docs/ray.md.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset

DAGS_DIR = str(Path(__file__).resolve().parent)
if DAGS_DIR not in sys.path:
    sys.path.insert(0, DAGS_DIR)

import recsys_flows as rf  # noqa: E402

os.environ.setdefault("AIRFLOW_CONN_SPARK_DEFAULT", rf.DEFAULT_SPARK_CONN)
PROFILE = rf.spark_profile()
GOLD_FEATURES = Asset(name=rf.GOLD_FEATURES_ASSET, uri=rf.GOLD_FEATURES_URI)
EMBEDDINGS = Asset(name=rf.EMBEDDINGS_ASSET, uri=rf.EMBEDDINGS_URI)

with DAG(
    dag_id="train",
    description="Point-in-time training set -> Ray jobs (DeepFM, DIN, item2vec) -> embedding export",
    doc_md=__doc__,
    schedule=[GOLD_FEATURES],
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "train"],
    user_defined_macros={"recsys_spark_jars": rf.spark_jars, "recsys_ray_job": rf.ray_job_command,
                         "recsys_python": rf.python_command},
    default_args={"on_failure_callback": rf.log_partition_failure, "on_retry_callback": rf.log_partition_failure,
                  "retries": 1, "retry_delay": timedelta(minutes=1)},
) as dag:
    training_set = SparkSubmitOperator(
        task_id="training_set",
        conn_id="spark_default",
        application=str(rf.REPO / rf.TRAINING_SET_APP),
        properties_file=rf.spark_properties_file(PROFILE),
        jars=f"{{{{ recsys_spark_jars({PROFILE!r}) }}}}" if PROFILE == "local" else None,
        env_vars=rf.spark_env_vars(PROFILE),
        driver_memory="2g",
        name="recsys-training-set",
        execution_timeout=timedelta(minutes=40),
    )
    trains = [
        BashOperator(
            task_id=f"train_{model}",
            bash_command=f"{{{{ recsys_ray_job({model!r}, run_id, ti.try_number) }}}}",
            env=rf.stage_env(), append_env=True, cwd=str(rf.REPO),
            do_xcom_push=False,
            execution_timeout=timedelta(minutes=60),
        )
        for model in rf.TRAIN_MODELS
    ]
    export = BashOperator(
        task_id="export_embeddings",
        bash_command="{{ recsys_python(['serving.export']) }}",
        env=rf.stage_env(), append_env=True, cwd=str(rf.REPO), do_xcom_push=False,
        outlets=[EMBEDDINGS],
        execution_timeout=timedelta(minutes=20),
    )
    training_set >> trains[0]
    for upstream, downstream in zip(trains, trains[1:]):
        upstream >> downstream
    trains[-1] >> export  # one after the other: the Ray cluster holds one at a time
