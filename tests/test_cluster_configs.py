"""The cluster launch configurations of infra/ are valid for their tools, without any cluster:

- infra/ray/cluster.yaml validates against the Ray cluster launcher's own schema (ray/autoscaler/ray-schema.json,
  shipped in the ray package) and runs the same training entry point on GPU workers;
- the KubeRay RayCluster/RayJob manifests parse and carry the fields the operator requires;
- the spark-submit properties files parse as spark-defaults, and spark-submit itself reads them (``--verbose``
  argument parsing, the application a no-op script);
- the Kafka KRaft cluster configs parse, and their quorum settings agree (node ids, voters, bootstrap servers,
  replication factors vs. node count), and the topic keeps events long enough for kappa reprocessing.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from features.config import ROOT

INFRA = ROOT / "infra"
SPARK_SUBMIT = ROOT / ".venv" / "bin" / "spark-submit"
DAYS = 24 * 3600 * 1000  # ms


def read_properties(path: Path) -> dict[str, str]:
    """Java .properties (``key=value``) or spark-defaults (``key value``) lines; ``#`` comments and blanks skipped.

    Raises:
        ValueError: a line that is neither, or a key given twice.
    """
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(?:=|\s)\s*(.*)$", line)
        if not m:
            raise ValueError(f"{path}:{n}: not a property line: {line!r}")
        if m.group(1) in out:
            raise ValueError(f"{path}:{n}: {m.group(1)} given twice")
        out[m.group(1)] = m.group(2).strip()
    return out


# --- Ray -------------------------------------------------------------------------------------------------------


def test_ray_cluster_launcher_yaml_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # the schema itself rejects a typo, so the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "max_wokers": 2}, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert "g5" in types["gpu_worker"]["node_config"]["InstanceType"]  # a GPU instance
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def _container(pod_template: dict) -> dict:
    (container,) = pod_template["spec"]["containers"]
    return container


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_the_required_fields(name):
    doc = yaml.safe_load((INFRA / "ray" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        assert spec["entrypoint"].split() == ["python", "-m", "training.train", "--model", "deepfm"]
        runtime = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime["env_vars"]["RECSYS_TRAIN__USE_GPU"] == "true"
        # as the train DAG's jobs: the entry point joins the job's cluster instead of starting its own
        assert runtime["env_vars"]["RECSYS_TRAIN__RAY_ADDRESS"] == "auto"
        cluster = spec["rayClusterSpec"]
    else:
        assert doc["kind"] == "RayCluster"
        cluster = doc["spec"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and _container(head["template"])["image"]
    ports = {p["name"]: p["containerPort"] for p in _container(head["template"])["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs"] == 6379  # the Jobs API and the GCS
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["groupName"] and "rayStartParams" in workers
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    worker = _container(workers["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "RECSYS_TRAIN__USE_GPU", "value": "true"} in worker["env"]


def test_ray_docs_show_the_same_entry_point_as_the_train_dag():
    text = (INFRA / "ray" / "cluster.yaml").read_text()
    assert "ray job submit --address" in text and "-- python -m training.train --model deepfm" in text


# --- Spark -----------------------------------------------------------------------------------------------------

SPARK_PROFILES = ("local", "standalone", "kubernetes")
PACKAGES = {"io.delta:delta-spark_2.13:4.0.0", "org.apache.spark:spark-sql-kafka-0-10_2.13:4.0.0"}


@pytest.mark.parametrize("profile", SPARK_PROFILES)
def test_spark_properties_files_parse_and_enable_delta(profile):
    props = read_properties(INFRA / "spark" / f"{profile}.conf")
    assert all(k.startswith("spark.") for k in props)
    assert props["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert props["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert props["spark.sql.session.timeZone"] == "UTC"
    if profile == "local":
        assert "spark.jars.packages" not in props  # the jars of .jars/spark, passed with --jars
    else:
        assert PACKAGES <= set(props["spark.jars.packages"].split(","))
    if profile == "standalone":
        assert props["spark.master"].startswith("spark://")
    if profile == "kubernetes":
        assert props["spark.master"].startswith("k8s://https://")
        assert props["spark.submit.deployMode"] == "cluster"
        assert props["spark.kubernetes.container.image"]


@pytest.mark.integration
@pytest.mark.skipif(not SPARK_SUBMIT.exists(), reason="no .venv: run `make venv`")
@pytest.mark.parametrize("profile", SPARK_PROFILES)
def test_spark_submit_reads_the_properties_file(profile, tmp_path):
    """spark-submit --verbose prints the properties it parsed from the file; the master, deploy mode and packages
    are overridden on the command line so that nothing is resolved and the no-op application runs here."""
    app = tmp_path / "noop.py"
    app.write_text("print('noop application ran')\n")
    props = read_properties(INFRA / "spark" / f"{profile}.conf")
    proc = subprocess.run(
        [str(SPARK_SUBMIT), "--verbose", "--properties-file", str(INFRA / "spark" / f"{profile}.conf"),
         "--master", "local[1]", "--deploy-mode", "client", "--conf", "spark.jars.packages=",
         "--conf", "spark.ui.enabled=false", str(app)],
        capture_output=True, text=True, timeout=240, env={"PATH": "/usr/bin:/bin", "SPARK_LOCAL_IP": "127.0.0.1",
                                                           "PYSPARK_PYTHON": str(ROOT / ".venv/bin/python")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "noop application ran" in out
    assert f"Using properties file: {INFRA / 'spark' / f'{profile}.conf'}" in out
    for key in ("spark.sql.extensions", "spark.sql.session.timeZone", "spark.executor.memory"):
        if key in props:
            assert f"({key},{props[key]})" in out, key


# --- Kafka -----------------------------------------------------------------------------------------------------

KAFKA_NODES = sorted((INFRA / "kafka" / "cluster").glob("node*.properties"))


def test_kraft_cluster_quorum_is_consistent():
    nodes = [read_properties(p) for p in KAFKA_NODES]
    assert len(nodes) == 3
    ids = [int(n["node.id"]) for n in nodes]
    assert sorted(ids) == [1, 2, 3]
    for n in nodes:
        assert set(n["process.roles"].split(",")) == {"broker", "controller"}
        assert n["controller.listener.names"] in n["listener.security.protocol.map"]
        assert "controller.quorum.voters" not in n or "controller.quorum.bootstrap.servers" not in n
    bootstrap = {n["controller.quorum.bootstrap.servers"] for n in nodes}
    assert len(bootstrap) == 1  # every node knows the same quorum
    servers = bootstrap.pop().split(",")
    assert len(servers) == len(nodes)
    # each controller's advertised host is in the bootstrap list, on the controller listener's port
    for n in nodes:
        host = re.match(r"PLAINTEXT://([^:]+):\d+", n["advertised.listeners"]).group(1)
        cport = re.search(r"CONTROLLER://[^:]+:(\d+)", n["listeners"]).group(1)
        assert f"{host}:{cport}" in servers
        assert host.endswith(n["node.id"])
        for key in ("default.replication.factor", "offsets.topic.replication.factor",
                    "transaction.state.log.replication.factor"):
            assert int(n[key]) == len(nodes), key
        assert int(n["min.insync.replicas"]) < int(n["default.replication.factor"])
        assert int(n["log.retention.hours"]) >= 30 * 24
    # the nodes differ only in their identity
    strip = lambda n: {k: v for k, v in n.items() if k not in ("node.id", "advertised.listeners")}
    assert strip(nodes[0]) == strip(nodes[1]) == strip(nodes[2])


def test_single_node_config_matches_the_local_script_contract():
    props = read_properties(INFRA / "kafka" / "server.properties")
    assert props["process.roles"] == "broker,controller" and props["node.id"] == "1"
    assert int(props["log.retention.hours"]) >= 30 * 24


def test_topic_keeps_events_long_enough_for_kappa_reprocessing():
    topic = read_properties(INFRA / "kafka" / "cluster" / "topics.properties")
    assert topic["topic"] == "interactions"
    assert int(topic["retention.ms"]) >= 30 * DAYS and int(topic["retention.bytes"]) == -1
    assert topic["cleanup.policy"] == "delete"  # compaction would drop events a replay needs
    node = read_properties(KAFKA_NODES[0])
    assert int(topic["replication.factor"]) <= len(KAFKA_NODES)
    assert int(topic["min.insync.replicas"]) < int(topic["replication.factor"])
    assert int(topic["partitions"]) >= int(node["num.partitions"]) // 2


def test_properties_reader_rejects_duplicates(tmp_path):
    p = tmp_path / "x.properties"
    p.write_text("a=1\na=2\n")
    with pytest.raises(ValueError, match="given twice"):
        read_properties(p)
