"""Neural Matrix Factorization, the fusion of GMF and MLP in Neural Collaborative Filtering (He et al. 2017,
"Neural Collaborative Filtering", WWW, section 3.4, eq. 12):

    phi_GMF = p_u^G * q_i^G                               (B, D_g)   GMF's tower, its own tables
    phi_MLP = MLP([p_u^M, q_i^M])                         (B, H)     the MLP's tower, its own tables
    logit   = h^T [phi_GMF, phi_MLP] + b

Trained as the paper does, pointwise with binary cross-entropy on the implicit label (rating >= 4) of
``gold.ctr_samples``, by the CTR task; its negatives are the task's rows (events rated below 4). Pre-training
(section 3.4.1): with ``pretrained`` (the default) its spec's ``init_from`` names GMF and MLP
(``training.models.gmf``, ``training.models.ncf_mlp``), trained into the same run folder first. The trainer copies
their tables of the same state-dict key (``sparse_arch.gmf``, ``sparse_arch.mlp``: the towers are named as in
those models) into NeuMF's, then ``init_state`` sets the rest: the MLP's hidden layers as trained, and the prediction layer as the
``alpha`` mix of the two trained ones,

    h = [alpha h_GMF, (1 - alpha) h_MLP],    b = alpha b_GMF + (1 - alpha) b_MLP

(the paper's alpha = 0.5; its bias mix is that of the authors' code), so that the first logit is
``alpha logit_GMF + (1 - alpha) logit_MLP``. Not on a resume. ``pretrained=False`` trains it from random tables
and layers. The paper fine-tunes the pre-trained NeuMF with plain SGD; here it is the platform's fused row-wise
Adagrad (tables) and AdamW (the rest).

Its score is not an inner product of a user and an item vector, so it cannot be searched by ANN: it is a ranker,
scoring each candidate of a retriever (serving's ``--ranker``, the ranker replay). Its exported item table is the
GMF tower's (the mean-of-recent-items retrieval, as other rankers').

Parts:
    NCFSparseArch     KJT (user_idx, item_idx) -> 2 x (B, D_g) and 2 x (B, D_m)   each tower's user and item tables
                                                                                  (sharded by DMP)
    gmf_product       (B, D_g) x 2 -> (B, D_g)                                    p_u^G * q_i^G
    MLPTower (mlp)    (B, D_m) x 2 -> (B, H)                                      the ReLU layers over [p_u^M, q_i^M]
    predict           (B, D_g + H) -> (B,)                                        h and b

Legend: B batch size, D_g GMF's embedding dimension, D_m the MLP tower's, H the tower's last width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.models.gmf import SPEC as GMF_SPEC
from training.models.ncf_mlp import SPEC as MLP_SPEC
from training.modules.ncf import GMF_ITEM_TABLE, NCF_FEATURES, MLPTower, NCFSparseArch, gmf_product
from training.spec import ModelSpec, TrainDefaults, register


@dataclass(frozen=True)
class NeuMFConfig:
    """Hyper-parameters of NeuMF.

    Args:
        gmf_dim: D_g of the GMF tower's vectors; a multiple of 4; GMF's ``embedding_dim`` when ``pretrained``.
        mlp_dim: D_m of the MLP tower's vectors; a multiple of 4; MLP's ``embedding_dim`` when ``pretrained``.
        hidden: the MLP tower's widths; MLP's ``hidden`` when ``pretrained``.
        dropout: dropout after each layer of the MLP tower (the paper has none).
        init_range: vectors start uniform in [-init_range, init_range] (before the sources' are copied, or for
            good without ``pretrained``).
        alpha: the GMF's share of the pre-trained prediction layer, in [0, 1] (the paper's 0.5); read only with
            ``pretrained``.
        pretrained: start from the GMF and the MLP trained into the same run folder (the paper's NeuMF with
            pre-training); False: from random tables and layers.

    Raises:
        ValueError: a dimension not a positive multiple of 4, no layer, ``dropout`` outside [0, 1), ``init_range``
            negative or ``alpha`` outside [0, 1].
    """

    gmf_dim: int = 8
    mlp_dim: int = 32
    hidden: tuple[int, ...] = (32, 16, 8)
    dropout: float = 0.0
    init_range: float = 0.05
    alpha: float = 0.5
    pretrained: bool = True

    def __post_init__(self) -> None:
        for name in ("gmf_dim", "mlp_dim"):
            if getattr(self, name) <= 0 or getattr(self, name) % 4:
                raise ValueError(f"{name} must be a positive multiple of 4, got {getattr(self, name)}")
        if not self.hidden:
            raise ValueError("the MLP tower needs at least one layer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_range >= 0:
            raise ValueError(f"init_range must be >= 0, got {self.init_range}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


class NeuMF(nn.Module):
    """NeuMF's logit over its two towers.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Raises:
        VocabularyError: ``user`` or ``item`` missing from ``vocab_sizes``.

    Call: ``forward(features: KJT with keys user_idx, item_idx, B rows each, dense: ignored) -> logits (B,)``.

    >>> from training.data import synthetic_vocab_sizes, kjt_of_rows
    >>> NeuMF(synthetic_vocab_sizes())(kjt_of_rows([{"user_idx": 1, "item_idx": 2}] * 3, NCF_FEATURES)).shape
    torch.Size([3])
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: NeuMFConfig = NeuMFConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.sparse_arch = NCFSparseArch(vocab_sizes, config.gmf_dim, config.mlp_dim, config.init_range,
                                         sparse_device)
        self.mlp = MLPTower(config.mlp_dim, config.hidden, config.dropout)
        self.predict = nn.Linear(config.gmf_dim + config.hidden[-1], 1)

    def forward(self, features: KeyedJaggedTensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        (user_g, item_g), (user_m, item_m) = self.sparse_arch(features)  # (B, D_g) each, (B, D_m) each
        phi = torch.cat([gmf_product(user_g, item_g), self.mlp(user_m, item_m)], dim=1)  # (B, D_g + H)
        return self.predict(phi).squeeze(1)  # (B,)


def init_state(config: NeuMFConfig, sources: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parameters besides the tables that the trained GMF and MLP (``sources``, their saved state dicts by
    name) give NeuMF (``ModelSpec.init_state``): the MLP tower's layers as trained, and the prediction layer
    ``h = [alpha h_GMF, (1 - alpha) h_MLP]``, ``b = alpha b_GMF + (1 - alpha) b_MLP``."""
    gmf, mlp, a = sources[GMF_SPEC.name], sources[MLP_SPEC.name], config.alpha
    out = {k: v.clone() for k, v in mlp.items() if k.startswith("mlp.dense_arch.")}
    out["predict.weight"] = torch.cat([a * gmf["predict.weight"], (1 - a) * mlp["predict.weight"]], dim=1)
    out["predict.bias"] = a * gmf["predict.bias"] + (1 - a) * mlp["predict.bias"]
    return out


SPEC = register(ModelSpec(
    name="neumf", kind="ranker", task="ctr", config=NeuMFConfig,
    build=lambda vocab_sizes, config, sparse_device=None: NeuMF(vocab_sizes, config, sparse_device=sparse_device),
    # MF's, not tuned; no mini-batch aware L2 (the paper has none; id_lookups reads one SparseArch)
    train=TrainDefaults(epochs=12, batch_size=2048, lr_sparse=0.05, lr_dense=1e-3, weight_decay=1e-4,
                        id_dropout=0.5),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="He et al. 2017, Neural Collaborative Filtering",
    item_table=GMF_ITEM_TABLE,
    id_tables={"t_user": ("user_idx",), "t_item": ("item_idx",)},
    id_dropout_features=("user_idx",),
    features=lambda config: NCF_FEATURES,
    init_from=lambda config: (GMF_SPEC.name, MLP_SPEC.name) if config.pretrained else None,
    init_state=init_state,
))
