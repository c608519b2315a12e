"""Scale run: DIN with a generated item table larger than one worker's memory budget, trained by Ray Train workers
that each hold only their shard.

    python -m training.scale [--items 10000000] [--embedding-dim 16] [--budget-mib 512] [--workers 2]
                             [--steps 40] [--batch-size 1024] [--use-gpu]               (make scale-train)

The item table (``--items`` rows x D float32, e.g. 10M x 16 = 640 MB, plus row-wise Adagrad's one float per row)
is declared on ``meta`` and planned by TorchRec's ``EmbeddingShardingPlanner`` under a per-worker memory budget
(``ShardingConfig.memory_budget_bytes`` -> ``Topology(ddr_cap=...)`` on CPU, ``Topology(hbm_cap=...)`` of each
GPU with ``--use-gpu`` / ``RECSYS_TRAIN__USE_GPU``) with table-wise, row-wise and column-wise sharding allowed.
Before starting Ray the driver plans the same model for ONE worker under the same budget and requires the planner
to refuse it (``PlannerError``): one worker cannot hold the table. DistributedModelParallel then materialises only
each rank's shard. The workers train ``--steps`` steps on generated batches (candidate and
history ids uniform over the whole table, so every shard is read and updated) and report, per rank: rows held of
each table, bytes of table shards, of their optimizer state and of the replicated dense part
(``training.distributed.local_bytes``), process RSS before the model, after sharding and at the end (MiB,
``/proc/self/status``) and the peak RSS (``VmHWM``), and samples/s; on GPU also the CUDA memory allocated after
sharding and at its peak (MiB, ``torch.cuda.memory_allocated`` / ``max_memory_allocated``).

No checkpoint is written and no unsharded copy is gathered (either would need the whole table in one place).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MIB = 2**20
FIGURES = "scale_figures.json"
#: Sharding types the planner may choose from in the scale run.
SCALE_SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")


@dataclass(frozen=True)
class ScaleOptions:
    """One scale run. ``budget_mib``: per-worker memory (MiB) for embedding tables and their optimizer state, the
    planner's ``ddr_cap`` (``hbm_cap`` when the run is on GPUs); the table must not fit one worker's budget
    (checked by the driver). ``batch_size`` is per worker; ``history`` is the longest generated behaviour sequence
    (ids)."""

    num_items: int = 10_000_000
    embedding_dim: int = 16
    budget_mib: float = 512
    num_workers: int = 2
    steps: int = 40
    batch_size: int = 1024
    history: int = 20
    lr_sparse: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < 2 or self.embedding_dim % 4 or self.embedding_dim <= 0:
            raise ValueError("num_items >= 2 and embedding_dim a positive multiple of 4 required")
        if self.budget_mib <= 0 or min(self.num_workers, self.steps, self.batch_size, self.history) < 1:
            raise ValueError("budget_mib > 0 and num_workers, steps, batch_size, history >= 1 required")

    def table_bytes(self) -> int:
        """The whole item table with its row-wise Adagrad state, in bytes (float32)."""
        return self.num_items * (self.embedding_dim + 1) * 4


def vocab_sizes(opts: ScaleOptions) -> dict[str, int]:
    """MovieLens-sized side vocabularies and a ``num_items``-row item vocabulary."""
    from training.data import synthetic_vocab_sizes

    return {**synthetic_vocab_sizes(), "user": 1000, "item": opts.num_items}


def build_model(opts: ScaleOptions):
    """DIN on ``meta`` (nothing allocated), with fused row-wise Adagrad attached to its tables."""
    import torch
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from training.models import DIN, DINConfig

    torch.manual_seed(opts.seed)
    model = DIN(vocab_sizes(opts), DINConfig(embedding_dim=opts.embedding_dim, max_history=opts.history,
                                             history_ratings=False),
                sparse_device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": opts.lr_sparse})
    return model


def sharding_config(opts: ScaleOptions, device_type: str = "cpu"):
    """The planner under the per-worker budget, for ranks of ``device_type`` (``cpu``: host memory, ``cuda``: GPU
    memory)."""
    from training.distributed import ShardingConfig

    return ShardingConfig(strategy="planner", sharding_types=SCALE_SHARDING_TYPES,
                          memory_budget_bytes=int(opts.budget_mib * MIB), compute_device=device_type)


def one_worker_refused(opts: ScaleOptions, device_type: str = "cpu") -> str:
    """Plan the model for a single worker of ``device_type`` under the budget; returns the planner's refusal
    (first line). Planning needs no device: a GPU plan is checked on a CPU-only driver too.

    Raises:
        ValueError: the planner found a one-worker plan, i.e. the table fits one worker's budget and the run would
            show nothing about scale (raise ``--items`` or lower ``--budget-mib``).
    """
    from torchrec.distributed.planner.types import PlannerError

    from training.distributed import placements, plan_sharding

    try:
        plan = plan_sharding(build_model(opts), 1, sharding_config(opts, device_type))
    except PlannerError as e:
        return str(e).strip().splitlines()[0]
    raise ValueError(f"{opts.num_items:,} rows x {opts.embedding_dim} fit one worker's {opts.budget_mib} MiB "
                     f"budget (plan {placements(plan)}); raise --items or lower --budget-mib")


def _proc_status_mib() -> dict[str, float]:
    """This process's resident set now (VmRSS) and at its peak (VmHWM), MiB."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def _batch(opts: ScaleOptions, rng: np.random.Generator):
    """A generated DIN batch (B = ``opts.batch_size``): ids uniform over every vocabulary, histories of 0..L ids,
    label Bernoulli(sigmoid(gender effect)) so that the loss has something to learn. Returns (KJT, label (B,))."""
    import torch
    from torchrec import KeyedJaggedTensor

    from training.models import DIN_FEATURES

    b, sizes = opts.batch_size, vocab_sizes(opts)
    values, lengths = [], []
    gender = rng.integers(1, sizes["gender"], b)
    for f in DIN_FEATURES:
        if f.name == "hist_item_idx":
            n = rng.integers(0, opts.history + 1, b)
        elif f.multi_hot:
            n = rng.integers(1, 4, b)
        else:
            n = np.ones(b, np.int64)
        ids = gender if f.name == "gender_idx" else rng.integers(1, sizes[f.vocab], int(n.sum()))
        values.append(ids)
        lengths.append(n)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in DIN_FEATURES], values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))
    p = 1.0 / (1.0 + np.exp(-(gender - 1.5) * 2.0))
    return kjt, torch.from_numpy((rng.random(b) < p).astype(np.float32))


def scale_loop(c: dict) -> None:
    """Ray Train worker: plan under the budget, shard, train, gather every rank's memory figures to rank 0."""
    import ray.train
    import torch
    import torch.distributed as dist
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from training.distributed import local_bytes, local_table_rows, placements, plan_sharding, shard_model
    from training.trainer import worker_device

    torch.set_num_threads(1)
    opts = ScaleOptions(**c["options"])
    device = worker_device(c.get("use_gpu", False))
    rank, world = dist.get_rank(), dist.get_world_size()
    before = _proc_status_mib()["VmRSS"]
    model = build_model(opts)
    plan = plan_sharding(model, world, sharding_config(opts, device.type))
    if rank == 0:
        print(f"[scale rank0] sharding plan under {opts.budget_mib} MiB per worker ({device.type}):\n{plan}",
              flush=True)
    dmp = shard_model(model, plan, device)
    sharded = _proc_status_mib()["VmRSS"]
    cuda = {"cuda_after_shard_mib": torch.cuda.memory_allocated(device) / MIB} if device.type == "cuda" else {}
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    dense_opt = torch.optim.AdamW(dense, lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng([opts.seed, rank])
    losses, t_train = [], 0.0
    for step in range(opts.steps):
        kjt, label = _batch(opts, rng)
        if device.type == "cuda":
            kjt, label = kjt.to(device), label.to(device)
        t0 = time.perf_counter()
        dense_opt.zero_grad()
        loss = loss_fn(dmp(kjt), label)
        loss.backward()  # the table shards' fused Adagrad steps inside backward
        dense_opt.step()
        t_train += time.perf_counter() - t0
        losses.append(loss.item())
    end = _proc_status_mib()
    mine = {"rank": rank, "rows": local_table_rows(dmp), "bytes": local_bytes(dmp),
            "rss_before_model_mib": before, "rss_after_shard_mib": sharded, "rss_end_mib": end["VmRSS"],
            "rss_peak_mib": end["VmHWM"], "samples_per_s": opts.steps * opts.batch_size / t_train}
    if cuda:
        mine.update(cuda, cuda_peak_mib=torch.cuda.max_memory_allocated(device) / MIB)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    metrics = {"ranks": everyone, "plan": placements(plan), "loss_first": float(np.mean(losses[:5])),
               "loss_last": float(np.mean(losses[-5:]))}
    with tempfile.TemporaryDirectory() as tmp:  # the figures travel in a (tiny) checkpoint of rank 0's
        if rank == 0:
            Path(tmp, FIGURES).write_text(json.dumps(metrics, default=float))
        ray.train.report({"loss_last": metrics["loss_last"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def run(opts: ScaleOptions, ray_cpus: int | None = None, use_gpu: bool = False) -> dict:
    """Check that one worker cannot hold the table under the budget, then train with ``opts.num_workers`` Ray Train
    workers (of 1 CPU, gloo; or with ``use_gpu`` of 1 CPU and 1 GPU, NCCL, the budget then in GPU memory); returns
    the figures (``ranks``: one dict per rank, ``plan``, ``one_worker``: the planner's refusal).

    Raises:
        DeviceUnavailableError: ``use_gpu`` and this machine (whose local Ray cluster would run the workers) has no
            usable CUDA device, or fewer GPUs than workers; raised before Ray starts.
        ValueError: the table fits one worker's budget (see ``one_worker_refused``).
        ray.train.TrainingFailedError: a worker failed (e.g. the planner found no plan for ``num_workers`` ranks
            under the budget either).
    """
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from features.config import ROOT
    from training.trainer import check_local_gpus, ray_train_configs

    if use_gpu:  # the workers run on this machine's (local) Ray cluster
        check_local_gpus(opts.num_workers)
    refusal = one_worker_refused(opts, "cuda" if use_gpu else "cpu")
    print(f"[scale] one worker, {opts.budget_mib} MiB budget: planner refuses: {refusal}", flush=True)
    scaling_config, torch_config = ray_train_configs(opts.num_workers, use_gpu)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=ray_cpus or opts.num_workers + 1, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        with tempfile.TemporaryDirectory() as storage:
            result = TorchTrainer(
                scale_loop, train_loop_config={"options": asdict(opts), "use_gpu": use_gpu},
                torch_config=torch_config, scaling_config=scaling_config,
                run_config=RunConfig(name="scale", storage_path=storage)).fit()
            with result.checkpoint.as_directory() as d:
                figures = json.loads(Path(d, FIGURES).read_text())
    finally:
        if started:
            ray.shutdown()
    out = {**figures, "one_worker": refusal, "options": asdict(opts), "table_mib": opts.table_bytes() / MIB}
    return {**out, "device": "cuda"} if use_gpu else out


def print_figures(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    o = out["options"]
    gpu = out.get("device") == "cuda"
    table = Table(title=f"scale run: DIN, item table {o['num_items']:,} x {o['embedding_dim']} "
                        f"({out['table_mib']:,.0f} MiB with Adagrad state), budget {o['budget_mib']} MiB/"
                        f"{'GPU' if gpu else 'worker'}")
    for col in ("rank", "item rows held", "tables MiB", "table opt MiB", "dense MiB", "RSS before model MiB",
                "RSS after shard MiB", "RSS end MiB", "peak RSS MiB", "samples/s",
                *(("CUDA after shard MiB", "CUDA peak MiB") if gpu else ())):
        table.add_column(col, justify="right")
    for r in out["ranks"]:
        items = sum(v for k, v in r["rows"].items() if ".t_item." in k)
        b = r["bytes"]
        table.add_row(str(r["rank"]), f"{items:,}", f"{b['tables'] / MIB:,.1f}", f"{b['table_optimizer'] / MIB:,.1f}",
                      f"{b['dense'] / MIB:,.2f}", f"{r['rss_before_model_mib']:,.0f}",
                      f"{r['rss_after_shard_mib']:,.0f}", f"{r['rss_end_mib']:,.0f}", f"{r['rss_peak_mib']:,.0f}",
                      f"{r['samples_per_s']:,.0f}",
                      *((f"{r['cuda_after_shard_mib']:,.1f}", f"{r['cuda_peak_mib']:,.1f}") if gpu else ()))
    console = Console(width=max(Console().width, 150))
    console.print(table)
    console.print(f"plan: {out['plan']}")
    console.print(f"one worker under the same budget: {out['one_worker']}")
    console.print(f"loss (mean of first/last 5 steps): {out['loss_first']:.4f} -> {out['loss_last']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=ScaleOptions.num_items)
    p.add_argument("--embedding-dim", type=int, default=ScaleOptions.embedding_dim)
    p.add_argument("--budget-mib", type=float, default=ScaleOptions.budget_mib)
    p.add_argument("--workers", type=int, default=ScaleOptions.num_workers)
    p.add_argument("--steps", type=int, default=ScaleOptions.steps)
    p.add_argument("--batch-size", type=int, default=ScaleOptions.batch_size, help="per worker")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per worker, NCCL, the budget in GPU memory (default: RECSYS_TRAIN__USE_GPU)")
    a = p.parse_args(argv)
    opts = ScaleOptions(num_items=a.items, embedding_dim=a.embedding_dim, budget_mib=a.budget_mib,
                        num_workers=a.workers, steps=a.steps, batch_size=a.batch_size)
    from features.config import load_config

    out = run(opts, use_gpu=a.use_gpu or load_config().train.use_gpu)
    print_figures(out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
