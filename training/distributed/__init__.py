"""Sharded versions of the models: sharding plans and the DistributedModelParallel wrapping."""

from training.distributed.sharding import (
    ShardingConfig,
    gather_full_state_dict,
    load_full_state_dict,
    local_bytes,
    local_table_rows,
    placements,
    plan_sharding,
    shard_model,
)

__all__ = ["ShardingConfig", "gather_full_state_dict", "load_full_state_dict", "local_bytes",
           "local_table_rows", "placements", "plan_sharding",
           "shard_model"]
