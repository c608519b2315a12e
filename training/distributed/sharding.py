"""Sharding plans for the models' embedding tables and the DistributedModelParallel (DMP) wrapping, on CPU (gloo)
or CUDA (NCCL).

Two ways to plan:
- ``planner``: TorchRec's ``EmbeddingShardingPlanner`` over a ``Topology(world_size)`` of the compute device
  (``topology``), restricted by ``ParameterConstraints`` to the configured sharding types (default ``table_wise``:
  whole tables spread over the ranks). The plan is computed collectively, so every rank gets the same one. With a
  per-rank ``memory_budget_bytes`` the topology's ``ddr_cap`` (CPU) or ``hbm_cap`` (CUDA) is that budget: the
  planner must place every table, with its optimizer state, within it -- a table larger than one rank's budget is
  split (row-wise, column-wise), and a model that fits nowhere raises ``PlannerError``.
- ``row_wise``: a hand-built plan that splits every table's rows evenly over all ranks. TorchRec's planner does
  not offer row-wise sharding for an EmbeddingBagCollection on CPU (it does on CUDA), but the sharded module runs
  it on both.

Compute kernels: FBGEMM's fused table-batched embedding (``EmbeddingComputeKernel.FUSED``: lookup, backward and
the sparse optimizer in one kernel) is the only kernel TorchRec offers for sharded tables on CPU; on CUDA the
planner could also put tables in host memory (UVM, UVM caching) or a key-value store, so the constraints pin
``FUSED`` there (``compute_kernels``): every shard lives in its GPU's memory, as the budget says.

DMP shards the tables by the plan and wraps the rest of the model (dense layers, first-order weights) in
DistributedDataParallel, on the worker's device. Embedding tables should be built on the ``meta`` device; DMP
materialises only the local shards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from features.errors import DeviceUnavailableError

STRATEGIES = ("planner", "row_wise")
#: Compute devices the plans and DMP support: CPU (gloo) and CUDA (NCCL).
DEVICE_TYPES = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------------- devices
def require_cuda() -> None:
    """Fail early, before any process group or kernel, when this process cannot train on CUDA.

    Raises:
        DeviceUnavailableError: torch sees no CUDA device (no driver, no GPU, ``CUDA_VISIBLE_DEVICES`` empty, or a
            CPU-only torch build), or the installed FBGEMM is its CPU variant (``fbgemm-gpu-cpu``), whose fused
            kernels cannot run on CUDA tensors.
    """
    if not torch.cuda.is_available():
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cause = (f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device on "
                 f"this machine (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES={visible!r})")
        raise DeviceUnavailableError(cause, "run on a GPU node (NVIDIA driver, visible GPU) or set "
                                            "RECSYS_TRAIN__USE_GPU=false / drop --use-gpu to train on CPU")
    import fbgemm_gpu

    variant = getattr(fbgemm_gpu, "__variant__", "unknown")
    if variant not in ("cuda", "INTERNAL"):
        raise DeviceUnavailableError(
            f"the installed FBGEMM is its {variant!r} variant ({fbgemm_gpu.__version__}), without CUDA kernels",
            "install the CUDA build: make setup GPU=1 (requirements/main-gpu.lock: fbgemm-gpu instead of "
            "fbgemm-gpu-cpu), see docs/ray.md")


def process_group_backend(device_type: str) -> str:
    """The torch.distributed backend for a device: ``gloo`` on CPU, ``nccl`` on CUDA.

    >>> process_group_backend("cpu"), process_group_backend("cuda")
    ('gloo', 'nccl')
    """
    return {"cpu": "gloo", "cuda": "nccl"}[_check_device_type(device_type)]


def compute_kernels(device_type: str) -> list[str] | None:
    """The table compute kernels the planner may choose: None on CPU (TorchRec offers only ``fused`` there), only
    ``fused`` on CUDA (no UVM / key-value placements: the tables stay in GPU memory).

    >>> compute_kernels("cpu"), compute_kernels("cuda")
    (None, ['fused'])
    """
    return None if _check_device_type(device_type) == "cpu" else [EmbeddingComputeKernel.FUSED.value]


def topology(world_size: int, device_type: str = "cpu", memory_budget_bytes: int = 0) -> Topology:
    """The planner's picture of the ranks: ``world_size`` devices of ``device_type``.

    Per rank, the tables and their optimizer state may fill: on CPU ``memory_budget_bytes`` of host memory
    (``ddr_cap``; TorchRec's default when 0); on CUDA ``memory_budget_bytes`` of GPU memory (``hbm_cap``), or when 0
    the whole memory of this process's current CUDA device (``total_memory``, bytes).

    Raises:
        DeviceUnavailableError: CUDA without a budget on a process that has no CUDA device to measure.
    """
    if _check_device_type(device_type) == "cuda":
        if not memory_budget_bytes:
            require_cuda()
            memory_budget_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return Topology(world_size=world_size, compute_device="cuda", hbm_cap=memory_budget_bytes)
    budget = {"ddr_cap": memory_budget_bytes} if memory_budget_bytes else {}
    return Topology(world_size=world_size, compute_device="cpu", **budget)


def _check_device_type(device_type: str) -> str:
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"compute device must be one of {DEVICE_TYPES}, got {device_type!r}")
    return device_type


@dataclass(frozen=True)
class ShardingConfig:
    """How to shard the embedding tables.

    Args:
        strategy: ``planner`` (TorchRec's planner) or ``row_wise`` (hand-built plan).
        sharding_types: sharding types the planner may choose from (``ShardingType`` values).
        memory_budget_bytes: per-rank memory (bytes) the planner may fill with tables and their optimizer state
            (``Topology.ddr_cap`` on CPU, ``hbm_cap`` on GPU); 0 keeps TorchRec's default host memory on CPU and
            takes the GPU's whole memory on CUDA (``topology``).
        compute_device: ``cpu`` or ``cuda``: the device type of the ranks the plan is for.
    """

    strategy: str = "planner"
    sharding_types: tuple[str, ...] = (ShardingType.TABLE_WISE.value,)
    memory_budget_bytes: int = 0
    compute_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"sharding strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        valid = {t.value for t in ShardingType}
        bad = set(self.sharding_types) - valid
        if bad:
            raise ValueError(f"unknown sharding types {sorted(bad)}; choose from {sorted(valid)}")
        if self.memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {self.memory_budget_bytes}")
        _check_device_type(self.compute_device)


def _collections(model: nn.Module) -> dict[str, EmbeddingBagCollection | EmbeddingCollection]:
    """Every pooled (EmbeddingBagCollection) and sequence (EmbeddingCollection, DIN) collection, by module path."""
    return {path: m for path, m in model.named_modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))}


def _table_names(collection: EmbeddingBagCollection | EmbeddingCollection) -> list[str]:
    configs = (collection.embedding_bag_configs() if isinstance(collection, EmbeddingBagCollection)
               else collection.embedding_configs())
    return [t.name for t in configs]


def _sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def plan_sharding(model: nn.Module, world_size: int, config: ShardingConfig = ShardingConfig(),
                  pg: dist.ProcessGroup | None = None) -> ShardingPlan:
    """The sharding plan of every EmbeddingBagCollection and EmbeddingCollection in ``model``.

    Args:
        model: the unsharded model (tables on ``meta`` are fine).
        world_size: number of ranks.
        config: strategy and allowed sharding types.
        pg: process group for the collective planner; when None (or no process group is initialised) the plan
            is computed locally, which gives the same plan on every rank for the same inputs.

    Raises:
        torchrec.distributed.planner.types.PlannerError: no plan places the tables within
            ``config.memory_budget_bytes`` per rank (or within the constraints).
        DeviceUnavailableError: a CUDA plan without a budget on a process without a CUDA device (``topology``).
    """
    device_type = config.compute_device
    if config.strategy == "row_wise":
        return ShardingPlan({
            path: construct_module_sharding_plan(
                m, per_param_sharding={name: row_wise() for name in _table_names(m)},
                local_size=world_size, world_size=world_size, device_type=device_type)
            for path, m in _collections(model).items()
        })
    kernels = compute_kernels(device_type)
    constraints = {
        name: ParameterConstraints(sharding_types=list(config.sharding_types),
                                   **({"compute_kernels": kernels} if kernels else {}))
        for m in _collections(model).values() for name in _table_names(m)
    }
    planner = EmbeddingShardingPlanner(topology=topology(world_size, device_type, config.memory_budget_bytes),
                                       constraints=constraints)
    sharders = _sharders()
    if pg is not None or dist.is_initialized():
        return planner.collective_plan(model, sharders, pg or dist.GroupMember.WORLD)
    return planner.plan(model, sharders)


def placements(plan: ShardingPlan) -> dict[str, str]:
    """JSON-able summary: ``{table: "<sharding type>@rank<r>[,<r>...]"}``.

    >>> from torchrec.distributed.sharding_plan import table_wise
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])], device=torch.device("meta"))
    >>> mp = construct_module_sharding_plan(ebc, {"t_a": table_wise(rank=1)}, local_size=2, world_size=2,
    ...                                     device_type="cpu")
    >>> placements(ShardingPlan({"": mp}))
    {'t_a': 'table_wise@rank1'}
    """
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            ranks = sorted(set(ps.ranks or []))
            out[table] = f"{ps.sharding_type}@rank{','.join(map(str, ranks))}"
    return dict(sorted(out.items()))


def shard_model(model: nn.Module, plan: ShardingPlan,
                device: torch.device = torch.device("cpu")) -> DistributedModelParallel:
    """Wrap ``model`` in DMP on ``device`` (this rank's CPU or GPU): tables sharded by ``plan`` (a plan for the
    same device type), dense parts data-parallel and moved to ``device``.

    The process group (gloo on CPU, NCCL on CUDA) must be initialised. Fused sparse optimizers must already be
    attached with ``apply_optimizer_in_backward``.
    """
    return DistributedModelParallel(model, device=device, plan=plan, sharders=_sharders())


def _is_sharded(t: object) -> bool:
    return hasattr(t, "local_shards")


def copy_full_into(dst, src, convert: Callable | None = None) -> None:
    """Copy the full (unsharded) value ``src`` into ``dst`` in place: a sharded table (``ShardedTensor``) gets the
    rows and columns of this rank's local shards only, any other tensor the whole of ``src``.

    Args:
        dst: a value of a (possibly DistributedModelParallel) model's ``state_dict()``.
        src: anything sliced ``src[r:r + h, c:c + w]`` (a tensor, an array, a scipy sparse matrix).
        convert: turns ``src`` or a slice of it into a tensor ``copy_`` takes (default: as it is).
    """
    convert = convert or (lambda x: x)
    with torch.no_grad():
        if _is_sharded(dst):
            for shard in dst.local_shards():
                (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(convert(src[r:r + h, c:c + w]))
        else:
            dst.copy_(convert(src))


def load_full_state_dict(dmp: DistributedModelParallel, full: Mapping[str, torch.Tensor]) -> None:
    """Copy an unsharded model's state dict into ``dmp``: each rank copies the rows/columns of its local shards.

    Raises:
        KeyError: a key of the sharded model is missing from ``full``.
    """
    for key, value in dmp.state_dict().items():
        copy_full_into(value, full[key])


def gather_full_state_dict(dmp: DistributedModelParallel, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict, assembled on rank ``dst`` (None on the other ranks), as CPU tensors whatever the
    training device, so that what is saved from it loads on CPU and GPU alike. Collective: call on all ranks
    (the gather runs on ``dmp.device``, as NCCL requires). Keys match the unsharded model's ``state_dict()``."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if _is_sharded(value):
            full = torch.empty(value.size(), dtype=value.dtype, device=dmp.device) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full.cpu()
        else:
            out[key] = value.detach().cpu().clone()
    return out if rank == dst else None


def local_table_rows(dmp: DistributedModelParallel) -> dict[str, int]:
    """Rows of each sharded table that this rank holds (0 for a table placed elsewhere), by state-dict key."""
    return {key: sum(s.tensor.shape[0] for s in value.local_shards()) if value.local_shards() else 0
            for key, value in dmp.state_dict().items() if _is_sharded(value)}


def local_bytes(dmp: DistributedModelParallel) -> dict[str, int]:
    """What this rank holds, in bytes: ``tables`` (its shards of the sharded tables), ``table_optimizer`` (the
    fused sparse optimizer's state of those shards, e.g. row-wise Adagrad's one float per row) and ``dense``
    (the data-parallel parameters and buffers, a full copy on every rank)."""

    def nbytes(t) -> int:
        if _is_sharded(t):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    state = dmp.state_dict()
    tables = sum(nbytes(v) for v in state.values() if _is_sharded(v))
    dense = sum(nbytes(v) for v in state.values() if not _is_sharded(v))
    opt = 0
    for per_param in dmp.fused_optimizer.state_dict()["state"].values():
        opt += sum(nbytes(v) for v in per_param.values())
    return {"tables": tables, "table_optimizer": opt, "dense": dense}
