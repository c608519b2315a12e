"""The wide part's cross-product transformations (Cheng et al. 2016, "Wide & Deep Learning for Recommender
Systems", eq. 2): for a pair of categorical features (a, b), each pair of ids (a_i, b_j) a sample holds is one
binary feature of its own, ``phi = AND(a = a_i, b = b_j)``, with one learnt weight -- the memorisation that a linear
model over the single features cannot express.

The crossed id is ``a_i * |B| + b_j`` (exact, no hashing: the crosses declared here have at most a few thousand
values); a multi-hot side (genres) gives one crossed id per value, summed like any multi-hot feature. The weights
are 1-dim, so, like ``FirstOrder``, they are plain ``nn.EmbeddingBag`` s that DistributedModelParallel replicates.

Legend: B batch size, V_a, V_b the two vocabularies' rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SparseFeature


class CrossProduct(nn.Module):
    """Sum of the weights of every crossed id of the declared pairs, plus nothing else (no bias).

    Args:
        pairs: ``(a, b)`` feature pairs; at most one of each pair multi-hot.
        vocab_sizes: rows per vocabulary, keyed by ``SparseFeature.vocab``.

    Raises:
        ValueError: both features of a pair are multi-hot.
        VocabularyError (KeyError): a vocabulary is missing.

    Call: ``forward(features: KeyedJaggedTensor with B rows per key) -> Tensor (B,)``.

    >>> from features.definitions import SPARSE_FEATURES as F
    >>> from training.data import kjt_of_rows, synthetic_vocab_sizes
    >>> cross = CrossProduct([(F[3], F[6])], synthetic_vocab_sizes())   # gender x genre
    >>> cross.crossed_ids(kjt_of_rows([{f.name: [2, 5] if f.multi_hot else 1 for f in F}]))[0][0].tolist()
    [22, 25]
    """

    def __init__(self, pairs: Sequence[tuple[SparseFeature, SparseFeature]], vocab_sizes: Mapping[str, int]) -> None:
        super().__init__()
        self.pairs = []
        for a, b in pairs:
            if a.multi_hot and b.multi_hot:
                raise ValueError(f"cross {a.name} x {b.name}: at most one side may be multi-hot")
            one, many = (b, a) if a.multi_hot else (a, b)
            self.pairs.append((one.name, many.name, int(vocab_sizes[many.vocab]),
                               int(vocab_sizes[one.vocab]) * int(vocab_sizes[many.vocab])))
        self.weights = nn.ModuleList(nn.EmbeddingBag(rows, 1, mode="sum", include_last_offset=True)
                                     for *_, rows in self.pairs)
        for bag in self.weights:
            nn.init.zeros_(bag.weight)

    def crossed_ids(self, features: KeyedJaggedTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per pair, (crossed ids (N,), offsets (B + 1,)): the ids of the many-valued side, each crossed with the
        sample's one id of the other side."""
        jagged = features.to_dict()
        out = []
        for one, many, size_many, _ in self.pairs:
            a, b = jagged[one].values(), jagged[many]  # (B,) one id per sample; jagged (N,)
            rows = torch.repeat_interleave(torch.arange(len(a), device=a.device), b.lengths())  # (N,)
            out.append((a[rows] * size_many + b.values(), b.offsets()))
        return out

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        terms = [bag(ids, offsets) for bag, (ids, offsets) in zip(self.weights, self.crossed_ids(features))]
        return torch.cat(terms, dim=1).sum(dim=1)  # (B,)
