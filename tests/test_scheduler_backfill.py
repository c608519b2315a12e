"""A real Airflow 3 scheduler backfills ``features_daily``: three days, three successful runs, and a second backfill
of the same days leaves the tables exactly as they were (each run is idempotent for its data_interval_start).

What runs, all from .venv-airflow in a temporary AIRFLOW_HOME with a SQLite metadata DB:
``airflow api-server`` (the Execution API the task workers report to), ``airflow dag-processor`` (parses dags/),
``airflow scheduler`` with the LocalExecutor (runs the tasks: SparkSubmitOperator -> the project's spark-submit).
``[scheduler] use_job_schedule`` is off, so only the backfill's runs exist (the DAG's catchup would otherwise
schedule every day since its start date). Ports: ``AIRFLOW_TEST_PORT`` (default 28780) and the next one.

The lake is a small bronze table built here with pipelines.spark: 300 rating events over 2024-01-01..03. Each run
is the DAG's own job, ``spark-submit pipelines/daily_features.py --date {{ ds }}``, which replaces its day of
gold.item_window_stats and gold.user_recent_items. After the first backfill both tables must hold exactly the rows
``pipelines.daily_features.feature_rows`` computes for the three days in this process (the reference); after the
second, the same rows again. ``AIRFLOW_TEST_DAILY_APP`` points the DAG at another application.

Run alone with ``make test-scheduler``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from features.config import ROOT, PlatformConfig, SparkConfig
from features.tables import BRONZE_INTERACTIONS, ITEM_WINDOW_STATS, USER_RECENT_ITEMS

AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin" / "airflow"
PORT = int(os.environ.get("AIRFLOW_TEST_PORT", "28780"))
DAYS = ("2024-01-01", "2024-01-02", "2024-01-03")
APP = os.environ.get("AIRFLOW_TEST_DAILY_APP")  # None: the DAG's default, pipelines/daily_features.py

pytestmark = [
    pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800),
    pytest.mark.skipif(not AIRFLOW_BIN.exists(), reason="no .venv-airflow: run `make airflow-venv`"),
    pytest.mark.skipif(os.environ.get("AIRFLOW_SCHEDULER_TEST") != "1",
                       reason="several minutes on 2 cores: `make test-scheduler` (AIRFLOW_SCHEDULER_TEST=1)"),
]


def build_bronze(spark, lake: Path, n: int = 300) -> None:
    """``n`` valid rating events spread evenly over DAYS (users 1..50, items 1..80, ratings 1..5), as ingest
    writes them."""
    from pyspark.sql.types import StructType

    schema = StructType.fromDDL(BRONZE_INTERACTIONS.schema)
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(n):
        ts = t0 + timedelta(seconds=i * (3 * 86400 // n))
        values = {"event_id": f"ml-{i:06d}", "user_id": 1 + i % 50, "item_id": 1 + (i * 7) % 80,
                  "rating": float(1 + i % 5), "event_type": "rating", "event_time": ts, "event_date": ts.date(),
                  "kafka_partition": 0, "kafka_offset": i, "ingested_at": ts}
        rows.append(tuple(values.get(f.name) for f in schema.fields))
    (spark.createDataFrame(rows, schema).write.format("delta").mode("overwrite")
     .partitionBy(*BRONZE_INTERACTIONS.partition_by).save(BRONZE_INTERACTIONS.path(lake)))


def _rows(df) -> list[str]:
    return sorted(json.dumps(r.asDict(recursive=True), sort_keys=True, default=str) for r in df.collect())


def table_rows(spark, lake: Path) -> dict[str, list[str]]:
    """Every row of the two feature views the daily job writes (JSON, sorted), to compare with the reference."""
    return {spec.name: _rows(spark.read.format("delta").load(spec.path(lake)))
            for spec in (ITEM_WINDOW_STATS, USER_RECENT_ITEMS) if Path(spec.path(lake)).exists()}


def reference_rows(spark, lake: Path) -> dict[str, list[str]]:
    """What the daily job must have written for DAYS, computed here from bronze with the job's own functions."""
    from datetime import date

    from pipelines.daily_features import feature_rows

    bronze = spark.read.format("delta").load(BRONZE_INTERACTIONS.path(lake))
    items, users = feature_rows(bronze, date.fromisoformat(DAYS[0]), date.fromisoformat(DAYS[-1]))
    return {ITEM_WINDOW_STATS.name: _rows(items), USER_RECENT_ITEMS.name: _rows(users)}


def digest(rows: dict[str, list[str]]) -> dict[str, str]:
    return {name: f"{len(r)}:{hashlib.sha256(chr(10).join(r).encode()).hexdigest()[:16]}" for name, r in rows.items()}


def delta_version(spark, lake: Path) -> int:
    """Latest Delta version of gold.item_window_stats (each run of the daily job adds one)."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, ITEM_WINDOW_STATS.path(lake)).history(1).first()["version"]


class Airflow:
    """The three Airflow processes against one temporary home; ``stop`` ends exactly the processes it started."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.home, self.env, self.procs = home, env, []

    def cli(self, *args: str, timeout: int = 300) -> str:
        proc = subprocess.run([str(AIRFLOW_BIN), *args], env=self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"airflow {' '.join(args)}: {proc.stdout[-2000:]} {proc.stderr[-3000:]}"
        return proc.stdout

    def start(self, name: str, *args: str) -> None:
        out = (self.home / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen([str(AIRFLOW_BIN), name, *args], env=self.env, cwd=self.home,
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for p in self.procs:  # each in its own session: its group holds the workers it forked
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)

    def runs(self, dag_id: str) -> list[dict]:
        text = self.cli("dags", "list-runs", dag_id, "-o", "json")  # log lines (``[warning ] ...``) come first
        lines = [line for line in text.splitlines() if line.startswith("[{") or line.strip() == "[]"]
        return json.loads(lines[-1]) if lines else []

    def wait_for_runs(self, dag_id: str, count: int, timeout_s: float, started_after: datetime | None = None
                      ) -> list[dict]:
        """The runs of ``dag_id`` once ``count`` of them have finished (started after ``started_after``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p.args[1] for p in self.procs if p.poll() is not None]
            assert not dead, f"airflow {dead} exited; logs under {self.home}"
            runs = self.runs(dag_id)
            fresh = all(r.get("start_date") and datetime.fromisoformat(r["start_date"]) > started_after
                        for r in runs) if started_after else True
            if len(runs) >= count and fresh and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            time.sleep(5)
        raise AssertionError(f"runs of {dag_id} not finished after {timeout_s} s: {self.runs(dag_id)}; "
                             f"logs under {self.home}")


def test_scheduler_backfills_three_days_idempotently(tmp_path, spark):
    data = tmp_path / "data"
    cfg = PlatformConfig(data_dir=data, spark=SparkConfig(shuffle_partitions=2))
    build_bronze(spark, cfg.lake_dir)
    home = tmp_path / "airflow"
    home.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{PORT}/execution/",
           "AIRFLOW__API__PORT": str(PORT), "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(PORT + 1),
           "AIRFLOW__API_AUTH__JWT_SECRET": "recsys-test-secret", "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False", "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
           "PATH": f"{ROOT / '.venv-airflow' / 'bin'}:{os.environ.get('PATH', '')}",
           "DAG_FEATURES_DAILY_START": DAYS[0],
           "RECSYS_DATA_DIR": str(data), "RECSYS_RAW_DIR": str(ROOT / "data" / "raw"),
           "RECSYS_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "RECSYS_SPARK__SHUFFLE_PARTITIONS": "2"}
    if APP:
        env["DAG_DAILY_FEATURES_APP"] = APP
    env.pop("AIRFLOW_CONN_SPARK_DEFAULT", None)  # the DAG's default: local[2]
    af = Airflow(home, env)
    start = time.perf_counter()
    af.cli("db", "migrate")
    try:
        af.start("api-server", "--port", str(PORT), "--workers", "1")
        af.start("dag-processor")
        af.start("scheduler")
        deadline = time.monotonic() + 300
        while "features_daily" not in af.cli("dags", "list"):
            assert time.monotonic() < deadline, "dag-processor did not register features_daily in 300 s"
            time.sleep(5)
        af.cli("dags", "unpause", "features_daily")

        # one run at a time, as the DAG's own max_active_runs: the days write the same tables
        af.cli("backfill", "create", "--dag-id", "features_daily", "--from-date", DAYS[0], "--to-date", DAYS[-1],
               "--max-active-runs", "1")
        runs = af.wait_for_runs("features_daily", 3, timeout_s=1200)
        first_wall = time.perf_counter() - start
        assert sorted(r["logical_date"][:10] for r in runs) == list(DAYS)
        assert [r["state"] for r in runs] == ["success"] * 3, runs
        first = table_rows(spark, cfg.lake_dir)
        expected = reference_rows(spark, cfg.lake_dir)
        assert digest(first) == digest(expected), (digest(first), digest(expected))
        assert {json.loads(r)["event_date"] for r in first[USER_RECENT_ITEMS.name]} == set(DAYS)
        version = delta_version(spark, cfg.lake_dir)

        second_at = datetime.now(timezone.utc)
        af.cli("backfill", "create", "--dag-id", "features_daily", "--from-date", DAYS[0], "--to-date", DAYS[-1],
               "--max-active-runs", "1", "--reprocess-behavior", "completed")
        runs = af.wait_for_runs("features_daily", 3, timeout_s=1200, started_after=second_at)
        assert [r["state"] for r in runs] == ["success"] * 3, runs
        assert delta_version(spark, cfg.lake_dir) == version + 3  # each day written again, by its own run
        assert digest(table_rows(spark, cfg.lake_dir)) == digest(first)
        print(f"scheduler backfill: first 3 days after {first_wall:.0f} s, both backfills "
              f"{time.perf_counter() - start:.0f} s (Airflow start included)")
    finally:
        af.stop()

