"""Plain functions behind the scheduled DAGs (``features_daily``, ``train``, ``evaluate_and_publish``,
``stream_supervisor``): the spark-submit settings, the Ray job command, the assets that chain the DAGs, and the
failure callback that names the failing table and partition. Standard library only, so a DAG file imports this
at parse time and tests call it without Airflow or any cluster.

Data flow between the DAGs (Airflow 3 assets, so a DAG runs when its input was written, not at a fixed hour)::

    features_daily (@daily, one day of gold features) --[recsys.gold_features]--> train
    train (training set -> Ray jobs -> embedding export) --[recsys.embeddings]--> evaluate_and_publish

The orchestration settings read here are ``DAG_*`` variables (DAG_SPARK_PROFILE, DAG_RAY_JOBS_ADDRESS,
DAG_PUBLISH_COMMAND, DAG_DAILY_FEATURES_APP, DAG_FEATURES_DAILY_START), never ``RECSYS_*``: every stage reads all
``RECSYS_*`` variables into features.config, which rejects unknown keys.

>>> spark_application_args("2024-01-02")
['--date', '2024-01-02']
>>> ray_job_argv("deepfm", "http://head:8265", submission_id="s1", python="python", ray="ray")[:5]
['ray', 'job', 'submit', '--address', 'http://head:8265']
>>> ray_job_argv("deepfm", None, python="python")
['python', '-m', 'training.train', '--model', 'deepfm']
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # dags/..
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.stages import build_command, model_names, spark_jar_list, stage_env, train_models  # noqa: E402, F401

log = logging.getLogger(__name__)

VENV_BIN = REPO / ".venv" / "bin"

#: The default Spark connection (Airflow reads connections from ``AIRFLOW_CONN_<ID>``): local mode with 2 cores,
#: ``spark-submit`` found on the PATH (the operator puts the project's .venv/bin first). A cluster sets its own
#: value, e.g. ``{"conn_type": "spark", "host": "spark://master:7077"}`` or ``"host": "k8s://https://api:6443"``
#: with ``"extra": {"deploy-mode": "cluster", "namespace": "recsys"}`` (see docs/spark.md).
DEFAULT_SPARK_CONN = json.dumps({"conn_type": "spark", "host": "local[2]", "extra": {"spark-binary": "spark-submit"}})

#: spark-defaults style file per profile (``DAG_SPARK_PROFILE``): local (this machine, jars from .jars/spark),
#: standalone or kubernetes (packages resolved from Maven by the cluster; see infra/spark/).
SPARK_PROFILES = ("local", "standalone", "kubernetes")

#: The batch job of one day: ``spark-submit pipelines/daily_features.py --date YYYY-MM-DD`` replaces exactly that
#: day in Delta. ``DAG_DAILY_FEATURES_APP`` points elsewhere (the tests use pipelines/features_batch.py, which
#: ignores ``--date`` and rebuilds everything: idempotent as well).
DAILY_FEATURES_APP = "pipelines/daily_features.py"
TRAINING_SET_APP = "pipelines/features_batch.py"

#: Asset names: what features_daily writes (and train waits for), what train writes (evaluate_and_publish waits).
GOLD_FEATURES_ASSET = "recsys.gold_features"
EMBEDDINGS_ASSET = "recsys.embeddings"
#: The asset URIs, declared once: the producing and the consuming DAG must name the same asset.
GOLD_FEATURES_URI = "recsys://lake/gold/ctr_samples"
EMBEDDINGS_URI = "recsys://artifacts/embeddings"

#: Task id -> (table written, partition column): what the failure callback names.
TASK_TABLES: dict[str, tuple[str, str | None]] = {
    "daily_features": ("gold.ctr_samples", "event_date"),
    "training_set": ("gold.ctr_samples", "split"),
    **{f"train_{m}": (f"models/{m}", None) for m in model_names()},
    "export_embeddings": ("embeddings", None),
    "replay": ("stages/evaluate", None),
    "publish": ("serving pointer", None),
    "supervise_ingest": ("bronze.interactions", None),
}

#: The entry points of the train and evaluate DAGs (``python -m`` modules with their arguments).
TRAIN_MODELS = train_models()
PUBLISH_MODULE = ("evaluation.gate",)  # the publish gate (evaluation/gate.py); DAG_PUBLISH_COMMAND overrides


def spark_profile(environ: Mapping[str, str] | None = None) -> str:
    """The Spark profile from ``DAG_SPARK_PROFILE`` (default ``local``).

    Raises:
        ValueError: not one of SPARK_PROFILES.
    """
    environ = os.environ if environ is None else environ
    profile = environ.get("DAG_SPARK_PROFILE") or "local"
    if profile not in SPARK_PROFILES:
        raise ValueError(f"DAG_SPARK_PROFILE={profile!r} is not one of {SPARK_PROFILES}")
    return profile


def spark_properties_file(profile: str = "local") -> str:
    """The spark-defaults style file of a profile, passed as ``--properties-file``.

    >>> spark_properties_file("kubernetes").endswith("infra/spark/kubernetes.conf")
    True
    """
    return str(REPO / "infra" / "spark" / f"{profile}.conf")


def spark_env_vars(profile: str = "local", environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of spark-submit. Locally: the project's Python for driver and executors, and its .venv/bin
    first on the PATH (so the connection's ``spark-binary: spark-submit`` is the project's). On a cluster the
    operator turns env_vars into driver-pod settings, so only the time zone is set; the image provides the rest.

    >>> spark_env_vars("standalone")
    {'TZ': 'UTC'}
    """
    if profile != "local":
        return {"TZ": "UTC"}
    environ = os.environ if environ is None else environ
    return {**stage_env(), "PATH": f"{VENV_BIN}:{environ.get('PATH', '/usr/bin:/bin')}"}


def spark_jars(profile: str = "local") -> str | None:
    """The ``--jars`` list: the jars of .jars/spark locally (nothing resolved at run time); None on a cluster,
    whose properties file lists ``spark.jars.packages``. Called when the task runs (a DAG macro), not at parse."""
    return spark_jar_list() if profile == "local" else None


def spark_application_args(ds: str) -> list[str]:
    """Arguments of the daily job for the day ``ds`` (``YYYY-MM-DD``, the run's data_interval_start)."""
    return ["--date", ds]


def ray_job_argv(model: str, address: str | None, submission_id: str | None = None, python: str | None = None,
                 ray: str | None = None, runtime_env: Mapping | None = None) -> list[str]:
    """The argv that trains ``model``.

    With a Ray address (the dashboard's, ``http://head:8265``; ``DAG_RAY_JOBS_ADDRESS``): a Ray job submitted
    through the Jobs API (``ray job submit``), which waits for the job and exits with its status; the entry point is
    the same ``python -m training.train --model <model>`` that runs locally. Without one: the entry point itself,
    which starts a local Ray cluster in-process (features.config ``train.ray_cpus``) and stops it when done.

    Args:
        model: a registered model (``training.registry.model_names``).
        address: Ray Jobs API address, or None for the local cluster.
        submission_id: the job's id (unique per try, so a retry never collides with a finished job).
        python: the interpreter on the Ray head (``python``) or here (the project's .venv).
        ray: the ``ray`` CLI (default the project's .venv/bin/ray).
        runtime_env: Ray runtime environment (env_vars, working_dir) for the job.

    Raises:
        ValueError: an unknown model.
    """
    if model not in model_names():
        raise ValueError(f"unknown model {model!r}; one of {', '.join(model_names())}")
    if not address:
        return [python or str(VENV_BIN / "python"), "-m", "training.train", "--model", model]
    argv = [ray or str(VENV_BIN / "ray"), "job", "submit", "--address", address]
    if submission_id:
        argv += ["--submission-id", submission_id]
    if runtime_env:
        argv += ["--runtime-env-json", json.dumps(dict(runtime_env), sort_keys=True)]
    return [*argv, "--", python or "python", "-m", "training.train", "--model", model]


def ray_job_command(model: str, run_id: str, try_number: int | str = 1,
                    environ: Mapping[str, str] | None = None) -> str:
    """:func:`ray_job_argv` for a task, quoted for bash, with the address and the job's environment read from the
    worker's environment when the task runs: ``DAG_RAY_JOBS_ADDRESS`` (none: local cluster) and every
    ``RECSYS_*`` variable (passed to the job as its env_vars, so the job reads the same lake and settings). A
    submitted job also gets ``RECSYS_TRAIN__RAY_ADDRESS=auto`` unless the worker sets it: the entry point then joins
    the cluster the job runs on (the Jobs API sets ``RAY_ADDRESS`` for it) instead of starting its own.

    >>> ray_job_command("item2vec", "manual__1", environ={})  # doctest: +ELLIPSIS
    '.../.venv/bin/python -m training.train --model item2vec'
    >>> argv = shlex.split(ray_job_command("din", "r1", environ={"DAG_RAY_JOBS_ADDRESS": "http://h:8265"}))
    >>> argv[argv.index("--runtime-env-json") + 1]
    '{"env_vars": {"RECSYS_TRAIN__RAY_ADDRESS": "auto"}}'
    """
    environ = os.environ if environ is None else environ
    address = environ.get("DAG_RAY_JOBS_ADDRESS") or None
    env = {k: v for k, v in environ.items() if k.startswith("RECSYS_")}
    if address:
        env.setdefault("RECSYS_TRAIN__RAY_ADDRESS", "auto")
    safe_run = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)
    return shlex.join(ray_job_argv(model, address, submission_id=f"recsys-train-{model}-{safe_run}-try{try_number}",
                                   runtime_env={"env_vars": env} if env else None))


def python_command(module: tuple[str, ...] | list[str], environ: Mapping[str, str] | None = None) -> str:
    """``python -m <module...>`` from the project's .venv, quoted for bash.

    >>> python_command(("evaluation.evaluate", "--k", "10")).endswith("python -m evaluation.evaluate --k 10")
    True
    """
    return shlex.join([str(VENV_BIN / "python"), "-m", *module])


def publish_command(environ: Mapping[str, str] | None = None) -> str:
    """The publish gate's command: ``DAG_PUBLISH_COMMAND`` when set (a full shell command), else
    ``python -m evaluation.gate``."""
    environ = os.environ if environ is None else environ
    return environ.get("DAG_PUBLISH_COMMAND") or python_command(PUBLISH_MODULE)


def failed_partition(task_id: str, context: Mapping) -> str:
    """``<table> <column>=<day>`` (or ``<table>`` for an unpartitioned output) of a failed task.

    >>> failed_partition("daily_features", {"ds": "2024-01-02"})
    'gold.ctr_samples event_date=2024-01-02'
    >>> failed_partition("train_deepfm", {"ds": "2024-01-02"})
    'models/deepfm'
    """
    table, column = TASK_TABLES.get(task_id, (task_id, None))
    if column == "event_date":
        return f"{table} {column}={context.get('ds')}"
    return table


def log_partition_failure(context: Mapping) -> None:
    """Failure and retry callback: logs the failing task, the table and partition it writes, the try and the error.

    >>> class TI: task_id, try_number, max_tries, dag_id = "daily_features", 1, 2, "features_daily"
    >>> logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s", force=True)
    >>> log_partition_failure({"task_instance": TI(), "ds": "2024-01-02", "run_id": "r1", "exception": "exit 1"})
    recsys features_daily.daily_features failed writing gold.ctr_samples event_date=2024-01-02 (try 1 of 3, run r1): exit 1
    """
    ti = context["task_instance"]
    log.error("recsys %s.%s failed writing %s (try %s of %s, run %s): %s", getattr(ti, "dag_id", "?"), ti.task_id,
              failed_partition(ti.task_id, context), ti.try_number, ti.max_tries + 1, context.get("run_id"),
              context.get("exception"))
