"""Stage ``evaluate`` (``python -m serving.replay``): replay evaluation of item retrieval over the test period.

The logged test events are replayed in time order as an online system would have met them (the replay method of
Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article recommendation algorithms",
used here for a top-K retrieval policy rather than a bandit). A *case* is one positive test event (``label = 1``),
taken in order of ``(event_time, event_id)``. For each case every policy ranks all items using only what was known
strictly before the event:

- embedding policies (one per exported model): query = mean of the L2-normalised embeddings of the user's ``n``
  most recent history items (``hist_item_idx`` of the sample: items the user rated strictly before
  ``event_time``, most recent last, which already holds the user's earlier test events); the ANN index returns
  the top ``K + |history| + 1`` items, every history item and item 0 are removed and the first ``K`` kept. A case
  whose history has no item with an embedding (a cold-start user) falls back to the popularity list, so that
  every policy is scored on the same cases; how many did is reported.
- popularity: items ranked by their number of interactions (all ratings, all splits) with ``event_time``
  strictly before the case's, ties by ascending ``item_idx``, history items and item 0 removed.

A case is a hit when the event's item is among the K; HR@K, NDCG@K and MRR@K are in serving.ranking_metrics.

Stage result (``<run_dir>/stages/evaluate.json``)::

    {"retrieval": {"item2vec": {"hr@10", "ndcg@10", "mrr@10", "cases", "fallback_cases", "model_version"},
                   "deepfm": {...}, "popularity": {...}},
     "cold_start_cases", "cases", "k", "n_recent", "evaluate_wall_s"}

The stage also runs, and adds to its result:

- ``hr_curve``: HR@K for K in ``CURVE_KS`` per policy on the same cases (lists of length max K);
- ``prequential``: the prequential replay with rolling retraining (serving.evaluation.prequential), per window and
  overall, with team-draft interleaving of co-occurrence against popularity in every window;
- ``interleaving``: team-draft interleaving (serving.evaluation.interleaving) of every pair of policies above on
  the test cases and in every prequential window, each with the sign of the HR@K difference, and the share of
  comparisons where the two agree (``sign_agreement``);
- ``bandit``: the replay estimator of Li et al. 2011 (serving.evaluation.estimators) for the explore/exploit
  policies on a logged uniformly random slice (``--bandit-log`` Parquet in the generator's shape, or a simulated
  one with known CTRs), with Wilson 95 % intervals;
- ``gate``: the publish gate's decision for the item2vec version against ``<artifacts_dir>/serving/current.json``
  (serving.evaluation.gate); the pointer is rewritten on PUBLISH.

Legend: B cases, E logged events, L longest history, C candidates per case, R embedding rows, D embedding dim.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.config import PlatformConfig, load_config
from features.errors import TableNotFoundError
from features.results import write_stage_result
from features.tables import CTR_SAMPLES, parquet_export
from serving.ann import ItemIndex, l2_normalise
from serving.embeddings import INDEX_FILE, MODELS, PARQUET_FILE, embeddings_dir, read_exported
from serving.ranking_metrics import hit_rate, mrr, ndcg

log = logging.getLogger("serving.replay")

SPLITS = ("train", "valid", "test")
_COLUMNS = ["event_id", "user_idx", "item_idx", "label", "event_time", "hist_item_idx"]


@dataclass(frozen=True)
class ReplayParams:
    """Args:
        k: length of each recommended list.
        n_recent: how many of the most recent history items make the query.
        batch: cases per vectorised step (bounds memory: B x C x L booleans).

    Raises:
        ValueError: a value below 1.
    """

    k: int = 10
    n_recent: int = 15
    batch: int = 2048

    def __post_init__(self) -> None:
        if min(self.k, self.n_recent, self.batch) < 1:
            raise ValueError(f"k, n_recent and batch must be >= 1, got {self.k}, {self.n_recent}, {self.batch}")


@dataclass(frozen=True)
class Log:
    """Logged events in the arrays replay needs.

    Args:
        event_time: (E,) int64 microseconds since the epoch (UTC).
        item_idx: (E,) int64.
    """

    event_time: np.ndarray
    item_idx: np.ndarray


@dataclass(frozen=True)
class Cases:
    """Positive test events in replay order, ``(event_time, event_id)`` ascending.

    Args:
        event_id: (B,) str; event_time: (B,) int64 microseconds; target: (B,) int64 item_idx of the event.
        hist: (B, L) int64 history item_idx, most recent last, left-padded with -1.
        hist_len: (B,) int64 number of real entries of each ``hist`` row.
    """

    event_id: np.ndarray
    event_time: np.ndarray
    target: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray

    def __len__(self) -> int:
        return int(self.target.shape[0])


def _micros(col: pa.ChunkedArray) -> np.ndarray:
    tz = getattr(col.type, "tz", None)
    return col.cast(pa.timestamp("us", tz=tz), safe=False).cast(pa.int64()).to_numpy()


def _padded_lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) int64 left-padded with -1 (last element in the last column) and (B,) lengths; null = empty."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths.max()) if lengths.size else 0
    out = np.full((lengths.size, max(width, 1)), -1, dtype=np.int64)
    row = np.repeat(np.arange(lengths.size), lengths)                     # (sum lengths,)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(values.size) - np.repeat(starts, lengths)            # position within its list
    out[row, out.shape[1] - np.repeat(lengths, lengths) + pos] = values
    return out, lengths


def read_samples(cfg: PlatformConfig) -> dict[str, pa.Table]:
    """The ctr_samples Parquet export, one table per split present (columns ``_COLUMNS``).

    Raises:
        TableNotFoundError: the export or its test split is missing.
    """
    root = Path(parquet_export(CTR_SAMPLES, cfg.lake_dir))
    out = {}
    for split in SPLITS:
        d = root / f"split={split}"
        if d.exists() and any(d.rglob("*.parquet")):
            out[split] = pq.read_table(d, columns=_COLUMNS, partitioning=None)
    if "test" not in out:
        raise TableNotFoundError(f"{CTR_SAMPLES.name} (split=test)", str(root / "split=test"),
                                 "the features stage (pipelines/features_batch.py)")
    return out


def build_log(tables: list[pa.Table]) -> Log:
    """Every logged event (any rating, any split): what popularity counts."""
    t = pa.concat_tables([x.select(["event_time", "item_idx"]) for x in tables])
    return Log(event_time=_micros(t.column("event_time")),
               item_idx=t.column("item_idx").to_numpy(zero_copy_only=False).astype(np.int64))


def build_cases(test: pa.Table) -> Cases:
    """Positive events of the test table in replay order."""
    t = test.filter(pc.equal(test.column("label"), 1))
    t = t.take(pc.sort_indices(t, sort_keys=[("event_time", "ascending"), ("event_id", "ascending")]))
    hist, hist_len = _padded_lists(t.column("hist_item_idx"))
    return Cases(event_id=np.asarray(t.column("event_id").to_pylist(), dtype=object),
                 event_time=_micros(t.column("event_time")),
                 target=t.column("item_idx").to_numpy(zero_copy_only=False).astype(np.int64),
                 hist=hist, hist_len=hist_len)


def first_k_allowed(cands: np.ndarray, banned: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` candidates of each row that are > 0 and not banned, in candidate order.

    Args:
        cands: (B, C) item_idx, best first; values <= 0 (item 0, ``-1`` = none) are never kept.
        banned: (B, L) item_idx to exclude (``-1`` pads).
        k: list length.

    Returns:
        (B, k) int64, ``-1`` where fewer than k candidates are allowed.

    >>> first_k_allowed(np.array([[5, 0, 3, 4, 2]]), np.array([[3, -1]]), k=3).tolist()
    [[5, 4, 2]]
    """
    ok = (cands > 0) & ~(cands[:, :, None] == banned[:, None, :]).any(axis=2)   # (B, C)
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]                       # allowed first, order kept
    out = np.take_along_axis(cands, order, axis=1).astype(np.int64)
    out[~np.take_along_axis(ok, order, axis=1)] = -1
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out


def popularity_recs(cases: Cases, log_: Log, k: int, n_items: int) -> np.ndarray:
    """Popularity top-k per case from the events strictly before the case's time.

    Args:
        cases: in ascending ``event_time`` (as ``build_cases`` orders them).
        log_: every logged event.
        k: list length.
        n_items: item_idx range (max item_idx + 1).

    Returns:
        (B, k) int64 item_idx.
    """
    order = np.argsort(log_.event_time, kind="stable")
    times, items = log_.event_time[order], log_.item_idx[order]
    counts = np.zeros(n_items, dtype=np.int64)
    ids = np.arange(n_items)
    n_cand = k + cases.hist.shape[1] + 1                    # enough after removing history and item 0
    cands = np.empty((len(cases), min(n_cand, n_items)), dtype=np.int64)
    counted, ranking, last_t = 0, None, None
    for b, t in enumerate(cases.event_time):
        if t != last_t:
            end = int(np.searchsorted(times, t, side="left"))  # events with time < t
            if end > counted or ranking is None:
                counts += np.bincount(items[counted:end], minlength=n_items)
                counted = end
                ranking = np.lexsort((ids, -counts))[:cands.shape[1]]     # count desc, then item_idx asc
            last_t = t
        cands[b] = ranking
    return first_k_allowed(cands, cases.hist, k)


def item_matrix(item_idx: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(R, D) float32 L2-normalised vectors by item_idx (R = max item_idx + 1); rows of missing items are 0."""
    out = np.zeros((int(item_idx.max()) + 1, vectors.shape[1]), dtype=np.float32)
    out[item_idx] = l2_normalise(vectors)
    return out


def history_queries(hist: np.ndarray, matrix: np.ndarray, n_recent: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the normalised embeddings of the ``n_recent`` last history items that have an embedding.

    Args:
        hist: (B, L) item_idx, left-padded with -1; matrix: (R, D) from ``item_matrix``.

    Returns:
        queries (B, D) float32 and (B,) bool ``cold``: no history item has an embedding (query is 0).

    >>> m = np.array([[0, 0], [1, 0], [0, 2], [3, 4]], dtype=np.float32)
    >>> m = item_matrix(np.array([1, 2, 3]), m[1:])
    >>> q, cold = history_queries(np.array([[-1, 1, 2], [-1, -1, -1], [9, 2, 3]]), m, n_recent=2)
    >>> np.round(q.astype(float), 4).tolist(), cold.tolist()
    ([[0.5, 0.5], [0.0, 0.0], [0.3, 0.9]], [False, True, False])
    """
    recent = hist[:, -n_recent:]                                                # (B, n)
    valid = (recent > 0) & (recent < matrix.shape[0])
    rows = np.where(valid, recent, 0)
    vecs = matrix[rows] * valid[:, :, None]                                     # (B, n, D)
    has = (np.abs(vecs).sum(axis=2) > 0)                                        # (B, n) rows with an embedding
    n = has.sum(axis=1)                                                         # (B,)
    queries = vecs.sum(axis=1) / np.maximum(n, 1)[:, None]                      # (B, D)
    return queries.astype(np.float32), n == 0


def embedding_recs(cases: Cases, index: ItemIndex, matrix: np.ndarray, params: ReplayParams,
                   fallback: np.ndarray) -> tuple[np.ndarray, int]:
    """Top-k per case by ANN search from the history query; cold cases take the ``fallback`` (B, k) lists.

    Returns:
        (B, k) int64 item_idx and the number of cases that fell back.
    """
    queries, cold = history_queries(cases.hist, matrix, params.n_recent)
    out = fallback.copy()
    n_search = min(params.k + cases.hist.shape[1] + 1, index.ntotal)
    warm = np.flatnonzero(~cold)
    for s in range(0, warm.size, params.batch):
        rows = warm[s:s + params.batch]
        _, cands = index.search(queries[rows], n_search)                        # (b, C)
        out[rows] = first_k_allowed(cands, cases.hist[rows], params.k)
    return out, int(cold.sum())


def _scores(recs: np.ndarray, targets: np.ndarray, k: int) -> dict:
    return {f"hr@{k}": hit_rate(recs, targets, k), f"ndcg@{k}": ndcg(recs, targets, k),
            f"mrr@{k}": mrr(recs, targets, k), "cases": int(targets.size)}


def load_model_index(cfg: PlatformConfig, model: str) -> tuple[ItemIndex, np.ndarray, str] | None:
    """A model's exported index, its (R, D) normalised item matrix and model_version; ``None`` (logged) when the
    model was not exported."""
    d = embeddings_dir(cfg, model)
    if not (d / PARQUET_FILE).exists() or not (d / INDEX_FILE).exists():
        log.warning("model %s: no exported embeddings/index under %s; skipping it (run `python -m serving.export` "
                    "after training it)", model, d)
        return None
    table, vectors = read_exported(d / PARQUET_FILE)
    item_idx = table.column("item_idx").to_numpy().astype(np.int64)
    version = table.column("model_version")[0].as_py() if table.num_rows else ""
    return ItemIndex.load(d / INDEX_FILE), item_matrix(item_idx, vectors), version


def evaluate(cases: Cases, log_: Log, models: dict[str, tuple[ItemIndex, np.ndarray, str]],
             params: ReplayParams = ReplayParams()) -> dict:
    """Score popularity and every model on the same cases (see the module docstring).

    Args:
        models: name -> (index, (R, D) item matrix, model_version).

    Returns:
        ``{"retrieval": {...}, "cold_start_cases", "cases", "k", "n_recent"}``.
    """
    n_items = int(max(log_.item_idx.max(initial=0), cases.target.max(initial=0), cases.hist.max(initial=0))) + 1
    pop = popularity_recs(cases, log_, params.k, n_items)
    retrieval = {"popularity": _scores(pop, cases.target, params.k)}
    for name, (index, matrix, version) in models.items():
        recs, fell_back = embedding_recs(cases, index, matrix, params, fallback=pop)
        retrieval[name] = _scores(recs, cases.target, params.k) | {"fallback_cases": fell_back,
                                                                    "model_version": version}
    return {"retrieval": retrieval, "cold_start_cases": int((cases.hist_len == 0).sum()), "cases": len(cases),
            "k": params.k, "n_recent": params.n_recent}


CURVE_KS = (1, 2, 5, 10, 20, 50)


def policy_lists(cases: Cases, log_: Log, models: dict[str, tuple[ItemIndex, np.ndarray, str]],
                 params: ReplayParams) -> dict[str, np.ndarray]:
    """(B, params.k) lists of popularity and every model on the cases (as ``evaluate`` builds them)."""
    n_items = int(max(log_.item_idx.max(initial=0), cases.target.max(initial=0), cases.hist.max(initial=0))) + 1
    pop = popularity_recs(cases, log_, params.k, n_items)
    out = {"popularity": pop}
    for name, (index, matrix, _) in models.items():
        out[name] = embedding_recs(cases, index, matrix, params, fallback=pop)[0]
    return out


def hr_curve(lists: dict[str, np.ndarray], targets: np.ndarray, ks: tuple[int, ...] = CURVE_KS) -> dict:
    """``{policy: {str(K): HR@K}}`` from lists at least max(ks) long."""
    return {name: {str(k): hit_rate(recs, targets, k) for k in ks} for name, recs in lists.items()}


def interleaving_comparisons(lists: dict[str, np.ndarray], targets: np.ndarray, k: int, label: str,
                             rng: np.random.Generator) -> list[dict]:
    """Team-draft interleaving of every pair of policies on the same cases, with the sign of their HR@k
    difference."""
    from serving.evaluation.interleaving import interleave

    names, out = sorted(lists), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            r = interleave(lists[a][:, :k], lists[b][:, :k], targets, k, rng)
            out.append({"on": label, "a": a, "b": b, **r,
                        "hr_diff": hit_rate(lists[a], targets, k) - hit_rate(lists[b], targets, k)})
    return out


def bandit_evaluation(bandit_path: str | None, n_events: int, seed: int) -> dict:
    """Replay-estimator CTR per policy on a logged random slice (Parquet at ``bandit_path``, else simulated).

    Raises:
        BanditLogError: the table is not in the logged-bandit shape.
    """
    import pandas as pd

    from serving.evaluation import policies as P
    from serving.evaluation.estimators import bandit_log, replay_estimate, simulate_uniform_log

    truth = None
    if bandit_path:
        # the generator's Parquet (pipelines/generator.py). Context = its user fields c01..c08 and context fields
        # c17..c26, hashed for LinUCB. Never the item fields c09..c16: they describe the *logged* item, and a
        # policy that sees them learns which arm was logged, breaking the replay's independence (on a 1M-event
        # log LinUCB kept 2 % of the events instead of 1 / C = 10 %).
        import pyarrow.dataset as pads

        dset = pads.dataset(bandit_path, format="parquet")
        df = dset.to_table(filter=pads.field("is_random")).to_pandas()
        source = bandit_path
        cat = tuple(f"c{j:02d}" for j in (*range(1, 9), *range(17, 27)) if f"c{j:02d}" in df.columns)
        blog = bandit_log(df, context_cols=cat, hashed_dim=32)
    else:
        df, truth = simulate_uniform_log(n_events, n_arms=50, n_candidates=10, n_users=500, dim=5,
                                         rng=np.random.default_rng(seed), scale=2.0)
        source = "simulated (serving.evaluation.estimators.simulate_uniform_log, seed %d)" % seed
        blog = bandit_log(df)
    dim = blog.context.shape[1]
    pols = [P.EpsilonGreedy(0.1, np.random.default_rng(seed + 1)), P.ThompsonSampling(np.random.default_rng(seed + 2)),
            P.UCB1(), P.Popularity()]
    if dim:
        pols.append(P.LinUCB(dim=dim, alpha=1.0))
    if truth is not None:   # the trained-embedding stand-in: the true item factors seen through noise
        noisy = truth.item_vectors + np.random.default_rng(seed + 3).normal(0, 0.3, truth.item_vectors.shape)
        pols.append(P.EmbeddingPolicy(noisy, truth.user_context))
    est = {p.name: replay_estimate(blog, p).as_dict() for p in pols}
    # a policy's kept count must be near events / C: far from it, its choices depend on the logged arm
    out = {"source": source, "events": len(blog), "candidates": int(blog.candidates.shape[1]),
           "expected_kept": len(blog) / blog.candidates.shape[1], "policies": est}
    if truth is not None:   # what the best static policy would earn: the per-event best arm's true CTR
        best = truth.ctr(np.repeat(blog.user, blog.candidates.shape[1]), blog.candidates.reshape(-1))
        out["oracle_ctr"] = float(best.reshape(blog.candidates.shape).max(axis=1).mean())
    out["uniform_ctr"] = float(blog.click.mean())      # the logging policy's own CTR
    return out


def run_replay(cfg: PlatformConfig, params: ReplayParams = ReplayParams(),
               models: tuple[str, ...] = MODELS, windows: int = 8, bandit_path: str | None = None,
               bandit_events: int = 10_000, seed: int = 0) -> dict:
    """Read the samples and exported models, evaluate, write the stage result.

    Args:
        windows: prequential windows (fewer on a log with fewer events).
        bandit_path: Parquet logged-bandit table (the generator's output); ``None`` simulates ``bandit_events``.
        seed: seeds the interleaving coins, the simulated log and the randomised policies.

    Raises:
        TableNotFoundError: the ctr_samples export (or its test split) is missing.
        IndexFileError: an index and its parameter file disagree.
    """
    t0 = time.perf_counter()
    tables = read_samples(cfg)
    cases, log_ = build_cases(tables["test"]), build_log(list(tables.values()))
    loaded = {m: x for m in models if (x := load_model_index(cfg, m)) is not None}
    log.info("replay: %d positive test cases, %d logged events, models %s", len(cases), log_.item_idx.size,
             list(loaded))
    result = evaluate(cases, log_, loaded, params)
    rng = np.random.default_rng(seed)
    long_params = ReplayParams(k=max(CURVE_KS), n_recent=params.n_recent, batch=params.batch)
    lists = policy_lists(cases, log_, loaded, long_params)
    result["hr_curve"] = hr_curve(lists, cases.target)
    comparisons = interleaving_comparisons(lists, cases.target, params.k, "test", rng)

    from serving.evaluation.gate import PublishGate, gate_and_publish, pointer_path
    from serving.evaluation.prequential import PrequentialParams, event_log, prequential

    t1 = time.perf_counter()
    window_lists: list = []
    elog = event_log(list(tables.values()))
    n_windows = min(windows, len(elog) - 1)          # a tiny log gets fewer windows (one event each at least)
    if n_windows >= 1:
        result["prequential"] = prequential(elog, PrequentialParams(n_windows=n_windows, k=params.k,
                                                                    n_recent=params.n_recent),
                                            lists_out=window_lists)
        result["prequential"]["wall_s"] = time.perf_counter() - t1
    for w, (wl, targets) in enumerate(window_lists, start=1):
        comparisons += interleaving_comparisons(wl, targets, params.k, f"window {w}", rng)
    from serving.evaluation.interleaving import sign_agreement
    result["interleaving"] = {"comparisons": comparisons, "sign_agreement": sign_agreement(
        [c["preference"] for c in comparisons], [c["hr_diff"] for c in comparisons])}
    t1 = time.perf_counter()
    result["bandit"] = bandit_evaluation(bandit_path, bandit_events, seed)
    result["bandit"]["wall_s"] = time.perf_counter() - t1
    if "item2vec" in result["retrieval"]:
        cand = result["retrieval"]["item2vec"]
        metrics = {k: v for k, v in cand.items() if k.startswith(("hr@", "ndcg@", "mrr@"))}
        gate = PublishGate(metric=f"ndcg@{params.k}", guard=(f"hr@{params.k}",))
        decision, serving = gate_and_publish(gate, pointer_path(cfg.artifacts_dir), "item2vec",
                                             cand["model_version"], metrics)
        result["gate"] = {"decision": decision.value, "candidate": cand["model_version"],
                          "serving": serving["model_version"] if serving else None,
                          "pointer": str(pointer_path(cfg.artifacts_dir))}
    result["evaluate_wall_s"] = time.perf_counter() - t0
    write_stage_result(cfg, "evaluate", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--k", type=int, default=ReplayParams.k)
    p.add_argument("--n-recent", type=int, default=ReplayParams.n_recent)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    p.add_argument("--windows", type=int, default=8, help="prequential windows evaluated")
    p.add_argument("--bandit-log", default=None, help="Parquet logged-bandit table (default: simulated)")
    p.add_argument("--bandit-events", type=int, default=50_000, help="events of the simulated bandit log")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faiss.omp_set_num_threads(args.threads)
    result = run_replay(load_config(), ReplayParams(k=args.k, n_recent=args.n_recent), tuple(args.models),
                        windows=args.windows, bandit_path=args.bandit_log, bandit_events=args.bandit_events,
                        seed=args.seed)
    for name, r in result["retrieval"].items():
        log.info("%-10s HR@%d %.4f  NDCG@%d %.4f  (%d cases)", name, result["k"], r[f"hr@{result['k']}"],
                 result["k"], r[f"ndcg@{result['k']}"], r["cases"])
    for name, r in result.get("prequential", {}).get("overall", {}).items():
        log.info("prequential %-12s HR@%d %.4f  coverage %.3f  novelty %.2f bits", name, result["k"],
                 r[f"hr@{result['k']}"], r["coverage"], r["novelty_bits"])
    for name, e in result["bandit"]["policies"].items():
        log.info("bandit %-20s CTR %.4f [%.4f, %.4f] (%d kept)", name, e["ctr"], e["low"], e["high"], e["kept"])
    log.info("interleaving sign agreement %.3f over %d comparisons", result["interleaving"]["sign_agreement"],
             len(result["interleaving"]["comparisons"]))
    if "gate" in result:
        log.info("gate: %s %s (serving: %s)", result["gate"]["decision"], result["gate"]["candidate"],
                 result["gate"]["serving"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
