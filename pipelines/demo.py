"""``make demo``: the main job end to end on the configured data source (``RECSYS_SOURCE``; MovieLens-100K by
default), on the real services.

Starts the Kafka broker, runs every stage of ``pipelines.stages.STAGES`` through its command line (the same
commands the Airflow DAG runs: spark-submit for the Spark jobs, ``python -m`` for the rest), collects the figures
each stage measured, writes ``<run_dir>/summary.json``, prints a short summary and stops the broker.

The train stages (one per registered model) share one local Ray head (``ray start --head``, started once before
the first of them and stopped after the last): each joins it through ``RECSYS_TRAIN__RAY_ADDRESS``, as a job on a
cluster does, instead of starting and stopping a cluster of its own.

A demo run starts from an empty broker, lake and run folder, so two runs measure the same thing. The downloaded
data set and the environments are kept.

    python -m pipelines.demo [--keep-kafka] [--models NAME,NAME|all]

``--models`` picks the train stages (default: the configuration's ``models.demo``, five models; ``all``: every
registered model, ``make lineage``); export, evaluation and the report take whatever was trained.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from features.config import ROOT, PlatformConfig, load_config
from features.results import read_stage_result
from features.source import SourceError, load_source
from pipelines.stages import STAGES, build_command, kafka_command, kafka_env, model_names, stage_env

console = Console()


def kafka(cfg: PlatformConfig, action: str, state_dir: Path) -> None:
    """Start or stop the broker that ``cfg.kafka.bootstrap`` names (the same command the DAG runs)."""
    subprocess.run(kafka_command(action, state_dir), check=action == "start",
                   env={**os.environ, **kafka_env(cfg.kafka.bootstrap)})


def reset(cfg: PlatformConfig, kafka_state: Path) -> None:
    """Empty the broker's log, the lake, the checkpoints, this run's outputs and the serving state (never the raw data).

    The serving state (the publish gate's pointer and the indexes built per registry version) names versions of the
    lake's registry table, so it goes with the lake: a pointer kept across a reset would name a version that no
    longer exists.
    """
    for path in (kafka_state, cfg.lake_dir, cfg.checkpoint_dir, cfg.run_dir, cfg.artifacts_dir / "serving"):
        shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(cfg: PlatformConfig, log_dir: Path, start_timeout_s: float = 120.0):
    """A local Ray head for the train stages (``ray start --head --block``, its own temp dir so that no other
    ``ray.init()`` on the machine joins it, its own session so that stopping it stops what it started); yields the
    environment a train stage joins it with: ``RECSYS_TRAIN__RAY_ADDRESS`` and, as Ray 2.60 turns token
    authentication on for a new cluster, ``RAY_AUTH_MODE=token`` with this head's own ``RAY_AUTH_TOKEN``
    (docs/ray.md).

    Raises:
        SystemExit: the head did not listen within ``start_timeout_s`` seconds; the end of its log is printed.
    """
    port = _free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "ray_head.log"
    temp = Path("/tmp") / f"recsys-ray-{cfg.run_name}"  # short: Ray's unix sockets live under it
    cmd = [str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", "--block", "--port", str(port),
           "--num-cpus", str(cfg.train.ray_cpus), "--include-dashboard", "false", "--temp-dir", str(temp),
           "--disable-usage-stats", "--object-store-memory", str(1 << 30)]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **stage_env(), **auth, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    console.print(f"[red]the Ray head did not start; end of {log}:[/]")
                    console.print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
                    raise SystemExit(1)
                time.sleep(0.5)
        yield {"RECSYS_TRAIN__RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_stage(name: str, log_dir: Path, env: dict[str, str] | None = None) -> float:
    """Run one stage's command, its output to ``log_dir/<stage>.log``; returns wall seconds.

    Raises:
        SystemExit: the stage failed; the end of its log is printed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    cmd = build_command(name)
    start = time.perf_counter()
    with console.status(f"[bold]{name}[/]: {' '.join(Path(c).name if c.startswith('/') else c for c in cmd[:3])} ..."), \
            log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **stage_env(), **(env or {})}, stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        console.print(f"[red]stage {name} failed (exit {proc.returncode}) after {wall:.1f} s; end of {log}:[/]")
        console.print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise SystemExit(1)
    console.print(f"[green]✓[/] {name:<15} {wall:7.1f} s")
    return wall


#: Figures of a train stage's result shown in the summary, when the model's task reports them.
TRAIN_FIGURES = ("test_auc", "test_logloss", "test_gauc", "valid_auc", "train_samples_per_s", "pairs_per_s",
                 "final_loss", "epochs", "model_version")


def memory_used_mib() -> float:
    """The machine's memory in use (MiB): ``MemTotal - MemAvailable`` of ``/proc/meminfo``, so that page cache the
    kernel can drop does not count."""
    info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith(("MemTotal:", "MemAvailable:"))}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


@contextlib.contextmanager
def peak_memory(interval_s: float = 0.5):
    """Sample :func:`memory_used_mib` every ``interval_s`` seconds while the block runs; yields a dict whose
    ``peak_mib`` is the highest sample above the one taken before the block (``baseline_mib``). Whole-machine, so
    the broker, Spark's JVMs and Ray's workers count, which are not all this process's children; other load on the
    machine counts too."""
    import threading

    out = {"baseline_mib": memory_used_mib(), "peak_mib": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            out["peak_mib"] = max(out["peak_mib"], memory_used_mib() - out["baseline_mib"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        done.set()
        sampler.join()


def summarise(cfg: PlatformConfig, walls: dict[str, float], stages: list[str]) -> dict:
    """Assemble summary.json from the results of the stages that ran; every figure was measured by its stage in
    this run."""
    r = {name: read_stage_result(cfg, name) for name in stages}
    trained = {name.removeprefix("train_"): result for name, result in r.items() if name.startswith("train_")}
    return {
        "dataset": r["features"].get("source"),
        "label_rule": r["features"].get("label_rule"),
        "events_produced": r["produce"]["events_produced"],
        "events_bronze": r["ingest"]["events_bronze"],
        "events_quarantined": r["ingest"]["events_quarantined"],
        "samples": r["features"]["samples"],
        "sharding_plan": {m: t["sharding_plan"] for m, t in trained.items()},
        "models": {m: {"kind": t.get("kind"), **{k: t[k] for k in TRAIN_FIGURES if k in t}}
                   for m, t in trained.items()},
        "ann": {m: {k: v for k, v in e.items() if k in ("recall@10", "rows", "dim")}
                for m, e in r["export"]["models"].items()},
        "retrieval": r["evaluate"]["retrieval"],
        "wall_s": {**{k: round(v, 1) for k, v in walls.items()}, "total": round(sum(walls.values()), 1)},
    }


def print_summary(summary: dict) -> None:
    t = Table(title=f"{summary['dataset']} main job", show_header=False)
    t.add_row("events produced / bronze / quarantined",
              f"{summary['events_produced']:,} / {summary['events_bronze']:,} / {summary['events_quarantined']:,}")
    s = summary["samples"]
    t.add_row("samples train / valid / test", f"{s['train']:,} / {s['valid']:,} / {s['test']:,}")
    for model, m in summary["models"].items():
        if "test_auc" in m:
            t.add_row(f"{model} test AUC / GAUC / logloss, samples/s",
                      f"{m['test_auc']:.4f} / {m.get('test_gauc', float('nan')):.4f} / {m['test_logloss']:.4f}, "
                      f"{m['train_samples_per_s']:,.0f} ({m['epochs']} epochs)")
        elif "pairs_per_s" in m:
            loss = m.get("final_loss", float("nan"))
            t.add_row(f"{model} pairs/s, final loss", f"{m['pairs_per_s']:,.0f}, {loss:.4f} ({m['epochs']} epochs)")
        else:
            t.add_row(model, ", ".join(f"{k} {v}" for k, v in m.items() if k != "model_version"))
    for model, plan in summary["sharding_plan"].items():
        t.add_row(f"{model} sharding plan", ", ".join(f"{k}: {v}" for k, v in plan.items()))
    for policy, m in summary["retrieval"].items():
        t.add_row(f"replay {policy} HR@10 / NDCG@10", f"{m['hr@10']:.4f} / {m['ndcg@10']:.4f} ({m['cases']:,} cases)")
    t.add_row("wall s", ", ".join(f"{k} {v}" for k, v in summary["wall_s"].items()))
    if "memory_mib" in summary:
        t.add_row("peak memory MiB (whole machine, above the start)", f"{summary['memory_mib']['peak_above_baseline']:,}")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-kafka", action="store_true", help="leave the broker running at the end")
    parser.add_argument("--models", default=None, metavar="NAME,NAME|all",
                        help="models to train (default: the configuration's models.demo; all: every registered)")
    args = parser.parse_args(argv)
    cfg = load_config()
    registered = model_names()
    chosen = registered if args.models == "all" else \
        tuple(m for m in (args.models.split(",") if args.models else cfg.models.demo) if m)
    unknown = sorted(set(chosen) - set(registered))
    if unknown:
        parser.error(f"--models: unknown {unknown}; registered: {', '.join(registered)}")
    kafka_state = ROOT / "var" / cfg.run_name / "kafka"
    try:
        source = load_source(cfg.source, cfg.raw_dir)
        source.fetch()
    except SourceError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    console.print(f"data source: {source.name} ({cfg.source})")
    kafka(cfg, "stop", kafka_state)
    reset(cfg, kafka_state)
    walls: dict[str, float] = {}
    try:
        with peak_memory() as mem:
            start = time.perf_counter()
            kafka(cfg, "start", kafka_state)
            walls["kafka_start"] = time.perf_counter() - start
            train_all = [s for s in STAGES if s.name.startswith("train_")]
            train = [s for s in train_all if s.name.removeprefix("train_") in chosen]
            for stage in STAGES[:STAGES.index(train_all[0])]:
                walls[stage.name] = run_stage(stage.name, cfg.run_dir / "logs")
            start = time.perf_counter()
            with ray_head(cfg, cfg.run_dir / "logs") as ray_env:
                walls["ray_start"] = time.perf_counter() - start
                for stage in train:
                    walls[stage.name] = run_stage(stage.name, cfg.run_dir / "logs", ray_env)
            for stage in STAGES[STAGES.index(train_all[-1]) + 1:]:
                walls[stage.name] = run_stage(stage.name, cfg.run_dir / "logs")
    finally:
        if not args.keep_kafka:
            kafka(cfg, "stop", kafka_state)
    summary = summarise(cfg, walls, [s.name for s in STAGES if s in train or not s.name.startswith("train_")])
    summary["memory_mib"] = {"peak_above_baseline": round(mem["peak_mib"]), "baseline": round(mem["baseline_mib"]),
                             "measure": "whole machine, MemTotal - MemAvailable, sampled every 0.5 s"}
    path = cfg.run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    console.print(f"summary written to {path}")
    # the evaluation report (evaluation.report) over the stage results just written; no broker needed
    run_stage("report", cfg.run_dir / "logs")
    console.print(f"report written to {cfg.run_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
