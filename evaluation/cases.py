"""Cases and protocols: what a case is, what counts as seen, and what a model may know at each case; shared by the
static replay (evaluation.replay) and the prequential replay (evaluation.prequential), so that both judge every
policy by one rule.

The log: every row of the ctr_samples Parquet export (any split, any rating, whatever its label), put in *replay
order*, ``(event_time, event_id)`` ascending (the split orders events the same way, and ``event_id`` encodes the
original row, so it breaks ties in time). The events are replayed in that order as an online system would have met
them (the replay method of Li et al. 2011, "Unbiased offline evaluation of contextual-bandit-based news article
recommendation algorithms", used here for top-K retrieval rather than a bandit).

A *case* is one positive event (``label = 1``): of the test split for the static replay (``build_cases``), of an
evaluated window for the prequential replay. Its target is the event's item; a policy hits when the target is
among its K items.

What a case may not be recommended (*seen*), the same for every policy of both replays: item 0 (padding / unknown)
and every item of every logged event of the case's user that comes strictly before the case in replay order, i.e.
every row of the export with the same ``user_idx`` and a smaller ``(event_time, event_id)`` (``seen_before``).
Ties: an event of the same user at the same ``event_time`` is excluded when its ``event_id`` is smaller (the
replay has met it already) and kept otherwise; events after the case are never excluded, even when the user rates
that item later. The rule is wider than ``hist_item_idx``, which holds only the last ``MAX_HISTORY`` (50) items
rated at a strictly earlier second and only makes the query. A user who had rated the case's own item before (a
re-rating; MovieLens has none) cannot be hit on that case.

What a model may know at a case: only what was logged strictly before the event. The query is the sample's
``hist_item_idx`` (items the user rated strictly before ``event_time``, most recent last, which already holds the
user's earlier test events); popularity counts the events with ``event_time`` strictly before the case's; a
trained model is the one exported before the test period (static replay) or retrained on every event before the
window's first (prequential replay). The exclusion above is what the online system knows of the user, not what a
model learnt.

Legend: B cases, E logged events, L longest history, C candidates per case, N items (max item_idx + 1),
S excluded items of a case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.config import PlatformConfig
from features.errors import TableNotFoundError
from features.tables import CTR_SAMPLES, parquet_export

#: The splits of the ctr_samples export, every one part of the log.
SPLITS = ("train", "valid", "test")
#: The export's columns the replays read.
COLUMNS = ("event_id", "user_idx", "item_idx", "label", "event_time", "hist_item_idx")


@dataclass(frozen=True)
class Log:
    """Every logged event (any rating, any split) in replay order, ``(event_time, event_id)`` ascending.

    Args:
        event_time: (E,) int64 microseconds since the epoch (UTC).
        user_idx, item_idx: (E,) int64.
        event_id: (E,) str.
    """

    event_time: np.ndarray
    user_idx: np.ndarray
    item_idx: np.ndarray
    event_id: np.ndarray


@dataclass(frozen=True)
class SeenItems:
    """The items each case must not recommend (module docstring): the distinct items of its user's events strictly
    before it in replay order, kept as one slice per case of a flat array grouped by user (the cases of a user share
    it, so memory is E, not B x S).

    Args:
        items: (P,) int64 the distinct item_idx of each user (P <= E (user, item) pairs), grouped by user, each
            group in order of the user's first event on the item (replay order).
        start: (B,) int64 offset in ``items`` of the case's user's group.
        count: (B,) int64 distinct items of that user first met strictly before the case: the case's slice is
            ``items[start:start + count]``, and ``count <= N``.
    """

    items: np.ndarray
    start: np.ndarray
    count: np.ndarray

    def of(self, b: int) -> np.ndarray:
        """(count[b],) int64 item_idx case ``b`` must not get, in order of the user's first event on each."""
        return self.items[self.start[b]:self.start[b] + self.count[b]]

    def mask(self, rows: np.ndarray, n_items: int) -> np.ndarray:
        """(b, n_items) bool, True at ``[r, i]`` when case ``rows[r]`` must not get item ``i``. Memory: b x N
        bytes, and b x N int64 at most while building it (items are distinct within a slice).

        Raises:
            IndexError: an excluded item_idx is >= ``n_items``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cnt = self.count[rows]                                                   # (b,)
        first = np.repeat(self.start[rows] - (np.cumsum(cnt) - cnt), cnt)       # (sum cnt,) slice start - offset
        flat = first + np.arange(int(cnt.sum()))                                 # (sum cnt,) positions in items
        out = np.zeros((rows.size, n_items), dtype=bool)
        out[np.repeat(np.arange(rows.size), cnt), self.items[flat]] = True
        return out


def seen_before(user_idx: np.ndarray, item_idx: np.ndarray, case_pos: np.ndarray) -> SeenItems:
    """What each case must not recommend: the items of its user's events at earlier positions of the log.

    Args:
        user_idx, item_idx: (E,) int64 every logged event, in replay order (``(event_time, event_id)``
            ascending), so that an earlier position is exactly a smaller ``(event_time, event_id)``.
        case_pos: (B,) int64 position of each case's own event in that order.

    Returns:
        ``SeenItems`` over the B cases.

    >>> s = seen_before(np.array([1, 2, 1, 1, 1]), np.array([7, 8, 9, 7, 6]), case_pos=np.array([4, 1, 0]))
    >>> [s.of(b).tolist() for b in range(3)]   # user 1 at position 4 has rated 7, 9, 7 again; the others nothing yet
    [[7, 9], [], []]
    """
    n = max(int(user_idx.size), 1)
    by_user = np.argsort(user_idx, kind="stable")       # (E,) grouped by user; stable keeps replay order inside
    u, i = user_idx[by_user], item_idx[by_user]
    # a user's repeated item is kept once, at its first event, so a slice never exceeds the catalogue
    _, first = np.unique(u * (int(item_idx.max(initial=0)) + 1) + i, return_index=True)
    keep = np.sort(first)                                # (P,) first events, still grouped and in replay order
    key = u[keep] * n + by_user[keep]                    # (P,) ascending (user, position)
    user = user_idx[case_pos]                            # (B,)
    start = np.searchsorted(key, user * n, side="left")
    end = np.searchsorted(key, user * n + case_pos, side="left")   # first events at positions < case_pos
    return SeenItems(items=i[keep].astype(np.int64), start=start.astype(np.int64),
                     count=(end - start).astype(np.int64))


@dataclass(frozen=True)
class Cases:
    """Positive test events in replay order, ``(event_time, event_id)`` ascending.

    Args:
        event_id: (B,) str; event_time: (B,) int64 microseconds; user: (B,) int64 user_idx;
            target: (B,) int64 item_idx of the event.
        hist: (B, L) int64 history item_idx, most recent last, left-padded with -1 (the query's input only).
        hist_len: (B,) int64 number of real entries of each ``hist`` row.
        seen: what each case must not recommend (module docstring).
    """

    event_id: np.ndarray
    event_time: np.ndarray
    user: np.ndarray
    target: np.ndarray
    hist: np.ndarray
    hist_len: np.ndarray
    seen: SeenItems

    def __len__(self) -> int:
        return int(self.target.shape[0])


def micros(col: pa.ChunkedArray) -> np.ndarray:
    """(E,) int64 microseconds since the epoch (UTC) of a timestamp column of any unit and time zone.

    >>> from datetime import datetime, timezone
    >>> micros(pa.chunked_array([pa.array([datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone.utc)],
    ...                                    pa.timestamp("ms", tz="UTC"))])).tolist()
    [1000000]
    """
    tz = getattr(col.type, "tz", None)
    return col.cast(pa.timestamp("us", tz=tz), safe=False).cast(pa.int64()).to_numpy()


def padded_lists(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) int64 left-padded with -1 (last element in the last column) and (B,) lengths; null = empty.

    Args:
        col: (B,) list<int> column, e.g. ``hist_item_idx`` (most recent last).

    >>> hist, n = padded_lists(pa.chunked_array([[[1, 2], None, [3]]]))
    >>> hist.tolist(), n.tolist()
    ([[1, 2], [-1, -1], [-1, 3]], [2, 0, 1])
    """
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths.max()) if lengths.size else 0
    out = np.full((lengths.size, max(width, 1)), -1, dtype=np.int64)
    row = np.repeat(np.arange(lengths.size), lengths)                     # (sum lengths,)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(values.size) - np.repeat(starts, lengths)            # position within its list
    out[row, out.shape[1] - np.repeat(lengths, lengths) + pos] = values
    return out, lengths


def read_samples(cfg: PlatformConfig) -> dict[str, pa.Table]:
    """The ctr_samples Parquet export, one table per split present (columns ``COLUMNS``).

    Raises:
        TableNotFoundError: the export or its test split is missing.
    """
    root = Path(parquet_export(CTR_SAMPLES, cfg.lake_dir))
    out = {}
    for split in SPLITS:
        d = root / f"split={split}"
        if d.exists() and any(d.rglob("*.parquet")):
            out[split] = pq.read_table(d, columns=list(COLUMNS), partitioning=None)
    if "test" not in out:
        raise TableNotFoundError(f"{CTR_SAMPLES.name} (split=test)", str(root / "split=test"),
                                 "the features stage (pipelines/features_batch.py)")
    return out


def replay_order(t: pa.Table) -> pa.Table:
    """``t``'s rows in replay order, ``(event_time, event_id)`` ascending."""
    return t.take(pc.sort_indices(t, sort_keys=[("event_time", "ascending"), ("event_id", "ascending")]))


def build_log(tables: list[pa.Table]) -> Log:
    """Every logged event (any rating, any split) in replay order: what popularity counts and what a case may
    have seen."""
    t = replay_order(pa.concat_tables([x.select(["event_id", "event_time", "user_idx", "item_idx"])
                                       for x in tables]))
    col = lambda c: t.column(c).to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
    return Log(event_time=micros(t.column("event_time")), user_idx=col("user_idx"), item_idx=col("item_idx"),
               event_id=np.asarray(t.column("event_id").to_pylist(), dtype=object))


def build_cases(test: pa.Table, log_: Log) -> Cases:
    """Positive events of the test table in replay order, each with what it must not recommend.

    Args:
        test: the test split (columns ``COLUMNS``).
        log_: ``build_log`` of every split, the test split included.

    Raises:
        ValueError: a case's ``event_id`` is not in ``log_`` (it was built without the test split).
    """
    t = replay_order(test.filter(pc.equal(test.column("label"), 1)))
    ids = t.column("event_id").cast(pa.string())
    pos = pc.index_in(ids, value_set=pa.array(log_.event_id.tolist(), pa.string()))   # (B,) position in the log
    if pos.null_count:
        missing = ids.filter(pc.is_null(pos))[0].as_py()
        raise ValueError(f"case event_id {missing!r} is not in the log; build the log from every split, the test "
                         f"split included (build_log(list(read_samples(cfg).values())))")
    pos = pos.to_numpy(zero_copy_only=False).astype(np.int64)
    hist, hist_len = padded_lists(t.column("hist_item_idx"))
    return Cases(event_id=np.asarray(ids.to_pylist(), dtype=object), event_time=micros(t.column("event_time")),
                 user=t.column("user_idx").to_numpy(zero_copy_only=False).astype(np.int64),
                 target=t.column("item_idx").to_numpy(zero_copy_only=False).astype(np.int64),
                 hist=hist, hist_len=hist_len, seen=seen_before(log_.user_idx, log_.item_idx, pos))


def first_k_allowed(cands: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` candidates of each row that are > 0 and not seen, in candidate order.

    Args:
        cands: (B, C) item_idx, best first; values <= 0 (item 0, ``-1`` = none) are never kept.
        seen: (B, N) bool, True where the row's case must not get the item (``SeenItems.mask``); a candidate
            >= N counts as not seen.
        k: list length.

    Returns:
        (B, k) int64, ``-1`` where fewer than k candidates are allowed.

    Raises:
        TypeError: ``seen`` is not boolean (e.g. a (B, L) list of item_idx instead of a mask).

    >>> seen = np.zeros((1, 6), dtype=bool); seen[0, 3] = True
    >>> first_k_allowed(np.array([[5, 0, 3, 4, 2]]), seen, k=3).tolist()
    [[5, 4, 2]]
    """
    if seen.dtype != np.bool_:
        raise TypeError(f"seen must be a (B, N) bool mask (SeenItems.mask), got dtype {seen.dtype}")
    inside = (cands > 0) & (cands < seen.shape[1])
    # one lookup per candidate (B x C), not a comparison with every excluded item (B x C x S)
    excluded = inside & np.take_along_axis(seen, np.where(inside, cands, 0), axis=1)      # (B, C)
    ok = (cands > 0) & ~excluded
    order = np.argsort(~ok, axis=1, kind="stable")[:, :k]                       # allowed first, order kept
    out = np.take_along_axis(cands, order, axis=1).astype(np.int64)
    out[~np.take_along_axis(ok, order, axis=1)] = -1
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out
