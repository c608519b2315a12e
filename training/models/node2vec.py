"""node2vec (Grover & Leskovec 2016, "node2vec: Scalable Feature Learning for Networks") over the item graph of the
users' sequences.

DeepWalk's walks made second order: the graph is the same (``training.modules.item_graph.item_graph``: undirected,
an edge {a, b} weighted by how often items a and b follow each other in a user's sequence), and a walk that arrived
at item v from item t steps to a neighbour x with probability proportional to ``alpha(t, x) * w(v, x)``:

    alpha(t, x) = 1/p  if x = t                 (return)
                  1    if x is a neighbour of t (stay near t: breadth-first-like)
                  1/q  otherwise                (move outward: depth-first-like when q < 1)

sampled by rejection (``training.modules.item_graph.random_walks``); the first step of a walk is first order. From
every item with an edge start ``walks_per_node`` walks of ``walk_length`` items, built once from the run's seed (the
same on every rank); they are the sentences of the ``skipgram`` task (``ModelSpec.corpus``), SGNS trained exactly as
item2vec (as the paper, which runs word2vec's SGNS on the walks):

    loss = -log sigmoid(<u_center, v_context>) - sum_k log sigmoid(-<u_center, v_neg_k>)

The scorer is item2vec's (``Item2Vec``: input table ``t_item_in``, exported, and output table ``t_item_out``); as a
retriever the query is the mean of the user's recent items' vectors, as item2vec's. With p = q = 1 it is DeepWalk.

Legend: B batch of pairs, K negatives per pair, D embedding dimension, W walks, L walk length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.tables import ITEM_SEQUENCES, ITEM_VOCAB
from training.models.item2vec import ITEM_TABLE, Item2Vec, Item2VecConfig
from training.modules.item_graph import walk_corpus
from training.spec import ModelSpec, TrainDefaults, register


@dataclass(frozen=True)
class Node2VecConfig:
    """Hyper-parameters of node2vec.

    Args:
        embedding_dim: D; a multiple of 4 (FBGEMM's fused kernels).
        num_negatives: K negatives per positive pair.
        window: the largest distance between a center and its context in a walk (word2vec's dynamic window).
        subsample: word2vec's subsampling threshold t, on the items' frequencies in the walks.
        walks_per_node: walks started from each item with an edge (the paper's r).
        walk_length: L, items per walk (the paper's l).
        p: the return parameter; a step back to the previous item is weighted 1/p.
        q: the in-out parameter; a step to an item not adjacent to the previous one is weighted 1/q (q < 1 leans
            outward, q > 1 stays local).

    Raises:
        ValueError: a value item2vec's config rejects, ``walks_per_node`` < 1, ``walk_length`` < 2, or ``p`` or
            ``q`` not > 0.
    """

    embedding_dim: int = 32
    num_negatives: int = 5
    window: int = 5
    subsample: float = 1e-3
    walks_per_node: int = 10
    walk_length: int = 40
    p: float = 1.0
    q: float = 0.5

    def __post_init__(self) -> None:
        self.sgns()  # validates the skip-gram fields
        if self.walks_per_node < 1 or self.walk_length < 2:
            raise ValueError(f"walks_per_node must be >= 1 and walk_length >= 2, got {self.walks_per_node}, "
                             f"{self.walk_length}")
        if not (self.p > 0 and self.q > 0):
            raise ValueError(f"p and q must be > 0, got p={self.p}, q={self.q}")

    def sgns(self) -> Item2VecConfig:
        """The skip-gram scorer's config."""
        return Item2VecConfig(self.embedding_dim, self.num_negatives, self.window, self.subsample)


def corpus(config: Node2VecConfig, sequences: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """W second-order random walks, (L,) item indices each, over the item graph of the users' ``sequences``."""
    return walk_corpus(sequences, config.walks_per_node, config.walk_length, seed, p=config.p, q=config.q)


SPEC = register(ModelSpec(
    name="node2vec", kind="retriever", task="skipgram", config=Node2VecConfig,
    build=lambda vocab_sizes, config, sparse_device=None: Item2Vec(vocab_sizes["item"], config.sgns(),
                                                                   sparse_device),
    # item2vec's knobs, one pass over the walks as in the paper: on ML-100K ~2.8M pairs, ~1.5x what item2vec's 8
    # epochs over the users' sequences draw. Not tuned.
    train=TrainDefaults(epochs=1, batch_size=4096, lr_sparse=0.2),
    tables=(ITEM_SEQUENCES, ITEM_VOCAB),
    paper="Grover & Leskovec 2016, node2vec: Scalable Feature Learning for Networks",
    item_table=ITEM_TABLE,
    corpus=corpus,
))
