"""Serving benchmark: ``python -m bench.serving_load`` (``make bench-serving``).

1. Starts ``python -m serving.app`` on 127.0.0.1 over the demo's artifacts (``artifacts/demo``, ``data/lake``; read
   only), waits for ``/health``, then for each of ``/similar-items`` and ``/recommend`` sends a fixed number of
   requests at fixed concurrency from an asyncio httpx client (loopback only; ids drawn with a fixed seed from
   the known users/items, 5% unknown to exercise the fallback) after a warm-up. Reports p50/p99 latency
   (milliseconds, client side), throughput (requests/s) and errors (non-200 or transport errors). A third run of
   ``/similar-items`` has a forced hot swap (``POST /admin/reload?force=true``: a whole new bundle built and swapped
   in) in the middle of it: its errors say whether a reload drops requests.
2. ANN recall@10 on the demo's exported embeddings, measured as at export (every item once as a query, exact
   cosine as the reference): HNSW with its saved parameters, and random-hyperplane LSH (Charikar 2002) at a few
   (tables, bits) settings, with the mean candidates LSH scores per query.

Writes the ``serving`` section of BENCHMARKS.md. Client and server share the machine's CPUs, so the figures are a
lower bound on what the server alone does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import write_section
from features.config import ROOT, load_config

ENDPOINTS = ("/similar-items", "/recommend")
LSH_SETTINGS = ((8, 8), (16, 8), (16, 6), (32, 10))  # (tables, bits)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str:
    """Short commit of the checkout, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def load_with_reload(base: str, ids: list[int], concurrency: int, k: int) -> dict:
    """``/similar-items`` load with a forced reload (hot swap) posted once the load is under way; the load goes on
    until the reload has answered (and every id was sent once). Adds ``reload_s`` (seconds the reload call took)
    and ``reload`` (its answer) to ``load``'s figures."""
    import httpx

    done = asyncio.Event()

    async def reload() -> tuple[float, dict]:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            t0 = time.perf_counter()
            r = await client.post("/admin/reload", params={"force": "true"})
            done.set()
            return time.perf_counter() - t0, r.json()

    figures, (reload_s, answer) = await asyncio.gather(
        load(base, "/similar-items", "item_id", ids, concurrency, k, until=done), reload())
    return {**figures, "reload_s": reload_s, "reload": answer}


def start_service(port: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "serving.app", "--host", "127.0.0.1", "--port", str(port),
                             "--threads", str(threads)], env=env, cwd=ROOT)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            return httpx.get(f"{base}/health", timeout=2).json()
        except httpx.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"service did not become healthy within {timeout_s} s (exit {proc.poll()})")
            time.sleep(0.5)


async def load(base: str, path: str, param: str, ids: list[int], concurrency: int, k: int,
               until: asyncio.Event | None = None) -> dict:
    """Send one request per id with ``concurrency`` in flight; latencies in seconds. With ``until``, the ids are
    sent again in a cycle until that event is set and all of them have been sent at least once."""
    import itertools

    import httpx

    lat, errors = [], 0
    source = itertools.cycle(ids) if until is not None else iter(ids)

    def more() -> bool:
        return until is None or not until.is_set() or len(lat) < len(ids)

    async def worker(client) -> None:
        nonlocal errors
        while more() and (i := next(source, None)) is not None:
            t0 = time.perf_counter()
            try:
                r = await client.get(path, params={param: i, "k": k})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            lat.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "concurrency": concurrency, "errors": int(errors), "wall_s": wall,
            "throughput_rps": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def draw_ids(known: list[int], n: int, seed: int, unknown_frac: float = 0.05) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.asarray(known), size=n).tolist()
    for j in rng.choice(n, size=int(n * unknown_frac), replace=False):
        ids[j] = 10_000_000 + int(j)                                   # not a MovieLens id: fallback path
    return [int(i) for i in ids]


def _per_query_us(index, vectors: np.ndarray, k: int = 10) -> float:
    """Microseconds per query of ``index.search`` alone, one query at a time (as the service calls it)."""
    t0 = time.perf_counter()
    for row in vectors:
        index.search(row[None, :], k)
    return (time.perf_counter() - t0) / len(vectors) * 1e6


def recall_figures(cfg) -> list[dict]:
    import faiss

    from serving.ann import ItemIndex, measure_recall
    from serving.embeddings import INDEX_FILE, PARQUET_FILE, embeddings_dir, read_exported
    from serving.lsh import LshIndex, LshParams, measure_lsh_recall

    faiss.omp_set_num_threads(1)
    rows = []
    for model in ("item2vec", "deepfm"):
        d = embeddings_dir(cfg, model)
        if not (d / INDEX_FILE).exists():
            continue
        table, vectors = read_exported(d / PARQUET_FILE)
        ids = table.column("item_idx").to_numpy().astype(np.int64)
        index = ItemIndex.load(d / INDEX_FILE)
        r = measure_recall(index, vectors, ids, k=10)
        rows.append({"model": model, "method": f"HNSW M={index.params.m} efSearch={index.ef_search}",
                     "recall@10": r, "candidates": None, "query_us": _per_query_us(index, vectors),
                     "items": len(ids)})
        for tables, bits in LSH_SETTINGS:
            lsh = LshIndex.build(vectors, ids, LshParams(n_tables=tables, n_bits=bits, seed=0))
            r = measure_lsh_recall(lsh, vectors, ids, k=10)
            rows.append({"model": model, "method": f"LSH T={tables} H={bits}", "recall@10": r,
                         "candidates": lsh.mean_candidates(vectors), "query_us": _per_query_us(lsh, vectors),
                         "items": len(ids)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per endpoint")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads in the server")
    p.add_argument("--port", type=int, default=28080, help="loopback port of the service (0: any free port)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    cfg = load_config()

    from serving.bundle import _load_lake
    from serving.embeddings import PARQUET_FILE, embeddings_dir, read_exported

    users = sorted(_load_lake(cfg)[0])
    items = read_exported(embeddings_dir(cfg, "item2vec") / PARQUET_FILE)[0].column("item_id").to_pylist()
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = start_service(port, args.threads)
    try:
        health = wait_healthy(base, proc)
        startup_s = time.perf_counter() - t0
        results, load_before = {}, os.getloadavg()[0]
        for path, param, known, seed in (("/similar-items", "item_id", items, 1), ("/recommend", "user_id", users, 2)):
            asyncio.run(load(base, path, param, draw_ids(known, 100, seed + 100), args.concurrency, args.k))
            results[path] = asyncio.run(load(base, path, param, draw_ids(known, args.requests, seed),
                                             args.concurrency, args.k))
            print(path, json.dumps(results[path]), flush=True)
        swap = asyncio.run(load_with_reload(base, draw_ids(items, args.requests, 3), args.concurrency, args.k))
        print("hot swap", json.dumps(swap), flush=True)
        load_after = os.getloadavg()[0]
        import httpx

        metrics = httpx.get(f"{base}/metrics").text
        server_5xx = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                         if ln.startswith("recsys_requests_total") and 'status="5' in ln)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    recall = recall_figures(cfg)
    for r in recall:
        print(json.dumps(r))

    lines = [f"Service `python -m serving.app` on 127.0.0.1 over the demo's artifacts, version "
             f"`{health['model_version']}` ({health['items']} items, {health['users']} users); start-up to healthy "
             f"{startup_s:.1f} s. {args.requests} requests per endpoint at concurrency {args.concurrency} from an "
             f"asyncio httpx client on the same machine (5% unknown ids -> popularity fallback), after 100 "
             f"warm-up requests; k = {args.k}; server torch/faiss threads = {args.threads}. Latency is client-side. "
             f"Commit {_commit()}. 1-minute load average {load_before:.2f} before and {load_after:.2f} after the "
             f"load on {os.cpu_count()} CPUs"
             + (" (client and server only: the load is the benchmark's own)." if load_before < 1.5 else
                " (other jobs were running): read the latencies as an upper bound."),
             "", "| endpoint | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = {**{f"`{path}`": r for path, r in results.items()},
            "`/similar-items` during a hot swap (`POST /admin/reload?force=true`)": swap}
    for label, r in rows.items():
        lines.append(f"| {label} | {r['requests']} | {r['errors']} | {r['throughput_rps']:.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    lines += ["", f"Hot swap: the reload built and swapped in a whole new bundle in {swap['reload_s']:.1f} s "
              f"(answer `{swap['reload']['decision']}`, serving `{swap['reload']['model_version']}`) while the "
              f"requests above were answered; server-side 5xx counted by `/metrics` over all runs: "
              f"{server_5xx:.0f}.", "",
              "ANN recall@10 against exact cosine search, every exported item once as a query (as `serving.export` "
              "measures it); LSH = random-hyperplane hashing (Charikar 2002), T tables of H bits, bucket-mates "
              "re-ranked exactly (numpy, one query at a time); time per query of the search alone, single-threaded, "
              "same machine load.", "",
              "| model | method | recall@10 | candidates / query | time / query (µs) |", "|---|---|---:|---:|---:|"]
    for r in recall:
        cand = "n/a (graph walk)" if r["candidates"] is None else f"{r['candidates']:.0f} of {r['items']}"
        lines.append(f"| {r['model']} | {r['method']} | {r['recall@10']:.3f} | {cand} | {r['query_us']:.0f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("serving", body, command="make bench-serving  # python -m bench.serving_load")
    return 0 if all(r["errors"] == 0 for r in (*results.values(), swap)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
