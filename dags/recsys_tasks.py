"""Plain functions behind the recsys DAGs: what each task runs, how long it may take, how often it is retried,
and what is logged when it fails. Standard library only (plus pipelines.stages, itself standard library only),
so a DAG file imports this at parse time and the tests call it without Airflow or any cluster.

A task's command is rendered when the task runs, not when the DAG file is parsed: it reads the run's params
and the worker's environment, and lists the Spark jars, none of which is parse-time work.

>>> cmd = shell_command("produce", {"data_dir": "/d", "run_name": None}, environ={})
>>> cmd.startswith("env RECSYS_DATA_DIR=/d ") and cmd.endswith(" -m pipelines.produce")
True
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # dags/..
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipelines.stages import (STAGES, build_command, kafka_command, kafka_env, model_names, stage_env,  # noqa: E402, F401
                              train_models)

log = logging.getLogger(__name__)

#: DAG param -> the RECSYS_* variable it sets for every stage (see features.config). A param left unset (None or
#: "") sets nothing, so the worker's own environment, then the config defaults, apply.
PARAM_ENV: dict[str, str] = {
    "data_dir": "RECSYS_DATA_DIR",
    "artifacts_dir": "RECSYS_ARTIFACTS_DIR",
    "run_name": "RECSYS_RUN_NAME",
    "kafka_bootstrap": "RECSYS_KAFKA__BOOTSTRAP",
}
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"  # features.config.KafkaConfig.bootstrap
DEFAULT_RUN_NAME = "demo"  # features.config.PlatformConfig.run_name


@dataclass(frozen=True)
class TaskPolicy:
    """How a task is retried and bounded.

    Args:
        retries: extra tries after the first fails.
        timeout_s: wall-clock limit of one try, seconds.
        retry_delay_s: wait between tries, seconds.
    """

    retries: int
    timeout_s: int
    retry_delay_s: int = 30

    def __post_init__(self):
        if self.retries < 0 or self.timeout_s <= 0 or self.retry_delay_s < 0:
            raise ValueError(f"invalid task policy {self}: retries >= 0, timeout_s > 0, retry_delay_s >= 0")


#: Task id -> policy. Limits are several times the wall time of one MovieLens-100K run on 2 cores.
POLICIES: dict[str, TaskPolicy] = {
    "kafka_start": TaskPolicy(retries=1, timeout_s=180, retry_delay_s=10),
    "produce": TaskPolicy(retries=1, timeout_s=600),
    "ingest": TaskPolicy(retries=1, timeout_s=1200),
    "features": TaskPolicy(retries=1, timeout_s=1200),
    **{f"train_{m}": TaskPolicy(retries=1, timeout_s=2400) for m in model_names()},
    "export": TaskPolicy(retries=1, timeout_s=900),
    "evaluate": TaskPolicy(retries=1, timeout_s=900),
    "kafka_stop": TaskPolicy(retries=0, timeout_s=180),
}

#: Task ids of the main job in run order: the broker, every stage of pipelines.stages.STAGES, the broker again;
#: the train stages only of the models ``DAG_TRAIN_MODELS`` names (every registered model when it is unset, as in
#: the train DAG: ``pipelines.stages.train_models``).
MAIN_TASK_IDS: tuple[str, ...] = (
    "kafka_start",
    *(s.name for s in STAGES if not s.name.startswith("train_") or s.name[len("train_"):] in train_models()),
    "kafka_stop")


def stage_of(task_id: str) -> str:
    """The stage a task runs: its own name for a pipelines.stages stage, ``kafka`` for the broker tasks.

    >>> stage_of("train_deepfm"), stage_of("kafka_stop")
    ('train_deepfm', 'kafka')
    """
    return "kafka" if task_id.startswith("kafka_") else task_id


def run_env(params: Mapping | None) -> dict[str, str]:
    """The RECSYS_* variables a DAG run sets from its params; unset params set nothing.

    >>> run_env({"data_dir": "/d", "run_name": "", "kafka_bootstrap": "127.0.0.1:19092"})
    {'RECSYS_DATA_DIR': '/d', 'RECSYS_KAFKA__BOOTSTRAP': '127.0.0.1:19092'}
    """
    params = params or {}
    return {var: str(params[p]) for p, var in PARAM_ENV.items() if params.get(p) not in (None, "")}


def task_argv(task_id: str, params: Mapping | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The argv a task runs, ``env VAR=value ...`` first: the RECSYS_* from the run's params, and for the broker
    tasks its ports (from the bootstrap address in the params or else the environment) and state folder
    (``kafka_state_dir`` param, else ``var/<run name>/kafka`` as ``make demo`` uses).

    Args:
        task_id: one of MAIN_TASK_IDS.
        params: the DAG run's params (``data_dir``, ``artifacts_dir``, ``run_name``, ``kafka_bootstrap``,
            ``kafka_state_dir``); missing or empty ones fall back to ``environ``.
        environ: the worker's environment; ``os.environ`` when None.

    Raises:
        KeyError: no task of that id.
    """
    environ = os.environ if environ is None else environ
    params = params or {}
    env = run_env(params)
    if task_id in ("kafka_start", "kafka_stop"):
        merged = {**environ, **env}
        env.update(kafka_env(merged.get("RECSYS_KAFKA__BOOTSTRAP") or DEFAULT_BOOTSTRAP))
        state = params.get("kafka_state_dir") or REPO / "var" / (merged.get("RECSYS_RUN_NAME") or DEFAULT_RUN_NAME) / "kafka"
        argv = kafka_command(task_id.removeprefix("kafka_"), state)
    else:
        argv = build_command(task_id)
    return ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else argv


def shell_command(task_id: str, params: Mapping | None = None, environ: Mapping[str, str] | None = None) -> str:
    """:func:`task_argv` quoted for ``bash -c`` (what a BashOperator runs); a DAG registers this as the
    ``recsys_command`` macro and renders it when the task runs."""
    return shlex.join(task_argv(task_id, params, environ))


def log_task_failure(context: Mapping) -> None:
    """Failure and retry callback: logs the failing task, its stage, the try and the error to the task's log.

    >>> class TI: task_id, try_number, max_tries = "features", 2, 1
    >>> logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s", force=True)
    >>> log_task_failure({"task_instance": TI(), "run_id": "manual__1", "exception": RuntimeError("exit 1")})
    recsys task features (stage features) failed on try 2 of 2 in run manual__1: exit 1
    """
    ti = context["task_instance"]
    log.error("recsys task %s (stage %s) failed on try %s of %s in run %s: %s", ti.task_id, stage_of(ti.task_id),
              ti.try_number, ti.max_tries + 1, context.get("run_id"), context.get("exception"))
