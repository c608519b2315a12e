"""The sequence task: next-item prediction within sessions, for GRU4Rec (Hidasi et al. 2016, "Session-based
Recommendations with Recurrent Neural Networks"; losses of Hidasi & Karatzoglou 2018).

Data: every rank reads all of ``export/ctr_samples`` (``user_idx``, ``item_idx``, ``event_time``, ``label``,
``split`` and, when exported, ``event_id``; ``read_events``), keeps the positive events (label 1) or, with the
config's ``all_events``, every event, and orders each user's events by ``(event_time, event_id)`` (the platform's
replay order). The train split's events are cut into sessions (``cut_sessions``): a user's next event more than
``session_gap_minutes`` after the previous one starts a new session; a session of one event has no next item and
is dropped. Session ``i`` belongs to rank ``i % world_size``.

Training: session-parallel mini-batches (the paper's section 3.1.1, ``session_parallel``): the rank's B lanes each
run one session at a time, one event per step; a lane whose session ends takes the next session of the epoch's
shuffled order, and its GRU state is reset to 0 there. Step t of lane b predicts the session's next item from its
current one; the GRU state is carried from step to step (detached: back-propagation through one step, as in the
paper). Each row's target is scored against the other lanes' targets and ``num_negatives`` items drawn with
probability proportional to ``count ** sample_alpha`` (train counts, shared by the step's rows); a negative equal
to the row's target, or an idle lane's, is left out. Loss: sampled softmax or BPR-max (the config's ``loss``,
``training.modules.session_gru``). ``steps_per_epoch`` is the longest schedule over the ranks and the run's epochs
(the schedule of an epoch is fixed by the seed, the epoch and the rank); the steps after a lane's last session are
idle rows of weight 0.

Evaluation (``evaluate(dmp, split)``): a case is a kept event of the split; the query is the model's output after
the user's ``max_history`` kept events before it (any split, in replay order; an empty history gives the output of
the zero state), scored against every item but the OOV row; a tie with the target counts against it. Figures:
``recall@20`` (= HR@20, one target per case; early stopping maximises it), ``mrr@20``, ``hr@10`` and ``cases``.

Legend: N events, S sessions, T steps, B lanes (rows of a step), K extra negatives, L history length, R item rows.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.distributed.collectives import all_reduce_max, all_reduce_sum, to_device
from training.tasks.context import TaskContext

#: Split codes of ``Events.split``.
SPLITS = ("train", "valid", "test")
#: Cases per evaluation step on every rank.
EVAL_BATCH = 256


@dataclass
class Events:
    """Kept events, ordered by (user, event_time, event_id): ``user``, ``item`` (N,) int64, ``time`` (N,) float64
    seconds since the epoch, ``split`` (N,) int8 index into ``SPLITS``."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.item)


def read_events(lake_dir, all_events: bool = False) -> Events:
    """Every split of ``export/ctr_samples``: the positive events (label 1) or, with ``all_events``, all of them,
    ordered by (user, event_time, event_id) (file order breaks the remaining ties).

    Raises:
        TableNotFoundError: a split has not been exported.
        KeyError: the export has no ``event_time`` column (sessions need times); re-run the features stage.
    """
    import pyarrow as pa
    import pyarrow.dataset as ds

    from features.errors import TableNotFoundError
    from features.tables import CTR_SAMPLES, parquet_export
    from training.data import PRODUCER

    parts = []
    for code, split in enumerate(SPLITS):
        path = Path(parquet_export(CTR_SAMPLES, lake_dir)) / f"split={split}"
        if not path.exists() or not any(path.glob("*.parquet")):
            raise TableNotFoundError(f"{CTR_SAMPLES.name} split={split}", str(path), PRODUCER)
        dataset = ds.dataset(str(path), format="parquet")
        names = dataset.schema.names
        if "event_time" not in names:
            raise KeyError(f"{CTR_SAMPLES.name} split={split} at {path} has no event_time column, which sessions "
                           f"need; re-run {PRODUCER}")
        t = dataset.to_table(columns=["user_idx", "item_idx", "event_time", "label"]
                             + (["event_id"] if "event_id" in names else []))
        keep = np.ones(t.num_rows, bool) if all_events else t.column("label").to_numpy() > 0
        event_id = (t.column("event_id").to_numpy(zero_copy_only=False).astype(str) if "event_id" in names
                    else np.full(t.num_rows, "", dtype=str))
        parts.append((t.column("user_idx").to_numpy().astype(np.int64)[keep],
                      t.column("item_idx").to_numpy().astype(np.int64)[keep],
                      t.column("event_time").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()[keep] / 1e6,
                      np.full(int(keep.sum()), code, np.int8), event_id[keep]))
    user, item, when, split, event_id = (np.concatenate(c) for c in zip(*parts))
    order = np.lexsort((event_id, when, user))  # stable: equal keys keep file order
    return Events(user[order], item[order], when[order], split[order])


def cut_sessions(user: np.ndarray, when: np.ndarray, gap_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Sessions of events ordered by (user, time): a new one starts at a new user or more than ``gap_s`` seconds
    after the previous event. Returns ``(starts, lengths)`` (S,) int64, positions in the input.

    >>> cut_sessions(np.array([1, 1, 1, 2, 2]), np.array([0.0, 60.0, 200.0, 210.0, 220.0]), gap_s=100.0)
    (array([0, 2, 3]), array([2, 1, 2]))
    """
    n = len(user)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.ones(n, bool)
    new[1:] = (user[1:] != user[:-1]) | (np.diff(when) > gap_s)
    starts = np.flatnonzero(new).astype(np.int64)
    return starts, np.diff(np.append(starts, n)).astype(np.int64)


@dataclass
class Schedule:
    """A session-parallel epoch: ``current`` (T, B) int64, the position of lane b's current event at step t (its
    target is the next position), -1 where the lane is idle; ``reset`` (T, B) bool, True where the lane starts a
    session (its GRU state is set to 0 before the step)."""

    current: np.ndarray
    reset: np.ndarray

    @property
    def steps(self) -> int:
        return self.current.shape[0]


def session_parallel(starts: np.ndarray, lengths: np.ndarray, lanes: int, min_steps: int = 0) -> Schedule:
    """Lay out sessions (in the given order, each of at least 2 events) on ``lanes`` lanes: each session goes to the
    lane that frees first (the lowest lane on a tie) and runs one step per event but its last; padded with idle
    steps to ``min_steps``.

    >>> s = session_parallel(np.array([0, 3, 5]), np.array([3, 2, 3]), lanes=2)
    >>> s.current.tolist(), s.reset.astype(int).tolist()
    ([[0, 3], [1, 5], [-1, 6]], [[1, 1], [0, 1], [0, 0]])
    """
    free = [(0, lane) for lane in range(lanes)]
    placed = []
    for start, length in zip(starts.tolist(), lengths.tolist()):
        t, lane = heapq.heappop(free)
        placed.append((t, lane, start, length - 1))
        heapq.heappush(free, (t + length - 1, lane))
    steps = max([t for t, _ in free] + [min_steps])
    current = np.full((steps, lanes), -1, np.int64)
    reset = np.zeros((steps, lanes), bool)
    for t, lane, start, pairs in placed:
        current[t:t + pairs, lane] = np.arange(start, start + pairs)
        reset[t, lane] = True
    return Schedule(current, reset)


def step_batch(items: np.ndarray, current: np.ndarray, negatives: np.ndarray) -> tuple:
    """One step's model input and loss masks.

    Args:
        items: (N,) item of every train event; current: (B,) ``Schedule.current`` row; negatives: (K,) items.

    Returns:
        ``(ids (2B + K,), mask (B, B + K) bool, weight (B,) float32)``: ids = the lanes' current items, their
        targets, the negatives (an idle lane reads row 0); ``mask[b, c]`` whether column c of the model's logits is
        a negative of row b (not the row's own column, not an idle lane's, not an item equal to the row's target).

    >>> ids, mask, w = step_batch(np.array([5, 6, 7, 8]), np.array([0, 2, -1]), np.array([6, 9]))
    >>> ids.tolist(), mask.astype(int).tolist(), w.tolist()
    ([5, 7, 0, 6, 8, 0, 6, 9], [[0, 1, 0, 0, 1], [1, 0, 0, 1, 1], [0, 0, 0, 0, 0]], [1.0, 1.0, 0.0])
    """
    live = current >= 0  # (B,)
    pos = np.where(live, current, 0)
    inputs, targets = np.where(live, items[pos], 0), np.where(live, items[np.minimum(pos + 1, len(items) - 1)], 0)
    columns = np.concatenate([targets, negatives])  # (B + K,)
    col_live = np.concatenate([live, np.ones(len(negatives), bool)])
    mask = col_live[None, :] & (columns[None, :] != targets[:, None]) & live[:, None]  # (B, B + K)
    mask[np.arange(len(current)), np.arange(len(current))] = False
    return np.concatenate([inputs, targets, negatives]), mask, live.astype(np.float32)


def history_of(events: Events, rows: np.ndarray, max_history: int) -> list[np.ndarray]:
    """For each event of ``rows``, the items of the same user's events before it (in the events' order), the last
    ``max_history`` of them, oldest first.

    >>> ev = Events(np.array([1, 1, 1, 2]), np.array([4, 5, 6, 7]), np.zeros(4), np.zeros(4, np.int8))
    >>> [h.tolist() for h in history_of(ev, np.array([2, 3]), max_history=1)]
    [[5], []]
    """
    first = np.searchsorted(events.user, events.user[rows], side="left")  # the user's first event
    return [events.item[max(f, r - max_history):r] for f, r in zip(first.tolist(), rows.tolist())]


class SequenceTask:
    """GRU4Rec's sessions (see the module docstring). The model's config gives ``session_gap_minutes``,
    ``all_events``, ``num_negatives``, ``sample_alpha``, ``loss``, ``bpreg``, ``hidden_size`` and ``max_history``;
    its ``forward(kjt, hidden)`` takes one session-parallel step, ``encode`` and ``embed`` serve the evaluation
    (``training.models.gru4rec``; its KJT: ``training.modules.session_gru.items_kjt``)."""

    name = "sequence"
    monitor = "recall@20"
    levers = ()
    result_keys = ("test_recall@20", "test_mrr@20", "test_hr@10", "valid_recall@20", "best_epoch",
                   "train_events_per_s", "sessions")

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, config = ctx, ctx.config
        self.num_items = ctx.vocab["item"]
        self.events = read_events(ctx.lake_dir, config.all_events)
        train = np.flatnonzero(self.events.split == 0)  # contiguous per user, in replay order
        self.train_items = self.events.item[train]
        starts, lengths = cut_sessions(self.events.user[train], self.events.time[train],
                                       config.session_gap_minutes * 60.0)
        starts, lengths = starts[lengths >= 2], lengths[lengths >= 2]
        if len(starts) == 0:
            raise ValueError(f"no train session of 2 or more events (session_gap_minutes="
                             f"{config.session_gap_minutes}, all_events={config.all_events}): nothing to train on")
        self.starts, self.lengths = starts[ctx.rank::ctx.world_size], lengths[ctx.rank::ctx.world_size]
        self.sessions, self.pairs = len(starts), int((lengths - 1).sum())  # over all ranks: each read them all
        counts = np.bincount(self.train_items, minlength=self.num_items)[:self.num_items].astype(np.float64)
        counts[0] = 0.0  # never the OOV row
        weights = counts ** config.sample_alpha * (counts > 0)
        self.neg_p = weights / weights.sum()
        longest = max(self._schedule(e).steps for e in range(ctx.opts.epochs))
        self.steps_per_epoch = max(1, int(all_reduce_max(torch.tensor([longest]), ctx.device)[0]))
        self.hidden, self.loss_avg, self._total = None, float("nan"), torch.zeros(2)

    def _schedule(self, epoch: int, min_steps: int = 0) -> Schedule:
        order = np.random.default_rng([self.ctx.opts.seed, epoch, self.ctx.rank]).permutation(len(self.starts))
        return session_parallel(self.starts[order], self.lengths[order], self.ctx.local_batch_size, min_steps)

    def bind(self, dmp) -> None:
        pass

    def batches(self, epoch: int) -> Iterator:
        ctx, config = self.ctx, self.ctx.config
        schedule = self._schedule(epoch, self.steps_per_epoch)
        negatives = np.random.default_rng([ctx.opts.seed, epoch, ctx.rank, 1]).choice(
            self.num_items, size=(schedule.steps, config.num_negatives), p=self.neg_p)  # (T, K)
        self.hidden = torch.zeros(ctx.local_batch_size, config.hidden_size, device=ctx.device)  # (B, H)
        self._total = torch.zeros(2)
        for t in range(self.steps_per_epoch):
            ids, mask, weight = step_batch(self.train_items, schedule.current[t], negatives[t])
            yield (to_device(_kjt(torch.from_numpy(ids)), ctx.device),
                   *(to_device(torch.from_numpy(x), ctx.device) for x in (schedule.reset[t], mask, weight)))

    def loss(self, dmp, batch) -> torch.Tensor:
        from training.modules.session_gru import session_loss

        kjt, reset, mask, weight = batch
        hidden = self.hidden.masked_fill(reset.unsqueeze(1), 0.0)  # (B, H): a new session starts from 0
        logits, hidden = dmp(kjt, hidden)  # (B, B + K), (B, H)
        self.hidden = hidden.detach()
        target = logits.diagonal().unsqueeze(1)  # (B, 1): lane b's own target is column b
        loss = session_loss(self.ctx.config.loss, torch.cat([target, logits], dim=1), mask, weight,
                            self.ctx.config.bpreg)
        rows = float(weight.sum())
        self._total += torch.tensor([float(loss.detach()) * rows, rows])
        return loss

    def end_epoch(self, epoch: int, train_s: float) -> dict:
        total = all_reduce_sum(self._total, self.ctx.device)
        self.loss_avg = float(total[0] / total[1].clamp_min(1.0))
        return {"train_loss": self.loss_avg, "sessions": self.sessions,
                "train_events_per_s": self.pairs * (epoch + 1) / max(train_s, 1e-9)}

    def evaluate(self, dmp, split: str) -> dict[str, float]:
        """Recall@20, MRR@20 and HR@10 of the next item over ``split``'s cases of all ranks (see the module
        docstring); collective."""
        from torchrec.distributed.model_parallel import get_unwrapped_module

        from training.modules.session_gru import history_kjt

        ctx, config = self.ctx, self.ctx.config
        model = get_unwrapped_module(dmp)
        cases = np.flatnonzero(self.events.split == SPLITS.index(split))[ctx.rank::ctx.world_size]
        n_batches = max(1, int(all_reduce_max(torch.tensor([-(-len(cases) // EVAL_BATCH)]), ctx.device)[0]))
        sums = torch.zeros(4, dtype=torch.float64)  # hits@10, hits@20, reciprocal ranks within 20, cases
        dmp.eval()
        with torch.no_grad():
            items = model.embed(to_device(_kjt(torch.arange(self.num_items)), ctx.device))  # (R, D)
            for s in range(n_batches):
                rows = cases[s * EVAL_BATCH:(s + 1) * EVAL_BATCH]
                histories = history_of(self.events, rows, config.max_history)
                histories += [np.zeros(0, np.int64)] * (EVAL_BATCH - len(rows))  # every rank: the same rows
                queries = model.encode(to_device(history_kjt(histories, config.max_history, self.num_items),
                                                 ctx.device))[:len(rows)]  # (b, D)
                scores = queries @ items.t()  # (b, R)
                scores[:, 0] = float("-inf")  # never the OOV row
                target = torch.from_numpy(self.events.item[rows]).to(scores.device)
                own = scores.gather(1, target.unsqueeze(1))  # (b, 1)
                rank = (scores >= own).sum(dim=1).cpu().double()  # (b,) 1 = first; a tie counts against it
                sums += torch.stack([(rank <= 10).sum(), (rank <= 20).sum(), ((rank <= 20) / rank).sum(),
                                     torch.tensor(float(len(rows)))]).double()
        total = all_reduce_sum(sums, ctx.device)
        n = float(total[3].clamp_min(1.0))
        return {"recall@20": float(total[1]) / n, "mrr@20": float(total[2]) / n, "hr@10": float(total[0]) / n,
                "cases": int(total[3])}

    def summary(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"loss": self.loss_avg}  # an epoch's schedule and negatives follow from the seed, epoch and rank

    def load_state_dict(self, state: dict) -> None:
        self.loss_avg = state["loss"]

    def finish(self, state: dict) -> dict:
        return {}


def _kjt(ids: torch.Tensor):
    from training.modules.session_gru import items_kjt

    return items_kjt(ids)
