"""The peer side of ``bench.models``: DeepCTR-Torch, RecBole and gensim trained on this project's Parquet exports.

Runs inside the peers' own virtual environment (``bench/requirements-peers.lock``), as a subprocess of
``bench.models``, so it imports nothing from the project (whose environment pins newer numpy/pyarrow than RecBole
1.2.1 runs with) -- only numpy, pyarrow and the peer under test::

    python bench/peers.py deepctr --lake <lake_dir> --out result.json [--model deepfm|din --epochs 12 --no-dense
                                                                       --no-history-ratings ...]
    python bench/peers.py recbole --lake <lake_dir> --out result.json --work <scratch dir> [--model deepfm|din ...]
    python bench/peers.py gensim  --lake <lake_dir> --out result.json --embeddings items.npy

Every model reads the same time split (``export/ctr_samples/split=train|valid|test``, 80/10/10) and the same
features as ours: user, item, age bucket, gender, occupation, zip prefix (one id each), genres (multi-hot,
sum-pooled), ids as exported (0 = unknown), and the four point-in-time dense features (``DENSE``: the user's and the
item's events before the sample, read as log1p(n), and their mean rating, read as mean - 3.5, 0 when none) as one
(N, 4) float32 matrix, the numbers our models read. An export without the dense columns (``bench.models``'
generated data), or ``--no-dense``, trains without them, as ours does. DeepCTR-Torch takes them as ``DenseFeat``
(DeepFM: linear part and DNN input; DIN: DNN input); RecBole's DeepFM as float fields of the interactions embedded
by ``numerical_features`` (value x a learned vector, in its linear part, FM and DNN); RecBole's DIN reads only user
and item features, so ``run_recbole`` appends the raw values to its DNN input (as DeepCTR's DIN and ours).
DIN reads the behaviour sequence ``hist_item_idx`` and, when the export has it (``exported_history_ratings``; not
with ``--no-history-ratings``), ``hist_rating``, the stars the user gave each behaviour (level 1..5, 0 unknown),
which ours pools with the attention weights. Each peer takes it by its own mechanism for a side sequence that has
no candidate to query it with: DeepCTR-Torch as a mean-pooled ``VarLenSparseFeat`` outside
``history_feature_list``, which its DIN pools into the DNN input; RecBole's DIN as a token sequence of the
interactions that a subclass embeds, mean-pools over the real positions and appends to its DNN input.
DeepFM: embedding dim 16, MLP (128, 64) with ReLU and dropout 0.2, up to 12 epochs, early stopping after 2 epochs
without a higher validation AUC, test figures of the best epoch. Training time counts only the optimisation passes
(no evaluation), as ours does. One torch thread, as each of our Ray workers has.

With ``--predictions PATH`` (deepctr, recbole) the best epoch's test predictions are also written there as Parquet,
one row per test sample, with the columns of our model folder's ``predictions.parquet``
(``training.artifacts.PREDICTION_COLUMNS``: ``row``, ``event_id`` when the export has it, ``user``, ``label``,
``score``, the click probability), keyed the same way, so ``bench.leaderboard_stats`` pairs them with ours.

The result JSON has ``train_samples_per_s`` (or ``pairs_per_s``), ``test_auc``, ``test_logloss``, ``valid_auc``,
``best_epoch``, ``epochs``, ``train_s`` and (deepctr, recbole) ``dense_features``, the dense features used (in input
order; empty when none), and (their DIN) ``history_ratings``, whether it read ``hist_rating``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

ONE_HOT = ("user_idx", "item_idx", "age_idx", "gender_idx", "occupation_idx", "zip_idx")
MULTI_HOT = "genre_idx"
#: vocab_sizes.json key of each feature (as features.definitions.SPARSE_FEATURES declares them).
VOCAB = {"user_idx": "user", "item_idx": "item", "age_idx": "age_bucket", "gender_idx": "gender",
         "occupation_idx": "occupation", "zip_idx": "zip_prefix", "genre_idx": "genre"}
SPLITS = ("train", "valid", "test")
#: DIN's behaviour sequence (features.definitions.HISTORY_FEATURE: most recent last, at most 50, table t_item).
HISTORY, MAX_HISTORY = "hist_item_idx", 50
#: The stars the user gave each behaviour of ``HISTORY`` (same length and order), a level 1..5, 0 unknown, and its
#: vocabulary in vocab_sizes.json (features.definitions.HISTORY_RATING_FEATURE; RATING_LEVELS = 6 rows).
HISTORY_RATING, RATING_VOCAB = "hist_rating", "rating"
#: The dense features, name -> kind, in input order (features.definitions.DENSE_FEATURES): a ``count`` is read as
#: log1p(n), a ``rating`` as mean - RATING_CENTER; null (no earlier event) as 0.
DENSE = {"user_prior_events": "count", "user_prior_rating": "rating",
         "item_prior_events": "count", "item_prior_rating": "rating"}
#: Stars subtracted from a mean rating (features.definitions.RATING_CENTER).
RATING_CENTER = 3.5
#: The columns of a predictions file (training.artifacts.PREDICTION_COLUMNS; event_id only when exported).
PREDICTION_COLUMNS = ("row", "event_id", "user", "label", "score")


# ---------------------------------------------------------------------------------------- shared reading
def vocab_sizes(lake: Path) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads((lake / "export" / "vocab_sizes.json").read_text()).items()}


def _padded(lists: list, width: int) -> np.ndarray:
    out = np.zeros((len(lists), width), np.int64)
    for i, v in enumerate(lists):
        out[i, :len(v)] = v[:width]
    return out


def exported_dense(lake: Path) -> tuple[str, ...]:
    """The names of ``DENSE`` if every split of ``export/ctr_samples`` has all their columns, else () (an export
    written before the features stage computed them, or ``bench.models``' generated data). As
    ``training.data.exported_dense_features``."""
    root = lake / "export" / "ctr_samples"
    names = [set(ds.dataset(str(root / f"split={s}"), format="parquet").schema.names) for s in SPLITS]
    return tuple(DENSE) if all(set(DENSE) <= n for n in names) else ()


def exported_history_ratings(lake: Path) -> bool:
    """Whether every split of ``export/ctr_samples`` has ``HISTORY_RATING`` (DIN then reads it, as
    ``training.train`` does when ``training.data.exported_columns`` has it).

    Raises:
        KeyError: the export has the column but ``vocab_sizes.json`` has no ``RATING_VOCAB`` (re-export it).
    """
    root = lake / "export" / "ctr_samples"
    found = all(HISTORY_RATING in ds.dataset(str(root / f"split={s}"), format="parquet").schema.names
                for s in SPLITS)
    if found and RATING_VOCAB not in vocab_sizes(lake):
        raise KeyError(f"{root} has {HISTORY_RATING} but {lake / 'export' / 'vocab_sizes.json'} has no "
                       f"{RATING_VOCAB!r} size; re-export the vocabularies with the features job")
    return found


def dense_inputs(t, names: tuple[str, ...]) -> np.ndarray:
    """The (N, F) float32 model input of the dense features ``names`` from the columns of the Arrow table ``t``:
    a count -> log1p(n), a rating -> mean - RATING_CENTER, null -> 0. The lines of
    ``features.definitions.dense_inputs`` (which this environment cannot import), so the numbers are ours."""
    out = []
    for name in names:
        x = np.asarray(t.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)  # null -> nan
        x = np.where(np.isnan(x), 0.0, np.log1p(x) if DENSE[name] == "count" else x - RATING_CENTER)
        out.append(x)
    return np.stack(out, axis=1).astype(np.float32) if out else np.zeros((t.num_rows, 0), np.float32)


def read_split(lake: Path, split: str, history: bool = False, dense: tuple[str, ...] = (),
               ratings: bool = False) -> dict[str, np.ndarray]:
    """One split of ``export/ctr_samples`` as arrays, in file order: each one-hot feature (N,) int64, ``genre_idx``
    (N, G) int64 right-padded with 0 (G = most genres of a row, at least 1), ``label`` (N,) float32, ``dense``
    (N, F) float32 of the dense features named in ``dense`` (:func:`dense_inputs`; F = 0 when none); with
    ``history`` also ``hist_item_idx`` (N, L) right-padded with 0 and ``hist_len`` (N,) (L = 50; a longer list
    keeps its first L, as our DIN does); with ``ratings`` (and ``history``) also ``hist_rating`` (N, L), the stars
    of each behaviour, padded and cut as ``hist_item_idx``.

    Raises:
        KeyError: a feature of ``dense`` is not in ``DENSE``.
        ValueError: ``ratings`` without ``history``, or a row whose ``hist_rating`` and ``hist_item_idx`` differ in
            length (the export is broken: re-run the features stage).
        pyarrow.ArrowInvalid: a column is not in the export (see :func:`exported_dense`,
            :func:`exported_history_ratings`).
    """
    unknown = [n for n in dense if n not in DENSE]
    if unknown:
        raise KeyError(f"unknown dense feature(s) {unknown}; known: {list(DENSE)}")
    if ratings and not history:
        raise ValueError(f"{HISTORY_RATING} is read with {HISTORY} (pass history=True)")
    path = lake / "export" / "ctr_samples" / f"split={split}"
    columns = [*ONE_HOT, MULTI_HOT, "label", *dense, *([HISTORY] if history else []),
               *([HISTORY_RATING] if ratings else [])]
    t = ds.dataset(str(path), format="parquet").to_table(columns=columns)
    out = {c: t.column(c).fill_null(0).to_numpy().astype(np.int64) for c in ONE_HOT}
    genres = [g or [] for g in t.column(MULTI_HOT).to_pylist()]
    out[MULTI_HOT] = _padded(genres, max(1, max(map(len, genres), default=1)))  # (N, G)
    out["label"] = t.column("label").to_numpy().astype(np.float32)
    out["dense"] = dense_inputs(t, dense)  # (N, F)
    if history:
        hist = [h or [] for h in t.column(HISTORY).to_pylist()]
        out[HISTORY] = _padded(hist, MAX_HISTORY)  # (N, L), most recent last
        out["hist_len"] = np.minimum([len(h) for h in hist], MAX_HISTORY).astype(np.int64)
    if ratings:
        stars = [r or [] for r in t.column(HISTORY_RATING).to_pylist()]
        bad = next((row for row, (h, r) in enumerate(zip(hist, stars)) if len(h) != len(r)), None)
        if bad is not None:
            raise ValueError(f"{path} row {bad}: {HISTORY_RATING} has {len(stars[bad])} values for "
                             f"{len(hist[bad])} in {HISTORY}; re-run the features stage")
        out[HISTORY_RATING] = _padded(stars, MAX_HISTORY)  # (N, L), aligned with hist_item_idx
    return out


def read_keys(lake: Path, split: str) -> dict[str, np.ndarray]:
    """The keys of a split's rows in file order (the order :func:`read_split` and ``training.data.read_ctr_shard``
    read): ``row`` (N,) int64 their positions, ``user`` (N,) int64 ``user_idx`` (the GAUC key) and, when the export
    has the column, ``event_id`` (N,) str."""
    path = lake / "export" / "ctr_samples" / f"split={split}"
    dataset = ds.dataset(str(path), format="parquet")
    keyed = "event_id" in dataset.schema.names
    t = dataset.to_table(columns=["user_idx", *(["event_id"] if keyed else [])])
    out = {"row": np.arange(t.num_rows, dtype=np.int64),
           "user": t.column("user_idx").fill_null(0).to_numpy().astype(np.int64)}
    if keyed:
        out["event_id"] = t.column("event_id").to_numpy(zero_copy_only=False).astype(str)
    return out


def write_predictions(path: Path, keys: dict[str, np.ndarray], label: np.ndarray, score: np.ndarray,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write one split's predictions, row ``i`` of ``label`` / ``score`` (N,) being row ``i`` of ``keys``
    (:func:`read_keys`), as Parquet with ``PREDICTION_COLUMNS`` (the lines of
    ``training.tasks.ctr.write_predictions``, which this environment cannot import), whole and renamed into place.

    Raises:
        ValueError: lengths differ, a label is not 0/1, or a score is outside [0, 1].
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    label, score = np.asarray(label).ravel(), np.asarray(score, np.float64).ravel()
    if not len(label) == len(score) == len(keys["row"]):
        raise ValueError(f"{len(keys['row'])} rows, {len(label)} labels and {len(score)} scores")
    if not np.isin(label, (0, 1)).all() or not ((score >= 0) & (score <= 1)).all():
        raise ValueError("labels must be 0/1 and scores probabilities in [0, 1]")
    arrays = {"row": pa.array(keys["row"], pa.int64())}
    if "event_id" in keys:
        arrays["event_id"] = pa.array(keys["event_id"], pa.string())
    arrays |= {"user": pa.array(keys["user"], pa.int64()), "label": pa.array(label.astype(np.int8), pa.int8()),
               "score": pa.array(score, pa.float64())}
    table = pa.table(arrays).replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def auc_logloss(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    return float(roc_auc_score(y, p)), float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))


# ---------------------------------------------------------------------------------------------- DeepCTR
def deepctr_columns(sizes: dict[str, int], genre_width: int, dim: int, history: bool = False,
                    dense: tuple[str, ...] = (), ratings: bool = False) -> list:
    """DeepCTR-Torch feature columns for our feature set: one ``SparseFeat`` per one-hot feature, genres as a
    sum-pooled ``VarLenSparseFeat`` (0 pads, masked); with ``history`` DIN's behaviour sequence, sharing the item
    table (``embedding_name``) and masked by ``hist_len``; with ``ratings`` the behaviours' stars as a
    ``VarLenSparseFeat`` of its own table (``sizes["rating"]`` rows), mean-pooled over the first ``hist_len``
    positions -- not in DIN's ``history_feature_list`` (no candidate rating to query it with), so DeepCTR's DIN pools
    it like the genres into its DNN input; a ``DenseFeat`` of dimension 1 per name in ``dense``."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    cols = [SparseFeat(c, vocabulary_size=sizes[VOCAB[c]], embedding_dim=dim) for c in ONE_HOT]
    cols.append(VarLenSparseFeat(SparseFeat(MULTI_HOT, vocabulary_size=sizes[VOCAB[MULTI_HOT]], embedding_dim=dim),
                                 maxlen=genre_width, combiner="sum"))
    if history:
        cols.append(VarLenSparseFeat(SparseFeat(HISTORY, vocabulary_size=sizes["item"], embedding_dim=dim,
                                                embedding_name="item_idx"), maxlen=MAX_HISTORY,
                                     length_name="hist_len"))
    if ratings:
        cols.append(VarLenSparseFeat(SparseFeat(HISTORY_RATING, vocabulary_size=sizes[RATING_VOCAB],
                                                embedding_dim=dim), maxlen=MAX_HISTORY, combiner="mean",
                                     length_name="hist_len"))
    cols += [DenseFeat(name, 1) for name in dense]
    return cols


def run_deepctr(a: argparse.Namespace) -> dict:
    import torch
    from deepctr_torch.models import DIN, DeepFM

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    sizes = vocab_sizes(a.lake)
    din = a.model == "din"
    dense = () if a.no_dense else exported_dense(a.lake)
    ratings = din and not a.no_history_ratings and exported_history_ratings(a.lake)
    data = {s: read_split(a.lake, s, history=din, dense=dense, ratings=ratings) for s in SPLITS}
    width = max(d[MULTI_HOT].shape[1] for d in data.values())
    for d in data.values():  # one width for every split (DeepCTR's VarLenSparseFeat has a fixed maxlen)
        d[MULTI_HOT] = np.pad(d[MULTI_HOT], ((0, 0), (0, width - d[MULTI_HOT].shape[1])))
    cols = deepctr_columns(sizes, width, a.embedding_dim, history=din, dense=dense, ratings=ratings)
    inputs = (*ONE_HOT, MULTI_HOT, *((HISTORY, "hist_len") if din else ()), *((HISTORY_RATING,) if ratings else ()))
    x = {s: {**{c: d[c] for c in inputs}, **{n: d["dense"][:, j] for j, n in enumerate(dense)}}
         for s, d in data.items()}
    l2 = {} if a.l2_embedding is None else {"l2_reg_embedding": a.l2_embedding}  # else the library's default
    if din:  # activation unit as ours: one hidden layer of 36, PReLU, no softmax
        model = DIN(cols, ["item_idx"], dnn_hidden_units=tuple(a.hidden), dnn_dropout=a.dropout,
                    att_hidden_size=(36,), att_activation="prelu", seed=a.seed, device="cpu", **l2)
    else:
        model = DeepFM(cols, cols, dnn_hidden_units=tuple(a.hidden), dnn_dropout=a.dropout, seed=a.seed,
                       device="cpu", **l2)
    model.compile(torch.optim.Adam(model.parameters(), lr=a.lr), "binary_crossentropy")
    best, best_valid, since, train_s, epoch = {}, -1.0, 0, 0.0, 0
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        model.fit(x["train"], data["train"]["label"], batch_size=a.batch_size, epochs=1, verbose=0, shuffle=True)
        train_s += time.perf_counter() - t0
        valid_auc, _ = auc_logloss(data["valid"]["label"], model.predict(x["valid"], 4096).ravel())
        print(f"[deepctr] epoch {epoch} valid auc {valid_auc:.4f}", flush=True)
        if valid_auc > best_valid:
            test_p = model.predict(x["test"], 4096).ravel()  # (N,) probabilities, in the split's row order
            test_auc, test_ll = auc_logloss(data["test"]["label"], test_p)
            best_valid, since = valid_auc, 0
            best = {"valid_auc": valid_auc, "test_auc": test_auc, "test_logloss": test_ll, "best_epoch": epoch}
        else:
            since += 1
            if since >= a.patience:
                break
    if a.predictions is not None:
        write_predictions(a.predictions, read_keys(a.lake, "test"), data["test"]["label"], test_p,
                          {"implementation": "deepctr", "model": a.model, "seed": str(a.seed), "split": "test",
                           "best_epoch": str(best["best_epoch"])})
    n = len(data["train"]["label"])
    return {**best, "epochs": epoch, "train_s": train_s, "train_samples_per_s": n * epoch / train_s,
            "optimizer": f"Adam lr {a.lr} (all parameters)", "dense_features": list(dense),
            **({"history_ratings": ratings} if din else {})}


# ---------------------------------------------------------------------------------------------- RecBole
def write_recbole_atomic(lake: Path, out_dir: Path, name: str = "ml100k_lake", history: bool = False,
                         dense: tuple[str, ...] = (), ratings: bool = False,
                         row_ids: bool = False) -> dict[str, int]:
    """RecBole atomic files for our split, under ``out_dir/name/``: ``<name>.<split>.inter`` (one per split, rows
    in the export's order, read with ``benchmark_filename`` so RecBole keeps the split), ``<name>.user`` (age,
    gender, occupation, zip prefix) and ``<name>.item`` (genres as a token sequence). Tokens are our indices, so
    RecBole's features are exactly ours. With ``history`` the interactions also carry ``item_id_list`` (our
    point-in-time ``hist_item_idx``, oldest first, at most 50), which RecBole's sequential datasets take as the
    behaviour sequence instead of rebuilding it; with ``ratings`` (and ``history``) also ``hist_rating``, the stars
    of those behaviours in the same order and number (a token sequence: RecBole 1.2.1 cannot load a ``float_seq``
    field with numpy >= 1.24; it remaps the levels to ids of its own, 0 = its padding, so our level 0 (unknown)
    gets a row of its own, as in DeepCTR's table and ours). The dense features named in ``dense`` are float
    fields of the interactions (they are point-in-time, not static), holding the model input already transformed
    (:func:`dense_inputs`; 9 significant digits, which round-trip a float32). With ``row_ids`` the interactions also
    carry ``row``, their position in the split (:func:`read_keys`), a float field that no model reads (RecBole's
    models embed a float field only when it is in ``numerical_features``), by which :func:`run_recbole` keys its
    test predictions: its evaluation may reorder the rows. Returns the rows written per split.

    Raises:
        ValueError: a user or an item has different side features in different rows (the features are static);
            ``ratings`` without ``history`` (:func:`read_split`); a split of more than 2**24 rows with ``row_ids``
            (a float32 would not hold every position exactly).
    """
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    users: dict[int, tuple] = {}
    items: dict[int, tuple] = {}
    counts = {}
    for split in SPLITS:
        s = read_split(lake, split, history=history, dense=dense, ratings=ratings)
        header = ["user_id:token", "item_id:token", "label:float", *(f"{n}:float" for n in dense)]
        rows = [[str(u), str(i), f"{y:g}", *(f"{v:.9g}" for v in x)]
                for u, i, y, x in zip(s["user_idx"], s["item_idx"], s["label"], s["dense"])]
        if history:
            header.append("item_id_list:token_seq")
            for row, h, n in zip(rows, s[HISTORY], s["hist_len"]):
                row.append(" ".join(map(str, h[:n])))
        if ratings:  # the first hist_len levels, as item_id_list: RecBole right-pads both to the same width
            header.append(f"{HISTORY_RATING}:token_seq")
            for row, r, n in zip(rows, s[HISTORY_RATING], s["hist_len"]):
                row.append(" ".join(map(str, r[:n])))
        if row_ids:  # the row's position in the split, a float field no model reads (run_recbole's predictions)
            if len(rows) > 2**24:
                raise ValueError(f"split {split} has {len(rows)} rows; row ids above 2**24 do not survive a float32")
            header.append("row:float")
            for r, row in enumerate(rows):
                row.append(str(r))
        lines = ["\t".join(header)] + ["\t".join(row) for row in rows]
        (d / f"{name}.{split}.inter").write_text("\n".join(lines) + "\n")
        counts[split] = len(s["label"])
        for r in range(len(s["label"])):
            u = (int(s["age_idx"][r]), int(s["gender_idx"][r]), int(s["occupation_idx"][r]), int(s["zip_idx"][r]))
            g = tuple(int(x) for x in s[MULTI_HOT][r] if x)
            for table, key, value in ((users, int(s["user_idx"][r]), u), (items, int(s["item_idx"][r]), g)):
                if table.setdefault(key, value) != value:
                    raise ValueError(f"id {key} has side features {table[key]} and {value}; they must be static")
    (d / f"{name}.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip:token\n" + "".join(
        f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, (a, g, o, z) in sorted(users.items())))
    (d / f"{name}.item").write_text("item_id:token\tgenre:token_seq\n" + "".join(
        f"{i}\t{' '.join(map(str, g))}\n" for i, g in sorted(items.items())))
    return counts


def recbole_din_with_dnn_inputs(dense: tuple[str, ...] = (), ratings: bool = False) -> type:
    """RecBole's DIN whose DNN input also gets, as DeepCTR-Torch's DIN and ours get them: with ``ratings`` the
    behaviours' stars (the ``hist_rating`` token sequence of the interactions, aligned with ``item_id_list``),
    embedded (``nn.Embedding`` over RecBole's ids of the levels, row 0 its padding) and mean-pooled over the first
    ``item_length`` positions, (B, D); then the interactions' dense features ``dense`` as raw values, (B, F).
    RecBole 1.2.1's DIN embeds only user and item features (``ContextSeqEmbLayer`` looks them up by id), so it
    would ignore these per-interaction fields. RecBole's own ``forward`` runs unchanged; its DNN is wrapped to take
    the extra inputs of the batch. Returns RecBole's DIN itself when there is nothing to add.

    Raises (from ``predict`` / ``calculate_loss``):
        ValueError: ``hist_rating`` is not as wide as ``item_id_list`` (the atomic files are not aligned).
    """
    from recbole.model.layers import MLPLayers
    from recbole.model.sequential_recommender import DIN
    from torch import arange, cat, nn, no_grad, stack

    if not dense and not ratings:
        return DIN

    class AppendInputs(nn.Module):
        def __init__(self, mlp: nn.Module):
            super().__init__()
            self.mlp, self.extra = mlp, None

        def forward(self, din_in):  # (B, 3 * item features * D) -> (B, 3 * item features * D + [D] + F)
            return self.mlp(cat([din_in, self.extra], dim=-1))

    class DINWithInputs(DIN):
        def __init__(self, config, dataset):
            super().__init__(config, dataset)
            self.rating_embedding = None
            if ratings:  # RecBole's ids of the levels present (its remapping), 0 = its padding
                self.rating_embedding = nn.Embedding(dataset.num(HISTORY_RATING), self.embedding_size,
                                                     padding_idx=0)
                self._init_weights(self.rating_embedding)  # RecBole's init (xavier normal) ...
                with no_grad():
                    self.rating_embedding.weight[0].zero_()  # ... which also fills the padding row
            width = (self.embedding_size if ratings else 0) + len(dense)
            mlp = MLPLayers([self.dnn_list[0] + width, *self.mlp_hidden_size], activation="Dice",
                            dropout=self.dropout_prob, bn=True)
            mlp.apply(self._init_weights)
            self.dnn_mlp_layers = AppendInputs(mlp)

        def _with_inputs(self, interaction):
            extra = []
            if ratings:
                levels, items = interaction[HISTORY_RATING], interaction[self.ITEM_SEQ]  # (B, L) each
                if levels.shape != items.shape:
                    raise ValueError(f"{HISTORY_RATING} {tuple(levels.shape)} is not aligned with {self.ITEM_SEQ} "
                                     f"{tuple(items.shape)}; rewrite the atomic files (write_recbole_atomic)")
                length = interaction[self.ITEM_SEQ_LEN]  # (B,)
                real = arange(levels.shape[1], device=levels.device)[None, :] < length[:, None]  # (B, L)
                pooled = (self.rating_embedding(levels) * real.unsqueeze(-1)).sum(1)  # (B, L, D) -> (B, D)
                extra.append(pooled / length.clamp(min=1).unsqueeze(1).to(pooled.dtype))  # mean; 0 when empty
            if dense:
                extra.append(stack([interaction[n] for n in dense], dim=1))  # (B, F)
            self.dnn_mlp_layers.extra = cat(extra, dim=1)  # (B, [D] + F)

        def calculate_loss(self, interaction):
            self._with_inputs(interaction)
            return super().calculate_loss(interaction)

        def predict(self, interaction):
            self._with_inputs(interaction)
            return super().predict(interaction)

    return DINWithInputs


def run_recbole(a: argparse.Namespace) -> dict:
    """RecBole's DeepFM (context-aware) or DIN (a sequential recommender in RecBole: its dataset takes our
    ``item_id_list`` as the history, ``alias_of_item_id`` maps those ids through the item vocabulary). RecBole's
    DIN reads the item features (id, genres) of the history and the candidate; as its docstring says, the user
    features are embedded but not fed to its DNN, and its DNN is Dice + batch norm over (200, 80). The dense
    features: DeepFM embeds them as ``numerical_features`` (``FLEmbedding``: value x a learned vector per field, in
    its first-order part, FM and DNN; no normalisation or discretisation, the values are already ours); DIN takes
    them, and the behaviours' stars ``hist_rating`` when read, through :func:`recbole_din_with_dnn_inputs`. With
    ``--predictions`` the interactions carry their ``row`` (:func:`write_recbole_atomic`), and the final test
    evaluation's scores are collected by row as RecBole's trainer computes them (its batches may be in another
    order than the split's)."""
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.context_aware_recommender import DeepFM
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(1)
    name = "ml100k_lake"
    din = a.model == "din"
    dense = () if a.no_dense else exported_dense(a.lake)
    ratings = din and not a.no_history_ratings and exported_history_ratings(a.lake)
    keyed = a.predictions is not None
    counts = write_recbole_atomic(a.lake, a.work / "atomic", name, history=din, dense=dense, ratings=ratings,
                                  row_ids=keyed)
    inter_cols = ["user_id", "item_id", "label", *dense, *(["item_id_list"] if din else []),
                  *([HISTORY_RATING] if ratings else []), *(["row"] if keyed else [])]
    config = Config(model="DIN" if din else "DeepFM", dataset=name, config_dict={
        "data_path": str(a.work / "atomic"), "checkpoint_dir": str(a.work / "saved"),
        **({"alias_of_item_id": ["item_id_list"], "MAX_ITEM_LIST_LENGTH": MAX_HISTORY} if din else {}),
        # DIN reads the raw floats (recbole_din_with_dnn_inputs); as numerical_features they'd be (value, 1) pairs
        "numerical_features": [] if din else list(dense), "normalize_field": None, "normalize_all": False,
        "discretization": None,
        "benchmark_filename": list(SPLITS), "load_col": {"inter": inter_cols,
                                                          "user": ["user_id", "age", "gender", "occupation", "zip"],
                                                          "item": ["item_id", "genre"]},
        "LABEL_FIELD": "label", "threshold": None, "train_neg_sample_args": None,
        "eval_args": {"group_by": None, "order": "TO" if din else "RO",  # (ignored with benchmark files)
                       "split": {"RS": [0.8, 0.1, 0.1]}, "mode": "labeled"},
        "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "eval_batch_size": 4096,
        "embedding_size": a.embedding_dim, "mlp_hidden_size": list(a.hidden), "dropout_prob": a.dropout,
        "epochs": a.epochs, "stopping_step": a.patience, "train_batch_size": a.batch_size,
        "learner": "adam", "learning_rate": a.lr, "seed": a.seed, "reproducibility": True,
        "device": "cpu", "use_gpu": False, "show_progress": False, "save_dataset": False,
        "log_wandb": False, "state": "WARNING", "metric_decimal_place": 6,
    })
    init_seed(config["seed"], config["reproducibility"])
    torch.set_num_threads(1)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    rows = {"train": len(train.dataset), "valid": len(valid.dataset), "test": len(test.dataset)}
    if rows != counts:
        raise RuntimeError(f"RecBole kept {rows} rows of the {counts} written: it changed the split")
    model = (recbole_din_with_dnn_inputs(dense, ratings) if din else DeepFM)(config, train.dataset).to("cpu")
    trainer = Trainer(config, model)
    timed = {"s": 0.0, "epochs": 0}
    inner = trainer._train_epoch

    def train_epoch(*args, **kwargs):  # time the optimisation passes only, as for the other models
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            timed["s"] += time.perf_counter() - t0
            timed["epochs"] += 1

    trainer._train_epoch = train_epoch
    valid_epoch, scores = trainer._valid_epoch, []

    def record_valid(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        scores.append(score)
        return score, result

    trainer._valid_epoch = record_valid
    valid_score, valid_result = trainer.fit(train, valid, saved=True, show_progress=False)
    batch_eval, scored = trainer._neg_sample_batch_eval, []

    def record_scores(batched_data):  # the test evaluation's (rows, labels, probabilities), batch by batch
        interaction, batch_scores, *rest = batch_eval(batched_data)
        scored.append((interaction["row"].cpu().numpy(), interaction["label"].cpu().numpy(),
                       batch_scores.detach().cpu().numpy()))
        return (interaction, batch_scores, *rest)

    if keyed:
        trainer._neg_sample_batch_eval = record_scores
    load = torch.load
    torch.load = lambda *x, **k: load(*x, **{**k, "weights_only": False})  # RecBole's own checkpoint (a dict)
    try:
        test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    finally:
        torch.load = load
        trainer._neg_sample_batch_eval = batch_eval
    if keyed:
        keys = read_keys(a.lake, "test")
        label, score = recbole_by_row(scored, counts["test"])
        if not np.array_equal(label, read_split(a.lake, "test")["label"]):
            raise RuntimeError("RecBole's test labels by row differ from the split's: its row field is not ours")
        write_predictions(a.predictions, keys, label, score,
                          {"implementation": "recbole", "model": a.model, "seed": str(a.seed), "split": "test",
                           "best_epoch": str(int(np.argmax(scores)) + 1)})
    return {"valid_auc": float(valid_result["auc"]), "test_auc": float(test_result["auc"]),
            "test_logloss": float(test_result["logloss"]), "best_epoch": int(np.argmax(scores)) + 1,
            "epochs": timed["epochs"], "train_s": timed["s"],
            "train_samples_per_s": rows["train"] * timed["epochs"] / timed["s"],
            "optimizer": f"Adam lr {a.lr} (all parameters)", "dense_features": list(dense),
            **({"history_ratings": ratings} if din else {})}


def recbole_by_row(scored: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores), each (n,), in the split's row order, from RecBole's evaluation batches ``scored``: a list of
    (rows, labels, scores) of its ``row`` field (float; :func:`write_recbole_atomic`), label field and predicted
    probabilities, in whatever order it evaluated them.

    Raises:
        ValueError: the batches do not hold every row 0..n-1 exactly once (RecBole dropped, repeated or invented
            rows).

    >>> by_row = recbole_by_row([(np.array([2.0, 0.0]), np.array([1.0, 0.0]), np.array([0.7, 0.1])),
    ...                          (np.array([1.0]), np.array([0.0]), np.array([0.4]))], 3)
    >>> [v.tolist() for v in by_row]
    [[0.0, 0.0, 1.0], [0.1, 0.4, 0.7]]
    """
    rows = np.rint(np.concatenate([r for r, _, _ in scored])).astype(np.int64) if scored else np.zeros(0, np.int64)
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise ValueError(f"RecBole scored {len(rows)} rows ({len(np.unique(rows))} distinct) of the test split's "
                         f"{n}; every row must be scored once")
    label, score = np.empty(n, np.float64), np.empty(n, np.float64)
    label[rows] = np.concatenate([y for _, y, _ in scored])
    score[rows] = np.concatenate([p for _, _, p in scored])
    return label, score


# ----------------------------------------------------------------------------------------------- gensim
def read_sequences(lake: Path) -> list[list[str]]:
    """``export/item_sequences`` in user order, as gensim sentences (item indices as strings)."""
    t = ds.dataset(str(lake / "export" / "item_sequences"), format="parquet").to_table(
        columns=["user_idx", "item_idx"]).sort_by("user_idx")
    return [[str(i) for i in seq] for seq in t.column("item_idx").to_pylist() if seq]


def run_gensim(a: argparse.Namespace) -> dict:
    from gensim.models import Word2Vec

    sentences = read_sequences(a.lake)
    n_items = vocab_sizes(a.lake)["item"]
    model = Word2Vec(vector_size=a.embedding_dim, window=a.window, negative=a.negatives, sample=a.subsample,
                     sg=1, hs=0, min_count=1, workers=1, seed=a.seed)
    model.build_vocab(sentences)
    t0 = time.perf_counter()
    trained, effective = model.train(sentences, total_examples=len(sentences), epochs=a.epochs,
                                     compute_loss=False)
    train_s = time.perf_counter() - t0
    table = np.zeros((n_items, a.embedding_dim), np.float32)  # (items, D), row = item_idx, like ours
    for word in model.wv.index_to_key:
        table[int(word)] = model.wv[word]
    np.save(a.embeddings, table)
    return {"train_s": train_s, "epochs": a.epochs, "effective_words": int(effective),
            "words_per_s": effective / train_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("peer", choices=("deepctr", "recbole", "gensim"))
    p.add_argument("--lake", type=Path, required=True, help="the lake dir (holds export/)")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-peers"), help="RecBole's files")
    p.add_argument("--embeddings", type=Path, help="gensim: where to save the (items, D) .npy")
    p.add_argument("--model", choices=("deepfm", "din"), default="deepfm", help="deepctr, recbole: which model")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--l2-embedding", type=float, default=None,
                   help="deepctr: l2_reg_embedding (its default: DeepFM 1e-5, DIN 1e-6)")
    p.add_argument("--no-dense", action="store_true",
                   help="deepctr, recbole: train without the dense features (an ablation)")
    p.add_argument("--no-history-ratings", action="store_true",
                   help="deepctr, recbole DIN: do not read hist_rating, the stars of each behaviour, even when the "
                        "export has it (an ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predictions", type=Path, default=None,
                   help="deepctr, recbole: write the best epoch's per-row test predictions there (Parquet: row, "
                        "event_id, user, label, score)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--subsample", type=float, default=1e-3)
    a = p.parse_args(argv)
    result = {"deepctr": run_deepctr, "recbole": run_recbole, "gensim": run_gensim}[a.peer](a)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
