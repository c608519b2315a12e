"""A declared data source: an interaction log and optional user and item attribute tables, each column mapped onto
the platform's fields by a YAML file, with the rule that labels an event positive.

In the spirit of Feast's data sources and feature views (https://docs.feast.dev/getting-started/concepts): the
source says where the data is and which of its columns is which field; everything after it (the producer onto
Kafka, the ingest, the features job, training, serving and the replay) reads only the platform's fields. A source is
files (CSV or Parquet, a local path or any URL that ``fsspec`` reads, a Parquet folder included), replayed onto the
Kafka topic by the ``produce`` stage as JSON events (``features.events``). ``features/sources/`` holds the sources
the project ships: ``movielens-100k.yaml`` (the default, ``RECSYS_SOURCE``) and ``generated.yaml``.

A complete source file::

    name: my-shop                       # names the run's events (<event_id_prefix><row>) and the report
    fetch: null                         # optional "module:function", called with raw_dir, that downloads the files
    interactions:
      path: events.csv                  # relative to this file; "{raw_dir}/..." for the fetched data; or a URL
      format: csv                       # csv | parquet (default: from the suffix; a folder is Parquet)
      delimiter: ","                    # CSV only
      columns:                          # platform field: your column
        user_id: customer_id            # 32-bit integer ids (required)
        item_id: sku                    # (required)
        event_time: ts                  # (required) in time_format
        rating: stars                   # a number in [0.5, 5] (required by rule rating_at_least)
        # event_id: id                  # unique; default: <event_id_prefix><row number in the file>
        # event_type: kind              # rating | view | click; default rating
        # click: clicked                # 0 or 1 (required by rule click)
      time_format: iso8601              # unix_seconds | unix_millis | iso8601 | a strptime pattern; UTC
    label: {rule: rating_at_least, threshold: 4}   # or {rule: click}, or {rule: any_event}
    users:                              # optional: side features of the user (absent ones are unknown, row 0)
      path: users.csv
      columns: {user_id: customer_id, age: age_years, gender: gender, occupation: job, zip_code: postcode}
    items:                              # optional: side features of the item
      path: items.parquet
      columns: {item_id: sku, title: name, year: launch_year, genres: categories}
      list_separator: "|"               # genres in one string; a Parquet list column is read as it is
    expect: {interactions: 100000}      # optional count check (interactions, users, items)

Bad data is an error naming the file, the column and the row (1-based, header excluded), never a silent drop: a
mapped column the file lacks, an id that is not a 32-bit integer, a time that does not parse or is before
``features.events.MIN_EVENT_TIME``, a rating outside the contract's range, a click that is not 0/1, an event type
the contract does not know, and a duplicate event (the same ``event_id``, or, without one, the same user, item,
time, rating and type). A log without ratings gets the contract's required ``rating`` from its label, as the
generator writes it (``CLICK_RATING`` for a positive, ``NO_CLICK_RATING`` otherwise).

>>> rule = LabelRule(rule="rating_at_least", threshold=4)
>>> rule.describe(), rule.of(rating=np.array([3.5, 4.0]), click=np.array([1, 0])).tolist()
('rating >= 4', [0, 1])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.config import closest
from features.definitions import POSITIVE_RATING
from features.errors import PlatformError
from features.events import EVENT_TYPES, INT32_MAX, INT32_MIN, MAX_RATING, MIN_EVENT_TIME, MIN_RATING

#: Rating written for a positive / negative event of a log without ratings (as ``pipelines.generator`` does).
CLICK_RATING, NO_CLICK_RATING = 5.0, 1.0
#: The platform's fields of each table: required ones first.
INTERACTION_FIELDS = {"required": ("user_id", "item_id", "event_time"),
                      "optional": ("event_id", "rating", "event_type", "click")}
USER_FIELDS = {"required": ("user_id",), "optional": ("age", "gender", "occupation", "zip_code")}
ITEM_FIELDS = {"required": ("item_id",), "optional": ("title", "year", "genres")}
TIME_FORMATS = ("unix_seconds", "unix_millis", "iso8601")


class SourceError(PlatformError, ValueError):
    """A source file or the data it declares is wrong; the message names the file, and the column and row where
    there is one, and says what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TableSource(_Strict):
    """One file (or Parquet folder) and its column mapping ``{platform field: column in the file}``."""

    path: str
    format: Literal["csv", "parquet"] | None = None
    delimiter: str = ","
    columns: dict[str, str]
    list_separator: str = "|"


class InteractionSource(TableSource):
    time_format: str = "iso8601"


class LabelRule(_Strict):
    """When an event is positive (label 1): ``rating_at_least`` (rating >= threshold), ``click`` (click == 1) or
    ``any_event`` (every event: implicit feedback). Whatever the rule, an event of type ``click`` is positive and one
    of type ``view`` is not (``features.events.EVENT_TYPES``); the rule decides ``rating`` events. This is the one
    definition of a positive: the CTR label (``pipelines.features_batch``), the daily and speed-layer feature views
    (``pipelines.daily_features``, ``pipelines.speed_layer``), the point-in-time samples (``pipelines.pit_join``)
    and the tests' Python oracles all use it.

    >>> LabelRule(threshold=3).positive("rating", 3.0), LabelRule().positive("rating", 3.0)
    (True, False)
    >>> LabelRule(rule="click").positive("click", 1.0), LabelRule(rule="any_event").positive("view", 5.0)
    (True, False)
    """

    rule: Literal["rating_at_least", "click", "any_event"] = "rating_at_least"
    threshold: float = POSITIVE_RATING

    def describe(self) -> str:
        return {"rating_at_least": f"rating >= {self.threshold:g}", "click": "click == 1",
                "any_event": "every event"}[self.rule]

    def of(self, rating: np.ndarray, click: np.ndarray | None = None,
           event_type: np.ndarray | None = None) -> np.ndarray:
        """(N,) int labels of N events from their (N,) ratings, clicks (NaN/None: none) and event types."""
        n = len(rating)
        if self.rule == "any_event":
            by_rule = np.ones(n, bool)
        elif self.rule == "rating_at_least":
            by_rule = np.asarray(rating, np.float64) >= self.threshold
        else:
            by_rule = (np.zeros(n, bool) if click is None
                       else pd.to_numeric(pd.Series(click)).fillna(0).to_numpy() == 1)
        if event_type is not None:
            types = np.asarray(event_type)
            by_rule = (by_rule & (types != "view")) | (types == "click")
        return by_rule.astype(np.int64)

    def positive(self, event_type: str, rating: float, click: float | None = None) -> bool:
        """Whether one event is positive: :meth:`of` for a single event (``click`` None or NaN: none)."""
        return bool(self.of(np.array([rating], np.float64), None if click is None else np.array([click], np.float64),
                            np.array([event_type]))[0])

    def spark_column(self):
        """The same rule as a Spark column over bronze's ``rating``, ``click`` and ``event_type`` (int 0/1; a null
        rating or click is not positive)."""
        from pyspark.sql import functions as F

        if self.rule == "any_event":
            by_rule = F.lit(True)
        elif self.rule == "rating_at_least":
            by_rule = F.coalesce(F.col("rating") >= F.lit(self.threshold), F.lit(False))
        else:
            by_rule = F.coalesce(F.col("click"), F.lit(0)) == 1
        event_type = F.coalesce(F.col("event_type"), F.lit("rating"))  # bronze's default for an absent type
        return ((by_rule & (event_type != "view")) | (event_type == "click")).cast("int")


class Expect(_Strict):
    interactions: int | None = None
    users: int | None = None
    items: int | None = None


class SourceSpec(_Strict):
    """The YAML file's schema; see the module docstring."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    fetch: str | None = None
    event_id_prefix: str | None = None
    interactions: InteractionSource
    label: LabelRule = LabelRule()
    users: TableSource | None = None
    items: TableSource | None = None
    expect: Expect = Expect()


@dataclass(frozen=True)
class Source:
    """A loaded source: its declaration, the file it came from and the folder its ``{raw_dir}`` paths name."""

    spec: SourceSpec
    file: Path
    raw_dir: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> LabelRule:
        return self.spec.label

    def location(self, table: TableSource) -> str:
        """The path or URL of a table: ``{raw_dir}`` filled in, a relative path taken from the source file's folder."""
        path = table.path.replace("{raw_dir}", str(self.raw_dir))
        if "://" in path or Path(path).is_absolute():
            return path
        return str((self.file.parent / path).resolve())

    def fetch(self) -> None:
        """Run the source's fetch step (``module:function(raw_dir)``), if it declares one.

        Raises:
            SourceError: the function cannot be imported.
        """
        if not self.spec.fetch:
            return
        module, _, func = self.spec.fetch.partition(":")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise SourceError(f"source file {self.file}: fetch {self.spec.fetch!r} cannot be imported ({e}); give "
                              "'module:function'") from e
        fn(self.raw_dir)

    def read_interactions(self) -> pd.DataFrame:
        """The interaction log in the platform's fields, in the file's row order: ``event_id`` (str), ``user_id``,
        ``item_id`` (int64, 32-bit range), ``rating`` (float64, stars), ``timestamp`` (int64, Unix seconds),
        ``event_type`` (str), ``click`` (float64, 0/1, NaN when the source has none), ``label`` (int64, by the
        source's rule).

        Raises:
            SourceError: the file cannot be read, or a column or value is wrong (file, column and row named).
        """
        t = self.spec.interactions
        rule = self.spec.label
        required = list(INTERACTION_FIELDS["required"])
        required += {"rating_at_least": ["rating"], "click": ["click"], "any_event": []}[rule.rule]
        where, raw = self._read(t, required, INTERACTION_FIELDS)
        n = len(raw)
        out = pd.DataFrame(index=raw.index)
        out["event_id"] = _event_ids(self, raw, t, where)
        for f in ("user_id", "item_id"):
            out[f] = _ints(raw[t.columns[f]], where, t.columns[f], INT32_MIN, INT32_MAX, "a 32-bit integer id")
        out["timestamp"] = _times(raw[t.columns["event_time"]], t.time_format, where, t.columns["event_time"])
        if "event_type" in t.columns:
            types = raw[t.columns["event_type"]].astype("string")
            _first_bad(~types.isin(EVENT_TYPES).fillna(False), types, where, t.columns["event_type"],
                       f"one of {EVENT_TYPES}")
            out["event_type"] = types.astype(str)
        else:
            out["event_type"] = "rating"
        if "click" in t.columns:
            click = pd.to_numeric(raw[t.columns["click"]], errors="coerce")
            _first_bad(~click.isin([0, 1]), raw[t.columns["click"]], where, t.columns["click"], "0 or 1")
            out["click"] = click.astype(np.float64)
        else:
            out["click"] = np.nan
        if "rating" in t.columns:
            rating = pd.to_numeric(raw[t.columns["rating"]], errors="coerce")
            _first_bad(~rating.between(MIN_RATING, MAX_RATING), raw[t.columns["rating"]], where, t.columns["rating"],
                       f"a number in [{MIN_RATING}, {MAX_RATING}] (the event contract's range; rescale it first)")
            out["rating"] = rating.astype(np.float64)
        out["label"] = rule.of(out["rating"].to_numpy() if "rating" in t.columns else np.zeros(n),
                               out["click"].to_numpy(), out["event_type"].to_numpy())
        if "rating" not in t.columns:
            out["rating"] = np.where(out["label"] == 1, CLICK_RATING, NO_CLICK_RATING)
        key = ["event_id"] if "event_id" in t.columns else ["user_id", "item_id", "timestamp", "rating", "event_type"]
        named = {**t.columns, "timestamp": t.columns["event_time"]}
        _no_duplicates(out, key, where, [named.get(k, k) for k in key])
        _expect(self, "interactions", n, where)
        return out[["event_id", "user_id", "item_id", "rating", "timestamp", "event_type", "click", "label"]] \
            .reset_index(drop=True)

    def read_users(self) -> pd.DataFrame:
        """The user attribute table (``user_id``, ``age`` in years (nullable), ``gender``, ``occupation``,
        ``zip_code``: strings or None); empty when the source has none.

        Raises:
            SourceError: as :meth:`read_interactions`, and a user_id listed twice.
        """
        cols = ["user_id", *USER_FIELDS["optional"]]
        if self.spec.users is None:
            return pd.DataFrame({c: pd.Series(dtype="int64" if c == "user_id" else "object") for c in cols})
        t = self.spec.users
        where, raw = self._read(t, ["user_id"], USER_FIELDS)
        out = pd.DataFrame({"user_id": _ints(raw[t.columns["user_id"]], where, t.columns["user_id"], INT32_MIN,
                                             INT32_MAX, "a 32-bit integer id")})
        out["age"] = (_ints(raw[t.columns["age"]], where, t.columns["age"], 0, 150, "an age in years", nullable=True)
                      if "age" in t.columns else pd.array([pd.NA] * len(raw), "Int64"))
        for f in ("gender", "occupation", "zip_code"):
            out[f] = _strings(raw[t.columns[f]]) if f in t.columns else None
        _no_duplicates(out, ["user_id"], where, [t.columns["user_id"]])
        _expect(self, "users", len(out), where)
        return out[cols].reset_index(drop=True)

    def read_items(self) -> pd.DataFrame:
        """The item attribute table (``item_id``, ``title`` (str), ``year`` (nullable int), ``genres``: the
        item's categories joined by '|', '' when none); empty when the source has none.

        Raises:
            SourceError: as :meth:`read_interactions`, and an item_id listed twice.
        """
        cols = ["item_id", *ITEM_FIELDS["optional"]]
        if self.spec.items is None:
            return pd.DataFrame({c: pd.Series(dtype="int64" if c == "item_id" else "object") for c in cols})
        t = self.spec.items
        where, raw = self._read(t, ["item_id"], ITEM_FIELDS)
        out = pd.DataFrame({"item_id": _ints(raw[t.columns["item_id"]], where, t.columns["item_id"], INT32_MIN,
                                             INT32_MAX, "a 32-bit integer id")})
        out["title"] = _strings(raw[t.columns["title"]]).fillna("") if "title" in t.columns else ""
        out["year"] = (_ints(raw[t.columns["year"]], where, t.columns["year"], 0, 9999, "a year", nullable=True)
                       if "year" in t.columns else pd.array([pd.NA] * len(raw), "Int64"))
        if "genres" in t.columns:
            out["genres"] = [_genres(v, t.list_separator) for v in raw[t.columns["genres"]]]
        else:
            out["genres"] = ""
        _no_duplicates(out, ["item_id"], where, [t.columns["item_id"]])
        _expect(self, "items", len(out), where)
        return out[cols].reset_index(drop=True)

    def _read(self, t: TableSource, required: list[str], fields: dict) -> tuple[str, pd.DataFrame]:
        """``(where, frame)``: the file's location and its mapped columns (read as strings for CSV, so that
        nothing is converted silently)."""
        where = self.location(t)
        known = set(fields["required"]) | set(fields["optional"])
        unknown = sorted(set(t.columns) - known)
        if unknown:
            hint = closest(unknown[0], sorted(known))
            raise SourceError(f"source file {self.file}: {unknown} are not platform fields of this table"
                              f"{f' (did you mean {hint!r}?)' if hint else ''}; fields: {sorted(known)}")
        missing = [f for f in required if f not in t.columns]
        if missing:
            raise SourceError(f"source file {self.file}: the columns of {where} map no column to {missing}, which "
                              f"this source needs (label rule {self.spec.label.rule!r}); add them under 'columns'")
        fmt = t.format or ("parquet" if where.endswith((".parquet", ".pq")) or Path(where).is_dir() else "csv")
        try:
            if fmt == "parquet":
                frame = pd.read_parquet(where)
            else:
                delimiter = "\t" if where.endswith(".tsv") and t.delimiter == "," else t.delimiter
                frame = pd.read_csv(where, sep=delimiter, dtype=str, keep_default_na=False, na_values=[""])
        except FileNotFoundError as e:
            raise SourceError(f"{where} (source file {self.file}): not found; fix 'path'"
                              f"{' or run the fetch step (recsys data)' if self.spec.fetch else ''}") from e
        except Exception as e:  # noqa: BLE001 -- any reader failure becomes an error that names the file
            raise SourceError(f"{where} (source file {self.file}): cannot be read as {fmt}: {e}") from e
        absent = [(f, c) for f, c in t.columns.items() if c not in frame.columns]
        if absent:
            f, c = absent[0]
            hint = closest(c, [str(x) for x in frame.columns])
            raise SourceError(f"{where}: column {c!r} (mapped to {f}) is not in the file"
                              f"{f' (did you mean {hint!r}?)' if hint else ''}; its columns: {list(frame.columns)}")
        return where, frame[list(dict.fromkeys(t.columns.values()))].reset_index(drop=True)


def load_source(path: str | Path, raw_dir: str | Path) -> Source:
    """Read and check a source file.

    Args:
        path: the YAML file.
        raw_dir: the folder that ``{raw_dir}`` in its paths names (``PlatformConfig.raw_dir``).

    Raises:
        SourceError: the file is missing, not YAML, or does not follow the schema (the key and line named, the
            closest valid key suggested).
    """
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise SourceError(f"source file {file}: cannot be read ({e.strerror}); set RECSYS_SOURCE to a source YAML, "
                          f"e.g. features/sources/movielens-100k.yaml") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SourceError(f"source file {file}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SourceError(f"source file {file}: must be a mapping (name:, interactions:, ...), got "
                          f"{type(data).__name__}")
    try:
        spec = SourceSpec.model_validate(data)
    except ValidationError as e:
        raise SourceError("\n".join(_explain(err, file, text) for err in e.errors())) from e
    if spec.interactions.time_format not in TIME_FORMATS and "%" not in spec.interactions.time_format:
        raise SourceError(f"source file {file}: interactions.time_format {spec.interactions.time_format!r} is "
                          f"none of {TIME_FORMATS} nor a strptime pattern (with %)")
    return Source(spec, file.resolve(), Path(raw_dir).resolve())


# ------------------------------------------------------------------------------------------------ checks


def _explain(err: dict, file: Path, text: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    line = _line_of(text, loc)
    at = f"source file {file}{f', line {line}' if line else ''}"
    if err["type"] == "extra_forbidden":
        parent = SourceSpec
        for p in loc[:-1]:
            parent = getattr(parent.model_fields.get(p), "annotation", None) or parent
            parent = next((a for a in getattr(parent, "__args__", (parent,)) if isinstance(a, type)
                           and issubclass(a, BaseModel)), parent)
        valid = list(getattr(parent, "model_fields", {}))
        hint = closest(loc[-1], valid)
        return f"{at}: unknown key {key!r}{f' (did you mean {hint!r}?)' if hint else ''}; valid here: {valid}"
    return f"{at}: {key}: {err['msg']}"


def _line_of(text: str, loc: list[str]) -> int | None:
    """The 1-based line where the last key of ``loc`` is written (the first match after its parents')."""
    lines, start = text.splitlines(), 0
    for key in loc:
        for i in range(start, len(lines)):
            if lines[i].lstrip().startswith(f"{key}:"):
                start = i
                break
        else:
            return None
    return start + 1


def _first_bad(bad: pd.Series, values: pd.Series, where: str, column: str, want: str) -> None:
    bad = np.asarray(bad, bool)
    if bad.any():
        row = int(np.argmax(bad))
        value = values.iloc[row]
        shown = "an empty value" if value is None or (not isinstance(value, (list, np.ndarray)) and pd.isna(value)) \
            else repr(value)
        raise SourceError(f"{where}, column {column!r}, row {row + 1}: {shown} is not {want} "
                          f"({int(bad.sum()):,} such rows)")


def _ints(values: pd.Series, where: str, column: str, lo: int, hi: int, want: str, nullable: bool = False):
    num = pd.to_numeric(values, errors="coerce")
    missing = values.isna().to_numpy()
    bad = (num.isna().to_numpy() & ~missing) | (num.notna().to_numpy() & ((num % 1 != 0) | (num < lo) | (num > hi))
                                                .fillna(False).to_numpy())
    if not nullable:
        bad |= missing
    _first_bad(bad, values, where, column, want)
    return num.astype("Int64") if nullable else num.astype(np.int64)


def _times(values: pd.Series, fmt: str, where: str, column: str) -> np.ndarray:
    """Unix seconds (int64) of a time column in ``fmt`` (UTC)."""
    if fmt in ("unix_seconds", "unix_millis"):
        num = pd.to_numeric(values, errors="coerce")
        bad = num.isna()
        seconds = (num // 1000 if fmt == "unix_millis" else num).where(~bad, 0)
        stamps = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    elif pd.api.types.is_datetime64_any_dtype(values):  # Parquet timestamps
        stamps = values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
        bad = stamps.isna()
    else:
        stamps = pd.to_datetime(values, utc=True, errors="coerce",
                                format="ISO8601" if fmt == "iso8601" else fmt)
        bad = stamps.isna()
    want = f"a time in {fmt}" + ("" if fmt in TIME_FORMATS else " (strptime, UTC)")
    _first_bad(bad, values, where, column, want)
    early = stamps < pd.Timestamp(MIN_EVENT_TIME)
    late = stamps > pd.Timestamp(datetime.now(timezone.utc))
    _first_bad(early | late, values, where, column,
               f"a time between {MIN_EVENT_TIME:%Y-%m-%d} and now (the event contract rejects others)")
    return (stamps.astype("int64") // 10**9 if stamps.dtype.unit == "ns" else
            stamps.dt.as_unit("s").astype("int64")).to_numpy(np.int64)


def _strings(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().astype(object).where(values.notna(), None)


def _genres(value, separator: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    parts = list(value) if isinstance(value, (list, tuple, np.ndarray)) else str(value).split(separator)
    return "|".join(str(p).strip() for p in parts if str(p).strip())


def _event_ids(source: Source, raw: pd.DataFrame, t: InteractionSource, where: str) -> pd.Series:
    if "event_id" in t.columns:
        ids = raw[t.columns["event_id"]]
        _first_bad(ids.isna(), ids, where, t.columns["event_id"], "an event id (it is empty)")
        return ids.astype(str)
    prefix = source.spec.event_id_prefix if source.spec.event_id_prefix is not None else f"{source.name}-"
    width = max(6, len(str(len(raw) - 1)))
    return pd.Series([f"{prefix}{i:0{width}d}" for i in range(len(raw))], index=raw.index)


def _no_duplicates(frame: pd.DataFrame, key: list[str], where: str, columns: list[str]) -> None:
    dup = frame.duplicated(key, keep="first").to_numpy()
    if dup.any():
        row = int(np.argmax(dup))
        first = int(np.argmax((frame[key] == frame[key].iloc[row]).all(axis=1).to_numpy()))
        raise SourceError(f"{where}: row {row + 1} repeats row {first + 1} on {columns} "
                          f"({[getattr(v, 'item', lambda: v)() for v in frame[key].iloc[row]]}; {int(dup.sum()):,} "
                          "duplicate rows); an event must "
                          "appear once: remove the repeats, or map a distinct event_id column")


def _expect(source: Source, table: str, n: int, where: str) -> None:
    want = getattr(source.spec.expect, table)
    if want is not None and n != want:
        raise SourceError(f"{where}: {n:,} rows, but source file {source.file} expects {want:,} ({table}); the "
                          f"download may be incomplete{': run its fetch step again' if source.spec.fetch else ''}")
