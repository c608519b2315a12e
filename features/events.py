"""The interaction event on the Kafka topic, and its validation rules.

Wire format: one JSON object per message, UTF-8, keyed by ``user_id``::

    {"event_id": "ml100k-000000", "user_id": 196, "item_id": 242, "rating": 3.0,
     "event_time": "1997-12-04T15:55:49Z", "event_type": "rating"}

``event_type`` is optional (absent or null: ``"rating"``) and one of ``EVENT_TYPES``; :meth:`Event.to_json` omits
it for a rating, so MovieLens events keep their original bytes. On a closed vocabulary (``known_users`` /
``known_items`` given) an id outside it is ``unknown_id``. A duplicate ``event_id`` is not an error: bronze keeps
the first and the ingest stage counts the rest (``duplicates``).

``event_time`` is ISO-8601 in UTC; ``user_id`` and ``item_id`` are 32-bit ints. A message with no value (a
tombstone) is treated as empty bytes, so it is rejected as ``not_json``. The ``detail`` of ``not_json`` and
``bad_encoding`` is informative only: Spark cannot reproduce Python's parser messages. The Spark stream applies the same rules as :func:`parse_event` (its column
expressions mirror them; a test checks both agree), and rejects a message with one of ``REASONS``.

>>> parse_event(b'{"event_id":"e1","user_id":1,"item_id":2,"rating":4,"event_time":"1998-01-01T00:00:00Z"}')
Event(event_id='e1', user_id=1, item_id=2, rating=4.0, event_time='1998-01-01T00:00:00Z', event_type='rating')
>>> parse_event(b'{"event_id":"e1","user_id":1}')
Traceback (most recent call last):
...
features.errors.EventError: missing_field: item_id
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from collections.abc import Container
from datetime import datetime, timezone

from features.errors import EventError

FIELDS = ("event_id", "user_id", "item_id", "rating", "event_time")
#: Optional fields and the value an absent (or null) one takes.
OPTIONAL_FIELDS = {"event_type": "rating"}
#: Known interaction types. Positive for CTR features: a click, or a rating >= POSITIVE_RATING (features.views).
EVENT_TYPES = ("rating", "view", "click")
#: Spark DDL of the JSON payload, parsed with an explicit schema (no inference).
EVENT_SCHEMA_DDL = "event_id string, user_id int, item_id int, rating double, event_time string, event_type string"
MIN_RATING, MAX_RATING = 0.5, 5.0
#: Ids are stored as 32-bit ints in bronze; a larger one is a wrong_type, not a valid event.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Events earlier than this are rejected as implausible (MovieLens-100K starts in 1997).
MIN_EVENT_TIME = datetime(1995, 1, 1, tzinfo=timezone.utc)
#: Bytes; a larger message is rejected before it is parsed.
MAX_MESSAGE_BYTES = 4096

REASONS = {
    "not_json": "the message is not a JSON object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field does not have its declared type",
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

    def to_json(self) -> bytes:
        obj = asdict(self)
        if obj["event_type"] == OPTIONAL_FIELDS["event_type"]:
            del obj["event_type"]  # the default is left out: the wire format of rating events is unchanged
        return json.dumps(obj, separators=(",", ":")).encode()


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
    if known_users is not None and obj["user_id"] not in known_users:
        raise EventError("unknown_id", f"user_id {obj['user_id']}")
    if known_items is not None and obj["item_id"] not in known_items:
        raise EventError("unknown_id", f"item_id {obj['item_id']}")
    return Event(obj["event_id"], obj["user_id"], obj["item_id"], float(obj["rating"]), obj["event_time"],
                 event_type)
