"""What the HTTP service answers from: one immutable ``ServingBundle`` per model version, loaded whole from a run
dir and swapped atomically (``serving.app``), plus the policy that decides when a newer version on disk is loaded.

A bundle holds
- the retrieval model's items and HNSW index, from one of three sources (``BundleSpec.source``):
  ``export``, the run dir's newest export (``<run_dir>/embeddings/<retrieval>/``, ``serving.export``);
  ``registry``, a chosen version of the Delta registry ``gold.item_embeddings`` (``BundleSpec.version``); or
  ``published``, the registry version the publish gate points at (the pointer file of ``serving.publish``). A
  registry version's index is built once with ``BundleSpec.hnsw``, its recall@10 measured and both saved
  (``serving.registry.materialize``);
- the ranker, any registered ranker (``BundleSpec.ranker_model``; DeepFM by default), rebuilt unsharded from its
  model folder by ``training.artifacts.load_model``, its pooled lookups fused for serving (``serving.fused``; kept
  only where a probe request gives the model's own logits);
- user profiles and item genres from the lake's Parquet export of ``gold.ctr_samples``: a user's side-feature
  indices from their latest sample, their items in time order with the stars given (recent = the last
  ``recent_items``; seen = all; the behaviour history a sequence ranker reads = the last ``MAX_HISTORY``);
- the point-in-time counters the ranker reads as dense features (``features.definitions.DENSE_FEATURES``), as of
  now: each user's and item's events in the export and their mean rating;
- the popularity list (positive labels of the train split per item, most first; ties by item id): the fallback.

Recommendation (``recommend``), per request:
1. unknown user -> ``popularity`` fallback (the most popular items);
2. candidates: the union, in order, of the ``per_item`` nearest items (ANN, cosine) of each recent item, minus the
   items the user has seen (each item's neighbours are searched once and kept, ``NeighbourCache``); for a
   retriever with a query encoder of its own (``ModelSpec.query_encoder``, e.g. matrix factorisation's user
   vector) the ``recent_items * per_item`` nearest items to the user's query instead (it needs the model folder of
   the served version: the export's);
3. rank the candidates with the ranker in one batched forward pass, each candidate a row holding every declared
   feature the ranker reads (user features, candidate item, its genres, the behaviour history and its stars, the
   user's and the item's counters); score = sigmoid(logit), the predicted probability of a rating >= 4; best
   first, ties by ``item_idx``; the items' source is ``ann+<ranker>``;
4. fewer than ``k`` candidates -> the rest filled with unseen popular items (``source="popularity"``).

Legend: N items in the index, D embedding dim, C candidates.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from features.config import ModelsConfig, PlatformConfig
from features.definitions import MAX_HISTORY, dense_features_named, dense_inputs, rating_levels
from features.errors import PlatformError
from features.tables import CTR_SAMPLES, parquet_export
from serving.ann import HnswParams, ItemIndex
from serving.embeddings import INDEX_FILE, PARQUET_FILE, embeddings_dir, model_dir, read_exported
from serving.publish import pointer_path, read_pointer
from training.artifacts import ModelLayout, ModelOutputError

log = logging.getLogger(__name__)

USER_FEATURES = ("user_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx")
SOURCES = ("export", "registry", "published")


class BundleError(PlatformError):
    """A bundle's inputs are missing or inconsistent; the message names the file and the stage that writes it."""


@dataclass(frozen=True)
class BundleSpec:
    """Which models a bundle serves and how candidates are generated.

    Args:
        retrieval_model: model whose item embeddings and ANN index give candidates and similar items (default:
            the configuration's ``models.retrieval``).
        ranker_model: the registered ranker that ranks candidates (``training.registry.list_models("ranker")``;
            default: the configuration's ``models.ranker``).
        recent_items: R, most recent items of a user used as ANN queries.
        per_item: neighbours fetched per recent item.
        source: where the retrieval embeddings come from: ``export``, ``registry`` or ``published`` (see the
            module docstring).
        version: the registry model version; required with ``source="registry"``, else ``None``.
        hnsw: parameters of the index built for a registry version (an export's index keeps its own).

    Raises:
        ValueError: a count is below 1, an unknown source, or ``version`` given without the registry source
            (or missing with it, or not a valid version name).
    """

    retrieval_model: str = ModelsConfig().retrieval
    ranker_model: str = ModelsConfig().ranker
    recent_items: int = 5
    per_item: int = 50
    source: str = "export"
    version: str | None = None
    hnsw: HnswParams = HnswParams()

    def __post_init__(self) -> None:
        if self.recent_items < 1 or self.per_item < 1:
            raise ValueError(f"recent_items and per_item must be >= 1, got {self.recent_items}, {self.per_item}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        from training.registry import list_models

        if self.ranker_model not in list_models("ranker"):
            raise ValueError(f"ranker_model must be a registered ranker, one of {list_models('ranker')}, got "
                             f"{self.ranker_model!r}")
        if (self.version is not None) != (self.source == "registry"):
            raise ValueError(f"a version is given with source='registry' and only then; got source="
                             f"{self.source!r}, version={self.version!r}")
        if self.version is not None:
            from serving.registry import check_version

            check_version(self.version)


@dataclass(frozen=True)
class UserProfile:
    """A known user: ``features`` (the ``USER_FEATURES`` indices), ``items`` (item_idx in time order),
    ``counters`` (``user_prior_events``, ``user_prior_rating``: their events so far and mean rating), ``levels``
    (the ``t_rating`` row of the stars given to each of ``items``, aligned; empty when unknown)."""

    features: dict
    items: tuple[int, ...]
    seen: frozenset = field(default=frozenset())
    counters: dict = field(default_factory=dict)
    levels: tuple[int, ...] = ()


def request_rows(profile: UserProfile, cand: list[int], item_genres: dict) -> list[dict]:
    """The rule ``RankerInputs`` implements, one dict per candidate item_idx (the reference its test compares with):
    every declared sparse feature a ranker may read -- the user's side features, the candidate and its genres, the
    behaviour history (the last ``MAX_HISTORY`` items, most recent last) and its stars (level 0 when unknown)."""
    history = list(profile.items[-MAX_HISTORY:])
    levels = list(profile.levels[-MAX_HISTORY:]) if profile.levels else [0] * len(history)
    return [{**profile.features, "item_idx": c, "genre_idx": list(item_genres.get(c, ())),
             "hist_item_idx": history, "hist_rating": levels} for c in cand]


class RankerInputs:
    """The ranker's inputs for one user and C candidates, built with numpy from arrays prepared once per bundle:
    the same KJT as ``kjt_of_rows(request_rows(profile, cand, item_genres), features)`` and the same dense
    matrix, without a Python dict per candidate.

    Args:
        features: the sparse features the ranker reads (``ModelSpec.features_of``), in KJT key order.
        dense_names: the dense features it reads (its config's ``dense_features``), in input order.
        item_genres: item_idx -> genre_idx tuple.
        item_counters: item_idx -> ``{item_prior_events, item_prior_rating}``.
        n_rows: item_idx values are below this.

    Call: ``build(profile, cand (C,) int64 item_idx) -> (KJT with C rows per key, dense (C, F_dense) | None)``.

    Raises (from ``build``):
        KeyError: the ranker reads a sparse feature that serving does not provide.
    """

    def __init__(self, features, dense_names, item_genres: dict, item_counters: dict, n_rows: int) -> None:
        self.features = tuple(features)
        self.dense = dense_features_named(dense_names) if dense_names else ()
        lengths = np.zeros(n_rows, np.int64)
        for i, g in item_genres.items():
            lengths[i] = len(g)
        self.genre_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n_rows + 1,)
        self.genre_values = np.fromiter((x for i in range(n_rows) for x in item_genres.get(i, ())), np.int64,
                                        count=int(lengths.sum()))
        raw = {f.name: np.full(n_rows, np.nan) for f in self.dense if f.name.startswith("item_")}
        for i, counters in item_counters.items():
            for name, column in raw.items():
                column[i] = counters.get(name, np.nan)
        # the items' dense columns as the model reads them, once per bundle: (n_rows,) float32 each
        self.item_dense = {f.name: dense_inputs({f.name: raw[f.name]}, (f,))[:, 0] for f in self.dense
                           if f.name in raw}
        self.user_dense = tuple(f for f in self.dense if f.name not in raw)

    def _genres(self, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = self.genre_offsets[cand]
        lens = self.genre_offsets[cand + 1] - starts
        # position p of candidate j's slice reads genre_values[starts_j + p - (first position of j)]
        gather = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        return self.genre_values[gather], lens

    def build(self, profile: UserProfile, cand: np.ndarray):
        import torch
        from torchrec import KeyedJaggedTensor

        c = len(cand)
        history = np.asarray(profile.items[-MAX_HISTORY:], dtype=np.int64)
        levels = (np.asarray(profile.levels[-MAX_HISTORY:], dtype=np.int64) if profile.levels
                  else np.zeros(len(history), np.int64))
        same = {**profile.features, "hist_item_idx": history, "hist_rating": levels}  # one value for every row
        values, lengths = [], []
        for f in self.features:
            if f.name == "item_idx":
                v, n = cand, np.ones(c, np.int64)
            elif f.name == "genre_idx":
                v, n = self._genres(cand)
            elif f.multi_hot:
                row = np.asarray(same[f.name], dtype=np.int64)
                v, n = np.tile(row, c), np.full(c, len(row), np.int64)
            else:
                v, n = np.full(c, int(same[f.name]), np.int64), np.ones(c, np.int64)
            values.append(v)
            lengths.append(n)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f.name for f in self.features],
                                                  values=torch.from_numpy(np.concatenate(values)),
                                                  lengths=torch.from_numpy(np.concatenate(lengths)))
        if not self.dense:
            return kjt, None
        user = iter(dense_inputs({f.name: [profile.counters.get(f.name)] for f in self.user_dense},
                                 self.user_dense)[0] if self.user_dense else ())  # null read as 0, as in training
        dense = np.empty((c, len(self.dense)), np.float32)  # (C, F_dense)
        for j, f in enumerate(self.dense):
            dense[:, j] = self.item_dense[f.name][cand] if f.name in self.item_dense else next(user)
        return kjt, torch.from_numpy(dense)


class NeighbourCache:
    """The ``k`` ANN neighbours of each indexed item, searched on the item's first use and kept: in a served index
    an item's neighbours never change, and one HNSW search per recent item was most of a request's candidate time.

    Args:
        index: the served index.
        vectors: (N, D) its items' vectors, a row per item (``ServingBundle.vectors``).
        k: neighbours kept per item (at most N).

    Call: ``of_rows(rows: list of R row numbers of vectors) -> (R, k) int64`` item_idx, best first, ``-1`` where
    fewer were found: the same as ``index.search(vectors[rows], k)[1]``. Holds at most N x k ids (8 bytes each).
    """

    def __init__(self, index: ItemIndex, vectors: np.ndarray, k: int) -> None:
        self.index, self.vectors, self.k = index, vectors, k
        self._of_row: dict[int, np.ndarray] = {}

    def of_rows(self, rows: list[int]) -> np.ndarray:
        missing = [r for r in rows if r not in self._of_row]
        if missing:
            _, idx = self.index.search(self.vectors[missing], self.k)  # (M, k)
            self._of_row.update(zip(missing, idx))
        return np.stack([self._of_row[r] for r in rows])  # (R, k)


@dataclass(frozen=True)
class Scored:
    item_id: int
    score: float
    source: str


@dataclass(frozen=True)
class ServingBundle:
    """Everything one model version serves with; never mutated after ``load_bundle`` builds it, but for the
    neighbour cache filling up as items are first asked for."""

    spec: BundleSpec
    retrieval_version: str
    ranker_version: str                 # "" when no ranker is present
    item_ids: np.ndarray                # (N,) int64
    item_idx: np.ndarray                # (N,) int64
    vectors: np.ndarray                 # (N, D) float32 as trained
    index: ItemIndex
    row_of_id: dict
    id_of_idx: dict
    row_of_idx: dict
    popular: tuple[tuple[int, float], ...]   # (item_id, positive count), most popular first
    users: dict                              # user_id -> UserProfile
    item_genres: dict                        # item_idx -> tuple of genre_idx
    ranker: object | None                    # training.artifacts.LoadedModel (module in eval mode), or None
    loaded_at: float = 0.0                   # unix seconds
    item_counters: dict = field(default_factory=dict)  # item_idx -> {item_prior_events, item_prior_rating}
    encoder: object | None = None            # the retriever's own training.query.QueryEncoder, or None
    ranker_inputs: RankerInputs | None = None  # built from the fields above when a ranker is present
    neighbours: NeighbourCache | None = None  # each item's ``spec.per_item`` ANN neighbours, filled on first use

    @property
    def version(self) -> str:
        """``<ranker version>+<retrieval version>``: what /health and /metrics report."""
        return f"{self.ranker_version or 'none'}+{self.retrieval_version}"

    # ------------------------------------------------------------------------------------------ answers
    def popular_items(self, k: int, exclude: frozenset = frozenset()) -> list[Scored]:
        """The ``k`` most popular item ids not in ``exclude`` (item ids), score = positive count."""
        out = []
        for item_id, count in self.popular:
            if item_id not in exclude:
                out.append(Scored(item_id, float(count), "popularity"))
                if len(out) == k:
                    break
        return out

    def similar_items(self, item_id: int, k: int) -> tuple[list[Scored], str | None]:
        """Top-``k`` items by cosine to ``item_id`` (itself excluded) and the fallback used (``None`` or
        ``"popularity"`` for an unknown item)."""
        row = self.row_of_id.get(item_id)
        if row is None:
            return self.popular_items(k), "popularity"
        scores, idx = self.index.search(self.vectors[row:row + 1], min(k + 1, self.index.ntotal))
        own = int(self.item_idx[row])
        out = [Scored(self.id_of_idx[int(i)], float(s), "ann") for s, i in zip(scores[0], idx[0])
               if i >= 0 and int(i) != own]
        return out[:k], None

    def candidates(self, profile: UserProfile) -> list[int]:
        """Candidate item_idx for a user: ANN neighbours of the recent items, unseen, in first-found order."""
        if self.encoder is not None:  # the retriever's own query (e.g. a user vector)
            query, _ = self.encoder.encode(np.array([profile.features["user_idx"]]), [np.array(profile.items)])
            n = min(self.spec.recent_items * self.spec.per_item + len(profile.seen), self.index.ntotal)
            _, idx = self.index.search(query, n)  # (1, n)
        else:
            rows = [self.row_of_idx[i] for i in profile.items if i in self.row_of_idx][-self.spec.recent_items:]
            if not rows:
                return []
            idx = self.neighbours.of_rows(rows)  # (R, P)
        out, taken = [], set(profile.seen)
        for i in idx.reshape(-1).tolist():
            if i >= 0 and i not in taken:
                taken.add(i)
                out.append(i)
        return out

    def score(self, profile: UserProfile, cand: list[int]) -> np.ndarray:
        """(C,) the ranker's probabilities of a positive rating for ``profile`` and each candidate item_idx, in one
        batched forward pass over inputs built by ``RankerInputs`` (the values of ``request_rows``)."""
        import torch

        features, dense = self.ranker_inputs.build(profile, np.asarray(cand, dtype=np.int64))
        with torch.inference_mode():
            logits = self.ranker.module(features, dense)  # (C,)
            return torch.sigmoid(logits).numpy().astype(np.float64)

    def recommend(self, user_id: int, k: int) -> tuple[list[Scored], str | None]:
        """Top-``k`` items for ``user_id`` (see the module docstring) and the fallback used, if any."""
        profile = self.users.get(user_id)
        if profile is None:
            return self.popular_items(k), "popularity"
        if self.ranker is None:
            return self.popular_items(k, self._seen_ids(profile)), "popularity"
        cand = self.candidates(profile)
        if not cand:
            return self.popular_items(k, self._seen_ids(profile)), "popularity"
        probs = self.score(profile, cand)
        order = np.lexsort((np.asarray(cand), -probs))[:k].tolist()  # best first, ties by item_idx
        source = f"ann+{self.spec.ranker_model}"
        out = [Scored(self.id_of_idx[cand[j]], float(probs[j]), source) for j in order]
        if len(out) < k:
            exclude = self._seen_ids(profile) | {s.item_id for s in out}
            out += self.popular_items(k - len(out), exclude)
        return out, None

    def _seen_ids(self, profile: UserProfile) -> frozenset:
        return frozenset(self.id_of_idx[i] for i in profile.seen if i in self.id_of_idx)


# ---------------------------------------------------------------------------------------------- loading
def retrieval_version(cfg: PlatformConfig, spec: BundleSpec) -> str | None:
    """The retrieval version ``spec`` asks for now (cheap: no Spark): the export's (``None`` while its index is
    missing), the pinned registry version, or the published one (``None`` while nothing is published).

    Raises:
        BundleError: the published version is of another model than ``spec.retrieval_model``.
        PointerError: the publish pointer is unreadable.
    """
    if spec.source == "registry":
        return spec.version
    if spec.source == "published":
        pointer = read_pointer(pointer_path(cfg.artifacts_dir))
        if pointer is None:
            return None
        if pointer.get("model") != spec.retrieval_model:
            raise BundleError(f"{pointer_path(cfg.artifacts_dir)} publishes {pointer.get('model')!r}, but the "
                              f"service retrieves with {spec.retrieval_model!r}; start it with that model")
        return str(pointer["model_version"])
    index_json = embeddings_dir(cfg, spec.retrieval_model) / Path(INDEX_FILE).with_suffix(".json")
    if not index_json.exists():
        return None
    return str(json.loads(index_json.read_text()).get("model_version", ""))


def retrieval_dir(cfg: PlatformConfig, spec: BundleSpec) -> Path:
    """The directory with the retrieval items and index ``spec`` asks for; a registry version is materialized
    first (delta-rs, no Spark; seconds) unless it already was.

    Raises:
        BundleError: nothing is published yet (``source="published"``).
        VersionNotFoundError: the registry lacks the version.
    """
    if spec.source == "export":
        return embeddings_dir(cfg, spec.retrieval_model)
    from serving.registry import materialize

    version = retrieval_version(cfg, spec)
    if version is None:
        raise BundleError("no embedding version has been published yet (evaluation.gate writes "
                          "<artifacts_dir>/serving/current.json); run the evaluate stage or serve a registry version")
    return materialize(cfg, spec.retrieval_model, version, spec.hnsw)


def on_disk_versions(cfg: PlatformConfig, spec: BundleSpec) -> tuple[str, str] | None:
    """``(ranker_version, retrieval_version)`` of what ``spec`` asks for now, ``None`` while the retrieval index is
    missing (nothing exported or published). The ranker version is ``""`` when the ranker has no outputs."""
    retrieval = retrieval_version(cfg, spec)
    if retrieval is None:
        return None
    meta = ModelLayout(model_dir(cfg, spec.ranker_model)).meta
    ranker = str(json.loads(meta.read_text()).get("model_version", "")) if meta.exists() else ""
    return ranker, retrieval


def _load_ranker(cfg: PlatformConfig, spec: BundleSpec):
    """The ranker's ``LoadedModel`` (unsharded, eval mode) and version, or ``(None, "")`` when it has no outputs.

    Raises:
        BundleError: the ranker's weights do not fit its recorded configuration.
    """
    from training.artifacts import load_model

    layout = ModelLayout(model_dir(cfg, spec.ranker_model))
    if not layout.state.exists() or not layout.meta.exists():
        log.warning("no %s: /recommend serves the popularity fallback", layout.state)
        return None, ""
    try:
        loaded = load_model(layout.root)
    except ModelOutputError as e:
        raise BundleError(str(e)) from e
    return loaded, loaded.version


def _load_encoder(cfg: PlatformConfig, spec: BundleSpec, version: str):
    """The retriever's own query encoder (``ModelSpec.query_encoder``) from its model folder, or None for a
    retriever queried by its items (the union of the recent items' neighbours).

    Raises:
        BundleError: the model folder holds another version than the one served (a registry or published version
            keeps item vectors only), or is unusable.
    """
    from training.query import own_query_encoder
    from training.registry import get_model

    if get_model(spec.retrieval_model).query_encoder is None:
        return None  # no model folder needed: a registry version keeps item vectors only
    folder = model_dir(cfg, spec.retrieval_model)
    try:
        encoder, meta = own_query_encoder(folder)
    except (OSError, ModelOutputError) as e:
        raise BundleError(f"{folder}: {e}") from e
    if meta.get("model_version") != version:
        raise BundleError(f"{spec.retrieval_model} queries with its own encoder, from {folder} (version "
                          f"{meta.get('model_version')!r}), but the served item vectors are version {version!r}; "
                          f"serve the export of that model folder")
    return encoder


def _counters(t, key: str, entity: str) -> dict:
    """``{key value: {<entity>_prior_events, <entity>_prior_rating}}``: events and mean rating of each, as of now."""
    stats = t.groupby(key)["rating"].agg(["size", "mean"])
    return {int(k): {f"{entity}_prior_events": int(n), f"{entity}_prior_rating": float(m)}
            for k, n, m in stats.itertuples()}


def _load_lake(cfg: PlatformConfig) -> tuple[dict, dict, tuple, dict]:
    """User profiles, item genres, popularity counts and the items' counters from the ``gold.ctr_samples`` Parquet
    export; empty when the export is missing (every user is then unknown)."""
    import pyarrow.dataset as ds

    path = Path(parquet_export(CTR_SAMPLES, cfg.lake_dir))
    if not path.exists():
        log.warning("no %s: every user gets the popularity fallback", path)
        return {}, {}, (), {}
    t = ds.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["user_id", "item_id", "item_idx", "label", "rating", "event_time", "event_id", "split",
                 "genre_idx", *USER_FEATURES]).to_pandas()
    t = t.sort_values(["event_time", "event_id"], kind="stable")
    user_counters = _counters(t, "user_id", "user")
    by_user = t.sort_values("user_id", kind="stable")  # user-major, each user's events still in time order
    uid = by_user["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    ends = np.r_[starts[1:], len(uid)]
    item_col, level_col = by_user["item_idx"].to_numpy(), rating_levels(by_user["rating"])
    side = {f: by_user[f].to_numpy() for f in USER_FEATURES}
    users = {}
    for s, e in zip(starts.tolist(), ends.tolist()):  # the user's side features from their latest sample
        items = tuple(item_col[s:e].tolist())
        users[int(uid[s])] = UserProfile({f: int(side[f][e - 1]) for f in USER_FEATURES}, items, frozenset(items),
                                         user_counters[int(uid[s])], tuple(level_col[s:e].tolist()))
    genres = {int(i): tuple(int(x) for x in gs) for i, gs in
              t.drop_duplicates("item_idx", keep="last")[["item_idx", "genre_idx"]].itertuples(index=False)}
    pos = t[(t["split"] == "train") & (t["label"] == 1)].groupby("item_id").size()
    popular = tuple(sorted(((int(i), int(c)) for i, c in pos.items()), key=lambda x: (-x[1], x[0])))
    return users, genres, popular, _counters(t, "item_idx", "item")


def _fuse_lookups(ranker, inputs: RankerInputs, users: dict, item_idx: np.ndarray, n_probe: int = 3) -> None:
    """Fuse the ranker's pooled lookups in place (``serving.fused``), checked on the requests of the first
    ``n_probe`` users with up to 64 indexed items as candidates; left unfused without users (nothing to score)."""
    import torch

    from serving.fused import fuse_lookups

    try:
        probes = [inputs.build(p, item_idx[:64]) for p in list(users.values())[:n_probe]]
        if probes:
            fused = fuse_lookups(ranker.module, lambda m: torch.cat([m(f, dense) for f, dense in probes]))
            log.info("%s: fused lookups %s", ranker.spec.name, fused or "none")
    except Exception:  # the model fails on its own inputs: leave it as it is; /recommend will say why
        log.exception("%s: cannot probe the ranker; serving it unfused", ranker.spec.name)


def load_bundle(cfg: PlatformConfig, spec: BundleSpec | None = None) -> ServingBundle:
    """Read everything a bundle needs (seconds: the lake export dominates).

    Raises:
        IndexFileError: the retrieval model has not been exported.
        VersionNotFoundError: the registry lacks the requested version.
        BundleError: the ranker's weights do not fit its configuration, the index and the Parquet file hold
            different versions (an export is being written), or nothing is published yet.
    """
    spec = spec if spec is not None else BundleSpec()  # not a default argument: it reads the registry (torch)
    t0 = time.time()
    d = retrieval_dir(cfg, spec)
    index = ItemIndex.load(d / INDEX_FILE)
    table, vectors = read_exported(d / PARQUET_FILE)
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    item_idx = table.column("item_idx").to_numpy().astype(np.int64)
    version = table.column("model_version")[0].as_py() if table.num_rows else ""
    if index.extra.get("model_version", version) != version:   # caught mid-export: retry on the next check
        raise BundleError(f"{d}: {PARQUET_FILE} holds version {version!r} but the index "
                          f"{index.extra['model_version']!r}; wait for `python -m serving.export` to finish")
    ranker, ranker_version = _load_ranker(cfg, spec)
    encoder = _load_encoder(cfg, spec, version)
    users, genres, popular, item_counters = _load_lake(cfg)
    if not popular:  # no lake: every exported item, in id order, so the fallback is still defined
        popular = tuple((int(i), 0) for i in sorted(item_ids.tolist()))
    ranker_inputs = None
    if ranker is not None:
        n_rows = 1 + max([int(item_idx.max(initial=0)), *genres, *item_counters])
        ranker_inputs = RankerInputs(ranker.spec.features_of(ranker.config),
                                     getattr(ranker.config, "dense_features", ()), genres, item_counters, n_rows)
        _fuse_lookups(ranker, ranker_inputs, users, item_idx)
    return ServingBundle(
        spec=spec, retrieval_version=version, ranker_version=ranker_version, item_ids=item_ids,
        item_idx=item_idx, vectors=vectors, index=index,
        row_of_id={int(i): r for r, i in enumerate(item_ids)},
        id_of_idx=dict(zip(item_idx.tolist(), item_ids.tolist())),
        row_of_idx={int(i): r for r, i in enumerate(item_idx)},
        popular=popular, users=users, item_genres=genres, ranker=ranker, loaded_at=t0, item_counters=item_counters,
        encoder=encoder, ranker_inputs=ranker_inputs,
        neighbours=NeighbourCache(index, vectors, min(spec.per_item, index.ntotal)))


# ----------------------------------------------------------------------------------------------- policy
class ReloadDecision(Enum):
    KEEP = "keep"
    RELOAD = "reload"


@dataclass(frozen=True)
class VersionChangePolicy:
    """Reload when the versions on disk differ from the served ones and the retrieval index is complete; never
    reload to nothing.

    >>> p = VersionChangePolicy()
    >>> [p.decide(("a", "r1"), d).value for d in (("a", "r1"), ("b", "r1"), None)]
    ['keep', 'reload', 'keep']
    >>> p.decide(("a", "r1"), ("a", "r1"), force=True).value
    'reload'
    """

    def decide(self, served: tuple[str, str], on_disk: tuple[str, str] | None, force: bool = False
               ) -> ReloadDecision:
        if on_disk is None:
            return ReloadDecision.KEEP
        return ReloadDecision.RELOAD if force or on_disk != served else ReloadDecision.KEEP
