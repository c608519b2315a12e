"""A deterministic, seeded generator of realistic interaction logs at any size, in chunks.

Every event is one impression of an item to a user, with a click label. Vectorised numpy, one chunk of
``chunk_size`` events at a time, so 30M events never exist as Python objects; chunk ``i`` draws from
``numpy.random.default_rng([seed, i])``, so the same ``(seed, chunk_size)`` gives the same events, byte for byte,
whether they go to Kafka, bronze or Parquet.

The model (all parameters in :class:`GeneratorConfig`):

- **Users**: activity follows a power law, P(user of activity rank r) ∝ r^-``user_alpha`` (ids are a seeded
  permutation of the ranks, so id order says nothing about activity).
- **Items**: popularity is Zipf, P(rank r) ∝ r^-``item_zipf_s``. It drifts slowly: a second ranking, the first
  with ``log(rank)`` jittered by N(0, ``drift_sigma``), takes over linearly in time (an event at fraction f of the
  period draws from the second ranking with probability f), so top items stay near the top but swap places.
- **Sessions**: events come in sessions of one user, geometric lengths with mean ``mean_session_len``, events a
  few seconds apart; time advances evenly over ``days`` days from ``start``.
- **Clicks** (the CTR label): logistic in a latent model,
  ``logit = ctr_bias + b_user + b_item + <u_user, v_item> + w[c17]``, biases and latent vectors (dimension 8)
  drawn N(0, ``latent_scale``²), ``w`` N(0, 0.25); ``click ~ Bernoulli(sigmoid(logit))``.
- **Side features**: 26 categorical fields ``c01``..``c26`` in the style of Criteo (Criteo Labs 2014): ``c01``..
  ``c08`` are functions of the user, ``c09``..``c16`` of the item, ``c17``..``c26`` of the context (drawn per
  impression, Zipf over their values); cardinalities in ``CARDINALITIES``, some of them high (10^5..10^6).
- **Random slice**: a fraction ``random_fraction`` of impressions is shown uniformly at random (``is_random``):
  ``candidates`` holds the ``n_candidates`` distinct items offered (drawn from the popularity model), the shown
  ``item_id`` is one of them chosen uniformly, and ``click`` follows the same latent model. This is the slice a
  replay estimator (Li et al. 2011) can evaluate a policy on without bias.

On Kafka an event is the contract's JSON (features/events.py) with every impression field (``click``,
``is_random``, ``session_id``, ``candidates``, ``c01``..``c26``, optional fields of the contract) and ``rating =
5.0`` for a click, ``1.0`` for none (the contract's required field, for consumers that read ratings only); bronze
gets the BRONZE_INTERACTIONS columns (Kafka coordinates null); Parquet gets every column (``PARQUET_COLUMNS``), one
file per chunk.

CLI::

    python -m pipelines.generator --events 1000000 --seed 7 --to parquet --out data/gen/1m
    python -m pipelines.generator --events 100000 --seed 7 --to kafka          # RECSYS_KAFKA__BOOTSTRAP, topic
    python -m pipelines.generator --events 100000 --seed 7 --to bronze         # Delta, via Spark

>>> cfg = GeneratorConfig(n_events=1000, seed=1, n_users=100, n_items=50, chunk_size=400)
>>> [len(c["event_id"]) for c in generate(cfg)]
[400, 400, 200]
>>> str(next(generate(cfg))["event_id"][0])
'g1-000000000000'
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_CAT = 26
#: Values per categorical field c01..c26: user fields, item fields, context fields (8 + 8 + 10).
CARDINALITIES = (
    1_000_000, 100_000, 1_000, 100, 50, 20, 10, 4,  # c01..c08: of the user
    500_000, 50_000, 5_000, 1_000, 200, 30, 10, 3,  # c09..c16: of the item
    100, 1_000_000, 100_000, 10_000, 1_000, 300, 50, 24, 7, 2,  # c17..c26: of the context
)
CAT_COLUMNS = tuple(f"c{i:02d}" for i in range(1, N_CAT + 1))
PARQUET_COLUMNS = ("event_id", "user_id", "item_id", "click", "rating", "event_time", "event_date", "session_id",
                   "is_random", "candidates", *CAT_COLUMNS)
LATENT_DIM = 8
#: Rating written for a click / no click (the contract's required ``rating``; ``click`` itself is sent too).
CLICK_RATING, NO_CLICK_RATING = 5.0, 1.0


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate.

    Args:
        n_events: impressions in all (count).
        seed: the seed; with ``chunk_size`` it fixes every value.
        n_users, n_items: population sizes (count); ids are 1..n.
        chunk_size: events per chunk (count); memory is O(chunk_size).
        user_alpha: power-law exponent of user activity.
        item_zipf_s: Zipf exponent of item popularity (the log-log slope of frequency on rank is -s).
        drift_sigma: std of the log-rank jitter of the late ranking (0: no drift).
        mean_session_len: mean events per session (count).
        days: length of the period (days), starting at ``start`` (Unix seconds, UTC).
        random_fraction: share of impressions in the uniformly random slice.
        n_candidates: arms offered in a random impression (count).
        ctr_bias, latent_scale: the click model's intercept (logit) and latent std.

    Raises:
        ValueError: a size or fraction out of range.
    """

    n_events: int
    seed: int = 0
    n_users: int = 100_000
    n_items: int = 50_000
    chunk_size: int = 1_000_000
    user_alpha: float = 0.8
    item_zipf_s: float = 1.0
    drift_sigma: float = 0.5
    mean_session_len: float = 8.0
    days: int = 30
    start: int = int(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp())
    random_fraction: float = 0.05
    n_candidates: int = 10
    ctr_bias: float = -2.0
    latent_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.n_events < 1 or self.chunk_size < 1:
            raise ValueError(f"n_events and chunk_size must be >= 1, not {self.n_events}, {self.chunk_size}")
        if self.n_users < 1 or self.n_items < 2 or self.n_items > 2**31 - 1 or self.n_users > 2**31 - 1:
            raise ValueError(f"n_users must be >= 1 and n_items >= 2, both < 2^31 (got {self.n_users}, "
                             f"{self.n_items})")
        if not 0.0 <= self.random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], not {self.random_fraction}")
        if not 2 <= self.n_candidates <= self.n_items // 2:
            raise ValueError(f"n_candidates must be in [2, n_items/2], not {self.n_candidates}")
        if self.mean_session_len < 1 or self.days < 1:
            raise ValueError("mean_session_len and days must be >= 1")


class _World:
    """The fixed part of the model, drawn once from ``(seed, "world")``: rankings, latent vectors, side features."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 2**32 - 1])
        ranks_u = np.arange(1, cfg.n_users + 1, dtype=np.float64)
        self.user_cdf = np.cumsum(ranks_u ** -cfg.user_alpha)
        self.user_cdf /= self.user_cdf[-1]
        self.user_of_rank = rng.permutation(cfg.n_users).astype(np.int32) + 1  # (U,) ids 1..U
        ranks_i = np.arange(1, cfg.n_items + 1, dtype=np.float64)
        self.item_cdf = np.cumsum(ranks_i ** -cfg.item_zipf_s)
        self.item_cdf /= self.item_cdf[-1]
        self.item_early = rng.permutation(cfg.n_items).astype(np.int32) + 1  # (I,) item id at each rank
        jitter = np.log(ranks_i) + rng.normal(0.0, cfg.drift_sigma, cfg.n_items)
        self.item_late = self.item_early[np.argsort(jitter, kind="stable")]  # (I,) drifted ranking
        self.user_vec = rng.normal(0, cfg.latent_scale, (cfg.n_users + 1, LATENT_DIM)).astype(np.float32)
        self.item_vec = rng.normal(0, cfg.latent_scale, (cfg.n_items + 1, LATENT_DIM)).astype(np.float32)
        self.user_bias = rng.normal(0, cfg.latent_scale, cfg.n_users + 1).astype(np.float32)
        self.item_bias = rng.normal(0, cfg.latent_scale, cfg.n_items + 1).astype(np.float32)
        # user and item fields: a fixed value per user / item (a multiplicative hash into the field's values)
        self.user_mult = rng.integers(1, 2**31 - 1, 8, dtype=np.int64) | 1
        self.item_mult = rng.integers(1, 2**31 - 1, 8, dtype=np.int64) | 1
        ctx_card = CARDINALITIES[16:]
        self.ctx_cdf = [np.cumsum(np.arange(1, c + 1, dtype=np.float64) ** -1.1) for c in ctx_card]
        for c in self.ctx_cdf:
            c /= c[-1]
        self.ctx_weight = rng.normal(0, 0.5, CARDINALITIES[16]).astype(np.float32)  # w[c17] in the click logit


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: the 0-based rank for each uniform in ``u``."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _distinct_rows(rows: np.ndarray, rng: np.random.Generator, n_items: int) -> np.ndarray:
    """Replace each repeat of an item within a row by a uniform draw until every row is distinct.
    (R, K) -> (R, K)."""
    while True:
        order = np.argsort(rows, axis=1, kind="stable")
        ordered = np.take_along_axis(rows, order, axis=1)
        dup_sorted = np.zeros(rows.shape, bool)
        dup_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # every copy after the first
        if not dup_sorted.any():
            return rows
        dup = np.zeros(rows.shape, bool)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        rows[dup] = rng.integers(1, n_items + 1, int(dup.sum()), dtype=rows.dtype)


def _chunk(cfg: GeneratorConfig, world: _World, index: int, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Events ``lo..hi-1`` (global positions) of chunk ``index`` as columns (each of length B = hi - lo)."""
    rng = np.random.default_rng([cfg.seed, index])
    b = hi - lo
    pos = np.arange(lo, hi, dtype=np.int64)  # (B,)
    # sessions: geometric lengths, one user each, cut at the chunk's end
    lengths = rng.geometric(1.0 / cfg.mean_session_len, b)  # more than enough sessions
    starts = np.cumsum(lengths) - lengths
    n_sess = int(np.searchsorted(starts, b, side="left"))
    sess_of = np.repeat(np.arange(n_sess), lengths[:n_sess])[:b]  # (B,) session of each event
    session_id = pos[0] + starts[sess_of]  # global position of the session's first event: unique, stable
    sess_user = world.user_of_rank[_sample(world.user_cdf, rng.random(n_sess))]
    user_id = sess_user[sess_of]  # (B,)
    # time: the period spread evenly over positions, events within a session seconds apart
    span = cfg.days * 86_400
    frac = pos / cfg.n_events  # (B,) in [0, 1)
    event_time = cfg.start + (frac * span).astype(np.int64)
    # items: Zipf ranks, early or drifted ranking by time
    rank = _sample(world.item_cdf, rng.random(b))
    late = rng.random(b) < frac * (cfg.drift_sigma > 0)
    item_id = np.where(late, world.item_late[rank], world.item_early[rank])
    # the random slice: candidates from the popularity model, the shown arm uniform among them
    is_random = rng.random(b) < cfg.random_fraction
    n_rand = int(is_random.sum())
    k = cfg.n_candidates
    cand_rank = _sample(world.item_cdf, rng.random((n_rand, k)))
    cands = _distinct_rows(world.item_early[cand_rank], rng, cfg.n_items)  # (R, K)
    shown = rng.integers(0, k, n_rand)
    item_id = item_id.copy()
    item_id[is_random] = cands[np.arange(n_rand), shown]
    # side features
    uid = user_id.astype(np.int64)
    iid = item_id.astype(np.int64)
    cats = {}
    for j in range(8):
        cats[CAT_COLUMNS[j]] = ((uid * world.user_mult[j]) % (2**31 - 1) % CARDINALITIES[j]).astype(np.int32)
        cats[CAT_COLUMNS[8 + j]] = ((iid * world.item_mult[j]) % (2**31 - 1) % CARDINALITIES[8 + j]).astype(np.int32)
    for j, cdf in enumerate(world.ctx_cdf):
        cats[CAT_COLUMNS[16 + j]] = _sample(cdf, rng.random(b)).astype(np.int32)
    # click: logistic in the latent model (biases, dot product) plus the c17 context weight
    logit = (cfg.ctr_bias + world.user_bias[user_id] + world.item_bias[item_id]
             + np.einsum("bd,bd->b", world.user_vec[user_id], world.item_vec[item_id])  # (B,)
             + world.ctx_weight[cats["c17"]])
    click = (rng.random(b) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    candidates = np.full(b, None, dtype=object)
    for i, row in zip(np.nonzero(is_random)[0].tolist(), cands):
        candidates[i] = row
    return {
        "event_id": np.char.add(f"g{cfg.seed}-", np.char.zfill(pos.astype(str), 12)),
        "user_id": user_id.astype(np.int32), "item_id": item_id.astype(np.int32), "click": click,
        "rating": np.where(click == 1, CLICK_RATING, NO_CLICK_RATING).astype(np.float32),
        "event_time": event_time, "session_id": session_id, "is_random": is_random, "candidates": candidates,
        **cats,
    }


def generate(cfg: GeneratorConfig) -> Iterator[dict[str, np.ndarray]]:
    """The events in time order, one dict of columns per chunk.

    Yields:
        ``{column: array (B,)}`` with ``event_id`` (str, ``g<seed>-<position:012d>``), ``user_id``, ``item_id``
        (int32), ``click`` (int8 0/1), ``rating`` (float32, 5.0 click / 1.0 none), ``event_time`` (int64 Unix
        seconds, UTC), ``session_id`` (int64), ``is_random`` (bool), ``candidates`` (object: an int32 array (K,)
        on random rows, None elsewhere), ``c01``..``c26`` (int32 value indices).
    """
    world = _World(cfg)
    for index, lo in enumerate(range(0, cfg.n_events, cfg.chunk_size)):
        yield _chunk(cfg, world, index, lo, min(lo + cfg.chunk_size, cfg.n_events))


def to_arrow(chunk: dict[str, np.ndarray]):
    """One chunk as a pyarrow Table with ``PARQUET_COLUMNS`` (event_time a UTC timestamp, event_date a date)."""
    import pyarrow as pa

    ts = pa.array(chunk["event_time"] * 1_000_000, pa.timestamp("us", tz="UTC"))
    date = pa.array((chunk["event_time"] // 86_400).astype(np.int32), pa.date32())
    rows = np.nonzero(chunk["is_random"])[0]
    lengths = np.zeros(len(ts), np.int32)
    lengths[rows] = [len(chunk["candidates"][r]) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(np.concatenate([chunk["candidates"][r] for r in rows]) if len(rows) else [], pa.int32())
    cands = pa.ListArray.from_arrays(offsets, values, mask=pa.array(~chunk["is_random"]))
    cols = {**{k: chunk[k] for k in ("event_id", "user_id", "item_id", "click", "rating")},
            "event_time": ts, "event_date": date, "session_id": chunk["session_id"], "is_random": chunk["is_random"],
            "candidates": cands, **{c: chunk[c] for c in CAT_COLUMNS}}
    return pa.table({k: cols[k] for k in PARQUET_COLUMNS})


def kafka_messages(chunk: dict[str, np.ndarray]) -> Iterator[tuple[bytes, bytes]]:
    """The chunk as ``(key, value)`` Kafka messages in the wire format of features/events.py, keyed by user:
    the required fields, then every impression field (``click``, ``is_random``, ``session_id``, ``c01``..``c26``,
    and ``candidates`` on random impressions only), so that bronze receives them without loss. The same bytes as
    ``Event.to_json`` of the parsed event (a test checks it)."""
    from features.events import format_time

    times = {}
    cats = zip(*(chunk[c].tolist() for c in CAT_COLUMNS))
    for eid, uid, iid, rating, ts, click, rand, sess, cands, cat in zip(
            chunk["event_id"].tolist(), chunk["user_id"].tolist(), chunk["item_id"].tolist(),
            chunk["rating"].tolist(), chunk["event_time"].tolist(), chunk["click"].tolist(),
            chunk["is_random"].tolist(), chunk["session_id"].tolist(), chunk["candidates"], cats):
        t = times.get(ts) or times.setdefault(ts, format_time(ts))
        offered = "" if cands is None else f',"candidates":[{",".join(map(str, cands.tolist()))}]'
        side = "".join(f',"{c}":{v}' for c, v in zip(CAT_COLUMNS, cat))
        yield (str(uid).encode(), f'{{"event_id":"{eid}","user_id":{uid},"item_id":{iid},"rating":{rating},'
                                  f'"event_time":"{t}","click":{click},"is_random":{"true" if rand else "false"},'
                                  f'"session_id":{sess}{offered}{side}}}'.encode())


def write_parquet(cfg: GeneratorConfig, out: Path) -> int:
    """Write every chunk as ``out/part-<index:05d>.parquet``; return the event count."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for index, chunk in enumerate(generate(cfg)):
        pq.write_table(to_arrow(chunk), out / f"part-{index:05d}.parquet")
        n += len(chunk["event_id"])
    return n


def write_kafka(cfg: GeneratorConfig, bootstrap: str, topic: str, partitions: int) -> int:
    """Publish every event to ``topic`` (created if absent); return the count sent.

    Raises:
        PlatformError: the broker rejected some messages (see pipelines.produce.publish).
    """
    from pipelines.produce import ensure_topic, publish

    ensure_topic(bootstrap, topic, partitions)
    return sum(publish(bootstrap, topic, kafka_messages(chunk)) for chunk in generate(cfg))


def write_bronze(cfg: GeneratorConfig, spark, lake_dir: Path, staging: Path) -> int:
    """Append the events to the Delta table bronze.interactions (its exact columns; Kafka coordinates null,
    ``event_type`` the contract's default, as ingest would write them) by way of Parquet in ``staging``; return
    the count written."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    from features.events import OPTIONAL_FIELDS
    from features.tables import BRONZE_INTERACTIONS

    n = write_parquet(cfg, staging)
    schema = StructType.fromDDL(BRONZE_INTERACTIONS.schema)
    df = (spark.read.parquet(str(staging))
          .withColumn("kafka_partition", F.lit(None)).withColumn("kafka_offset", F.lit(None))
          .withColumn("ingested_at", F.current_timestamp())
          .withColumn("event_type", F.lit(OPTIONAL_FIELDS["event_type"])))
    df = df.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])
    (df.write.format("delta").mode("append").partitionBy(*BRONZE_INTERACTIONS.partition_by)
     .save(BRONZE_INTERACTIONS.path(lake_dir)))
    return n


#: The generated data source (features/sources/generated.yaml): its size and seed, and the side fields its user
#: and item tables carry (a field of the user, c05, and of the item, c14: one value per entity by construction).
SOURCE_CONFIG = GeneratorConfig(n_events=200_000, seed=7, n_users=5_000, n_items=2_000, chunk_size=50_000, days=30)
SOURCE_USER_FIELD, SOURCE_ITEM_FIELD = "c05", "c14"


def fetch_source(raw_dir: Path, cfg: GeneratorConfig = SOURCE_CONFIG) -> Path:
    """The fetch step of the generated source: write its impression log as Parquet (``<raw_dir>/generated/events/``,
    one file per chunk) and its user and item tables (``users.parquet``: user_id, segment; ``items.parquet``:
    item_id, category -- each the entity's value of ``SOURCE_USER_FIELD`` / ``SOURCE_ITEM_FIELD``), unless they are
    there. Deterministic for ``cfg``; returns the folder."""
    import pandas as pd

    out = Path(raw_dir) / "generated"
    if (out / "items.parquet").exists():
        return out
    n = write_parquet(cfg, out / "events")
    users: dict[int, int] = {}
    items: dict[int, int] = {}
    for chunk in generate(cfg):
        users.update(zip(chunk["user_id"].tolist(), chunk[SOURCE_USER_FIELD].tolist()))
        items.update(zip(chunk["item_id"].tolist(), chunk[SOURCE_ITEM_FIELD].tolist()))
    pd.DataFrame({"user_id": list(users), "segment": [f"s{v}" for v in users.values()]}).to_parquet(
        out / "users.parquet")
    pd.DataFrame({"item_id": list(items), "category": [f"c{v}" for v in items.values()]}).to_parquet(
        out / "items.parquet")
    log.info("generated source: %d events, %d users, %d items in %s", n, len(users), len(items), out)
    return out


def main(argv: list[str] | None = None) -> None:
    from features.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, required=True, help="number of impressions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--to", choices=("kafka", "bronze", "parquet"), required=True)
    parser.add_argument("--out", type=Path, help="Parquet folder (default <data_dir>/generated/<events>-<seed>)")
    parser.add_argument("--users", type=int, default=None, help="users (default: events / 20, at least 1000)")
    parser.add_argument("--items", type=int, default=None, help="items (default: events / 50, at least 1000)")
    parser.add_argument("--chunk-size", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    cfg = load_config()
    gen = GeneratorConfig(n_events=args.events, seed=args.seed, chunk_size=args.chunk_size,
                          n_users=args.users or max(1000, args.events // 20),
                          n_items=args.items or max(1000, args.events // 50))
    out = args.out or cfg.data_dir / "generated" / f"{args.events}-{args.seed}"
    start = time.perf_counter()
    if args.to == "parquet":
        n = write_parquet(gen, out)
        where = str(out)
    elif args.to == "kafka":
        n = write_kafka(gen, cfg.kafka.bootstrap, cfg.kafka.topic, cfg.kafka.partitions)
        where = f"{cfg.kafka.bootstrap}/{cfg.kafka.topic}"
    else:
        from pipelines.spark import get_spark

        n = write_bronze(gen, get_spark(cfg, app_name="recsys-generator"), cfg.lake_dir, out)
        where = str(cfg.lake_dir / "bronze" / "interactions")
    wall = time.perf_counter() - start
    print(f"generated {n:,} events (seed {args.seed}) to {where} in {wall:.1f} s ({n / wall:,.0f} events/s)")


if __name__ == "__main__":
    main()
