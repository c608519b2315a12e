"""MovieLens-100K (Harper & Konstan 2015, https://grouplens.org/datasets/movielens/100k/), obtained by the project.

Source order: the official GroupLens archive; when it cannot be downloaded (this machine reaches only package
registries), the copy that the PyPI wheel ``recbole==1.2.1`` ships in ``recbole/dataset_example/ml-100k/``,
fetched with ``pip download --no-deps`` and read from the wheel without importing recbole. Either source is
normalised into three TSV files under ``<raw_dir>/ml-100k/`` and checked: 100,000 ratings, 943 users, 1,682 items.

Run ``python -m pipelines.movielens`` (``make data``) to fetch; it does nothing when the files are there.
"""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from features.config import HelpFormatter, describe, load_config_or_exit, settings_help
from features.errors import DatasetError

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_WHEEL = "recbole==1.2.1"
N_RATINGS, N_USERS, N_ITEMS = 100_000, 943, 1_682
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
FILES = ("ratings.tsv", "users.tsv", "items.tsv")


@dataclass(frozen=True)
class MovieLens:
    """The three tables, ratings in the file's original order.

    ratings: user_id, item_id, rating (stars, 1-5), timestamp (Unix seconds).
    users: user_id, age (years), gender, occupation, zip_code.
    items: item_id, title, year (may be missing), genres ('|'-separated names).
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str


def _from_grouplens(timeout_s: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout_s) as resp:
        archive = zipfile.ZipFile(io.BytesIO(resp.read()))
    read = lambda name, **kw: pd.read_csv(archive.open(f"ml-100k/{name}"), header=None, encoding="latin-1", **kw)
    ratings = read("u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users = read("u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"], dtype={4: str})
    raw = read("u.item", sep="|", names=["item_id", "title", "release", "video", "url", *GENRES])
    items = pd.DataFrame({
        "item_id": raw["item_id"],
        "title": raw["title"].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True),
        "year": pd.to_datetime(raw["release"], format="%d-%b-%Y", errors="coerce").dt.year.astype("Int64"),
        "genres": raw[list(GENRES)].apply(lambda r: "|".join(g for g in GENRES if r[g] == 1), axis=1),
    })
    return ratings, users, items


def _from_recbole_wheel() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, RECBOLE_WHEEL],
                       check=True, capture_output=True, text=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("recbole-*.whl")))
        base = "recbole/dataset_example/ml-100k/ml-100k"
        read = lambda ext: pd.read_csv(wheel.open(f"{base}.{ext}"), sep="\t", dtype=str, keep_default_na=False)
        inter, user, item = read("inter"), read("user"), read("item")
    ratings = pd.DataFrame({
        "user_id": inter["user_id:token"].astype(int), "item_id": inter["item_id:token"].astype(int),
        "rating": inter["rating:float"].astype(float).astype(int),
        "timestamp": inter["timestamp:float"].astype(float).astype("int64"),
    })
    users = pd.DataFrame({
        "user_id": user["user_id:token"].astype(int), "age": user["age:token"].astype(int),
        "gender": user["gender:token"], "occupation": user["occupation:token"], "zip_code": user["zip_code:token"],
    })
    genre_names = {g.replace("'", ""): g for g in GENRES}  # recbole writes "Childrens" as "Children's" already
    items = pd.DataFrame({
        "item_id": item["item_id:token"].astype(int), "title": item["movie_title:token_seq"],
        "year": pd.to_numeric(item["release_year:token"], errors="coerce").astype("Int64"),
        "genres": item["class:token_seq"].map(
            lambda s: "|".join(genre_names.get(g.replace("'", ""), g) for g in s.split() if g)),
    })
    return ratings, users, items


def check(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> None:
    """Raises:
        DatasetError: counts differ from the published 100,000 ratings, 943 users, 1,682 items.
    """
    found = (len(ratings), ratings["user_id"].nunique(), ratings["item_id"].nunique(), len(users), len(items))
    want = (N_RATINGS, N_USERS, N_ITEMS, N_USERS, N_ITEMS)
    if found != want:
        raise DatasetError(f"MovieLens-100K failed its check: (ratings, users rated, items rated, users, items) = "
                           f"{found}, expected {want}; delete the raw folder and run 'make data' again")


def fetch(raw_dir: Path, timeout_s: float = 15.0) -> Path:
    """Download and normalise the data set into ``raw_dir/ml-100k`` unless it is already there.

    Raises:
        DatasetError: neither source could be read, or the counts are wrong.
    """
    out = raw_dir / "ml-100k"
    if all((out / f).exists() for f in FILES):
        return out
    try:
        tables, source = _from_grouplens(timeout_s), "grouplens"
    except Exception as e:  # any network failure: fall back to the registry copy
        log.warning("GroupLens archive unavailable (%s); using the copy in the %s wheel", e, RECBOLE_WHEEL)
        try:
            tables, source = _from_recbole_wheel(), RECBOLE_WHEEL
        except (subprocess.CalledProcessError, StopIteration, KeyError) as e2:
            raise DatasetError(f"MovieLens-100K: GroupLens failed ({e}) and the {RECBOLE_WHEEL} wheel failed "
                               f"({getattr(e2, 'stderr', e2)})") from e2
    check(*tables)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in zip(FILES, tables):
        df.to_csv(out / name, sep="\t", index=False)
    (out / "SOURCE").write_text(source + "\n")
    return out


def load(raw_dir: Path) -> MovieLens:
    """Read the normalised files (after :func:`fetch`) and check them.

    Raises:
        DatasetError: the files are missing (run ``make data``) or fail the check.
    """
    base = raw_dir / "ml-100k"
    if not all((base / f).exists() for f in FILES):
        raise DatasetError(f"MovieLens-100K not found in {base}; run 'make data'")
    ratings = pd.read_csv(base / "ratings.tsv", sep="\t")
    users = pd.read_csv(base / "users.tsv", sep="\t", dtype={"zip_code": str})
    items = pd.read_csv(base / "items.tsv", sep="\t", dtype={"genres": str}, keep_default_na=False)
    items["year"] = pd.to_numeric(items["year"], errors="coerce").astype("Int64")
    check(ratings, users, items)
    return MovieLens(ratings, users, items, (base / "SOURCE").read_text().strip())


def main(argv: list[str] | None = None) -> None:
    """Command line: arguments first (``--help`` returns before anything is fetched), then the configuration (an
    error in it: the message on stderr, exit status 2), then :func:`fetch` and :func:`load`."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.movielens", formatter_class=HelpFormatter,
        description=describe(f"Fetch MovieLens-100K into <raw_dir>/ml-100k (the GroupLens archive, else the copy in "
                             f"the {RECBOLE_WHEEL} wheel from PyPI), check its counts ({N_RATINGS:,} ratings, "
                             f"{N_USERS} users, {N_ITEMS:,} items) and print them. Does nothing when the files are "
                             "already there."),
        epilog=settings_help({"raw_dir": "folder the data set is written to (ml-100k/ under it)"}))
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config_or_exit(parser.prog)
    path = fetch(cfg.raw_dir)
    ml = load(cfg.raw_dir)
    print(f"MovieLens-100K ready in {path} (source: {ml.source}): {len(ml.ratings):,} ratings, "
          f"{len(ml.users):,} users, {len(ml.items):,} items")


if __name__ == "__main__":
    main()
