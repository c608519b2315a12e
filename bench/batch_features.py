"""Benchmark: the per-day batch feature SQL on Spark (local, 2 cores) against DuckDB, the single-node reference,
on the same generated Parquet, at growing sizes.

The job is the shape of ``pipelines.features_batch`` and ``pipelines.daily_features`` over bronze-like events from
``pipelines.generator`` (MovieLens side files do not exist for generated ids, so the real job cannot run on them):

- ``item_day``: per (item, day) impressions, clicks, CTR, distinct users, and the trailing 7-day impressions and
  clicks (a window over day numbers);
- ``user_day``: per (user, day) events, clicks, distinct items, distinct sessions;
- ``field_vocab``: per categorical field c01..c26 (Criteo style) the values seen at least twice and their counts,
  the vocabulary build.

Both engines run the same SQL text (only the day-number expression differs) and write their results to Parquet;
the benchmark checks that they agree on row counts and click sums before it reports. It prints a table of wall
seconds per engine and size (generation excluded, the Parquet is generated once per size and cached under
``data/bench/``), and writes it to BENCHMARKS.md (section ``batch_features``)::

    .venv/bin/python -m bench.batch_features --sizes 1000000,10000000,30000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.report import write_section
from features.config import ROOT, PlatformConfig, SparkConfig
from pipelines.generator import CAT_COLUMNS, GeneratorConfig, write_parquet

DAY = {"spark": "datediff(event_date, DATE '1970-01-01')", "duckdb": "(event_date - DATE '1970-01-01')"}
#: Values of a field seen fewer times than this are left out of its vocabulary (they map to "unknown").
MIN_COUNT = 2


def feature_sql(engine: str) -> dict[str, str]:
    """The job's queries over the view ``events``, for ``engine`` ('spark' or 'duckdb')."""
    day = DAY[engine]
    vocab = " UNION ALL ".join(
        f"SELECT '{c}' AS field, {c} AS value, COUNT(*) AS n FROM events GROUP BY {c} HAVING COUNT(*) >= {MIN_COUNT}"
        for c in CAT_COLUMNS)
    return {
        "item_day": f"""
            WITH d AS (
              SELECT item_id, event_date, {day} AS day_no, COUNT(*) AS impressions, SUM(click) AS clicks,
                     COUNT(DISTINCT user_id) AS users
              FROM events GROUP BY item_id, event_date)
            SELECT item_id, event_date, impressions, clicks, clicks / impressions AS ctr, users,
                   SUM(impressions) OVER w AS impressions_7d, SUM(clicks) OVER w AS clicks_7d
            FROM d
            WINDOW w AS (PARTITION BY item_id ORDER BY day_no RANGE BETWEEN 6 PRECEDING AND CURRENT ROW)""",
        "user_day": """
            SELECT user_id, event_date, COUNT(*) AS events, SUM(click) AS clicks,
                   COUNT(DISTINCT item_id) AS items, COUNT(DISTINCT session_id) AS sessions
            FROM events GROUP BY user_id, event_date""",
        "field_vocab": vocab,
    }


def dataset(n: int, seed: int, root: Path) -> Path:
    """The generated Parquet for ``n`` events (cached: generated once)."""
    out = root / f"gen-{n}-{seed}"
    if not (out / "_SUCCESS").exists():
        shutil.rmtree(out, ignore_errors=True)
        gen = GeneratorConfig(n_events=n, seed=seed, n_users=max(1000, n // 20), n_items=max(1000, n // 50))
        start = time.perf_counter()
        write_parquet(gen, out)
        (out / "_SUCCESS").touch()
        print(f"generated {n:,} events in {time.perf_counter() - start:.1f} s -> {out}", flush=True)
    return out


def run_spark(spark, data: Path, out: Path) -> tuple[float, dict]:
    """Run the job on Spark; return (wall seconds, {query: (rows, clicks or n sum)})."""
    start = time.perf_counter()
    spark.read.parquet(str(data)).createOrReplaceTempView("events")
    for name, sql in feature_sql("spark").items():
        spark.sql(sql).write.mode("overwrite").parquet(str(out / name))
    wall = time.perf_counter() - start
    return wall, _summary_spark(spark, out)


def run_duckdb(data: Path, out: Path, threads: int, memory: str) -> tuple[float, dict]:
    """Run the job on DuckDB; return (wall seconds, {query: (rows, clicks or n sum)})."""
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}; SET memory_limit = '{memory}'; SET preserve_insertion_order = false")
    con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{data}/*.parquet')")
    for name, sql in feature_sql("duckdb").items():
        con.execute(f"COPY ({sql}) TO '{out / name}.parquet' (FORMAT parquet)")
    wall = time.perf_counter() - start
    summary = {name: tuple(con.execute(
        f"SELECT COUNT(*), SUM({'n' if name == 'field_vocab' else 'clicks'}) FROM '{out / name}.parquet'").fetchone())
        for name in feature_sql("duckdb")}
    con.close()
    return wall, summary


def _summary_spark(spark, out: Path) -> dict:
    from pyspark.sql import functions as F

    res = {}
    for name in feature_sql("spark"):
        col = "n" if name == "field_vocab" else "clicks"
        row = spark.read.parquet(str(out / name)).agg(F.count("*"), F.sum(col)).first()
        res[name] = (int(row[0]), int(row[1]))
    return res


def main(argv: list[str] | None = None) -> None:
    from pipelines.spark import get_spark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000,30000000", help="comma-separated event counts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--driver-memory", default="6g", help="Spark driver memory (local mode)")
    parser.add_argument("--no-report", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = PlatformConfig(spark=SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory=args.driver_memory))
    spark = get_spark(cfg, app_name="bench-batch-features")
    run_spark(spark, dataset(10_000, args.seed, args.work_dir), args.work_dir / "out-warmup")  # JIT, caches
    rows = []
    for n in sizes:
        data = dataset(n, args.seed, args.work_dir)
        size_mb = sum(f.stat().st_size for f in data.glob("*.parquet")) / 2**20
        load_before = os.getloadavg()[0]
        spark_s, spark_sum = run_spark(spark, data, args.work_dir / f"out-spark-{n}")
        duck_s, duck_sum = run_duckdb(data, args.work_dir / f"out-duckdb-{n}", threads=2, memory="6GB")
        load = (load_before, os.getloadavg()[0])
        if spark_sum != duck_sum:
            raise SystemExit(f"engines disagree at {n:,} events: spark {spark_sum} duckdb {duck_sum}")
        rows.append((n, size_mb, spark_s, duck_s, spark_sum, load))
        print(f"{n:>12,} events ({size_mb:,.0f} MiB): spark {spark_s:7.1f} s  duckdb {duck_s:7.1f} s  "
              f"ratio {spark_s / duck_s:5.1f}  rows {spark_sum}  load {load[0]:.1f} -> {load[1]:.1f}", flush=True)
        body = report(rows, args)  # after every size, so a long run that is stopped keeps what it measured
        if not args.no_report:
            write_section("batch_features", body, command=f"python -m bench.batch_features --sizes {args.sizes}")
    spark.stop()
    print(body)


def _commit() -> str:
    """The checkout's short commit hash (``+dirty`` when it has uncommitted changes), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench", "pipelines", "features"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(rows: list[tuple], args) -> str:
    """The Markdown table and note for the sizes measured so far."""
    base = rows[0]
    table = ["| events | Parquet MiB | Spark s | DuckDB s | Spark / DuckDB | Spark s per 1M | DuckDB s per 1M | "
             "item-day rows | user-day rows | vocab rows | load avg 1 min (before -> after) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, mb, s, d, summ, load in rows:
        table.append(f"| {n:,} | {mb:,.0f} | {s:.1f} | {d:.1f} | {s / d:.1f} | {s / n * 1e6:.2f} | "
                     f"{d / n * 1e6:.2f} | {summ['item_day'][0]:,} | {summ['user_day'][0]:,} | "
                     f"{summ['field_vocab'][0]:,} | {load[0]:.1f} -> {load[1]:.1f} |")
    note = (f"\nSame SQL (item-day with a 7-day window, user-day, 26-field vocabularies) on the same generated "
            f"Parquet (`pipelines.generator`, seed {args.seed}, users = n/20, items = n/50); Spark local[2] with "
            f"{args.driver_memory} driver memory, DuckDB 2 threads, 6 GB; results written to Parquet by both and "
            f"checked equal (row counts, click sums). Cost growth from {base[0]:,} events: Spark x"
            f"{rows[-1][2] / base[2]:.1f}, DuckDB x{rows[-1][3] / base[3]:.1f} for x{rows[-1][0] / base[0]:.0f} "
            f"the events. Commit {_commit()}. The machine (2 logical CPUs) is shared with other jobs: the load "
            f"average column says how busy it was, so absolute seconds are upper bounds.")
    return "\n".join(table) + "\n" + note

if __name__ == "__main__":
    main()
