"""The static replay: replay evaluation of item retrieval over the test period (part 1 of the ``evaluate`` stage,
evaluation.evaluate).

The logged test events are replayed in time order as an online system would have met them (the replay method of
Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article recommendation algorithms",
used here for a top-K retrieval policy rather than a bandit). The protocol is that of evaluation.cases: a *case* is one
positive test event (``label = 1``), taken in replay order ``(event_time, event_id)``; for each case every policy
ranks all items using only what was known strictly before the event, and never recommends item 0 or an item the
case's user interacted with before the case (``evaluation.cases.SeenItems``; the same rule as the prequential
replay, evaluation.prequential).

- embedding policies (one per exported model): query = the model's own query encoder when it declares one
  (``ModelSpec.query_encoder``, e.g. matrix factorisation's user vector, given the case's user and history), else
  the mean of the L2-normalised embeddings of the user's ``n`` most recent history items (``hist_item_idx`` of the
  sample: items the user rated strictly before ``event_time``, most recent last, which already holds the user's
  earlier test events); the ANN index returns
  the top ``K + S + 1`` items (``S`` the largest number of excluded items among the batch's cases), the excluded
  items and item 0 are removed and the first ``K`` kept. A case whose history has no item with an embedding (a
  cold-start user) falls back to the popularity list, so that every policy is scored on the same cases; how many
  did is reported.
- popularity: items ranked by their number of interactions (all ratings, all splits) with ``event_time``
  strictly before the case's, ties by ascending ``item_idx``, the excluded items and item 0 removed.

A case is a hit when the event's item is among the K; HR@K, NDCG@K and MRR@K are in evaluation.metrics.

Result of ``evaluate`` (the stage's ``retrieval`` and the figures beside it)::

    {"retrieval": {"item2vec": {"hr@10", "ndcg@10", "mrr@10", "cases", "fallback_cases", "model_version"},
                   "deepfm": {...}, "popularity": {...}},
     "cold_start_cases", "cases", "k", "n_recent"}

and ``hr_curve``: HR@K for K in ``CURVE_KS`` per policy on the same cases (lists of length max K).

Legend: B cases, E logged events, L longest history, C candidates per case, N items (max item_idx + 1),
S excluded items of a case, R embedding rows, D embedding dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from evaluation.cases import Cases, Log, SeenItems, first_k_allowed
from evaluation.metrics import hit_rate, mrr, ndcg
from features.config import PlatformConfig
from serving.ann import ItemIndex, l2_normalise
from serving.embeddings import INDEX_FILE, PARQUET_FILE, embeddings_dir, read_exported

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
                   fallback: np.ndarray, encoder=None) -> tuple[np.ndarray, int]:
    """Top-k per case by ANN search from the case's query, without the case's excluded items; cold cases take
    the ``fallback`` (B, k) lists.

    Args:
        matrix: (R, D) from ``item_matrix``; its rows are the index's items.
        encoder: the retriever's own ``training.query.QueryEncoder`` (e.g. a user vector), given the case's user
            and history; None: the mean of the history's most recent items (``history_queries``).

    Returns:
        (B, k) int64 item_idx and the number of cases that fell back.
    """
    if encoder is None:
        queries, cold = history_queries(cases.hist, matrix, params.n_recent)
    else:
        queries, ok = encoder.encode(cases.user, [h[h > 0] for h in cases.hist])
        cold = ~ok
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


def load_encoder(cfg: PlatformConfig, model: str, version: str):
    """The model's own query encoder (``ModelSpec.query_encoder``, built from its model folder), or None for a
    model queried by the mean of its recent items (or whose folder holds another version than the exported one,
    logged: its queries would not fit the exported item vectors)."""
    from training.artifacts import model_dir
    from training.query import own_query_encoder
    from training.registry import get_model

    if get_model(model).query_encoder is None:
        return None
    folder = model_dir(cfg.run_dir, model)
    encoder, meta = own_query_encoder(folder)
    if meta.get("model_version") != version:
        log.warning("model %s: %s holds another version than the exported %s; not evaluated with its own query",
                    model, folder, version)
        return None
    return encoder


def evaluate(cases: Cases, log_: Log, models: dict[str, tuple[ItemIndex, np.ndarray, str]],
             params: ReplayParams = ReplayParams(), encoders: dict | None = None) -> dict:
    """Score popularity and every model on the same cases (see the module docstring).

    Args:
        models: name -> (index, (R, D) item matrix, model_version).
        encoders: name -> the model's own query encoder, for the models that have one (``load_encoder``).

    Returns:
        ``{"retrieval": {...}, "cold_start_cases", "cases", "k", "n_recent"}``.
    """
    n_items = int(max(log_.item_idx.max(initial=0), cases.target.max(initial=0), cases.hist.max(initial=0))) + 1
    pop = popularity_recs(cases, log_, params.k, n_items, params.batch)
    retrieval = {"popularity": _scores(pop, cases.target, params.k)}
    for name, (index, matrix, version) in models.items():
        recs, fell_back = embedding_recs(cases, index, matrix, params, fallback=pop,
                                         encoder=(encoders or {}).get(name))
        retrieval[name] = _scores(recs, cases.target, params.k) | {"fallback_cases": fell_back,
                                                                    "model_version": version}
    return {"retrieval": retrieval, "cold_start_cases": int((cases.hist_len == 0).sum()), "cases": len(cases),
            "k": params.k, "n_recent": params.n_recent}


CURVE_KS = (1, 2, 5, 10, 20, 50)


def policy_lists(cases: Cases, log_: Log, models: dict[str, tuple[ItemIndex, np.ndarray, str]],
                 params: ReplayParams, encoders: dict | None = None) -> dict[str, np.ndarray]:
    """(B, params.k) lists of popularity and every model on the cases (as ``evaluate`` builds them)."""
    n_items = int(max(log_.item_idx.max(initial=0), cases.target.max(initial=0), cases.hist.max(initial=0))) + 1
    pop = popularity_recs(cases, log_, params.k, n_items, params.batch)
    out = {"popularity": pop}
    for name, (index, matrix, _) in models.items():
        out[name] = embedding_recs(cases, index, matrix, params, fallback=pop, encoder=(encoders or {}).get(name))[0]
    return out


def hr_curve(lists: dict[str, np.ndarray], targets: np.ndarray, ks: tuple[int, ...] = CURVE_KS) -> dict:
    """``{policy: {str(K): HR@K}}`` from lists at least max(ks) long."""
    return {name: {str(k): hit_rate(recs, targets, k) for k in ks} for name, recs in lists.items()}
