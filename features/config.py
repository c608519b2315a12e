"""Platform configuration: one pydantic model that every entry point reads.

Values come from the embedded defaults, then an optional YAML file (``RECSYS_CONFIG``), then environment
variables ``RECSYS_<FIELD>`` (nested with ``__``, e.g. ``RECSYS_KAFKA__BOOTSTRAP``). Unknown keys are an error, so
a typo never falls back silently to a default.

>>> cfg = PlatformConfig()
>>> cfg.kafka.topic
'interactions'
>>> PlatformConfig.model_validate({"kafak": {}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for PlatformConfig
kafak
  Extra inputs are not permitted [type=extra_forbidden, input_value={}, input_type=dict]
    For further information visit https://errors.pydantic.dev/.../v/extra_forbidden
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Strict):
    bootstrap: str = "127.0.0.1:9092"
    topic: str = "interactions"
    partitions: int = Field(4, ge=1)


class SparkConfig(_Strict):
    master: str = "local[2]"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "2g"


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    #: Logical CPUs given to the local Ray cluster; more than the workers take, so Ray Data's read tasks can run.
    ray_cpus: int = Field(4, ge=1)
    use_gpu: bool = False
    ray_address: str | None = None


class ModelsConfig(_Strict):
    """The registered models (``training.registry``) the service and the publish gate use unless told otherwise:
    ``retrieval`` gives candidates and similar items (a model with an item table; the one the gate publishes),
    ``ranker`` orders the candidates of /recommend; ``demo``: the models ``make demo`` trains (``make lineage``
    trains every registered model)."""

    retrieval: str = "item2vec"
    ranker: str = "deepfm"
    demo: tuple[str, ...] = ("deepfm", "din", "item2vec", "mf", "wide_deep")


class ServingConfig(_Strict):
    """The HTTP service (``serving.app``). With an admin token, ``POST /admin/reload`` requires the header
    ``Authorization: Bearer <token>``; without one, the service refuses to bind beyond loopback. Set at most one
    of ``admin_token`` (``RECSYS_SERVING__ADMIN_TOKEN``) and ``admin_token_file`` (a file whose stripped content is
    the token, read when the service starts: ``serving.app.resolve_admin_token``). The token never prints:

    >>> ServingConfig(admin_token="s3cret")
    ServingConfig(admin_token=SecretStr('**********'), admin_token_file=None)
    """

    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None


class PlatformConfig(_Strict):
    #: Where the lake and checkpoints live (git-ignored).
    data_dir: Path = ROOT / "data"
    #: Where downloaded data sets live; separate from data_dir so a scratch lake reuses the fetched data.
    raw_dir: Path = ROOT / "data" / "raw"
    artifacts_dir: Path = ROOT / "artifacts"
    #: Name of this run: its outputs go to ``artifacts_dir / run_name``.
    run_name: str = "demo"
    kafka: KafkaConfig = KafkaConfig()
    spark: SparkConfig = SparkConfig()
    train: TrainConfig = TrainConfig()
    models: ModelsConfig = ModelsConfig()
    serving: ServingConfig = ServingConfig()

    @property
    def lake_dir(self) -> Path:
        return self.data_dir / "lake"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def run_dir(self) -> Path:
        """Outputs of this run: ``stages/`` (one result JSON per stage), ``models/``, ``embeddings/``,
        ``summary.json``."""
        return self.artifacts_dir / self.run_name


def _env_overrides(prefix: str = "RECSYS_") -> dict:
    out: dict = {}
    for key, value in os.environ.items():
        if not key.startswith(prefix) or key == "RECSYS_CONFIG":
            continue
        node = out
        *parents, leaf = key[len(prefix):].lower().split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | Path | None = None) -> PlatformConfig:
    """Read the configuration: defaults, then YAML (``path`` or ``$RECSYS_CONFIG``), then ``RECSYS_*`` variables.

    Raises:
        pydantic.ValidationError: an unknown key or a value of the wrong type.
        FileNotFoundError: the YAML file named does not exist.
    """
    data: dict = {}
    path = path or os.environ.get("RECSYS_CONFIG")
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    return PlatformConfig.model_validate(_merge(data, _env_overrides()))
