"""Benchmark: Kafka -> Delta bronze ingest (issue 18). Two parts, one command (``--parts``):

**throughput**: three sinks, one after another (``ours``, ``plain``, ``dedup``; ``--repeats`` rounds), each on a
fresh lake and checkpoint, read the SAME pre-filled topic of N generated events (``--sizes``; every impression
field of the contract, about 440 bytes each; the topic is filled once, before the first sink) with the
available-now trigger and the same ``maxOffsetsPerTrigger`` (``--max-offsets``):

- ``ours``: ``pipelines.ingest.run_ingest(spark, cfg, "available-now", max_offsets_per_trigger=M,
  speed_layer=False)``: every message validated against the contract, valid events written to bronze exactly once
  on ``event_id``, malformed ones to quarantine, a batch log row per micro-batch.
- ``plain``: Spark's Kafka source -> ``from_json(CAST(value AS STRING), features.events.EVENT_SCHEMA_DDL)`` -> the
  contract's fields (``event_time`` cast to a timestamp, ``event_date`` from it) -> Delta streaming sink,
  append mode; partitioned by ``event_date`` as bronze is (``--no-plain-partitioned``: unpartitioned). No
  validation, no deduplication: a redelivered event is written twice.
- ``dedup``: ``plain`` plus ``.withWatermark("event_time", D).dropDuplicatesWithinWatermark(["event_id"])``
  before the sink (Spark >= 3.5). The watermark is on the event's own ``event_time``, not the Kafka timestamp:
  a re-produced copy of an event (a producer retry after a timeout, a replay) carries the same ``event_time`` but
  a later Kafka timestamp, so only the event time pairs the copies. Generated event times spread evenly over the
  generator's ``days`` (30) in topic order, so a watermark a few hours behind the newest event would already
  drop events that a micro-batch's partitions read a little behind the others as late; the default delay ``D``
  is the generator's whole period (``"30 days"``), under which no generated event can be late (every event time
  is within 30 days of the first) and no id leaves the state: the same guarantee ours gives on this log (every
  id checked against every earlier one), at the cost of holding every id in the state store. ``--dedup-delay``
  sets another; the rows out (and the watermark's dropped-row count, from the query's progress) show what it
  dropped.

Events/s = N / the query's wall seconds (``start()`` to termination; for ours the ``ingest_wall_s`` that
``run_ingest`` measures the same way); rows out = rows in the resulting table; the ratio of ours' events/s to each
sink's in the same round (issue 18's target: ours >= 0.8x dedup). Before the measured sizes, each sink runs once
on a ``--warmup``-event topic of its own (unmeasured), so no sink pays for the JVM's first compilation.

**latency**: the continuous query (``run_ingest(..., "continuous")``: a processing-time trigger every
``--interval-s`` seconds, at most ``--max-offsets`` messages per micro-batch, speed layer off) while a producer in
this process publishes ``--latency-events`` generated events at a steady ``--rate`` events/s (default: half of
ours' available-now events/s from the throughput part, so the sink can keep up). An event's produce time is when
the paced producer handed it to the Kafka client (interpolated between marks every 1,000 events); its visible
time is the timestamp of the Delta commit (bronze's ``_delta_log``) that added the data file holding it (read
from the row's ``_metadata.file_path``). Latency = visible - produced, per event: p50, p95, and the p50 of the
first and the last tenth of the events (close when the sink keeps up; the last larger when events queue).

A private broker on ``--kafka-port`` (24292), Spark ``local[2]``, 4 Kafka partitions::

    .venv/bin/python -m bench.ingest --sizes 1000000
    .venv/bin/python -m bench.ingest --parts throughput --sizes 20000 --warmup 2000 --max-offsets 5000 \\
        --results /tmp/ingest.json --benchmarks /tmp/BENCHMARKS.md          # a smoke run

Results: ``bench/results/ingest.json`` holds ``throughput`` (one record per size, the newest of each: settings,
commit, UTC time, machine, load average before/after, and every sink run), ``latency`` (the newest record) and
``earlier`` (the rows of the previous method: a continuous query while an unthrottled producer ran, per size).
BENCHMARKS.md's ``ingest`` section is rendered from that file alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bench.report import BENCHMARKS, machine, write_section
from features.config import ROOT, KafkaConfig, PlatformConfig, SparkConfig
from features.events import EVENT_SCHEMA_DDL
from features.tables import BRONZE_INTERACTIONS
from pipelines.generator import GeneratorConfig, generate, kafka_messages
from pipelines.produce import ensure_topic, publish
from pipelines.stages import kafka_command, kafka_env

RESULTS = ROOT / "bench" / "results" / "ingest.json"
PARTS = ("throughput", "latency")
#: Run order within a round.
SINKS = ("ours", "plain", "dedup")
#: Issue 18's target: ours' events/s at least this fraction of the append with watermark deduplication's.
TARGET_RATIO = 0.8
#: The latency part's default producer rate, as a fraction of ours' available-now events/s.
RATE_FRACTION = 0.5
#: Events between two produce-time marks of the latency part.
MARK_EVERY = 1000
PARTITIONS = 4
SPARK = SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="4g")


# -- pure helpers (tested in tests/test_bench.py) -------------------------------------------------------------------

def delta_commits(table: Path) -> list[dict]:
    """Every commit in the Delta table's ``_delta_log``, oldest first, from its JSON commit files (Delta keeps them
    beside its checkpoints for the log retention, 30 days).

    Returns:
        ``[{"version", "time" (Unix seconds), "operation", "rows" (rows added: a MERGE's
        ``numTargetRowsInserted``, else the write's ``numOutputRows``, else 0), "files" (names of the data files
        it added)}]``.
    """
    out = []
    for f in sorted((table / "_delta_log").glob("*.json")):
        info, files = {}, []
        for line in f.read_text().splitlines():
            action = json.loads(line)
            info = action.get("commitInfo", info)
            if "add" in action:
                files.append(action["add"]["path"].rsplit("/", 1)[-1])
        metrics = info.get("operationMetrics", {})
        rows = metrics.get("numTargetRowsInserted") if info.get("operation") == "MERGE" else None
        out.append({"version": int(f.stem), "time": info.get("timestamp", 0) / 1000.0,
                    "operation": info.get("operation"), "rows": int(rows or metrics.get("numOutputRows", 0)),
                    "files": files})
    return out


def weighted_quantile(values, weights, q: float) -> float:
    """The smallest value whose cumulative weight (values sorted ascending) reaches ``q`` of the total.

    >>> weighted_quantile([3.0, 1.0, 2.0], [1, 1, 2], 0.5)
    2.0
    >>> weighted_quantile([3.0, 1.0, 2.0], [1, 1, 2], 0.95)
    3.0
    """
    values, weights = np.asarray(values, float), np.asarray(weights, float)
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][min(np.searchsorted(cum, q), len(cum) - 1)])


def ratios(runs: list[dict]) -> dict[tuple[int, str], float]:
    """``{(repeat, sink): ours' events/s / the sink's}`` for every run whose round has an ``ours`` run."""
    ours = {r["repeat"]: r["events_per_s"] for r in runs if r["sink"] == "ours"}
    return {(r["repeat"], r["sink"]): ours[r["repeat"]] / r["events_per_s"] for r in runs if r["repeat"] in ours}


def paced(messages: Iterable, rate: float, marks: list[float], every: int = MARK_EVERY) -> Iterator:
    """Yield ``messages`` at most ``rate`` per second, appending to ``marks`` the Unix time at which message
    ``i * every`` was yielded (the produce-time marks of the latency part)."""
    t0 = time.time()
    for i, m in enumerate(messages):
        ahead = t0 + i / rate - time.time()
        if ahead > 0.005:  # sleep in slices of a few ms, not once per message
            time.sleep(ahead)
        if i % every == 0:
            marks.append(time.time())
        yield m


# -- the runs -------------------------------------------------------------------------------------------------------

def fill_topic(bootstrap: str, topic: str, n: int, seed: int, chunk: int) -> float:
    """Create ``topic`` and publish ``n`` generated events to it; the seconds it took."""
    ensure_topic(bootstrap, topic, PARTITIONS)
    gen = _generator(n, seed, chunk)
    start = time.perf_counter()
    publish(bootstrap, topic, (m for c in generate(gen) for m in kafka_messages(c)))
    return time.perf_counter() - start


def _generator(n: int, seed: int, chunk: int) -> GeneratorConfig:
    return GeneratorConfig(n_events=n, seed=seed, n_users=max(1000, n // 20), n_items=max(1000, n // 50),
                           chunk_size=min(chunk, n))


def _config(work_dir: Path, bootstrap: str, topic: str, name: str) -> PlatformConfig:
    return PlatformConfig(data_dir=work_dir / name, artifacts_dir=work_dir / "artifacts",
                          kafka=KafkaConfig(bootstrap=bootstrap, topic=topic, partitions=PARTITIONS), spark=SPARK)


def plain_writer(spark, cfg: PlatformConfig, max_offsets: int, dedup_delay: str | None = None,
                 partitioned: bool = True):
    """The plain append (``dedup_delay`` None) or the append with watermark deduplication, as an available-now
    ``DataStreamWriter`` into ``<lake>/plain`` with its checkpoint under ``cfg.checkpoint_dir`` (see the module
    doc)."""
    from pyspark.sql import functions as F

    events = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", cfg.kafka.bootstrap).option("subscribe", cfg.kafka.topic)
              .option("startingOffsets", "earliest").option("maxOffsetsPerTrigger", str(max_offsets)).load()
              .select(F.from_json(F.col("value").cast("string"), EVENT_SCHEMA_DDL).alias("e")).select("e.*")
              .withColumn("event_time", F.col("event_time").cast("timestamp"))  # ISO-8601 with Z
              .withColumn("event_date", F.to_date("event_time")))
    if dedup_delay:
        events = events.withWatermark("event_time", dedup_delay).dropDuplicatesWithinWatermark(["event_id"])
    writer = (events.writeStream.format("delta").outputMode("append")
              .option("checkpointLocation", str(cfg.checkpoint_dir / "plain")).trigger(availableNow=True))
    return writer.partitionBy("event_date") if partitioned else writer


def run_sink(spark, sink: str, cfg: PlatformConfig, max_offsets: int, dedup_delay: str,
             partitioned: bool = True) -> dict:
    """Run one sink over ``cfg``'s topic into ``cfg``'s (fresh) lake.

    Returns:
        ``wall_s`` (``start()`` to termination, seconds), ``rows_out`` (rows in the resulting table), ``batches``
        (micro-batches that read messages), ``dropped_by_watermark`` (dedup: late rows the watermark dropped),
        and for ours ``steps`` (mean seconds per step of its micro-batches, as its batch log records give them).
    """
    from pipelines.ingest import run_ingest

    if sink == "ours":
        steps = _BatchSteps()
        logging.getLogger("pipelines.ingest").addHandler(steps)
        try:
            result = run_ingest(spark, cfg, "available-now", max_offsets_per_trigger=max_offsets, speed_layer=False)
        finally:
            logging.getLogger("pipelines.ingest").removeHandler(steps)
        return {"wall_s": result["ingest_wall_s"], "rows_out": result["events_bronze"],
                "batches": len(steps.records), "steps": steps.mean()}
    path = str(cfg.lake_dir / "plain")
    writer = plain_writer(spark, cfg, max_offsets, dedup_delay if sink == "dedup" else None, partitioned)
    start = time.perf_counter()
    query = writer.start(path)
    query.awaitTermination()
    wall_s = time.perf_counter() - start
    progress = [p if isinstance(p, dict) else json.loads(p.json) for p in query.recentProgress]
    dropped = sum(op.get("numRowsDroppedByWatermark", 0) for p in progress for op in p.get("stateOperators", []))
    return {"wall_s": wall_s, "rows_out": spark.read.format("delta").load(path).count(),
            "batches": sum(1 for p in progress if p.get("numInputRows")),
            "dropped_by_watermark": dropped if sink == "dedup" else None}


def throughput(spark, work_dir: Path, bootstrap: str, n: int, args, measured: bool = True,
               sinks: tuple[str, ...] = SINKS) -> dict:
    """Fill a topic with ``n`` events once, then run ``sinks`` on it ``args.repeats`` times (once when not
    ``measured``: the warm-up), each on a fresh lake and checkpoint; the size's record (see the module doc)."""
    name = f"{n}" if measured else f"warmup-{n}"
    topic = f"bench-ingest-{name}"
    load_before = os.getloadavg()[0]
    fill_s = fill_topic(bootstrap, topic, n, args.seed, args.chunk)
    print(f"{topic}: {n:,} events published in {fill_s:.1f} s", flush=True)
    runs = []
    for repeat in range(args.repeats if measured else 1):
        for sink in sinks:
            cfg = _config(work_dir, bootstrap, topic, f"{name}-{sink}-{repeat}")
            before = os.getloadavg()[0]
            r = run_sink(spark, sink, cfg, args.max_offsets, args.dedup_delay, args.plain_partitioned)
            r = {"sink": sink, "repeat": repeat, **r, "events_per_s": n / r["wall_s"],
                 "load": [before, os.getloadavg()[0]]}
            shutil.rmtree(cfg.data_dir, ignore_errors=True)  # a 10M run would otherwise keep every copy on disk
            print(json.dumps({"topic": topic, **_rounded(r)}), flush=True)
            runs.append(r)
    return {"events": n, "fill_s": fill_s, "produce_events_per_s": n / fill_s, "runs": runs,
            "load": [load_before, os.getloadavg()[0]], "settings": {k: getattr(args, k) for k in THROUGHPUT_SETTINGS},
            **_provenance(args)}


THROUGHPUT_SETTINGS = ("max_offsets", "repeats", "warmup", "seed", "chunk", "dedup_delay", "plain_partitioned",
                       "rocksdb")
LATENCY_SETTINGS = ("latency_events", "interval_s", "max_offsets", "seed", "chunk", "warmup")


def latency(spark, work_dir: Path, bootstrap: str, n: int, rate: float, rate_from: str, args) -> dict:
    """Produce ``n`` events at ``rate`` events/s (``rate_from``: where that figure came from) while the continuous
    ingest runs; the latency record (see the module doc)."""
    from pyspark.sql import functions as F

    from pipelines.ingest import run_ingest

    cfg = _config(work_dir, bootstrap, "bench-ingest-latency", "latency")
    ensure_topic(bootstrap, cfg.kafka.topic, PARTITIONS)
    bronze = Path(BRONZE_INTERACTIONS.path(cfg.lake_dir))
    visible = lambda: sum(c["rows"] for c in delta_commits(bronze))
    load_before = os.getloadavg()[0]
    ingest = threading.Thread(target=lambda: run_ingest(
        spark, cfg, "continuous", interval_s=args.interval_s, max_offsets_per_trigger=args.max_offsets,
        speed_layer=False), daemon=True)
    ingest.start()
    while not spark.streams.active:  # the query has started (its first, empty trigger comes within a second)
        assert ingest.is_alive(), "the ingest query failed to start"
        time.sleep(0.2)
    time.sleep(3)
    marks: list[float] = []
    messages = (m for c in generate(_generator(n, args.seed, args.chunk)) for m in kafka_messages(c))
    publish(bootstrap, cfg.kafka.topic, paced(messages, rate, marks), linger_ms=5)
    published = time.time()
    while visible() < n:
        assert ingest.is_alive(), "the ingest query stopped before bronze held every event"
        time.sleep(0.5)
    query = spark.streams.active[0]
    while query.status["isTriggerActive"]:  # let the last batch finish its batch log (no trigger comes after it:
        time.sleep(0.2)  # a stateless query runs none without new offsets), rather than interrupt its write
    query.stop()
    ingest.join()
    load_after = os.getloadavg()[0]

    commit_of = {f: c["time"] for c in delta_commits(bronze) for f in c["files"]}
    rows = (spark.read.format("delta").load(str(bronze))
            .select(F.substring("event_id", -12, 12).cast("long").alias("pos"),
                    F.element_at(F.split("_metadata.file_path", "/"), -1).alias("file"))
            .groupBy((F.col("pos") / MARK_EVERY).cast("long").alias("block"), "file")
            .agg(F.count("*").alias("n"), F.avg("pos").alias("mean_pos"))
            .collect())  # one row per block of produced events and data file
    mark_pos = np.arange(len(marks) + 1) * MARK_EVERY
    mark_pos[-1] = n
    produced = np.interp([r["mean_pos"] for r in rows], mark_pos, [*marks, published])
    lat = np.array([commit_of[r["file"]] for r in rows]) - produced
    weight = np.array([r["n"] for r in rows])
    pos = np.array([r["mean_pos"] for r in rows])
    first, last = pos < n / 10, pos >= n * 9 / 10
    return {"events": n, "bronze_rows": int(weight.sum()), "rate": rate, "rate_from": rate_from,
            "produce_events_per_s": n / (published - marks[0]),
            "visible_events_per_s": n / (max(commit_of.values()) - marks[0]),
            "p50_s": weighted_quantile(lat, weight, 0.5), "p95_s": weighted_quantile(lat, weight, 0.95),
            "p50_first_tenth_s": weighted_quantile(lat[first], weight[first], 0.5),
            "p50_last_tenth_s": weighted_quantile(lat[last], weight[last], 0.5),
            "commits": sum(1 for c in delta_commits(bronze) if c["rows"]), "load": [load_before, load_after],
            "settings": {k: getattr(args, k) for k in LATENCY_SETTINGS}, **_provenance(args)}


class _BatchSteps(logging.Handler):
    """Collects the seconds per step of every micro-batch with messages from the ingest's batch log records
    (``pipelines.ingest``: ``steps`` {step: seconds}, ``messages``); the step names are the records' own."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[int, dict[str, float]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "messages", 0):
            self.records.append((record.messages, dict(getattr(record, "steps", {}))))

    def mean(self) -> dict:
        """``{"batches": n, "messages": mean per batch, step: mean seconds per batch}`` (empty when none)."""
        if not self.records:
            return {}
        n = len(self.records)
        names = list(dict.fromkeys(k for _, s in self.records for k in s))  # every step, in first-seen order
        return {"batches": n, "messages": sum(m for m, _ in self.records) / n,
                **{k: sum(s.get(k, 0.0) for _, s in self.records) / n for k in names}}


def _provenance(args) -> dict:
    from bench.batch_features import _commit

    return {"commit": _commit(), "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": machine(), "command": args.command}


def _rounded(r: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "steps"}


# -- results --------------------------------------------------------------------------------------------------------

def load_results(path: Path) -> dict:
    """The results file as ``{"throughput": {str(events): record}, "latency": record or None, "earlier": {...}}``;
    a file in the layout before issue 18 (``{str(events): row}``) becomes ``earlier``."""
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored and all(k.isdigit() for k in stored):
        stored = {"earlier": stored}
    return {"throughput": stored.get("throughput", {}), "latency": stored.get("latency"),
            "earlier": stored.get("earlier", {})}


def save_results(path: Path, throughput_records: list[dict], latency_record: dict | None) -> dict:
    """Store this run's records (a size's throughput record replaces the earlier one of that size; a latency
    record replaces the earlier one) and return the whole file's content."""
    stored = load_results(path)
    for r in throughput_records:
        stored["throughput"][str(r["events"])] = r
    stored["throughput"] = {k: stored["throughput"][k] for k in sorted(stored["throughput"], key=int)}
    if latency_record:
        stored["latency"] = latency_record
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=1) + "\n")
    return stored


def report(stored: dict) -> str:
    """BENCHMARKS.md's section, from the results file's content (:func:`load_results`) alone."""
    out = []
    for r in stored["throughput"].values():
        s = r["settings"]
        ratio = ratios(r["runs"])
        layout = "partitioned by event_date as bronze is" if s["plain_partitioned"] else "unpartitioned"
        store = "RocksDB" if s.get("rocksdb") else "the default (HDFS-backed, in memory)"
        out += [f"### Throughput, {r['events']:,} events: three sinks on one pre-filled topic",
                "",
                f"_`{r['command']}` at {r['commit']}, {r['measured_utc']} UTC; {r['machine']}; load average (1 min) "
                f"{r['load'][0]:.1f} before, {r['load'][1]:.1f} after._",
                "",
                f"One Kafka topic (4 partitions) filled once with {r['events']:,} generated impressions (~440 bytes "
                f"each, every field of the contract; {r['produce_events_per_s']:,.0f} events/s to fill), then "
                f"read by each sink in turn ({', '.join(SINKS)}; {s['repeats']} round(s)) on a fresh lake and "
                f"checkpoint, trigger availableNow, maxOffsetsPerTrigger {s['max_offsets']:,}, Spark local[2], "
                f"{SPARK.shuffle_partitions} shuffle partitions; a {s['warmup']:,}-event warm-up of every sink on "
                "its own topic first. **ours**: `pipelines.ingest.run_ingest` (speed layer off): every message "
                "validated against the contract, valid events into bronze exactly once on event_id, malformed "
                "ones to quarantine, a batch log row per micro-batch. **plain**: Kafka source -> from_json with "
                "the contract's schema -> its fields (event_time as a timestamp, event_date) -> Delta append, "
                f"{layout}; no validation, no deduplication. **dedup**: plain plus withWatermark(event_time, "
                f"'{s['dedup_delay']}') and dropDuplicatesWithinWatermark(event_id); state store {store}. "
                "Wall = the query's start() to its termination; events/s = the topic's events / wall; the ratio "
                f"is ours' events/s over the sink's in the same round (issue 18's target: ours >= "
                f"{TARGET_RATIO}x dedup).",
                "",
                "| sink | round | events | rows out | micro-batches | wall s | events/s | ours / this | "
                "load avg 1 min (before -> after) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for run in r["runs"]:
            dropped = run.get("dropped_by_watermark")
            rows = f"{run['rows_out']:,}" + (f" ({dropped:,} late)" if dropped else "")
            out.append(f"| {run['sink']} | {run['repeat'] + 1} | {r['events']:,} | {rows} | {run['batches']} | "
                       f"{run['wall_s']:.1f} | {run['events_per_s']:,.0f} | "
                       f"{ratio.get((run['repeat'], run['sink']), float('nan')):.2f} | "
                       f"{run['load'][0]:.1f} -> {run['load'][1]:.1f} |")
        dedup = [v for (_, sink), v in ratio.items() if sink == "dedup"]
        if dedup:
            out += ["", f"ours / dedup: {float(np.median(dedup)):.2f} (median over {len(dedup)} round(s)); "
                        f"target >= {TARGET_RATIO}: {'met' if np.median(dedup) >= TARGET_RATIO else 'not met'}."]
        steps = [run for run in r["runs"] if run.get("steps")]
        if steps:
            names = list(dict.fromkeys(k for run in steps for k in run["steps"] if k not in ("batches", "messages")))
            out += ["", "Ours, seconds per micro-batch step (mean over the batches with messages; the step names are "
                        "the ones `pipelines.ingest`'s batch log record gives):", "",
                    "| round | micro-batches | mean messages per batch | " + " | ".join(f"{k} s" for k in names)
                    + " | total s |", "|---:|---:|---:|" + "---:|" * (len(names) + 1)]
            for run in steps:
                st = run["steps"]
                out.append(f"| {run['repeat'] + 1} | {st['batches']} | {st['messages']:,.0f} | "
                           + " | ".join(f"{st.get(k, 0.0):.2f}" for k in names)
                           + f" | {sum(st.get(k, 0.0) for k in names):.2f} |")
        out.append("")
    lat = stored["latency"]
    if lat:
        s = lat["settings"]
        out += ["### Latency under a steady producer rate", "",
                f"_`{lat['command']}` at {lat['commit']}, {lat['measured_utc']} UTC; {lat['machine']}._", "",
                f"The continuous query (`run_ingest(..., \"continuous\")`, processing-time trigger every "
                f"{s['interval_s']:g} s, maxOffsetsPerTrigger {s['max_offsets']:,}, speed layer off) while a "
                f"producer in the same process (kafka-python, idempotent, acks=all, on the same 2 cores) "
                f"publishes {lat['events']:,} generated impressions at a steady {lat['rate']:,.0f} events/s "
                f"({lat.get('rate_from', '--rate')}). "
                "Latency = the timestamp of the Delta commit that added the event's data file - the time the "
                "producer handed the event to the Kafka client, per event. The p50 of the first and last tenth of "
                "the events are close when the sink keeps up with the rate and grow apart when events queue.", "",
                "| events | bronze rows | rate cap events/s | produced events/s | visible events/s | p50 s | p95 s | "
                "p50 first tenth s | p50 last tenth s | commits | load avg 1 min (before -> after) |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                f"| {lat['events']:,} | {lat['bronze_rows']:,} | {lat['rate']:,.0f} | "
                f"{lat['produce_events_per_s']:,.0f} | {lat['visible_events_per_s']:,.0f} | {lat['p50_s']:.1f} | "
                f"{lat['p95_s']:.1f} | {lat['p50_first_tenth_s']:.1f} | {lat['p50_last_tenth_s']:.1f} | "
                f"{lat['commits']} | {lat['load'][0]:.1f} -> {lat['load'][1]:.1f} |", ""]
    if stored["earlier"]:
        out += ["### Earlier method (before issue 18)", "",
                "The continuous query (trigger every 1 s, maxOffsetsPerTrigger 50,000, the MERGE sink of the time) "
                "while an unthrottled producer published the events; throughput = events / (last commit - first "
                "publish); latency includes the queueing, as the producer outran the sink.", "",
                "| events | ingest events/s | wall s | latency p50 s | latency p95 s | measured (UTC, commit) |",
                "|---:|---:|---:|---:|---:|---|"]
        for r in stored["earlier"].values():
            out.append(f"| {r['events']:,} | {r['ingest_events_per_s']:,.0f} | {r['wall_s']:.1f} | "
                       f"{r['p50_s']:.1f} | {r['p95_s']:.1f} | {r['measured_utc']}, {r['commit']} |")
    return "\n".join(out).strip() or "Nothing measured yet."


def auto_rate(records: list[dict], stored: dict) -> tuple[float, str]:
    """``RATE_FRACTION`` of ours' median available-now events/s at the largest size measured in this run (else in
    the results file), and a note saying so.

    Raises:
        SystemExit: no throughput record to derive it from (give --rate).
    """
    pool = records or list(stored["throughput"].values())
    if not pool:
        raise SystemExit("bench.ingest: no throughput figure to derive the latency part's rate from; give --rate")
    r = max(pool, key=lambda r: r["events"])
    ours = float(np.median([run["events_per_s"] for run in r["runs"] if run["sink"] == "ours"]))
    return RATE_FRACTION * ours, (f"{RATE_FRACTION:g} x ours' {ours:,.0f} events/s at {r['events']:,} events "
                                  f"({r['measured_utc']} UTC)")


def main(argv: list[str] | None = None) -> None:
    from pipelines.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
    parser.add_argument("--sizes", default="1000000", help="throughput: comma-separated event counts, one topic "
                        "each")
    parser.add_argument("--repeats", type=int, default=1, help="throughput: rounds of ours, plain, dedup")
    parser.add_argument("--max-offsets", type=int, default=50_000, help="maxOffsetsPerTrigger (messages), every "
                        "sink and part")
    parser.add_argument("--dedup-delay", default=f"{GeneratorConfig.days} days",
                        help="dedup's watermark delay on event_time (the default covers the generator's period)")
    parser.add_argument("--plain-partitioned", action=argparse.BooleanOptionalAction, default=True,
                        help="plain and dedup write partitioned by event_date, as bronze is")
    parser.add_argument("--rocksdb", action="store_true", help="dedup's state in RocksDB instead of the default "
                        "in-memory store")
    parser.add_argument("--warmup", type=int, default=20_000, help="events of the unmeasured warm-up (0: none)")
    parser.add_argument("--latency-events", type=int, default=200_000, help="latency: events produced")
    parser.add_argument("--rate", type=float, default=None, help="latency: producer rate, events/s (default: "
                        f"{RATE_FRACTION} x ours' throughput events/s)")
    parser.add_argument("--interval-s", type=float, default=1.0, help="latency: seconds between micro-batches")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=20_000, help="events per generated chunk")
    parser.add_argument("--kafka-port", type=int, default=24292)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench" / "ingest")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results JSON file")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="the Markdown file whose ingest "
                        "section is rewritten")
    parser.add_argument("--no-report", action="store_true", help="print only: neither file is written")
    args = parser.parse_args(argv)
    args.command = "python -m bench.ingest " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        parser.error(f"--parts: {sorted(set(parts) - set(PARTS))} not among {PARTS}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipelines").setLevel(logging.INFO)  # the ingest's per-batch line with its step timings
    sizes = [int(s) for s in args.sizes.split(",")] if "throughput" in parts else []
    bootstrap = f"127.0.0.1:{args.kafka_port}"
    shutil.rmtree(args.work_dir, ignore_errors=True)
    env = {**os.environ, **kafka_env(bootstrap)}
    subprocess.run(kafka_command("start", args.work_dir / "kafka"), check=True, env=env)
    spark = None
    records, lat = [], None
    try:
        spark = get_spark(_config(args.work_dir, bootstrap, "unused", "unused"), app_name="bench-ingest")
        spark.conf.set("spark.sql.streaming.numRecentProgressUpdates", "100000")  # every batch's progress
        if args.rocksdb:  # read when a query's state is first created, so it applies to dedup's fresh checkpoints
            spark.conf.set("spark.sql.streaming.stateStore.providerClass",
                           "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider")
        if args.warmup:  # every sink measured later (only ours for the latency part alone)
            throughput(spark, args.work_dir, bootstrap, args.warmup, args, measured=False,
                       sinks=SINKS if sizes else ("ours",))
        for n in sizes:
            records.append(throughput(spark, args.work_dir, bootstrap, n, args))
            if not args.no_report:
                write_section("ingest", report(save_results(args.results, records[-1:], None)),
                              command=args.command, path=args.benchmarks)
        if "latency" in parts:
            rate, rate_from = ((args.rate, "--rate") if args.rate
                               else auto_rate(records, load_results(args.results)))
            lat = latency(spark, args.work_dir, bootstrap, args.latency_events, rate, rate_from, args)
            print(json.dumps(_rounded(lat)), flush=True)
            if not args.no_report:
                write_section("ingest", report(save_results(args.results, [], lat)), command=args.command,
                              path=args.benchmarks)
    finally:
        if spark is not None:
            spark.stop()
        subprocess.run(kafka_command("stop", args.work_dir / "kafka"), check=False, env=env)
    print(report({"throughput": {str(r["events"]): r for r in records}, "latency": lat, "earlier": {}}))


if __name__ == "__main__":
    main()
