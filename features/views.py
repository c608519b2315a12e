"""Declared feature views, in the manner of Feast: an ``Entity`` (the join key), a ``DeltaSource`` (a table of
``features.tables`` and its ``timestamp_field``) and a ``FeatureView`` (entities, source, ``ttl`` and a typed
schema). The point-in-time join (``pipelines.pit_join``) and both feature paths (the speed layer in
``pipelines.ingest``, the daily batch ``pipelines.daily_features``) read these declarations.

Point-in-time semantics: a sample at time ``t`` gets, per view, the row of its entity with the greatest
``timestamp_field`` strictly before ``t`` and not older than ``ttl`` (``t - ttl <= ts < t``); none: nulls.

Feature definitions (the same Spark code computes them in both paths):

- ``item_window_stats``: per item and day D, events and positives over event dates [D - W + 1, D] for W = 1 and 7
  days; ``ctr = positives / events`` (null when no events). Positive: by the data source's label rule
  (``features.source.LabelRule``, the same rule as the CTR label): a ``click`` event always, a ``view`` never, a
  ``rating`` event as the rule says. Known from D + 1 day, 00:00 UTC.
- ``user_recent_items``: per user and day D with an event, the ``item_id`` of the user's last ``RECENT_ITEMS``
  events (every type) up to the end of D, ordered by ``(event_time, event_id)``, oldest first.

>>> ITEM_STATS.ttl.days, ITEM_STATS.source.timestamp_field, ITEM_STATS.join_keys
(7, 'feature_ts', ('item_id',))
>>> [f.name for f in USER_HISTORY.schema]
['recent_items', 'recent_len']
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from features.definitions import ITEM, USER, Entity
from features.tables import ITEM_WINDOW_STATS, USER_RECENT_ITEMS, TableSpec

#: Days of event time of each sliding window of item_window_stats.
WINDOWS_DAYS = (1, 7)
#: Items kept in user_recent_items.
RECENT_ITEMS = 20


@dataclass(frozen=True)
class Field:
    """A typed feature column (Spark SQL type name)."""

    name: str
    dtype: str


@dataclass(frozen=True)
class DeltaSource:
    """A Delta table of the lake and the column that says from when a row is known.

    Raises:
        ValueError: ``timestamp_field`` is not a column of the table.
    """

    table: TableSpec
    timestamp_field: str

    def __post_init__(self) -> None:
        if self.timestamp_field not in self.table.columns:
            raise ValueError(f"source {self.table.name!r}: timestamp_field {self.timestamp_field!r} is not a column")


@dataclass(frozen=True)
class FeatureView:
    """Features of one entity from one source, valid for ``ttl`` after their timestamp.

    Raises:
        ValueError: a join key or schema field that is not a column of the source, a non-positive ttl.
    """

    name: str
    entities: tuple[Entity, ...]
    source: DeltaSource
    ttl: timedelta
    schema: tuple[Field, ...]

    def __post_init__(self) -> None:
        cols = self.source.table.columns
        bad = [c for c in (*self.join_keys, *(f.name for f in self.schema)) if c not in cols]
        if bad:
            raise ValueError(f"feature view {self.name!r}: {bad} are not columns of {self.source.table.name!r}")
        if self.ttl <= timedelta(0):
            raise ValueError(f"feature view {self.name!r}: ttl must be positive, not {self.ttl}")

    @property
    def join_keys(self) -> tuple[str, ...]:
        return tuple(e.join_key for e in self.entities)


ITEM_STATS = FeatureView(
    "item_window_stats", (ITEM,), DeltaSource(ITEM_WINDOW_STATS, "feature_ts"), ttl=timedelta(days=7),
    schema=(Field("events_1d", "bigint"), Field("positives_1d", "bigint"), Field("ctr_1d", "double"),
            Field("events_7d", "bigint"), Field("positives_7d", "bigint"), Field("ctr_7d", "double")),
)
USER_HISTORY = FeatureView(
    "user_recent_items", (USER,), DeltaSource(USER_RECENT_ITEMS, "feature_ts"), ttl=timedelta(days=30),
    schema=(Field("recent_items", "array<int>"), Field("recent_len", "int")),
)
FEATURE_VIEWS: dict[str, FeatureView] = {v.name: v for v in (ITEM_STATS, USER_HISTORY)}
