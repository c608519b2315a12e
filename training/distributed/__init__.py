"""Sharded versions of the models: sharding plans and the DistributedModelParallel wrapping."""

from training.distributed.sharding import (
    ShardingConfig,
    compute_kernels,
    gather_full_state_dict,
    load_full_state_dict,
    local_bytes,
    local_table_rows,
    placements,
    plan_sharding,
    process_group_backend,
    require_cuda,
    shard_model,
    topology,
)

__all__ = ["ShardingConfig", "compute_kernels", "gather_full_state_dict", "load_full_state_dict", "local_bytes",
           "local_table_rows", "placements", "plan_sharding", "process_group_backend", "require_cuda",
           "shard_model", "topology"]
