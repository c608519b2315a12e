"""``stream_supervisor``: every 5 minutes, checks that the streaming ingest (``spark-submit pipelines/ingest.py
--trigger continuous``) is alive and committing micro-batches (stream_policy.SupervisorPolicy over its PID file
and its checkpoint's offsets/commits), and restarts it from its checkpoint when it is dead or stuck. A restart
resumes exactly where the checkpoint stopped: bronze is a MERGE on event_id, quarantine appends are idempotent.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import DAG, task

DAGS_DIR = str(Path(__file__).resolve().parent)
if DAGS_DIR not in sys.path:
    sys.path.insert(0, DAGS_DIR)

import recsys_flows as rf  # noqa: E402

with DAG(
    dag_id="stream_supervisor",
    description="Keeps the streaming ingest query alive; restarts it from its checkpoint",
    doc_md=__doc__,
    schedule=timedelta(minutes=5),
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["recsys", "streaming"],
    default_args={"on_failure_callback": rf.log_partition_failure, "retries": 1,
                  "retry_delay": timedelta(seconds=30)},
) as dag:

    @task(task_id="supervise_ingest", execution_timeout=timedelta(minutes=3))
    def supervise_ingest() -> str:
        import os
        import subprocess

        import stream_policy as sp

        data_dir = Path(os.environ.get("RECSYS_DATA_DIR") or rf.REPO / "data")
        state = data_dir / "ingest-supervisor"
        state.mkdir(parents=True, exist_ok=True)
        probe = sp.IngestProbe(checkpoint=data_dir / "checkpoints" / "ingest", pid_file=state / "ingest.pid")

        def restart() -> None:
            if sp.pid_alive(probe.pid_file):  # stuck: stop it first, the checkpoint keeps its place
                os.kill(int(probe.pid_file.read_text()), 15)
            argv = rf.build_command("ingest", extra=())[:-2] + ["--trigger", "continuous"]
            with (state / "ingest.log").open("ab") as out:
                proc = subprocess.Popen(argv, cwd=rf.REPO, env={**os.environ, **rf.stage_env()}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            probe.pid_file.write_text(str(proc.pid))

        return sp.supervise(probe, sp.SupervisorPolicy(), restart).value

    supervise_ingest()
