"""A ranker's pooled embedding lookups fused for serving: one ``embedding_bag`` call per collection instead of one
per feature, with the same results.

TorchRec's unsharded ``EmbeddingBagCollection`` looks up every feature with its own ``embedding_bag`` call, and so
does FM's first-order term (``training.modules.FirstOrder``): fourteen calls for DeepFM's seven features. At
serving's batch (one user's ~140 candidates) a call costs more in dispatch than in arithmetic, so the twins here
make one call over all of a collection's tables, stacked into one weight (docs/serving.md has the figures). They are
for inference only (their weights are copies, not trained parameters) and take the same input, a
``KeyedJaggedTensor`` with B rows per key, and give the same output as the module they replace.

``fuse_lookups`` swaps them into a loaded ranker by module type, never by model name, so it serves any registered
ranker, and checks the result on a probe input: where the fused model's output differs from the model's own by
more than ``atol`` (or it raises, e.g. a model that reads a collection's internals in its forward), the original
modules are put back.

Legend: B batch size (rows per key), K keys of the input KJT, F features a collection reads, D embedding dim,
V ids in the KJT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor, PoolingType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from training.modules import FirstOrder

log = logging.getLogger(__name__)

_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


class FusedBags(nn.Module):
    """The pooled lookups of several tables' features in one ``embedding_bag`` call: the tables' rows are stacked in
    one weight (a row of zeros last) and each feature's ids are shifted to its table's block; ids of KJT keys that no
    table here reads go to the zero row and their bags are dropped.

    Args:
        tables: ``[(weight (rows, D), feature names that read it)]``, one D for all.
        mode: ``"sum"`` or ``"mean"`` pooling, as ``torch.nn.functional.embedding_bag`` takes it.

    Raises:
        ValueError: no tables, tables of different widths, or a feature read from two tables.

    Call: ``forward(features: KJT with B rows per key) -> Tensor (F, B, D)``, the features in ``self.features``
    order; raises ``KeyError`` when a feature read here is not a key of ``features``.

    >>> from torchrec import KeyedJaggedTensor
    >>> bags = FusedBags([(torch.tensor([[0.0], [1.0], [2.0]]), ["a"]), (torch.tensor([[10.0], [20.0]]), ["b"])])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["b", "x", "a"], values=torch.tensor([1, 0, 7, 1, 2, 2]),
    ...                                           lengths=torch.tensor([1, 1, 1, 0, 2, 1]))  # B = 2
    >>> bags(kjt).squeeze(2)  # a: [1 + 2, 2], b: [20, 10]; key x is not read
    tensor([[ 3.,  2.],
            [20., 10.]])
    """

    def __init__(self, tables: Sequence[tuple[torch.Tensor, Sequence[str]]], mode: str = "sum") -> None:
        super().__init__()
        if not tables or len({w.shape[1] for w, _ in tables}) != 1:
            raise ValueError(f"FusedBags needs tables of one width, got {[tuple(w.shape) for w, _ in tables]}")
        self.mode = mode
        self.features = [name for _, names in tables for name in names]
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"FusedBags reads each feature from one table; got {self.features}")
        self._start, rows = {}, 0
        for w, names in tables:
            for name in names:
                self._start[name] = rows
            rows += w.shape[0]
        self._zero_row = rows
        weight = torch.cat([w.detach() for w, _ in tables] + [tables[0][0].new_zeros(1, tables[0][0].shape[1])])
        self.register_buffer("weight", weight, persistent=False)  # (rows + 1, D)
        self._plans: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray | None, torch.Tensor]] = {}

    def _plan(self, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor]:
        """For the KJT keys ``keys``: each key's row shift (K,), which keys are read (K,) bool or None when all
        are, and the keys' positions of ``self.features`` (F,). Built once per key order."""
        plan = self._plans.get(keys)
        if plan is None:
            missing = [f for f in self.features if f not in keys]
            if missing:
                raise KeyError(f"the input has no key(s) {missing}; it has {list(keys)}")
            read = np.array([k in self._start for k in keys])
            shift = np.array([self._start.get(k, self._zero_row) for k in keys], dtype=np.int64)
            plan = self._plans[keys] = (shift, None if read.all() else read,
                                        torch.tensor([keys.index(f) for f in self.features]))
        return plan

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        keys = tuple(features.keys())
        shift, read, pick = self._plan(keys)
        # numpy's repeat costs a fifth of torch.repeat_interleave's dispatch at this size
        ids_per_key = features.length_per_key()  # K ints
        ids = features.values().numpy() + np.repeat(shift, ids_per_key)  # (V,)
        if read is not None:
            ids = np.where(np.repeat(read, ids_per_key), ids, self._zero_row)
        pooled = F.embedding_bag(torch.from_numpy(ids), self.weight, features.offsets(), mode=self.mode,
                                 include_last_offset=True)  # (K * B, D)
        return pooled.view(len(keys), -1, pooled.shape[1]).index_select(0, pick)  # (F, B, D)


class FusedBagCollection(nn.Module):
    """Twin of an unweighted TorchRec ``EmbeddingBagCollection`` whose tables share one width and one pooling.

    Call: ``forward(features: KJT) -> KeyedTensor`` with values (B, F * D), keyed as the collection keys them.
    """

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        configs = ebc.embedding_bag_configs()
        self.bags = FusedBags([(ebc.embedding_bags[c.name].weight, c.feature_names) for c in configs],
                              _MODES[configs[0].pooling])
        self.keys = [name for names in get_embedding_names_by_table(configs) for name in names]
        self.length_per_key = [c.embedding_dim for c in configs for _ in c.feature_names]

    @staticmethod
    def fits(ebc: EmbeddingBagCollection) -> bool:
        """Whether ``ebc`` can be fused: unweighted, one width, one pooling that ``embedding_bag`` has, each
        feature read from one table."""
        configs = ebc.embedding_bag_configs()
        features = [name for c in configs for name in c.feature_names]
        return (bool(configs) and not ebc.is_weighted() and len({c.embedding_dim for c in configs}) == 1
                and len({c.pooling for c in configs}) == 1 and configs[0].pooling in _MODES
                and len(set(features)) == len(features))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.bags(features)  # (F, B, D)
        return KeyedTensor(keys=self.keys, length_per_key=self.length_per_key,
                           values=pooled.permute(1, 0, 2).reshape(pooled.shape[1], -1))  # (B, F * D)


class FusedFirstOrder(nn.Module):
    """Twin of ``training.modules.FirstOrder``: the first-order weights of every feature summed, plus the bias.

    Call: ``forward(features: KJT) -> Tensor (B,)``.
    """

    def __init__(self, first_order: FirstOrder) -> None:
        super().__init__()
        by_table: dict[str, list[str]] = {}
        for name, table in first_order.table_of.items():
            by_table.setdefault(table, []).append(name)
        self.bags = FusedBags([(first_order.weights[t].weight, names) for t, names in by_table.items()], "sum")
        self.register_buffer("bias", first_order.bias.detach().clone(), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.bags(features).sum(dim=(0, 2)) + self.bias  # (F, B, 1) -> (B,)


def _twin(module: nn.Module) -> nn.Module | None:
    if isinstance(module, EmbeddingBagCollection) and FusedBagCollection.fits(module):
        return FusedBagCollection(module)
    if isinstance(module, FirstOrder):
        return FusedFirstOrder(module)
    return None


def fuse_lookups(module: nn.Module, probe: Callable[[nn.Module], torch.Tensor], atol: float = 1e-6) -> list[str]:
    """Replace, in place, every fusable lookup submodule of ``module`` (an ``EmbeddingBagCollection`` that
    ``FusedBagCollection.fits``, a ``FirstOrder``) by its fused twin, and keep the twins only if ``probe(module)``
    (e.g. the model's forward on one request's inputs) gives the same tensor as before within ``atol`` (and
    ``rtol`` = ``atol``); otherwise put the originals back (logged as a warning).

    Args:
        module: a ranker in eval mode, on CPU.
        probe: runs the model on fixed inputs and returns its output (a tensor).
        atol: the largest difference accepted.

    Returns:
        the names of the submodules replaced (empty when none was, or when the probe disagreed).

    Raises:
        whatever ``probe`` raises on the model as it is (before anything is replaced).
    """
    with torch.inference_mode():
        want = probe(module)
    swapped = []
    for name, sub in list(module.named_modules()):
        twin = _twin(sub) if name else None
        if twin is not None:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name)
            setattr(parent, attr, twin)
            swapped.append((name, parent, attr, sub))
    if not swapped:
        return []
    try:
        with torch.inference_mode():
            got = probe(module)
        if got.shape != want.shape:
            same, reason = False, f"shape {tuple(got.shape)}, not {tuple(want.shape)}"
        else:
            same = torch.allclose(got, want, rtol=atol, atol=atol)
            reason = f"largest difference {(got - want).abs().max().item():.3g}"
    except Exception as e:  # a model reading a collection's internals: serve it unfused
        same, reason = False, f"{type(e).__name__}: {e}"
    if not same:
        for _, parent, attr, sub in reversed(swapped):
            setattr(parent, attr, sub)
        log.warning("fused lookups disagree with %s's own (%s); serving it unfused", type(module).__name__, reason)
        return []
    return [name for name, *_ in swapped]
