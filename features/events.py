"""The interaction event on the Kafka topic, and its validation rules.

Wire format: one JSON object per message, UTF-8, keyed by ``user_id``::

    {"event_id": "ml100k-000000", "user_id": 196, "item_id": 242, "rating": 3.0,
     "event_time": "1997-12-04T15:55:49Z", "event_type": "rating"}

``event_type`` is optional (absent or null: ``"rating"``) and one of ``EVENT_TYPES``; :meth:`Event.to_json` omits
it for a rating, so MovieLens events keep their original bytes. On a closed vocabulary (``known_users`` /
``known_items`` given) an id outside it is ``unknown_id``. A duplicate ``event_id`` is not an error: bronze keeps
the first and the ingest stage counts the rest (``duplicates``).

An impression (``pipelines.generator``) carries optional fields besides (``IMPRESSION_FIELDS``; absent or null:
None, and left out by :meth:`Event.to_json`): ``click`` (0 or 1, the CTR label), ``is_random`` (JSON boolean: shown
uniformly at random among ``candidates``, the logged slice of Li et al. 2011's replay estimator), ``session_id``
(64-bit int), ``candidates`` (JSON array of 32-bit ints: the items offered) and the 26 categorical side fields
``c01``..``c26`` (32-bit ints, value indices in the style of Criteo's display-ads fields). Bronze keeps each in a
column of the same name (``features.tables.BRONZE_INTERACTIONS``), null for events that do not carry it.

``event_time`` is ISO-8601 in UTC; ``user_id`` and ``item_id`` are 32-bit ints. A message with no value (a
tombstone) is treated as empty bytes, so it is rejected as ``not_json``. The ``detail`` of ``not_json`` and
``bad_encoding`` is informative only: Spark cannot reproduce Python's parser messages. The Spark stream applies
the same rules as :func:`parse_event` (its column expressions mirror them; a test checks both agree), and rejects
a message with one of ``REASONS``.

>>> parse_event(b'{"event_id":"e1","user_id":1,"item_id":2,"rating":4,"event_time":"1998-01-01T00:00:00Z"}')
Event(event_id='e1', user_id=1, item_id=2, rating=4.0, event_time='1998-01-01T00:00:00Z', event_type='rating', \
click=None, is_random=None, session_id=None, candidates=None, cats={})
>>> e = parse_event(b'{"event_id":"g1","user_id":1,"item_id":2,"rating":1.0,"event_time":"2024-01-01T00:00:00Z",'
...                 b'"click":0,"is_random":true,"candidates":[2,5],"c17":42}')
>>> e.click, e.is_random, e.candidates, e.cats
(0, True, (2, 5), {'c17': 42})
>>> parse_event(e.to_json()) == e
True
>>> parse_event(b'{"event_id":"e1","user_id":1}')
Traceback (most recent call last):
...
features.errors.EventError: missing_field: item_id
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Container
from datetime import datetime, timezone

from features.errors import EventError

FIELDS = ("event_id", "user_id", "item_id", "rating", "event_time")
#: The 26 categorical side fields of an impression, Criteo style (pipelines.generator.CAT_COLUMNS).
CAT_FIELDS = tuple(f"c{i:02d}" for i in range(1, 27))
#: An impression's optional fields and their JSON kind, in the order they are checked: ``flag`` an integer 0 or 1,
#: ``bool`` a JSON boolean, ``int64``/``int32`` an integer of that range, ``int32_array`` an array of them.
IMPRESSION_FIELDS = {"click": "flag", "is_random": "bool", "session_id": "int64", "candidates": "int32_array",
                     **{c: "int32" for c in CAT_FIELDS}}
#: Optional fields and the value an absent (or null) one takes.
OPTIONAL_FIELDS = {"event_type": "rating", **{name: None for name in IMPRESSION_FIELDS}}
#: Known interaction types. Positive for CTR features: a click, or a rating >= POSITIVE_RATING (features.views).
EVENT_TYPES = ("rating", "view", "click")
_DDL_TYPE = {"flag": "int", "bool": "boolean", "int64": "bigint", "int32_array": "array<int>", "int32": "int"}
#: Spark DDL of an impression's optional fields, as parsed and as bronze stores them.
IMPRESSION_DDL = ", ".join(f"{name} {_DDL_TYPE[kind]}" for name, kind in IMPRESSION_FIELDS.items())
#: Spark DDL of the JSON payload, parsed with an explicit schema (no inference).
EVENT_SCHEMA_DDL = ("event_id string, user_id int, item_id int, rating double, event_time string, event_type string, "
                    + IMPRESSION_DDL)
MIN_RATING, MAX_RATING = 0.5, 5.0
#: Ids are stored as 32-bit ints in bronze; a larger one is a wrong_type, not a valid event.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Events earlier than this are rejected as implausible (MovieLens-100K starts in 1997).
MIN_EVENT_TIME = datetime(1995, 1, 1, tzinfo=timezone.utc)
#: Bytes; a larger message is rejected before it is parsed.
MAX_MESSAGE_BYTES = 4096

REASONS = {
    "not_json": "the message is not a JSON object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field does not have its declared type (or click is not 0 or 1)",
    "bad_timestamp": "event_time is not ISO-8601, before 1995 or in the future",
    "rating_out_of_range": f"rating is outside [{MIN_RATING}, {MAX_RATING}]",
    "oversized": f"the message is larger than {MAX_MESSAGE_BYTES} bytes",
    "bad_encoding": "the message is not valid UTF-8",
    "unknown_event_type": f"event_type is not one of {EVENT_TYPES}",
    "unknown_id": "user_id or item_id is not in the closed vocabulary the stream was started with",
}


@dataclass(frozen=True)
class Event:
    event_id: str
    user_id: int
    item_id: int
    rating: float
    event_time: str
    event_type: str = "rating"
    click: int | None = None
    is_random: bool | None = None
    session_id: int | None = None
    candidates: tuple[int, ...] | None = None
    #: The categorical side fields present, ``{"c01": value, ...}`` (``CAT_FIELDS`` order).
    cats: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The wire format; optional fields at their default are left out (rating events keep their bytes)."""
        obj = {"event_id": self.event_id, "user_id": self.user_id, "item_id": self.item_id, "rating": self.rating,
               "event_time": self.event_time}
        if self.event_type != OPTIONAL_FIELDS["event_type"]:
            obj["event_type"] = self.event_type
        for name in ("click", "is_random", "session_id", "candidates"):
            if getattr(self, name) is not None:
                obj[name] = list(self.candidates) if name == "candidates" else getattr(self, name)
        obj.update((c, self.cats[c]) for c in CAT_FIELDS if self.cats.get(c) is not None)
        return json.dumps(obj, separators=(",", ":")).encode()


def _is_int(value, lo: int, hi: int) -> bool:
    """A JSON integer (not a boolean, not a float) within [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _has_kind(value, kind: str) -> bool:
    """Whether a present (non-null) optional field's value has its ``IMPRESSION_FIELDS`` kind."""
    if kind == "flag":
        return _is_int(value, 0, 1)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int64":
        return _is_int(value, INT64_MIN, INT64_MAX)
    if kind == "int32":
        return _is_int(value, INT32_MIN, INT32_MAX)
    return isinstance(value, list) and all(_is_int(v, INT32_MIN, INT32_MAX) for v in value)  # int32_array


def format_time(ts_seconds: int) -> str:
    """ISO-8601 UTC of a Unix time in seconds.

    >>> format_time(881250949)
    '1997-12-04T15:55:49Z'
    """
    return datetime.fromtimestamp(ts_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_event(raw: bytes, now: datetime | None = None, known_users: Container[int] | None = None,
                known_items: Container[int] | None = None) -> Event:
    """Validate one Kafka message value.

    Args:
        raw: the message value (bytes).
        now: upper bound of ``event_time`` (default: the wall clock, UTC).
        known_users, known_items: a closed vocabulary; None (default) accepts any id.

    Raises:
        EventError: with ``reason`` one of ``REASONS``.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise EventError("oversized", f"{len(raw)} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EventError("bad_encoding", str(e)) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise EventError("not_json", str(e)) from None
    if not isinstance(obj, dict):
        raise EventError("not_json", f"top level is {type(obj).__name__}")
    for name in FIELDS:
        if obj.get(name) is None:
            raise EventError("missing_field", name)
    if not isinstance(obj["event_id"], str):
        raise EventError("wrong_type", "event_id")
    for name in ("user_id", "item_id"):
        if isinstance(obj[name], bool) or not isinstance(obj[name], int) or not INT32_MIN <= obj[name] <= INT32_MAX:
            raise EventError("wrong_type", name)
    if isinstance(obj["rating"], bool) or not isinstance(obj["rating"], (int, float)):
        raise EventError("wrong_type", "rating")
    if not MIN_RATING <= obj["rating"] <= MAX_RATING:
        raise EventError("rating_out_of_range", str(obj["rating"]))
    if not isinstance(obj["event_time"], str):
        raise EventError("wrong_type", "event_time")
    try:
        ts = datetime.strptime(obj["event_time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise EventError("bad_timestamp", obj["event_time"]) from None
    if ts < MIN_EVENT_TIME or ts > (now or datetime.now(timezone.utc)):
        raise EventError("bad_timestamp", obj["event_time"])
    event_type = obj.get("event_type")
    if event_type is None:
        event_type = OPTIONAL_FIELDS["event_type"]
    elif not isinstance(event_type, str):
        raise EventError("wrong_type", "event_type")
    elif event_type not in EVENT_TYPES:
        raise EventError("unknown_event_type", event_type)
    for name, kind in IMPRESSION_FIELDS.items():
        if obj.get(name) is not None and not _has_kind(obj[name], kind):
            raise EventError("wrong_type", name)
    if known_users is not None and obj["user_id"] not in known_users:
        raise EventError("unknown_id", f"user_id {obj['user_id']}")
    if known_items is not None and obj["item_id"] not in known_items:
        raise EventError("unknown_id", f"item_id {obj['item_id']}")
    candidates = obj.get("candidates")
    return Event(obj["event_id"], obj["user_id"], obj["item_id"], float(obj["rating"]), obj["event_time"],
                 event_type, obj.get("click"), obj.get("is_random"), obj.get("session_id"),
                 None if candidates is None else tuple(candidates),
                 {c: obj[c] for c in CAT_FIELDS if obj.get(c) is not None})
