"""Embedding parts of a ranker: the shared embedding tables (``SparseArch``) and FM's first-order weights.

Tables are declared by ``features.definitions``: one ``EmbeddingBagConfig`` per distinct ``SparseFeature.table``,
listing every feature that reads it, sum pooling (multi-hot genres are summed into one vector). The input is a
``KeyedJaggedTensor`` with one key per feature.

Legend: B batch size, F number of features, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig,
                      KeyedJaggedTensor, PoolingType)

from features.definitions import SparseFeature
from features.errors import VocabularyError


def table_configs(
    features: Sequence[SparseFeature],
    vocab_sizes: Mapping[str, int],
    embedding_dim: int,
    init_range: float = 0.02,
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table named by ``features``, in first-use order.

    Args:
        features: the declared sparse features; features naming the same table share it.
        vocab_sizes: rows of each vocabulary (index 0 included), keyed by ``SparseFeature.vocab``.
        embedding_dim: D; TorchRec's fused CPU kernels need a multiple of 4.
        init_range: weights start uniform in [-init_range, init_range].

    Raises:
        VocabularyError: a feature's vocabulary is missing from ``vocab_sizes``, or two features sharing a table
            name different vocabularies.

    >>> from features.definitions import SPARSE_FEATURES
    >>> sizes = {"user": 10, "item": 20, "age_bucket": 8, "gender": 3, "occupation": 22, "zip_prefix": 5, "genre": 19}
    >>> [(c.name, c.num_embeddings, c.feature_names) for c in table_configs(SPARSE_FEATURES, sizes, 8)][:2]
    [('t_user', 10, ['user_idx']), ('t_item', 20, ['item_idx'])]
    """
    by_table: dict[str, list[SparseFeature]] = {}
    for f in features:
        if f.vocab not in vocab_sizes:
            raise VocabularyError(f"feature {f.name!r} reads vocabulary {f.vocab!r}, absent from vocab_sizes "
                                  f"{sorted(vocab_sizes)}; re-export vocab_sizes.json with the features job")
        by_table.setdefault(f.table, []).append(f)
    configs = []
    for table, feats in by_table.items():
        vocabs = {f.vocab for f in feats}
        if len(vocabs) != 1:
            raise VocabularyError(f"table {table!r} is read by features with different vocabularies {vocabs}")

        def init(w: torch.Tensor, r: float = init_range) -> torch.Tensor:
            return nn.init.uniform_(w, -r, r)

        configs.append(EmbeddingBagConfig(
            name=table, embedding_dim=embedding_dim, num_embeddings=int(vocab_sizes[feats[0].vocab]),
            feature_names=[f.name for f in feats], pooling=PoolingType.SUM,
            weight_init_min=-init_range, weight_init_max=init_range, init_fn=init,
        ))
    return configs


class SparseArch(nn.Module):
    """Looks up and pools every feature's embedding: the one embedding layer a model shares between its parts.

    Args:
        tables: the table configs (``table_configs``).
        device: where the tables live; ``meta`` when ``DistributedModelParallel`` will materialise the shards.

    Call: ``forward(features: KeyedJaggedTensor) -> Tensor (B, F, D)``, features in ``self.feature_names`` order.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=list(tables), device=device)
        self.feature_names = [name for t in tables for name in t.feature_names]

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features).to_dict()  # {feature: (B, D)}
        return torch.stack([pooled[name] for name in self.feature_names], dim=1)  # (B, F, D)


class FirstOrder(nn.Module):
    """FM's first-order term: a 1-dim weight per row of every table, summed over the features, plus a bias.

    These tables are tiny (V x 1) and FBGEMM's fused kernels need widths divisible by 4, so they are plain
    ``nn.EmbeddingBag`` modules that DistributedModelParallel replicates data-parallel.

    Call: ``forward(features: KeyedJaggedTensor) -> Tensor (B,)``.
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.weights = nn.ModuleDict({
            t.name: nn.EmbeddingBag(t.num_embeddings, 1, mode="sum", include_last_offset=True) for t in tables
        })
        for bag in self.weights.values():
            nn.init.zeros_(bag.weight)
        self.table_of = {name: t.name for t in tables for name in t.feature_names}
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        jagged = features.to_dict()
        terms = [
            self.weights[table](jagged[name].values(), jagged[name].offsets())  # (B, 1)
            for name, table in self.table_of.items()
        ]
        return torch.cat(terms, dim=1).sum(dim=1) + self.bias  # (B,)


class SequenceEmbedding(nn.Module):
    """Unpooled (sequence) lookups through TorchRec's ``EmbeddingCollection``: one row per id, jagged per sample.

    DIN reads the candidate item and the behaviour history from the same table, so both features are listed on
    one ``EmbeddingConfig``; DMP shards it like any other table.

    Args:
        name: the table's name (``t_item``).
        num_embeddings: rows (index 0 = unknown/padding item).
        embedding_dim: D, a multiple of 4.
        feature_names: the KJT keys that read the table (e.g. ``item_idx``, ``hist_item_idx``).
        init_range: weights start uniform in [-init_range, init_range].
        device: ``meta`` before sharding.

    Call: ``forward(features: KeyedJaggedTensor) -> dict[str, JaggedTensor]`` with values (total ids, D).
    """

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, feature_names: Sequence[str],
                 init_range: float = 0.02, device: torch.device | None = None) -> None:
        super().__init__()

        def init(w: torch.Tensor, r: float = init_range) -> torch.Tensor:
            return nn.init.uniform_(w, -r, r)

        config = EmbeddingConfig(name=name, embedding_dim=embedding_dim, num_embeddings=int(num_embeddings),
                                 feature_names=list(feature_names), weight_init_min=-init_range,
                                 weight_init_max=init_range, init_fn=init)
        self.embedding_collection = EmbeddingCollection(tables=[config], device=device)
        self.feature_names = list(feature_names)

    def forward(self, features: KeyedJaggedTensor) -> dict:
        return self.embedding_collection(features)
