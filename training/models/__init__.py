"""Reference models, one per file; each runs unsharded and under DistributedModelParallel."""

from training.models.deepfm import DeepFM, DeepFMConfig
from training.models.din import DIN, DIN_FEATURES, DINConfig
from training.models.item2vec import Item2Vec, Item2VecConfig, sgns_loss

__all__ = ["DeepFM", "DeepFMConfig", "DIN", "DIN_FEATURES", "DINConfig", "Item2Vec", "Item2VecConfig", "sgns_loss"]
