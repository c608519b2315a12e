"""Stage ``evaluate`` (``python -m evaluation.replay``): replay evaluation of item retrieval over the test period.

The logged test events are replayed in time order as an online system would have met them (the replay method of
Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article recommendation algorithms",
used here for a top-K retrieval policy rather than a bandit). A *case* is one positive test event (``label = 1``),
taken in order of ``(event_time, event_id)`` (*replay order*; the split orders events the same way, and
``event_id`` encodes the original row, so it breaks ties in time). For each case every policy ranks all items
using only what was known strictly before the event.

What a case may not be recommended, the same for every policy (and for the prequential replay,
evaluation.prequential): item 0 (padding / unknown) and every item of every logged event of the case's user
that comes strictly before the case in replay order, i.e. every row of the ctr_samples export (any split, any
rating, whatever its label) with the same ``user_idx`` and a smaller ``(event_time, event_id)``. Ties: an event of
the same user at the same ``event_time`` is excluded when its ``event_id`` is smaller (the replay has met it
already) and kept otherwise; events after the case are never excluded, even when the user rates that item later.
The rule is wider than ``hist_item_idx``, which holds only the last ``MAX_HISTORY`` (50) items rated at a
strictly earlier second and only makes the query. A user who had rated the case's own item before (a re-rating;
MovieLens has none) cannot be hit on that case.

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
from evaluation.metrics import hit_rate, mrr, ndcg

log = logging.getLogger("evaluation.replay")

SPLITS = ("train", "valid", "test")
_COLUMNS = ["event_id", "user_idx", "item_idx", "label", "event_time", "hist_item_idx"]


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


@dataclass(frozen=True)
class Log:
    """Every logged event (any rating, any split) in replay order, ``(event_time, event_id)`` ascending.

    Args:
        event_time: (E,) int64 microseconds since the epoch (UTC).
        user_idx, item_idx: (E,) int64.
        event_id: (E,) str.
    """

    event_time: np.ndarray
    user_idx: np.ndarray
    item_idx: np.ndarray
    event_id: np.ndarray


@dataclass(frozen=True)
class SeenItems:
    """The items each case must not recommend (module docstring): the distinct items of its user's events strictly
    before it in replay order, kept as one slice per case of a flat array grouped by user (the cases of a user share
    it, so memory is E, not B x S).

    Args:
        items: (P,) int64 the distinct item_idx of each user (P <= E (user, item) pairs), grouped by user, each
            group in order of the user's first event on the item (replay order).
        start: (B,) int64 offset in ``items`` of the case's user's group.
        count: (B,) int64 distinct items of that user first met strictly before the case: the case's slice is
            ``items[start:start + count]``, and ``count <= N``.
    """

    items: np.ndarray
    start: np.ndarray
    count: np.ndarray

    def of(self, b: int) -> np.ndarray:
        """(count[b],) int64 item_idx case ``b`` must not get, in order of the user's first event on each."""
        return self.items[self.start[b]:self.start[b] + self.count[b]]

    def mask(self, rows: np.ndarray, n_items: int) -> np.ndarray:
        """(b, n_items) bool, True at ``[r, i]`` when case ``rows[r]`` must not get item ``i``. Memory: b x N
        bytes, and b x N int64 at most while building it (items are distinct within a slice).

        Raises:
            IndexError: an excluded item_idx is >= ``n_items``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cnt = self.count[rows]                                                   # (b,)
        first = np.repeat(self.start[rows] - (np.cumsum(cnt) - cnt), cnt)       # (sum cnt,) slice start - offset
        flat = first + np.arange(int(cnt.sum()))                                 # (sum cnt,) positions in items
        out = np.zeros((rows.size, n_items), dtype=bool)
        out[np.repeat(np.arange(rows.size), cnt), self.items[flat]] = True
        return out


def seen_before(user_idx: np.ndarray, item_idx: np.ndarray, case_pos: np.ndarray) -> SeenItems:
    """What each case must not recommend: the items of its user's events at earlier positions of the log.

    Args:
        user_idx, item_idx: (E,) int64 every logged event, in replay order (``(event_time, event_id)``
            ascending), so that an earlier position is exactly a smaller ``(event_time, event_id)``.
        case_pos: (B,) int64 position of each case's own event in that order.

    Returns:
        ``SeenItems`` over the B cases.

    >>> s = seen_before(np.array([1, 2, 1, 1, 1]), np.array([7, 8, 9, 7, 6]), case_pos=np.array([4, 1, 0]))
    >>> [s.of(b).tolist() for b in range(3)]   # user 1 at position 4 has rated 7, 9, 7 again; the others nothing yet
    [[7, 9], [], []]
    """
    n = max(int(user_idx.size), 1)
    by_user = np.argsort(user_idx, kind="stable")       # (E,) grouped by user; stable keeps replay order inside
    u, i = user_idx[by_user], item_idx[by_user]
    # a user's repeated item is kept once, at its first event, so a slice never exceeds the catalogue
    _, first = np.unique(u * (int(item_idx.max(initial=0)) + 1) + i, return_index=True)
    keep = np.sort(first)                                # (P,) first events, still grouped and in replay order
    key = u[keep] * n + by_user[keep]                    # (P,) ascending (user, position)
    user = user_idx[case_pos]                            # (B,)
    start = np.searchsorted(key, user * n, side="left")
    end = np.searchsorted(key, user * n + case_pos, side="left")   # first events at positions < case_pos
    return SeenItems(items=i[keep].astype(np.int64), start=start.astype(np.int64),
                     count=(end - start).astype(np.int64))


@dataclass(frozen=True)
class Cases:
    """Positive test events in replay order, ``(event_time, event_id)`` ascending.

    Args:
        event_id: (B,) str; event_time: (B,) int64 microseconds; user: (B,) int64 user_idx;
            target: (B,) int64 item_idx of the event.
        hist: (B, L) int64 history item_idx, most recent last, left-padded with -1 (the query's input only).
        hist_len: (B,) int64 number of real entries of each ``hist`` row.
        seen: what each case must not recommend (module docstring).
    """

    event_id: np.ndarray
    event_time: np.ndarray
    user: np.ndarray
    target: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    seen: SeenItems

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


def _replay_order(t: pa.Table) -> pa.Table:
    return t.take(pc.sort_indices(t, sort_keys=[("event_time", "ascending"), ("event_id", "ascending")]))


def build_log(tables: list[pa.Table]) -> Log:
    """Every logged event (any rating, any split) in replay order: what popularity counts and what a case may
    have seen."""
    t = _replay_order(pa.concat_tables([x.select(["event_id", "event_time", "user_idx", "item_idx"])
                                        for x in tables]))
    col = lambda c: t.column(c).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    return Log(event_time=_micros(t.column("event_time")), user_idx=col("user_idx"), item_idx=col("item_idx"),
               event_id=np.asarray(t.column("event_id").to_pylist(), dtype=object))


def build_cases(test: pa.Table, log_: Log) -> Cases:
    """Positive events of the test table in replay order, each with what it must not recommend.

    Args:
        test: the test split (columns ``_COLUMNS``).
        log_: ``build_log`` of every split, the test split included.

    Raises:
        ValueError: a case's ``event_id`` is not in ``log_`` (it was built without the test split).
    """
    t = _replay_order(test.filter(pc.equal(test.column("label"), 1)))
    ids = t.column("event_id").cast(pa.string())
    pos = pc.index_in(ids, value_set=pa.array(log_.event_id.tolist(), pa.string()))   # (B,) position in the log
    if pos.null_count:
        missing = ids.filter(pc.is_null(pos))[0].as_py()
        raise ValueError(f"case event_id {missing!r} is not in the log; build the log from every split, the test "
                         f"split included (build_log(list(read_samples(cfg).values())))")
    pos = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    hist, hist_len = _padded_lists(t.column("hist_item_idx"))
    return Cases(event_id=np.asarray(ids.to_pylist(), dtype=object), event_time=_micros(t.column("event_time")),
                 user=t.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64),
                 target=t.column("item_idx").to_numpy(zero_copy_only=False).astype(np.int64),
                 hist=hist, hist_len=hist_len, seen=seen_before(log_.user_idx, log_.item_idx, pos))


def first_k_allowed(cands: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` candidates of each row that are > 0 and not seen, in candidate order.

    Args:
        cands: (B, C) item_idx, best first; values <= 0 (item 0, ``-1`` = none) are never kept.
        seen: (B, N) bool, True where the row's case must not get the item (``SeenItems.mask``); a candidate
            >= N counts as not seen.
        k: list length.

    Returns:
        (B, k) int64, ``-1`` where fewer than k candidates are allowed.

    Raises:
        TypeError: ``seen`` is not boolean (e.g. a (B, L) list of item_idx instead of a mask).

    >>> seen = np.zeros((1, 6), dtype=bool); seen[0, 3] = True
    >>> first_k_allowed(np.array([[5, 0, 3, 4, 2]]), seen, k=3).tolist()
    [[5, 4, 2]]
    """
    if seen.dtype != np.bool_:
        raise TypeError(f"seen must be a (B, N) bool mask (SeenItems.mask), got dtype {seen.dtype}")
    inside = (cands > 0) & (cands < seen.shape[1])
    # one lookup per candidate (B x C), not a comparison with every excluded item (B x C x S)
    excluded = inside & np.take_along_axis(seen, np.where(inside, cands, 0), axis=1)      # (B, C)
    ok = (cands > 0) & ~excluded
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]                       # allowed first, order kept
    out = np.take_along_axis(cands, order, axis=1).astype(np.int64)
    out[~np.take_along_axis(ok, order, axis=1)] = -1
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out


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
