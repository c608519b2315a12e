"""The skip-gram task: SGNS pairs (Mikolov et al. 2013) drawn from item sequences, for item2vec and the walk
models that feed it sequences.

Every epoch draws its (center, context) pairs with word2vec's dynamic window and frequent-item subsampling from
``export/item_sequences`` (``training.data.skipgram_pairs``) -- or from the sentences a model makes of them
(``ModelSpec.corpus``: the walk models' random walks over the item graph) --, the same pairs on every rank (seeded by
the run's seed and the epoch), each rank training on its share; negatives come from the unigram^0.75 distribution
of the sentences, seeded per epoch and rank, drawn through an alias table (``alias_table``: O(1) a draw). There is
no validation split: every epoch runs and the last state is saved.

Legend: B pairs per step, K negatives per pair.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from training.distributed.collectives import all_reduce_sum, to_device
from training.tasks.context import TaskContext


def alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The alias table of the distribution ``p`` (Walker 1977, built as Vose 1991): a draw takes k uniform in
    [0, R), keeps it with probability ``accept[k]`` and otherwise takes ``alias[k]`` (``draw_alias``) -- two uniform
    numbers a draw, where ``Generator.choice(p=...)`` searches the cumulative sum.

    Args:
        p: (R,) probabilities, summing to 1.

    Returns:
        accept: (R,) float64 in [0, 1]; alias: (R,) int64.

    >>> accept, alias = alias_table(np.array([0.5, 0.25, 0.25, 0.0]))
    >>> ((accept + np.bincount(alias, weights=1 - accept, minlength=4)) / 4).tolist()  # P(k), back
    [0.5, 0.25, 0.25, 0.0]
    """
    r = len(p)
    scaled = np.asarray(p, np.float64) * r  # mean 1: each of the R columns holds 1 / R of the mass
    accept, alias = np.ones(r), np.arange(r, dtype=np.int64)
    small = [k for k in range(r) if scaled[k] < 1.0]
    large = [k for k in range(r) if scaled[k] >= 1.0]
    while small and large:  # fill a short column k with the excess of a tall one
        k, j = small.pop(), large.pop()
        accept[k], alias[k] = scaled[k], j
        scaled[j] -= 1.0 - scaled[k]
        (small if scaled[j] < 1.0 else large).append(j)
    return accept, alias  # the columns left are full (accept 1) up to rounding


def draw_alias(rng: np.random.Generator, accept: np.ndarray, alias: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``size`` int64 draws from the distribution of ``alias_table``'s ``accept`` and ``alias``."""
    k = rng.integers(0, len(accept), size)
    return np.where(rng.random(size) < accept[k], k, alias[k])


class SkipGramTask:
    """SGNS over item sequences (see the module docstring). The model's config gives ``window``, ``subsample`` and
    ``num_negatives``; its forward takes ``training.data.sgns_kjt`` and returns (B, 1 + K) logits."""

    name = "skipgram"
    monitor = None
    levers = ()
    result_keys = ("pairs_per_s", "final_loss")

    def __init__(self, ctx: TaskContext) -> None:
        from training.data import item_counts, keep_probabilities, negative_distribution, read_item_sequences

        self.ctx, config = ctx, ctx.config
        self.num_items = ctx.vocab["item"]
        self.sequences = read_item_sequences(ctx.lake_dir)
        if ctx.spec.corpus is not None:  # the model's own sentences (e.g. walks), seeded alike on every rank
            self.sequences = ctx.spec.corpus(config, self.sequences, ctx.opts.seed)
        counts = item_counts(self.sequences, self.num_items)
        self.keep, self.neg_p = keep_probabilities(counts, config.subsample), negative_distribution(counts)
        self.neg_alias = alias_table(self.neg_p)
        self.pairs_seen, self.loss_avg, self._pairs = 0, float("nan"), 0
        self.steps_per_epoch = 0  # known once an epoch's pairs are drawn (inside the timed epoch, as word2vec)
        self._epoch = (-1,)

    def _draw(self, epoch: int) -> tuple:
        """The epoch's pairs (the same on every rank), this rank's share padded to whole batches, its negatives."""
        from training.data import num_batches, skipgram_pairs

        ctx, config, bs = self.ctx, self.ctx.config, self.ctx.local_batch_size
        rng = np.random.default_rng(ctx.opts.seed * 1000 + epoch)  # same pairs on every rank ...
        center, context = skipgram_pairs(self.sequences, config.window, rng, self.keep)
        order = rng.permutation(len(center))[ctx.rank::ctx.world_size]  # ... each rank takes its share
        self.steps_per_epoch = num_batches(len(center), ctx.world_size, bs)
        idx = np.resize(order, self.steps_per_epoch * bs)
        weight = torch.from_numpy((np.arange(len(idx)) < len(order)).astype(np.float32))
        negs = draw_alias(np.random.default_rng([ctx.opts.seed, epoch, ctx.rank]), *self.neg_alias,
                          (len(idx), config.num_negatives))  # (N, K)
        return epoch, center, context, idx, weight, negs

    def bind(self, dmp) -> None:
        pass

    def batches(self, epoch: int) -> Iterator:
        from training.data import sgns_kjt

        if self._epoch[0] != epoch:
            self._epoch = self._draw(epoch)
        _, center, context, idx, weight, negs = self._epoch
        self._pairs, self._total = len(center), torch.zeros(2)
        bs, device = self.ctx.local_batch_size, self.ctx.device
        for s in range(self.steps_per_epoch):
            rows = slice(s * bs, (s + 1) * bs)
            kjt = sgns_kjt(torch.from_numpy(center[idx[rows]]), torch.from_numpy(context[idx[rows]]),
                           torch.from_numpy(negs[rows]))
            yield to_device(kjt, device), to_device(weight[rows], device), weight[rows]

    def loss(self, dmp, batch) -> torch.Tensor:
        from training.models.item2vec import sgns_loss

        kjt, weight, cpu_weight = batch
        loss = sgns_loss(dmp(kjt), weight)
        self._total += torch.tensor([float(loss) * float(cpu_weight.sum()), float(cpu_weight.sum())])
        return loss

    def end_epoch(self, epoch: int, train_s: float) -> dict:
        total = all_reduce_sum(self._total, self.ctx.device)
        self.loss_avg = float(total[0] / total[1])
        self.pairs_seen += self._pairs
        return {"loss": self.loss_avg, "pairs": self._pairs, "pairs_per_s": self.pairs_seen / max(train_s, 1e-9)}

    def evaluate(self, dmp, split: str) -> dict:
        raise NotImplementedError("the skip-gram task has no validation split")

    def summary(self) -> dict:
        return {"final_loss": self.loss_avg}

    def state_dict(self) -> dict:
        return {"pairs_seen": self.pairs_seen, "loss": self.loss_avg}

    def load_state_dict(self, state: dict) -> None:
        self.pairs_seen, self.loss_avg = state["pairs_seen"], state["loss"]

    def finish(self, state: dict) -> dict:
        return {}
