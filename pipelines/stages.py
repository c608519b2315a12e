"""The stages of the main job as command lines: the one definition that ``make demo`` (pipelines.demo) and the
Airflow DAGs (dags/) both run. Plain functions returning argv lists, standard library only, so a DAG file can
import this at parse time and a test can assert the commands without any cluster.

Every stage reads its configuration from the environment (``RECSYS_*``, see features.config) and writes its
figures with ``features.results.write_stage_result`` under the stage's name.

>>> build_command("features", python="py", spark_submit="spark-submit")[:2]
['spark-submit', '--master']
>>> [s.name for s in STAGES if not s.name.startswith("train_")]
['produce', 'ingest', 'features', 'export', 'evaluate']
>>> [s.name for s in STAGES if s.name.startswith("train_")] == [f"train_{m}" for m in model_names()]
True

The train stages are one per registered model, in name order (``model_names``: the files of
``training/models/``, read without importing anything of ``training``, as a DAG file must at parse time).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def model_names(root: Path = ROOT) -> tuple[str, ...]:
    """The registered models' names, sorted: each model lives in ``training/models/<name>.py``, which
    ``training.registry.register`` enforces, so the file names are the registry's names (a test checks both agree).
    """
    return tuple(sorted(p.stem for p in (root / "training" / "models").glob("*.py") if not p.stem.startswith("_")))


def train_models(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The models the DAGs train (the train DAG, and recsys_main's train stages): ``DAG_TRAIN_MODELS``
    (comma-separated registered names), else every registered model (``model_names``).

    >>> train_models({"DAG_TRAIN_MODELS": "din, item2vec"})
    ('din', 'item2vec')

    Raises:
        ValueError: a name that is not registered.
    """
    environ = os.environ if environ is None else environ
    chosen = tuple(m.strip() for m in environ.get("DAG_TRAIN_MODELS", "").split(",") if m.strip())
    unknown = sorted(set(chosen) - set(model_names()))
    if unknown:
        raise ValueError(f"DAG_TRAIN_MODELS names unregistered models {unknown}; registered: {model_names()}")
    return chosen or model_names()


@dataclass(frozen=True)
class Stage:
    """One step of the main job.

    Args:
        name: the stage's name; also the name of its result file.
        module: ``python -m`` module, or for Spark stages the script path relative to the repo root.
        args: fixed arguments.
        spark: run through ``spark-submit`` (the jars passed with ``--jars``) rather than ``python -m``.
    """

    name: str
    module: str
    args: tuple[str, ...] = ()
    spark: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("produce", "pipelines.produce"),
    Stage("ingest", "pipelines/ingest.py", ("--trigger", "available-now"), spark=True),
    Stage("features", "pipelines/features_batch.py", spark=True),
    *(Stage(f"train_{m}", "training.train", ("--model", m)) for m in model_names()),
    Stage("export", "serving.export"),
    Stage("evaluate", "evaluation.evaluate"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
#: After the main job (not a task of the recsys_main DAG): the HTML evaluation report of the run, evaluation.report.
REPORT_STAGE = Stage("report", "evaluation.report")
STAGE_BY_NAME[REPORT_STAGE.name] = REPORT_STAGE


def spark_jar_list(root: Path = ROOT) -> str:
    return ",".join(sorted(str(p) for p in (root / ".jars" / "spark").glob("*.jar")))


def build_command(stage: str, python: str = str(ROOT / ".venv/bin/python"),
                  spark_submit: str = str(ROOT / ".venv/bin/spark-submit"), master: str = "local[2]",
                  driver_memory: str = "2g", extra: tuple[str, ...] = ()) -> list[str]:
    """The argv that runs ``stage`` from the repository root.

    Raises:
        KeyError: no stage of that name.
    """
    s = STAGE_BY_NAME[stage]
    if s.spark:
        return [spark_submit, "--master", master, "--driver-memory", driver_memory, "--jars", spark_jar_list(),
                "--conf", "spark.sql.session.timeZone=UTC", "--conf", "spark.ui.enabled=false",
                "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
                "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
                str(ROOT / s.module), *s.args, *extra]
    return [python, "-m", s.module, *s.args, *extra]


def stage_env(python: str = str(ROOT / ".venv/bin/python")) -> dict[str, str]:
    """Environment additions every stage runs with: spark-submit's driver and executors use the project's
    Python, and Java uses UTC."""
    return {"PYSPARK_PYTHON": python, "PYSPARK_DRIVER_PYTHON": python, "SPARK_LOCAL_IP": "127.0.0.1",
            "TZ": "UTC", "PYTHONPATH": str(ROOT)}


KAFKA_ACTIONS = ("start", "stop", "status")


def kafka_command(action: str, state_dir: str | Path | None = None, root: Path = ROOT) -> list[str]:
    """The argv that starts, stops or checks the local Kafka broker (infra/scripts/kafka.sh).

    The broker's ports come from the environment (``KAFKA_PORT``, ``KAFKA_CONTROLLER_PORT``); see
    :func:`kafka_env`. Without ``state_dir`` the script uses ``var/kafka`` under the repository root.

    >>> kafka_command("start", "/tmp/k", root=Path("/repo"))
    ['/repo/infra/scripts/kafka.sh', 'start', '/tmp/k']
    >>> kafka_command("stop", root=Path("/repo"))
    ['/repo/infra/scripts/kafka.sh', 'stop']
    >>> kafka_command("restart")
    Traceback (most recent call last):
    ...
    ValueError: kafka action 'restart' is not one of ('start', 'stop', 'status')

    Raises:
        ValueError: ``action`` is not one the script knows.
    """
    if action not in KAFKA_ACTIONS:
        raise ValueError(f"kafka action {action!r} is not one of {KAFKA_ACTIONS}")
    return [str(root / "infra" / "scripts" / "kafka.sh"), action, *([str(state_dir)] if state_dir else [])]


def kafka_env(bootstrap: str) -> dict[str, str]:
    """The ports kafka.sh listens on for a broker reached at ``bootstrap`` (``host:port``): the broker on that
    port, its KRaft controller on the next one.

    >>> kafka_env("127.0.0.1:19092")
    {'KAFKA_PORT': '19092', 'KAFKA_CONTROLLER_PORT': '19093'}

    Raises:
        ValueError: ``bootstrap`` has no numeric port.
    """
    port = int(bootstrap.rsplit(":", 1)[-1])
    return {"KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(port + 1)}
