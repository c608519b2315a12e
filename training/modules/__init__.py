"""Unsharded building blocks: embedding collections (SparseArch), the FM interaction and MLPs."""

from training.modules.embedding import FirstOrder, SparseArch, table_configs
from training.modules.interaction import FactorizationMachine
from training.modules.mlp import MLP

__all__ = ["FirstOrder", "SparseArch", "table_configs", "FactorizationMachine", "MLP"]
