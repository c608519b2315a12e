"""Approximate nearest-neighbour index over item embeddings: cosine similarity as inner product on L2-normalised
vectors, searched with HNSW (Malkov & Yashunin 2018, "Efficient and robust approximate nearest neighbor search
using Hierarchical Navigable Small World graphs") through faiss (Johnson et al. 2019).

An index is saved as two files: ``<name>.faiss`` (faiss' own format; the index maps to item indices through an
``IndexIDMap``) and ``<name>.json`` beside it holding every parameter it was built and is searched with
(M, efConstruction, efSearch, dim, ntotal, metric) plus whatever figures the caller adds (recall@10). ``load``
restores efSearch from the JSON, so a search after loading behaves as the one measured at export.

Legend: N items in the index, D embedding dim, B queries, K results per query.

>>> vecs = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
>>> idx = ItemIndex.build(vecs, ids=np.array([10, 11, 12, 13]), params=HnswParams(m=4, ef_construction=16,
...                                                                               ef_search=8))
>>> scores, ids = idx.search(np.array([[1.0, 0.1]]), k=3)
>>> ids.tolist()
[[10, 11, 12]]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from features.errors import PlatformError


class IndexFileError(PlatformError):
    """An index file or its parameter file is missing, or the two disagree (dim, ntotal)."""


@dataclass(frozen=True)
class HnswParams:
    """Parameters of an HNSW graph.

    Args:
        m: neighbours per node and layer (faiss ``M``); more gives higher recall, more memory.
        ef_construction: candidate list size while building the graph.
        ef_search: candidate list size while searching; at least K is used whatever this says.

    Raises:
        ValueError: a parameter is below 1 (``m`` below 2).
    """

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.m < 2:
            raise ValueError(f"HNSW M must be >= 2, got {self.m}")
        if self.ef_construction < 1 or self.ef_search < 1:
            raise ValueError(f"efConstruction and efSearch must be >= 1, got {self.ef_construction}, "
                             f"{self.ef_search}")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a new C-contiguous float32 array; all-zero rows stay zero.

    Args:
        x: (N, D) vectors.

    Returns:
        (N, D) float32.

    >>> l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)                   # (N, 1)
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


class ItemIndex:
    """An HNSW inner-product index whose results are item ids (here: ``item_idx``), with its parameters.

    Build with ``build`` or read with ``load``; do not call the constructor with a foreign faiss index.
    """

    def __init__(self, index: faiss.Index, params: HnswParams, extra: dict | None = None) -> None:
        self.index = index
        self.params = params
        #: Figures stored beside the parameters (e.g. ``{"recall@10": 0.99}``).
        self.extra = dict(extra or {})
        self._hnsw().hnsw.efSearch = params.ef_search

    def _hnsw(self) -> faiss.IndexHNSWFlat:
        return faiss.downcast_index(self.index.index)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def ef_search(self) -> int:
        """efSearch of the faiss object itself (not of ``params``): what a search really uses."""
        return int(self._hnsw().hnsw.efSearch)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, params: HnswParams = HnswParams()) -> ItemIndex:
        """Index ``vectors`` under ``ids``.

        Args:
            vectors: (N, D) item embeddings; normalised here, so cosine = inner product.
            ids: (N,) int ids returned by ``search`` (distinct, >= 0).
            params: HNSW parameters.

        Raises:
            ValueError: shapes disagree, no vectors, or ids are not distinct non-negative integers.
        """
        vectors = l2_normalise(vectors)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[0] == 0 or ids.shape != (vectors.shape[0],):
            raise ValueError(f"need (N, D) vectors with N >= 1 and (N,) ids; got {vectors.shape}, {ids.shape}")
        if ids.min() < 0 or np.unique(ids).size != ids.size:
            raise ValueError("ids must be distinct and >= 0")
        hnsw = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.ef_construction
        index = faiss.IndexIDMap(hnsw)  # faiss' Python wrapper keeps a reference to ``hnsw``
        index.add_with_ids(vectors, ids)
        return cls(index, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items by cosine similarity.

        Args:
            queries: (B, D) query vectors (normalised here).
            k: results per query.

        Returns:
            scores (B, k) float32 cosine similarities, best first, and ids (B, k) int64; ``-1`` where fewer
            than ``k`` items were found.
        """
        queries = l2_normalise(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dim {queries.shape[1]}, the index has {self.dim}")
        return self.index.search(queries, int(k))

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (faiss) and ``path.with_suffix('.json')`` (parameters + ``extra``); returns the JSON path.
        Both are written to temporary names first and renamed, so a reader never sees half an index."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"index_type": "IndexIDMap(IndexHNSWFlat)", "metric": "inner_product", "normalised": True,
                "dim": self.dim, "ntotal": self.ntotal, "faiss_version": faiss.__version__,
                **{k: v for k, v in asdict(self.params).items()}, **self.extra}
        tmp_index, tmp_meta = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".json.tmp")
        faiss.write_index(self.index, str(tmp_index))
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp_index.replace(path)
        meta_path = path.with_suffix(".json")
        tmp_meta.replace(meta_path)
        return meta_path

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        """Read an index written by ``save`` and set efSearch to the saved value.

        Raises:
            IndexFileError: a file is missing or the JSON disagrees with the index (dim, ntotal).
        """
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise IndexFileError(f"index {path} or its parameters {meta_path} not found; run "
                                 f"`python -m serving.export` first")
        meta = json.loads(meta_path.read_text())
        index = faiss.read_index(str(path))
        if index.d != meta["dim"] or index.ntotal != meta["ntotal"]:
            raise IndexFileError(f"{path}: index has dim {index.d}, ntotal {index.ntotal}, but {meta_path} says "
                                 f"{meta['dim']}, {meta['ntotal']}; rebuild it with `python -m serving.export`")
        params = HnswParams(m=meta["m"], ef_construction=meta["ef_construction"], ef_search=meta["ef_search"])
        known = {"index_type", "metric", "normalised", "dim", "ntotal", "faiss_version", "m", "ef_construction",
                 "ef_search"}
        return cls(index, params, extra={k: v for k, v in meta.items() if k not in known})

    def ids(self) -> np.ndarray:
        """(N,) int64 ids held, in insertion order."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` ids by cosine similarity (faiss ``IndexFlatIP`` on normalised vectors): the reference that
    ``recall_at_k`` compares the ANN with.

    Args:
        vectors: (N, D) items; ids: (N,) their ids; queries: (B, D).

    Returns:
        (B, k) int64 ids, ``-1`` where N < k.
    """
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(l2_normalise(vectors))
    _, pos = flat.search(l2_normalise(queries), int(k))                 # (B, k) row positions
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (``-1`` padding ignored).

    Args:
        approx: (B, K) ids from the ANN; exact: (B, K) ids from exact search.

    >>> recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 5]]))
    0.75
    """
    per_query = []
    for a, e in zip(np.asarray(approx), np.asarray(exact)):
        truth = set(e[e >= 0].tolist())
        if truth:
            per_query.append(len(truth & set(a[a >= 0].tolist())) / len(truth))
    return float(np.mean(per_query)) if per_query else float("nan")


def measure_recall(index: ItemIndex, vectors: np.ndarray, ids: np.ndarray, k: int = 10,
                   batch: int = 4096) -> float:
    """recall@k of ``index`` against exact search, every indexed item used once as a query.

    Args:
        index: the ANN; vectors: (N, D) the same vectors it holds; ids: (N,) their ids.
        k: cut-off (capped at N).
        batch: queries per call (bounds memory: B x N floats for the exact search).
    """
    k = min(k, len(ids))
    hits = []
    for s in range(0, len(ids), batch):
        q = vectors[s:s + batch]
        _, approx = index.search(q, k)
        exact = exact_search(vectors, ids, q, k)
        hits.append(recall_at_k(approx, exact) * len(q))
    return float(np.sum(hits) / len(ids))
