"""Command lines and configuration errors: every stage's ``--help`` returns at once without touching a service or
the data, and a bad configuration (``RECSYS_*`` variable, YAML file) is a ``ConfigError`` that names its source
and suggests the fix, printed by an entry point as one message with exit status 2.

The ``--help`` runs are real subprocesses with three tripwires: the broker address points at a socket this test
listens on (a Kafka client would connect to it), ``JAVA_HOME`` and ``PATH`` lead to a fake ``java`` that leaves a
marker file (Spark would launch it), and the data, raw and artifacts folders point into an empty temporary folder
(a fetch or a stage result would create them).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import features.config as config_module
from features.config import ConfigError, format_config, load_config, resolve_config
from features.errors import PlatformError

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
#: Seconds a --help may take before the run counts as hung (the old produce --help retried Kafka for 31 s).
HELP_TIMEOUT_S = 20


@pytest.fixture
def tripwires(tmp_path):
    """(environment for a subprocess, check) where check() asserts that nothing touched a tripwire."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    fake_java = tmp_path / "jdk" / "bin" / "java"
    fake_java.parent.mkdir(parents=True)
    marker = tmp_path / "java-was-run"
    fake_java.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_java.chmod(0o755)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "PYSPARK_", "SPARK_"))}
    env.update(PYTHONPATH=str(ROOT), JAVA_HOME=str(fake_java.parent.parent),
               PATH=f"{fake_java.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
               RECSYS_KAFKA__BOOTSTRAP=f"127.0.0.1:{port}", RECSYS_DATA_DIR=str(state / "data"),
               RECSYS_RAW_DIR=str(state / "raw"), RECSYS_ARTIFACTS_DIR=str(state / "artifacts"))

    def check() -> None:
        try:
            conn, _ = listener.accept()
            conn.close()
            pytest.fail(f"something connected to the broker address 127.0.0.1:{port}")
        except BlockingIOError:
            pass
        assert not marker.exists(), "a JVM (Spark) was launched"
        assert not state.exists(), f"files were written: {sorted(map(str, state.rglob('*')))}"

    yield env, check
    listener.close()


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)


def description(help_text: str) -> str:
    """The description paragraph of an argparse help: between the usage and the first option heading."""
    paragraphs = help_text.split("\n\n")
    return " ".join(paragraphs[1].split())


# (argv after the interpreter, texts the help must show: defaults with their units)
ENTRY_POINTS = {
    "produce": (["-m", "pipelines.produce", "--help"],
                ["RECSYS_KAFKA__BOOTSTRAP", "(default: 127.0.0.1:9092)", "(count) (default: 4)", "30 s"]),
    "movielens": (["-m", "pipelines.movielens", "--help"], ["RECSYS_RAW_DIR", "(default: "]),
    "features_batch": (["pipelines/features_batch.py", "--help"],
                       ["--date", "RECSYS_SPARK__SHUFFLE_PARTITIONS", "(count) (default: 4)"]),
    "daily_features": (["pipelines/daily_features.py", "--help"],
                       ["--date DATE", "YYYY-MM-DD", "default: --date only", "RECSYS_DATA_DIR"]),
    "ingest": (["pipelines/ingest.py", "--help"],
               ["seconds between micro-batches", "(default: 10.0)", "(default: available-now)",
                "count; default: no cap", "RECSYS_KAFKA__TOPIC", "(default: interactions)"]),
    "config": (["-m", "features.config", "show", "--help"], ["--config", "default: the one RECSYS_CONFIG names"]),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_returns_at_once_and_touches_nothing(name, tripwires, tmp_path):
    env, check = tripwires
    args, shown = ENTRY_POINTS[name]
    cwd = tmp_path / "cwd"  # Spark would leave spark-warehouse/ or metastore_db/ here
    cwd.mkdir()
    argv = [PYTHON, *[str(ROOT / a) if a.endswith(".py") else a for a in args]]
    done = run(argv, env, cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "Traceback" not in done.stderr
    flat = " ".join(done.stdout.split())  # argparse wraps the option help at the terminal's width
    for text in shown:
        assert text in flat, (text, done.stdout)
    assert description(done.stdout).endswith("."), description(done.stdout)  # whole sentences, none cut off
    check()
    assert not any(cwd.iterdir())


@pytest.mark.parametrize("argv", [["-m", "pipelines.produce"], [str(ROOT / "pipelines" / "features_batch.py")],
                                  ["-m", "features.config", "show"]])
def test_entry_points_print_a_config_error_and_exit_2(argv, tripwires):
    env, check = tripwires
    env = {**env, "RECSYS_TRAIN__NUM_WORKRS": "2"}
    done = run([PYTHON, *argv], env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "configuration error: environment variable RECSYS_TRAIN__NUM_WORKRS" in last
    assert last.endswith("did you mean RECSYS_TRAIN__NUM_WORKERS?")
    check()


# ------------------------------------------------------------------------------------------- the variables
def test_a_misspelt_variable_under_a_section_names_it_and_the_right_one():
    with pytest.raises(ConfigError) as e:
        load_config(environ={"RECSYS_TRAIN__NUM_WORKRS": "2"})
    assert isinstance(e.value, PlatformError)
    assert str(e.value) == ("environment variable RECSYS_TRAIN__NUM_WORKRS: unknown key 'num_workrs' in section "
                            "'train'; did you mean RECSYS_TRAIN__NUM_WORKERS?")


def test_a_wrong_type_names_the_variable_the_value_and_the_type():
    with pytest.raises(ConfigError) as e:
        load_config(environ={"RECSYS_KAFKA__PARTITIONS": "four"})
    assert e.value.source == "environment variable RECSYS_KAFKA__PARTITIONS"
    assert "kafka.partitions = 'four'" in e.value.problem and e.value.fix.endswith("of type int")


def test_a_section_or_a_value_used_as_a_section_is_an_error():
    with pytest.raises(ConfigError, match=r"RECSYS_TRAIN: train is a section.*RECSYS_TRAIN__NUM_WORKERS"):
        load_config(environ={"RECSYS_TRAIN": "4"})
    with pytest.raises(ConfigError, match=r"RECSYS_RUN_NAME__X: run_name is a single value.*set RECSYS_RUN_NAME"):
        load_config(environ={"RECSYS_RUN_NAME__X": "a"})


def test_every_problem_is_reported():
    with pytest.raises(ConfigError) as e:
        load_config(environ={"RECSYS_TRAIN__NUM_WORKRS": "2", "RECSYS_SPARK__MASTR": "local[1]"})
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "RECSYS_SPARK__MASTER?" in lines[0] and "RECSYS_TRAIN__NUM_WORKERS?" in lines[1]


def test_a_variable_that_is_no_key_is_ignored_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_warned", set())
    env = {"RECSYS_HOME": "/somewhere", "RECSYS_DATA_DIRR": "/x", "RECSYS_RUN_NAME": "r1"}
    with caplog.at_level(logging.WARNING, logger="features.config"):
        for _ in range(3):
            resolved = resolve_config(environ=env)
    assert resolved.config.run_name == "r1" and resolved.config.data_dir == config_module.PlatformConfig().data_dir
    assert resolved.ignored == ("RECSYS_DATA_DIRR", "RECSYS_HOME")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2                                       # once per variable, not once per read
    assert any(m.startswith("ignoring RECSYS_HOME: 'home' is not a configuration key") for m in messages)
    assert any("RECSYS_DATA_DIRR" in m and m.endswith("did you mean RECSYS_DATA_DIR?") for m in messages)


# ------------------------------------------------------------------------------------------- the YAML file
def test_a_yaml_list_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("- kafka\n- train\n")
    with pytest.raises(ConfigError) as e:
        load_config(environ={"RECSYS_CONFIG": str(path)})
    assert e.value.source == f"configuration file {path} (RECSYS_CONFIG)"
    assert e.value.problem == "holds a list, not a mapping of configuration keys"


def test_an_unknown_yaml_key_names_the_file_the_line_and_the_closest_key(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("# tuned for the laptop\nkafka:\n  topic: clicks\ntrain:\n  use_gpu: false\n  num_workrs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert str(e.value) == (f"configuration file {path}, line 6: unknown key 'num_workrs' in section 'train'; "
                            "did you mean 'train.num_workers'?")


def test_an_unknown_top_level_yaml_key_with_no_close_match_lists_the_keys(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("run_name: a\nzzz: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.source == f"configuration file {path}, line 2"
    assert e.value.problem == "unknown key 'zzz' at the top level"
    assert e.value.fix.startswith("valid keys at the top level: data_dir, raw_dir,")


def test_a_wrong_yaml_type_names_the_line_and_the_type(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("spark:\n  master: local[1]\n  shuffle_partitions: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert e.value.source == f"configuration file {path}, line 3"
    assert e.value.problem.startswith("spark.shuffle_partitions = 'many' is not valid")


def test_a_variable_overriding_a_bad_file_value_is_blamed_not_the_file(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("kafka:\n  partitions: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={"RECSYS_KAFKA__PARTITIONS": "0"})
    assert e.value.source == "environment variable RECSYS_KAFKA__PARTITIONS"
    assert "greater than or equal to 1" in e.value.problem


def test_a_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(environ={"RECSYS_CONFIG": str(missing)})
    assert str(e.value) == (f"configuration file {missing} (RECSYS_CONFIG): no such file; set RECSYS_CONFIG to an "
                            "existing YAML file, or unset it to use the defaults")
    with pytest.raises(ConfigError, match=f"configuration file {missing}: no such file; pass an existing YAML"):
        load_config(missing, environ={})


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("kafka:\n  topic: [clicks\n")
    with pytest.raises(ConfigError, match=f"configuration file {path}, line 3: is not valid YAML"):
        load_config(path, environ={})


# ------------------------------------------------------------------------------------------- config show
def test_show_names_the_source_of_every_value(tmp_path, tripwires):
    env, check = tripwires
    path = tmp_path / "recsys.yaml"
    path.write_text("kafka:\n  topic: clicks\n  partitions: 2\nrun_name: from-file\n")
    env = {**env, "RECSYS_CONFIG": str(path), "RECSYS_RUN_NAME": "from-env", "RECSYS_HOME": "/h",
           "RECSYS_SERVING__ADMIN_TOKEN": "s3cret-tok"}
    done = run([PYTHON, "-m", "features.config", "show"], env)
    assert done.returncode == 0, done.stderr
    lines = {line.split(":", 1)[0]: line for line in done.stdout.splitlines() if not line.startswith("#")}
    split = {key: (line.split(":", 1)[1].split("  #")[0].strip(), line.rsplit("# ", 1)[1])
             for key, line in lines.items()}
    assert split["kafka.topic"] == ("clicks", f"file {path}")
    assert split["kafka.partitions"] == ("2", f"file {path}")
    assert split["run_name"] == ("from-env", "env RECSYS_RUN_NAME")          # the variable wins over the file
    assert split["kafka.bootstrap"] == (env["RECSYS_KAFKA__BOOTSTRAP"], "env RECSYS_KAFKA__BOOTSTRAP")
    assert split["spark.master"] == ("local[2]", "default")
    assert split["train.ray_address"] == ("null", "default")
    assert split["serving.admin_token"][1] == "env RECSYS_SERVING__ADMIN_TOKEN"
    assert "s3cret-tok" not in done.stdout + done.stderr
    assert set(split) == set(resolve_config(environ={}).sources)          # one line per value, every value
    assert "# ignored: RECSYS_HOME (not a configuration key)" in done.stdout
    check()


def test_sources_in_process(tmp_path):
    path = tmp_path / "recsys.yaml"
    path.write_text("train:\n  ray_cpus: 8\n")
    resolved = resolve_config(path, environ={"RECSYS_TRAIN__NUM_WORKERS": "3"})
    assert (resolved.config.train.num_workers, resolved.config.train.ray_cpus) == (3, 8)
    assert resolved.sources["train.num_workers"] == "env RECSYS_TRAIN__NUM_WORKERS"
    assert resolved.sources["train.ray_cpus"] == f"file {path}"
    assert resolved.sources["train.use_gpu"] == "default"
    assert "train.ray_cpus: 8" in format_config(resolved)
