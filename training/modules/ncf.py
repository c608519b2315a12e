"""The two towers of Neural Collaborative Filtering (He et al. 2017, "Neural Collaborative Filtering", WWW,
section 3), each over its own user and item tables:

    GMF   phi_GMF = p_u * q_i                                       (B, D_g), element-wise product (eq. 9)
    MLP   phi_MLP = a_L(W_L (... a_1(W_1 [p_u, q_i] + b_1)) + b_L)   (B, H), ReLU layers over the concatenation (eq. 10)

GMF, MLP and NeuMF (``training.models``) put a prediction layer ``sigmoid(h^T phi)`` on one tower or on the
concatenation of both. Their tables are the model's ``sparse_arch`` (``NCFSparseArch``: the trainer's fused
optimizer and DMP's sharding take every table under it), one ``SparseArch`` of ``user_idx`` and ``item_idx`` per
tower, named by the tower (``sparse_arch.gmf``, ``sparse_arch.mlp``), and the MLP tower's layers are the model's
``mlp`` (``MLPTower``); so a model of both towers names its parts as the model of one tower does, and NeuMF's
start from the trained GMF's and MLP's by state-dict key (``ModelSpec.init_from``).

Legend: B batch size, D_g GMF's embedding dimension, D_m the MLP tower's, H its last hidden width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.definitions import SPARSE_FEATURES
from training.modules.embedding import SparseArch, table_configs
from training.modules.mlp import MLP

#: The two features NCF reads: the user and the item (no side features, as the paper).
NCF_FEATURES = tuple(f for f in SPARSE_FEATURES if f.name in ("user_idx", "item_idx"))
_TABLES = "embedding_bag_collection.embedding_bags"
#: State-dict keys of the towers' tables in a model whose ``sparse_arch`` is an ``NCFSparseArch``.
GMF_USER_TABLE = f"sparse_arch.gmf.{_TABLES}.t_user.weight"
GMF_ITEM_TABLE = f"sparse_arch.gmf.{_TABLES}.t_item.weight"
MLP_USER_TABLE = f"sparse_arch.mlp.{_TABLES}.t_user.weight"
MLP_ITEM_TABLE = f"sparse_arch.mlp.{_TABLES}.t_item.weight"

UserItem = tuple[torch.Tensor, torch.Tensor]


class NCFSparseArch(nn.Module):
    """Each tower's own user and item tables (sum-pooled one-hot lookups, sharded by DMP): a ``SparseArch`` named
    ``gmf`` and one named ``mlp``, each built when its dimension is given.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        gmf_dim: D_g of the GMF tower's tables, 0 for none; a multiple of 4 (FBGEMM's fused kernels).
        mlp_dim: D_m of the MLP tower's tables, 0 for none; a multiple of 4.
        init_range: the tables start uniform in [-init_range, init_range].
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Raises:
        VocabularyError: ``user`` or ``item`` missing from ``vocab_sizes``.
        ValueError: neither tower.

    Call: ``forward(features: KJT with keys user_idx, item_idx, B rows each) -> (gmf, mlp)``, each ``(user (B, D),
    item (B, D))`` or None for a tower the model lacks.
    """

    def __init__(self, vocab_sizes: Mapping[str, int], gmf_dim: int = 0, mlp_dim: int = 0, init_range: float = 0.05,
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        if not gmf_dim and not mlp_dim:
            raise ValueError("NCFSparseArch needs the tables of at least one tower")

        def tables(dim: int) -> SparseArch | None:
            if not dim:
                return None
            return SparseArch(table_configs(NCF_FEATURES, vocab_sizes, dim, init_range), device=sparse_device)

        self.gmf, self.mlp = tables(gmf_dim), tables(mlp_dim)

    def forward(self, features: KeyedJaggedTensor) -> tuple[UserItem | None, UserItem | None]:
        return tuple(None if arch is None else _user_item(arch, features) for arch in (self.gmf, self.mlp))


def _user_item(arch: SparseArch, features: KeyedJaggedTensor) -> UserItem:
    emb = arch(features)  # (B, 2, D)
    return emb[:, arch.feature_names.index("user_idx")], emb[:, arch.feature_names.index("item_idx")]  # (B, D) each


def gmf_product(user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """GMF's interaction ``phi = p_u * q_i`` (eq. 9): (B, D_g) each -> (B, D_g)."""
    return user * item


class MLPTower(nn.Module):
    """The MLP tower: ReLU layers over ``[p_u, q_i]`` (eq. 10; the paper halves each layer's width).

    Args:
        embedding_dim: D_m of the user and item vectors; the first layer reads 2 D_m.
        hidden: the layers' widths; the last, H, is the tower's output.
        dropout: dropout after each layer (the paper has none).

    Raises:
        ValueError: ``hidden`` empty or ``dropout`` outside [0, 1) (``MLP``).

    Call: ``forward(user: Tensor (B, D_m), item: Tensor (B, D_m)) -> Tensor (B, H)``.

    >>> MLPTower(4, (8, 2))(torch.zeros(3, 4), torch.zeros(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, embedding_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.dense_arch = MLP(2 * embedding_dim, hidden, dropout)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.dense_arch(torch.cat([user, item], dim=1))  # (B, 2 D_m) -> (B, H)
