"""The layout of a trained model's folder, declared once (as ``features/tables.py`` declares tables), with the one
writer and the one loader every stage uses.

``<run_dir>/models/<model>/``:

- ``model.pt``: the unsharded state dict (CPU tensors) of the saved epoch, loadable by the registered model class;
- ``meta.json``: ``model`` (registry name), ``kind``, ``task``, ``model_version``, ``model_config`` (the config
  dataclass's fields), ``options`` (the trainer's), ``vocab_sizes``, ``training_versions`` (``{table: Delta
  version}`` read), ``sharding_plan``, ``metrics``, ``item_embedding_shape``, ``created_utc``, and
  ``initialised_from`` (``{"model", "model_version", "tables"}``: the saved model whose tables this one started
  from, ``ModelSpec.init_from``; ``{"sources": [...], "params": [...]}`` for several sources and the parameters
  ``ModelSpec.init_state`` computed; null when it started from random tables);
- ``item_embeddings.npy``: float32 (R, D), row = item_idx, row 0 the unknown/padding item -- for a model with an
  item table (``ModelSpec.item_table``): the item vectors its retrieval searches (``ModelSpec.item_vectors``; by
  default the table itself);
- ``predictions.parquet``: only when trained with ``--save-predictions`` (a CTR model,
  ``write_predictions``): one row per test sample, scored by the saved epoch, columns
  ``PREDICTION_COLUMNS``; the file's Parquet metadata holds ``model_version``. ``bench/peers.py --predictions``
  writes the same columns for the same rows, so ``bench.leaderboard_stats`` pairs them.

>>> layout = ModelLayout("/runs/demo/models/din")
>>> layout.meta.name, layout.state.name, layout.item_embeddings.name, layout.predictions.name
('meta.json', 'model.pt', 'item_embeddings.npy', 'predictions.parquet')

Legend: R rows of the item table (items + 1), D embedding dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from features.errors import PlatformError

MODELS_DIR = "models"
#: The columns of ``predictions.parquet``: ``row`` int64, the sample's position in its split as exported (file
#: order, the order ``training.data.read_ctr_shard`` and ``bench/peers.py`` read); ``event_id`` string, the
#: sample's key in ``gold.ctr_samples`` (absent when the export has no such column, e.g. ``bench.models``' generated
#: data); ``user`` int64, ``user_idx`` (the GAUC key); ``label`` int8, 0 or 1; ``score`` float64, the predicted
#: click probability.
PREDICTION_COLUMNS = ("row", "event_id", "user", "label", "score")


class ModelOutputError(PlatformError):
    """A model's folder is missing files, or they are unusable (bad shape, no ``model_version``, weights that do not
    fit the recorded config); the message names the file and the command that rewrites it."""


@dataclass(frozen=True)
class ModelLayout:
    """The files of one model folder."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def state(self) -> Path:
        return self.root / "model.pt"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def item_embeddings(self) -> Path:
        return self.root / "item_embeddings.npy"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"


def model_dir(run_dir: str | Path, model: str) -> Path:
    """``<run_dir>/models/<model>``."""
    return Path(run_dir) / MODELS_DIR / model


@dataclass(frozen=True)
class LoadedModel:
    """A saved model, rebuilt: ``module`` in eval mode on CPU, its ``spec`` and ``config``, and its ``meta``."""

    spec: Any
    config: Any
    module: Any
    meta: dict

    @property
    def version(self) -> str:
        return str(self.meta["model_version"])


def save_model(out_dir: str | Path, spec, config, state: dict, *, model_version: str, options: dict,
               vocab_sizes: dict, sharding_plan: dict, metrics: dict, training_versions: dict,
               initialised_from: dict | None = None) -> Path:
    """Write a model folder (see the module docstring); ``state`` is the full unsharded state dict;
    ``initialised_from`` the provenance of its initial tables (``training.trainer.init_source``), if any. Files
    are written whole and renamed into place, so a reader never sees half of one.

    Returns:
        the folder.

    Raises:
        KeyError: ``spec.item_table`` is not a key of ``state``.
    """
    import torch

    from training.spec import config_to_dict

    layout = ModelLayout(out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    shape = None
    if spec.item_table is not None:
        table = (spec.item_vectors(state, config) if spec.item_vectors else state[spec.item_table].numpy())
        table = np.asarray(table, np.float32)  # (R, D)
        _atomic(layout.item_embeddings, lambda p: np.save(p, table), suffix=".npy")
        shape = list(table.shape)
    _atomic(layout.state, lambda p: torch.save(state, p))
    meta = {"model": spec.name, "kind": spec.kind, "task": spec.task, "model_version": model_version,
            "model_config": config_to_dict(config), "options": options, "vocab_sizes": vocab_sizes,
            "sharding_plan": sharding_plan, "item_embedding_shape": shape, "metrics": metrics,
            "training_versions": training_versions, "initialised_from": initialised_from,
            "created_utc": datetime.now(timezone.utc).isoformat()}
    _atomic(layout.meta, lambda p: p.write_text(json.dumps(meta, indent=2, default=float)))
    return layout.root


def _atomic(path: Path, write, suffix: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp" + suffix)
    write(tmp)
    tmp.replace(path)


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of the model folder ``path``.

    Raises:
        ModelOutputError: the file is missing or has no ``model_version``.
    """
    layout = ModelLayout(path)
    if not layout.meta.exists():
        raise ModelOutputError(f"no {layout.meta}; run `python -m training.train --model {layout.root.name}`")
    meta = json.loads(layout.meta.read_text())
    if "model_version" not in meta:
        raise ModelOutputError(f"{layout.meta} has no 'model_version'; retrain {layout.root.name} with the current "
                               f"trainer")
    return meta


def load_model(path: str | Path) -> LoadedModel:
    """The model saved in folder ``path``, rebuilt unsharded on CPU from its registered spec, recorded config and
    vocabulary sizes, with its weights, in eval mode.

    Raises:
        ModelOutputError: a file is missing, or the weights do not fit the recorded config.
        UnknownModelError: the recorded model is not registered here.
        ModelOptionError: the recorded config has a field this version of the model lacks.
    """
    import torch

    from training.registry import get_model

    layout = ModelLayout(path)
    meta = read_meta(layout.root)
    spec = get_model(meta.get("model", layout.root.name))
    config = spec.config_from_dict(meta["model_config"])
    if not layout.state.exists():
        raise ModelOutputError(f"no {layout.state}; run `python -m training.train --model {spec.name}`")
    module = spec.build(meta["vocab_sizes"], config)
    try:
        module.load_state_dict(torch.load(layout.state, map_location="cpu", weights_only=True))
    except RuntimeError as e:
        raise ModelOutputError(f"{layout.state} does not fit {spec.name} {config} over {meta['vocab_sizes']}: {e}; "
                               f"retrain with `python -m training.train --model {spec.name}`") from e
    return LoadedModel(spec, config, module.eval(), meta)


def load_item_embeddings(path: str | Path) -> tuple[np.ndarray, dict]:
    """The (R, D) float32 item table and ``meta.json`` of the model folder ``path``.

    Raises:
        ModelOutputError: either file is missing, no ``model_version``, or the table is not (R >= 2, D >= 1).
    """
    layout = ModelLayout(path)
    meta = read_meta(layout.root)
    if not layout.item_embeddings.exists():
        raise ModelOutputError(f"no {layout.item_embeddings}; the model has no item table, or retrain it")
    table = np.load(layout.item_embeddings).astype(np.float32, copy=False)
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 1:
        raise ModelOutputError(f"{layout.item_embeddings}: item embeddings must be (R >= 2, D >= 1), got "
                               f"{table.shape}; retrain {layout.root.name}")
    return table, meta


def write_predictions(path, predictions: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write one split's per-row predictions as Parquet (``training.artifacts.PREDICTION_COLUMNS``), whole and
    renamed into place; ``event_id`` is written only when given.

    Args:
        path: the file (``ModelLayout.predictions``); its folder is created.
        predictions: ``row`` (N,) int, ``user`` (N,) int, ``label`` (N,) 0/1, ``score`` (N,) click probability,
            optionally ``event_id`` (N,) str; rows are written sorted by ``row``.
        metadata: strings stored in the file's key-value metadata (e.g. ``model_version``).

    Returns:
        the path.

    Raises:
        ValueError: a required column is missing, the columns differ in length, ``row`` repeats, a label is not 0/1
            or a score is outside [0, 1].

    >>> import tempfile, pyarrow.parquet as pq
    >>> p = write_predictions(Path(tempfile.mkdtemp()) / "predictions.parquet", {"row": np.array([1, 0]),
    ...     "user": np.array([7, 7]), "label": np.array([1.0, 0.0]), "score": np.array([0.9, 0.2])})
    >>> pq.read_table(p).to_pydict()
    {'row': [0, 1], 'user': [7, 7], 'label': [0, 1], 'score': [0.2, 0.9]}
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [c for c in PREDICTION_COLUMNS if c != "event_id" and c not in predictions]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}; need {PREDICTION_COLUMNS} (event_id optional)")
    cols = {c: np.asarray(predictions[c]) for c in PREDICTION_COLUMNS if c in predictions}
    lengths = {c: len(v) for c, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"prediction columns differ in length: {lengths}")
    order = np.argsort(cols["row"], kind="stable")
    row = cols["row"].astype(np.int64)[order]
    if len(row) and (np.diff(row) == 0).any():
        raise ValueError(f"predictions repeat row(s) {np.unique(row[1:][np.diff(row) == 0])[:5].tolist()}")
    label, score = cols["label"][order], cols["score"].astype(np.float64)[order]
    if not np.isin(label, (0, 1)).all() or not ((score >= 0) & (score <= 1)).all():
        raise ValueError("labels must be 0/1 and scores probabilities in [0, 1]")
    arrays = {"row": pa.array(row, pa.int64())}
    if "event_id" in cols:
        arrays["event_id"] = pa.array(cols["event_id"][order].astype(str), pa.string())
    arrays |= {"user": pa.array(cols["user"].astype(np.int64)[order], pa.int64()),
               "label": pa.array(label.astype(np.int8), pa.int8()), "score": pa.array(score, pa.float64())}
    table = pa.table(arrays).replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
