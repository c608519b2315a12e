"""GRU4Rec (Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural Networks"; Hidasi &
Karatzoglou 2018, "Recurrent Neural Networks with Top-k Gains for Session-based Recommendations").

A GRU reads a session's items one at a time and, after each, scores every item as the next one:

    h_t = GRU(e_t, h_{t-1}),   q_t = W h_t + b,   score(t, j) = <q_t, e_j>

with ``e`` the rows of one item table ``t_item`` (input and output embeddings tied, the "constrained embeddings"
of GRU4Rec's later versions), sharded by DistributedModelParallel like every table. The ``sequence`` task
(``training.tasks.sequence``) trains it on session-parallel mini-batches, each row's target against the other rows'
targets and items drawn by popularity (sampled softmax or BPR-max, ``training.modules.session_gru``), and
early-stops on recall@20 of the next valid item.

As a retriever its query is the GRU's output after the user's ``max_history`` most recent items (the history the
platform passes, no session cut: it carries no times), run from h_0 = 0; the exported item vectors are the item
table MIPS-transformed (``training.query.mips_items``), so that the cosine HNSW index returns the inner-product
order.

Parts:
    SequenceEmbedding   KJT (items) -> (N, D)            the item table (sharded by DMP)
    SessionGRU          (B, D), (B, H) -> (B, D), (B, H) the GRU and the output layer

Legend: B rows (sessions side by side, or users), S extra negatives of a step, L history length, D embedding
dimension, H GRU hidden width, R item rows (OOV row 0 included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from features.tables import CTR_SAMPLES, ITEM_VOCAB
from training.modules import SequenceEmbedding
from training.modules.session_gru import ITEMS, LOSSES, SessionGRU, history_kjt, items_kjt
from training.query import QueryEncoder, mips_items
from training.spec import ModelSpec, TrainDefaults, register

ITEM_TABLE = "sparse_arch.embedding_collection.embeddings.t_item.weight"


@dataclass(frozen=True)
class GRU4RecConfig:
    """Hyper-parameters of GRU4Rec and of its ``sequence`` task.

    Args:
        embedding_dim: D of the item table; a multiple of 4 (FBGEMM's fused kernels).
        hidden_size: H, the GRU's state width.
        dropout: dropout on the GRU state before the output layer.
        init_range: item rows start uniform in [-init_range, init_range].
        loss: ``softmax`` (sampled softmax / cross-entropy) or ``bpr_max`` (Hidasi & Karatzoglou 2018).
        bpreg: lambda of BPR-max's score regularisation.
        num_negatives: S, extra negatives per step drawn with probability proportional to count^sample_alpha
            (shared by the step's rows, besides the other rows' targets); 0: in-batch negatives only.
        sample_alpha: the popularity exponent of the extra negatives (0 uniform, 1 proportional to popularity).
        session_gap_minutes: a user's next event more than this many minutes after the previous one starts a new
            session (minutes of event time).
        all_events: train and evaluate on every event of the user; False: the positive ones (label 1) only.
        max_history: L, the most recent items the query is computed from (evaluation and serving).

    Raises:
        ValueError: a value out of range or an unknown ``loss``.
    """

    embedding_dim: int = 64
    hidden_size: int = 100
    dropout: float = 0.0
    init_range: float = 0.1
    loss: str = "softmax"
    bpreg: float = 1.0
    num_negatives: int = 128
    sample_alpha: float = 0.75
    session_gap_minutes: float = 30.0
    all_events: bool = False
    max_history: int = 50

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0 or self.embedding_dim % 4:
            raise ValueError(f"embedding_dim must be a positive multiple of 4, got {self.embedding_dim}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.hidden_size < 1 or self.max_history < 1 or self.num_negatives < 0:
            raise ValueError(f"hidden_size and max_history must be >= 1 and num_negatives >= 0, got "
                             f"{self.hidden_size}, {self.max_history}, {self.num_negatives}")
        if not 0.0 <= self.dropout < 1.0 or self.bpreg < 0 or self.sample_alpha < 0 or self.init_range <= 0:
            raise ValueError(f"dropout must be in [0, 1), bpreg and sample_alpha >= 0, init_range > 0, got "
                             f"{self.dropout}, {self.bpreg}, {self.sample_alpha}, {self.init_range}")
        if self.session_gap_minutes <= 0:
            raise ValueError(f"session_gap_minutes must be > 0, got {self.session_gap_minutes}")


class GRU4Rec(nn.Module):
    """The item table and the session GRU.

    Args:
        num_items: R, rows of the item vocabulary (OOV row 0 included).
        config: hyper-parameters.
        sparse_device: device of the table; ``meta`` before sharding with DMP.

    Calls:
        ``forward(features: KJT with key items holding 2B + S ids, one per row: the B current items, the B next
        items, the S extra negatives; hidden (B, H)) -> (logits (B, B + S), hidden (B, H))``: one session-parallel
        step; ``logits[b, c]`` scores item c of the B + S targets and negatives as row b's next item.
        ``encode(features: KJT with key items, B rows of up to L ids each, oldest first) -> queries (B, D)``: the
        query after each row's items, from h_0 = 0.
        ``embed(features: KJT with key items, one id per row) -> (N, D)``: the rows themselves.

    >>> model = GRU4Rec(10, GRU4RecConfig(embedding_dim=8, hidden_size=6))
    >>> model(items_kjt(torch.tensor([1, 2, 3, 4, 5])), torch.zeros(2, 6))[0].shape
    torch.Size([2, 3])
    """

    def __init__(self, num_items: int, config: GRU4RecConfig = GRU4RecConfig(),
                 sparse_device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.sparse_arch = SequenceEmbedding("t_item", num_items, d, [ITEMS], config.init_range, sparse_device)
        self.session_gru = SessionGRU(d, config.hidden_size, d, config.dropout)

    def embed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.sparse_arch(features)[ITEMS].values()  # (N, D)

    def forward(self, features: KeyedJaggedTensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = hidden.shape[0]
        emb = self.embed(features)  # (2B + S, D)
        query, hidden = self.session_gru.step(emb[:b], hidden)  # (B, D), (B, H)
        return query @ emb[b:].t(), hidden  # (B, B + S)

    def encode(self, features: KeyedJaggedTensor) -> torch.Tensor:
        history = self.sparse_arch(features)[ITEMS]
        lengths = history.lengths()  # (B,)
        longest = int(lengths.max()) if lengths.numel() else 0
        x = history.to_padded_dense(desired_length=max(1, longest), padding_value=0.0)  # (B, L, D), right-padded
        return self.session_gru.run(x, lengths)[0]  # (B, D)


@dataclass
class SessionQuery(QueryEncoder):
    """GRU4Rec's query: the GRU's output after the user's ``max_history`` most recent items, padded with the MIPS
    column (``[q, 0]``); a history without an item of the table has no query.

    Args:
        model: the unsharded model, with the saved weights.
    """

    model: GRU4Rec
    name = "GRU state after the recent items"

    def encode(self, user_idx: np.ndarray, history: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        rows = self.model.sparse_arch.embedding_collection.embedding_configs()[0].num_embeddings
        kjt = history_kjt(history, self.model.config.max_history, rows)
        with torch.no_grad():
            q = self.model.eval().encode(kjt).numpy()  # (B, D)
        ok = kjt.lengths().numpy() > 0
        return np.hstack([q * ok[:, None], np.zeros((len(q), 1), q.dtype)]).astype(np.float32), ok


def item_vectors(state: dict, config: GRU4RecConfig) -> np.ndarray:
    """(R, D + 1): the item table MIPS-transformed (``training.query.mips_items``), searched by cosine."""
    return mips_items(state[ITEM_TABLE].numpy())


def query_encoder(state: dict, config: GRU4RecConfig) -> SessionQuery:
    """The saved model's ``SessionQuery``."""
    model = GRU4Rec(state[ITEM_TABLE].shape[0], config)
    model.load_state_dict(state)
    return SessionQuery(model.eval())


SPEC = register(ModelSpec(
    name="gru4rec", kind="retriever", task="sequence", config=GRU4RecConfig,
    build=lambda vocab_sizes, config, sparse_device=None: GRU4Rec(vocab_sizes["item"], config, sparse_device),
    train=TrainDefaults(epochs=10, batch_size=128, lr_sparse=0.05, lr_dense=1e-3, weight_decay=0.0),
    tables=(CTR_SAMPLES, ITEM_VOCAB),
    paper="Hidasi et al. 2016, Session-based Recommendations with Recurrent Neural Networks",
    item_table=ITEM_TABLE,
    item_vectors=item_vectors,
    query_encoder=query_encoder,
))
