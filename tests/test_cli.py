"""The ``recsys`` command line (pipelines/cli.py): every stage by name, each command's arguments handed unchanged to
its entry point's own parser.

The runs are real subprocesses of ``bin/recsys`` (the launcher a checkout uses) or ``python -m pipelines.cli``.
The ``--help`` of every command also runs under test_cli_config's tripwires (a listening broker address, a fake
``java``, empty data folders): asking for help through ``recsys`` touches no service and no data either.
test_cli_config.py covers the entry points' own ``--help`` and configuration errors; this file covers only what
``recsys`` adds.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from features.config import resolve_config
from pipelines.cli import Entry, stage_command
from test_cli_config import PYTHON, tripwires  # noqa: F401 (tripwires is a fixture)

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "bin" / "recsys"
#: Seconds before a run counts as hung: `recsys --help` imports click only; a light entry point's --help.
FAST_TIMEOUT_S = 20
#: The --help of export, evaluate, serve, report and demo imports torch, faiss or pandas before its parser runs
#: (their modules do, not recsys): tens of seconds on the shared, loaded 2-core machine.
HEAVY_TIMEOUT_S = 180
#: Every command, in data-flow order, as `recsys --help` must list them.
COMMANDS = ["data", "produce", "ingest", "features", "daily-features", "train", "export", "evaluate", "report",
            "serve", "demo", "config"]


def recsys(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
           timeout_s: float = FAST_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCHER), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)


def listed_commands(help_text: str) -> list[str]:
    """The command names under click's ``Commands:`` heading, in the order shown."""
    section = help_text.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line[2] != " "]


# ------------------------------------------------------------------------------------------- recsys --help
def test_help_lists_every_command_in_order_and_imports_only_click(tmp_path):
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print(sorted({m.split('.')[0] for m in sys.modules}"
             " - set(sys.stdlib_module_names)), file=sys.stderr))\n"
             "from pipelines.cli import main\n"
             "main()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([PYTHON, "-c", probe, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=FAST_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: recsys [OPTIONS] COMMAND [ARGS]...")
    assert listed_commands(done.stdout) == COMMANDS
    imported = ast.literal_eval(done.stderr.strip().splitlines()[-1])  # the probe's: third-party top-level modules
    assert {m for m in imported if not m.startswith("_")} == {"click", "pipelines"}, imported  # no torch, pyspark, ray


@pytest.mark.parametrize("how", ["launcher", "symlink", "python -m"])
def test_recsys_runs_from_anywhere(how, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if how == "launcher":
        argv = [str(LAUNCHER)]
    elif how == "symlink":  # e.g. ~/bin/recsys -> <checkout>/bin/recsys
        (tmp_path / "recsys").symlink_to(LAUNCHER)
        argv = [str(tmp_path / "recsys")]
    else:
        argv, env["PYTHONPATH"] = [PYTHON, "-m", "pipelines.cli"], str(ROOT)
    done = subprocess.run([*argv, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=FAST_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert listed_commands(done.stdout) == COMMANDS


@pytest.mark.parametrize("command, message", [
    ("nope", "Error: No such command 'nope'."),
    ("trian", "Error: No such command 'trian'. Did you mean 'train'?"),
])
def test_an_unknown_command_is_a_usage_error(command, message, tmp_path):
    done = recsys([command, "--model", "deepfm"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == message
    assert "Try 'recsys --help' for help." in done.stderr


# ------------------------------------------------------------------------------------------- each command's --help
# command -> (start of its usage line, texts of the stage's own options the help must show, heavy imports)
HELP = {
    "data": ("usage: python -m pipelines.data", ["RECSYS_SOURCE", "RECSYS_RAW_DIR"], False),
    "produce": ("usage: python -m pipelines.produce", ["RECSYS_KAFKA__BOOTSTRAP", "(count) (default: 4)"], False),
    "ingest": ("usage: recsys ingest", ["--trigger {available-now,continuous}", "--max-offsets-per-trigger",
                                        "--reprocess", "RECSYS_KAFKA__TOPIC"], False),
    "features": ("usage: recsys features", ["--date DATE", "RECSYS_SPARK__SHUFFLE_PARTITIONS"], False),
    "daily-features": ("usage: recsys daily-features", ["--date DATE", "--until UNTIL", "YYYY-MM-DD"], False),
    "train": ("usage: python -m training.train", ["--model NAME", "--option FIELD=VALUE", "--sharding"], False),
    "export": ("usage: recsys export", ["--hnsw-m", "--ef-search", "--no-registry"], True),
    "evaluate": ("usage: recsys evaluate", ["--bandit-log", "--windows", "--n-recent"], True),
    "report": ("usage: recsys report", ["--run RUN", "--no-tsne"], True),
    "serve": ("usage: recsys serve", ["--host", "--port", "--embedding-version", "--watch-s"], True),
    "demo": ("usage: recsys demo", ["--keep-kafka", "--models NAME,NAME|all"], True),
    "config": ("usage: python -m features.config", ["COMMAND", "show"], False),
}


def test_every_command_has_a_help_case():
    assert list(HELP) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_is_the_stage_s_own_and_touches_nothing(command, tripwires, tmp_path):  # noqa: F811
    env, check = tripwires
    usage, shown, heavy = HELP[command]
    cwd = tmp_path / "cwd"  # Spark would leave spark-warehouse/ or metastore_db/ here
    cwd.mkdir()
    done = recsys([command, "--help"], env, cwd=cwd, timeout_s=HEAVY_TIMEOUT_S if heavy else FAST_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]
    assert "Traceback" not in done.stderr
    flat = " ".join(done.stdout.split())  # argparse wraps at the terminal's width
    for text in shown:
        assert text in flat, (text, done.stdout)
    check()
    assert not any(cwd.iterdir())


# ------------------------------------------------------------------------------------------- config show
def test_config_show_prints_what_features_config_show_prints(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(RECSYS_RUN_NAME="from-env", PYTHONPATH=str(ROOT))
    done = recsys(["config", "show"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    keys = [line.split(":", 1)[0] for line in done.stdout.splitlines() if not line.startswith("#")]
    assert keys == list(resolve_config(environ={}).sources)  # every value, one line each
    assert any(line.startswith("run_name: from-env ") and line.endswith("# env RECSYS_RUN_NAME")
               for line in done.stdout.splitlines())
    direct = subprocess.run([PYTHON, "-m", "features.config", "show"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=FAST_TIMEOUT_S)
    assert done.stdout == direct.stdout


def test_the_entry_point_s_exit_status_and_message_pass_through(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    bad = recsys(["config", "show"], {**env, "RECSYS_TRAIN__NUM_WORKRS": "2"}, cwd=tmp_path)
    assert bad.returncode == 2  # features.config's main returns 2
    assert bad.stderr.strip().endswith("did you mean RECSYS_TRAIN__NUM_WORKERS?")
    wrong = recsys(["ingest", "--trigger", "sometimes"], env, cwd=tmp_path)  # argparse's error, its exit status
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("usage: recsys ingest")
    assert "recsys ingest: error: argument --trigger: invalid choice: 'sometimes'" in wrong.stderr


# ------------------------------------------------------------------------------------------- pass-through, in process
def test_arguments_reach_main_verbatim_and_its_return_value_is_the_exit_status(monkeypatch):
    calls = []

    def main(argv):
        calls.append((argv, list(sys.argv)))
        return 3

    monkeypatch.setitem(sys.modules, "fake_stage", types.SimpleNamespace(main=main))
    command = stage_command("fake", Entry("fake_stage", "a stage"))
    args = ["--model=deepfm", "-o", "hidden=200,80", "-ofoo", "-h", "--help", "--", "pos", "-x"]
    argv_before = list(sys.argv)
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 3
    assert calls == [(args, ["recsys fake", *args])]  # click parsed none of it, "--" included
    assert sys.argv == argv_before  # restored after the stage ran
    monkeypatch.setitem(sys.modules, "fake_stage", types.SimpleNamespace(main=lambda argv: None))
    assert CliRunner().invoke(command, []).exit_code == 0  # main returning None: success, as under python -m
