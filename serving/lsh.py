"""Random-hyperplane LSH for cosine similarity (Charikar 2002, "Similarity estimation techniques from rounding
algorithms"): each of ``n_tables`` tables hashes a vector to the sign pattern of ``n_bits`` random hyperplanes, so
two vectors at angle theta share one bit with probability 1 - theta/pi. A query's candidates are the items that
share its bucket in at least one table; they are re-ranked by exact cosine. Kept beside the HNSW index
(``serving.ann``) to compare recall@10 measured the same way (``measure_lsh_recall`` mirrors
``serving.ann.measure_recall``: every item once as a query, exact search as the reference).

Legend: N items, D embedding dim, B queries, K results, T tables, H bits per table.

>>> vecs = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
>>> lsh = LshIndex.build(vecs, ids=np.array([10, 11, 12, 13]), params=LshParams(n_tables=8, n_bits=1, seed=0))
>>> lsh.search(np.array([[1.0, 0.05]]), k=2)[1].tolist()
[[10, 11]]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from serving.ann import exact_search, l2_normalise, recall_at_k


@dataclass(frozen=True)
class LshParams:
    """Parameters of a random-hyperplane LSH index.

    Args:
        n_tables: T independent hash tables; more raise recall and the candidates scored.
        n_bits: H hyperplanes per table (2**H buckets); more make buckets smaller and recall lower.
        seed: seed of the hyperplanes (a Gaussian (T, H, D) draw).

    Raises:
        ValueError: ``n_tables`` < 1 or ``n_bits`` not in [1, 62].
    """

    n_tables: int = 16
    n_bits: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tables < 1 or not 1 <= self.n_bits <= 62:
            raise ValueError(f"need n_tables >= 1 and 1 <= n_bits <= 62, got {self.n_tables}, {self.n_bits}")


class LshIndex:
    """Cosine LSH over item vectors whose results are item ids; build with ``build``."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, planes: np.ndarray, params: LshParams) -> None:
        self.vectors = vectors                  # (N, D) normalised
        self.ids = ids                          # (N,)
        self.planes = planes                    # (T, H, D)
        self.params = params
        self._weights = (1 << np.arange(params.n_bits, dtype=np.int64))  # (H,)
        codes = self._codes(vectors)            # (T, N)
        self.buckets: list[dict[int, np.ndarray]] = []
        for t in range(params.n_tables):
            table: dict[int, list[int]] = defaultdict(list)
            for row, code in enumerate(codes[t].tolist()):
                table[code].append(row)
            self.buckets.append({c: np.asarray(r, dtype=np.int64) for c, r in table.items()})

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, params: LshParams = LshParams()) -> LshIndex:
        """Hash ``vectors`` (normalised here) under ``ids``.

        Raises:
            ValueError: shapes disagree or there are no vectors.
        """
        vectors = l2_normalise(vectors)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[0] == 0 or ids.shape != (vectors.shape[0],):
            raise ValueError(f"need (N, D) vectors with N >= 1 and (N,) ids; got {vectors.shape}, {ids.shape}")
        rng = np.random.default_rng(params.seed)
        planes = rng.standard_normal((params.n_tables, params.n_bits, vectors.shape[1])).astype(np.float32)
        return cls(vectors, ids, planes, params)

    def _codes(self, x: np.ndarray) -> np.ndarray:
        bits = np.einsum("thd,nd->tnh", self.planes, x) >= 0          # (T, B, H) sign bits
        return bits.astype(np.int64) @ self._weights                  # (T, B) bucket codes

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids among the bucket-mates of each query, by exact cosine.

        Args:
            queries: (B, D); k: results per query.

        Returns:
            scores (B, k) float32 and ids (B, k) int64, best first; ``-inf`` / ``-1`` where fewer than ``k``
            candidates were found.
        """
        queries = l2_normalise(np.atleast_2d(queries))
        codes = self._codes(queries)                                  # (T, B)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        for b, q in enumerate(queries):
            cand = np.unique(np.concatenate([self.buckets[t].get(int(codes[t, b]), empty)
                                             for t in range(self.params.n_tables)]))
            if cand.size == 0:
                continue
            sims = self.vectors[cand] @ q                             # (C,)
            top = np.argsort(-sims, kind="stable")[:k]
            scores[b, :top.size], out[b, :top.size] = sims[top], self.ids[cand[top]]
        return scores, out

    def mean_candidates(self, queries: np.ndarray) -> float:
        """Mean number of distinct candidates scored per query (the work LSH saves over exact search)."""
        codes = self._codes(l2_normalise(np.atleast_2d(queries)))
        return float(np.mean([np.unique(np.concatenate([self.buckets[t].get(int(codes[t, b]), np.zeros(0, int))
                                                        for t in range(self.params.n_tables)])).size
                              for b in range(codes.shape[1])]))


def measure_lsh_recall(index: LshIndex, vectors: np.ndarray, ids: np.ndarray, k: int = 10) -> float:
    """recall@k of ``index`` against exact search, every indexed item once as a query (as ``measure_recall``).

    Args:
        vectors: (N, D) the vectors indexed; ids: (N,) their ids.
    """
    k = min(k, len(ids))
    _, approx = index.search(vectors, k)
    return recall_at_k(approx, exact_search(vectors, ids, vectors, k))
