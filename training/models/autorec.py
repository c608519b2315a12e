"""Item-based AutoRec (I-AutoRec; Sedhain, Menon, Sanner & Xie 2015, "AutoRec: Autoencoders Meet Collaborative
Filtering"). Each item i is its partially observed vector over the users, ``r_i`` (U,): the target where user u has
a train row for i, 0 elsewhere. One sigmoid hidden layer encodes it, an identity layer decodes it:

    h(r_i) = sigmoid(W r_i + mu)                    (H,)    the item's hidden code
    r_hat_i = V h(r_i) + b                          (U,)    r_hat(u, i) = <V[u], h(r_i)> + b[u]
    J = sum over items i of || (r_i - r_hat_i) * c_i ||^2 + lambda / 2 * (||W||_F^2 + ||V||_F^2)

with ``c_i`` 1 on the observed entries and ``sqrt(w)`` on the others (``w = unobserved_weight``; the residual there
is ``r_hat``, a target of 0; ``training.modules.autorec.masked_sse``). With w = 0 the loss is the paper's, on
observed entries only: a rating predictor that never sees which items users rate at all; w > 0 is the top-N
reading of implicit feedback (every unobserved entry a weak 0, as in weighted MF, Hu, Koren & Volinsky 2008), the
default (0.1) since the model is a retriever. The target (``target``) is the implicit ``label`` (rating >= 4) by
default -- a retriever puts liked items first, and an observed low rating is a 0 to reconstruct, as MF's BCE reads
it; ``rating`` (the stars) is the paper's explicit setting. Trained by the ``autoencoder`` task
(``training.tasks.autoencoder``) on mini-batches of items of the train split of ``gold.ctr_samples``.

Both weight matrices are tables of user rows (TorchRec, sharded by DMP): the encoder ``W^T`` (U, H) and the decoder
``V`` (U, H). A step reads both whole (one id per user row; a dense item batch meets every user row), so the
paper's L2 on all of W and V is exact in every step; ``mu`` (H,) and ``b`` (U,) are dense.

As a retriever the reconstruction is an inner product: ``r_hat(u, i) = <[V[u], b[u]], [h(r_i), 1]>``. The item
vectors are the items' codes with a trailing 1, MIPS-transformed (``training.query.mips_items``) for the cosine
index; the query is the user's decoder row and bias (``AutoRecQuery``). A user without a train row -- most
valid/test users of the time split -- has no trained decoder row: the query is fitted to the user's point-in-time
history as training fits a row (``training.modules.autorec.RidgeFoldIn``): the history's items a target 1, the
other items a target 0 of weight w, ridge penalty lambda / 2. An item without a train row has no code (its input
is empty): its vector is 0 and every query scores it 0.

The codes of the saved model are computed once from the train split when training finishes (the task's
``finish``) and kept in the buffer ``item_codes``, with ``user_rows`` (the train rows of each user).

Parts:
    SparseArch       KJT (enc_user, dec_user; one id per user row) -> (U, 2, H)   W^T and V, sharded by DMP

Legend: B items per batch, U user rows, R item rows (OOV rows 0 included), H hidden units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import SparseArch
from training.modules.autorec import RidgeFoldIn
from training.query import QueryEncoder, mips_items
from training.spec import ModelSpec, TrainDefaults, register

ENC_FEATURE, DEC_FEATURE = "enc_user", "dec_user"
ENC_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_user_enc.weight"
DEC_TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.t_user_dec.weight"
ENC_BIAS, DEC_BIAS, ITEM_CODES, USER_ROWS = "enc_bias", "dec_bias", "item_codes", "user_rows"
#: What ``AutoRecConfig.target`` may be: the ``ctr_samples`` column reconstructed.
TARGETS = ("label", "rating")


@dataclass(frozen=True)
class AutoRecConfig:
    """Hyper-parameters of I-AutoRec.

    Args:
        hidden: H, hidden units; a positive multiple of 4 (the tables' width; FBGEMM's fused kernels).
        l2: lambda of the L2 on W and V (the paper's regulariser); > 0, since the fold-in query of a user without
            a decoder row is the same ridge.
        target: ``label`` (rating >= 4, 0/1) or ``rating`` (the stars) of every observed (item, user) pair.
        unobserved_weight: w, the loss weight of an unobserved entry read as a target of 0; 0 is the paper's loss
            on observed entries only.
        init_range: W and V start uniform in [-init_range, init_range]; mu and b at 0.

    Raises:
        ValueError: a field out of range, or ``target`` not one of ``TARGETS``.
    """

    hidden: int = 200
    l2: float = 1.0
    target: str = "label"
    unobserved_weight: float = 0.1
    init_range: float = 0.03

    def __post_init__(self) -> None:
        if self.hidden <= 0 or self.hidden % 4:
            raise ValueError(f"hidden must be a positive multiple of 4, got {self.hidden}")
        if self.l2 <= 0 or self.init_range <= 0:
            raise ValueError(f"l2 and init_range must be > 0, got {self.l2}, {self.init_range}")
        if not 0 <= self.unobserved_weight <= 1:
            raise ValueError(f"unobserved_weight must be in [0, 1], got {self.unobserved_weight}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")


def all_users_kjt(n_users: int, device: torch.device | None = None) -> KeyedJaggedTensor:
    """The KJT that reads both tables whole: keys ``enc_user`` and ``dec_user``, U bags of one id each (0..U-1)."""
    rows = torch.arange(n_users, device=device)
    return KeyedJaggedTensor.from_lengths_sync(keys=[ENC_FEATURE, DEC_FEATURE], values=torch.cat([rows, rows]),
                                               lengths=torch.ones(2 * n_users, dtype=torch.int64, device=device))


class AutoRec(nn.Module):
    """The autoencoder over items' user vectors.

    Args:
        vocab_sizes: rows per vocabulary (``user``, ``item``).
        config: hyper-parameters.
        sparse_device: device of the tables; ``meta`` before sharding with DMP.

    Call: ``forward(features: all_users_kjt(U), inputs: (B, U) r_i with 0 where unobserved) -> (reconstruction
    (B, U), codes (B, H), W^T (U, H), V (U, H))``; the tables are returned for the L2 and for scoring.

    >>> from training.data import synthetic_vocab_sizes
    >>> model = AutoRec(synthetic_vocab_sizes(), AutoRecConfig(hidden=8))
    >>> [tuple(t.shape) for t in model(all_users_kjt(30), torch.zeros(2, 30))]
    [(2, 30), (2, 8), (30, 8), (30, 8)]
    """

    def __init__(self, vocab_sizes: Mapping[str, int], config: AutoRecConfig = AutoRecConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        n_users, n_items, h, r = int(vocab_sizes["user"]), int(vocab_sizes["item"]), config.hidden, config.init_range
        tables = [EmbeddingBagConfig(name=name, embedding_dim=h, num_embeddings=n_users, feature_names=[feature],
                                     pooling=PoolingType.SUM, weight_init_min=-r, weight_init_max=r,
                                     init_fn=lambda w, r=r: nn.init.uniform_(w, -r, r))
                  for name, feature in (("t_user_enc", ENC_FEATURE), ("t_user_dec", DEC_FEATURE))]
        self.sparse_arch = SparseArch(tables, device=sparse_device)
        self.enc_bias = nn.Parameter(torch.zeros(h))  # mu
        self.dec_bias = nn.Parameter(torch.zeros(n_users))  # b
        # filled from the train split when training finishes (the task's finish): what the retriever serves
        self.register_buffer(ITEM_CODES, torch.zeros(n_items, h))
        self.register_buffer(USER_ROWS, torch.zeros(n_users))

    def forward(self, features: KeyedJaggedTensor, inputs: torch.Tensor):
        tables = self.sparse_arch(features)  # (U, 2, H)
        enc, dec = tables[:, 0], tables[:, 1]  # (U, H) each
        codes = torch.sigmoid(inputs @ enc + self.enc_bias)  # (B, H)
        return codes @ dec.t() + self.dec_bias, codes, enc, dec  # (B, U), (B, H), (U, H), (U, H)


def item_codes(values, observed: np.ndarray, enc: np.ndarray, enc_bias: np.ndarray) -> np.ndarray:
    """(R, H) float32 codes ``sigmoid(W r_i + mu)`` of the items' train vectors ``values`` ((R, U), scipy.sparse
    or dense, 0 where unobserved); 0 for an item that is not ``observed`` ((R,) bool: no train row, no code).

    >>> item_codes(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([False, True]), np.array([[2.0], [5.0]]),
    ...            np.array([0.0])).astype(float).round(3).tolist()
    [[0.0], [0.881]]
    """
    pre = np.asarray(values @ enc.astype(np.float64)) + enc_bias  # (R, H)
    return (1.0 / (1.0 + np.exp(-pre)) * np.asarray(observed, bool)[:, None]).astype(np.float32)


@dataclass
class AutoRecQuery(QueryEncoder):
    """The query of ``item_vectors``: ``[V[u], b[u], 0]`` for a user with train rows, whose decoder row was trained;
    for any other user (new since the train period, or beyond the table) the ridge fold-in of a target 1 on the
    codes of the point-in-time history's items, the other coded items a target 0 of weight ``unobserved_weight``
    (``RidgeFoldIn``, penalty lambda / 2, as the row's own terms in J), ``[v, 0]``; no query when no history item
    has a code (the popularity fallback).

    Args:
        decoder: (U, H) V.
        bias: (U,) b.
        user_rows: (U,) train rows per user; > 0 marks a trained decoder row.
        codes: (R, H) item codes (``item_codes``).
        l2: the config's lambda.
        unobserved_weight: the config's weight of an unobserved entry.
    """

    decoder: np.ndarray
    bias: np.ndarray
    user_rows: np.ndarray
    codes: np.ndarray
    l2: float
    unobserved_weight: float = 0.0
    name = "decoder row, or its fold-in on the history"

    def __post_init__(self) -> None:
        coded = np.abs(self.codes).sum(axis=1, keepdims=True) > 0
        self.fold_in = RidgeFoldIn(np.hstack([self.codes, coded]), self.l2 / 2, self.unobserved_weight)

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(user_idx, np.int64)
        known = (idx > 0) & (idx < len(self.decoder))
        known[known] = self.user_rows[idx[known]] > 0
        out = np.zeros((len(idx), self.decoder.shape[1] + 2), np.float32)  # (B, H + 2): MIPS column left 0
        out[known, :-1] = np.hstack([self.decoder[idx[known]], self.bias[idx[known], None]])
        new = np.flatnonzero(~known)
        ok = known.copy()
        if new.size:
            out[new, :-1], ok[new] = self.fold_in([history[b] for b in new])
        return out, ok


def scored_items(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """(R, H + 1) ``[h(r_i), 1]`` for an item with a code, 0 for one without (before the MIPS transform)."""
    codes = state[ITEM_CODES].numpy()
    return np.hstack([codes, (np.abs(codes).sum(axis=1, keepdims=True) > 0)]).astype(np.float32)


def item_vectors(state: Mapping[str, torch.Tensor], config: AutoRecConfig) -> np.ndarray:
    """(R, H + 2): ``scored_items`` MIPS-transformed (``training.query.mips_items``), searched by cosine."""
    return mips_items(scored_items(state))


def query_encoder(state: Mapping[str, torch.Tensor], config: AutoRecConfig) -> AutoRecQuery:
    """``AutoRecQuery`` over the saved decoder, biases, user rows and item codes."""
    return AutoRecQuery(state[DEC_TABLE].numpy(), state[DEC_BIAS].numpy(), state[USER_ROWS].numpy(),
                        state[ITEM_CODES].numpy(), config.l2, config.unobserved_weight)


SPEC = register(ModelSpec(
    name="autorec", kind="retriever", task="autoencoder", config=AutoRecConfig,
    build=lambda vocab_sizes, config, sparse_device=None: AutoRec(vocab_sizes, config, sparse_device=sparse_device),
    train=TrainDefaults(epochs=20, batch_size=128, lr_sparse=0.01, lr_dense=1e-3, weight_decay=0.0),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Sedhain, Menon, Sanner & Xie 2015, AutoRec: Autoencoders Meet Collaborative Filtering",
    item_table=ITEM_CODES,
    item_vectors=item_vectors,
    query_encoder=query_encoder,
))
