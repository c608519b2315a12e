"""Unsharded building blocks: embedding collections (SparseArch, sequence embeddings), the FM interaction and its
field-aware, bi-interaction and attentional variants, the wide part's cross products, DCN's cross network, DIN's
target attention, Deep Crossing's residual unit, PNN's product layer and MLPs."""

from training.modules.afm_attention import AttentionalPooling, pairwise_products
from training.modules.attention import ActivationUnit, TargetAttention
from training.modules.bi_interaction import BiInteractionPooling
from training.modules.cross import CrossProduct
from training.modules.cross_network import CrossNetwork
from training.modules.embedding import FirstOrder, SequenceEmbedding, SparseArch, table_configs
from training.modules.ffm import FieldAwareInteraction, field_block
from training.modules.interaction import FactorizationMachine
from training.modules.interest import AUGRUCell, AuxiliaryNet, InterestEvolution, InterestExtractor
from training.modules.mlp import MLP, Dice, check_dense
from training.modules.product import ProductLayer
from training.modules.residual import ResidualUnit

__all__ = ["ActivationUnit", "TargetAttention", "AttentionalPooling", "pairwise_products", "BiInteractionPooling",
           "CrossProduct", "CrossNetwork", "FirstOrder", "SequenceEmbedding", "SparseArch", "table_configs",
           "FactorizationMachine", "FieldAwareInteraction", "field_block", "MLP", "Dice", "check_dense", "ResidualUnit",
           "ProductLayer", "AUGRUCell", "AuxiliaryNet", "InterestEvolution", "InterestExtractor"]
