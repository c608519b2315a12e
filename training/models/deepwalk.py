"""DeepWalk (Perozzi, Al-Rfou & Skiena 2014, "DeepWalk: Online Learning of Social Representations") over the item
graph of the users' sequences.

The graph (``training.modules.item_graph.item_graph``) is undirected, with an edge {a, b} weighted by how often
items a and b follow each other in a user's sequence (``export/item_sequences``, what item2vec trains on). From every
item with an edge start ``walks_per_node`` weighted random walks of ``walk_length`` items, each step to a neighbour
with probability proportional to the edge's weight (the paper's walks are uniform on an unweighted graph; weighting
keeps the co-occurrence counts). The walks, built once from the run's seed (the same on every rank), are the
sentences of the ``skipgram`` task (``ModelSpec.corpus``): SGNS with word2vec's dynamic window and subsampling,
trained exactly as item2vec (the paper's hierarchical softmax is replaced by negative sampling, as node2vec does):

    loss = -log sigmoid(<u_center, v_context>) - sum_k log sigmoid(-<u_center, v_neg_k>)

The scorer is item2vec's (``Item2Vec``: input table ``t_item_in``, exported, and output table ``t_item_out``); as a
retriever the query is the mean of the user's recent items' vectors, as item2vec's.

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
class DeepWalkConfig:
    """Hyper-parameters of DeepWalk.

    Args:
        embedding_dim: D; a multiple of 4 (FBGEMM's fused kernels).
        num_negatives: K negatives per positive pair.
        window: the largest distance between a center and its context in a walk (word2vec's dynamic window).
        subsample: word2vec's subsampling threshold t, on the items' frequencies in the walks.
        walks_per_node: walks started from each item with an edge (the paper's gamma).
        walk_length: L, items per walk (the paper's t).

    Raises:
        ValueError: a value item2vec's config rejects, ``walks_per_node`` < 1 or ``walk_length`` < 2.
    """

    embedding_dim: int = 32
    num_negatives: int = 5
    window: int = 5
    subsample: float = 1e-3
    walks_per_node: int = 10
    walk_length: int = 40

    def __post_init__(self) -> None:
        self.sgns()  # validates the skip-gram fields
        if self.walks_per_node < 1 or self.walk_length < 2:
            raise ValueError(f"walks_per_node must be >= 1 and walk_length >= 2, got {self.walks_per_node}, "
                             f"{self.walk_length}")

    def sgns(self) -> Item2VecConfig:
        """The skip-gram scorer's config."""
        return Item2VecConfig(self.embedding_dim, self.num_negatives, self.window, self.subsample)


def corpus(config: DeepWalkConfig, sequences: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """W weighted random walks, (L,) item indices each, over the item graph of the users' ``sequences``."""
    return walk_corpus(sequences, config.walks_per_node, config.walk_length, seed)


SPEC = register(ModelSpec(
    name="deepwalk", kind="retriever", task="skipgram", config=DeepWalkConfig,
    build=lambda vocab_sizes, config, sparse_device=None: Item2Vec(vocab_sizes["item"], config.sgns(),
                                                                   sparse_device),
    # item2vec's knobs, one pass over the walks as in the paper: on ML-100K ~2.8M pairs, ~1.5x what item2vec's 8
    # epochs over the users' sequences draw. Not tuned.
    train=TrainDefaults(epochs=1, batch_size=4096, lr_sparse=0.2),
    tables=(ITEM_SEQUENCES, ITEM_VOCAB),
    paper="Perozzi, Al-Rfou & Skiena 2014, DeepWalk: Online Learning of Social Representations",
    item_table=ITEM_TABLE,
    corpus=corpus,
))
