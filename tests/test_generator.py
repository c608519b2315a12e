"""The synthetic log generator: determinism, and the distributions it promises (small sizes only)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from features.events import parse_event
from pipelines.generator import (
    CAT_COLUMNS,
    CARDINALITIES,
    PARQUET_COLUMNS,
    GeneratorConfig,
    generate,
    kafka_messages,
    write_parquet,
)


def _all(cfg: GeneratorConfig) -> dict[str, np.ndarray]:
    chunks = list(generate(cfg))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _loglog_slope(counts: np.ndarray, top: int) -> float:
    """Least-squares slope of log(frequency) on log(rank) over the ``top`` most frequent values."""
    freq = np.sort(counts)[::-1][:top]
    return float(np.polyfit(np.log(np.arange(1, top + 1)), np.log(freq), 1)[0])


SMALL = GeneratorConfig(n_events=20_000, seed=3, n_users=500, n_items=300, chunk_size=7_000)


def test_same_seed_same_events_and_another_seed_differs():
    a, b = _all(SMALL), _all(SMALL)
    for k in a:
        if k == "candidates":
            assert [None if x is None else x.tolist() for x in a[k]] == [None if x is None else x.tolist() for x in b[k]]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    other = _all(GeneratorConfig(**{**SMALL.__dict__, "seed": 4}))
    assert (other["item_id"] != a["item_id"]).mean() > 0.5


def test_events_are_valid_on_the_wire_and_in_time_order():
    chunk = next(generate(SMALL))
    assert np.all(np.diff(chunk["event_time"]) >= 0)
    assert len(set(chunk["event_id"].tolist())) == len(chunk["event_id"])
    assert chunk["user_id"].min() >= 1 and chunk["user_id"].max() <= SMALL.n_users
    assert chunk["item_id"].min() >= 1 and chunk["item_id"].max() <= SMALL.n_items
    for j, col in enumerate(CAT_COLUMNS):
        assert 0 <= chunk[col].min() and chunk[col].max() < CARDINALITIES[j], col
    messages = list(kafka_messages(chunk))
    for (key, value), i in zip(messages[:500], range(500)):
        event = parse_event(value)
        assert key == str(chunk["user_id"][i]).encode()
        assert (event.event_id, event.user_id, event.item_id) == (chunk["event_id"][i], chunk["user_id"][i],
                                                                  chunk["item_id"][i])
        assert event.rating == (5.0 if chunk["click"][i] else 1.0)


def test_a_generated_event_round_trips_through_the_contract():
    """Every generator field reaches the parsed Event (nothing is lost on the wire), and the parsed Event writes
    back the generator's exact bytes."""
    cfg = GeneratorConfig(n_events=2_000, seed=4, n_users=300, n_items=200, random_fraction=0.3)
    chunk = next(generate(cfg))
    messages = list(kafka_messages(chunk))
    assert chunk["is_random"].any() and (~chunk["is_random"]).any() and chunk["click"].any()
    for i, (_, value) in enumerate(messages):
        event = parse_event(value)
        assert event.to_json() == value
        cands = chunk["candidates"][i]
        assert (event.click, event.is_random, event.session_id) == (chunk["click"][i], chunk["is_random"][i],
                                                                     chunk["session_id"][i])
        assert event.candidates == (None if cands is None else tuple(cands.tolist()))
        assert event.cats == {c: int(chunk[c][i]) for c in CAT_COLUMNS}


def test_item_popularity_is_zipf_with_the_configured_slope():
    cfg = GeneratorConfig(n_events=200_000, seed=1, n_users=5_000, n_items=2_000, drift_sigma=0.0,
                          random_fraction=0.0, item_zipf_s=1.0)
    items = _all(cfg)["item_id"]
    slope = _loglog_slope(np.bincount(items), top=200)
    assert slope == pytest.approx(-1.0, abs=0.1)


def test_user_activity_is_a_power_law():
    cfg = GeneratorConfig(n_events=200_000, seed=2, n_users=2_000, n_items=1_000, user_alpha=0.8,
                          mean_session_len=1.0)  # one event per session: events per user follow the law directly
    slope = _loglog_slope(np.bincount(_all(cfg)["user_id"]), top=200)
    assert slope == pytest.approx(-0.8, abs=0.1)


def test_popularity_drifts_slowly():
    cfg = GeneratorConfig(n_events=200_000, seed=5, n_users=5_000, n_items=2_000, drift_sigma=0.5)
    items = _all(cfg)["item_id"]
    tenth = len(items) // 10
    top = lambda x: set(np.argsort(np.bincount(x, minlength=cfg.n_items + 1))[::-1][:50].tolist())
    early, late = top(items[:tenth]), top(items[-tenth:])
    overlap = len(early & late) / 50
    assert 0.2 < overlap < 0.9  # the head changes, but not completely


def test_random_slice_is_uniform_over_its_candidates():
    cfg = GeneratorConfig(n_events=100_000, seed=9, n_users=2_000, n_items=500, random_fraction=0.2,
                          n_candidates=8)
    ev = _all(cfg)
    rand = np.nonzero(ev["is_random"])[0]
    assert len(rand) / cfg.n_events == pytest.approx(0.2, abs=0.01)
    assert all(ev["candidates"][i] is None for i in np.nonzero(~ev["is_random"])[0][:1000])
    positions = []
    for i in rand:
        cands = ev["candidates"][i]
        assert len(cands) == cfg.n_candidates and len(set(cands.tolist())) == cfg.n_candidates
        (pos,) = np.nonzero(cands == ev["item_id"][i])[0]
        positions.append(pos)
    counts = np.bincount(positions, minlength=cfg.n_candidates)
    # the shown arm's slot is uniform: chi-square against equal counts
    assert stats.chisquare(counts).pvalue > 1e-3
    # and so is the shown item among the candidates: each candidate item is shown about 1/K of the times offered
    offered = np.bincount(np.concatenate([ev["candidates"][i] for i in rand]), minlength=cfg.n_items + 1)
    shown = np.bincount(ev["item_id"][rand], minlength=cfg.n_items + 1)
    head = np.argsort(offered)[::-1][:20]
    expected = offered[head] / cfg.n_candidates
    assert stats.chisquare(shown[head], expected * shown[head].sum() / expected.sum()).pvalue > 1e-3


def test_clicks_follow_the_latent_model():
    ev = _all(GeneratorConfig(n_events=100_000, seed=11, n_users=1_000, n_items=500))
    ctr = ev["click"].mean()
    assert 0.03 < ctr < 0.3
    # the label is learnable: a user-item pair's clicks depend on the pair, not only on the base rate, so the
    # per-item CTRs of frequent items spread far beyond binomial noise
    counts = np.bincount(ev["item_id"])
    clicks = np.bincount(ev["item_id"], weights=ev["click"])
    frequent = counts >= 500
    item_ctr = clicks[frequent] / counts[frequent]
    noise = np.sqrt(ctr * (1 - ctr) / counts[frequent]).mean()
    assert item_ctr.std() > 2 * noise


def test_parquet_has_every_column(tmp_path):
    n = write_parquet(SMALL, tmp_path / "out")
    table = pq.read_table(tmp_path / "out")
    assert n == table.num_rows == SMALL.n_events
    assert tuple(table.column_names) == PARQUET_COLUMNS
    rand = table.filter(table["is_random"])
    assert all(len(c) == SMALL.n_candidates for c in rand["candidates"].to_pylist())
    np.testing.assert_array_equal(table["item_id"].to_numpy(), _all(SMALL)["item_id"])
