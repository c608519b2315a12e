"""One definition of a positive (``features.source.LabelRule``) for the CTR label, the feature views and the
point-in-time samples; pure Python (the Spark paths are checked in test_pit_join.py and test_parity.py)."""

from __future__ import annotations

import numpy as np
import pytest

from features.config import ROOT
from features.source import LabelRule, load_source

# (event_type, rating, click): every event type, ratings either side of 3 and 4 stars, with and without a click
EVENTS = [(t, r, c) for t in ("rating", "view", "click") for r in (1.0, 2.5, 3.0, 3.5, 4.0, 5.0) for c in (0.0, 1.0)]


def _hard_coded(event_type: str, rating: float) -> bool:
    """The rule the features used before they read the source: a click, or a rating of at least 4 stars."""
    return event_type == "click" or (event_type == "rating" and rating >= 4.0)


def test_threshold_three_counts_the_ratings_the_rule_says():
    rule = LabelRule(rule="rating_at_least", threshold=3)
    got = [rule.positive(t, r, c) for t, r, c in EVENTS]
    want = [t == "click" or (t == "rating" and r >= 3.0) for t, r, _ in EVENTS]
    assert got == want
    assert got != [_hard_coded(t, r) for t, r, _ in EVENTS]  # 3 and 3.5 stars now count
    rating, click, types = (np.array(c) for c in zip(*[(r, c, t) for t, r, c in EVENTS]))
    assert rule.of(rating, click, types).tolist() == [int(w) for w in want]  # the CTR label agrees


@pytest.mark.parametrize("rule", [LabelRule(rule="click"), LabelRule(rule="any_event")])
def test_other_rules_keep_the_event_type_semantics(rule):
    for t, r, c in EVENTS:
        by_rule = rule.rule == "any_event" or c == 1.0
        assert rule.positive(t, r, c) == (t == "click" or (t != "view" and by_rule)), (t, r, c)


def test_movielens_source_gives_the_positives_of_before():
    rule = load_source(ROOT / "features" / "sources" / "movielens-100k.yaml", ROOT / "data").label
    assert [rule.positive(t, r) for t, r, _ in EVENTS] == [_hard_coded(t, r) for t, r, _ in EVENTS]
    default = LabelRule()
    assert [default.positive(t, r) for t, r, _ in EVENTS] == [_hard_coded(t, r) for t, r, _ in EVENTS]


def test_generated_source_gives_the_positives_of_before():
    """The generator's events are ``rating`` events with 5 stars for a click and 1 for none (its Parquet log)."""
    rule = load_source(ROOT / "features" / "sources" / "generated.yaml", ROOT / "data").label
    for click, rating in ((1.0, 5.0), (0.0, 1.0)):
        assert rule.positive("rating", rating, click) == _hard_coded("rating", rating)
