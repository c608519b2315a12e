"""Fetch and check the configured data source (``RECSYS_SOURCE``, a YAML file of ``features/sources/``).

Runs the source's fetch step when it declares one (MovieLens-100K: ``pipelines.movielens.fetch``), then reads its
interaction log and side tables through their declared column mappings, as the produce and features stages will,
so that bad data is reported now (the file, column and row named) rather than halfway through the main job.

Run ``python -m pipelines.data`` (``make data``, ``recsys data``).
"""

from __future__ import annotations

import argparse
import logging

from features.config import HelpFormatter, describe, load_config_or_exit, settings_help
from features.source import SourceError, load_source


def main(argv: list[str] | None = None) -> None:
    """Command line: arguments first (``--help`` returns before anything is fetched), then the configuration and
    the source file (an error in either: the message on stderr, exit status 2)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.data", formatter_class=HelpFormatter, description=describe(__doc__),
        epilog=settings_help({"source": "the data source's YAML file (features/sources/movielens-100k.yaml)",
                              "raw_dir": "folder that {raw_dir} in the source's paths names"}))
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config_or_exit(parser.prog)
    try:
        source = load_source(cfg.source, cfg.raw_dir)
        source.fetch()
        events, users, items = source.read_interactions(), source.read_users(), source.read_items()
    except SourceError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    print(f"source {source.name} ({cfg.source}) ready: {len(events):,} events of {events['user_id'].nunique():,} "
          f"users and {events['item_id'].nunique():,} items, {events['label'].mean():.1%} positive "
          f"({source.label.describe()}); side tables: {len(users):,} users, {len(items):,} items")


if __name__ == "__main__":
    main()
