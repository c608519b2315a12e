"""``recsys_main``: the main job end to end, the same stage commands as ``make demo`` (pipelines.stages).

    kafka_start -> produce -> ingest -> features -> train_<model> (one per model of DAG_TRAIN_MODELS, by default
    every registered one) -> export -> evaluate
    -> kafka_stop

Every task is a BashOperator running one command line (spark-submit from the project's .venv for the Spark
stages, ``python -m`` for the rest); the command is built by dags/recsys_tasks.py and rendered when the task
runs. Stages hand each other paths (tables, checkpoints, result JSONs under the run folder), never data.

Params (all optional; an unset one falls back to the worker's RECSYS_* environment, then features.config):
``data_dir``, ``artifacts_dir``, ``run_name``, ``kafka_bootstrap`` (the broker's ports follow from it) and
``kafka_state_dir``. For example::

    airflow dags test recsys_main -c '{"data_dir": "/tmp/run/data", "kafka_bootstrap": "127.0.0.1:19092"}'

``kafka_stop`` runs whatever happened upstream (all done) and is a teardown, so that a stopped broker never
hides a failed stage: the run's state is that of ``evaluate``.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

DAGS_DIR = str(Path(__file__).resolve().parent)
if DAGS_DIR not in sys.path:  # Airflow puts a bundle's folder on sys.path; a bare DagBag does not
    sys.path.insert(0, DAGS_DIR)

from recsys_tasks import MAIN_TASK_IDS, POLICIES, REPO, log_task_failure, shell_command, stage_env  # noqa: E402


def _optional(description: str) -> Param:
    return Param(None, type=["null", "string"], description=description)


with DAG(
    dag_id="recsys_main",
    description="Kafka -> Spark/Delta -> Ray Train/TorchRec -> export -> replay evaluation on the configured data source (RECSYS_SOURCE)",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # one broker, one lake: two runs at once would share both
    tags=["recsys", "main"],
    params={
        "data_dir": _optional("RECSYS_DATA_DIR: raw data, lake and checkpoints"),
        "artifacts_dir": _optional("RECSYS_ARTIFACTS_DIR: run outputs (models, embeddings, stage results)"),
        "run_name": _optional("RECSYS_RUN_NAME: outputs go to <artifacts_dir>/<run_name>"),
        "kafka_bootstrap": _optional("RECSYS_KAFKA__BOOTSTRAP host:port; the local broker listens on its port"),
        "kafka_state_dir": _optional("the local broker's log and PID folder (default var/<run_name>/kafka)"),
    },
    user_defined_macros={"recsys_command": shell_command},
    default_args={"on_failure_callback": log_task_failure, "on_retry_callback": log_task_failure},
) as dag:
    tasks = [
        BashOperator(
            task_id=task_id,
            bash_command=f"{{{{ recsys_command({task_id!r}, params) }}}}",
            env=stage_env(),
            append_env=True,  # keep PATH, JAVA_HOME and the worker's RECSYS_* variables
            cwd=str(REPO),
            skip_on_exit_code=None,  # every non-zero exit is a failure
            do_xcom_push=False,  # stages pass paths through the run folder, not XCom
            retries=POLICIES[task_id].retries,
            retry_delay=timedelta(seconds=POLICIES[task_id].retry_delay_s),
            execution_timeout=timedelta(seconds=POLICIES[task_id].timeout_s),
        )
        for task_id in MAIN_TASK_IDS
    ]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
    # A teardown with no setup: its trigger rule (all_done_setup_success) then behaves as all_done, and the run's
    # state ignores it.
    tasks[-1].as_teardown()
