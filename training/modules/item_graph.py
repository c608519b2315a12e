"""The item graph of users' sequences and random walks over it, the corpus of the walk retrievers (DeepWalk:
Perozzi, Al-Rfou & Skiena 2014; node2vec: Grover & Leskovec 2016), whose walks the skip-gram task trains on as
item2vec trains on the users' sequences.

- ``item_graph``: an undirected graph with an edge {a, b} for each pair of consecutive items of a user's sequence,
  weighted by how often the pair occurs in either order (a user's sequence has no direction that a walk could keep
  to: the skip-gram window is symmetric too); an item repeated back to back adds no self-loop.
- ``random_walks``: ``walks_per_node`` walks of ``walk_length`` nodes from every node with an edge. The first step
  and, when p = q = 1, every step is DeepWalk's weighted one: from ``v`` to a neighbour ``x`` with probability
  ``w(v, x) / sum_y w(v, y)``. Otherwise a step from ``v`` that came from ``t`` is node2vec's second-order one:
  ``x`` with probability proportional to ``alpha(t, x) * w(v, x)``, ``alpha`` = ``1/p`` when ``x = t`` (return),
  ``1`` when ``x`` is a neighbour of ``t``, ``1/q`` otherwise (in-out). It samples by rejection (KnightKing, Yang et
  al. 2019): a first-order proposal ``x`` is accepted with probability ``alpha(t, x) / max(1/p, 1, 1/q)``, so no
  per-edge transition table of node2vec's (O(sum_v deg(v)^2) memory) is built.

All walkers advance one step at a time as numpy arrays over the CSR graph (no Python loop over walkers); the walks
depend only on the graph, the parameters and the seed.

Legend: N nodes (item rows), E stored edges (each undirected edge twice), W walks, L walk length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse


def item_graph(sequences: Sequence[np.ndarray], num_nodes: int | None = None) -> sparse.csr_matrix:
    """The weighted undirected item graph of the sequences (see the module docstring).

    Args:
        sequences: each user's item indices in time order, (n_u,) int each.
        num_nodes: N, the rows of the graph; default the largest item index + 1.

    Returns:
        (N, N) symmetric CSR float64 matrix, ``[a, b]`` = occurrences of ``a, b`` or ``b, a`` next to each other;
        indices sorted within each row, no explicit zeros, zero diagonal.

    Raises:
        ValueError: an item index outside ``[0, num_nodes)``.

    >>> g = item_graph([np.array([1, 2, 1, 3]), np.array([2, 1])])
    >>> g.toarray().astype(int).tolist()
    [[0, 0, 0, 0], [0, 0, 3, 1], [0, 3, 0, 0], [0, 1, 0, 0]]
    """
    pairs = [(s[:-1], s[1:]) for s in map(np.asarray, sequences) if len(s) > 1]
    src = np.concatenate([a for a, _ in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
    dst = np.concatenate([b for _, b in pairs]).astype(np.int64) if pairs else np.zeros(0, np.int64)
    largest = max((int(s.max()) for s in map(np.asarray, sequences) if len(s)), default=-1)
    n = largest + 1 if num_nodes is None else int(num_nodes)
    smallest = min((int(s.min()) for s in map(np.asarray, sequences) if len(s)), default=0)
    if smallest < 0 or largest >= n:
        raise ValueError(f"item indices must lie in [0, {n}), got [{smallest}, {largest}]")
    keep = src != dst  # a repeated item is no edge
    src, dst = src[keep], dst[keep]
    ones = np.ones(2 * len(src))
    # both directions of each occurrence; the COO -> CSR conversion sums duplicates and sorts the indices
    graph = sparse.coo_matrix((ones, (np.concatenate([src, dst]), np.concatenate([dst, src]))), shape=(n, n)).tocsr()
    graph.sum_duplicates()
    return graph


def random_walks(graph: sparse.csr_matrix, walks_per_node: int, walk_length: int, seed: int,
                 p: float = 1.0, q: float = 1.0) -> np.ndarray:
    """Weighted (DeepWalk) or second-order (node2vec, ``p``/``q``) random walks; see the module docstring.

    Walks start from every node with an edge, ``walks_per_node`` rounds, each round over the nodes in a fresh random
    order (DeepWalk's shuffled passes). A walk never stops early: every node it reaches has an edge back.

    Args:
        graph: (N, N) symmetric CSR with non-negative weights (``item_graph``).
        walks_per_node: walks started from each node with an edge (the papers' gamma / r).
        walk_length: L, nodes per walk, the start included (the papers' t / l).
        seed: the walks are a function of the graph, the parameters and this seed.
        p: node2vec's return parameter (a step back to the previous node is weighted ``1/p``).
        q: node2vec's in-out parameter (a step to a node not adjacent to the previous one is weighted ``1/q``).

    Returns:
        (W, L) int64 node indices, W = ``walks_per_node`` x the nodes with an edge; (0, L) for a graph without
        edges.

    Raises:
        ValueError: ``walks_per_node`` < 1, ``walk_length`` < 1, ``p`` or ``q`` not > 0, or a graph that is not
            square, symmetric and non-negative.

    >>> g = item_graph([np.array([1, 2, 3])])
    >>> w = random_walks(g, walks_per_node=2, walk_length=5, seed=0)
    >>> w.shape, bool((np.abs(np.diff(w, axis=1)) == 1).all())   # every step follows an edge of the path 1-2-3
    ((6, 5), True)
    """
    if walks_per_node < 1 or walk_length < 1:
        raise ValueError(f"walks_per_node and walk_length must be >= 1, got {walks_per_node}, {walk_length}")
    if not (p > 0 and q > 0):
        raise ValueError(f"node2vec's p and q must be > 0, got p={p}, q={q}")
    graph = sparse.csr_matrix(graph)
    if graph.shape[0] != graph.shape[1] or (graph != graph.T).nnz or (graph.data < 0).any():
        # a dangling node of a directed graph would have no step to take
        raise ValueError(f"the graph must be square, symmetric and non-negative, got a {graph.shape} matrix that is "
                         "not")
    graph.sort_indices()
    indptr, indices = graph.indptr.astype(np.int64), graph.indices.astype(np.int64)
    cum = np.cumsum(graph.data, dtype=np.float64)  # (E,) running weight; row v spans cum[indptr[v]:indptr[v+1]]
    base = np.concatenate([[0.0], cum])[indptr[:-1]]  # (N,) running weight before row v
    strength = np.concatenate([[0.0], cum])[indptr[1:]] - base  # (N,) sum of v's edge weights
    nodes = np.flatnonzero(strength > 0)
    rng = np.random.default_rng(seed)
    walks = np.empty((walks_per_node * len(nodes), walk_length), np.int64)  # (W, L)
    if not len(walks):
        return walks
    walks[:, 0] = np.concatenate([rng.permutation(nodes) for _ in range(walks_per_node)])

    def step(cur: np.ndarray) -> np.ndarray:
        """A first-order step from each node of ``cur``: a neighbour drawn proportionally to the edge weight."""
        target = base[cur] + rng.random(len(cur)) * strength[cur]
        edge = np.searchsorted(cum, target, side="right")
        return indices[np.clip(edge, indptr[cur], indptr[cur + 1] - 1)]  # clip: float round-off at a row's end

    second_order = p != 1.0 or q != 1.0
    n = graph.shape[0]
    if second_order:
        edge_keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr)) * n + indices  # (E,) sorted: row-major
        alpha_max = max(1.0 / p, 1.0, 1.0 / q)
    for t in range(1, walk_length):
        cur = walks[:, t - 1]
        if not second_order or t == 1:
            walks[:, t] = step(cur)
            continue
        prev = walks[:, t - 2]
        todo = np.arange(len(walks))  # walkers whose proposal has not been accepted yet
        while len(todo):
            x = step(cur[todo])
            at = np.minimum(np.searchsorted(edge_keys, prev[todo] * n + x), len(edge_keys) - 1)
            adjacent = edge_keys[at] == prev[todo] * n + x  # x a neighbour of the previous node
            alpha = np.where(x == prev[todo], 1.0 / p, np.where(adjacent, 1.0, 1.0 / q))
            accept = rng.random(len(todo)) * alpha_max < alpha
            walks[todo[accept], t] = x[accept]
            todo = todo[~accept]
    return walks


def walk_corpus(sequences: Sequence[np.ndarray], walks_per_node: int, walk_length: int, seed: int,
                p: float = 1.0, q: float = 1.0) -> list[np.ndarray]:
    """The walks over the item graph of ``sequences``, as sentences for the skip-gram task (``ModelSpec.corpus``).

    Args:
        sequences: each user's item indices in time order.
        walks_per_node, walk_length, seed, p, q: as ``random_walks``.

    Returns:
        W walks, (L,) int64 each.

    Raises:
        ValueError: as ``random_walks``.
    """
    walks = random_walks(item_graph(sequences), walks_per_node, walk_length, seed, p, q)
    return list(walks)
