"""Benchmark: this project's DeepFM (and DIN, once ``training.train`` has it) against DeepCTR-Torch 0.3.0 and
RecBole 1.2.1, and its item2vec against gensim's Word2Vec, on the same data, features and model sizes.

    python -m bench.models [--work DIR] [--uv PATH] [--skip-peers] [--parts deepfm,item2vec,din,generated,scale]
                                                                                           (make bench-models)

One run, side by side, on the lake's Parquet exports (MovieLens-100K, global 80/10/10 time split, copied into a
scratch lake under ``--work``; the project's ``data/`` and ``artifacts/`` are never written):

- DeepFM: ours (``python -m training.train --model deepfm``, Ray Train + TorchRec, 1 and 2 workers of 1 CPU) and
  the peers (``bench/peers.py`` in their own environment, one torch thread) with embedding dim 16, MLP (128, 64),
  up to 12 epochs, early stopping after 2 epochs without a higher validation AUC; test AUC / logloss of the best
  epoch, one seed (the spread over seeds: ``bench.tune``). Optimisers are each model's own: ours row-wise Adagrad
  on the tables and AdamW on the dense layers, with batch, learning rates, weight decay and dropout from
  the model's registered defaults (``ModelSpec.train``) (chosen on the validation split by ``bench.tune``); the peers batch 2048, dropout 0.2 and
  Adam (1e-3) on everything, their defaults.
- DIN: ours (1 and 2 workers) against DeepCTR-Torch's DIN and RecBole's DIN, all given our point-in-time history.
- generated: DeepFM, one epoch, on the first ``--generated-events`` events of the 10M-event stream of
  ``pipelines.generator`` (seed 7, 500,000 users, 200,000 items), ours with 1 and 2 workers against DeepCTR-Torch.
- scale: ``python -m training.scale`` (DIN with a 10M-row item table under a 512 MiB per-worker budget, 2 workers):
  per-rank rows, bytes and RSS.
- item2vec: ours (1 worker) against gensim ``Word2Vec(sg=1)`` with the same window (5), dim (32), negatives (5),
  subsampling (1e-3) and epochs (8) on the same ``item_sequences``; both scored by one next-item protocol, HR@10 on
  the positive test events (``evaluation.replay``'s cases and history query, exact search instead of the ANN index).

Per model: training samples/s (optimisation passes only), test AUC, logloss, peak RSS (MiB, summed over the
process tree and sampled every 0.2 s; Ray's own processes count for ours), wall s and CPU s of the whole command.
The figures go to the ``models`` section of ``BENCHMARKS.md``. ``--parts`` runs only some parts and keeps the
other parts' figures from the last run in ``--work`` (its ``results.json``).

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
#: Ours on MovieLens-100K: the same epochs, dim and early stopping; batch, learning rates, weight decay and dropout
#: are each model's defaults (ModelSpec.train in each model file, chosen on the validation split by bench.tune).
OURS_CTR = {"epochs": 12, "embedding_dim": 16}
PARTS = ("deepfm", "item2vec", "din", "generated", "scale")
#: The generated data: the 10M-event stream of bench.batch_features' largest common size (users n/20, items n/50).
GENERATED = {"n_events": 10_000_000, "seed": 7, "n_users": 500_000, "n_items": 200_000, "chunk_size": 1_000_000}
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


def run_ours(model: str, work: Path, workers: int, opts: dict, attempts: int = 3, data: str = "data",
             tag: str = "") -> tuple[Measured, dict]:
    """``python -m training.train --model <model>`` on the scratch lake ``work/<data>/lake``; returns its cost and
    stage result. A run whose Ray node timed out during start-up is retried (``attempts`` in all);
    ``extra["attempts"]`` says how many it took."""
    tag = tag or f"{model}-w{workers}"
    cmd = [sys.executable, "-m", "training.train", "--model", model, "--epochs", str(opts["epochs"]),
           "--embedding-dim", str(opts["embedding_dim"])]
    if opts.get("batch_size"):  # else the model's default (ModelSpec.train)
        cmd += ["--batch-size", str(opts["batch_size"])]
    if "id_dropout" in opts:
        cmd += ["--id-dropout", str(opts["id_dropout"])]
    env = {**_env(work, tag, workers), "RECSYS_DATA_DIR": str(work / data)}
    for attempt in range(1, attempts + 1):
        shutil.rmtree(work / f"artifacts-{tag}", ignore_errors=True)
        m = run_measured(cmd, env, work / f"{tag}.log")
        if m.rc == 0 or RAY_START_TIMEOUT not in Path(m.log).read_text():
            break
        print(f"  Ray's node timed out during start-up (attempt {attempt}/{attempts})", flush=True)
        time.sleep(15 * attempt)  # let the machine's load settle
    m.extra["attempts"] = attempt
    stage = work / f"artifacts-{tag}" / "bench" / "stages" / f"train_{model}.json"
    result = json.loads(stage.read_text()) if m.rc == 0 and stage.exists() else {}
    m.extra["model_dir"] = str(work / f"artifacts-{tag}" / "bench" / "models" / model)
    return m, result


def run_peer(python: Path, peer: str, work: Path, args: list[str], tag: str = "",
             data: str = "data") -> tuple[Measured, dict]:
    tag = tag or peer
    out = work / f"{tag}.json"
    out.unlink(missing_ok=True)
    cmd = [str(python), "-W", "ignore", str(HERE / "peers.py"), peer, "--lake", str(work / data / "lake"),
           "--out", str(out), "--work", str(work / tag), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    m = run_measured(cmd, env, work / f"{tag}.log")
    return m, (json.loads(out.read_text()) if m.rc == 0 and out.exists() else {})


# ---------------------------------------------------------------------------------------- next-item HR@10
def next_item_hr(lake_cfg: PlatformConfig, tables: dict[str, np.ndarray], k: int = 10, n_recent: int = 15) -> dict:
    """HR@k / NDCG@k of item embeddings on the positive test events, by ``evaluation.replay``'s protocol (query = mean
    of the normalised embeddings of the user's ``n_recent`` last items before the event; every item the user
    interacted with before the event and item 0 never recommended; cold cases take the popularity list) with exact
    inner-product search over all items.

    Args:
        tables: name -> (items, D) embeddings, row = item_idx.
    """
    from evaluation.cases import build_cases, build_log, first_k_allowed, read_samples
    from evaluation.metrics import hit_rate, ndcg
    from evaluation.replay import history_queries, item_matrix, popularity_recs

    samples = read_samples(lake_cfg)
    log_ = build_log(list(samples.values()))
    cases = build_cases(samples["test"], log_)
    n_items = max(t.shape[0] for t in tables.values())
    seen = cases.seen.mask(np.arange(len(cases)), n_items)  # (B, N) bool: what each case may not get
    pop = popularity_recs(cases, log_, k, n_items)
    out = {"popularity": {f"hr@{k}": hit_rate(pop, cases.target, k), f"ndcg@{k}": ndcg(pop, cases.target, k)}}
    for name, table in tables.items():
        matrix = item_matrix(np.arange(table.shape[0]), table)  # (R, D) normalised
        queries, cold = history_queries(cases.hist, matrix, n_recent)  # (B, D)
        scores = queries @ matrix.T  # (B, R)
        scores[:, 0] = -np.inf
        n_cand = min(k + int(cases.seen.count.max(initial=0)) + 1, matrix.shape[0])
        cands = np.argsort(-scores, axis=1, kind="stable")[:, :n_cand]  # (B, C) best first
        recs = np.where(cold[:, None], pop, first_k_allowed(cands, seen[:, :matrix.shape[0]], k))
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
    head = ("| model | implementation | dense features | train samples/s | vs ours (1 worker) | test AUC | "
            "test logloss | epochs (best) | peak RSS MiB (tree / largest process) | wall s | CPU s |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        sps, ref = r.get("train_samples_per_s"), refs.get(r["model"])
        ratio = f"{sps / ref:.2f}x" if sps and ref else "n/a"
        dense = len(r["dense_features"]) if "dense_features" in r else "n/a"  # rows measured before they existed
        if "history_ratings" in r:  # DIN rows that record it: did it read hist_rating (the behaviours' stars)?
            dense = f"{dense} + history ratings" if r["history_ratings"] else f"{dense}, no history ratings"
        lines.append(f"| {r['model']} | {r['impl']} | {dense} | {_f(sps)} | {ratio} | {_f(r.get('test_auc'), '.4f')} | "
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


def _ours_training(ctr: list[dict]) -> str:
    """How our 1-worker DeepFM and DIN rows were trained (their stage results' ``training``)."""
    out = []
    for model in ("DeepFM", "DIN"):
        t = next((r["training"] for r in ctr if r["model"] == model and r.get("training")), None)
        if t:
            out.append(f"{model}: batch {t['batch_size']}, row-wise Adagrad lr {t['lr_sparse']:g} on the tables, "
                       f"AdamW lr {t.get('lr_dense', 1e-3):g} weight decay {t.get('weight_decay', 1e-4):g} on the "
                       f"dense layers, dropout {t.get('dropout', 0.2):g}, {t.get('lr_schedule', 'warmup_cosine')} "
                       f"dense lr (warm-up {t.get('warmup_frac', 0.05):g} of the steps, down to "
                       f"{t.get('min_lr_factor', 0.1):g}x), id dropout {t.get('id_dropout', 0):g}"
                       + (" (user id)" if model == "DIN" else " (user and item ids)"))
    return "; ".join(out) or "n/a"


def _commit() -> str:
    """The checkout's commit (short hash), ``+dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "training", "bench/models.py",
                            "bench/peers.py"], cwd=ROOT).returncode
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"


def scale_table(scale: dict) -> str:
    """Per-rank figures of the scale run (``training.scale``)."""
    if not scale.get("ranks"):
        return "scale run: not measured" + (f" (failed, exit {scale['rc']}; see {scale.get('log')})"
                                            if scale.get("rc") else "")
    o, mib = scale["options"], 2**20
    rows = []
    for r in sorted(scale["ranks"], key=lambda r: r["rank"]):
        items = sum(v for k, v in r["rows"].items() if ".t_item." in k)
        b = r["bytes"]
        rows.append(f"| {r['rank']} | {items:,} | {b['tables'] / mib:,.1f} | {b['table_optimizer'] / mib:,.1f} | "
                    f"{b['dense'] / mib:,.2f} | {r['rss_before_model_mib']:,.0f} | {r['rss_after_shard_mib']:,.0f} | "
                    f"{r['rss_peak_mib']:,.0f} | {r['samples_per_s']:,.0f} |")
    return (f"Scale run (`python -m training.scale`, `make scale-train`): DIN whose item table has "
            f"{o['num_items']:,} rows x {o['embedding_dim']} (float32: {o['num_items'] * o['embedding_dim'] * 4 / mib:,.0f}"
            f" MiB, {scale['table_mib']:,.0f} MiB with row-wise Adagrad's state), planned by TorchRec's planner under "
            f"a budget of {o['budget_mib']:g} MiB per worker (`Topology(ddr_cap)`; table-, row- and column-wise "
            f"allowed). One worker under that budget: the planner refuses (\"{scale['one_worker']}\"). "
            f"With {o['num_workers']} Ray Train workers it chose {scale['plan'].get('t_item')} for the item table; "
            f"{o['steps']} steps of {o['batch_size']} generated samples per worker (ids uniform over all rows). "
            f"Loss {scale['loss_first']:.4f} -> {scale['loss_last']:.4f}. Whole command: wall "
            f"{_f(scale.get('wall_s'), '.1f')} s, peak RSS of the process tree {_f(scale.get('peak_rss_mib'))} MiB.\n\n"
            "| rank | item rows held | table shards MiB | their Adagrad state MiB | dense (replicated) MiB | "
            "RSS before model MiB | RSS after sharding MiB | peak RSS MiB | samples/s |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))


def render(ctr: list[dict], i2v: list[dict], hr: dict, notes: list[str], load0: float, gen: list[dict],
           scale: dict, gen_info: dict) -> str:
    """The ``models`` section of BENCHMARKS.md (Markdown)."""
    refs = {r["model"]: r["train_samples_per_s"] for r in reversed(ctr + gen)
            if r["impl"].startswith("ours") and r["impl"].endswith("1 worker") and r.get("train_samples_per_s")}
    ref_pairs = i2v[0].get("pairs_per_s") if i2v else None
    pop = hr.get("popularity", {})
    ours = _ours_training(ctr)
    gen_text = ""
    if gen:
        gen_text = (f"DeepFM on generated data (`pipelines.generator`): the first {gen_info.get('events', 0):,} events "
                    f"(chunk order = time order) of the {GENERATED['n_events']:,}-event stream (seed "
                    f"{GENERATED['seed']}, {GENERATED['n_users']:,} users, {GENERATED['n_items']:,} items), split "
                    f"80/10/10 in time ({gen_info.get('rows', 'n/a')} rows); label = click; user and item ids plus "
                    f"the generator's fields c07 (age slot), c08 (gender), c05 (occupation), c03 (zip), c14 (genre) in "
                    f"our feature slots, vocabularies from the generator's cardinalities, no dense features (this "
                    f"export has none, so neither side reads them). One epoch each (the full 10M events would take "
                    f"~10x longer per run on 2 cores), batch 2048, otherwise as above.\n\n"
                    f"{ctr_table(gen, refs)}\n\n")
    return (f"DeepFM on MovieLens-100K, global 80/10/10 time split of `export/ctr_samples` (80,000 / 10,000 / "
            f"10,000 rows); features user, item, age bucket, gender, occupation, zip prefix, genres (multi-hot, "
            f"sum) and, as dense inputs, the four point-in-time counters of `features.definitions.DENSE_FEATURES` "
            f"(the user's and the item's events before the sample, read as log1p(n), and their mean rating, read "
            f"as mean - 3.5), the same numbers for every implementation (DeepFM: linear part and DNN input, "
            f"RecBole's DeepFM: its numerical-feature embedding; DIN: DNN input, for RecBole's DIN through a "
            f"subclass in `bench/peers.py`, as its DIN reads only item features); embedding dim 16, MLP (128, 64) "
            f"ReLU, at most 12 epochs, early stopping after 2 epochs without a higher valid AUC, test figures of the best epoch. Ours ({ours}; `ModelSpec.train` in each model file, chosen on the "
            f"validation split by `bench.tune`, see `tuning`); peers: batch 2048, dropout 0.2, Adam 1e-3 on every "
            f"parameter (their defaults; DeepCTR-Torch also its L2 penalty on the embeddings, 1e-5 DeepFM, 1e-6 DIN), "
            f"one torch thread. One seed (0) per row here; the spread over seeds is in `tuning`. "
            f"DIN (ours: activation unit (36,) PReLU over the last 50 items, OverArch (200, 80) with batch norm + "
            f"Dice; DeepCTR-Torch's DIN with the same sizes, `att_activation='prelu'`; RecBole's DIN with its own "
            f"layers (Dice + batch norm, MLP (200, 80) for both the activation unit and the DNN) over the item "
            f"features (id, genres) of the history and the candidate -- RecBole's DIN does not feed the user features to its DNN), all "
            f"three on our point-in-time `hist_item_idx` and, where the export has it and the row says \"+ history "
            f"ratings\", `hist_rating`, the stars of each behaviour (ours: pooled by the attention weights; "
            f"DeepCTR-Torch: a mean-pooled `VarLenSparseFeat` in its DNN input; RecBole's DIN: mean-pooled into its "
            f"DNN input by the subclass), otherwise as DeepFM. Load average (1 min) "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} when written, on {os.cpu_count()} logical CPUs; "
            f"commit {_commit()}.\n\n"
            f"{ctr_table(ctr, refs)}\n\n"
            f"item2vec on `export/item_sequences` (train period): dim 32, window 5, 5 negatives, subsampling 1e-3, "
            f"8 epochs. Next-item HR@10 / NDCG@10 on the {hr.get('cases', 'n/a')} positive test events "
            f"(`evaluation.replay` cases and query, exact search; popularity: HR@10 {_f(pop.get('hr@10'), '.4f')}). "
            f"gensim's pairs/s = the pairs our sampler draws for the same settings / gensim's training seconds.\n\n"
            f"{i2v_table(i2v, ref_pairs)}\n\n"
            f"{gen_text}"
            f"{scale_table(scale)}\n\n"
            "Samples/s and pairs/s count the optimisation passes only; wall s and CPU s are the whole command "
            "(start-up, Ray, data reading, evaluation). RSS is summed over the command's process tree (Ray's GCS, "
            "raylet and workers for ours), sampled every 0.2 s. CPU s is user + sys over the tree; n/a for a Ray run "
            "measured before the sampler counted it (`wait4` misses Ray's workers). No GPU was available: the "
            "GPU path (`use_gpu=True`, NCCL, fused fbgemm GPU kernels) was not measured.\n"
            + "".join(f"\n- {n}" for n in notes))


def _publish(a: argparse.Namespace, res: dict, pending: str = "") -> None:
    """Print and write what has been measured so far (a later phase replaces the section)."""
    ctr, i2v, gen = res["ctr"], res["item2vec"], res["generated"]
    todo = [f"not measured yet when this was written: {pending}"] if pending else []
    retried = [f"{r['model']} ({r['impl']}): Ray's node timed out during start-up under the machine's load; it "
               f"took {r['attempts']} attempts (figures of the last)" for r in ctr + i2v + gen
               if r.get("attempts", 1) > 1]
    failed = [f"{r['model']} ({r['impl']}): failed (exit {r['rc']}), see {r['log']}" for r in ctr + i2v + gen
              if r.get("rc")]
    body = render(ctr, i2v, res["hr"], res["notes"] + retried + failed + todo, res["load0"], gen, res["scale"],
                  res["gen_info"])
    print(body, flush=True)
    (a.work / "results.json").write_text(json.dumps(res, indent=2, default=float))
    if not a.no_write:
        write_section("models", body, command=COMMAND)


# ------------------------------------------------------------------------------------------------ the parts
def write_generated_lake(lake: Path, n_events: int) -> dict:
    """The first ``n_events`` of the generated 10M-event stream (``GENERATED``) as ``export/ctr_samples``
    (split=train|valid|test, 80/10/10 in event order, which is time order) and ``export/vocab_sizes.json``; user
    and item ids are shifted by one (0 = unknown), the generator's categorical fields fill our feature slots."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from features.tables import CTR_SAMPLES, parquet_export
    from pipelines.generator import CARDINALITIES, CAT_COLUMNS, GeneratorConfig, generate

    slots = {"age_idx": "c07", "gender_idx": "c08", "occupation_idx": "c05", "zip_idx": "c03"}
    cfg = GeneratorConfig(**GENERATED)
    chunks, n = [], 0
    for chunk in generate(cfg):
        take = min(len(chunk["event_id"]), n_events - n)
        chunks.append({k: v[:take] for k, v in chunk.items() if k in ("user_id", "item_id", "click", *CAT_COLUMNS)})
        n += take
        if n >= n_events:
            break
    col = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    cut = [0, int(0.8 * n), int(0.9 * n), n]
    rows = {}
    for i, split in enumerate(("train", "valid", "test")):
        sl = slice(cut[i], cut[i + 1])
        table = pa.table({
            "user_idx": (col["user_id"][sl] + 1).astype(np.int32), "item_idx": (col["item_id"][sl] + 1).astype(np.int32),
            **{name: (col[c][sl] + 1).astype(np.int32) for name, c in slots.items()},
            "genre_idx": pa.array((col["c14"][sl] + 1).astype(np.int32)[:, None].tolist(), pa.list_(pa.int32())),
            "label": col["click"][sl].astype(np.int32)})
        out = Path(parquet_export(CTR_SAMPLES, lake)) / f"split={split}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "part-0.parquet")
        rows[split] = table.num_rows
    card = dict(zip(CAT_COLUMNS, CARDINALITIES))
    vocab = {"user": cfg.n_users + 2, "item": cfg.n_items + 2, "age_bucket": card["c07"] + 1,
             "gender": card["c08"] + 1, "occupation": card["c05"] + 1, "zip_prefix": card["c03"] + 1,
             "genre": card["c14"] + 1}
    (lake / "export" / "vocab_sizes.json").write_text(json.dumps(vocab))
    return {"events": n, "rows": " / ".join(f"{v:,}" for v in rows.values()), "click_rate": float(col["click"].mean())}


def part_deepfm(res: dict, a: argparse.Namespace, python: Path | None) -> None:
    res["ctr"] = [r for r in res["ctr"] if r["model"] != "DeepFM"]
    rows = []
    for workers in (1, 2):
        m, r = run_ours("deepfm", a.work, workers, OURS_CTR)
        rows.append(_row("DeepFM", f"ours, Ray Train + TorchRec, {workers} worker{'s' * (workers > 1)}", m, r))
    if python:
        for peer, impl in (("deepctr", "DeepCTR-Torch 0.3.0"), ("recbole", "RecBole 1.2.1")):
            m, r = run_peer(python, peer, a.work, _peer_args())
            rows.append(_row("DeepFM", impl, m, r))
    res["ctr"] = rows + res["ctr"]


def _peer_args() -> list[str]:
    return ["--epochs", str(DEEPFM["epochs"]), "--batch-size", str(DEEPFM["batch_size"]),
            "--embedding-dim", str(DEEPFM["embedding_dim"]), "--patience", str(DEEPFM["patience"])]


def part_din(res: dict, a: argparse.Namespace, python: Path | None) -> None:
    res["ctr"] = [r for r in res["ctr"] if r["model"] != "DIN"]
    for workers in (1, 2):
        m, r = run_ours("din", a.work, workers, OURS_CTR)
        res["ctr"].append(_row("DIN", f"ours, Ray Train + TorchRec, {workers} worker{'s' * (workers > 1)}", m, r))
    if python:  # ours: activation unit (36,) PReLU, OverArch (200, 80) batch norm + Dice
        for peer, impl in (("deepctr", "DeepCTR-Torch 0.3.0"), ("recbole", "RecBole 1.2.1")):
            m, r = run_peer(python, peer, a.work, [*_peer_args(), "--model", "din", "--hidden", "200", "80"],
                            tag=f"{peer}-din")
            res["ctr"].append(_row("DIN", impl, m, r))


def part_item2vec(res: dict, a: argparse.Namespace, python: Path | None) -> None:
    m, r = run_ours("item2vec", a.work, 1, ITEM2VEC)
    tables = {}
    if m.rc == 0:
        tables["ours"] = np.load(Path(m.extra["model_dir"]) / "item_embeddings.npy")
    i2v = [_row("item2vec", "ours, Ray Train + TorchRec, 1 worker", m, r)]
    if python:
        emb = a.work / "gensim_items.npy"
        gm, gr = run_peer(python, "gensim", a.work, [
            "--epochs", str(ITEM2VEC["epochs"]), "--embedding-dim", str(ITEM2VEC["embedding_dim"]),
            "--window", str(ITEM2VEC["window"]), "--negatives", str(ITEM2VEC["negatives"]),
            "--subsample", str(ITEM2VEC["subsample"]), "--embeddings", str(emb)])
        if gm.rc == 0:
            tables["gensim"] = np.load(emb)
            gr["pairs_per_s"] = our_pairs(a.work / "data" / "lake", ITEM2VEC) / gr["train_s"]
        i2v.append(_row("item2vec (skip-gram, SGNS)", "gensim 4.4.0 Word2Vec(sg=1), 1 worker", gm, gr))
    res["hr"] = next_item_hr(PlatformConfig(data_dir=a.work / "data"), tables) if tables else {}
    for row, name in zip(i2v, ("ours", "gensim")):
        row.update(res["hr"].get(name, {}))
    res["item2vec"] = i2v


def part_generated(res: dict, a: argparse.Namespace, python: Path | None) -> None:
    lake = a.work / "gen" / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    res["gen_info"] = write_generated_lake(lake, a.generated_events)
    # id dropout is chosen with the MovieLens counters; this export has none, and without them it lowers AUC
    one_epoch = {**DEEPFM, "epochs": 1, "id_dropout": 0.0}
    name = f"DeepFM, generated {a.generated_events / 1e6:g}M events"
    gen = []
    for workers in (1, 2):
        m, r = run_ours("deepfm", a.work, workers, one_epoch, data="gen", tag=f"gen-deepfm-w{workers}")
        gen.append(_row(name, f"ours, Ray Train + TorchRec, {workers} worker{'s' * (workers > 1)}", m, r))
    if python:
        m, r = run_peer(python, "deepctr", a.work, [*_peer_args()[2:], "--epochs", "1"], tag="gen-deepctr",
                        data="gen")
        gen.append(_row(name, "DeepCTR-Torch 0.3.0", m, r))
    res["generated"] = gen


def part_scale(res: dict, a: argparse.Namespace, python: Path | None) -> None:
    out = a.work / "scale.json"
    out.unlink(missing_ok=True)
    m = run_measured([sys.executable, "-m", "training.scale", "--json", str(out)],
                     {**os.environ, "PYTHONPATH": str(ROOT)}, a.work / "scale.log")
    res["scale"] = {**(json.loads(out.read_text()) if m.rc == 0 and out.exists() else {}), "rc": m.rc,
                    "log": m.log, "wall_s": m.wall_s, "peak_rss_mib": m.peak_rss_mib}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/recsys-bench-models"), help="scratch dir")
    p.add_argument("--uv", default=str(CACHE / "uv-0.13.8" / "bin" / "uv"))
    p.add_argument("--skip-peers", action="store_true", help="only our models")
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {PARTS}; the other parts' figures are kept from --work")
    p.add_argument("--generated-events", type=int, default=1_000_000,
                   help="events of the generated 10M-event stream to train on (its first ones)")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if set(parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    saved = a.work / "results.json"
    keep = saved.exists() and set(parts) != set(PARTS)
    res = json.loads(saved.read_text()) if keep else {}
    res = {"ctr": [], "item2vec": [], "generated": [], "hr": {}, "scale": {}, "gen_info": {}, "notes": [], **res,
           "load0": os.getloadavg()[0]}
    res["notes"] = [n for n in res["notes"] if not n.startswith("peers not run")]
    if not keep:
        shutil.rmtree(a.work, ignore_errors=True)
    lake = a.work / "data" / "lake"
    shutil.rmtree(lake / "export", ignore_errors=True)
    shutil.copytree(load_config().lake_dir / "export", lake / "export")
    python = None
    if not a.skip_peers:
        try:
            python = peers_python(a.uv)
        except (subprocess.CalledProcessError, OSError) as e:
            res["notes"].append(f"peers not run: their environment could not be built ({e})")
    run = {"deepfm": part_deepfm, "item2vec": part_item2vec, "din": part_din, "generated": part_generated,
           "scale": part_scale}
    for i, part in enumerate(parts):
        run[part](res, a, python)
        _publish(a, res, pending=", ".join(parts[i + 1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
