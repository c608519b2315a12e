"""Stage ``evaluate`` (``python -m evaluation.replay``): replay evaluation of item retrieval over the test period.

The logged test events are replayed in time order as an online system would have met them (the replay method of
Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article recommendation algorithms",
used here for a top-K retrieval policy rather than a bandit). The protocol is evaluation.cases': a *case* is one
positive test event (``label = 1``), taken in replay order ``(event_time, event_id)``; for each case every policy
ranks all items using only what was known strictly before the event, and never recommends item 0 or an item the
case's user interacted with before the case (``evaluation.cases.SeenItems``; the same rule as the prequential
replay, evaluation.prequential).

- embedding policies (one per exported model): query = mean of the L2-normalised embeddings of the user's ``n``
  most recent history items (``hist_item_idx`` of the sample: items the user rated strictly before
  ``event_time``, most recent last, which already holds the user's earlier test events); the ANN index returns
  the top ``K + S + 1`` items (``S`` the largest number of excluded items among the batch's cases), the excluded
  items and item 0 are removed and the first ``K`` kept. A case whose history has no item with an embedding (a
  cold-start user) falls back to the popularity list, so that every policy is scored on the same cases; how many
  did is reported.
- popularity: items ranked by their number of interactions (all ratings, all splits) with ``event_time``
  strictly before the case's, ties by ascending ``item_idx``, the excluded items and item 0 removed.

A case is a hit when the event's item is among the K; HR@K, NDCG@K and MRR@K are in evaluation.metrics.

Stage result (``<run_dir>/stages/evaluate.json``)::

    {"retrieval": {"item2vec": {"hr@10", "ndcg@10", "mrr@10", "cases", "fallback_cases", "model_version"},
                   "deepfm": {...}, "popularity": {...}},
     "cold_start_cases", "cases", "k", "n_recent", "evaluate_wall_s"}

The stage also runs, and adds to its result:

- ``hr_curve``: HR@K for K in ``CURVE_KS`` per policy on the same cases (lists of length max K);
- ``prequential``: the prequential replay with rolling retraining (evaluation.prequential), per window and
  overall, with team-draft interleaving of co-occurrence against popularity in every window;
- ``interleaving``: team-draft interleaving (evaluation.interleaving) of every pair of policies above on
  the test cases and in every prequential window, each with the sign of the HR@K difference, and the share of
  comparisons where the two agree (``sign_agreement``);
- ``bandit``: the replay estimator of Li et al. 2011 (evaluation.estimators) for the explore/exploit
  policies on a logged uniformly random slice (``--bandit-log`` Parquet in the generator's shape, or a simulated
  one with known CTRs), with Wilson 95 % intervals;
- ``gate``: the publish gate's decision for the item2vec version against ``<artifacts_dir>/serving/current.json``
  (evaluation.gate); the pointer is rewritten on PUBLISH.

Legend: B cases, E logged events, L longest history, C candidates per case, N items (max item_idx + 1),
S excluded items of a case, R embedding rows, D embedding dim.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from evaluation.cases import Cases, Log, SeenItems, build_cases, build_log, first_k_allowed, read_samples
from evaluation.metrics import hit_rate, mrr, ndcg
from features.config import PlatformConfig, load_config
from features.results import write_stage_result
from serving.ann import ItemIndex, l2_normalise
from serving.embeddings import INDEX_FILE, MODELS, PARQUET_FILE, embeddings_dir, read_exported

log = logging.getLogger("evaluation.replay")

@dataclass(frozen=True)
class ReplayParams:
    """Args:
        k: length of each recommended list.
        n_recent: how many of the most recent history items make the query.
        batch: cases per vectorised step (bounds memory: a B x N boolean mask of excluded items and B x C
            candidates, C <= K + S + 1).

    Raises:
        ValueError: a value below 1.
    """

    k: int = 10
    n_recent: int = 15
    batch: int = 2048

    def __post_init__(self) -> None:
        if min(self.k, self.n_recent, self.batch) < 1:
            raise ValueError(f"k, n_recent and batch must be >= 1, got {self.k}, {self.n_recent}, {self.batch}")


def _fetch_size(k: int, seen: SeenItems, rows: np.ndarray, available: int) -> int:
    """Candidates to take so that ``k`` remain after the exclusion: each excluded item and item 0 remove at most
    one, hence K + S + 1 with S the batch's largest number of excluded items (at most ``available``)."""
    return int(min(k + int(seen.count[rows].max(initial=0)) + 1, available))


def popularity_recs(cases: Cases, log_: Log, k: int, n_items: int, batch: int = ReplayParams.batch) -> np.ndarray:
    """Popularity top-k per case from the events strictly before the case's time, without the case's excluded
    items.

    Args:
        cases: in ascending ``event_time`` (as ``build_cases`` orders them).
        log_: every logged event.
        k: list length.
        n_items: item_idx range (max item_idx + 1), above every item of ``log_``.
        batch: cases per step (memory: batch x n_items booleans).

    Returns:
        (B, k) int64 item_idx.
    """
    order = np.argsort(log_.event_time, kind="stable")
    times, items = log_.event_time[order], log_.item_idx[order]
    counts = np.zeros(n_items, dtype=np.int64)
    ids = np.arange(n_items)
    out = np.empty((len(cases), k), dtype=np.int64)
    counted, ranking, last_t = 0, None, None
    for s in range(0, len(cases), batch):
        rows = np.arange(s, min(s + batch, len(cases)))
        cands = np.empty((rows.size, _fetch_size(k, cases.seen, rows, n_items)), dtype=np.int64)   # (b, C)
        for r, t in enumerate(cases.event_time[rows]):
            if t != last_t:
                end = int(np.searchsorted(times, t, side="left"))  # events with time < t
                if end > counted or ranking is None:
                    counts += np.bincount(items[counted:end], minlength=n_items)
                    counted = end
                    ranking = np.lexsort((ids, -counts))            # (N,) count desc, then item_idx asc
                last_t = t
            cands[r] = ranking[:cands.shape[1]]
        out[rows] = first_k_allowed(cands, cases.seen.mask(rows, n_items), k)
    return out


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
    """Top-k per case by ANN search from the history query, without the case's excluded items; cold cases take
    the ``fallback`` (B, k) lists.

    Args:
        matrix: (R, D) from ``item_matrix``; its rows are the index's items.

    Returns:
        (B, k) int64 item_idx and the number of cases that fell back.
    """
    queries, cold = history_queries(cases.hist, matrix, params.n_recent)
    out = fallback.copy()
    n_items = int(max(matrix.shape[0], cases.seen.items.max(initial=0) + 1))        # mask width
    warm = np.flatnonzero(~cold)
    # Over-fetch from the ANN index rather than score every item exactly: the policy evaluated is the served
    # HNSW index, which only returns a ranked prefix. Warm cases go lightest first, so a batch's fetch size
    # follows its own heaviest user, not the log's.
    warm = warm[np.argsort(cases.seen.count[warm], kind="stable")]
    for s in range(0, warm.size, params.batch):
        rows = warm[s:s + params.batch]
        _, cands = index.search(queries[rows], _fetch_size(params.k, cases.seen, rows, index.ntotal))  # (b, C)
        out[rows] = first_k_allowed(cands, cases.seen.mask(rows, n_items), params.k)
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
    pop = popularity_recs(cases, log_, params.k, n_items, params.batch)
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
    pop = popularity_recs(cases, log_, params.k, n_items, params.batch)
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
    from evaluation.interleaving import interleave

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

    from evaluation import policies as P
    from evaluation.estimators import bandit_log, replay_estimate, simulate_uniform_log

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
        source = "simulated (evaluation.estimators.simulate_uniform_log, seed %d)" % seed
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
    log_ = build_log(list(tables.values()))
    cases = build_cases(tables["test"], log_)
    loaded = {m: x for m in models if (x := load_model_index(cfg, m)) is not None}
    log.info("replay: %d positive test cases, %d logged events, models %s", len(cases), log_.item_idx.size,
             list(loaded))
    result = evaluate(cases, log_, loaded, params)
    rng = np.random.default_rng(seed)
    long_params = ReplayParams(k=max(CURVE_KS), n_recent=params.n_recent, batch=params.batch)
    lists = policy_lists(cases, log_, loaded, long_params)
    result["hr_curve"] = hr_curve(lists, cases.target)
    comparisons = interleaving_comparisons(lists, cases.target, params.k, "test", rng)

    from evaluation.gate import PublishGate, gate_and_publish
    from serving.publish import pointer_path
    from evaluation.prequential import PrequentialParams, event_log, prequential

    t1 = time.perf_counter()
    window_lists: list = []
    elog = event_log(list(tables.values()))
    n_windows = min(windows, len(elog) - 1)          # a tiny log gets fewer windows (one event each at least)
    if n_windows >= 1:
        result["prequential"] = prequential(elog, PrequentialParams(n_windows=n_windows, k=params.k,
                                                                    n_recent=params.n_recent, batch=params.batch),
                                            lists_out=window_lists)
        result["prequential"]["wall_s"] = time.perf_counter() - t1
    for w, (wl, targets) in enumerate(window_lists, start=1):
        comparisons += interleaving_comparisons(wl, targets, params.k, f"window {w}", rng)
    from evaluation.interleaving import sign_agreement
    result["interleaving"] = {"comparisons": comparisons, "sign_agreement": sign_agreement(
        [c["preference"] for c in comparisons], [c["hr_diff"] for c in comparisons])}
    t1 = time.perf_counter()
    result["bandit"] = bandit_evaluation(bandit_path, bandit_events, seed)
    result["bandit"]["wall_s"] = time.perf_counter() - t1
    gated = cfg.models.retrieval  # the retriever the service publishes
    if gated in result["retrieval"]:
        cand = result["retrieval"][gated]
        metrics = {k: v for k, v in cand.items() if k.startswith(("hr@", "ndcg@", "mrr@"))}
        gate = PublishGate(metric=f"ndcg@{params.k}", guard=(f"hr@{params.k}",))
        decision, serving = gate_and_publish(gate, pointer_path(cfg.artifacts_dir), gated,
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
