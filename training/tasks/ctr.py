"""The CTR task: a ranker (features in, a logit out) trained on ``gold.ctr_samples`` with a weighted binary
cross-entropy, early-stopped on validation AUC, and scored by AUC, logloss and GAUC.

Each rank reads rows ``rank::world_size`` of every split (``training.data.read_ctr_shard``) with the features its
model reads (``ModelSpec.features``) and, when its config has ``dense_features``, those dense columns. Three
levers, each off unless the run asks for it (``TrainOptions``):

- ``id_dropout`` > 0: a train sample's ids of ``ModelSpec.id_dropout_features`` are read as the OOV row with that
  probability, and every id without a train sample is read as that row in evaluation and in the saved model
  (``training.modules.cold_ids``);
- ``mba_lambda`` > 0: the DIN paper's mini-batch aware L2 on the id rows each batch looked up (``CtrObjective``);
- ``recency_half_life_days`` > 0: time-decayed sample weights (``training.data.recency_weights``).

With ``save_predictions`` the test evaluation of the best epoch also keeps every test row's score (rank 0,
``CtrTask.test_predictions``), which the trainer writes to the model folder's ``predictions.parquet``
(``training.artifacts.write_predictions``) for paired comparisons (``bench.leaderboard_stats``).

A model whose data loss is not the weighted BCE declares ``ModelSpec.ctr_loss`` (e.g. MF's BPR,
``training.models.mf``); the objective calls it instead, the mini-batch aware L2 and the evaluation stay the same.

A ranker with a part fitted before its gradient steps, without gradient (GBDT+LR's trees, ``training.modules.gbdt``)
has ``prefit(train, valid, seed) -> (fitted, figures)`` and ``load_prefit(fitted)``: in ``bind``, rank 0 reads the
whole train and valid splits and fits it, and every rank loads rank 0's ``fitted`` (broadcast), so all ranks hold the
same part; ``figures`` go into the saved model's metrics as ``prefit``.

Legend: B batch size, V rows of a table, N ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from features.definitions import HISTORY_FEATURE, HISTORY_RATING_FEATURE, SPARSE_FEATURES
from training.distributed.collectives import all_gather_arrays, all_reduce_max, all_reduce_sum
from training.tasks.context import TaskContext

#: The vocabulary each id table's rows come from.
_TABLE_VOCAB = {f.table: f.vocab for f in (*SPARSE_FEATURES, HISTORY_FEATURE, HISTORY_RATING_FEATURE)}


def id_sample_counts(shard, id_tables: Mapping[str, tuple[str, ...]], vocab: Mapping[str, int],
                     max_history: int) -> dict[str, np.ndarray]:
    """``{table: (V,) n_j}`` for ``id_tables`` (``ModelSpec.id_tables``): in how many of ``shard``'s samples (a
    ``CtrShard``) each id occurs (a multi-hot feature: among its first ``max_history`` ids, once per sample);
    ``training.modules.regularization.sample_counts``."""
    from training.modules.regularization import sample_counts

    return {table: sample_counts(vocab[_TABLE_VOCAB[table]], [shard.ids[f] for f in feats if f in shard.ids],
                                 [(shard.values[f], shard.offsets[f], max_history) for f in feats
                                  if f in shard.values])
            for table, feats in id_tables.items()}


def read_cold_as_oov(shard, id_tables: Mapping[str, tuple[str, ...]], counts: Mapping[str, np.ndarray]) -> None:
    """Map, in place, every id of ``shard`` (a ``CtrShard``) whose table row has no train sample (``counts``,
    ``id_sample_counts``' tables) to the OOV row (``training.modules.cold_ids.cold_remap``); ``shard.user``, the
    GAUC key, keeps the real user."""
    from training.modules.cold_ids import cold_remap

    for table, feats in id_tables.items():
        remap = cold_remap(counts[table])
        for f in feats:
            if f in shard.ids:
                shard.ids[f] = remap[shard.ids[f]]
            if f in shard.values:
                shard.values[f] = remap[shard.values[f]]


def read_event_ids(lake_dir, split: str) -> np.ndarray | None:
    """(N,) ``event_id`` of every row of ``export/ctr_samples/split=<split>`` in file order -- the order
    ``training.data.read_ctr_shard`` reads, so row ``r`` of the split is rank ``r % world_size``'s row
    ``r // world_size`` -- or None when the export has no ``event_id`` column (``bench.models``' generated data).

    Raises:
        TableNotFoundError: the split has not been exported.
    """
    import pyarrow.dataset as ds

    from features.errors import TableNotFoundError
    from features.tables import CTR_SAMPLES, parquet_export
    from training.data import PRODUCER

    path = Path(parquet_export(CTR_SAMPLES, lake_dir)) / f"split={split}"
    if not path.exists() or not any(path.glob("*.parquet")):
        raise TableNotFoundError(f"{CTR_SAMPLES.name} split={split}", str(path), PRODUCER)
    dataset = ds.dataset(str(path), format="parquet")
    if "event_id" not in dataset.schema.names:
        return None
    return dataset.to_table(columns=["event_id"]).column("event_id").to_numpy(zero_copy_only=False)


#: The declared features whose ids are entities (a user, an item): the rows the mini-batch aware L2 covers.
_ID_FEATURES = {f.name: f.table for f in SPARSE_FEATURES if f.vocab in ("user", "item")}


def pooled_id_lookups(sparse_arch, features, out: torch.Tensor, real: torch.Tensor) -> dict:
    """The id rows a forward looked up, for a model whose ``sparse_arch`` returns pooled (B, F, D) embeddings in
    ``sparse_arch.feature_names`` order (DeepFM, Wide & Deep, MF): ``ModelSpec.id_lookups`` of such models.

    Args:
        sparse_arch: the model's SparseArch; features: the KJT it read; out: its (B, F, D) output; real: (B,) bool,
            the batch's real rows (padding rows repeat real ones and are left out).

    Returns:
        ``{table: [(ids (N,), rows (N, D))]}`` for the user and item tables it reads.
    """
    names = sparse_arch.feature_names
    return {table: [(features[name].values()[real], out[real, names.index(name)])]
            for name, table in _ID_FEATURES.items() if name in names}


class CtrObjective:
    """What a ranker minimises on one batch: the weighted mean of ``BCEWithLogitsLoss`` over the batch's real rows
    (``weight`` 0 = padding), or the model's own ``batch_loss``, plus, when ``lam > 0``, the mini-batch aware L2
    penalty (Zhou et al. 2018, section 4.2; ``training.modules.regularization.MiniBatchAwareL2``) on the id rows the
    batch looked up. The penalty is taken from the rows the model's ``sparse_arch`` returned in this very forward (a
    forward hook), so that with fused optimizer-in-backward tables its gradient ``lam * w_j / n_j`` reaches the
    kernel with the data gradient in the one backward.

    Args:
        model: the ranker, plain or wrapped by DistributedModelParallel.
        id_lookups: the model's ``ModelSpec.id_lookups`` (which rows of which table a forward looked up); unused
            when ``lam`` is 0.
        counts: ``{table: (V,) n_j}`` over the whole train split (``id_sample_counts``, summed over the ranks);
            unused when ``lam`` is 0.
        lam: lambda; 0 adds nothing (no hook): the objective is the data loss itself.
        world_size: ranks; TorchRec divides the tables' gradients by it (as DDP averages the dense ones), so the
            penalty is multiplied by it: a row in one rank's batch gets exactly ``lam * w_j / n_j``.
        batch_loss: the model's own data loss (``ModelSpec.ctr_loss(config, vocab_sizes)``), called
            ``batch_loss(model, batch, generator) -> (loss, rows)``: it runs ``model`` exactly once, on N rows of
            its own making (on every rank: the sharded lookup is a collective), and returns the scalar loss and
            ``rows`` (N,) bool, the rows of that forward whose ids the penalty counts. None: the weighted BCE
            (N = B, ``rows`` the real rows).
        generator: what ``batch_loss`` draws its random numbers from (e.g. negative samples), on the model's
            device; None: torch's default generator.

    Raises:
        ValueError: ``lam > 0`` for a model that declares no ``id_lookups``.

    Call: ``__call__(batch: CtrBatch with B rows) -> (objective, data loss, penalty or None)``, scalar tensors.
    """

    def __init__(self, model, id_lookups: Callable | None, counts: dict | None, lam: float, world_size: int = 1,
                 device=None, batch_loss: Callable | None = None, generator: torch.Generator | None = None) -> None:
        from torchrec.distributed.model_parallel import get_unwrapped_module

        from training.modules.regularization import MiniBatchAwareL2

        self.model, self.batch_loss, self.generator = model, batch_loss, generator
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.penalty, self._seen = None, None
        if lam > 0:
            if id_lookups is None:
                raise ValueError("mba_lambda > 0 needs a model that declares its id_lookups")
            self.sparse_arch, self.id_lookups = get_unwrapped_module(model).sparse_arch, id_lookups
            self.penalty = MiniBatchAwareL2({t: torch.as_tensor(n) for t, n in counts.items()},
                                            lam * world_size).to(device or torch.device("cpu"))
            self.sparse_arch.register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        self._seen = (args[0], out)  # the KJT the sparse arch read, what it returned

    def __call__(self, batch):
        if self.batch_loss is None:
            data = (self.loss_fn(self.model(batch.features, batch.dense), batch.label) * batch.weight).sum() \
                / batch.weight.sum().clamp_min(1.0)
            rows = batch.weight > 0
        else:
            data, rows = self.batch_loss(self.model, batch, self.generator)
        if self.penalty is None:
            return data, data, None
        features, out = self._seen
        penalty = self.penalty(self.id_lookups(self.sparse_arch, features, out, rows))
        self._seen = None
        return data + penalty, data, penalty


class CtrTask:
    """Rankers on the CTR samples (see the module docstring); early stopping on valid AUC."""

    name = "ctr"
    monitor = "auc"
    #: trainer knobs that only this task reads
    levers = ("mba_lambda", "id_dropout", "recency_half_life_days", "save_predictions")
    #: the figures that go into the stage result
    result_keys = ("test_auc", "test_logloss", "test_gauc", "valid_auc", "train_samples_per_s", "best_epoch")

    def __init__(self, ctx: TaskContext) -> None:
        from training.data import num_batches, read_ctr_shard, recency_weights
        from features.definitions import dense_features_named

        self.ctx, opts, spec = ctx, ctx.opts, ctx.spec
        self.features = spec.features_of(ctx.config)
        dense = dense_features_named(getattr(ctx.config, "dense_features", ()))
        self.train, self.valid, self.test = (read_ctr_shard(ctx.lake_dir, s, ctx.rank, ctx.world_size,
                                                            self.features, dense)
                                             for s in ("train", "valid", "test"))
        self.n_train = int(all_reduce_sum(torch.tensor([len(self.train)]), ctx.device))
        self.steps_per_epoch = num_batches(self.n_train, ctx.world_size, ctx.local_batch_size)
        self.counts = None
        if opts.mba_lambda > 0 or opts.id_dropout > 0:  # n_j over the whole train split: each rank counts its rows
            local = id_sample_counts(self.train, spec.id_tables, ctx.vocab, getattr(ctx.config, "max_history", 0))
            self.counts = {t: all_reduce_sum(torch.from_numpy(n), ctx.device).numpy() for t, n in local.items()}
        self.sample_weight = None
        if opts.recency_half_life_days > 0:  # counted back from the whole train split's last event, on every rank
            if self.train.time is None:
                raise ValueError("recency_half_life_days needs the event_time column, which this export of "
                                 "ctr_samples lacks")
            now = float(all_reduce_max(torch.tensor([self.train.time.max()], dtype=torch.float64), ctx.device))
            self.sample_weight = recency_weights(self.train.time, opts.recency_half_life_days * 86400.0, now)
        self.cold = {}
        if opts.id_dropout > 0:  # ids without a train sample are read as the OOV row the id dropout trains
            for shard in (self.valid, self.test):
                read_cold_as_oov(shard, spec.id_tables, self.counts)
            self.cold = {t: int((n[1:] == 0).sum()) for t, n in self.counts.items()}
            ctx.log(f"id dropout {opts.id_dropout}: cold rows read as OOV {self.cold}")
        self.objective, self._total, self.generator, self.prefit_figures = None, 0.0, None, {}
        #: save_predictions: the test split's event ids (rank 0; None without the column), and the per-row
        #: predictions of the last test evaluation, the best epoch's (rank 0; training.artifacts.write_predictions)
        self.test_event_ids = read_event_ids(ctx.lake_dir, "test") if opts.save_predictions and ctx.rank == 0 \
            else None
        self.test_predictions: dict[str, np.ndarray] | None = None

    def bind(self, dmp) -> None:
        """The objective of the sharded model: the model's own ``ctr_loss`` when it declares one for this config,
        drawing from a generator of this rank (seeded by ``seed`` and the rank, resumed with the task's state)."""
        ctx = self.ctx
        batch_loss = ctx.spec.ctr_loss(ctx.config, ctx.vocab) if ctx.spec.ctr_loss is not None else None
        if batch_loss is not None:
            self.generator = torch.Generator(ctx.device).manual_seed(ctx.opts.seed * 1000 + ctx.rank)
        self.objective = CtrObjective(dmp, ctx.spec.id_lookups, self.counts, ctx.opts.mba_lambda, ctx.world_size,
                                      ctx.device, batch_loss, self.generator)
        self._prefit(dmp)

    def _prefit(self, dmp) -> None:
        """The model's part fitted before the gradient steps, when it has one (see the module docstring): fitted on
        rank 0 from the whole train and valid splits, loaded on every rank. Collective."""
        import torch.distributed as dist
        from torchrec.distributed.model_parallel import get_unwrapped_module

        from features.definitions import dense_features_named
        from training.data import read_ctr_shard

        ctx, module = self.ctx, get_unwrapped_module(dmp)
        if not hasattr(module, "prefit"):
            return
        fitted = [None, {}]
        if ctx.rank == 0:  # the whole splits, as read for this model (the shards hold rows rank::world_size)
            dense = dense_features_named(getattr(ctx.config, "dense_features", ()))
            train, valid = (read_ctr_shard(ctx.lake_dir, s, 0, 1, self.features, dense) for s in ("train", "valid"))
            fitted = list(module.prefit(train, valid, ctx.opts.seed))
        dist.broadcast_object_list(fitted, src=0, device=ctx.device)
        module.load_prefit(fitted[0])
        self.prefit_figures = fitted[1]
        ctx.log(f"prefit: {self.prefit_figures}")

    def batches(self, epoch: int) -> Iterator:
        from training.data import ctr_batches

        ctx, opts = self.ctx, self.ctx.opts
        self._total = 0.0
        for b in ctr_batches(self.train, ctx.local_batch_size, self.steps_per_epoch, shuffle=True,
                             seed=opts.seed * 1000 + epoch * 10 + ctx.rank, features=self.features,
                             id_dropout=opts.id_dropout, dropped=ctx.spec.id_dropout_features,
                             sample_weight=self.sample_weight):
            yield b.to(ctx.device)

    def loss(self, dmp, batch) -> torch.Tensor:
        loss, data_loss, _ = self.objective(batch)  # data loss (+ the mini-batch aware penalty when mba_lambda > 0)
        self._total += float(data_loss)
        return loss

    def end_epoch(self, epoch: int, train_s: float) -> dict:
        return {"train_loss": self._total / self.steps_per_epoch,
                "train_samples_per_s": self.n_train * (epoch + 1) / max(train_s, 1e-9)}

    def evaluate(self, dmp, split: str) -> dict[str, float]:
        """AUC, logloss and GAUC of ``split`` over all ranks' rows; the model runs on the device, the metrics on
        CPU copies. With ``save_predictions``, a test evaluation also keeps every row's prediction on rank 0 in
        ``test_predictions`` (``training.artifacts.write_predictions``' columns; ``row`` the row's position in the
        split)."""
        from training.data import ctr_batches, num_batches
        from training.metrics import auc, gauc, logloss

        ctx = self.ctx
        shard = {"valid": self.valid, "test": self.test}[split]
        n = all_reduce_sum(torch.tensor([len(shard)]), ctx.device)
        dmp.eval()
        scores, labels, users = [], [], []
        with torch.no_grad():
            for b in ctr_batches(shard, ctx.local_batch_size, num_batches(int(n), ctx.world_size,
                                                                          ctx.local_batch_size),
                                 features=self.features):
                keep = b.weight > 0
                b = b.to(ctx.device)
                scores.append(dmp(b.features, b.dense).cpu()[keep].numpy())
                labels.append(b.label[keep].numpy())
                users.append(b.user[keep].numpy())
        keep_rows = split == "test" and ctx.opts.save_predictions
        # this rank's rows are rows rank::world_size of the split (read_ctr_shard), in order (no shuffle)
        rows = [np.arange(ctx.rank, int(n), ctx.world_size)] if keep_rows else []
        s, y, u, *r = all_gather_arrays(np.concatenate(scores), np.concatenate(labels), np.concatenate(users),
                                        *rows)
        p = 1.0 / (1.0 + np.exp(-s))
        if keep_rows and ctx.rank == 0:
            self.test_predictions = {"row": r[0], "user": u, "label": y, "score": p}
            if self.test_event_ids is not None:
                self.test_predictions["event_id"] = self.test_event_ids[r[0]]
        return {"auc": auc(y, s), "logloss": logloss(y, p), "gauc": gauc(u, y, s)}

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        state = {} if self.generator is None else {"generator": self.generator.get_state()}
        if self.test_predictions is not None:  # a resumed run whose best epoch came before the restart keeps them
            state["test_predictions"] = self.test_predictions
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        if "test_predictions" in state:
            self.test_predictions = state["test_predictions"]

    def finish(self, state: dict) -> dict:
        """The saved model reads a cold id as its OOV row with no remap of its own."""
        from training.modules.cold_ids import fill_cold_rows

        if self.ctx.opts.id_dropout > 0:
            fill_cold_rows(state, self.counts)
        return {"cold_rows_as_oov": self.cold, **({"prefit": self.prefit_figures} if self.prefit_figures else {})}
