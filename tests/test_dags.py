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
from pipelines.stages import STAGES, build_command, model_names, spark_jar_list, stage_env

AIRFLOW_PY = ROOT / ".venv-airflow" / "bin" / "python"
AIRFLOW_BIN = ROOT / ".venv-airflow" / "bin" / "airflow"
DAGS = ROOT / "dags"
MAIN_ORDER = ["kafka_start", "produce", "ingest", "features", *[f"train_{m}" for m in model_names()], "export",
              "evaluate", "kafka_stop"]  # one train task per registered model
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
for dag_id in ("features_daily", "train", "evaluate_and_publish", "stream_supervisor"):
    if dag_id not in bag.dags:
        continue
    dag = bag.dags[dag_id]
    info = out["dags"][dag_id]
    info.update(catchup=dag.catchup, max_active_runs=dag.max_active_runs)
    for t in dag.tasks:
        ti = info["tasks"][t.task_id]
        ti["outlets"] = sorted(getattr(a, "name", str(a)) for a in t.outlets)
        ctx = {"ds": "2024-01-02", "run_id": "scheduled__2024-01-02T00:00:00+00:00", "ti": type("TI", (), {"try_number": 1})()}
        env = t.get_template_env()
        if type(t).__name__ == "SparkSubmitOperator":
            for field in ("application_args", "jars", "name"):
                setattr(t, field, t.render_template(getattr(t, field), ctx, jinja_env=env))
            ti["spark_submit"] = t._get_hook()._build_spark_submit_command(t.application)
            ti["spark_env_vars"] = t.env_vars
        elif type(t).__name__ == "BashOperator":
            ti["rendered"] = t.render_template(t.bash_command, ctx, jinja_env=env)
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
    assert {"recsys_main", "features_daily", "train", "evaluate_and_publish", "stream_supervisor"} <= set(dagbag["dags"])


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
    ("evaluate", ["evaluation.evaluate"]),
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
                      RECSYS_SPARK__SHUFFLE_PARTITIONS="2",
                      DAG_TRAIN_MODELS="deepfm,din,item2vec")  # the models asserted below; each one more is minutes
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
    din = read_stage_result(cfg, "train_din")  # the features stage wrote the behaviours' stars; DIN read them
    assert din["history_ratings"] and "t_rating" in din["sharding_plan"] and din["test_auc"] > 0.68
    assert _placed_ranks(item2vec["sharding_plan"]) <= {0, 1}
    retrieval = read_stage_result(cfg, "evaluate")["retrieval"]
    assert "popularity" in retrieval and "item2vec" in retrieval
    for policy, m in retrieval.items():
        assert 0.0 <= m["hr@10"] <= 1.0 and m["cases"] > 0, policy


# --- (d) the scheduled DAGs: features_daily -> train -> evaluate_and_publish, stream_supervisor -----------------


def _load_dags_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DAGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rf = _load_dags_module("recsys_flows")
sp = _load_dags_module("stream_policy")


@needs_airflow
def test_features_daily_submits_one_day_through_the_spark_provider(dagbag):
    dag = dagbag["dags"]["features_daily"]
    assert dag["schedule"] == "'@daily'" and dag["catchup"] is True and dag["max_active_runs"] == 1
    (task,) = dag["tasks"].values()
    assert task["operator"] == "SparkSubmitOperator"
    assert task["outlets"] == [rf.GOLD_FEATURES_ASSET]
    assert task["retries"] == 2 and task["timeout_s"] == 3600 and task["on_failure"] == ["log_partition_failure"]
    # the command the provider's hook builds from the operator's fields, against the default connection (local[2])
    argv = task["spark_submit"]
    assert argv[:3] == ["spark-submit", "--master", "local[2]"]
    assert argv[argv.index("--properties-file") + 1] == str(ROOT / "infra" / "spark" / "local.conf")
    assert argv[argv.index("--jars") + 1] == spark_jar_list()
    assert argv[argv.index("--name") + 1] == "recsys-daily-features-2024-01-02"
    assert argv[-3:] == [str(ROOT / "pipelines" / "daily_features.py"), "--date", "2024-01-02"]
    env = task["spark_env_vars"]
    assert env["PATH"].split(":")[0] == str(ROOT / ".venv" / "bin")  # spark-submit is the project's
    assert env["PYSPARK_PYTHON"] == str(ROOT / ".venv" / "bin" / "python")


@needs_airflow
def test_train_runs_after_gold_features_and_produces_embeddings(dagbag):
    dag = dagbag["dags"]["train"]
    assert rf.GOLD_FEATURES_ASSET in dag["schedule"]
    tasks = dag["tasks"]
    order = ["training_set", *[f"train_{m}" for m in model_names()], "export_embeddings"]  # DAG_TRAIN_MODELS unset
    assert sorted(tasks) == sorted(order)
    assert [tasks[t]["upstream"] for t in order] == [[]] + [[t] for t in order[:-1]]
    assert tasks["training_set"]["spark_submit"][-1] == str(ROOT / "pipelines" / "features_batch.py")
    for model in ("deepfm", "din", "item2vec"):  # no DAG_RAY_JOBS_ADDRESS here: the local Ray cluster
        assert shlex.split(tasks[f"train_{model}"]["rendered"]) == rf.ray_job_argv(model, None)
    assert shlex.split(tasks["export_embeddings"]["rendered"]) == [str(ROOT / ".venv/bin/python"), "-m",
                                                                 "serving.export"]
    assert tasks["export_embeddings"]["outlets"] == [rf.EMBEDDINGS_ASSET]
    assert all(t["on_failure"] == ["log_partition_failure"] and t["timeout_s"] for t in tasks.values())


@needs_airflow
def test_evaluate_and_publish_runs_after_embeddings(dagbag):
    dag = dagbag["dags"]["evaluate_and_publish"]
    assert rf.EMBEDDINGS_ASSET in dag["schedule"]
    tasks = dag["tasks"]
    assert tasks["publish"]["upstream"] == ["replay"]
    assert shlex.split(tasks["replay"]["rendered"])[1:] == ["-m", "evaluation.evaluate"]
    assert shlex.split(tasks["publish"]["rendered"])[1:] == ["-m", "evaluation.gate"]


@needs_airflow
def test_stream_supervisor_runs_every_five_minutes_alone(dagbag):
    dag = dagbag["dags"]["stream_supervisor"]
    assert dag["schedule"] == "datetime.timedelta(seconds=300)" and dag["max_active_runs"] == 1
    assert dag["catchup"] is False
    assert dag["tasks"]["supervise_ingest"]["timeout_s"] == 180


def test_ray_job_is_submitted_through_the_jobs_api_when_an_address_is_set():
    env = {"DAG_RAY_JOBS_ADDRESS": "http://ray-head:8265", "RECSYS_TRAIN__USE_GPU": "true",
           "RECSYS_DATA_DIR": "s3://lake", "HOME": "/root"}
    argv = shlex.split(rf.ray_job_command("deepfm", "scheduled__2024-01-02T00:00:00+00:00", 2, environ=env))
    assert argv[:5] == [str(ROOT / ".venv/bin/ray"), "job", "submit", "--address", "http://ray-head:8265"]
    assert argv[argv.index("--submission-id") + 1] == "recsys-train-deepfm-scheduled__2024-01-02T00-00-00-00-00-try2"
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    # the worker's RECSYS_* for the job, which joins the cluster it runs on rather than starting its own
    assert runtime_env == {"env_vars": {"RECSYS_TRAIN__USE_GPU": "true", "RECSYS_DATA_DIR": "s3://lake",
                                        "RECSYS_TRAIN__RAY_ADDRESS": "auto"}}
    assert argv[argv.index("--") + 1:] == ["python", "-m", "training.train", "--model", "deepfm"]
    # the entry point is the one the local default (and make demo) runs
    assert argv[argv.index("--") + 2:] == build_command("train_deepfm")[1:]
    with pytest.raises(ValueError):
        rf.ray_job_argv("wide_and_deep", None)


def test_ray_job_argv_is_what_the_ray_cli_parses():
    """`ray job submit`'s own parser (click, in .venv) accepts the argv: options before ``--``, entry point after."""
    ray_py = ROOT / ".venv" / "bin" / "python"
    argv = rf.ray_job_argv("item2vec", "http://127.0.0.1:1", submission_id="s", runtime_env={"env_vars": {"A": "1"}})
    code = ("import sys; from ray.dashboard.modules.job.cli import submit; "
            "ctx = submit.make_context('submit', sys.argv[1:]); "
            "print(ctx.params['address'], ctx.params['submission_id'], ctx.params['runtime_env_json'], "
            "ctx.params['entrypoint'])")
    proc = subprocess.run([str(ray_py), "-c", code, *argv[3:]], capture_output=True, text=True, timeout=120)
    if "No module named" in proc.stderr:
        pytest.skip("ray's job CLI is not importable here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split(" ", 3)[:2] == ["http://127.0.0.1:1", "s"]
    assert "training.train" in proc.stdout and "item2vec" in proc.stdout


def test_spark_settings_per_profile():
    assert rf.spark_profile({}) == "local"
    assert rf.spark_profile({"DAG_SPARK_PROFILE": "kubernetes"}) == "kubernetes"
    with pytest.raises(ValueError):
        rf.spark_profile({"DAG_SPARK_PROFILE": "yarn"})
    for profile in rf.SPARK_PROFILES:
        assert Path(rf.spark_properties_file(profile)).is_file()
    assert rf.spark_jars("kubernetes") is None and rf.spark_env_vars("kubernetes") == {"TZ": "UTC"}
    conn = json.loads(rf.DEFAULT_SPARK_CONN)
    assert conn["host"] == "local[2]" and conn["extra"]["spark-binary"] == "spark-submit"


def test_partition_failure_callback_names_table_and_day(caplog):
    class TI:
        dag_id, task_id, try_number, max_tries = "features_daily", "daily_features", 3, 2

    with caplog.at_level(logging.ERROR, logger="recsys_flows"):
        rf.log_partition_failure({"task_instance": TI(), "ds": "2024-01-03", "run_id": "backfill__x",
                                  "exception": RuntimeError("exit 1")})
    assert caplog.messages == ["recsys features_daily.daily_features failed writing gold.ctr_samples "
                               "event_date=2024-01-03 (try 3 of 3, run backfill__x): exit 1"]


def test_flows_and_policy_examples_hold():
    import doctest

    assert doctest.testmod(rf).failed == 0 and doctest.testmod(sp).failed == 0


class QueuedProbe:
    """A fake probe that returns queued observations, one per call."""

    def __init__(self, *observations):
        self.queue = list(observations)

    def observe(self):
        return self.queue.pop(0)


def test_supervisor_restarts_a_dead_or_stuck_query_and_leaves_a_healthy_one():
    obs = sp.Observation
    probe = QueuedProbe(
        obs(alive=True, last_offset=3, last_commit=3, offset_age_s=10_000.0),  # idle, all committed
        obs(alive=True, last_offset=4, last_commit=3, offset_age_s=30.0),  # a batch in flight
        obs(alive=True, last_offset=4, last_commit=3, offset_age_s=601.0),  # stuck
        obs(alive=False, last_offset=4, last_commit=4, offset_age_s=1.0),  # dead
        obs(alive=False, last_offset=None, last_commit=None, offset_age_s=None),  # never started
        obs(alive=False, last_offset=4, last_commit=4, offset_age_s=1.0),  # dead again, too often
    )
    restarts = []
    policy = sp.SupervisorPolicy(stuck_after_s=600, max_restarts=3)
    actions = [sp.supervise(probe, policy, lambda: restarts.append(1)) for _ in range(5)]
    assert actions == [sp.Action.HEALTHY, sp.Action.WAIT, sp.Action.RESTART, sp.Action.RESTART, sp.Action.RESTART]
    assert len(restarts) == 3
    with pytest.raises(RuntimeError, match="without a new commit"):
        sp.supervise(probe, policy, lambda: restarts.append(1), restarts_without_progress=3)
    assert len(restarts) == 3 and probe.queue == []
    with pytest.raises(ValueError):
        sp.SupervisorPolicy(stuck_after_s=0)


def test_ingest_probe_reads_the_checkpoint_and_pid_file(tmp_path):
    ckpt, pid = tmp_path / "ckpt", tmp_path / "ingest.pid"
    (ckpt / "offsets").mkdir(parents=True)
    (ckpt / "commits").mkdir()
    probe = sp.IngestProbe(ckpt, pid, clock=lambda: 1_000_000.0)
    assert probe.observe() == sp.Observation(alive=False, last_offset=None, last_commit=None, offset_age_s=None)
    for n in (0, 1, 2):
        (ckpt / "offsets" / str(n)).write_text("v1")
        os.utime(ckpt / "offsets" / str(n), (999_000.0, 999_000.0 + n))
    for n in (0, 1):
        (ckpt / "commits" / str(n)).write_text("v1")
    (ckpt / "offsets" / ".2.crc").write_text("")  # Spark's checksum files are not batches
    pid.write_text(str(os.getpid()))
    assert probe.observe() == sp.Observation(alive=True, last_offset=2, last_commit=1, offset_age_s=998.0)
    pid.write_text("999999999")
    assert probe.observe().alive is False


# --- (e) end to end: the scheduled DAGs with `airflow dags test`, training through a real Ray Jobs API ----------
#
# features_daily (one day) -> train (training set, three Ray jobs submitted to a local head, embedding export) ->
# evaluate_and_publish (replay, publish gate), each with `airflow dags test` in one temporary AIRFLOW_HOME, on a
# bronze table holding MovieLens-100K as ingest writes it (the Kafka path is covered by recsys_main's test above).

RAY_TEST_PORT = int(os.environ.get("RECSYS_TEST_RAY_PORT", "29300"))  # the head's GCS; the next ports follow
DAILY_DAY = "1998-03-01"


def write_movielens_bronze(spark, ratings, lake: Path) -> int:
    """bronze.interactions holding every rating of ``ratings`` as ingest writes it (event_id ``ml100k-<row>``, as
    pipelines.produce names it; one Kafka partition, offsets in row order). Returns the row count."""
    from datetime import datetime, timezone

    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    from features.tables import BRONZE_INTERACTIONS

    schema = StructType.fromDDL(BRONZE_INTERACTIONS.schema)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    pdf = ratings.reset_index(drop=True)
    rows = [(f"ml100k-{i:06d}", int(u), int(it), float(r), int(ts), i)
            for i, (u, it, r, ts) in enumerate(pdf[["user_id", "item_id", "rating", "timestamp"]].itertuples(False))]
    df = (spark.createDataFrame(rows, "event_id string, user_id int, item_id int, rating float, ts long, off long")
          .withColumn("event_time", F.timestamp_seconds("ts")).withColumn("event_date", F.to_date("event_time"))
          .withColumn("kafka_partition", F.lit(0)).withColumn("kafka_offset", F.col("off"))
          .withColumn("ingested_at", F.lit(now)).withColumn("event_type", F.lit("rating")))
    df = df.select([(F.col(f.name) if f.name in df.columns else F.lit(None)).cast(f.dataType).alias(f.name)
                    for f in schema.fields])
    df.write.format("delta").mode("overwrite").partitionBy(*BRONZE_INTERACTIONS.partition_by).save(
        BRONZE_INTERACTIONS.path(lake))
    return len(rows)


class RayHead:
    """A local Ray head with its dashboard (the Jobs API) started by ``ray start --head --block`` from the project's
    .venv, in its own session and temp dir (so no other ``ray.init()`` on this machine finds it); ``stop`` ends
    exactly its process group. Job drivers run ``python`` from .venv with PYTHONPATH at the checkout.

    Ray 2.60 turns token authentication on for a new cluster: the head gets a token of its own (``RAY_AUTH_MODE=token``,
    ``RAY_AUTH_TOKEN``), and ``client_env`` is what a client (``ray job submit``) needs to talk to it, as on a real
    cluster (docs/ray.md)."""

    def __init__(self, port: int, num_cpus: int = 4):
        import secrets
        import tempfile

        self.port, self.dashboard_port = port, port + 65
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: Ray's socket paths are limited
        self.log = self.temp_dir / "head.log"
        self.token = secrets.token_hex(32)
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
               "RAY_USAGE_STATS_ENABLED": "0", **self.client_env}
        env.pop("RAY_ADDRESS", None)
        p = port
        argv = [str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus),
                "--port", str(p), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(p + 1), "--node-manager-port", str(p + 2),
                "--object-manager-port", str(p + 3), "--dashboard-agent-listen-port", str(p + 4),
                "--dashboard-agent-grpc-port", str(p + 5), "--runtime-env-agent-port", str(p + 6),
                "--metrics-export-port", str(p + 7), "--min-worker-port", str(p + 10),
                "--max-worker-port", str(p + 60), "--object-store-memory", str(1 << 30),
                "--temp-dir", str(self.temp_dir)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 180) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited: {self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(self._request("/api/version"), timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:  # up, but refusing us: waiting longer would not help
                raise AssertionError(f"Ray's Jobs API at {self.address} answered {e.code}: {e.read()[:300]!r}") from e
            except OSError:
                time.sleep(2)
        raise AssertionError(f"Ray's Jobs API at {self.address} not up after {timeout_s} s; {self.log}")

    def jobs(self) -> dict[str, dict]:
        """The head's jobs, by submission id, as the Jobs API lists them (``ray job list``)."""
        import urllib.request

        with urllib.request.urlopen(self._request("/api/jobs/"), timeout=30) as r:
            return {j["submission_id"]: j for j in json.loads(r.read()) if j.get("submission_id")}

    def _request(self, path: str):
        import urllib.request

        return urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})

    def stop(self) -> None:
        """SIGTERM to ``ray start``'s process group, then SIGKILL to any process still naming this head's temp dir
        (Ray puts job drivers and some workers in groups of their own)."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=20)  # `ray start --block` can take longer than that to wind down
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                if str(self.temp_dir).encode() in (proc_dir / "cmdline").read_bytes():
                    os.kill(int(proc_dir.name), signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to read
                pass


def _json_rows(df) -> list[str]:
    return sorted(json.dumps(r.asDict(recursive=True), sort_keys=True, default=str) for r in df.collect())


def _dags_test(env: dict, cwd: Path, dag_id: str, *args: str, timeout: int = 1700) -> tuple[str, float]:
    log = cwd / f"dags-test-{dag_id}.log"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([str(AIRFLOW_BIN), "dags", "test", dag_id, *args], env=env, cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    print(f"airflow dags test {dag_id}: exit {proc.returncode} after {wall:.0f} s; log {log}")
    failed = [line for line in text.splitlines() if "recsys " in line and " failed writing " in line]
    assert proc.returncode == 0, "\n".join(failed + ["... end of log:"] + text.splitlines()[-60:])
    return text, wall


@needs_airflow
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("AIRFLOW_DAGS_E2E") != "1",
                    reason="three DAGs and three trainings, 15+ min on 2 cores: `make test-dags-e2e` (AIRFLOW_DAGS_E2E=1)")
def test_scheduled_dags_run_end_to_end_with_training_as_ray_jobs(tmp_path, spark, movielens):
    from datetime import date

    from features.results import read_stage_result
    from features.tables import BRONZE_INTERACTIONS, ITEM_WINDOW_STATS, USER_RECENT_ITEMS
    from pipelines.daily_features import feature_rows
    from serving.publish import pointer_path

    data, artifacts, run_name = tmp_path / "data", tmp_path / "artifacts", "scheduled"
    cfg = PlatformConfig(data_dir=data, artifacts_dir=artifacts, run_name=run_name)
    assert write_movielens_bronze(spark, movielens.ratings, cfg.lake_dir) == 100_000
    head = RayHead(RAY_TEST_PORT)
    try:
        env = airflow_env(tmp_path / "airflow", RECSYS_DATA_DIR=str(data), RECSYS_ARTIFACTS_DIR=str(artifacts),
                          RECSYS_RUN_NAME=run_name, RECSYS_RAW_DIR=str(ROOT / "data" / "raw"),
                          RECSYS_SPARK__SHUFFLE_PARTITIONS="2", DAG_FEATURES_DAILY_START="1997-09-01",
                          DAG_RAY_JOBS_ADDRESS=head.address, DAG_TRAIN_MODELS="deepfm,din,item2vec",
                          **head.client_env)
        env.pop("AIRFLOW_CONN_SPARK_DEFAULT", None)  # the DAG files' default: local[2]
        env.pop("RAY_ADDRESS", None)
        for name in [k for k in env if k.startswith("RECSYS_TEST_")]:  # the tests' own ports: features.config
            env.pop(name)  # reads every RECSYS_* and rejects unknown keys (a stage failed on RECSYS_TEST_RAY_PORT)
        subprocess.run([str(AIRFLOW_BIN), "db", "migrate"], env=env, cwd=tmp_path, check=True, capture_output=True,
                       timeout=300)
        walls = {}

        # features_daily for one day: that day's rows of both feature views, as the job's functions compute them
        _, walls["features_daily"] = _dags_test(env, tmp_path, "features_daily", DAILY_DAY)
        day = date.fromisoformat(DAILY_DAY)
        items, users = feature_rows(spark.read.format("delta").load(BRONZE_INTERACTIONS.path(cfg.lake_dir)), day, day)
        for spec, expected in ((ITEM_WINDOW_STATS, items), (USER_RECENT_ITEMS, users)):
            written = spark.read.format("delta").load(spec.path(cfg.lake_dir))
            assert [str(r.event_date) for r in written.select("event_date").distinct().collect()] == [DAILY_DAY]
            got, want = _json_rows(written), _json_rows(expected)
            assert len(got) > 0 and got == want, spec.name

        # train: the training set, then each model as a Ray job through the head's Jobs API, then the export
        head.wait_ready()
        text, walls["train"] = _dags_test(env, tmp_path, "train")
        jobs = head.jobs()
        for model in ("deepfm", "din", "item2vec"):
            (sid,) = [s for s in jobs if s.startswith(f"recsys-train-{model}-manual__")]
            assert jobs[sid]["status"] == "SUCCEEDED", jobs[sid]
            assert jobs[sid]["entrypoint"] == f"python -m training.train --model {model}"
            assert jobs[sid]["runtime_env"]["env_vars"]["RECSYS_DATA_DIR"] == str(data)
        features = read_stage_result(cfg, "features")
        assert features["samples"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
        deepfm, din, item2vec = (read_stage_result(cfg, f"train_{m}") for m in ("deepfm", "din", "item2vec"))
        assert deepfm["test_auc"] > 0.68 and din["test_auc"] > 0.68
        assert _placed_ranks(deepfm["sharding_plan"]) == {0, 1}  # both workers of the job's trainer
        exported = read_stage_result(cfg, "export")
        assert exported, "the export stage wrote no result"

        # evaluate_and_publish: replay of the new embeddings, then the gate (no serving version yet: PUBLISH)
        _, walls["evaluate_and_publish"] = _dags_test(env, tmp_path, "evaluate_and_publish")
        retrieval = read_stage_result(cfg, "evaluate")["retrieval"]
        assert "popularity" in retrieval and "item2vec" in retrieval
        published = read_stage_result(cfg, "publish")
        assert published["decision"] == "publish" and published["candidate"] == item2vec["model_version"]
        assert json.loads(pointer_path(artifacts).read_text())["model_version"] == item2vec["model_version"]
        print("scheduled DAGs, wall seconds:", {k: round(v) for k, v in walls.items()})
    finally:
        head.stop()
