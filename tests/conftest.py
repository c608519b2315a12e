"""Session-scoped fixtures for the real services: each starts once per test run and is shared by every test.

- ``cfg``: a PlatformConfig whose data, lake and artifacts live in one temporary folder for the run, pointing at
  the test broker (loopback port 19092, so a running demo broker is never touched).
- ``kafka``: the real single-node KRaft broker started with infra/scripts/kafka.sh.
- ``spark``: one local Spark session with Delta and the Kafka source.
- ``ray_cluster``: one local Ray cluster with more logical CPUs than the training workers take.
- ``movielens``: the real MovieLens-100K, fetched into the project's data folder (cached across runs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from features.config import ROOT, KafkaConfig, PlatformConfig, SparkConfig, TrainConfig

TEST_KAFKA_PORT = int(os.environ.get("RECSYS_TEST_KAFKA_PORT", "19092"))
TEST_CONTROLLER_PORT = TEST_KAFKA_PORT + 1


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def cfg(run_dir) -> PlatformConfig:
    return PlatformConfig(
        data_dir=run_dir / "data",
        artifacts_dir=run_dir / "artifacts",
        kafka=KafkaConfig(bootstrap=f"127.0.0.1:{TEST_KAFKA_PORT}", partitions=3),
        spark=SparkConfig(shuffle_partitions=2),
        train=TrainConfig(num_workers=2, ray_cpus=4),
    )


@pytest.fixture(scope="session")
def kafka(run_dir, cfg):
    """The real broker, started once; yields the bootstrap address."""
    env = dict(os.environ, KAFKA_PORT=str(TEST_KAFKA_PORT), KAFKA_CONTROLLER_PORT=str(TEST_CONTROLLER_PORT))
    script, state = str(ROOT / "infra/scripts/kafka.sh"), str(run_dir / "kafka")
    subprocess.run([script, "start", state], check=True, env=env)
    yield cfg.kafka.bootstrap
    subprocess.run([script, "stop", state], check=False, env=env)


@pytest.fixture(scope="session")
def spark(cfg):
    from pipelines.spark import get_spark

    session = get_spark(cfg, app_name="recsys-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_cluster(cfg):
    import ray

    ray.init(num_cpus=cfg.train.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def movielens():
    from pipelines import movielens as ml

    raw = ROOT / "data" / "raw"
    ml.fetch(raw)
    return ml.load(raw)


@pytest.fixture(scope="session")
def ml_events(movielens):
    """MovieLens-100K's log through its declared source (features/sources/movielens-100k.yaml), as the produce stage
    reads it: event_id, user_id, item_id, rating, timestamp, event_type, click, label, in the file's order."""
    from features.source import load_source

    return load_source(ROOT / "features" / "sources" / "movielens-100k.yaml", ROOT / "data" / "raw").read_interactions()
