"""The declared data source (features.source): the YAML schema, the column mapping, the label rules, and bad data
reported with its file, column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.source import CLICK_RATING, NO_CLICK_RATING, SourceError, load_source

ROOT = Path(__file__).resolve().parent.parent

LOG = """customer,sku,ts,stars
10,100,2024-01-01T00:00:00Z,5
11,100,2024-01-01T00:01:00Z,2
10,101,2024-01-02T08:00:00Z,4.5
"""

SOURCE = """name: shop
interactions:
  path: events.csv
  columns: {user_id: customer, item_id: sku, event_time: ts, rating: stars}
label: {rule: rating_at_least, threshold: 4}
"""


def write(tmp_path: Path, log: str = LOG, source: str = SOURCE, **files: str) -> Path:
    (tmp_path / "events.csv").write_text(log)
    for name, text in files.items():
        (tmp_path / name.replace("_", ".")).write_text(text)
    (tmp_path / "source.yaml").write_text(source)
    return tmp_path / "source.yaml"


def test_csv_log_is_mapped_to_the_platform_fields(tmp_path):
    events = load_source(write(tmp_path), tmp_path).read_interactions()
    assert events["event_id"].tolist() == ["shop-000000", "shop-000001", "shop-000002"]
    assert events["user_id"].tolist() == [10, 11, 10] and events["item_id"].tolist() == [100, 100, 101]
    assert events["timestamp"].tolist() == [1704067200, 1704067260, 1704182400]
    assert events["rating"].tolist() == [5.0, 2.0, 4.5]
    assert events["label"].tolist() == [1, 0, 1]
    assert events["event_type"].tolist() == ["rating"] * 3 and events["click"].isna().all()


def test_click_log_in_parquet_gets_labels_from_clicks_and_ratings_from_labels(tmp_path):
    pd.DataFrame({"u": [1, 2], "i": [5, 6], "t": pd.to_datetime(["2024-03-01 10:00", "2024-03-01 11:00"]),
                  "clicked": [1, 0], "id": ["a", "b"]}).to_parquet(tmp_path / "log.parquet")
    (tmp_path / "s.yaml").write_text("name: clicks\ninteractions:\n  path: log.parquet\n  columns: {user_id: u, "
                                     "item_id: i, event_time: t, click: clicked, event_id: id}\nlabel: {rule: click}\n")
    events = load_source(tmp_path / "s.yaml", tmp_path).read_interactions()
    assert events["label"].tolist() == [1, 0]
    assert events["rating"].tolist() == [CLICK_RATING, NO_CLICK_RATING]
    assert events["event_id"].tolist() == ["a", "b"] and events["click"].tolist() == [1.0, 0.0]
    assert events["timestamp"].tolist() == [1709287200, 1709290800]  # a naive Parquet timestamp is UTC


def test_unix_time_and_any_event_rule(tmp_path):
    path = write(tmp_path, "u,i,t\n1,2,900000000\n1,3,900000060\n",
                 "name: implicit\ninteractions:\n  path: events.csv\n  columns: {user_id: u, item_id: i, event_time: t}\n"
                 "  time_format: unix_seconds\nlabel: {rule: any_event}\n")
    events = load_source(path, tmp_path).read_interactions()
    assert events["label"].tolist() == [1, 1] and events["timestamp"].tolist() == [900000000, 900000060]


def test_side_tables_map_optional_columns_and_leave_the_rest_unknown(tmp_path):
    source = SOURCE + ("users:\n  path: users.csv\n  columns: {user_id: id, age: years}\n"
                       "items:\n  path: items.csv\n  columns: {item_id: sku, genres: cats}\n  list_separator: ';'\n")
    path = write(tmp_path, source=source, users_csv="id,years\n10,31\n11,\n", items_csv="sku,cats\n100,a;b\n101,\n")
    s = load_source(path, tmp_path)
    users, items = s.read_users(), s.read_items()
    assert users["user_id"].tolist() == [10, 11] and users["age"].tolist()[0] == 31 and pd.isna(users["age"][1])
    assert users["gender"].isna().all()
    assert items["genres"].tolist() == ["a|b", ""] and items["title"].tolist() == ["", ""]


def test_a_source_without_side_tables_reads_empty_ones(tmp_path):
    s = load_source(write(tmp_path), tmp_path)
    assert len(s.read_users()) == 0 and list(s.read_items().columns) == ["item_id", "title", "year", "genres"]


@pytest.mark.parametrize("log, message", [
    ("customer,sku,ts,stars\n10,abc,2024-01-01T00:00:00Z,5\n", "column 'sku', row 1: 'abc' is not a 32-bit integer id"),
    ("customer,sku,ts,stars\n10,1,2024-01-01T00:00:00Z,5\n10,2,yesterday,5\n",
     "column 'ts', row 2: 'yesterday' is not a time in iso8601"),
    ("customer,sku,ts,stars\n10,1,1990-01-01T00:00:00Z,5\n", "column 'ts', row 1: '1990-01-01T00:00:00Z' is not a "
                                                             "time between 1995-01-01 and now"),
    ("customer,sku,ts,stars\n10,1,2024-01-01T00:00:00Z,7\n", "column 'stars', row 1: '7' is not a number in [0.5, 5.0]"),
    ("customer,sku,ts,stars\n10,1,2024-01-01T00:00:00Z,5\n10,1,2024-01-01T00:00:00Z,5\n",
     "row 2 repeats row 1 on ['customer', 'sku', 'ts', 'stars', 'event_type']"),
    ("customer,sku,ts,stars\n,1,2024-01-01T00:00:00Z,5\n", "column 'customer', row 1: an empty value is not a 32-bit"),
    ("customer,sku,ts,stars\n10,99999999999,2024-01-01T00:00:00Z,5\n", "column 'sku', row 1"),
])
def test_bad_rows_name_the_file_column_and_row(tmp_path, log, message):
    with pytest.raises(SourceError) as err:
        load_source(write(tmp_path, log), tmp_path).read_interactions()
    assert str(tmp_path / "events.csv") in str(err.value) and message in str(err.value)


def test_a_missing_mapped_column_names_it_and_suggests_the_closest(tmp_path):
    path = write(tmp_path, LOG.replace("stars", "star"))
    with pytest.raises(SourceError, match=r"column 'stars' \(mapped to rating\) is not in the file \(did you mean "
                                          r"'star'\?\)"):
        load_source(path, tmp_path).read_interactions()


def test_the_label_rule_needs_its_column(tmp_path):
    path = write(tmp_path, source=SOURCE.replace("rule: rating_at_least, threshold: 4", "rule: click"))
    with pytest.raises(SourceError, match=r"map no column to \['click'\].*label rule 'click'"):
        load_source(path, tmp_path).read_interactions()


def test_schema_errors_name_the_key_line_and_closest_key(tmp_path):
    path = write(tmp_path, source=SOURCE.replace("  columns:", "  colums:"))
    with pytest.raises(SourceError) as err:
        load_source(path, tmp_path)
    assert f"source file {path}, line 4: unknown key 'interactions.colums' (did you mean 'columns'?)" in str(err.value)
    with pytest.raises(SourceError, match="not a platform field of this table|are not platform fields.*'user_id'"):
        load_source(write(tmp_path, source=SOURCE.replace("user_id: customer", "userid: customer")),
                    tmp_path).read_interactions()
    with pytest.raises(SourceError, match="cannot be read"):
        load_source(tmp_path / "absent.yaml", tmp_path)
    with pytest.raises(SourceError, match="must be a mapping"):
        load_source(write(tmp_path, source="- a\n- b\n"), tmp_path)
    with pytest.raises(SourceError, match="time_format 'unix' is none of"):
        load_source(write(tmp_path, source=SOURCE.replace("label:", "  time_format: unix\nlabel:")), tmp_path)


def test_a_missing_file_says_which(tmp_path):
    path = write(tmp_path, source=SOURCE.replace("events.csv", "nope.csv"))
    with pytest.raises(SourceError, match=r"nope.csv \(source file .*\): not found"):
        load_source(path, tmp_path).read_interactions()


def test_expected_counts_are_checked(tmp_path):
    with pytest.raises(SourceError, match="3 rows, but source file .* expects 4"):
        load_source(write(tmp_path, source=SOURCE + "expect: {interactions: 4}\n"), tmp_path).read_interactions()


def test_movielens_source_reads_the_same_tables_as_its_loader(movielens, ml_events):
    """The shipped MovieLens source gives exactly what pipelines.movielens.load gives: the same ratings in the
    same order with the project's event ids, and the same side tables."""
    ratings = movielens.ratings
    assert ml_events["event_id"].tolist() == [f"ml100k-{i:06d}" for i in range(len(ratings))]
    for col in ("user_id", "item_id", "rating", "timestamp"):
        assert np.array_equal(ml_events[col].to_numpy(), ratings[col].to_numpy())
    assert ml_events["label"].tolist() == (ratings["rating"] >= 4).astype(int).tolist()
    s = load_source(ROOT / "features" / "sources" / "movielens-100k.yaml", ROOT / "data" / "raw")
    assert s.read_users().astype(object).fillna(-1).equals(movielens.users.astype(object).fillna(-1))
    assert s.read_items().astype(object).fillna(-1).values.tolist() == \
        movielens.items.astype(object).fillna(-1).values.tolist()
