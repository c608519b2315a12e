"""Stage command: train DeepFM, DIN or item2vec with Ray Train over sharded TorchRec tables, on CPU or GPU.

    python -m training.train --model deepfm|din|item2vec [--epochs N] [--batch-size B] [--sharding planner|row_wise]
                             [--lr-schedule warmup_cosine|constant] [--use-gpu]

The driver reads the configuration (``features.config.load_config``), starts a local Ray cluster (or joins
``cfg.train.ray_address``) and runs a ``TorchTrainer`` with ``cfg.train.num_workers`` workers of 1 CPU each
(gloo process group), or with ``cfg.train.use_gpu`` (``RECSYS_TRAIN__USE_GPU``, ``--use-gpu``) of 1 CPU and 1 GPU
each (NCCL process group; ``ray_train_configs``). Each worker reads its shard of the Parquet exports
(``training.data``), builds the model with its tables on ``meta``, shards it with DistributedModelParallel by the
plan (``training.distributed``) on its device (``worker_device``: the CPU, or the GPU Ray gave it), and trains on
batches moved to that device: tables with TorchRec's fused row-wise Adagrad (FBGEMM's fused kernel, applied in
backward; its CPU kernels have no Adam), dense layers with AdamW. Metrics are computed on CPU copies of the
scores; ``model.pt`` and the train state are saved from CPU tensors, so what a GPU run writes loads on CPU. Every
epoch each rank writes its shards with ``torch.distributed.checkpoint`` and all report one ``ray.train.Checkpoint``
(stored under ``cfg.checkpoint_dir``). DeepFM stops early on validation AUC. With ``mba_lambda`` > 0 the loss
adds the DIN paper's mini-batch aware L2 on the user and item rows of each batch (``CtrObjective``). With
``id_dropout`` > 0 a train sample's user / item id is read as the OOV row with that probability, and every id
without a train sample is read as that OOV row in evaluation and in the saved model
(``training.modules.cold_ids``). With ``recency_half_life_days`` > 0 each train sample's loss weight halves every
that many days before the last train event (``training.data.recency_weights``). All three are off by default.

Rank 0 then writes ``<run_dir>/models/<model>/``: ``item_embeddings.npy`` (float32, row = item_idx),
``model.pt`` (unsharded state dict of the best epoch, loadable by the model class) and ``meta.json`` (with
``training_versions``: the Delta versions of the tables read, ``training.data.read_training_versions``); the driver
writes the stage result ``train_deepfm`` / ``train_din`` / ``train_item2vec``.

DIN (training.models.din) reads the behaviour history as a jagged sequence feature through an
EmbeddingCollection that shares the item table with the candidate. After a worker failure Ray restarts the
worker group (``FailureConfig(max_failures=1)``) and every worker resumes from ``ray.train.get_checkpoint()``:
its table shards and fused Adagrad state (DCP), the dense optimizer, the epoch, the early-stopping state and the
RNG, and goes on with the next epoch -- the same run as without the failure, given the seed. item2vec resumes the
same way (its two tables' shards and Adagrad state, the epoch, the pair counters; its pairs and negatives are
seeded per epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np

from features.config import ROOT, PlatformConfig, load_config
from features.results import write_stage_result
from training.hparams import MODEL_DEFAULTS

MODELS = ("deepfm", "din", "item2vec")
CTR_MODELS = ("deepfm", "din")
ITEM_TABLE = {"deepfm": "sparse_arch.embedding_bag_collection.embedding_bags.t_item.weight",
              "din": "sparse_arch.sequence.embedding_collection.embeddings.t_item.weight",
              "item2vec": "sparse_arch.embedding_bag_collection.embedding_bags.t_item_in.weight"}


#: Options for which 0 is a real value (no decay, no dropout): only None takes the model's default.
_ZERO_IS_A_VALUE = ("weight_decay", "dropout", "mba_lambda", "id_dropout", "recency_half_life_days")


@dataclass(frozen=True)
class TrainOptions:
    """What one training run does. Batch size is global (split evenly over the workers); learning rates are per
    step; ``patience`` counts epochs without a better validation AUC (DeepFM, DIN). ``lr_schedule`` shapes the
    dense learning rate (``LRSchedule``); the tables' Adagrad keeps its own per-row decay. ``progress_dir``:
    when set, every worker writes ``rank<r>.pid`` and ``rank<r>.progress`` ("epoch step") there, so that an
    operator (or the fault test) can find and signal a training process."""

    model: str = "deepfm"
    epochs: int = 0  # 0: the model's default (deepfm 12, item2vec 8)
    batch_size: int = 0  # 0: the model's default (deepfm 2048, item2vec 4096)
    embedding_dim: int = 0  # 0: the model's default (deepfm 16, item2vec 32)
    sharding: str = "planner"
    lr_sparse: float = 0.0  # 0: the model's default (deepfm, din 0.02, item2vec 0.2)
    lr_dense: float | None = None  # None: the model's default (training.hparams)
    weight_decay: float | None = None  # AdamW's on the dense parameters; None: the model's default
    dropout: float | None = None  # after each hidden layer of the DNN (DeepFM) / OverArch (DIN); None: default
    mba_lambda: float | None = None  # DeepFM, DIN: mini-batch aware L2 on the user/item rows (0 off); None: default
    # DeepFM, DIN: probability that a train sample's user / item id is read as the OOV row; > 0 also reads ids with
    # no train sample as the OOV row (training.modules.cold_ids); 0: off, every id its own row; None: default
    id_dropout: float | None = None
    # DeepFM, DIN: a train sample's loss weight halves every this many days before the train split's last event
    # (training.data.recency_weights); 0: off, every sample weight 1; None: the model's default
    recency_half_life_days: float | None = None
    # DeepFM, DIN: read the point-in-time counters (features.definitions.DENSE_FEATURES) as dense inputs when the
    # ctr_samples export has them (training.data.exported_dense_features); False: sparse features only
    dense_features: bool = True
    # DIN: read the stars of each behaviour (features.definitions.HISTORY_RATING_FEATURE) when the ctr_samples
    # export has them, pooled by the attention weights; False: the behaviours' items only
    history_ratings: bool = True
    patience: int = 2
    seed: int = 0
    lr_schedule: str = "warmup_cosine"
    warmup_frac: float = 0.05  # share of all steps spent warming the dense lr up linearly from 0
    min_lr_factor: float = 0.1  # the cosine decays the dense lr to lr_dense * min_lr_factor at the last epoch
    progress_dir: str = ""
    window: int = 5  # item2vec: largest distance between center and context in a sequence
    negatives: int = 5  # item2vec: K
    subsample: float = 1e-3  # item2vec: word2vec's subsampling threshold t

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        for name, value in MODEL_DEFAULTS[self.model].items():
            unset = getattr(self, name) is None or (getattr(self, name) == 0 and name not in _ZERO_IS_A_VALUE)
            if unset:
                object.__setattr__(self, name, value)
        for name in ("mba_lambda", "id_dropout", "recency_half_life_days"):  # item2vec has none of these
            if getattr(self, name) is None:
                object.__setattr__(self, name, 0.0)
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1")
        if self.mba_lambda < 0 or (self.mba_lambda > 0 and self.model not in CTR_MODELS):
            raise ValueError(f"mba_lambda must be >= 0 and is used by {CTR_MODELS} only, got {self.mba_lambda} "
                             f"for {self.model}")
        if not 0 <= self.id_dropout < 1 or (self.id_dropout > 0 and self.model not in CTR_MODELS):
            raise ValueError(f"id_dropout must be in [0, 1) and is used by {CTR_MODELS} only, got "
                             f"{self.id_dropout} for {self.model}")
        if self.recency_half_life_days < 0 or (self.recency_half_life_days > 0 and self.model not in CTR_MODELS):
            raise ValueError(f"recency_half_life_days must be >= 0 and is used by {CTR_MODELS} only, got "
                             f"{self.recency_half_life_days} for {self.model}")
        LRSchedule(self.lr_schedule, 1, self.warmup_frac, self.min_lr_factor)  # validates the schedule


SCHEDULES = ("constant", "warmup_cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the dense learning rate at a global step: ``constant`` (1), or ``warmup_cosine``: linear
    warm-up from 0 over ``warmup_frac`` of ``total_steps``, then cosine decay to ``min_factor`` (Loshchilov &
    Hutter 2017, "SGDR", without restarts; the warm-up of Goyal et al. 2017). Stateless in the step, so a resumed
    run continues the curve exactly.

    >>> s = LRSchedule("warmup_cosine", total_steps=100, warmup_frac=0.1, min_factor=0.0)
    >>> [round(s.factor(i), 3) for i in (0, 4, 9, 10, 55, 100)]
    [0.1, 0.5, 1.0, 1.0, 0.5, 0.0]
    """

    kind: str
    total_steps: int
    warmup_frac: float = 0.05
    min_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if not 0.0 <= self.warmup_frac < 1.0 or not 0.0 <= self.min_factor <= 1.0 or self.total_steps < 1:
            raise ValueError(f"bad schedule {self}: warmup_frac in [0, 1), min_factor in [0, 1], total_steps >= 1")

    def factor(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        import math

        warmup = int(self.warmup_frac * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------- policies
class Decision(Enum):
    CONTINUE = "continue"
    STOP = "stop"


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a higher metric.

    >>> stop = EarlyStopping(patience=2)
    >>> [stop.update(v).value for v in (0.6, 0.7, 0.69, 0.7)], stop.best, stop.best_epoch
    (['continue', 'continue', 'continue', 'stop'], 0.7, 1)
    """

    patience: int
    best: float = float("-inf")
    best_epoch: int = -1
    epoch: int = -1
    improved: bool = False

    def update(self, value: float) -> Decision:
        self.epoch += 1
        self.improved = value > self.best
        if self.improved:
            self.best, self.best_epoch = value, self.epoch
        return Decision.STOP if self.epoch - self.best_epoch >= self.patience else Decision.CONTINUE


# ----------------------------------------------------------------------------------------- worker side
def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[train rank0] {msg}", flush=True)


def _all_gather_arrays(*arrays: np.ndarray) -> list[np.ndarray]:
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def _to_device(x, device):
    """``x`` (tensor or KeyedJaggedTensor) on ``device``; itself when that is the CPU."""
    return x if device.type == "cpu" else x.to(device)


def _all_reduce_sum(t, device):
    """``t`` summed over the ranks, as a CPU tensor; the collective runs on ``device`` (NCCL reduces CUDA tensors
    only)."""
    import torch.distributed as dist

    t = _to_device(t, device)
    dist.all_reduce(t)
    return t.cpu()


def _all_reduce_max(t, device):
    """``t``'s element-wise maximum over the ranks, as a CPU tensor (the collective on ``device``)."""
    import torch.distributed as dist

    t = _to_device(t, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def _report(metrics: dict, dmp, rank: int, train_state: dict | None = None) -> None:
    """Each rank saves its own shards (torch.distributed.checkpoint) into its folder -- the tables and the fused
    sparse optimizer's per-row state -- plus, when given, its ``train_state`` (dense optimizer, epoch,
    early-stopping state, RNG; ``train_state_rank<r>.pt``); Ray gathers all folders of one report into one
    checkpoint."""
    import ray.train
    import torch
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as tmp:
        dcp.save(_sharded_state(dmp), checkpoint_id=tmp)
        if train_state is not None:
            torch.save(train_state, Path(tmp, f"train_state_rank{rank}.pt"))
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics, default=float))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _sharded_state(dmp) -> dict:
    """What DCP saves and loads in place: the model's (sharded) state and the fused table optimizer's state."""
    return {"model": dmp.state_dict(), "sparse_opt": dmp.fused_optimizer.state_dict()}


def _resume(dmp, rank: int) -> dict | None:
    """Load ``ray.train.get_checkpoint()`` when Ray restarted the workers after a failure: every rank reads its
    shards (DCP, loaded in place onto the shards' device) and its ``train_state`` (read onto the CPU; the dense
    optimizer's ``load_state_dict`` moves its state to the parameters' device); returns that train state, or None
    on a fresh start."""
    import ray.train
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        path = Path(d, f"train_state_rank{rank}.pt")
        if not path.exists():
            return None
        state = _sharded_state(dmp)
        dcp.load(state, checkpoint_id=d)
        dmp.load_state_dict(state["model"])
        dmp.fused_optimizer.load_state_dict(state["sparse_opt"])
        train_state = torch.load(path, weights_only=False, map_location="cpu")
    _log(rank, f"resumed from {ckpt.path} after epoch {train_state['epoch'] + 1}")
    return train_state


def _write_pid(opts: TrainOptions, rank: int) -> None:
    if opts.progress_dir:
        Path(opts.progress_dir).mkdir(parents=True, exist_ok=True)
        Path(opts.progress_dir, f"rank{rank}.pid").write_text(str(os.getpid()))


def _write_progress(opts: TrainOptions, rank: int, epoch: int, step: int) -> None:
    if opts.progress_dir:
        Path(opts.progress_dir, f"rank{rank}.progress").write_text(f"{epoch} {step}")


def _build(model, opts: TrainOptions, world_size: int, rank: int, device):
    """Attach the fused sparse optimizer, plan for ``device``'s type, shard onto ``device``; returns (dmp, plan
    placements, dense optimizer)."""
    import torch
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from training.distributed import ShardingConfig, placements, plan_sharding, shard_model

    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": opts.lr_sparse})
    plan = plan_sharding(model, world_size, ShardingConfig(strategy=opts.sharding, compute_device=device.type))
    _log(rank, f"sharding plan:\n{plan}")
    dmp = shard_model(model, plan, device)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    dense_opt = torch.optim.AdamW(dense, lr=opts.lr_dense, weight_decay=opts.weight_decay) if dense else None
    return dmp, placements(plan), dense_opt


def _evaluate(dmp, shard, batch_size: int, world_size: int, features, device) -> dict[str, float]:
    """AUC, logloss and GAUC over all ranks' rows; the model runs on ``device``, the metrics on CPU copies."""
    import torch

    from training.data import ctr_batches, num_batches
    from training.metrics import auc, gauc, logloss

    n = _all_reduce_sum(torch.tensor([len(shard)]), device)
    dmp.eval()
    scores, labels, users = [], [], []
    with torch.no_grad():
        for b in ctr_batches(shard, batch_size, num_batches(int(n), world_size, batch_size), features=features):
            keep = b.weight > 0
            b = b.to(device)
            scores.append(dmp(b.features, b.dense).cpu()[keep].numpy())
            labels.append(b.label[keep].numpy())
            users.append(b.user[keep].numpy())
    s, y, u = _all_gather_arrays(np.concatenate(scores), np.concatenate(labels), np.concatenate(users))
    return {"auc": auc(y, s), "logloss": logloss(y, 1.0 / (1.0 + np.exp(-s))), "gauc": gauc(u, y, s)}


def reads_history_ratings(opts: TrainOptions, lake_dir) -> bool:
    """Whether a run reads ``HISTORY_RATING_FEATURE``: a DIN run asked to, on an export that has the column (one
    written before the features stage computed it has not)."""
    from features.definitions import HISTORY_RATING_FEATURE
    from training.data import exported_columns

    return (opts.model == "din" and opts.history_ratings
            and HISTORY_RATING_FEATURE.name in exported_columns(lake_dir))


def _ctr_model(opts: TrainOptions, vocab: dict, dense_features=(), history_ratings: bool = False):
    """(model on ``meta``, its config, the KJT features it reads); ``dense_features``: the ``DenseFeature`` s it
    reads as its (B, F_dense) input."""
    import torch

    from features.definitions import SPARSE_FEATURES
    from training.models import DIN, DeepFM, DeepFMConfig, DINConfig

    meta = torch.device("meta")
    dense = tuple(f.name for f in dense_features)
    if opts.model == "din":
        config = DINConfig(embedding_dim=opts.embedding_dim, dropout=opts.dropout, dense_features=dense,
                           history_ratings=history_ratings)
        return DIN(vocab, config, sparse_device=meta), config, config.features
    config = DeepFMConfig(embedding_dim=opts.embedding_dim, dropout=opts.dropout, dense_features=dense)
    return DeepFM(vocab, config, sparse_device=meta), config, SPARSE_FEATURES


#: The id tables and the KJT features that read them (DIN's history shares the item table with the candidate):
#: what the mini-batch aware penalty covers and what id dropout's cold rows are counted over.
ID_TABLES = {"deepfm": {"t_user": ("user_idx",), "t_item": ("item_idx",)},
              "din": {"t_user": ("user_idx",), "t_item": ("item_idx", "hist_item_idx")}}


def id_sample_counts(shard, model: str, vocab: dict, max_history: int) -> dict[str, np.ndarray]:
    """``{table: (V,) n_j}`` for ``ID_TABLES[model]``: in how many of ``shard``'s samples (a ``CtrShard``) each
    user / item id occurs (DIN: as the candidate or among the first ``max_history`` history ids, once per
    sample); ``training.modules.regularization.sample_counts``."""
    from training.modules.regularization import sample_counts

    sizes = {"t_user": vocab["user"], "t_item": vocab["item"]}
    return {table: sample_counts(sizes[table], [shard.ids[f] for f in feats if f in shard.ids],
                                 [(shard.values[f], shard.offsets[f], max_history) for f in feats
                                  if f in shard.values])
            for table, feats in ID_TABLES[model].items()}


def read_cold_as_oov(shard, model: str, counts: dict[str, np.ndarray]) -> None:
    """Map, in place, every id of ``shard`` (a ``CtrShard``) whose table row has no train sample (``counts``,
    ``id_sample_counts``' tables) to the OOV row (``training.modules.cold_ids.cold_remap``); ``shard.user``, the GAUC
    key, keeps the real user."""
    from training.modules.cold_ids import cold_remap

    for table, feats in ID_TABLES[model].items():
        remap = cold_remap(counts[table])
        for f in feats:
            if f in shard.ids:
                shard.ids[f] = remap[shard.ids[f]]
            if f in shard.values:
                shard.values[f] = remap[shard.values[f]]


class CtrObjective:
    """What DeepFM and DIN minimise on one batch: the weighted mean of ``BCEWithLogitsLoss`` over the batch's real
    rows (``weight`` 0 = padding) plus, when ``lam > 0``, the mini-batch aware L2 penalty (Zhou et al. 2018,
    section 4.2; ``training.modules.regularization.MiniBatchAwareL2``) on the user and item rows the batch looked
    up. The penalty is taken from the rows the model's ``sparse_arch`` returned in this very forward (a forward
    hook), so that with fused optimizer-in-backward tables its gradient ``lam * w_j / n_j`` reaches the kernel
    with the data gradient in the one backward.

    Args:
        model: DeepFM or DIN, plain or wrapped by DistributedModelParallel.
        kind: ``deepfm`` or ``din``.
        counts: ``{table: (V,) n_j}`` over the whole train split (``id_sample_counts``, summed over the ranks); unused
            when ``lam`` is 0.
        lam: lambda; 0 adds nothing (no hook): the objective is the data loss itself.
        world_size: ranks; TorchRec divides the tables' gradients by it (as DDP averages the dense ones), so the
            penalty is multiplied by it: a row in one rank's batch gets exactly ``lam * w_j / n_j`` (a row in the
            batches of k ranks gets k times that: each rank's batch is a mini-batch of the paper).

    Call: ``__call__(batch: CtrBatch with B rows) -> (objective, data loss, penalty or None)``, scalar tensors.
    """

    def __init__(self, model, kind: str, counts: dict | None, lam: float, world_size: int = 1,
                 device=None) -> None:
        import torch
        from torchrec.distributed.model_parallel import get_unwrapped_module

        from training.modules.regularization import MiniBatchAwareL2

        self.model, self.kind = model, kind
        self.loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
        self.penalty, self._seen = None, None
        if lam > 0:
            sparse_arch = get_unwrapped_module(model).sparse_arch
            self.names = (sparse_arch.pooled if kind == "din" else sparse_arch).feature_names
            self.penalty = MiniBatchAwareL2({t: torch.as_tensor(n) for t, n in counts.items()},
                                            lam * world_size).to(device or torch.device("cpu"))
            sparse_arch.register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        self._seen = (args[0], out)  # the KJT the sparse arch read, what it returned

    def _lookups(self, real) -> dict:
        """``{table: [(ids (N,), rows (N, D)), ...]}`` of the last forward's user and item lookups, for the rows
        ``real`` (B,) bool (the padding rows of a last batch repeat real ones and are left out)."""
        import torch

        features, out = self._seen
        user, item = features["user_idx"].values()[real], features["item_idx"].values()[real]  # one id per sample
        if self.kind == "deepfm":  # out: (B, F, D)
            return {"t_user": [(user, out[real, self.names.index("user_idx")])],
                    "t_item": [(item, out[real, self.names.index("item_idx")])]}
        side, candidate, history, mask, _ = out  # (B, F, D), (B, D), (B, L, D), (B, L), ratings
        hist = features["hist_item_idx"]
        slots = hist.offsets()[:-1].unsqueeze(1) + torch.arange(history.shape[1], device=mask.device)  # (B, L)
        looked_up = mask & real.unsqueeze(1)  # (B, L)
        return {"t_user": [(user, side[real, self.names.index("user_idx")])],
                "t_item": [(item, candidate[real]),
                           (hist.values()[slots[looked_up]], history[looked_up])]}  # first L ids, row-major

    def __call__(self, batch):
        data = (self.loss_fn(self.model(batch.features, batch.dense), batch.label) * batch.weight).sum() \
            / batch.weight.sum().clamp_min(1.0)
        if self.penalty is None:
            return data, data, None
        penalty = self.penalty(self._lookups(batch.weight > 0))
        self._seen = None
        return data + penalty, data, penalty


def _train_ctr(c: dict, opts: TrainOptions, rank: int, world_size: int, device) -> None:
    """DeepFM or DIN on the CTR samples, on ``device``: early stopping on valid AUC, dense lr schedule, resume
    after failure."""
    import torch

    from training.data import (ID_DROPOUT_FEATURES, ctr_batches, exported_dense_features, num_batches,
                               read_ctr_shard, read_vocab_sizes, recency_weights)
    from training.distributed import gather_full_state_dict
    from training.modules.cold_ids import fill_cold_rows

    lake = c["lake_dir"]
    vocab = read_vocab_sizes(lake)
    torch.manual_seed(opts.seed)
    dense_features = exported_dense_features(lake) if opts.dense_features else ()
    if opts.dense_features and not dense_features:
        _log(rank, "the ctr_samples export has no point-in-time counters (re-run the features stage): sparse only"
                   + (f"; id dropout {opts.id_dropout} was chosen with them and lowers AUC without them (pass "
                      "--id-dropout 0)" if opts.id_dropout > 0 else ""))
    model, config, features = _ctr_model(opts, vocab, dense_features, reads_history_ratings(opts, lake))
    train, valid, test = (read_ctr_shard(lake, s, rank, world_size, features, dense_features)
                          for s in ("train", "valid", "test"))
    n_train = _all_reduce_sum(torch.tensor([len(train)]), device)
    local_bs = max(1, opts.batch_size // world_size)
    steps = num_batches(int(n_train), world_size, local_bs)
    schedule = LRSchedule(opts.lr_schedule, steps * opts.epochs, opts.warmup_frac, opts.min_lr_factor)

    counts = None
    if opts.mba_lambda > 0 or opts.id_dropout > 0:  # n_j over the whole train split: each rank counts its own rows
        local = id_sample_counts(train, opts.model, vocab, getattr(config, "max_history", 0))  # ... summed here
        counts = {t: _all_reduce_sum(torch.from_numpy(n), device).numpy() for t, n in local.items()}
    sample_weight = None
    if opts.recency_half_life_days > 0:  # counted back from the whole train split's last event, on every rank
        if train.time is None:
            raise ValueError("recency_half_life_days needs the event_time column, which this export of "
                             "ctr_samples lacks")
        now = float(_all_reduce_max(torch.tensor([train.time.max()], dtype=torch.float64), device))
        sample_weight = recency_weights(train.time, opts.recency_half_life_days * 86400.0, now)
    cold = {}
    if opts.id_dropout > 0:  # ids without a train sample are read as the OOV row the id dropout trains
        for shard in (valid, test):
            read_cold_as_oov(shard, opts.model, counts)
        cold = {t: int((n[1:] == 0).sum()) for t, n in counts.items()}
        _log(rank, f"id dropout {opts.id_dropout}: cold rows read as OOV {cold}")
    dmp, where, dense_opt = _build(model, opts, world_size, rank, device)
    objective = CtrObjective(dmp, opts.model, counts, opts.mba_lambda, world_size, device)
    stopping, best, train_time, best_state, first_epoch = EarlyStopping(opts.patience), {}, 0.0, None, 0
    resumed = _resume(dmp, rank)
    if resumed is not None:
        dense_opt.load_state_dict(resumed["dense_opt"])
        stopping = EarlyStopping(**resumed["stopping"])
        best, train_time, best_state = resumed["best"], resumed["train_time"], resumed["best_state"]
        torch.set_rng_state(resumed["torch_rng"])
        if "cuda_rng" in resumed:  # dropout on the GPU draws from the device's generator
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        first_epoch = resumed["epoch"] + 1
    _write_pid(opts, rank)
    for epoch in range(first_epoch, opts.epochs):
        dmp.train()
        t0, total = time.perf_counter(), 0.0
        batches = ctr_batches(train, local_bs, steps, shuffle=True, seed=opts.seed * 1000 + epoch * 10 + rank,
                              features=features, id_dropout=opts.id_dropout,
                              dropped=ID_DROPOUT_FEATURES[opts.model], sample_weight=sample_weight)
        for i, b in enumerate(batches):
            b = b.to(device)
            for group in dense_opt.param_groups:
                group["lr"] = opts.lr_dense * schedule.factor(epoch * steps + i)
            dense_opt.zero_grad()
            loss, data_loss, _ = objective(b)  # data loss (+ the mini-batch aware penalty when mba_lambda > 0)
            loss.backward()  # the tables' fused Adagrad steps inside backward
            dense_opt.step()
            total += float(data_loss)
            if i % 5 == 0:
                _write_progress(opts, rank, epoch, i)
        train_time += time.perf_counter() - t0
        valid_m = _evaluate(dmp, valid, local_bs, world_size, features, device)
        decision = stopping.update(valid_m["auc"])
        if stopping.improved:
            test_m = _evaluate(dmp, test, local_bs, world_size, features, device)
            best_state = gather_full_state_dict(dmp)
            best = {"valid_auc": valid_m["auc"], "test_auc": test_m["auc"], "test_logloss": test_m["logloss"],
                    "test_gauc": test_m["gauc"], "best_epoch": epoch + 1}
        metrics = {"epoch": epoch + 1, "train_loss": total / steps, "epoch_valid_auc": valid_m["auc"],
                   "epoch_valid_logloss": valid_m["logloss"], "resumed_from_epoch": first_epoch,
                   "train_samples_per_s": int(n_train) * (epoch + 1) / max(train_time, 1e-9), **best}
        _log(rank, f"epoch {epoch + 1}/{opts.epochs} loss {metrics['train_loss']:.4f} valid auc "
                   f"{valid_m['auc']:.4f} logloss {valid_m['logloss']:.4f} dense lr "
                   f"{dense_opt.param_groups[0]['lr']:.2e} ({int(n_train) / (time.perf_counter() - t0):,.0f} samples/s)")
        last = decision is Decision.STOP or epoch + 1 == opts.epochs
        if last:
            metrics.update(epochs=epoch + 1, sharding_plan=where)
        train_state = {"epoch": epoch, "dense_opt": dense_opt.state_dict(), "stopping": asdict(stopping),
                       "best": best, "train_time": train_time, "torch_rng": torch.get_rng_state(),
                       "best_state": best_state if rank == 0 else None}
        if device.type == "cuda":
            train_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        _report(metrics, dmp, rank, train_state)
        if last:
            break
    if rank == 0:
        if opts.id_dropout > 0:  # the saved model reads a cold id as its OOV row with no remap of its own
            fill_cold_rows(best_state, counts)
        model_config = {**asdict(config), "features": type(model).__module__}
        _write_artifacts(c, opts, best_state, model_config, vocab, where, best | {"cold_rows_as_oov": cold})


def _train_item2vec(c: dict, opts: TrainOptions, rank: int, world_size: int, device) -> None:
    import torch

    from training.data import (item_counts, keep_probabilities, negative_distribution, num_batches, pairs_kjt,
                               read_item_sequences, read_vocab_sizes, skipgram_pairs)
    from training.distributed import gather_full_state_dict
    from training.models import Item2Vec, Item2VecConfig, sgns_loss

    lake = c["lake_dir"]
    vocab = read_vocab_sizes(lake)
    num_items = vocab["item"]
    sequences = read_item_sequences(lake)
    counts = item_counts(sequences, num_items)
    keep, neg_p = keep_probabilities(counts, opts.subsample), negative_distribution(counts)
    torch.manual_seed(opts.seed)
    config = Item2VecConfig(embedding_dim=opts.embedding_dim, num_negatives=opts.negatives)
    dmp, where, _ = _build(Item2Vec(num_items, config, sparse_device=torch.device("meta")), opts, world_size, rank,
                           device)
    local_bs = max(1, opts.batch_size // world_size)
    train_time, pairs_seen, loss_avg, first_epoch = 0.0, 0, float("nan"), 0
    resumed = _resume(dmp, rank)  # both tables' shards and their Adagrad state; the pairs are seeded per epoch
    if resumed is not None:
        train_time, pairs_seen, loss_avg = resumed["train_time"], resumed["pairs_seen"], resumed["loss"]
        first_epoch = resumed["epoch"] + 1
    _write_pid(opts, rank)
    for epoch in range(first_epoch, opts.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng(opts.seed * 1000 + epoch)  # same pairs on every rank ...
        center, context = skipgram_pairs(sequences, opts.window, rng, keep)
        order = rng.permutation(len(center))[rank::world_size]  # ... each rank takes its share
        steps = num_batches(len(center), world_size, local_bs)
        idx = np.resize(order, steps * local_bs)
        weight = torch.from_numpy((np.arange(len(idx)) < len(order)).astype(np.float32))
        negs = np.random.default_rng([opts.seed, epoch, rank]).choice(num_items, size=(len(idx), opts.negatives),
                                                                        p=neg_p)
        total = torch.zeros(2)
        for s in range(steps):
            rows = slice(s * local_bs, (s + 1) * local_bs)
            kjt = pairs_kjt(torch.from_numpy(center[idx[rows]]), torch.from_numpy(context[idx[rows]]),
                            torch.from_numpy(negs[rows]))
            loss = sgns_loss(dmp(_to_device(kjt, device)), _to_device(weight[rows], device))
            loss.backward()  # fused Adagrad updates both tables
            total += torch.tensor([float(loss) * float(weight[rows].sum()), float(weight[rows].sum())])
            if s % 5 == 0:
                _write_progress(opts, rank, epoch, s)
        total = _all_reduce_sum(total, device)
        loss_avg = float(total[0] / total[1])
        train_time += time.perf_counter() - t0
        pairs_seen += len(center)
        metrics = {"epoch": epoch + 1, "loss": loss_avg, "pairs": len(center), "pairs_per_s": pairs_seen / train_time,
                   "resumed_from_epoch": first_epoch}
        _log(rank, f"epoch {epoch + 1}/{opts.epochs} sgns loss {loss_avg:.4f} pairs {len(center):,} "
                   f"({len(center) / (time.perf_counter() - t0):,.0f} pairs/s)")
        if epoch + 1 == opts.epochs:
            metrics.update(epochs=epoch + 1, final_loss=loss_avg, sharding_plan=where)
        _report(metrics, dmp, rank, {"epoch": epoch, "train_time": train_time, "pairs_seen": pairs_seen,
                                     "loss": loss_avg})
    state = gather_full_state_dict(dmp)
    if rank == 0:
        _write_artifacts(c, opts, state, asdict(config), vocab, where, {"final_loss": loss_avg})


def _write_artifacts(c: dict, opts: TrainOptions, state: dict, model_config: dict, vocab: dict, where: dict,
                     metrics: dict) -> None:
    import torch

    out = Path(c["model_dir"])
    out.mkdir(parents=True, exist_ok=True)
    table = state[ITEM_TABLE[opts.model]].numpy().astype(np.float32)
    np.save(out / "item_embeddings.npy", table)  # (items, D), row = item_idx
    torch.save(state, out / "model.pt")
    meta = {"model": opts.model, "model_version": c["model_version"], "model_config": model_config,
            "options": asdict(opts), "vocab_sizes": vocab,
            "sharding_plan": where, "item_embedding_shape": list(table.shape), "metrics": metrics,
            "training_versions": c.get("training_versions", {}),  # {table: Delta version} of what it read
            "created_utc": datetime.now(timezone.utc).isoformat()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
    print(f"[train rank0] wrote {out}/item_embeddings.npy {table.shape}, model.pt, meta.json", flush=True)


def worker_device(use_gpu: bool):
    """This Ray Train worker's device: the CPU, or (``use_gpu``) the GPU Ray assigned to it
    (``ray.train.torch.get_device()``), made the current CUDA device for NCCL and the fused kernels.

    Raises:
        DeviceUnavailableError: ``use_gpu`` on a worker without a usable CUDA device or without FBGEMM's CUDA
            build (``training.distributed.require_cuda``).
    """
    import torch

    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    from training.distributed import require_cuda

    require_cuda()
    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def train_loop(c: dict) -> None:
    """Ray Train worker entry point; ``c`` holds the options, the paths and ``use_gpu`` (no config object
    crosses)."""
    import ray.train
    import torch

    torch.set_num_threads(1)  # one CPU per worker
    ctx = ray.train.get_context()
    opts = TrainOptions(**c["options"])
    device = worker_device(c.get("use_gpu", False))
    run = _train_ctr if opts.model in CTR_MODELS else _train_item2vec
    run(c, opts, ctx.get_world_rank(), ctx.get_world_size(), device)


# ----------------------------------------------------------------------------------------------- driver
def ray_train_configs(num_workers: int, use_gpu: bool):
    """Ray Train's (ScalingConfig, TorchConfig) for ``num_workers`` workers: 1 CPU each and a gloo process group,
    or with ``use_gpu`` 1 CPU and 1 GPU each and an NCCL process group."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    from training.distributed import process_group_backend

    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    return (ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
            TorchConfig(backend=process_group_backend("cuda" if use_gpu else "cpu")))


def check_local_gpus(num_workers: int) -> None:
    """Before a local Ray cluster starts GPU workers on this machine: it trains on CUDA (``require_cuda``) and
    has a visible GPU for every worker -- otherwise NCCL would fail deep inside the workers, or Ray would wait for
    GPUs that never come. Not used when joining a cluster, whose autoscaler may add GPU nodes on demand.

    Raises:
        DeviceUnavailableError: no usable CUDA device or FBGEMM CUDA build here, or fewer GPUs than workers.
    """
    import torch

    from features.errors import DeviceUnavailableError
    from training.distributed import require_cuda

    require_cuda()
    gpus = torch.cuda.device_count()
    if gpus < num_workers:
        raise DeviceUnavailableError(f"this machine has {gpus} visible GPU(s) for {num_workers} workers of one GPU "
                                     f"each", "set RECSYS_TRAIN__NUM_WORKERS to at most the GPU count")


def train(cfg: PlatformConfig, opts: TrainOptions) -> dict:
    """Run one training on Ray; returns (and writes) the stage result.

    Raises:
        DeviceUnavailableError: ``cfg.train.use_gpu`` and a local cluster without CUDA (``check_local_gpus``),
            before Ray starts.
        TableNotFoundError: the Parquet exports are missing (run the features stage).
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times (a worker's own
            ``DeviceUnavailableError`` on a joined cluster arrives as its cause).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from training.data import exported_dense_features, read_training_versions, read_vocab_sizes

    t0 = time.perf_counter()
    use_gpu, local = cfg.train.use_gpu, not cfg.train.ray_address
    if use_gpu and local:
        check_local_gpus(cfg.train.num_workers)  # fail here, not in NCCL's set-up inside the workers
    read_vocab_sizes(cfg.lake_dir)  # fail fast, before starting anything
    read_versions = read_training_versions(cfg.lake_dir, opts.model)  # provenance: Delta versions of the exports
    version = f"{opts.model}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.train.ray_address, num_cpus=None if cfg.train.ray_address else cfg.train.ray_cpus,
                 include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        scaling_config, torch_config = ray_train_configs(cfg.train.num_workers, use_gpu)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"options": asdict(opts),
                               "lake_dir": str(cfg.lake_dir), "model_version": version,
                               "training_versions": read_versions,
                               "model_dir": str(cfg.run_dir / "models" / opts.model), "use_gpu": use_gpu},
            torch_config=torch_config, scaling_config=scaling_config,
            run_config=RunConfig(name=version, storage_path=str(cfg.checkpoint_dir),
                                 failure_config=FailureConfig(max_failures=1),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    m = dict(result.metrics)
    wall = time.perf_counter() - t0
    common = {"epochs": m["epochs"], "sharding_plan": m["sharding_plan"], "model_version": version,
              "training_versions": read_versions,
              "train_wall_s": round(wall, 2), "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if opts.model in CTR_MODELS:
        out = {k: m[k] for k in ("test_auc", "test_logloss", "test_gauc", "valid_auc", "train_samples_per_s")}
        out.update(common, best_epoch=m["best_epoch"], resumed_from_epoch=m["resumed_from_epoch"],
                   training={k: getattr(opts, k) for k in ("batch_size", "embedding_dim", "lr_sparse", "lr_dense",
                                                           "weight_decay", "dropout", "mba_lambda", "id_dropout",
                                                           "recency_half_life_days", "lr_schedule",
                                                           "warmup_frac", "min_lr_factor", "patience", "seed")}
                   | {"sparse_optimizer": "fused row-wise Adagrad", "dense_optimizer": "AdamW"},
                   dense_features=[f.name for f in exported_dense_features(cfg.lake_dir)] if opts.dense_features
                   else [], history_ratings=reads_history_ratings(opts, cfg.lake_dir))
        write_stage_result(cfg, f"train_{opts.model}", out)
    else:
        out = {"pairs_per_s": m["pairs_per_s"], "final_loss": m["final_loss"],
               "resumed_from_epoch": m["resumed_from_epoch"], **common}
        write_stage_result(cfg, "train_item2vec", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="global batch size (rows or pairs)")
    p.add_argument("--embedding-dim", type=int, default=0)
    p.add_argument("--sharding", choices=("planner", "row_wise"), default="planner")
    p.add_argument("--lr-sparse", type=float, default=0.0)
    p.add_argument("--lr-dense", type=float, default=None)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="warmup_cosine", help="dense learning-rate schedule")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--mba-lambda", type=float, default=None,
                   help="DeepFM, DIN: mini-batch aware L2 on the user/item embeddings (Zhou et al. 2018); 0: off")
    p.add_argument("--id-dropout", type=float, default=None,
                   help="DeepFM, DIN: train ids read as the OOV row with this probability, and ids never trained "
                        "read as it (training.modules.cold_ids); 0: off")
    p.add_argument("--recency-half-life-days", type=float, default=None,
                   help="DeepFM, DIN: a train sample's loss weight halves every this many days before the last "
                        "train event; 0: off")
    p.add_argument("--no-dense-features", action="store_true",
                   help="DeepFM, DIN: sparse features only, without the point-in-time counters")
    p.add_argument("--no-history-ratings", action="store_true",
                   help="DIN: the behaviours' items only, without the stars the user gave them (hist_rating)")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per worker, NCCL (as RECSYS_TRAIN__USE_GPU=true; default: the configuration's)")
    a = p.parse_args(argv)
    opts = TrainOptions(model=a.model, epochs=a.epochs, batch_size=a.batch_size, embedding_dim=a.embedding_dim,
                        sharding=a.sharding, lr_sparse=a.lr_sparse, lr_dense=a.lr_dense, patience=a.patience,
                        seed=a.seed, lr_schedule=a.lr_schedule, weight_decay=a.weight_decay,
                        dropout=a.dropout, mba_lambda=a.mba_lambda, id_dropout=a.id_dropout,
                        recency_half_life_days=a.recency_half_life_days, dense_features=not a.no_dense_features,
                        history_ratings=not a.no_history_ratings)
    cfg = load_config()
    if a.use_gpu:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_gpu": True})})
    result = train(cfg, opts)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train {opts.model}")
    table.add_column("figure")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
