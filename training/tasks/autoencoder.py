"""The autoencoder task: an item-based autoencoder (I-AutoRec, Sedhain et al. 2015; ``training.models.autorec``)
trained on mini-batches of items of the train split of ``gold.ctr_samples``, early-stopped on HR@10 of valid
positives.

Every rank reads the whole train split (``user_idx``, ``item_idx`` and the model's target column) and builds the
same (R, U) item x user matrices of observed targets and of the observed mask (``training.modules.autorec
.observed_matrix``); an item is a row. Every epoch the items with an observed entry are shuffled the same way on
every rank (seeded by the run's seed and the epoch), each rank takes its share ``rank::world_size``, padded to whole
batches with rows of weight 0, so that every rank runs exactly ``steps_per_epoch`` steps (the sharded lookup is a
collective). A batch is dense: the inputs (B, U), the mask (B, U), the weights (B,), and the KJT that reads both
tables whole.

Objective per step (expectation: the paper's J over the N items with an observed entry, divided by N):

    loss = (1 / B_real) * sum over the batch's items of masked_sse_i + lambda / (2 N) * (||W||^2 + ||V||^2)

(``masked_sse`` with the config's ``unobserved_weight``; the figure ``train_rmse`` is over observed entries.)

Evaluation (``monitor`` ``hr10``): HR@10 over at most ``EVAL_CASES`` label-1 rows of the split (a fixed sample):
the model's own query (``ModelSpec.query_encoder``'s encoder, built from the current weights) of the row's user and
point-in-time history scores every item by the inner product with its exported vectors (``ModelSpec.item_vectors``,
MIPS-transformed: the order of the cosine index), the history's items and the OOV row left out; a hit when the
row's item is among the 10 best. A row without a query (no history item with a code) is a miss. Every rank computes the codes of all items (the same forward steps on every rank) and the same
figure.

Legend: B items per step on a rank, U user rows, R item rows, H hidden units, N items with a train row, C cases.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from features.definitions import HISTORY_FEATURE, SPARSE_FEATURES
from training.distributed.collectives import all_reduce_sum, to_device
from training.tasks.context import TaskContext

#: The most label-1 rows of a split an evaluation scores (a fixed sample of them).
EVAL_CASES = 2000
#: HR@K's K.
TOP_K = 10
_USER_ITEM = tuple(f for f in SPARSE_FEATURES if f.name in ("user_idx", "item_idx"))


def read_targets(lake_dir, split: str, target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_idx, item_idx, target) (N,) of every row of ``split``; ``target`` a column of ``ctr_samples``
    (``label`` or ``rating``).

    Raises:
        TableNotFoundError: the split has not been exported.
        KeyError: the export has no ``target`` column (e.g. generated data without ratings).
    """
    from training.data import read_ctr_shard

    rows = read_ctr_shard(lake_dir, split, rank=0, world_size=1, features=_USER_ITEM)  # the whole split
    if target == "label":
        return rows.ids["user_idx"], rows.ids["item_idx"], rows.label
    import pyarrow.dataset as ds

    from features.tables import CTR_SAMPLES, parquet_export

    dataset = ds.dataset(f"{parquet_export(CTR_SAMPLES, lake_dir)}/split={split}", format="parquet")
    if target not in dataset.schema.names:
        raise KeyError(f"{CTR_SAMPLES.name} split={split} has no column {target!r}; train with another target "
                       f"(--option target=label)")
    values = dataset.to_table(columns=[target]).column(target).to_numpy(zero_copy_only=False)
    return rows.ids["user_idx"], rows.ids["item_idx"], np.nan_to_num(values.astype(np.float32))


def hit_rate(queries: np.ndarray, has_query: np.ndarray, items: np.ndarray, targets: np.ndarray,
             history, k: int = TOP_K) -> float:
    """Share of cases whose target item is among the ``k`` items of highest ``<query, item vector>``, the case's
    history items and the OOV row 0 left out; a case without a query is a miss.

    Args:
        queries: (C, D); has_query: (C,) bool; items: (R, D) item vectors; targets: (C,) item_idx;
        history: C arrays of item_idx.

    >>> hit_rate(np.array([[1.0], [1.0]]), np.array([True, False]), np.array([[9.0], [3.0], [2.0]]),
    ...          np.array([2, 2]), [np.array([1]), np.array([])], k=1)
    0.5
    """
    if len(targets) == 0:
        return float("nan")
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)  # (C, R)
    scores[:, 0] = -np.inf
    for c, h in enumerate(history):
        h = np.asarray(h, np.int64)
        scores[c, h[(h > 0) & (h < scores.shape[1]) & (h != targets[c])]] = -np.inf
    target_score = scores[np.arange(len(targets)), targets]
    rank = (scores > target_score[:, None]).sum(axis=1)  # items strictly better
    return float(((rank < k) & has_query & np.isfinite(target_score)).mean())


class AutoencoderTask:
    """Mini-batches of items for a model whose ``forward(kjt, inputs (B, U))`` returns ``(reconstruction (B, U),
    codes (B, H), W^T (U, H), V (U, H))`` (see the module docstring)."""

    name = "autoencoder"
    monitor = "hr10"
    levers = ()
    result_keys = ("valid_hr10", "test_hr10", "train_rmse", "best_epoch")

    def __init__(self, ctx: TaskContext) -> None:
        from training.data import num_batches, read_ctr_shard
        from training.modules.autorec import observed_matrix

        self.ctx, config = ctx, ctx.config
        n_users, n_items = ctx.vocab["user"], ctx.vocab["item"]
        self.values, self.mask = observed_matrix(*read_targets(ctx.lake_dir, "train", config.target), n_users,
                                                 n_items)  # (R, U) each
        self.items = np.flatnonzero(self.mask.getnnz(axis=1) > 0)  # the N items with an observed entry
        self.user_rows = self.mask.getnnz(axis=0).astype(np.float32)  # (U,)
        self.steps_per_epoch = num_batches(len(self.items), ctx.world_size, ctx.local_batch_size)
        self.cases = {}
        for split in ("valid", "test"):
            rows = read_ctr_shard(ctx.lake_dir, split, rank=0, world_size=1, features=(*_USER_ITEM, HISTORY_FEATURE))
            pick = np.flatnonzero(rows.label > 0.5)
            if len(pick) > EVAL_CASES:
                pick = np.sort(np.random.default_rng(0).choice(pick, EVAL_CASES, replace=False))
            offsets, values = rows.offsets[HISTORY_FEATURE.name], rows.values[HISTORY_FEATURE.name]
            self.cases[split] = (rows.ids["user_idx"][pick], rows.ids["item_idx"][pick],
                                 [values[offsets[r]:offsets[r + 1]] for r in pick])
        self.kjt = None
        self._total = torch.zeros(2, dtype=torch.float64)
        self.train_rmse = float("nan")
        ctx.log(f"autoencoder: {len(self.items)} items with {self.mask.nnz} observed entries over {n_users} users; "
                f"eval cases {[len(c[0]) for c in self.cases.values()]}")

    def bind(self, dmp) -> None:
        from training.models.autorec import all_users_kjt

        self.kjt = all_users_kjt(self.ctx.vocab["user"], self.ctx.device)

    def _dense(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, mask) (B, U) float32 on the device for item ``rows``."""
        return (torch.from_numpy(self.values[rows].toarray()).to(self.ctx.device),
                torch.from_numpy(self.mask[rows].toarray()).to(self.ctx.device))

    def batches(self, epoch: int) -> Iterator:
        ctx, bs = self.ctx, self.ctx.local_batch_size
        order = np.random.default_rng(ctx.opts.seed * 1000 + epoch).permutation(self.items)[ctx.rank::ctx.world_size]
        idx = np.resize(order, self.steps_per_epoch * bs) if len(order) else np.zeros(self.steps_per_epoch * bs,
                                                                                      np.int64)
        weight = torch.from_numpy((np.arange(len(idx)) < len(order)).astype(np.float32))
        self._total = torch.zeros(2, dtype=torch.float64)
        for s in range(self.steps_per_epoch):
            rows = slice(s * bs, (s + 1) * bs)
            yield (*self._dense(idx[rows]), to_device(weight[rows], ctx.device))

    def loss(self, dmp, batch) -> torch.Tensor:
        from training.modules.autorec import masked_sse

        inputs, mask, weight = batch
        config = self.ctx.config
        reconstruction, _, enc, dec = dmp(self.kjt, inputs)
        sse = masked_sse(reconstruction, inputs, mask, config.unobserved_weight)  # (B,)
        data = (sse * weight).sum() / weight.sum().clamp_min(1.0)
        penalty = config.l2 / (2 * len(self.items)) * ((enc ** 2).sum() + (dec ** 2).sum())
        with torch.no_grad():  # the figure: RMSE on observed entries
            observed = masked_sse(reconstruction, inputs, mask)  # (B,)
            self._total += torch.stack([(observed * weight).sum(), (mask.sum(dim=1) * weight).sum()]).double().cpu()
        return data + penalty

    def end_epoch(self, epoch: int, train_s: float) -> dict:
        total = all_reduce_sum(self._total, self.ctx.device)
        self.train_rmse = float(np.sqrt(total[0] / max(float(total[1]), 1.0)))
        return {"train_rmse": self.train_rmse, "items_per_s": len(self.items) * (epoch + 1) / max(train_s, 1e-9)}

    def _state(self, dmp) -> dict:
        """The saved model's state as the current weights would give it (codes and user rows filled): the forward
        over all items, the same steps on every rank."""
        from torchrec.distributed.model_parallel import get_unwrapped_module

        from training.models.autorec import DEC_BIAS, DEC_TABLE, ITEM_CODES, USER_ROWS

        bs, n_items = self.ctx.local_batch_size, self.values.shape[0]
        codes = []
        dmp.eval()
        with torch.no_grad():
            for start in range(0, n_items, bs):
                _, c, _, dec = dmp(self.kjt, self._dense(np.arange(start, min(start + bs, n_items)))[0])
                codes.append(c.cpu())
        observed = torch.from_numpy(self.mask.getnnz(axis=1) > 0)[:, None]
        bias = get_unwrapped_module(dmp).dec_bias.detach().cpu()
        return {DEC_TABLE: dec.cpu(), DEC_BIAS: bias, ITEM_CODES: torch.cat(codes) * observed,
                USER_ROWS: torch.from_numpy(self.user_rows)}

    def evaluate(self, dmp, split: str) -> dict:
        """HR@10 of ``split``'s sampled label-1 rows (see the module docstring); the same on every rank."""
        spec, config = self.ctx.spec, self.ctx.config
        state = self._state(dmp)
        users, targets, history = self.cases[split]
        queries, ok = spec.query_encoder(state, config).encode(users, history)  # (C, D): what is served
        return {"hr10": hit_rate(queries, ok, spec.item_vectors(state, config), targets, history),
                "cases": len(targets)}

    def summary(self) -> dict:
        return {"train_rmse": self.train_rmse}

    def state_dict(self) -> dict:
        return {"train_rmse": self.train_rmse}

    def load_state_dict(self, state: dict) -> None:
        self.train_rmse = state["train_rmse"]

    def finish(self, state: dict) -> dict:
        """The saved state's item codes (from its encoder and the train split) and user rows, in place."""
        from training.models.autorec import ENC_BIAS, ENC_TABLE, ITEM_CODES, USER_ROWS, item_codes

        observed = self.mask.getnnz(axis=1) > 0
        state[ITEM_CODES] = torch.from_numpy(item_codes(self.values, observed, state[ENC_TABLE].numpy(),
                                                        state[ENC_BIAS].numpy()))
        state[USER_ROWS] = torch.from_numpy(self.user_rows)
        return {"coded_items": int(observed.sum()), "train_rmse": self.train_rmse}
