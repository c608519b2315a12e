"""features.events.parse_event: one valid event and every reason code, pure Python (no services).

``MALFORMED`` is shared with tests/test_ingest.py, which checks that the Spark stream gives the same reasons.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from features.errors import EventError
from features.events import MAX_MESSAGE_BYTES, REASONS, Event, format_time, parse_event

NOW = datetime(2024, 1, 1, tzinfo=timezone.utc)
GOOD = {"event_id": "e1", "user_id": 196, "item_id": 242, "rating": 3.0, "event_time": "1997-12-04T15:55:49Z"}


def event_json(**changes) -> bytes:
    """GOOD with fields replaced (a value of ``...`` removes the field), as compact JSON bytes."""
    import json

    obj = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    return json.dumps(obj, separators=(",", ":")).encode()


#: (message, reason, detail or None when the detail is Python's own error text). One or more per reason, in
#: parse_event's order of checks; a message breaking two rules must report the earlier one.
MALFORMED: list[tuple[bytes, str, str | None]] = [
    (b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "oversized", f"{MAX_MESSAGE_BYTES + 2} bytes"),
    (b"\xff" * (MAX_MESSAGE_BYTES + 1), "oversized", f"{MAX_MESSAGE_BYTES + 1} bytes"),  # before bad_encoding
    (b'{"event_id":"\xff"}', "bad_encoding", None),
    (b'{"event_id":"\xed\xa0\x80"}', "bad_encoding", None),  # an encoded surrogate is not UTF-8
    (b'{"event_id":"\xc0\x80"}', "bad_encoding", None),  # overlong NUL (Java's modified UTF-8)
    (b"not json", "not_json", None),
    (b"", "not_json", None),
    (b'{"event_id":"e1",', "not_json", None),
    (b"[1, 2]", "not_json", None),
    (b"null", "not_json", None),
    (b'"a string"', "not_json", None),
    (b"{'event_id':'e1'}", "not_json", None),  # single quotes: Spark's parser allows them unless told not to
    (event_json() + b" trailing", "not_json", None),
    (event_json(user_id=...), "missing_field", "user_id"),
    (event_json(event_id=None), "missing_field", "event_id"),
    (event_json(rating=None, item_id=...), "missing_field", "item_id"),  # first missing in FIELDS order
    (b"{}", "missing_field", "event_id"),
    (event_json(event_id=7), "wrong_type", "event_id"),
    (event_json(user_id="196"), "wrong_type", "user_id"),
    (event_json(user_id=196.0), "wrong_type", "user_id"),
    (event_json(item_id=True), "wrong_type", "item_id"),
    (event_json(rating="3.0"), "wrong_type", "rating"),
    (event_json(rating=False), "wrong_type", "rating"),
    (event_json(event_time=881250949), "wrong_type", "event_time"),
    (event_json(rating=7), "rating_out_of_range", "7"),
    (event_json(rating=0.0), "rating_out_of_range", "0.0"),
    (event_json(rating=5.5, event_time=1), "rating_out_of_range", "5.5"),  # range is checked before event_time
    (event_json(event_time="1997-12-04 15:55:49"), "bad_timestamp", "1997-12-04 15:55:49"),
    (event_json(event_time="1997-12-04T15:55:49+00:00"), "bad_timestamp", "1997-12-04T15:55:49+00:00"),
    (event_json(event_time="1997-02-30T00:00:00Z"), "bad_timestamp", "1997-02-30T00:00:00Z"),
    (event_json(event_time="1997-12-04T15:55:60Z"), "bad_timestamp", "1997-12-04T15:55:60Z"),
    (event_json(event_time="1994-12-31T23:59:59Z"), "bad_timestamp", "1994-12-31T23:59:59Z"),
    (event_json(event_time="2999-01-01T00:00:00Z"), "bad_timestamp", "2999-01-01T00:00:00Z"),
    (event_json(event_time="-001-01-01T00:00:00Z"), "bad_timestamp", "-001-01-01T00:00:00Z"),  # negative year
    (event_json(event_type="purchase"), "unknown_event_type", "purchase"),
    (event_json(event_type="Rating"), "unknown_event_type", "Rating"),
    (event_json(event_type=""), "unknown_event_type", ""),
    (event_json(event_type=1), "wrong_type", "event_type"),
    (event_json(event_type=["view"]), "wrong_type", "event_type"),
    (event_json(event_type="x", event_time="bad"), "bad_timestamp", "bad"),  # event_time is checked first
    # an impression's optional fields (features.events.IMPRESSION_FIELDS)
    (event_json(click=2), "wrong_type", "click"),
    (event_json(click=-1), "wrong_type", "click"),
    (event_json(click=True), "wrong_type", "click"),
    (event_json(click=1.0), "wrong_type", "click"),
    (event_json(click="1"), "wrong_type", "click"),
    (event_json(is_random=1), "wrong_type", "is_random"),
    (event_json(is_random="true"), "wrong_type", "is_random"),
    (event_json(session_id=2**63), "wrong_type", "session_id"),
    (event_json(session_id=1.5), "wrong_type", "session_id"),
    (event_json(candidates=5), "wrong_type", "candidates"),
    (event_json(candidates=[1, None]), "wrong_type", "candidates"),
    (event_json(candidates=[None]), "wrong_type", "candidates"),
    (event_json(candidates=[1, 2.5]), "wrong_type", "candidates"),
    (event_json(candidates=[1, 2**31]), "wrong_type", "candidates"),
    (event_json(candidates=[True]), "wrong_type", "candidates"),
    (event_json(candidates=[[1]]), "wrong_type", "candidates"),
    (event_json(candidates=["1"]), "wrong_type", "candidates"),
    (event_json(c01="abc"), "wrong_type", "c01"),
    (event_json(c26=2**31), "wrong_type", "c26"),
    (event_json(c17=False), "wrong_type", "c17"),
    (event_json(click=7, c03="x"), "wrong_type", "click"),  # fields are checked in IMPRESSION_FIELDS order
    (event_json(click=7, event_type="buy"), "unknown_event_type", "buy"),  # after event_type
]

#: A closed vocabulary and the messages it rejects (``unknown_id``); ``MALFORMED`` runs with an open one.
KNOWN_USERS, KNOWN_ITEMS = {196, 1}, {242, 2}
CLOSED_REJECTED: list[tuple[bytes, str, str]] = [
    (event_json(user_id=7), "unknown_id", "user_id 7"),
    (event_json(item_id=9), "unknown_id", "item_id 9"),
    (event_json(user_id=7, item_id=9), "unknown_id", "user_id 7"),  # users first
    (event_json(user_id=7, event_type="buy"), "unknown_event_type", "buy"),  # the type is checked before ids
]

#: Unusual but valid messages (strptime's leniency, JSON whitespace, an integer rating) and the Event they give.
VALID: list[tuple[bytes, Event]] = [
    (event_json(), Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z")),
    (event_json(rating=4), Event("e1", 196, 242, 4.0, "1997-12-04T15:55:49Z")),
    (event_json(rating=0.5), Event("e1", 196, 242, 0.5, "1997-12-04T15:55:49Z")),
    (event_json(event_time="1998-1-2T3:4:5Z"), Event("e1", 196, 242, 3.0, "1998-1-2T3:4:5Z")),
    (event_json(event_time="1998-01-02t03:04:05z"), Event("e1", 196, 242, 3.0, "1998-01-02t03:04:05z")),
    (b' \n{"event_id":"e2","user_id":1,"item_id":2,"rating":5,"event_time":"1998-01-01T00:00:00Z","x":[1]}\t',
     Event("e2", 1, 2, 5.0, "1998-01-01T00:00:00Z")),
    (event_json(event_type="click"), Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z", "click")),
    (event_json(event_type="view"), Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z", "view")),
    (event_json(event_type=None), Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z", "rating")),
    (event_json(click=1, is_random=False, session_id=2**40, candidates=[], c01=0, c26=-5, c02=None),
     Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z", click=1, is_random=False, session_id=2**40, candidates=(),
           cats={"c01": 0, "c26": -5})),
    (event_json(click=None, is_random=True, candidates=[3, 1, 2], c17=2**31 - 1),
     Event("e1", 196, 242, 3.0, "1997-12-04T15:55:49Z", is_random=True, candidates=(3, 1, 2),
           cats={"c17": 2**31 - 1})),
]


def test_every_reason_is_covered():
    assert {reason for _, reason, _ in MALFORMED + CLOSED_REJECTED} == set(REASONS)


@pytest.mark.parametrize("raw,reason,detail", CLOSED_REJECTED)
def test_closed_vocabulary_rejects_unknown_ids(raw, reason, detail):
    with pytest.raises(EventError) as info:
        parse_event(raw, now=NOW, known_users=KNOWN_USERS, known_items=KNOWN_ITEMS)
    assert (info.value.reason, info.value.detail) == (reason, detail)
    assert parse_event(event_json(), now=NOW, known_users=KNOWN_USERS, known_items=KNOWN_ITEMS).user_id == 196


@pytest.mark.parametrize("raw,reason,detail", MALFORMED, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(MALFORMED)])
def test_malformed_is_rejected_with_its_reason(raw, reason, detail):
    with pytest.raises(EventError) as info:
        parse_event(raw, now=NOW)
    assert info.value.reason == reason
    if detail is not None:
        assert info.value.detail == detail


@pytest.mark.parametrize("raw,expected", VALID)
def test_valid_event_is_parsed(raw, expected):
    assert parse_event(raw, now=NOW) == expected


def test_wire_format_round_trips():
    event = Event("ml100k-000000", 196, 242, 3.0, format_time(881250949))
    assert event.to_json() == (b'{"event_id":"ml100k-000000","user_id":196,"item_id":242,"rating":3.0,'
                               b'"event_time":"1997-12-04T15:55:49Z"}')
    assert parse_event(event.to_json(), now=NOW) == event
    click = Event("c1", 1, 2, 1.0, "1998-01-01T00:00:00Z", "click")
    assert click.to_json().endswith(b',"event_type":"click"}')
    assert parse_event(click.to_json(), now=NOW) == click
    impression = Event("g1", 1, 2, 5.0, "1998-01-01T00:00:00Z", click=1, is_random=True, session_id=9,
                       candidates=(2, 7), cats={"c26": 1, "c01": 3})
    assert impression.to_json() == (b'{"event_id":"g1","user_id":1,"item_id":2,"rating":5.0,'
                                    b'"event_time":"1998-01-01T00:00:00Z","click":1,"is_random":true,'
                                    b'"session_id":9,"candidates":[2,7],"c01":3,"c26":1}')
    assert parse_event(impression.to_json(), now=NOW) == impression


def test_bronze_has_a_column_of_each_impression_field_with_the_parsed_type():
    from features.events import EVENT_SCHEMA_DDL, IMPRESSION_FIELDS
    from features.tables import BRONZE_INTERACTIONS, _split_top_level

    bronze = dict(part.split(maxsplit=1) for part in map(str.strip, _split_top_level(BRONZE_INTERACTIONS.schema)))
    payload = dict(part.split(maxsplit=1) for part in map(str.strip, _split_top_level(EVENT_SCHEMA_DDL)))
    assert all(bronze[name] == payload[name] for name in IMPRESSION_FIELDS)
    assert len(IMPRESSION_FIELDS) == 4 + 26


def test_now_bounds_event_time():
    raw = event_json(event_time="2023-06-01T00:00:00Z")
    assert parse_event(raw, now=NOW).event_time == "2023-06-01T00:00:00Z"
    with pytest.raises(EventError, match="bad_timestamp"):
        parse_event(raw, now=datetime(2023, 5, 31, tzinfo=timezone.utc))
