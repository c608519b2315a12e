"""The Airflow DAGs: every DAG file imports in the Airflow environment (.venv-airflow) with nothing heavy at parse
time; the commands the tasks run, checked without any cluster; and ``airflow dags test recsys_main`` end to end on
the real services against MovieLens-100K.

Airflow lives in its own environment (its Spark provider pulls pyspark-client, which would replace pyspark in
.venv), so the tests that need it run ``.venv-airflow/bin/python`` or ``.venv-airflow/bin/airflow`` in a
subprocess with AIRFLOW_HOME in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.config import ROOT, PlatformConfig
from pipelines.stages import STAGES, build_command, spark_jar_list, stage_env

AIRFLOW_PY = ROOT / ".venv-airflow" / "bin" / "python"
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin" / "airflow"
DAGS = ROOT / "dags"
MAIN_ORDER = ["kafka_start", "produce", "ingest", "features", "train_deepfm", "train_item2vec", "export",
              "evaluate", "kafka_stop"]
needs_airflow = pytest.mark.skipif(not AIRFLOW_PY.exists(), reason="no .venv-airflow: run `make airflow-venv`")


def _load_tasks_module():
    """dags/recsys_tasks.py, imported by path (dags/ is not a package; the DAG files import it from their folder)."""
    spec = importlib.util.spec_from_file_location("recsys_tasks", DAGS / "recsys_tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it, as an import does (its dataclasses look themselves up)
    spec.loader.exec_module(module)
    return module


rt = _load_tasks_module()


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), **extra}


# Runs inside .venv-airflow: parse every file of dags/ as the DAG processor does, render one command through the
# DAG's own Jinja environment, and report as JSON what the parent asserts.
_DAGBAG_SCRIPT = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "files": sorted(bag.file_last_changed),
       "dags": {}}
for dag_id, dag in bag.dags.items():
    tasks = {}
    for t in dag.tasks:
        tasks[t.task_id] = {
            "upstream": sorted(t.upstream_task_ids), "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule), "teardown": t.is_teardown,
            "retries": t.retries, "timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
            "on_failure": [c.__name__ for c in (t.on_failure_callback or [])],
            "operator": type(t).__name__, "env": getattr(t, "env", None), "cwd": getattr(t, "cwd", None)}
    out["dags"][dag_id] = {"schedule": repr(dag.schedule), "tasks": tasks}
if "recsys_main" in bag.dags:
    t = bag.dags["recsys_main"].get_task("features")
    out["rendered_features"] = t.render_template(t.bash_command, {"params": {"data_dir": "/tmp/x y"}},
                                                 jinja_env=t.get_template_env())
heavy = ("torch", "torchrec", "pyspark", "ray", "pandas", "numpy", "features", "training", "serving")
out["heavy_modules"] = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
print("@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    proc = subprocess.run([str(AIRFLOW_PY), "-c", _DAGBAG_SCRIPT, str(DAGS)], env=airflow_env(home), cwd=home,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("@@", 1)[1])


# --- (a) every DAG file imports inside the Airflow environment -------------------------------------------------


@needs_airflow
def test_every_dag_file_imports_without_error(dagbag):
    assert dagbag["import_errors"] == {}
    assert {Path(f).name for f in dagbag["files"]} == {p.name for p in DAGS.glob("*.py")}
    assert "recsys_main" in dagbag["dags"]


@needs_airflow
def test_dag_files_import_nothing_heavy_at_parse_time(dagbag):
    assert dagbag["heavy_modules"] == []


@needs_airflow
def test_recsys_main_runs_the_stages_in_order_and_always_stops_kafka(dagbag):
    dag = dagbag["dags"]["recsys_main"]
    tasks = dag["tasks"]
    assert dag["schedule"] == "None"
    assert sorted(tasks) == sorted(MAIN_ORDER)
    # a single chain: each task's only upstream is the one before it
    assert [tasks[t]["upstream"] for t in MAIN_ORDER] == [[]] + [[t] for t in MAIN_ORDER[:-1]]
    # kafka_stop runs whatever happened upstream (a teardown with no setup: all_done), and as a teardown it does
    # not decide the run's state, so a failed stage still fails the run
    assert tasks["kafka_stop"]["teardown"] is True
    assert tasks["kafka_stop"]["trigger_rule"] in ("all_done", "all_done_setup_success")
    for name in MAIN_ORDER[:-1]:
        assert tasks[name]["trigger_rule"] == "all_success" and not tasks[name]["teardown"]
    for name, t in tasks.items():
        assert t["operator"] == "BashOperator"
        assert t["retries"] == rt.POLICIES[name].retries
        assert t["timeout_s"] == rt.POLICIES[name].timeout_s
        assert t["on_failure"] == ["log_task_failure"]
        assert t["env"] == stage_env() and t["cwd"] == str(ROOT)


@needs_airflow
def test_task_command_renders_through_the_dags_jinja_environment(dagbag):
    argv = shlex.split(dagbag["rendered_features"])
    assert argv == ["env", "RECSYS_DATA_DIR=/tmp/x y", *build_command("features")]


# --- (b) the commands, without a cluster -----------------------------------------------------------------------


def test_main_task_ids_follow_the_stage_contract():
    assert list(rt.MAIN_TASK_IDS) == MAIN_ORDER
    assert [s.name for s in STAGES] == MAIN_ORDER[1:-1]
    assert set(rt.POLICIES) == set(MAIN_ORDER)


def test_spark_stage_runs_spark_submit_from_the_project_venv_with_the_jars():
    argv = rt.task_argv("ingest", {}, environ={})
    assert argv[0] == str(ROOT / ".venv" / "bin" / "spark-submit")
    assert argv[argv.index("--master") + 1] == "local[2]"
    jars = argv[argv.index("--jars") + 1].split(",")
    assert jars == spark_jar_list().split(",")
    names = [Path(j).name for j in jars]
    if (ROOT / ".jars" / "spark").exists():  # resolved by `make jars`
        assert any(n.startswith("delta-spark_") for n in names) and any(n.startswith("spark-sql-kafka") for n in names)
        assert all(Path(j).is_file() for j in jars)
    assert "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in argv
    assert argv[-3:] == [str(ROOT / "pipelines" / "ingest.py"), "--trigger", "available-now"]
    assert rt.task_argv("features", {}, environ={})[-1] == str(ROOT / "pipelines" / "features_batch.py")


@pytest.mark.parametrize("task_id, module_args", [
    ("produce", ["pipelines.produce"]),
    ("train_deepfm", ["training.train", "--model", "deepfm"]),
    ("train_item2vec", ["training.train", "--model", "item2vec"]),
    ("export", ["serving.export"]),
    ("evaluate", ["serving.replay"]),
])
def test_python_stage_runs_python_m_from_the_project_venv(task_id, module_args):
    assert rt.task_argv(task_id, None, environ={}) == [str(ROOT / ".venv" / "bin" / "python"), "-m", *module_args]


def test_run_params_become_recsys_variables_and_unset_ones_fall_through():
    params = {"data_dir": "/runs/d", "artifacts_dir": "/runs/a", "run_name": None, "kafka_bootstrap": ""}
    argv = rt.task_argv("train_deepfm", params, environ={"RECSYS_RUN_NAME": "from-env"})
    assert argv == ["env", "RECSYS_DATA_DIR=/runs/d", "RECSYS_ARTIFACTS_DIR=/runs/a", *build_command("train_deepfm")]


def test_kafka_tasks_take_ports_from_the_bootstrap_and_state_from_the_run():
    script = str(ROOT / "infra" / "scripts" / "kafka.sh")
    # from the run's params
    assert rt.task_argv("kafka_start", {"kafka_bootstrap": "127.0.0.1:19192", "kafka_state_dir": "/k"}, environ={}) \
        == ["env", "RECSYS_KAFKA__BOOTSTRAP=127.0.0.1:19192", "KAFKA_PORT=19192", "KAFKA_CONTROLLER_PORT=19193",
            script, "start", "/k"]
    # from the worker's environment: same folder as `make demo` (var/<run name>/kafka)
    assert rt.task_argv("kafka_stop", {}, environ={"RECSYS_KAFKA__BOOTSTRAP": "localhost:29092",
                                                   "RECSYS_RUN_NAME": "nightly"}) \
        == ["env", "KAFKA_PORT=29092", "KAFKA_CONTROLLER_PORT=29093", script, "stop",
            str(ROOT / "var" / "nightly" / "kafka")]
    # defaults: features.config's broker address and run name
    assert rt.task_argv("kafka_stop", {}, environ={})[:3] == ["env", "KAFKA_PORT=9092", "KAFKA_CONTROLLER_PORT=9093"]
    assert rt.task_argv("kafka_stop", {}, environ={})[-1] == str(ROOT / "var" / "demo" / "kafka")


def test_shell_command_quotes_the_argv_for_bash():
    params = {"data_dir": "/tmp/with space/$HOME", "run_name": "it's"}
    cmd = rt.shell_command("export", params, environ={})
    assert shlex.split(cmd) == rt.task_argv("export", params, environ={})
    # what bash itself makes of it (as BashOperator runs it: bash -c): each argument back, nothing expanded
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + cmd], capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:-1] == rt.task_argv("export", params, environ={})


def test_unknown_task_is_an_error():
    with pytest.raises(KeyError):
        rt.task_argv("deploy", {}, environ={})


def test_failure_callback_names_the_task_and_its_stage(caplog):
    class TI:
        task_id, try_number, max_tries = "kafka_start", 1, 1

    with caplog.at_level(logging.ERROR, logger="recsys_tasks"):
        rt.log_task_failure({"task_instance": TI(), "run_id": "manual__x", "exception": RuntimeError("exit 2")})
    assert caplog.messages == ["recsys task kafka_start (stage kafka) failed on try 1 of 2 in run manual__x: exit 2"]


def test_helper_examples_hold():
    """dags/ is outside pytest's doctest collection (pyproject ignores it), so its examples run here."""
    import doctest

    assert doctest.testmod(rt).failed == 0


def test_task_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        rt.TaskPolicy(retries=-1, timeout_s=10)
    with pytest.raises(ValueError):
        rt.TaskPolicy(retries=0, timeout_s=0)


# --- (c) end to end: `airflow dags test recsys_main` on the real services ---------------------------------------

E2E_KAFKA_PORT = int(os.environ.get("RECSYS_TEST_KAFKA_PORT", "19092")) + 200  # apart from the session broker


def _placed_ranks(plan: dict[str, str]) -> set[int]:
    """Ranks named in a placements summary ``{table: "<sharding type>@rank<r>[,<r>...]"}``."""
    return {int(r) for where in plan.values() for r in where.rsplit("@rank", 1)[1].split(",")}


@needs_airflow
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_airflow_dags_test_runs_the_main_job_end_to_end(tmp_path, movielens):
    data, artifacts, run_name = tmp_path / "data", tmp_path / "artifacts", "dagtest"
    data.mkdir()
    (data / "raw").symlink_to(ROOT / "data" / "raw")  # the fetched MovieLens-100K, not fetched again
    bootstrap = f"127.0.0.1:{E2E_KAFKA_PORT}"
    env = airflow_env(tmp_path / "airflow", KAFKA_PORT=str(E2E_KAFKA_PORT),
                      KAFKA_CONTROLLER_PORT=str(E2E_KAFKA_PORT + 1), RECSYS_KAFKA__BOOTSTRAP=bootstrap,
                      RECSYS_SPARK__SHUFFLE_PARTITIONS="2")
    subprocess.run([str(AIRFLOW_BIN), "db", "migrate"], env=env, cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    # the directories through the run's params, the broker through the environment: both paths are exercised
    conf = {"data_dir": str(data), "artifacts_dir": str(artifacts), "run_name": run_name,
            "kafka_state_dir": str(tmp_path / "kafka")}
    log = tmp_path / "dags-test.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([str(AIRFLOW_BIN), "dags", "test", "recsys_main", "-c", json.dumps(conf)], env=env,
                              cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=1700)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    print(f"airflow dags test recsys_main: exit {proc.returncode} after {wall:.0f} s; log {log}")
    failed = [line for line in text.splitlines() if "recsys task" in line and "failed on try" in line]
    assert proc.returncode == 0, "\n".join(failed + ["... end of log:"] + text.splitlines()[-60:])
    assert "kafka stopped" in text  # the teardown ran

    cfg = PlatformConfig(data_dir=data, artifacts_dir=artifacts, run_name=run_name)
    from features.results import read_stage_result

    produce, ingest, features = (read_stage_result(cfg, s) for s in ("produce", "ingest", "features"))
    assert produce["events_produced"] == ingest["events_bronze"] == 100_000
    assert features["samples"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
    deepfm, item2vec = read_stage_result(cfg, "train_deepfm"), read_stage_result(cfg, "train_item2vec")
    assert deepfm["test_auc"] > 0.68
    assert _placed_ranks(deepfm["sharding_plan"]) == {0, 1}
    assert _placed_ranks(item2vec["sharding_plan"]) <= {0, 1}
    retrieval = read_stage_result(cfg, "evaluate")["retrieval"]
    assert "popularity" in retrieval and "item2vec" in retrieval
    for policy, m in retrieval.items():
        assert 0.0 <= m["hr@10"] <= 1.0 and m["cases"] > 0, policy
