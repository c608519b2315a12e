"""Serving benchmark: ``python -m bench.serving_load`` (``make bench-serving``; run ``make demo`` first).

1. Starts ``python -m serving.app`` on 127.0.0.1 over the demo's artifacts (read only) and times its start-up to a
   healthy ``/health``. Then the load generator ``wrk`` (Debian package, installed here when missing) sends, at 64
   keep-alive connections for 20 s after a warm-up, ``GET /similar-items`` with random known item ids and
   ``GET /recommend`` with random known user ids; a third run of ``/similar-items`` has a forced hot swap
   (``POST /admin/reload?force=true``: a whole new bundle built and swapped in) two seconds into it. The server's
   own 5xx count is read from ``/metrics`` afterwards.
2. In the same run, the same load on ``/similar-items`` against ``python -m bench.plain_serving``: a plain FastAPI
   app doing the same HNSW lookup over the same embeddings, JSON out, on the same uvicorn settings. The ratio of
   the two req/s is what the service's bundle, metrics, response models and fallback cost.
3. ANN recall@10 on the demo's exported embeddings, measured as at export (every item once as a query, exact
   cosine as the reference): HNSW with its saved parameters, and random-hyperplane LSH (Charikar 2002) at a few
   (tables, bits) settings, with the mean candidates LSH scores per query.

The raw figures (commit, UTC time, settings, load average) go to ``bench/results/serving.json``; the ``serving``
section of BENCHMARKS.md is rendered from that file (``--render`` re-renders it alone), with the targets below
marked met or not. Client and server share the machine's CPUs, so the figures are a lower bound on what the server
alone does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.report import machine, write_section
from features.config import ROOT, load_config

RESULTS = ROOT / "bench" / "results" / "serving.json"
# Targets (issue "Speed at the edges"): checked in the rendered table, never in a timed test.
SIMILAR_RATIO = 0.8       # /similar-items req/s against the plain app's, same run
SIMILAR_P99_MS = 50.0
RECOMMEND_RPS = 300.0
RECOMMEND_P99_MS = 150.0
STARTUP_S = 5.0           # launch to a healthy /health on the demo's artifacts
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


WRK_SCRIPT = """
local ids = {%(ids)s}
local n = 0
math.randomseed(%(seed)d)
request = function()
  n = n + 1
  return wrk.format("GET", "%(path)s?%(param)s=" .. ids[math.random(#ids)] .. "&k=%(k)d")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, ' ..
    '"connect_errors": %%d, "read_errors": %%d, "write_errors": %%d, "timeouts": %%d, "p50_us": %%d, ' ..
    '"p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n', summary.requests, summary.duration,
    e.status, e.connect, e.read, e.write, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


class LoadGeneratorError(RuntimeError):
    """``wrk`` is missing and cannot be installed, or its output has no summary line."""


def ensure_wrk() -> str:
    """The path of ``wrk`` (Debian package ``wrk``), installed with apt-get when missing and this is root.

    Raises:
        LoadGeneratorError: not installed and not installable here.
    """
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install wrk) ...", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(cmd, check=False, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                           stdout=subprocess.DEVNULL)
        path = shutil.which("wrk")
    if not path:
        raise LoadGeneratorError("the load generator wrk is not installed: `sudo apt-get install wrk`")
    return path


def wrk_command(wrk: str, base: str, path: str, param: str, ids: list[int], seed: int, k: int, connections: int,
                duration_s: float, threads: int, folder: Path) -> list[str]:
    """The ``wrk`` command line that sends ``GET path?param=<id>&k=k``, each id drawn at random from ``ids``, for
    ``duration_s`` seconds over ``connections`` keep-alive connections; its Lua ``done`` prints one ``WRK_JSON``
    line (latencies in microseconds, as wrk measures them: from the request's write to the response's end)."""
    script = folder / f"load-{param}-{seed}.lua"
    script.write_text(WRK_SCRIPT % {"ids": ",".join(map(str, ids)), "seed": seed, "path": path, "param": param,
                                    "k": k})
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "-s", str(script),
            base]


def parse_wrk(stdout: str) -> dict:
    """The figures of a ``wrk_command`` run: requests, errors (non-2xx/3xx plus socket errors), throughput_rps,
    p50_ms, p90_ms, p99_ms, max_ms, mean_ms.

    >>> parse_wrk('x\\nWRK_JSON {"requests": 2000, "duration_us": 2000000, "status_errors": 1, "connect_errors": 0, '
    ...           '"read_errors": 0, "write_errors": 0, "timeouts": 0, "p50_us": 1500, "p90_us": 2000, '
    ...           '"p99_us": 4000, "max_us": 9000, "mean_us": 1600.0}')["throughput_rps"]
    1000.0

    Raises:
        LoadGeneratorError: no ``WRK_JSON`` line.
    """
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise LoadGeneratorError(f"wrk printed no summary:\n{stdout[-2000:]}")
    r = json.loads(line[len("WRK_JSON "):])
    errors = r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
    return {"requests": r["requests"], "errors": errors, "status_errors": r["status_errors"],
            "socket_errors": errors - r["status_errors"], "wall_s": r["duration_us"] / 1e6,
            "throughput_rps": r["requests"] / (r["duration_us"] / 1e6),
            **{f"{q}_ms": r[f"{q}_us"] / 1e3 for q in ("p50", "p90", "p99", "max", "mean")}}


def run_wrk(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return parse_wrk(out.stdout + out.stderr)


def wrk_with_reload(cmd: list[str], base: str, after_s: float = 2.0) -> dict:
    """``run_wrk`` with a forced hot swap (``POST /admin/reload?force=true``: a whole new bundle built and swapped
    in) posted ``after_s`` seconds into the load; adds ``reload_s`` and the reload's answer."""
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(after_s)
    t0 = time.perf_counter()
    answer = httpx.post(f"{base}/admin/reload", params={"force": "true"}, timeout=300).json()
    reload_s = time.perf_counter() - t0
    out, _ = proc.communicate()
    return {**parse_wrk(out), "reload_s": reload_s, "reload": answer}


def start_service(port: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "serving.app", "--host", "127.0.0.1", "--port", str(port),
                             "--threads", str(threads)], env=env, cwd=ROOT)


def start_plain(port: int, threads: int, embeddings: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "bench.plain_serving", "--dir", str(embeddings), "--port",
                             str(port), "--threads", str(threads)], env=env, cwd=ROOT)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> dict:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.get(f"{base}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"service did not become healthy within {timeout_s} s (exit {proc.poll()})")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def draw_ids(known: list[int], n: int, seed: int, unknown_frac: float = 0.0) -> list[int]:
    """``n`` ids drawn with replacement from ``known``; a fraction ``unknown_frac`` replaced by ids no data set
    holds (the popularity fallback's path)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.asarray(known), size=n).tolist()
    for j in rng.choice(n, size=int(n * unknown_frac), replace=False):
        ids[j] = 10_000_000 + int(j)
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


def measure(args, cfg) -> dict:
    """One benchmark run (see the module docstring); the figures as stored in ``RESULTS``."""
    from serving.bundle import _load_lake
    from serving.embeddings import PARQUET_FILE, embeddings_dir, read_exported

    wrk = ensure_wrk()
    retrieval = cfg.models.retrieval
    embeddings = embeddings_dir(cfg, retrieval)
    users = sorted(_load_lake(cfg)[0])
    items = read_exported(embeddings / PARQUET_FILE)[0].column("item_id").to_pylist()
    item_ids, user_ids = draw_ids(items, 5000, 1), draw_ids(users, 5000, 2)
    load_before = os.getloadavg()
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def cmd(base, path, param, ids, seed, duration_s):
            return wrk_command(wrk, base, path, param, ids, seed, args.k, args.connections, duration_s,
                               args.wrk_threads, folder)

        port = args.port or _free_port()
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        proc = start_service(port, args.threads)
        try:
            health = wait_healthy(base, proc)
            startup_s = time.perf_counter() - t0
            for name, path, param, ids, seed in (("similar_items", "/similar-items", "item_id", item_ids, 11),
                                                 ("recommend", "/recommend", "user_id", user_ids, 12)):
                run_wrk(cmd(base, path, param, ids, seed + 100, args.warmup_s))
                runs[name] = run_wrk(cmd(base, path, param, ids, seed, args.duration_s))
                print(name, json.dumps(runs[name]), flush=True)
            runs["similar_items_hot_swap"] = wrk_with_reload(
                cmd(base, "/similar-items", "item_id", item_ids, 13, args.duration_s), base)
            print("hot swap", json.dumps(runs["similar_items_hot_swap"]), flush=True)
            import httpx

            metrics = httpx.get(f"{base}/metrics").text
            server_5xx = sum(float(ln.split()[-1]) for ln in metrics.splitlines()
                             if ln.startswith("recsys_requests_total") and 'status="5' in ln)
        finally:
            stop(proc)
        plain_port = _free_port()
        plain_base = f"http://127.0.0.1:{plain_port}"
        t0 = time.perf_counter()
        proc = start_plain(plain_port, args.threads, embeddings)
        try:
            wait_healthy(plain_base, proc)
            plain_startup_s = time.perf_counter() - t0
            run_wrk(cmd(plain_base, "/similar-items", "item_id", item_ids, 111, args.warmup_s))
            runs["plain_similar_items"] = run_wrk(cmd(plain_base, "/similar-items", "item_id", item_ids, 11,
                                                      args.duration_s))
            print("plain", json.dumps(runs["plain_similar_items"]), flush=True)
        finally:
            stop(proc)
    return {"commit": _commit(), "measured_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "settings": {"connections": args.connections, "duration_s": args.duration_s,
                         "warmup_s": args.warmup_s, "wrk_threads": args.wrk_threads, "server_threads": args.threads,
                         "k": args.k, "retrieval": retrieval, "ranker": cfg.models.ranker,
                         "load_generator": subprocess.run([wrk, "-v"], capture_output=True, text=True
                                                          ).stdout.splitlines()[0:1]},
            "service": {"model_version": health["model_version"], "items": health["items"],
                        "users": health["users"], "startup_s": startup_s, "plain_startup_s": plain_startup_s,
                        "server_5xx": server_5xx},
            "runs": runs, "recall": recall_figures(cfg)}


def render(r: dict) -> str:
    """The BENCHMARKS.md section of a stored result (``RESULTS``)."""
    s, svc, runs = r["settings"], r["service"], r["runs"]
    ours, plain, rec = runs["similar_items"], runs["plain_similar_items"], runs["recommend"]
    ratio = ours["throughput_rps"] / plain["throughput_rps"]
    errors = sum(x["errors"] for x in runs.values())
    load = r["load_before"][0]

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [f"`wrk` ({(s['load_generator'] or ['?'])[0]}), {s['wrk_threads']} thread, {s['connections']} "
             f"keep-alive connections, {s['duration_s']:g} s per row after {s['warmup_s']:g} s of warm-up, on "
             f"loopback against `python -m serving.app` (retrieval `{s['retrieval']}`, ranker `{s['ranker']}`, "
             f"version `{svc['model_version']}`: {svc['items']} items, {svc['users']} users) and, in the same run, "
             f"against `python -m bench.plain_serving` (a plain FastAPI app: the same HNSW index file over the same "
             f"embeddings, JSON out). Ids drawn at random from the known items / users; k = {s['k']}; server "
             f"torch/faiss threads = {s['server_threads']}; both served by uvicorn, one process. Latency as wrk "
             f"measures it. Client and server share the machine ({r['machine']}). Commit {r['commit']}, "
             f"{r['measured_utc']}; 1-minute load average {load:.2f} before the run"
             + (" (the machine to itself)." if load < 1.0 else " (other jobs were running: read it as a lower "
                                                                "bound)."),
             "", "| target | requests | errors | req/s | p50 (ms) | p99 (ms) | max (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, x in (("`/similar-items`, this service", ours), ("`/similar-items`, plain FastAPI app", plain),
                     ("`/recommend`, this service", rec),
                     ("`/similar-items` during a hot swap (`POST /admin/reload?force=true`)",
                      runs["similar_items_hot_swap"])):
        lines.append(f"| {label} | {x['requests']} | {x['errors']} | {x['throughput_rps']:.0f} | "
                     f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['max_ms']:.0f} |")
    swap = runs["similar_items_hot_swap"]
    lines += ["", "| target (`bench/serving_load.py`) | measured | |", "|---|---:|---|",
              f"| `/similar-items` req/s >= {SIMILAR_RATIO:.1f}x the plain app's | {ratio:.2f}x | "
              f"{met(ratio >= SIMILAR_RATIO)} |",
              f"| `/similar-items` p99 <= {SIMILAR_P99_MS:.0f} ms | {ours['p99_ms']:.1f} ms | "
              f"{met(ours['p99_ms'] <= SIMILAR_P99_MS)} |",
              f"| `/recommend` >= {RECOMMEND_RPS:.0f} req/s | {rec['throughput_rps']:.0f} | "
              f"{met(rec['throughput_rps'] >= RECOMMEND_RPS)} |",
              f"| `/recommend` p99 <= {RECOMMEND_P99_MS:.0f} ms | {rec['p99_ms']:.1f} ms | "
              f"{met(rec['p99_ms'] <= RECOMMEND_P99_MS)} |",
              f"| 0 errors and 0 5xx, hot swap included | {errors} errors, {svc['server_5xx']:.0f} 5xx | "
              f"{met(errors == 0 and not svc['server_5xx'])} |",
              f"| healthy within {STARTUP_S:.0f} s of launch | {svc['startup_s']:.1f} s (plain app "
              f"{svc['plain_startup_s']:.1f} s) | {met(svc['startup_s'] <= STARTUP_S)} |",
              "", f"Hot swap: the reload built and swapped in a whole new bundle in {swap['reload_s']:.1f} s (answer "
              f"`{swap['reload']['decision']}`, serving `{swap['reload']['model_version']}`) under the load above.",
              "", "ANN recall@10 against exact cosine search, every exported item once as a query (as "
              "`serving.export` measures it); LSH = random-hyperplane hashing (Charikar 2002), T tables of H bits, "
              "bucket-mates re-ranked exactly (numpy, one query at a time); time per query of the search alone, "
              "single-threaded.", "",
              "| model | method | recall@10 | candidates / query | time / query (µs) |", "|---|---|---:|---:|---:|"]
    for x in r["recall"]:
        cand = "n/a (graph walk)" if x["candidates"] is None else f"{x['candidates']:.0f} of {x['items']}"
        lines.append(f"| {x['model']} | {x['method']} | {x['recall@10']:.3f} | {cand} | {x['query_us']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections")
    p.add_argument("--duration-s", type=float, default=20.0, help="seconds of load per row")
    p.add_argument("--warmup-s", type=float, default=3.0, help="seconds of load before each measured row")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the client's CPU share)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch/faiss threads in each server")
    p.add_argument("--port", type=int, default=28080, help="loopback port of the service (0: any free port)")
    p.add_argument("--render", action="store_true", help=f"only render BENCHMARKS.md from {RESULTS.name}")
    p.add_argument("--no-write", action="store_true", help="print only; leave the results file and BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(RESULTS.read_text())
    else:
        result = measure(args, load_config())
        if not args.no_write:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    body = render(result)
    print(body)
    if not args.no_write:
        write_section("serving", body, command="make bench-serving  # python -m bench.serving_load")
    return 0 if all(x["errors"] == 0 for x in result["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
