"""``evaluate_and_publish``: runs when ``recsys.embeddings`` is updated (the train DAG's export). Replay evaluation
over the held-out log (``python -m evaluation.evaluate``), then the publish gate (``python -m evaluation.gate``,
or ``DAG_PUBLISH_COMMAND``), which moves serving's pointer only when the new version beats the published one.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset

DAGS_DIR = str(Path(__file__).resolve().parent)
if DAGS_DIR not in sys.path:
    sys.path.insert(0, DAGS_DIR)

import recsys_flows as rf  # noqa: E402

EMBEDDINGS = Asset(name=rf.EMBEDDINGS_ASSET, uri=rf.EMBEDDINGS_URI)

with DAG(
    dag_id="evaluate_and_publish",
    description="Replay evaluation of the new embeddings, then the publish gate",
    doc_md=__doc__,
    schedule=[EMBEDDINGS],
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "serving"],
    user_defined_macros={"recsys_python": rf.python_command, "recsys_publish": rf.publish_command},
    default_args={"on_failure_callback": rf.log_partition_failure, "on_retry_callback": rf.log_partition_failure,
                  "retries": 1, "retry_delay": timedelta(minutes=1)},
) as dag:
    common = {"env": rf.stage_env(), "append_env": True, "cwd": str(rf.REPO), "do_xcom_push": False}
    replay = BashOperator(task_id="replay", bash_command="{{ recsys_python(['evaluation.evaluate']) }}",
                          execution_timeout=timedelta(minutes=30), **common)
    publish = BashOperator(task_id="publish", bash_command="{{ recsys_publish() }}",
                           execution_timeout=timedelta(minutes=10), **common)
    replay >> publish
