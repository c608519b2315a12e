"""Stage ``produce``: replay the configured data source's interaction log onto the Kafka topic as events, in time
order.

Each row of the source's log (``features.source``, ``RECSYS_SOURCE``; MovieLens-100K by default) becomes one
:class:`features.events.Event` (wire format in features/events.py) with the source's ``event_id`` (by default
``<prefix><row>``, the row's index in the file's order: ``ml100k-000000`` for MovieLens), keyed by ``user_id`` (so
one user's events share a partition and keep their order), sorted by timestamp with ties broken by the file's row
(a stable sort). The topic is created first with ``cfg.kafka.partitions`` partitions.

Run ``python -m pipelines.produce``; it writes ``{"events_produced", "topic", "partitions", "produce_wall_s",
"events_per_s"}`` as the stage result ``produce``. :func:`publish` and :func:`ensure_topic` are reusable: tests
publish raw (also malformed) messages with them.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable, Iterator

import pandas as pd

from features.config import HelpFormatter, PlatformConfig, describe, load_config_or_exit, settings_help
from features.errors import PlatformError
from features.events import Event, format_time
from features.results import write_stage_result

log = logging.getLogger(__name__)

STAGE = "produce"


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout_s: float = 30.0) -> int:
    """Create ``topic`` with ``partitions`` partitions (replication factor 1) unless it exists.

    Args:
        bootstrap: ``host:port`` of the broker.
        topic: topic name.
        partitions: partition count for a new topic.
        timeout_s: seconds to wait for the broker and for the topic's metadata.

    Returns:
        The topic's partition count. An existing topic is left as it is, so this may differ from ``partitions``
        (a warning is logged): Kafka cannot shrink a topic, and growing it would move keys between partitions.

    Raises:
        kafka.errors.NoBrokersAvailable: no broker answers at ``bootstrap``; start it (infra/scripts/kafka.sh).
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="recsys-produce-admin",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        try:
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)],
                                timeout_ms=int(timeout_s * 1000))
            log.info("created topic %s with %d partitions", topic, partitions)
        except TopicAlreadyExistsError:
            log.info("topic %s already exists", topic)
        admin.wait_for_topics([topic], timeout_ms=int(timeout_s * 1000))
        found = len(admin.describe_topics([topic])[0]["partitions"])
    finally:
        admin.close()
    if found != partitions:
        log.warning("topic %s exists with %d partitions, not the %d configured; using it as it is",
                    topic, found, partitions)
    return found


def publish(bootstrap: str, topic: str, values: Iterable[tuple[bytes | None, bytes | None]],
            linger_ms: int = 20, batch_bytes: int = 256 * 1024) -> int:
    """Send raw messages to ``topic`` and wait until the broker has acknowledged every one.

    The producer is idempotent with ``acks="all"``, so a retried batch is neither duplicated nor reordered
    within its partition; ``linger_ms`` and ``batch_bytes`` trade a few milliseconds of latency for throughput.

    Args:
        bootstrap: ``host:port`` of the broker.
        topic: an existing topic (see :func:`ensure_topic`).
        values: ``(key, value)`` pairs of bytes, sent in this order. Either may be None (a null key is spread
            over partitions; a null value is a tombstone, which ingest quarantines as ``not_json``).
        linger_ms: milliseconds a batch waits for more messages.
        batch_bytes: bytes per partition batch.

    Returns:
        The number of messages sent.

    Raises:
        PlatformError: the broker rejected or timed out some messages (the first error is named).
        kafka.errors.NoBrokersAvailable: no broker answers at ``bootstrap``.
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                             linger_ms=linger_ms, batch_size=batch_bytes, client_id="recsys-produce")
    errors: list[BaseException] = []
    sent = 0
    try:
        for key, value in values:
            producer.send(topic, key=key, value=value).add_errback(errors.append)
            sent += 1
        producer.flush()
    finally:
        producer.close()
    if errors:
        raise PlatformError(f"{len(errors)} of {sent} messages to topic {topic!r} at {bootstrap} failed; first: "
                            f"{errors[0]!r}; check the broker's log and re-run (event_ids make ingest idempotent)")
    return sent


def source_events(events: pd.DataFrame) -> Iterator[tuple[bytes, bytes]]:
    """A source's interaction log as ``(key, value)`` messages in time order.

    Args:
        events: ``features.source.Source.read_interactions``' frame: event_id, user_id, item_id, rating (stars),
            timestamp (Unix seconds), and optionally event_type and click (NaN: none), in the file's order.

    Yields:
        ``(str(user_id) as bytes, Event JSON as bytes)``, sorted by timestamp, ties by the file's order (a stable
        sort), so a user's events reach their partition in time order.

    >>> df = pd.DataFrame({"event_id": ["a-0", "a-1"], "user_id": [7, 8], "item_id": [1, 2], "rating": [4, 5],
    ...                    "timestamp": [900000001, 900000000]})
    >>> [k for k, _ in source_events(df)]
    [b'8', b'7']
    >>> next(source_events(df))[1]
    b'{"event_id":"a-1","user_id":8,"item_id":2,"rating":5.0,"event_time":"1998-07-09T16:00:00Z"}'
    """
    ordered = events.reset_index(drop=True).sort_values("timestamp", kind="stable")
    n = len(ordered)
    types = ordered["event_type"] if "event_type" in ordered else pd.Series(["rating"] * n)
    clicks = ordered["click"] if "click" in ordered else pd.Series([float("nan")] * n)
    columns = (ordered["event_id"], ordered["user_id"], ordered["item_id"], ordered["rating"], ordered["timestamp"],
               types, clicks)
    for event_id, user_id, item_id, rating, ts, kind, click in zip(*(c.to_numpy() for c in columns)):
        event = Event(str(event_id), int(user_id), int(item_id), float(rating), format_time(int(ts)), str(kind),
                      None if click != click else int(click))  # NaN != NaN: no click field
        yield str(event.user_id).encode(), event.to_json()


def run_produce(cfg: PlatformConfig, events: pd.DataFrame, show_progress: bool = True) -> dict:
    """Create the topic and publish every event of ``events`` (:func:`source_events`' input); return the stage
    result (not yet written).

    Returns:
        ``events_produced`` (count), ``topic``, ``partitions`` (count), ``produce_wall_s`` (seconds, topic
        creation excluded), ``events_per_s``.

    Raises:
        PlatformError: the broker rejected some messages.
    """
    partitions = ensure_topic(cfg.kafka.bootstrap, cfg.kafka.topic, cfg.kafka.partitions)
    messages: Iterable[tuple[bytes, bytes]] = source_events(events)
    start = time.perf_counter()
    if show_progress:
        from rich.progress import track

        messages = track(messages, total=len(events), description=f"producing to {cfg.kafka.topic}")
    n = publish(cfg.kafka.bootstrap, cfg.kafka.topic, messages)
    wall_s = time.perf_counter() - start
    return {"events_produced": n, "topic": cfg.kafka.topic, "partitions": partitions,
            "produce_wall_s": round(wall_s, 3), "events_per_s": round(n / wall_s, 1)}


def main(argv: list[str] | None = None) -> None:
    """Command line of the stage: arguments first (``--help`` returns before any broker or data is touched), then
    the configuration (an error in it: the message on stderr, exit status 2), then the replay."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.produce", formatter_class=HelpFormatter, description=describe(__doc__),
        epilog=settings_help({
            "kafka.bootstrap": "broker host:port (waits up to 30 s for it)",
            "kafka.topic": "topic the events go to",
            "kafka.partitions": "partitions of the topic when it is created (count)",
            "source": "the data source's YAML file (features/sources/; its files: make data)",
            "raw_dir": "folder that {raw_dir} in the source's paths names",
            "artifacts_dir": "stage result under <artifacts_dir>/<run_name>/stages/produce.json",
            "run_name": "name of the run"}))
    parser.parse_args(argv)
    from features.source import SourceError, load_source

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # the client logs every connection at INFO
    cfg = load_config_or_exit(parser.prog)
    try:
        events = load_source(cfg.source, cfg.raw_dir).read_interactions()
    except SourceError as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    result = run_produce(cfg, events)
    path = write_stage_result(cfg, STAGE, result)
    print(f"produced {result['events_produced']:,} events to {cfg.kafka.bootstrap}/{cfg.kafka.topic} "
          f"({result['partitions']} partitions) in {result['produce_wall_s']:.1f} s "
          f"({result['events_per_s']:,.0f} events/s); result: {path}")


if __name__ == "__main__":
    main()
