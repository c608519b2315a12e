"""Item embeddings of a trained model: read them from the model's outputs, map their rows to item ids through the
item vocabulary, and write / read them as Parquet.

Inputs (written by ``training``, read through ``training.artifacts``): a model folder's item table, float32 (R, D)
with row = ``item_idx`` and row 0 the unknown/padding item, and its ``meta.json`` holding ``model_version``, for
every registered model with an item table (``MODELS``). The vocabulary is the
Parquet export of ``silver.item_vocab`` (``item_id``, ``item_idx``, ``first_seen``).

Output: ``<run_dir>/embeddings/<model>/items.parquet``, one row per known item:
``item_id`` int32 (the data source's id), ``item_idx`` int32 (the row), ``embedding`` list<float32> (D values, as
trained, not normalised), ``model_version`` string.

Legend: R rows of the embedding table (items + 1), N exported items, D embedding dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import PlatformConfig
from features.errors import TableNotFoundError
from features.tables import ITEM_VOCAB, parquet_export
from training.artifacts import ModelLayout, ModelOutputError, load_item_embeddings
from training.registry import get_model, list_models

log = logging.getLogger(__name__)

#: The registered models with an item table (``ModelSpec.item_table``): what the export writes and the replay reads.
def embedding_models() -> tuple[str, ...]:
    """Every registered model with an item table (what ``serving.export`` exports and ``serving.app`` retrieves
    with). Reading it imports every model file (torch), so it is a function, not an import-time constant."""
    return tuple(m for m in list_models() if get_model(m).item_table is not None)


def __getattr__(name: str):  # ``MODELS`` computed on first use: importing this module stays cheap
    if name == "MODELS":
        return embedding_models()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
PARQUET_FILE = "items.parquet"
INDEX_FILE = "index.faiss"
__all__ = ["MODELS", "embedding_models", "PARQUET_FILE", "INDEX_FILE", "ModelOutputError", "ModelEmbeddings",
           "ExportedItems", "model_dir", "embeddings_dir", "load_model_embeddings", "read_item_vocab", "map_rows", "to_arrow",
           "write_parquet", "read_exported"]


@dataclass(frozen=True)
class ModelEmbeddings:
    """A model's item embedding table as trained.

    Args:
        model: a registered model's name.
        table: (R, D) float32, row = item_idx, row 0 = unknown/padding.
        model_version: from the model's ``meta.json``.
    """

    model: str
    table: np.ndarray
    model_version: str

    def __post_init__(self) -> None:
        if self.table.ndim != 2 or self.table.shape[0] < 2 or self.table.shape[1] < 1:
            raise ModelOutputError(f"model {self.model!r}: item embeddings must be (R >= 2, D >= 1), got "
                                   f"{self.table.shape}; retrain it")


@dataclass(frozen=True)
class ExportedItems:
    """Embeddings of the items that have both a row and a vocabulary entry.

    Args:
        item_idx: (N,) int64 rows, ascending, never 0.
        item_id: (N,) int64 original ids.
        vectors: (N, D) float32 as trained.
        unmapped_rows: rows >= 1 of the table with no vocabulary entry (counted, not exported).
        items_without_row: vocabulary entries whose ``item_idx`` is beyond the table (items seen after training).
    """

    item_idx: np.ndarray
    item_id: np.ndarray
    vectors: np.ndarray
    unmapped_rows: int
    items_without_row: int


def model_dir(cfg: PlatformConfig, model: str) -> Path:
    """The model folder of ``model`` in this run (``training.artifacts.model_dir``)."""
    from training.artifacts import model_dir as folder

    return folder(cfg.run_dir, model)


def embeddings_dir(cfg: PlatformConfig, model: str) -> Path:
    return cfg.run_dir / "embeddings" / model


def load_model_embeddings(cfg: PlatformConfig, model: str) -> ModelEmbeddings | None:
    """The model's item embeddings, or ``None`` (logged) when the model has no outputs.

    Raises:
        ModelOutputError: ``meta.json`` lacks ``model_version`` or the table has a bad shape.
    """
    layout = ModelLayout(model_dir(cfg, model))
    if not layout.item_embeddings.exists() or not layout.meta.exists():
        log.warning("model %s: no %s and %s under %s; skipping it (run the train_%s stage to produce them)",
                    model, layout.item_embeddings.name, layout.meta.name, layout.root, model)
        return None
    table, meta = load_item_embeddings(layout.root)
    return ModelEmbeddings(model, table, str(meta["model_version"]))


def read_item_vocab(cfg: PlatformConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(item_idx, item_id)`` int64 arrays of the item vocabulary's Parquet export.

    Raises:
        TableNotFoundError: the export has not been written.
    """
    path = Path(parquet_export(ITEM_VOCAB, cfg.lake_dir))
    if not path.exists() or not any(path.rglob("*.parquet")):
        raise TableNotFoundError(ITEM_VOCAB.name, str(path), "the features stage (pipelines/features_batch.py)")
    t = pq.read_table(path, columns=["item_id", "item_idx"])
    return (t.column("item_idx").to_numpy().astype(np.int64), t.column("item_id").to_numpy().astype(np.int64))


def map_rows(emb: ModelEmbeddings, vocab_idx: np.ndarray, vocab_id: np.ndarray) -> ExportedItems:
    """Keep rows 1..R-1 that the vocabulary knows; row 0 (unknown/padding) is never exported.

    >>> e = ModelEmbeddings("m", np.arange(8, dtype=np.float32).reshape(4, 2), "v1")
    >>> out = map_rows(e, vocab_idx=np.array([2, 1, 7]), vocab_id=np.array([50, 40, 90]))
    >>> out.item_idx.tolist(), out.item_id.tolist(), out.vectors.tolist()
    ([1, 2], [40, 50], [[2.0, 3.0], [4.0, 5.0]])
    >>> out.unmapped_rows, out.items_without_row
    (1, 1)
    """
    rows = emb.table.shape[0]
    id_of_row = np.full(rows, -1, dtype=np.int64)
    in_table = (vocab_idx >= 1) & (vocab_idx < rows)
    id_of_row[vocab_idx[in_table]] = vocab_id[in_table]
    keep = np.flatnonzero(id_of_row >= 0)                               # ascending, 0 excluded (never set)
    unmapped = int(rows - 1 - keep.size)
    if unmapped:
        log.warning("model %s: %d of %d embedding rows have no item_vocab entry; not exported",
                    emb.model, unmapped, rows - 1)
    return ExportedItems(item_idx=keep, item_id=id_of_row[keep], vectors=emb.table[keep],
                         unmapped_rows=unmapped, items_without_row=int((vocab_idx >= rows).sum()))


def to_arrow(items: ExportedItems, model_version: str) -> pa.Table:
    """The Parquet schema of exported embeddings (see the module docstring)."""
    n, d = items.vectors.shape
    values = pa.array(np.ascontiguousarray(items.vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32), type=pa.int32())
    return pa.table({
        "item_id": pa.array(items.item_id.astype(np.int32), type=pa.int32()),
        "item_idx": pa.array(items.item_idx.astype(np.int32), type=pa.int32()),
        "embedding": pa.ListArray.from_arrays(offsets, values),
        "model_version": pa.array([model_version] * n, type=pa.string()),
    })


def write_parquet(table: pa.Table, out_dir: Path) -> Path:
    """Write ``items.parquet`` under ``out_dir`` (overwriting: the export is idempotent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PARQUET_FILE
    tmp = out_dir / (PARQUET_FILE + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_exported(path: str | Path) -> tuple[pa.Table, np.ndarray]:
    """An exported ``items.parquet`` and its (N, D) float32 vectors."""
    t = pq.read_table(path)
    emb = t.column("embedding").combine_chunks()
    n = len(emb)
    vectors = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1) if n else \
        np.zeros((0, 0), np.float32)
    return t, vectors
