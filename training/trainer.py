"""One trainer for every registered model: Ray Train over sharded TorchRec tables, on CPU or GPU.

The driver (``train``) reads the configuration, resolves the model's config against the export
(``resolve_config``), starts a local Ray cluster (or joins ``cfg.train.ray_address``) and runs a ``TorchTrainer``
with ``cfg.train.num_workers`` workers of 1 CPU each (gloo), or with ``cfg.train.use_gpu`` of 1 CPU and 1 GPU each
(NCCL; ``ray_train_configs``). Each worker (``train_loop``) builds the model's training task
(``training.tasks``), builds the model from the registry with its tables on ``meta``, shards it with
DistributedModelParallel by the plan (``training.distributed``) on its device, and runs the one loop below:
tables with TorchRec's fused row-wise Adagrad (FBGEMM's fused kernel, applied in backward; its CPU kernels have no
Adam), dense layers with AdamW under the dense learning-rate schedule (``LRSchedule``). Every epoch each rank writes
its shards with ``torch.distributed.checkpoint`` and all report one ``ray.train.Checkpoint`` (under
``cfg.checkpoint_dir``). A task with a ``monitor`` metric stops early on its validation value and keeps the best
epoch; the others run every epoch and keep the last. Metrics are computed on CPU copies; the saved state is CPU
tensors, so what a GPU run writes loads on CPU.

After a worker failure Ray restarts the worker group (``FailureConfig(max_failures=1)``) and every worker resumes
from ``ray.train.get_checkpoint()``: its table shards and fused Adagrad state (DCP), the dense optimizer, the
epoch, the early-stopping state, the task's own state and the RNG, and goes on with the next epoch -- the same run
as without the failure, given the seed.

A model whose spec names an ``init_from`` model (FNN: FM), or several (NeuMF: GMF and MLP), starts from those
models' saved tables: the driver finds their folders in the same run folder and checks that their tables fit
(``init_source``, before Ray starts), and every rank copies them into its shards after sharding, then the other
parameters its ``init_state`` computes from them (``init_params``), on a fresh start only -- a resumed run has its
own tables in the checkpoint (``init_tables``). The saved meta records which versions initialised it.

Rank 0 then writes the model folder (``training.artifacts.save_model``; with ``save_predictions``, first the best
epoch's test predictions, ``predictions.parquet``) and the driver the stage result ``train_<model>``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from features.config import ROOT, PlatformConfig
from features.errors import PlatformError
from features.results import write_stage_result

SCHEDULES = ("constant", "warmup_cosine")
SHARDINGS = ("planner", "row_wise")
#: The trainer's knobs whose default is the model's (``ModelSpec.train``); None takes it.
MODEL_KNOBS = ("epochs", "batch_size", "lr_sparse", "lr_dense", "weight_decay", "mba_lambda", "id_dropout",
               "recency_half_life_days")


@dataclass(frozen=True)
class TrainOptions:
    """What one training run does.

    Args:
        model: a registered model (``training.registry.list_models()``).
        epochs, batch_size, lr_sparse, lr_dense, weight_decay: None takes the model's default
            (``ModelSpec.train``). ``batch_size`` is global (split evenly over the workers); learning rates are per
            step.
        mba_lambda, id_dropout, recency_half_life_days: the CTR task's levers (``training.tasks.ctr``); None takes
            the model's default, 0 turns one off; a task that does not read one refuses a value above 0.
        embedding_dim, dropout: shortcuts for the model config's fields of those names (None: the config's).
        model_options: further fields of the model's config, ``{field: value}``, checked against the config
            (``ModelSpec.make_config``): a typo is an error.
        dense_features: a model whose config has ``dense_features`` reads the point-in-time counters when the
            export has them; False: sparse features only.
        sharding: ``planner`` (TorchRec's planner) or ``row_wise`` (every table row-wise).
        patience: epochs without a better validation value before stopping (tasks with a monitor).
        lr_schedule, warmup_frac, min_lr_factor: the dense learning rate's shape (``LRSchedule``).
        progress_dir: when set, every worker writes ``rank<r>.pid`` and ``rank<r>.progress`` ("epoch step") there,
            so that an operator (or the fault test) can find and signal a training process.
        save_predictions: also write the saved epoch's per-row test predictions to the model folder
            (``training.artifacts.ModelLayout.predictions``), for paired comparisons; only for a task with that
            lever (the CTR task).

    Raises:
        UnknownModelError: ``model`` is not registered.
        ModelOptionError: a model option that the model's config lacks, or a value it rejects.
        ValueError: a knob out of range, or a lever the model's task does not read.
    """

    model: str
    epochs: int | None = None
    batch_size: int | None = None
    lr_sparse: float | None = None
    lr_dense: float | None = None
    weight_decay: float | None = None
    mba_lambda: float | None = None
    id_dropout: float | None = None
    recency_half_life_days: float | None = None
    embedding_dim: int | None = None
    dropout: float | None = None
    model_options: dict = field(default_factory=dict)
    dense_features: bool = True
    sharding: str = "planner"
    patience: int = 2
    seed: int = 0
    lr_schedule: str = "warmup_cosine"
    warmup_frac: float = 0.05  # share of all steps spent warming the dense lr up linearly from 0
    min_lr_factor: float = 0.1  # the cosine decays the dense lr to lr_dense * min_lr_factor at the last epoch
    progress_dir: str = ""
    save_predictions: bool = False

    def __post_init__(self) -> None:
        from training.registry import get_model
        from training.tasks import task_class

        spec = get_model(self.model)
        for name in MODEL_KNOBS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(spec.train, name))
        object.__setattr__(self, "model_options", dict(self.model_options))
        spec.make_config(self.config_options())  # a typo in a model option fails here, in the driver
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1")
        if self.mba_lambda < 0 or not 0 <= self.id_dropout < 1 or self.recency_half_life_days < 0:
            raise ValueError(f"mba_lambda and recency_half_life_days must be >= 0 and id_dropout in [0, 1), got "
                             f"{self.mba_lambda}, {self.recency_half_life_days}, {self.id_dropout}")
        levers = task_class(spec.task).levers
        for name in ("mba_lambda", "id_dropout", "recency_half_life_days"):
            if getattr(self, name) > 0 and name not in levers:
                raise ValueError(f"{name} is read by tasks with that lever only; model {self.model} (task "
                                 f"{spec.task}) has none, got {getattr(self, name)}")
        if self.save_predictions and "save_predictions" not in levers:
            raise ValueError(f"save_predictions is for tasks that score rows; model {self.model} (task {spec.task}) "
                             f"has no per-row predictions")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        LRSchedule(self.lr_schedule, 1, self.warmup_frac, self.min_lr_factor)  # validates the schedule

    def config_options(self) -> dict:
        """The model-config fields this run sets: ``model_options`` plus the ``embedding_dim`` / ``dropout``
        shortcuts when given."""
        shortcuts = {k: getattr(self, k) for k in ("embedding_dim", "dropout") if getattr(self, k) is not None}
        return {**shortcuts, **self.model_options}


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


# ----------------------------------------------------------------------------------------- configuration
def resolve_config(spec, opts: TrainOptions, lake_dir: str | Path):
    """The model's config for this run: its defaults, the run's options, then fitted to the export -- the dense
    features when its config reads some and the export has them (``opts.dense_features``), and the model's own
    ``adapt`` (e.g. a column an older export lacks).

    Raises:
        ModelOptionError: an option the config lacks or rejects.
    """
    import dataclasses
    import logging

    from training.data import exported_columns, exported_dense_features

    config = spec.make_config(opts.config_options())
    if any(f.name == "dense_features" for f in dataclasses.fields(config)) \
            and "dense_features" not in opts.model_options:
        dense = exported_dense_features(lake_dir) if opts.dense_features else ()
        if opts.dense_features and not dense:
            logging.getLogger(__name__).warning(
                "the ctr_samples export has no point-in-time counters (re-run the features stage): sparse only%s",
                f"; id dropout {opts.id_dropout} was chosen with them and lowers AUC without them (pass "
                f"--id-dropout 0)" if opts.id_dropout > 0 else "")
        config = dataclasses.replace(config, dense_features=tuple(f.name for f in dense))
    return spec.adapt(config, exported_columns(lake_dir)) if spec.adapt else config


# ----------------------------------------------------------------------------------------- worker side
def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[train rank0] {msg}", flush=True)


def _report(metrics: dict, dmp, rank: int, train_state: dict | None = None) -> None:
    """Each rank saves its own shards (torch.distributed.checkpoint) into its folder -- the tables and the fused
    sparse optimizer's per-row state -- plus, when given, its ``train_state`` (``train_state_rank<r>.pt``); Ray
    gathers all folders of one report into one checkpoint."""
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
    shards (DCP, in place onto the shards' device) and its train state (onto the CPU); returns that train state, or
    None on a fresh start."""
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


class ModelInitError(PlatformError, ValueError):
    """A model's tables cannot be initialised from the saved model its spec names (``ModelSpec.init_from``): none
    of its tables is in the saved state, or one has another shape."""


def init_source(spec, config, run_dir: str | Path, vocab_sizes: dict) -> dict | None:
    """The saved model whose tables initialise ``spec`` built with ``config`` (``ModelSpec.init_from``), found in
    ``<run_dir>/models/<name>`` and checked against the model built on ``meta`` (shapes only; what is copied goes
    into that throw-away model): ``{"model", "model_version", "model_dir", "tables"}`` (the state-dict keys that
    will be copied), or None when the model starts from random tables. When ``init_from`` names a tuple of models
    (NeuMF: GMF and MLP), ``{"sources": [one such dict per model, in its order]}``. With ``ModelSpec.init_state``
    the answer also holds ``params``: the keys it sets (``init_params``). Called by the driver, so that a missing or
    mismatched source fails before Ray starts.

    Raises:
        ModelOutputError: a source model has not been trained into ``run_dir`` (the message names the command).
        ModelInitError: the model shares no table with a source, a table of another shape, two sources with the
            same table, or ``init_state`` values that do not fit.
        UnknownModelError: a source is not registered.
    """
    import torch

    from training.artifacts import ModelLayout, ModelOutputError, model_dir, read_meta
    from training.registry import get_model

    names = spec.init_sources(config)
    if not names:
        return None
    model = spec.build(vocab_sizes, config, torch.device("meta"))
    sources, seen = [], {}
    for name in names:
        if name == spec.name:
            raise ModelInitError(f"model {spec.name} names itself as the model whose tables initialise it")
        source = get_model(name)
        layout = ModelLayout(model_dir(run_dir, source.name))
        if not (layout.meta.exists() and layout.state.exists()):
            raise ModelOutputError(f"model {spec.name} starts from the tables of a trained {source.name}, but "
                                   f"{layout.root} holds no trained model; run `python -m training.train --model "
                                   f"{source.name}` first (into the same run folder)")
        tables = init_tables(model, layout.root)
        twice = sorted(f"{k} ({seen[k]} and {source.name})" for k in tables if k in seen)
        if twice:  # the later source would silently overwrite the earlier one
            raise ModelInitError(f"model {spec.name}: tables {twice} come from two init sources; name each "
                                 f"source's tables apart")
        seen.update({k: source.name for k in tables})
        sources.append({"model": source.name, "model_version": read_meta(layout.root)["model_version"],
                        "model_dir": str(layout.root), "tables": tables})
    init = sources[0] if isinstance(spec.init_source(config), str) else {"sources": sources}
    if spec.init_state is not None:
        init["params"] = init_params(model, spec, config, sources)
    return init


def init_params(model, spec, config, sources: list[dict]) -> list[str]:
    """Copy ``spec.init_state(config, {name: saved state})`` (``ModelSpec.init_state``) of the saved ``sources``
    (``init_source``'s dicts: ``model``, ``model_version``, ``model_dir``) into ``model`` (unsharded, or a
    DistributedModelParallel: its dense parameters are replicated, every rank copies the same values).
    Collective-free: every rank reads the saved states itself.

    Returns:
        the state-dict keys set, sorted.

    Raises:
        ModelOutputError: a source folder is missing or holds another version than its ``model_version``.
        ModelInitError: a value for a key ``model`` lacks, or of another shape (nothing is copied then).
    """
    from training.artifacts import ModelOutputError, load_model
    from training.distributed.sharding import copy_full_into

    states = {}
    for s in sources:
        loaded = load_model(s["model_dir"])
        if loaded.version != s["model_version"]:
            raise ModelOutputError(f"{s['model_dir']} holds {loaded.version}, not {s['model_version']} that this "
                                   f"run checked; it was retrained meanwhile: restart this training")
        states[s["model"]] = loaded.module.state_dict()
    values = spec.init_state(config, states)
    state = model.state_dict()
    wrong = [f"{k}: {tuple(state[k].size()) if k in state else 'no such key'} here, {tuple(v.shape)} computed"
             for k, v in values.items() if k not in state or tuple(state[k].size()) != tuple(v.shape)]
    if wrong:
        raise ModelInitError(f"model {spec.name}: its init_state from {sorted(states)} does not fit: "
                             f"{'; '.join(wrong)}; build it with the sources' sizes, or retrain them")
    for key, value in values.items():
        copy_full_into(state[key], value)
    return sorted(values)


def init_tables(model, source_dir: str | Path, model_version: str | None = None) -> list[str]:
    """Copy the embedding tables of the model saved in ``source_dir`` into ``model`` (an unsharded module, or a
    DistributedModelParallel whose ranks each copy the rows/columns of their local shards): every table of the
    source -- the weight of an ``nn.Embedding`` / ``nn.EmbeddingBag``, TorchRec's collections' tables included --
    whose state-dict key ``model`` also has. The model's other parameters, and its tables the source lacks, keep
    their values. Collective-free: every rank reads the saved state itself.

    Args:
        model: the model to initialise (tables on CPU, GPU or ``meta``; ``meta`` only checks the shapes).
        source_dir: a model folder (``training.artifacts.ModelLayout``).
        model_version: when given, the version the source must have (the one the driver checked).

    Returns:
        the copied state-dict keys, in the source's order.

    Raises:
        ModelOutputError: the source folder is missing or unusable, or holds another version than
            ``model_version``.
        ModelInitError: ``model`` has none of the source's tables, or one of another shape (rows: vocabulary
            sizes; columns: ``embedding_dim``).
    """
    from torch import nn

    from training.artifacts import ModelOutputError, load_model
    from training.distributed.sharding import copy_full_into

    source = load_model(source_dir)
    if model_version is not None and source.version != model_version:
        raise ModelOutputError(f"{source_dir} holds {source.version}, not {model_version} that this run checked; "
                               f"it was retrained meanwhile: restart this training")
    saved = source.module.state_dict()
    tables = [f"{name}.weight" for name, m in source.module.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    state = model.state_dict()
    shared = [k for k in tables if k in state]
    if not shared:
        raise ModelInitError(f"no table of {source.spec.name} ({source_dir}) is a table of this model: its tables "
                             f"{tables}; name this model's tables as the source names them")
    wrong = [f"{k}: {tuple(state[k].size())} here, {tuple(saved[k].shape)} saved" for k in shared
             if tuple(state[k].size()) != tuple(saved[k].shape)]
    if wrong:
        raise ModelInitError(f"tables of {source.spec.name} ({source.version}, {source_dir}) do not fit this model: "
                             f"{'; '.join(wrong)}; build it with the source's embedding_dim and vocabularies, or "
                             f"retrain the source: `python -m training.train --model {source.spec.name}`")
    for key in shared:  # a sharded table: this rank's rows/columns only
        copy_full_into(state[key], saved[key])
    return shared


def _resume_or_init(dmp, rank: int, init: dict | None, spec=None, config=None) -> dict | None:
    """``_resume``'s train state after a restart; on a fresh start, the tables of ``init`` (``init_source``: one
    source, or ``sources``) copied into ``dmp`` first, when the model has one, then its ``params`` computed by
    ``spec.init_state`` for ``config`` (``init_params``). A resumed run is never re-initialised: its checkpoint
    holds its own trained tables."""
    resumed = _resume(dmp, rank)
    if resumed is None and init is not None:
        sources = init.get("sources", [init])
        for source in sources:
            copied = init_tables(dmp, source["model_dir"], source["model_version"])
            _log(rank, f"initialised {len(copied)} tables from {source['model_version']}")
        if init.get("params"):
            _log(rank, f"initialised {len(init_params(dmp, spec, config, sources))} parameters from "
                       f"{', '.join(s['model_version'] for s in sources)}")
    return resumed


def _write_pid(opts: TrainOptions, rank: int) -> None:
    if opts.progress_dir:
        Path(opts.progress_dir).mkdir(parents=True, exist_ok=True)
        Path(opts.progress_dir, f"rank{rank}.pid").write_text(str(os.getpid()))


def _write_progress(opts: TrainOptions, rank: int, epoch: int, step: int) -> None:
    if opts.progress_dir:
        Path(opts.progress_dir, f"rank{rank}.progress").write_text(f"{epoch} {step}")


def _build(model, opts: TrainOptions, world_size: int, rank: int, device):
    """Attach the fused sparse optimizer, plan for ``device``'s type, shard onto ``device``; returns (dmp, plan
    placements, dense optimizer or None when the model has no dense parameters)."""
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


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def run_worker(c: dict, rank: int, world_size: int, device) -> None:
    """The training loop of one rank for any registered model (see the module docstring)."""
    import torch

    from training.artifacts import save_model
    from training.data import read_vocab_sizes
    from training.distributed import gather_full_state_dict
    from training.registry import get_model
    from training.tasks import TaskContext, task_class

    opts = TrainOptions(**c["options"])
    spec = get_model(opts.model)
    config = spec.config_from_dict(c["model_config"])
    vocab = read_vocab_sizes(c["lake_dir"])
    ctx = TaskContext(spec, config, opts, c["lake_dir"], vocab, rank, world_size, device,
                      max(1, opts.batch_size // world_size))
    task = task_class(spec.task)(ctx)  # reads this rank's data; draws no torch random numbers
    torch.manual_seed(opts.seed)
    dmp, where, dense_opt = _build(spec.build(vocab, config, torch.device("meta")), opts, world_size, rank, device)
    task.bind(dmp)
    schedule = LRSchedule(opts.lr_schedule, max(1, task.steps_per_epoch * opts.epochs), opts.warmup_frac,
                          opts.min_lr_factor)
    stopping, best, train_time, best_state, first_epoch = EarlyStopping(opts.patience), {}, 0.0, None, 0
    resumed = _resume_or_init(dmp, rank, c.get("init_from"), spec, config)
    if resumed is not None:
        if dense_opt is not None:
            dense_opt.load_state_dict(resumed["dense_opt"])
        stopping = EarlyStopping(**resumed["stopping"])
        best, train_time, best_state = resumed["best"], resumed["train_time"], resumed["best_state"]
        task.load_state_dict(resumed["task"])
        torch.set_rng_state(resumed["torch_rng"])
        if "cuda_rng" in resumed:  # dropout on the GPU draws from the device's generator
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        first_epoch = resumed["epoch"] + 1
    _write_pid(opts, rank)
    for epoch in range(first_epoch, opts.epochs):
        dmp.train()
        t0 = time.perf_counter()
        for i, batch in enumerate(task.batches(epoch)):
            if dense_opt is not None:
                for group in dense_opt.param_groups:
                    group["lr"] = opts.lr_dense * schedule.factor(epoch * task.steps_per_epoch + i)
                dense_opt.zero_grad()
            task.loss(dmp, batch).backward()  # the tables' fused Adagrad steps inside backward
            if dense_opt is not None:
                dense_opt.step()
            if i % 5 == 0:
                _write_progress(opts, rank, epoch, i)
        epoch_s = time.perf_counter() - t0
        train_time += epoch_s
        metrics = {"epoch": epoch + 1, **task.end_epoch(epoch, train_time), "resumed_from_epoch": first_epoch}
        decision = Decision.CONTINUE
        if task.monitor:
            valid = task.evaluate(dmp, "valid")
            metrics.update({f"epoch_valid_{k}": v for k, v in valid.items()})
            decision = stopping.update(valid[task.monitor])
            if stopping.improved:
                test = task.evaluate(dmp, "test")
                best_state = gather_full_state_dict(dmp)
                best = {f"valid_{task.monitor}": valid[task.monitor], **{f"test_{k}": v for k, v in test.items()},
                        "best_epoch": epoch + 1}
        else:
            best = task.summary()
        metrics.update(best)
        last = decision is Decision.STOP or epoch + 1 == opts.epochs
        if last:
            metrics.update(epochs=epoch + 1, sharding_plan=where)
        lr = f" dense lr {dense_opt.param_groups[0]['lr']:.2e}" if dense_opt is not None else ""
        shown = {k: v for k, v in metrics.items() if k not in ("epoch", "resumed_from_epoch", "sharding_plan")}
        _log(rank, f"epoch {epoch + 1}/{opts.epochs} {_fmt(shown)}{lr} ({epoch_s:.1f} s)")
        train_state = {"epoch": epoch, "dense_opt": dense_opt.state_dict() if dense_opt is not None else None,
                       "stopping": asdict(stopping), "best": best, "train_time": train_time,
                       "torch_rng": torch.get_rng_state(), "task": task.state_dict(),
                       "best_state": best_state if rank == 0 else None}
        if device.type == "cuda":
            train_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        _report(metrics, dmp, rank, train_state)
        if last:
            break
    if not task.monitor:  # the last epoch is the model
        best_state = gather_full_state_dict(dmp)
    if rank == 0:
        best = best | task.finish(best_state)
        if opts.save_predictions:  # before save_model: meta.json, written last, marks a complete folder
            from training.artifacts import ModelLayout, write_predictions

            write_predictions(ModelLayout(c["model_dir"]).predictions, task.test_predictions,
                              {"model_version": c["model_version"], "split": "test",
                               "best_epoch": str(best.get("best_epoch", ""))})
        save_model(c["model_dir"], spec, config, best_state, model_version=c["model_version"],
                   options=asdict(opts), vocab_sizes=vocab, sharding_plan=where, metrics=best,
                   training_versions=c.get("training_versions", {}), initialised_from=_provenance(c.get("init_from")))
        _log(rank, f"wrote {c['model_dir']}")


def _provenance(init: dict | None) -> dict | None:
    """What the saved meta and the stage result record of ``init_source``'s answer (not the local paths)."""
    if init is None:
        return None
    keep = lambda source: {k: source[k] for k in ("model", "model_version", "tables")}  # noqa: E731
    out = {"sources": [keep(s) for s in init["sources"]]} if "sources" in init else keep(init)
    return out | ({"params": init["params"]} if "params" in init else {})


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
    """Ray Train worker entry point; ``c`` holds the options, the resolved model config, the paths and
    ``use_gpu`` (no config object crosses)."""
    import ray.train
    import torch

    torch.set_num_threads(1)  # one CPU per worker
    ctx = ray.train.get_context()
    run_worker(c, ctx.get_world_rank(), ctx.get_world_size(), worker_device(c.get("use_gpu", False)))


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
    """Run one training on Ray (joining a running cluster when one is initialised, else starting one and stopping
    it after); returns (and writes) the stage result ``train_<model>``.

    Raises:
        DeviceUnavailableError: ``cfg.train.use_gpu`` and a local cluster without CUDA (``check_local_gpus``),
            before Ray starts.
        TableNotFoundError: the Parquet exports are missing (run the features stage).
        ModelOptionError: a model option the model's config lacks or rejects.
        ModelOutputError: the model starts from another model's tables (``ModelSpec.init_from``) that has not been
            trained into ``cfg.run_dir`` (the message names the command).
        ModelInitError: that model's tables do not fit this one (``init_tables``).
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times (a worker's own
            ``DeviceUnavailableError`` on a joined cluster arrives as its cause).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from training.artifacts import model_dir
    from training.data import read_training_versions, read_vocab_sizes
    from training.registry import config_to_dict, get_model

    t0 = time.perf_counter()
    spec = get_model(opts.model)
    use_gpu, local = cfg.train.use_gpu, not cfg.train.ray_address
    if use_gpu and local:
        check_local_gpus(cfg.train.num_workers)  # fail here, not in NCCL's set-up inside the workers
    vocab = read_vocab_sizes(cfg.lake_dir)  # fail fast, before starting anything
    config = resolve_config(spec, opts, cfg.lake_dir)
    init = init_source(spec, config, cfg.run_dir, vocab)  # the saved tables it starts from, checked; None: random
    read_versions = read_training_versions(cfg.lake_dir, spec.tables)  # provenance: Delta versions of the exports
    version = f"{spec.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.train.ray_address, num_cpus=None if cfg.train.ray_address else cfg.train.ray_cpus,
                 include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        scaling_config, torch_config = ray_train_configs(cfg.train.num_workers, use_gpu)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"options": asdict(opts), "model_config": config_to_dict(config),
                               "lake_dir": str(cfg.lake_dir), "model_version": version,
                               "training_versions": read_versions, "init_from": init,
                               "model_dir": str(model_dir(cfg.run_dir, spec.name)), "use_gpu": use_gpu},
            torch_config=torch_config, scaling_config=scaling_config,
            run_config=RunConfig(name=version, storage_path=str(cfg.checkpoint_dir),
                                 failure_config=FailureConfig(max_failures=1),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return stage_result(cfg, spec, opts, config, dict(result.metrics), version, read_versions,
                        time.perf_counter() - t0, result.checkpoint.path if result.checkpoint else None,
                        initialised_from=_provenance(init))


def stage_result(cfg: PlatformConfig, spec, opts: TrainOptions, config, m: dict, version: str, read_versions: dict,
                 wall_s: float, checkpoint: str | None, initialised_from: dict | None = None) -> dict:
    """The stage result ``train_<model>`` (written, and returned): the task's figures (its ``result_keys``), the
    model, its resolved config and the trainer's knobs, the sharding plan, provenance (with the saved model its
    tables started from, if any) and wall time."""
    from training.registry import config_to_dict
    from training.tasks import task_class

    task = task_class(spec.task)
    out = {k: m[k] for k in task.result_keys if k in m}
    config_dict = config_to_dict(config)
    out.update(model=spec.name, kind=spec.kind, task=spec.task, epochs=m["epochs"],
               sharding_plan=m["sharding_plan"], model_version=version, training_versions=read_versions,
               train_wall_s=round(wall_s, 2), checkpoint=checkpoint, resumed_from_epoch=m["resumed_from_epoch"],
               initialised_from=initialised_from, model_config=config_dict,
               training={k: getattr(opts, k) for k in (*MODEL_KNOBS, "lr_schedule", "warmup_frac",
                                                       "min_lr_factor", "patience", "seed")}
               | {"sparse_optimizer": "fused row-wise Adagrad", "dense_optimizer": "AdamW"})
    # what a ranker read, at the top level as the peers' results have it (bench.models' table)
    out.update({k: config_dict[k] for k in ("dense_features", "history_ratings") if k in config_dict})
    write_stage_result(cfg, f"train_{spec.name}", out)
    return out

