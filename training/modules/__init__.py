"""Unsharded building blocks: embedding collections (SparseArch, sequence embeddings), the FM interaction, the
wide part's cross products, DIN's target attention and MLPs."""

from training.modules.attention import ActivationUnit, TargetAttention
from training.modules.cross import CrossProduct
from training.modules.embedding import FirstOrder, SequenceEmbedding, SparseArch, table_configs
from training.modules.interaction import FactorizationMachine
from training.modules.mlp import MLP, Dice, check_dense

__all__ = ["ActivationUnit", "TargetAttention", "CrossProduct", "FirstOrder", "SequenceEmbedding", "SparseArch", "table_configs",
           "FactorizationMachine", "MLP", "Dice", "check_dense"]
