"""Benchmark: this project's DeepFM (and DIN, once ``training.train`` has it) against DeepCTR-Torch 0.3.0 and
RecBole 1.2.1, and its item2vec against gensim's Word2Vec, on the same data, features and model sizes.

    python -m bench.models [--work DIR] [--uv PATH] [--skip-peers]      (make bench-models)

One run, side by side, on the lake's Parquet exports (MovieLens-100K, global 80/10/10 time split, copied into a
scratch lake under ``--work``; the project's ``data/`` and ``artifacts/`` are never written):

- DeepFM: ours (``python -m training.train --model deepfm``, Ray Train + TorchRec, 1 and 2 workers of 1 CPU) and
  the peers (``bench/peers.py`` in their own environment, one torch thread) with embedding dim 16, MLP (128, 64),
  dropout 0.2, batch 2048, up to 12 epochs, early stopping after 2 epochs without a higher validation AUC; test
  AUC / logloss of the best epoch. Optimisers are each model's own: ours row-wise Adagrad (lr 0.05) on the tables
  and AdamW (1e-3) on the dense layers; the peers Adam (1e-3) on everything, their default.
- item2vec: ours (1 worker) against gensim ``Word2Vec(sg=1)`` with the same window (5), dim (32), negatives (5),
  subsampling (1e-3) and epochs (8) on the same ``item_sequences``; both scored by one next-item protocol, HR@10 on
  the positive test events (``serving.replay``'s cases and history query, exact search instead of the ANN index).

Per model: training samples/s (optimisation passes only), test AUC, logloss, peak RSS (MiB, summed over the
process tree and sampled every 0.2 s; Ray's own processes count for ours), wall s and CPU s of the whole command.
The figures go to the ``models`` section of ``BENCHMARKS.md``.

The peers' environment is built on first use, like the Makefile's: ``uv`` installs
``bench/requirements-peers.lock`` (``--no-deps``) into ``~/.cache/recsys-platform/venv-peers-<hash of the lock>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.report import write_section
from features.config import ROOT, PlatformConfig, load_config

HERE = Path(__file__).resolve().parent
PEERS_LOCK = HERE / "requirements-peers.lock"
CACHE = Path(os.environ.get("CACHE", Path.home() / ".cache" / "recsys-platform"))
COMMAND = "make bench-models"

DEEPFM = {"epochs": 12, "batch_size": 2048, "embedding_dim": 16, "patience": 2}
ITEM2VEC = {"epochs": 8, "batch_size": 4096, "embedding_dim": 32, "window": 5, "negatives": 5, "subsample": 1e-3}


# --------------------------------------------------------------------------------------------- environment
def peers_python(uv: str) -> Path:
    """The peers' interpreter, building their environment from ``bench/requirements-peers.lock`` if needed.

    Raises:
        subprocess.CalledProcessError: uv could not create or install it (the message of uv is printed).
    """
    digest = hashlib.sha256(PEERS_LOCK.read_bytes()).hexdigest()[:16]
    env = CACHE / f"venv-peers-{digest}"
    if not (env / ".complete").exists():
        print(f"building the peers' environment from {PEERS_LOCK.name} in {env}", flush=True)
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([uv, "venv", "-q", "--python", f"{sys.version_info[0]}.{sys.version_info[1]}", str(env)],
                       check=True)
        subprocess.run([uv, "pip", "install", "-q", "-p", str(env), "--no-deps", "-r", str(PEERS_LOCK)], check=True)
        (env / ".complete").touch()
    return env / "bin" / "python"


# ------------------------------------------------------------------------------------------------ measuring
def _tree(root: int) -> dict[int, tuple[int, float]]:
    """``root`` and all its descendants (from /proc): pid -> (resident bytes, CPU s used so far, user + sys)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo, page, tick = {}, [root], os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            out[pid] = (rss, (int(stat[11]) + int(stat[12])) / tick)  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(pid, [])
    return out


@dataclass
class Measured:
    """One command's cost: wall s, CPU s (user + sys summed over every process of its tree, each at its last
    sample; ``wait4``'s rusage misses Ray's processes, which their raylet, not the command, reaps), peak RSS MiB of
    the process tree (sampled) and of its largest single reaped process (``ru_maxrss``)."""

    rc: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    max_process_rss_mib: float
    log: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, interval_s: float = 0.2) -> Measured:
    """Run ``cmd`` (output to ``log``) while sampling its process tree's RSS."""
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        peak, cpu, done = 0, {}, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                tree = _tree(proc.pid)
                peak = max(peak, sum(rss for rss, _ in tree.values()))
                cpu.update({pid: c for pid, (_, c) in tree.items()})
                done.wait(interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    cpu_s = max(sum(cpu.values()), usage.ru_utime + usage.ru_stime)
    return Measured(proc.returncode, wall, cpu_s, peak / 2**20, usage.ru_maxrss / 1024, str(log),
                    {"cpu_sampled": True})


# ----------------------------------------------------------------------------------------------- our models
def _env(work: Path, tag: str, workers: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RECSYS_DATA_DIR": str(work / "data"),
            "RECSYS_ARTIFACTS_DIR": str(work / f"artifacts-{tag}"), "RECSYS_TRAIN__NUM_WORKERS": str(workers),
            "RECSYS_RUN_NAME": "bench"}


#: Ray's head node gives its raylet 30 s (hard-coded) to register; on an overloaded machine it may not.
RAY_START_TIMEOUT = "The current node timed out during startup"


def run_ours(model: str, work: Path, workers: int, opts: dict, attempts: int = 3) -> tuple[Measured, dict]:
    """``python -m training.train --model <model>`` on the scratch lake; returns its cost and stage result. A run
    whose Ray node timed out during start-up is retried (``attempts`` in all); ``extra["attempts"]`` says how many
    it took."""
    tag = f"{model}-w{workers}"
    cmd = [sys.executable, "-m", "training.train", "--model", model, "--epochs", str(opts["epochs"]),
           "--batch-size", str(opts["batch_size"]), "--embedding-dim", str(opts["embedding_dim"])]
    for attempt in range(1, attempts + 1):
        shutil.rmtree(work / f"artifacts-{tag}", ignore_errors=True)
        m = run_measured(cmd, _env(work, tag, workers), work / f"{tag}.log")
        if m.rc == 0 or RAY_START_TIMEOUT not in Path(m.log).read_text():
            break
        print(f"  Ray's node timed out during start-up (attempt {attempt}/{attempts})", flush=True)
        time.sleep(15 * attempt)  # let the machine's load settle
    m.extra["attempts"] = attempt
    stage = work / f"artifacts-{tag}" / "bench" / "stages" / f"train_{model}.json"
    result = json.loads(stage.read_text()) if m.rc == 0 and stage.exists() else {}
    m.extra["model_dir"] = str(work / f"artifacts-{tag}" / "bench" / "models" / model)
    return m, result


def run_peer(python: Path, peer: str, work: Path, args: list[str], tag: str = "") -> tuple[Measured, dict]:
    tag = tag or peer
    out = work / f"{tag}.json"
    out.unlink(missing_ok=True)
    cmd = [str(python), "-W", "ignore", str(HERE / "peers.py"), peer, "--lake", str(work / "data" / "lake"),
           "--out", str(out), "--work", str(work / tag), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    m = run_measured(cmd, env, work / f"{tag}.log")
    return m, (json.loads(out.read_text()) if m.rc == 0 and out.exists() else {})


# ---------------------------------------------------------------------------------------- next-item HR@10
def next_item_hr(lake_cfg: PlatformConfig, tables: dict[str, np.ndarray], k: int = 10, n_recent: int = 15) -> dict:
    """HR@k / NDCG@k of item embeddings on the positive test events, by ``serving.replay``'s protocol (query = mean
    of the normalised embeddings of the user's ``n_recent`` last items before the event; history items and item 0
    never recommended; cold cases take the popularity list) with exact inner-product search over all items.

    Args:
        tables: name -> (items, D) embeddings, row = item_idx.
    """
    from serving.ranking_metrics import hit_rate, ndcg
    from serving.replay import build_cases, build_log, first_k_allowed, history_queries, item_matrix, \
        popularity_recs, read_samples

    samples = read_samples(lake_cfg)
    cases, log_ = build_cases(samples["test"]), build_log(list(samples.values()))
    n_items = max(t.shape[0] for t in tables.values())
    pop = popularity_recs(cases, log_, k, n_items)
    out = {"popularity": {f"hr@{k}": hit_rate(pop, cases.target, k), f"ndcg@{k}": ndcg(pop, cases.target, k)}}
    for name, table in tables.items():
        matrix = item_matrix(np.arange(table.shape[0]), table)  # (R, D) normalised
        queries, cold = history_queries(cases.hist, matrix, n_recent)  # (B, D)
        scores = queries @ matrix.T  # (B, R)
        scores[:, 0] = -np.inf
        n_cand = min(k + cases.hist.shape[1] + 1, matrix.shape[0])
        cands = np.argsort(-scores, axis=1, kind="stable")[:, :n_cand]  # (B, C) best first
        recs = np.where(cold[:, None], pop, first_k_allowed(cands, cases.hist, k))
        out[name] = {f"hr@{k}": hit_rate(recs, cases.target, k), f"ndcg@{k}": ndcg(recs, cases.target, k),
                     "cold_cases": int(cold.sum())}
    out["cases"] = len(cases)
    return out


def our_pairs(lake_dir: Path, opts: dict, seed: int = 0) -> int:
    """Skip-gram pairs our sampler draws over all epochs (as ``training.train`` seeds it): the work gensim does on
    the same sequences with the same window and subsampling, which gensim does not count itself."""
    from training.data import item_counts, keep_probabilities, read_item_sequences, read_vocab_sizes, \
        skipgram_pairs

    seqs = read_item_sequences(lake_dir)
    keep = keep_probabilities(item_counts(seqs, read_vocab_sizes(lake_dir)["item"]), opts["subsample"])
    return sum(len(skipgram_pairs(seqs, opts["window"], np.random.default_rng(seed * 1000 + e), keep)[0])
               for e in range(opts["epochs"]))


# ------------------------------------------------------------------------------------------------ reporting
def _f(v, fmt: str = ",.0f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _rss(r: dict) -> str:
    """Peak RSS of the tree (sampled; at least the largest reaped process's exact peak) / of the largest process."""
    tree, largest = r.get("peak_rss_mib"), r.get("max_process_rss_mib")
    return f"{_f(max(tree or 0, largest or 0) or None)} / {_f(largest)}"


def _cpu(r: dict) -> str:
    """CPU s, or n/a for a Ray run measured before the tree sampling counted CPU (rusage missed Ray's workers)."""
    if r["impl"].startswith("ours") and not r.get("cpu_sampled"):
        return "n/a"
    return _f(r.get("cpu_s"), ".1f")


def ctr_table(rows: list[dict], refs: dict[str, float]) -> str:
    head = ("| model | implementation | train samples/s | vs ours (1 worker) | test AUC | test logloss | "
            "epochs (best) | peak RSS MiB (tree / largest process) | wall s | CPU s |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        sps, ref = r.get("train_samples_per_s"), refs.get(r["model"])
        ratio = f"{sps / ref:.2f}x" if sps and ref else "n/a"
        lines.append(f"| {r['model']} | {r['impl']} | {_f(sps)} | {ratio} | {_f(r.get('test_auc'), '.4f')} | "
                     f"{_f(r.get('test_logloss'), '.4f')} | {r.get('epochs', 'n/a')} ({r.get('best_epoch', 'n/a')}) | "
                     f"{_rss(r)} | "
                     f"{_f(r.get('wall_s'), '.1f')} | {_cpu(r)} |")
    return head + "\n".join(lines)


def i2v_table(rows: list[dict], ref: float | None) -> str:
    head = ("| model | implementation | train pairs/s | vs ours | HR@10 | NDCG@10 | peak RSS MiB (tree / largest "
            "process) | wall s | CPU s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        pps = r.get("pairs_per_s")
        ratio = f"{pps / ref:.2f}x" if pps and ref else "n/a"
        lines.append(f"| {r['model']} | {r['impl']} | {_f(pps)} | {ratio} | {_f(r.get('hr@10'), '.4f')} | "
                     f"{_f(r.get('ndcg@10'), '.4f')} | {_rss(r)} | {_f(r.get('wall_s'), '.1f')} | "
                     f"{_cpu(r)} |")
    return head + "\n".join(lines)


def _row(model: str, impl: str, m: Measured | None, result: dict) -> dict:
    cost = {} if m is None else {"peak_rss_mib": m.peak_rss_mib, "max_process_rss_mib": m.max_process_rss_mib,
                                 "wall_s": m.wall_s, "cpu_s": m.cpu_s, "rc": m.rc, "log": m.log,
                                 "attempts": m.extra.get("attempts", 1), "cpu_sampled": m.extra.get("cpu_sampled")}
    return {"model": model, "impl": impl, **cost, **result}


def render(ctr: list[dict], i2v: list[dict], hr: dict, notes: list[str], load0: float) -> str:
    """The ``models`` section of BENCHMARKS.md (Markdown)."""
    refs = {r["model"]: r["train_samples_per_s"] for r in reversed(ctr)
            if r["impl"].startswith("ours") and r["impl"].endswith("1 worker") and r.get("train_samples_per_s")}
    ref_pairs = i2v[0].get("pairs_per_s") if i2v else None
    pop = hr.get("popularity", {})
    return (f"DeepFM on MovieLens-100K, global 80/10/10 time split of `export/ctr_samples` (80,000 / 10,000 / "
            f"10,000 rows); features user, item, age bucket, gender, occupation, zip prefix, genres (multi-hot, "
            f"sum); embedding dim 16, MLP (128, 64) ReLU, dropout 0.2, batch 2048, at most 12 epochs, early "
            f"stopping after 2 epochs without a higher valid AUC, test figures of the best epoch. Ours: row-wise "
            f"Adagrad lr 0.05 on the tables + AdamW 1e-3; peers: Adam 1e-3 (their default), one torch thread. "
            f"DIN (ours: activation unit (36,) PReLU over the last 50 items, OverArch (200, 80); DeepCTR-Torch's "
            f"DIN with the same sizes, `att_activation='prelu'`), otherwise as DeepFM. Load average (1 min) "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} when written, on {os.cpu_count()} logical CPUs "
            f"shared with other jobs.\n\n"
            f"{ctr_table(ctr, refs)}\n\n"
            f"item2vec on `export/item_sequences` (train period): dim 32, window 5, 5 negatives, subsampling 1e-3, "
            f"8 epochs. Next-item HR@10 / NDCG@10 on the {hr.get('cases', 'n/a')} positive test events "
            f"(`serving.replay` cases and query, exact search; popularity: HR@10 {_f(pop.get('hr@10'), '.4f')}). "
            f"gensim's pairs/s = the pairs our sampler draws for the same settings / gensim's training seconds.\n\n"
            f"{i2v_table(i2v, ref_pairs)}\n\n"
            "Samples/s and pairs/s count the optimisation passes only; wall s and CPU s are the whole command "
            "(start-up, Ray, data reading, evaluation). RSS is summed over the command's process tree (Ray's GCS, "
            "raylet and workers for ours), sampled every 0.2 s. CPU s is user + sys over the tree; n/a for a Ray run "
            "measured before the sampler counted it (`wait4` misses Ray's workers). The machine is shared with other "
            "jobs: wall time is noisier than CPU time.\n"
            + "".join(f"\n- {n}" for n in notes))


def _publish(a: argparse.Namespace, ctr: list[dict], i2v: list[dict], hr: dict, notes: list[str], load0: float,
             pending: str = "") -> None:
    """Print and write what has been measured so far (a later phase replaces the section)."""
    todo = [f"not measured yet when this was written: {pending}"] if pending else []
    retried = [f"{r['model']} ({r['impl']}): Ray's node timed out during start-up under the machine's load; it "
               f"took {r['attempts']} attempts (figures of the last)" for r in ctr + i2v if r.get("attempts", 1) > 1]
    failed = [f"{r['model']} ({r['impl']}): failed (exit {r['rc']}), see {r['log']}" for r in ctr + i2v
              if r.get("rc") and r["impl"].startswith("ours")]
    body = render(ctr, i2v, hr, notes + retried + failed + todo, load0)
    print(body, flush=True)
    (a.work / "results.json").write_text(json.dumps({"ctr": ctr, "item2vec": i2v, "hr": hr, "notes": notes,
                                                     "load0": load0}, indent=2, default=float))
    if not a.no_write:
        write_section("models", body, command=COMMAND)


def retry_failed(a: argparse.Namespace) -> int:
    """Re-run our runs that failed in ``a.work/results.json`` (item2vec with its HR@10 first, then DeepFM/DIN),
    keeping every other figure; the section is rewritten after each."""
    import re

    saved = json.loads((a.work / "results.json").read_text())
    ctr, i2v, hr, notes = saved["ctr"], saved["item2vec"], saved["hr"], saved["notes"]
    load0 = saved.get("load0", os.getloadavg()[0])
    note = ("Ray could not start under the machine's load in the run; re-run alone afterwards with "
            "`python -m bench.models --retry-failed`, the other figures kept")
    if i2v and i2v[0].get("rc"):
        m, result = run_ours("item2vec", a.work, 1, ITEM2VEC, attempts=5)
        i2v[0] = _row(i2v[0]["model"], i2v[0]["impl"], m, result)
        tables = {}
        if m.rc == 0:
            tables["ours"] = np.load(Path(m.extra["model_dir"]) / "item_embeddings.npy")
        if (a.work / "gensim_items.npy").exists() and len(i2v) > 1 and not i2v[1].get("rc"):
            tables["gensim"] = np.load(a.work / "gensim_items.npy")
        hr = next_item_hr(PlatformConfig(data_dir=a.work / "data"), tables) if tables else {}
        for row, name in zip(i2v, ("ours", "gensim")):
            row.update(hr.get(name, {}))
        notes.append(f"item2vec ({i2v[0]['impl']}): {note}")
        _publish(a, ctr, i2v, hr, notes, load0)
    for i, r in enumerate(ctr):
        if r["impl"].startswith("ours") and r.get("rc"):
            workers = int(re.search(r"(\d+) worker", r["impl"]).group(1))
            m, result = run_ours(r["model"].lower(), a.work, workers, DEEPFM, attempts=5)
            ctr[i] = _row(r["model"], r["impl"], m, result)
            notes.append(f"{r['model']} ({r['impl']}): {note}")
            _publish(a, ctr, i2v, hr, notes, load0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-models"), help="scratch dir")
    p.add_argument("--uv", default=str(CACHE / "uv-0.13.8" / "bin" / "uv"))
    p.add_argument("--skip-peers", action="store_true", help="only our models")
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-run only our runs that failed in the last run in --work (e.g. Ray could not start under "
                        "load), keep the other figures, rewrite the section")
    a = p.parse_args(argv)
    if a.retry_failed:
        return retry_failed(a)

    from training.train import MODELS

    shutil.rmtree(a.work, ignore_errors=True)
    lake = a.work / "data" / "lake"
    shutil.copytree(load_config().lake_dir / "export", lake / "export")
    lake_cfg = PlatformConfig(data_dir=a.work / "data")
    notes: list[str] = []
    python = None
    if not a.skip_peers:
        try:
            python = peers_python(a.uv)
        except (subprocess.CalledProcessError, OSError) as e:
            notes.append(f"peers not run: their environment could not be built ({e})")
    load0 = os.getloadavg()[0]
    ctr: list[dict] = []
    i2v: list[dict] = []
    hr: dict = {}

    def publish(pending: str) -> None:
        _publish(a, ctr, i2v, hr, notes, load0, pending)

    # DeepFM: ours with 1 and 2 workers, the peers
    for workers in (1, 2):
        m, r = run_ours("deepfm", a.work, workers, DEEPFM)
        ctr.append(_row("DeepFM", f"ours, Ray Train + TorchRec, {workers} worker{'s' * (workers > 1)}", m, r))
    peer_args = ["--epochs", str(DEEPFM["epochs"]), "--batch-size", str(DEEPFM["batch_size"]),
                 "--embedding-dim", str(DEEPFM["embedding_dim"]), "--patience", str(DEEPFM["patience"])]
    if python:
        for peer, impl in (("deepctr", "DeepCTR-Torch 0.3.0"), ("recbole", "RecBole 1.2.1")):
            m, r = run_peer(python, peer, a.work, peer_args)
            ctr.append(_row("DeepFM", impl, m, r))
            if m.rc:
                notes.append(f"{impl} DeepFM: failed (exit {m.rc}); see {m.log}")
    publish("item2vec, DIN")

    # item2vec: ours against gensim, one HR@10 protocol
    m, r = run_ours("item2vec", a.work, 1, ITEM2VEC)
    tables = {}
    if m.rc == 0:
        tables["ours"] = np.load(Path(m.extra["model_dir"]) / "item_embeddings.npy")
    i2v.append(_row("item2vec", "ours, Ray Train + TorchRec, 1 worker", m, r))
    if python:
        emb = a.work / "gensim_items.npy"
        gm, gr = run_peer(python, "gensim", a.work, [
            "--epochs", str(ITEM2VEC["epochs"]), "--embedding-dim", str(ITEM2VEC["embedding_dim"]),
            "--window", str(ITEM2VEC["window"]), "--negatives", str(ITEM2VEC["negatives"]),
            "--subsample", str(ITEM2VEC["subsample"]), "--embeddings", str(emb)])
        if gm.rc == 0:
            tables["gensim"] = np.load(emb)
            gr["pairs_per_s"] = our_pairs(lake, ITEM2VEC) / gr["train_s"]
        else:
            notes.append(f"gensim: failed (exit {gm.rc}); see {gm.log}")
        i2v.append(_row("item2vec (skip-gram, SGNS)", "gensim 4.4.0 Word2Vec(sg=1), 1 worker", gm, gr))
    hr.update(next_item_hr(lake_cfg, tables) if tables else {})
    for row, name in zip(i2v, ("ours", "gensim")):
        row.update(hr.get(name, {}))
    publish("DIN" if "din" in MODELS else "")

    # DIN: ours against DeepCTR-Torch's
    if "din" in MODELS:
        m, r = run_ours("din", a.work, 1, DEEPFM)
        ctr.append(_row("DIN", "ours, Ray Train + TorchRec, 1 worker", m, r))
        if python:  # ours: activation unit (36,) PReLU, OverArch (200, 80)
            m, r = run_peer(python, "deepctr", a.work, [*peer_args, "--model", "din", "--hidden", "200", "80"],
                            tag="deepctr-din")
            ctr.append(_row("DIN", "DeepCTR-Torch 0.3.0", m, r))
            if m.rc:
                notes.append(f"DeepCTR-Torch DIN: failed (exit {m.rc}); see {m.log}")
        notes.append("RecBole DIN: not run. RecBole's DIN is a sequential recommender that rebuilds each user's "
                     "history from its own interaction files and data loaders; giving it our point-in-time "
                     "`hist_item_idx` (so that the features are the same) was not done in this round")
    else:
        notes.append("DIN: not run; `python -m training.train` has no `--model din` yet (models: "
                     f"{', '.join(MODELS)}), so no peer DIN was run either")
    publish("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
