"""Rankers in the replay: every registered ranker orders the chosen retriever's candidates of every case, as the
service's ``/recommend`` does online, so that rankers are judged by the lists users would see (HR@K, NDCG@K, MRR@K
of the ranked list) beside their AUC, GAUC and logloss on the test split.

For each case (a positive test event, ``evaluation.cases``) the retriever's first ``candidates`` items are taken
under the replay's rules (its query from what was known before the event, every item the user interacted with
before the event excluded; a cold case takes the popularity list). Each ranker then scores every candidate with
the features it reads, all point-in-time as of the case: the user's side features, behaviour history and its
stars and counters from the case's own sample row, and for each candidate item its genres and its counters -- its
events and mean rating at Unix seconds strictly before the case's, the rule of the features job. The candidates
are reordered by the ranker's score (ties by ``item_idx``) and the first K kept. The case is a hit when its item
is among them; a case whose item the retriever did not return cannot be a hit for any ranker, so
``recall@candidates`` bounds every ranker's HR.

Legend: B cases, C candidates per case, N item rows, L history length, F_dense dense features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.config import PlatformConfig
from features.definitions import dense_features_named, dense_inputs
from features.tables import CTR_SAMPLES, parquet_export

USER_COLUMNS = ("user_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx")
SEQUENCES = ("hist_item_idx", "hist_rating")


@dataclass(frozen=True)
class RankingParams:
    """Args:
        candidates: C, the retriever's items per case that the rankers reorder.
        k: length of the ranked list scored.
        batch_cases: cases scored per forward pass (bounds memory: batch_cases x C rows).

    Raises:
        ValueError: a value below 1, or ``k`` above ``candidates``.
    """

    candidates: int = 100
    k: int = 10
    batch_cases: int = 256

    def __post_init__(self) -> None:
        if min(self.candidates, self.k, self.batch_cases) < 1 or self.k > self.candidates:
            raise ValueError(f"candidates, k, batch_cases must be >= 1 and k <= candidates, got {self}")


@dataclass(frozen=True)
class Csr:
    """Variable-length int64 lists: list ``r`` is ``values[offsets[r]:offsets[r + 1]]``."""

    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, col: pa.ChunkedArray) -> "Csr":
        col = col.combine_chunks()
        col = col.fill_null([]) if col.null_count else col
        offsets = col.offsets.to_numpy().astype(np.int64)
        return cls(offsets - offsets[0], col.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (n,), values) of the lists ``rows``, concatenated in row order.

        >>> Csr(np.array([0, 2, 2, 5]), np.array([7, 8, 1, 2, 3])).gather(np.array([2, 0, 1]))
        (array([3, 2, 0]), array([1, 2, 3, 7, 8]))
        """
        starts, lengths = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # position in its list
        return lengths, self.values[np.repeat(starts, lengths) + pos]


@dataclass(frozen=True)
class ItemHistory:
    """Every logged event's (item, second, rating), sorted by (item, second), for point-in-time item counters."""

    key: np.ndarray        # (E,) item << 40 | unix seconds, ascending
    cum_rating: np.ndarray  # (E + 1,) cumulative sum of the ratings in that order

    @classmethod
    def of(cls, item_idx: np.ndarray, seconds: np.ndarray, rating: np.ndarray) -> "ItemHistory":
        key = (item_idx.astype(np.int64) << 40) | seconds.astype(np.int64)
        order = np.argsort(key, kind="stable")
        return cls(key[order], np.r_[0.0, np.cumsum(rating[order].astype(np.float64))])

    def counters(self, items: np.ndarray, seconds: np.ndarray) -> dict[str, np.ndarray]:
        """``item_prior_events`` and ``item_prior_rating`` (NaN without events) of ``items`` at ``seconds``
        (broadcast together): the events of the item at Unix seconds strictly before.

        >>> h = ItemHistory.of(np.array([1, 1, 2]), np.array([10, 20, 5]), np.array([4.0, 2.0, 5.0]))
        >>> c = h.counters(np.array([1, 1, 1, 2]), np.array([10, 11, 21, 5]))
        >>> c["item_prior_events"].tolist(), c["item_prior_rating"].tolist()
        ([0, 1, 2, 0], [nan, 4.0, 3.0, nan])
        """
        items, seconds = np.broadcast_arrays(items.astype(np.int64), seconds.astype(np.int64))
        lo = np.searchsorted(self.key, items << 40, side="left")
        hi = np.searchsorted(self.key, (items << 40) | seconds, side="left")  # strictly before that second
        n = hi - lo
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (self.cum_rating[hi] - self.cum_rating[lo]) / np.maximum(n, 1), np.nan)
        return {"item_prior_events": n, "item_prior_rating": mean}


@dataclass(frozen=True)
class CaseFeatures:
    """What a ranker may know at each case, from its own sample row, aligned with the cases (B rows): the user's
    side features, history and stars (``Csr``), counters; plus the items' genres and the item history."""

    one_hot: dict[str, np.ndarray]
    sequences: dict[str, Csr]
    dense: dict[str, np.ndarray]
    seconds: np.ndarray
    genres: Csr                     # per item_idx row
    items: ItemHistory


def read_case_features(cfg: PlatformConfig, event_ids: np.ndarray) -> CaseFeatures:
    """The case rows (by ``event_id``, in that order) and the item-side tables, from the ctr_samples export.

    Raises:
        KeyError: an event id that is not in the export.
    """
    root = Path(parquet_export(CTR_SAMPLES, cfg.lake_dir))
    names = set(pq.read_schema(next(root.rglob("*.parquet"))).names)
    cols = ["event_id", "event_time", "item_idx", "rating", "genre_idx", *USER_COLUMNS,
            *[c for c in (*SEQUENCES, "user_prior_events", "user_prior_rating") if c in names]]
    t = pq.read_table(root, columns=cols, partitioning=None)
    seconds = t.column("event_time").cast(pa.timestamp("s", tz=t.column("event_time").type.tz), safe=False) \
        .cast(pa.int64()).to_numpy()
    item_idx = t.column("item_idx").to_numpy().astype(np.int64)
    rating = pc.fill_null(t.column("rating").cast(pa.float64()), np.nan).to_numpy()
    n_items = int(item_idx.max()) + 1
    items, first = np.unique(item_idx, return_index=True)     # ascending items, a row of each: its genres
    genres = Csr.of(t.column("genre_idx").take(pa.array(first)))
    lengths = np.zeros(n_items, np.int64)
    lengths[items] = np.diff(genres.offsets)                  # items without a row: no genres
    per_item = Csr(np.r_[0, np.cumsum(lengths)], genres.values)  # ascending items: the same concatenation
    position = {e: i for i, e in enumerate(t.column("event_id").to_pylist())}
    rows = np.array([position[e] for e in event_ids.tolist()], np.int64)
    case = t.take(pa.array(rows))
    one_hot = {c: case.column(c).to_numpy().astype(np.int64) for c in USER_COLUMNS}
    sequences = {c: Csr.of(case.column(c)) for c in SEQUENCES if c in names}
    dense = {c: case.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
             for c in ("user_prior_events", "user_prior_rating") if c in names}
    return CaseFeatures(one_hot, sequences, dense, seconds[rows], per_item,
                        ItemHistory.of(item_idx, seconds, rating))


def candidate_batch(feats: CaseFeatures, cases: np.ndarray, cands: np.ndarray, keys: list[str],
                    dense_names: tuple[str, ...]) -> tuple[KeyedJaggedTensor, torch.Tensor | None]:
    """The KJT (keys ``keys``, b x C rows, case-major) and (b x C, F_dense) dense input of ``cands`` (b, C) for the
    cases ``cases`` (b,), each row holding its case's point-in-time features and its candidate item."""
    import torch  # here, not at import: the evaluate command's --help must not wait for torch and torchrec
    from torchrec import KeyedJaggedTensor

    b, c = cands.shape
    case_row = np.repeat(cases, c)                            # (b * C,)
    item = cands.reshape(-1)
    values, lengths = [], []
    for key in keys:
        if key == "item_idx":
            lengths.append(np.ones(item.size, np.int64))
            values.append(item)
        elif key == "genre_idx":
            n, v = feats.genres.gather(np.minimum(item, len(feats.genres.offsets) - 2))
            lengths.append(n)
            values.append(v)
        elif key in feats.sequences:
            n, v = feats.sequences[key].gather(case_row)
            lengths.append(n)
            values.append(v)
        else:
            lengths.append(np.ones(item.size, np.int64))
            values.append(feats.one_hot[key][case_row])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(np.concatenate(values)),
                                              lengths=torch.from_numpy(np.concatenate(lengths)))
    if not dense_names:
        return kjt, None
    columns = {k: v[case_row] for k, v in feats.dense.items()}
    columns |= feats.items.counters(item, feats.seconds[case_row])
    return kjt, torch.from_numpy(dense_inputs(columns, dense_features_named(dense_names)))


def rank_candidates(loaded, feats: CaseFeatures, cands: np.ndarray, params: RankingParams) -> np.ndarray:
    """(B, k) item_idx: each case's candidates (B, C; -1 = none) reordered by the ranker's logit (ties by
    item_idx), the first k kept; ``loaded`` a ``training.artifacts.LoadedModel`` ranker."""
    import torch

    keys = [f.name for f in loaded.spec.features_of(loaded.config)]
    dense_names = tuple(getattr(loaded.config, "dense_features", ()))
    out = np.full((len(cands), params.k), -1, np.int64)
    for s in range(0, len(cands), params.batch_cases):
        rows = np.arange(s, min(s + params.batch_cases, len(cands)))
        block = cands[rows]
        kjt, dense = candidate_batch(feats, rows, np.maximum(block, 0), keys, dense_names)
        with torch.no_grad():
            score = loaded.module(kjt, dense).numpy().reshape(block.shape).astype(np.float64)  # (b, C)
        score[block < 0] = -np.inf
        order = np.lexsort((block, -score), axis=1)[:, :params.k]                          # best first, ties by id
        ranked = np.take_along_axis(block, order, axis=1)
        out[rows, :ranked.shape[1]] = np.where(np.take_along_axis(score, order, axis=1) > -np.inf, ranked, -1)
    return out


def ranker_replay(cfg: PlatformConfig, cases, candidates: np.ndarray, retriever: str, params: RankingParams,
                  rankers: tuple[str, ...]) -> dict:
    """Every ranker of ``rankers`` that this run trained reorders ``candidates`` (B, C) of the ``cases``; returns
    the ``ranking`` part of the evaluate stage's result (module docstring): ``retriever``, ``candidates``,
    ``recall@C`` (cases whose item is among the candidates), the retriever's own order's scores, and per ranker its
    HR/NDCG/MRR@K on the same cases beside its test AUC, GAUC and logloss (its train stage's result).

    Raises:
        ModelOutputError: a ranker's folder is unusable.
    """
    from features.results import read_stage_result
    from evaluation.metrics import hit_rate, mrr, ndcg
    from training.artifacts import ModelLayout, load_model, model_dir

    def scores(recs: np.ndarray) -> dict:
        return {f"hr@{params.k}": hit_rate(recs, cases.target, params.k),
                f"ndcg@{params.k}": ndcg(recs, cases.target, params.k), f"mrr@{params.k}": mrr(recs, cases.target,
                                                                                            params.k)}

    feats = read_case_features(cfg, cases.event_id)
    out = {"retriever": retriever, "candidates": int(candidates.shape[1]), "k": params.k, "cases": len(cases),
           f"recall@{candidates.shape[1]}": float((candidates == cases.target[:, None]).any(axis=1).mean()),
           "retriever_order": scores(candidates[:, :params.k]), "rankers": {}}
    for name in rankers:
        folder = model_dir(cfg.run_dir, name)
        if not ModelLayout(folder).state.exists():
            continue  # not trained in this run
        loaded = load_model(folder)
        trained = read_stage_result(cfg, f"train_{name}")
        out["rankers"][name] = scores(rank_candidates(loaded, feats, candidates, params)) | {
            "model_version": loaded.version,
            **{k: trained[k] for k in ("test_auc", "test_gauc", "test_logloss") if k in trained}}
    return out
