"""Benchmark: Kafka -> Delta bronze ingest, exactly-once (the MERGE-on-event_id sink of ``pipelines.ingest``):
throughput (events/s) and end-to-end latency from produce to visible in Delta (p50/p95, seconds).

While the continuous ingest query runs (``run_ingest(..., trigger="continuous")``: a processing-time trigger
every ``--interval-s`` seconds, at most ``--max-offsets`` messages per micro-batch (``maxOffsetsPerTrigger``), speed
layer off, so the figure is the bronze sink's own), the generator's events (every impression field of the
contract, about 440 bytes each) are published in chunks of ``--chunk`` events, at most ``--rate`` events/s (0: as
fast as the producer goes), each chunk's publish start and acknowledged end recorded. Before the measured sizes a
warm-up run of ``--warmup`` events on its own topic and lake starts the JVM's code paths, so the first measured
micro-batch is not the one that also pays for them. An event's produce time is interpolated within its
chunk by its position; its visible time is the timestamp of the Delta commit (bronze's ``_delta_log``) of the
MERGE that inserted it, found from the row's ``ingested_at`` (the micro-batch's start). Latency = visible -
produced; throughput = events / (last commit - first publish). A private broker on ``--kafka-port`` (24292).

    .venv/bin/python -m bench.ingest --sizes 1000000

Each measured size's row is stored in ``bench/results/ingest.json`` (the newest per size, with its settings, commit
and UTC time), and the BENCHMARKS.md section shows every stored size: a run of 10M alone keeps the 1M row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from bench.report import write_section
from features.config import ROOT, KafkaConfig, PlatformConfig, SparkConfig
from features.tables import BRONZE_INTERACTIONS
from pipelines.generator import GeneratorConfig, generate, kafka_messages
from pipelines.produce import ensure_topic, publish
from pipelines.stages import kafka_command, kafka_env


#: Measured rows, one per size (the newest of each), each with its settings, commit and UTC time: BENCHMARKS.md's
#: section is rendered from all of them, so measuring 10M in one invocation keeps the 1M row of an earlier one.
RESULTS = ROOT / "bench" / "results" / "ingest.json"
#: The settings a row was measured with (the note states them; rows measured otherwise say so).
SETTINGS = ("interval_s", "max_offsets", "rate", "chunk", "warmup", "seed")

#: The ingest micro-batch's steps, as ``pipelines.ingest`` times them (speed is 0 here: the speed layer is off).
STEPS = ("validate", "dedupe", "merge", "inserted", "quarantine", "batch_log")


def merge_commits(bronze: Path) -> list[tuple[float, int]]:
    """``(commit time in Unix seconds, rows inserted)`` of every MERGE in the table's log, in order."""
    out = []
    for f in sorted((bronze / "_delta_log").glob("*.json")):
        for line in f.read_text().splitlines():
            info = json.loads(line).get("commitInfo")
            if info and info.get("operation") == "MERGE":
                out.append((info["timestamp"] / 1000.0, int(info["operationMetrics"].get("numTargetRowsInserted", 0))))
    return out


def run_one(spark, cfg: PlatformConfig, n: int, seed: int, chunk: int, interval_s: float = 1.0,
            max_offsets: int = 50_000, rate: float = 0.0) -> dict:
    """Ingest ``n`` generated events while they are produced; the figures of one size (see the module doc).

    Args:
        interval_s: seconds between micro-batches (processing-time trigger).
        max_offsets: at most this many messages per micro-batch (``maxOffsetsPerTrigger``).
        rate: producer cap in events/s (0: unthrottled).
    """
    from pyspark.sql import functions as F

    from pipelines.ingest import run_ingest

    ensure_topic(cfg.kafka.bootstrap, cfg.kafka.topic, cfg.kafka.partitions)
    bronze = Path(BRONZE_INTERACTIONS.path(cfg.lake_dir))
    result: dict = {}
    batches = _BatchSteps()
    logging.getLogger("pipelines.ingest").addHandler(batches)
    load_before = os.getloadavg()[0]
    ingest = threading.Thread(target=lambda: result.update(run_ingest(
        spark, cfg, "continuous", interval_s=interval_s, max_offsets_per_trigger=max_offsets, speed_layer=False)),
        daemon=True)
    ingest.start()
    while not spark.streams.active:  # the query has started (its first, empty trigger comes within a second)
        assert ingest.is_alive(), "the ingest query failed to start"
        time.sleep(0.2)
    time.sleep(3)
    gen = GeneratorConfig(n_events=n, seed=seed, n_users=max(1000, n // 20), n_items=max(1000, n // 50),
                          chunk_size=chunk)
    times = []  # (publish start, publish end) per chunk, Unix seconds
    for c in generate(gen):
        messages = list(kafka_messages(c))
        if rate and times:  # hold the chunk back until the cap allows it
            time.sleep(max(0.0, times[0][0] + len(times) * chunk / rate - time.time()))
        t0 = time.time()
        publish(cfg.kafka.bootstrap, cfg.kafka.topic, messages, linger_ms=5)
        times.append((t0, time.time()))
        visible = sum(r for _, r in merge_commits(bronze))
        print(f"  produced {len(times) * chunk:,} / {n:,} events, {visible:,} visible in bronze", flush=True)
    produced_s = times[-1][1] - times[0][0]
    while sum(r for _, r in merge_commits(bronze)) < n:
        assert ingest.is_alive(), "the ingest query stopped before bronze held every event"
        time.sleep(0.5)
    spark.streams.active[0].stop()
    ingest.join()
    logging.getLogger("pipelines.ingest").removeHandler(batches)
    commits = merge_commits(bronze)
    commit_ts = np.array([t for t, r in commits if r > 0])

    rows = (spark.read.format("delta").load(str(bronze))
            .withColumn("pos", F.substring("event_id", -12, 12).cast("long"))
            .groupBy((F.col("pos") / 1000).cast("long").alias("block"), F.unix_micros("ingested_at").alias("ing"))
            .agg(F.count("*").alias("n"), F.avg("pos").alias("mean_pos"))
            .collect())  # one row per 1000 produced events and micro-batch
    lat, weight = [], []
    for r in rows:
        start, end = times[int(r["mean_pos"]) // chunk]
        produced = start + (end - start) * (r["mean_pos"] % chunk) / chunk
        visible = commit_ts[np.searchsorted(commit_ts, r["ing"] / 1e6)]  # the first MERGE commit after the start
        lat.append(visible - produced)
        weight.append(r["n"])
    lat, weight = np.array(lat), np.array(weight)
    order = np.argsort(lat)
    cum = np.cumsum(weight[order]) / weight.sum()
    pct = lambda q: float(lat[order][np.searchsorted(cum, q)])
    wall = commit_ts[-1] - times[0][0]
    return {"events": n, "bronze_rows": result.get("events_bronze"), "produce_events_per_s": n / produced_s,
            "ingest_events_per_s": n / wall, "wall_s": wall, "p50_s": pct(0.5), "p95_s": pct(0.95),
            "merges": len(commit_ts), "load": (load_before, os.getloadavg()[0]), "steps": batches.mean()}


class _BatchSteps(logging.Handler):
    """Collects the seconds per step of every micro-batch with messages from the ingest's batch log records
    (``pipelines.ingest``: ``steps``, ``messages``)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[int, dict[str, float]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "messages", 0):
            self.records.append((record.messages, dict(record.steps)))

    def mean(self) -> dict:
        """``{"batches": n, "messages": mean per batch, step: mean seconds per batch}`` (empty when none)."""
        if not self.records:
            return {}
        n = len(self.records)
        out = {"batches": n, "messages": sum(m for m, _ in self.records) / n}
        for step in self.records[0][1]:
            out[step] = sum(s.get(step, 0.0) for _, s in self.records) / n
        return out


def main(argv: list[str] | None = None) -> None:
    from pipelines.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000", help="comma-separated event counts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=20_000, help="events per published chunk")
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds between micro-batches")
    parser.add_argument("--max-offsets", type=int, default=50_000, help="maxOffsetsPerTrigger (messages)")
    parser.add_argument("--rate", type=float, default=0.0, help="producer cap, events/s (0: unthrottled)")
    parser.add_argument("--warmup", type=int, default=20_000, help="events of the unmeasured warm-up run")
    parser.add_argument("--kafka-port", type=int, default=24292)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench" / "ingest")
    parser.add_argument("--no-report", action="store_true", help="print only: neither the results file nor "
                        "BENCHMARKS.md is written")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="JSON file of the measured rows, one per size (the newest measurement of each): the "
                             "section shows every size in it, so a run of one size keeps the others' rows")
    parser.add_argument("--planned", default="1000000,10000000",
                        help="sizes the section must account for: one not measured in this run gets a 'not run' "
                             "line with its time extrapolated from the measured rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)  # the ingest's per-batch line with its step timings
    sizes = [int(s) for s in args.sizes.split(",")]
    bootstrap = f"127.0.0.1:{args.kafka_port}"
    shutil.rmtree(args.work_dir, ignore_errors=True)
    env = {**os.environ, **kafka_env(bootstrap)}
    subprocess.run(kafka_command("start", args.work_dir / "kafka"), check=True, env=env)
    spark = None
    rows = []
    opts = dict(interval_s=args.interval_s, max_offsets=args.max_offsets, rate=args.rate)
    try:
        runs = ([(f"warmup-{args.warmup}", args.warmup)] if args.warmup else []) + [(str(n), n) for n in sizes]
        for name, n in runs:
            cfg = PlatformConfig(data_dir=args.work_dir / f"lake-{name}", artifacts_dir=args.work_dir / "artifacts",
                                 kafka=KafkaConfig(bootstrap=bootstrap, topic=f"bench-ingest-{name}", partitions=4),
                                 spark=SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="4g"))
            spark = spark or get_spark(cfg, app_name="bench-ingest")
            r = run_one(spark, cfg, n, args.seed, min(args.chunk, n), **opts)
            print(json.dumps({"run": name, **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}),
                  flush=True)
            if not name.startswith("warmup"):
                rows.append(r)
                if not args.no_report:
                    stored = save_result(args.results, r, args)
                    write_section("ingest", report(stored, args), command=f"python -m bench.ingest --sizes {args.sizes}")
    finally:
        if spark is not None:
            spark.stop()
        subprocess.run(kafka_command("stop", args.work_dir / "kafka"), check=False, env=env)
    print(report(rows, args) if rows else "no size finished")


def save_result(path: Path, row: dict, args) -> list[dict]:
    """Store ``row`` (one measured size, with ``args``' settings, the commit and the UTC time) in the results file,
    replacing an earlier row of the same size; return every stored row, smallest size first."""
    from bench.batch_features import _commit

    stored = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    stored[row["events"]] = {**row, "settings": {k: getattr(args, k) for k in SETTINGS}, "commit": _commit(),
                             "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): stored[k] for k in sorted(stored)}, indent=1) + "\n")
    return [stored[k] for k in sorted(stored)]


def report(rows: list[dict], args) -> str:
    """The Markdown table and notes for ``rows`` (measured sizes, smallest first)."""
    table = ["| events | bronze rows | produce events/s | ingest events/s | wall s | latency p50 s | latency p95 s | "
             "MERGE commits | load avg 1 min (before -> after) | measured (UTC, commit) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        table.append(f"| {r['events']:,} | {r['bronze_rows']:,} | {r['produce_events_per_s']:,.0f} | "
                     f"{r['ingest_events_per_s']:,.0f} | {r['wall_s']:.1f} | {r['p50_s']:.1f} | {r['p95_s']:.1f} | "
                     f"{r['merges']} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} | "
                     f"{r.get('measured_utc', 'this run')}, {r.get('commit', '')} |")
    current = {k: getattr(args, k) for k in SETTINGS}
    other = [f"{r['events']:,} ({r['settings']})" for r in rows if r.get("settings", current) != current]
    steps = ["| events | micro-batches | mean messages per batch | " + " | ".join(
        f"{k} s" for k in STEPS) + " | total s |", "|---:|---:|---:|" + "---:|" * (len(STEPS) + 1)]
    for r in rows:
        s = r.get("steps") or {}
        if s:
            steps.append(f"| {r['events']:,} | {s['batches']} | {s['messages']:,.0f} | " + " | ".join(
                f"{s.get(k, 0.0):.2f}" for k in STEPS) + f" | {sum(s.get(k, 0.0) for k in STEPS):.2f} |")
    rate = f"capped at {args.rate:,.0f} events/s" if args.rate else "unthrottled"
    note = (f"\nProcessing-time trigger every {args.interval_s:g} s with maxOffsetsPerTrigger {args.max_offsets:,}, "
            "exactly-once MERGE on event_id into bronze, restricted to the batch's event_date partitions (speed layer off), full validation of the contract (every "
            "impression field), Spark local[2], 4 Kafka partitions; producer kafka-python (idempotent, acks=all) "
            f"in the same process on the same 2 cores, {rate}, chunks of {args.chunk:,} generated impressions "
            f"(~440 bytes each); a {args.warmup:,}-event warm-up run before the measured sizes. Latency is produce "
            "-> visible in Delta (the MERGE commit that inserted the event), weighted per event; when the producer "
            "outruns the sink it includes the queueing, so p95 then grows with the run. The machine (2 logical "
            "CPUs) is shared with other jobs (the load average column), so figures are lower bounds of what it can "
            "do." + (f" Rows measured with other settings: {'; '.join(other)}." if other else ""))
    step_note = ("\nSeconds per micro-batch step (mean over the batches that had messages; a batch cut off by the "
                 "bench's stop is not counted): validate = parse and check every message and keep the result "
                 "(localCheckpoint), dedupe = keep the first of each event_id and the batch's counts, merge = the "
                 "insert-only MERGE into bronze restricted to the batch's event_date partitions, inserted = the "
                 "inserted count (read from bronze only when the MERGE did not insert every valid event), "
                 "batch_log = the quarantine.ingest_batches append.\n")
    measured = {r["events"] for r in rows}
    missing = [int(n) for n in getattr(args, "planned", "").split(",") if n and int(n) not in measured]
    if missing and rows:
        rate = rows[-1]["ingest_events_per_s"]
        note += "".join(f"\n\n**{n:,} events: not measured yet.** At the {rows[-1]['events']:,}-event run's "
                        f"measured {rate:,.0f} events/s it would take about {n / rate / 60:,.0f} min (an "
                        "extrapolation, not a measurement: each batch's MERGE reads bronze's partitions of the batch's "
                        "days, which hold more rows per day at a larger size over the same 30 days, so the rate may "
                        "be lower)."
                        for n in missing)
    return "\n".join(table) + "\n" + note + "\n" + step_note + "\n" + "\n".join(steps)


if __name__ == "__main__":
    main()
