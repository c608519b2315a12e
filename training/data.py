"""Reading the Parquet exports into batches for the models.

CTR samples (rankers): each rank reads its shard of ``export/ctr_samples/split=<split>`` with pyarrow (rows
``rank::world_size``) and iterates fixed-size batches as ``KeyedJaggedTensor`` s. Every rank yields the same number
of batches of the same size, because the sharded embedding lookup is a collective: the last batch is padded with
repeated rows whose weight is 0.

Item sequences (the skip-gram task): skip-gram pairs with word2vec's dynamic window, frequent-item subsampling
(Mikolov et al. 2013, keep probability ``(sqrt(f / t) + 1) * t / f``) and negatives from the unigram^0.75
distribution.

Legend: N rows, B batch size, K negatives per pair.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch
from torchrec import KeyedJaggedTensor

from features.definitions import (DENSE_FEATURES, RATING_LEVELS, SPARSE_FEATURES, DenseFeature, SparseFeature,
                                  dense_inputs)
from features.errors import TableNotFoundError
from features.tables import (CTR_SAMPLES, ITEM_SEQUENCES, TableSpec, export_versions_path,
                             parquet_export, vocab_sizes_path)
from training.modules.cold_ids import drop_ids

log = logging.getLogger(__name__)

PRODUCER = "the features stage (spark-submit pipelines/features_batch.py)"


def synthetic_vocab_sizes() -> dict[str, int]:
    """Small vocabulary sizes for examples and tests (MovieLens-100K's side-feature sizes, few users/items)."""
    return {"user": 30, "item": 40, "age_bucket": 8, "gender": 3, "occupation": 22, "zip_prefix": 12, "genre": 20,
            "rating": RATING_LEVELS}


def read_vocab_sizes(lake_dir: str | Path) -> dict[str, int]:
    """``export/vocab_sizes.json``: rows per vocabulary, index 0 included.

    Raises:
        TableNotFoundError: the file has not been exported yet.
    """
    path = vocab_sizes_path(lake_dir)
    if not path.exists():
        raise TableNotFoundError("vocab_sizes", str(path), PRODUCER)
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


def read_training_versions(lake_dir: str | Path, tables: Sequence[TableSpec]) -> dict[str, int]:
    """``{table name: Delta version}`` of ``tables`` (a model's ``ModelSpec.tables``), as the features stage
    recorded them when it wrote the Parquet exports (``export/delta_versions.json``). Empty when the exports
    predate that record (logged): the caller then has no provenance to record.
    """
    path = export_versions_path(lake_dir)
    if not path.exists():
        log.warning("%s not found (exports written before the features stage recorded versions); the model is "
                    "trained without recorded table versions: re-run the features stage", path)
        return {}
    recorded = json.loads(path.read_text())
    missing = [t.name for t in tables if t.name not in recorded]
    if missing:
        log.warning("%s lacks %s; recording only the others", path, missing)
    return {t.name: int(recorded[t.name]) for t in tables if t.name in recorded}


# ----------------------------------------------------------------------------------------------- CTR samples
@dataclass
class CtrShard:
    """One rank's rows of a CTR split, column-wise.

    ``ids[name]`` is (N,) int64 for a one-hot feature; a multi-hot feature has ``values[name]`` (total ids,) and
    ``offsets[name]`` (N + 1,). ``label`` (N,) float32, ``user`` (N,) int64 for GAUC, ``time`` (N,) float64 event
    time in seconds since the epoch (None when the export has no ``event_time``, e.g. ``bench.models``'
    generated data), ``dense`` (N, F_dense) float32 model input of the dense features
    (``features.definitions.dense_inputs``; (N, 0) when none are read).
    """

    ids: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    label: np.ndarray
    user: np.ndarray
    time: np.ndarray | None = None
    dense: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)


def exported_columns(lake_dir: str | Path) -> set[str]:
    """The columns of the ``ctr_samples`` export (read from one Parquet footer); empty when nothing is exported."""
    files = sorted(Path(parquet_export(CTR_SAMPLES, lake_dir)).glob("split=*/*.parquet"))
    return set(ds.dataset(str(files[0]), format="parquet").schema.names) if files else set()


def exported_dense_features(lake_dir: str | Path,
                            features: Sequence[DenseFeature] = DENSE_FEATURES) -> tuple[DenseFeature, ...]:
    """``features`` if the ``ctr_samples`` export has all their columns, else () (an export written before the
    features stage computed them, or ``bench.models``' generated data, which has no ratings history)."""
    names = exported_columns(lake_dir)
    return tuple(features) if all(f.name in names for f in features) else ()


def read_ctr_shard(lake_dir: str | Path, split: str, rank: int = 0, world_size: int = 1,
                   features: Sequence[SparseFeature] = SPARSE_FEATURES,
                   dense_features: Sequence[DenseFeature] = ()) -> CtrShard:
    """Rows ``rank::world_size`` of ``export/ctr_samples/split=<split>``.

    Raises:
        TableNotFoundError: the split has not been exported.
        KeyError: a column of ``dense_features`` is not in the export (see :func:`exported_dense_features`).
    """
    path = Path(parquet_export(CTR_SAMPLES, lake_dir)) / f"split={split}"
    if not path.exists() or not any(path.glob("*.parquet")):
        raise TableNotFoundError(f"{CTR_SAMPLES.name} split={split}", str(path), PRODUCER)
    dataset = ds.dataset(str(path), format="parquet")
    timed = "event_time" in dataset.schema.names  # an export written without it (e.g. bench's generated) has none
    missing = [f.name for f in dense_features if f.name not in dataset.schema.names]
    if missing:
        raise KeyError(f"{CTR_SAMPLES.name} split={split} at {path} has no column(s) {missing}; re-run {PRODUCER}")
    columns = sorted({f.name for f in features} | {f.name for f in dense_features} | {"label", "user_idx"}
                     | ({"event_time"} if timed else set()))
    table = dataset.to_table(columns=columns)
    table = table.take(np.arange(rank, table.num_rows, world_size))
    ids, values, offsets = {}, {}, {}
    for f in features:
        col = table.column(f.name).combine_chunks()
        if f.multi_hot:
            col = col.fill_null([]) if col.null_count else col
            offsets[f.name] = col.offsets.to_numpy().astype(np.int64) - col.offsets[0].as_py()
            values[f.name] = col.flatten().fill_null(0).to_numpy().astype(np.int64)
        else:
            ids[f.name] = col.fill_null(0).to_numpy().astype(np.int64)
    label = table.column("label").to_numpy().astype(np.float32)
    user = table.column("user_idx").to_numpy().astype(np.int64)
    time = table.column("event_time").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy() / 1e6 if timed else None
    dense = dense_inputs({f.name: table.column(f.name).to_numpy(zero_copy_only=False) for f in dense_features},
                         dense_features) if dense_features else np.zeros((len(label), 0), np.float32)
    return CtrShard(ids, values, offsets, label, user, time, dense)


def recency_weights(time: np.ndarray, half_life_s: float, now: float) -> np.ndarray:
    """Sample weights that halve every ``half_life_s`` seconds before ``now``, scaled to mean 1: ``w_i =
    2 ** -((now - t_i) / half_life_s) / mean(w)``. The training loss is the weighted mean over a batch, so recent
    samples count more (time-decayed training, as for non-stationary click logs).

    Args:
        time: (N,) event times in seconds.
        half_life_s: > 0.
        now: the time the decay counts back from (the train split's last event).

    Raises:
        ValueError: ``half_life_s`` <= 0.

    >>> [round(float(w), 3) for w in recency_weights(np.array([0.0, 10.0, 20.0]), 10.0, 20.0)]  # 1/4 : 1/2 : 1
    [0.429, 0.857, 1.714]
    """
    if half_life_s <= 0:
        raise ValueError(f"half-life must be > 0 s, got {half_life_s}")
    w = np.exp2(-(now - np.asarray(time, np.float64)) / half_life_s)
    return (w / w.mean()).astype(np.float32)


def num_batches(total_rows: int, world_size: int, batch_size: int) -> int:
    """Batches per rank so that every rank covers its ``ceil(N / world_size)`` rows.

    >>> num_batches(10, 2, 2)
    3
    """
    per_rank = -(-total_rows // world_size)
    return max(1, -(-per_rank // batch_size))


def kjt_of_rows(rows: Sequence[Mapping[str, int | Sequence[int]]],
                features: Sequence[SparseFeature] = SPARSE_FEATURES) -> KeyedJaggedTensor:
    """A KJT from a few rows given as dicts (examples, tests, serving one request).

    >>> kjt_of_rows([{"user_idx": 1, "item_idx": 2, "age_idx": 0, "gender_idx": 1, "occupation_idx": 1,
    ...               "zip_idx": 1, "genre_idx": [3, 4]}])["genre_idx"].values()
    tensor([3, 4])
    """
    values, lengths = [], []
    for f in features:
        for row in rows:
            v = row[f.name]
            ids = list(v) if f.multi_hot else [int(v)]
            values += ids
            lengths.append(len(ids))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64))


@dataclass
class CtrBatch:
    """``features`` KJT with B rows per key; ``label``, ``weight`` (0 = padding) (B,) float32; ``user`` (B,);
    ``dense`` (B, F_dense) float32 (F_dense may be 0)."""

    features: KeyedJaggedTensor
    label: torch.Tensor
    weight: torch.Tensor
    user: torch.Tensor
    dense: torch.Tensor | None = None

    def to(self, device: torch.device) -> CtrBatch:
        """The batch for a model on ``device``: features, label and weight moved there; ``user`` (a GAUC key,
        never an input) stays on the CPU. On the CPU, the batch itself.

        >>> b = CtrBatch(kjt_of_rows([{"user_idx": 1, "item_idx": 2, "age_idx": 0, "gender_idx": 1,
        ...              "occupation_idx": 1, "zip_idx": 1, "genre_idx": [3]}]), torch.ones(1), torch.ones(1),
        ...              torch.ones(1, dtype=torch.int64))
        >>> b.to(torch.device("cpu")) is b
        True
        """
        if device.type == "cpu":
            return self
        dense = None if self.dense is None else self.dense.to(device)
        return CtrBatch(self.features.to(device), self.label.to(device), self.weight.to(device), self.user, dense)


def ctr_batches(shard: CtrShard, batch_size: int, n_batches: int, shuffle: bool = False, seed: int = 0,
                features: Sequence[SparseFeature] = SPARSE_FEATURES, id_dropout: float = 0.0,
                dropped: Sequence[str] = (),
                sample_weight: np.ndarray | None = None) -> Iterator[CtrBatch]:
    """Exactly ``n_batches`` batches of exactly ``batch_size`` rows; rows beyond the shard are padding (weight 0).

    With ``id_dropout`` > 0, each row's ids of the one-hot features ``dropped`` are replaced by the OOV row with
    that probability, drawn from ``seed`` (``training.modules.cold_ids.drop_ids``; the row order does not change).
    ``sample_weight`` (N,) multiplies each real row's weight (e.g. ``recency_weights``).

    Raises:
        ValueError: the shard is empty (nothing to pad with), or ``id_dropout`` is outside [0, 1).
    """
    n = len(shard)
    if n == 0:
        raise ValueError("empty CTR shard: every rank needs at least one row")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    total = n_batches * batch_size
    index = np.resize(order, total)  # repeats rows to fill the padding
    weight = (np.arange(total) < n).astype(np.float32)
    if sample_weight is not None:
        weight = weight * np.asarray(sample_weight, np.float32)[index]
    drop_rng = np.random.default_rng([seed, 1])  # its own stream: the order is the same with and without dropout
    dense = shard.dense if shard.dense is not None else np.zeros((n, 0), np.float32)  # (N, F_dense)
    for b in range(n_batches):
        rows = index[b * batch_size:(b + 1) * batch_size]
        values, lengths = [], []
        for f in features:
            if f.multi_hot:
                off = shard.offsets[f.name]
                starts, ends = off[rows], off[rows + 1]
                lengths.append(ends - starts)
                values.append(np.concatenate([shard.values[f.name][s:e] for s, e in zip(starts, ends)])
                              if len(rows) else np.zeros(0, np.int64))
            else:
                lengths.append(np.ones(len(rows), np.int64))
                ids = shard.ids[f.name][rows]
                values.append(drop_ids(ids, id_dropout, drop_rng) if f.name in dropped else ids)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in features],
            values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))
        yield CtrBatch(kjt, torch.from_numpy(shard.label[rows]),
                       torch.from_numpy(weight[b * batch_size:(b + 1) * batch_size]),
                       torch.from_numpy(shard.user[rows]), torch.from_numpy(dense[rows]))


# ------------------------------------------------------------------------------------------------- item2vec
def read_item_sequences(lake_dir: str | Path) -> list[np.ndarray]:
    """Every user's positively rated train-period items in time order (``export/item_sequences``).

    Raises:
        TableNotFoundError: the table has not been exported.
    """
    path = Path(parquet_export(ITEM_SEQUENCES, lake_dir))
    if not path.exists() or not any(path.rglob("*.parquet")):
        raise TableNotFoundError(ITEM_SEQUENCES.name, str(path), PRODUCER)
    table = ds.dataset(str(path), format="parquet").to_table(columns=["user_idx", "item_idx"])
    table = table.sort_by("user_idx")
    return [np.asarray(seq, dtype=np.int64) for seq in table.column("item_idx").to_pylist() if seq]


def item_counts(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """(num_items,) occurrences of each item index in the sequences."""
    if not sequences:
        return np.zeros(num_items, np.int64)
    return np.bincount(np.concatenate(sequences), minlength=num_items)[:num_items]


def keep_probabilities(counts: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """word2vec's subsampling: keep an occurrence of an item of frequency f with probability
    ``min(1, (sqrt(f / t) + 1) * t / f)`` (``t`` = ``threshold``); items never seen get 1.

    >>> keep_probabilities(np.array([0, 1, 99]), threshold=0.01).round(3).tolist()
    [1.0, 1.0, 0.111]
    """
    freq = counts / max(counts.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (np.sqrt(freq / threshold) + 1.0) * threshold / freq
    return np.where(counts > 0, np.minimum(keep, 1.0), 1.0)


def negative_distribution(counts: np.ndarray, power: float = 0.75) -> np.ndarray:
    """(num_items,) sampling probabilities proportional to ``count ** power`` (word2vec's unigram^0.75).

    >>> negative_distribution(np.array([0, 1, 16])).round(3).tolist()
    [0.0, 0.111, 0.889]
    """
    weights = counts.astype(np.float64) ** power
    return weights / weights.sum()


def skipgram_pairs(sequences: Sequence[np.ndarray], window: int, rng: np.random.Generator,
                   keep_prob: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(center, context) pairs, (P,) each: after subsampling each sequence with ``keep_prob``, every item is paired
    with the items at most ``b`` positions away, ``b`` drawn uniformly from 1..window per center (word2vec's
    dynamic window, which weights near neighbours more).

    >>> c, x = skipgram_pairs([np.array([1, 2, 3])], window=1, rng=np.random.default_rng(0))
    >>> sorted(zip(c.tolist(), x.tolist()))
    [(1, 2), (2, 1), (2, 3), (3, 2)]
    """
    centers, contexts = [], []
    for seq in sequences:
        if keep_prob is not None:
            seq = seq[rng.random(len(seq)) < keep_prob[seq]]
        n = len(seq)
        if n < 2:
            continue
        spans = rng.integers(1, window + 1, size=n)  # (n,) effective window per center
        for offset in range(1, window + 1):
            pos = np.arange(n - offset)
            right = spans[pos] >= offset  # center pos -> context pos + offset
            left = spans[pos + offset] >= offset  # center pos + offset -> context pos
            centers += [seq[pos[right]], seq[pos[left] + offset]]
            contexts += [seq[pos[right] + offset], seq[pos[left]]]
    if not centers:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(centers), np.concatenate(contexts)


SGNS_CENTER, SGNS_TARGETS = "center", "targets"


def sgns_kjt(center: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor) -> KeyedJaggedTensor:
    """The KJT of a skip-gram step, as ``training.models.item2vec.Item2Vec`` reads it: key ``center`` (one id per
    pair), key ``targets`` (1 + K ids per pair: the context, then the negatives).

    Args:
        center: (B,) item indices; context: (B,); negatives: (B, K).

    >>> kjt = sgns_kjt(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([[5, 6], [7, 8]]))
    >>> kjt["targets"].values().tolist(), kjt["targets"].lengths().tolist()
    ([3, 5, 6, 4, 7, 8], [3, 3])
    """
    b, k = negatives.shape
    targets = torch.cat([context.view(b, 1), negatives], dim=1).view(-1)  # (B * (1 + K),), pair-major
    lengths = torch.cat([torch.ones(b, dtype=torch.int64), torch.full((b,), 1 + k, dtype=torch.int64)])
    return KeyedJaggedTensor(keys=[SGNS_CENTER, SGNS_TARGETS], values=torch.cat([center, targets]).to(torch.int64),
                             lengths=lengths)
