"""item2vec (Barkan & Koenigstein 2016, "Item2Vec: Neural Item Embedding for Collaborative Filtering").

Skip-gram with negative sampling (SGNS; Mikolov et al. 2013) over each user's sequence of positively rated
items: for a (center, context) pair and K items drawn from the unigram^0.75 distribution,

    loss = -log sigmoid(<u_center, v_context>) - sum_k log sigmoid(-<u_center, v_neg_k>)

with u from the input table ``t_item_in`` (the item embeddings that are exported) and v from the output table
``t_item_out``. Pair generation, frequent-item subsampling and the negatives' distribution live in
``training.data``, the negatives' draws in ``training.tasks.skipgram``.

Both tables are read through one TorchRec ``EmbeddingCollection`` (unpooled lookups) from a KJT of two features:
``center``, one id per pair, read in ``t_item_in``, and ``targets``, the context then the K negatives of each pair
(1 + K ids), read in ``t_item_out`` (``sgns_kjt``). Two large lookups instead of 2 + K pooled one-id bags: the same
arithmetic in fewer kernel calls (``bench/sgns_step.py``).

Legend: B batch of pairs, K negatives per pair, D embedding dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from features.tables import ITEM_SEQUENCES, ITEM_VOCAB
from training.data import SGNS_CENTER as CENTER, SGNS_TARGETS as TARGETS, sgns_kjt
from training.spec import ModelSpec, TrainDefaults, register

#: State-dict key of the input table: the item vectors that are exported (``ModelSpec.item_table``).
ITEM_TABLE = "sparse_arch.embeddings.t_item_in.weight"


@dataclass(frozen=True)
class Item2VecConfig:
    """Hyper-parameters of item2vec.

    Args:
        embedding_dim: D; a multiple of 4 (FBGEMM's fused kernels).
        num_negatives: K negatives per positive pair.
        window: the largest distance between a center and its context in a sequence (word2vec's dynamic window
            draws each center's span from 1..window).
        subsample: word2vec's subsampling threshold t (``training.data.keep_probabilities``).
    """

    embedding_dim: int = 32
    num_negatives: int = 5
    window: int = 5
    subsample: float = 1e-3

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.num_negatives < 1 or self.window < 1 or self.subsample <= 0:
            raise ValueError(f"num_negatives and window must be >= 1 and subsample > 0, got {self.num_negatives}, "
                             f"{self.window}, {self.subsample}")


class Item2Vec(nn.Module):
    """SGNS scorer with an input (``t_item_in``) and an output (``t_item_out``) item table.

    Args:
        num_items: rows of the item vocabulary (index 0 included).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Call: ``forward(features: KJT of ``sgns_kjt``: center (B ids), targets (B x (1 + K) ids)) -> logits Tensor
    (B, 1 + K)``; column 0 scores the true context, the others the negatives.

    >>> model = Item2Vec(10, Item2VecConfig(embedding_dim=8, num_negatives=2))
    >>> model(sgns_kjt(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([[5, 6], [7, 8]]))).shape
    torch.Size([2, 3])
    """

    def __init__(self, num_items: int, config: Item2VecConfig = Item2VecConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        # word2vec's initialisation: input rows uniform in [-0.5/D, 0.5/D], output rows zero.
        tables = [
            EmbeddingConfig(name="t_item_in", embedding_dim=d, num_embeddings=num_items, feature_names=[CENTER],
                            weight_init_min=-0.5 / d, weight_init_max=0.5 / d,
                            init_fn=lambda w, r=0.5 / d: nn.init.uniform_(w, -r, r)),
            EmbeddingConfig(name="t_item_out", embedding_dim=d, num_embeddings=num_items, feature_names=[TARGETS],
                            weight_init_min=0.0, weight_init_max=0.0, init_fn=nn.init.zeros_),
        ]
        self.sparse_arch = EmbeddingCollection(tables=tables, device=sparse_device)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.sparse_arch(features)  # {feature: JaggedTensor}
        center = emb[CENTER].values()  # (B, D)
        targets = emb[TARGETS].values().view(center.shape[0], -1, center.shape[1])  # (B, 1 + K, D)
        # a broadcast product: on CPU faster than bmm over B tiny (1 + K, D) x (D, 1) products
        return (center.unsqueeze(1) * targets).sum(dim=2)  # (B, 1 + K)


def sgns_loss(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Negative-sampling loss, averaged over pairs.

    Args:
        logits: (B, 1 + K) from ``Item2Vec``; column 0 is the true context.
        weights: (B,) per-pair weights (0 for padding rows); default all ones.

    >>> round(sgns_loss(torch.tensor([[0.0, 0.0]])).item(), 4)  # -2 log(1/2)
    1.3863
    """
    per_pair = -F.logsigmoid(logits[:, 0]) - F.logsigmoid(-logits[:, 1:]).sum(dim=1)  # (B,)
    if weights is None:
        return per_pair.mean()
    return (per_pair * weights).sum() / weights.sum().clamp_min(1.0)


SPEC = register(ModelSpec(
    name="item2vec", kind="retriever", task="skipgram", config=Item2VecConfig,
    build=lambda vocab_sizes, config, sparse_device=None: Item2Vec(vocab_sizes["item"], config, sparse_device),
    train=TrainDefaults(epochs=8, batch_size=4096, lr_sparse=0.2),
    tables=(ITEM_SEQUENCES, ITEM_VOCAB),
    paper="Barkan & Koenigstein 2016, Item2Vec: Neural Item Embedding for Collaborative Filtering",
    item_table=ITEM_TABLE,
))
